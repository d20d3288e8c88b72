"""`popalign` command line: one entry point, one sub-command per job (`COMMANDS`; ``popalign --help`` lists them).

popalign demo [...]              the demo on the embedded default (popalign_core/experiments/demo.py)
popalign train --config F        LoRA / full fine-tuning with a loss of the zoo (popalign_core/train/trainer.py)
popalign dal --config F          distributional alignment to a stated target (popalign_core/dal/trainer.py)
popalign dal-toy [...]           the DAL acceptance run on the toy world (popalign_core/experiments/dal_toy.py)
popalign efficacy run|report|list   the efficacy study: what limits held-out transfer (experiments/efficacy.py)
popalign data augment|sample|filter|build|pipeline   population data (popalign_core/population/pipeline.py)
popalign audit [...]             bias audit of a model or an image folder; audit compare A B (evaluate/audit.py)
popalign losses [--json]         the loss zoo with each loss's default hyper-parameters
popalign mog [...]               PopAlign Sec. 5: the 1-D mixture-of-Gaussians experiment
popalign toyworld build|check|render   the toy world (popalign_core/toyworld/)

Every command answers a user mistake with one line naming the input and exit status 2 (`userinput.command`;
``--debug`` or POPALIGN_DEBUG=1 shows the traceback); docs/errors.md lists what each command refuses.
"""

from __future__ import annotations

import json
import os
import sys

from popalign_core.common.userinput import ArgumentParser, command


@command("popalign losses")
def _losses(argv: list[str]) -> int:
    ap = ArgumentParser(prog="popalign losses", description="List the loss zoo and its defaults.")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = ap.parse_args(argv)
    import dataclasses

    from popalign_core.train.losses import LOSSES, loss_config

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
    "demo": ("popalign_core.experiments.demo", "the demo on the embedded default"),
    "train": ("popalign_core.train.trainer", "LoRA / full fine-tuning with a loss of the zoo (--config run.yaml)"),
    "dal": (
        "popalign_core.dal.trainer",
        "distributional alignment (DAL + adjusted DFT) to a stated target (--config)",
    ),
    "dal-toy": ("popalign_core.experiments.dal_toy", "DAL acceptance run on the toy world (results.json)"),
    "efficacy": ("popalign_core.experiments.efficacy", "efficacy study on the toy world: run | report | list"),
    "data": ("popalign_core.population.pipeline", "population data: augment | sample | filter | build | pipeline"),
    "audit": (
        "popalign_core.evaluate.audit",
        "bias audit of a model or an image folder (audit compare A B: before/after)",
    ),
    "losses": (None, "list the loss zoo and its defaults"),
    "mog": ("popalign_core.experiments.mog", "PopAlign Sec. 5 1-D mixture-of-Gaussians experiment"),
    "toyworld": ("popalign_core.toyworld", "toy world: build (seeded, --preset full|ci), check, render"),
}


def main(argv: list[str] | None = None) -> int:
    argv = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in (sys.argv[1:] if argv is None else argv)]
    if argv and argv[0] == "--debug":  # popalign --debug CMD ...: tracebacks instead of one-line errors
        argv = [*argv[1:], "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        out = sys.stdout if argv else sys.stderr
        print("usage: popalign COMMAND [options]\n\ncommands:", file=out)
        for k, (_, h) in COMMANDS.items():
            print(f"  {k:8s} {h}", file=out)
        if not argv:
            print("popalign: error: a command is required (see popalign --help)", file=sys.stderr)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"popalign: error: unknown command {cmd!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if cmd == "losses":
        return _losses(rest)
    import importlib

    try:
        mod = importlib.import_module(COMMANDS[cmd][0])
    except ImportError as exc:  # a broken install: say which package is missing, in one line
        print(f"popalign {cmd}: error: cannot import {COMMANDS[cmd][0]} ({exc}); install the requirements: "
              "pip install -r requirements.txt", file=sys.stderr)  # fmt: skip
        return 2
    return int(mod.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
