"""Step 0 of the flow, the model: load it offline, talk to it through one interface, sample from it.

- `adapter`: the `ModelAdapter` interface (encode prompts, add noise, predict, the adapter-off reference);
- `diffusers_adapter`: `DiffusersAdapter`, the adapter over diffusers components (SD1.5, SD2.x, SDXL);
- `loading`: a diffusers folder, a single ``.safetensors`` file or ``toyworld`` -> adapter (offline configs);
- `single_file`: diffusers components -> the original single-file checkpoint layout;
- `tokenizers`: the shipped CLIP tokenizer; `sampling`: seeded, batched text-to-image sampling;
- `tiny`: seeded tiny components for tests, benchmarks and the demo.

The ComfyUI adapter lives in the node pack (`nodes/comfy_adapter.py`): only the node pack imports ComfyUI.
"""

from popalign_core.common.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(["FAMILIES", "PREDICTION_TYPES", "Conditioning", "ModelAdapter"], ".adapter"),
        "DiffusersAdapter": ".diffusers_adapter",
        **dict.fromkeys(
            [
                "DTYPES",
                "CONFIGS_DIR",
                "FAMILY_CONFIG_DIRS",
                "FAMILY_KEY_MARKERS",
                "COMPONENT_PREFIXES",
                "PICKLE_SUFFIXES",
                "PIPELINE_CLASSES",
                "TOYWORLD",
                "detect_family",
                "resolve_model_path",
                "load_pipeline",
                "load_model",
            ],
            ".loading",
        ),
        **dict.fromkeys(["SamplerConfig", "sample", "SCHEDULERS", "derive_seed"], ".sampling"),
    },
)
