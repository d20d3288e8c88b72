"""Manifest files as text: JSONL and CSV readers into numbered rows, and the writers (`write_manifest`).

The readers check only the file's syntax (UTF-8, JSON objects, a CSV header naming each column once); what the
columns mean is their user's business (`train.data.load_preference_data`, the audit, the population steps). Rows
are numbered from 1 over the data rows (header and blank lines not counted) and keep the file's line, for messages;
row problems are collected and raised together (`_Problems`: the first 20 and a count).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popalign_core.common.fileio import atomic_write_text

__all__ = ["MANIFEST_SUFFIXES", "format_manifest", "read_manifest_csv", "read_manifest_jsonl", "write_manifest"]

MANIFEST_SUFFIXES = (".jsonl", ".csv")
MAX_LISTED = 20  # problems listed in one error message; the rest are counted


# ------------------------------------------------------------------------------------------------------ reading
@dataclass
class _Row:
    row: int  # 1-based data row
    line: int  # 1-based line of the file where the row starts
    values: dict[str, Any]


class _Problems:
    """Collects row problems of one manifest and raises them together."""

    def __init__(self, manifest: Path):
        self.manifest = manifest
        self.items: list[str] = []

    def row(self, r: _Row, what: str) -> None:
        self.items.append(f"{self.manifest}, row {r.row} (line {r.line}): {what}")

    def add(self, what: str) -> None:
        self.items.append(f"{self.manifest}: {what}")

    def raise_if_any(self, exc_type: type[Exception] = ValueError) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise exc_type(self.items[0])
        shown = self.items[:MAX_LISTED]
        more = len(self.items) - len(shown)
        head = f"{self.manifest}: {len(self.items)} problems" + (f" (first {MAX_LISTED} shown)" if more else "")
        tail = [f"  ... and {more} more"] if more else []
        raise exc_type("\n".join([head + ":", *(f"  {s}" for s in shown), *tail]))


def _rows_list(rows: Sequence[int]) -> str:
    rows = list(rows)
    shown = ", ".join(str(r) for r in rows[:MAX_LISTED])
    more = f" and {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def _read_text(manifest: Path) -> str:
    try:
        return manifest.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{manifest}: not UTF-8 text (byte {exc.start}): {exc.reason}") from exc


def read_manifest_jsonl(manifest: Path) -> tuple[list[str], list[_Row]]:
    problems = _Problems(manifest)
    rows: list[_Row] = []
    columns: dict[str, None] = {}
    n = 0
    for lineno, line in enumerate(_read_text(manifest).splitlines(), start=1):
        if not line.strip():
            continue
        n += 1
        r = _Row(n, lineno, {})
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.row(r, f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            problems.row(r, f"expected a JSON object, got {type(obj).__name__}")
            continue
        r.values = obj
        columns.update(dict.fromkeys(obj))
        rows.append(r)
    problems.raise_if_any()
    return list(columns), rows


def read_manifest_csv(manifest: Path) -> tuple[list[str], list[_Row]]:
    problems = _Problems(manifest)
    reader = csv.reader(io.StringIO(_read_text(manifest), newline=""))
    header: list[str] | None = None
    rows: list[_Row] = []
    n = 0
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ValueError(f"{manifest}, line {reader.line_num}: CSV error: {exc}") from exc
        if not any(f.strip() for f in fields):  # blank line (or only separators)
            continue
        if header is None:
            header = [f.strip() for f in fields]
            seen: dict[str, int] = {}
            for i, name in enumerate(header):
                if name and name in seen:
                    raise ValueError(
                        f"{manifest}, line {start}: the header names column {name!r} twice "
                        f"(fields {seen[name] + 1} and {i + 1})"
                    )
                seen.setdefault(name, i)
            continue
        n += 1
        r = _Row(n, start, {})
        if len(fields) > len(header):
            problems.row(r, f"{len(fields)} fields but the header has {len(header)} columns")
            continue
        values = {name: "" for name in header if name}  # a short row leaves the rest empty
        for i, value in enumerate(fields):
            if header[i]:
                values[header[i]] = value
            elif value.strip():
                problems.row(r, f"field {i + 1} holds {value!r} but its header column has no name")
        r.values = values
        rows.append(r)
    problems.raise_if_any()
    return [h for h in (header or []) if h], rows


# ------------------------------------------------------------------------------------------------------ writing
def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def format_manifest(rows: Sequence[Mapping[str, Any]], suffix: str = ".jsonl") -> str:
    """The text of a JSONL or CSV manifest (`suffix`) of `rows` (see `write_manifest`)."""
    suffix = suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"unknown manifest suffix {suffix!r}; valid: {MANIFEST_SUFFIXES}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{i}] must be a dict of column -> value, got {type(row).__name__}")
    buf = io.StringIO(newline="")
    if suffix == ".jsonl":
        for row in rows:
            buf.write(json.dumps(dict(row), ensure_ascii=False, default=str) + "\n")
    else:
        columns = list(dict.fromkeys(str(k) for row in rows for k in row))
        writer = csv.writer(buf, lineterminator="\n")
        if columns:
            writer.writerow(columns)
        for row in rows:
            cells = {str(k): v for k, v in row.items()}
            writer.writerow([_csv_cell(cells.get(c)) for c in columns])
    return buf.getvalue()


def write_manifest(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows (dicts of column -> value) as a JSONL or CSV manifest, chosen by the suffix; atomically.

    CSV columns are the union of the rows' keys in order of first appearance; a missing key or None is an empty
    cell (read back as absent), lists and dicts are JSON text, other values `str()`. JSONL: one object per line
    (`Path` values as strings). The file goes to a temporary name beside `path`, then `os.replace` moves it over
    `path`; missing parent folders are created.
    """
    target = Path(os.path.abspath(os.fspath(path)))
    suffix = target.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"path={str(path)!r}: unknown manifest suffix {target.suffix!r}; valid: {MANIFEST_SUFFIXES}")
    atomic_write_text(target, format_manifest(rows, suffix), fsync=True)
