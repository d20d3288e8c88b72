"""The distributional alignment loss (dal.py, patent Eq. 6) by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from popalign_core.dal.loss import dal_loss


def _logits(p0: list[float]) -> torch.Tensor:
    p = torch.tensor([[a, 1 - a] for a in p0], dtype=torch.float64)
    return p.log().float().requires_grad_(True)


def test_eq6_by_hand_k2():
    # p_0 = 0.9, 0.6, 0.2; target 50/50 -> q_0 = 7/8, 1/2, 1/8 (K = 2 closed form): confidences 7/8, 1/2, 7/8
    lg = _logits([0.9, 0.6, 0.2])
    out = dal_loss(lg, [0.5, 0.5], threshold=0.8)
    assert out.targets["axis"].tolist() == [0, 0, 1]
    assert out.used["axis"].tolist() == [True, False, True]
    by_hand = (-math.log(0.9) - math.log(0.8)) / 3  # divided by N = 3, not by the 2 confident images
    assert float(out.loss.detach()) == pytest.approx(by_hand, rel=1e-5)
    out.loss.backward()
    assert lg.grad[1].abs().sum() == 0 and lg.grad[0].abs().sum() > 0  # no gradient from the unconfident image
    assert out.metrics["confident"] == pytest.approx(2 / 3)


def test_images_without_a_face_are_excluded_and_not_counted():
    lg = _logits([0.9, 0.5, 0.6, 0.2])
    out = dal_loss(lg, [0.5, 0.5], threshold=0.8, face=[True, False, True, True])
    # the faces are the three images above: same targets, N = 3
    assert out.targets["axis"].tolist() == [0, -1, 0, 1] and not out.used["axis"][1]
    assert float(out.loss.detach()) == pytest.approx((-math.log(0.9) - math.log(0.8)) / 3, rel=1e-5)
    none = dal_loss(lg, [0.5, 0.5], face=[False] * 4)
    assert float(none.loss) == 0.0 and none.metrics["faces"] == 0


def test_several_axes_sum_per_axis_losses():
    from popalign_core.common import attributes as A
    from popalign_core.dal.ot import expected_ot_targets_axes

    g = torch.Generator().manual_seed(0)
    lg = {"gender": torch.randn(6, 2, generator=g, requires_grad=True),
          "age": torch.randn(6, 2, generator=g, requires_grad=True)}  # fmt: skip
    target = A.per_axis({"gender": [0.5, 0.5], "age:binary": [0.75, 0.25]})
    out = dal_loss(lg, target, threshold=0.6, seed=4)
    ot = expected_ot_targets_axes({a: v.detach().softmax(-1).double().numpy() for a, v in lg.items()}, target,
                                  seed=4, method="exact")  # fmt: skip
    by_hand = 0.0
    for a in ("gender", "age"):
        ok = ot["c"][a] >= 0.6
        assert out.used[a].tolist() == ok.tolist()
        if ok.any():
            by_hand += float(F.cross_entropy(lg[a][ok].detach(), torch.as_tensor(ot["y"][a][ok]), reduction="sum")) / 6
    assert float(out.loss.detach()) == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.2, True, "0.8"])
def test_threshold_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match=r"threshold: expected a confidence threshold C in \(0, 1\]"):
        dal_loss(_logits([0.5]), [0.5, 0.5], threshold=bad)


def test_bad_shapes_and_targets():
    with pytest.raises(ValueError, match="face: expected 2 booleans"):
        dal_loss(_logits([0.5, 0.4]), [0.5, 0.5], face=[True])
    with pytest.raises(ValueError, match="target: must be >= 0 and sum to 1"):
        dal_loss(_logits([0.5, 0.4]), [0.7, 0.7])
    with pytest.raises(ValueError, match=r"target: expected 2 class probabilities"):
        dal_loss(_logits([0.5, 0.4]), [0.2, 0.3, 0.5])
    assert np.isfinite(float(dal_loss(_logits([0.5, 0.4]), [1.0, 0.0], threshold=1.0).loss.detach()))
