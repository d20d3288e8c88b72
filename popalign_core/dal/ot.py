"""Dynamic targets by expected optimal transport (distributional alignment; patent [0105]-[0106]).

    from popalign_core.dal.ot import expected_ot_targets, dynamic_targets
    q = expected_ot_targets(probs, target, method="exact")      # probs [N, K], target [K] -> q [N, K], rows sum to 1
    y, c = dynamic_targets(q)                                   # target class and confidence per image

For N images with class-probability vectors p_i and a target distribution D over K classes (patent [0105]):

    sigma* = argmin_{sigma in S_N} sum_i || p_i - u_{sigma_i} ||_2,  u_1..u_N iid ~ D (one-hot),
    q_i    = E_{u ~ D^N} [ u_{sigma*_i} ],      y_i = argmax q_i,  c_i = max q_i   ([0106]).

The assignment depends on the draw only through its class counts n ~ Multinomial(N, D): given n, sigma* is the
optimal transport of the N images to a multiset with n_k copies of class k (a transportation problem), so
q_i = sum_n P(n) * onehot(class assigned to i | n).

Methods (`METHODS`):
- ``exact``: K = 2 in closed form (cost ||p - e_0|| = sqrt(2)(1 - p_0) is linear in p_0, so class 0 goes to the
  n_0 images with the largest p_0: q_i0 = P(Binomial(N, D_0) >= rank_i)); otherwise every count vector is
  enumerated (C(N+K-1, K-1) of them; refused above `max_count_vectors`) and solved exactly;
- ``monte_carlo``: `draws` iid target draws, each solved as the patent writes it (an N x N assignment,
  `scipy.optimize.linear_sum_assignment`); returns the standard error of every q entry (`return_se=True`);
- ``fast``: the same estimator for large N: the drawn count vectors are sorted and deduplicated; the first is
  solved by the N x N assignment, every next one warm-started from the previous solution by moving the few units
  that differ along cheapest chains of single-image moves between the K classes (successive shortest paths of
  min-cost flow, O(N K) per unit). The same assignments, hence the same q and errors, as ``monte_carlo`` with the
  same seed, at a fraction of the time once N is in the hundreds.

Ties (a saturated classifier gives identical p_i) make sigma* non-unique; the public code breaks them by batch
position, which biases which image gets which target. Here they are broken by a random permutation of the batch
drawn from `seed` and fixed for the call (pass a per-step seed during training): among images with equal p, the one
later in that permutation gets the lower class index. All methods break ties the same way, so they agree.

Mind the public K = 2 code: its `target_ratio` is the share of class 0 although its docstring says class 1. Here the
target is always the full vector [K].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from popalign_core.common.attributes import Target

__all__ = ["METHODS", "MODES", "dynamic_targets", "expected_ot_targets", "expected_ot_targets_axes"]

METHODS: dict[str, str] = {
    "exact": "closed form for K = 2, enumeration of the count vectors otherwise",
    "monte_carlo": "iid target draws, each an N x N assignment; reports standard errors",
    "fast": "the same draws, sorted, deduplicated and warm-started by shortest paths over the K classes (large N)",
}
_TIE_EPS = 1e-9


def _check(probs: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 2:
        raise ValueError(f"probs: expected an array [N, K] with N >= 1 and K >= 2, got shape {p.shape}")
    if not np.isfinite(p).all() or (p < -1e-9).any():
        raise ValueError("probs: every entry must be a finite number >= 0")
    if np.abs(p.sum(1) - 1).max() > 1e-4:
        row = int(np.abs(p.sum(1) - 1).argmax())
        raise ValueError(f"probs: rows must sum to 1; row {row} sums to {p[row].sum():.6f}")
    t = np.asarray(target, dtype=np.float64)
    if t.shape != (p.shape[1],):
        raise ValueError(f"target: expected {p.shape[1]} class probabilities (one per column of probs), got {t.shape}")
    if not np.isfinite(t).all() or (t < 0).any() or abs(t.sum() - 1) > 1e-6:
        raise ValueError(f"target: must be >= 0 and sum to 1; got {t.tolist()} (sum {t.sum():.6f})")
    return p, t


def _l2_costs(p: np.ndarray) -> np.ndarray:
    """[N, K] costs ||p_i - e_k||_2."""
    return np.linalg.norm(p[:, None, :] - np.eye(p.shape[1])[None, :, :], axis=2)


def _perturb(c: np.ndarray, seed: int) -> np.ndarray:
    """Costs plus the seeded tie-breaking perturbation eps * rank_i * k (rank_i: position in a seeded permutation)."""
    n, k = c.shape
    rank = np.empty(n)
    rank[np.random.default_rng(seed).permutation(n)] = np.arange(n)
    return c + _TIE_EPS * rank[:, None] * np.arange(k)[None, :] / max(n * k, 1)


def _costs(p: np.ndarray, seed: int) -> np.ndarray:
    return _perturb(_l2_costs(p), seed)


def _assign_counts(cost: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Class of each image in the optimal transport to `counts` (N x N assignment over expanded columns)."""
    from scipy.optimize import linear_sum_assignment

    cols = np.repeat(np.arange(cost.shape[1]), counts)
    rows, which = linear_sum_assignment(cost[:, cols])
    out = np.empty(cost.shape[0], dtype=np.int64)
    out[rows] = cols[which]
    return out


def _class_graph(cost: np.ndarray, assign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w[a, b]: the cheapest move of one image from class a to class b (cost[j, b] - cost[j, a]); who[a, b]: j."""
    k = cost.shape[1]
    delta = cost - cost[np.arange(len(assign)), assign][:, None]
    w = np.full((k, k), np.inf)
    who = np.full((k, k), -1, dtype=np.int64)
    for a in range(k):
        sel = np.flatnonzero(assign == a)
        if len(sel):
            arg = delta[sel].argmin(0)
            w[a], who[a] = delta[sel][arg, np.arange(k)], sel[arg]
    return w, who


def _reassign(cost: np.ndarray, assign: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Warm start: the optimal transport for `counts` from the optimal `assign` of other counts. Each unit moves
    from a class with a surplus to one with a deficit along the cheapest chain of single-image moves (Bellman-Ford
    over the K classes, from all surplus classes at once): successive shortest paths of min-cost flow, so the
    result stays optimal."""
    k = cost.shape[1]
    assign = assign.copy()
    cur = np.bincount(assign, minlength=k)
    while (cur != counts).any():
        w, who = _class_graph(cost, assign)
        surplus, deficit = cur > counts, cur < counts
        dist = np.where(surplus, 0.0, np.inf)
        prev = np.full(k, -1, dtype=np.int64)
        for _ in range(k):
            cand = dist[:, None] + w
            best = cand.argmin(0)
            val = cand[best, np.arange(k)]
            better = val < dist - 1e-15
            if not better.any():
                break
            dist, prev = np.where(better, val, dist), np.where(better, best, prev)
        end = int(np.flatnonzero(deficit)[dist[deficit].argmin()])
        b = end
        while prev[b] != -1:
            a = int(prev[b])
            assign[who[a, b]] = b
            b = a
        cur[b] -= 1
        cur[end] += 1
    return assign


def _fast_solutions(cost: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Assignments [draws, N] for every count vector: identical vectors solved once; vectors sorted so that each is
    reached from the previous one by a few warm-started moves (the first solved by the N x N assignment)."""
    uniq, inverse = np.unique(counts, axis=0, return_inverse=True)
    sols = np.empty((len(uniq), cost.shape[0]), dtype=np.int64)
    sols[0] = _assign_counts(cost, uniq[0])
    for u in range(1, len(uniq)):
        sols[u] = _reassign(cost, sols[u - 1], uniq[u])
    return sols[np.asarray(inverse).ravel()]


def _exact_k2(cost: np.ndarray, t: np.ndarray) -> np.ndarray:
    from scipy.stats import binom

    n = cost.shape[0]
    # class 0 goes to the n_0 images with the lowest cost difference c_i0 - c_i1 (ties by the permutation)
    order = np.argsort(cost[:, 0] - cost[:, 1], kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    q0 = binom.sf(rank - 1, n, t[0])  # P(n_0 >= rank)
    return np.stack([q0, 1 - q0], axis=1)


def check_exact_size(n: int, k: int, max_count_vectors: int = 20_000) -> None:
    """Refuse `method='exact'` where it would enumerate more than `max_count_vectors` count vectors
    (C(N+K-1, K-1) for N images over K classes; K = 2 has a closed form and is always allowed)."""
    total = math.comb(n + k - 1, k - 1)
    if k > 2 and total > max_count_vectors:
        raise ValueError(f"method='exact' would solve {total} count vectors for N={n}, K={k} (max_count_vectors="
                         f"{max_count_vectors}); use method='fast' or 'monte_carlo'")  # fmt: skip


def _expected(cost: np.ndarray, t: np.ndarray, method: str, draws: int, seed: int, max_count_vectors: int,
              closed_form_k2: bool) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    n, k = cost.shape
    eye = np.eye(k)
    se = np.zeros((n, k))
    if method == "exact":
        if k == 2 and closed_form_k2:
            q = _exact_k2(cost, t)
        else:
            check_exact_size(n, k, max_count_vectors)
            from scipy.special import gammaln, xlogy

            from popalign_core.evaluate.metrics import _compositions

            comps = _compositions(n, k)
            pmf = np.exp(gammaln(n + 1) - gammaln(comps + 1).sum(1) + xlogy(comps, t).sum(1))
            q = np.zeros((n, k))
            for c, w in zip(comps, pmf):
                if w > 0:
                    q += w * eye[_assign_counts(cost, c)]
    else:
        rng = np.random.default_rng([seed, 1])
        counts = rng.multinomial(n, t, size=draws)
        if method == "fast":
            samples = eye[_fast_solutions(cost, counts)]
        else:
            samples = np.stack([eye[_assign_counts(cost, c)] for c in counts])
        q = samples.mean(0)
        se = samples.std(0, ddof=1) / math.sqrt(draws)
    return q / q.sum(1, keepdims=True), se


def _check_method(method: str, draws: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a known method; valid values: {', '.join(METHODS)}")
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 2:
        raise ValueError(f"draws: expected an int >= 2, got {draws!r}")


def expected_ot_targets(
    probs: Any,
    target: Any,
    method: str = "exact",
    *,
    draws: int = 256,
    seed: int = 0,
    max_count_vectors: int = 20_000,
    return_se: bool = False,
):
    """q [N, K] (rows sum to 1): the expected optimal-transport target of every image (module docstring).

    probs: [N, K] class probabilities; target: [K] target distribution D. method: a key of `METHODS`. draws: target
    draws of the Monte-Carlo methods. seed: the tie-breaking permutation and the draws. return_se: also return the
    standard error of each entry ([N, K]; zeros for "exact")."""
    _check_method(method, draws)
    p, t = _check(probs, target)
    q, se = _expected(_costs(p, seed), t, method, draws, seed, max_count_vectors, closed_form_k2=True)
    return (q, se) if return_se else q


MODES = {
    "per_axis": "cost = sum over axes of ||p_i^a - e_(k_a)||_2; per-axis targets from the marginals of q (default)",
    "joint": "one axis of K = product of the axis sizes: cost ||p_i - e_k||_2 on the joint probabilities",
}


def expected_ot_targets_axes(
    probs: Mapping[str, Any],
    target,
    mode: str = "per_axis",
    method: str = "fast",
    *,
    draws: int = 256,
    seed: int = 0,
    max_count_vectors: int = 20_000,
) -> dict[str, Any]:
    """Several axes at once. probs: {axis: [N, K_a]} (the classifier's per-axis probabilities); target: an
    `attributes.Target` over those axes (per-axis, joint or conditional: always a joint distribution D, row-major).

    Targets u are drawn from the joint D. ``per_axis`` (default, as the public age experiment): the cost of joint
    class (k_1, ..., k_A) is the sum over axes of ||p_i^a - e_(k_a)||_2; ``joint``: the joint probability
    p_i = prod_a p_i^a (axes independent given the image) against the joint one-hots. Returns {"q": [N, prod K_a]
    joint, "axes": {axis: q^a [N, K_a] (marginals of q)}, "y": {axis: argmax q^a}, "c": {axis: max q^a},
    "y_joint", "c_joint"}. With max over a large joint K rarely passing a confidence threshold, per-axis
    confidences are what the DAL threshold uses by default."""

    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a known mode; valid values: {', '.join(MODES)}")
    _check_method(method, draws)
    if not isinstance(target, Target):
        raise ValueError(f"target: expected an attributes.Target over the axes, got {type(target).__name__}")
    names = target.axis_names
    if set(probs) != set(names):
        raise ValueError(f"probs: expected one array per target axis {list(names)}, got {sorted(probs)}")
    ps = []
    for a, ax in zip(names, target.axes):
        p, _ = _check(probs[a], np.full(ax.size, 1.0 / ax.size))
        if p.shape[1] != ax.size:
            raise ValueError(f"probs[{a!r}]: expected {ax.size} classes {list(ax.classes)}, got {p.shape[1]}")
        ps.append(p)
    n = ps[0].shape[0]
    if any(p.shape[0] != n for p in ps):
        raise ValueError(f"probs: every axis needs the same number of images; got {[p.shape[0] for p in ps]}")
    shape = target.shape
    if mode == "joint":
        pj = ps[0]
        for p in ps[1:]:
            pj = (pj[:, :, None] * p[:, None, :]).reshape(n, -1)
        base = _l2_costs(pj)
    else:
        base = np.zeros((n, int(np.prod(shape))))
        grids = np.meshgrid(*[np.arange(sz) for sz in shape], indexing="ij")
        for a, p in enumerate(ps):
            base += _l2_costs(p)[:, grids[a].reshape(-1)]
    q, _ = _expected(_perturb(base, seed), target.probs, method, draws, seed, max_count_vectors,
                     closed_form_k2=True)  # fmt: skip
    table = q.reshape((n, *shape))
    axes_q = {}
    for a, name in enumerate(names):
        other = tuple(1 + b for b in range(len(names)) if b != a)
        axes_q[name] = table.sum(axis=other) if other else table
    y_j, c_j = dynamic_targets(q)
    return {
        "q": q,
        "axes": axes_q,
        "y": {k: v.argmax(1) for k, v in axes_q.items()},
        "c": {k: v.max(1) for k, v in axes_q.items()},
        "y_joint": y_j,
        "c_joint": c_j,
        "mode": mode,
        "classes": target.classes,
    }


def dynamic_targets(q: Any) -> tuple[np.ndarray, np.ndarray]:
    """(y, c): target class argmax q_i and confidence max q_i per image (patent [0106])."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2:
        raise ValueError(f"q: expected [N, K], got shape {q.shape}")
    return q.argmax(1), q.max(1)
