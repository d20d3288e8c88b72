"""`popalign audit`: measure the demographic bias of a text-to-image model (or of a folder of images).

Three modes:

    popalign audit --model M --prompts FILE --images-per-prompt N --classifier NAME [--weights PATH]
                   [--detector NAME] --out DIR
        samples N seeded images per prompt (`sampling.sample`), saves them as PNG under DIR/images/ with a manifest
        DIR/images.jsonl (image, prompt, index, seed), classifies them and computes the metrics;
    popalign audit --images DIR [--manifest FILE] --classifier NAME ... --out OUT
        audits images made elsewhere; the manifest (JSONL / CSV; columns `image`, `prompt`, optional `identity`
        such as ``gender=female;race=black`` for recall) maps images to prompts; without a manifest, each
        sub-folder of DIR is one prompt (its name);
    popalign audit compare A/audit.json B/audit.json --out DIR
        a before / after table (per prompt and the mean over prompts, with CIs) and a plot.

Outputs (only inside the output folder, each file written atomically: temporary name + rename): ``audit.json``,
``report.md``, ``report.html`` and the PNG plots of `evaluate.report`. Headline numbers are per-prompt values
and their mean over prompts; the pooled value is reported as a secondary, flagged number (see docs/metrics.md).

`run_audit` reads as three steps: `_validate_audit` (every input checked, the classifier built, the image rows or
prompts read, the output folder claimed), `_compute_audit` (sample, classify, measure: `evaluate.audit_compute`) and
`_write_audit` (``audit.json`` and the report). Its settings are an `AuditConfig` (classification and metrics) and a
`SamplerConfig` (sampling mode). The files an audit reads are in `evaluate.audit_files`, ``audit compare`` in
`evaluate.compare`; their public names stay importable from here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popalign_core.classify.classifiers import CLASSIFIERS, make_classifier
from popalign_core.classify.detectors import DETECTORS
from popalign_core.common.fileio import atomic_write_bytes, atomic_write_text, claim_output_dir, load_rgb  # noqa: F401  (re-exported)
from popalign_core.common.userinput import ArgumentParser, command, integer, number
from popalign_core.evaluate.audit_compute import (  # noqa: F401  (re-exported)
    CLASSIFY_CHUNK,
    check_counts,
    classify_rows,
    clip_score_report,
    clip_scorer,
    compute_metrics,
    resolve_targets,
    sample_images,
)
from popalign_core.evaluate.audit_config import DEFAULT_AXES, DEFAULT_MAX_UNREADABLE, AuditConfig
from popalign_core.evaluate.audit_files import (  # noqa: F401  (re-exported)
    AUDIT_FILE,
    AUDIT_OUTPUTS,
    AUDIT_VERSION,
    IMAGE_SUFFIXES,
    IMAGES_MANIFEST,
    _check_prompt_list,
    load_audit,
    parse_identity,
    read_image_manifest,
    read_prompts,
    scan_image_folder,
    write_json,
)
from popalign_core.evaluate.compare import COMPARE_OUTPUTS, compare_audits, compare_main  # noqa: F401  (re-exported)
from popalign_core.evaluate.metrics import POOLED_NOTE
from popalign_core.models.loading_options import MODEL_FILE_OPTIONS, add_model_file_arguments, model_spec
from popalign_core.models.sampling import SCHEDULER_CHOICES, SamplerConfig

if TYPE_CHECKING:
    from popalign_core.models.sampling import SamplerConfig


# ------------------------------------------------------------------------------------------------ audit
def run_audit(
    *,
    model: Any = None,
    prompts: Sequence[str] | str | os.PathLike | None = None,
    images_per_prompt: int = 16,
    images_dir: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    config: AuditConfig | None = None,
    sampler: SamplerConfig | Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike,
    report: bool = True,
    grid_k: int = 4,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Audit a model (sampling mode: `model` + `prompts`) or a folder of images (`images_dir` and/or `manifest`).

    config: an `AuditConfig` (default: fairface, gender and race, uniform targets, probabilistic labels, 1000
    bootstrap resamples): the classifier (a name of `CLASSIFIERS` built with `make_classifier(name,
    detector=detector, **classifier_options)`, or a ready object), the detector (None: the backend's own or
    `FullImage`), axes, targets (axis -> probabilities over the classifier's classes; default uniform), hard labels,
    n_boot, max_unreadable (the largest share of images that may be unreadable: they are skipped, counted and warned
    about; more is an error, as are no readable image and no detected face at all) and clip_score (None, options of
    the `clip` backend or an embedder: adds CLIPScore, `metrics.clip_score`, per image, per prompt with a bootstrap
    CI, and over prompts). sampler: a `SamplerConfig` (or its fields, checked with the other inputs; default
    `SamplerConfig()`), used in sampling mode only.
    progress: called with a status line after each chunk; an exception it raises (e.g. a cancel) stops the audit.
    Returns the audit dict, also written to ``out_dir/audit.json`` (plus the report when `report`). `out_dir` must be
    new, empty or an earlier audit's folder (`fileio.claim_output_dir`).
    """
    plan = _validate_audit(model, prompts, images_per_prompt, images_dir, manifest, config, sampler, out_dir)
    result = _compute_audit(plan, progress)
    return _write_audit(result, plan.out, report, grid_k)


@dataclass
class _AuditPlan:
    """What `_validate_audit` resolved: everything `_compute_audit` needs (nothing measured yet)."""

    out: Path
    config: AuditConfig
    clf: Any
    classes: dict[str, tuple[str, ...]]
    targets: dict[str, Any]
    scorer: Any
    settings: dict[str, Any]
    prompts: list[str] = field(default_factory=list)
    rows: list[dict] | None = None  # images mode: the image rows; sampling mode: None until sampled
    model: Any = None
    images_per_prompt: int = 0
    sampler: Any = None
    duplicates: int = 0


# ------------------------------------------------------------------------------------------------ validate
def _validate_audit(model, prompts, images_per_prompt, images_dir, manifest, config, sampler, out_dir) -> _AuditPlan:
    """Every input checked, in a fixed order (so the first error is always the same), before any work: the mode,
    the `AuditConfig`, the classifier and its axes, targets, the prompts / images and the sampler; then the output
    folder is claimed."""
    if out_dir is None:
        raise ValueError("`out_dir` is required")
    sampling_mode = model is not None
    if sampling_mode and (images_dir is not None or manifest is not None):
        raise ValueError("give either `model` (+ `prompts`) or `images_dir` / `manifest`, not both")
    if not sampling_mode and images_dir is None and manifest is None:
        raise ValueError("nothing to audit: give `model` + `prompts`, or `images_dir` and/or `manifest`")
    config = config if config is not None else AuditConfig()
    config.validate()
    plan = _measuring_plan(config, Path(out_dir), sampling_mode)
    if sampling_mode:
        _plan_sampling(plan, model, prompts, images_per_prompt, sampler)
    else:
        _plan_images(plan, images_dir, manifest)
    return plan


def _measuring_plan(config: AuditConfig, out: Path, sampling_mode: bool) -> _AuditPlan:
    """The classifier (built), the class set and target of each audited axis, the CLIPScore embedder and the
    settings recorded in audit.json."""

    options = dict(config.classifier_options or {})
    clf = config.classifier
    if isinstance(clf, str):
        clf = make_classifier(clf, detector=config.detector, **options)
    axes = config.axes
    missing = [a for a in axes if a not in clf.axes]
    if missing:
        raise ValueError(f"`axes` {missing} are not provided by classifier {clf.name!r}; it has {list(clf.axes)}")
    classes = {a: tuple(clf.axes[a]) for a in axes}
    targets = resolve_targets(axes, classes, config.targets)
    scorer = clip_scorer(config.clip_score, clf)
    settings: dict[str, Any] = {
        "mode": "sampling" if sampling_mode else "images",
        "classifier": getattr(clf, "name", type(clf).__name__),
        "classifier_weights": str(getattr(clf, "weights_path", options.get("weights", "")) or "") or None,
        "detector": getattr(getattr(clf, "detector", None), "name", None),
        "axes": list(axes),
        "labels": "hard (argmax one-hot)" if config.hard_labels else "probabilistic (classifier probabilities)",
        "hard_labels": bool(config.hard_labels),
        "n_boot": config.n_boot,
    }
    return _AuditPlan(out, config, clf, classes, targets, scorer, settings)


def _plan_sampling(plan: _AuditPlan, model: Any, prompts: Any, images_per_prompt: Any, sampler: Any) -> None:
    """Sampling mode: the prompts (a list or a prompts file), the image count and the sampler, checked before the
    output folder is created."""
    if prompts is None:
        raise ValueError("`prompts` is required with `model` (a list or a prompts file)")
    plan.prompts = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else _check_prompt_list(prompts)
    if not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"`images_per_prompt` must be an integer >= 1; got {images_per_prompt!r}")
    plan.model, plan.images_per_prompt, plan.sampler = model, images_per_prompt, _sampler_config(sampler)
    claim_output_dir(plan.out, "audit", AUDIT_OUTPUTS, signature=AUDIT_FILE)


def _sampler_config(sampler: Any) -> SamplerConfig:
    """A checked `SamplerConfig` from one, from its fields, or the defaults (None)."""

    if sampler is None:
        return SamplerConfig()
    if not isinstance(sampler, SamplerConfig):
        return SamplerConfig(**dict(sampler))
    sampler.validate()
    if sampler.output != "tensor":
        raise ValueError(f"sampler.output={sampler.output!r}: an audit samples images; use output='tensor'")
    return sampler


def _plan_images(plan: _AuditPlan, images_dir: Any, manifest: Any) -> None:
    """Images mode: the image rows of the manifest (or of the folder's sub-folders), each (image, prompt) once; the
    output folder is checked here and created with the results."""
    rows = read_image_manifest(manifest, images_dir) if manifest is not None else scan_image_folder(images_dir)
    unique = list({(r["path"], r["prompt"]): r for r in reversed(rows)}.values())[::-1]
    plan.duplicates = len(rows) - len(unique)  # the same image listed twice for a prompt would count twice
    plan.rows = unique
    claim_output_dir(plan.out, "audit", AUDIT_OUTPUTS, create=False, signature=AUDIT_FILE)  # created with results
    plan.prompts = list(dict.fromkeys(r["prompt"] for r in unique))
    plan.settings.update({"model": None, "images_dir": str(images_dir) if images_dir else None})
    plan.settings["manifest"] = str(manifest) if manifest else None
    plan.settings["images_per_prompt"] = {p: sum(r["prompt"] == p for r in unique) for p in plan.prompts}


# ------------------------------------------------------------------------------------------------ compute
def _compute_audit(plan: _AuditPlan, progress: Callable[[str], None] | None) -> dict[str, Any]:
    """Sample (sampling mode), classify and measure: the audit dict (`_write_audit` writes it)."""
    cfg, settings = plan.config, plan.settings
    rows = plan.rows
    if rows is None:
        rows, info = sample_images(plan.model, plan.prompts, plan.images_per_prompt, plan.out, plan.sampler, progress)
        settings.update(info)
        settings["images_per_prompt"] = plan.images_per_prompt
    records = classify_rows(plan.clf, rows, cfg.axes, progress, scorer=plan.scorer)
    metrics = compute_metrics(records, plan.prompts, cfg.axes, plan.classes, plan.targets, cfg.hard_labels,
                              cfg.n_boot, seed=0)  # fmt: skip
    if plan.scorer is not None:
        settings["clip_score"] = {"weights": str(getattr(plan.scorer, "weights_path", "") or "") or None, "w": 100.0}
        metrics["clip_score"] = clip_score_report(records, plan.prompts, cfg.n_boot, seed=0)
    counts = _counts(records)
    warnings = check_counts(records, plan.prompts, counts, cfg.max_unreadable)
    if plan.duplicates:
        counts["duplicate_rows"] = plan.duplicates
        warnings.append(f"{plan.duplicates} manifest row(s) repeat an image of the same prompt and were counted once")
    headline = {
        a: {
            "mean_over_prompts": metrics["axes"][a]["discrepancy"]["mean_over_prompts"],
            "pooled": metrics["axes"][a]["discrepancy"]["pooled"],
        }
        for a in cfg.axes
    }
    return {
        "version": AUDIT_VERSION,
        "settings": settings,
        "prompts": plan.prompts,
        "counts": counts,
        "warnings": warnings,
        "headline": headline,
        "pooled_note": POOLED_NOTE,
        **metrics,
        "images": records,
    }


def _counts(records: list[dict]) -> dict[str, int]:
    """Images, readable, corrupt (unreadable files), errors (unreadable or not classified), faces, no_face."""
    n_read = sum(r["error"] is None for r in records)
    n_faces = sum(r["face_found"] for r in records)
    return {
        "images": len(records),
        "readable": n_read,
        "corrupt": sum(r["error"] is not None and r["error"].startswith("unreadable") for r in records),
        "errors": sum(r["error"] is not None for r in records),
        "faces": n_faces,
        "no_face": n_read - n_faces,
    }


# ------------------------------------------------------------------------------------------------ write
def _write_audit(result: dict[str, Any], out: Path, report: bool, grid_k: int) -> dict[str, Any]:
    """``audit.json`` (atomically) and, with `report`, the Markdown / HTML report and plots; returns `result`."""
    claim_output_dir(out, "audit", AUDIT_OUTPUTS, signature=AUDIT_FILE)
    write_json(out / AUDIT_FILE, result)
    if report:
        from popalign_core.evaluate.report import write_report

        result["report"] = write_report(result, out, grid_k=grid_k)
    return result


# ------------------------------------------------------------------------------------------------ CLI
def _parser() -> ArgumentParser:
    ap = ArgumentParser(
        prog="popalign audit",
        description="Audit the demographic bias of a model (--model + --prompts) or of images (--images). "
        "`popalign audit compare A B --out DIR` compares two audits.",
    )
    src = ap.add_argument_group("what to audit")
    src.add_argument(
        "--model",
        help="checkpoint (.safetensors), diffusers folder, 'toyworld' (the shipped toy world) or 'tiny:sd15'",
    )
    add_model_file_arguments(src)
    src.add_argument("--prompts", help="prompts file: one prompt a line, # comments")
    src.add_argument("--images-per-prompt", type=integer, default=16)
    src.add_argument("--images", help="folder of images (sub-folders = prompts without --manifest)")
    src.add_argument("--manifest", help="JSONL/CSV with columns image, prompt [, identity]")
    c = ap.add_argument_group("classification")
    c.add_argument("--classifier", default="fairface", choices=sorted(CLASSIFIERS))
    c.add_argument("--weights", help="classifier weight file (or folder, for backends that read one)")
    c.add_argument("--models-dir", help="models folder holding popalign/classifiers/")
    c.add_argument(
        "--detector",
        default=None,
        choices=sorted(DETECTORS),
        help="face detector (default: the backend's own, or the whole image is the face)",
    )
    c.add_argument("--device", default="cpu")
    c.add_argument("--axes", default=",".join(DEFAULT_AXES), help="comma-separated axes")
    c.add_argument("--targets", help="JSON text or a .json file: {axis: {class: p}} (default: uniform per axis)")
    c.add_argument("--hard-labels", action="store_true", help="argmax one-hot labels instead of probabilities")
    c.add_argument("--n-boot", type=integer, default=1000, help="bootstrap resamples of the CIs (>= 10)")
    c.add_argument(
        "--max-unreadable",
        type=number,
        default=DEFAULT_MAX_UNREADABLE,
        help="largest share of images that may be unreadable (skipped with a warning); more is an error",
    )
    c.add_argument("--clip-score-weights", help="open_clip state dict: also report CLIPScore (prompt-image alignment)")
    c.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture of --clip-score-weights")
    s = ap.add_argument_group("sampler")
    s.add_argument("--steps", type=integer, default=25)
    s.add_argument("--guidance", type=number, default=7.5, help="classifier-free guidance scale")
    s.add_argument("--seed", type=integer, default=0)
    s.add_argument(
        "--scheduler",
        default="auto",
        help=f"sampler: {', '.join(SCHEDULER_CHOICES)} (auto: ddim, or flow_euler for SD3 / FLUX)",
    )
    s.add_argument("--height", type=integer)
    s.add_argument("--width", type=integer)
    s.add_argument("--batch-size", type=integer, default=8)
    ap.add_argument("--out", required=True, help="output folder (nothing is written elsewhere)")
    ap.add_argument("--no-report", action="store_true")
    return ap


def _prog(argv: list[str]) -> str:
    return "popalign audit compare" if argv and argv[0] == "compare" else "popalign audit"


@command(_prog)
def main(argv: list[str] | None = None) -> int:
    """Entry point of `popalign audit` (see the module docstring)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    a = _parser().parse_args(argv)
    given = [n for n in MODEL_FILE_OPTIONS if getattr(a, n, None) not in (None, [])] if a.model is None else []
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')}: a model-file option needs --model (it loads the model)")
    config = _config_of_args(a)
    res = run_audit(
        model=model_spec(a.model, a) if a.model is not None else None,
        prompts=a.prompts,
        images_per_prompt=a.images_per_prompt,
        images_dir=a.images,
        manifest=a.manifest,
        config=config,
        sampler=_sampler_of_args(a),
        out_dir=a.out,
        report=not a.no_report,
        progress=lambda msg: print(f"[audit] {msg}", file=sys.stderr),
    )
    _print_summary(res, Path(a.out))
    return 0


def _config_of_args(a) -> AuditConfig:
    """The `AuditConfig` of the command line (--targets is read here: its errors name the option)."""
    options: dict[str, Any] = {"device": a.device}
    if a.weights:
        options["weights"] = a.weights
    if a.models_dir:
        options["models_dir"] = a.models_dir
    targets = _parse_targets(a.targets) if a.targets else None
    clip = {"weights": a.clip_score_weights, "arch": a.clip_arch, "device": a.device} if a.clip_score_weights else None
    return AuditConfig(
        classifier=a.classifier,
        classifier_options=options,
        detector=a.detector,
        axes=tuple(x.strip() for x in a.axes.split(",") if x.strip()),
        targets=targets,
        hard_labels=a.hard_labels,
        n_boot=a.n_boot,
        max_unreadable=a.max_unreadable,
        clip_score=clip,
    )


def _sampler_of_args(a) -> dict[str, Any]:
    """The sampler flags as `SamplerConfig` fields: `run_audit` checks them after the other inputs, and only in
    sampling mode (an images audit ignores them)."""
    return {"steps": a.steps, "guidance_scale": a.guidance, "seed": a.seed, "scheduler": a.scheduler,
            "height": a.height, "width": a.width, "batch_size": a.batch_size}  # fmt: skip


def _print_summary(res: dict[str, Any], out: Path) -> None:
    """Warnings on stderr; the headline numbers and the audit file on stdout."""
    import sys

    for w in res["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    for axis, h in res["headline"].items():
        m = h["mean_over_prompts"]
        print(
            f"{axis}: discrepancy mean over prompts = {m['value']} CI {m.get('ci')} "
            f"(pooled, flagged: {h['pooled']['value']})"
        )
    if "clip_score" in res:
        m = res["clip_score"]["mean_over_prompts"]
        print(f"clip_score: mean over prompts = {m['value']} CI {m.get('ci')}")
    print(f"wrote {out / AUDIT_FILE}")


def _parse_targets(text: str) -> Any:
    """--targets: inline JSON, or the path of a JSON file (ValueError naming the option otherwise)."""
    src, where = text, "text"
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"--targets: {text!r} is neither JSON text nor an existing .json file")
        src, where = path.read_text(encoding="utf-8"), f"file {text!r}"
    try:
        return json.loads(src)
    except json.JSONDecodeError as e:
        raise ValueError(f"--targets: the {where} is not valid JSON ({e})") from e
