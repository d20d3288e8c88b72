"""`popalign` command line: one entry point, one sub-command per job.

popalign demo [...]          the demo on the embedded default (see popalign_core/demo.py)
popalign dal --config F      distributional alignment to a stated target (popalign_core/dal_train.py)
popalign losses [--json]     the loss zoo with each loss's default hyper-parameters
popalign mog [...]           PopAlign Sec. 5: the 1-D mixture-of-Gaussians experiment
"""

from __future__ import annotations

import argparse
import json
import sys


def _losses(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="popalign losses", description="List the loss zoo and its defaults.")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = ap.parse_args(argv)
    import dataclasses

    from .losses import LOSSES, loss_config

    table = {}
    for name, spec in LOSSES.items():
        cfg = loss_config(name)
        table[name] = {
            "summary": spec.summary,
            "pairwise": spec.pairwise,
            "reference": spec.needs_ref,
            "defaults": dataclasses.asdict(cfg),
            "help": {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cfg)},
        }
    if a.json:
        print(json.dumps(table))
        return 0
    for name, row in table.items():
        kind = "pairwise" if row["pairwise"] else "per-sample"
        print(f"{name:9s} {kind:10s} {row['summary']}")
        for k, v in row["defaults"].items():
            print(f"    {k} = {v!r}: {row['help'][k]}")
    return 0


COMMANDS = {
    "demo": ("popalign_core.demo", "the demo on the embedded default"),
    "train": ("popalign_core.train", "LoRA / full fine-tuning with a loss of the zoo (--config run.yaml)"),
    "dal": ("popalign_core.dal_train", "distributional alignment (DAL + adjusted DFT) to a stated target (--config)"),
    "dal-toy": ("popalign_core.experiments.dal_toy", "DAL acceptance run on the toy world (results.json)"),
    "data": ("popalign_core.population", "population data: augment | sample | filter | build | pipeline"),
    "audit": ("popalign_core.audit", "bias audit of a model or an image folder (audit compare A B: before/after)"),
    "losses": (None, "list the loss zoo and its defaults"),
    "mog": ("popalign_core.experiments.mog", "PopAlign Sec. 5 1-D mixture-of-Gaussians experiment"),
    "toyworld": ("popalign_core.toyworld", "toy world: build (seeded, --preset full|ci), check, render"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: popalign COMMAND [options]\n\ncommands:")
        for k, (_, h) in COMMANDS.items():
            print(f"  {k:8s} {h}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"popalign: unknown command {cmd!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if cmd == "losses":
        return _losses(rest)
    import importlib

    mod = importlib.import_module(COMMANDS[cmd][0])
    return int(mod.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
