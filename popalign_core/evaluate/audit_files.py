"""The files of `popalign audit`: what it reads (prompts files, image manifests, image folders, earlier
``audit.json``) and how it writes JSON (strict, atomic).

- `read_prompts`: a prompts file, one prompt a line, ``#`` comments;
- `read_image_manifest` / `scan_image_folder`: the rows {image, path, prompt, index, seed, identity} of an images
  audit, from a JSONL / CSV manifest or from one sub-folder per prompt;
- `load_audit`: an ``audit.json`` (or its folder), for ``audit compare``;
- `write_json`: indented, strict JSON (non-finite floats -> null), written atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.common.fileio import atomic_write_text
from popalign_core.common.manifest import read_manifest_csv, read_manifest_jsonl
from popalign_core.common.userinput import PROMPTS_FOLDER, read_text

AUDIT_VERSION = 1
AUDIT_FILE = "audit.json"
IMAGES_MANIFEST = "images.jsonl"
#: What `popalign audit` writes in its output folder (`fileio.claim_output_dir`).
AUDIT_OUTPUTS = {AUDIT_FILE: None, IMAGES_MANIFEST: None, "images": {re.compile(r"p\d{3,}_\d{4,}\.png"): None},
                 "report.md": None, "report.html": None, "shares_*.png": None, "discrepancy.png": None,
                 "grid.png": None}  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ------------------------------------------------------------------------------------------------ JSON
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
    text = read_text(p, "prompts file", folder=PROMPTS_FOLDER)
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


# ------------------------------------------------------------------------------------------------ audit.json
def load_audit(path: str | os.PathLike) -> dict[str, Any]:
    """An audit.json (or a folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / AUDIT_FILE
    text = read_text(p, "audit file")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"audit file {str(p)!r} is not valid JSON: {e}") from e
    if not isinstance(d, dict) or "axes" not in d or "prompts" not in d:
        raise ValueError(f"audit file {str(p)!r} is not a popalign audit (no 'axes' / 'prompts')")
    return d
