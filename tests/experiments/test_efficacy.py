"""The efficacy study (popalign_core.experiments.efficacy): every row's config, row identity, a --quick row end to
end with its report, and the settings it relies on (demo method options, dal-toy training roles)."""

from __future__ import annotations

import json

import pytest

from popalign_core.experiments import dal_toy
from popalign_core.experiments import efficacy as E
from popalign_core.experiments.demo import load_demo_config, train_roles
from popalign_core.toyworld.world import HELD_OUT_ROLES, TRAIN_ROLES

ROWS = [(study, label, o) for study, spec in E.STUDIES.items() for label, o in spec]


@pytest.mark.parametrize(("study", "label", "overrides"), ROWS, ids=[f"{s}:{lab}" for s, lab, _ in ROWS])
def test_every_row_is_a_valid_demo_config_with_one_popalign_method(study, label, overrides):
    cfg = E.row_config(overrides)
    assert list(cfg["methods"]) == ["popalign"] and cfg["methods"]["popalign"]["loss"] == "popalign"
    assert not set(train_roles(cfg)) & set(HELD_OUT_ROLES)


def test_default_rows_are_one_run():
    """The demo's default setting appears in four studies; it is one row on disk (the key spells out the roles)."""
    keys = {
        E.row_key(E.row_config(o))
        for s, lab, o in ROWS
        if lab in ("34 roles", "16 + 16 images per role", "UNet attention", "beta 200, lr 1e-3")
    }
    assert len(keys) == 1
    assert len({E.row_key(E.row_config(o)) for *_, o in ROWS}) == len(ROWS) - 3
    # the roles factor adds roles in ROLE_ORDER, a permutation of the training roles
    assert sorted(E.ROLE_ORDER) == sorted(TRAIN_ROLES)
    assert [len(train_roles(E.row_config(o))) for _, o in E.STUDIES["roles"]] == [4, 8, 17, 34]


@pytest.mark.parametrize(("study", "match"), [("rolez", "unknown study rolez"), (",", "unknown study \\(none\\)"),
                                              ("roles,bogus", "unknown study bogus")])  # fmt: skip
def test_study_names_errors(study, match):
    with pytest.raises(ValueError, match=match):
        E.study_names(study)
    assert E.study_names("all") == list(E.STUDIES) and E.study_names("roles, dal") == ["roles", "dal"]


@pytest.mark.parametrize(
    ("options", "match"),
    [({"steps": 5}, "'steps' is not a `popalign train` setting the demo leaves open"),
     ({"train_txt_encoder": True}, "'train_txt_encoder' is not a `popalign train` setting"),
     ("text", "expected a mapping")],
)  # fmt: skip
def test_demo_method_options_are_checked(options, match):
    m = {"loss": "popalign", "data": "population", "lr": 1e-3, "options": options}
    with pytest.raises(ValueError, match=f"methods.popalign.options: .*{match}"):
        load_demo_config(methods={"popalign": m})
    m["options"] = {"train_text_encoder": True, "train_unet": False}
    assert load_demo_config(methods={"popalign": m})["methods"]["popalign"]["options"]["train_unet"] is False


def test_dal_toy_train_roles_are_checked(tmp_path):
    for roles, match in ((["chef"], "'chef' is a held-out role"), (["actor"], "'actor' is a validation role"),
                         (["bakr"], "unknown role 'bakr'")):  # fmt: skip
        cfg = dal_toy._merge(dal_toy._merge(dal_toy.DEFAULTS, dal_toy.QUICK), {"train_roles": roles})
        with pytest.raises(ValueError, match=match):
            dal_toy.run(tmp_path / "d", cfg, log=lambda m: None)
    assert not (tmp_path / "d").exists()  # refused before any work


def test_quick_row_end_to_end_and_report(tmp_path):
    """One row at the demo's smoke sizes (numbers meaningless): every field, the reuse of a row on disk, the report."""
    out, doc = tmp_path / "eff", tmp_path / "doc"
    label, o = E.STUDIES["roles"][0]
    r = E.run_row("roles", label, o, out, log=lambda m: None, quick=True)
    cfg = E.row_config(o, quick=True)
    assert r["key"] == E.row_key(cfg) and (out / "rows" / f"{r['key']}.json").is_file()
    assert sorted(r["train_roles"]) == sorted(E.ROLE_ORDER[:4]) and r["n_train_roles"] == 4 and r["quick"]
    h, i = r["held_out"], r["in_distribution"]
    assert h["reduction"] == pytest.approx(1 - h["after"] / h["before"])
    assert i["reduction"] == pytest.approx(1 - i["after"] / i["before"])
    assert len(h["reduction_ci"]) == 2 and len(i["reduction_ci"]) == 2 and 0 <= h["identity_recall"] <= 1
    curve = r["selection"]["curve"]
    assert [c["step"] for c in curve] == [2, 4] and r["selection"]["chosen_step"] in (2, 4)
    assert list(r["stages_held_out"]) == [str(r["selection"]["chosen_step"])]  # only the kept stage (not `steps`)
    assert r["data"]["build"]["sets"] >= 1
    # a row on disk is read back, not run again
    again = E.run_row("roles", label, o, out, log=lambda m: None, quick=True)
    assert again == json.loads(json.dumps(r, default=float))
    md = E.report(out, doc)
    assert "### roles" in md and "| 4 roles |" in md and "| 8 roles | not run |" in md
    assert (doc / "scaling.png").is_file() and (doc / "tables.md").read_text().strip() == md.strip()
    assert (doc / "tradeoff.png").is_file() and "### kept stages by held-out identity recall" in md
    assert f"| roles: 4 roles | {100 * h['reduction']:.1f}% | {h['identity_recall']:.3f} |" in md
    assert json.loads((doc / "rows.json").read_text())[r["key"]]["label"] == "4 roles"


def test_quick_dal_row_with_in_distribution_errors(tmp_path):
    label, o = E.DAL_STUDY[0]
    row = E.run_dal_row(label, o, tmp_path, log=lambda m: None, quick=True)
    assert row["results"]["settings"]["train_roles"] == list(E.ROLE_ORDER[:8])
    ind = row["in_distribution"]
    assert set(ind["before"]) == set(ind["after"]) == {"form", "stature"}
    assert all(0 <= v <= 1 for v in [*ind["before"].values(), *ind["after"].values()])
    md = E.report(tmp_path, tmp_path / "doc")
    assert "### dal" in md and f"| {label} |" in md


def test_code_span_of_nested_role_subsets():
    """Nested training subsets span more: the outside fraction can only fall as roles are added (a projection onto
    a larger subspace), and each fraction is in [0, 1]."""
    import numpy as np

    from popalign_core.models.loading import load_model

    model = load_model("toyworld")
    d = E.code_span(model)
    assert -1 <= d["mean_pairwise_cosine"] <= 1
    ks = sorted(d["outside_span"])
    assert ks == list(E.ROLE_COUNTS) == [4, 8, 17, 34]
    for role in HELD_OUT_ROLES:
        vals = [d["outside_span"][k]["per_role"][role] for k in ks]
        assert all(0 <= v <= 1 for v in vals) and all(a >= b - 1e-6 for a, b in zip(vals, vals[1:]))
    # one code per caption: the same caption gives the same code
    codes = E.role_codes(model, ["baker", "baker"])
    assert codes.shape[0] == 2 and np.allclose(codes[0], codes[1])


def _kept_row(study, label, reduction, recall, rule, anchor=0.0):
    params = {"beta": 200.0, **({"anchor_weight": anchor} if anchor else {})}
    return {"study": study, "label": label, "overrides": {"methods": {"popalign": {"loss_params": params}}},
            "held_out": {"reduction": reduction, "identity_recall": recall, "concept_accuracy_drop": 2.0},
            "selection": {"rule": rule}}  # fmt: skip


def test_kept_table_sorted_by_recall_and_anchor_flag():
    """The kept-stage table by hand: highest recall first (ties by key), the defaults' row named, the fallback rule
    marked; a row is anchored only with anchor_weight > 0."""
    rows = {
        "k1": _kept_row("beta_lr", "beta 50", 0.354, 0.845, "no stage within the validation limits: the first stage"),
        "k0": _kept_row("roles", "34 roles", 0.291, 0.899, "no stage within the validation limits: the first stage"),
        "k2": _kept_row("anchor", "anchor 50", 0.252, 0.970, "lowest validation discrepancy within the limits", 50.0),
    }
    md = E._kept_table(rows, default_key="k0")
    assert md[4:7] == [
        "| anchor: anchor 50 | 25.2% | 0.970 | 2 | yes |",
        "| the defaults | 29.1% | 0.899 | 2 | no (first stage) |",
        "| beta_lr: beta 50 | 35.4% | 0.845 | 2 | no (first stage) |",
    ]
    assert E._kept_table({}, "k0") == []
    assert [E._anchored(r) for r in rows.values()] == [False, False, True]
