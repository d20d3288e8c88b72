"""Seeded tiny flow-matching components (SD3, FLUX) for tests, benchmarks and examples (`get_dummy_components` style).

Same shapes and wiring as the real families, scaled down: CLIP-L / CLIP-G (width 32, projections 32), a T5 encoder
(width 64, one layer, the tiny T5 tokenizer), a 16-channel VAE with the family's scaling and shift factors, and

- sd3: an `SD3Transformer2DModel` of one joint block, 64 wide with one 64-dim head (ComfyUI reads an MMDiT's depth
  as width / 64 and its heads as the depth, so this is the smallest shape it detects as SD3), patch 2;
- flux: a `FluxTransformer2DModel` (one double and one single block, two 16-dim heads, RoPE axes 4/6/6) with the
  guidance input of FLUX.1-dev, or without it (``guidance_embeds=False``: FLUX.1-schnell).

Images are 32x32 (latents 16x16, 8x8 tokens of 2x2 patches). Nothing is downloaded.
"""

from __future__ import annotations

import torch

from popalign_core.models.families import FLOW_FAMILIES, check_family
from popalign_core.models.flow import FLUX_BASE, FLUX_MAX, SD3_SHIFT
from popalign_core.models.tiny_parts import TINY_IMAGE_SIZE, tiny_text_encoder_config
from popalign_core.models.tokenizers import clip_tokenizer, tiny_t5_tokenizer

#: the VAE latent factors of the real families (diffusers' vae/config.json of SD3-medium and FLUX.1-dev)
VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
TINY_T5_WIDTH = 64
TINY_T5_TOKENS = 16


def tiny_t5_config():
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tiny_t5_tokenizer()),
        d_model=TINY_T5_WIDTH,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )


def tiny_transformer_config(family: str, guidance_embeds: bool = True) -> dict:
    check_family(family, FLOW_FAMILIES, "a tiny flow transformer")
    if family == "sd3":
        return dict(
            sample_size=TINY_IMAGE_SIZE // 2,
            patch_size=2,
            in_channels=16,
            num_layers=1,
            attention_head_dim=64,
            num_attention_heads=1,
            joint_attention_dim=TINY_T5_WIDTH,
            caption_projection_dim=64,
            pooled_projection_dim=64,
            out_channels=16,
            pos_embed_max_size=16,
        )
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_T5_WIDTH,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def tiny_flow_vae_config(family: str) -> dict:
    scale, shift = VAE_FACTORS[family]
    return dict(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=16,
        norm_num_groups=32,
        sample_size=TINY_IMAGE_SIZE,
        scaling_factor=scale,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def flow_scheduler_config(family: str) -> dict:
    """The training/sampling schedule of the real family (diffusers' scheduler_config.json of SD3 / FLUX.1-dev)."""
    check_family(family, FLOW_FAMILIES, "a flow schedule")
    if family == "sd3":
        return dict(num_train_timesteps=1000, shift=SD3_SHIFT)
    return dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=FLUX_BASE[1],
        max_shift=FLUX_MAX[1],
        base_image_seq_len=FLUX_BASE[0],
        max_image_seq_len=FLUX_MAX[0],
    )


def get_dummy_flow_components(family: str = "sd3", seed: int = 0, *, t5: bool = True, guidance_embeds: bool = True):
    """Tiny, seeded components keyed like the diffusers pipeline's (StableDiffusion3Pipeline / FluxPipeline).

    sd3: transformer, vae, text_encoder (CLIP-L), text_encoder_2 (CLIP-G), text_encoder_3 (T5, None without `t5`),
    tokenizer, tokenizer_2, tokenizer_3, scheduler. flux: transformer, vae, text_encoder (CLIP-L), text_encoder_2
    (T5), tokenizer, tokenizer_2, scheduler.
    """
    check_family(family, FLOW_FAMILIES, "tiny flow components")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(seed)
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    transformer = cls(**tiny_transformer_config(family, guidance_embeds)).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**tiny_flow_vae_config(family)).eval()
    torch.manual_seed(seed + 2)
    clip_l = (CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel)(tiny_text_encoder_config()).eval()
    if family == "sd3":  # SD3's CLIP-L projection is the identity (single files have none; ComfyUI uses none)
        with torch.no_grad():
            clip_l.text_projection.weight.copy_(torch.eye(clip_l.text_projection.weight.shape[0]))
    torch.manual_seed(seed + 3)
    clip_g = CLIPTextModelWithProjection(tiny_text_encoder_config("gelu")).eval() if family == "sd3" else None
    torch.manual_seed(seed + 4)
    t5_model = T5EncoderModel(tiny_t5_config()).eval() if (t5 or family == "flux") else None
    t5_tok = tiny_t5_tokenizer(TINY_T5_TOKENS)
    scheduler = FlowMatchEulerDiscreteScheduler(**flow_scheduler_config(family))
    comps = {"transformer": transformer, "vae": vae, "text_encoder": clip_l, "tokenizer": clip_tokenizer("clip")}
    if family == "sd3":
        comps.update(
            text_encoder_2=clip_g,
            tokenizer_2=clip_tokenizer("openclip"),
            text_encoder_3=t5_model,
            tokenizer_3=t5_tok,
        )
    else:
        comps.update(text_encoder_2=t5_model, tokenizer_2=t5_tok)
    comps["scheduler"] = scheduler
    return comps


def encoders_of(comps: dict, family: str) -> tuple[list, list]:
    """(text encoders, tokenizers) of a pipeline's components, in the family's order."""
    n = 3 if family == "sd3" else 2
    names = ["text_encoder"] + [f"text_encoder_{k}" for k in range(2, n + 1)]
    toks = ["tokenizer"] + [f"tokenizer_{k}" for k in range(2, n + 1)]
    encoders = [comps.get(k) for k in names]
    return encoders, [comps.get(t) if e is not None else None for t, e in zip(toks, encoders)]


def get_dummy_flow_adapter(family: str = "sd3", seed: int = 0, **kwargs):
    """A `FlowAdapter` over the tiny components (keyword arguments: `get_dummy_flow_components`'s t5 and
    guidance_embeds, then the adapter's own, e.g. timestep_sampling)."""
    from popalign_core.models.flow_adapter import FlowAdapter

    comp_kw = {k: kwargs.pop(k) for k in ("t5", "guidance_embeds") if k in kwargs}
    comps = get_dummy_flow_components(family, seed, **comp_kw)
    encs, toks = encoders_of(comps, family)
    kwargs.setdefault("native_size", TINY_IMAGE_SIZE)
    return FlowAdapter(comps["transformer"], comps["vae"], encs, toks, comps["scheduler"], family, **kwargs)
