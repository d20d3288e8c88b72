"""PopAlign ComfyUI nodes: thin wrappers over popalign_core (classic node API).

Node ids are prefixed `PopAlign` and never renamed once shipped: saved workflows depend on them. Each node module is
imported on its own: one that fails (a broken optional dependency) disables only its own nodes, and the reason is
logged and listed in `LOAD_ERRORS`.
"""

from __future__ import annotations

import importlib
import logging

NODE_MODULES = ("population_nodes", "classify_nodes", "data_nodes", "train_nodes", "dal_nodes", "metrics_nodes")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
LOAD_ERRORS: dict[str, str] = {}

_log = logging.getLogger("popalign")

try:
    from . import _common

    _common.register_folders()
    _common.register_routes()
except Exception as exc:  # noqa: BLE001 - without the core nothing can load; say why
    LOAD_ERRORS["_common"] = f"{type(exc).__name__}: {exc}"
    _log.error("PopAlign: the core package could not be imported (%s); no PopAlign node is available", exc)
else:
    for _name in NODE_MODULES:
        try:
            _mod = importlib.import_module(f".{_name}", __name__)
        except Exception as exc:  # noqa: BLE001
            LOAD_ERRORS[_name] = f"{type(exc).__name__}: {exc}"
            _log.error("PopAlign: nodes of %s are disabled: %s", _name, exc)
            continue
        NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
        NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
