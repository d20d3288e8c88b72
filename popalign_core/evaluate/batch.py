"""Bias metrics of one batch of classified images (the ComfyUI Bias Metrics node's): class shares per prompt group
against a target, PopAlign's discrepancy (Eq. 13) per group with bootstrap CIs and its sampling floor
(`metrics.per_prompt_report`), the patent's bias(P) = mean pairwise |freq(i) - freq(j)| (`metrics.bias_pairwise`)
and the face rate; `chart_data` is what the node's chart (js/popalign.js) draws, `report.plot_batch_shares` its PNG.

    metrics = batch_metrics(lambda: rows, 4, {"gender": ("female", "male")}, "gender", prompts="a doctor")

Shares of a group: the mean of the one-hot argmax labels (hard, the public PopAlign evaluation) or of the class
probabilities (soft) over its images with a face, rounded to 6 decimals; a group without a face has shares 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from popalign_core.evaluate.metrics import bias_pairwise, per_prompt_report

__all__ = ["batch_metrics", "chart_data", "prompt_groups", "target_vector"]


def target_vector(target: Mapping | None, axis: str, classes: Sequence[str]) -> tuple[list[float], str]:
    """(shares per class of `classes`, "given") from a PopAlign target {"target": {axis: {class: p} or [p...]}};
    (uniform, "uniform") without one. ValueError when the target's axis or classes are not the classifier's."""
    if target is None:
        return [1.0 / len(classes)] * len(classes), "uniform"
    spec = (target.get("target") or {}).get(axis)
    if spec is None:
        raise ValueError(f"target: it has no axis {axis!r} (its axes: {list(target.get('target', {}))})")
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(classes))
        if unknown:
            raise ValueError(f"target: classes {unknown} of axis {axis!r} are not the classifier's {list(classes)}")
        return [float(spec.get(c, 0.0)) for c in classes], "given"
    if len(spec) != len(classes):
        raise ValueError(f"target: axis {axis!r} has {len(spec)} shares, the classifier {len(classes)} classes")
    return [float(v) for v in spec], "given"


def prompt_groups(prompts: str, n: int) -> list[str]:
    """The group of each of `n` images from text: one line per image, or one line (or none) for all of them."""
    lines = [ln.strip() for ln in str(prompts or "").splitlines() if ln.strip()]
    if len(lines) <= 1:
        return [lines[0] if lines else "all images"] * n
    if len(lines) == n:
        return lines
    raise ValueError(f"prompts: {len(lines)} lines for {n} images; give one line per image or one line")


def group_shares(probs: np.ndarray, hard: bool) -> list[float]:
    """Class shares of one group's [n, K] probabilities: mean one-hot argmax (hard) or mean probability; 0 if n = 0."""
    k = probs.shape[1]
    if len(probs) == 0:
        return [0.0] * k
    q = np.eye(k)[probs.argmax(1)] if hard else probs
    return q.mean(0).round(6).tolist()


def batch_metrics(
    classify: Callable[[], list[dict]],
    n: int,
    axes: Mapping[str, Sequence[str]],
    axis: str,
    *,
    groups: list[str] | None = None,
    prompts: str = "",
    target: Mapping | None = None,
    hard: bool = True,
    label: str = "audit",
    classifier: dict | None = None,
) -> dict:
    """The metrics of `n` images (see the module docstring). The inputs are checked before ``classify()`` runs; it
    returns one row per image {"face": bool, "probs": {axis: [p...]}}. `groups`: the prompt group of each image
    (else from `prompts`, `prompt_groups`); `classifier`: its description {"name", ...} (named in errors)."""

    if axis not in axes:
        name = (classifier or {}).get("name")
        raise ValueError(f"axis: {axis!r} is not an axis of the {name} classifier; its axes: {list(axes)}")
    classes = list(axes[axis])
    groups = prompt_groups(prompts, n) if groups is None else groups
    tvec, tkind = target_vector(target, axis, tuple(classes))
    by_prompt: dict[str, list] = {g: [] for g in groups}
    for g, r in zip(groups, classify()):
        if r["face"] and axis in r["probs"]:
            by_prompt[g].append(r["probs"][axis])
    faces = sum(len(v) for v in by_prompt.values())
    probs = {g: np.asarray(v, dtype=float).reshape(-1, len(classes)) for g, v in by_prompt.items()}
    report = per_prompt_report(probs, tvec, hard=bool(hard), n_boot=500)
    return {
        "label": label,
        "axis": axis,
        "classes": classes,
        "target": tvec,
        "target_kind": tkind,
        "classifier": classifier,
        "images": n,
        "faces": faces,
        "face_rate": faces / n,
        "per_prompt_shares": {g: group_shares(p, bool(hard)) for g, p in probs.items()},
        "bias_pairwise": {g: (bias_pairwise(p.argmax(1), len(classes)) if len(p) else None) for g, p in probs.items()},
        "discrepancy": report,
    }


def chart_data(metrics: dict, node_id: Any) -> dict:
    """What the node's chart draws (the "popalign_chart" UI entry read by js/popalign.js)."""
    return {
        "node": str(node_id),
        "label": metrics["label"],
        "axis": metrics["axis"],
        "classes": metrics["classes"],
        "target": metrics["target"],
        "shares": metrics["per_prompt_shares"],
        "discrepancy": metrics["discrepancy"]["mean_over_prompts"].get("value"),
    }
