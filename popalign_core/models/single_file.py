"""Diffusers components -> original (LDM / "single file") checkpoint layout, and a safetensors writer.

`to_original_state_dict` is the inverse of diffusers' single-file conversion (`diffusers.loaders.single_file_utils`):
a checkpoint written by `save_single_file` loads back with `popalign_core.models.loading.load_model` (or diffusers'
`from_single_file`; for SDXL models whose two text encoders have the same width, as in the tiny test models, only
with `load_model`: diffusers' whole-pipeline loader then fills encoder 2 from encoder 1) to bit-identical weights,
and its key names are the ones the original Stable Diffusion repositories, A1111 and ComfyUI use:

- UNet -> ``model.diffusion_model.*`` (``input_blocks`` / ``middle_block`` / ``output_blocks``, built from the
  module structure, so any number of levels, res blocks or transformer depths works, with or without a mid block);
- VAE -> ``first_stage_model.*`` (mid-block attention q/k/v/proj_out as 1x1 convolutions, as in the original);
- text encoders:

  - sd15: ``cond_stage_model.transformer.text_model.*`` (HF CLIP layout, as in the original checkpoints);
  - sd2: ``cond_stage_model.model.*`` (OpenCLIP layout: ``transformer.resblocks.N`` with merged ``in_proj``);
  - sdxl: ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L) and ``conditioner.embedders.1.model.*``
    (OpenCLIP bigG, ``text_projection`` stored transposed, as OpenCLIP does).

SD2 specifics (documented choices): the original OpenCLIP ViT-H text tower has one more residual block than the
23-layer `CLIPTextModel` diffusers uses (SD2 conditions on the penultimate block, so diffusers drops the last one).
It is written here as an all-zero block: with zero weights a pre-norm residual block is an exact identity, so the
full OpenCLIP tower's last-layer output equals diffusers' ``last_hidden_state`` and its penultimate output (what SD2
and ComfyUI use) is untouched. `CLIPTextModel` has no ``text_projection`` either; the identity is written (the value
ComfyUI initialises it to; SD2 never uses the pooled output). ``logit_scale`` (present in OpenCLIP state dicts, unused
by diffusion) is written as ln(100) for sd2 and sdxl.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from popalign_core.common.fileio import atomic_path
from popalign_core.models.adapter import UNET_FAMILIES, check_family
from popalign_core.models.loading import DTYPES

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {"sd15": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPENCLIP_PREFIXES = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}
OPENCLIP_LOGIT_SCALE = math.log(100.0)

_UNET_DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
_UNET_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
_UNET_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers ResnetBlock2D sub-module -> LDM ResBlock sub-module
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# diffusers Attention (VAE mid block) -> LDM AttnBlock; legacy diffusers names (query/key/value/proj_attn) too
_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
# HF CLIP encoder layer -> OpenCLIP residual block (q/k/v are merged separately)
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _state_dict(module_or_sd) -> dict[str, torch.Tensor]:
    sd = dict(module_or_sd) if isinstance(module_or_sd, Mapping) else module_or_sd.state_dict()
    adapter_keys = [k for k in sd if ".base_layer." in k or ".lora_" in k]
    if adapter_keys:
        raise ValueError(
            f"the model holds peft adapter weights (e.g. {adapter_keys[0]}): merge them first "
            "(e.g. model.merge_and_unload() or unet.fuse_lora()), the original layout has no place for them"
        )
    return sd


def _config(module) -> Mapping:
    cfg = getattr(module, "config", None)
    if cfg is None:
        raise TypeError(f"expected a diffusers model with a .config, got {type(module).__name__}")
    return cfg


def _apply_module_map(
    sd: Mapping[str, torch.Tensor], module_map: dict[str, tuple[str, dict[str, str] | None]], what: str
) -> dict[str, torch.Tensor]:
    """Rename `sd` keys by their longest module-path prefix found in `module_map`.

    module_map: diffusers module path -> (LDM module path, optional sub-module renames applied to the remainder).
    Keys under no mapped module raise a ValueError naming them (an unsupported feature, never silently dropped).
    """
    out, unmapped = {}, []
    for key, value in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            src = ".".join(parts[:cut])
            if src in module_map:
                dst, inner = module_map[src]
                rest = ".".join(parts[cut:])
                if inner is not None:
                    head, _, tail = rest.rpartition(".")  # sub-module path, parameter name
                    if head not in inner:
                        unmapped.append(key)
                        break
                    rest = f"{inner[head]}.{tail}"
                out[f"{dst}.{rest}"] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        shown = ", ".join(unmapped[:8]) + (f", ... ({len(unmapped)} in all)" if len(unmapped) > 8 else "")
        raise ValueError(f"{what}: no original-layout name for parameter(s) {shown}")
    return out


# --------------------------------------------------------------------------------------------------------------- UNet
def unet_module_map(unet) -> dict[str, tuple[str, dict[str, str] | None]]:
    """diffusers module path -> (LDM module path, sub-module renames) for a `UNet2DConditionModel`.

    Built from the model's own structure (res blocks per level, attentions, samplers), following the LDM
    `UNetModel` numbering: ``input_blocks.0`` is conv_in; each (res block, transformer) pair of a level, then
    its downsampler, takes the next ``input_blocks.N``; ``middle_block`` is res, transformer, res; each up-level
    layer takes the next ``output_blocks.N``, with the upsampler appended to the level's last layer.
    """
    cfg = _config(unet)
    for name, value, valid in (
        ("down_block_types", cfg.down_block_types, _UNET_DOWN_TYPES),
        ("up_block_types", cfg.up_block_types, _UNET_UP_TYPES),
        ("mid_block_type", (cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn"),), _UNET_MID_TYPES),
    ):
        bad = [v for v in value if v not in valid]
        if bad:
            raise ValueError(
                f"unet.config.{name}: {bad} cannot be written in the original layout; valid values: {valid}"
            )
    if cfg.get("class_embed_type") not in (None, "projection", "timestep") or cfg.get("encoder_hid_dim_type"):
        raise ValueError(
            "unet.config: class_embed_type must be None, 'projection' or 'timestep' and encoder_hid_dim_type None "
            "for the original layout"
        )

    m: dict[str, tuple[str, dict[str, str] | None]] = {
        "conv_in": ("input_blocks.0.0", None),
        "time_embedding.linear_1": ("time_embed.0", None),
        "time_embedding.linear_2": ("time_embed.2", None),
        "add_embedding.linear_1": ("label_emb.0.0", None),
        "add_embedding.linear_2": ("label_emb.0.2", None),
        "class_embedding.linear_1": ("label_emb.0.0", None),
        "class_embedding.linear_2": ("label_emb.0.2", None),
        "conv_norm_out": ("out.0", None),
        "conv_out": ("out.2", None),
    }
    n = 1
    for b, block in enumerate(unet.down_blocks):
        attns = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            m[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{n}.0", _UNET_RESNET)
            if attns is not None:
                m[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{n}.1", None)
            n += 1
        if block.downsamplers is not None:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{n}.0.op", None)
            n += 1

    mid = unet.mid_block
    if mid is not None:
        idx = 0
        for j, _ in enumerate(mid.resnets):
            if j > 0:
                m[f"mid_block.attentions.{j - 1}"] = (f"middle_block.{idx}", None)
                idx += 1
            m[f"mid_block.resnets.{j}"] = (f"middle_block.{idx}", _UNET_RESNET)
            idx += 1

    n = 0
    for b, block in enumerate(unet.up_blocks):
        attns = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            m[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{n}.0", _UNET_RESNET)
            sub = 1
            if attns is not None:
                m[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{n}.1", None)
                sub = 2
            if j == len(block.resnets) - 1 and block.upsamplers is not None:
                m[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{n}.{sub}.conv", None)
            n += 1
    return m


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel -> LDM `UNetModel` state dict (no ``model.diffusion_model.`` prefix)."""
    return _apply_module_map(_state_dict(unet), unet_module_map(unet), "unet")


# ---------------------------------------------------------------------------------------------------------------- VAE
def vae_module_map(vae) -> dict[str, tuple[str, dict[str, str] | None]]:
    """diffusers module path -> (LDM module path, sub-module renames) for an `AutoencoderKL`."""
    cfg = _config(vae)
    m: dict[str, tuple[str, dict[str, str] | None]] = {}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", None)
        m[f"{part}.conv_out"] = (f"{part}.conv_out", None)
        m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", None)
        coder = getattr(vae, part)
        for j, _ in enumerate(coder.mid_block.resnets):
            m[f"{part}.mid_block.resnets.{j}"] = (f"{part}.mid.block_{j + 1}", _VAE_RESNET)
        for j, attn in enumerate(coder.mid_block.attentions or []):
            if attn is not None:
                m[f"{part}.mid_block.attentions.{j}"] = (f"{part}.mid.attn_{j + 1}", _VAE_ATTN)
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        if block.downsamplers is not None:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", None)
    n_up = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = n_up - 1 - i  # LDM numbers decoder levels like the encoder's (0 = full resolution), runs them reversed
        for j in range(len(block.resnets)):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        if block.upsamplers is not None:
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", None)
    if cfg.get("use_quant_conv", True):
        m["quant_conv"] = ("quant_conv", None)
    if cfg.get("use_post_quant_conv", True):
        m["post_quant_conv"] = ("post_quant_conv", None)
    return m


def vae_to_original(vae) -> dict[str, torch.Tensor]:
    """AutoencoderKL -> LDM `AutoencoderKL` state dict (no ``first_stage_model.`` prefix).

    The mid-block attention's q/k/v/proj_out are linear layers in diffusers and 1x1 convolutions in the original:
    their 2-D weights are reshaped to [C, C, 1, 1].
    """
    out = _apply_module_map(_state_dict(vae), vae_module_map(vae), "vae")
    for key, value in out.items():
        if ".mid.attn_" in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            if value.ndim == 2:
                out[key] = value.reshape(*value.shape, 1, 1)
            elif value.ndim == 3:
                out[key] = value.unsqueeze(-1)
    return out


# ------------------------------------------------------------------------------------------------------ text encoders
def _hf_clip_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """HF CLIP text-model state dict with keys normalised to the ``text_model.*`` form of original checkpoints.

    transformers >= 5.6 flattened `CLIPTextModel` (keys ``embeddings.*``, ``encoder.*``, ``final_layer_norm.*``);
    `CLIPTextModelWithProjection` keeps ``text_model.*`` plus ``text_projection.weight``. Both forms are accepted.
    """
    out = {}
    for key, value in _state_dict(text_encoder).items():
        if key.startswith(("text_model.", "text_projection.")):
            out[key] = value
        else:
            out[f"text_model.{key}"] = value
    return out


def clip_to_original(text_encoder) -> dict[str, torch.Tensor]:
    """CLIPTextModel -> original CLIP-L layout (``text_model.*``; a text projection, unused by SD, is dropped)."""
    sd = _hf_clip_state_dict(text_encoder)
    return {k: v for k, v in sd.items() if k.startswith("text_model.")}


def openclip_to_original(text_encoder, extra_block: bool = False) -> dict[str, torch.Tensor]:
    """CLIPTextModel(WithProjection) -> OpenCLIP text-tower layout (no prefix).

    extra_block: append one all-zero residual block (SD2: the original tower has one block more than diffusers'
    model; an all-zero pre-norm block is an exact identity). A missing ``text_projection`` is written as identity.
    """
    sd = _hf_clip_state_dict(text_encoder)
    out: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, value in sd.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            idx, rest = key[len("text_model.encoder.layers.") :].split(".", 1)
            layers.setdefault(int(idx), {})[rest] = value
        elif key != "text_model.embeddings.position_ids":
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"text encoder: no OpenCLIP name for parameter(s) {', '.join(unmapped)}")
    for idx in sorted(layers):
        p = layers[idx]
        base = f"transformer.resblocks.{idx}."
        for kind in ("weight", "bias"):
            qkv = [p.pop(f"self_attn.{n}_proj.{kind}", None) for n in ("q", "k", "v")]
            if all(t is not None for t in qkv):
                out[base + f"attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
            elif any(t is not None for t in qkv):
                raise ValueError(f"text encoder layer {idx}: q/k/v {kind}s are incomplete")
        for rest, value in p.items():
            head, _, tail = rest.rpartition(".")
            if head not in _OPENCLIP_LAYER:
                raise ValueError(f"text encoder layer {idx}: no OpenCLIP name for {rest!r}")
            out[base + f"{_OPENCLIP_LAYER[head]}.{tail}"] = value
    if extra_block and layers:
        last = max(layers)
        src, dst = f"transformer.resblocks.{last}.", f"transformer.resblocks.{last + 1}."
        for key in [k for k in out if k.startswith(src)]:
            out[dst + key[len(src) :]] = torch.zeros_like(out[key])
    if "text_projection" not in out:
        width = out["token_embedding.weight"].shape[1]
        ref = out["token_embedding.weight"]
        out["text_projection"] = torch.eye(width, dtype=ref.dtype, device=ref.device)
    ref = out["token_embedding.weight"]
    out["logit_scale"] = torch.tensor(OPENCLIP_LOGIT_SCALE, dtype=ref.dtype, device=ref.device)
    return out


# --------------------------------------------------------------------------------------------------------------- API
def _required(family: str) -> list[str]:
    return ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])


def to_original_state_dict(components: Mapping, family: str) -> dict[str, torch.Tensor]:
    """Diffusers components -> one original-layout (LDM single-file) state dict.

    components: mapping with ``unet`` (UNet2DConditionModel), ``vae`` (AutoencoderKL), ``text_encoder``
    (CLIPTextModel) and, for sdxl, ``text_encoder_2`` (CLIPTextModelWithProjection) -- the layout of
    `popalign_core.models.tiny.get_dummy_components` or a pipeline's ``components``; other entries are ignored.
    family: "sd15", "sd2" or "sdxl" (selects the text-encoder layout).
    Tensors are shared with the models where no reshaping is needed (no copy); see the module docstring for the
    SD2 text-encoder choices.
    """
    check_family(family, UNET_FAMILIES, "models.single_file (flow families: models.flow_single_file)")
    missing = [name for name in _required(family) if components.get(name) is None]
    if missing:
        raise ValueError(f"components: missing {', '.join(missing)} (needed for family {family!r})")
    out: dict[str, torch.Tensor] = {}
    out.update({UNET_PREFIX + k: v for k, v in unet_to_original(components["unet"]).items()})
    out.update({VAE_PREFIX + k: v for k, v in vae_to_original(components["vae"]).items()})
    if family == "sd15":
        te = clip_to_original(components["text_encoder"])
        out.update({CLIP_PREFIXES["sd15"] + k: v for k, v in te.items()})
    elif family == "sd2":
        te = openclip_to_original(components["text_encoder"], extra_block=True)
        out.update({OPENCLIP_PREFIXES["sd2"] + k: v for k, v in te.items()})
    else:
        te = clip_to_original(components["text_encoder"])
        out.update({CLIP_PREFIXES["sdxl"] + k: v for k, v in te.items()})
        te2 = openclip_to_original(components["text_encoder_2"], extra_block=False)
        out.update({OPENCLIP_PREFIXES["sdxl"] + k: v for k, v in te2.items()})
    return out


def save_single_file(
    components: Mapping,
    family: str,
    path: str | os.PathLike,
    dtype: str = "fp32",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `components` as an original-layout single-file ``.safetensors`` checkpoint; returns the path.

    dtype: "fp32", "fp16" or "bf16" for floating-point tensors (integer buffers keep their dtype).
    The file is written atomically: to a temporary file in the same folder, then moved over `path` with
    `os.replace`, so a reader never sees a half-written checkpoint.
    """
    check_family(family, UNET_FAMILIES, "models.single_file (flow families: models.flow_single_file)")
    return write_checkpoint(lambda: to_original_state_dict(components, family), family, path, dtype, metadata)


def write_checkpoint(make_state_dict, family: str, path, dtype: str = "fp32", metadata: dict | None = None) -> Path:
    """Check `dtype` and `path` (before `make_state_dict()` builds the original-layout dict), cast floating-point
    tensors to `dtype`, and write them atomically with the metadata (format, popalign.family, `metadata`)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; valid values: {', '.join(DTYPES)}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path={str(path)!r}: a single-file checkpoint must end in .safetensors")
    from safetensors.torch import save_file

    tensors = {}
    for key, value in make_state_dict().items():
        value = value.detach()
        if value.is_floating_point():
            value = value.to(DTYPES[dtype])
        tensors[key] = value.to("cpu").contiguous()
    meta = {"format": "pt", "popalign.family": family}
    meta.update(metadata or {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
