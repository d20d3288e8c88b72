"""Bias metrics against hand-computed values, the finite-sample floor, bootstrap CIs and the per-prompt report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from popalign_core.common.attributes import conditional, uniform
from popalign_core.evaluate.metrics import (
    METRICS,
    POOLED_NOTE,
    ambiguity,
    bias_pairwise,
    bootstrap_ci,
    clip_score,
    discrepancy,
    discrepancy_floor,
    discrepancy_floor_detail,
    face_rate,
    per_prompt_report,
    recall,
)

EYE2 = np.eye(2)


def _onehot(labels, k=2):
    return np.eye(k)[np.asarray(labels).astype(int)]


def test_discrepancy_by_hand():
    probs = [[1, 0], [0, 1], [1, 0], [1, 0]]
    # mean = [0.75, 0.25]; target [0.5, 0.5] -> sqrt(0.25^2 + 0.25^2) = sqrt(0.125) = 0.353553...
    assert discrepancy(probs, [0.5, 0.5]) == pytest.approx(math.sqrt(0.125))
    assert discrepancy(torch.tensor(probs, dtype=torch.float32), uniform("gender")) == pytest.approx(0.3535534)
    soft = [[0.9, 0.1], [0.4, 0.6]]
    # soft mean = [0.65, 0.35] -> sqrt(2 * 0.15^2) = 0.212132; hard: argmax -> [1,0],[0,1] -> mean [0.5,0.5] -> 0
    assert discrepancy(soft, [0.5, 0.5]) == pytest.approx(0.15 * math.sqrt(2))
    assert discrepancy(soft, [0.5, 0.5], hard=True) == pytest.approx(0.0)
    # a joint target (gender x age, [0.375, 0.125, 0.375, 0.125]); all images "female|young" -> mean [1,0,0,0]
    # diff = [0.625, -0.125, -0.375, -0.125] -> sqrt(0.390625 + 0.015625 + 0.140625 + 0.015625) = sqrt(0.5625) = 0.75
    t = conditional("age:binary", "gender", {"female": [0.75, 0.25], "male": [0.75, 0.25]})
    assert discrepancy(np.tile([1.0, 0, 0, 0], (3, 1)), t) == pytest.approx(0.75)


def test_discrepancy_validation():
    with pytest.raises(ValueError, match=r"`probs` rows must sum to 1 .*row 1 sums to 0\.9"):
        discrepancy([[1, 0], [0.5, 0.4]], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"`probs` must be finite and non-negative; got -0\.1"):
        discrepancy([[1.1, -0.1]], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"`target` has 3 classes but `probs` has K=2"):
        discrepancy([[1, 0]], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"`target` must be non-negative and sum to 1.*\[0\.5, 0\.6\]"):
        discrepancy([[1, 0]], [0.5, 0.6])
    with pytest.raises(ValueError, match=r"`probs` has no rows"):
        discrepancy(np.zeros((0, 2)), [0.5, 0.5])
    with pytest.raises(ValueError, match=r"`probs` must be a 2-D array.*got shape \(2,\)"):
        discrepancy([0.5, 0.5], [0.5, 0.5])


def test_floor_exact_values_and_rate():
    # n=1: outcome [1,0] or [0,1], each at distance sqrt(0.5^2 + 0.5^2) = 0.70711
    f1 = discrepancy_floor_detail([0.5, 0.5], 1)
    assert f1.value == pytest.approx(math.sqrt(0.5)) and f1.method == "exact" and f1.se == 0.0
    # n=2: [2,0],[0,2] w.p. 1/4 each at 0.70711, [1,1] w.p. 1/2 at 0 -> 0.35355
    assert discrepancy_floor([0.5, 0.5], 2) == pytest.approx(math.sqrt(0.5) / 2)
    # a target with one class at probability 1 has floor 0
    assert discrepancy_floor([1.0, 0.0], 10) == pytest.approx(0.0)
    # decreasing like 1/sqrt(n): for K=2, E|c/n - 1/2| * sqrt(2) -> sqrt(2/pi) * 0.5 * sqrt(2) / sqrt(n)
    vals = [discrepancy_floor([0.5, 0.5], n) for n in (16, 64, 256, 1024)]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    for n, v in zip((16, 64, 256, 1024), vals):
        assert v * math.sqrt(n) == pytest.approx(1 / math.sqrt(math.pi), rel=0.05)


def test_floor_monte_carlo_is_seeded_and_matches_exact():
    t = np.full(7, 1 / 7)
    a, b = discrepancy_floor_detail(t, 100, draws=4000, seed=3), discrepancy_floor_detail(t, 100, draws=4000, seed=3)
    assert a == b and a.method == "monte-carlo" and 0 < a.se < 0.01
    # K=3, n=30: exact (C(32,2) = 496 outcomes); the Monte-Carlo estimate agrees within 4 standard errors
    exact = discrepancy_floor_detail([0.2, 0.3, 0.5], 30)
    assert exact.method == "exact"
    rng = np.random.default_rng(0)
    d = np.linalg.norm(np.array([0.2, 0.3, 0.5]) - rng.multinomial(30, [0.2, 0.3, 0.5], size=20000) / 30, axis=1)
    assert abs(d.mean() - exact.value) < 4 * d.std() / math.sqrt(20000)
    with pytest.raises(ValueError, match=r"`n` must be a positive integer.*got 0"):
        discrepancy_floor([0.5, 0.5], 0)


def test_bias_pairwise_by_hand():
    # labels [0,0,0,1,2,2] over 3 classes: freq = [3/6, 1/6, 2/6]
    # pairs: |1/2-1/6| = 1/3, |1/2-1/3| = 1/6, |1/6-1/3| = 1/6 -> mean = (2/6 + 1/6 + 1/6) / 3 = 2/9
    assert bias_pairwise([0, 0, 0, 1, 2, 2], 3) == pytest.approx(2 / 9)
    assert bias_pairwise([0, 1, 2], 3) == pytest.approx(0.0)
    assert bias_pairwise([1, 1, 1], 2) == pytest.approx(1.0)  # K=2, one class: |0 - 1| = 1
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 2\]; got 3"):
        bias_pairwise([0, 3], 3)
    with pytest.raises(ValueError, match=r"`num_classes` must be an integer >= 2; got 1"):
        bias_pairwise([0], 1)
    with pytest.raises(ValueError, match=r"`labels` is empty"):
        bias_pairwise([], 2)


def test_recall_exact_identity_never_substring():
    # "female" images predicted "male" are misses ("male" in "female" is True: a substring test would count them)
    true = ["female", "female", "male", "male", None]
    pred = ["male", "female", "male", "female", "male"]
    # last image has no recorded identity -> excluded; hits: female/female, male/male -> 2 of 4
    assert recall(pred, true) == pytest.approx(0.5)
    assert recall(["male", "male"], ["female", "female"]) == 0.0
    # class indices (0 = female, 1 = male); -1 = no identity recorded / no face predicted (a miss)
    assert recall([1, 0, -1, 1], [0, 0, 1, -1]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"`pred_labels` \(1\) and `true_labels` \(2\)"):
        recall([0], [0, 1])
    with pytest.raises(ValueError, match=r"`true_labels` records no identity"):
        recall([0, 1], [-1, -1])


def test_ambiguity_and_face_rate():
    # top probabilities 0.9, 0.55, 0.5, 0.6 -> below 0.6: two of four
    assert ambiguity([[0.9, 0.1], [0.55, 0.45], [0.5, 0.5], [0.4, 0.6]]) == pytest.approx(0.5)
    assert ambiguity([[0.9, 0.1], [0.55, 0.45]], threshold=0.5) == 0.0
    with pytest.raises(ValueError, match=r"`threshold` must be in \(0, 1\]; got 1\.5"):
        ambiguity([[1.0, 0.0]], threshold=1.5)
    assert face_rate(np.array([True, False, True, True])) == 0.75
    with pytest.raises(ValueError, match=r"`found` must be a bool array; got dtype int"):
        face_rate(np.array([1, 0]))


def test_clip_score_by_hand():
    # cos = 1, 0, -1 (clamped to 0), 0.6 -> 100 * (1 + 0 + 0 + 0.6) / 4 = 40
    img = [[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [3.0, 4.0]]
    assert clip_score(img, [1.0, 0.0]) == pytest.approx(40.0)
    # paired rows; w = 2.5 as in Hessel et al.: 2.5 * (1 + 0.8) / 2
    assert clip_score([[1.0, 0.0], [0.0, 1.0]], [[5.0, 0.0], [0.6, 0.8]], w=2.5) == pytest.approx(2.25)
    assert clip_score(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])) == pytest.approx(100 / math.sqrt(2))
    with pytest.raises(ValueError, match=r"`text_embeds` must be \[N, D\] or \[1, D\] matching"):
        clip_score([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="all-zero row"):
        clip_score([[0.0, 0.0]], [1.0, 0.0])
    with pytest.raises(ValueError, match=r"`image_embeds` must be a non-empty \[N, D\] array"):
        clip_score(np.zeros((0, 2)), [1.0, 0.0])


def _inputs(rng):
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=20)
    return {
        "probs": probs,
        "target": np.full(3, 1 / 3),
        "labels": probs.argmax(1),
        "num_classes": 3,
        "pred_labels": probs.argmax(1),
        "true_labels": rng.integers(0, 3, 20),
        "found": rng.random(20) < 0.8,
        "image_embeds": rng.normal(size=(20, 8)),
        "text_embeds": rng.normal(size=(1, 8)),
    }


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_registered_metric_runs_and_stays_in_range(name):
    spec = METRICS[name]
    data = _inputs(np.random.default_rng(1))
    assert set(spec.needs) <= set(data), f"test inputs lack {set(spec.needs) - set(data)}"
    v = spec.fn(**{k: data[k] for k in spec.needs})
    assert isinstance(v, float) and spec.range[0] <= v <= spec.range[1]
    assert spec.definition and len(spec.definition.splitlines()) == 1


def test_bootstrap_ci_contains_value_is_deterministic_and_narrows():
    rng = np.random.default_rng(0)
    small, large = _onehot(rng.random(40) < 0.7), _onehot(rng.random(640) < 0.7)

    def fn(x):
        return discrepancy(x, [0.5, 0.5])

    a = bootstrap_ci(fn, small, n_boot=300, seed=5)
    assert a.low <= a.value <= a.high and a.method == "within"
    assert a == bootstrap_ci(fn, small, n_boot=300, seed=5)
    assert a != bootstrap_ci(fn, small, n_boot=300, seed=6)
    b = bootstrap_ci(fn, large, n_boot=300, seed=5)
    assert (b.high - b.low) < 0.5 * (a.high - a.low)  # 16x the images -> ~1/4 the width
    with pytest.raises(ValueError, match=r"`level` must be in \(0, 1\); got 95"):
        bootstrap_ci(fn, small, level=95)
    with pytest.raises(ValueError, match=r"`groups` has empty group\(s\) at position\(s\) \[1\]"):
        bootstrap_ci(lambda s: 0.0, [small, small[:0]])


def test_two_level_ci_wider_when_prompts_differ():
    rng = np.random.default_rng(0)
    # 8 prompts with very different skews (share of class 0 from 0.1 to 0.9), 60 images each
    groups = [_onehot(rng.random(60) > q) for q in np.linspace(0.1, 0.9, 8)]

    def mean_disc(gs):
        return float(np.mean([discrepancy(g, [0.5, 0.5]) for g in gs]))

    one = bootstrap_ci(mean_disc, groups, n_boot=300, seed=0)
    two = bootstrap_ci(mean_disc, groups, n_boot=300, seed=0, two_level=True)
    assert one.value == two.value and two.method == "two-level"
    assert (two.high - two.low) > 1.5 * (one.high - one.low)


def test_pooling_cancels_opposite_skews_but_per_prompt_mean_does_not():
    # prompt a: 80 female / 20 male; prompt b: 20 female / 80 male (hard labels)
    a = _onehot([0] * 80 + [1] * 20)
    b = _onehot([0] * 20 + [1] * 80)
    rep = per_prompt_report({"a": a, "b": b}, [0.5, 0.5], n_boot=200)
    # per prompt: mean [0.8, 0.2] -> sqrt(2 * 0.3^2) = 0.42426; pooled: [0.5, 0.5] -> 0
    assert rep["per_prompt"]["a"]["value"] == pytest.approx(0.3 * math.sqrt(2))
    assert rep["mean_over_prompts"]["value"] == pytest.approx(0.3 * math.sqrt(2))
    assert rep["pooled"]["value"] == pytest.approx(0.0) and rep["pooled"]["note"] == POOLED_NOTE
    lo, hi = rep["mean_over_prompts"]["ci"]
    assert lo <= rep["mean_over_prompts"]["value"] <= hi and lo > rep["mean_over_prompts"]["floor"]
    # floor at n=100 (exact, K=2) ~ 1/sqrt(pi*100) = 0.0564
    assert rep["per_prompt"]["a"]["floor"] == pytest.approx(1 / math.sqrt(math.pi * 100), rel=0.05)


def test_report_handles_prompts_without_faces_and_is_deterministic():
    a = _onehot([0, 0, 1])
    rep = per_prompt_report({"a": a, "none": np.zeros((0, 2)), "empty": []}, [0.5, 0.5], hard=True, n_boot=50)
    assert rep["per_prompt"]["none"]["value"] is None and "no images" in rep["per_prompt"]["none"]["reason"]
    assert rep["skipped"] == ["none", "empty"] and rep["mean_over_prompts"]["n_prompts"] == 1
    assert rep == per_prompt_report({"a": a, "none": np.zeros((0, 2)), "empty": []}, [0.5, 0.5], hard=True, n_boot=50)
    nothing = per_prompt_report({"x": np.zeros((0, 2))}, [0.5, 0.5], n_boot=50)
    assert nothing["mean_over_prompts"]["value"] is None and nothing["pooled"]["value"] is None
    assert "no prompt" in nothing["mean_over_prompts"]["reason"]
    with pytest.raises(ValueError, match=r"`probs_by_prompt\['a'\]` has K=2 columns but `target` has 3"):
        per_prompt_report({"a": a}, [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"`probs_by_prompt\['a'\]` rows must sum to 1"):
        per_prompt_report({"a": [[0.5, 0.6]]}, [0.5, 0.5])
