"""Seeded tiny components for tests, benchmarks and the demo (diffusers-tests style `get_dummy_components`).

Every model is built from a config with a fixed seed, so two calls give bit-identical weights; nothing is downloaded.
Families: "sd15" (CLIP-L-style text encoder, epsilon), "sd2" (OpenCLIP-style encoder, linear projections,
v-prediction), "sdxl" (two text encoders, pooled embeddings, time ids). Images are 32x32, latents 16x16.
The flow families (sd3, flux) are in `models.tiny_flow`; `get_dummy_adapter` builds either.
"""

from __future__ import annotations

import torch

from popalign_core.models.adapter import FLOW_FAMILIES, UNET_FAMILIES, check_family
from popalign_core.models.diffusers_adapter import DiffusersAdapter
from popalign_core.models.tiny_flow import get_dummy_flow_adapter
from popalign_core.models.tiny_parts import TINY_IMAGE_SIZE, tiny_text_encoder_config
from popalign_core.models.tokenizers import clip_tokenizer

__all__ = [
    "TINY_IMAGE_SIZE",
    "get_dummy_adapter",
    "get_dummy_components",
    "get_dummy_pipeline",
    "tiny_scheduler_config",
    "tiny_text_encoder_config",
    "tiny_unet_config",
    "tiny_vae_config",
]


def tiny_unet_config(family: str) -> dict:
    check_family(family, UNET_FAMILIES, "a tiny UNet")
    base = dict(
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=32,
    )
    if family == "sd15":
        return dict(
            base,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
        )
    if family == "sd2":
        return dict(
            base,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        )
    return dict(
        base,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
        transformer_layers_per_block=(1, 1),
    )


def tiny_vae_config() -> dict:
    return dict(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_IMAGE_SIZE,
    )


def tiny_scheduler_config(family: str) -> dict:
    check_family(family, UNET_FAMILIES, "a DDPM schedule")
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if family == "sd2" else "epsilon",
    )


def get_dummy_components(family: str = "sd15", seed: int = 0) -> dict:
    """Tiny, seeded diffusers components keyed like a pipeline's.

    Keys: unet, vae, text_encoder[, text_encoder_2], tokenizer[, tokenizer_2], scheduler.
    """
    check_family(family, UNET_FAMILIES, "tiny UNet components (flow families: models.tiny_flow)")
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(family))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**tiny_vae_config())
    torch.manual_seed(seed + 2)
    if family == "sd15":
        text_encoder = CLIPTextModel(tiny_text_encoder_config("quick_gelu"))
    else:
        text_encoder = CLIPTextModel(tiny_text_encoder_config("gelu"))
    comps = {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": clip_tokenizer("openclip" if family == "sd2" else "clip"),
        "scheduler": DDIMScheduler(**tiny_scheduler_config(family)),
    }
    if family == "sdxl":
        torch.manual_seed(seed + 3)
        comps["text_encoder_2"] = CLIPTextModelWithProjection(tiny_text_encoder_config("gelu")).eval()
        comps["tokenizer_2"] = clip_tokenizer("openclip")
    return comps


def get_dummy_pipeline(family: str = "sd15", seed: int = 0):
    """A diffusers pipeline (StableDiffusionPipeline / StableDiffusionXLPipeline) over the tiny components."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    comps = get_dummy_components(family, seed)
    if family == "sdxl":
        return StableDiffusionXLPipeline(**comps)
    return StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def get_dummy_adapter(family: str = "sd15", seed: int = 0, **kwargs):
    """A `DiffusersAdapter` over the tiny components (training schedule: DDPM with the same betas); for "sd3" and
    "flux" a `FlowAdapter` over `models.tiny_flow`'s components (keyword arguments go there)."""
    from diffusers import DDPMScheduler

    check_family(family)
    if family in FLOW_FAMILIES:
        return get_dummy_flow_adapter(family, seed, **kwargs)
    if kwargs:
        raise ValueError(f"{', '.join(kwargs)}: options of the tiny flow models only, not of {family!r}")

    comps = get_dummy_components(family, seed)
    encs = [comps["text_encoder"]] + ([comps["text_encoder_2"]] if family == "sdxl" else [])
    toks = [comps["tokenizer"]] + ([comps["tokenizer_2"]] if family == "sdxl" else [])
    noise = DDPMScheduler.from_config(comps["scheduler"].config)
    return DiffusersAdapter(comps["unet"], comps["vae"], encs, toks, noise, family)
