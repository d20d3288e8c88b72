"""Attribute axes, their class lists, and target distributions (per axis, joint, conditional).

Class names are lower-case identifiers used everywhere (classifier outputs, metrics, reports, targets).

A target is a probability vector over a FIXED class set (PopAlign Eq. 13 compares the model's mean class
probabilities with an "ideal distribution" p_ref). Targets over several axes are stored flattened in **row-major
order** over the axes as listed (the last axis varies fastest), e.g. axes (gender, age/binary) ->
classes (female|young, female|old, male|young, male|old).

Inputs are validated early: a `ValueError` names the argument, the offending value and the valid values.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------------ canonical axes
GENDER = ("female", "male")
RACE_FAIRFACE7 = ("white", "black", "latino_hispanic", "east_asian", "southeast_asian", "indian", "middle_eastern")
RACE_PAPER6 = ("white", "black", "latino_hispanic", "asian", "indian", "middle_eastern")  # DeepFace / PopAlign paper
RACE_GROUP4 = ("white", "black", "asian", "indian")  # the 4-group mapping of the fair-diffusion code
AGE_FAIRFACE9 = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
AGE_BINARY = ("young", "old")  # under 40 / 40 and over

# mappings between race class sets (many-to-one): documented, used to compare classifiers with different sets
RACE_MAPS = {
    ("fairface7", "paper6"): {
        "white": "white",
        "black": "black",
        "latino_hispanic": "latino_hispanic",
        "east_asian": "asian",
        "southeast_asian": "asian",
        "indian": "indian",
        "middle_eastern": "middle_eastern",
    },
    ("fairface7", "group4"): {
        "white": "white",
        "black": "black",
        "latino_hispanic": "white",
        "east_asian": "asian",
        "southeast_asian": "asian",
        "indian": "indian",
        "middle_eastern": "white",
    },
}

# named class sets per axis: AXES[axis][variant] -> class tuple; the first variant is the axis default
AXES: dict[str, dict[str, tuple[str, ...]]] = {
    "gender": {"binary": GENDER},
    "race": {"fairface7": RACE_FAIRFACE7, "paper6": RACE_PAPER6, "group4": RACE_GROUP4},
    "age": {"fairface9": AGE_FAIRFACE9, "binary": AGE_BINARY},
}

PROB_ATOL = 1e-6  # tolerance of "sums to 1" for targets
JOINT_SEP = "|"  # joint class name separator: "female|white"


# ------------------------------------------------------------------------------------------------ axes
@dataclass(frozen=True)
class Axis:
    """One attribute axis with a fixed, ordered class set, e.g. Axis("race", "paper6", RACE_PAPER6)."""

    name: str
    variant: str
    classes: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def key(self) -> str:
        """ "axis:variant", the spelling accepted everywhere an axis is named."""
        return f"{self.name}:{self.variant}"

    def index(self, cls: str) -> int:
        """Position of class `cls`; ValueError listing the valid classes otherwise."""
        if cls not in self.classes:
            raise ValueError(f"class {cls!r} is not a class of axis {self.key!r}; valid classes: {list(self.classes)}")
        return self.classes.index(cls)


def get_axis(axis: str | Axis, variant: str | None = None) -> Axis:
    """The `Axis` for `axis` ("race", "race:paper6" or an Axis) and `variant` (None: the axis default, the first
    variant listed in `AXES`)."""
    if isinstance(axis, Axis):
        if variant is not None and variant != axis.variant:
            raise ValueError(f"`variant` {variant!r} contradicts the given Axis {axis.key!r}")
        return axis
    if not isinstance(axis, str):
        raise ValueError(f"`axis` must be an axis name or an Axis; got {axis!r}. Valid axes: {list(AXES)}")
    name, _, v = axis.partition(":")
    if v and variant is not None and v != variant:
        raise ValueError(f"`axis` {axis!r} contradicts `variant` {variant!r}")
    variant = v or variant
    if name not in AXES:
        raise ValueError(f"`axis` must be one of {list(AXES)}; got {axis!r}")
    variants = AXES[name]
    if variant is None:
        variant = next(iter(variants))
    if variant not in variants:
        raise ValueError(f"`variant` of axis {name!r} must be one of {list(variants)}; got {variant!r}")
    return Axis(name, variant, variants[variant])


def axis_classes(axis: str | Axis, variant: str | None = None) -> tuple[str, ...]:
    """Class names of `axis` in canonical order (variant None: the axis default), e.g. ("female", "male")."""
    return get_axis(axis, variant).classes


# ------------------------------------------------------------------------------------------------ validation
def _check_vector(arg: str, p: Any, classes: Sequence[str], atol: float = PROB_ATOL) -> np.ndarray:
    """A probability vector over `classes`: a dict keyed by class name (missing classes -> 0) or an array in class
    order. Checks: known class names, right length, finite, >= 0, sums to 1 within `atol`."""
    k = len(classes)
    if isinstance(p, Mapping):
        unknown = [c for c in p if c not in classes]
        if unknown:
            raise ValueError(f"`{arg}` has unknown class name(s) {unknown}; valid classes: {list(classes)}")
        v = np.array([float(p.get(c, 0.0)) for c in classes], dtype=np.float64)
    else:
        if hasattr(p, "detach"):  # torch tensor
            p = p.detach().cpu().numpy()
        v = np.asarray(p, dtype=np.float64)
        if v.shape != (k,):
            raise ValueError(
                f"`{arg}` must have shape ({k},) (one entry per class of {list(classes)}); got shape {v.shape}: {p!r}"
            )
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError(f"`{arg}` must be finite and non-negative; got {p!r}")
    s = v.sum()
    if abs(s - 1.0) > atol:
        raise ValueError(f"`{arg}` must sum to 1 (within {atol:g}); got sum {s:.8g} for {p!r}")
    return v


# ------------------------------------------------------------------------------------------------ targets
@dataclass(frozen=True, eq=False)
class Target:
    """A target distribution over the product of `axes`, flattened row-major (last axis fastest).

    `kind` records how it was built ("uniform", "per_axis", "joint", "conditional", "marginal"). Metrics take
    `target.probs` (or the Target itself) and compare it with the mean classifier probabilities over the SAME class
    set, `target.classes`.
    """

    axes: tuple[Axis, ...]
    probs: np.ndarray
    kind: str = "joint"

    def __post_init__(self):
        p = np.asarray(self.probs, dtype=np.float64).reshape(-1)
        _check_vector("probs", p, self.classes)
        object.__setattr__(self, "probs", p)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    @property
    def classes(self) -> tuple[str, ...]:
        """Joint class names in row-major order, "female|white" style (the class itself for one axis)."""
        return tuple(JOINT_SEP.join(c) for c in itertools.product(*(a.classes for a in self.axes)))

    def as_dict(self) -> dict[str, float]:
        return {c: float(v) for c, v in zip(self.classes, self.probs)}

    def table(self) -> np.ndarray:
        """The probabilities reshaped to `shape` (one array dimension per axis)."""
        return self.probs.reshape(self.shape)

    def marginal(self, axes: str | Axis | Sequence[str | Axis]) -> Target:
        """Marginal over the named axis / axes (kept in the order given), by summing out the other axes."""
        return marginal(self, axes)


def _axis_list(axes: str | Axis | Sequence[str | Axis], arg: str) -> tuple[Axis, ...]:
    if isinstance(axes, (str, Axis)):
        axes = [axes]
    out = tuple(get_axis(a) for a in axes)
    names = [a.name for a in out]
    if not out or len(set(names)) != len(names):
        raise ValueError(f"`{arg}` must name one or more distinct axes; got {list(names)}")
    return out


def uniform(axis: str | Axis | Sequence[str | Axis]) -> Target:
    """The uniform target over the FIXED class set of `axis` (or the product of several axes): 1/K each."""
    axes = _axis_list(axis, "axis")
    k = int(np.prod([a.size for a in axes]))
    return Target(axes, np.full(k, 1.0 / k), "uniform")


def per_axis(targets: Mapping[str | Axis, Any]) -> Target:
    """Independent per-axis targets, e.g. {"gender": [0.5, 0.5], "race:paper6": {...}}.

    Stored as the product distribution (independence), so `target.marginal(axis)` returns each per-axis target
    unchanged; a per-axis evaluation measures each axis against its marginal.
    """
    if not isinstance(targets, Mapping) or not targets:
        raise ValueError(f"`targets` must be a non-empty dict axis -> probabilities; got {targets!r}")
    axes = _axis_list(list(targets), "targets")
    vecs = [_check_vector(f"targets[{k!r}]", v, a.classes) for a, (k, v) in zip(axes, targets.items())]
    p = vecs[0]
    for v in vecs[1:]:
        p = np.outer(p, v).reshape(-1)
    return Target(axes, p, "per_axis")


def joint(axes: Sequence[str | Axis], probs: Any) -> Target:
    """A joint target over `axes`: `probs` has K = product of the axis sizes entries in row-major order (last axis
    fastest), or the matching nested array, or a dict keyed by joint class name "female|white" or by class tuple."""
    ax = _axis_list(axes, "axes")
    classes = tuple(JOINT_SEP.join(c) for c in itertools.product(*(a.classes for a in ax)))
    if isinstance(probs, Mapping):
        probs = {(JOINT_SEP.join(k) if isinstance(k, tuple) else k): v for k, v in probs.items()}
        v = _check_vector("probs", probs, classes)
    else:
        arr = probs.detach().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs, dtype=np.float64)
        shape = tuple(a.size for a in ax)
        if arr.shape not in (shape, (len(classes),)):
            raise ValueError(
                f"`probs` must have shape {shape} or ({len(classes)},) for axes {[a.key for a in ax]}; "
                f"got shape {arr.shape}"
            )
        v = _check_vector("probs", arr.reshape(-1), classes)
    return Target(ax, v, "joint")


def conditional(
    child_axis: str | Axis,
    parent_axes: str | Axis | Sequence[str | Axis],
    table: Any,
    parent_probs: Any = None,
) -> Target:
    """A joint target over (parents..., child) from a conditional table P(child | parents).

    Rule: joint(p, c) = P(parents = p) * P(c | p), with P(parents) UNIFORM over the parent class combinations unless
    `parent_probs` is given (a Target over the parent axes, or an array / dict as for `joint`). Axes order of the
    result: the parent axes as given, then the child axis (row-major, child fastest).

    `table`: a dict keyed by parent combination (a class name for one parent axis, a tuple of class names or
    "female|white" for several) -> child probabilities (dict by child class or array); it must cover EVERY parent
    combination. Or an array of shape (*parent_sizes, child_size).
    Example: age 75/25 young/old for every gender x race: conditional("age:binary", ["gender", "race"], {...}).
    """
    child = get_axis(child_axis)
    parents = _axis_list(parent_axes, "parent_axes")
    if child.name in [a.name for a in parents]:
        raise ValueError(f"`child_axis` {child.key!r} is also in `parent_axes` {[a.key for a in parents]}")
    combos = list(itertools.product(*(a.classes for a in parents)))
    names = [JOINT_SEP.join(c) for c in combos]
    if isinstance(table, Mapping):
        norm: dict[str, Any] = {}
        for k, v in table.items():
            key = JOINT_SEP.join(k) if isinstance(k, tuple) else k
            if key not in names:
                raise ValueError(f"`table` has unknown parent combination {k!r}; valid: {names}")
            norm[key] = v
        missing = [n for n in names if n not in norm]
        if missing:
            raise ValueError(f"`table` must cover every parent combination; missing {missing}")
        rows = [_check_vector(f"table[{n!r}]", norm[n], child.classes) for n in names]
    else:
        arr = table.detach().cpu().numpy() if hasattr(table, "detach") else np.asarray(table, dtype=np.float64)
        shape = (*(a.size for a in parents), child.size)
        if arr.shape != shape:
            raise ValueError(f"`table` must have shape {shape} (parents..., child); got shape {arr.shape}")
        arr = arr.reshape(len(names), child.size)
        rows = [_check_vector(f"table[{n!r}]", r, child.classes) for n, r in zip(names, arr)]
    if parent_probs is None:
        pp = np.full(len(names), 1.0 / len(names))
    elif isinstance(parent_probs, Target):
        if [a.key for a in parent_probs.axes] != [a.key for a in parents]:
            raise ValueError(
                f"`parent_probs` axes {[a.key for a in parent_probs.axes]} must equal `parent_axes` "
                f"{[a.key for a in parents]}"
            )
        pp = parent_probs.probs
    else:
        try:
            pp = joint(parents, parent_probs).probs
        except ValueError as e:
            raise ValueError(f"`parent_probs` is invalid: {e}") from None
    p = (pp[:, None] * np.stack(rows)).reshape(-1)
    return Target((*parents, child), p, "conditional")


def marginal(target: Target, axes: str | Axis | Sequence[str | Axis]) -> Target:
    """Marginal of `target` over `axes` (in the order given), summing out the other axes."""
    if not isinstance(target, Target):
        raise ValueError(f"`target` must be a Target; got {type(target).__name__}")
    names = [a if isinstance(a, str) else a.name for a in ([axes] if isinstance(axes, (str, Axis)) else axes)]
    names = [n.partition(":")[0] for n in names]
    have = list(target.axis_names)
    bad = [n for n in names if n not in have]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"`axes` must be distinct axes of the target {have}; got {names}")
    keep = [have.index(n) for n in names]
    drop = tuple(i for i in range(len(have)) if i not in keep)
    t = target.table().sum(axis=drop) if drop else target.table()
    order = sorted(keep)
    t = np.transpose(t, [order.index(i) for i in keep])
    return Target(tuple(target.axes[i] for i in keep), t.reshape(-1), "marginal")


# ------------------------------------------------------------------------------------------------ class maps
def map_probs(
    probs: Any,
    from_classes: Sequence[str],
    to_classes: Sequence[str],
    mapping: Mapping[str, str] | None = None,
):
    """Sum probabilities through a many-to-one class map: out[..., j] = sum_{i: mapping[from_i] = to_j} probs[..., i].

    `probs`: [..., len(from_classes)] numpy array or torch tensor (the result has the same type). `mapping`: dict
    from-class -> to-class covering every from-class; None looks it up in `RACE_MAPS` by the two class sets.
    """
    from_classes, to_classes = tuple(from_classes), tuple(to_classes)
    if mapping is None:
        inv = {cls: v for ax in AXES.values() for v, cls in ax.items()}
        key = (inv.get(from_classes), inv.get(to_classes))
        if key not in RACE_MAPS:
            raise ValueError(
                f"no mapping given and no RACE_MAPS entry for `from_classes` {list(from_classes)} -> `to_classes` "
                f"{list(to_classes)}; RACE_MAPS has {list(RACE_MAPS)}"
            )
        mapping = RACE_MAPS[key]
    missing = [c for c in from_classes if c not in mapping]
    if missing:
        raise ValueError(f"`mapping` must cover every class of `from_classes`; missing {missing}")
    bad = {c: t for c, t in mapping.items() if t not in to_classes}
    if bad:
        raise ValueError(f"`mapping` sends classes to unknown targets {bad}; valid `to_classes`: {list(to_classes)}")
    m = np.zeros((len(from_classes), len(to_classes)))
    for i, c in enumerate(from_classes):
        m[i, to_classes.index(mapping[c])] = 1.0
    if hasattr(probs, "detach"):  # torch: keep dtype/device and gradients
        if probs.shape[-1] != len(from_classes):
            raise ValueError(f"`probs` last dimension must be {len(from_classes)}; got shape {tuple(probs.shape)}")
        return probs @ probs.new_tensor(m)
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != len(from_classes):
        raise ValueError(f"`probs` last dimension must be {len(from_classes)}; got shape {arr.shape}")
    return arr @ m
