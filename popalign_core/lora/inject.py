"""LoRA creation (peft): inject a LoRA into an adapter's UNet and text encoders, and read its weights back.

    from popalign_core.lora.inject import LoraSpec, add_lora, get_lora_state_dict
    add_lora(adapter, LoraSpec(rank=8, alpha=8.0, text_encoder_targets=TEXT_ENCODER_TARGETS))
    ...train...
    sd, network_alphas = get_lora_state_dict(adapter)   # then `lora.files.save_lora` writes it

`adapter` is anything with `.unet`, `.text_encoders` (a list) and `.family` ("sd15", "sd2", "sdxl"), e.g.
`popalign_core.models.diffusers_adapter.DiffusersAdapter`. LoRA lives on the diffusers UNet (`unet.add_adapter`) and,
optionally, on each transformers CLIP text encoder (`add_adapter`); `adapter.reference()` disables it.

In-memory layout ("peft" keys, the layout of diffusers' files): `unet.<module>.lora_A.weight` (the "down"
matrix, [r, in] or [r, in, kh, kw]) and `.lora_B.weight` (the "up" matrix, [out, r] or [out, r, 1, 1]), likewise
`text_encoder.` / `text_encoder_2.`; the effective weight is W + (alpha / r) * B @ A. Text-encoder module names are
written in their canonical form `text_model.encoder.layers.N...`: transformers 5's `CLIPTextModel` has dropped the
`text_model.` level (its `CLIPTextModelWithProjection` still has it); readers (diffusers, ComfyUI, this package) all
accept the canonical form. Per-module alphas travel beside the tensors as `network_alphas`,
`{"<prefix>.<module>.alpha": float}` (diffusers' own convention for kohya alphas).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["LoraSpec", "TEXT_ENCODER_TARGETS", "UNET_ATTENTION_TARGETS", "add_lora", "get_lora_state_dict"]

UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # attention + MLP

# component prefix (peft / diffusers layout) -> index into adapter.text_encoders (None = the UNet)
_COMPONENTS = {"unet": None, "text_encoder": 0, "text_encoder_2": 1}
_PEFT_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_B)\.weight$")
_TEXT_MODEL = "text_model."
_SUPPORTED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


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
