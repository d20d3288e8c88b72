"""Bias metrics of a population of generated images, with bootstrap confidence intervals.

Definitions (see docs/metrics.md for the full discussion):

* discrepancy (PopAlign, Eq. 13, after Choi et al. [3]): f = || p_ref - mean_i p(u | x_i) ||_2 over a FIXED class
  set; probabilistic (classifier probabilities) or hard (one-hot argmax labels).
* discrepancy floor: E || p_ref - multinomial(n, p_ref) / n ||_2, the value a sampler that matches the target
  exactly still gets from n hard-labelled images (finite-sample bias of the metric).
* bias_pairwise (distributional-alignment patent / sail-sg/finetune-fair-diffusion): mean over class pairs i < j of
  |freq(i) - freq(j)|, freq = counts / N over detected faces (hard labels).
* recall (PopAlign Sec. 6.4): share of identity-specific images whose predicted class equals the prompted identity.
* ambiguity: share of faces whose top class probability is below a threshold; face_rate: share of images with a face.

Headline number: the MEAN OVER PROMPTS of per-prompt values, with a two-level bootstrap CI and the finite-sample
floor (`per_prompt_report`). The pooled value over all prompts lets opposite skews cancel and is reported only as
a flagged secondary number.

Arrays may be numpy arrays or torch tensors (converted to float64 numpy; torch is never imported here).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy.special import gammaln, xlogy

from popalign_core.common.attributes import PROB_ATOL, Target

ROW_ATOL = 1e-4  # tolerance of "each probability row sums to 1" (classifier outputs in float32)
EXACT_FLOOR_MAX_OUTCOMES = 200_000  # enumerate the multinomial exactly up to this many count vectors
POOLED_NOTE = "pooled (opposite skews cancel; not the headline number)"


# ------------------------------------------------------------------------------------------------ validation
def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_probs(probs: Any, arg: str = "probs", allow_empty: bool = False) -> np.ndarray:
    """[N, K] rows of class probabilities: finite, >= 0, each row summing to 1 within ROW_ATOL."""
    p = _np(probs).astype(np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"`{arg}` must be a 2-D array [N images, K classes]; got shape {p.shape}")
    if p.shape[0] == 0 and not allow_empty:
        raise ValueError(f"`{arg}` has no rows (no images / no detected faces): the metric is undefined")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        bad = np.argwhere(~np.isfinite(p) | (p < 0))[0]
        raise ValueError(f"`{arg}` must be finite and non-negative; got {float(p[tuple(bad)])!r} at row {bad[0]}")
    s = p.sum(axis=1)
    off = np.abs(s - 1.0) > ROW_ATOL
    if np.any(off):
        i = int(np.argmax(off))
        raise ValueError(f"`{arg}` rows must sum to 1 (within {ROW_ATOL:g}); row {i} sums to {s[i]:.6g}: {p[i]}")
    return p


def _check_target(target: Any, k: int | None = None) -> np.ndarray:
    """A target probability vector (array or `Target`), optionally of length k."""
    t = target.probs if isinstance(target, Target) else _np(target).astype(np.float64)
    if t.ndim != 1 or t.size < 1:
        raise ValueError(f"`target` must be a 1-D probability vector; got shape {t.shape}")
    if not np.all(np.isfinite(t)) or np.any(t < 0) or abs(t.sum() - 1.0) > PROB_ATOL:
        raise ValueError(f"`target` must be non-negative and sum to 1 (within {PROB_ATOL:g}); got {t.tolist()}")
    if k is not None and t.size != k:
        raise ValueError(f"`target` has {t.size} classes but `probs` has K={k} columns; they must match")
    return t


def _check_labels(labels: Any, num_classes: int, arg: str = "labels") -> np.ndarray:
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2; got {num_classes!r}")
    y = _np(labels)
    if y.ndim != 1:
        raise ValueError(f"`{arg}` must be a 1-D array of class indices; got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"`{arg}` must hold integer class indices; got dtype {y.dtype}")
    y = y.astype(np.int64)
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.size:
        raise ValueError(f"`{arg}` must lie in [0, {num_classes - 1}]; got {bad[0]}")
    return y


def _one_hot(p: np.ndarray) -> np.ndarray:
    return np.eye(p.shape[1])[p.argmax(axis=1)]


# ------------------------------------------------------------------------------------------------ metrics
def _disc(p: np.ndarray, t: np.ndarray) -> float:
    return float(np.linalg.norm(t - p.mean(axis=0)))


def discrepancy(probs: Any, target: Any, hard: bool = False) -> float:
    """PopAlign Eq. 13: || target - mean_i p_i ||_2 over a FIXED class set.

    probs: [N, K] class probabilities of N images (rows >= 0 summing to 1); target: [K] or a `Target` over the
    same classes. hard=True replaces each row by the one-hot of its argmax (the public code's hard labels).
    Range [0, sqrt(2)]. 0 = the mean prediction equals the target.
    """
    p = _check_probs(probs)
    t = _check_target(target, p.shape[1])
    return _disc(_one_hot(p) if hard else p, t)


def _compositions(n: int, k: int) -> np.ndarray:
    """All count vectors of k non-negative integers summing to n (stars and bars), [C(n+k-1, k-1), k]."""
    if k == 1:
        return np.array([[n]])
    bars = np.array(list(itertools.combinations(range(n + k - 1), k - 1)), dtype=np.int64)
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), n + k - 1)], axis=1)
    return np.diff(edges, axis=1) - 1


class Floor(NamedTuple):
    value: float
    se: float  # Monte-Carlo standard error (0.0 when exact)
    method: str  # "exact" or "monte-carlo"


def discrepancy_floor_detail(target: Any, n: int, draws: int = 20_000, seed: int = 0) -> Floor:
    """Expected hard-label discrepancy of a sampler that matches `target` exactly, at sample size `n`:
    E || target - c / n ||_2 with c ~ Multinomial(n, target).

    EXACT (sum over every count vector, multinomial pmf) when there are at most `EXACT_FLOOR_MAX_OUTCOMES` count
    vectors, C(n+K-1, K-1) (e.g. K=2 up to n ~ 2e5, K=7 up to n ~ 20); otherwise seeded Monte-Carlo with `draws`
    samples, returning its standard error.
    """
    t = _check_target(target)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"`n` must be a positive integer (number of images); got {n!r}")
    if not isinstance(draws, (int, np.integer)) or draws < 2:
        raise ValueError(f"`draws` must be an integer >= 2; got {draws!r}")
    k = t.size
    if math.comb(n + k - 1, k - 1) <= EXACT_FLOOR_MAX_OUTCOMES:
        c = _compositions(int(n), k)
        logpmf = gammaln(n + 1) - gammaln(c + 1).sum(axis=1) + xlogy(c, t).sum(axis=1)
        d = np.linalg.norm(t - c / n, axis=1)
        return Floor(float(np.sum(np.exp(logpmf) * d)), 0.0, "exact")
    rng = np.random.default_rng(seed)
    d = np.linalg.norm(t - rng.multinomial(n, t, size=draws) / n, axis=1)
    return Floor(float(d.mean()), float(d.std(ddof=1) / math.sqrt(draws)), "monte-carlo")


def discrepancy_floor(target: Any, n: int, draws: int = 20_000, seed: int = 0) -> float:
    """The finite-sample floor of the hard-label discrepancy (see `discrepancy_floor_detail`); ~ 1/sqrt(n)."""
    return discrepancy_floor_detail(target, n, draws, seed).value


def bias_pairwise(labels: Any, num_classes: int) -> float:
    """Distributional-alignment bias (patent "bias(", sail-sg code): mean over class pairs i < j of
    |freq(i) - freq(j)|, freq = counts / N over the N detected faces (hard labels in [0, num_classes)).
    Range [0, 1]: 0 = all classes equally frequent, 1 = (for K=2) a single class."""
    y = _check_labels(labels, num_classes)
    if y.size == 0:
        raise ValueError("`labels` is empty (no detected faces): the bias is undefined")
    f = np.bincount(y, minlength=num_classes) / y.size
    i, j = np.triu_indices(num_classes, k=1)
    return float(np.abs(f[i] - f[j]).mean())


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v == "") or (isinstance(v, (int, np.integer)) and v < 0)


def recall(pred_labels: Any, true_labels: Any) -> float:
    """PopAlign Sec. 6.4: share of images whose predicted class EQUALS the identity recorded for the image (exact
    equality of class indices or class names, never substring matching: "male" does not match "female").

    Images with no recorded identity (None, "" or a negative index in `true_labels`) are excluded. A missing
    prediction (no face: None / "" / negative index) counts as a miss. Range [0, 1].
    """
    pred, true = list(_np(pred_labels).tolist()), list(_np(true_labels).tolist())
    if len(pred) != len(true):
        raise ValueError(f"`pred_labels` ({len(pred)}) and `true_labels` ({len(true)}) must have the same length")
    pairs = [(p, t) for p, t in zip(pred, true) if not _missing(t)]
    if not pairs:
        raise ValueError("`true_labels` records no identity for any image: recall is undefined")
    return float(np.mean([(not _missing(p)) and p == t for p, t in pairs]))


def ambiguity(probs: Any, threshold: float = 0.6) -> float:
    """Share of faces whose top class probability is below `threshold` (uncertain classifications). Range [0, 1]."""
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"`threshold` must be in (0, 1]; got {threshold!r}")
    p = _check_probs(probs)
    return float(np.mean(p.max(axis=1) < threshold))


def face_rate(found: Any) -> float:
    """Share of images in which a face was detected (`found`: bool array). Range [0, 1]."""
    f = _np(found)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"`found` must be a non-empty 1-D bool array; got shape {f.shape}")
    if f.dtype != np.bool_:
        raise ValueError(f"`found` must be a bool array; got dtype {f.dtype}")
    return float(f.mean())


def clip_score(image_embeds: Any, text_embeds: Any, w: float = 100.0) -> float:
    """CLIPScore (Hessel et al. 2021, Eq. 1): mean over images i of w * max(cos(E_img_i, E_text_i), 0).

    image_embeds, text_embeds: [N, D] rows paired (image i was made from text i); a single text row [1, D] or
    [D] is broadcast to every image. Embeddings need not be normalised. w = 100 as in torchmetrics'
    ``CLIPScore`` (the paper uses w = 2.5). Range [0, w]; higher = better prompt-image alignment.
    """
    img, txt = _np(image_embeds).astype(np.float64), _np(text_embeds).astype(np.float64)
    if img.ndim != 2 or img.shape[0] == 0:
        raise ValueError(f"`image_embeds` must be a non-empty [N, D] array; got shape {img.shape}")
    if txt.ndim == 1:
        txt = txt[None]
    if txt.ndim != 2 or txt.shape[1] != img.shape[1] or txt.shape[0] not in (1, img.shape[0]):
        raise ValueError(
            f"`text_embeds` must be [N, D] or [1, D] matching `image_embeds` {img.shape}; got {txt.shape}"
        )
    if not (np.isfinite(img).all() and np.isfinite(txt).all()):
        raise ValueError("`image_embeds` / `text_embeds` contain NaN or inf")
    if not float(w) > 0:
        raise ValueError(f"`w` must be > 0; got {w!r}")
    ni, nt = np.linalg.norm(img, axis=1), np.linalg.norm(txt, axis=1)
    if (ni == 0).any() or (nt == 0).any():
        raise ValueError("`image_embeds` / `text_embeds` contain an all-zero row (cosine undefined)")
    cos = (img / ni[:, None] * (txt / nt[:, None])).sum(axis=1)
    return float(np.mean(float(w) * np.maximum(cos, 0.0)))


def _discrepancy_hard(probs: Any, target: Any) -> float:
    return discrepancy(probs, target, hard=True)


@dataclass(frozen=True)
class MetricSpec:
    """A registry entry: the function, the keyword inputs it needs, its value range and a one-line definition."""

    fn: Callable[..., float]
    needs: tuple[str, ...]
    range: tuple[float, float]
    definition: str


# name -> spec; keys feed CLI choices / UI dropdowns. Call as spec.fn(**{k: data[k] for k in spec.needs}).
METRICS: dict[str, MetricSpec] = {
    "discrepancy": MetricSpec(
        discrepancy,
        ("probs", "target"),
        (0.0, math.sqrt(2.0)),
        "|| target - mean_i p(u|x_i) ||_2 on classifier probabilities, fixed class set (PopAlign Eq. 13)",
    ),
    "discrepancy_hard": MetricSpec(
        _discrepancy_hard,
        ("probs", "target"),
        (0.0, math.sqrt(2.0)),
        "PopAlign Eq. 13 on one-hot argmax labels (as the public PopAlign evaluation)",
    ),
    "bias_pairwise": MetricSpec(
        bias_pairwise,
        ("labels", "num_classes"),
        (0.0, 1.0),
        "mean over class pairs i<j of |freq(i) - freq(j)| over detected faces (distributional-alignment patent)",
    ),
    "recall": MetricSpec(
        recall,
        ("pred_labels", "true_labels"),
        (0.0, 1.0),
        "share of identity-specific images classified as the prompted identity (PopAlign Sec. 6.4)",
    ),
    "ambiguity": MetricSpec(
        ambiguity, ("probs",), (0.0, 1.0), "share of faces whose top class probability is below 0.6"
    ),
    "face_rate": MetricSpec(face_rate, ("found",), (0.0, 1.0), "share of images with a detected face"),
    "clip_score": MetricSpec(
        clip_score,
        ("image_embeds", "text_embeds"),
        (0.0, 100.0),
        "mean of 100 * max(cos(CLIP image, CLIP prompt), 0) over images (CLIPScore, Hessel et al. 2021)",
    ),
}


# ------------------------------------------------------------------------------------------------ bootstrap
class CI(NamedTuple):
    value: float  # the metric on the original data
    low: float
    high: float
    level: float
    n_boot: int
    method: str  # "within" or "two-level"


def bootstrap_ci(
    metric_fn: Callable[[Any], float],
    groups: Any,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    two_level: bool = False,
) -> CI:
    """Percentile bootstrap confidence interval of `metric_fn` over images grouped by prompt.

    groups: a single array (one group; `metric_fn` then receives one array) or a list / dict of arrays, one per
    prompt, rows = images (`metric_fn` then receives a list of arrays in the same order).
    * within (default): each replicate resamples, in every group g, n_g rows with replacement; the set of prompts is
      fixed. Use it for a per-prompt value or for statistics conditional on the prompt list.
    * two_level=True: each replicate first draws G prompts with replacement from the G prompts, then n_g rows with
      replacement within each drawn group. Use it for a mean over prompts, the prompts being a sample of a prompt
      population (between-prompt variation widens the interval).
    The interval is [q_{(1-level)/2}, q_{(1+level)/2}] of the replicate values (numpy "linear" quantiles). Seeded
    with numpy `default_rng(seed)`: deterministic for a given seed and input.
    """
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 10:
        raise ValueError(f"`n_boot` must be an integer >= 10; got {n_boot!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"`level` must be in (0, 1); got {level!r}")
    single = not isinstance(groups, (Mapping, list, tuple))
    gs = [groups] if single else list(groups.values() if isinstance(groups, Mapping) else groups)
    gs = [_np(g) for g in gs]
    if not gs:
        raise ValueError("`groups` is empty: nothing to bootstrap")
    empty = [i for i, g in enumerate(gs) if len(g) == 0]
    if empty:
        raise ValueError(f"`groups` has empty group(s) at position(s) {empty}; drop them first")
    if single and two_level:
        raise ValueError("`two_level=True` needs several groups (a list or dict of arrays); got a single array")

    def call(sample: list[np.ndarray]) -> float:
        return float(metric_fn(sample[0] if single else sample))

    value = call(gs)
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        chosen = rng.integers(0, len(gs), size=len(gs)) if two_level else range(len(gs))
        reps[b] = call([gs[g][rng.integers(0, len(gs[g]), size=len(gs[g]))] for g in chosen])
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [a, 1.0 - a])
    return CI(value, float(lo), float(hi), float(level), int(n_boot), "two-level" if two_level else "within")


# ------------------------------------------------------------------------------------------------ report
def per_prompt_report(
    probs_by_prompt: Mapping[str, Any],
    target: Any,
    hard: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    floor_draws: int = 20_000,
) -> dict[str, Any]:
    """Discrepancy (Eq. 13) per prompt, the mean over prompts (HEADLINE) and the pooled value (flagged).

    probs_by_prompt: prompt -> [n, K] class probabilities of that prompt's images with a detected face (n may be 0).
    Returns a JSON-ready dict:
    * "per_prompt": prompt -> {"n", "value", "ci": [low, high] (within-prompt bootstrap), "floor"} or, for a prompt
      without faces, {"n": 0, "value": None, "ci": None, "floor": None, "reason": ...};
    * "mean_over_prompts": mean of the per-prompt values over prompts with faces, "ci" from the two-level bootstrap,
      "floor" = mean of the per-prompt floors (a target-matching sampler's expected value at the same n's);
    * "pooled": Eq. 13 on all images together, with `POOLED_NOTE` (opposite skews cancel; not the headline).
    The floor is the hard-label one (for probabilistic labels it is a reference: soft, uncertain classifier outputs
    shrink the spread). Seeds are derived from `seed` and the prompt order, so the report is deterministic.
    """
    if not isinstance(probs_by_prompt, Mapping) or not probs_by_prompt:
        raise ValueError(
            f"`probs_by_prompt` must be a non-empty dict prompt -> [n, K] probabilities; got "
            f"{type(probs_by_prompt).__name__}"
        )
    t = _check_target(target)
    k = t.size
    groups: dict[str, np.ndarray] = {}
    per: dict[str, dict[str, Any]] = {}
    for name, probs in probs_by_prompt.items():
        arr = _np(probs)
        arr = arr.reshape(0, k) if arr.size == 0 else arr  # [] or [0, K]: a prompt without faces
        p = _check_probs(arr, f"probs_by_prompt[{name!r}]", allow_empty=True)
        if p.shape[1] != k:
            raise ValueError(f"`probs_by_prompt[{name!r}]` has K={p.shape[1]} columns but `target` has {k}")
        if p.shape[0] == 0:
            per[name] = {"n": 0, "value": None, "ci": None, "floor": None, "reason": "no images with a detected face"}
            continue
        groups[name] = _one_hot(p) if hard else p

    def fn(x: np.ndarray) -> float:
        return _disc(x, t)

    for i, (name, p) in enumerate(groups.items()):
        ci = bootstrap_ci(fn, p, n_boot=n_boot, seed=seed + i, level=level)
        fl = discrepancy_floor_detail(t, len(p), draws=floor_draws, seed=seed + i)
        per[name] = {
            "n": len(p),
            "value": ci.value,
            "ci": [ci.low, ci.high],
            "floor": fl.value,
            "floor_se": fl.se,
            "floor_method": fl.method,
        }
    per = {name: per[name] for name in probs_by_prompt}  # input order
    report: dict[str, Any] = {
        "metric": "discrepancy_hard" if hard else "discrepancy",
        "definition": METRICS["discrepancy_hard" if hard else "discrepancy"].definition,
        "target": t.tolist(),
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
        "per_prompt": per,
        "skipped": [name for name, r in per.items() if r["value"] is None],
    }
    if not groups:
        reason = "no prompt has an image with a detected face"
        report["mean_over_prompts"] = {"value": None, "ci": None, "floor": None, "n_prompts": 0, "reason": reason}
        report["pooled"] = {"value": None, "n": 0, "note": POOLED_NOTE, "reason": reason}
        return report
    gl = list(groups.values())
    if len(gl) >= 2:
        ci = bootstrap_ci(lambda s: float(np.mean([_disc(x, t) for x in s])), gl, n_boot, seed, level, two_level=True)
        mci = [ci.low, ci.high]
    else:
        mci = per[next(iter(groups))]["ci"]
    floors = [per[name]["floor"] for name in groups]
    report["mean_over_prompts"] = {
        "value": float(np.mean([per[name]["value"] for name in groups])),
        "ci": mci,
        "ci_method": "two-level" if len(gl) >= 2 else "within (one prompt)",
        "floor": float(np.mean(floors)),
        "n_prompts": len(gl),
        "note": "headline: mean over prompts of per-prompt values",
    }
    pooled = np.concatenate(gl)
    report["pooled"] = {"value": _disc(pooled, t), "n": len(pooled), "note": POOLED_NOTE}
    return report
