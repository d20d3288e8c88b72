"""The demo (README command #1): audit -> population data -> train -> audit, on the embedded toy world.

1. **Audit the base model** on the toy world's 14 *held-out* roles (in the base model's training with their skews,
   never in preference data or checkpoint selection): per role, `eval.n_per_role` images of the neutral prompt at
   guidance `eval.guidance` (1.5: toy world v2's one sampler setting), judged by the toy *evaluation* classifier;
   the discrepancy (PopAlign Eq. 13, hard labels among images with a face) against the uniform target on each axis
   (form, hue, stature), averaged over roles and axes (never pooled over roles, where opposite skews cancel). Also
   identity-specific prompts of the held-out roles (recall of the named class) and non-person concepts (concept
   accuracy).
2. **Population data** with `popalign data pipeline` on the *training* roles only (34; not the 8 validation roles):
   identity-augmented prompts over the 16 intersections (winning), the neutral prompt (losing), filtered by the toy
   *training* classifier, built into population sets and pairs.
3. **Train** LoRAs with `popalign train` on that data: PopAlign (Eq. 11), PopAlign with the prior-preservation
   anchor (the frozen model's images of identity-specific training-role prompts and of the concepts), and the SFT
   and DPO baselines, and distributional alignment (DAL). Each method is trained in `select.stages` stages; after
   each stage its bias on the *validation* roles, its identity recall on the validation roles' identity-specific
   prompts and its concept accuracy (training classifier) are measured; the kept stage has the lowest
   validation-role bias among those whose recall and concept accuracy stay within the config's limits of the base
   model (`choose_stage`). Checkpoint selection uses validation roles only and is reported in results.json;
   held-out roles never choose anything.
4. **Audit again** each method's chosen LoRA exactly as in step 1 (same seeds).
5. Write ``results.json`` (per method: discrepancy_before/after with 95% bootstrap CIs, reduction with its CI, the
   finite-sample floor, identity_recall, concept_accuracy_drop in points, the selected step, stage times beside
   reference times) and ``report.md`` with PNG plots (per-role class shares against the target, loss curves,
   checkpoint selection curves, a results table). The last line printed is a JSON summary.

Fixed work: every stage and every selection step runs whatever the machine's speed; times are reported beside the
config's reference times and never acted on, so one seed gives the same numbers on every machine.

Settings: popalign_core/configs/demo.yaml (`--config FILE` merges a YAML of the same shape; `--quick` is a smoke run).

`run_demo` reads as three steps: `_validate_demo` (settings, output folder), `_compute_demo` (steps 1-4 and the
numbers of step 5) and `_write_demo` (plots, report.md, results.json). The settings are checked in
`experiments.demo_config`, the measurements are `experiments.demo_measure`, the report `experiments.demo_report`;
their public names stay importable from here.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popalign_core.common.fileio import atomic_copy, atomic_write_text, claim_output_dir, clear_output_dir
from popalign_core.common.userinput import ArgumentParser, command
from popalign_core.dal.trainer import load_dal_config, run_dal
from popalign_core.experiments.demo_config import DEFAULT_CONFIG, METHODS, load_demo_config, train_roles  # noqa: F401
from popalign_core.experiments.demo_measure import (  # noqa: F401  (re-exported)
    _disc,
    _mean_disc,
    _stage_reduction,
    bootstrap,
    choose_stage,
    evaluate,
    floor,
    neutral_labels,
    role_bias,
    validation,
    validation_roles_bias,
)
from popalign_core.experiments.demo_report import _plots, write_report
from popalign_core.lora.files import load_lora
from popalign_core.models.loading import load_model
from popalign_core.population.pipeline import PIPELINE_OUTPUTS, run_pipeline
from popalign_core.toyworld.classifier import ToyClassifier
from popalign_core.toyworld.world import CONCEPTS, HELD_OUT_ROLES, TOY_AXES, caption, concept_caption
from popalign_core.train.trainer import load_config, train, train_outputs


def _outputs() -> dict:
    """What the demo writes in --out (`fileio.claim_output_dir`): exact names, and per method the trainer's layout."""

    return {
        "demo_config.yaml": None,
        "results.json": None,
        "report.md": None,
        "shares.png": None,
        "training.png": None,
        "tradeoff.png": None,
        **{f"{m}_lora.safetensors": None for m in METHODS},
        "pipeline": {"pipeline.yaml": None, "run": PIPELINE_OUTPUTS},
        **{m: train_outputs(m) for m in METHODS},
    }


STAGES = ("audit_before", "data", "train", "select", "audit_after", "report")


# ------------------------------------------------------------------------------------------------ stages
def build_data(cfg: dict, out: Path, adapter, log) -> dict:
    """`popalign data pipeline` on the training roles (`data.train_roles`)."""

    d = cfg["data"]
    pcfg = {
        "model": "toyworld",
        "prompts": [caption(r) for r in train_roles(cfg)],
        "out": str(out),
        "augment": {"keywords": "toy", "axes": ["stature", "form", "hue"],
                    "template": "a photo of {article} {identity} {subject}",
                    "samples_per_prompt": d["samples_per_prompt"], "seed": cfg["seed"]},
        "sample": {"steps": d["steps"], "guidance_scale": d["guidance"], "scheduler": "ddim", "seed": cfg["seed"],
                   "batch_size": 200, "neutral_per_prompt": d["neutral_per_prompt"]},  # fixed work: no time budget
        "filter": {"classifier": "toy", "classifier_options": {"which": "train"}, "threshold": d["threshold"]},
        "build": {"set_size": d["set_size"], "rule": "augmented", "pairs": True, "seed": cfg["seed"],
                  "on_short": "skip"},
    }  # fmt: skip
    import yaml

    atomic_write_text(out.parent / "pipeline.yaml", yaml.safe_dump(pcfg, sort_keys=False))
    return run_pipeline(pcfg, adapter=adapter, log=log)


def anchor_prompts(cfg: dict) -> list[str]:
    """Prior-preservation prompts: each class of each axis for every training role, and the concepts."""

    ids = [caption(r, {a: c}) for r in train_roles(cfg) for a, cs in TOY_AXES.items() for c in cs]
    return ids + [concept_caption(c) for c in CONCEPTS]


def train_method(name: str, cfg: dict, data_dir: Path, out: Path, select_clf, base_val: dict, log) -> dict:
    """Train one method in stages (resuming), scoring each stage's LoRA on the validation roles; keeps the best. Every
    stage runs whatever the machine's speed (fixed work: the same numbers everywhere for the same seed)."""

    m, tr = cfg["methods"][name], cfg["train"]
    total = tr["steps"]
    params = dict(m.get("loss_params") or {})
    common = {
        "model": "toyworld",
        "data": str(data_dir / ("pairwise.jsonl" if m["data"] == "pairwise" else "population.jsonl")),
        "loss": m["loss"],
        "loss_params": params,
        "lr": float(m["lr"]),
        "lora_rank": tr["lora_rank"],
        "batch_size": int(m.get("batch_size", tr["batch_size"])),
        **_run_settings(name, cfg, out),
    }
    if float(params.get("anchor_weight", 0)) > 0:
        common.update(anchor_prompts=anchor_prompts(cfg), anchor_images_per_prompt=cfg["anchor"]["images_per_prompt"],
                      anchor_guidance=float(cfg["anchor"]["guidance"]), anchor_sampler_steps=cfg["eval"]["steps"],
                      anchor_batch_size=max(1, int(common["batch_size"]) // 2))  # fmt: skip

    def train_to(steps: int) -> None:
        train(load_config(**common, steps=steps), log=lambda msg: None)

    return _staged(name, cfg, out, total, train_to, select_clf, base_val, log, common)


def _run_settings(name: str, cfg: dict, out: Path) -> dict:
    """The settings every method's run shares: seed, one resumable state per stage call, the kohya LoRA named after
    the method in its own folder, then the method's `options`."""
    return {"seed": cfg["seed"], "checkpoint_every": 0, "keep_checkpoints": 1, "progress": False,
            "lora_formats": ["kohya"], "lora_name": name, "output_dir": str(out),
            **(cfg["methods"][name].get("options") or {})}  # fmt: skip


def dal_prompt_targets(cfg: dict) -> dict[str, dict[str, list[float]]]:
    """Identity-specific prompts of the training roles (every class of every axis) with a one-hot target on the
    named axis: distributional alignment aligns "a baker" and keeps "a round baker" round (`DALConfig.prompt_targets`,
    as `popalign dal-toy`'s `identity_prompts: all`)."""

    return {caption(r, {a: c}): {a: [1.0 if k == j else 0.0 for k in range(len(cs))]}
            for r in train_roles(cfg) for a, cs in TOY_AXES.items() for j, c in enumerate(cs)}  # fmt: skip


def train_dal_method(name: str, cfg: dict, out: Path, select_clf, base_val: dict, log) -> dict:
    """The `dal` method: `popalign dal` on the training roles' neutral prompts towards the uniform target on every
    axis (the demo's target), judged during training by the toy *training* classifier, in `select.stages` stages
    (resuming) scored and chosen like the other methods (`choose_stage`)."""

    m = cfg["methods"][name]
    total = int(m.get("steps", cfg["train"]["steps"]))
    common = {
        "model": "toyworld",
        "prompts": [caption(r) for r in train_roles(cfg)],
        "prompt_targets": dal_prompt_targets(cfg),
        "target": {a: [1 / len(cs)] * len(cs) for a, cs in TOY_AXES.items()},
        "classifier": "toy",
        "classifier_options": {"which": "train"},
        "lr": float(m["lr"]),
        "lora_rank": cfg["train"]["lora_rank"],
        **_run_settings(name, cfg, out),
    }

    def train_to(steps: int) -> None:
        run_dal(load_dal_config(None, **common, steps=steps), log=lambda msg: None)

    return _staged(name, cfg, out, total, train_to, select_clf, base_val, log, common)


def _staged(name, cfg, out, total, train_to, select_clf, base_val, log, common) -> dict:
    """Train `name` to `total` steps in `select.stages` stages (`train_to(steps)` resumes), score each stage's LoRA
    on the validation roles' neutral and identity-specific prompts (training classifier), keep the best
    (`choose_stage`)."""

    stages = cfg["select"]["stages"]
    curve, t_train, t_select = [], 0.0, 0.0
    for k in range(1, stages + 1):
        steps = max(1, round(total * k / stages))
        t = time.time()
        train_to(steps)
        t_train += time.time() - t
        lora = out / f"{name}_step{steps:05d}.safetensors"
        atomic_copy(out / f"{name}.safetensors", lora)
        t = time.time()
        model = load_model("toyworld")
        load_lora(model, lora)
        score = validation_roles_bias(model, cfg, cfg["seed"], select_clf)
        val = validation(model, cfg, cfg["seed"], select_clf)
        t_select += time.time() - t
        curve.append({"step": steps, "validation_roles_discrepancy": score, "val_recall": val["recall"],
                      "val_concept_accuracy": val["concept_accuracy"], "lora": lora.name})  # fmt: skip
        log(f"[demo] {name}: step {steps}/{total}: validation-role discrepancy {score:.3f}, validation recall "
            f"{val['recall']:.3f}, concepts {val['concept_accuracy']:.3f}")  # fmt: skip
    best, why = choose_stage(curve, base_val, cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"curve": curve, "best": best, "why": why, "train_seconds": t_train, "select_seconds": t_select,
            "losses": [r.get("loss") for r in rows], "config": common}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the run
def run_demo(out: str | Path = "runs/demo", config: dict | None = None, overwrite: bool = False, log=print) -> dict:
    """Run the demo (module docstring); returns results (also in out/results.json)."""
    run = _validate_demo(out, config, overwrite, log)
    results = _compute_demo(run)
    return _write_demo(run, results)


@dataclass
class _DemoRun:
    """One demo run: its settings and folder, and what its stages produced (filled by `_compute_demo`)."""

    cfg: dict
    out: Path
    log: Callable[[str], None]
    t0: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)
    trained: dict[str, dict] = field(default_factory=dict)
    stage_evals: dict[str, dict[int, dict]] = field(default_factory=dict)
    report_start: float = 0.0


# ------------------------------------------------------------------------------------------------ validate
def _validate_demo(out: str | Path, config: dict | None, overwrite: bool, log) -> _DemoRun:
    """The settings (default: `load_demo_config()`), and the output folder: new or empty, or with `overwrite` an
    earlier demo run's (its own files are removed; nothing else). The folder is claimed by writing its signature,
    the run's ``demo_config.yaml``."""
    import yaml

    cfg = config or load_demo_config()
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} is not empty; pass --overwrite (it replaces an earlier demo run, "
                              "nothing else) or choose another --out")  # fmt: skip
    if overwrite:
        # only an earlier demo run's own files; otherwise nothing is deleted
        clear_output_dir(out, "demo", _outputs(), signature="demo_config.yaml")
    claim_output_dir(out, "demo", _outputs(), signature="demo_config.yaml")
    atomic_write_text(out / "demo_config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    return _DemoRun(cfg, out, log, t0=time.time())


# ------------------------------------------------------------------------------------------------ compute
def _compute_demo(run: _DemoRun) -> dict:
    """The stages (module docstring, steps 1-4) and the results of step 5, in memory (`_write_demo` writes them)."""
    import torch

    torch.manual_seed(run.cfg["seed"])
    eval_clf, select_clf = ToyClassifier(which="eval"), ToyClassifier(which="train")
    base_model, pipe = _audit_base_and_build_data(run, eval_clf)
    base_val, sel_base = _train_methods(run, base_model, select_clf)
    _audit_after(run, eval_clf)
    run.report_start = time.time()
    return _results(run, pipe, base_val, sel_base)


def _audit_base_and_build_data(run: _DemoRun, eval_clf) -> tuple[Any, dict]:
    """Step 1 (the base model's held-out audit) and step 2 (population data on the training roles)."""

    cfg, seed = run.cfg, run.cfg["seed"]
    t = time.time()
    base_model = load_model("toyworld")
    run.evals["base"] = evaluate(base_model, cfg, seed, eval_clf)
    run.timings["audit_before"] = time.time() - t
    base = run.evals["base"]
    run.log(f"[demo] base: held-out discrepancy {base['bias']['mean']:.3f}, recall "
            f"{base['identity_recall']:.3f}, concepts {base['concept_accuracy']:.3f}")  # fmt: skip
    t = time.time()
    pipe = build_data(cfg, run.out / "pipeline" / "run", base_model, run.log)
    run.timings["data"] = time.time() - t
    return base_model, pipe


def _train_methods(run: _DemoRun, base_model, select_clf) -> tuple[dict, float]:
    """Step 3: every method trained in stages and its stage chosen on the validation roles; returns the base model's
    validation scores (the selection limits) and validation-role discrepancy."""
    cfg, seed, out = run.cfg, run.cfg["seed"], run.out
    data_dir = out / "pipeline" / "run" / "data"
    t = time.time()
    sel_base = validation_roles_bias(base_model, cfg, seed, select_clf)
    base_val = validation(base_model, cfg, seed, select_clf)
    t_sel0 = time.time() - t
    for name in cfg["methods"]:
        if name == "dal":
            run.trained[name] = train_dal_method(name, cfg, out / name, select_clf, base_val, run.log)
        else:
            run.trained[name] = train_method(name, cfg, data_dir, out / name, select_clf, base_val, run.log)
    run.timings["train"] = sum(v["train_seconds"] for v in run.trained.values())
    run.timings["select"] = t_sel0 + sum(v["select_seconds"] for v in run.trained.values())
    return base_val, sel_base


def _audit_after(run: _DemoRun, eval_clf) -> None:
    """Step 4: each method's chosen LoRA audited as in step 1 (same seeds), and with `eval.every_stage` every other
    stage too (for the reader's trade-off plot only); the chosen LoRA is copied to ``<method>_lora.safetensors``."""

    cfg, seed, out = run.cfg, run.cfg["seed"], run.out
    t = time.time()
    for name, tr in run.trained.items():
        every = cfg["eval"]["every_stage"]
        stages = tr["curve"] if every else [tr["best"]]
        run.stage_evals[name] = {}
        for st in stages:
            kept = st["step"] == tr["best"]["step"]
            model = load_model("toyworld")
            load_lora(model, out / name / st["lora"])
            e = evaluate(model, cfg if kept else {**cfg, "eval": {**cfg["eval"], **every}}, seed, eval_clf)
            n = cfg["eval"]["n_per_role"] if kept else every["n_per_role"]
            run.stage_evals[name][st["step"]] = {
                "discrepancy": e["bias"]["mean"],
                "identity_recall": e["identity_recall"],
                "concept_accuracy": e["concept_accuracy"],
                "n_per_role": n,
            }
            if kept:
                run.evals[name] = e
        atomic_copy(out / name / tr["best"]["lora"], out / f"{name}_lora.safetensors")
        run.log(f"[demo] {name} (step {tr['best']['step']}): held-out discrepancy "
                f"{run.evals[name]['bias']['mean']:.3f}")  # fmt: skip
    run.timings["audit_after"] = time.time() - t


def _results(run: _DemoRun, pipe: dict, base_val: dict, sel_base: float) -> dict:
    """Step 5's numbers: per method before / after with bootstrap CIs, reduction, floor, recall, concept accuracy
    drop and the selection; the base model's; the acceptance checks; the data pipeline's summary."""

    cfg, base = run.cfg, run.evals["base"]
    ci_base = bootstrap(base["labels"], None, cfg["eval"]["bootstrap"], cfg["seed"])["before"]
    res_methods = {name: _method_result(run, name) for name in run.trained}
    return {
        "model": "toyworld",
        "judge": "toy evaluation classifier (hard labels among images with a face)",
        "selection_judge": "toy training classifier: validation roles (bias, recall), concepts with their own seeds",
        "held_out_roles": list(HELD_OUT_ROLES),
        "train_roles": list(train_roles(cfg)),
        "axes": list(TOY_AXES),
        "n_per_role": cfg["eval"]["n_per_role"],
        "n_per_identity": cfg["eval"]["n_per_identity"],
        "n_per_concept": cfg["eval"]["n_per_concept"],
        "eval_sampler": {
            "scheduler": "ddim",
            "steps": cfg["eval"]["steps"],
            "guidance_scale": cfg["eval"]["guidance"],
        },
        "recall_guidance": cfg["eval"]["recall_guidance"],
        "floor": floor(base["labels"]),
        "base": {
            "discrepancy": base["bias"]["mean"],
            "discrepancy_ci": ci_base,
            "per_axis": base["bias"]["per_axis"],
            "per_role": base["bias"]["per_role"],
            "identity_recall": base["identity_recall"],
            "identity_recall_per_axis": base["identity_recall_per_axis"],
            "concept_accuracy": base["concept_accuracy"],
        },
        "selection_base": sel_base,
        "validation_base": base_val,
        "methods": res_methods,
        "acceptance": _acceptance(res_methods.get("popalign")),
        "data": {k: pipe[k] for k in ("augment", "filter", "build")}
        | {"sample": {k: pipe["sample"][k] for k in ("jobs", "done", "seconds", "images_per_s")}},  # fmt: skip
    }


def _method_result(run: _DemoRun, name: str) -> dict:
    """One method's row of results.json: its chosen stage's held-out audit against the base model's."""
    cfg, tr, e, base = run.cfg, run.trained[name], run.evals[name], run.evals["base"]
    ci = bootstrap(base["labels"], e["labels"], cfg["eval"]["bootstrap"], cfg["seed"])
    before, after = base["bias"]["mean"], e["bias"]["mean"]
    return {
        "loss": cfg["methods"][name]["loss"],
        "discrepancy_before": before,
        "discrepancy_before_ci": ci["before"],
        "discrepancy_after": after,
        "discrepancy_after_ci": ci["after"],
        "reduction": 1.0 - after / before,
        "reduction_ci": ci["reduction"],
        "floor": floor(e["labels"]),
        "per_axis_after": e["bias"]["per_axis"],
        "identity_recall": e["identity_recall"],
        "identity_recall_per_axis": e["identity_recall_per_axis"],
        "concept_accuracy": e["concept_accuracy"],
        "concept_accuracy_drop": 100.0 * (base["concept_accuracy"] - e["concept_accuracy"]),
        "selected_step": tr["best"]["step"],
        "trained_steps": tr["curve"][-1]["step"],
        "selection_curve": tr["curve"],
        "selection_rule": tr["why"],
        "lora": f"{name}_lora.safetensors",
        "train_config": {k: v for k, v in tr["config"].items() if k not in ("anchor_prompts", "prompt_targets")},
        "held_out_per_stage": {str(k): _stage_reduction(v, base["labels"]) for k, v in run.stage_evals[name].items()},
        "per_role_after": e["bias"]["per_role"],
    }


def _acceptance(pop: dict | None) -> dict[str, bool]:
    """The README's acceptance checks of the `popalign` method on the held-out roles (none without it)."""
    if not pop:
        return {}
    return {
        "popalign_reduction_ge_56pct": pop["reduction"] >= 0.56,
        "popalign_identity_recall_ge_0.95": pop["identity_recall"] >= 0.95,
        "popalign_concept_drop_le_3_points": pop["concept_accuracy_drop"] <= 3.0,
    }


# ------------------------------------------------------------------------------------------------ write
def _write_demo(run: _DemoRun, results: dict) -> dict:
    """The plots, the stage times beside their reference times, ``report.md`` and ``results.json``; returns
    `results` (with its timings)."""
    cfg, timings, out = run.cfg, run.timings, run.out
    files = _plots(results, run.evals, run.trained, out)
    timings["report"] = time.time() - run.report_start
    timings["total"] = time.time() - run.t0
    results["timings"] = {k: {"seconds": round(v, 1), "budget_s": cfg["budgets"][k],
                              "over_budget": v > cfg["budgets"][k]} for k, v in timings.items()}  # fmt: skip
    results["seconds"] = round(timings["total"], 1)
    write_report(results, files, out)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=float))
    over = [k for k, v in results["timings"].items() if v["over_budget"]]
    if over:
        run.log(f"[demo] slower than the reference times of this machine class: {', '.join(over)} (see results.json "
                "timings; the work and the numbers are the same on every machine)")  # fmt: skip
    return results


def summary_line(results: dict) -> dict:
    return {
        "out": "results.json",
        "seconds": results["seconds"],
        "discrepancy_before": round(results["base"]["discrepancy"], 4),
        **{f"{k}_after": round(v["discrepancy_after"], 4) for k, v in results["methods"].items()},
        **{f"{k}_reduction": round(v["reduction"], 4) for k, v in results["methods"].items()},
        "acceptance": results["acceptance"],
    }


@command("popalign demo")
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="popalign demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    ap.add_argument("--config", default=None, help="YAML merged over popalign_core/configs/demo.yaml")
    ap.add_argument("--quick", action="store_true", help="a smoke run (tiny sizes; numbers are meaningless)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(METHODS)}")
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier demo run in --out (only a folder the demo wrote, holding nothing else)",
    )
    a = ap.parse_args(argv)
    cfg = load_demo_config(a.config, quick=a.quick)
    if a.methods is not None:
        keep = [m.strip() for m in a.methods.split(",") if m.strip()]
        if not keep:
            raise ValueError(f"--methods {a.methods!r} names no method; valid: {', '.join(cfg['methods'])}")
        bad = [m for m in keep if m not in cfg["methods"]]
        if bad:
            raise ValueError(f"--methods: unknown method {bad[0]!r}; valid: {', '.join(cfg['methods'])}")
        cfg["methods"] = {k: v for k, v in cfg["methods"].items() if k in keep}
    results = run_demo(a.out, cfg, overwrite=a.overwrite, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(summary_line(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
