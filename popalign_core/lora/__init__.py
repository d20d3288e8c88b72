"""Step 4 of the flow, the LoRA: inject it into a model, save it as files ComfyUI and diffusers read.

`files`: LoRA creation (peft), the diffusers and kohya layouts (`LORA_FORMATS`), metadata, reading back.
"""

from popalign_core.common.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    dict.fromkeys(
        [
            "DIFFUSERS_WEIGHT_NAME",
            "LORA_FORMATS",
            "LoraFormat",
            "LoraSpec",
            "TEXT_ENCODER_TARGETS",
            "UNET_ATTENTION_TARGETS",
            "add_lora",
            "get_lora_state_dict",
            "kohya_to_peft",
            "load_lora",
            "lora_metadata",
            "model_hash",
            "peft_to_kohya",
            "read_lora",
            "save_lora",
        ],
        ".files",
    ),
)
