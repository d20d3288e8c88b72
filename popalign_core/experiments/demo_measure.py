"""The demo's measurements on the toy world: the held-out audit of a model (`evaluate`: per-role discrepancy, PopAlign
Eq. 13 with hard labels against the uniform target, averaged over roles and axes; identity recall; concept
accuracy), the checkpoint-selection scores on the validation roles (`validation_roles_bias`, `validation`,
`choose_stage`), and the statistics of results.json (`bootstrap` CIs, the finite-sample `floor`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from popalign_core.evaluate.metrics import discrepancy, discrepancy_floor
from popalign_core.models.sampling import SamplerConfig, sample
from popalign_core.toyworld.classifier import ToyClassifier
from popalign_core.toyworld.world import CONCEPTS, HELD_OUT_ROLES, TOY_AXES, VALIDATION_ROLES, caption, concept_caption


def _to_uint8(imgs) -> list[np.ndarray]:
    return list(imgs.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy())


def _labels(clf, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per image: face found, and the argmax class per axis (-1 without a face); plus the concept head's argmax."""

    p = clf.predict(images)
    face = p["face"] >= clf.face_threshold
    out = {"face": face, "concept": p["concept"].argmax(1)}
    for axis in TOY_AXES:
        out[axis] = np.where(face, p[axis].argmax(1), -1)
    return out


def _disc(labels: np.ndarray, k: int) -> float:
    """PopAlign Eq. 13 with hard labels against the uniform target: || 1/k - shares ||_2 (labels >= 0 only)."""

    lab = labels[labels >= 0]
    if not len(lab):
        return float("nan")
    return discrepancy(np.eye(k)[lab], np.full(k, 1.0 / k))


def _recall(lab: dict[str, np.ndarray], specs: list[tuple[str, str, str]], m: int) -> dict[str, list[int]]:
    """{axis: [hits, faces]} over identity-specific prompts `specs` (role, axis, class), `m` images each in order."""

    hits = {a: [0, 0] for a in TOY_AXES}
    for j, (_, a, c) in enumerate(specs):
        got = lab[a][j * m : (j + 1) * m]
        got = got[got >= 0]
        hits[a][0] += int((got == TOY_AXES[a].index(c)).sum())
        hits[a][1] += len(got)
    return hits


def role_bias(labels: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """{role: {axis: labels}} -> per-role shares and discrepancy per axis, and their mean over roles and axes."""

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

    vals = []
    for lab in labels.values():
        for axis, classes in TOY_AXES.items():
            n = int((lab[axis] >= 0).sum())
            if n:
                vals.append(discrepancy_floor(np.full(len(classes), 1 / len(classes)), n))
    return float(np.mean(vals)) if vals else float("nan")


def evaluate(adapter, cfg: dict, seed: int, clf=None) -> dict[str, Any]:
    """Held-out audit of one model (see the module docstring): role labels, bias, recall, concept accuracy."""

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

    ev = cfg["eval"]
    sc = SamplerConfig(steps=ev["steps"], guidance_scale=ev["guidance"], scheduler="ddim", seed=seed, batch_size=200)
    lab = _labels(clf, _to_uint8(sample(adapter, [(caption(r), k) for r in roles for k in range(n)], sc)))
    return {r: {k: v[i * n : (i + 1) * n] for k, v in lab.items()} for i, r in enumerate(roles)}


def validation_roles_bias(adapter, cfg: dict, seed: int, clf) -> float:
    """Checkpoint-selection score: mean discrepancy over the validation roles and axes (training classifier). The
    validation roles are in neither the preference data nor the held-out set (`toyworld.world.VALIDATION_ROLES`)."""

    return _mean_disc(neutral_labels(adapter, cfg, VALIDATION_ROLES, cfg["select"]["n_per_role"], seed + 1, clf))


def validation(adapter, cfg: dict, seed: int, clf) -> dict[str, float]:
    """Checkpoint-selection guard rails, judged by the training classifier with their own seeds: identity recall on
    the identity-specific prompts of the *validation* roles (every class of every axis, at the recall guidance) and
    concept accuracy on the concepts (at the audit guidance)."""

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
