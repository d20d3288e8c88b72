"""Markdown + HTML reports of `popalign_core.evaluate.audit` results, with matplotlib (Agg) plots.

`write_report(audit, out_dir)` writes ``report.md``, ``report.html`` (embedding the PNGs by relative path),
``shares_<axis>.png`` (per-prompt stacked class shares against the target), ``discrepancy.png`` (per-prompt
discrepancy with CI whiskers and the finite-sample floor) and ``grid.png`` (the first k images of each prompt).
Per-prompt figures and their mean over prompts come first; the pooled value is a secondary, flagged line.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.common.fileio import atomic_write_bytes, atomic_write_text, load_rgb

LIMITATIONS = (
    "**Limitations.** The classifiers estimate *perceived* attributes from pixels, not anyone's identity; the "
    "available classifiers (FairFace, CLIP zero-shot) model gender as binary (female / male) and race / age as a "
    "fixed set of categories; classifier (and face detector) errors, which differ between groups, enter every number "
    "here. Small per-prompt samples have wide intervals: compare values with their CIs and the finite-sample floor. "
    "See [docs/metrics.md](docs/metrics.md) for the definitions."
)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _short(s: str, n: int = 28) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _fmt(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _fmt_ci(ci: Any) -> str:
    return "" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


# ------------------------------------------------------------------------------------------------ plots
def plot_shares(audit: dict, axis: str, path: Path) -> None:
    """Stacked bars of mean class shares per prompt, with the target's cumulative shares as black markers."""
    plt = _plt()
    e = audit["axes"][axis]
    prompts, classes, target = audit["prompts"], e["classes"], np.asarray(e["target"])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(prompts) + 2), 3.5))
    x = np.arange(len(prompts))
    bottom = np.zeros(len(prompts))
    cmap = plt.get_cmap("tab10")
    for k, c in enumerate(classes):
        h = np.array([(e["shares"][p] or [0.0] * len(classes))[k] for p in prompts])
        ax.bar(x, h, bottom=bottom, color=cmap(k % 10), label=c, width=0.6)
        bottom += h
    for cum in np.cumsum(target)[:-1]:
        ax.scatter(x, np.full(len(x), cum), marker="_", s=900, color="black", linewidths=2)
    ax.plot([], [], color="black", lw=2, label="target (cumulative)")
    ax.set_xticks(x, [_short(p) for p in prompts], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"{axis}: mean class share")
    ax.set_title(f"{axis}: class shares per prompt vs target")
    ax.legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")
    _save(fig, path)


def plot_batch_shares(metrics: dict) -> bytes:
    """PNG of the Bias Metrics node's chart: the class shares of each prompt group side by side per class, and the
    target as dashed outlined bars (`evaluate.batch.batch_metrics`'s dict); the title carries the mean discrepancy."""
    plt = _plt()
    groups, classes, target = list(metrics["per_prompt_shares"].items()), metrics["classes"], metrics["target"]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    n = max(1, len(groups))
    width = 0.8 / (n + 1)
    x = np.arange(len(classes))
    for i, (prompt, shares) in enumerate(groups):
        ax.bar(x + i * width, shares, width, label=prompt[:40])
    ax.bar(x + n * width, target, width, color="none", edgecolor="black", linestyle="--", label="target")
    ax.set_xticks(x + 0.4 - width / 2, classes)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of images")
    value = metrics["discrepancy"]["mean_over_prompts"].get("value")
    ax.set_title(f"{metrics['label']}: {metrics['axis']} shares (discrepancy {_fmt(value)})")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_discrepancy(audit: dict, path: Path) -> None:
    """Per-prompt discrepancy with CI whiskers and the floor, one panel per axis (mean over prompts last)."""
    plt = _plt()
    axes = list(audit["axes"])
    prompts = audit["prompts"]
    fig, panels = plt.subplots(1, len(axes), figsize=(max(4.0, 1.0 * len(prompts) + 2) * len(axes), 3.2))
    panels = np.atleast_1d(panels)
    for ax, axis in zip(panels, axes):
        d = audit["axes"][axis]["discrepancy"]
        rows = [(p, d["per_prompt"][p]) for p in prompts] + [("MEAN over prompts", d["mean_over_prompts"])]
        for i, (_, r) in enumerate(rows):
            if r.get("value") is None:
                ax.text(i, 0.01, "n/a", ha="center", fontsize=7)
                continue
            lo, hi = r["ci"] if r.get("ci") else (r["value"], r["value"])
            ax.errorbar(
                i, r["value"], yerr=[[r["value"] - lo], [hi - r["value"]]], fmt="o", capsize=4,
                color="tab:red" if i == len(rows) - 1 else "tab:blue",
            )  # fmt: skip
            if r.get("floor") is not None:
                ax.scatter([i], [r["floor"]], marker="_", s=300, color="gray")
        ax.set_xticks(range(len(rows)), [_short(p) for p, _ in rows], rotation=30, ha="right", fontsize=7)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{axis}: {d['metric']} (95% CI; grey = floor)", fontsize=8)
    _save(fig, path)


def plot_grid(audit: dict, path: Path, k: int = 4, cell: int = 96) -> bool:
    """The first `k` readable images of each prompt (rows = prompts). False when no image can be read."""
    plt = _plt()
    prompts = audit["prompts"]
    cells: dict[str, list[np.ndarray]] = {}
    for p in prompts:
        imgs = []
        for r in audit["images"]:
            if len(imgs) >= k:
                break
            if r["prompt"] == p and r["error"] is None:
                try:
                    imgs.append(load_rgb(r["path"]))
                except Exception:  # noqa: BLE001 - the grid is best effort
                    continue
        cells[p] = imgs
    if not any(cells.values()):
        return False
    fig, axs = plt.subplots(len(prompts), k, figsize=(1.2 * k + 1.5, 1.3 * len(prompts)), squeeze=False)
    for i, p in enumerate(prompts):
        for j in range(k):
            ax = axs[i][j]
            ax.axis("off")
            if j < len(cells[p]):
                ax.imshow(cells[p][j])
        axs[i][0].set_title(_short(p, 40), fontsize=7, loc="left")
    _save(fig, path)
    return True


# ------------------------------------------------------------------------------------------------ tables
def _axis_table(audit: dict, axis: str) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows incl. the MEAN row, pooled line) of one axis."""
    e = audit["axes"][axis]
    d = e["discrepancy"]
    fr = audit["face_rate"]
    header = ["prompt", "faces", "face rate", d["metric"], "95% CI", "floor", "bias_pairwise", "ambiguity"]
    if "recall" in e:
        header.append("recall")
    rows = []
    for p in audit["prompts"]:
        r = d["per_prompt"][p]
        row = [
            p,
            str(r["n"]),
            _fmt(fr["per_prompt"][p]["value"]),
            _fmt(r["value"]),
            _fmt_ci(r["ci"]) or r.get("reason", ""),
            _fmt(r["floor"]),
            _fmt(e["bias_pairwise"]["per_prompt"][p]["value"]),
            _fmt(e["ambiguity"]["per_prompt"][p]["value"]),
        ]
        if "recall" in e:
            row.append(_fmt(e["recall"]["per_prompt"].get(p, {}).get("value")))
        rows.append(row)
    m = d["mean_over_prompts"]
    mean = [
        "**MEAN over prompts** (headline)",
        str(m.get("n_prompts", 0)) + " prompts",
        _fmt(fr["mean_over_prompts"]["value"]),
        _fmt(m["value"]),
        _fmt_ci(m.get("ci")) or m.get("reason", ""),
        _fmt(m.get("floor")),
        _fmt(e["bias_pairwise"]["mean_over_prompts"]["value"]),
        _fmt(e["ambiguity"]["mean_over_prompts"]["value"]),
    ]
    if "recall" in e:
        mean.append(_fmt(e["recall"]["mean_over_prompts"]["value"]))
    rows.append(mean)
    pooled = d["pooled"]
    line = f"Pooled over all images (secondary, flagged: {pooled['note']}): {_fmt(pooled['value'])}"
    return header, rows, [line]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(c: str, tag: str) -> str:
        bold = c.startswith("**") and c.endswith("**") or c.startswith("**")
        txt = html.escape(c.replace("**", ""))
        return f"<{tag}>{'<b>' + txt + '</b>' if bold else txt}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>"]
    out += ["<tr>" + "".join(cell(c, "td") for c in r) + "</tr>" for r in rows]
    return "\n".join(out + ["</table>"])


def _md_to_html_par(text: str) -> str:
    t = html.escape(text).replace(
        "[docs/metrics.md](docs/metrics.md)", '<a href="docs/metrics.md">docs/metrics.md</a>'
    )
    while "**" in t:
        t = t.replace("**", "<b>", 1).replace("**", "</b>", 1)
    return f"<p>{t}</p>"


# ------------------------------------------------------------------------------------------------ reports
def write_report(audit: dict, out_dir: str | os.PathLike, grid_k: int = 4) -> dict[str, str]:
    """Write report.md, report.html and the plots into `out_dir`; return {name: file name}."""
    out = Path(out_dir)
    files: dict[str, str] = {}
    for axis in audit["axes"]:
        name = f"shares_{axis}.png"
        plot_shares(audit, axis, out / name)
        files[f"shares_{axis}"] = name
    plot_discrepancy(audit, out / "discrepancy.png")
    files["discrepancy"] = "discrepancy.png"
    if plot_grid(audit, out / "grid.png", k=grid_k):
        files["grid"] = "grid.png"

    s = audit["settings"]
    settings_lines = [
        f"model: {s.get('model')}",
        f"sampler: {s.get('sampler')}" if s.get("sampler") else "sampler: n/a (images audited as given)",
        f"classifier: {s.get('classifier')} (weights {s.get('classifier_weights')}), detector: {s.get('detector')}",
        f"labels: {s.get('labels')}; images per prompt: {s.get('images_per_prompt')}",
        f"counts: {audit['counts']}",
    ]
    md = ["# PopAlign bias audit", ""]
    md += [f"- {html.escape(x, quote=False)}" for x in settings_lines] + [""]
    for w in audit["warnings"]:
        md += [f"> **Warning:** {w}", ""]
    htm = ["<!doctype html><html><head><meta charset='utf-8'><title>PopAlign bias audit</title>",
           "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>",
           "<h1>PopAlign bias audit</h1><ul>"]  # fmt: skip
    htm += [f"<li>{html.escape(x)}</li>" for x in settings_lines] + ["</ul>"]
    htm += [f"<p><b>Warning:</b> {html.escape(w)}</p>" for w in audit["warnings"]]
    for axis in audit["axes"]:
        header, rows, pooled = _axis_table(audit, axis)
        md += [f"## {axis}", "", "Per prompt, then the mean over prompts (headline):", "", _md_table(header, rows), ""]
        md += [f"_{pooled[0]}_", "", f"![{axis} shares]({files[f'shares_{axis}']})", ""]
        htm += [f"<h2>{html.escape(axis)}</h2><p>Per prompt, then the mean over prompts (headline):</p>"]
        htm += [_html_table(header, rows), f"<p><i>{html.escape(pooled[0])}</i></p>"]
        htm += [f"<img src='{files[f'shares_{axis}']}' alt='{html.escape(axis)} shares'>"]
    if "clip_score" in audit:
        cs = audit["clip_score"]
        header = ["prompt", "n", "CLIPScore", "95% CI"]
        rows = [
            [_short(p, 60), str(v["n"]), _fmt(v["value"], 2), _fmt_ci(v["ci"])] for p, v in cs["per_prompt"].items()
        ]
        m = cs["mean_over_prompts"]
        rows.append(["**mean over prompts**", str(m["n_prompts"]), _fmt(m["value"], 2), _fmt_ci(m["ci"])])
        md += ["## CLIPScore (prompt-image alignment)", "", f"_{cs['definition']}_", "", _md_table(header, rows), ""]
        htm += ["<h2>CLIPScore (prompt-image alignment)</h2>", f"<p><i>{html.escape(cs['definition'])}</i></p>"]
        htm += [_html_table(header, rows)]
    md += ["## Discrepancy per prompt", "", f"![discrepancy]({files['discrepancy']})", ""]
    htm += ["<h2>Discrepancy per prompt</h2>", f"<img src='{files['discrepancy']}' alt='discrepancy'>"]
    if "grid" in files:
        md += ["## Images (first per prompt, fixed seeds)", "", f"![grid]({files['grid']})", ""]
        htm += ["<h2>Images (first per prompt, fixed seeds)</h2>", f"<img src='{files['grid']}' alt='image grid'>"]
    md += ["## Limitations", "", LIMITATIONS, ""]
    htm += ["<h2>Limitations</h2>", _md_to_html_par(LIMITATIONS), "</body></html>"]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_text(out / "report.html", _embed_images("\n".join(htm), out, files))
    files["markdown"], files["html"] = "report.md", "report.html"
    return files


def _embed_images(page: str, out: Path, files: dict[str, str]) -> str:
    """Inline the PNGs as data URIs so report.html is one self-contained file (it can be mailed or attached)."""
    for name in files.values():
        if name.endswith(".png") and (out / name).is_file():
            data = base64.b64encode((out / name).read_bytes()).decode("ascii")
            page = page.replace(f"src='{name}'", f"src='data:image/png;base64,{data}'")
    return page


def write_compare_report(cmp: dict, out_dir: str | os.PathLike) -> dict[str, str]:
    """compare.md / compare.html and compare.png (before / after per prompt with CI whiskers) into `out_dir`."""
    plt = _plt()
    out = Path(out_dir)
    axes = list(cmp["axes"])
    fig, panels = plt.subplots(1, len(axes), figsize=(max(4.0, len(cmp["prompts"]) + 2) * len(axes), 3.2))
    panels = np.atleast_1d(panels)
    for ax, axis in zip(panels, axes):
        t = cmp["axes"][axis]
        rows = [(p, t["per_prompt"][p]) for p in cmp["prompts"]] + [("MEAN over prompts", t["mean_over_prompts"])]
        for i, (_, r) in enumerate(rows):
            for off, key, color in ((-0.12, "before", "tab:gray"), (0.12, "after", "tab:green")):
                v, ci = r.get(key), r.get(f"{key}_ci")
                if v is None:
                    continue
                lo, hi = ci if ci else (v, v)
                ax.errorbar(i + off, v, yerr=[[v - lo], [hi - v]], fmt="o", capsize=3, color=color,
                            label=key if i == 0 else None)  # fmt: skip
        ax.set_xticks(range(len(rows)), [_short(p) for p, _ in rows], rotation=30, ha="right", fontsize=7)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{axis}: discrepancy before / after (95% CI)", fontsize=8)
        ax.legend(fontsize=6)
    _save(fig, out / "compare.png")
    header = ["prompt", "before", "before CI", "after", "after CI", "change"]
    md = ["# PopAlign audit: before / after", ""] + [f"> **Warning:** {w}\n" for w in cmp["warnings"]]
    htm = ["<!doctype html><html><head><meta charset='utf-8'><title>PopAlign compare</title></head><body>",
           "<h1>PopAlign audit: before / after</h1>"]  # fmt: skip
    htm += [f"<p><b>Warning:</b> {html.escape(w)}</p>" for w in cmp["warnings"]]
    for axis in axes:
        t = cmp["axes"][axis]
        rows = []
        for p, r in [*t["per_prompt"].items(), ("**MEAN over prompts** (headline)", t["mean_over_prompts"])]:
            rows.append(
                [p, _fmt(r["before"]), _fmt_ci(r["before_ci"]), _fmt(r["after"]), _fmt_ci(r["after_ci"]),
                 _fmt(r["change"])]
            )  # fmt: skip
        pooled = t["pooled"]
        line = f"Pooled (secondary, flagged: {pooled['note']}): {_fmt(pooled['before'])} -> {_fmt(pooled['after'])}"
        md += [f"## {axis}", "", _md_table(header, rows), "", f"_{line}_", ""]
        htm += [f"<h2>{html.escape(axis)}</h2>", _html_table(header, rows), f"<p><i>{html.escape(line)}</i></p>"]
    md += ["![before / after](compare.png)", "", "## Limitations", "", LIMITATIONS, ""]
    htm += ["<img src='compare.png' alt='before / after'>", "<h2>Limitations</h2>", _md_to_html_par(LIMITATIONS)]
    htm += ["</body></html>"]
    atomic_write_text(out / "compare.md", "\n".join(md))
    atomic_write_text(out / "compare.html", _embed_images("\n".join(htm), out, {"plot": "compare.png"}))
    return {"plot": "compare.png", "markdown": "compare.md", "html": "compare.html"}
