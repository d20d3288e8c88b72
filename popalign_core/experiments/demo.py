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
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.common.fileio import atomic_copy, atomic_path, atomic_write_text, claim_output_dir, clear_output_dir
from popalign_core.common.userinput import ArgumentParser, command, read_yaml

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
METHODS = ("popalign", "popalign_anchor", "sft", "dpo", "dal")


def _outputs() -> dict:
    """What the demo writes in --out (`fileio.claim_output_dir`): exact names, and per method the trainer's layout."""
    from popalign_core.population.pipeline import PIPELINE_OUTPUTS
    from popalign_core.train.trainer import train_outputs

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


# ------------------------------------------------------------------------------------------------ config
def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if k not in out:
            raise ValueError(f"unknown demo config key {where + k!r}; valid keys: {', '.join(sorted(out))}")
        if isinstance(out[k], dict) and k != "methods" and not (k == "every_stage" and v is False):
            if not isinstance(v, dict):
                raise ValueError(f"demo config key {where + k!r}: expected a mapping, got {type(v).__name__}")
            out[k] = _merge(out[k], v, f"{where}{k}.")
        else:
            out[k] = copy.deepcopy(v)
    return out


# `popalign train` settings the demo sets itself (the rest can be given per method as `options`)
_DEMO_TRAIN_KEYS = frozenset({
    "model", "data", "loss", "loss_params", "lr", "lora_rank", "batch_size", "seed", "steps", "checkpoint_every",
    "keep_checkpoints", "progress", "lora_formats", "lora_name", "output_dir", "resume", "anchor_prompts",
    "anchor_images_per_prompt", "anchor_guidance", "anchor_sampler_steps", "anchor_batch_size",
})  # fmt: skip


def _check_lr(name: str, m: dict) -> None:
    from popalign_core.common.userinput import parse_number

    lr = parse_number(m["lr"]) if isinstance(m["lr"], str) else m["lr"]
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < float("inf"):
        raise ValueError(f"methods.{name}.lr={m['lr']!r} is invalid: must be a finite number > 0")
    m["lr"] = float(lr)


def _check_options(name: str, m: dict, config_cls, taken: frozenset, command: str) -> None:
    """`methods.<name>.options`: settings of `command`'s config (`config_cls`) that the demo does not set itself."""
    opts = m.get("options") or {}
    if not isinstance(opts, dict):
        raise ValueError(f"methods.{name}.options: expected a mapping of `{command}` settings, got {opts!r}")
    for k in opts:
        if k in taken or k not in config_cls.__dataclass_fields__:
            free = sorted(set(config_cls.__dataclass_fields__) - taken)
            raise ValueError(f"methods.{name}.options: {k!r} is not a `{command}` setting the demo leaves open; "
                             f"valid: {', '.join(free)}")  # fmt: skip


def _check_method(name: str, m: dict) -> None:
    """A method's loss, learning rate, batch size and loss hyper-parameters, checked before any work."""
    from popalign_core.train.losses import LOSSES, loss_config

    if m["loss"] not in LOSSES:
        raise ValueError(f"methods.{name}.loss={m['loss']!r} is not a known loss; valid values: {', '.join(LOSSES)}")
    _check_lr(name, m)
    bs = m.get("batch_size", 1)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"methods.{name}.batch_size={bs!r} is invalid: must be an integer >= 1")
    params = m.get("loss_params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"methods.{name}.loss_params: expected a mapping of hyper-parameters, got {params!r}")
    try:
        loss_config(m["loss"], **params)
    except ValueError as e:
        raise ValueError(f"methods.{name}.loss_params: {e}") from None
    from popalign_core.train.trainer import TrainConfig

    _check_options(name, m, TrainConfig, _DEMO_TRAIN_KEYS, "popalign train")


# `popalign dal` settings the demo sets itself for the `dal` method (the rest can be given as `options`)
_DEMO_DAL_KEYS = frozenset({
    "model", "prompts", "prompts_file", "target", "prompt_targets", "classifier", "classifier_options", "lr",
    "lora_rank", "seed", "steps", "checkpoint_every", "keep_checkpoints", "progress", "lora_formats", "lora_name",
    "output_dir", "resume",
})  # fmt: skip


def _check_dal_method(name: str, m: dict) -> None:
    """The `dal` method: distributional alignment (`popalign dal`) of the training roles' neutral prompts towards
    the uniform target on every axis, its identity-specific prompts kept to their named class (`prompt_targets`)."""
    from popalign_core.dal.trainer import DALConfig

    if name != "dal" or m["loss"] != "dal" or m["data"] != "prompts":
        raise ValueError(
            f"methods.{name}: distributional alignment is the method `dal` with loss: dal and "
            "data: prompts (it trains on the training roles' prompts, not on preference data)"
        )
    _check_lr(name, m)
    st = m.get("steps", 1)
    if isinstance(st, bool) or not isinstance(st, int) or st < 1:
        raise ValueError(f"methods.{name}.steps={st!r} is invalid: must be an integer >= 1")
    extra = set(m) - {"loss", "data", "lr", "steps", "options"}
    if extra:
        raise ValueError(f"methods.{name}: unknown key {sorted(extra)[0]!r}; valid: loss, data, lr, steps, options")
    _check_options(name, m, DALConfig, _DEMO_DAL_KEYS, "popalign dal")
    opts = m.get("options") or {}
    if opts.get("ot_method", DALConfig.__dataclass_fields__["ot_method"].default) == "exact":
        import math

        from popalign_core.dal.ot import check_exact_size
        from popalign_core.toyworld.world import TOY_AXES

        n = opts.get("images_per_prompt", DALConfig.__dataclass_fields__["images_per_prompt"].default)
        try:  # the demo's target is uniform on every toy axis: their joint classes
            check_exact_size(n, math.prod(len(c) for c in TOY_AXES.values()))
        except ValueError as exc:
            raise ValueError(f"methods.{name}.options: {exc}") from None


def load_demo_config(path: str | Path | None = None, quick: bool = False, **overrides) -> dict:
    """The demo's settings: the packaged demo.yaml, then `quick`'s sizes, then `path` (merged: the user's values win
    and are all validated), then `overrides`."""
    cfg = read_yaml(DEFAULT_CONFIG, "packaged demo config")
    quick_over = cfg.pop("quick")
    quick_dal = quick_over.pop("dal")
    if quick:
        cfg = _merge(cfg, quick_over)
        dal = cfg["methods"]["dal"]
        dal.update(steps=quick_dal["steps"], options={**dal.get("options", {}), **quick_dal["options"]})
    if path is not None:
        cfg = _merge(cfg, read_yaml(path, "demo config"))
    cfg = _merge(cfg, overrides)
    for name, m in cfg["methods"].items():
        if name not in METHODS:
            raise ValueError(f"methods: unknown method {name!r}; valid: {', '.join(METHODS)}")
        for key in ("loss", "data", "lr"):
            if key not in m:
                raise ValueError(f"methods.{name}: {key!r} is required")
        if name == "dal" or m["loss"] == "dal":
            _check_dal_method(name, m)
            continue
        if m["data"] not in ("population", "pairwise"):
            raise ValueError(f"methods.{name}.data must be 'population' or 'pairwise'; got {m['data']!r}")
        _check_method(name, m)
    positive = {
        "eval": ("n_per_role", "n_per_identity", "n_per_concept", "steps"),
        "select": ("n_per_role", "stages", "n_per_identity", "n_per_concept"),
        "train": ("steps", "batch_size", "lora_rank"),
    }
    for sec, keys in positive.items():
        for k in keys:
            v = cfg[sec][k]
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{sec}.{k}: expected an int >= 1, got {v!r}")
    every = cfg["eval"].get("every_stage")
    if every is not False:
        if not isinstance(every, dict) or set(every) != {"n_per_role", "n_per_identity", "n_per_concept"}:
            raise ValueError(f"eval.every_stage={every!r}: expected false or a mapping with n_per_role, "
                             "n_per_identity and n_per_concept")  # fmt: skip
        for k, v in every.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"eval.every_stage.{k}: expected an int >= 1, got {v!r}")
    if cfg["train"]["steps"] < cfg["select"]["stages"]:
        raise ValueError("train.steps must be >= select.stages (each stage trains at least one step)")
    train_roles(cfg)
    return cfg


def train_roles(cfg: dict) -> tuple[str, ...]:
    """`data.train_roles`: the training roles whose prompts make the preference data (``all`` = the toy world's 34
    `TRAIN_ROLES`). Held-out roles are refused (they are what is measured), and so are validation roles (they
    choose checkpoints)."""
    from popalign_core.toyworld.world import HELD_OUT_ROLES, ROLE_NAMES, TRAIN_ROLES, VALIDATION_ROLES

    v = cfg["data"]["train_roles"]
    if v == "all":
        return TRAIN_ROLES
    if isinstance(v, str) or not isinstance(v, list) or not v:
        raise ValueError(f"data.train_roles={v!r}: expected 'all' or a non-empty list of training roles "
                         f"({', '.join(TRAIN_ROLES)})")  # fmt: skip
    for r in v:
        if r in HELD_OUT_ROLES:
            raise ValueError(f"data.train_roles: {r!r} is a held-out role (held out: {', '.join(HELD_OUT_ROLES)}); "
                             "training on it would measure nothing held out")  # fmt: skip
        if r in VALIDATION_ROLES:
            raise ValueError(f"data.train_roles: {r!r} is a validation role (validation: {', '.join(VALIDATION_ROLES)}"
                             "); it chooses checkpoints, so it stays out of the training data")  # fmt: skip
        if r not in ROLE_NAMES:
            raise ValueError(f"data.train_roles: unknown role {r!r}; training roles: {', '.join(TRAIN_ROLES)}")
    if len(set(v)) != len(v):
        raise ValueError(f"data.train_roles: {next(r for r in v if v.count(r) > 1)!r} is listed twice")
    return tuple(v)


# ------------------------------------------------------------------------------------------------ measuring
def _to_uint8(imgs) -> list[np.ndarray]:
    return list(imgs.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy())


def _labels(clf, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per image: face found, and the argmax class per axis (-1 without a face); plus the concept head's argmax."""
    from popalign_core.toyworld.world import TOY_AXES

    p = clf.predict(images)
    face = p["face"] >= clf.face_threshold
    out = {"face": face, "concept": p["concept"].argmax(1)}
    for axis in TOY_AXES:
        out[axis] = np.where(face, p[axis].argmax(1), -1)
    return out


def _disc(labels: np.ndarray, k: int) -> float:
    """PopAlign Eq. 13 with hard labels against the uniform target: || 1/k - shares ||_2 (labels >= 0 only)."""
    from popalign_core.evaluate.metrics import discrepancy

    lab = labels[labels >= 0]
    if not len(lab):
        return float("nan")
    return discrepancy(np.eye(k)[lab], np.full(k, 1.0 / k))


def _recall(lab: dict[str, np.ndarray], specs: list[tuple[str, str, str]], m: int) -> dict[str, list[int]]:
    """{axis: [hits, faces]} over identity-specific prompts `specs` (role, axis, class), `m` images each in order."""
    from popalign_core.toyworld.world import TOY_AXES

    hits = {a: [0, 0] for a in TOY_AXES}
    for j, (_, a, c) in enumerate(specs):
        got = lab[a][j * m : (j + 1) * m]
        got = got[got >= 0]
        hits[a][0] += int((got == TOY_AXES[a].index(c)).sum())
        hits[a][1] += len(got)
    return hits


def role_bias(labels: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """{role: {axis: labels}} -> per-role shares and discrepancy per axis, and their mean over roles and axes."""
    from popalign_core.toyworld.world import TOY_AXES

    per = {}
    for role, lab in labels.items():
        per[role] = {}
        for axis, classes in TOY_AXES.items():
            ll = lab[axis][lab[axis] >= 0]
            shares = np.bincount(ll, minlength=len(classes)) / max(len(ll), 1)
            per[role][axis] = {
                "shares": dict(zip(classes, shares.round(4).tolist())),
                "faces": int(len(ll)),
                "discrepancy": _disc(lab[axis], len(classes)),
            }
    axis_means = {a: float(np.nanmean([per[r][a]["discrepancy"] for r in per])) for a in TOY_AXES}
    return {"per_role": per, "per_axis": axis_means, "mean": float(np.mean(list(axis_means.values())))}


def _mean_disc(labels: dict[str, dict[str, np.ndarray]]) -> float:
    from popalign_core.toyworld.world import TOY_AXES

    return float(np.nanmean([[_disc(lab[a], len(c)) for a, c in TOY_AXES.items()] for lab in labels.values()]))


def _resample(labels: dict[str, dict[str, np.ndarray]], rng) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for role, lab in labels.items():
        idx = rng.integers(0, len(lab["face"]), len(lab["face"]))
        out[role] = {k: v[idx] for k, v in lab.items()}
    return out


def _stage_reduction(stage: dict, base_labels: dict[str, dict[str, np.ndarray]]) -> dict:
    """One stage's held-out audit with `discrepancy_before` and `reduction` against the base model's first
    `stage["n_per_role"]` images per role: the same seeds, so the same noise and the same finite-sample floor (a
    stage audited on fewer images than the base's full audit would show the small sample's extra discrepancy as a
    smaller reduction)."""
    n = stage["n_per_role"]
    before = _mean_disc({r: {k: v[:n] for k, v in lab.items()} for r, lab in base_labels.items()})
    return stage | {"discrepancy_before": before, "reduction": 1.0 - stage["discrepancy"] / before}


def bootstrap(before, after, n_boot: int, seed: int) -> dict[str, list[float]]:
    """95% percentile bootstrap CIs (images resampled within each role, before and after independently) of the
    mean discrepancy before, after, and of the relative reduction 1 - after / before."""
    rng = np.random.default_rng(seed)
    b, a, r = [], [], []
    for _ in range(n_boot):
        xb = _mean_disc(_resample(before, rng))
        b.append(xb)
        if after is not None:
            xa = _mean_disc(_resample(after, rng))
            a.append(xa)
            r.append(1.0 - xa / xb if xb > 0 else float("nan"))

    def ci(v):
        return [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] if v else None

    return {"before": ci(b), "after": ci(a), "reduction": ci(r)}


def floor(labels: dict[str, dict[str, np.ndarray]]) -> float:
    """Finite-sample floor: the expected mean discrepancy of a perfectly fair model with these face counts."""
    from popalign_core.evaluate.metrics import discrepancy_floor
    from popalign_core.toyworld.world import TOY_AXES

    vals = []
    for lab in labels.values():
        for axis, classes in TOY_AXES.items():
            n = int((lab[axis] >= 0).sum())
            if n:
                vals.append(discrepancy_floor(np.full(len(classes), 1 / len(classes)), n))
    return float(np.mean(vals)) if vals else float("nan")


def evaluate(adapter, cfg: dict, seed: int, clf=None) -> dict[str, Any]:
    """Held-out audit of one model (see the module docstring): role labels, bias, recall, concept accuracy."""
    from popalign_core.models.sampling import SamplerConfig, sample
    from popalign_core.toyworld.classifier import ToyClassifier
    from popalign_core.toyworld.world import CONCEPTS, HELD_OUT_ROLES, TOY_AXES, caption, concept_caption

    ev = cfg["eval"]
    clf = clf or ToyClassifier(which="eval")
    g1 = SamplerConfig(steps=ev["steps"], guidance_scale=ev["guidance"], scheduler="ddim", seed=seed, batch_size=200)
    n = ev["n_per_role"]
    imgs = sample(adapter, [(caption(r), k) for r in HELD_OUT_ROLES for k in range(n)], g1)
    lab = _labels(clf, _to_uint8(imgs))
    roles = {r: {k: v[i * n : (i + 1) * n] for k, v in lab.items()} for i, r in enumerate(HELD_OUT_ROLES)}
    # identity-specific prompts of the held-out roles: every class of every axis
    gr = SamplerConfig(steps=ev["steps"], guidance_scale=ev["recall_guidance"], scheduler="ddim", seed=seed,
                       batch_size=200)  # fmt: skip
    m = ev["n_per_identity"]
    specs = [(r, a, c) for r in HELD_OUT_ROLES for a, cs in TOY_AXES.items() for c in cs]
    imgs = sample(adapter, [(caption(r, {a: c}), k) for r, a, c in specs for k in range(m)], gr)
    hits = _recall(_labels(clf, _to_uint8(imgs)), specs, m)
    recall = {a: h[0] / h[1] if h[1] else float("nan") for a, h in hits.items()}
    # non-person concepts
    q = ev["n_per_concept"]
    imgs = sample(adapter, [(concept_caption(c), k) for c in CONCEPTS for k in range(q)], g1)
    lab_c = _labels(clf, _to_uint8(imgs))
    truth = np.repeat(np.arange(1, len(CONCEPTS) + 1), q)
    return {
        "labels": roles,
        "bias": role_bias(roles),
        "identity_recall": float(np.mean(list(recall.values()))),
        "identity_recall_per_axis": recall,
        "concept_accuracy": float((lab_c["concept"] == truth).mean()),
    }


def neutral_labels(adapter, cfg: dict, roles, n: int, seed: int, clf) -> dict[str, dict[str, np.ndarray]]:
    """Labels of `n` images per role of its neutral prompt at the audit sampler (guidance `eval.guidance`), split by
    role: {role: {head: labels}}."""
    from popalign_core.models.sampling import SamplerConfig, sample
    from popalign_core.toyworld.world import caption

    ev = cfg["eval"]
    sc = SamplerConfig(steps=ev["steps"], guidance_scale=ev["guidance"], scheduler="ddim", seed=seed, batch_size=200)
    lab = _labels(clf, _to_uint8(sample(adapter, [(caption(r), k) for r in roles for k in range(n)], sc)))
    return {r: {k: v[i * n : (i + 1) * n] for k, v in lab.items()} for i, r in enumerate(roles)}


def validation_roles_bias(adapter, cfg: dict, seed: int, clf) -> float:
    """Checkpoint-selection score: mean discrepancy over the validation roles and axes (training classifier). The
    validation roles are in neither the preference data nor the held-out set (`toyworld.world.VALIDATION_ROLES`)."""
    from popalign_core.toyworld.world import VALIDATION_ROLES

    return _mean_disc(neutral_labels(adapter, cfg, VALIDATION_ROLES, cfg["select"]["n_per_role"], seed + 1, clf))


def validation(adapter, cfg: dict, seed: int, clf) -> dict[str, float]:
    """Checkpoint-selection guard rails, judged by the training classifier with their own seeds: identity recall on
    the identity-specific prompts of the *validation* roles (every class of every axis, at the recall guidance) and
    concept accuracy on the concepts (at the audit guidance)."""
    from popalign_core.models.sampling import SamplerConfig, sample
    from popalign_core.toyworld.world import CONCEPTS, TOY_AXES, VALIDATION_ROLES, caption, concept_caption

    ev, sl = cfg["eval"], cfg["select"]
    m = sl["n_per_identity"]
    specs = [(r, a, c) for r in VALIDATION_ROLES for a, cs in TOY_AXES.items() for c in cs]
    sc = SamplerConfig(steps=ev["steps"], guidance_scale=ev["recall_guidance"], scheduler="ddim", seed=seed + 2,
                       batch_size=200)  # fmt: skip
    lab = _labels(
        clf, _to_uint8(sample(adapter, [(caption(r, {a: c}), k) for r, a, c in specs for k in range(m)], sc))
    )
    hits = _recall(lab, specs, m)
    hit, tot = sum(h[0] for h in hits.values()), sum(h[1] for h in hits.values())
    q = sl["n_per_concept"]
    sc = SamplerConfig(
        steps=ev["steps"], guidance_scale=ev["guidance"], scheduler="ddim", seed=seed + 2, batch_size=200
    )
    lc = _labels(clf, _to_uint8(sample(adapter, [(concept_caption(c), k) for c in CONCEPTS for k in range(q)], sc)))
    truth = np.repeat(np.arange(1, len(CONCEPTS) + 1), q)
    return {"recall": hit / tot if tot else float("nan"), "concept_accuracy": float((lc["concept"] == truth).mean())}


def choose_stage(curve: list[dict], base_val: dict, cfg: dict) -> tuple[dict, str]:
    """The selected checkpoint: the lowest validation-role discrepancy among the stages whose validation recall and
    concept accuracy stay within `select.max_recall_drop` / `select.max_concept_drop` of the base model's; if no
    stage qualifies, the first stage (the least trained)."""
    sl = cfg["select"]
    ok = [c for c in curve if c["val_recall"] >= base_val["recall"] - sl["max_recall_drop"]
          and c["val_concept_accuracy"] >= base_val["concept_accuracy"] - sl["max_concept_drop"]]  # fmt: skip
    if ok:
        best = min(ok, key=lambda c: c["validation_roles_discrepancy"])
        return best, "lowest validation-role discrepancy within limits"
    return curve[0], "no stage within the validation limits: the first stage"


# ------------------------------------------------------------------------------------------------ stages
def build_data(cfg: dict, out: Path, adapter, log) -> dict:
    """`popalign data pipeline` on the training roles (`data.train_roles`)."""
    from popalign_core.population.pipeline import run_pipeline
    from popalign_core.toyworld.world import caption

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
    from popalign_core.toyworld.world import CONCEPTS, TOY_AXES, caption, concept_caption

    ids = [caption(r, {a: c}) for r in train_roles(cfg) for a, cs in TOY_AXES.items() for c in cs]
    return ids + [concept_caption(c) for c in CONCEPTS]


def train_method(name: str, cfg: dict, data_dir: Path, out: Path, select_clf, base_val: dict, log) -> dict:
    """Train one method in stages (resuming), scoring each stage's LoRA on the validation roles; keeps the best. Every
    stage runs whatever the machine's speed (fixed work: the same numbers everywhere for the same seed)."""
    from popalign_core.train.trainer import load_config, train

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
    from popalign_core.toyworld.world import TOY_AXES, caption

    return {caption(r, {a: c}): {a: [1.0 if k == j else 0.0 for k in range(len(cs))]}
            for r in train_roles(cfg) for a, cs in TOY_AXES.items() for j, c in enumerate(cs)}  # fmt: skip


def train_dal_method(name: str, cfg: dict, out: Path, select_clf, base_val: dict, log) -> dict:
    """The `dal` method: `popalign dal` on the training roles' neutral prompts towards the uniform target on every
    axis (the demo's target), judged during training by the toy *training* classifier, in `select.stages` stages
    (resuming) scored and chosen like the other methods (`choose_stage`)."""
    from popalign_core.dal.trainer import load_dal_config, run_dal
    from popalign_core.toyworld.world import TOY_AXES, caption

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
    from popalign_core.lora.files import load_lora
    from popalign_core.models.loading import load_model

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


# ------------------------------------------------------------------------------------------------ report
def _save(fig, path: Path) -> str:
    """Lay out, write atomically and close a figure; returns the file's name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path.name


def _plots(results: dict, evals: dict, trained: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from popalign_core.toyworld.world import HELD_OUT_ROLES, TOY_AXES

    files = {}
    names = ["base", *trained]
    # per held-out role and axis: the discrepancy of every model (the full class shares are in results.json)
    fig, axes = plt.subplots(len(TOY_AXES), 1, figsize=(13, 2.8 * len(TOY_AXES)), dpi=90, sharex=True)
    width = 0.8 / len(names)
    x = np.arange(len(HELD_OUT_ROLES))
    for ax, (axis, classes) in zip(axes, TOY_AXES.items()):
        for k, nm in enumerate(names):
            per = evals[nm]["bias"]["per_role"]
            ax.bar(x + k * width - 0.4 + width / 2, [per[r][axis]["discrepancy"] for r in HELD_OUT_ROLES], width,
                   label=nm, color="k" if nm == "base" else f"C{k - 1}")  # fmt: skip
        ax.set_ylabel(f"{axis}: discrepancy")
        ax.set_ylim(0, np.sqrt(1 - 1 / len(classes)))  # the largest discrepancy: every image in one class
    axes[-1].set_xticks(x, HELD_OUT_ROLES, fontsize=8)
    axes[0].legend(fontsize=7, ncol=len(names), loc="upper right")
    fig.suptitle("held-out roles: discrepancy from the uniform target per axis (evaluation classifier; 0 = fair)")
    files["shares"] = _save(fig, out / "shares.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5), dpi=90)
    for nm, tr in trained.items():
        ls = [v for v in tr["losses"] if v is not None]
        if ls:
            w = max(1, len(ls) // 25)
            sm = np.convolve(ls, np.ones(w) / w, mode="valid")
            a1.plot(np.arange(len(sm)) + w, sm / max(abs(sm[0]), 1e-12), label=nm)
        a2.plot([0] + [c["step"] for c in tr["curve"]],
                [results["selection_base"]] + [c["validation_roles_discrepancy"] for c in tr["curve"]], marker="o",
                label=nm)  # fmt: skip
    a1.set_xlabel("step")
    a1.set_ylabel("loss / first loss (moving mean)")
    a1.set_title("training losses")
    a1.legend(fontsize=8)
    a2.set_xlabel("step")
    a2.set_ylabel("mean discrepancy")
    a2.set_title("checkpoint selection: validation roles (training classifier)")
    a2.legend(fontsize=8)
    files["training"] = _save(fig, out / "training.png")

    # trade-off: held-out reduction against held-out identity recall at every audited stage (for the reader; the
    # kept stage, chosen on validation roles, is circled)
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=90)
    for k, (nm, m) in enumerate(results["methods"].items()):
        st = sorted(m["held_out_per_stage"].items(), key=lambda kv: int(kv[0]))
        x = [v["identity_recall"] for _, v in st]
        y = [100 * v["reduction"] for _, v in st]
        ax.plot(x, y, marker="o", color=f"C{k}", label=nm)
        for (step, _), xi, yi in zip(st, x, y):
            ax.annotate(step, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if int(step) == m["selected_step"]:
                ax.scatter([xi], [yi], s=160, facecolors="none", edgecolors=f"C{k}", linewidths=1.5)
    ax.axvline(0.95, ls="--", c="grey", lw=0.8)
    ax.axhline(56, ls=":", c="grey", lw=0.8)
    ax.set_xlabel("held-out identity recall")
    ax.set_ylabel("held-out discrepancy reduction (%)")
    ax.set_title("trade-off at every stage (labels: step; circled: kept, chosen on validation roles)", fontsize=9)
    ax.legend(fontsize=8)
    files["tradeoff"] = _save(fig, out / "tradeoff.png")
    return files


def _fmt(v, nd=3):
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{nd}f}"


def write_report(results: dict, files: dict, out: Path) -> None:
    r = results
    lines = [
        "# PopAlign demo on the toy world",
        "",
        f"Base model: the toy world shipped with the package. Held-out roles: {', '.join(r['held_out_roles'])} "
        f"({r['n_per_role']} images per role at guidance {r['eval_sampler']['guidance_scale']}, DDIM "
        f"{r['eval_sampler']['steps']} steps), judged by the toy **evaluation** classifier. Identity-specific "
        f"prompts at guidance {r['recall_guidance']} ({r['n_per_identity']} images per prompt); concepts "
        f"{r['n_per_concept']} images each. Training data: training roles only, filtered by the toy training "
        "classifier. Checkpoints chosen on the validation roles (training classifier), never on held-out roles.",
        "",
        "| method | discrepancy before | after (95% CI) | reduction (95% CI) | identity recall | concept acc. drop "
        "(points) | selected step |",
        "|---|---|---|---|---|---|---|",
    ]
    for nm, m in r["methods"].items():
        lines.append(
            f"| {nm} | {_fmt(m['discrepancy_before'])} | {_fmt(m['discrepancy_after'])} "
            f"[{_fmt(m['discrepancy_after_ci'][0])}, {_fmt(m['discrepancy_after_ci'][1])}] | "
            f"{_fmt(100 * m['reduction'], 1)}% [{_fmt(100 * m['reduction_ci'][0], 1)}, "
            f"{_fmt(100 * m['reduction_ci'][1], 1)}] | {_fmt(m['identity_recall'])} | "
            f"{_fmt(m['concept_accuracy_drop'], 1)} | {m['selected_step']} / {m['trained_steps']} |"
        )
    b = r["base"]
    lines += [
        "",
        f"Base: discrepancy {_fmt(b['discrepancy'])} [{_fmt(b['discrepancy_ci'][0])}, "
        f"{_fmt(b['discrepancy_ci'][1])}], identity recall {_fmt(b['identity_recall'])}, concept accuracy "
        f"{_fmt(b['concept_accuracy'])}. Finite-sample floor (a perfectly fair model, same face counts): "
        f"{_fmt(r['floor'])}.",
        "",
        "Acceptance (held-out roles; 56% is the PopAlign paper's SDXL gender reduction): "
        + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r["acceptance"].items()),
        "",
        "## Per-axis discrepancy after (mean over held-out roles)",
        "",
        "| model | " + " | ".join(r["axes"]) + " |",
        "|---|" + "---|" * len(r["axes"]),
        "| base | " + " | ".join(_fmt(b["per_axis"][a]) for a in r["axes"]) + " |",
    ]
    for nm, m in r["methods"].items():
        lines.append(f"| {nm} | " + " | ".join(_fmt(m["per_axis_after"][a]) for a in r["axes"]) + " |")
    lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in files.items()]
    lines += ["", "## Time per stage (seconds; reference: 2 CPU cores, reported only, never acted on)", "",
              "| stage | seconds | reference |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v['seconds']:.0f} | {v['budget_s']} |" for k, v in r["timings"].items()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ the run
def run_demo(out: str | Path = "runs/demo", config: dict | None = None, overwrite: bool = False, log=print) -> dict:
    """Run the demo (module docstring); returns results (also in out/results.json)."""
    import torch

    from popalign_core.models.loading import load_model
    from popalign_core.toyworld.classifier import ToyClassifier
    from popalign_core.toyworld.world import HELD_OUT_ROLES, TOY_AXES

    cfg = config or load_demo_config()
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} is not empty; pass --overwrite (it replaces an earlier demo run, "
                              "nothing else) or choose another --out")  # fmt: skip
    if overwrite:
        # only an earlier demo run's own files; otherwise nothing is deleted
        clear_output_dir(out, "demo", _outputs(), signature="demo_config.yaml")
    claim_output_dir(out, "demo", _outputs(), signature="demo_config.yaml")
    import yaml

    atomic_write_text(out / "demo_config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.time()
    timings: dict[str, float] = {}
    torch.manual_seed(cfg["seed"])
    seed = cfg["seed"]
    eval_clf, select_clf = ToyClassifier(which="eval"), ToyClassifier(which="train")

    t = time.time()
    base_model = load_model("toyworld")
    evals = {"base": evaluate(base_model, cfg, seed, eval_clf)}
    timings["audit_before"] = time.time() - t
    log(f"[demo] base: held-out discrepancy {evals['base']['bias']['mean']:.3f}, recall "
        f"{evals['base']['identity_recall']:.3f}, concepts {evals['base']['concept_accuracy']:.3f}")  # fmt: skip

    t = time.time()
    pipe = build_data(cfg, out / "pipeline" / "run", base_model, log)
    data_dir = out / "pipeline" / "run" / "data"
    timings["data"] = time.time() - t

    t = time.time()
    sel_base = validation_roles_bias(base_model, cfg, seed, select_clf)
    base_val = validation(base_model, cfg, seed, select_clf)
    trained: dict[str, dict] = {}
    t_sel0 = time.time() - t
    for name in cfg["methods"]:
        if name == "dal":
            trained[name] = train_dal_method(name, cfg, out / name, select_clf, base_val, log)
        else:
            trained[name] = train_method(name, cfg, data_dir, out / name, select_clf, base_val, log)
    timings["train"] = sum(v["train_seconds"] for v in trained.values())
    timings["select"] = t_sel0 + sum(v["select_seconds"] for v in trained.values())

    t = time.time()
    from popalign_core.lora.files import load_lora

    stage_evals: dict[str, dict[int, dict]] = {}
    for name, tr in trained.items():
        # the chosen stage, and with eval.every_stage every other stage too (for the reader's trade-off plot only)
        every = cfg["eval"]["every_stage"]
        stages = tr["curve"] if every else [tr["best"]]
        stage_evals[name] = {}
        for st in stages:
            kept = st["step"] == tr["best"]["step"]
            model = load_model("toyworld")
            load_lora(model, out / name / st["lora"])
            e = evaluate(model, cfg if kept else {**cfg, "eval": {**cfg["eval"], **every}}, seed, eval_clf)
            n = cfg["eval"]["n_per_role"] if kept else every["n_per_role"]
            stage_evals[name][st["step"]] = {"discrepancy": e["bias"]["mean"], "identity_recall": e["identity_recall"],
                                             "concept_accuracy": e["concept_accuracy"], "n_per_role": n}  # fmt: skip
            if kept:
                evals[name] = e
        atomic_copy(out / name / tr["best"]["lora"], out / f"{name}_lora.safetensors")
        log(f"[demo] {name} (step {tr['best']['step']}): held-out discrepancy {evals[name]['bias']['mean']:.3f}")
    timings["audit_after"] = time.time() - t

    t = time.time()
    base = evals["base"]
    ci_base = bootstrap(base["labels"], None, cfg["eval"]["bootstrap"], seed)["before"]
    res_methods = {}
    for name, tr in trained.items():
        e = evals[name]
        ci = bootstrap(base["labels"], e["labels"], cfg["eval"]["bootstrap"], seed)
        before, after = base["bias"]["mean"], e["bias"]["mean"]
        res_methods[name] = {
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
            "held_out_per_stage": {str(k): _stage_reduction(v, base["labels"]) for k, v in stage_evals[name].items()},
            "per_role_after": e["bias"]["per_role"],
        }
    pop = res_methods.get("popalign")
    acceptance = {}
    if pop:
        acceptance = {
            "popalign_reduction_ge_56pct": pop["reduction"] >= 0.56,
            "popalign_identity_recall_ge_0.95": pop["identity_recall"] >= 0.95,
            "popalign_concept_drop_le_3_points": pop["concept_accuracy_drop"] <= 3.0,
        }
    results = {
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
        "acceptance": acceptance,
        "data": {k: pipe[k] for k in ("augment", "filter", "build")}
        | {"sample": {k: pipe["sample"][k] for k in ("jobs", "done", "seconds", "images_per_s")}},  # fmt: skip
    }
    files = _plots(results, evals, trained, out)
    timings["report"] = time.time() - t
    timings["total"] = time.time() - t0
    results["timings"] = {k: {"seconds": round(v, 1), "budget_s": cfg["budgets"][k],
                              "over_budget": v > cfg["budgets"][k]} for k, v in timings.items()}  # fmt: skip
    results["seconds"] = round(timings["total"], 1)
    write_report(results, files, out)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=float))
    over = [k for k, v in results["timings"].items() if v["over_budget"]]
    if over:
        log(f"[demo] slower than the reference times of this machine class: {', '.join(over)} (see results.json "
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
