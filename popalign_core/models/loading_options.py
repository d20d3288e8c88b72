"""The model-file options of `models.loading.load_model` as config fields and command-line flags, written once.

Training runs (`train.runconfig.RunConfig`: ``popalign train``, ``popalign dal``) have them as config fields;
``popalign audit`` and ``popalign data sample`` get the same flags from `add_model_file_arguments`, and
``popalign data pipeline`` the same top-level config keys. A model given with options travels as a `model_spec`
mapping ``{"model": path, **load_model keywords}``. Imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

#: option (config key / flag name) -> (load_model keyword, help text)
MODEL_FILE_OPTIONS = {
    "model_config_dir": (
        "config_dir",
        "diffusers config folder for a single-file checkpoint (default: the shipped config of its family)",
    ),
    "model_text_encoders": (
        "text_encoders",
        "SD3 / FLUX: separate text-encoder files completing or replacing those bundled in the model file (ComfyUI's "
        "models/clip/ files: clip_l, clip_g, t5xxl .safetensors, fp8 ones too; each file's slot is read from its "
        "keys): one path or a YAML list, [clip_l.safetensors, t5xxl_fp16.safetensors]",
    ),
    "model_vae": (
        "vae",
        "SD3 / FLUX: a separate VAE file (ComfyUI's models/vae/, e.g. ae.safetensors) replacing a bundled one",
    ),
    "t5_tokenizer": (
        "t5_tokenizer",
        "SD3 / FLUX: folder of the T5 tokenizer (the diffusers model's tokenizer_3/ | tokenizer_2/, or ComfyUI's "
        "comfy/text_encoders/t5_tokenizer/, found by itself when the model lies in a ComfyUI models/ folder)",
    ),
}


def option_help(name: str) -> str:
    return MODEL_FILE_OPTIONS[name][1]


def add_model_file_arguments(ap) -> None:
    """``--model-config-dir``, ``--model-text-encoders``, ``--model-vae``, ``--t5-tokenizer`` on parser `ap`."""
    from popalign_core.common.userinput import text_value, yaml_value

    def path_list(text: str):  # one path or a YAML list of paths, always a list (as the config field)
        value = yaml_value(text)
        return [value] if isinstance(value, str) else value

    for name, (_, helptext) in MODEL_FILE_OPTIONS.items():
        kind = path_list if name == "model_text_encoders" else text_value
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=None, metavar="PATH", help=helptext)


def model_file_kwargs(options: Any) -> dict[str, Any]:
    """The `load_model` keywords of the options set in `options` (an argparse Namespace or a mapping)."""
    get = options.get if isinstance(options, Mapping) else lambda k: getattr(options, k, None)
    return {kw: get(name) for name, (kw, _) in MODEL_FILE_OPTIONS.items() if get(name) not in (None, [])}


def model_spec(model: str | os.PathLike, options: Any) -> str | os.PathLike | dict[str, Any]:
    """`model` itself when no model-file option is set, else ``{"model": model, **load_model keywords}``."""
    kw = model_file_kwargs(options)
    return {"model": model, **kw} if kw else model
