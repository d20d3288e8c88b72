"""Benchmark: expected-OT dynamic targets, method="fast" against method="monte_carlo" (the patent's N x N assignment
per draw), same draws, same result.

    python bench/ot_targets.py                       # N = 64, 512, 2000; K = 4; 64 draws
    python bench/ot_targets.py --n 4096 --k 8 --draws 128

Prints seconds per call for both methods, the ratio monte_carlo / fast, and checks that q is identical. The last
line printed is JSON.
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


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from popalign_core.ot import expected_ot_targets

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, action="append", default=None, help="batch sizes (default: 64, 512, 2000)")
    ap.add_argument("--k", type=int, default=4, help="classes (default: 4)")
    ap.add_argument("--draws", type=int, default=64, help="target draws (default: 64)")
    a = ap.parse_args(argv)
    rows = []
    for n in a.n or [64, 512, 2000]:
        p = np.random.default_rng(0).dirichlet(np.ones(a.k), size=n)
        t = np.full(a.k, 1.0 / a.k)
        res = {}
        for m in ("monte_carlo", "fast"):
            t0 = time.perf_counter()
            res[m] = expected_ot_targets(p, t, m, draws=a.draws, seed=1)
            res[m + "_s"] = time.perf_counter() - t0
        same = bool(np.array_equal(res["fast"], res["monte_carlo"]))
        row = {"n": n, "k": a.k, "draws": a.draws, "monte_carlo_s": round(res["monte_carlo_s"], 3),
               "fast_s": round(res["fast_s"], 3), "ratio": round(res["monte_carlo_s"] / res["fast_s"], 2),
               "identical": same}  # fmt: skip
        rows.append(row)
        print(f"N={n:5d} K={a.k}: monte_carlo {row['monte_carlo_s']:7.3f} s | fast {row['fast_s']:7.3f} s | "
              f"{row['ratio']:6.2f}x | identical q: {same}", flush=True)  # fmt: skip
    print(json.dumps({"results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
