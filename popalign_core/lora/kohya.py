"""The kohya LoRA layout and its conversion to and from the peft / diffusers layout (pure functions on state dicts).

Layout: one `.safetensors` with `lora_unet_<module path, "." -> "_">.lora_down.weight` / `.lora_up.weight` /
`.alpha` and `lora_te_text_model_encoder_layers_N_...` (SD1.5 / SD2) or `lora_te1_...` / `lora_te2_...` (SDXL).
This is what ComfyUI's `LoraLoader` reads (`comfy/lora.py`: `model_lora_keys_unet` maps `lora_unet_` + the
diffusers key from `comfy.utils.unet_to_diffusers` with dots replaced; `model_lora_keys_clip` maps
`lora_te_` / `lora_te1_` / `lora_te2_` + `text_model_encoder_layers_{b}_{self_attn_q_proj|...|mlp_fc2}` for
q/k/v/out_proj and fc1/fc2 of layers 0-31 only; the patch is W += strength * alpha / down.shape[0] * up @ down,
flattened and reshaped to W, so conv LoRA (e.g. SD1.5's 1x1 conv `proj_in`) keeps peft's 4-D shapes).
ComfyUI takes alpha only from the `.alpha` tensors (never from metadata) and does not read the "diffusers"
layout's peft names for UNet attention (it expects `...attn1.processor.to_q`), so "kohya" is the ComfyUI format.
diffusers' `load_lora_weights` reads it too (`_convert_non_diffusers_lora_to_diffusers`; with one alpha for all
modules: its per-module UNet alpha patterns do not match, diffusers 0.42.1).

Flow families (SD3, FLUX): `lora_transformer_<diffusers transformer path, "." -> "_">` (OneTrainer's names) and
`lora_te1_` / `lora_te2_` for CLIP-L / CLIP-G (SD3) or `lora_te1_` for CLIP-L (FLUX), with lora_down / lora_up /
alpha as above. ComfyUI 0.3.75 maps these (`model_lora_keys_unet`: for `model_base.SD3` every key of
`comfy.utils.mmdit_to_diffusers`, for `model_base.Flux` of `comfy.utils.flux_to_diffusers`, as
`lora_transformer_` + the diffusers key with "." -> "_"; also `transformer.<diffusers key>`). Its own models keep
q/k/v fused, so the diffusers modules map onto slices (weight, (dim, offset, length)) of one weight, and the patch
is added to that slice only:

| diffusers module (block i) | SD3 (`diffusion_model.joint_blocks.i.`), offset h = 64·depth | FLUX, h = hidden_size |
|---|---|---|
| attn.to_q / to_k / to_v | x_block.attn.qkv rows [0, h) / [h, 2h) / [2h, 3h) | double_blocks.i.img_attn.qkv, same |
| attn.add_q_proj / add_k_proj / add_v_proj | context_block.attn.qkv, same rows | double_blocks.i.txt_attn.qkv, same |
| attn.to_out.0 / attn.to_add_out | x_block.attn.proj / context_block.attn.proj | img_attn.proj / txt_attn.proj |
| attn2.to_q/k/v, attn2.to_out.0 (SD3.5) | x_block.attn2.qkv slices / x_block.attn2.proj | - |
| single_transformer_blocks.i.attn.to_q/k/v | - | single_blocks.i.linear1 rows [0, h) / [h, 2h) / [2h, 3h) |
| single_transformer_blocks.i.proj_mlp / proj_out | - | linear1 rows [3h, 7h) / linear2 |

Since each diffusers module's LoRA patches its own slice, per-module files are exact (no rank-3r merge into a fused
qkv LoRA, as kohya's `lora_unet_double_blocks_i_img_attn_qkv` names would need). diffusers'
`FluxPipeline.load_lora_weights` reads this layout too (`_convert_kohya_flux_lora_to_diffusers`, attention
modules); `StableDiffusion3Pipeline` reads only the "diffusers" layout.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Mapping

import torch

from popalign_core.lora.inject import _canonical_te, _group_peft, _is_te, lora_components
from popalign_core.models.families import FAMILIES, check_family, is_flow

__all__ = ["kohya_to_peft", "peft_to_kohya"]

_KOHYA_KEY = re.compile(
    r"^(lora_unet|lora_transformer|lora_te1|lora_te2|lora_te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
_KOHYA_BASE = re.compile(r"^(lora_unet|lora_transformer|lora_te1|lora_te2|lora_te)_(.+)$")
# the text-encoder modules ComfyUI's model_lora_keys_clip maps (LORA_CLIP_MAP, layers 0-31)
_COMFY_TE_MODULE = re.compile(
    r"^text_encoder(_2)?\.text_model\.encoder\.layers\.([0-9]|[12][0-9]|3[01])\."
    r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))\.lora_A\.weight$"
)
_SUPPORTED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)

# Module-path segments that contain "_" in diffusers UNet2DConditionModel and transformers CLIP names; used to turn
# kohya's "_"-joined names back into dotted paths when no model is at hand (greedy longest match).
_SEGMENTS = frozenset(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
        "time_embedding", "linear_1", "linear_2", "add_embedding", "class_embedding", "encoder_hid_proj",
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1",
        "layer_norm2", "token_embedding", "position_embedding", "text_projection",
        # SD3 / FLUX transformers
        "single_transformer_blocks", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp",
        "ff_context", "norm1_context", "norm_out", "context_embedder", "x_embedder", "time_text_embed",
        "timestep_embedder", "text_embedder", "guidance_embedder", "pos_embed",
    }
)  # fmt: skip
_MAX_SEGMENT_TOKENS = max(s.count("_") + 1 for s in _SEGMENTS)


def _kohya_prefixes(family: str) -> dict[str, str]:
    """{peft component prefix: kohya prefix} of a family (`inject.lora_components`)."""
    if is_flow(family):
        names = {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
        return {p: names[p] for p in lora_components(family)}
    if family == "sdxl":
        return {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    return {"unet": "lora_unet", "text_encoder": "lora_te"}


def _readable_prefixes(family: str) -> set[str]:
    """The kohya prefixes a family's files may have: its own, and `lora_te_` / `lora_te1_` alike for the first text
    encoder (as ComfyUI reads them)."""
    return set(_kohya_prefixes(family).values()) | {"lora_te", "lora_te1"}


def peft_to_kohya(
    sd: Mapping[str, torch.Tensor], family: str, network_alphas: Mapping[str, float] | float | None = None
) -> dict[str, torch.Tensor]:
    """peft/diffusers-layout LoRA state dict -> kohya layout (pure; tensors are passed through, not copied).

    network_alphas: {"<prefix>.<module>.alpha": alpha} (as `get_lora_state_dict` / `kohya_to_peft` return), one
    alpha for every module, or None (alpha = rank: scale 1). Text-encoder names get the `text_model.` level
    kohya/ComfyUI names have, whether or not `sd` has it. The `.alpha` entries are 0-dim float32 tensors.
    """
    check_family(family)
    prefixes = _kohya_prefixes(family)
    out = {}
    for (prefix, module), ab in _group_peft(sd).items():
        if prefix not in prefixes:
            raise ValueError(
                f"state dict has {prefix}.* keys, which family={family!r} has no component for (components: "
                f"{', '.join(prefixes)})"
            )
        a, b = ab["lora_A"], ab["lora_B"]
        if isinstance(network_alphas, int | float):
            alpha = float(network_alphas)
        elif network_alphas is None:
            alpha = float(a.shape[0])
        else:
            alpha = network_alphas.get(f"{prefix}.{module}.alpha")
            if alpha is None and _is_te(prefix):
                alpha = network_alphas.get(f"{prefix}.{_canonical_te(module)}.alpha")
            alpha = float(a.shape[0]) if alpha is None else float(alpha)
        name = _canonical_te(module) if _is_te(prefix) else module
        base = f"{prefixes[prefix]}_{name.replace('.', '_')}"
        out[f"{base}.lora_down.weight"] = a
        out[f"{base}.lora_up.weight"] = b
        out[f"{base}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _resolve_by_vocabulary(underscored: str) -> str:
    """ "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" -> "down_blocks.0.attentions.0...to_out.0"."""
    tokens = underscored.split("_")
    parts, i = [], 0
    while i < len(tokens):
        for n in range(min(_MAX_SEGMENT_TOKENS, len(tokens) - i), 0, -1):
            seg = "_".join(tokens[i : i + n])
            if n == 1 or seg in _SEGMENTS:
                parts.append(seg)
                i += n
                break
    return ".".join(parts)


def _kohya_to_peft(
    sd: Mapping[str, torch.Tensor], family: str, resolve: Callable[[str, str], str]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    check_family(family)
    te1 = "text_encoder"
    to_prefix = {"lora_unet": "unet", "lora_transformer": "transformer", "lora_te": te1, "lora_te1": te1,
                 "lora_te2": "text_encoder_2"}  # fmt: skip
    valid = _readable_prefixes(family)
    groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    bad = []
    for key, value in sd.items():
        m = _KOHYA_KEY.match(key)
        if m is None:
            bad.append(key)
            continue
        groups[f"{m.group(1)}_{m.group(2)}"][m.group(3)] = value
    if bad:
        raise ValueError(
            f"state dict: {len(bad)} key(s) are not kohya LoRA keys "
            f"('lora_<unet|transformer|te|te1|te2>_<module>.lora_down.weight|lora_up.weight|alpha'; LoCon mid / "
            f"LoHa / LoKr / DoRA are not supported), e.g. {bad[:3]}"
        )
    out, alphas = {}, {}
    for base, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"state dict: {base} lacks lora_down.weight or lora_up.weight")
        m = _KOHYA_BASE.match(base)
        kohya_prefix, underscored = m.group(1), m.group(2)
        prefix = to_prefix[kohya_prefix]
        if kohya_prefix not in valid:
            raise ValueError(
                f"state dict has {kohya_prefix}_* keys ({prefix}), which family={family!r} has no component for: a "
                f"LoRA for {' / '.join(f for f in FAMILIES if kohya_prefix in _readable_prefixes(f))}, not for "
                f"{family!r}"
            )
        module = resolve(prefix, underscored)
        down = parts["lora_down.weight"]
        key = f"{prefix}.{module}"
        out[f"{key}.lora_A.weight"] = down
        out[f"{key}.lora_B.weight"] = parts["lora_up.weight"]
        alphas[f"{key}.alpha"] = float(parts["alpha"].item()) if "alpha" in parts else float(down.shape[0])
    return out, alphas


def kohya_to_peft(sd: Mapping[str, torch.Tensor], family: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya-layout LoRA state dict -> (peft/diffusers-layout state dict, network_alphas) (pure).

    Module paths are rebuilt from the "_"-joined names with a vocabulary of diffusers UNet / CLIP segment names
    (`load_lora` resolves against the actual model instead). `lora_te_` and `lora_te1_` both mean the first text
    encoder (as in ComfyUI); a missing `.alpha` means alpha = rank. Text-encoder names come back canonical
    (`text_model.` included).
    """
    return _kohya_to_peft(sd, family, lambda prefix, underscored: _resolve_by_vocabulary(underscored))
