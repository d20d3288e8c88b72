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
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.evaluate.metrics import (
    POOLED_NOTE,
    ambiguity,
    bias_pairwise,
    bootstrap_ci,
    face_rate,
    per_prompt_report,
    recall,
)
from popalign_core.evaluate.metrics import clip_score as clip_score_metric

AUDIT_VERSION = 1
AUDIT_FILE = "audit.json"
IMAGES_MANIFEST = "images.jsonl"
from popalign_core.common.fileio import atomic_write_bytes, atomic_write_text, claim_output_dir, load_rgb  # noqa: E402,F401  (re-exported)
from popalign_core.common.userinput import ArgumentParser, command, integer, number  # noqa: E402

#: What `popalign audit` / `audit compare` write in their output folders (`fileio.claim_output_dir`).
AUDIT_OUTPUTS = {AUDIT_FILE: None, IMAGES_MANIFEST: None, "images": {re.compile(r"p\d{3,}_\d{4,}\.png"): None},
                 "report.md": None, "report.html": None, "shares_*.png": None, "discrepancy.png": None,
                 "grid.png": None}  # fmt: skip
COMPARE_OUTPUTS = {"compare.json": None, "compare.md": None, "compare.html": None, "compare.png": None}
DEFAULT_MAX_UNREADABLE = 0.1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_AXES = ("gender", "race")
CLASSIFY_CHUNK = 32  # images read and classified at a time


# ------------------------------------------------------------------------------------------------ small helpers
def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o: Any) -> Any:
    """Replace non-finite floats by None (strict JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented, strict JSON."""
    obj = json.loads(json.dumps(obj, default=_json_default))
    atomic_write_text(path, json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")


# ------------------------------------------------------------------------------------------------ inputs
def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file: one per line; blank lines and lines starting with `#` are ignored.

    Raises FileNotFoundError for a missing file, ValueError for a file without prompts or with duplicate prompts
    (the message names the line numbers of each duplicate)."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"prompts file {str(p)!r} is a folder; give a text file with one prompt per line")
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {str(p)!r} does not exist")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {str(p)!r} is not UTF-8 text: {e}") from e
    lines: dict[str, list[int]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        lines.setdefault(s, []).append(lineno)
    if not lines:
        raise ValueError(f"prompts file {str(p)!r} has no prompts (only blank lines or # comments)")
    dups = {s: ln for s, ln in lines.items() if len(ln) > 1}
    if dups:
        listed = "; ".join(f"{s!r} on lines {', '.join(map(str, ln))}" for s, ln in dups.items())
        raise ValueError(f"prompts file {str(p)!r} has duplicate prompts: {listed}")
    return list(lines)


def _check_prompt_list(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"`prompts` must be a non-empty list of strings or a prompts file; got {prompts!r}")
    out = [str(s).strip() for s in prompts]
    bad = [i for i, s in enumerate(out) if not s]
    if bad:
        raise ValueError(f"`prompts` has empty prompt(s) at position(s) {bad}")
    seen: dict[str, list[int]] = {}
    for i, s in enumerate(out):
        seen.setdefault(s, []).append(i)
    dups = {s: ix for s, ix in seen.items() if len(ix) > 1}
    if dups:
        raise ValueError(f"`prompts` has duplicates (positions): {dups}")
    return out


def parse_identity(value: Any) -> dict[str, str]:
    """``"gender=female;race=black"`` (or a dict) -> {"gender": "female", "race": "black"}; ""/None -> {}."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return {str(k).strip(): str(v).strip().lower() for k, v in value.items() if v not in (None, "")}
    out = {}
    for part in str(value).split(";"):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise ValueError(f"`identity` entry {part!r} of {value!r} is not of the form axis=class")
        out[k.strip()] = v.strip().lower()
    return out


def read_image_manifest(manifest: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> list[dict]:
    """Rows {image (resolved path), prompt, index, seed, identity} of a JSONL / CSV manifest.

    Relative `image` paths are resolved against `images_dir` when given, else against the manifest's folder."""
    from popalign_core.train.data import read_manifest_csv, read_manifest_jsonl

    m = Path(manifest)
    if m.is_dir():
        raise IsADirectoryError(f"manifest {str(m)!r} is a folder; give its manifest file (.jsonl or .csv), or the "
                                "folder as --images")  # fmt: skip
    if not m.is_file():
        raise FileNotFoundError(f"manifest {str(m)!r} does not exist")
    suffix = m.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"manifest {str(m)!r}: unknown suffix {m.suffix!r}; valid: ('.jsonl', '.csv')")
    columns, rows = (read_manifest_jsonl if suffix == ".jsonl" else read_manifest_csv)(m)
    missing = [c for c in ("image", "prompt") if c not in columns]
    if missing:
        raise ValueError(f"manifest {str(m)!r} lacks column(s) {missing}; it has {columns}")
    base = Path(images_dir) if images_dir is not None else m.parent
    out = []
    for r in rows:
        image, prompt = r.values.get("image"), r.values.get("prompt")
        if not isinstance(image, str) or not image.strip() or not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"manifest {str(m)!r}, line {r.line}: `image` and `prompt` must be non-empty strings")
        p = Path(image.strip())
        try:
            identity = parse_identity(r.values.get("identity"))
        except ValueError as e:
            raise ValueError(f"manifest {str(m)!r}, line {r.line}: {e}") from e
        out.append(
            {
                "image": image.strip(),
                "path": os.path.normpath(p if p.is_absolute() else base / p),
                "prompt": prompt.strip(),
                "index": r.values.get("index"),
                "seed": r.values.get("seed"),
                "identity": identity,
            }
        )
    if not out:
        raise ValueError(f"manifest {str(m)!r} has no rows")
    return out


def scan_image_folder(images_dir: str | os.PathLike) -> list[dict]:
    """Rows of a folder without a manifest: each sub-folder is a prompt (its name), its image files the images."""
    d = Path(images_dir)
    if d.is_file():
        raise NotADirectoryError(f"images folder {str(d)!r} is a file; give the folder holding one sub-folder of "
                                 "images per prompt (or a manifest with --manifest)")  # fmt: skip
    if not d.is_dir():
        raise FileNotFoundError(f"images folder {str(d)!r} does not exist")
    rows = []
    for sub in sorted(x for x in d.iterdir() if x.is_dir()):
        files = sorted(f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        for i, f in enumerate(files):
            rows.append({"image": f"{sub.name}/{f.name}", "path": str(f), "prompt": sub.name, "index": i})
    if not rows:
        raise ValueError(
            f"images folder {str(d)!r} has no sub-folders with images ({', '.join(IMAGE_SUFFIXES)}); "
            "give --manifest or put each prompt's images in a sub-folder named after the prompt"
        )
    return rows


# ------------------------------------------------------------------------------------------------ sampling
def sample_images(
    model: Any,
    prompts: Sequence[str],
    images_per_prompt: int,
    out_dir: Path,
    sampler: Mapping[str, Any],
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict], dict]:
    """Sample `images_per_prompt` seeded images per prompt, save PNGs under out_dir/images/ and the manifest
    out_dir/images.jsonl. Returns (rows, model info)."""
    from PIL import Image

    from popalign_core.models.sampling import SamplerConfig, derive_seed, sample
    from popalign_core.train.data import write_manifest

    if isinstance(model, (str, os.PathLike)):
        spec = str(model)
        if spec.startswith("tiny:"):
            from popalign_core.models.tiny import get_dummy_adapter

            parts = spec.split(":")
            adapter = get_dummy_adapter(parts[1], seed=int(parts[2]) if len(parts) > 2 else 0)
        else:
            from popalign_core.models.loading import TOYWORLD, load_model

            if spec != TOYWORLD and not Path(spec).exists():
                raise FileNotFoundError(f"model {spec!r} does not exist (a checkpoint file or diffusers folder)")

            adapter = load_model(spec)
    elif model is not None and hasattr(model, "encode_prompt"):
        spec, adapter = type(model).__name__, model
    else:
        raise ValueError(
            "`model` must be a checkpoint path, a diffusers folder, 'toyworld', 'tiny:sd15' or an adapter; "
            f"got {model!r}"
        )
    config = SamplerConfig(**dict(sampler))
    rows = []
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for pi, prompt in enumerate(prompts):
        reqs = [(prompt, i) for i in range(images_per_prompt)]
        imgs = sample(adapter, reqs, config)
        arr = (imgs.clamp(0, 1).mul(255).round().byte()).permute(0, 2, 3, 1).numpy()
        for i in range(images_per_prompt):
            rel = f"images/p{pi:03d}_{i:04d}.png"
            buf = io.BytesIO()
            Image.fromarray(arr[i]).save(buf, format="PNG")
            atomic_write_bytes(out_dir / rel, buf.getvalue())
            rows.append(
                {
                    "image": rel,
                    "path": str(out_dir / rel),
                    "prompt": prompt,
                    "index": i,
                    "seed": derive_seed(config.seed, prompt, i),
                    "identity": {},
                }
            )
        if progress:
            progress(f"sampled {images_per_prompt} images for prompt {pi + 1}/{len(prompts)}")
    write_manifest(out_dir / IMAGES_MANIFEST, [{k: r[k] for k in ("image", "prompt", "index", "seed")} for r in rows])
    settings = {k: getattr(config, k) for k in ("steps", "guidance_scale", "scheduler", "seed", "negative_prompt")}
    settings["height"], settings["width"] = int(arr.shape[1]), int(arr.shape[2])
    settings["cfg"] = f"classifier-free guidance scale {config.guidance_scale}" + (
        " (1 = no guidance)" if config.guidance_scale == 1 else ""
    )
    return rows, {"model": spec, "sampler": settings}


# ------------------------------------------------------------------------------------------------ targets
def _resolve_targets(axes: Sequence[str], classes: Mapping[str, tuple[str, ...]], targets: Any) -> dict[str, Any]:
    """axis -> target probability vector over the classifier's FIXED class set of that axis (default uniform)."""
    from popalign_core.common.attributes import Target, _check_vector

    if targets is not None and not isinstance(targets, Mapping):
        raise ValueError(f"`targets` must be a dict axis -> probabilities (dict or list) or None; got {targets!r}")
    targets = dict(targets or {})
    unknown = [a for a in targets if a not in axes]
    if unknown:
        raise ValueError(f"`targets` names axis/axes {unknown} not audited; audited axes: {list(axes)}")
    out = {}
    for axis in axes:
        cls = classes[axis]
        t = targets.get(axis)
        if t is None:
            out[axis] = np.full(len(cls), 1.0 / len(cls))
        elif isinstance(t, Target):
            if tuple(t.classes) != tuple(cls):
                raise ValueError(f"`targets[{axis!r}]` is over {list(t.classes)}; the classifier's classes are {cls}")
            out[axis] = np.asarray(t.probs, dtype=np.float64)
        else:
            out[axis] = _check_vector(f"targets[{axis!r}]", t, cls)
    return out


# ------------------------------------------------------------------------------------------------ metrics
def _safe(fn: Callable[[], float], reason: str) -> dict[str, Any]:
    try:
        return {"value": float(fn())}
    except ValueError as e:
        return {"value": None, "reason": f"{reason} ({e})"}


def _mean_over(values: Mapping[str, dict]) -> dict[str, Any]:
    vs = [v["value"] for v in values.values() if v.get("value") is not None]
    if not vs:
        return {"value": None, "n_prompts": 0, "reason": "no prompt has a value"}
    return {"value": float(np.mean(vs)), "n_prompts": len(vs)}


def compute_metrics(
    records: list[dict],
    prompts: Sequence[str],
    axes: Sequence[str],
    classes: Mapping[str, tuple[str, ...]],
    targets: Mapping[str, np.ndarray],
    hard: bool,
    n_boot: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Per prompt and axis metrics from per-image records (see `run_audit`)."""
    readable = [r for r in records if r["error"] is None]
    by_prompt = {p: [r for r in readable if r["prompt"] == p] for p in prompts}
    fr = {
        p: _safe(lambda rs=rs: face_rate(np.array([r["face_found"] for r in rs], dtype=bool)), "no readable images")
        for p, rs in by_prompt.items()
    }
    found_all = np.array([r["face_found"] for r in readable], dtype=bool)
    out: dict[str, Any] = {
        "face_rate": {
            "per_prompt": fr,
            "mean_over_prompts": _mean_over(fr),
            "pooled": _safe(lambda: face_rate(found_all), "no readable images"),
        },
        "axes": {},
    }
    for axis in axes:
        cls = classes[axis]
        k = len(cls)
        probs = {
            p: np.array([[r["probs"][axis][c] for c in cls] for r in rs if r["face_found"]], dtype=np.float64).reshape(
                -1, k
            )
            for p, rs in by_prompt.items()
        }
        disc = per_prompt_report(probs, targets[axis], hard=hard, n_boot=n_boot, seed=seed)
        bias = {
            p: _safe(lambda x=x, k=k: bias_pairwise(x.argmax(axis=1), k), "no detected faces")
            for p, x in probs.items()
        }
        amb = {p: _safe(lambda x=x: ambiguity(x), "no detected faces") for p, x in probs.items()}
        entry: dict[str, Any] = {
            "classes": list(cls),
            "target": [float(v) for v in targets[axis]],
            "discrepancy": disc,
            "bias_pairwise": {"per_prompt": bias, "mean_over_prompts": _mean_over(bias)},
            "ambiguity": {"per_prompt": amb, "mean_over_prompts": _mean_over(amb)},
            "shares": {p: (x.mean(axis=0).tolist() if len(x) else None) for p, x in probs.items()},
        }
        with_id = [r for r in readable if axis in r.get("identity", {})]
        if with_id:
            rec = {}
            for p in prompts:
                rs = [r for r in with_id if r["prompt"] == p]
                if not rs:
                    continue
                pred = [
                    cls[int(np.argmax([r["probs"][axis][c] for c in cls]))] if r["face_found"] else None for r in rs
                ]
                rec[p] = _safe(
                    lambda pred=pred, rs=rs, a=axis: recall(pred, [r["identity"][a] for r in rs]), "no identity"
                )
            entry["recall"] = {"per_prompt": rec, "mean_over_prompts": _mean_over(rec)}
        out["axes"][axis] = entry
    return out


# ------------------------------------------------------------------------------------------------ audit
def run_audit(
    *,
    model: Any = None,
    prompts: Sequence[str] | str | os.PathLike | None = None,
    images_per_prompt: int = 16,
    images_dir: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    classifier: Any = "fairface",
    classifier_options: Mapping[str, Any] | None = None,
    detector: Any = None,
    axes: Sequence[str] = DEFAULT_AXES,
    targets: Mapping[str, Any] | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    seed: int = 0,
    scheduler: str = "ddim",
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    out_dir: str | os.PathLike,
    hard_labels: bool = False,
    n_boot: int = 1000,
    report: bool = True,
    grid_k: int = 4,
    progress: Callable[[str], None] | None = None,
    clip_score: Any = None,
    max_unreadable: float = DEFAULT_MAX_UNREADABLE,
) -> dict[str, Any]:
    """Audit a model (sampling mode: `model` + `prompts`) or a folder of images (`images_dir` and/or `manifest`).

    classifier: a name of `CLASSIFIERS` (built with `make_classifier(name, detector=detector,
    **classifier_options)`, e.g. options {"weights": path}) or a ready classifier object. detector: None (the
    whole image is the face: `FullImage`), a name of `DETECTORS` or an object with ``detect(image)``.
    targets: axis -> probabilities over the classifier's class set of that axis (default: uniform).
    clip_score: None (skipped), options of the `clip` backend (e.g. {"weights": path, "arch": "ViT-B-32"}) or an
    object with ``embed_images`` / ``embed_texts``: adds CLIPScore (prompt-image alignment, `metrics.clip_score`)
    per image, per prompt with a bootstrap CI, and over prompts.
    progress: called with a status line after each chunk; an exception it raises (e.g. a cancel) stops the audit.
    max_unreadable: the largest share of images that may be unreadable (they are skipped, counted and warned about);
    more is an error, as are no readable image and no detected face at all (no silent numbers from nothing).
    Returns the audit dict, also written to ``out_dir/audit.json`` (plus the report when `report`). `out_dir` must be
    new, empty or an earlier audit's folder (`fileio.claim_output_dir`).
    """
    from popalign_core.classify.classifiers import make_classifier

    if out_dir is None:
        raise ValueError("`out_dir` is required")
    out = Path(out_dir)
    sampling_mode = model is not None
    duplicates = 0
    if sampling_mode and (images_dir is not None or manifest is not None):
        raise ValueError("give either `model` (+ `prompts`) or `images_dir` / `manifest`, not both")
    if not sampling_mode and images_dir is None and manifest is None:
        raise ValueError("nothing to audit: give `model` + `prompts`, or `images_dir` and/or `manifest`")
    if isinstance(axes, str) or not axes:
        raise ValueError(f"`axes` must be a non-empty list of axis names; got {axes!r}")
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 10:
        raise ValueError(f"`n_boot` must be an integer >= 10; got {n_boot!r}")
    if isinstance(max_unreadable, bool) or not isinstance(max_unreadable, int | float) or not 0 <= max_unreadable <= 1:
        raise ValueError(f"`max_unreadable` must be a number in [0, 1]; got {max_unreadable!r}")
    options = dict(classifier_options or {})
    if isinstance(classifier, str):
        clf = make_classifier(classifier, detector=detector, **options)
    elif callable(getattr(classifier, "classify", None)):
        clf = classifier
    else:
        raise ValueError(f"`classifier` must be a classifier name or object with classify(); got {classifier!r}")
    missing = [a for a in axes if a not in clf.axes]
    if missing:
        raise ValueError(f"`axes` {missing} are not provided by classifier {clf.name!r}; it has {list(clf.axes)}")
    classes = {a: tuple(clf.axes[a]) for a in axes}
    tvec = _resolve_targets(axes, classes, targets)
    scorer = _clip_scorer(clip_score, clf)

    settings: dict[str, Any] = {
        "mode": "sampling" if sampling_mode else "images",
        "classifier": getattr(clf, "name", type(clf).__name__),
        "classifier_weights": str(getattr(clf, "weights_path", options.get("weights", "")) or "") or None,
        "detector": getattr(getattr(clf, "detector", None), "name", None),
        "axes": list(axes),
        "labels": "hard (argmax one-hot)" if hard_labels else "probabilistic (classifier probabilities)",
        "hard_labels": bool(hard_labels),
        "n_boot": n_boot,
    }
    if sampling_mode:
        if prompts is None:
            raise ValueError("`prompts` is required with `model` (a list or a prompts file)")
        plist = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else _check_prompt_list(prompts)
        if not isinstance(images_per_prompt, int) or images_per_prompt < 1:
            raise ValueError(f"`images_per_prompt` must be an integer >= 1; got {images_per_prompt!r}")
        from popalign_core.models.sampling import SamplerConfig

        SamplerConfig(steps=steps, guidance_scale=guidance, seed=seed, scheduler=scheduler, height=height,
                      width=width, batch_size=batch_size)  # checked before any output is written  # fmt: skip
        claim_output_dir(out, "audit", AUDIT_OUTPUTS, signature=AUDIT_FILE)
        sampler = {
            "steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
            "scheduler": scheduler,
            "height": height,
            "width": width,
            "batch_size": batch_size,
        }
        rows, info = sample_images(model, plist, images_per_prompt, out, sampler, progress)
        settings.update(info)
        settings["images_per_prompt"] = images_per_prompt
    else:
        rows = read_image_manifest(manifest, images_dir) if manifest is not None else scan_image_folder(images_dir)
        unique = list({(r["path"], r["prompt"]): r for r in reversed(rows)}.values())[::-1]
        duplicates = len(rows) - len(unique)  # the same image listed twice for a prompt would count twice
        rows = unique
        claim_output_dir(out, "audit", AUDIT_OUTPUTS, create=False, signature=AUDIT_FILE)  # created with results
        plist = list(dict.fromkeys(r["prompt"] for r in rows))
        settings.update({"model": None, "images_dir": str(images_dir) if images_dir else None})
        settings["manifest"] = str(manifest) if manifest else None
        counts = {p: sum(r["prompt"] == p for r in rows) for p in plist}
        settings["images_per_prompt"] = counts

    records = _classify_rows(clf, rows, axes, progress, scorer=scorer)
    metrics = compute_metrics(records, plist, axes, classes, tvec, hard_labels, n_boot, seed=0)
    if scorer is not None:
        settings["clip_score"] = {"weights": str(getattr(scorer, "weights_path", "") or "") or None, "w": 100.0}
        metrics["clip_score"] = clip_score_report(records, plist, n_boot, seed=0)
    n_read = sum(r["error"] is None for r in records)
    n_faces = sum(r["face_found"] for r in records)
    counts = {
        "images": len(records),
        "readable": n_read,
        "corrupt": sum(r["error"] is not None and r["error"].startswith("unreadable") for r in records),
        "errors": sum(r["error"] is not None for r in records),
        "faces": n_faces,
        "no_face": n_read - n_faces,
    }
    warnings = _check_counts(records, plist, counts, max_unreadable)
    if duplicates:
        counts["duplicate_rows"] = duplicates
        warnings.append(f"{duplicates} manifest row(s) repeat an image of the same prompt and were counted once")
    headline = {
        a: {
            "mean_over_prompts": metrics["axes"][a]["discrepancy"]["mean_over_prompts"],
            "pooled": metrics["axes"][a]["discrepancy"]["pooled"],
        }
        for a in axes
    }
    result = {
        "version": AUDIT_VERSION,
        "settings": settings,
        "prompts": plist,
        "counts": counts,
        "warnings": warnings,
        "headline": headline,
        "pooled_note": POOLED_NOTE,
        **metrics,
        "images": records,
    }
    claim_output_dir(out, "audit", AUDIT_OUTPUTS, signature=AUDIT_FILE)
    write_json(out / AUDIT_FILE, result)
    if report:
        from popalign_core.evaluate.report import write_report

        result["report"] = write_report(result, out, grid_k=grid_k)
    return result


def _check_counts(records: list[dict], prompts: Sequence[str], counts: dict, max_unreadable: float) -> list[str]:
    """No numbers from nothing: errors when no image is readable, more than `max_unreadable` of them are not, or no
    face was found at all; warnings (returned) for skipped images and prompts without a value."""
    bad = [r for r in records if r["error"] is not None]
    first = f" (first: {bad[0]['path']}: {bad[0]['error']})" if bad else ""
    n = counts["images"]
    if counts["readable"] == 0:
        raise ValueError(f"none of the {n} images could be read or classified{first}: there is nothing to measure")
    if counts["errors"] > max_unreadable * n:
        raise ValueError(
            f"{counts['errors']} of {n} images ({counts['errors'] / n:.0%}) could not be read or classified{first}; "
            f"that is more than max_unreadable={max_unreadable:g} of them: fix or remove those files, or allow more "
            "with --max-unreadable"
        )
    if counts["faces"] == 0:
        raise ValueError(
            f"no face was detected in any of the {counts['readable']} readable images: discrepancy, bias and "
            "ambiguity are undefined; check the images, the detector (--detector) and its threshold"
        )
    warnings = []
    if counts["errors"]:
        warnings.append(f"{counts['errors']} of {n} image(s) could not be read or classified and were skipped"
                        f"{first}")  # fmt: skip
    no_face = [p for p in prompts if not any(r["face_found"] for r in records if r["prompt"] == p)]
    if no_face:
        shown = ", ".join(repr(p) for p in no_face[:3]) + (f" and {len(no_face) - 3} more" if len(no_face) > 3 else "")
        warnings.append(f"{len(no_face)} prompt(s) have no image with a detected face and no value: {shown}")
    return warnings


def _clip_scorer(clip_score: Any, clf: Any) -> Any:
    """None, a ready embedder (``embed_images``/``embed_texts``) or options of the `clip` backend -> embedder."""
    if clip_score is None or clip_score is False:
        return None
    if callable(getattr(clip_score, "embed_images", None)) and callable(getattr(clip_score, "embed_texts", None)):
        return clip_score
    if isinstance(clip_score, Mapping):
        from popalign_core.classify.classifiers import make_classifier

        opts = dict(clip_score)
        if getattr(clf, "name", None) == "clip" and not opts:
            return clf
        return make_classifier("clip", **opts)
    raise ValueError(
        f"`clip_score` must be None, options of the clip backend (a dict) or an object with embed_images/"
        f"embed_texts; got {clip_score!r}"
    )


def clip_score_report(records: list[dict], prompts: Sequence[str], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """CLIPScore per prompt (mean over its readable images, within-prompt bootstrap CI) and the mean over prompts
    (two-level bootstrap CI); images without a score (unreadable) are left out."""
    groups = {
        p: np.array([r["clip_score"] for r in records if r["prompt"] == p and r.get("clip_score") is not None])
        for p in prompts
    }
    per: dict[str, Any] = {}
    for i, (p, x) in enumerate(groups.items()):
        if len(x) == 0:
            per[p] = {"n": 0, "value": None, "ci": None, "reason": "no readable images"}
            continue
        ci = bootstrap_ci(np.mean, x, n_boot=n_boot, seed=seed + i) if len(x) > 1 else None
        per[p] = {"n": len(x), "value": float(x.mean()), "ci": [ci.low, ci.high] if ci else None}
    have = {p: x for p, x in groups.items() if len(x)}
    mean: dict[str, Any] = {"value": None, "ci": None, "n_prompts": len(have)}
    if have:
        mean["value"] = float(np.mean([x.mean() for x in have.values()]))
        if len(have) > 1:
            ci = bootstrap_ci(
                lambda gs: float(np.mean([g.mean() for g in gs])),
                list(have.values()),
                n_boot=n_boot,
                seed=seed,
                two_level=True,
            )
            mean["ci"] = [ci.low, ci.high]
    return {
        "definition": "mean over images of 100 * max(cos(CLIP image embedding, CLIP prompt embedding), 0)",
        "per_prompt": per,
        "mean_over_prompts": mean,
    }


def _classify_rows(
    clf: Any, rows: list[dict], axes: Sequence[str], progress: Callable | None, scorer: Any = None
) -> list[dict]:
    """One record per row: read the image (corrupt -> error, skipped), classify, keep the audited axes; with a
    `scorer`, also the image's CLIPScore against its prompt."""
    records: list[dict] = []
    text_emb: dict[str, np.ndarray] = {}
    if scorer is not None:
        prompts = list(dict.fromkeys(r["prompt"] for r in rows))
        text_emb = dict(zip(prompts, np.asarray(scorer.embed_texts(prompts)))) if prompts else {}
    for start in range(0, len(rows), CLASSIFY_CHUNK):
        chunk = rows[start : start + CLASSIFY_CHUNK]
        imgs, ok = [], []
        recs = []
        for r in chunk:
            rec = {
                "prompt": r["prompt"],
                "image": r["image"],
                "path": r["path"],
                "index": r.get("index"),
                "seed": r.get("seed"),
                "identity": r.get("identity") or {},
                "face_found": False,
                "box": None,
                "probs": None,
                "error": None,
            }
            try:
                imgs.append(load_rgb(r["path"]))
                ok.append(rec)
            except Exception as e:  # noqa: BLE001 - a corrupt file must not stop the audit
                rec["error"] = f"unreadable: {type(e).__name__}: {e}"
            recs.append(rec)
        results = clf.classify(imgs) if imgs else []
        if scorer is not None and imgs:
            emb = np.asarray(scorer.embed_images(imgs))
            for rec, e in zip(ok, emb):
                rec["clip_score"] = clip_score_metric(e[None], text_emb[rec["prompt"]][None])
        for rec, c in zip(ok, results):
            if c.error is not None:
                rec["error"] = c.error
                continue
            rec["face_found"] = bool(c.face_found)
            if c.face_found:
                rec["box"] = list(c.box) if c.box is not None else None
                rec["probs"] = {
                    a: {cls: float(v) for cls, v in zip(clf.axes[a], np.asarray(c.probs[a], dtype=np.float64))}
                    for a in axes
                }
        records.extend(recs)
        if progress:
            progress(f"classified {len(records)}/{len(rows)} images")
    return records


# ------------------------------------------------------------------------------------------------ compare
def load_audit(path: str | os.PathLike) -> dict[str, Any]:
    """An audit.json (or a folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / AUDIT_FILE
    if not p.is_file():
        raise FileNotFoundError(f"audit file {str(p)!r} does not exist")
    try:
        d = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"audit file {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"audit file {str(p)!r} is not valid JSON: {e}") from e
    if not isinstance(d, dict) or "axes" not in d or "prompts" not in d:
        raise ValueError(f"audit file {str(p)!r} is not a popalign audit (no 'axes' / 'prompts')")
    return d


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


# ------------------------------------------------------------------------------------------------ CLI
def _parser() -> ArgumentParser:
    from popalign_core.classify.classifiers import CLASSIFIERS
    from popalign_core.classify.detectors import DETECTORS

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
    s.add_argument("--scheduler", default="ddim")
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
        cp = ArgumentParser(prog="popalign audit compare", description="Before / after table of two audits.")
        cp.add_argument("before", help="audit.json (or its folder) before")
        cp.add_argument("after", help="audit.json (or its folder) after")
        cp.add_argument("--out", required=True)
        a = cp.parse_args(argv[1:])
        res = compare_audits(a.before, a.after, a.out)
        for axis, t in res["axes"].items():
            m = t["mean_over_prompts"]
            print(f"{axis}: mean over prompts {m['before']} -> {m['after']}")
        return 0
    ap = _parser()
    a = ap.parse_args(argv)
    options: dict[str, Any] = {"device": a.device}
    if a.weights:
        options["weights"] = a.weights
    if a.models_dir:
        options["models_dir"] = a.models_dir
    targets = _parse_targets(a.targets) if a.targets else None
    clip = {"weights": a.clip_score_weights, "arch": a.clip_arch, "device": a.device} if a.clip_score_weights else None
    res = run_audit(
        model=a.model,
        prompts=a.prompts,
        images_per_prompt=a.images_per_prompt,
        images_dir=a.images,
        manifest=a.manifest,
        classifier=a.classifier,
        classifier_options=options,
        detector=a.detector,
        axes=tuple(x.strip() for x in a.axes.split(",") if x.strip()),
        targets=targets,
        steps=a.steps,
        guidance=a.guidance,
        seed=a.seed,
        scheduler=a.scheduler,
        height=a.height,
        width=a.width,
        batch_size=a.batch_size,
        out_dir=a.out,
        hard_labels=a.hard_labels,
        n_boot=a.n_boot,
        report=not a.no_report,
        progress=lambda msg: print(f"[audit] {msg}", file=sys.stderr),
        clip_score=clip,
        max_unreadable=a.max_unreadable,
    )
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
    print(f"wrote {Path(a.out) / AUDIT_FILE}")
    return 0


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
