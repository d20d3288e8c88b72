"""``popalign data``: the population data pipeline (PopAlign Sec. 4.1).

``popalign data augment --prompts FILE --out augmented.jsonl [--keywords default|toy|FILE.json] [--axes race,gender]
[--template T] [--samples-per-prompt N] [--seed S]``: identity-neutral prompts -> identity-augmented prompts, one
JSONL row per sample ({"neutral", "prompt", "identity", "index"}). Prompts that already name an identity are
reported and not augmented (`prompts.is_identity_specific`). The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .prompts import AUGMENT_KEYWORDS, DEFAULT_KEYWORDS, AugmentConfig, augment_prompts


def read_prompt_file(path: str | Path) -> tuple[list[str], dict[str, Any]]:
    """Prompts of a text file (one per line; ``#`` starts a comment line; blank lines skipped) and a report
    {"blank_lines": [line numbers], "duplicate_lines": [line numbers]} (duplicates: later copies, dropped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {str(p)!r} does not exist")
    prompts, seen, blank, dup = [], set(), [], []
    for no, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        text = " ".join(line.split())
        if not text:
            blank.append(no)
            continue
        if text.startswith("#"):
            continue
        if text in seen:
            dup.append(no)
            continue
        seen.add(text)
        prompts.append(text)
    if not prompts:
        raise ValueError(f"prompts file {str(p)!r} holds no prompt (only blank or # comment lines)")
    return prompts, {"blank_lines": blank, "duplicate_lines": dup}


def keyword_sets(spec: str) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, list[str]]], tuple[str, ...]]:
    """(augmentation keywords, detector keywords, default axes) for --keywords: "default" (the paper's gender and
    race keywords; age optional), "toy" (the toy world's) or a JSON file {axis: {class: [keyword, ...]}} (the
    first keyword of each class is written by augmentation, all of them are detected)."""
    if spec == "default":
        return {a: dict(v) for a, v in AUGMENT_KEYWORDS.items()}, DEFAULT_KEYWORDS, ("race", "gender")
    if spec == "toy":
        from .toyworld.world import KEYWORDS

        detect = {a: {c: list(k) for c, k in v.items()} for a, v in KEYWORDS.items()}
        return {a: {c: k[0] for c, k in v.items()} for a, v in detect.items()}, detect, ("form",)
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"--keywords must be 'default', 'toy' or a JSON file; {spec!r} is none of them")
    try:
        detect = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--keywords {spec!r}: not valid JSON ({e})") from e
    from .prompts import check_keyword_config

    try:
        check_keyword_config(detect)
    except ValueError as e:
        raise ValueError(f"--keywords {spec!r}: {e}") from e
    return {a: {c: list(k)[0] for c, k in v.items()} for a, v in detect.items()}, detect, tuple(detect)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="popalign data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    aug = sub.add_parser("augment", help="identity-neutral prompts -> identity-augmented prompts (JSONL)")
    aug.add_argument("--prompts", required=True, help="text file: one neutral prompt a line, # comments")
    aug.add_argument("--out", required=True, help="output JSONL (one row per augmented sample)")
    aug.add_argument("--keywords", default="default", help="'default' (paper's gender/race), 'toy', or a JSON file")
    aug.add_argument("--axes", default=None, help="comma-separated axes to combine (default: race,gender; toy: form)")
    aug.add_argument("--template", default=None, help=f"augmentation template (default: {AugmentConfig.template!r})")
    aug.add_argument("--samples-per-prompt", type=int, default=12, help="augmented samples per neutral prompt")
    aug.add_argument("--seed", type=int, default=0, help="seed of the identity order")
    a = ap.parse_args(argv)
    try:
        prompts, report = read_prompt_file(a.prompts)
        keywords, detect, axes = keyword_sets(a.keywords)
        cfg = AugmentConfig(
            axes=tuple(x.strip() for x in a.axes.split(",")) if a.axes else axes,
            keywords=keywords,
            samples_per_prompt=a.samples_per_prompt,
            seed=a.seed,
            detect=detect,
            **({"template": a.template} if a.template else {}),
        )
        res = augment_prompts(prompts, cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"popalign data augment: error: {e}", file=sys.stderr)
        return 2
    from .data import write_manifest

    write_manifest(a.out, res.rows)
    for s in res.skipped:
        terms = ", ".join(f"{t['term']} ({t['axis']}={t['class']})" for t in s["terms"])
        print(f"skipped (identity-specific): {s['prompt']!r}: {terms}", file=sys.stderr)
    summary = {
        "out": str(a.out),
        "neutral_prompts": len(prompts) - len(res.skipped),
        "rows": len(res.rows),
        "identities": len(cfg.identities()),
        "skipped": res.skipped,
        **report,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
