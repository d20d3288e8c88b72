"""Filtering a population run (pop_filter) and building preference data from it (pop_build)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from popalign_core.models.sampling import SamplerConfig
from popalign_core.population.build import BuildConfig, build_preferences
from popalign_core.population.filter import FilterConfig, decide, filter_population
from popalign_core.population.sample import population_jobs, sample_population
from popalign_core.train.data import load_preference_data


# ------------------------------------------------------------------------------------------------ filter
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A toy-world population run: 8 augmented + 8 neutral baker images, and 4 'tree' images (no figure)."""
    from popalign_core.models.loading import load_model

    out = tmp_path_factory.mktemp("run")
    aug = [{"neutral": "a photo of a baker", "prompt": f"a photo of {'an' if f == 'angular' else 'a'} {f} baker",
            "identity": {"form": f}, "index": i} for i in range(8) for f in [("round", "angular")[i % 2]]]  # fmt: skip
    jobs = population_jobs(aug)
    jobs += [{"prompt": "a photo of a tree", "index": i, "neutral": "a photo of a tree", "identity": {},
              "population": "losing"} for i in range(4)]  # fmt: skip
    cfg = SamplerConfig(steps=15, guidance_scale=2.0, seed=0, batch_size=32)
    sample_population(load_model("toyworld"), jobs, out, cfg, "toyworld")
    return out


@pytest.fixture(scope="module")
def clf():
    from popalign_core.classify.classifiers import make_classifier

    return make_classifier("toy", which="train")


def _rows(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def test_filter_keeps_matching_faces_and_counts_reasons(run, clf, tmp_path):
    rep = filter_population(run, clf, tmp_path / "f", FilterConfig(threshold=0.8))
    assert rep["images"] == 20 and sum(rep["reasons"].values()) == 20
    assert rep["per_population"]["losing"].get("no_face", 0) >= 4  # the trees have no figure
    kept = _rows(tmp_path / "f" / "filtered.jsonl")
    assert len(kept) == rep["kept"] > 8
    for r in kept:
        assert (tmp_path / "f" / r["image"]).is_file()
        if r["population"] == "winning":
            assert r["attributes"]["form"] == r["identity"]["form"] and r["confidence"]["form"] >= 0.8
        assert set(r["attributes"]) == {"form", "hue", "stature"}
    assert "tree" not in {r["neutral"].split()[-1] for r in kept}
    dec = _rows(tmp_path / "f" / "decisions.jsonl")
    assert len(dec) == 20 and sum(d["reason"] == "kept" for d in dec) == rep["kept"]
    report = json.loads((tmp_path / "f" / "filter_report.json").read_text())
    assert report["reasons"] == rep["reasons"] and report["config"]["threshold"] == 0.8


def test_filter_threshold_one_makes_augmented_images_ambiguous(run, clf, tmp_path):
    rep = filter_population(run, clf, tmp_path / "f", FilterConfig(threshold=1.0))
    assert rep["per_population"]["winning"].get("kept", 0) <= 1
    assert rep["per_population"]["winning"].get("ambiguous:form", 0) >= 7


def test_decide_rules_by_hand():
    from popalign_core.classify.base import Classification

    axes = {"form": ("round", "angular")}
    cfg = FilterConfig(threshold=0.8)
    win = {"population": "winning", "identity": {"form": "round"}}
    res = Classification(face_found=True, probs={"form": np.array([0.9, 0.1])})
    assert decide(win, res, axes, cfg) == "kept"
    assert decide({**win, "identity": {"form": "angular"}}, res, axes, cfg) == "mismatch:form"
    amb = Classification(face_found=True, probs={"form": np.array([0.7, 0.3])})
    assert decide(win, amb, axes, cfg) == "ambiguous:form"
    assert decide({"population": "losing", "identity": {}}, amb, axes, cfg) == "kept"
    assert decide(win, Classification(face_found=False), axes, cfg) == "no_face"
    assert decide(win, None, axes, cfg) == "unreadable"
    assert decide(win, amb, axes, FilterConfig(threshold=0.8, axes=("hue",))) == "kept"


def test_filter_bad_input(run, clf, tmp_path):
    with pytest.raises(ValueError, match="threshold"):
        FilterConfig(threshold=0).check()
    with pytest.raises(ValueError, match="holds no sampled images"):
        filter_population(tmp_path, clf, tmp_path / "f")
    # a keyword class the classifier does not know, and an axis it does not have
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = _rows(run / "manifest.jsonl")
    (bad / "images").symlink_to(run / "images")
    row = {**rows[0], "identity": {"form": "square"}}
    (bad / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"class 'square' of axis 'form'.*\['round', 'angular'\]"):
        filter_population(bad, clf, tmp_path / "f")
    (bad / "manifest.jsonl").write_text(json.dumps({**rows[0], "identity": {"gender": "female"}}) + "\n")
    with pytest.raises(ValueError, match="has no axis 'gender'"):
        filter_population(bad, clf, tmp_path / "f")


def test_unreadable_image_is_a_reason(run, clf, tmp_path):
    d = tmp_path / "r"
    (d / "images").mkdir(parents=True)
    rows = _rows(run / "manifest.jsonl")[:2]
    (d / rows[0]["image"]).write_bytes(b"not a png")
    (d / rows[1]["image"]).write_bytes((run / rows[1]["image"]).read_bytes())
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = filter_population(d, clf, tmp_path / "f")
    assert rep["reasons"].get("unreadable") == 1 and rep["images"] == 2


class _BatchClassifier:
    """A classifier over scalar 'images' v: a face when v > 0.15 (or always without detection), gender probs
    (v, 1 - v); `calls` records the images of each call and whether the detector was on."""

    axes = {"gender": ("female", "male"), "age": ("young", "old")}

    def __init__(self):
        self.detector, self.calls = "detector", []

    def classify(self, values):
        from popalign_core.classify.base import Classification

        on = self.detector == "detector"
        self.calls.append((list(values), on))
        return [
            Classification(face_found=not on or v > 0.15, probs={"gender": [v, 1 - v], "age": [0.5, 0.5]})
            if not on or v > 0.15
            else Classification(face_found=False)
            for v in values
        ]


BATCH = [0.9, 0.3, 0.1, 0.6, 0.05, 0.7]  # one value per image
BATCH_ROWS = [
    {"prompt": "a female doctor", "identity": {"gender": "female"}, "population": "winning"},  # 0.9: kept
    {"prompt": "a male doctor", "identity": {"gender": "male"}, "population": "winning"},  # 0.3 -> male 0.7
    {"prompt": "a male doctor", "identity": {"gender": "male"}, "population": "winning"},  # 0.1: no face
    {"prompt": "a doctor", "identity": {}, "population": "losing"},  # 0.6: kept (a face is enough)
    {"prompt": "a doctor", "identity": {}, "population": "losing"},  # 0.05: no face
    {"prompt": "a female doctor", "identity": {"gender": "female"}, "population": "winning"},  # 0.7: ambiguous@0.8
]


def _batch(clf):
    return lambda idx: clf.classify([BATCH[k] for k in idx])


def test_filter_batch_by_hand():
    from popalign_core.population.filter import filter_batch

    clf = _BatchClassifier()
    keep, rows, rep = filter_batch(BATCH_ROWS, clf, _batch(clf), 0.8, True, {"name": "fake"})
    # 0.3 -> male 0.7 < 0.8: ambiguous; 0.7 -> female 0.7: ambiguous; 0.1 and 0.05: no face
    assert keep == [0, 3]
    assert rep == {"images": 6, "kept": 2, "reasons": {"ambiguous:gender": 2, "kept": 2, "no_face": 2},
                   "threshold": 0.8, "require_face": True, "classifier": {"name": "fake"}}  # fmt: skip
    assert rows[0] == {**BATCH_ROWS[0], "attributes": {"gender": "female", "age": "young"}}
    assert rows[1]["attributes"] == {"gender": "female", "age": "young"} and len(clf.calls) == 1
    # threshold 0: only the argmax must match (0.3 -> male kept, 0.7 -> female kept)
    keep, _, rep = filter_batch(BATCH_ROWS, clf, _batch(clf), 0.0, True, {"name": "fake"})
    assert keep == [0, 1, 3, 5] and rep["reasons"] == {"kept": 4, "no_face": 2} and rep["threshold"] == 0.0


def test_filter_batch_without_faces_classifies_the_whole_image():
    from popalign_core.population.filter import filter_batch

    clf = _BatchClassifier()
    keep, rows, rep = filter_batch(BATCH_ROWS, clf, _batch(clf), 0.5, False, {"name": "fake"})
    assert clf.calls[1] == ([0.1, 0.05], False) and clf.detector == "detector"  # restored afterwards
    # 0.1 -> male 0.9: kept (row 2 is a male prompt); 0.05: losing, kept; 0.7 -> female 0.7 >= 0.5: kept
    assert keep == [0, 1, 2, 3, 4, 5] and rep["reasons"] == {"kept": 6} and rep["require_face"] is False
    assert rows[2]["attributes"]["gender"] == "male"


def test_filter_batch_refuses_identities_the_classifier_cannot_read_and_an_empty_result():
    from popalign_core.population.filter import filter_batch

    clf = _BatchClassifier()
    bad = [{**BATCH_ROWS[0], "identity": {"race": "x"}}]
    with pytest.raises(ValueError, match=r"prompt 'a female doctor' names race='x', which the fake classifier"):
        filter_batch(bad, clf, _batch(clf), 0.8, True, {"name": "fake"})
    assert clf.calls == []  # checked before classifying
    with pytest.raises(ValueError, match=r"filter: no image was kept \(\{\"ambiguous:gender\": 1\}\)"):
        filter_batch([BATCH_ROWS[5]], clf, lambda idx: clf.classify([0.7]), 0.8, True, {"name": "fake"})


# ------------------------------------------------------------------------------------------------ build
def _filtered(tmp_path: Path, spec: dict[str, tuple[int, int]], attrs=None) -> Path:
    """A hand-made filtered.jsonl: per neutral prompt (winning, losing) image counts; tiny PNG files."""
    d = tmp_path / "filtered"
    (d / "img").mkdir(parents=True)
    rows = []
    for neutral, (nw, nl) in spec.items():
        for pop, n in (("winning", nw), ("losing", nl)):
            for i in range(n):
                name = f"img/{neutral.split()[-1]}-{pop}-{i}.png"
                Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(d / name)
                a = (attrs or {}).get((neutral, pop, i), {"form": "round"})
                rows.append({"image": name, "prompt": f"{neutral} {pop}", "neutral": neutral, "population": pop,
                             "index": i, "seed": 100 + i, "identity": {}, "attributes": a})  # fmt: skip
    (d / "filtered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_build_sets_and_pairs_in_the_trainers_format(tmp_path):
    f = _filtered(tmp_path, {"a photo of a baker": (12, 10), "a photo of a pilot": (6, 9)})
    s = build_preferences(f, tmp_path / "data", BuildConfig(set_size=3, seed=1))
    assert s["prompts"]["a photo of a baker"] == {"winning": 12, "losing": 10, "sets": 3, "pairs": 10}
    assert s["prompts"]["a photo of a pilot"] == {"winning": 6, "losing": 9, "sets": 2, "pairs": 6}
    data = load_preference_data(tmp_path / "data" / "population.jsonl")
    assert data.kind == "population" and len(data) == 5 * 6
    groups = data.groups()
    assert len(groups) == 5
    for idx in groups.values():
        labels = [data.samples[i].label for i in idx]
        assert labels.count(1) == 3 and labels.count(-1) == 3
        assert len({data.samples[i].caption for i in idx}) == 1
    images = [s.image for s in data.samples]
    assert len(images) == len(set(images))  # without replacement across sets
    pairs = load_preference_data(tmp_path / "data" / "pairwise.jsonl")
    assert pairs.kind == "pairwise" and len(pairs.pairs) == 16
    winners = [pairs.samples[w].image for w, _ in pairs.pairs]
    losers = [pairs.samples[lo].image for _, lo in pairs.pairs]
    assert len(set(winners)) == 16 and len(set(losers)) == 16
    assert all("winning" in w.name and "losing" in lo.name for w, lo in zip(winners, losers))
    assert all(w.name.split("-")[0] == lo.name.split("-")[0] for w, lo in zip(winners, losers))  # same prompt


def test_build_is_seeded_and_independent_of_prompt_order(tmp_path):
    f = _filtered(tmp_path, {"a photo of a baker": (8, 8), "a photo of a pilot": (8, 8)})
    a = build_preferences(f, tmp_path / "a", BuildConfig(set_size=2, seed=3))
    b = build_preferences(f, tmp_path / "b", BuildConfig(set_size=2, seed=3))
    c = build_preferences(f, tmp_path / "c", BuildConfig(set_size=2, seed=4))
    ta, tb, tc = ((tmp_path / x / "population.jsonl").read_text() for x in "abc")
    assert ta == tb and ta != tc and a["sets"] == b["sets"] == c["sets"] == 8
    # reversing the rows of the filtered manifest changes nothing per prompt
    m = f / "filtered.jsonl"
    lines = m.read_text().splitlines()
    baker = [ln for ln in lines if "baker" in ln]
    m.write_text("\n".join([ln for ln in lines if "pilot" in ln] + baker) + "\n")
    build_preferences(f, tmp_path / "d", BuildConfig(set_size=2, seed=3))
    rows_a = [json.loads(x) for x in ta.splitlines() if "baker" in x]
    rows_d = [json.loads(x) for x in (tmp_path / "d" / "population.jsonl").read_text().splitlines() if "baker" in x]
    assert rows_a == rows_d


def test_distinct_groups_rule_by_hand(tmp_path):
    n, m = "a photo of a baker", "a photo of a pilot"
    attrs = {}
    for i in range(4):
        attrs[(n, "winning", i)] = {"form": "round", "hue": "red"}  # one group in every winning set
        attrs[(n, "losing", i)] = {"form": "round", "hue": f"h{i}"}  # two groups in every losing set -> flips
        attrs[(m, "winning", i)] = attrs[(m, "losing", i)] = {"form": "round", "hue": "red"}  # ties
    f = _filtered(tmp_path, {n: (4, 4), m: (4, 4)}, attrs)
    s = build_preferences(f, tmp_path / "d", BuildConfig(set_size=2, rule="distinct_groups"))
    assert s["sets_flipped"] == 2 and s["ties_dropped"] == 2 and s["sets"] == 2
    rows = [json.loads(x) for x in (tmp_path / "d" / "population.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["caption"] == n for r in rows)
    assert all(r["prompt"].endswith("losing") == (r["population"] == "winning") for r in rows)
    # counting groups on `form` only, every set ties
    with pytest.raises(ValueError, match="or every set tied"):
        build_preferences(f, tmp_path / "e", BuildConfig(set_size=2, rule="distinct_groups", group_axes=("form",)))


def test_build_bad_input(tmp_path):
    f = _filtered(tmp_path, {"a photo of a baker": (5, 3)})
    with pytest.raises(ValueError, match=r"'a photo of a baker': 2 sets of 2 need 4 winning and 4 losing images; "
                                         r"5 winning and 3 losing images were kept"):  # fmt: skip
        build_preferences(f, tmp_path / "d", BuildConfig(set_size=2, set_count=2))
    s = build_preferences(f, tmp_path / "d", BuildConfig(set_size=2, set_count=2, on_short="skip"))
    assert s["sets"] == 1 and len(s["shortfalls"]) == 1
    with pytest.raises(ValueError, match="no population set could be built"):
        build_preferences(f, tmp_path / "e", BuildConfig(set_size=4))
    for bad, msg in ((dict(set_size=0), "set_size"), (dict(rule="best"), "rule='best' is not a known rule"),
                     (dict(on_short="x"), "on_short"), (dict(set_count=0), "set_count")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            BuildConfig(**bad).check()
    with pytest.raises(FileNotFoundError, match="run `popalign data filter` first"):
        build_preferences(tmp_path / "nothing", tmp_path / "x")
