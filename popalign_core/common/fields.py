"""Documented dataclass fields: every config class of the core (run configs, sampler and DFT settings, loss
hyper-parameters) declares its fields with a help text, which CLI flags, node tooltips and docs read back."""

from __future__ import annotations

import dataclasses


def help_field(text: str, **kw):
    """A dataclass field whose ``metadata["help"]`` is `text` (`kw`: default / default_factory ...)."""
    return dataclasses.field(metadata={"help": text}, **kw)


def fields_help(cls, names=None) -> dict[str, str]:
    """Field name -> help text of the dataclass `cls`, in the order of `names` (default: the declaration order)."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    return {n: by_name[n].metadata.get("help", "") for n in (by_name if names is None else names)}
