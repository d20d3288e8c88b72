"""``popalign toyworld check``: does the built toy world have the bias it was designed to have?

Samples the toy model through the same code path as SD1.5 (`models.load_model` + `sampling.sample`) and judges the
images with the **evaluation** classifier. Prints progress, then as its last line one JSON object:

* ``roles``: per role and axis, the designed and the measured class shares (hard labels among images with a face);
* ``base_discrepancy``: per axis, the mean over roles of PopAlign Eq. 13 (hard labels, uniform target) of the
  neutral prompt: the bias the model really has;
* ``skew_error_mean``: the mean over roles and axes of max_k |measured - designed|, with
  ``skew_error_floor``: the same statistic for a perfect sampler at the same N (seeded Monte Carlo);
* ``identity_recall``: per axis, the share of identity-specific images (one prompt per class and role of
  `RECALL_ROLES`) whose predicted class is the named one (no face = miss);
* ``concept_accuracy``: share of concept-prompt images classified as that concept;
* ``hidden_face_rate``: share of "in a cloak" images with a detected face (should be near 0);
* ``classifier_accuracy``: the evaluation classifier on fresh renders (renderer ground truth), per head;
* ``classifier_agreement``: per axis, training vs evaluation classifier argmax agreement on generated images;
* ``train_classifier_calibration``: per axis, the training classifier's expected calibration error, mean
  confidence and share of saturated (>= 0.999) predictions on fresh renders (it must not be saturated at 0/1);
* ``sampler``: the sampler settings (guidance changes proportions; PopAlign Fig. 6).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..userinput import ArgumentParser, integer, number
from .world import CONCEPTS, KEYWORDS, ROLE_BY_NAME, ROLE_NAMES, TOY_AXES, caption, concept_caption

RECALL_ROLES = ("baker", "pilot", "farmer", "guard", "chef", "judge")
DEFAULT_SAMPLER = {"steps": 25, "guidance_scale": 1.0, "scheduler": "ddim", "batch_size": 200, "seed": 0}


def _generate(adapter, prompts: list[str], n: int, sampler: dict, progress) -> dict[str, np.ndarray]:
    from ..sampling import SamplerConfig, sample

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
    n: int = 400,
    n_identity: int = 50,
    n_concept: int = 100,
    sampler: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from ..metrics import discrepancy
    from ..models import load_model
    from .classifier import ToyClassifier, labelled_renders

    sampler = {**DEFAULT_SAMPLER, **(sampler or {})}
    t0 = time.time()
    adapter = load_model(str(model))
    ev, tr = ToyClassifier(model, which="eval"), ToyClassifier(model, which="train")
    rng = np.random.default_rng(12345)
    roles: dict[str, Any] = {}
    disc: dict[str, list[float]] = {a: [] for a in TOY_AXES}
    errs, floors = [], []
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
    result = {
        "model": str(model),
        "n_per_role": n,
        "labels": "hard (argmax of the evaluation classifier) among images with a detected face",
        "sampler": sampler,
        "roles": roles,
        "base_discrepancy": {a: float(np.mean(v)) for a, v in disc.items()},
        "skew_error_mean": float(np.mean(errs)),
        "skew_error_floor": float(np.mean(floors)),
        "identity_recall": recall,
        "concept_accuracy": c_hits / (n_concept * len(CONCEPTS)),
        "hidden_face_rate": hidden_face,
        "classifier_accuracy": acc,
        "classifier_agreement": {a: float(np.mean(v)) if v else None for a, v in agree.items()},
        "train_classifier_calibration": calibration,
        "keywords": {a: {c: list(k) for c, k in v.items()} for a, v in KEYWORDS.items()},
        "seconds": round(time.time() - t0, 1),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="popalign toyworld check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="toy-world folder (default: the shipped one)")
    ap.add_argument("--n", type=integer, default=400, help="images per role (neutral prompt)")
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
    from .classifier import default_toyworld_dir

    model = a.model or default_toyworld_dir()
    sampler = {"steps": a.steps, "guidance_scale": a.guidance, "scheduler": a.scheduler, "seed": a.seed}
    res = run_check(model, a.n, a.n_identity, a.n_concept, sampler, lambda m: print(m, file=sys.stderr))
    print(json.dumps(res, sort_keys=True))
    return 0
