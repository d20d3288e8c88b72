"""Distributional alignment loss (DAL, patent [0106] Eq. 6) on dynamic targets from expected optimal transport.

    from popalign_core.dal.loss import dal_loss
    out = dal_loss(logits, [0.5, 0.5], threshold=0.8, seed=step)               # one axis: logits [N, K]
    out = dal_loss({"gender": lg, "age": la}, target, face=has_face, seed=step) # several axes: attributes.Target
    out.loss.backward()

    L_align = 1/N * sum_i 1[c_i >= C] * CE(h(x_i), y_i)        (Eq. 6)

h(x_i) are the differentiable classifier logits of image i's face crop; (y_i, c_i) come from
`ot.expected_ot_targets` on the *detached* class probabilities softmax(h(x_i)) (no gradient through the targets).
Images without a face (`face` False) are excluded from the transport and from the sum, and N counts the images
that enter the transport (the faces), including those below the threshold: dividing by N, as the patent writes,
and not by the number of confident targets, keeps the loss small when few targets are confident. With several axes
the per-axis losses are summed; targets come from `ot.expected_ot_targets_axes` (`mode="per_axis"` by default, whose
per-axis confidences pass the threshold; `"joint"` thresholds max q over the joint classes, applied to every axis).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from popalign_core.dal.ot import expected_ot_targets, expected_ot_targets_axes

__all__ = ["DALOutput", "DALTargets", "dal_loss", "dal_targets"]


@dataclass
class DALOutput:
    """loss: scalar tensor; targets / confidence / used: per axis (key "axis" for one axis), [N] arrays over ALL
    images (-1 / 0 / False for images without a face); q: per axis [N_faces, K]; metrics: floats for logging."""

    loss: torch.Tensor
    targets: dict[str, np.ndarray]
    confidence: dict[str, np.ndarray]
    used: dict[str, np.ndarray]
    q: dict[str, np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)


def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < float(threshold) <= 1:
        raise ValueError(f"threshold: expected a confidence threshold C in (0, 1], got {threshold!r}")
    return float(threshold)


@dataclass
class DALTargets:
    """Dynamic targets of a batch: per axis (key "axis" for one axis) [N] arrays over ALL images: target class
    (-1 without a face), confidence (0 without a face), used (confidence >= threshold); q per axis [N_faces, K];
    face: the [N] mask that entered the transport."""

    targets: dict[str, np.ndarray]
    confidence: dict[str, np.ndarray]
    used: dict[str, np.ndarray]
    q: dict[str, np.ndarray]
    face: np.ndarray


def dal_targets(
    probs: Any,
    target: Any,
    *,
    threshold: float = 0.8,
    face: Any = None,
    method: str = "exact",
    mode: str = "per_axis",
    seed: int = 0,
    draws: int = 256,
) -> DALTargets:
    """(y_i, c_i) of patent [0106] from class probabilities: probs [N, K] (one axis, `target` a [K] vector or a
    one-axis Target) or {axis: [N, K_a]} (`target` an `attributes.Target` over those axes). Images without a face
    are left out of the transport. Used by `dal_loss` and by the DAL trainer, which computes the targets of a whole
    batch once and the loss in micro-batches."""

    c_min = _check_threshold(threshold)
    single = not isinstance(probs, Mapping)
    by_axis = (
        {"axis": np.asarray(probs, np.float64)} if single else {a: np.asarray(p, np.float64) for a, p in probs.items()}
    )
    if not by_axis:
        raise ValueError("probs: expected an array [N, K] or a non-empty {axis: [N, K_a]} mapping")
    n = next(iter(by_axis.values())).shape[0]
    for a, p in by_axis.items():
        if p.ndim != 2 or p.shape[0] != n:
            raise ValueError(f"probs[{a!r}]: expected [N={n}, K], got shape {p.shape}")
    mask = np.ones(n, bool) if face is None else np.asarray(face, dtype=bool).reshape(-1)
    if mask.shape != (n,):
        raise ValueError(f"face: expected {n} booleans (one per image), got shape {mask.shape}")
    idx = np.flatnonzero(mask)
    nf = len(idx)
    sub = {a: p[idx] for a, p in by_axis.items()}
    if nf == 0:
        q = {a: np.zeros((0, p.shape[1])) for a, p in by_axis.items()}
        y = {a: np.zeros(0, np.int64) for a in by_axis}
        c = {a: np.zeros(0) for a in by_axis}
    elif single:
        q1 = expected_ot_targets(sub["axis"], getattr(target, "probs", target), method, seed=seed, draws=draws)
        q, y, c = {"axis": q1}, {"axis": q1.argmax(1)}, {"axis": q1.max(1)}
    else:
        out = expected_ot_targets_axes(sub, target, mode, method, seed=seed, draws=draws)
        q = out["axes"]
        y = out["y"]
        c = {a: out["c_joint"] for a in by_axis} if mode == "joint" else out["c"]
    targets, confidence, used = {}, {}, {}
    for a in by_axis:
        full_y, full_c = np.full(n, -1, np.int64), np.zeros(n)
        full_y[idx], full_c[idx] = y[a], c[a]
        targets[a], confidence[a], used[a] = full_y, full_c, mask & (full_c >= c_min)
    return DALTargets(targets, confidence, used, q, mask)


def dal_loss(
    logits: torch.Tensor | Mapping[str, torch.Tensor],
    target: Any,
    *,
    threshold: float = 0.8,
    face: Any = None,
    method: str = "exact",
    mode: str = "per_axis",
    seed: int = 0,
    draws: int = 256,
) -> DALOutput:
    """DAL of Eq. 6 (module docstring). logits: [N, K] for one axis with `target` a [K] vector (or a one-axis
    Target), or {axis: [N, K_a]} with `target` an `attributes.Target` over those axes. face: bool [N] (default: all
    True). method / draws / seed: `ot.expected_ot_targets`; mode: `ot.MODES` (several axes)."""
    c_min = _check_threshold(threshold)
    single = isinstance(logits, torch.Tensor)
    by_axis = {"_": logits} if single else dict(logits)
    if not by_axis:
        raise ValueError("logits: expected a tensor [N, K] or a non-empty {axis: [N, K_a]} mapping")
    n = next(iter(by_axis.values())).shape[0]
    for a, lg in by_axis.items():
        if lg.ndim != 2 or lg.shape[0] != n:
            raise ValueError(f"logits[{a!r}]: expected [N={n}, K], got shape {tuple(lg.shape)}")
    probs = {a: lg.detach().float().softmax(-1).cpu().numpy().astype(np.float64) for a, lg in by_axis.items()}
    t = dal_targets(probs if not single else probs["_"], target, threshold=c_min, face=face, method=method,
                    mode=mode, seed=seed, draws=draws)  # fmt: skip
    key = {"_": "axis"} if single else {a: a for a in by_axis}
    nf = int(t.face.sum())
    total = next(iter(by_axis.values())).new_zeros(())
    metrics = {"faces": float(nf), "images": float(n)}
    for a, lg in by_axis.items():
        ok = t.used[key[a]]
        if ok.any():
            rows = torch.as_tensor(np.flatnonzero(ok), device=lg.device)
            y = torch.as_tensor(t.targets[key[a]][ok], device=lg.device)
            total = total + F.cross_entropy(lg[rows].float(), y, reduction="sum") / nf
        name = "" if single else f"_{a}"
        metrics[f"confident{name}"] = float(ok.sum() / nf) if nf else 0.0
    metrics["loss"] = float(total.detach())
    targets, confidence, used, q = t.targets, t.confidence, t.used, t.q
    return DALOutput(total, targets, confidence, used, q, metrics)
