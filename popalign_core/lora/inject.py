"""LoRA creation (peft): inject a LoRA into an adapter's UNet and text encoders, and read its weights back.

    from popalign_core.lora.inject import LoraSpec, add_lora, get_lora_state_dict
    add_lora(adapter, LoraSpec(rank=8, alpha=8.0, text_encoder_targets=TEXT_ENCODER_TARGETS))
    ...train...
    sd, network_alphas = get_lora_state_dict(adapter)   # then `lora.files.save_lora` writes it

`adapter` is anything with `.unet`, `.text_encoders` (a list) and `.family` (a key of `models.families.FAMILY_SPECS`),
e.g. `popalign_core.models.diffusers_adapter.DiffusersAdapter` or, for SD3 / FLUX, `models.flow_adapter.FlowAdapter`
(whose `.unet` is the transformer). LoRA lives on the diffusers denoiser (`add_adapter`) and, optionally, on each
transformers CLIP text encoder (`add_adapter`; T5 never gets one: see `lora_components`); `adapter.reference()`
disables it. Default denoiser targets per family: `DEFAULT_UNET_TARGETS` (`LoraSpec(unet_targets="default")`).

In-memory layout ("peft" keys, the layout of diffusers' files): `<denoiser>.<module>.lora_A.weight` (the "down"
matrix, [r, in] or [r, in, kh, kw]) and `.lora_B.weight` (the "up" matrix, [out, r] or [out, r, 1, 1]), with
<denoiser> = `unet` for the UNet families and `transformer` for the flow families (the prefix diffusers'
`FluxPipeline` / `StableDiffusion3Pipeline.load_lora_weights` read), likewise `text_encoder.` / `text_encoder_2.`
(the CLIP encoders: SDXL and SD3 CLIP-L / CLIP-G, FLUX CLIP-L); the effective weight is W + (alpha / r) * B @ A.
Text-encoder module names are written in their canonical form `text_model.encoder.layers.N...`: transformers 5's
`CLIPTextModel` has dropped the `text_model.` level (its `CLIPTextModelWithProjection` still has it); readers
(diffusers, ComfyUI, this package) all accept the canonical form. Per-module alphas travel beside the tensors as
`network_alphas`, `{"<prefix>.<module>.alpha": float}` (diffusers' own convention for kohya alphas).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_UNET_TARGETS",
    "FLOW_ATTENTION_TARGETS",
    "LoraSpec",
    "TEXT_ENCODER_TARGETS",
    "UNET_ATTENTION_TARGETS",
    "add_lora",
    "denoiser_prefix",
    "get_lora_state_dict",
    "lora_components",
]

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: attention of both streams of an MMDiT / FLUX block (diffusers names): image q/k/v/out, text q/k/v/out. The same
#: names serve SD3 and FLUX, so both families share them: SD3's last joint block has no `to_add_out` (its text
#: stream is "pre only"), FLUX's single blocks only `to_q/k/v` (their output is `proj_out`, shared with the MLP);
#: defaults take the modules that exist. diffusers' SD3 LoRA trainer uses these eight; ComfyUI maps each onto its
#: fused qkv / proj weights (`lora.kohya`).
FLOW_ATTENTION_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)  # fmt: skip
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # attention + MLP
#: the denoiser targets `LoraSpec(unet_targets="default")` means, per family
DEFAULT_UNET_TARGETS = {
    "sd15": UNET_ATTENTION_TARGETS,
    "sd2": UNET_ATTENTION_TARGETS,
    "sdxl": UNET_ATTENTION_TARGETS,
    "sd3": FLOW_ATTENTION_TARGETS,
    "flux": FLOW_ATTENTION_TARGETS,
}
DEFAULT = "default"


def denoiser_targets(value) -> tuple[str, ...] | str:
    """A config's target list as `LoraSpec.unet_targets` takes it: ``["default"]`` (the configs' default) means the
    family's `DEFAULT_UNET_TARGETS`, anything else is the tuple of module names."""
    names = (value,) if isinstance(value, str) else tuple(value)
    return DEFAULT if names == (DEFAULT,) else names


_DENOISERS = ("unet", "transformer")
_PEFT_KEY = re.compile(r"^(unet|transformer|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_B)\.weight$")
_CLIP_ENCODERS = ("clip_l", "clip_g", "openclip_h")  # the text encoders LoRA may target (never T5)
_TEXT_MODEL = "text_model."
_SUPPORTED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


# ------------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class LoraSpec:
    """What LoRA to add.

    rank / alpha: LoRA rank r and alpha; the update is scaled by alpha / r (alpha == rank: scale 1).
    unet_targets: denoiser (UNet or flow transformer) module names or name suffixes (peft `target_modules` list
        semantics: a module matches a target when its name equals it or ends with "." + target), e.g. ("to_q",
        "to_k", "to_v", "to_out.0") for attention; "default" = the family's `DEFAULT_UNET_TARGETS` (those of them
        the model has); None = no denoiser LoRA.
    text_encoder_targets: the same for the CLIP text encoder(s), e.g. `TEXT_ENCODER_TARGETS` (attention + MLP);
        each encoder gets the targets it has (every target must exist in at least one); None = no text-encoder
        LoRA. ComfyUI applies text-encoder LoRA only to q/k/v/out_proj and fc1/fc2. T5 (SD3, FLUX) is never
        adapted.
    init_lora_weights: True = peft's default (A random, B = 0: the LoRA starts as a no-op); False = peft's
        "no init" (both A and B keep torch's default layer init: a random, non-zero LoRA); "gaussian" = A and B both
        drawn from N(0, (1/r)^2) with torch's global RNG (a non-zero LoRA, e.g. for tests; unlike peft's "gaussian",
        which keeps B = 0).
    dropout: LoRA dropout probability (peft `lora_dropout`), in [0, 1).
    """

    rank: int = 4
    alpha: float = 4.0
    unet_targets: tuple[str, ...] | str | None = DEFAULT
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
            if value is None or (field_name == "unet_targets" and value == DEFAULT):
                continue
            if isinstance(value, str) or not all(isinstance(t, str) and t for t in value) or not len(value):
                raise ValueError(
                    f"{field_name}={value!r}: expected None"
                    + (", 'default'" if field_name == "unet_targets" else "")
                    + " or a non-empty tuple of module names, e.g. ('to_q',)"
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
def denoiser_prefix(family: str) -> str:
    """The denoiser's key prefix in the peft / diffusers layout: "unet", or "transformer" for a flow family."""
    from popalign_core.models.families import is_flow

    return "transformer" if is_flow(family) else "unet"


def _is_te(prefix: str) -> bool:
    return prefix not in _DENOISERS


def lora_components(family: str) -> tuple[str, ...]:
    """The component prefixes a LoRA of `family` may have: the denoiser, then one per CLIP text encoder, named by
    its position in the pipeline (`text_encoder`, `text_encoder_2`); T5 (SD3's text_encoder_3, FLUX's
    text_encoder_2) is left out: ComfyUI's and diffusers' loaders expect no LoRA there from this layout."""
    from popalign_core.models.families import family_spec

    names = family_spec(family).text_encoders
    tes = tuple(
        "text_encoder" if k == 0 else f"text_encoder_{k + 1}" for k, n in enumerate(names) if n in _CLIP_ENCODERS
    )
    return (denoiser_prefix(family), *tes)


def _components(adapter) -> dict[str, torch.nn.Module]:
    """{denoiser prefix: unet/transformer, "text_encoder": te1[, "text_encoder_2": te2]} of an adapter (the CLIP
    encoders it holds; see `lora_components`)."""
    prefixes = lora_components(adapter.family)
    out = {prefixes[0]: adapter.unet}
    for prefix in prefixes[1:]:
        idx = 0 if prefix == "text_encoder" else int(prefix.rsplit("_", 1)[1]) - 1
        if idx < len(adapter.text_encoders) and adapter.text_encoders[idx] is not None:
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


def _denoiser_plan(targets, family: str, prefix: str, module: torch.nn.Module) -> dict[str, list]:
    """`_match_targets` for the denoiser; "default" = the family's `DEFAULT_UNET_TARGETS` that the model has."""
    if targets != DEFAULT:
        return _match_targets({prefix: module}, targets, "unet_targets")
    defaults = DEFAULT_UNET_TARGETS[family]
    layers = _supported_layers(module)
    present = tuple(t for t in defaults if any(_target_matches(n, t) for n in layers))
    return _match_targets({prefix: module}, present or defaults, f"unet_targets (the {family} default)")


# ------------------------------------------------------------------------------------------------------ add
def add_lora(adapter, spec: LoraSpec, adapter_name: str = "default") -> dict[str, int]:
    """Add a peft LoRA to `adapter.unet` (UNet or flow transformer) and to each CLIP text encoder when
    `spec.text_encoder_targets` is set.

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
    denoiser = denoiser_prefix(adapter.family)
    # validate everything before touching any model
    plan = {}
    if spec.unet_targets is not None:
        plan.update(_denoiser_plan(spec.unet_targets, adapter.family, denoiser, comps[denoiser]))
    if spec.text_encoder_targets is not None:
        encoders = {p: m for p, m in comps.items() if _is_te(p)}
        if not encoders:  # e.g. SD3 / FLUX in ComfyUI, whose prompts ComfyUI's own CLIP encodes
            raise ValueError("text_encoder_targets: this model adapter has no trainable text encoder"
                             + (f" ({adapter.no_text_encoder_reason})" if hasattr(adapter, "no_text_encoder_reason")
                                else ""))  # fmt: skip
        what = "text_encoder_targets" + (" (CLIP encoders only: T5 is never adapted)" if denoiser != "unet" else "")
        # a target may exist in one encoder only (e.g. SDXL's text_encoder_2.text_projection)
        plan.update(_match_targets(encoders, spec.text_encoder_targets, what))
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
                    if sub.weight.dtype != torch.float32 and sub.weight.is_floating_point():  # peft: base's dtype
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
            key = f"{prefix}.{_canonical_te(name) if _is_te(prefix) else name}"
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
            f"('<unet|transformer|text_encoder|text_encoder_2>.<module>.lora_A|lora_B.weight'), e.g. {bad[:3]}"
        )
    half = [f"{p}.{m}" for (p, m), ab in groups.items() if set(ab) != {"lora_A", "lora_B"}]
    if half:
        raise ValueError(f"state dict: module(s) with only one of lora_A / lora_B: {half[:5]}")
    return dict(groups)
