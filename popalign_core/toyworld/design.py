"""How the toy world's roles and their skews were drawn (seeded): the generator behind the table in `world.py`.

Roles are built from shared parts, the way occupations share meaning in a real text encoder: each role is one
(``setting``, ``shade``) pair - a background pattern (8) and a grey level (7), 56 roles in all - and its skew on
every axis is a sum of the parts' contributions plus a small role-specific term, passed through a sigmoid
(binary axes) or a softmax (``hue``):

    logit P(round | role)   = f_setting[s] + f_shade[g] + e_role,     f ~ N(0, 1.0^2), e ~ N(0, 0.35^2)
    logit P(tall | role)    = same form with its own draws
    logits P(hue | role)    = h_setting[s] + h_shade[g] + e_role,     h ~ N(0, 1.4^2 I_4), e ~ N(0, 0.35^2 I_4)

The probabilities are rounded to 2 decimals (hue: the largest class absorbs the rounding). The held-out roles
(14: two per shade, at most two per setting) and the validation roles (8: one per setting, at most two per shade)
are drawn by seeded rejection until the held-out set holds strong skews (>= 0.85) in both directions on every
binary axis and towards at least two hue classes. Everything else is a training role.

`draw_world(seed)` returns the design; `world.py` holds the result for seed 0 as a literal table (so that a NumPy
release that changes a distribution's stream cannot silently change the world the shipped model was built on), and
a test checks that the two agree.
"""

from __future__ import annotations

import itertools

import numpy as np

NAMES = (
    "baker pilot farmer painter miner sailor guard clerk chef medic tailor judge smith ranger nurse doctor teacher "
    "lawyer driver singer dancer writer cook barber butcher plumber carpenter mason potter weaver hunter fisher "
    "soldier officer banker porter waiter cleaner gardener builder trader merchant priest monk scholar poet actor "
    "artist pianist drummer surgeon dentist jester knight archer courier"
).split()
N_SETTINGS, N_SHADES = 8, 7
SD_PART, SD_ROLE, SD_HUE = 1.0, 0.35, 1.4
N_HELD_OUT_PER_SHADE, STRONG = 2, 0.85


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def _rounded_hue(h: np.ndarray) -> tuple[float, ...]:
    h = np.round(h, 2)
    h[np.argmax(h)] += round(1.0 - float(h.sum()), 2)
    return tuple(round(float(x), 2) for x in h)


def _strong_both_ways(rows: list[tuple]) -> bool:
    form = [r[3] for r in rows]
    tall = [r[5] for r in rows]
    hue = np.array([r[4] for r in rows])
    return (max(form) >= STRONG and min(form) <= 1 - STRONG and max(tall) >= STRONG and min(tall) <= 1 - STRONG
            and int(((hue >= STRONG).sum(0) > 0).sum()) >= 2)  # fmt: skip


def draw_world(seed: int = 0) -> dict:
    """The world of `seed`: {"roles": [(name, setting, shade, P(round), P(hue), P(tall)), ...],
    "held_out": [names], "validation": [names]}."""
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(range(N_SHADES), range(N_SETTINGS)))
    perm = rng.permutation(len(combos))
    parts = {n: combos[perm[i]] for i, n in enumerate(NAMES)}
    f_set, f_shade = rng.normal(0, SD_PART, N_SETTINGS), rng.normal(0, SD_PART, N_SHADES)
    t_set, t_shade = rng.normal(0, SD_PART, N_SETTINGS), rng.normal(0, SD_PART, N_SHADES)
    h_set, h_shade = rng.normal(0, SD_HUE, (N_SETTINGS, 4)), rng.normal(0, SD_HUE, (N_SHADES, 4))
    rows = []
    for n in NAMES:
        g, s = parts[n]
        form = _sigmoid(f_set[s] + f_shade[g] + rng.normal(0, SD_ROLE))
        tall = _sigmoid(t_set[s] + t_shade[g] + rng.normal(0, SD_ROLE))
        h = h_set[s] + h_shade[g] + rng.normal(0, SD_ROLE, 4)
        h = np.exp(h - h.max())
        rows.append((n, s, g, round(form, 2), _rounded_hue(h / h.sum()), round(tall, 2)))
    by = {r[0]: r for r in rows}
    srng = np.random.default_rng(seed + 1)
    while True:
        held = [
            str(x)
            for g in range(N_SHADES)
            for x in srng.choice([n for n in NAMES if parts[n][0] == g], N_HELD_OUT_PER_SHADE, replace=False)
        ]
        if np.bincount([parts[n][1] for n in held], minlength=N_SETTINGS).max() <= 2 and _strong_both_ways(
            [by[n] for n in held]
        ):
            break
    rest = [n for n in NAMES if n not in held]
    while True:
        val = [str(srng.choice([n for n in rest if parts[n][1] == s])) for s in range(N_SETTINGS)]
        if np.bincount([parts[n][0] for n in val], minlength=N_SHADES).max() <= 2:
            break
    return {"roles": rows, "held_out": held, "validation": val}
