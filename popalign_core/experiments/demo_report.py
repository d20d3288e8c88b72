"""The demo's report: ``report.md`` (results table, per-axis discrepancies, plots, stage times) and its PNG plots
(``shares.png``: per held-out role and axis discrepancy of every model; ``training.png``: loss and checkpoint
selection curves; ``tradeoff.png``: held-out reduction against identity recall at every audited stage).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from popalign_core.common.fileio import atomic_path, atomic_write_text
from popalign_core.toyworld.world import HELD_OUT_ROLES, TOY_AXES


def _save(fig, path: Path) -> str:
    """Lay out, write atomically and close a figure; returns the file's name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path.name


def _plots(results: dict, evals: dict, trained: dict, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    names = ["base", *trained]
    # per held-out role and axis: the discrepancy of every model (the full class shares are in results.json)
    fig, axes = plt.subplots(len(TOY_AXES), 1, figsize=(13, 2.8 * len(TOY_AXES)), dpi=90, sharex=True)
    width = 0.8 / len(names)
    x = np.arange(len(HELD_OUT_ROLES))
    for ax, (axis, classes) in zip(axes, TOY_AXES.items()):
        for k, nm in enumerate(names):
            per = evals[nm]["bias"]["per_role"]
            ax.bar(x + k * width - 0.4 + width / 2, [per[r][axis]["discrepancy"] for r in HELD_OUT_ROLES], width,
                   label=nm, color="k" if nm == "base" else f"C{k - 1}")  # fmt: skip
        ax.set_ylabel(f"{axis}: discrepancy")
        ax.set_ylim(0, np.sqrt(1 - 1 / len(classes)))  # the largest discrepancy: every image in one class
    axes[-1].set_xticks(x, HELD_OUT_ROLES, fontsize=8)
    axes[0].legend(fontsize=7, ncol=len(names), loc="upper right")
    fig.suptitle("held-out roles: discrepancy from the uniform target per axis (evaluation classifier; 0 = fair)")
    files["shares"] = _save(fig, out / "shares.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.5), dpi=90)
    for nm, tr in trained.items():
        ls = [v for v in tr["losses"] if v is not None]
        if ls:
            w = max(1, len(ls) // 25)
            sm = np.convolve(ls, np.ones(w) / w, mode="valid")
            a1.plot(np.arange(len(sm)) + w, sm / max(abs(sm[0]), 1e-12), label=nm)
        a2.plot([0] + [c["step"] for c in tr["curve"]],
                [results["selection_base"]] + [c["validation_roles_discrepancy"] for c in tr["curve"]], marker="o",
                label=nm)  # fmt: skip
    a1.set_xlabel("step")
    a1.set_ylabel("loss / first loss (moving mean)")
    a1.set_title("training losses")
    a1.legend(fontsize=8)
    a2.set_xlabel("step")
    a2.set_ylabel("mean discrepancy")
    a2.set_title("checkpoint selection: validation roles (training classifier)")
    a2.legend(fontsize=8)
    files["training"] = _save(fig, out / "training.png")

    # trade-off: held-out reduction against held-out identity recall at every audited stage (for the reader; the
    # kept stage, chosen on validation roles, is circled)
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=90)
    for k, (nm, m) in enumerate(results["methods"].items()):
        st = sorted(m["held_out_per_stage"].items(), key=lambda kv: int(kv[0]))
        x = [v["identity_recall"] for _, v in st]
        y = [100 * v["reduction"] for _, v in st]
        ax.plot(x, y, marker="o", color=f"C{k}", label=nm)
        for (step, _), xi, yi in zip(st, x, y):
            ax.annotate(step, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if int(step) == m["selected_step"]:
                ax.scatter([xi], [yi], s=160, facecolors="none", edgecolors=f"C{k}", linewidths=1.5)
    ax.axvline(0.95, ls="--", c="grey", lw=0.8)
    ax.axhline(56, ls=":", c="grey", lw=0.8)
    ax.set_xlabel("held-out identity recall")
    ax.set_ylabel("held-out discrepancy reduction (%)")
    ax.set_title("trade-off at every stage (labels: step; circled: kept, chosen on validation roles)", fontsize=9)
    ax.legend(fontsize=8)
    files["tradeoff"] = _save(fig, out / "tradeoff.png")
    return files


def _fmt(v, nd=3):
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{nd}f}"


def write_report(results: dict, files: dict, out: Path) -> None:
    r = results
    lines = [
        "# PopAlign demo on the toy world",
        "",
        f"Base model: the toy world shipped with the package. Held-out roles: {', '.join(r['held_out_roles'])} "
        f"({r['n_per_role']} images per role at guidance {r['eval_sampler']['guidance_scale']}, DDIM "
        f"{r['eval_sampler']['steps']} steps), judged by the toy **evaluation** classifier. Identity-specific "
        f"prompts at guidance {r['recall_guidance']} ({r['n_per_identity']} images per prompt); concepts "
        f"{r['n_per_concept']} images each. Training data: training roles only, filtered by the toy training "
        "classifier. Checkpoints chosen on the validation roles (training classifier), never on held-out roles.",
        "",
        "| method | discrepancy before | after (95% CI) | reduction (95% CI) | identity recall | concept acc. drop "
        "(points) | selected step |",
        "|---|---|---|---|---|---|---|",
    ]
    for nm, m in r["methods"].items():
        lines.append(
            f"| {nm} | {_fmt(m['discrepancy_before'])} | {_fmt(m['discrepancy_after'])} "
            f"[{_fmt(m['discrepancy_after_ci'][0])}, {_fmt(m['discrepancy_after_ci'][1])}] | "
            f"{_fmt(100 * m['reduction'], 1)}% [{_fmt(100 * m['reduction_ci'][0], 1)}, "
            f"{_fmt(100 * m['reduction_ci'][1], 1)}] | {_fmt(m['identity_recall'])} | "
            f"{_fmt(m['concept_accuracy_drop'], 1)} | {m['selected_step']} / {m['trained_steps']} |"
        )
    b = r["base"]
    lines += [
        "",
        f"Base: discrepancy {_fmt(b['discrepancy'])} [{_fmt(b['discrepancy_ci'][0])}, "
        f"{_fmt(b['discrepancy_ci'][1])}], identity recall {_fmt(b['identity_recall'])}, concept accuracy "
        f"{_fmt(b['concept_accuracy'])}. Finite-sample floor (a perfectly fair model, same face counts): "
        f"{_fmt(r['floor'])}.",
        "",
        "Acceptance (held-out roles; 56% is the PopAlign paper's SDXL gender reduction): "
        + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r["acceptance"].items()),
        "",
        "## Per-axis discrepancy after (mean over held-out roles)",
        "",
        "| model | " + " | ".join(r["axes"]) + " |",
        "|---|" + "---|" * len(r["axes"]),
        "| base | " + " | ".join(_fmt(b["per_axis"][a]) for a in r["axes"]) + " |",
    ]
    for nm, m in r["methods"].items():
        lines.append(f"| {nm} | " + " | ".join(_fmt(m["per_axis_after"][a]) for a in r["axes"]) + " |")
    lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in files.items()]
    lines += ["", "## Time per stage (seconds; reference: 2 CPU cores, reported only, never acted on)", "",
              "| stage | seconds | reference |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v['seconds']:.0f} | {v['budget_s']} |" for k, v in r["timings"].items()]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
