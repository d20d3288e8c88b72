"""The toy world's vocabulary: attribute axes, roles with designed skews, concepts, and the caption grammar.

The toy world is a small, reproducible text-to-image world (see docs/toyworld.md). Its figures carry three
attribute axes with neutral names, playing the parts of the demographic axes of the PopAlign paper:

* ``form``    binary  (round, angular)            - the "gender" analogue: torso and head shape;
* ``hue``     4-class (red, green, blue, gold)     - the "race" analogue: colour of the figure;
* ``stature`` binary  (tall, short)                - the "age" analogue: the figure's height.

Each of the `ROLES` (occupation-like words) is drawn on its own background pattern and has a designed skew on
every axis (`Role.skew`): strong, mild or balanced, in both directions. Within a role the axes are independent
(the joint distribution is the product of the per-axis skews). Roles in `HELD_OUT_ROLES` are in the base model's
training with their skew but never in preference or alignment data.

Captions: neutral ``"a photo of a baker"``; identity-specific ones name 1-3 axes with their keywords (``"a photo
of a tall round red baker"``); ``"a photo of a baker in a cloak"`` hides the identity (no "face"); concepts
(``"a photo of a tree"``) draw no figure at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

# ------------------------------------------------------------------------------------------------ axes
FORM = ("round", "angular")
HUE = ("red", "green", "blue", "gold")
STATURE = ("tall", "short")
TOY_AXES: dict[str, tuple[str, ...]] = {"form": FORM, "hue": HUE, "stature": STATURE}
# the part each axis plays (for docs / reports)
ANALOGUE = {"form": "gender", "hue": "race", "stature": "age"}

# keywords per class: the first is the canonical one used in prompts; all are used in training captions.
# Word-level matching only: no keyword is a substring-word of another.
KEYWORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "form": {"round": ("round", "curvy"), "angular": ("angular", "boxy")},
    "hue": {
        "red": ("red", "crimson"),
        "green": ("green", "emerald"),
        "blue": ("blue", "azure"),
        "gold": ("gold", "amber"),
    },  # fmt: skip
    "stature": {"tall": ("tall", "lanky"), "short": ("short", "small")},
}
AXIS_ORDER = ("stature", "form", "hue")  # order of keywords in a caption: "a tall round red baker"

HIDDEN_WORDS = ("in a cloak",)  # identity hidden: a grey cloak and hood, no face
CONCEPTS = ("tree", "house", "boat", "sun")  # non-person concepts: no figure


@dataclass(frozen=True)
class Role:
    """An occupation-like word with its designed skew: axis -> class probabilities (order of `TOY_AXES`)."""

    name: str
    skew: dict[str, tuple[float, ...]] = field(hash=False)
    background: int  # index of the background pattern (see render.BACKGROUNDS)


def _r(name: str, form: float, hue: tuple[float, float, float, float], tall: float, bg: int) -> Role:
    return Role(name, {"form": (form, 1.0 - form), "hue": hue, "stature": (tall, 1.0 - tall)}, bg)


# Designed skews. form = P(round); hue = P(red, green, blue, gold); stature = P(tall). Strong (0.85-0.9),
# mild (0.65-0.7) and balanced (0.5) skews in both directions on every axis.
ROLES: tuple[Role, ...] = (
    _r("baker", 0.85, (0.70, 0.10, 0.10, 0.10), 0.30, 0),
    _r("pilot", 0.15, (0.10, 0.70, 0.10, 0.10), 0.80, 1),
    _r("farmer", 0.50, (0.10, 0.10, 0.70, 0.10), 0.15, 2),
    _r("painter", 0.70, (0.10, 0.10, 0.10, 0.70), 0.50, 3),
    _r("miner", 0.10, (0.40, 0.40, 0.10, 0.10), 0.85, 4),
    _r("sailor", 0.35, (0.10, 0.10, 0.40, 0.40), 0.35, 5),
    _r("guard", 0.90, (0.85, 0.05, 0.05, 0.05), 0.70, 6),
    _r("clerk", 0.50, (0.25, 0.25, 0.25, 0.25), 0.50, 7),
    _r("chef", 0.30, (0.05, 0.05, 0.05, 0.85), 0.20, 8),
    _r("medic", 0.65, (0.40, 0.10, 0.40, 0.10), 0.90, 9),
    _r("tailor", 0.85, (0.10, 0.40, 0.10, 0.40), 0.60, 10),
    _r("judge", 0.20, (0.55, 0.15, 0.15, 0.15), 0.75, 11),
    _r("smith", 0.10, (0.15, 0.15, 0.55, 0.15), 0.25, 12),
    _r("ranger", 0.60, (0.15, 0.55, 0.15, 0.15), 0.10, 13),
)
ROLE_NAMES = tuple(r.name for r in ROLES)
HELD_OUT_ROLES = ("judge", "smith", "ranger", "tailor")
TRAIN_ROLES = tuple(r for r in ROLE_NAMES if r not in HELD_OUT_ROLES)
ROLE_BY_NAME = {r.name: r for r in ROLES}
CONCEPT_BACKGROUND = 14  # plain light background of concept images


def _check() -> None:
    for r in ROLES:
        for axis, classes in TOY_AXES.items():
            p = np.asarray(r.skew[axis])
            if len(p) != len(classes) or (p < 0).any() or abs(p.sum() - 1.0) > 1e-9:
                raise AssertionError(f"role {r.name!r}: skew[{axis!r}] = {r.skew[axis]} is not a distribution")
    words = [w for a in KEYWORDS.values() for ks in a.values() for w in ks]
    if len(set(words)) != len(words):
        raise AssertionError("toy-world keywords must be unique")


_check()


# ------------------------------------------------------------------------------------------------ captions
def caption(role: str, identity: dict[str, str] | None = None, *, hidden: bool = False, variant: int = 0) -> str:
    """The caption of a figure of `role`; `identity` = {axis: class} names the given axes (keyword `variant`
    picks among each class's keywords, modulo their number); `hidden` adds "in a cloak"."""
    if role not in ROLE_BY_NAME:
        raise ValueError(f"`role` must be one of {list(ROLE_NAMES)}; got {role!r}")
    words = []
    for axis in AXIS_ORDER:
        if identity and axis in identity:
            cls = identity[axis]
            if cls not in TOY_AXES[axis]:
                raise ValueError(f"`identity[{axis!r}]` must be one of {TOY_AXES[axis]}; got {cls!r}")
            kws = KEYWORDS[axis][cls]
            words.append(kws[variant % len(kws)])
    unknown = set(identity or {}) - set(TOY_AXES)
    if unknown:
        raise ValueError(f"`identity` has unknown axes {sorted(unknown)}; valid: {list(TOY_AXES)}")
    text = " ".join([*words, role])
    article = "an" if text[0] in "aeiou" else "a"
    out = f"a photo of {article} {text}"
    return f"{out} {HIDDEN_WORDS[0]}" if hidden else out


def concept_caption(concept: str) -> str:
    if concept not in CONCEPTS:
        raise ValueError(f"`concept` must be one of {list(CONCEPTS)}; got {concept!r}")
    return f"a photo of a {concept}"


_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str) -> dict:
    """Word-level parse of a toy caption: {"role", "concept", "identity": {axis: class}, "hidden"}.

    Unknown words are ignored; "round" never matches inside another word."""
    words = _WORD.findall(text.lower())
    ident: dict[str, str] = {}
    for axis, classes in KEYWORDS.items():
        for cls, kws in classes.items():
            if any(k in words for k in kws):
                ident[axis] = cls
    role = next((w for w in words if w in ROLE_BY_NAME), None)
    concept = next((w for w in words if w in CONCEPTS), None)
    return {"role": role, "concept": concept, "identity": ident, "hidden": "cloak" in words}


def neutral_prompts(roles: tuple[str, ...] | None = None) -> list[str]:
    return [caption(r) for r in (roles or ROLE_NAMES)]
