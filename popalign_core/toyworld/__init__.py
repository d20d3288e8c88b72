"""The toy world: a small, reproducible text-to-image world with a real, designed bias (docs/toyworld.md).

``popalign toyworld build --out DIR [--preset full|ci] [--seed N] [--overwrite]``  seeded build
``popalign toyworld check [--model DIR] [--n 400]``                              designed vs measured bias
``popalign toyworld render --prompt "a photo of a tall baker" --out grid.png``   renderer ground truth
"""

from __future__ import annotations

import sys

from popalign_core.common.userinput import ArgumentParser, UsageError, command, integer


def _prog(argv: list[str]) -> str:
    sub = argv[0] if argv else ""
    return f"popalign toyworld {sub}" if sub in ("build", "check", "render") else "popalign toyworld"


@command(_prog)
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = argv[0] if argv else ""
    if sub == "check":
        from popalign_core.toyworld.check import main as check_main

        return check_main(argv[1:])
    if sub == "build":
        from popalign_core.toyworld.build import PRESETS, BuildConfig, build

        ap = ArgumentParser(prog="popalign toyworld build", description="Seeded toy-world build.")
        ap.add_argument("--out", required=True, help="output folder (a diffusers folder + classifiers/)")
        ap.add_argument("--preset", default="full", choices=sorted(PRESETS))
        ap.add_argument("--seed", type=integer, default=0)
        ap.add_argument("--threads", type=integer, default=0, help="torch threads (0: default)")
        ap.add_argument(
            "--overwrite",
            action="store_true",
            help="replace an earlier toy-world build in --out (only a build, holding nothing else)",
        )
        ap.add_argument(
            "--classifiers-only",
            action="store_true",
            help="retrain only the classifiers and face bank of the build in --out (its VAE and recorded config)",
        )
        a = ap.parse_args(argv[1:])
        if a.classifiers_only:
            from popalign_core.toyworld.build import rebuild_classifiers

            rebuild_classifiers(a.out, progress=lambda m: print(m, file=sys.stderr, flush=True))
            return 0
        cfg = BuildConfig(seed=a.seed, threads=a.threads, **PRESETS[a.preset])
        build(a.out, cfg, overwrite=a.overwrite, progress=lambda m: print(m, file=sys.stderr, flush=True))
        return 0
    if sub == "render":
        import numpy as np
        from PIL import Image

        from popalign_core.toyworld.render import render, spec_from_caption

        ap = ArgumentParser(prog="popalign toyworld render", description="Render toy captions faithfully.")
        ap.add_argument("--prompt", action="append", required=True, help="a toy caption (repeatable)")
        ap.add_argument("--n", type=integer, default=8, help="images per prompt")
        ap.add_argument("--seed", type=integer, default=0)
        ap.add_argument("--out", required=True, help="PNG grid (one row per prompt)")
        a = ap.parse_args(argv[1:])
        if not a.out.lower().endswith(".png"):
            raise ValueError(f"--out {a.out!r}: the grid is written as PNG; give a file name ending in .png")
        if not 1 <= a.n <= 1000:
            raise ValueError(f"--n {a.n}: expected an integer in [1, 1000] (images per prompt, one grid row)")
        from PIL.PngImagePlugin import PngInfo

        from popalign_core.common.fileio import PNG_SOFTWARE_KEY, atomic_path, check_replaceable, png_software

        tag = "popalign toyworld render"
        check_replaceable(a.out, tag, lambda p: png_software(p) == tag)
        rng = np.random.default_rng(a.seed)
        rows = [np.concatenate([render(spec_from_caption(p, rng), rng)[0] for _ in range(a.n)], axis=1)
                for p in a.prompt]  # fmt: skip
        info = PngInfo()
        info.add_text(PNG_SOFTWARE_KEY, tag)
        with atomic_path(a.out) as tmp:
            Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG", pnginfo=info)
        print(f"wrote {a.out}")
        return 0
    if sub in ("-h", "--help"):
        print("usage: popalign toyworld {build,check,render} [options]  (--help on each)")
        return 0
    raise UsageError(
        f"unknown sub-command {sub!r}; valid: build, check, render (see popalign toyworld --help)"
        if sub
        else "a sub-command is required: build, check or render (see popalign toyworld --help)"
    )
