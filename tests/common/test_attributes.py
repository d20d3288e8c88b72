"""Attribute axes, targets (uniform / per-axis / joint / conditional / marginal) and class maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from popalign_core.common.attributes import (
    AGE_BINARY,
    AXES,
    GENDER,
    RACE_FAIRFACE7,
    RACE_GROUP4,
    RACE_MAPS,
    RACE_PAPER6,
    Target,
    axis_classes,
    conditional,
    get_axis,
    joint,
    map_probs,
    marginal,
    per_axis,
    uniform,
)


def test_canonical_constants_kept():
    assert GENDER == ("female", "male")
    assert AXES["race"]["paper6"] == RACE_PAPER6 and len(RACE_FAIRFACE7) == 7 and len(RACE_GROUP4) == 4
    assert set(RACE_MAPS[("fairface7", "paper6")]) == set(RACE_FAIRFACE7)


def test_axis_classes_and_variants():
    assert axis_classes("gender") == GENDER
    assert axis_classes("race") == RACE_FAIRFACE7  # the first variant is the default
    assert axis_classes("race", "paper6") == RACE_PAPER6 == axis_classes("race:paper6")
    ax = get_axis("age:binary")
    assert ax.size == 2 and ax.index("old") == 1 and ax.key == "age:binary"
    with pytest.raises(ValueError, match=r"`axis` must be one of \['gender'.*got 'hair'"):
        axis_classes("hair")
    with pytest.raises(ValueError, match=r"`variant` of axis 'race' must be one of \['fairface7'.*got 'paper7'"):
        axis_classes("race", "paper7")
    with pytest.raises(ValueError, match=r"'purple'.*valid classes"):
        ax.index("purple")


def test_uniform_targets():
    t = uniform("race:paper6")
    np.testing.assert_allclose(t.probs, np.full(6, 1 / 6))
    assert t.classes == RACE_PAPER6 and t.kind == "uniform"
    tj = uniform(["gender", "age:binary"])  # 2 x 2 -> 1/4 each, row-major classes
    assert tj.classes == ("female|young", "female|old", "male|young", "male|old")
    np.testing.assert_allclose(tj.probs, 0.25)


def test_per_axis_is_independent_product_with_its_marginals():
    t = per_axis({"gender": {"female": 0.3, "male": 0.7}, "age:binary": [0.75, 0.25]})
    # row-major: (f,y)=0.3*0.75=0.225, (f,o)=0.3*0.25=0.075, (m,y)=0.7*0.75=0.525, (m,o)=0.7*0.25=0.175
    np.testing.assert_allclose(t.probs, [0.225, 0.075, 0.525, 0.175])
    np.testing.assert_allclose(t.marginal("gender").probs, [0.3, 0.7])
    np.testing.assert_allclose(t.marginal("age").probs, [0.75, 0.25])


def test_joint_row_major_and_dict_forms():
    p = [[0.1, 0.2], [0.3, 0.4]]  # gender x age/binary
    a = joint(["gender", "age:binary"], p)
    b = joint(["gender", "age:binary"], np.array(p).reshape(-1))
    c = joint(
        ["gender", "age:binary"], {"female|young": 0.1, ("female", "old"): 0.2, "male|young": 0.3, "male|old": 0.4}
    )
    for t in (a, b, c):
        np.testing.assert_allclose(t.probs, [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(a.marginal("age").probs, [0.4, 0.6])  # 0.1+0.3, 0.2+0.4
    np.testing.assert_allclose(marginal(a, ["age", "gender"]).table(), [[0.1, 0.3], [0.2, 0.4]])  # transposed


def test_conditional_to_joint_by_hand():
    # P(old|female) = 0.25, P(old|male) = 0.25, P(gender) uniform 0.5:
    # joint = [0.5*0.75, 0.5*0.25, 0.5*0.75, 0.5*0.25] = [0.375, 0.125, 0.375, 0.125]
    t = conditional("age:binary", "gender", {"female": {"old": 0.25, "young": 0.75}, "male": [0.75, 0.25]})
    assert t.classes == ("female|young", "female|old", "male|young", "male|old")
    np.testing.assert_allclose(t.probs, [0.375, 0.125, 0.375, 0.125])
    np.testing.assert_allclose(t.marginal("age").probs, [0.75, 0.25])


def test_conditional_with_parent_probs_and_two_parents():
    # P(gender) = (0.2, 0.8); P(old|female)=0.5, P(old|male)=0.25
    # joint = [0.2*0.5, 0.2*0.5, 0.8*0.75, 0.8*0.25] = [0.1, 0.1, 0.6, 0.2]
    t = conditional("age:binary", ["gender"], {"female": [0.5, 0.5], "male": [0.75, 0.25]}, parent_probs=[0.2, 0.8])
    np.testing.assert_allclose(t.probs, [0.1, 0.1, 0.6, 0.2])
    # age 75/25 given every gender x race(group4) cell: 8 cells x uniform 1/8
    table = {(g, r): [0.75, 0.25] for g in GENDER for r in RACE_GROUP4}
    t2 = conditional("age:binary", ["gender", "race:group4"], table)
    assert t2.shape == (2, 4, 2)
    np.testing.assert_allclose(t2.probs[:2], [0.75 / 8, 0.25 / 8])
    np.testing.assert_allclose(t2.marginal("race").probs, 0.25)


def test_conditional_validation():
    with pytest.raises(ValueError, match=r"`table` must cover every parent combination; missing \['male'\]"):
        conditional("age:binary", "gender", {"female": [0.5, 0.5]})
    with pytest.raises(ValueError, match=r"`table` has unknown parent combination 'other'"):
        conditional("age:binary", "gender", {"female": [0.5, 0.5], "male": [0.5, 0.5], "other": [1, 0]})
    with pytest.raises(ValueError, match=r"`table\['male'\]` must sum to 1.*0\.9"):
        conditional("age:binary", "gender", {"female": [0.5, 0.5], "male": [0.5, 0.4]})
    with pytest.raises(ValueError, match=r"`child_axis`.*also in `parent_axes`"):
        conditional("gender", "gender", {"female": [1, 0], "male": [0, 1]})
    with pytest.raises(ValueError, match=r"`table` must have shape \(2, 2\)"):
        conditional("age:binary", "gender", np.ones((3, 2)) / 2)
    with pytest.raises(ValueError, match=r"`parent_probs` is invalid.*sum to 1"):
        conditional("age:binary", "gender", np.ones((2, 2)) / 2, parent_probs=[0.5, 0.6])


def test_target_validation_names_argument_and_value():
    with pytest.raises(ValueError, match=r"`targets\['gender'\]` has unknown class name\(s\) \['nonbinary'\]"):
        per_axis({"gender": {"nonbinary": 1.0}})
    with pytest.raises(
        ValueError, match=r"`targets\['gender'\]` must be finite and non-negative; got \[-0\.5, 1\.5\]"
    ):
        per_axis({"gender": [-0.5, 1.5]})
    with pytest.raises(ValueError, match=r"`targets\['gender'\]` must sum to 1 .*got sum 0\.9"):
        per_axis({"gender": [0.5, 0.4]})
    with pytest.raises(ValueError, match=r"`targets\['gender'\]` must have shape \(2,\)"):
        per_axis({"gender": [0.2, 0.3, 0.5]})
    with pytest.raises(ValueError, match=r"`probs` must have shape \(2, 2\) or \(4,\)"):
        joint(["gender", "age:binary"], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"`axes` must name one or more distinct axes"):
        joint(["gender", "gender"], [0.25] * 4)
    with pytest.raises(ValueError, match=r"`axes` must be distinct axes of the target \['gender'\]; got \['race'\]"):
        uniform("gender").marginal("race")
    # within 1e-6 is accepted
    per_axis({"gender": [0.5 + 5e-7, 0.5]})


def test_map_probs_sums_through_many_to_one_map():
    p = np.array([[0.1, 0.2, 0.3, 0.15, 0.05, 0.1, 0.1]])  # fairface7 order
    # paper6: east_asian + southeast_asian -> asian: 0.15 + 0.05 = 0.2
    np.testing.assert_allclose(map_probs(p, RACE_FAIRFACE7, RACE_PAPER6), [[0.1, 0.2, 0.3, 0.2, 0.1, 0.1]])
    # group4: white = white + latino + middle_eastern = 0.1+0.3+0.1 = 0.5; asian = 0.2; black 0.2; indian 0.1
    out = map_probs(p, RACE_FAIRFACE7, RACE_GROUP4, RACE_MAPS[("fairface7", "group4")])
    np.testing.assert_allclose(out, [[0.5, 0.2, 0.2, 0.1]])
    tt = map_probs(torch.tensor(p, dtype=torch.float32), RACE_FAIRFACE7, RACE_PAPER6)
    assert isinstance(tt, torch.Tensor) and torch.allclose(tt.sum(-1), torch.ones(1))
    # a custom map (age 9 -> binary)
    m = {c: ("young" if i < 5 else "old") for i, c in enumerate(axis_classes("age"))}
    np.testing.assert_allclose(map_probs(np.full(9, 1 / 9), axis_classes("age"), AGE_BINARY, m), [5 / 9, 4 / 9])
    with pytest.raises(
        ValueError, match=r"`mapping` must cover every class of `from_classes`; missing \['black', 'latino_hispanic'"
    ):
        map_probs(p, RACE_FAIRFACE7, RACE_PAPER6, {"white": "white"})
    with pytest.raises(ValueError, match=r"`mapping` sends classes to unknown targets \{'white': 'pale'\}"):
        map_probs(np.ones(2) / 2, ("white", "black"), ("white", "black"), {"white": "pale", "black": "black"})
    with pytest.raises(ValueError, match=r"no RACE_MAPS entry"):
        map_probs(p[:, :6], RACE_PAPER6, RACE_FAIRFACE7)
    with pytest.raises(ValueError, match=r"`probs` last dimension must be 7; got shape \(1, 6\)"):
        map_probs(p[:, :6], RACE_FAIRFACE7, RACE_PAPER6)


def test_target_object_direct_construction_is_validated():
    with pytest.raises(ValueError, match=r"`probs` must sum to 1"):
        Target((get_axis("gender"),), np.array([0.2, 0.2]))
