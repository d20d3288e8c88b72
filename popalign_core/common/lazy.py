"""Lazy package exports: a package's flat API without importing its heavy modules (torch, diffusers) up front.

A package ``__init__`` maps each public name to the module defining it; the module is imported on first access
(PEP 562 module ``__getattr__``). Importing a sub-package stays as cheap as its ``__init__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for `package`; `exports` maps a public name to its module, relative to `package`.

    >>> __getattr__, __dir__ = lazy_exports(__name__, {"Trainer": ".trainer"})  # doctest: +SKIP
    """

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module, package), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
