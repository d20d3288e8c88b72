"""Bias metrics of an image batch: classifier shares per prompt against a target, a JSON report and a chart (the
computation is the core's `evaluate.batch.batch_metrics`, the chart `evaluate.report.plot_batch_shares`)."""

from __future__ import annotations

import io
import json

from . import _common as C
from .classify_nodes import classification_rows


def png_to_image(png: bytes):
    import numpy as np
    import torch
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


HARD_LABELS_TIP = "count argmax labels (public PopAlign evaluation) instead of mean probabilities"
PROMPTS_TIP = "without a population: the prompt of each image in order, one per line (a single line = one group)"


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
        required = (
            C.LINK("images", "IMAGE", "images to measure"),
            C.LINK("classifier", C.CLASSIFIER, "attribute classifier"),
            C.STRING("axis", "the classifier axis to measure, e.g. gender, race, age", "gender"),
            C.STRING("label", "a name for this measurement (e.g. before / after)", "audit"),
            C.BOOLEAN("hard_labels", HARD_LABELS_TIP, True),
        )
        optional = (
            C.LINK(
                "population", C.POPULATION, "metadata of the images (groups them by neutral prompt); else `prompts`"
            ),
            C.STRING("prompts", PROMPTS_TIP, "", multiline=True),
            C.LINK("target", C.TARGET, "target distribution; unconnected = uniform over the axis's classes"),
        )
        return C.input_types(required, optional, hidden={"unique_id": "UNIQUE_ID"})

    def run(
        self, images, classifier, axis, label, hard_labels, population=None, prompts="", target=None, unique_id=None
    ):
        from popalign_core.evaluate.batch import batch_metrics, chart_data
        from popalign_core.evaluate.report import plot_batch_shares

        n = int(images.shape[0]) if images is not None and images.ndim == 4 else 0
        if n == 0:
            raise ValueError("images: the IMAGE batch is empty; nothing to measure")
        rows = None if population is None else C.check_population(images, population)
        metrics = batch_metrics(
            lambda: classification_rows(classifier, images),
            n,
            classifier.get().axes,
            axis,
            groups=None if rows is None else [r.get("neutral") or r["prompt"] for r in rows],
            prompts=prompts,
            target=target,
            hard=hard_labels,
            label=label,
            classifier=classifier.describe(),
        )
        chart = png_to_image(plot_batch_shares(metrics))
        ui = {"popalign_chart": [chart_data(metrics, unique_id)]}  # drawn on the node by js/popalign.js
        return {"ui": ui, "result": (json.dumps(metrics, indent=2), chart)}


NODE_CLASS_MAPPINGS = {"PopAlignBiasMetrics": PopAlignBiasMetrics}
NODE_DISPLAY_NAME_MAPPINGS = {"PopAlignBiasMetrics": "PopAlign Bias Metrics"}
