"""Distributional alignment loss (DAL, patent [0106] Eq. 6) on dynamic targets from expected optimal transport.

    from popalign_core.dal import dal_loss
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

__all__ = ["DALOutput", "dal_loss"]


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
    from .ot import expected_ot_targets, expected_ot_targets_axes

    c_min = _check_threshold(threshold)
    single = isinstance(logits, torch.Tensor)
    by_axis = {"_": logits} if single else dict(logits)
    if not by_axis:
        raise ValueError("logits: expected a tensor [N, K] or a non-empty {axis: [N, K_a]} mapping")
    n = next(iter(by_axis.values())).shape[0]
    for a, lg in by_axis.items():
        if lg.ndim != 2 or lg.shape[0] != n:
            raise ValueError(f"logits[{a!r}]: expected [N={n}, K], got shape {tuple(lg.shape)}")
    mask = np.ones(n, bool) if face is None else np.asarray(face, dtype=bool).reshape(-1)
    if mask.shape != (n,):
        raise ValueError(f"face: expected {n} booleans (one per image), got shape {mask.shape}")
    idx = np.flatnonzero(mask)
    nf = len(idx)
    probs = {a: lg.detach().float()[torch.as_tensor(idx)].softmax(-1).cpu().numpy().astype(np.float64)
             for a, lg in by_axis.items()}  # fmt: skip
    if nf == 0:
        q = {a: np.zeros((0, lg.shape[1])) for a, lg in by_axis.items()}
        y = {a: np.zeros(0, np.int64) for a in by_axis}
        c = {a: np.zeros(0) for a in by_axis}
    elif single:
        t = getattr(target, "probs", target)
        q1 = expected_ot_targets(probs["_"], t, method, seed=seed, draws=draws)
        q, y, c = {"_": q1}, {"_": q1.argmax(1)}, {"_": q1.max(1)}
    else:
        out = expected_ot_targets_axes(probs, target, mode, method, seed=seed, draws=draws)
        q = out["axes"]
        if mode == "joint":
            y, c = out["y"], {a: out["c_joint"] for a in by_axis}
        else:
            y, c = out["y"], out["c"]
    total = next(iter(by_axis.values())).new_zeros(())
    targets, confidence, used, metrics = {}, {}, {}, {"faces": float(nf), "images": float(n)}
    for a, lg in by_axis.items():
        ok = c[a] >= c_min if nf else np.zeros(0, bool)
        full_y, full_c, full_u = np.full(n, -1, np.int64), np.zeros(n), np.zeros(n, bool)
        full_y[idx], full_c[idx], full_u[idx] = y[a], c[a], ok
        targets[a], confidence[a], used[a] = full_y, full_c, full_u
        if ok.any():
            rows = torch.as_tensor(idx[ok], device=lg.device)
            ce = F.cross_entropy(lg[rows].float(), torch.as_tensor(y[a][ok], device=lg.device), reduction="sum")
            total = total + ce / nf
        name = "" if single else f"_{a}"
        metrics[f"confident{name}"] = float(ok.mean()) if nf else 0.0
    metrics["loss"] = float(total.detach())
    if single:
        targets, confidence, used, q = ({"axis": v["_"]} for v in (targets, confidence, used, q))
    return DALOutput(total, targets, confidence, used, q, metrics)
