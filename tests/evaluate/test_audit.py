"""Tests of `popalign audit` (evaluate.audit) and its reports (evaluate.report), on the tiny sd15 model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from popalign_core.evaluate.audit import AuditConfig, compare_audits, main, read_prompts, run_audit
from popalign_core.models.sampling import SamplerConfig

pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")

N_BOOT = 50
SAMPLER = SamplerConfig(steps=2, guidance_scale=7.5, seed=0, height=32, width=32)
PROMPTS = ["a photo of a doctor", "a photo of a nurse"]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """Seeded random FairFace weights (torchvision resnet34, fc -> 18), saved as a plain state dict."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet34(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, 18)
    with torch.no_grad():
        model.fc.weight.mul_(0.01)
    path = tmp_path_factory.mktemp("weights") / "fairface_random.pt"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def classifier(weights):
    from popalign_core.classify.classifiers import make_classifier

    return make_classifier("fairface", weights=weights)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, classifier):
    root = tmp_path_factory.mktemp("audit_root")
    out = root / "out"
    res = run_audit(
        model="tiny:sd15",
        prompts=PROMPTS,
        images_per_prompt=4,
        config=AuditConfig(classifier=classifier, n_boot=N_BOOT),
        out_dir=out,
        sampler=SAMPLER,
    )
    return root, out, res


def test_sampling_audit_structure(sampled):
    root, out, res = sampled
    assert _files(root) == {"out"} | {f"out/{f}" for f in _files(out)}  # nothing outside out_dir
    on_disk = json.loads((out / "audit.json").read_text())
    assert on_disk["prompts"] == PROMPTS
    assert on_disk["settings"]["sampler"]["steps"] == 2 and "guidance" in on_disk["settings"]["sampler"]["cfg"]
    assert on_disk["settings"]["model"] == "tiny:sd15"
    assert on_disk["counts"] == {"images": 8, "readable": 8, "corrupt": 0, "errors": 0, "faces": 8, "no_face": 0}
    assert len(on_disk["images"]) == 8 and all(r["face_found"] and r["box"] for r in on_disk["images"])
    for axis in ("gender", "race"):
        e = on_disk["axes"][axis]
        assert np.allclose(e["target"], 1.0 / len(e["classes"]))
        for p in PROMPTS:
            r = e["discrepancy"]["per_prompt"][p]
            assert r["n"] == 4 and math.isfinite(r["value"]) and r["floor"] > 0
            assert r["ci"][0] - 1e-12 <= r["value"] <= r["ci"][1] + 1e-12
            assert 0 <= e["bias_pairwise"]["per_prompt"][p]["value"] <= 1
        m = e["discrepancy"]["mean_over_prompts"]
        assert m["value"] == pytest.approx(np.mean([e["discrepancy"]["per_prompt"][p]["value"] for p in PROMPTS]))
        assert "pooled" in e["discrepancy"]["pooled"]["note"]
    # images + manifest
    rows = [json.loads(x) for x in (out / "images.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p for p in PROMPTS for _ in range(4)]
    assert all((out / r["image"]).is_file() and isinstance(r["seed"], int) for r in rows)
    for f in ("report.md", "report.html", "shares_gender.png", "shares_race.png", "discrepancy.png", "grid.png"):
        assert (out / f).is_file(), f
    md = (out / "report.md").read_text()
    assert md.index("MEAN over prompts") < md.index("Pooled") and "docs/metrics.md" in md
    page = (out / "report.html").read_text()
    assert "src='grid.png'" not in page and page.count("src='data:image/png;base64,") == 4  # self-contained


def test_images_mode_reproduces_sampling_audit(sampled, classifier, tmp_path):
    _, out, res = sampled
    before = _files(tmp_path)
    res2 = run_audit(
        images_dir=out,
        manifest=out / "images.jsonl",
        config=AuditConfig(classifier=classifier, n_boot=N_BOOT),
        out_dir=tmp_path / "o",
    )
    assert _files(tmp_path) - before == {"o"} | {f"o/{f}" for f in _files(tmp_path / "o")}
    assert res2["prompts"] == PROMPTS
    for axis in ("gender", "race"):
        a, b = res["axes"][axis]["discrepancy"], res2["axes"][axis]["discrepancy"]
        for p in PROMPTS:
            assert b["per_prompt"][p]["value"] == pytest.approx(a["per_prompt"][p]["value"], abs=1e-9)
            assert b["per_prompt"][p]["ci"] == pytest.approx(a["per_prompt"][p]["ci"], abs=1e-9)


class NoFace:
    """A real detector that never finds a face."""

    name = "no_face"

    def detect(self, image):
        return None


def test_zero_faces_and_corrupt_image(sampled, weights, tmp_path):
    _, out, _ = sampled
    from popalign_core.classify.classifiers import make_classifier

    folder = tmp_path / "imgs"
    for i in range(len(PROMPTS)):
        (folder / f"prompt{i}").mkdir(parents=True)
        for j in range(2):
            (folder / f"prompt{i}" / f"{j}.png").write_bytes((out / "images" / f"p{i:03d}_{j:04d}.png").read_bytes())
    (folder / "prompt0" / "broken.png").write_bytes(b"not a png at all")
    clf = make_classifier("fairface", weights=weights, detector=NoFace())
    # no face anywhere: an error, not a report of None values (and nothing is written)
    with pytest.raises(ValueError, match=r"no face was detected in any of the 4 readable images"):
        run_audit(images_dir=folder, config=AuditConfig(classifier=clf, n_boot=N_BOOT, max_unreadable=0.5),
                  out_dir=tmp_path / "o")  # fmt: skip
    assert not (tmp_path / "o").exists()
    # 1 of 5 unreadable is more than the default 10 %: an error naming the file
    with pytest.raises(ValueError, match=r"1 of 5 images \(20%\) could not be read.*broken\.png.*--max-unreadable"):
        config = AuditConfig(classifier="fairface", classifier_options={"weights": weights}, n_boot=N_BOOT)
        run_audit(images_dir=folder, config=config, out_dir=tmp_path / "o2", report=False)
    # allowed: counted once, warned about, and the rest measured
    allow = AuditConfig(classifier="fairface", classifier_options={"weights": weights}, n_boot=N_BOOT,
                        max_unreadable=0.25)  # fmt: skip
    res2 = run_audit(images_dir=folder, config=allow, out_dir=tmp_path / "o2", report=False)
    assert res2["counts"]["corrupt"] == 1 and res2["counts"]["faces"] == 4
    assert any("1 of 5 image(s) could not be read" in w and "broken.png" in w for w in res2["warnings"])
    broken = [r for r in res2["images"] if r["image"].endswith("broken.png")]
    assert broken[0]["error"].startswith("unreadable")
    on_disk = json.loads((tmp_path / "o2" / "audit.json").read_text())
    assert on_disk["counts"]["corrupt"] == 1 and on_disk["warnings"] == res2["warnings"]


def test_prompt_file_errors(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(f)
    f.write_text("a doctor\n# c\na nurse\n\na doctor\n")
    with pytest.raises(ValueError, match=r"'a doctor' on lines 1, 5"):
        read_prompts(f)
    f.write_text("a doctor\n  \n# x\na nurse\n")
    assert read_prompts(f) == ["a doctor", "a nurse"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompts(tmp_path / "missing.txt")


def test_unknown_classifier(tmp_path):
    with pytest.raises(ValueError, match=r"unknown classifier 'nope'.*clip.*fairface"):
        run_audit(model="tiny:sd15", prompts=PROMPTS, config=AuditConfig(classifier="nope"), out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_compare_and_cli(sampled, weights, tmp_path):
    _, out, res = sampled
    # a second audit through the CLI (different seed), then compare
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS) + "\n")
    rc = main(["--model", "tiny:sd15", "--prompts", str(pf), "--images-per-prompt", "3", "--classifier", "fairface",
               "--weights", weights, "--steps", "2", "--height", "32", "--width", "32", "--seed", "1",
               "--n-boot", str(N_BOOT), "--out", str(tmp_path / "b"), "--no-report"])  # fmt: skip
    assert rc == 0 and (tmp_path / "b" / "audit.json").is_file()
    before = _files(tmp_path)
    rc = main(["compare", str(out / "audit.json"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")])
    assert rc == 0
    assert _files(tmp_path) - before == {"cmp"} | {f"cmp/{f}" for f in _files(tmp_path / "cmp")}
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    b = json.loads((tmp_path / "b" / "audit.json").read_text())
    for axis in ("gender", "race"):
        row = cmp["axes"][axis]["per_prompt"][PROMPTS[0]]
        assert row["before"] == pytest.approx(res["axes"][axis]["discrepancy"]["per_prompt"][PROMPTS[0]]["value"])
        assert row["after"] == pytest.approx(b["axes"][axis]["discrepancy"]["per_prompt"][PROMPTS[0]]["value"])
        assert row["change"] == pytest.approx(row["after"] - row["before"])
        assert cmp["axes"][axis]["mean_over_prompts"]["before_ci"] is not None
    assert (tmp_path / "cmp" / "compare.png").is_file() and (tmp_path / "cmp" / "compare.md").is_file()
    res3 = compare_audits(res, b, tmp_path / "cmp2", report=False)
    assert res3["warnings"] == []
    from popalign_core.common.fileio import foreign_entries
    from popalign_core.evaluate.audit import AUDIT_OUTPUTS, COMPARE_OUTPUTS

    # the declared layouts cover every output (what --out checks against)
    assert foreign_entries(tmp_path / "cmp", COMPARE_OUTPUTS) == [] and foreign_entries(out, AUDIT_OUTPUTS) == []


def test_recall_from_csv_manifest_identities(sampled, classifier, tmp_path):
    """Identity-specific prompts: recall = share of images whose predicted class is the recorded identity (word
    level: an image recorded as 'female' and predicted 'male' is a miss), from a CSV manifest."""
    import csv

    _, out, _ = sampled
    rows = [json.loads(ln) for ln in (out / "images.jsonl").read_text().splitlines()]
    manifest = tmp_path / "ids.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "prompt", "identity"])
        for k, r in enumerate(rows):
            w.writerow([str(out / r["image"]), r["prompt"], "gender=female" if k % 2 == 0 else "gender=male"])
    config = AuditConfig(classifier=classifier, n_boot=N_BOOT)
    res = run_audit(manifest=manifest, config=config, out_dir=tmp_path / "o")
    rec = res["axes"]["gender"]["recall"]["per_prompt"]
    classes = res["axes"]["gender"]["classes"]
    for p in PROMPTS:
        imgs = [im for im in res["images"] if im["prompt"] == p]
        hits = [
            classes[int(np.argmax([im["probs"]["gender"][c] for c in classes]))] == im["identity"]["gender"]
            for im in imgs
        ]
        value = rec[p]["value"] if isinstance(rec[p], dict) else rec[p]
        assert value == pytest.approx(sum(hits) / len(hits))


TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_clip_score_in_audit_matches_hand_computation(sampled, classifier, tmp_path):
    """CLIPScore per image = 100 * max(cos(image, prompt), 0) with the clip backend's embeddings; per prompt the
    mean, with a bootstrap CI; reported in audit.json and report.md."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    from popalign_core.classify.classifiers import make_classifier

    _, out, _ = sampled
    torch.manual_seed(3)
    sd = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP_CFG).state_dict()
    wpath = tmp_path / "clip_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(wpath))
    opts = {"weights": str(wpath), "model_cfg": TINY_CLIP_CFG}
    res = run_audit(images_dir=out, manifest=out / "images.jsonl", out_dir=tmp_path / "o",
                    config=AuditConfig(classifier=classifier, n_boot=N_BOOT, clip_score=opts))  # fmt: skip
    clip = make_classifier("clip", **opts)
    from popalign_core.evaluate.audit import load_rgb

    for p in PROMPTS:
        recs = [r for r in res["images"] if r["prompt"] == p]
        img = clip.embed_images([load_rgb(r["path"]) for r in recs])
        txt = clip.embed_texts([p])[0]
        want = [100 * max(float(e @ txt / np.linalg.norm(e) / np.linalg.norm(txt)), 0.0) for e in img]
        assert [r["clip_score"] for r in recs] == pytest.approx(want, abs=1e-6)
        row = res["clip_score"]["per_prompt"][p]
        assert row["n"] == 4 and row["value"] == pytest.approx(np.mean(want), abs=1e-6)
        assert row["ci"][0] - 1e-9 <= row["value"] <= row["ci"][1] + 1e-9
    m = res["clip_score"]["mean_over_prompts"]
    assert m["value"] == pytest.approx(np.mean([res["clip_score"]["per_prompt"][p]["value"] for p in PROMPTS]))
    assert res["settings"]["clip_score"]["weights"] == str(wpath)
    assert "CLIPScore" in (tmp_path / "o" / "report.md").read_text()
    with pytest.raises(ValueError, match="`clip_score` must be None, options of the clip backend"):
        run_audit(images_dir=out, manifest=out / "images.jsonl", out_dir=tmp_path / "x",
                  config=AuditConfig(classifier=classifier, clip_score="yes"))  # fmt: skip


def test_cli_targets_file_inline_and_named_detector(sampled, weights, tmp_path, capsys):
    _, out, _ = sampled
    tf = tmp_path / "targets.json"
    tf.write_text(json.dumps({"gender": {"female": 0.3, "male": 0.7}}))
    common = ["--images", str(out), "--manifest", str(out / "images.jsonl"), "--classifier", "fairface",
              "--weights", weights, "--n-boot", str(N_BOOT), "--no-report", "--axes", "gender"]  # fmt: skip
    assert main([*common, "--targets", str(tf), "--out", str(tmp_path / "a")]) == 0
    a = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert a["axes"]["gender"]["classes"] == ["female", "male"] and a["axes"]["gender"]["target"] == [0.3, 0.7]
    inline = '{"gender": {"female": 0.5, "male": 0.5}}'
    capsys.readouterr()
    # the tiny model draws no faces: the Haar cascade finds none, and the audit fails saying so (no numbers from 0)
    assert main([*common, "--targets", inline, "--detector", "opencv_haar", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("popalign audit: error: no face was detected in any of the") and "--detector" in err[-1]
    assert not (tmp_path / "b").exists()
    for bad, msg in (
        (["--targets", "nope.json"], "--targets: 'nope.json' is neither JSON text nor an existing"),
        (["--targets", '{"gender": {"female": 0.3, "male": 0.3}}'], "`targets['gender']` must sum to 1"),
        (["--detector", "nope"], "argument --detector: invalid choice: 'nope'"),
    ):
        assert main([*common, *bad, "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("popalign audit: error: ") and msg in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cli_audits_a_flow_model(weights, tmp_path, family):
    """`popalign audit --model tiny:sd3|flux`: flow-Euler sampling (scheduler auto), recorded by its name."""
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS) + "\n")
    rc = main(["--model", f"tiny:{family}", "--prompts", str(pf), "--images-per-prompt", "2", "--classifier",
               "fairface", "--weights", weights, "--steps", "2", "--n-boot", str(N_BOOT), "--out", str(tmp_path / "a"),
               "--no-report"])  # fmt: skip
    assert rc == 0
    res = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert res["settings"]["sampler"]["scheduler"] == "flow_euler"
    assert res["settings"]["sampler"]["height"] == 32 and res["settings"]["model"] == f"tiny:{family}"
