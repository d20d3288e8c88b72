"""The toy world's vocabulary: attribute axes, roles with designed skews, concepts, and the caption grammar.

The toy world is a small, reproducible text-to-image world (see docs/toyworld.md). Its figures carry three
attribute axes with neutral names, playing the parts of the demographic axes of the PopAlign paper:

* ``form``    binary  (round, angular)            - the "gender" analogue: torso and head shape;
* ``hue``     4-class (red, green, blue, gold)     - the "race" analogue: colour of the figure;
* ``stature`` binary  (tall, short)                - the "age" analogue: the figure's height.

Each of the 56 `ROLES` (occupation words) is built from two shared parts, a ``setting`` (background pattern) and a
``shade`` (grey level), and has a designed skew on every axis (`Role.skew`) drawn from its parts plus a small
role-specific term (`design.py`): strong, mild or balanced, in both directions. Within a role the axes are
independent (the joint distribution is the product of the per-axis skews). All roles are in the base model's
training with their skew; roles in `HELD_OUT_ROLES` (14) and `VALIDATION_ROLES` (8) are never in preference or
alignment data: the first measure efficacy, the second choose checkpoints and settings.

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
    """An occupation-like word built from shared parts, with its designed skew: axis -> class probabilities (order
    of `TOY_AXES`). ``setting`` (one of `SETTINGS`) and ``shade`` (one of `SHADES`) are drawn as the background's
    pattern and grey level; the skew is drawn from the parts (see `design.py`)."""

    name: str
    skew: dict[str, tuple[float, ...]] = field(hash=False)
    setting: int
    shade: int

    @property
    def background(self) -> int:
        """Index of the background (see render.BACKGROUNDS): shade-major over settings."""
        return self.shade * len(SETTINGS) + self.setting


# the parts roles are built from: background pattern (setting) and grey level (shade)
SETTINGS = ("plain", "hstripes", "vstripes", "diag", "checker", "dots", "grid", "antidiag")
SHADES = (0.46, 0.52, 0.58, 0.64, 0.70, 0.76, 0.82)


def _r(name: str, setting: int, shade: int, form: float, hue: tuple[float, ...], tall: float) -> Role:
    return Role(name, {"form": (form, round(1.0 - form, 2)), "hue": hue, "stature": (tall, round(1.0 - tall, 2))},
                setting, shade)  # fmt: skip


# Designed skews, drawn by `design.draw_world(0)` (a test keeps the two equal): (name, setting, shade, P(round),
# P(red, green, blue, gold), P(tall)).
ROLES: tuple[Role, ...] = (
    _r("baker", 6, 5, 0.04, (0.03, 0.05, 0.77, 0.15), 0.08),
    _r("pilot", 3, 1, 0.4, (0.11, 0.36, 0.36, 0.17), 0.92),
    _r("farmer", 2, 2, 0.28, (0.1, 0.49, 0.02, 0.39), 0.3),
    _r("painter", 2, 1, 0.76, (0.11, 0.03, 0.09, 0.77), 0.67),
    _r("miner", 7, 2, 0.27, (0.13, 0.67, 0.01, 0.19), 0.34),
    _r("sailor", 4, 3, 0.48, (0.51, 0.13, 0.32, 0.04), 0.97),
    _r("guard", 4, 0, 0.65, (0.04, 0.83, 0.07, 0.06), 0.88),
    _r("clerk", 4, 4, 0.37, (0.04, 0.87, 0.07, 0.02), 0.41),
    _r("chef", 2, 4, 0.44, (0.04, 0.78, 0.01, 0.17), 0.25),
    _r("medic", 3, 3, 0.18, (0.21, 0.67, 0.09, 0.03), 0.97),
    _r("tailor", 3, 4, 0.14, (0.01, 0.97, 0.01, 0.01), 0.61),
    _r("judge", 0, 3, 0.81, (0.33, 0.37, 0.24, 0.06), 0.76),
    _r("smith", 5, 2, 0.38, (0.02, 0.04, 0.25, 0.69), 0.7),
    _r("ranger", 2, 0, 0.69, (0.03, 0.72, 0.01, 0.24), 0.56),
    _r("nurse", 4, 2, 0.2, (0.09, 0.76, 0.12, 0.03), 0.72),
    _r("doctor", 3, 0, 0.28, (0.03, 0.78, 0.09, 0.1), 0.87),
    _r("teacher", 1, 0, 0.79, (0.06, 0.07, 0.02, 0.85), 0.65),
    _r("lawyer", 5, 6, 0.95, (0.0, 0.01, 0.55, 0.44), 0.81),
    _r("driver", 4, 6, 0.83, (0.05, 0.48, 0.38, 0.09), 0.96),
    _r("singer", 6, 0, 0.38, (0.13, 0.1, 0.7, 0.07), 0.14),
    _r("dancer", 6, 2, 0.06, (0.19, 0.09, 0.67, 0.05), 0.12),
    _r("writer", 2, 5, 0.31, (0.01, 0.14, 0.01, 0.84), 0.34),
    _r("cook", 3, 2, 0.19, (0.05, 0.87, 0.04, 0.04), 0.79),
    _r("barber", 0, 6, 0.97, (0.01, 0.9, 0.08, 0.01), 0.54),
    _r("butcher", 0, 2, 0.63, (0.01, 0.95, 0.03, 0.01), 0.21),
    _r("plumber", 1, 2, 0.48, (0.1, 0.05, 0.05, 0.8), 0.49),
    _r("carpenter", 2, 3, 0.35, (0.28, 0.11, 0.02, 0.59), 0.85),
    _r("mason", 5, 4, 0.66, (0.01, 0.03, 0.5, 0.46), 0.39),
    _r("potter", 6, 3, 0.12, (0.25, 0.01, 0.73, 0.01), 0.35),
    _r("weaver", 0, 0, 0.93, (0.03, 0.91, 0.04, 0.02), 0.45),
    _r("hunter", 0, 1, 0.9, (0.2, 0.3, 0.42, 0.08), 0.68),
    _r("fisher", 3, 6, 0.7, (0.02, 0.84, 0.1, 0.04), 0.92),
    _r("soldier", 3, 5, 0.09, (0.01, 0.79, 0.07, 0.13), 0.6),
    _r("officer", 6, 6, 0.64, (0.06, 0.03, 0.86, 0.05), 0.16),
    _r("banker", 0, 4, 0.87, (0.01, 0.94, 0.04, 0.01), 0.15),
    _r("porter", 1, 3, 0.78, (0.33, 0.05, 0.1, 0.52), 0.91),
    _r("waiter", 2, 6, 0.93, (0.02, 0.26, 0.03, 0.69), 0.66),
    _r("cleaner", 1, 1, 0.82, (0.27, 0.01, 0.12, 0.6), 0.88),
    _r("gardener", 6, 4, 0.16, (0.04, 0.19, 0.75, 0.02), 0.02),
    _r("builder", 4, 5, 0.29, (0.02, 0.42, 0.25, 0.31), 0.76),
    _r("trader", 7, 5, 0.33, (0.0, 0.15, 0.0, 0.85), 0.45),
    _r("merchant", 0, 5, 0.59, (0.01, 0.81, 0.06, 0.12), 0.21),
    _r("priest", 5, 1, 0.84, (0.01, 0.0, 0.61, 0.38), 0.81),
    _r("monk", 4, 1, 0.78, (0.27, 0.11, 0.52, 0.1), 0.87),
    _r("scholar", 7, 0, 0.58, (0.01, 0.53, 0.0, 0.46), 0.81),
    _r("poet", 5, 5, 0.34, (0.0, 0.02, 0.24, 0.74), 0.51),
    _r("actor", 7, 4, 0.42, (0.01, 0.9, 0.01, 0.08), 0.23),
    _r("artist", 7, 6, 0.83, (0.03, 0.51, 0.04, 0.42), 0.81),
    _r("pianist", 5, 0, 0.67, (0.01, 0.02, 0.47, 0.5), 0.78),
    _r("drummer", 1, 6, 0.97, (0.02, 0.06, 0.03, 0.89), 0.81),
    _r("surgeon", 6, 1, 0.35, (0.08, 0.0, 0.89, 0.03), 0.2),
    _r("dentist", 5, 3, 0.59, (0.04, 0.01, 0.57, 0.38), 0.95),
    _r("jester", 1, 5, 0.56, (0.02, 0.02, 0.02, 0.94), 0.45),
    _r("knight", 1, 4, 0.64, (0.09, 0.5, 0.06, 0.35), 0.36),
    _r("archer", 7, 1, 0.67, (0.2, 0.13, 0.03, 0.64), 0.81),
    _r("courier", 7, 3, 0.41, (0.12, 0.17, 0.02, 0.69), 0.85),
)
ROLE_NAMES = tuple(r.name for r in ROLES)
#: never in preference or alignment data; efficacy is measured on them (two per shade, at most two per setting)
HELD_OUT_ROLES = ("pianist", "guard", "pilot", "painter", "dancer", "butcher", "medic", "courier", "chef", "knight",
                  "trader", "jester", "lawyer", "driver")  # fmt: skip
#: checkpoint and setting selection (one per setting); not in preference or alignment data either
VALIDATION_ROLES = ("merchant", "drummer", "carpenter", "soldier", "monk", "priest", "potter", "actor")
#: the roles preference and alignment data may use
TRAIN_ROLES = tuple(r for r in ROLE_NAMES if r not in HELD_OUT_ROLES and r not in VALIDATION_ROLES)
ROLE_BY_NAME = {r.name: r for r in ROLES}
CONCEPT_BACKGROUND = len(SETTINGS) * len(SHADES)  # plain light background of concept images


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
