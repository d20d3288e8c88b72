"""Training data of the toy world: captions drawn with the designed skews, rendered faithfully.

`caption_mix` decides how often each kind of caption appears in the base model's training data:
neutral captions (the skew is learned from these), identity-specific ones (1-3 axes named, each named class drawn
uniformly so that rare classes are learned too; the unnamed axes follow the role's skew), cloaked figures and
non-person concepts. `make_dataset` returns images, captions and the ground truth, all from one seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popalign_core.toyworld.render import Spec, render, sample_identity
from popalign_core.toyworld.world import CONCEPTS, KEYWORDS, ROLE_NAMES, TOY_AXES, caption, concept_caption


@dataclass(frozen=True)
class CaptionMix:
    """Shares of caption kinds in the base model's training data (they must sum to 1)."""

    neutral: float = 0.46
    identity: float = 0.40
    hidden: float = 0.06
    concept: float = 0.08

    def check(self) -> None:
        v = np.array([self.neutral, self.identity, self.hidden, self.concept])
        if (v < 0).any() or abs(v.sum() - 1.0) > 1e-9:
            raise ValueError(f"`caption_mix` shares must be >= 0 and sum to 1; got {self}")


def draw_example(rng: np.random.Generator, mix: CaptionMix = CaptionMix()) -> tuple[Spec, str]:
    """One (spec, caption) pair of the base model's training distribution."""
    kind = rng.choice(4, p=[mix.neutral, mix.identity, mix.hidden, mix.concept])
    if kind == 3:
        c = CONCEPTS[int(rng.integers(len(CONCEPTS)))]
        return Spec("concept", concept=c), concept_caption(c)
    role = ROLE_NAMES[int(rng.integers(len(ROLE_NAMES)))]
    if kind == 2:
        ident = sample_identity(role, rng)
        return Spec("figure", role=role, hidden=True, **ident), caption(role, hidden=True)
    if kind == 0:
        ident = sample_identity(role, rng)
        return Spec("figure", role=role, **ident), caption(role)
    # identity-specific: name a random non-empty subset of the axes, each named class uniform
    axes = list(TOY_AXES)
    k = int(rng.integers(1, len(axes) + 1))
    named = [axes[i] for i in sorted(rng.choice(len(axes), size=k, replace=False))]
    fixed = {a: TOY_AXES[a][int(rng.integers(len(TOY_AXES[a])))] for a in named}
    ident = sample_identity(role, rng, fixed)
    variant = int(rng.integers(max(len(v) for a in KEYWORDS.values() for v in a.values())))
    return Spec("figure", role=role, **ident), caption(role, fixed, variant=variant)


def make_dataset(n: int, seed: int, mix: CaptionMix = CaptionMix(), size: int = 32):
    """n examples -> (uint8 images [n, size, size, 3], captions, truths)."""
    mix.check()
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, size, size, 3), np.uint8)
    caps, truths = [], []
    for i in range(n):
        spec, cap = draw_example(rng, mix)
        imgs[i], t = render(spec, rng, size)
        caps.append(cap)
        truths.append(t)
    return imgs, caps, truths
