"""`RunConfig`: the fields, checks and file handling that every training run shares (`TrainConfig` of
``popalign train``, `DALConfig` of ``popalign dal``), in the style of TRL's `DPOConfig(TrainingArguments)`.

The base declares the shared fields (model, LoRA shape, optimiser basics, output, resume); a run config inherits
them, redeclares one where its default or help text is its own, and adds its fields. Every field check lives in one
table (`CHECKS`, field name -> check), so a shared field is checked the same way by every run config; rules across
fields are a config's `check_rules`. `to_dict`, `fingerprint` (what must not change across a resume),
`fields_help`, the YAML loader and the CLI flags are written once, here.

Field order: inherited fields come first in a dataclass; `PLACE_AFTER` puts a config's own fields back where its
YAML files, ``config.yaml`` and ``--help`` have always listed them (`field_order`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from popalign_core.common.fields import fields_help as _fields_help
from popalign_core.common.fields import help_field as _help
from popalign_core.common.userinput import (
    check_containers,
    check_name,
    coerce_numbers,
    coerce_strings,
    flag_type,
    read_yaml,
)
from popalign_core.models.families import FAMILIES as MODEL_FAMILIES
from popalign_core.models.loading_options import option_help

FAMILIES = ("auto", *MODEL_FAMILIES)
LORA_FORMAT_CHOICES = ("kohya", "diffusers")
#: fields that may change when a run is resumed (not part of the fingerprint)
RESUMABLE_CHANGES = ("output_dir", "progress", "resume", "steps", "checkpoint_every", "keep_checkpoints")
#: path-valued fields: an existing file counts by its real location in the fingerprint
PATH_FIELDS = ("model", "data", "model_config_dir", "model_vae", "t5_tokenizer", "prompts_file", "face_bank")
#: fields added after runs were first fingerprinted: left out of the fingerprint while at their default, so runs
#: started before they existed still resume
OMIT_AT_DEFAULT = {"model_text_encoders": [], "model_vae": None, "t5_tokenizer": None}
#: switches that change memory and time, not the numbers: hashed at these values whatever they are set to, so a run
#: resumes after one is flipped (e.g. turned on after running out of memory); fingerprints written with another value
#: are still accepted on resume (`config_fingerprint(..., switches_as_set=True)`)
MEMORY_SWITCHES = {"gradient_checkpointing": False}


# ------------------------------------------------------------------------------------------------ field checks
# A check is check(cfg, name): it raises ValueError naming the field when getattr(cfg, name) is not valid.
def bad(cfg, name: str, why: str):
    raise ValueError(f"{name}={getattr(cfg, name)!r} is invalid: {why}")


def integer(lo: int):
    """An int (not a bool) >= lo."""

    def check(cfg, name):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            bad(cfg, name, f"must be an integer >= {lo}")

    return check


def finite(lo: float, strict: bool = False):
    """A finite number (not a bool) >= lo (> lo when `strict`)."""

    def check(cfg, name):
        v = getattr(cfg, name)
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (v <= lo if strict else v < lo):
            bad(cfg, name, f"must be a finite number {'>' if strict else '>='} {lo:g}")

    return check


def one_of(values, none: bool = False):
    """One of `values` (or None when `none`)."""

    def check(cfg, name):
        if getattr(cfg, name) not in (*values, *((None,) if none else ())):
            bad(cfg, name, f"valid values: {', '.join(values)}")

    return check


def _family(cfg, name):
    if cfg.family not in FAMILIES:
        raise ValueError(f"family={cfg.family!r} is not supported; valid values: {', '.join(FAMILIES)}")


def _resolution(cfg, name):
    r = cfg.resolution
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not 8 <= r <= 8192):
        bad(cfg, name, "must be None (the model's native size) or an integer in [8, 8192] pixels")


def _lora_alpha(cfg, name):
    a = cfg.lora_alpha
    if a is not None and not (isinstance(a, int | float) and not isinstance(a, bool) and a > 0):
        bad(cfg, name, "must be a number > 0")


def _lora_formats(cfg, name):
    fmts = list(cfg.lora_formats)
    if not fmts or any(f not in LORA_FORMAT_CHOICES for f in fmts):
        bad(cfg, name, f"a non-empty list of: {', '.join(LORA_FORMAT_CHOICES)}")


def _plain_name(cfg, name):
    check_name(getattr(cfg, name), name)


# ------------------------------------------------------------------------------------------------ the base
@dataclass
class RunConfig:
    """The fields every training run has; YAML keys and CLI flags have the same names (dashes for underscores)."""

    # model
    model: str = _help(
        "base model: a .safetensors checkpoint, a diffusers folder, or 'tiny:<sd15|sd2|sdxl|sd3|flux>' (a seeded "
        "tiny model built from configs, for tests and examples)",
        default="",
    )
    family: str = _help("model family: auto, sd15, sd2, sdxl, sd3, flux", default="auto")
    model_config_dir: str | None = _help(
        "diffusers config folder for a single-file checkpoint (default: the shipped config of its family)",
        default=None,
    )
    prediction_type: str | None = _help(
        "override the scheduler's prediction type: epsilon or v_prediction (UNet families only)", default=None
    )
    model_text_encoders: list = _help(option_help("model_text_encoders"), default_factory=list)
    model_vae: str | None = _help(option_help("model_vae"), default=None)
    t5_tokenizer: str | None = _help(option_help("t5_tokenizer"), default=None)
    resolution: int | None = _help("training image side in pixels (default: the model's native size)", default=None)
    # what is trained
    lora_rank: int = _help("LoRA rank", default=8)
    lora_alpha: float | None = _help("LoRA alpha (default: equal to the rank, i.e. scale 1)", default=None)
    unet_targets: list = _help(
        "UNet / transformer modules that get a LoRA; default: the family's attention projections (UNets: to_q, to_k, "
        "to_v, to_out.0; SD3 / FLUX: those and add_q_proj, add_k_proj, add_v_proj, to_add_out)",
        default_factory=lambda: ["default"],
    )
    text_encoder_targets: list = _help(
        "text-encoder modules that get a LoRA",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    )
    # optimisation
    steps: int = _help("optimiser steps", default=100)
    lr: float = _help("learning rate (PopAlign paper: 5e-7 for full SDXL; LoRA usually 1e-5..1e-4)", default=1e-4)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    max_grad_norm: float = _help("gradient clipping norm (0 = off)", default=1.0)
    seed: int = _help("global seed: LoRA init, batches, noise, timesteps, caption dropout", default=0)
    # output
    output_dir: str = _help("output folder (checkpoints, metrics, LoRA files)", default="runs/train")
    lora_name: str = _help("file name stem of the saved LoRA", default="popalign_lora")
    lora_formats: list = _help(
        "LoRA layouts written at the end: kohya, diffusers", default_factory=lambda: ["kohya", "diffusers"]
    )
    checkpoint_every: int = _help("steps between resumable checkpoints (0 = only at the end)", default=50)
    keep_checkpoints: int = _help("how many recent checkpoints to keep", default=2)
    resume: str | None = _help(
        "'auto' (latest checkpoint in output_dir), a checkpoint folder, or none", default="auto"
    )
    progress: bool = _help("show a progress bar", default=True)

    #: field name -> check (`integer`, `finite`, `one_of`, ...); a run config extends it with its own fields
    CHECKS: ClassVar[dict] = {
        "family": _family,
        "prediction_type": one_of(("epsilon", "v_prediction"), none=True),
        "resolution": _resolution,
        "lora_rank": integer(1),
        "lora_alpha": _lora_alpha,
        "steps": integer(1),
        "lr": finite(0, strict=True),
        "weight_decay": finite(0),
        "max_grad_norm": finite(0),
        "seed": integer(0),
        "lora_name": _plain_name,
        "lora_formats": _lora_formats,
        "checkpoint_every": integer(0),
        "keep_checkpoints": integer(0),
    }
    #: own field -> the field it follows in `field_order` (it and the own fields declared after it, up to the next
    #: entry of the mapping); own fields before the first entry follow the inherited ones
    PLACE_AFTER: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Coerce numeric / boolean text, then every field's check (in `field_order`), then `check_rules`."""
        coerce_numbers(self)
        check_containers(self)
        coerce_strings(self)
        for name in self.field_order():
            check = self.CHECKS.get(name)
            if check is not None:
                check(self, name)
        self.check_rules()
        return self

    def check_rules(self) -> None:
        """Rules across fields (a run config's own); ValueError when one is broken."""

    @classmethod
    def field_order(cls) -> list[str]:
        """The field names in the order of the config's documentation (see `PLACE_AFTER`)."""
        names = [f.name for f in dataclasses.fields(cls)]
        order = [n for n in names if n in RunConfig.__dataclass_fields__]  # inherited: first, in the base's order
        at = len(order)
        for n in names:
            if n in RunConfig.__dataclass_fields__:
                continue
            if n in cls.PLACE_AFTER:
                at = order.index(cls.PLACE_AFTER[n]) + 1
            order.insert(at, n)
            at += 1
        return order

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: d[k] for k in self.field_order()}

    def fingerprint(self) -> str:
        """Hash of the fields that must not change across a resume (everything but output/progress/steps)."""
        return config_fingerprint(self.to_dict())

    @classmethod
    def fields_help(cls) -> dict[str, str]:
        return _fields_help(cls, cls.field_order())

    @classmethod
    def add_arguments(cls, ap, choices: dict[str, list] | None = None, skip: tuple[str, ...] = ()) -> None:
        """One flag per field (``--lora-rank``), YAML-typed; `choices`: fields with a closed set of values."""
        hints = typing.get_type_hints(cls)
        for name, helptext in cls.fields_help().items():
            if name in skip:
                continue
            flag = "--" + name.replace("_", "-")
            if choices and name in choices:
                ap.add_argument(flag, choices=choices[name], default=None, help=helptext)
            else:
                ap.add_argument(flag, type=flag_type(hints[name]), default=None, metavar="VALUE", help=helptext)


def config_fingerprint(d: dict, paths_as_given: bool = False, switches_as_set: bool = False) -> str:
    """Hash of a run config's fields that must not change across a resume (not output/progress/steps; memory
    switches at their `MEMORY_SWITCHES` value). Paths of existing files count by their real location, so
    `data/x.jsonl` and `/abs/data/x.jsonl` are the same run (`paths_as_given` / `switches_as_set`: the fingerprints
    of versions before that, still accepted on resume)."""
    d = dict(d)
    for k in RESUMABLE_CHANGES:
        d.pop(k, None)
    if not switches_as_set:
        d.update({k: v for k, v in MEMORY_SWITCHES.items() if k in d})
    for k, default in OMIT_AT_DEFAULT.items():
        if k in d and d[k] == default:
            d.pop(k)
    real = (lambda v: v) if paths_as_given else _real_path
    for k in PATH_FIELDS:
        if isinstance(d.get(k), str):
            d[k] = real(d[k])
    if isinstance(d.get("model_text_encoders"), list):
        d["model_text_encoders"] = [real(v) if isinstance(v, str) else v for v in d["model_text_encoders"]]
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _real_path(v: str) -> str:
    return os.path.realpath(v) if v and os.path.exists(v) else v


def load_yaml_config(cls, path: str | os.PathLike | None, overrides: dict, relative_keys: tuple[str, ...] = ()):
    """An instance of the config dataclass `cls` from a YAML file (optional) and keyword overrides (None values are
    ignored); unknown keys are errors. relative_keys: path-valued keys that, written relative in the file, are
    relative to the file's folder."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        data = read_yaml(p, "config file")
        for key in relative_keys:
            v = data.get(key)
            if isinstance(v, str) and v != "toy" and not Path(v).is_absolute():
                data[key] = str(p.parent / v)
    data.update({k: v for k, v in overrides.items() if v is not None})
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(sorted(valid))}")
    return cls(**data)
