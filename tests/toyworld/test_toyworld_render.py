"""The toy world's vocabulary, captions and renderer (popalign_core.toyworld.world / render / data)."""

from __future__ import annotations

import numpy as np
import pytest

from popalign_core.toyworld.data import CaptionMix, make_dataset
from popalign_core.toyworld.render import HUE_RGB, Spec, render, render_batch, sample_identity, spec_from_caption
from popalign_core.toyworld.world import (
    CONCEPTS,
    HELD_OUT_ROLES,
    KEYWORDS,
    ROLE_BY_NAME,
    ROLE_NAMES,
    TOY_AXES,
    caption,
    parse_caption,
)


def test_world_design():
    """World v2: >= 48 roles built from shared parts, >= 12 held out, a validation split, strong skews (>= 0.85) in
    both directions on every axis among the held-out roles, mild ones too; the table is the seeded draw."""
    from popalign_core.toyworld.design import draw_world
    from popalign_core.toyworld.render import BACKGROUNDS
    from popalign_core.toyworld.world import SETTINGS, SHADES, TRAIN_ROLES, VALIDATION_ROLES

    assert len(ROLE_NAMES) == 56 and len(HELD_OUT_ROLES) == 14 and len(VALIDATION_ROLES) == 8
    assert len(TRAIN_ROLES) == 34 and not set(HELD_OUT_ROLES) & set(VALIDATION_ROLES)
    assert set(TRAIN_ROLES) | set(HELD_OUT_ROLES) | set(VALIDATION_ROLES) == set(ROLE_NAMES)
    assert [len(c) for c in TOY_AXES.values()] == [2, 4, 2]
    # every role a distinct (setting, shade) pair; every part shared by several training roles
    assert len({(r.setting, r.shade) for r in ROLE_BY_NAME.values()}) == 56
    assert len({ROLE_BY_NAME[r].background for r in ROLE_NAMES}) == 56 and len(BACKGROUNDS) == 57
    assert min(sum(ROLE_BY_NAME[r].setting == s for r in TRAIN_ROLES) for s in range(len(SETTINGS))) >= 2
    assert min(sum(ROLE_BY_NAME[r].shade == g for r in TRAIN_ROLES) for g in range(len(SHADES))) >= 2
    for axis in TOY_AXES:
        p = np.array([ROLE_BY_NAME[r].skew[axis] for r in HELD_OUT_ROLES])
        assert ((p >= 0.85).sum(0) > 0).sum() >= 2, axis  # strong towards two classes (binary: both directions)
        everyone = np.array([ROLE_BY_NAME[r].skew[axis] for r in ROLE_NAMES]).max(1)
        assert ((everyone > 0.45) & (everyone < 0.7)).any()  # mild skews too
    d = draw_world(0)
    table = [(r.name, r.setting, r.shade, r.skew["form"][0], r.skew["hue"], r.skew["stature"][0])
             for r in ROLE_BY_NAME.values()]  # fmt: skip
    assert d["roles"] == table and tuple(d["held_out"]) == HELD_OUT_ROLES
    assert tuple(d["validation"]) == VALIDATION_ROLES


def test_captions_round_trip_word_level():
    assert caption("baker") == "a photo of a baker"
    assert caption("baker", {"form": "angular", "hue": "gold"}) == "a photo of an angular gold baker"
    assert caption("pilot", {"stature": "tall", "form": "round", "hue": "red"}, variant=1) == (
        "a photo of a lanky curvy crimson pilot"
    )
    assert caption("miner", hidden=True) == "a photo of a miner in a cloak"
    for role in ROLE_NAMES:
        for axis, classes in TOY_AXES.items():
            for c in classes:
                for v in range(2):
                    parsed = parse_caption(caption(role, {axis: c}, variant=v))
                    assert parsed == {"role": role, "concept": None, "identity": {axis: c}, "hidden": False}
    assert parse_caption("a photo of a tree")["concept"] == "tree"
    assert parse_caption("a photo of a tallbaker")["identity"] == {}  # word level only
    with pytest.raises(ValueError, match=r"`role` must be one of .*got 'astronaut'"):
        caption("astronaut")
    with pytest.raises(ValueError, match=r"`identity\['hue'\]` must be one of .*got 'purple'"):
        caption("baker", {"hue": "purple"})
    words = [w for a in KEYWORDS.values() for ks in a.values() for w in ks]
    assert len(words) == len(set(words))


def test_render_is_seeded_and_truthful():
    spec = Spec("figure", role="baker", form="round", hue="blue", stature="tall")
    a, ta = render(spec, np.random.default_rng(3))
    b, _ = render(spec, np.random.default_rng(3))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    x0, y0, x1, y1 = ta.face_box
    assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
    # the figure's colour dominates its torso region
    fx0, fy0, fx1, fy1 = ta.figure_box
    torso = a[(fy0 + fy1) // 2, (fx0 + fx1) // 2].astype(float) / 255
    assert np.argmax(torso) == np.argmax(HUE_RGB["blue"])
    # tall figures are taller than short ones, on average
    rng = np.random.default_rng(0)
    h = {s: np.mean([(lambda t: t.figure_box[3] - t.figure_box[1])(render(Spec("figure", role="pilot", form="angular",
         hue="red", stature=s), rng)[1]) for _ in range(20)]) for s in ("tall", "short")}  # fmt: skip
    assert h["tall"] > 1.3 * h["short"]
    _, t = render(Spec("figure", role="baker", form="round", hue="red", stature="tall", hidden=True), rng)
    assert t.face_box is None and t.figure_box is not None
    _, t = render(Spec("concept", concept="boat"), rng)
    assert t.face_box is None and t.figure_box is None
    with pytest.raises(ValueError, match="`concept` must be one of"):
        render(Spec("concept", concept="car"), rng)


def test_identity_sampling_matches_design_and_captions_are_faithful():
    rng = np.random.default_rng(0)
    draws = [sample_identity("guard", rng) for _ in range(20000)]
    for axis, classes in TOY_AXES.items():
        freq = np.array([sum(d[axis] == c for d in draws) for c in classes]) / len(draws)
        assert np.abs(freq - np.array(ROLE_BY_NAME["guard"].skew[axis])).max() < 0.015
    for _ in range(50):
        s = spec_from_caption("a photo of a short gold guard", rng)
        assert s.stature == "short" and s.hue == "gold" and s.role == "guard"
    assert spec_from_caption("a photo of a sun", rng).kind == "concept"
    with pytest.raises(ValueError, match="names no toy-world role or concept"):
        spec_from_caption("a photo of an astronaut", rng)


def test_dataset_mix():
    imgs, caps, truths = make_dataset(2000, seed=1)
    assert imgs.shape == (2000, 32, 32, 3)
    kinds = {
        "concept": sum(t.spec.kind == "concept" for t in truths) / 2000,
        "hidden": sum(t.spec.hidden for t in truths) / 2000,
        "neutral": sum(
            parse_caption(c)["identity"] == {} and "cloak" not in c and parse_caption(c)["role"] is not None
            for c in caps
        )
        / 2000,  # fmt: skip
    }
    m = CaptionMix()
    assert abs(kinds["concept"] - m.concept) < 0.03 and abs(kinds["hidden"] - m.hidden) < 0.03
    assert abs(kinds["neutral"] - m.neutral) < 0.04
    for c, t in zip(caps, truths):  # identity-specific captions are rendered faithfully
        for axis, cls in parse_caption(c)["identity"].items():
            assert getattr(t.spec, axis) == cls
    assert set(CONCEPTS) >= {t.spec.concept for t in truths if t.spec.kind == "concept"}
    with pytest.raises(ValueError, match="`caption_mix` shares must be >= 0 and sum to 1"):
        make_dataset(10, 0, CaptionMix(neutral=0.9))
    a, _ = render_batch([Spec("concept", concept="tree")] * 2, seed=5)
    assert a.shape == (2, 32, 32, 3)
