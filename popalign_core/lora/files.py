"""LoRA creation (peft) and the two on-disk LoRA layouts: diffusers and kohya.

    from popalign_core.lora.files import LoraSpec, add_lora, save_lora, load_lora, lora_metadata, model_hash
    add_lora(adapter, LoraSpec(rank=8, alpha=8.0, text_encoder_targets=TEXT_ENCODER_TARGETS))
    ...train...
    save_lora(adapter, "out/lora.safetensors", format="kohya", metadata=lora_metadata(loss="popalign", ...))
    load_lora(fresh_adapter, "out/lora.safetensors")       # format detected from the keys

`adapter` is anything with `.unet`, `.text_encoders` (a list) and `.family` ("sd15", "sd2", "sdxl"), e.g.
`popalign_core.models.diffusers_adapter.DiffusersAdapter`. LoRA lives on the diffusers UNet (`unet.add_adapter`) and,
optionally, on each transformers CLIP text encoder (`add_adapter`); `adapter.reference()` disables it.

In-memory layout ("peft" keys, the layout of diffusers' files): `unet.<module>.lora_A.weight` (the "down"
matrix, [r, in] or [r, in, kh, kw]) and `.lora_B.weight` (the "up" matrix, [out, r] or [out, r, 1, 1]), likewise
`text_encoder.` / `text_encoder_2.`; the effective weight is W + (alpha / r) * B @ A. Text-encoder module names are
written in their canonical form `text_model.encoder.layers.N...`: transformers 5's `CLIPTextModel` has dropped the
`text_model.` level (its `CLIPTextModelWithProjection` still has it); readers (diffusers, ComfyUI, this module) all
accept the canonical form. Per-module alphas travel beside the tensors as `network_alphas`,
`{"<prefix>.<module>.alpha": float}` (diffusers' own convention for kohya alphas).

Formats (`LORA_FORMATS`):
- "diffusers": a folder holding `pytorch_lora_weights.safetensors`, as `StableDiffusion(XL)Pipeline.save_lora_weights`
  writes it; `pipe.load_lora_weights(folder)` loads it. alpha != rank is carried the way diffusers' own training
  scripts carry it: the safetensors metadata key `lora_adapter_metadata` holds a JSON object of prefixed `LoraConfig`
  kwargs (`"unet.r"`, `"unet.lora_alpha"`, `"unet.target_modules"`, ...), which `diffusers.loaders.lora_base`
  (`_fetch_state_dict` -> `_load_sft_state_dict_metadata`) reads and `diffusers.utils.peft_utils._create_lora_config`
  turns into the `LoraConfig` (diffusers >= 0.34, PR #11324; older versions ignore it and assume alpha == rank).
- "kohya": one `.safetensors` with `lora_unet_<module path, "." -> "_">.lora_down.weight` / `.lora_up.weight` /
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

Metadata (safetensors str -> str) written by `save_lora`: popalign_version, lora_format, family, lora_rank,
lora_alpha, lora_unet_targets / lora_text_encoder_targets (JSON lists), kohya's ss_network_module / ss_network_dim /
ss_network_alpha / ss_base_model_version / ss_v2 (kohya files), format="pt" and lora_adapter_metadata (diffusers
files), plus the caller's entries, e.g. from `lora_metadata` (loss, hyperparameters as JSON, base_model_hash,
data_hash).

Saves are atomic: tensors go to a uniquely named temporary file beside the destination, which `os.replace` then moves
onto the final name, so an interrupted save never leaves a partial file under the final name; `save_lora_formats`
writes several layouts as one step (`fileio.publish_together`). Reading (`read_lora`) names a damaged or truncated
file and says what to do (`fileio.CorruptFileError`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from popalign_core.models.adapter import FAMILIES

__all__ = [
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
]

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # attention + MLP
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

# component prefix (peft / diffusers layout) -> index into adapter.text_encoders (None = the UNet)
_COMPONENTS = {"unet": None, "text_encoder": 0, "text_encoder_2": 1}
_PEFT_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_B)\.weight$")
_KOHYA_KEY = re.compile(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_TEXT_MODEL = "text_model."
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
    }
)  # fmt: skip
_MAX_SEGMENT_TOKENS = max(s.count("_") + 1 for s in _SEGMENTS)


# ------------------------------------------------------------------------------------------------------ formats
@dataclass(frozen=True)
class LoraFormat:
    """An on-disk LoRA layout. `is_folder`: the path names a folder (diffusers) rather than one file (kohya)."""

    name: str
    description: str
    is_folder: bool


LORA_FORMATS = {
    "diffusers": LoraFormat(
        "diffusers",
        f"diffusers/peft layout: a folder with {DIFFUSERS_WEIGHT_NAME} (unet./text_encoder. lora_A/lora_B keys); "
        "for diffusers' load_lora_weights",
        is_folder=True,
    ),
    "kohya": LoraFormat(
        "kohya",
        "kohya/A1111 layout: one .safetensors (lora_unet_/lora_te_ lora_down/lora_up/alpha keys); "
        "for ComfyUI's LoraLoader, A1111/Forge and diffusers",
        is_folder=False,
    ),
}


def _check_format(format: str) -> None:
    if format not in LORA_FORMATS:
        raise ValueError(f"format={format!r} is not supported; valid values: {', '.join(LORA_FORMATS)}")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not supported; valid values: {', '.join(FAMILIES)}")


# ------------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class LoraSpec:
    """What LoRA to add.

    rank / alpha: LoRA rank r and alpha; the update is scaled by alpha / r (alpha == rank: scale 1).
    unet_targets: UNet module names or name suffixes (peft `target_modules` list semantics: a module matches a
        target when its name equals it or ends with "." + target), e.g. ("to_q", "to_k", "to_v", "to_out.0") for
        attention; None = no UNet LoRA.
    text_encoder_targets: the same for the text encoder(s), e.g. `TEXT_ENCODER_TARGETS` (attention + MLP); each
        encoder gets the targets it has (every target must exist in at least one); None = no text-encoder LoRA.
        ComfyUI applies text-encoder LoRA only to q/k/v/out_proj and fc1/fc2.
    init_lora_weights: True = peft's default (A random, B = 0: the LoRA starts as a no-op); False = peft's
        "no init" (both A and B keep torch's default layer init: a random, non-zero LoRA); "gaussian" = A and B both
        drawn from N(0, (1/r)^2) with torch's global RNG (a non-zero LoRA, e.g. for tests; unlike peft's "gaussian",
        which keeps B = 0).
    dropout: LoRA dropout probability (peft `lora_dropout`), in [0, 1).
    """

    rank: int = 4
    alpha: float = 4.0
    unet_targets: tuple[str, ...] | None = UNET_ATTENTION_TARGETS
    text_encoder_targets: tuple[str, ...] | None = None
    init_lora_weights: bool | str = True
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r}: expected a positive int")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r}: expected a positive number")
        for field_name in ("unet_targets", "text_encoder_targets"):
            value = getattr(self, field_name)
            if value is None:
                continue
            if isinstance(value, str) or not all(isinstance(t, str) and t for t in value) or not len(value):
                raise ValueError(
                    f"{field_name}={value!r}: expected None or a non-empty tuple of module names, e.g. ('to_q',)"
                )
            object.__setattr__(self, field_name, tuple(value))
        if self.unet_targets is None and self.text_encoder_targets is None:
            raise ValueError("unet_targets / text_encoder_targets: both are None, so there is nothing to adapt")
        init = self.init_lora_weights
        if not (init is True or init is False or init == "gaussian"):
            raise ValueError(f"init_lora_weights={init!r} is not supported; valid values: True, False, 'gaussian'")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout={self.dropout!r}: expected a probability in [0, 1)")


# ------------------------------------------------------------------------------------------------------ helpers
def _components(adapter) -> dict[str, torch.nn.Module]:
    """{"unet": unet, "text_encoder": te1[, "text_encoder_2": te2]} of an adapter."""
    out = {"unet": adapter.unet}
    for prefix, idx in _COMPONENTS.items():
        if idx is not None and idx < len(adapter.text_encoders):
            out[prefix] = adapter.text_encoders[idx]
    return out


def _lora_layers(module: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Module]:
    """{module name (without peft's `.base_layer`): peft LoRA layer} for the layers holding `adapter_name`."""
    from peft.tuners.lora import LoraLayer

    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, LoraLayer) and adapter_name in getattr(m, "lora_A", {})
    }


def _target_matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _supported_layers(module: torch.nn.Module) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        n
        for n, m in module.named_modules()
        if isinstance(m, _SUPPORTED_LAYERS)
        and ".base_layer" not in n
        and ".lora_" not in n
        and not isinstance(m, BaseTunerLayer)
    ] + [n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]


def _short_name(name: str) -> str:
    """Shortest useful suffix of a module path: its last segment, or the last two when the last is an index."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _check_rank(rank: int, comps: Mapping[str, torch.nn.Module], plan: Mapping[str, list]) -> None:
    """A rank above the largest one any targeted layer can use (min of its input and output width) only allocates
    memory: refuse it before any weight is created, naming the layer."""
    widest = 0
    for prefix, targets in plan.items():
        for name, m in comps[prefix].named_modules():
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and any(_target_matches(name, t) for t in targets):
                n_in = m.in_features if isinstance(m, torch.nn.Linear) else m.in_channels
                n_out = m.out_features if isinstance(m, torch.nn.Linear) else m.out_channels
                widest = max(widest, min(n_in, n_out))
    if widest and rank > widest:
        raise ValueError(
            f"lora_rank={rank} is invalid: the targeted layers are at most {widest} wide (a rank above that adds "
            f"nothing but memory); use a rank <= {widest}"
        )


def _match_targets(modules: Mapping[str, torch.nn.Module], targets: tuple[str, ...], what: str) -> dict[str, list]:
    """{component: the targets that match one of its Linear/Conv2d modules}; components matching none are left out.

    ValueError (listing available names) when a target matches no module in any of `modules`.
    """
    names = {p: _supported_layers(m) for p, m in modules.items()}
    for prefix, module in modules.items():
        supported = set(names[prefix])
        other = [
            n
            for n, _ in module.named_modules()
            if n not in supported and ".base_layer" not in n and ".lora_" not in n
            and any(_target_matches(n, t) for t in targets)
        ]  # fmt: skip
        if other:
            raise ValueError(
                f"{what}: {prefix} module(s) {other[:3]} match a target but are not Linear/Conv2d layers, which LoRA "
                "(and the kohya format) needs; name the layers inside them, e.g. 'to_out.0' rather than 'to_out'"
            )
    matched = {p: [t for t in targets if any(_target_matches(n, t) for n in ns)] for p, ns in names.items()}
    missing = [t for t in targets if not any(t in m for m in matched.values())]
    if missing:
        available = sorted({_short_name(n) for ns in names.values() for n in ns})
        raise ValueError(
            f"{what}: target(s) {', '.join(repr(t) for t in missing)} match no Linear/Conv2d module of "
            f"{' or '.join(modules)}; available module names (suffixes) include: {', '.join(available[:40])}"
            + (f", ... ({len(available)} in all)" if len(available) > 40 else "")
        )
    return {p: t for p, t in matched.items() if t}


def _freeze_base(adapter, adapter_name: str) -> None:
    """requires_grad only on the LoRA A/B weights of `adapter_name` (UNet, text encoders, VAE all frozen)."""
    modules = [m for m in (adapter.unet, *adapter.text_encoders, getattr(adapter, "vae", None)) if m is not None]
    for m in modules:
        m.requires_grad_(False)
    for m in modules:
        for layer in _lora_layers(m, adapter_name).values():
            layer.lora_A[adapter_name].weight.requires_grad_(True)
            layer.lora_B[adapter_name].weight.requires_grad_(True)


def _add_adapter(module: torch.nn.Module, config, adapter_name: str) -> None:
    """diffusers' `ModelMixin.add_adapter` / transformers' `PreTrainedModel.add_adapter` (both inject peft layers)."""
    module.add_adapter(config, adapter_name=adapter_name)


def _has_adapter(module: torch.nn.Module, adapter_name: str) -> bool:
    return adapter_name in (getattr(module, "peft_config", None) or {}) or bool(_lora_layers(module, adapter_name))


# ------------------------------------------------------------------------------------------------------ add
def add_lora(adapter, spec: LoraSpec, adapter_name: str = "default") -> dict[str, int]:
    """Add a peft LoRA to `adapter.unet` (and to each text encoder when `spec.text_encoder_targets` is set).

    Base weights (UNet, text encoders, VAE) are frozen: afterwards only this LoRA's A/B weights require grad, so
    `adapter.trainable_parameters()` returns exactly them. The new adapter becomes the active one.
    Returns {component: number of LoRA layers added}.
    """
    from peft import LoraConfig

    if not isinstance(spec, LoraSpec):
        raise TypeError(f"spec: expected a LoraSpec, got {type(spec).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r}: expected a non-empty str")
    comps = _components(adapter)
    # validate everything before touching any model
    plan = {}
    if spec.unet_targets is not None:
        plan.update(_match_targets({"unet": comps["unet"]}, spec.unet_targets, "unet_targets"))
    if spec.text_encoder_targets is not None:
        encoders = {p: m for p, m in comps.items() if p != "unet"}
        # a target may exist in one encoder only (e.g. SDXL's text_encoder_2.text_projection)
        plan.update(_match_targets(encoders, spec.text_encoder_targets, "text_encoder_targets"))
    for prefix in plan:
        if _has_adapter(comps[prefix], adapter_name):
            raise ValueError(f"adapter_name={adapter_name!r}: {prefix} already has a LoRA of that name")
    _check_rank(spec.rank, comps, plan)

    peft_init = True if spec.init_lora_weights == "gaussian" else spec.init_lora_weights
    counts = {}
    for prefix, targets in plan.items():
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=float(spec.alpha),
            target_modules=list(targets),
            lora_dropout=float(spec.dropout),
            init_lora_weights=peft_init,
        )
        _add_adapter(comps[prefix], config, adapter_name)
        layers = _lora_layers(comps[prefix], adapter_name)
        with torch.no_grad():  # trainable weights in float32 whatever the base's storage dtype (as peft's autocast)
            for layer in layers.values():
                for sub in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
                    if sub.weight.dtype in (torch.float16, torch.bfloat16):
                        sub.float()
        if spec.init_lora_weights == "gaussian":
            with torch.no_grad():
                for layer in layers.values():
                    torch.nn.init.normal_(layer.lora_A[adapter_name].weight, std=1.0 / spec.rank)
                    torch.nn.init.normal_(layer.lora_B[adapter_name].weight, std=1.0 / spec.rank)
        counts[prefix] = len(layers)
    _freeze_base(adapter, adapter_name)
    return counts


# ------------------------------------------------------------------------------------------------------ state dicts
def _canonical_te(module: str) -> str:
    """Text-encoder module path with the `text_model.` level that transformers 4 / kohya / ComfyUI names have."""
    if module.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        return _TEXT_MODEL + module
    return module  # already canonical, or outside text_model (e.g. CLIPTextModelWithProjection.text_projection)


def get_lora_state_dict(adapter, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(state_dict, network_alphas) of one LoRA, in the peft/diffusers layout (see the module docstring).

    Tensors are `.detach().cpu()` of the live weights (no copy on CPU: clone them before changing the model if they
    must not change); text-encoder names are canonical (`text_model.` included). Raises ValueError when the adapter
    holds no LoRA called `adapter_name`.
    """
    sd, alphas = {}, {}
    for prefix, module in _components(adapter).items():
        for name, layer in sorted(_lora_layers(module, adapter_name).items()):
            if layer.use_dora.get(adapter_name, False) or getattr(layer, "lora_bias", {}).get(adapter_name, False):
                raise ValueError(f"{prefix}.{name}: DoRA / LoRA-bias layers are not supported by these formats")
            if getattr(layer, "use_rslora", {}).get(adapter_name, False):
                raise ValueError(f"{prefix}.{name}: rsLoRA scaling is not supported by these formats")
            key = f"{prefix}.{_canonical_te(name) if prefix != 'unet' else name}"
            sd[f"{key}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().cpu()
            sd[f"{key}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().cpu()
            alphas[f"{key}.alpha"] = float(layer.lora_alpha[adapter_name])
    if not sd:
        raise ValueError(f"adapter_name={adapter_name!r}: the adapter has no LoRA layers of that name")
    return sd, alphas


def _group_peft(sd: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """{(prefix, module): {"lora_A": A, "lora_B": B}}; ValueError on stray keys or half pairs."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = collections.defaultdict(dict)
    bad = []
    for key, value in sd.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            bad.append(key)
            continue
        groups[(m.group(1), m.group(2))][m.group(3)] = value
    if bad:
        raise ValueError(
            f"state dict: {len(bad)} key(s) are not peft LoRA keys "
            f"('<unet|text_encoder|text_encoder_2>.<module>.lora_A|lora_B.weight'), e.g. {bad[:3]}"
        )
    half = [f"{p}.{m}" for (p, m), ab in groups.items() if set(ab) != {"lora_A", "lora_B"}]
    if half:
        raise ValueError(f"state dict: module(s) with only one of lora_A / lora_B: {half[:5]}")
    return dict(groups)


def _kohya_prefixes(family: str) -> dict[str, str]:
    if family == "sdxl":
        return {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    return {"unet": "lora_unet", "text_encoder": "lora_te"}


def peft_to_kohya(
    sd: Mapping[str, torch.Tensor], family: str, network_alphas: Mapping[str, float] | float | None = None
) -> dict[str, torch.Tensor]:
    """peft/diffusers-layout LoRA state dict -> kohya layout (pure; tensors are passed through, not copied).

    network_alphas: {"<prefix>.<module>.alpha": alpha} (as `get_lora_state_dict` / `kohya_to_peft` return), one
    alpha for every module, or None (alpha = rank: scale 1). Text-encoder names get the `text_model.` level
    kohya/ComfyUI names have, whether or not `sd` has it. The `.alpha` entries are 0-dim float32 tensors.
    """
    _check_family(family)
    prefixes = _kohya_prefixes(family)
    out = {}
    for (prefix, module), ab in _group_peft(sd).items():
        if prefix not in prefixes:
            raise ValueError(f"state dict has {prefix}.* keys, which family={family!r} has no component for")
        a, b = ab["lora_A"], ab["lora_B"]
        if isinstance(network_alphas, int | float):
            alpha = float(network_alphas)
        elif network_alphas is None:
            alpha = float(a.shape[0])
        else:
            alpha = network_alphas.get(f"{prefix}.{module}.alpha")
            if alpha is None and prefix != "unet":
                alpha = network_alphas.get(f"{prefix}.{_canonical_te(module)}.alpha")
            alpha = float(a.shape[0]) if alpha is None else float(alpha)
        name = _canonical_te(module) if prefix != "unet" else module
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
    _check_family(family)
    te1 = "text_encoder"
    to_prefix = {"lora_unet": "unet", "lora_te": te1, "lora_te1": te1, "lora_te2": "text_encoder_2"}
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
            f"('lora_<unet|te|te1|te2>_<module>.lora_down.weight|lora_up.weight|alpha'; LoCon mid / LoHa / LoKr / "
            f"DoRA are not supported), e.g. {bad[:3]}"
        )
    out, alphas = {}, {}
    for base, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"state dict: {base} lacks lora_down.weight or lora_up.weight")
        m = re.match(r"^(lora_unet|lora_te1|lora_te2|lora_te)_(.+)$", base)
        kohya_prefix, underscored = m.group(1), m.group(2)
        prefix = to_prefix[kohya_prefix]
        if prefix == "text_encoder_2" and family != "sdxl":
            raise ValueError(
                f"state dict has {kohya_prefix}_* keys (text_encoder_2), which family={family!r} has no component for"
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


# ------------------------------------------------------------------------------------------------------ metadata
def model_hash(module) -> str:
    """sha256 (hex) over a model's base (non-LoRA) weights: each state-dict entry's name, dtype, shape and bytes.

    `module`: an nn.Module, a sequence of them, or an adapter (its UNet then its text encoders). peft wrapping is
    ignored (`.base_layer` dropped from names, LoRA tensors skipped), so the hash is the same with or without a
    LoRA. Cost: one streamed pass over every weight byte, one tensor at a time (each is copied to the CPU if it is
    not there): about 1-2 s per GB on a CPU core (SD1.5 UNet + text encoder in fp32 ~ 4 GB: several seconds), no
    extra memory beyond the largest tensor. Compute it once per base model, not at every save.
    """
    if hasattr(module, "unet") and hasattr(module, "text_encoders"):
        modules = [module.unet, *module.text_encoders]
    elif isinstance(module, torch.nn.Module):
        modules = [module]
    else:
        modules = list(module)
        if not modules or not all(isinstance(m, torch.nn.Module) for m in modules):
            raise ValueError("module: expected an nn.Module, a non-empty sequence of them, or an adapter")
    h = hashlib.sha256()
    for i, mod in enumerate(modules):
        for name, t in mod.state_dict(keep_vars=True).items():
            if ".lora_" in name or name.startswith("lora_"):
                continue
            name = name.replace(".base_layer.", ".")
            t = t.detach()
            h.update(f"{i}:{name}:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}\n".encode())
            if t.numel():
                flat = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
                h.update(memoryview(flat.numpy()))
    return h.hexdigest()


def lora_metadata(
    *,
    loss: str | None = None,
    hyperparameters: Mapping | None = None,
    base_model_hash: str | None = None,
    data_hash: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """Training provenance as safetensors metadata (str -> str), to pass to `save_lora(..., metadata=...)`.

    loss: loss name (e.g. a key of `popalign_core.train.losses.LOSSES`); hyperparameters: JSON-serialisable mapping,
    stored as a sorted JSON string; base_model_hash: `model_hash(...)` of the base model; data_hash: a hash of the
    training data; extra: more str values. `save_lora` itself adds popalign_version, the format, family and the
    LoRA's rank / alpha / targets.
    """
    meta = {}
    if loss is not None:
        meta["loss"] = str(loss)
    if hyperparameters is not None:
        if not isinstance(hyperparameters, Mapping):
            raise ValueError(f"hyperparameters: expected a mapping, got {type(hyperparameters).__name__}")
        try:
            meta["hyperparameters"] = json.dumps(dict(hyperparameters), sort_keys=True)
        except TypeError as e:
            raise ValueError(f"hyperparameters: not JSON-serialisable ({e})") from None
    if base_model_hash is not None:
        meta["base_model_hash"] = str(base_model_hash)
    if data_hash is not None:
        meta["data_hash"] = str(data_hash)
    for k, v in extra.items():
        if not isinstance(v, str):
            raise ValueError(f"{k}={v!r}: metadata values must be str")
        meta[k] = v
    return meta


def _most_common(values: Iterable) -> float:
    return collections.Counter(values).most_common(1)[0][0]


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _compact_targets(model: torch.nn.Module, adapter_name: str) -> list[str]:
    """The shortest target list (peft list semantics) that selects exactly the modules holding the LoRA.

    Candidates: the peft config's `target_modules` (the `LoraSpec` targets after `add_lora`), the modules' short
    names; else the full module paths (text-encoder paths without "text_model.", which suffix matching finds with or
    without that level).
    """
    names = set(_lora_layers(model, adapter_name))
    candidates = []
    cfg = (getattr(model, "peft_config", None) or {}).get(adapter_name)
    if cfg is not None and cfg.target_modules and not isinstance(cfg.target_modules, str):
        candidates.append(sorted(cfg.target_modules))
    candidates.append(sorted({_short_name(n) for n in names}))
    layers = _supported_layers(model)
    exact = [c for c in candidates if {n for n in layers if any(_target_matches(n, t) for t in c)} == names]
    return min(exact, key=len) if exact else sorted(n.removeprefix(_TEXT_MODEL) for n in names)


def _base_metadata(adapter, sd, alphas, format: str, adapter_name: str) -> dict[str, str]:
    from popalign_core import __version__

    groups = _group_peft(sd)
    ranks = [ab["lora_A"].shape[0] for ab in groups.values()]
    comps = _components(adapter)
    targets = {p: _compact_targets(comps[p], adapter_name) for p in {p for p, _ in groups}}
    te_targets = next((targets[p] for p in ("text_encoder", "text_encoder_2") if p in targets), None)
    rank, alpha = int(_most_common(ranks)), float(_most_common(alphas.values()))
    meta = {
        "popalign_version": __version__,
        "lora_format": format,
        "family": adapter.family,
        "lora_rank": str(rank),
        "lora_alpha": _fmt_number(alpha),
        "lora_unet_targets": json.dumps(targets.get("unet")),
        "lora_text_encoder_targets": json.dumps(te_targets),
    }
    if format == "kohya":
        version = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[adapter.family]
        if adapter.family == "sd2" and getattr(adapter, "prediction_type", "epsilon") == "v_prediction":
            version += "_v"  # kohya's get_model_version_str_for_sd1_sd2
        meta.update(
            ss_network_module="networks.lora",
            ss_network_dim=str(rank),
            ss_network_alpha=_fmt_number(alpha),
            ss_base_model_version=version,
            ss_v2=str(adapter.family == "sd2"),
        )
    return meta


def _diffusers_adapter_metadata(adapter, sd, alphas, adapter_name: str) -> dict:
    """diffusers' `lora_adapter_metadata` object: prefixed `LoraConfig` kwargs per component (see module doc)."""
    out = {}
    comps = _components(adapter)
    by_prefix: dict[str, dict[str, tuple[int, float]]] = collections.defaultdict(dict)
    for (prefix, module), ab in _group_peft(sd).items():
        by_prefix[prefix][module] = (int(ab["lora_A"].shape[0]), float(alphas[f"{prefix}.{module}.alpha"]))
    for prefix, mods in by_prefix.items():
        # names as a model matches them: UNet paths as-is; text-encoder paths without "text_model." (peft's
        # suffix match then finds them with or without that level)
        names = {(m.removeprefix(_TEXT_MODEL) if prefix != "unet" else m): ra for m, ra in mods.items()}
        r = int(_most_common(v[0] for v in names.values()))
        alpha = float(_most_common(v[1] for v in names.values()))
        out.update(
            {
                f"{prefix}.r": r,
                f"{prefix}.lora_alpha": alpha,
                f"{prefix}.target_modules": _compact_targets(comps[prefix], adapter_name),
                f"{prefix}.rank_pattern": {re.escape(n): v[0] for n, v in sorted(names.items()) if v[0] != r},
                f"{prefix}.alpha_pattern": {re.escape(n): v[1] for n, v in sorted(names.items()) if v[1] != alpha},
            }
        )
    return out


# ------------------------------------------------------------------------------------------------------ save / read
def _check_metadata(metadata: Mapping[str, str] | None) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata: expected a str -> str mapping, got {type(metadata).__name__}")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"metadata: keys and values must be str (safetensors metadata); offending keys: {bad}")
    reserved = {"format", DIFFUSERS_METADATA_KEY} & set(metadata)
    if reserved:
        raise ValueError(f"metadata: key(s) {sorted(reserved)} are reserved for the file format")


def _check_target(path: str, format: str) -> None:
    if format == "kohya":
        if not path.endswith(".safetensors"):
            raise ValueError(f"path={path!r}: format 'kohya' writes one file, whose name must end in .safetensors")
        if os.path.isdir(path):
            raise ValueError(f"path={path!r} is a folder; format 'kohya' needs a file path")
    elif os.path.isfile(path):
        raise ValueError(f"path={path!r} is a file; format 'diffusers' needs a folder path")


def lora_file_contents(
    adapter, format: str = "kohya", metadata: Mapping[str, str] | None = None, adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of the adapter's LoRA `adapter_name` in layout `format` (see `save_lora`)."""
    _check_format(format)
    _check_metadata(metadata)
    sd, alphas = get_lora_state_dict(adapter, adapter_name)
    meta = dict(metadata or {})
    meta.update(_base_metadata(adapter, sd, alphas, format, adapter_name))
    tensors = {k: v.contiguous() for k, v in sd.items()}
    if format == "kohya":
        ignored = sorted(
            k.removesuffix(".lora_A.weight")
            for k in sd
            if k.startswith("text_encoder") and k.endswith(".lora_A.weight") and not _COMFY_TE_MODULE.match(k)
        )
        if ignored:
            warnings.warn(
                f"save_lora: ComfyUI's LoraLoader applies text-encoder LoRA only to q/k/v/out_proj and fc1/fc2 of the "
                f"encoder layers; it will skip {len(ignored)} module(s), e.g. {ignored[:3]}",
                stacklevel=3,
            )
        tensors = peft_to_kohya(tensors, adapter.family, alphas)
    else:
        meta["format"] = "pt"
        peft_kwargs = _diffusers_adapter_metadata(adapter, sd, alphas, adapter_name)
        meta[DIFFUSERS_METADATA_KEY] = json.dumps(peft_kwargs, indent=2, sort_keys=True)  # as diffusers writes it
    return tensors, meta


def save_lora(
    adapter,
    path: str | os.PathLike,
    format: str = "kohya",
    metadata: Mapping[str, str] | None = None,
    adapter_name: str = "default",
) -> str:
    """Save the adapter's LoRA `adapter_name` atomically; returns the written file's path.

    format "kohya": `path` is the .safetensors file (ComfyUI: put it in models/loras/); "diffusers": `path` is a
    folder (created if needed) that receives `pytorch_lora_weights.safetensors`. metadata: extra str -> str
    entries (see `lora_metadata`); popalign_version, lora_format, family, lora_rank, lora_alpha and the targets are
    always written (and for kohya the ss_* keys kohya-trained LoRAs carry). Files get ordinary permissions (0644
    under the usual umask). Several layouts at once, as one step: `save_lora_formats`.
    """
    from popalign_core.common.fileio import save_safetensors

    _check_format(format)
    path = os.fspath(path)
    _check_metadata(metadata)
    _check_target(path, format)
    tensors, meta = lora_file_contents(adapter, format, metadata, adapter_name)
    if format == "kohya":
        target = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)
        target = os.path.join(path, DIFFUSERS_WEIGHT_NAME)
    save_safetensors(tensors, target, meta)
    return target


def save_lora_formats(
    adapter,
    targets: Mapping[str, str | os.PathLike],
    metadata: Mapping[str, str] | None = None,
    adapter_name: str = "default",
) -> dict[str, str]:
    """Save the LoRA in several layouts ({format: path}, paths as in `save_lora`, all in one folder) as one step
    (`fileio.publish_together`): after a kill at any point, the next writer's start leaves either all old or all new
    files, never a mix of two steps. Returns {format: written file}."""
    import safetensors.torch

    from popalign_core.common.fileio import publish_together

    _check_metadata(metadata)
    paths = {fmt: os.fspath(p) for fmt, p in targets.items()}
    for fmt, p in paths.items():
        _check_format(fmt)
        _check_target(p, fmt)
    folders = {os.path.realpath(os.path.dirname(p) or ".") for p in paths.values()}  # as the system finds it
    if len(folders) != 1:
        raise ValueError(f"save_lora_formats: every target must be in one folder, got {sorted(folders)}")
    written = {}
    with publish_together(folders.pop()) as st:
        for fmt, p in paths.items():
            tensors, meta = lora_file_contents(adapter, fmt, metadata, adapter_name)
            tmp = st.stage(p)
            if fmt == "kohya":
                safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
                written[fmt] = p
            else:
                tmp.mkdir()
                safetensors.torch.save_file(tensors, str(tmp / DIFFUSERS_WEIGHT_NAME), metadata=meta)
                written[fmt] = os.path.join(p, DIFFUSERS_WEIGHT_NAME)
    return written


def _detect_format(keys: list[str]) -> str | None:
    for name, pattern in (("kohya", _KOHYA_KEY), ("diffusers", _PEFT_KEY)):
        matched = [k for k in keys if pattern.match(k)]
        if matched and len(matched) == len(keys):
            return name
        if matched:
            other = [k for k in keys if not pattern.match(k)]
            raise ValueError(
                f"a {name}-layout LoRA with {len(other)} key(s) of unsupported kinds (e.g. {other[:3]}); supported: "
                "plain LoRA down/up (A/B) weights and alphas (not LoCon mid, LoHa, LoKr, DoRA, LoRA bias)"
            )
    return None


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(state_dict, metadata, format) of a LoRA file, or of a folder holding `pytorch_lora_weights.safetensors`
    (or exactly one .safetensors). Only safetensors are read (no pickle). The format ("diffusers" or "kohya") is
    detected from the keys; ValueError when the keys are neither, `fileio.CorruptFileError` for a damaged file.
    """
    from popalign_core.common.fileio import read_safetensors

    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, DIFFUSERS_WEIGHT_NAME)):
            path = os.path.join(path, DIFFUSERS_WEIGHT_NAME)
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(files) != 1:
                raise ValueError(
                    f"path={path!r}: folder holds no {DIFFUSERS_WEIGHT_NAME} and {len(files)} .safetensors files "
                    f"({files[:5]}); name the file"
                )
            path = os.path.join(path, files[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file {path!r} does not exist")
    sd, metadata = read_safetensors(
        path,
        "LoRA file",
        "re-export it (re-running `popalign train` with the same output folder writes it again from "
        "its last checkpoint) or choose another LoRA",
    )
    fmt = _detect_format(list(sd))
    if fmt is None:
        lora_like = [k for k in sd if "lora" in k.lower()]
        raise ValueError(
            f"path={path!r}: no recognised LoRA keys ({len(sd)} tensors, {len(lora_like)} with 'lora' in the name, "
            f"e.g. {list(sd)[:3]}); valid formats: {', '.join(LORA_FORMATS)} ('<unet|text_encoder>.<module>."
            "lora_A|lora_B.weight' or 'lora_<unet|te|te1|te2>_<module>.lora_down|lora_up.weight|alpha')"
        )
    return sd, metadata, fmt


# ------------------------------------------------------------------------------------------------------ load
def _alphas_from_diffusers_metadata(sd, metadata: Mapping[str, str]) -> dict[str, float]:
    """Per-module alphas of a diffusers-layout file: from `lora_adapter_metadata` when present, else alpha = rank."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    cfg = json.loads(raw) if raw else {}
    alphas = {}
    for (prefix, module), ab in _group_peft(sd).items():
        r = int(ab["lora_A"].shape[0])
        if f"{prefix}.r" not in cfg and f"{prefix}.lora_alpha" not in cfg:
            alphas[f"{prefix}.{module}.alpha"] = float(r)
            continue
        if cfg.get(f"{prefix}.use_rslora") or cfg.get(f"{prefix}.use_dora"):
            raise ValueError(f"{prefix}: rsLoRA / DoRA LoRAs are not supported")
        alpha = float(cfg.get(f"{prefix}.lora_alpha", cfg.get(f"{prefix}.r", r)))
        for pattern, value in (cfg.get(f"{prefix}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):  # peft's get_pattern_key rule
                alpha = float(value)
                break
        alphas[f"{prefix}.{module}.alpha"] = alpha
    return alphas


def _module_resolver(comps: Mapping[str, torch.nn.Module]) -> Callable[[str, str], str]:
    cache: dict[str, dict[str, str]] = {}

    def resolve(prefix: str, underscored: str) -> str:
        if prefix not in comps:
            return _resolve_by_vocabulary(underscored)
        if prefix not in cache:
            names = {}
            for n in _supported_layers(comps[prefix]):
                canonical = n if prefix == "unet" else _canonical_te(n)
                names[canonical.replace(".", "_")] = canonical
            cache[prefix] = names
        return cache[prefix].get(underscored) or _resolve_by_vocabulary(underscored)

    return resolve


def load_lora(adapter, path: str | os.PathLike, adapter_name: str = "default") -> dict[str, str]:
    """Load a LoRA file (format detected from its keys) into `adapter` as `adapter_name`; returns the metadata.

    When a component has no LoRA of that name yet, its LoRA layers are created with the file's ranks, alphas and
    modules; when it has one, it must cover the same modules with the same ranks, and its weights and alphas are
    overwritten (e.g. to resume training). Base weights are frozen as in `add_lora`; the LoRA is active.
    Everything is checked before any model is changed.
    """
    from peft import LoraConfig

    sd, metadata, fmt = read_lora(path)
    comps = _components(adapter)
    if fmt == "kohya":
        sd, alphas = _kohya_to_peft(sd, adapter.family, _module_resolver(comps))
    else:
        alphas = _alphas_from_diffusers_metadata(sd, metadata)

    # plan: {prefix: {actual module name: (A, B, alpha)}}, all checked before anything changes
    plan: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = collections.defaultdict(dict)
    for (prefix, module), ab in _group_peft(sd).items():
        if prefix not in comps:
            raise ValueError(
                f"{path!s}: the LoRA has {prefix}.* weights but family {adapter.family!r} has no {prefix}"
            )
        plan[prefix][module] = (ab["lora_A"], ab["lora_B"], alphas[f"{prefix}.{module}.alpha"])
    for prefix, mods in list(plan.items()):
        model = comps[prefix]
        existing = dict(model.named_modules())
        resolved = {}
        for module, value in mods.items():
            name = module
            if name not in existing and prefix != "unet" and name.startswith(_TEXT_MODEL):
                name = name.removeprefix(_TEXT_MODEL)
            elif name not in existing and prefix != "unet":
                name = _TEXT_MODEL + name
            target = existing.get(name)
            base = getattr(target, "base_layer", target)
            if not isinstance(base, _SUPPORTED_LAYERS):
                raise ValueError(
                    f"{path!s}: LoRA module {prefix}.{module} is not a Linear/Conv2d module of this {prefix} "
                    f"(is the file for another model family or architecture than {adapter.family!r}?)"
                )
            a, b, _ = value
            w = base.weight
            expect_a = (a.shape[0], *w.shape[1:]) if isinstance(base, torch.nn.Conv2d) else (a.shape[0], w.shape[1])
            expect_b = (
                (w.shape[0], a.shape[0], 1, 1) if isinstance(base, torch.nn.Conv2d) else (w.shape[0], a.shape[0])
            )
            if tuple(a.shape) != expect_a or tuple(b.shape) != expect_b:
                raise ValueError(
                    f"{path!s}: {prefix}.{module}: LoRA shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit the "
                    f"layer's weight {tuple(w.shape)} (expected {expect_a} / {expect_b})"
                )
            resolved[name] = value
        plan[prefix] = resolved
    for prefix, model in comps.items():
        layers = _lora_layers(model, adapter_name)
        if not layers and not _has_adapter(model, adapter_name):
            continue
        if prefix not in plan:
            raise ValueError(
                f"adapter_name={adapter_name!r}: {prefix} already has a LoRA of that name but the file has none "
                f"for {prefix}; load into a fresh adapter or use another adapter_name"
            )
        same_ranks = set(layers) == set(plan[prefix]) and all(
            layers[n].r[adapter_name] == v[0].shape[0] for n, v in plan[prefix].items()
        )
        if not same_ranks:
            raise ValueError(
                f"adapter_name={adapter_name!r}: {prefix} already has a LoRA of that name on other modules or ranks "
                "than the file's; load into a fresh adapter or use another adapter_name"
            )

    for prefix, mods in plan.items():
        model = comps[prefix]
        if not _lora_layers(model, adapter_name):
            ranks = {n: int(v[0].shape[0]) for n, v in mods.items()}
            alpha_of = {n: float(v[2]) for n, v in mods.items()}
            r, alpha = int(_most_common(ranks.values())), float(_most_common(alpha_of.values()))
            config = LoraConfig(
                r=r,
                lora_alpha=alpha,
                target_modules=sorted(mods),
                rank_pattern={f"^{re.escape(n)}": v for n, v in ranks.items() if v != r},
                alpha_pattern={f"^{re.escape(n)}": v for n, v in alpha_of.items() if v != alpha},
            )
            _add_adapter(model, config, adapter_name)
        layers = _lora_layers(model, adapter_name)
        with torch.no_grad():
            for name, (a, b, alpha) in mods.items():
                layer = layers[name]
                layer.lora_A[adapter_name].weight.copy_(a)
                layer.lora_B[adapter_name].weight.copy_(b)
                layer.lora_alpha[adapter_name] = alpha
                layer.set_scale(adapter_name, 1.0)
        if hasattr(model, "set_adapter"):
            model.set_adapter(adapter_name)
    _freeze_base(adapter, adapter_name)
    return metadata
