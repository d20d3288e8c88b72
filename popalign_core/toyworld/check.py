"""``popalign toyworld check``: does the built toy world have the bias it was designed to have?

Samples the toy model through the same code path as SD1.5 (`models.load_model` + `sampling.sample`) and judges the
images with the **evaluation** classifier. Prints progress, then as its last line one JSON object:

* ``world``: the number of roles, held-out and validation roles, and per axis the strongest designed skew towards
  each class among the held-out roles (the world promises >= 0.85 in both directions on every axis);
* ``roles``: per role and axis, the designed and the measured class shares (hard labels among images with a face);
* ``base_discrepancy``: per axis, the mean over roles of PopAlign Eq. 13 (hard labels, uniform target) of the
  neutral prompt: the bias the model really has; ``base_discrepancy_held_out``: the same over the held-out roles;
* ``skew_error_mean``: the mean over roles and axes of max_k |measured - designed|, with
  ``skew_error_floor``: the same statistic for a perfect sampler at the same N (seeded Monte Carlo), and
  ``skew_error_by_split``: the mean per split (train / validation / held_out);
* ``identity_recall``: per axis, the share of identity-specific images (one prompt per class and role of
  `RECALL_ROLES`) whose predicted class is the named one (no face = miss);
* ``concept_accuracy``: share of concept-prompt images classified as that concept;
* ``hidden_face_rate``: share of "in a cloak" images with a detected face (should be near 0);
* ``classifier_accuracy``: the evaluation classifier on fresh renders (renderer ground truth), the minimum over its
  heads, with ``classifier_accuracy_per_head`` beside it;
* ``classifier_agreement``: per axis, training vs evaluation classifier argmax agreement on generated images;
* ``train_classifier_calibration``: per axis, the training classifier's expected calibration error, mean
  confidence and share of saturated (>= 0.999) predictions on fresh renders (it must not be saturated at 0/1);
* ``sampler``: the sampler settings (guidance changes proportions; PopAlign Fig. 6);
* ``targets`` / ``passed``: the targets of docs/toyworld.md and, per target, whether this run meets it;
* ``build_seconds``, ``weights_mb``: the build's recorded time and the folder's size.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.common.userinput import ArgumentParser, integer, number
from popalign_core.evaluate.metrics import discrepancy
from popalign_core.models.loading import load_model
from popalign_core.models.sampling import SamplerConfig, sample
from popalign_core.toyworld.classifier import ToyClassifier, default_toyworld_dir, labelled_renders
from popalign_core.toyworld.world import (
    CONCEPTS,
    HELD_OUT_ROLES,
    KEYWORDS,
    ROLE_BY_NAME,
    ROLE_NAMES,
    TOY_AXES,
    TRAIN_ROLES,
    VALIDATION_ROLES,
    caption,
    concept_caption,
)

# identity recall is measured on strongly skewed roles of every split: the keyword has to win against the skew
RECALL_ROLES = ("baker", "weaver", "gardener", "tailor", "merchant", "drummer", "butcher", "jester", "lawyer",
                "dancer")  # fmt: skip
# guidance 1.5: toy world v2's one sampler setting, where every target is met (docs/toyworld.md)
DEFAULT_SAMPLER = {"steps": 25, "guidance_scale": 1.5, "scheduler": "ddim", "batch_size": 200, "seed": 0}
TARGETS = {
    "roles": 48,
    "held_out_roles": 12,
    "held_out_strong": 0.85,
    "skew_error_mean": 0.07,
    "identity_recall": 0.97,
    "concept_accuracy": 0.97,
    "classifier_accuracy": 0.98,
    "base_discrepancy": 0.2,
}


def _generate(adapter, prompts: list[str], n: int, sampler: dict, progress) -> dict[str, np.ndarray]:
    cfg = SamplerConfig(**sampler)
    out = {}
    for i, p in enumerate(prompts):
        imgs = sample(adapter, [(p, k) for k in range(n)], cfg)
        out[p] = (imgs.clamp(0, 1).mul(255).round().byte()).permute(0, 2, 3, 1).numpy()
        if progress:
            progress(f"sampled {i + 1}/{len(prompts)} prompts ({p!r})")
    return out


def _shares(clf, imgs: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    p = clf.predict(list(imgs))
    face = p["face"] >= clf.face_threshold
    shares = {}
    for axis, classes in TOY_AXES.items():
        lab = p[axis][face].argmax(1)
        shares[axis] = np.bincount(lab, minlength=len(classes)) / max(int(face.sum()), 1)
    return shares, face, p


def _max_err_floor(designed: np.ndarray, n: int, rng: np.random.Generator, reps: int = 2000) -> float:
    if n == 0:
        return float("nan")
    draws = rng.multinomial(n, designed, size=reps) / n
    return float(np.abs(draws - designed).max(axis=1).mean())


def _calibration(clf, imgs: np.ndarray, labels: dict, bins: int = 10) -> dict[str, dict[str, float]]:
    """Per axis, on labelled renders with a face: expected calibration error (`bins` equal-width confidence bins),
    mean confidence (max probability) and the share of saturated predictions (max probability >= 0.999)."""
    p = clf.predict(list(imgs))
    out = {}
    for axis in TOY_AXES:
        y = np.asarray(labels[axis])
        keep = y >= 0
        prob = p[axis][keep]
        conf, hit = prob.max(1), prob.argmax(1) == y[keep]
        idx = np.minimum((conf * bins).astype(int), bins - 1)
        ece = sum(abs(hit[idx == b].mean() - conf[idx == b].mean()) * (idx == b).mean() for b in range(bins)
                  if (idx == b).any())  # fmt: skip
        out[axis] = {"ece": float(ece), "mean_confidence": float(conf.mean()),
                     "saturated_share": float((conf >= 0.999).mean())}  # fmt: skip
    return out


def run_check(
    model: str | Path,
    n: int = 200,
    n_identity: int = 50,
    n_concept: int = 100,
    sampler: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    sampler = {**DEFAULT_SAMPLER, **(sampler or {})}
    t0 = time.time()
    adapter = load_model(str(model))
    ev, tr = ToyClassifier(model, which="eval"), ToyClassifier(model, which="train")
    rng = np.random.default_rng(12345)
    roles: dict[str, Any] = {}
    disc: dict[str, list[float]] = {a: [] for a in TOY_AXES}
    errs, floors, split_errs = [], [], {"train": [], "validation": [], "held_out": []}
    split = {**{r: "train" for r in TRAIN_ROLES}, **{r: "validation" for r in VALIDATION_ROLES},
             **{r: "held_out" for r in HELD_OUT_ROLES}}  # fmt: skip
    agree: dict[str, list[float]] = {a: [] for a in TOY_AXES}
    neutral = _generate(adapter, [caption(r) for r in ROLE_NAMES], n, sampler, progress)
    for role in ROLE_NAMES:
        imgs = neutral[caption(role)]
        shares, face, p_ev = _shares(ev, imgs)
        p_tr = tr.predict(list(imgs))
        entry: dict[str, Any] = {"face_rate": float(face.mean()), "n": int(face.sum())}
        for axis, classes in TOY_AXES.items():
            designed = np.asarray(ROLE_BY_NAME[role].skew[axis])
            meas = shares[axis]
            entry[axis] = {"classes": list(classes), "designed": designed.round(4).tolist(),
                           "measured": meas.round(4).tolist()}  # fmt: skip
            errs.append(float(np.abs(meas - designed).max()))
            split_errs[split[role]].append(errs[-1])
            floors.append(_max_err_floor(designed, int(face.sum()), rng))
            onehot = np.eye(len(classes))[p_ev[axis][face].argmax(1)]
            disc[axis].append(discrepancy(onehot, np.full(len(classes), 1 / len(classes))) if len(onehot) else 0.0)
            both = face & (p_tr["face"] >= tr.face_threshold)
            if both.any():
                agree[axis].append(float((p_tr[axis][both].argmax(1) == p_ev[axis][both].argmax(1)).mean()))
        roles[role] = entry
    # identity-specific prompts
    id_prompts = {(a, c, r): caption(r, {a: c}) for a in TOY_AXES for c in TOY_AXES[a] for r in RECALL_ROLES}
    gen = _generate(adapter, sorted(set(id_prompts.values())), n_identity, sampler, progress)
    recall: dict[str, Any] = {}
    for axis, classes in TOY_AXES.items():
        hits, total = 0, 0
        for (a, c, _r), prompt in id_prompts.items():
            if a != axis:
                continue
            p = ev.predict(list(gen[prompt]))
            ok = (p["face"] >= ev.face_threshold) & (p[axis].argmax(1) == classes.index(c))
            hits, total = hits + int(ok.sum()), total + len(ok)
        recall[axis] = hits / total
    # concepts and hidden figures
    cgen = _generate(adapter, [concept_caption(c) for c in CONCEPTS], n_concept, sampler, progress)
    c_hits = sum(int((ev.predict(list(cgen[concept_caption(c)]))["concept"].argmax(1) == 1 + i).sum())
                 for i, c in enumerate(CONCEPTS))  # fmt: skip
    hidden_prompts = [caption(r, hidden=True) for r in RECALL_ROLES[:3]]
    hgen = _generate(adapter, hidden_prompts, n_concept, sampler, progress)
    hidden_face = float(np.mean([ev.predict(list(v))["face"] >= ev.face_threshold for v in hgen.values()]))
    # the evaluation classifier against renderer ground truth
    r_imgs, r_lab = labelled_renders(2000, seed=777)
    acc = ev.accuracy(r_imgs, r_lab)
    calibration = _calibration(tr, r_imgs, r_lab)
    held = {a: {c: max(ROLE_BY_NAME[r].skew[a][k] for r in HELD_OUT_ROLES) for k, c in enumerate(classes)}
            for a, classes in TOY_AXES.items()}  # fmt: skip
    ri = {r: i for i, r in enumerate(ROLE_NAMES)}
    disc_held = {a: float(np.mean([v[ri[r]] for r in HELD_OUT_ROLES])) for a, v in disc.items()}
    result = {
        "model": str(model),
        "n_per_role": n,
        "labels": "hard (argmax of the evaluation classifier) among images with a detected face",
        "sampler": sampler,
        "world": {
            "roles": len(ROLE_NAMES),
            "held_out_roles": len(HELD_OUT_ROLES),
            "validation_roles": len(VALIDATION_ROLES),
            "train_roles": len(TRAIN_ROLES),
            "held_out_strongest_skew": held,
        },  # fmt: skip
        "roles": roles,
        "base_discrepancy": {a: float(np.mean(v)) for a, v in disc.items()},
        "base_discrepancy_held_out": disc_held,
        "skew_error_mean": float(np.mean(errs)),
        "skew_error_floor": float(np.mean(floors)),
        "skew_error_by_split": {k: float(np.mean(v)) for k, v in split_errs.items()},
        "identity_recall": recall,
        "concept_accuracy": c_hits / (n_concept * len(CONCEPTS)),
        "hidden_face_rate": hidden_face,
        "classifier_accuracy": min(acc.values()),
        "classifier_accuracy_per_head": acc,
        "classifier_agreement": {a: float(np.mean(v)) if v else None for a, v in agree.items()},
        "train_classifier_calibration": calibration,
        "keywords": {a: {c: list(k) for c, k in v.items()} for a, v in KEYWORDS.items()},
        "build_seconds": _build_meta(model).get("seconds"),
        "weights_mb": round(sum(f.stat().st_size for f in Path(model).rglob("*") if f.is_file()) / 2**20, 2),
        "seconds": round(time.time() - t0, 1),
    }
    result["targets"], result["passed"] = TARGETS, _passed(result)
    return result


def _build_meta(model: str | Path) -> dict[str, Any]:
    p = Path(model) / "toyworld.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _passed(r: dict[str, Any]) -> dict[str, bool]:
    """Per target of `TARGETS`: does the check result `r` meet it?"""
    t, w = TARGETS, r["world"]
    strong = all(sum(v >= t["held_out_strong"] for v in w["held_out_strongest_skew"][a].values()) >= 2
                 for a in TOY_AXES)  # fmt: skip
    return {
        "roles": w["roles"] >= t["roles"],
        "held_out_roles": w["held_out_roles"] >= t["held_out_roles"],
        "held_out_strong": strong,
        "skew_error_mean": r["skew_error_mean"] <= t["skew_error_mean"],
        "identity_recall": min(r["identity_recall"].values()) >= t["identity_recall"],
        "concept_accuracy": r["concept_accuracy"] >= t["concept_accuracy"],
        "classifier_accuracy": r["classifier_accuracy"] >= t["classifier_accuracy"],
        "base_discrepancy": min(r["base_discrepancy_held_out"].values()) >= t["base_discrepancy"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="popalign toyworld check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="toy-world folder (default: the shipped one)")
    ap.add_argument("--n", type=integer, default=200, help="images per role (neutral prompt)")
    ap.add_argument("--n-identity", type=integer, default=50, help="images per identity-specific prompt")
    ap.add_argument("--n-concept", type=integer, default=100, help="images per concept / cloaked prompt")
    ap.add_argument("--steps", type=integer, default=DEFAULT_SAMPLER["steps"])
    ap.add_argument("--guidance", type=number, default=DEFAULT_SAMPLER["guidance_scale"])
    ap.add_argument("--scheduler", default=DEFAULT_SAMPLER["scheduler"])
    ap.add_argument("--seed", type=integer, default=0)
    a = ap.parse_args(argv)
    for name in ("n", "n_identity", "n_concept", "steps"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(a, name)}: expected an integer >= 1")

    model = a.model or default_toyworld_dir()
    sampler = {"steps": a.steps, "guidance_scale": a.guidance, "scheduler": a.scheduler, "seed": a.seed}
    res = run_check(model, a.n, a.n_identity, a.n_concept, sampler, lambda m: print(m, file=sys.stderr))
    print(json.dumps(res, sort_keys=True))
    return 0
