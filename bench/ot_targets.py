"""Benchmark: expected-OT dynamic targets. Time and error of every method of `ot.expected_ot_targets` against the
public code's method (Monte-Carlo over 100 target draws, one exact N x N assignment per draw).

    python bench/ot_targets.py                          # N in {16, 64, 256}, K in {2, 4, 8, 16} (minutes on 2 cores)
    python bench/ot_targets.py --n 16 --n 64 --k 2 --k 4 --ref-draws 2000     # a smaller grid
    python bench/ot_targets.py --scaling                # fast vs monte_carlo for large N (N = 512, 2000; K = 4)

For each (N, K), probabilities p_i ~ Dirichlet(1) (seeded) and the uniform target:
  public       monte_carlo, 100 draws (the public code's K = 8 method; the baseline of the ratios)
  exact        closed form for K = 2, enumeration of the target count vectors otherwise ("-" when there are more than
               `max_count_vectors` = 20000 of them: intractable)
  monte_carlo  `--draws` draws (default 256) of the same estimator
  fast         `--draws` draws; sorted, de-duplicated draws warm-started by successive shortest paths (identical to
               monte_carlo with the same draws)
Error = mean |q - q_ref| over the N x K entries, where q_ref is `exact` where tractable, else `fast` with
`--ref-draws` (default 10^4) draws. Time ratio = public seconds / method seconds. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def grid(ns, ks, draws: int, ref_draws: int) -> list[dict]:
    import numpy as np

    from popalign_core.dal.ot import expected_ot_targets

    rows = []
    for n in ns:
        for k in ks:
            p = np.random.default_rng([n, k]).dirichlet(np.ones(k), size=n)
            t = np.full(k, 1.0 / k)
            res: dict = {}
            res["public"] = _timed(expected_ot_targets, p, t, "monte_carlo", draws=100, seed=1)
            try:
                res["exact"] = _timed(expected_ot_targets, p, t, "exact")
            except ValueError:
                res["exact"] = None  # too many count vectors
            res["monte_carlo"] = _timed(expected_ot_targets, p, t, "monte_carlo", draws=draws, seed=2)
            res["fast"] = _timed(expected_ot_targets, p, t, "fast", draws=draws, seed=2)
            if res["exact"] is not None:
                ref, ref_name = res["exact"][0], "exact"
            else:
                ref, ref_name = expected_ot_targets(p, t, "fast", draws=ref_draws, seed=3), f"fast@{ref_draws}"
            row = {"n": n, "k": k, "reference": ref_name}
            base = res["public"][1]
            for m, r in res.items():
                if r is None:
                    row[m] = None
                    continue
                q, s = r
                row[m] = {"seconds": round(s, 4), "error": float(np.abs(q - ref).mean()), "ratio": round(base / s, 2)}
            rows.append(row)

            def fmt(m, row=row):
                r = row[m]
                return f"{m} -" if r is None else f"{m} {r['seconds']:.3f}s err {r['error']:.4f} ({r['ratio']}x)"

            print(f"N={n:4d} K={k:2d} ref={ref_name:10s} | " + " | ".join(fmt(m) for m in res), flush=True)
    return rows


def scaling(ns, k: int, draws: int) -> list[dict]:
    import numpy as np

    from popalign_core.dal.ot import expected_ot_targets

    rows = []
    for n in ns:
        p = np.random.default_rng(0).dirichlet(np.ones(k), size=n)
        t = np.full(k, 1.0 / k)
        mc, s_mc = _timed(expected_ot_targets, p, t, "monte_carlo", draws=draws, seed=1)
        fa, s_fa = _timed(expected_ot_targets, p, t, "fast", draws=draws, seed=1)
        row = {"n": n, "k": k, "draws": draws, "monte_carlo_s": round(s_mc, 3), "fast_s": round(s_fa, 3),
               "ratio": round(s_mc / s_fa, 2), "identical": bool(np.array_equal(mc, fa))}  # fmt: skip
        rows.append(row)
        print(f"N={n:5d} K={k}: monte_carlo {s_mc:7.3f} s | fast {s_fa:7.3f} s | {row['ratio']:6.2f}x | "
              f"identical q: {row['identical']}", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, action="append", default=None, help="batch sizes (default: 16, 64, 256)")
    ap.add_argument("--k", type=int, action="append", default=None, help="classes (default: 2, 4, 8, 16)")
    ap.add_argument("--draws", type=int, default=256, help="draws of monte_carlo and fast (default: 256)")
    ap.add_argument("--ref-draws", type=int, default=10_000, help="draws of the reference where exact is intractable")
    ap.add_argument("--scaling", action="store_true", help="fast vs monte_carlo at N = 512, 2000 (K = 4, 64 draws)")
    a = ap.parse_args(argv)
    if a.scaling:
        out = {"scaling": scaling(a.n or [512, 2000], (a.k or [4])[0], 64)}
    else:
        out = {"grid": grid(a.n or [16, 64, 256], a.k or [2, 4, 8, 16], a.draws, a.ref_draws)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
