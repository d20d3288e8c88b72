"""Distributional alignment on the toy world: the acceptance run of `popalign dal` (docs/dal.md).

    python -m popalign_core.experiments.dal_toy --out runs/dal_toy            # or: popalign dal-toy --out ...
    python -m popalign_core.experiments.dal_toy --out runs/dal_quick --quick  # a smoke run of a few minutes

1. Audit the base model on the held-out neutral roles (N images per role, toy *evaluation* classifier, the audit
   sampler of the demo: DDIM 25, guidance 1.5, toy world v2's one setting), identity-specific prompts (recall,
   same sampler) and concepts.
2. Train with `popalign dal` on the *training* roles' neutral prompts towards the stated target (default: 50/50 on
   `form`, the gender-like axis, and 75/25 tall/short on `stature`, the age-like axis, at once), judged during
   training by the toy *training* classifier only.
3. Audit again and write results.json: per axis `target_error_mean` = mean over held-out roles of the distance
   between the role's class shares and the target, in share units (total variation 1/2 sum_k |share_k - t_k|, which
   for a binary axis is |share - target| of either class), before and after, with the finite-sample floor (the
   expected error of a model that samples exactly the target, with the same face counts); `identity_recall`
   (after) and `concept_accuracy_drop` (points, 0-100 scale).
Nothing is tuned on the held-out roles: training, and the checkpoint (the last one), never see them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.common.fileio import atomic_write_text, claim_output_dir
from popalign_core.common.userinput import ArgumentParser, command, read_yaml
from popalign_core.dal.trainer import DALConfig, load_dal_config, run_dal
from popalign_core.experiments.demo import evaluate, train_roles
from popalign_core.models.loading import load_model
from popalign_core.toyworld.classifier import ToyClassifier
from popalign_core.toyworld.world import TOY_AXES, caption
from popalign_core.train.trainer import train_outputs

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    # identity-specific training prompts that keep their identity (DALConfig.prompt_targets): "none", or "all" (every
    # training role x every class of every target axis, e.g. "a photo of a round baker" -> form 100% round)
    "identity_prompts": "all",
    # the training roles whose prompts DAL trains on: "all" (the 34 training roles) or a list of them
    "train_roles": "all",
    "eval": {
        "n_per_role": 200,
        "n_per_identity": 4,
        "n_per_concept": 25,
        "steps": 25,
        "guidance": 1.5,
        "recall_guidance": 1.5,
    },  # fmt: skip
    "dal": {
        "target": {"form": [0.5, 0.5], "stature": [0.75, 0.25]},
        "train": "both",
        "steps": 150,
        "images_per_prompt": 16,
        "prompts_per_step": 2,
        "sampler_steps": 20,
        "guidance_scale": 1.5,
        "lr": 3e-3,
        "lora_rank": 8,
        "face_bank": "toy",
        "checkpoint_every": 50,
    },
}
QUICK = {"eval": {"n_per_role": 16, "n_per_identity": 1, "n_per_concept": 4, "steps": 10},
         "dal": {"steps": 3, "images_per_prompt": 4, "prompts_per_step": 1, "sampler_steps": 6}}  # fmt: skip


def _merge(base: dict, over: dict, where: str = "") -> dict:
    """`over` merged into `base`; an unknown key (outside the free-form `dal` section and targets) is an error."""
    out = dict(base)
    for k, v in over.items():
        if k not in base and where != "dal.":
            raise ValueError(f"unknown dal-toy config key {where + k!r}; valid keys: {', '.join(sorted(base))}")
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "target":
            out[k] = _merge(base[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


#: What `popalign dal-toy` writes in its output folder (`fileio.claim_output_dir`).
def _outputs() -> dict:
    name = DALConfig.__dataclass_fields__["lora_name"].default
    return {"eval_base.json": None, "results.json": None, "dal": train_outputs(name)}


def tv_floor(target: np.ndarray, n: int, rng: np.random.Generator, draws: int = 20000) -> float:
    """E[1/2 sum_k |c_k/n - t_k|] for c ~ Multinomial(n, t): exact for K = 2 (binomial), Monte-Carlo otherwise."""
    t = np.asarray(target, np.float64)
    if n <= 0:
        return float("nan")
    if len(t) == 2:
        from scipy.stats import binom

        c = np.arange(n + 1)
        return float((binom.pmf(c, n, t[0]) * np.abs(c / n - t[0])).sum())
    c = rng.multinomial(n, t, size=draws) / n
    return float(np.abs(c - t).sum(1).mean() / 2)


def target_errors(labels: dict[str, dict[str, np.ndarray]], target: dict[str, list[float]], seed: int) -> dict:
    """Per axis: per-role shares and errors, their mean over roles, and the finite-sample floor."""

    rng = np.random.default_rng(seed)
    out = {}
    for axis, t in target.items():
        t = np.asarray(t, np.float64)
        per, floors = {}, []
        for role, lab in labels.items():
            ll = lab[axis][lab[axis] >= 0]
            shares = np.bincount(ll, minlength=len(TOY_AXES[axis])) / max(len(ll), 1)
            per[role] = {"shares": dict(zip(TOY_AXES[axis], shares.round(4).tolist())), "faces": int(len(ll)),
                         "error": float(np.abs(shares - t).sum() / 2)}  # fmt: skip
            floors.append(tv_floor(t, len(ll), rng))
        out[axis] = {"target": dict(zip(TOY_AXES[axis], t.tolist())), "per_role": per,
                     "mean": float(np.mean([p["error"] for p in per.values()])),
                     "floor": float(np.mean(floors))}  # fmt: skip
    return out


def run(out: str | Path, config: dict | None = None, log=print) -> dict:
    cfg = config or DEFAULTS
    out = Path(out)

    # everything is validated before any work: the eval sizes, the identity prompts and the DAL config
    for k in ("n_per_role", "n_per_identity", "n_per_concept", "steps"):
        v = cfg["eval"].get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"eval.{k}: expected an integer >= 1, got {v!r}")
    for k in ("guidance", "recall_guidance"):
        v = cfg["eval"].get(k)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < float("inf"):
            raise ValueError(f"eval.{k}: expected a finite number >= 0, got {v!r}")
    target = cfg["dal"].get("target")
    if not isinstance(target, dict) or not target or any(a not in TOY_AXES for a in target):
        raise ValueError(f"dal.target={target!r}: expected a mapping over the toy axes {', '.join(TOY_AXES)}")
    roles = train_roles({"data": {"train_roles": cfg.get("train_roles", "all")}})
    pt = {}
    if cfg.get("identity_prompts", "none") == "all":
        for r in roles:
            for a in target:
                for j, c in enumerate(TOY_AXES[a]):
                    pt[caption(r, {a: c})] = {a: [1.0 if k == j else 0.0 for k in range(len(TOY_AXES[a]))]}
    elif cfg.get("identity_prompts", "none") != "none":
        raise ValueError(f"identity_prompts={cfg['identity_prompts']!r}: valid values: none, all")
    dcfg = load_dal_config(None, model="toyworld", prompts=[caption(r) for r in roles], seed=cfg["seed"],
                           prompt_targets=pt,
                           output_dir=str(out / "dal"), progress=False, lora_formats=["kohya"],
                           **cfg["dal"])  # fmt: skip
    claim_output_dir(out, "dal-toy", _outputs(), signature="eval_base.json")
    t0 = time.time()
    eval_clf = ToyClassifier(which="eval")
    times = {}
    base_eval = out / "eval_base.json"
    t = time.time()
    key = {"eval": cfg["eval"], "seed": cfg["seed"], "target": cfg["dal"]["target"]}
    before = None
    if base_eval.is_file():  # resume: the base audit of the same settings
        try:
            cached = json.loads(base_eval.read_text(encoding="utf-8"))
            before = cached.get("result") if cached.get("settings") == json.loads(json.dumps(key)) else None
        except ValueError:
            before = None
    if before is None:
        ev = evaluate(load_model("toyworld"), cfg, cfg["seed"], eval_clf)
        before = {"errors": target_errors(ev["labels"], cfg["dal"]["target"], cfg["seed"]),
                  "identity_recall": ev["identity_recall"], "recall_per_axis": ev["identity_recall_per_axis"],
                  "concept_accuracy": ev["concept_accuracy"]}  # fmt: skip
        atomic_write_text(base_eval, json.dumps({"settings": key, "result": before}, indent=1))
    times["audit_before"] = time.time() - t
    log(f"[dal-toy] base: {({a: round(v['mean'], 3) for a, v in before['errors'].items()})}, recall "
        f"{before['identity_recall']:.3f}, concepts {before['concept_accuracy']:.3f}")  # fmt: skip
    t = time.time()
    summary = run_dal(dcfg, log=log)
    times["train"] = time.time() - t
    t = time.time()
    model = load_model("toyworld")
    if dcfg.train == "prefix":
        from popalign_core.dal.prefix import SoftPrefix

        pre = SoftPrefix.load(summary["outputs"]["embedding"], model)
        model = _Prefixed(model, pre)
    else:
        from popalign_core.lora.files import load_lora

        load_lora(model, summary["outputs"]["kohya"])
    ev = evaluate(model, cfg, cfg["seed"], eval_clf)
    after = {"errors": target_errors(ev["labels"], cfg["dal"]["target"], cfg["seed"]),
             "identity_recall": ev["identity_recall"], "recall_per_axis": ev["identity_recall_per_axis"],
             "concept_accuracy": ev["concept_accuracy"]}  # fmt: skip
    times["audit_after"] = time.time() - t
    results = {
        "target": cfg["dal"]["target"],
        "target_error_mean": {a: v["mean"] for a, v in after["errors"].items()},
        "target_error_mean_before": {a: v["mean"] for a, v in before["errors"].items()},
        "target_error_floor": {a: v["floor"] for a, v in after["errors"].items()},
        "identity_recall": after["identity_recall"],
        "identity_recall_before": before["identity_recall"],
        "identity_recall_per_axis": after["recall_per_axis"],
        "concept_accuracy_before": before["concept_accuracy"],
        "concept_accuracy_after": after["concept_accuracy"],
        "concept_accuracy_drop": 100.0 * (before["concept_accuracy"] - after["concept_accuracy"]),
        "acceptance": {},
        "before": before,
        "after": after,
        "training": summary,
        "settings": {
            "eval": cfg["eval"],
            "dal": dcfg.to_dict(),
            "seed": cfg["seed"],
            "identity_prompts": cfg.get("identity_prompts", "none"),
            "train_roles": list(roles),
        },
        "seconds": {**{k: round(v, 1) for k, v in times.items()}, "total": round(time.time() - t0, 1)},
    }
    acc = results["acceptance"]
    for a, v in results["target_error_mean"].items():
        acc[f"target_error_{a}<=0.05"] = bool(v <= 0.05)
    acc["identity_recall>=0.95"] = bool(results["identity_recall"] >= 0.95)
    acc["concept_accuracy_drop<=3"] = bool(results["concept_accuracy_drop"] <= 3.0)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    log(f"[dal-toy] after: {({a: round(v, 3) for a, v in results['target_error_mean'].items()})} (floor "
        f"{({a: round(v, 3) for a, v in results['target_error_floor'].items()})}), recall "
        f"{results['identity_recall']:.3f}, concept drop {results['concept_accuracy_drop']:.1f} points")  # fmt: skip
    return results


class _Prefixed:
    """An adapter whose prompts get the soft prefix (for auditing a prefix-trained model with `sample`)."""

    def __init__(self, adapter, prefix):
        self._a, self._p = adapter, prefix

    def encode_prompt(self, prompts, height=None, width=None):
        return self._a.encode_prompt([self._p.apply([p])[0] if p else p for p in prompts], height, width)

    def __getattr__(self, name):
        return getattr(self._a, name)


@command("popalign dal-toy")
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="popalign dal-toy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/dal_toy", help="output folder (resumes: the base audit and training)")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run")
    ap.add_argument("--config", help="YAML with the same shape as DEFAULTS, merged over them")
    a = ap.parse_args(argv)
    cfg = DEFAULTS
    if a.config:
        cfg = _merge(cfg, read_yaml(a.config, "dal-toy config"))
    if a.quick:
        cfg = _merge(cfg, QUICK)
    res = run(a.out, cfg)
    print(json.dumps({k: res[k] for k in ("target_error_mean", "target_error_floor", "identity_recall",
                                          "concept_accuracy_drop", "acceptance")}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
