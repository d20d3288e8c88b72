"""Expected optimal-transport targets (ot.py) against brute force, by hand, and on marginals."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from popalign_core.dal.ot import METHODS, _costs, dynamic_targets, expected_ot_targets


def brute_force(p: np.ndarray, t: np.ndarray, seed: int = 0, cost: np.ndarray | None = None) -> np.ndarray:
    """Enumerate every target sequence u in [K]^N and every permutation (the patent's definition, with the same
    seeded tie-breaking costs; `cost` replaces the L2 costs of `p`)."""
    n, k = p.shape if cost is None else cost.shape
    cost = _costs(p, seed) if cost is None else cost
    q = np.zeros((n, k))
    for u in itertools.product(range(k), repeat=n):
        w = math.prod(t[c] for c in u)
        if w == 0:
            continue
        best = min(itertools.permutations(range(n)), key=lambda s: sum(cost[i, u[s[i]]] for i in range(n)))
        for i in range(n):
            q[i, u[best[i]]] += w
    return q


def _probs(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(k), size=n)


@pytest.mark.parametrize(("n", "k", "target"), [(4, 2, [0.5, 0.5]), (5, 2, [0.75, 0.25]), (4, 3, [0.2, 0.5, 0.3]),
                                                (3, 4, [0.25, 0.25, 0.25, 0.25])])  # fmt: skip
def test_exact_matches_brute_force(n, k, target):
    p, t = _probs(n, k, n * 10 + k), np.asarray(target)
    np.testing.assert_allclose(expected_ot_targets(p, t, "exact"), brute_force(p, t), atol=1e-12)


@pytest.mark.parametrize("method", ["monte_carlo", "fast"])
@pytest.mark.parametrize(("n", "k"), [(5, 2), (4, 3)])
def test_monte_carlo_methods_agree_with_brute_force_within_their_error(method, n, k):
    p = _probs(n, k, 7)
    t = np.full(k, 1 / k)
    q, se = expected_ot_targets(p, t, method, draws=4000, seed=3, return_se=True)
    ref = brute_force(p, t, seed=3)
    assert np.all(np.abs(q - ref) <= 4 * se + 1e-9)
    assert se.max() < 0.01


@pytest.mark.parametrize("method", list(METHODS))
def test_rows_sum_to_one_and_columns_to_the_expected_counts(method):
    # every draw gives exactly n_k images class k, so sum_i q_ik = E[n_k] = N * D_k (exact); the Monte-Carlo
    # methods give the mean count of their own draws
    p, t = _probs(12, 3, 1), np.array([0.5, 0.3, 0.2])
    q = expected_ot_targets(p, t, method, draws=500, seed=2)
    np.testing.assert_allclose(q.sum(1), 1, atol=1e-12)
    if method == "exact":
        np.testing.assert_allclose(q.sum(0), 12 * t, atol=1e-9)
    else:
        counts = np.random.default_rng([2, 1]).multinomial(12, t, size=500).mean(0)
        np.testing.assert_allclose(q.sum(0), counts, atol=1e-9)


def test_k2_closed_form_by_hand():
    # p_0 = 0.9, 0.6, 0.2 -> ranks 1, 2, 3 for class 0; D_0 = 0.5: q_i0 = P(Bin(3, .5) >= rank) = 7/8, 4/8, 1/8
    q = expected_ot_targets([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], [0.5, 0.5])
    np.testing.assert_allclose(q[:, 0], [7 / 8, 1 / 2, 1 / 8])
    y, c = dynamic_targets(q)
    assert y.tolist() == [0, 0, 1] and c.tolist() == pytest.approx([7 / 8, 1 / 2, 7 / 8])
    # a one-hot target sends everyone to its class
    np.testing.assert_allclose(expected_ot_targets([[0.1, 0.9], [0.3, 0.7]], [1.0, 0.0]), [[1, 0], [1, 0]])


def test_ties_are_broken_by_a_seeded_permutation_not_by_position():
    p = np.tile([[0.999, 0.001]], (6, 1))  # a saturated classifier: identical rows
    seen_first = set()
    for seed in range(8):
        q = expected_ot_targets(p, [0.5, 0.5], "exact", seed=seed)
        assert sorted(q[:, 0].round(6)) == sorted(expected_ot_targets(p, [0.5, 0.5], seed=0)[:, 0].round(6))
        seen_first.add(int(q[:, 0].argmax()))
        np.testing.assert_allclose(q, expected_ot_targets(p, [0.5, 0.5], "exact", seed=seed))  # fixed per seed
        np.testing.assert_allclose(q, brute_force(p, np.array([0.5, 0.5]), seed=seed), atol=1e-12)
    assert len(seen_first) > 1  # position 0 is not always favoured (the public code's rule)


def test_bad_input_is_named():
    p = [[0.5, 0.5]]
    with pytest.raises(ValueError, match="target: must be >= 0 and sum to 1"):
        expected_ot_targets(p, [0.6, 0.6])
    with pytest.raises(ValueError, match=r"target: expected 2 class probabilities"):
        expected_ot_targets(p, [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="rows must sum to 1; row 0"):
        expected_ot_targets([[0.5, 0.2]], [0.5, 0.5])
    with pytest.raises(ValueError, match="method='sinkhorn' is not a known method"):
        expected_ot_targets(p, [0.5, 0.5], "sinkhorn")
    with pytest.raises(ValueError, match="use method='fast'"):
        expected_ot_targets(_probs(200, 4, 0), np.full(4, 0.25), "exact")
    with pytest.raises(ValueError, match="draws"):
        expected_ot_targets(p, [0.5, 0.5], "fast", draws=1)


def test_fast_is_the_monte_carlo_estimator_exactly():
    p = _probs(150, 4, 5)
    t = np.array([0.4, 0.3, 0.2, 0.1])
    qf, sf = expected_ot_targets(p, t, "fast", draws=40, seed=9, return_se=True)
    qm, sm = expected_ot_targets(p, t, "monte_carlo", draws=40, seed=9, return_se=True)
    np.testing.assert_array_equal(qf, qm)
    np.testing.assert_array_equal(sf, sm)


def test_warm_started_reassignment_equals_a_fresh_assignment():
    from popalign_core.dal.ot import _assign_counts, _reassign

    rng = np.random.default_rng(0)
    for trial in range(60):
        n, k = int(rng.integers(1, 25)), int(rng.integers(2, 6))
        p = rng.dirichlet(np.ones(k) * rng.choice([0.2, 1.0, 5.0]), size=n)
        if trial % 3 == 0:
            p = np.tile(p[:1], (n, 1))  # ties everywhere
        cost, t = _costs(p, trial), rng.dirichlet(np.ones(k))
        a, b = rng.multinomial(n, t), rng.multinomial(n, t)
        np.testing.assert_array_equal(_reassign(cost, _assign_counts(cost, a), b), _assign_counts(cost, b))


# ------------------------------------------------------------------------------------------------ several axes
def _two_axis_probs(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"gender": rng.dirichlet([1, 1], size=n), "age": rng.dirichlet([1, 1], size=n)}


def test_per_axis_mode_matches_brute_force_with_the_summed_cost():
    from popalign_core.common import attributes as A
    from popalign_core.dal.ot import _l2_costs, _perturb, expected_ot_targets_axes

    probs = _two_axis_probs(4, 0)
    target = A.conditional("age:binary", "gender", {"female": [0.75, 0.25], "male": [0.5, 0.5]})
    out = expected_ot_targets_axes(probs, target, "per_axis", "exact", seed=1)
    # joint class (g, a) in row-major order: cost = ||p_g - e_g|| + ||p_a - e_a||
    cg, ca = _l2_costs(probs["gender"]), _l2_costs(probs["age"])
    cost = _perturb(np.stack([cg[:, g] + ca[:, a] for g in range(2) for a in range(2)], axis=1), 1)
    ref = brute_force(None, target.probs, cost=cost)
    np.testing.assert_allclose(out["q"], ref, atol=1e-12)
    # per-axis targets are the marginals of q; their column sums are N x the target's marginals
    np.testing.assert_allclose(out["axes"]["gender"], ref.reshape(4, 2, 2).sum(2), atol=1e-12)
    np.testing.assert_allclose(out["axes"]["age"].sum(0), 4 * target.marginal("age").probs, atol=1e-9)
    assert out["c"]["age"].shape == (4,) and out["y_joint"].shape == (4,) and out["classes"][1] == "female|old"


def test_joint_mode_is_the_single_axis_method_on_product_probabilities():
    from popalign_core.common import attributes as A
    from popalign_core.dal.ot import expected_ot_targets_axes

    probs = _two_axis_probs(6, 3)
    target = A.per_axis({"gender": [0.5, 0.5], "age:binary": [0.75, 0.25]})
    out = expected_ot_targets_axes(probs, target, "joint", "exact", seed=2)
    pj = (probs["gender"][:, :, None] * probs["age"][:, None, :]).reshape(6, 4)
    np.testing.assert_allclose(out["q"], expected_ot_targets(pj, target.probs, "exact", seed=2), atol=1e-12)


def test_one_axis_per_axis_mode_equals_the_single_axis_api():
    from popalign_core.common import attributes as A
    from popalign_core.dal.ot import expected_ot_targets_axes

    p = _probs(9, 2, 4)
    out = expected_ot_targets_axes({"gender": p}, A.uniform("gender"), "per_axis", "fast", draws=50, seed=5)
    np.testing.assert_allclose(out["q"], expected_ot_targets(p, [0.5, 0.5], "fast", draws=50, seed=5))


def test_several_axes_bad_input():
    from popalign_core.common import attributes as A
    from popalign_core.dal.ot import expected_ot_targets_axes

    t = A.uniform(["gender", "age:binary"])
    with pytest.raises(ValueError, match=r"one array per target axis \['gender', 'age'\]"):
        expected_ot_targets_axes({"gender": _probs(3, 2, 0)}, t)
    with pytest.raises(ValueError, match="mode='both' is not a known mode"):
        expected_ot_targets_axes(_two_axis_probs(3, 0), t, "both")
    with pytest.raises(ValueError, match="expected an attributes.Target"):
        expected_ot_targets_axes(_two_axis_probs(3, 0), [0.25] * 4)
    with pytest.raises(ValueError, match="same number of images"):
        expected_ot_targets_axes({"gender": _probs(3, 2, 0), "age": _probs(4, 2, 0)}, t)


def test_check_exact_size_by_hand():
    from popalign_core.dal.ot import check_exact_size

    check_exact_size(16, 4)  # C(19, 3) = 969
    check_exact_size(10_000, 2)  # K = 2: closed form, never enumerated
    with pytest.raises(ValueError, match=r"would solve 300540195 count vectors for N=16, K=16"):
        check_exact_size(16, 16)  # C(31, 15)
    assert math.comb(31, 15) == 300540195
    with pytest.raises(ValueError, match=r"max_count_vectors=100\)"):
        check_exact_size(16, 4, max_count_vectors=100)
