"""The measuring steps of `popalign audit`: sample the images (sampling mode), classify them, and compute the bias
metrics of `evaluate.metrics` per prompt, over prompts (the headline) and pooled (flagged, secondary).

- `sample_images`: seeded images per prompt (`sampling.sample`) saved as PNG with the manifest ``images.jsonl``;
- `classify_rows`: one record per image (corrupt files are counted, never fatal), optionally with its CLIPScore;
- `compute_metrics`: discrepancy (PopAlign Eq. 13) with bootstrap CIs, bias(P), ambiguity, face rate and recall;
- `clip_score_report`: CLIPScore per prompt and over prompts (two-level bootstrap CI);
- `check_counts`: no numbers from nothing (errors for unreadable sets, warnings for skipped images).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.common.attributes import Target, _check_vector
from popalign_core.common.fileio import atomic_write_bytes, load_rgb
from popalign_core.common.manifest import write_manifest
from popalign_core.evaluate.audit_files import IMAGES_MANIFEST
from popalign_core.evaluate.metrics import (
    ambiguity,
    bias_pairwise,
    bootstrap_ci,
    face_rate,
    per_prompt_report,
    recall,
)
from popalign_core.evaluate.metrics import clip_score as clip_score_metric
from popalign_core.models.sampling import SamplerConfig, derive_seed, resolve_scheduler, sample

CLASSIFY_CHUNK = 32  # images read and classified at a time


# ------------------------------------------------------------------------------------------------ sampling
def audit_adapter(model: Any) -> tuple[str, Any]:
    """(how the audit names the model, its adapter) of a checkpoint path, diffusers folder, 'toyworld',
    'tiny:<family>[:seed]', a ready adapter, or a `models.loading_options.model_spec` mapping (``{"model": path,
    "text_encoders": [...], "vae": ..., "t5_tokenizer": ..., "config_dir": ...}``: `load_model`'s keywords)."""
    if isinstance(model, Mapping):
        from popalign_core.models.loading import load_model
        from popalign_core.models.loading_options import MODEL_FILE_OPTIONS

        valid = {"model", *(kw for kw, _ in MODEL_FILE_OPTIONS.values())}
        bad = sorted(set(model) - valid) or ([] if "model" in model else ["(no 'model')"])
        if bad:
            raise ValueError(f"`model` mapping: unexpected key {bad[0]!r}; valid keys: {', '.join(sorted(valid))}")
        spec = str(model["model"])
        opts = {k: v for k, v in model.items() if k != "model"}
        if spec.startswith("tiny:") and opts:
            raise ValueError(f"{next(iter(opts))}: only used for checkpoints and model folders; {spec} is built from "
                             "the package's own configs")  # fmt: skip
        return spec, load_model(spec, **opts)
    if isinstance(model, (str, os.PathLike)):
        spec = str(model)
        if spec.startswith("tiny:"):
            from popalign_core.models.tiny import get_dummy_adapter

            parts = spec.split(":")
            return spec, get_dummy_adapter(parts[1], seed=int(parts[2]) if len(parts) > 2 else 0)
        from popalign_core.models.loading import TOYWORLD, load_model

        if spec != TOYWORLD and not Path(spec).exists():
            raise FileNotFoundError(f"model {spec!r} does not exist (a checkpoint file or diffusers folder)")
        return spec, load_model(spec)
    if model is not None and hasattr(model, "encode_prompt"):
        return type(model).__name__, model
    raise ValueError(
        f"`model` must be a checkpoint path, a diffusers folder, 'toyworld', 'tiny:sd15' or an adapter; got {model!r}"
    )


def sample_images(
    model: Any,
    prompts: Sequence[str],
    images_per_prompt: int,
    out_dir: Path,
    sampler: Any,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict], dict]:
    """Sample `images_per_prompt` seeded images per prompt, save PNGs under out_dir/images/ and the manifest
    out_dir/images.jsonl. `sampler`: a `SamplerConfig` (or its fields). Returns (rows, model info)."""
    from PIL import Image

    spec, adapter = audit_adapter(model)
    config = sampler if isinstance(sampler, SamplerConfig) else SamplerConfig(**dict(sampler))
    config = replace(config, scheduler=resolve_scheduler(adapter, config.scheduler))  # "auto" -> recorded by name
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
def resolve_targets(axes: Sequence[str], classes: Mapping[str, tuple[str, ...]], targets: Any) -> dict[str, Any]:
    """axis -> target probability vector over the classifier's FIXED class set of that axis (default uniform)."""

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


def check_counts(records: list[dict], prompts: Sequence[str], counts: dict, max_unreadable: float) -> list[str]:
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


def clip_scorer(clip_score: Any, clf: Any) -> Any:
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


def classify_rows(
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
