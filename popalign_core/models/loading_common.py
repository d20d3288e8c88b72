"""Helpers shared by the model loaders (`models.loading` for the UNet families, `models.loading_flow` for SD3 / FLUX):
argument checks, config JSON, safetensors reading, diffusers' load-time logging turned into errors. Imports no other
loader, so both can use it without an import cycle."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from popalign_core.common.fileio import read_safetensors, safetensors_keys

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def check_choice(name: str, value, valid: Iterable) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not supported; valid values: {', '.join(map(str, valid))}")


def read_json(path: Path) -> dict:
    """A JSON config file of a model folder; a damaged one is a ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"config file {str(path)!r} is damaged ({e}); copy the model folder again from its source"
        ) from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {str(path)!r} is not a JSON object; copy the model folder again")
    return d


def require_files(root: Path, rel_paths: Iterable[str], what: str) -> None:
    for rel in rel_paths:
        if not (root / rel).is_file():
            raise FileNotFoundError(f"{what} {root} is missing {rel} (expected file: {root / rel})")


def check_materialised(modules: Mapping[str, torch.nn.Module], source: str) -> None:
    for name, module in modules.items():
        missing = [n for n, p in module.named_parameters() if p.is_meta]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise ValueError(
                f"{source}: no weights for {name} parameter(s) {shown}; the weight file and config disagree (a "
                "file of another model, a LoRA, or a damaged copy): copy the model again"
            )


class LoadLogFilter(logging.Filter):
    """Drops diffusers' "modules that should be kept in float32: []" warning (logged on every dtype cast even when the
    list is empty; nothing to act on) and keeps its "Some weights of X were not initialized from the model checkpoint"
    warnings (a multi-line list of names) in `missing`: `quiet_loading` turns them into one error."""

    def __init__(self):
        super().__init__()
        self.missing: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "were not initialized from the model checkpoint" in msg:
            self.missing.append(msg.split(" were not")[0].removeprefix("Some weights of ").strip())
            return False
        return "should be kept in float32: []" not in msg


@contextmanager
def quiet_loading(source: object) -> Iterator[None]:
    """Loading without diffusers' noise; a component whose weights were missing from its file (diffusers fills them
    in at random with a warning) is a ValueError naming `source`."""
    import warnings

    log = logging.getLogger("diffusers.models.modeling_utils")
    flt = LoadLogFilter()
    log.addFilter(flt)
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.36 renames torch_dtype to dtype; the older name works in every supported version
            warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated.*", category=FutureWarning)
            yield
    finally:
        log.removeFilter(flt)
    if flt.missing:
        raise ValueError(
            f"{source}: weights of {', '.join(flt.missing)} are missing from its weight file; the file does not "
            "belong to this model (or is damaged): copy the model again"
        )


DAMAGED_HINT = (
    "the file is damaged or incomplete (compare its size with the original, download or copy it again) or is not a "
    "safetensors checkpoint"
)


def checkpoint_keys(path: Path) -> list[str]:
    return safetensors_keys(path, "checkpoint", DAMAGED_HINT)[0]


def read_prefixed(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return read_safetensors(path, "checkpoint", DAMAGED_HINT, keys=lambda k: k.startswith(prefixes))[0]


WEIGHT_NAMES = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}


def component_weights(root: Path, name: str, library: str) -> str:
    """Check `root/name` holds safetensors weights; returns their variant: "" (plain) or "fp16" (only that)."""
    folder = root / name
    stem = WEIGHT_NAMES.get(library, "diffusion_pytorch_model")
    for variant in (None, "fp16"):
        infix = f".{variant}" if variant else ""
        single, sharded = folder / f"{stem}{infix}.safetensors", folder / f"{stem}.safetensors.index{infix}.json"
        if single.is_file() or sharded.is_file():
            return variant or ""
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise ValueError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); they are never loaded here (unsafe). "
            "Convert them to .safetensors first (e.g. load and save_pretrained(..., safe_serialization=True))."
        )
    expected = folder / f"{stem}.safetensors"
    raise FileNotFoundError(
        f"diffusers folder {root} is missing {name}/{stem}.safetensors (expected file: {expected})"
    )


def check_parts_arguments(text_encoders, vae) -> list:
    """`load_model`'s text_encoders (None, one path or a list of paths) as a list, and vae (None or one path);
    anything else is a ValueError naming the argument."""
    import os

    def is_path(v) -> bool:
        return isinstance(v, str | os.PathLike) and bool(os.fspath(v).strip())

    if vae is not None and not is_path(vae):
        raise ValueError(f"vae={vae!r} is invalid: expected the path of a VAE .safetensors file, or None")
    if text_encoders is None:
        return []
    files = [text_encoders] if isinstance(text_encoders, str | os.PathLike) else text_encoders
    if not isinstance(files, list | tuple) or not all(is_path(f) for f in files):
        raise ValueError(
            f"text_encoders={text_encoders!r} is invalid: expected a list of text-encoder .safetensors paths "
            "(e.g. [clip_l.safetensors, t5xxl_fp16.safetensors]), or None"
        )
    return list(files)
