"""The trainer's data on disk: preference manifests (JSONL or CSV) plus image files.

    from popalign_core.train.data import load_preference_data, pair_population, load_image
    data = load_preference_data("sets/manifest.jsonl")       # kind detected from the columns
    data.kind                     # "population" or "pairwise"
    data.winning(), data.losing() # sample indices of label +1 / -1
    pairs = pair_population(data, seed=0)                   # population sets -> (winner, loser) index pairs
    x = load_image(data.samples[0].image, 512)              # [3, 512, 512] float32 in [0, 1]

Two kinds of manifest (docs/data-format.md has examples):
- "pairwise" (the DPO family): one row per pair, columns `caption`, `winner`, `loser` (image paths), optional `id`.
  Each row gives two samples (winner: label +1, loser: label -1) and one entry of `PreferenceData.pairs`.
- "population" (PopAlign): one row per image, columns `set_id`, `population` ("winning"/"losing", or +1/1/-1),
  `caption` (the identity-neutral prompt, used as the training caption; one per set), `image`; optional `prompt`
  (the prompt that generated the image), `seed`, `index` (integers); other columns are kept as metadata.

Image paths are relative to the manifest's folder unless absolute. Rows are numbered from 1 over the data rows
(header and blank lines not counted); messages give the row and the file's line. Every problem is reported with the
manifest's path, the row and the column or value; row problems are collected and reported together (the first 20
and a count), cheap checks first, the image files last.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popalign_core.common.fileio import recover_publish
from popalign_core.common.manifest import (
    MANIFEST_SUFFIXES,
    _Problems,
    _Row,
    _rows_list,
    format_manifest,
    read_manifest_csv,
    read_manifest_jsonl,
    write_manifest,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATA_KINDS",
    "LABEL_VALUES",
    "MANIFEST_SUFFIXES",
    "PreferenceData",
    "REQUIRED_COLUMNS",
    "Sample",
    "load_image",
    "load_preference_data",
    "pair_population",
    "format_manifest",
    "read_manifest_csv",
    "read_manifest_jsonl",
    "write_manifest",
]

DATA_KINDS = ("pairwise", "population")
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "pairwise": ("caption", "winner", "loser"),
    "population": ("set_id", "population", "caption", "image"),
}
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {"pairwise": ("id",), "population": ("prompt", "seed", "index")}
# accepted values of the `population` column (case-insensitive for the words) -> label
LABEL_VALUES: dict[str, int] = {"winning": 1, "losing": -1, "+1": 1, "1": 1, "-1": -1}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Sample:
    """One image of the data set.

    image: absolute path of the image file. caption: the training caption. label: +1 winning / preferred, -1 losing
    / rejected. group: the set_id (population) or the pair id (pairwise; the `id` column, else "row<N>"). row: the
    1-based data row of the manifest (for messages). meta: the other columns of the row (population: `prompt`,
    `seed`, `index` when given, and any extra column; pairwise: extra columns).
    """

    image: Path
    caption: str
    label: int
    group: str
    row: int
    meta: dict = field(default_factory=dict)


@dataclass
class PreferenceData:
    """A loaded, validated manifest.

    pairs: indices into `samples`, (winner, loser). Pairwise data: one per manifest row, in row order. Population
    data: empty after loading; `pair_population(data, seed)` builds them (assign the result to `pairs` if wanted).
    """

    kind: str
    manifest: Path
    samples: list[Sample]
    pairs: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def winning(self) -> list[int]:
        """Indices of the samples with label +1 (winning population / preferred images)."""
        return [i for i, s in enumerate(self.samples) if s.label == 1]

    def losing(self) -> list[int]:
        """Indices of the samples with label -1 (losing population / rejected images)."""
        return [i for i, s in enumerate(self.samples) if s.label == -1]

    def groups(self) -> dict[str, list[int]]:
        """group (set_id or pair id) -> sample indices, groups in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i, s in enumerate(self.samples):
            out.setdefault(s.group, []).append(i)
        return out

    def sha256(self) -> str:
        """Hex SHA-256 of the data: the kind, the manifest's bytes and every image file's bytes (streamed).

        Images are hashed once each, in order of first appearance, each preceded by its size, so the hash changes
        when the manifest or any image changes and not when the data folder is moved (paths enter only through the
        manifest's text). For LoRA metadata (`data_hash`).
        """
        h = hashlib.sha256()
        h.update(f"popalign-data-v1\0{self.kind}\0".encode())
        for path in [self.manifest, *dict.fromkeys(s.image for s in self.samples)]:
            try:
                size = os.path.getsize(path)
                h.update(size.to_bytes(8, "little"))
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"{self.manifest}: cannot hash the data: {path} does not exist") from exc
        return h.hexdigest()


def _detect_kind(manifest: Path, columns: list[str]) -> str:
    fits = [k for k in DATA_KINDS if set(REQUIRED_COLUMNS[k]) <= set(columns)]
    needs = "; ".join(f"{k} needs columns {', '.join(REQUIRED_COLUMNS[k])}" for k in DATA_KINDS)
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ValueError(f"{manifest}: columns {columns} fit no data kind ({needs})")
    raise ValueError(f"{manifest}: columns {columns} fit both data kinds; pass kind= one of {DATA_KINDS} ({needs})")


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and value.strip() == "")


def _text(problems: _Problems, r: _Row, column: str, strip: bool = True, scalar_ok: bool = False) -> str | None:
    """The row's value of a required text column, or None after recording a problem."""
    value = r.values.get(column)
    if column not in r.values:
        problems.row(r, f"missing required column {column!r}")
        return None
    if not _present(value):
        problems.row(r, f"column {column!r} is empty")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int) if scalar_ok else str):
        kinds = "a string or an integer" if scalar_ok else "a string"
        problems.row(r, f"column {column!r} must be {kinds}, got {value!r}")
        return None
    return str(value).strip() if strip else value


def _int_value(problems: _Problems, r: _Row, column: str, value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    problems.row(r, f"column {column!r} must be an integer, got {value!r}")
    return None


def _label(problems: _Problems, r: _Row) -> int | None:
    value = r.values.get("population")
    if "population" not in r.values:
        problems.row(r, "missing required column 'population'")
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value in (1, -1):
        return value
    key = value.strip().lower() if isinstance(value, str) else None
    if key in LABEL_VALUES:
        return LABEL_VALUES[key]
    valid = ", ".join(repr(v) for v in LABEL_VALUES)
    problems.row(r, f"column 'population' has invalid value {value!r}; valid values: {valid}")
    return None


def _resolve(folder: Path, value: str) -> Path:
    p = Path(value)
    return Path(os.path.normpath(p if p.is_absolute() else folder / p))


def _meta(values: Mapping[str, Any], skip: Iterable[str]) -> dict:
    skip = set(skip)
    return {k: v for k, v in values.items() if k not in skip and _present(v)}


def _build_population(manifest: Path, rows: list[_Row], problems: _Problems) -> list[Sample]:
    folder = manifest.parent
    lines = {r.row: r.line for r in rows}
    samples: list[Sample] = []
    for r in rows:
        set_id = _text(problems, r, "set_id", scalar_ok=True)
        label = _label(problems, r)
        caption = _text(problems, r, "caption", strip=False)
        image = _text(problems, r, "image")
        meta = _meta(r.values, REQUIRED_COLUMNS["population"])
        ok = True
        for col in ("seed", "index"):
            if col in meta:
                meta[col] = _int_value(problems, r, col, meta[col])
                ok = ok and meta[col] is not None
        if "prompt" in meta and not isinstance(meta["prompt"], str):
            problems.row(r, f"column 'prompt' must be a string, got {meta['prompt']!r}")
            ok = False
        if None in (set_id, label, caption, image) or not ok:
            continue
        samples.append(Sample(_resolve(folder, image), caption, label, set_id, r.row, meta))
    problems.raise_if_any()

    sets: dict[str, list[Sample]] = {}
    for s in samples:
        sets.setdefault(s.group, []).append(s)
    for set_id, members in sets.items():
        seen: dict[Path, Sample] = {}
        for s in members:
            if s.image in seen:
                first = seen[s.image]
                problems.items.append(
                    f"{manifest}, row {s.row} (line {lines[s.row]}): image {str(s.image)!r} is listed twice in set "
                    f"{set_id!r} (rows {first.row} and {s.row})"
                )
            else:
                seen[s.image] = s
        captions: dict[str, list[int]] = {}
        for s in members:
            captions.setdefault(s.caption, []).append(s.row)
        if len(captions) > 1:
            listed = "; ".join(f"{c!r} ({_rows_list(rs)})" for c, rs in captions.items())
            problems.add(f"set {set_id!r} has mismatched captions (a set shares one caption): {listed}")
        rows_of_set = _rows_list([s.row for s in members])
        for label, side in ((1, "winning"), (-1, "losing")):
            if not any(s.label == label for s in members):
                problems.add(f"set {set_id!r} ({rows_of_set}) has no {side} images (empty set)")
    problems.raise_if_any()
    return samples


def _build_pairwise(manifest: Path, rows: list[_Row], problems: _Problems) -> tuple[list[Sample], list]:
    folder = manifest.parent
    samples: list[Sample] = []
    pairs: list[tuple[int, int]] = []
    by_pair: dict[tuple[Path, Path], int] = {}
    by_id: dict[str, int] = {}
    for r in rows:
        caption = _text(problems, r, "caption", strip=False)
        winner = _text(problems, r, "winner")
        loser = _text(problems, r, "loser")
        pair_id = r.values.get("id")
        if _present(pair_id):
            if isinstance(pair_id, bool) or not isinstance(pair_id, (str, int)):
                problems.row(r, f"column 'id' must be a string or an integer, got {pair_id!r}")
                continue
            pair_id = str(pair_id).strip()
            if pair_id in by_id:
                problems.row(r, f"pair id {pair_id!r} is used twice (rows {by_id[pair_id]} and {r.row})")
                continue
            by_id[pair_id] = r.row
        else:
            pair_id = f"row{r.row}"
        if None in (caption, winner, loser):
            continue
        w, lo = _resolve(folder, winner), _resolve(folder, loser)
        if w == lo:
            problems.row(r, f"winner and loser are the same image {winner!r}")
            continue
        if (w, lo) in by_pair:
            problems.row(r, f"the pair ({winner!r}, {loser!r}) is listed twice (rows {by_pair[(w, lo)]} and {r.row})")
            continue
        by_pair[(w, lo)] = r.row
        meta = _meta(r.values, (*REQUIRED_COLUMNS["pairwise"], "id"))
        pairs.append((len(samples), len(samples) + 1))
        samples.append(Sample(w, caption, 1, pair_id, r.row, dict(meta)))
        samples.append(Sample(lo, caption, -1, pair_id, r.row, dict(meta)))
    problems.raise_if_any()
    return samples, pairs


def _check_image_files(manifest: Path, kind: str, samples: list[Sample], lines: dict[int, int], verify: bool) -> None:
    """Every image file exists (and, with verify, PIL's `verify()` accepts it); all bad rows reported together."""
    from PIL import Image

    status: dict[Path, str | None] = {}
    bad: list[tuple[Sample, str]] = []
    for s in samples:
        if s.image not in status:
            problem = None
            if not s.image.is_file():
                problem = "does not exist"
            elif verify:
                try:
                    with Image.open(s.image) as im:
                        im.verify()
                except Exception as exc:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError, ...)
                    problem = f"is unreadable ({type(exc).__name__}: {exc})"
            status[s.image] = problem
        if status[s.image] is not None:
            bad.append((s, status[s.image]))
    if not bad:
        return
    problems = _Problems(manifest)
    for s, problem in bad:
        column = "image" if kind == "population" else ("winner" if s.label == 1 else "loser")
        problems.items.append(
            f"{manifest}, row {s.row} (line {lines[s.row]}): column {column!r}: image file {str(s.image)!r} {problem}"
        )
    all_missing = all(problem == "does not exist" for _, problem in bad)
    problems.raise_if_any(FileNotFoundError if all_missing else ValueError)


def load_preference_data(
    path: str | os.PathLike, kind: str | None = None, check_images: bool = True
) -> PreferenceData:
    """Load and validate a preference manifest (`.jsonl` or `.csv`) and its images; see the module docstring.

    kind: "pairwise" or "population"; None detects it from the columns. check_images: open every image file with
    PIL and `verify()` it (a cheap check that does not decode the pixels); existence is always checked.
    Raises FileNotFoundError (missing manifest, missing image files) or ValueError (anything else), naming the
    manifest, the row and the column or value. Problems of several rows are reported together.
    """
    if kind is not None and kind not in DATA_KINDS:
        raise ValueError(f"kind={kind!r} is invalid; valid values: {', '.join(DATA_KINDS)} or None (detect)")
    manifest = Path(os.path.abspath(os.fspath(path)))
    suffix = manifest.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(
            f"{manifest}: unknown manifest suffix {manifest.suffix!r}; valid: {', '.join(MANIFEST_SUFFIXES)}"
        )
    recover_publish(manifest.parent)  # a `data build` killed mid-publication: its committed files, all of them
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest}: manifest file not found")
    if not manifest.is_file():
        raise ValueError(f"{manifest}: manifest is not a file")
    columns, rows = read_manifest_jsonl(manifest) if suffix == ".jsonl" else read_manifest_csv(manifest)
    if not rows:
        raise ValueError(f"{manifest}: manifest is empty (no data rows)")
    if kind is None:
        kind = _detect_kind(manifest, columns)
    elif suffix == ".csv":  # a CSV header lacking a required column: one message instead of one per row
        absent = [c for c in REQUIRED_COLUMNS[kind] if c not in columns]
        if absent:
            raise ValueError(
                f"{manifest}, line 1 (header): missing required column{'s' if len(absent) > 1 else ''} "
                f"{', '.join(repr(c) for c in absent)} for {kind} data (needs {', '.join(REQUIRED_COLUMNS[kind])})"
            )
    problems = _Problems(manifest)
    if kind == "population":
        samples, pairs = _build_population(manifest, rows, problems), []
    else:
        samples, pairs = _build_pairwise(manifest, rows, problems)
    _check_image_files(manifest, kind, samples, {r.row: r.line for r in rows}, check_images)
    return PreferenceData(kind=kind, manifest=manifest, samples=samples, pairs=pairs)


# ------------------------------------------------------------------------------------------------------ pairing
def pair_population(data: PreferenceData, seed: int) -> list[tuple[int, int]]:
    """(winner, loser) sample-index pairs within each population set, drawn without replacement.

    Within a set, the winning and the losing images are each put in a random order and the k-th winner is paired
    with the k-th loser; the extra images of the larger side are left out (min(#winning, #losing) pairs per set).
    The order of a set comes from a numpy PCG64 generator seeded with SHA-256(seed, set_id), so it depends only on
    the seed and the set's own rows (adding another set does not change it). Sets come in order of first
    appearance. Does not modify `data`.
    """
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r} is invalid: must be an integer")
    if data.kind != "population":
        raise ValueError(f"pair_population needs population data; {data.manifest} is {data.kind} (see data.pairs)")
    pairs: list[tuple[int, int]] = []
    for set_id, idx in data.groups().items():
        win = [i for i in idx if data.samples[i].label == 1]
        lose = [i for i in idx if data.samples[i].label == -1]
        digest = hashlib.sha256(json.dumps(["popalign-pairs-v1", int(seed), set_id]).encode()).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
        win = [win[k] for k in rng.permutation(len(win))]
        lose = [lose[k] for k in rng.permutation(len(lose))]
        pairs.extend(zip(win, lose))  # zip stops at the shorter side
    return pairs


# ------------------------------------------------------------------------------------------------------ images
def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    hw = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
    if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in hw):
        raise ValueError(f"size={size!r} is invalid: a positive int or a (height, width) pair of positive ints")
    return hw  # type: ignore[return-value]


def load_image(path: str | os.PathLike, size: int | tuple[int, int]) -> torch.Tensor:
    """Read an image file as a [3, H, W] float32 RGB tensor in [0, 1].

    size: an int S gives S x S; a tuple is (height, width). The image is scaled (Lanczos, aspect ratio kept) by the
    smallest factor that makes it cover the target, i.e. for a square target its shorter side becomes S, then
    center-cropped: the crop starts at floor((scaled - target) / 2) on each axis. An image already at the target
    scale is only cropped (no resampling). The EXIF orientation is applied first; images with transparency are
    composited onto white; other modes are converted to RGB.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    th, tw = _size_hw(size)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im.alpha_composite(rgba)
            im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"image file {path} is unreadable: {type(exc).__name__}: {exc}") from exc
    w, h = im.size
    scale = max(th / h, tw / w)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - tw) // 2, (nh - th) // 2
    im = im.crop((left, top, left + tw, top + th))
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0).contiguous()
