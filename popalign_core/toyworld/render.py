"""Procedural renderer of the toy world: person-like figures, cloaked figures and non-person concepts.

`render(spec, rng)` draws one RGB image (uint8 [S, S, 3], S = 32 by default) at 2x resolution and averages 2x2
blocks (anti-aliasing). A figure is: two legs, a torso (ellipse for ``round``, rectangle for ``angular``) and a
head (circle / square) in the figure's hue, with a "face" (a light oval with two eyes) - the analogue of a human
face that the toy face detector looks for. ``stature`` sets the height (tall figures are about 1.5x taller). The
role's parts set the background: its setting the pattern, its shade the grey level (grey only, so it never
competes with the hue axis). A cloaked figure is
a grey cloak and hood with no face and no visible form or hue. Positions, sizes and colours are jittered.

`sample_specs` draws figure specs for a role with its designed skew; `spec_from_caption` draws a spec matching a
toy caption (the axes a caption names are fixed, the others come from the role's skew).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popalign_core.toyworld.world import (
    CONCEPT_BACKGROUND,
    CONCEPTS,
    HUE,
    ROLE_BY_NAME,
    SETTINGS,
    SHADES,
    TOY_AXES,
    parse_caption,
)

SIZE = 32
SS = 2  # supersampling factor

HUE_RGB = {
    "red": (0.86, 0.17, 0.15),
    "green": (0.15, 0.66, 0.22),
    "blue": (0.16, 0.30, 0.86),
    "gold": (0.92, 0.74, 0.10),
}
FACE_RGB = (0.97, 0.86, 0.74)
LEG_RGB = (0.22, 0.22, 0.24)
CLOAK_RGB = (0.36, 0.36, 0.38)

# backgrounds: (grey level, pattern) = (shade, setting); index = Role.background; the last one is the concepts' sky
BACKGROUNDS = tuple((g, p) for g in SHADES for p in SETTINGS) + ((0.90, "sky"),)
LEVEL_JITTER = 0.015  # < half the step between shades (0.06)


@dataclass
class Spec:
    """What to draw. kind: "figure" or "concept". For figures: role, form, hue, stature, hidden."""

    kind: str
    role: str | None = None
    form: str | None = None
    hue: str | None = None
    stature: str | None = None
    hidden: bool = False
    concept: str | None = None

    def identity(self) -> dict[str, str]:
        if self.kind != "figure" or self.hidden:
            return {}
        return {"form": self.form, "hue": self.hue, "stature": self.stature}


@dataclass
class Truth:
    """Ground truth of a rendered image: the spec and the face box (x0, y0, x1, y1) in output pixels, or None."""

    spec: Spec
    face_box: tuple[int, int, int, int] | None
    figure_box: tuple[int, int, int, int] | None


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    return y + 0.5, x + 0.5


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _background(index: int, n: int, rng: np.random.Generator) -> np.ndarray:
    level, pattern = BACKGROUNDS[index]
    y, x = _GRIDS[n]
    s = n / 64.0  # pattern periods are defined on the 64-px canvas
    level = level + rng.uniform(-LEVEL_JITTER, LEVEL_JITTER)
    amp = 0.09
    if pattern == "plain":
        v = np.zeros_like(x)
    elif pattern == "hstripes":
        v = np.where((y / s // 8) % 2 == 0, amp, -amp)
    elif pattern == "vstripes":
        v = np.where((x / s // 8) % 2 == 0, amp, -amp)
    elif pattern == "diag":
        v = np.where(((x + y) / s // 11) % 2 == 0, amp, -amp)
    elif pattern == "antidiag":
        v = np.where(((x - y + n) / s // 11) % 2 == 0, amp, -amp)
    elif pattern == "checker":
        v = np.where(((x / s // 10) + (y / s // 10)) % 2 == 0, amp, -amp)
    elif pattern == "dots":
        v = np.where(((x / s % 12) - 6) ** 2 + ((y / s % 12) - 6) ** 2 < 9, -2 * amp, 0.0)
    elif pattern == "grid":
        v = np.where((x / s % 12 < 2) | (y / s % 12 < 2), -2 * amp, 0.0)
    elif pattern == "sky":
        v = -0.12 * (1 - y / n)
    else:  # pragma: no cover
        raise AssertionError(pattern)
    img = np.repeat((level + v)[..., None], 3, axis=2)
    if pattern == "sky":
        img[..., 2] += 0.06
    return img


def _paint(img: np.ndarray, mask: np.ndarray, rgb) -> None:
    img[mask] = np.asarray(rgb, dtype=np.float32)


def _jit(rgb, rng, amount=0.05):
    return np.clip(np.asarray(rgb) + rng.uniform(-amount, amount, 3), 0, 1)


def render(spec: Spec, rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, Truth]:
    """Draw `spec` -> (uint8 [size, size, 3] RGB, Truth). Deterministic for a given `rng` state."""
    n = size * SS
    if n not in _GRIDS:
        _GRIDS[n] = _grid(n)
    y, x = _GRIDS[n]
    u = n / 64.0  # unit: geometry is defined on a 64-px canvas
    if spec.kind == "concept":
        img = _background(CONCEPT_BACKGROUND, n, rng)
        _draw_concept(img, spec.concept, x, y, u, rng)
        face = fig = None
    elif spec.kind == "figure":
        role = ROLE_BY_NAME[spec.role]
        img = _background(role.background, n, rng)
        face, fig = _draw_figure(img, spec, x, y, u, rng)
    else:
        raise ValueError(f"`spec.kind` must be 'figure' or 'concept'; got {spec.kind!r}")
    img = np.clip(img, 0.0, 1.0)
    img = img.reshape(size, SS, size, SS, 3).mean(axis=(1, 3))
    out = (img * 255.0 + 0.5).astype(np.uint8)

    def box(b):
        if b is None:
            return None
        x0, y0, x1, y1 = (v / SS for v in b)
        return (max(0, int(np.floor(x0))), max(0, int(np.floor(y0))), min(size, int(np.ceil(x1))),
                min(size, int(np.ceil(y1))))  # fmt: skip

    return out, Truth(spec, box(face), box(fig))


def _draw_figure(img, spec: Spec, x, y, u, rng):
    tall = spec.stature == "tall"
    cx = 32 * u + rng.uniform(-4, 4) * u
    ground = 61 * u + rng.uniform(-1.5, 0.5) * u
    scale = rng.uniform(0.94, 1.06)
    leg = (11 if tall else 5) * u * scale
    torso_h = (25 if tall else 15) * u * scale
    torso_w = 23 * u * scale
    r = (9.0 if tall else 8.0) * u * scale  # head "radius"
    torso_bottom = ground - leg
    torso_top = torso_bottom - torso_h
    hy = torso_top - r + 1.0 * u  # head centre (head slightly overlaps the torso)
    top = hy - r
    # legs
    for dx in (-5.5, 5.5):
        m = (np.abs(x - (cx + dx * u)) < 2.3 * u) & (y > torso_bottom - 2 * u) & (y < ground)
        _paint(img, m, _jit(LEG_RGB, rng, 0.03))
    if spec.hidden:
        # a cloak: a trapezoid from the hood to the ground, hiding form, hue and face
        half = torso_w / 2
        frac = np.clip((y - top) / max(ground - top, 1e-6), 0, 1)
        width = 0.55 * half + frac * 0.75 * half
        m = (y > top + r * 0.3) & (y < ground - 1.5 * u) & (np.abs(x - cx) < width)
        hood = (x - cx) ** 2 + (y - hy) ** 2 < (1.1 * r) ** 2
        c = _jit(CLOAK_RGB, rng, 0.04)
        _paint(img, m | hood, c)
        _paint(img, (x - cx) ** 2 / (0.55 * r) ** 2 + (y - hy - 0.1 * r) ** 2 / (0.6 * r) ** 2 < 1, c * 0.45)
        return None, (cx - torso_w / 2, top - 0.1 * r, cx + torso_w / 2, ground)
    color = _jit(HUE_RGB[spec.hue], rng)
    cy = (torso_top + torso_bottom) / 2
    if spec.form == "round":
        torso = ((x - cx) / (torso_w / 2)) ** 2 + ((y - cy) / (torso_h / 2)) ** 2 < 1
        head = (x - cx) ** 2 + (y - hy) ** 2 < r**2
    else:
        torso = (np.abs(x - cx) < torso_w / 2 * 0.92) & (np.abs(y - cy) < torso_h / 2)
        head = (np.abs(x - cx) < r * 0.92) & (np.abs(y - hy) < r * 0.92)
    _paint(img, torso | head, color)
    # the face: a light oval with two eyes
    fx, fy = 0.62 * r, 0.58 * r
    fc = hy + 0.08 * r
    _paint(img, ((x - cx) / fx) ** 2 + ((y - fc) / fy) ** 2 < 1, _jit(FACE_RGB, rng, 0.03))
    for dx in (-0.3, 0.3):
        _paint(img, (x - cx - dx * r) ** 2 + (y - fc + 0.12 * r) ** 2 < (0.13 * r + 0.6 * u) ** 2, (0.1, 0.1, 0.12))
    face = (cx - r, hy - r, cx + r, hy + r)
    return face, (cx - torso_w / 2, top, cx + torso_w / 2, ground)


def _draw_concept(img, concept: str | None, x, y, u, rng):
    cx = 32 * u + rng.uniform(-4, 4) * u
    s = rng.uniform(0.92, 1.08)
    if concept == "tree":
        _paint(img, (np.abs(x - cx) < 3.5 * u * s) & (y > 40 * u) & (y < 61 * u), _jit((0.45, 0.28, 0.12), rng))
        canopy = (x - cx) ** 2 + (y - 28 * u) ** 2 < (17 * u * s) ** 2
        _paint(img, canopy, _jit((0.12, 0.45, 0.15), rng))
    elif concept == "house":
        wall = (np.abs(x - cx) < 17 * u * s) & (y > 34 * u) & (y < 61 * u)
        roof = (y > 12 * u) & (y <= 34 * u) & (np.abs(x - cx) < (y - 12 * u) * 0.95 + 1)
        _paint(img, wall, _jit((0.85, 0.75, 0.55), rng))
        _paint(img, roof, _jit((0.55, 0.16, 0.12), rng))
        _paint(img, (np.abs(x - cx) < 4 * u) & (y > 46 * u) & (y < 61 * u), (0.3, 0.2, 0.1))
    elif concept == "boat":
        _paint(img, y > 52 * u, _jit((0.2, 0.4, 0.7), rng, 0.03))
        hull = (y > 42 * u) & (y < 53 * u) & (np.abs(x - cx) < 22 * u * s - (y - 42 * u) * 0.9)
        sail = (y > 10 * u) & (y < 40 * u) & (x > cx) & (x < cx + (y - 10 * u) * 0.6)
        _paint(img, hull, _jit((0.45, 0.25, 0.1), rng))
        _paint(img, sail, _jit((0.97, 0.97, 0.95), rng, 0.02))
        _paint(img, (np.abs(x - cx) < 1.2 * u) & (y > 8 * u) & (y < 43 * u), (0.25, 0.2, 0.15))
    elif concept == "sun":
        cy = 30 * u + rng.uniform(-3, 3) * u
        d2 = (x - cx) ** 2 + (y - cy) ** 2
        ang = np.arctan2(y - cy, x - cx)
        rays = (d2 < (24 * u * s) ** 2) & (np.cos(8 * ang) > 0.55)
        _paint(img, rays, _jit((0.98, 0.65, 0.15), rng))
        _paint(img, d2 < (13 * u * s) ** 2, _jit((0.99, 0.86, 0.2), rng, 0.03))
    else:
        raise ValueError(f"`concept` must be one of {list(CONCEPTS)}; got {concept!r}")


# ------------------------------------------------------------------------------------------------ sampling specs
def sample_identity(role: str, rng: np.random.Generator, fixed: dict[str, str] | None = None) -> dict[str, str]:
    """Draw {axis: class} for `role` from its designed skew; axes in `fixed` are taken as given."""
    r = ROLE_BY_NAME[role]
    out = {}
    for axis, classes in TOY_AXES.items():
        if fixed and axis in fixed:
            out[axis] = fixed[axis]
        else:
            out[axis] = classes[int(rng.choice(len(classes), p=np.asarray(r.skew[axis])))]
    return out


def spec_from_caption(text: str, rng: np.random.Generator) -> Spec:
    """A spec that renders `text` faithfully: named axes fixed, the rest from the role's skew."""
    c = parse_caption(text)
    if c["concept"] and not c["role"]:
        return Spec("concept", concept=c["concept"])
    if not c["role"]:
        raise ValueError(f"caption {text!r} names no toy-world role or concept")
    ident = sample_identity(c["role"], rng, c["identity"])
    return Spec("figure", role=c["role"], hidden=c["hidden"], **ident)


def render_batch(specs: list[Spec], seed: int, size: int = SIZE) -> tuple[np.ndarray, list[Truth]]:
    """Render specs with one seeded generator -> (uint8 [N, size, size, 3], truths)."""
    rng = np.random.default_rng(seed)
    imgs, truths = [], []
    for s in specs:
        im, t = render(s, rng, size)
        imgs.append(im)
        truths.append(t)
    return np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8), truths


__all__ = ["BACKGROUNDS", "HUE", "HUE_RGB", "SIZE", "Spec", "Truth", "render", "render_batch", "sample_identity",
           "spec_from_caption"]  # fmt: skip
