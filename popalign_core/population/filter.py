"""Filter a population run with a face detector + attribute classifier (PopAlign Sec. 4.1's sanity check).

    from popalign_core.population.filter import FilterConfig, filter_population
    report = filter_population("runs/pop/samples", classifier, "runs/pop/filtered", FilterConfig(threshold=0.8))

Every image of the run's manifest is classified with a bias-measurement backend (`classify.make_classifier`: toy,
fairface, clip, deepface, ...). Decisions, in this order (the first that applies is the image's reason):
- ``unreadable``: the image file cannot be decoded;
- ``no_face``: the detector finds no face (an attribute cannot be judged: PopAlign drops these, e.g. helmets);
- augmented (winning) images only, per axis named by the prompt's identity keywords:
  ``ambiguous:<axis>`` when the classifier's top probability is below `threshold`, ``mismatch:<axis>`` when its
  top class is not the keyword's class;
- ``kept`` otherwise. Neutral (losing) images need only a face: they are the model's own population.

Outputs (`out/`): ``filtered.jsonl`` (kept rows, each with "attributes" {axis: predicted class} and "confidence"
{axis: probability} for every classifier axis, and the image path relative to `out/`); ``decisions.jsonl`` (every
row with its "reason"); ``filter_report.json`` (counts per reason, overall and per population, and the settings).
`filter_batch` applies the same decisions to a batch held in memory (the ComfyUI Filter Population node's).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.classify.base import FullImage
from popalign_core.common.fields import help_field
from popalign_core.common.fileio import claim_output_dir, load_rgb, publish_together
from popalign_core.common.manifest import format_manifest
from popalign_core.common.userinput import check_containers, coerce_numbers
from popalign_core.population.sample import read_samples_report

__all__ = ["FILTERED", "FilterConfig", "check_rows", "filter_batch", "filter_population"]

FILTERED = "filtered.jsonl"
REASONS = ("kept", "unreadable", "no_face", "ambiguous", "mismatch")
#: What `popalign data filter` writes in its output folder (`fileio.claim_output_dir`).
FILTER_OUTPUTS = {FILTERED: None, "decisions.jsonl": None, "filter_report.json": None}


@dataclass
class FilterConfig:
    """Settings of `filter_population`."""

    threshold: float = help_field(
        "minimum classifier probability of the keyword's class on every named axis, in (0, 1]", default=0.8
    )
    axes: tuple[str, ...] | None = help_field(
        "axes checked against the keywords (default: every axis the prompt names)", default=None
    )
    batch_size: int = help_field("images per classifier call", default=256)

    def check(self) -> None:
        coerce_numbers(self)
        check_containers(self)
        t = self.threshold
        if not isinstance(t, int | float) or isinstance(t, bool) or not 0 < t <= 1:
            raise ValueError(f"threshold: expected a number in (0, 1], got {t!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {self.batch_size!r}")


def decide(row: dict, result: Any, classifier_axes: dict, cfg: FilterConfig) -> str:
    """The reason of one image (see the module docstring)."""
    if result is None or getattr(result, "error", None):
        return "unreadable"
    if not result.face_found:
        return "no_face"
    if row.get("population") != "winning":
        return "kept"
    for axis, cls in (row.get("identity") or {}).items():
        if cfg.axes is not None and axis not in cfg.axes:
            continue
        p = np.asarray(result.probs[axis], dtype=float)
        if p.max() < cfg.threshold:
            return f"ambiguous:{axis}"
        if classifier_axes[axis][int(p.argmax())] != cls:
            return f"mismatch:{axis}"
    return "kept"


def check_rows(rows: list[dict], classifier: Any, cfg: FilterConfig, source: str) -> None:
    """Before classifying anything: every row is a population row (winning with its identity keywords, or losing),
    and the axes and keyword classes to check are the classifier's. ValueError naming `source` and the row otherwise
    (`data pipeline` runs this on its jobs before sampling)."""
    caxes = {a: tuple(c) for a, c in classifier.axes.items()}
    unknown = [a for a in (cfg.axes or ()) if a not in caxes]
    if unknown:
        raise ValueError(f"axes: the classifier {getattr(classifier, 'name', type(classifier).__name__)!r} has no "
                         f"axis {unknown[0]!r}; its axes: {', '.join(caxes)}")  # fmt: skip
    if cfg.axes:
        named = {a for r in rows for a in (r.get("identity") or {})}
        if named and not named & set(cfg.axes):
            raise ValueError(
                f"axes: no prompt of {source} names {', '.join(cfg.axes)} (they name {', '.join(sorted(named))}), so "
                "nothing would be checked against the keywords; leave --axes out or name those axes"
            )
    # check the rows and the keyword classes against the classifier before classifying anything
    for r in rows:
        pop, ident = r.get("population"), r.get("identity")
        if pop not in ("winning", "losing") or not isinstance(ident or {}, dict) or (pop == "winning" and not ident):
            raise ValueError(
                f"{source}: the row of {r.get('image', r['prompt'])!r} is not a population row (population winning "
                f"with its identity keywords, or losing): population={pop!r}, identity={ident!r}; sample the run with "
                "`popalign data sample`"
            )
        for axis, cls in (r.get("identity") or {}).items():
            if cfg.axes is not None and axis not in cfg.axes:
                continue
            if axis not in caxes:
                raise ValueError(
                    f"the classifier {getattr(classifier, 'name', type(classifier).__name__)!r} has no axis "
                    f"{axis!r} (prompt {r['prompt']!r}); its axes: {sorted(caxes)}. Use another classifier or "
                    "FilterConfig.axes"
                )
            if cls not in caxes[axis]:
                raise ValueError(
                    f"class {cls!r} of axis {axis!r} (prompt {r['prompt']!r}) is not a class of the classifier; "
                    f"its {axis} classes: {list(caxes[axis])}"
                )


def filter_population(
    samples: str | os.PathLike,
    classifier,
    out: str | os.PathLike,
    config: FilterConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Classify and filter the images of the population run folder `samples` into `out`; returns the report."""

    cfg = config or FilterConfig()
    cfg.check()
    log = log or (lambda m: None)
    samples, out = Path(samples), Path(out)
    if samples.is_file():
        raise NotADirectoryError(f"samples {str(samples)!r} is a file; give the run folder of `popalign data sample` "
                                 "(the folder holding manifest.jsonl and images/)")  # fmt: skip
    if not samples.is_dir():
        raise FileNotFoundError(f"samples folder {str(samples)!r} does not exist: run `popalign data sample` first")
    rows, skipped = read_samples_report(samples)
    n_skipped = len(skipped["bad_lines"]) + len(skipped["missing_images"]) + skipped["duplicate_rows"]
    if not rows:
        why = f" ({n_skipped} manifest row(s) unusable: {_skipped_text(skipped)})" if n_skipped else ""
        raise ValueError(f"{samples} holds no sampled images (no usable rows in its manifest.jsonl{why}): run "
                         "`popalign data sample` first, or again to repair the folder")  # fmt: skip
    if n_skipped:
        log(f"[filter] warning: skipped {n_skipped} manifest row(s) of {samples}: {_skipped_text(skipped)}; re-run "
            "`popalign data sample` on that folder to repair and complete it")  # fmt: skip
    check_rows(rows, classifier, cfg, str(samples))
    caxes = {a: tuple(c) for a, c in classifier.axes.items()}
    claim_output_dir(out, "data filter", FILTER_OUTPUTS, arg="--out", signature="filter_report.json")
    kept, decisions = [], []
    counts: Counter = Counter()
    per_pop: dict[str, Counter] = {}
    for s in range(0, len(rows), cfg.batch_size):
        chunk = rows[s : s + cfg.batch_size]
        images, ok = [], []
        for r in chunk:
            try:
                images.append(load_rgb(samples / r["image"]))
                ok.append(True)
            except Exception:  # noqa: BLE001 - an unreadable image is a reason, not a crash
                ok.append(False)
        results = iter(classifier.classify(images) if images else [])
        for r, good in zip(chunk, ok):
            res = next(results) if good else None
            reason = decide(r, res, caxes, cfg)
            counts[reason] += 1
            per_pop.setdefault(r.get("population", "?"), Counter())[reason] += 1
            rel = os.path.relpath(samples / r["image"], out)
            decisions.append({**r, "image": rel, "reason": reason})
            if reason == "kept":
                attrs = {a: caxes[a][int(np.argmax(p))] for a, p in res.probs.items()}
                conf = {a: round(float(np.max(p)), 6) for a, p in res.probs.items()}
                kept.append({**r, "image": rel, "attributes": attrs, "confidence": conf})
        log(f"[filter] {min(s + cfg.batch_size, len(rows))}/{len(rows)} images classified")

    report = {
        "samples": str(samples),
        "out": str(out),
        "classifier": getattr(classifier, "name", type(classifier).__name__),
        "config": {**asdict(cfg), "axes": list(cfg.axes) if cfg.axes else None},
        "images": len(rows),
        "kept": counts["kept"],
        "reasons": dict(sorted(counts.items())),
        "per_population": {k: dict(sorted(v.items())) for k, v in sorted(per_pop.items())},
        "skipped_rows": {"count": n_skipped, **skipped},
    }
    with publish_together(out) as st:  # kept rows, decisions and report: all from this run, or all from the last
        st.stage(out / FILTERED).write_text(format_manifest(kept), encoding="utf-8")
        st.stage(out / "decisions.jsonl").write_text(format_manifest(decisions), encoding="utf-8")
        st.stage(out / "filter_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    if counts["unreadable"]:
        log(f"[filter] warning: {counts['unreadable']} of {len(rows)} image(s) could not be read (reason "
            "'unreadable' in decisions.jsonl)")  # fmt: skip
    if not counts["kept"]:
        raise ValueError(
            f"no image of {samples} was kept ({len(rows)} classified: "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + f"); see {out / 'decisions.jsonl'}. Check the classifier, its options and the threshold"
        )
    return report


def check_identities(rows: list[dict], classifier_axes: dict, name: str) -> None:
    """Every axis and class that a row's identity names is one the classifier (`name`) reads; ValueError otherwise."""
    for r in rows:
        for axis, cls in (r.get("identity") or {}).items():
            if axis not in classifier_axes or cls not in classifier_axes[axis]:
                raise ValueError(
                    f"population: prompt {r['prompt']!r} names {axis}={cls!r}, which the {name} classifier cannot "
                    f"read (its axes: { {a: list(c) for a, c in classifier_axes.items()} })"
                )


def filter_batch(
    rows: list[dict],
    classifier,
    classify: Callable[[list[int]], list],
    threshold: float,
    require_face: bool = True,
    describe: dict | None = None,
) -> tuple[list[int], list[dict], dict]:
    """The filter (see the module docstring) on a batch held in memory, the ComfyUI node's: `rows[k]` is the row of
    image k and ``classify(indices)`` classifies those images (one result each). With `require_face` off, images in
    which the detector finds no face are classified again as whole images (the classifier's detector is swapped for
    `FullImage` meanwhile). Threshold 0 means "the argmax must match" (it is raised to 1e-9).

    Returns (indices of the kept images, their rows with "attributes" {axis: predicted class}, the report {images,
    kept, reasons, threshold, require_face, classifier: `describe`}); ValueError when nothing is kept."""
    caxes = {a: tuple(c) for a, c in classifier.axes.items()}
    check_identities(
        rows, caxes, (describe or {}).get("name") or getattr(classifier, "name", type(classifier).__name__)
    )
    cfg = FilterConfig(threshold=max(float(threshold), 1e-9))
    results = classify(list(range(len(rows))))
    faceless = [k for k, res in enumerate(results) if res is not None and not res.face_found and not res.error]
    if faceless and not require_face and hasattr(classifier, "detector"):
        results = _whole_images(classifier, classify, faceless, results)
    keep, kept_rows, reasons = [], [], Counter()
    for k, (r, res) in enumerate(zip(rows, results)):
        reason = decide(r, res, caxes, cfg)
        reasons[reason] += 1
        if reason == "kept":
            keep.append(k)
            kept_rows.append({**r, "attributes": {a: caxes[a][int(np.argmax(p))] for a, p in res.probs.items()}})
    report = {
        "images": len(rows),
        "kept": len(keep),
        "reasons": dict(sorted(reasons.items())),
        "threshold": float(threshold),
        "require_face": bool(require_face),
        "classifier": describe,
    }
    if not keep:
        raise ValueError(
            f"filter: no image was kept ({json.dumps(report['reasons'])}); lower the threshold, turn off "
            "require_face for models that draw no faces, or sample more images"
        )
    return keep, kept_rows, report


def _whole_images(classifier, classify: Callable[[list[int]], list], indices: list[int], results: list) -> list:
    """`results` with those of `indices` replaced by a classification of the whole image (no face detection)."""

    own = classifier.detector
    classifier.detector = FullImage()
    try:
        whole = classify(indices)
    finally:
        classifier.detector = own
    out = list(results)
    for k, res in zip(indices, whole):
        out[k] = res
    return out


def _skipped_text(skipped: dict) -> str:
    parts = []
    if skipped["bad_lines"]:
        parts.append(f"{len(skipped['bad_lines'])} unreadable line(s) ({', '.join(skipped['bad_lines'][:3])})")
    if skipped["missing_images"]:
        parts.append(f"{len(skipped['missing_images'])} row(s) whose image is missing "
                     f"({', '.join(skipped['missing_images'][:2])})")  # fmt: skip
    if skipped["duplicate_rows"]:
        parts.append(f"{skipped['duplicate_rows']} duplicate row(s)")
    return "; ".join(parts)
