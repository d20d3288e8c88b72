"""`popalign audit compare A B --out DIR`: a before / after table of two audits (per prompt and the mean over
prompts, each with its CI, and the change), written as ``compare.json`` (+ ``compare.md`` / ``compare.html`` /
``compare.png`` by `evaluate.report`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from popalign_core.common.fileio import claim_output_dir
from popalign_core.common.userinput import ArgumentParser
from popalign_core.evaluate.audit_files import load_audit, write_json
from popalign_core.evaluate.metrics import POOLED_NOTE

#: What `popalign audit compare` writes in its output folder (`fileio.claim_output_dir`).
COMPARE_OUTPUTS = {"compare.json": None, "compare.md": None, "compare.html": None, "compare.png": None}


def compare_audits(before: Any, after: Any, out_dir: str | os.PathLike, report: bool = True) -> dict[str, Any]:
    """Before / after table of two audits (dicts or audit.json paths): per prompt and the mean over prompts, each
    with its CI, and the change. Writes ``compare.json`` (+ ``compare.md`` / ``compare.html`` / plots)."""
    a = before if isinstance(before, dict) else load_audit(before)
    b = after if isinstance(after, dict) else load_audit(after)
    axes = [x for x in a["axes"] if x in b["axes"]]
    if not axes:
        raise ValueError(f"the audits share no axis: before {list(a['axes'])}, after {list(b['axes'])}")
    prompts = [p for p in a["prompts"] if p in b["prompts"]]
    if not prompts:
        raise ValueError(f"the audits share no prompt (before: {a['prompts'][:3]}, after: {b['prompts'][:3]}): there "
                         "is nothing to compare")  # fmt: skip
    table: dict[str, Any] = {}
    for axis in axes:
        da, db = a["axes"][axis]["discrepancy"], b["axes"][axis]["discrepancy"]
        rows = {}
        for p in prompts:
            ra, rb = da["per_prompt"].get(p, {}), db["per_prompt"].get(p, {})
            va, vb = ra.get("value"), rb.get("value")
            rows[p] = {
                "before": va,
                "before_ci": ra.get("ci"),
                "after": vb,
                "after_ci": rb.get("ci"),
                "change": (vb - va) if va is not None and vb is not None else None,
                "floor": rb.get("floor"),
            }
        ma, mb = da["mean_over_prompts"], db["mean_over_prompts"]
        table[axis] = {
            "classes": a["axes"][axis]["classes"],
            "per_prompt": rows,
            "mean_over_prompts": {
                "before": ma.get("value"),
                "before_ci": ma.get("ci"),
                "after": mb.get("value"),
                "after_ci": mb.get("ci"),
                "change": (mb["value"] - ma["value"])
                if ma.get("value") is not None and mb.get("value") is not None
                else None,
            },
            "pooled": {"before": da["pooled"].get("value"), "after": db["pooled"].get("value"), "note": POOLED_NOTE},
        }
    warnings = []
    if a["axes"][axes[0]]["discrepancy"].get("metric") != b["axes"][axes[0]]["discrepancy"].get("metric"):
        warnings.append("the audits use different labels (hard vs probabilistic): values are not comparable")
    if a["settings"].get("classifier") != b["settings"].get("classifier"):
        warnings.append("the audits use different classifiers")
    missing = sorted(set(a["prompts"]) ^ set(b["prompts"]))
    if missing:
        warnings.append(f"prompts in only one audit are left out: {missing}")
    result = {
        "before": {"settings": a["settings"]},
        "after": {"settings": b["settings"]},
        "prompts": prompts,
        "axes": table,
        "warnings": warnings,
    }
    out = Path(out_dir)
    claim_output_dir(out, "audit compare", COMPARE_OUTPUTS, signature="compare.json")
    write_json(out / "compare.json", result)
    if report:
        from popalign_core.evaluate.report import write_compare_report

        result["report"] = write_compare_report(result, out)
    return result


def compare_main(argv: list[str]) -> int:
    """`popalign audit compare BEFORE AFTER --out DIR` (argv: the arguments after ``compare``)."""
    cp = ArgumentParser(prog="popalign audit compare", description="Before / after table of two audits.")
    cp.add_argument("before", help="audit.json (or its folder) before")
    cp.add_argument("after", help="audit.json (or its folder) after")
    cp.add_argument("--out", required=True)
    a = cp.parse_args(argv)
    res = compare_audits(a.before, a.after, a.out)
    for axis, t in res["axes"].items():
        m = t["mean_over_prompts"]
        print(f"{axis}: mean over prompts {m['before']} -> {m['after']}")
    return 0
