"""What users type: numbers, YAML, names, and how the command line answers a mistake (one line, no traceback).

Numbers are read the way people write them. YAML 1.1 (PyYAML's default) reads ``1e-4``, ``5e-5`` and ``5e3`` as
*strings* because its float rule wants a dot; `YAML_LOADER` adds the YAML 1.2 / JSON float rule, so every config
file, ``--flag VALUE`` and ``--loss-param NAME=VALUE`` gets a float. `coerce_numbers` then turns numeric strings
(``lr: "1e-4"``, a JSON API value) and integral floats (``steps: 1e3``) into the field's declared type before a
config validates, so the only numbers refused are those that are really out of range.

Every ``popalign`` command runs through `command`: a user mistake (a bad value, a missing or damaged file, a folder
that is not ours, ...) ends the command with exit status 2 and one line ``popalign CMD: error: <what, naming the
input>``; an unexpected failure (a bug) with exit status 1 and one line that says so. ``--debug`` (anywhere on the
command line) or ``POPALIGN_DEBUG=1`` shows the traceback instead. Ctrl-C ends with 130, SIGTERM with 143, after the
command's own clean-up (a trainer saves a resumable checkpoint first). docs/errors.md lists what each command
refuses.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import signal
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

DEBUG_ENV = "POPALIGN_DEBUG"


# ------------------------------------------------------------------------------------------------ errors
class UsageError(ValueError):
    """A command-line mistake found by the argument parser (unknown flag, missing argument, bad choice)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM: raised in the main thread so that clean-up (checkpoints, temporary files) runs before exiting."""


#: Exceptions that are the user's to fix: bad values, missing / damaged / foreign files, stopped runs. Anything else
#: is reported as an internal error. (TrainingError, BackendUnavailable and SamplingStopped are RuntimeErrors that
#: the modules register with `user_error`.)
USER_ERRORS: list[type[BaseException]] = [
    ValueError,  # includes UnicodeDecodeError, json.JSONDecodeError, UsageError, CorruptFileError
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    yaml.YAMLError,
]


def user_error(cls: type[BaseException]) -> type[BaseException]:
    """Class decorator: exceptions of `cls` are user errors (one line, exit status 2) on the command line."""
    if cls not in USER_ERRORS:
        USER_ERRORS.append(cls)
    return cls


def one_line(text: str, limit: int = 2000) -> str:
    """`text` folded onto one line (whitespace runs, newlines included, become one space), cut at `limit`."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """The one-line message of an exception: OS errors as "reason: file", others their message (or type name)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return one_line(f"{exc.strerror}: {exc.filename}")
    if isinstance(exc, KeyError):
        return one_line(f"missing key {exc.args[0]!r}" if exc.args else "missing key")
    msg = str(exc)
    return one_line(msg) if msg.strip() else type(exc).__name__


def debug_enabled(argv: list[str] | None = None) -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no") or (
        argv is not None and "--debug" in argv
    )


def _raise_interrupted(signum, frame):  # noqa: ARG001
    raise Interrupted(f"stopped by signal {signum}")


def command(prog: str | Callable[[list[str]], str]) -> Callable:
    """Decorator of a command's ``main(argv) -> int``: the one-line error policy of the module docstring.

    prog: the command's name for messages ("popalign train"), or a function of argv giving it (sub-commands)."""

    def wrap(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            argv = [
                os.fspath(a) if isinstance(a, os.PathLike) else a for a in (sys.argv[1:] if argv is None else argv)
            ]
            debug = debug_enabled(argv)
            argv = [a for a in argv if a != "--debug"]
            name = prog(argv) if callable(prog) else prog
            old = None
            try:
                import threading

                if threading.current_thread() is threading.main_thread():
                    old = signal.signal(signal.SIGTERM, _raise_interrupted)
            except (ValueError, OSError):  # not the main thread / not allowed: keep the default
                old = None
            try:
                return int(main(argv) or 0)
            except SystemExit:
                raise
            except Interrupted:
                print(
                    f"{name}: stopped by SIGTERM (outputs on disk are consistent; re-run to resume)", file=sys.stderr
                )
                return 143
            except KeyboardInterrupt:
                if debug:
                    raise
                print(f"{name}: interrupted (outputs on disk are consistent; re-run to resume)", file=sys.stderr)
                return 130
            except BaseException as exc:  # noqa: BLE001 - the one place where every failure becomes one line
                if debug:
                    raise
                if isinstance(exc, tuple(USER_ERRORS)):
                    print(f"{name}: error: {describe(exc)}", file=sys.stderr)
                    return 2
                if _out_of_memory(exc):
                    print(f"{name}: error: out of memory ({describe(exc)}); lower the batch size or the resolution",
                          file=sys.stderr)  # fmt: skip
                    return 2
                if isinstance(exc, OSError):  # disk full, I/O error, ...: the environment, not a bug
                    print(f"{name}: error: {type(exc).__name__}: {describe(exc)}", file=sys.stderr)
                    return 2
                print(
                    f"{name}: internal error ({type(exc).__name__}: {describe(exc)[:500]}); this is a bug: re-run "
                    f"with --debug (or {DEBUG_ENV}=1) for the traceback and report it",
                    file=sys.stderr,
                )
                return 1
            finally:
                if old is not None:
                    signal.signal(signal.SIGTERM, old)

        return run

    return wrap


def _out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch's CUDA OutOfMemoryError, or the CPU allocator's failure (a RuntimeError)."""
    msg = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in msg or "can't allocate memory" in msg


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: a usage mistake raises `UsageError` (the `command` wrapper prints
    ``prog: error: <message> (see prog --help)``) instead of printing the whole usage block. A negative number in any
    notation (``--lr -1e-4``) is a value, not an option; an empty text is no value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$")

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse, and an empty text (``--out ''``) is refused for every option whose default is not itself ''
        (an empty path would silently mean the current folder)."""
        ns, extras = super().parse_known_args(args, namespace)
        for a in self._actions:
            v = getattr(ns, a.dest, None)
            if isinstance(v, str) and not v.strip() and a.default != "" and a.dest != argparse.SUPPRESS:
                name = a.option_strings[-1] if a.option_strings else a.dest
                self.error(f"argument {name}: empty text; give a value")
        return ns, extras


def yaml_value(text: str) -> Any:
    """argparse type of flags that take a YAML value (numbers, booleans, lists, mappings): `parse_value`."""
    try:
        return parse_value(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def text_value(text: str) -> str:
    """argparse type of text flags (names, paths): the text as typed, never reinterpreted as YAML."""
    return text


def flag_type(annotation: Any) -> Callable[[str], Any]:
    """The argparse type of a config field's flag: text fields (`str`, `str | None`) take the text as typed (so
    ``--lora-name 007`` or ``--output-dir '#run1'`` stay what they are), every other field a YAML value."""
    return text_value if _scalar_kind(annotation) is str else yaml_value


# ------------------------------------------------------------------------------------------------ numbers and YAML
_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class YAML_LOADER(yaml.SafeLoader):  # noqa: N801 - a constant-like class name
    """PyYAML's safe loader with YAML 1.2's number rules: ``1e-4`` and ``5e3`` are floats (YAML 1.1 wants a dot),
    ``010`` is ten (not octal eight) and ``1:5`` is text (not the base-60 number 65); ``1_000``, ``0x10`` and
    ``0o17`` are ints. A key repeated in one mapping is an error (YAML 1.2; YAML 1.1 readers keep the last value
    silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` keys may be overridden: that is what merging is for
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if seen:
                    problem = f"the key {key!r} is repeated (first at line {first[key]}); keep one"
                    raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


_INT_12 = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$")
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
YAML_LOADER.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YAML_LOADER.add_implicit_resolver(_INT, _INT_12, list("-+0123456789"))  # ints first: "12" is an int, not a float
YAML_LOADER.add_implicit_resolver(_FLOAT, _FLOAT_12, list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    text = text.lstrip("+-")
    if text.startswith("0x"):
        return sign * int(text[2:], 16)
    if text.startswith("0o"):
        return sign * int(text[2:], 8)
    return sign * int(text, 10)


YAML_LOADER.add_constructor(_INT, _construct_int)


def parse_yaml(text: str, source: str = "<text>") -> Any:
    """YAML text -> Python values with `YAML_LOADER`; a syntax error is one ValueError naming source, line, column."""
    try:
        return yaml.load(text, Loader=YAML_LOADER)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{source} is not valid YAML{where}: {one_line(e.problem or e.context or str(e))}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{source} is not valid YAML: {one_line(str(e))}") from None


#: what `read_text` says when a prompts file is a folder
PROMPTS_FOLDER = "a folder; give a text file with one prompt per line"


def read_text(path: str | os.PathLike, what: str, folder: str = "a folder", missing: str = "") -> str:
    """The text of a file a user named (UTF-8, a byte-order mark dropped). Missing (`missing` is appended to the
    message), a folder (`folder` says what was expected) or not UTF-8: one error naming `what` and the path."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{what} {str(p)!r} is {folder}")
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist{missing}")
    try:
        return p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_yaml(path: str | os.PathLike, what: str = "config file", mapping: bool = True) -> Any:
    """A YAML file (`parse_yaml`); missing / unreadable / not UTF-8 / not a mapping: one error naming the file."""
    p = Path(path)
    text = read_text(p, what, folder="a folder, not a YAML file")
    data = parse_yaml(text, f"{what} {str(p)!r}")
    if mapping:
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ValueError(f"{what} {str(p)!r}: expected a mapping (key: value lines) at the top level, got a "
                             f"{type(data).__name__}")  # fmt: skip
    return data


def parse_value(text: str) -> Any:
    """One command-line value as YAML (numbers, booleans, lists, mappings); an empty text stays the empty string
    (``--lora-name ''`` is a value to validate, not an absent flag)."""
    if not text.strip():
        return text
    return parse_yaml(text, f"value {text!r}")


def parse_number(value: Any) -> float | int | None:
    """`value` as a number if it is one or a string that spells one (``"1e-4"``, ``" 5e3 "``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str) and _FLOAT_12.match(value.strip()):
        s = value.strip().replace("_", "")
        try:
            return int(s) if re.fullmatch(r"[-+]?[0-9]+", s) else float(s)
        except ValueError:
            return None
    return None


def integer(text: str) -> int:
    """argparse type of integer flags: ``100``, ``1_000``, ``1e3`` (an integral number in any notation)."""
    n = parse_number(text)
    if isinstance(n, float) and math.isfinite(n) and n.is_integer():
        n = int(n)
    if not isinstance(n, int):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return n


def number(text: str) -> float:
    """argparse type of float flags: ``1e-4``, ``5e-5``, ``2.0e-3``, ``5e3``, ``.5`` (finite numbers)."""
    n = parse_number(text)
    if n is None or not math.isfinite(float(n)):
        raise argparse.ArgumentTypeError(f"expected a finite number such as 0.5 or 1e-4, got {text!r}")
    return float(n)


def _scalar_kind(tp: Any) -> type | None:
    """int / float / str when a field's annotation is one of them or an Optional of one; else None."""
    if tp in (int, float, str):
        return tp
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and args[0] in (int, float, str):
            return args[0]
    return None


@functools.cache
def _scalar_fields(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind = _scalar_kind(hints.get(f.name))
        if kind is not None:
            out[f.name] = kind
    return out


def _numeric_fields(cls: type) -> dict[str, type]:
    return {k: v for k, v in _scalar_fields(cls).items() if v is not str}


def coerce_strings(obj: Any) -> Any:
    """In place: text fields (``str`` / ``str | None``) of the dataclass instance `obj` given a number (YAML reads
    ``output_dir: 2024`` or ``--lora-name 7`` as one) become that text; a list, mapping or boolean there is a
    ValueError naming the field. Returns `obj`."""
    for name, kind in _scalar_fields(type(obj)).items():
        if kind is not str:
            continue
        v = getattr(obj, name)
        if v is None or isinstance(v, str):
            continue
        if isinstance(v, int | float) and not isinstance(v, bool):
            setattr(obj, name, str(v))
            continue
        raise ValueError(f"{name}={v!r} is invalid: expected text (a {type(v).__name__} was given)")
    return obj


def _container_kind(tp: Any) -> type | None:
    """list / tuple / dict when a field's annotation is one of them (bare or parametrised) or an Optional of one."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _container_kind(args[0]) if len(args) == 1 else None
    kind = origin or tp
    return kind if kind in (list, tuple, dict) else None


@functools.cache
def _container_fields(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    kinds = {f.name: _container_kind(hints.get(f.name)) for f in dataclasses.fields(cls)}
    return {k: v for k, v in kinds.items() if v is not None}


def check_containers(obj: Any) -> Any:
    """List, tuple and mapping fields of the dataclass instance `obj` must hold one: a text given where a list goes
    (``--unet-targets to_q`` or ``anchor_prompts: a portrait``) would otherwise be read character by character. A
    ValueError names the field and shows the YAML list syntax. Returns `obj`."""
    for name, kind in _container_fields(type(obj)).items():
        v = getattr(obj, name)
        if v is None:
            continue
        if kind is dict and not isinstance(v, dict):
            raise ValueError(f"{name}={v!r} is invalid: expected a mapping, e.g. {{name: value}} in YAML")
        if kind is not dict and not isinstance(v, list | tuple):
            example = f"[{v}]" if isinstance(v, str) and "," not in v else "[first, second]"
            raise ValueError(f"{name}={v!r} is invalid: expected a list, written in YAML as {example}")
    return obj


_BOOL_TEXT = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


@functools.cache
def _bool_fields(cls: type) -> tuple[str, ...]:
    hints = typing.get_type_hints(cls)
    return tuple(f.name for f in dataclasses.fields(cls) if hints.get(f.name) is bool)


def coerce_numbers(obj: Any) -> Any:
    """In place: numeric fields of the dataclass instance `obj` given as numeric strings become numbers, and int
    fields given an integral float (``1e3``, ``100.0``) become ints. Boolean fields take true/false (yes/no, on/off,
    1/0, any case, as text or 0/1); anything else there is a ValueError naming the field (a non-empty text such as
    "false" would otherwise count as true). Other values are left for validation to refuse. Returns `obj`."""
    for name in _bool_fields(type(obj)):
        v = getattr(obj, name)
        if isinstance(v, bool):
            continue
        key = v.strip().lower() if isinstance(v, str) else str(v) if isinstance(v, int) else None
        if key not in _BOOL_TEXT:
            raise ValueError(f"{name}={v!r} is invalid: expected true or false")
        setattr(obj, name, _BOOL_TEXT[key])
    for name, kind in _numeric_fields(type(obj)).items():
        v = getattr(obj, name)
        n = parse_number(v) if isinstance(v, str) else v
        if n is None or isinstance(n, bool) or not isinstance(n, int | float):
            continue
        if kind is int and isinstance(n, float) and math.isfinite(n) and n.is_integer():
            n = int(n)
        if n is not v:
            setattr(obj, name, n)
    return obj


# ------------------------------------------------------------------------------------------------ devices
def check_device(device: Any, arg: str = "device"):
    """`device` as a `torch.device` that exists on this machine: a valid name (cpu, cuda, cuda:1, mps, ...) whose
    backend is available and, for an index, within the device count. ValueError naming `arg` otherwise (torch's own
    error for ``cuda`` without a driver is a RuntimeError deep inside the first `.to()`)."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"{arg}={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1', 'mps'): {e}"
        ) from None
    if d.type in ("cpu", "meta"):
        return d
    backend = torch.backends.mps if d.type == "mps" else getattr(torch, d.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"{arg}={device!r}: torch {torch.__version__} finds no {d.type} device on this machine; "
                         "use 'cpu' (or install a torch build for your GPU)")  # fmt: skip
    count = getattr(backend, "device_count", None)
    n = count() if count else 1
    if d.index is not None and d.index >= n:
        raise ValueError(f"{arg}={device!r}: this machine has {n} {d.type} device(s), {d.type}:0 to {d.type}:{n - 1}")
    return d


# ------------------------------------------------------------------------------------------------ names
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(value: Any, arg: str, strip_suffix: str | None = None) -> str:
    """A plain file-name stem for outputs (LoRA names, run names): letters, digits, '.', '_' and '-', starting with a
    letter or digit, at most 100 characters, no '..' (so no hidden files, no path separators, no empty name).
    ValueError naming `arg` otherwise."""
    v = str(value if value is not None else "").strip()
    if strip_suffix and v.endswith(strip_suffix):
        v = v[: -len(strip_suffix)]
    if not _SAFE_NAME.match(v) or ".." in v:
        raise ValueError(
            f"{arg}={value!r} is not a plain name: use letters, digits, '.', '_' and '-' only, starting with a letter "
            "or digit (no path separators, no leading dot, not empty, at most 100 characters)"
        )
    return v
