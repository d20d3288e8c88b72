"""The demo (README command #1) end to end at --quick sizes, and its statistics by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from popalign_core.experiments.demo import (
    _disc,
    _stage_reduction,
    bootstrap,
    choose_stage,
    floor,
    load_demo_config,
    main,
    role_bias,
    run_demo,
)
from popalign_core.toyworld.world import HELD_OUT_ROLES

SUBSET = ("baker", "tailor", "farmer", "miner", "judge")  # 5 of the 34 training roles (data.train_roles)
EVERY = {"n_per_role": 8, "n_per_identity": 1, "n_per_concept": 2}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = load_demo_config(quick=True)
    cfg["budgets"] = {k: 1e-3 for k in cfg["budgets"]}  # reference times every stage overruns: reported, not acted on
    cfg["data"]["train_roles"] = list(SUBSET)
    cfg["eval"]["every_stage"] = EVERY  # --quick audits only the kept stages; the test covers every stage too
    return out, run_demo(out, cfg, overwrite=True, log=lambda m: None)


def test_demo_writes_every_output(demo_run):
    out, r = demo_run
    for name in ("results.json", "report.md", "shares.png", "training.png", "tradeoff.png", "demo_config.yaml",
                 "pipeline/pipeline.yaml", "pipeline/run/data/population.jsonl", "pipeline/run/data/pairwise.jsonl",
                 "popalign_lora.safetensors", "sft_lora.safetensors", "dpo_lora.safetensors",
                 "popalign_anchor_lora.safetensors", "dal_lora.safetensors"):  # fmt: skip
        assert (out / name).exists(), name
    assert json.loads((out / "results.json").read_text())["methods"].keys() == r["methods"].keys()
    report = (out / "report.md").read_text()
    assert "| popalign |" in report and "| dpo |" in report and "![shares](shares.png)" in report


def test_results_fields_and_consistency(demo_run):
    _, r = demo_run
    assert set(r["methods"]) == {"popalign", "popalign_anchor", "sft", "dpo", "dal"}
    assert r["held_out_roles"] == list(HELD_OUT_ROLES) and len(HELD_OUT_ROLES) == 14 and r["n_per_role"] == 6
    for m in r["methods"].values():
        assert m["discrepancy_before"] == r["base"]["discrepancy"]
        assert m["reduction"] == pytest.approx(1 - m["discrepancy_after"] / m["discrepancy_before"])
        assert m["concept_accuracy_drop"] == pytest.approx(
            100 * (r["base"]["concept_accuracy"] - m["concept_accuracy"])
        )
        lo, hi = m["discrepancy_after_ci"]
        assert lo <= hi and len(m["reduction_ci"]) == 2
        assert 0 <= m["identity_recall"] <= 1 and set(m["identity_recall_per_axis"]) == {"form", "hue", "stature"}
        # the selected step follows the rule on the validation roles
        best, why = choose_stage(m["selection_curve"], r["validation_base"], load_demo_config(quick=True))
        assert m["selected_step"] == best["step"] and m["selection_rule"] == why
        # the mean over roles and axes, never a pool
        per = m["per_role_after"]
        assert np.mean([np.nanmean([per[ro][a]["discrepancy"] for ro in per]) for a in r["axes"]]) == pytest.approx(
            m["discrepancy_after"]
        )
    assert r["methods"]["dpo"]["train_config"]["data"].endswith("pairwise.jsonl")
    # every stage audited on the held-out roles (the trade-off plot): the kept one at the full sizes
    quick = load_demo_config(quick=True)
    for m in r["methods"].values():
        per = m["held_out_per_stage"]
        assert list(per) == [str(c["step"]) for c in m["selection_curve"]]
        kept = per[str(m["selected_step"])]
        assert kept["discrepancy"] == m["discrepancy_after"] and kept["n_per_role"] == quick["eval"]["n_per_role"]
        assert kept["reduction"] == pytest.approx(m["reduction"])
        others = [v for k, v in per.items() if k != str(m["selected_step"])]
        assert all(v["n_per_role"] == EVERY["n_per_role"] for v in others)
        # each stage against the base model on the same images (the first n per role); the kept one: the full audit
        assert kept["discrepancy_before"] == pytest.approx(m["discrepancy_before"])
        assert all(v["reduction"] == pytest.approx(1 - v["discrepancy"] / v["discrepancy_before"]) for v in others)
    dal = r["methods"]["dal"]["train_config"]
    assert dal["target"] == {"form": [0.5, 0.5], "hue": [0.25] * 4, "stature": [0.5, 0.5]}
    assert dal["prompts"] == [f"a photo of a {role}" for role in SUBSET] and dal["train"] == "both"
    assert r["methods"]["popalign_anchor"]["train_config"]["loss_params"]["anchor_weight"] > 0
    assert set(r["timings"]) == {"audit_before", "data", "train", "select", "audit_after", "report", "total"}
    assert r["data"]["filter"]["images"] == 60  # 5 training roles x (6 augmented + 6 neutral)


def test_train_roles_choose_the_data_selection_and_anchor_prompts(demo_run):
    out, r = demo_run
    assert r["train_roles"] == list(SUBSET)
    import yaml

    prompts = yaml.safe_load((out / "pipeline" / "pipeline.yaml").read_text())["prompts"]
    assert prompts == [f"a photo of a {role}" for role in SUBSET]
    cfg = yaml.safe_load((out / "popalign_anchor" / "config.yaml").read_text())
    roles = {p.split()[-1] for p in cfg["anchor_prompts"]} - {"tree", "house", "boat", "sun"}  # minus the concepts
    assert roles == set(SUBSET)


@pytest.mark.parametrize(("roles", "match"), [
    (["baker", "chef"], r"data.train_roles: 'chef' is a held-out role \(held out: pianist, guard, pilot, "),
    (["baker", "actor"], r"data.train_roles: 'actor' is a validation role \(validation: merchant, drummer, "),
    (["bakr"], r"data.train_roles: unknown role 'bakr'; training roles: baker, "),
    (["baker", "baker"], r"'baker' is listed twice"),
    ([], r"data.train_roles=\[\]: expected 'all' or a non-empty list"),
    ("baker", r"data.train_roles='baker': expected 'all' or a non-empty list"),
])  # fmt: skip
def test_train_roles_errors_name_the_setting(roles, match):
    with pytest.raises(ValueError, match=match):
        load_demo_config(quick=True, data={"train_roles": roles})


def test_fixed_work_whatever_the_machine_speed(demo_run):
    """Every stage runs although each took longer than its reference time: the same work (and numbers) anywhere."""
    _, r = demo_run
    quick = load_demo_config(quick=True)
    assert all(t["over_budget"] for t in r["timings"].values())
    assert r["data"]["sample"]["done"] == r["data"]["sample"]["jobs"] == 60
    for name, m in r["methods"].items():
        steps = quick["methods"]["dal"]["steps"] if name == "dal" else quick["train"]["steps"]
        assert [c["step"] for c in m["selection_curve"]] == [steps // 2, steps]  # both stages
        assert m["trained_steps"] == steps


def test_discrepancy_and_floor_by_hand():
    # shares 3/4, 1/4 on 2 classes: || (0.25, -0.25) || = 0.3536
    assert _disc(np.array([0, 0, 0, 1, -1]), 2) == pytest.approx(np.sqrt(2) * 0.25)
    assert np.isnan(_disc(np.array([-1, -1]), 2))
    lab = {"judge": {"form": np.array([0, 0, 0, 1]), "hue": np.array([0, 1, 2, 3]), "stature": np.array([1, 1, 1, 1]),
                     "face": np.ones(4, bool), "concept": np.zeros(4, int)}}  # fmt: skip
    b = role_bias(lab)
    assert b["per_axis"]["form"] == pytest.approx(0.3536, abs=1e-4) and b["per_axis"]["hue"] == 0.0
    assert b["per_axis"]["stature"] == pytest.approx(np.sqrt(0.5))
    assert b["mean"] == pytest.approx((0.353553 + 0 + 0.707107) / 3, abs=1e-5)
    assert b["per_role"]["judge"]["hue"]["shares"] == {"red": 0.25, "green": 0.25, "blue": 0.25, "gold": 0.25}
    # floor: 4 faces, binary: E|| p_hat - 1/2 || = sqrt(2) * E|k/4 - 1/2|, k ~ Bin(4, 1/2) -> sqrt(2) * 3/16
    f = floor({"r": {"form": np.array([0, 1, 0, 1]), "hue": np.array([-1] * 4), "stature": np.array([-1] * 4)}})
    assert f == pytest.approx(np.sqrt(2) * 3 / 16, rel=0.05)
    ci = bootstrap(lab, lab, 50, 0)
    assert ci["before"][0] <= b["mean"] + 0.3 and ci["reduction"][0] <= 0 <= ci["reduction"][1]


def test_a_stage_audited_on_fewer_images_is_compared_with_the_base_on_the_same_images():
    # base: role "judge", 4 images; its first 2 are (round, angular) on form -> form 0 there; hue and stature one class
    base = {"judge": {"form": np.array([0, 1, 0, 0]), "hue": np.array([2] * 4), "stature": np.array([0] * 4)}}
    stage = {"discrepancy": 0.2, "identity_recall": 0.9, "concept_accuracy": 1.0, "n_per_role": 2}
    out = _stage_reduction(stage, base)
    # first 2 images: form 0, hue ||(0,0,1,0) - 1/4|| = sqrt(0.75), stature ||(1,0) - 1/2|| = sqrt(0.5)
    before = (0 + np.sqrt(0.75) + np.sqrt(0.5)) / 3
    assert out["discrepancy_before"] == pytest.approx(before) and out["reduction"] == pytest.approx(1 - 0.2 / before)
    assert out["n_per_role"] == 2 and stage.get("reduction") is None  # a new dict; the input is left alone
    full = _stage_reduction({**stage, "n_per_role": 4}, base)  # all 4: form shares (3/4, 1/4)
    assert full["discrepancy_before"] == pytest.approx((np.sqrt(2) * 0.25 + np.sqrt(0.75) + np.sqrt(0.5)) / 3)


def test_demo_config_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("eval: {n_per_rol: 3}\n")
    with pytest.raises(ValueError, match="unknown demo config key 'eval.n_per_rol'"):
        load_demo_config(bad)
    bad.write_text("methods: {ppo: {loss: ppo, data: population, lr: 1}}\n")
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        load_demo_config(bad)
    bad.write_text("train: {steps: 0}\n")
    with pytest.raises(ValueError, match="train.steps: expected an int >= 1"):
        load_demo_config(bad)
    bad.write_text("eval: {every_stage: {n_per_role: 0, n_per_identity: 1, n_per_concept: 1}}\n")
    with pytest.raises(ValueError, match="eval.every_stage.n_per_role: expected an int >= 1"):
        load_demo_config(bad)
    bad.write_text("eval: {every_stage: false}\n")
    assert load_demo_config(bad)["eval"]["every_stage"] is False
    dal = {"loss": "dal", "data": "prompts", "lr": 1e-3}
    for m, match in (({**dal, "data": "population"}, "distributional alignment is the method `dal` with loss: dal"),
                     ({**dal, "options": {"target": {}}}, "'target' is not a `popalign dal` setting the demo leaves"),
                     ({**dal, "steps": 0}, r"methods.dal.steps=0 is invalid"),
                     ({**dal, "beta": 1}, "methods.dal: unknown key 'beta'"),
                     ({**dal, "options": {"ot_method": "exact", "images_per_prompt": 16}},
                      r"methods.dal.options: method='exact' would solve 300540195 count vectors")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            load_demo_config(methods={"dal": m})
    with pytest.raises(ValueError, match="methods.popalign: distributional alignment is the method `dal`"):
        load_demo_config(methods={"popalign": dal})
    cfg = load_demo_config()
    # the full demo's reference time stays within the 20 minutes, and its held-out audit keeps >= 700 images (50 per
    # role: the noise floor of the mean discrepancy, ~0.09, is a fifth of the base model's ~0.45)
    assert cfg["budgets"]["total"] <= 1200 and cfg["eval"]["n_per_role"] * len(HELD_OUT_ROLES) >= 700
    assert load_demo_config(quick=True)["methods"]["dal"]["options"]["train"] == "both"  # quick sizes merged


def test_demo_cli_refuses_a_non_empty_output_and_unknown_methods(demo_run, capsys):
    out, _ = demo_run
    assert main(["--out", str(out), "--quick"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["--out", str(out / "x"), "--quick", "--methods", "ppo"]) == 2
    assert "--methods: unknown method 'ppo'" in capsys.readouterr().err


def test_overwrite_would_clear_exactly_an_earlier_demo_run(demo_run):
    """--overwrite's rule on a real demo output: every entry is the demo's; one foreign file anywhere stops it."""
    from popalign_core.common.fileio import check_clearable, foreign_entries
    from popalign_core.experiments.demo import _outputs

    out, _ = demo_run
    assert foreign_entries(out, _outputs()) == [] and check_clearable(out, "demo", _outputs())
    mine = out / "popalign" / "checkpoints" / "my_notes.txt"
    mine.write_text("mine")
    try:
        with pytest.raises(FileExistsError, match=r"'popalign/checkpoints/my_notes.txt'.*nothing was deleted"):
            check_clearable(out, "demo", _outputs())
    finally:
        mine.unlink()


def test_demo_loras_load_with_the_stock_format(demo_run):
    from popalign_core.lora.files import read_lora

    out, _ = demo_run
    sd, meta, fmt = read_lora(out / "popalign_lora.safetensors")
    assert fmt == "kohya" and meta["loss"] == "popalign" and any(k.startswith("lora_unet_") for k in sd)


def test_choose_stage_by_hand():
    cfg = {"select": {"max_recall_drop": 0.03, "max_concept_drop": 0.03}}
    base = {"recall": 0.99, "concept_accuracy": 1.0}
    curve = [
        # the last stage damaged recall
        {"step": 100, "validation_roles_discrepancy": 0.30, "val_recall": 0.99, "val_concept_accuracy": 1.0},
        {"step": 200, "validation_roles_discrepancy": 0.20, "val_recall": 0.97, "val_concept_accuracy": 0.98},
        {"step": 300, "validation_roles_discrepancy": 0.10, "val_recall": 0.90, "val_concept_accuracy": 1.0},
    ]
    assert choose_stage(curve, base, cfg)[0]["step"] == 200
    worse = [{**c, "val_recall": 0.5} for c in curve]
    best, why = choose_stage(worse, base, cfg)
    assert best["step"] == 100 and "no stage within the validation limits" in why


def test_demo_data_feeds_the_example_training_config(demo_run, tmp_path):
    """examples/train_demo.yaml trains on the population data the demo builds (reduced to 2 steps)."""
    from pathlib import Path

    from popalign_core.train.trainer import load_config, train

    out, _ = demo_run
    example = Path(__file__).resolve().parents[2] / "examples" / "train_demo.yaml"
    assert "runs/demo/pipeline/run/data/population.jsonl" in example.read_text()
    cfg = load_config(example, data=str(out / "pipeline" / "run" / "data" / "population.jsonl"),
                      output_dir=str(tmp_path), steps=2, progress=False)  # fmt: skip
    summary = train(cfg, log=lambda m: None)
    assert Path(summary["outputs"]["kohya"]).is_file()


def test_demo_data_feeds_the_flux_example(demo_run, tmp_path):
    """examples/train_flux.yaml (tiny FLUX) trains on the demo's population data: a `lora_transformer_*` kohya file."""
    from pathlib import Path

    from popalign_core.lora.files import read_lora
    from popalign_core.train.trainer import load_config, train

    out, _ = demo_run
    example = Path(__file__).resolve().parents[2] / "examples" / "train_flux.yaml"
    assert "runs/demo/pipeline/run/data/population.jsonl" in example.read_text()
    cfg = load_config(example, data=str(out / "pipeline" / "run" / "data" / "population.jsonl"),
                      output_dir=str(tmp_path), steps=2, progress=False)  # fmt: skip
    summary = train(cfg, log=lambda m: None)
    sd, meta, fmt = read_lora(summary["outputs"]["kohya"])
    assert fmt == "kohya" and all(k.startswith("lora_transformer_") for k in sd) and meta["family"] == "flux"
