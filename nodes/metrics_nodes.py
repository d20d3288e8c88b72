"""Bias metrics of an image batch: classifier shares per prompt against a target, a JSON report and a chart."""

from __future__ import annotations

import io
import json

from . import _common as C
from .classify_nodes import classification_rows


def _target_vector(target, axis: str, classes: tuple[str, ...]):
    if target is None:
        return [1.0 / len(classes)] * len(classes), "uniform"
    spec = (target.get("target") or {}).get(axis)
    if spec is None:
        raise ValueError(f"target: it has no axis {axis!r} (its axes: {list(target.get('target', {}))})")
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(classes))
        if unknown:
            raise ValueError(f"target: classes {unknown} of axis {axis!r} are not the classifier's {list(classes)}")
        vec = [float(spec.get(c, 0.0)) for c in classes]
    else:
        if len(spec) != len(classes):
            raise ValueError(f"target: axis {axis!r} has {len(spec)} shares, the classifier {len(classes)} classes")
        vec = [float(v) for v in spec]
    return vec, "given"


def chart_png(report: dict, classes: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = [(p, r) for p, r in report["per_prompt_shares"].items()]
    target = report["target"]
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
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def png_to_image(png: bytes):
    import numpy as np
    import torch
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


class PopAlignBiasMetrics:
    DESCRIPTION = (
        "Bias of a batch of images: the classifier's class shares per prompt against a target (uniform by default), "
        "PopAlign's discrepancy (Eq. 13) per prompt with bootstrap CIs and its sampling floor, the patent's "
        "bias(P) = mean pairwise |freq(i) - freq(j)|, and the face rate. Shows a chart on the node."
    )
    CATEGORY = C.category("audit")
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("metrics_json", "chart")
    OUTPUT_TOOLTIPS = (
        "shares, discrepancy with CIs and floor, bias(P) and face rate per prompt and axis (JSON)",
        "the chart of the shares against the target, as an image",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": C.tip("IMAGE", "images to measure"),
                "classifier": C.tip(C.CLASSIFIER, "attribute classifier"),
                "axis": C.tip("STRING", "the classifier axis to measure, e.g. gender, race, age", default="gender"),
                "label": C.tip("STRING", "a name for this measurement (e.g. before / after)", default="audit"),
                "hard_labels": C.tip(
                    "BOOLEAN",
                    "count argmax labels (public PopAlign evaluation) instead of mean probabilities",
                    default=True,
                ),  # fmt: skip
            },
            "optional": {
                "population": C.tip(
                    C.POPULATION, "metadata of the images (groups them by neutral prompt); else `prompts`"
                ),  # fmt: skip
                "prompts": C.tip(
                    "STRING",
                    "without a population: the prompt of each image in order, one per line "
                    "(a single line = one group)",
                    default="",
                    multiline=True,
                ),  # fmt: skip
                "target": C.tip(C.TARGET, "target distribution; unconnected = uniform over the axis's classes"),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def run(self, images, classifier, axis, label, hard_labels, population=None, prompts="", target=None,
            unique_id=None):  # fmt: skip
        import numpy as np

        from popalign_core.evaluate.metrics import bias_pairwise, per_prompt_report

        n = int(images.shape[0]) if images is not None and images.ndim == 4 else 0
        if n == 0:
            raise ValueError("images: the IMAGE batch is empty; nothing to measure")
        clf = classifier.get()
        if axis not in clf.axes:
            raise ValueError(f"axis: {axis!r} is not an axis of the {classifier.name} classifier; its axes: "
                             f"{list(clf.axes)}")  # fmt: skip
        classes = list(clf.axes[axis])
        if population is not None:
            rows = C.check_population(images, population)
            groups = [r.get("neutral") or r["prompt"] for r in rows]
        else:
            lines = [ln.strip() for ln in str(prompts or "").splitlines() if ln.strip()]
            if len(lines) <= 1:
                groups = [lines[0] if lines else "all images"] * n
            elif len(lines) == n:
                groups = lines
            else:
                raise ValueError(f"prompts: {len(lines)} lines for {n} images; give one line per image or one line")
        tvec, tkind = _target_vector(target, axis, tuple(classes))
        results = classification_rows(classifier, images)
        by_prompt: dict[str, list] = {g: [] for g in groups}
        faces = 0
        for g, r in zip(groups, results):
            if r["face"] and axis in r["probs"]:
                by_prompt[g].append(r["probs"][axis])
                faces += 1
        probs = {g: np.asarray(v, dtype=float).reshape(-1, len(classes)) for g, v in by_prompt.items()}
        report = per_prompt_report(probs, tvec, hard=bool(hard_labels), n_boot=500)
        shares = {}
        for g, p in probs.items():
            if len(p) == 0:
                shares[g] = [0.0] * len(classes)
                continue
            q = np.eye(len(classes))[p.argmax(1)] if hard_labels else p
            shares[g] = q.mean(0).round(6).tolist()
        bias = {g: (bias_pairwise(p.argmax(1), len(classes)) if len(p) else None) for g, p in probs.items()}
        out = {
            "label": label, "axis": axis, "classes": classes, "target": tvec, "target_kind": tkind,
            "classifier": classifier.describe(), "images": n, "faces": faces, "face_rate": faces / n,
            "per_prompt_shares": shares, "bias_pairwise": bias, "discrepancy": report,
        }  # fmt: skip
        png = chart_png(out, classes, f"{label}: {axis} shares (discrepancy "
                        f"{_fmt(report['mean_over_prompts'].get('value'))})")  # fmt: skip
        ui = {  # the chart is drawn on the node by js/popalign.js; the PNG is the IMAGE output
            "popalign_chart": [{"node": str(unique_id), "label": label, "axis": axis, "classes": classes,
                                "target": tvec, "shares": shares,
                                "discrepancy": report["mean_over_prompts"].get("value")}],
        }  # fmt: skip
        return {"ui": ui, "result": (json.dumps(out, indent=2), png_to_image(png))}


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


NODE_CLASS_MAPPINGS = {"PopAlignBiasMetrics": PopAlignBiasMetrics}
NODE_DISPLAY_NAME_MAPPINGS = {"PopAlignBiasMetrics": "PopAlign Bias Metrics"}
