"""Diffusers SD3 / FLUX components -> one original-layout single file (the layout `models.loading.load_model` and
ComfyUI's ``CheckpointLoaderSimple`` read), and a safetensors writer; `models.single_file` does the same for the
UNet families.

Key layout (ComfyUI 0.3.75, ``comfy/supported_models.py`` ``SD3`` / ``Flux``):

- transformer -> ``model.diffusion_model.*``: `models.loading_flow.transformer_layout`, built from the model's
  blocks, the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` /
  ``convert_flux_transformer_checkpoint_to_diffusers`` (fused q/k/v; FLUX single blocks: q/k/v and the MLP input in
  one ``linear1``; final modulation (shift, scale));
- VAE -> ``first_stage_model.*`` (SD3) / ``vae.*`` (FLUX), the LDM layout of `models.single_file.vae_to_original`;
- text encoders -> ``text_encoders.clip_l.transformer.*`` (``text_model.*``), ``text_encoders.clip_g.transformer.*``
  (SD3: ``text_model.*`` and ``text_projection.weight``), ``text_encoders.t5xxl.transformer.*`` (``shared.weight``
  and ``encoder.*``; the encoder's tied copy of the embedding is not written), when present.

SD3's CLIP-L projection is not written: diffusers' single-file loader sets it to the identity and ComfyUI uses the
unprojected pooled output, so a CLIP-L whose projection is not the identity cannot be written faithfully (an
error). Weights round-trip bit-identically through `load_model`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from popalign_core.models.families import FLOW_FAMILIES, check_family
from popalign_core.models.loading_flow import (
    T5_COMPONENT,
    TEXT_ENCODER_PREFIXES,
    TRANSFORMER_PREFIX,
    VAE_PREFIXES,
    layout_to_original,
    transformer_layout,
)
from popalign_core.models.single_file import _hf_clip_state_dict, vae_to_original, write_checkpoint


def transformer_to_original(transformer, family: str) -> dict[str, torch.Tensor]:
    """SD3Transformer2DModel / FluxTransformer2DModel -> original MMDiT / BFL state dict (no prefix)."""
    check_family(family, FLOW_FAMILIES, "a flow transformer")
    sd = {k: v for k, v in transformer.state_dict().items()}
    return layout_to_original(sd, transformer_layout(transformer, family))


def clip_to_flow_original(text_encoder, name: str, family: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> ``text_model.*`` [+ ``text_projection.weight`` for SD3's CLIP-G] (no prefix)."""
    sd = _hf_clip_state_dict(text_encoder)
    proj = sd.pop("text_projection.weight", None)
    if family == "sd3" and name == "text_encoder_2" and proj is not None:
        sd["text_projection.weight"] = proj
    if family == "sd3" and name == "text_encoder" and proj is not None:
        eye = torch.eye(proj.shape[0], proj.shape[1], dtype=proj.dtype, device=proj.device)
        if not torch.equal(proj, eye):
            raise ValueError(
                "text_encoder: SD3's CLIP-L text projection must be the identity (diffusers' single-file loader and "
                "ComfyUI use it unprojected); this one is not, so the file would not mean the same model"
            )
    return {k: v for k, v in sd.items() if k.startswith(("text_model.", "text_projection."))}


def t5_to_original(text_encoder) -> dict[str, torch.Tensor]:
    """T5EncoderModel -> ``shared.weight`` + ``encoder.*`` (ComfyUI's T5; the tied ``encoder.embed_tokens`` is
    dropped)."""
    return {k: v for k, v in text_encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}


def to_original_state_dict(components: Mapping, family: str) -> dict[str, torch.Tensor]:
    """Diffusers components -> one original-layout state dict (module docstring).

    components: ``transformer``, ``vae``, ``text_encoder`` (CLIP-L), sd3: ``text_encoder_2`` (CLIP-G) and optional
    ``text_encoder_3`` (T5); flux: ``text_encoder_2`` (T5) -- the keys of a diffusers pipeline's ``components`` or of
    `models.tiny_flow.get_dummy_flow_components`; tokenizers and scheduler are ignored.
    """
    check_family(family, FLOW_FAMILIES, "a flow single file (UNet families: models.single_file)")
    t5_name = T5_COMPONENT[family]
    required = ["transformer", "vae", *[n for n in TEXT_ENCODER_PREFIXES[family] if n != t5_name or family == "flux"]]
    missing = [n for n in required if components.get(n) is None]
    if missing:
        raise ValueError(f"components: missing {', '.join(missing)} (needed for family {family!r})")
    out = {TRANSFORMER_PREFIX + k: v for k, v in transformer_to_original(components["transformer"], family).items()}
    out.update({VAE_PREFIXES[family][0] + k: v for k, v in vae_to_original(components["vae"]).items()})
    for name, prefix in TEXT_ENCODER_PREFIXES[family].items():
        enc = components.get(name)
        if enc is None:
            continue
        sd = t5_to_original(enc) if name == t5_name else clip_to_flow_original(enc, name, family)
        out.update({prefix + k: v for k, v in sd.items()})
    return out


def save_single_file(
    components: Mapping,
    family: str,
    path: str | os.PathLike,
    dtype: str = "fp32",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `components` as an original-layout SD3 / FLUX ``.safetensors`` file (atomically); returns the path.

    dtype: "fp32", "fp16" or "bf16" for floating-point tensors.
    """
    check_family(family, FLOW_FAMILIES, "a flow single file (UNet families: models.single_file)")
    return write_checkpoint(lambda: to_original_state_dict(components, family), family, path, dtype, metadata)
