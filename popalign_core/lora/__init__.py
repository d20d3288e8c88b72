"""Step 4 of the flow, the LoRA: inject it into a model, save it as files ComfyUI and diffusers read.

`inject`: LoRA creation (peft) and its in-memory layout; `kohya`: the kohya keys <-> peft keys; `metadata`: the
provenance a file carries; `files`: the diffusers and kohya layouts (`LORA_FORMATS`), saving and reading back (it
re-exports the other modules' public names).
"""

from popalign_core.common.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            [
                "DEFAULT_UNET_TARGETS",
                "FLOW_ATTENTION_TARGETS",
                "LoraSpec",
                "TEXT_ENCODER_TARGETS",
                "UNET_ATTENTION_TARGETS",
                "add_lora",
                "get_lora_state_dict",
                "lora_components",
            ],
            ".inject",
        ),
        **dict.fromkeys(["kohya_to_peft", "peft_to_kohya"], ".kohya"),
        **dict.fromkeys(["check_lora_family", "lora_metadata", "model_hash"], ".metadata"),
        **dict.fromkeys(
            ["DIFFUSERS_WEIGHT_NAME", "LORA_FORMATS", "LoraFormat", "load_lora", "read_lora", "save_lora"], ".files"
        ),
    },
)
