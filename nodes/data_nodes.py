"""Preference data sets: built from a filtered population, or loaded from a folder on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import _common as C


def _write_population(images, rows: list[dict], folder: Path) -> Path:
    """The images (PNG) and their rows (filtered.jsonl, the core's filter layout) in `folder`."""
    import numpy as np
    from PIL import Image

    from popalign_core.common.fileio import atomic_path
    from popalign_core.common.manifest import write_manifest
    from popalign_core.population.filter import FILTERED
    from popalign_core.population.sample import image_name, png_complete

    (folder / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for arr, r in zip(C.image_batch_to_uint8(images), rows):
        rel = f"images/{image_name(r['prompt'], int(r.get('index', 0)))}"
        target = folder / rel
        if not png_complete(target):  # a missing or damaged image is written (again)
            with atomic_path(target) as tmp:
                Image.fromarray(np.asarray(arr)).save(tmp, format="PNG")
        out.append({**r, "image": rel})
    write_manifest(folder / FILTERED, out)
    return folder / FILTERED


RULE_TIP = "which set wins: augmented (paper) or the one with more distinct groups (public code)"


class PopAlignBuildPreferenceData:
    DESCRIPTION = (
        "PopAlign preference data from a filtered population: sets of `set_size` winning (augmented) and losing "
        "(neutral) images of the same neutral prompt, captioned with the neutral prompt; also (winner, loser) pairs. "
        "Written to output/popalign/data/<name>-<hash>/."
    )
    CATEGORY = C.category("data")
    FUNCTION = "run"
    RETURN_TYPES = (C.DATASET, "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_TOOLTIPS = (
        "the preference sets, for PopAlign LoRA Trainer",
        "sizes of the sets and pairs, and what was dropped (JSON)",
    )

    @classmethod
    def INPUT_TYPES(cls):
        from popalign_core.population.build import BUILD_RULES

        return C.input_types(
            (
                C.LINK("images", "IMAGE", "filtered images (PopAlign Filter Population)"),
                C.LINK("population", C.POPULATION, "their metadata (same node)"),
                C.STRING("name", "data set name (a plain file name)", "popalign_data"),
                C.INT("set_size", "images per population set (public PopAlign code: 5)", 5, 1, 1000),
                C.CHOICE("rule", BUILD_RULES, RULE_TIP, default="augmented"),
                C.CHOICE(
                    "on_short", ["skip", "error"], "a prompt with too few kept images: skip it or fail", default="skip"
                ),
                C.INT("seed", "seed of the set shuffles", 0, 0, 0xFFFFFFFF),
            )
        )

    def run(self, images, population, name, set_size, rule, on_short, seed):
        from popalign_core.population.build import BuildConfig

        name = C.safe_name(name, "name")
        rows = C.check_population(images, population)
        cfg = BuildConfig(set_size=int(set_size), rule=rule, on_short=on_short, seed=int(seed))
        return build_dataset(images, rows, name, cfg)


def build_dataset(images, rows: list[dict], name: str, cfg) -> tuple[dict, str]:
    """The core's `build_preferences` on a batch: written to output/popalign/data/<name>-<hash of the batch>/."""
    from popalign_core.population.build import build_preferences

    batch = json.dumps([rows, list(images.shape), float(images.float().sum())], sort_keys=True, default=str)
    folder = C.output_root() / "data" / f"{name}-{hashlib.sha256(batch.encode()).hexdigest()[:10]}"
    summary = build_preferences(_write_population(images, rows, folder), folder / "sets", cfg)
    files = summary["files"]
    dataset = {
        "manifest": files["population"],
        "kind": "population",
        "folder": str(folder),
        "pairwise": files.get("pairwise"),
        "sets": summary["sets"],
    }
    return (dataset, json.dumps(summary, indent=2))


class PopAlignLoadPreferenceData:
    DESCRIPTION = (
        "A preference data set from disk: a manifest (.jsonl / .csv, see docs/data-format.md) or a folder holding "
        "population.jsonl / pairwise.jsonl / manifest.jsonl. Relative paths are under ComfyUI's input folder."
    )
    CATEGORY = C.category("data")
    FUNCTION = "run"
    RETURN_TYPES = (C.DATASET, "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_TOOLTIPS = (
        "the preference sets, for PopAlign LoRA Trainer",
        "what was read: rows, sets, pairs (JSON)",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return C.input_types(
            (
                C.STRING(
                    "path",
                    "manifest file or folder (absolute, or relative to ComfyUI's input folder)",
                    "popalign/data",
                ),
                C.CHOICE("kind", ["auto", "population", "pairwise"], "data kind; auto = detected from the columns"),
            )
        )

    @classmethod
    def IS_CHANGED(cls, path, kind):
        p = _resolve(path)
        files = [p] if p.is_file() else sorted(p.glob("*.jsonl")) + sorted(p.glob("*.csv")) if p.exists() else []
        return json.dumps([(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()])

    def run(self, path, kind):
        from popalign_core.train.data import load_preference_data

        p = _manifest(_resolve(path))
        data = load_preference_data(str(p), kind=None if kind == "auto" else kind)
        report = {"manifest": str(p), "kind": data.kind, "images": len(data.samples)}
        return ({"manifest": str(p), "kind": data.kind, "folder": str(p.parent)}, json.dumps(report, indent=2))


def _manifest(p: Path) -> Path:
    """The manifest file `p`, or the first of population.jsonl / pairwise.jsonl / manifest.* in the folder `p`."""
    if p.is_dir():
        for cand in ("population.jsonl", "pairwise.jsonl", "manifest.jsonl", "manifest.csv"):
            if (p / cand).is_file():
                return p / cand
        raise FileNotFoundError(f"path: {p} holds no population.jsonl / pairwise.jsonl / manifest.jsonl")
    if not p.is_file():
        raise FileNotFoundError(f"path: {p} does not exist")
    return p


def _resolve(path: str) -> Path:
    p = Path(str(path).strip()).expanduser()
    if not p.is_absolute():
        try:
            import folder_paths

            p = Path(folder_paths.get_input_directory()) / p
        except ImportError:
            pass
    return p


NODE_CLASS_MAPPINGS = {
    "PopAlignBuildPreferenceData": PopAlignBuildPreferenceData,
    "PopAlignLoadPreferenceData": PopAlignLoadPreferenceData,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PopAlignBuildPreferenceData": "PopAlign Build Preference Data",
    "PopAlignLoadPreferenceData": "PopAlign Load Preference Data",
}
