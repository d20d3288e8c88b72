"""Files on disk: atomic writes, one-step publication of several files, output folders that are ours, and reading
weight files with errors that name the file.

- **Atomic writes.** Everything the project writes for users (manifests, reports, JSON, LoRAs, checkpoints) goes to
  a uniquely named temporary beside the target (``.<name>.<12 hex>.tmp``, a file or a folder) and is then moved over
  it with `os.replace` (atomic on POSIX and Windows within one folder). A crash or a full disk leaves at most such a
  temporary, never a half-written final file; `clean_temporaries` removes them on the next start.
- **Ordinary permissions.** Written files get ``0666 & ~umask`` (folders ``0777 & ~umask``), e.g. 0644 / 0755, as
  `open` would give them: safetensors and `tempfile` create 0600 files that a ComfyUI service running as another user
  cannot read.
- **Several files as one.** `publish_together` stages every file of a multi-file output (a LoRA in kohya *and*
  diffusers layout, ...), then commits them with a journal (``.popalign-publish.json``): written only when every
  staged file is complete, replayed by `recover_publish` (called by the next run) if a kill cut the renames short.
  So the folder never keeps a mix of two steps once the writer has started again, and nothing temporary stays.
- **Output folders.** `claim_output_dir` lets a command write into a new or empty folder (it leaves a marker,
  ``.popalign-output.json``, naming the command), into a folder of its own (the marker), or into a folder of an older
  version (no marker yet) that holds the command's signature files and nothing outside its output layout; anything
  else is refused before any work.
  `clear_output_dir` (``--overwrite``) deletes a folder's contents only when the marker names the command and every
  entry matches its layout; otherwise it stops with a message listing the foreign entries and deletes nothing.
- **Reading weights.** `read_safetensors` / `safetensors_keys` turn a damaged, truncated or non-safetensors file into
  `CorruptFileError`, a ValueError naming the file, what it is for and what to do.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported where an image is read
    import numpy as np

OUTPUT_MARKER = ".popalign-output.json"
PUBLISH_JOURNAL = ".popalign-publish.json"
_TMP = re.compile(r"^\..+\.[0-9a-f]{12}(?:\.old)?\.tmp$")


class CorruptFileError(ValueError):
    """A file that exists but cannot be read as what it should be (truncated, damaged, another format)."""


# ------------------------------------------------------------------------------------------------ permissions
def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # elsewhere: the mode a fresh file gets (thread-safe, unlike os.umask(0))
    probe = Path(os.getcwd()) / f".popalign-umask-{uuid.uuid4().hex[:12]}.tmp"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        os.close(fd)
        mode = probe.stat().st_mode & 0o777
        probe.unlink()
        return 0o666 & ~mode
    except OSError:
        return 0o022


def default_mode(folder: bool = False) -> int:
    """The mode `open` / `mkdir` give a new file / folder under the current umask (e.g. 0644 / 0755)."""
    return (0o777 if folder else 0o666) & ~_umask()


def set_default_permissions(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a folder and everything in it) the ordinary permissions of `default_mode`."""
    if os.name != "posix":
        return
    p = Path(path)
    if p.is_symlink():
        return
    fmode, dmode = default_mode(False), default_mode(True)
    if p.is_dir():
        for root, _dirs, files in os.walk(p):
            os.chmod(root, dmode)
            for f in files:
                fp = os.path.join(root, f)
                if not os.path.islink(fp):
                    os.chmod(fp, fmode)
    elif p.exists():
        os.chmod(p, fmode)


# ------------------------------------------------------------------------------------------------ atomic writes
def temporary_name(target: str | os.PathLike, suffix: str = "") -> Path:
    """A unique temporary path beside `target`: ``.<name>.<12 hex>[suffix].tmp`` (what `clean_temporaries` removes)."""
    t = Path(target)
    return t.with_name(f".{t.name}.{uuid.uuid4().hex[:12]}{suffix}.tmp")


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)


def _swap_in(tmp: Path, target: Path) -> None:
    """Move `tmp` over `target`: one rename for a file; for a folder, the old one is renamed aside first."""
    if target.is_dir() and not target.is_symlink():
        old = temporary_name(target, ".old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` (write a file or create a folder there); on normal exit it gets ordinary
    permissions and replaces `path`, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    try:
        yield tmp
        set_default_permissions(tmp)
        _swap_in(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Write `data` to `path` atomically (see the module docstring); `fsync` also flushes it to disk first."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """UTF-8 text version of `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file `src` to `dst` atomically, with ordinary permissions."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
        _fsync_file(tmp)


def save_safetensors(tensors: Mapping, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, atomically, fsynced, with ordinary permissions."""
    import safetensors.torch

    with atomic_path(path) as tmp:
        safetensors.torch.save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
        _fsync_file(tmp)


def check_safetensors_metadata(metadata: Mapping[str, str] | None, reserved: Iterable[str] = ()) -> None:
    """ValueError unless `metadata` is None or a str -> str mapping (what safetensors stores) free of the `reserved`
    keys (those the file format writes itself)."""
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata: expected a str -> str mapping, got {type(metadata).__name__}")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"metadata: keys and values must be str (safetensors metadata); offending keys: {bad}")
    taken = sorted(set(reserved) & set(metadata))
    if taken:
        raise ValueError(f"metadata: key(s) {taken} are reserved for the file format")


def _fsync_file(p: Path) -> None:
    with open(p, "rb") as f:
        os.fsync(f.fileno())


def clean_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove the temporaries a killed writer left in `folder` (names of `temporary_name` only; nothing else is
    touched), after replaying an unfinished `publish_together`. Returns the removed names."""
    d = Path(folder)
    if not d.is_dir():
        return []
    recover_publish(d)
    removed = []
    for p in d.iterdir():
        if _TMP.match(p.name):
            _remove(p)
            removed.append(p.name)
    return removed


# ------------------------------------------------------------------------------------------------ several files as one
class Staging:
    """The files of one `publish_together`: `stage(final)` gives the temporary path to write `final`'s content to."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.items: list[tuple[Path, Path]] = []

    def stage(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        if final.parent.resolve() != self.folder.resolve():
            raise ValueError(f"publish_together: {final} is not directly inside {self.folder}")
        tmp = temporary_name(final)
        self.items.append((tmp, final))
        return tmp


@contextmanager
def publish_together(folder: str | os.PathLike) -> Iterator[Staging]:
    """Write several outputs of `folder` as one step (module docstring). Inside the block, write each output to the
    path `staging.stage(final_path)` returns (a file, or a folder to create); on normal exit all of them replace their
    final paths, committed by a journal; on error the staged files are removed and the old outputs stay."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    recover_publish(d)
    st = Staging(d)
    try:
        yield st
        for tmp, _ in st.items:
            if not tmp.exists():
                raise FileNotFoundError(f"publish_together: staged output {tmp} was not written")
            set_default_permissions(tmp)
            for f in [tmp] if tmp.is_file() else [x for x in tmp.rglob("*") if x.is_file()]:
                _fsync_file(f)
        journal = {"items": [[tmp.name, final.name] for tmp, final in st.items]}
        atomic_write_text(d / PUBLISH_JOURNAL, json.dumps(journal), fsync=True)
    except BaseException:
        for tmp, _ in st.items:
            _remove(tmp)
        raise
    recover_publish(d)


def recover_publish(folder: str | os.PathLike) -> bool:
    """Finish a committed `publish_together` that a kill interrupted (every staged file was complete when the journal
    was written, so the renames are replayed); returns True when there was one."""
    d = Path(folder)
    j = d / PUBLISH_JOURNAL
    if not j.is_file():
        return False
    try:
        items = json.loads(j.read_text(encoding="utf-8"))["items"]
    except (ValueError, KeyError, TypeError):
        items = []  # an unreadable journal cannot be committed (atomic writes make this a damaged disk)
    for tmp_name, final_name in items:
        tmp = d / tmp_name
        if tmp.exists():
            _swap_in(tmp, d / final_name)
    j.unlink(missing_ok=True)
    return True


# ------------------------------------------------------------------------------------------------ output folders
#: A layout: {name: None (a file) | layout (a folder, checked inside) | ANY (a folder, not looked into)}, where a
#: name is a glob pattern (`fnmatch`, case-sensitive) or a compiled regular expression (matched in full). Layouts are
#: as precise as the writer's names allow: a user's file inside an output folder is foreign unless the command could
#: have written that very name.
ANY = "any"
Layout = Mapping[Any, Any]


def _name_matches(name: str, pattern: Any) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _matches(entry: Path, layout: Layout, rel: str, foreign: list[str]) -> None:
    name = entry.name
    if name in (OUTPUT_MARKER, PUBLISH_JOURNAL) or _TMP.match(name):
        return
    for pattern, sub in layout.items():
        if not _name_matches(name, pattern):
            continue
        is_dir = entry.is_dir() and not entry.is_symlink()
        if sub is None and not is_dir:
            return
        if sub is ANY and is_dir:
            return
        if isinstance(sub, Mapping) and is_dir:
            for child in sorted(entry.iterdir()):
                _matches(child, sub, f"{rel}{name}/", foreign)
            return
    foreign.append(f"{rel}{name}{'/' if entry.is_dir() else ''}")


def foreign_entries(folder: str | os.PathLike, layout: Layout) -> list[str]:
    """Paths (relative to `folder`) of the entries that `layout` does not describe."""
    d = Path(folder)
    foreign: list[str] = []
    for e in sorted(d.iterdir()):
        _matches(e, layout, "", foreign)
    return foreign


def read_marker(folder: str | os.PathLike) -> dict | None:
    p = Path(folder) / OUTPUT_MARKER
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("command"), str) else None


def _write_marker(folder: Path, command: str) -> None:
    atomic_write_text(folder / OUTPUT_MARKER, json.dumps({"command": command, "format": 1}) + "\n")


def _listing(items: list[str], n: int = 4) -> str:
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _signed(d: Path, signature) -> bool:
    """Does folder `d` carry `signature`: file name(s) that must all exist, or a predicate of the folder."""
    if callable(signature):
        return bool(signature(d))
    names = (signature,) if isinstance(signature, str) else tuple(signature or ())
    return bool(names) and all((d / n).exists() for n in names)


def claim_output_dir(
    path: str | os.PathLike,
    command: str,
    layout: Layout,
    arg: str = "--out",
    create: bool = True,
    signature=None,
) -> Path:
    """Make `path` the output folder of `command` (see the module docstring), or refuse before any work with a
    FileExistsError naming the entries that are not the command's. Returns the folder. ``create=False`` only checks
    (nothing is created), for commands that find out late whether they have anything to write. `signature`: the
    file(s) every run of `command` writes first; a folder without the marker is taken as an older version's run only
    when it holds them and nothing outside `layout` (without a signature, never)."""
    if not str(path).strip():
        raise ValueError(f"{arg} is empty: give the output folder")
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{arg} {str(d)!r} is a file; `{command}` writes a folder there")
    if not d.exists():
        if create:
            d.mkdir(parents=True)
            _write_marker(d, command)
        return d
    marker = read_marker(d)
    if marker is not None:
        if marker["command"] != command:
            raise FileExistsError(
                f"{arg} {str(d)!r} holds the output of `{marker['command']}`; give `{command}` a folder of its own"
            )
        if create:
            clean_temporaries(d)  # what a killed run left: its publication completed, its temporaries removed
        return d
    entries = [e for e in d.iterdir() if not _TMP.match(e.name)]
    if entries:
        foreign = foreign_entries(d, layout)
        if not _signed(d, signature):  # not an earlier run of this command: every entry is someone else's
            foreign = sorted({e.name + ("/" if e.is_dir() else "") for e in entries} - {OUTPUT_MARKER})
        if foreign:
            raise FileExistsError(
                f"{arg} {str(d)!r} already holds files that `{command}` did not write ({_listing(foreign)}); choose "
                "a new or empty folder (nothing was changed)"
            )
    if create:
        clean_temporaries(d)
        _write_marker(d, command)  # empty, or a run of an older version (no marker yet)
    return d


def check_clearable(
    path: str | os.PathLike,
    command: str,
    layout: Layout,
    arg: str = "--out",
    signature=None,
) -> list[Path]:
    """The entries `clear_output_dir` would delete, or FileExistsError naming why it must not (nothing is deleted).
    A folder is clearable when its marker names `command` (or, for folders of older versions without a marker, when
    it holds the `signature` file) and every entry matches `layout`."""
    d = Path(path)
    if not d.exists():
        return []
    if not d.is_dir():
        raise NotADirectoryError(f"{arg} {str(d)!r} is a file; --overwrite replaces only an output folder")
    entries = list(d.iterdir())
    if not entries:
        return []
    marker = read_marker(d)
    ours = marker is not None and marker["command"] == command
    if marker is None and _signed(d, signature):
        ours = True  # written by an older version of `command`, before markers
    if not ours:
        who = (
            f"holds the output of `{marker['command']}`, not of `{command}`"
            if marker
            else f"was not written by `{command}` (it has no {OUTPUT_MARKER} marker)"
        )
        raise FileExistsError(
            f"{arg} {str(d)!r} {who}: --overwrite deletes only a folder this command made; delete it yourself or "
            "choose another folder (nothing was deleted)"
        )
    foreign = foreign_entries(d, layout)
    if foreign:
        raise FileExistsError(
            f"{arg} {str(d)!r} holds files that `{command}` did not write ({_listing(foreign)}); move them away or "
            "choose another folder (nothing was deleted)"
        )
    return [e for e in entries if e.name != OUTPUT_MARKER]


def clear_output_dir(
    path: str | os.PathLike,
    command: str,
    layout: Layout,
    arg: str = "--out",
    signature=None,
) -> None:
    """``--overwrite``: delete the contents of `path` if and only if `command` wrote all of it (`check_clearable`);
    otherwise FileExistsError naming the entries, and nothing is deleted. A missing folder is fine."""
    for e in check_clearable(path, command, layout, arg, signature):
        _remove(e)


def check_replaceable(path: str | os.PathLike, command: str, is_ours, arg: str = "--out") -> Path:
    """A single output file may replace only an earlier output of `command`: FileExistsError when `path` exists and
    `is_ours(path)` says it is something else (nothing is changed); IsADirectoryError for a folder."""
    if not str(path).strip():
        raise ValueError(f"{arg} is empty: give the path of the file to write")
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{arg} {str(p)!r} is a folder; give the path of the file to write")
    if (p.exists() or p.is_symlink()) and not is_ours(p):
        raise FileExistsError(
            f"{arg} {str(p)!r} exists and was not written by `{command}`; choose another file name or delete it "
            "yourself (nothing was changed)"
        )
    return p


PNG_SOFTWARE_KEY = "Software"


def png_software(path: str | os.PathLike) -> str | None:
    """The ``Software`` text chunk of a PNG (how the project tags the PNGs its commands write), or None."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return (getattr(im, "text", None) or im.info or {}).get(PNG_SOFTWARE_KEY)
    except Exception:  # noqa: BLE001 - not a readable PNG: not ours
        return None


# ------------------------------------------------------------------------------------------------ reading weights
def _open_safetensors(path: Path, what: str, hint: str):
    from safetensors import safe_open

    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a folder, not a .safetensors file")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: one message naming the file
        raise corrupt(path, what, hint, e) from None


def corrupt(path: str | os.PathLike, what: str, hint: str, exc: BaseException | None = None) -> CorruptFileError:
    """The CorruptFileError for `path` (message: what it is, the reason, what to do)."""
    from popalign_core.common.userinput import describe

    size = os.path.getsize(path) if os.path.isfile(path) else None
    why = f" ({describe(exc)})" if exc is not None else ""
    sz = f" ({size} bytes)" if size is not None else ""
    return CorruptFileError(
        f"{what} {str(path)!r}{sz} is damaged, truncated or not a safetensors file{why}"
        + (f"; {hint}" if hint else "")
    )


def safetensors_keys(path: str | os.PathLike, what: str = "file", hint: str = "") -> tuple[list[str], dict[str, str]]:
    """(tensor names, metadata) of a .safetensors file, reading only its header."""
    p = Path(path)
    with _open_safetensors(p, what, hint) as f:
        return list(f.keys()), dict(f.metadata() or {})


def read_safetensors(
    path: str | os.PathLike, what: str = "file", hint: str = "", keys=None, device: str = "cpu"
) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a .safetensors file (only `keys` when given: an iterable of names, or a predicate).
    A missing file: FileNotFoundError; a damaged one: `CorruptFileError` naming `what`, the file and the `hint`."""
    p = Path(path)
    try:
        with _open_safetensors(p, what, hint) as f:
            names = list(f.keys())
            if callable(keys):
                names = [k for k in names if keys(k)]
            elif keys is not None:
                missing = [k for k in keys if k not in names]
                if missing:
                    raise ValueError(
                        f"{what} {str(p)!r} has no tensor {missing[0]!r} ({len(names)} tensors, e.g. {names[:3]})"
                        + (f"; {hint}" if hint else "")
                    )
                names = list(keys)
            out = {k: f.get_tensor(k) for k in names}
            meta = dict(f.metadata() or {})
    except (ValueError, FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a tensor whose bytes cannot be read
        raise corrupt(p, what, hint, e) from None
    if device != "cpu":
        out = {k: v.to(device) for k, v in out.items()}
    return out, meta


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as [H, W, 3] uint8 RGB (raises on unreadable / corrupt files)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
