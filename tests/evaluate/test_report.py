"""popalign_core.evaluate.report on hand-built audit / compare dicts: tables (values, CI text, headline row, escaping),
the written files (report.md / .html with inlined plots, compare.*) and what is left out when data is missing."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from popalign_core.evaluate import report


def _r(value, ci=None, floor=None, n=2, **extra):
    return {"value": value, "ci": ci, "floor": floor, "n": n, **extra}


def audit_dict(tmp_path, with_images: bool = True) -> dict:
    """Two prompts, one axis (gender); "a chef | cook" has no detected face (values n/a, a reason instead of a CI)."""
    prompts = ["a doctor", "a chef | cook"]
    images = []
    if with_images:
        for i, p in enumerate(prompts):
            path = tmp_path / f"img{i}.png"
            Image.fromarray(np.full((16, 16, 3), 60 + 100 * i, dtype=np.uint8)).save(path)
            images.append({"prompt": p, "path": str(path), "error": None})
    return {
        "prompts": prompts,
        "images": images,
        "settings": {
            "model": "tiny",
            "classifier": "toy",
            "classifier_weights": "w.safetensors",
            "detector": "full_image",
            "labels": "hard",
            "images_per_prompt": 2,
        },  # fmt: skip
        "counts": {"images": 4, "faces": 2},
        "warnings": ["only 2 images per prompt"],
        "face_rate": {
            "per_prompt": {"a doctor": {"value": 1.0}, "a chef | cook": {"value": 0.0}},
            "mean_over_prompts": {"value": 0.5},
        },
        "axes": {
            "gender": {
                "classes": ["female", "male"],
                "target": [0.5, 0.5],
                "shares": {"a doctor": [0.25, 0.75], "a chef | cook": None},
                "discrepancy": {
                    "metric": "discrepancy",
                    "per_prompt": {
                        "a doctor": _r(0.25, ci=[0.1, 0.4], floor=0.05),
                        "a chef | cook": _r(None, n=0, reason="no detected faces"),
                    },  # fmt: skip
                    "mean_over_prompts": {"value": 0.25, "ci": [0.1, 0.4], "floor": 0.05, "n_prompts": 1},
                    "pooled": {"value": 0.3, "note": "mixes prompts"},
                },
                "bias_pairwise": {
                    "per_prompt": {"a doctor": {"value": 0.5}, "a chef | cook": {"value": None}},
                    "mean_over_prompts": {"value": 0.5},
                },  # fmt: skip
                "ambiguity": {
                    "per_prompt": {"a doctor": {"value": 0.125}, "a chef | cook": {"value": None}},
                    "mean_over_prompts": {"value": 0.125},
                },  # fmt: skip
            }
        },
    }


def test_axis_table_rows_hold_the_values_and_the_headline_row(tmp_path):
    header, rows, pooled = report._axis_table(audit_dict(tmp_path), "gender")
    assert header == ["prompt", "faces", "face rate", "discrepancy", "95% CI", "floor", "bias_pairwise", "ambiguity"]
    assert rows[0] == ["a doctor", "2", "1.000", "0.250", "[0.100, 0.400]", "0.050", "0.500", "0.125"]
    assert rows[1] == ["a chef | cook", "0", "0.000", "n/a", "no detected faces", "n/a", "n/a", "n/a"]
    assert rows[2] == ["**MEAN over prompts** (headline)", "1 prompts", "0.500", "0.250", "[0.100, 0.400]", "0.050",
                       "0.500", "0.125"]  # fmt: skip
    assert pooled == ["Pooled over all images (secondary, flagged: mixes prompts): 0.300"]


def test_tables_escape_pipes_in_markdown_and_bold_the_headline_in_html():
    md = report._md_table(["prompt", "v"], [["a | b", "1"], ["**MEAN**", "2"]])
    assert md.splitlines() == ["| prompt | v |", "|---|---|", "| a \\| b | 1 |", "| **MEAN** | 2 |"]
    htm = report._html_table(["prompt", "v"], [["a < b", "1"], ["**MEAN** (headline)", "2"]])
    assert "<td>a &lt; b</td>" in htm and "<td><b>MEAN (headline)</b></td>" in htm and htm.startswith("<table>")


def test_write_report_writes_markdown_html_and_inlines_every_plot(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    files = report.write_report(audit_dict(tmp_path), out, grid_k=2)
    assert files == {"shares_gender": "shares_gender.png", "discrepancy": "discrepancy.png", "grid": "grid.png",
                     "markdown": "report.md", "html": "report.html"}  # fmt: skip
    for name in ("shares_gender.png", "discrepancy.png", "grid.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    md = (out / "report.md").read_text()
    assert "> **Warning:** only 2 images per prompt" in md and "| a chef \\| cook | 0 | 0.000 | n/a |" in md
    assert "![gender shares](shares_gender.png)" in md and "## Limitations" in md
    page = (out / "report.html").read_text()
    srcs = re.findall(r"src='([^']*)'", page)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert base64.b64decode(srcs[0].split(",", 1)[1]) == (out / "shares_gender.png").read_bytes()


def test_no_grid_when_no_image_can_be_read(tmp_path):
    audit = audit_dict(tmp_path, with_images=False)
    audit["images"] = [{"prompt": "a doctor", "path": str(tmp_path / "missing.png"), "error": None}]
    files = report.write_report(audit, tmp_path)
    assert "grid" not in files and not (tmp_path / "grid.png").exists()
    assert "## Images" not in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("after", [0.1, None])
def test_compare_report_rows_and_files(tmp_path, after):
    row = {"before": 0.3, "before_ci": [0.2, 0.4], "after": after, "after_ci": [0.05, 0.15] if after else None,
           "change": None if after is None else after - 0.3}  # fmt: skip
    cmp = {"prompts": ["a doctor"], "warnings": [],
           "axes": {"gender": {"per_prompt": {"a doctor": row}, "mean_over_prompts": row,
                               "pooled": {"before": 0.3, "after": after, "note": "mixes prompts"}}}}  # fmt: skip
    files = report.write_compare_report(cmp, tmp_path)
    assert files == {"plot": "compare.png", "markdown": "compare.md", "html": "compare.html"}
    md = (tmp_path / "compare.md").read_text()
    want = (
        "| a doctor | 0.300 | [0.200, 0.400] | 0.100 | [0.050, 0.150] | -0.200 |"
        if after
        else ("| a doctor | 0.300 | [0.200, 0.400] | n/a |  | n/a |")
    )
    assert want in md, md
    assert "data:image/png;base64," in (tmp_path / "compare.html").read_text()


# ------------------------------------------------------------------------------------------------ one batch (node)
def _classified(values, faces):
    return [{"face": f, "probs": {"gender": [v, 1 - v]} if f else {}} for v, f in zip(values, faces)]


def test_batch_metrics_by_hand():
    from popalign_core.evaluate.batch import batch_metrics
    from popalign_core.evaluate.metrics import per_prompt_report

    rows = _classified([0.9, 0.6, 0.2, 0.5, 0.4], [True, True, True, False, True])
    axes = {"gender": ("female", "male"), "race": ("a", "b")}
    target = {"target": {"gender": {"male": 0.25, "female": 0.75}}}
    kw = dict(groups=["doc", "doc", "doc", "chef", "chef"], target=target, label="before", classifier={"name": "x"})
    m = batch_metrics(lambda: rows, 5, axes, "gender", **kw)
    assert (m["label"], m["axis"], m["classes"], m["classifier"]) == (
        "before",
        "gender",
        ["female", "male"],
        {"name": "x"},
    )
    assert m["target"] == [0.75, 0.25] and m["target_kind"] == "given"
    assert (m["images"], m["faces"], m["face_rate"]) == (5, 4, 0.8)
    # hard labels: doc = female, female, male -> (2/3, 1/3); chef: one face, 0.4 -> male
    assert m["per_prompt_shares"] == {"doc": [0.666667, 0.333333], "chef": [0.0, 1.0]}
    # bias(P) = mean pairwise |freq(i) - freq(j)|: doc |2/3 - 1/3| = 1/3; chef |0 - 1| = 1
    assert m["bias_pairwise"] == pytest.approx({"doc": 1 / 3, "chef": 1.0})
    probs = {"doc": np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]), "chef": np.array([[0.4, 0.6]])}
    assert m["discrepancy"] == per_prompt_report(probs, [0.75, 0.25], hard=True, n_boot=500)
    soft = batch_metrics(lambda: rows, 5, axes, "gender", **{**kw, "target": None}, hard=False)
    assert soft["per_prompt_shares"] == {"doc": [0.566667, 0.433333], "chef": [0.4, 0.6]}
    assert soft["target"] == [0.5, 0.5] and soft["target_kind"] == "uniform"


def test_batch_metrics_groups_from_prompt_lines_and_a_group_without_faces():
    from popalign_core.evaluate.batch import batch_metrics, chart_data, prompt_groups

    assert prompt_groups("", 2) == ["all images"] * 2 and prompt_groups(" a doctor \n\n", 2) == ["a doctor"] * 2
    assert prompt_groups("a\nb\na", 3) == ["a", "b", "a"]
    rows = _classified([0.9, 0.1, 0.5], [True, True, False])
    m = batch_metrics(lambda: rows, 3, {"gender": ("female", "male")}, "gender", prompts="a\nb\nc")
    assert m["per_prompt_shares"] == {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.0, 0.0]}
    assert m["bias_pairwise"]["c"] is None and m["faces"] == 2
    chart = chart_data(m, 7)
    assert chart == {"node": "7", "label": "audit", "axis": "gender", "classes": ["female", "male"],
                     "target": [0.5, 0.5], "shares": m["per_prompt_shares"],
                     "discrepancy": m["discrepancy"]["mean_over_prompts"].get("value")}  # fmt: skip


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"axis": "age"}, r"axis: 'age' is not an axis of the x classifier; its axes: \['gender'\]"),
        ({"prompts": "a\nb"}, "prompts: 2 lines for 3 images; give one line per image or one line"),
        ({"target": {"target": {"race": [1.0]}}}, r"target: it has no axis 'gender' \(its axes: \['race'\]\)"),
        ({"target": {"target": {"gender": {"x": 1.0}}}}, r"target: classes \['x'\] of axis 'gender' are not the"),
        ({"target": {"target": {"gender": [1.0]}}}, "target: axis 'gender' has 1 shares, the classifier 2 classes"),
    ],
)
def test_batch_metrics_checks_its_inputs_before_classifying(kw, message):
    from popalign_core.evaluate.batch import batch_metrics

    def classify():
        raise AssertionError("classified before the inputs were checked")

    kw = {"axis": "gender", **kw}
    with pytest.raises(ValueError, match=message):
        batch_metrics(classify, 3, {"gender": ("female", "male")}, kw.pop("axis"), classifier={"name": "x"}, **kw)


def test_batch_chart_png():
    from popalign_core.evaluate.batch import batch_metrics

    rows = _classified([0.9, 0.1], [True, True])
    m = batch_metrics(lambda: rows, 2, {"gender": ("female", "male")}, "gender", label="after")
    png = report.plot_batch_shares(m)
    img = Image.open(io.BytesIO(png))
    assert png.startswith(b"\x89PNG") and img.size == (700, 360)
