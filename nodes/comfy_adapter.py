"""The core's model adapter over ComfyUI's MODEL / CLIP / VAE (the only module of the pack that knows comfy internals).

`adapter_from_comfy(model, clip, vae)` returns a `popalign_core.models.diffusers_adapter.DiffusersAdapter` whose UNet,
text encoders and VAE are diffusers / transformers **views of ComfyUI's own weights**: each module is built on the
``meta`` device and filled with ``load_state_dict(..., assign=True)`` from the tensors of ComfyUI's modules, so the
two share every weight storage (no copy of the model). Everything the core does (losses, samplers, DAL, adjusted DFT)
then runs on the user's checkpoint exactly as in the standalone world, and `predict` is the raw eps / v prediction
(ComfyUI's ``apply_model`` returns the denoised x0 instead; tests check both against each other).

Why views: ComfyUI loads checkpoints under ``torch.inference_mode()``, so its weights are inference tensors that
cannot be saved for backward, and the 2024 ComfyUI UNet adds residuals in place after a LayerNorm saved its input,
which breaks backward through its own code. `make_weights_trainable` replaces each inference-tensor parameter of the
ComfyUI module, one at a time and outside inference mode, with an ordinary tensor of the same values: the memory
peak is the model plus its largest tensor, and other graph branches see identical weights. LoRA layers are injected
into the views only: ComfyUI's modules never get an extra layer.

The training schedule comes from ComfyUI's model sampling (sigma_t -> alphabar_t = 1 / (1 + sigma_t^2)), the
prediction type from the model type (EPS / V_PREDICTION), the family from the detected model config.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("popalign")

# ComfyUI model-config class name -> popalign family (the architecture is read from the model itself, so the
# distilled SDXL variants with fewer blocks work too)
COMFY_FAMILIES = {
    "SD15": "sd15",
    "SD20": "sd2",
    "SDXL": "sdxl",
    "SSD1B": "sdxl",
    "Segmind_Vega": "sdxl",
    "KOALA_700M": "sdxl",
    "KOALA_1B": "sdxl",
}
# ComfyUI 0.3.x flow model types (SD3, FLUX.1-dev / -schnell) -> family: nodes/comfy_flow.py wraps them
COMFY_FLOW_FAMILIES = {"SD3": "sd3", "Flux": "flux", "FluxSchnell": "flux"}
# family -> ComfyUI text-encoder attributes of CLIP.cond_stage_model, in the core's order
CLIP_ATTRS = {"sd15": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g")}
NATIVE_LATENT = {"sd15": 64, "sd2": 96, "sdxl": 128}


class UnsupportedModel(ValueError):
    """The MODEL / CLIP / VAE cannot be wrapped (type, prediction or layout): the message names what and why."""


# ------------------------------------------------------------------------------------------------------------ facts
def model_type_name(model) -> str:
    """ComfyUI model-config class name of a MODEL (ModelPatcher), e.g. 'SD15', 'SDXL'."""
    return type(model.model.model_config).__name__


def family_of(model) -> str:
    name = model_type_name(model)
    fam = COMFY_FAMILIES.get(name, COMFY_FLOW_FAMILIES.get(name))
    if fam is None:
        raise UnsupportedModel(
            f"model: ComfyUI model type {name!r} is not supported by PopAlign; supported types: "
            f"{', '.join([*COMFY_FAMILIES, *COMFY_FLOW_FAMILIES])} (Stable Diffusion 1.x, 2.x and SDXL-style UNets, "
            "SD3.x, FLUX.1)"
        )
    return fam


def prediction_type_of(model) -> str:
    """epsilon / v_prediction from the MODEL's model sampling: the class that defines ``calculate_denoised`` first in
    its MRO is the parameterisation (EPS, V_PREDICTION; a ModelSamplingDiscrete patch counts)."""
    ms = model_sampling(model)
    param = next((c for c in type(ms).__mro__ if "calculate_denoised" in vars(c)), type(ms))
    kinds = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}
    if param.__name__ not in kinds:
        raise UnsupportedModel(
            f"model: prediction type {param.__name__!r} of the {model_type_name(model)} model is not supported; "
            "PopAlign trains eps- and v-prediction models (EPS, V_PREDICTION)"
        )
    return kinds[param.__name__]


def model_sampling(model):
    """The MODEL's model sampling (object patches such as ModelSamplingDiscrete's override are honoured)."""
    patched = getattr(model, "object_patches", {}).get("model_sampling")
    return patched if patched is not None else model.model.model_sampling


def noise_scheduler_of(model):
    """A diffusers DDPMScheduler with ComfyUI's own training schedule (sigmas -> betas) and prediction type."""
    from diffusers import DDPMScheduler

    ms = model_sampling(model)
    sigmas = getattr(ms, "sigmas", None)
    if sigmas is None or sigmas.ndim != 1:
        raise UnsupportedModel(
            f"model: the {model_type_name(model)} model's sampling ({type(ms).__name__}) has no discrete sigma "
            "schedule; PopAlign needs a discrete-time (DDPM-style) model"
        )
    abar = 1.0 / (1.0 + sigmas.detach().double().cpu() ** 2)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = (1.0 - abar / prev).clamp(0.0, 0.999)
    return DDPMScheduler(
        num_train_timesteps=int(abar.numel()),
        trained_betas=betas.tolist(),
        prediction_type=prediction_type_of(model),
        clip_sample=False,
    )


# ------------------------------------------------------------------------------------------- inference tensors
@torch.inference_mode(False)
def make_weights_trainable(module: torch.nn.Module) -> int:
    """Replace every inference-tensor parameter / buffer of `module` by an ordinary tensor with the same values,
    one tensor at a time (peak: one extra tensor). Returns how many were replaced. Idempotent."""
    n = 0
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                n += 1
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()
                n += 1
    return n


def _assign(view: torch.nn.Module, source: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(assign=True) with a message naming missing / unexpected keys."""
    own = view.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(source))
    if missing:
        shown = ", ".join(missing[:6]) + (f" ... ({len(missing)} in all)" if len(missing) > 6 else "")
        raise UnsupportedModel(f"{what}: the ComfyUI model has no weights for {shown}")
    bad = [k for k in own if tuple(own[k].shape) != tuple(source[k].shape)]
    if bad:
        k = bad[0]
        raise UnsupportedModel(
            f"{what}: weight {k} has shape {tuple(source[k].shape)} in ComfyUI, {tuple(own[k].shape)} expected"
        )
    view.load_state_dict({k: source[k] for k in own}, strict=True, assign=True)
    for p in view.parameters():
        p.requires_grad_(False)
    device = next(view.parameters()).device
    for m in view.modules():  # non-persistent buffers are not in state dicts: still on `meta`, rebuild them
        for name, b in list(m._buffers.items()):
            if b is None or not b.is_meta:
                continue
            if name == "position_ids":
                m._buffers[name] = torch.arange(b.shape[-1], device=device).expand(b.shape).clone()
            else:
                raise UnsupportedModel(f"{what}: cannot rebuild the non-persistent buffer {name!r}")


# ------------------------------------------------------------------------------------------------------------- UNet
def diffusers_unet_config(unet_config: dict, family: str) -> dict:
    """diffusers UNet2DConditionModel config from ComfyUI's detected ``unet_config`` (any number of levels, res
    blocks and transformer depths; the mid block present or absent)."""
    mc = int(unet_config["model_channels"])
    mult = list(unet_config["channel_mult"])
    nres = list(unet_config["num_res_blocks"])
    if isinstance(nres, int):
        nres = [nres] * len(mult)
    depth_in = list(unet_config["transformer_depth"])
    depth_out = list(unet_config["transformer_depth_output"])
    down_types, depths = [], []
    i = 0
    for lvl, n in enumerate(nres):
        d = depth_in[i : i + n]
        i += n
        if len(set(d)) > 1:
            raise UnsupportedModel(f"model: level {lvl} mixes transformer depths {d}; not a diffusers layout")
        depths.append(int(d[0]) if d else 0)
        down_types.append("CrossAttnDownBlock2D" if depths[-1] > 0 else "DownBlock2D")
    # transformer_depth_output lists output blocks shallowest level first, n + 1 layers per level; diffusers numbers
    # up blocks deepest level first
    level_depths, j = [], 0
    for n in nres:
        d = depth_out[j : j + n + 1]
        j += n + 1
        level_depths.append(max(d) if d else 0)
    up_types = [("CrossAttnUpBlock2D" if dep > 0 else "UpBlock2D") for dep in reversed(level_depths)]
    mid = unet_config.get("transformer_depth_middle", None)
    if mid is None:
        mid = depths[-1]
    if mid == -1:
        raise UnsupportedModel("model: a mid block without a transformer has no diffusers equivalent")
    heads = unet_config.get("num_heads", -1)
    head_ch = unet_config.get("num_head_channels", -1)
    if heads is not None and heads != -1:
        attn = int(heads)
    else:
        attn = [mc * m // int(head_ch) for m in mult]
    cfg = {
        "sample_size": NATIVE_LATENT[family],
        "in_channels": int(unet_config.get("in_channels", 4)),
        "out_channels": int(unet_config.get("out_channels", 4)),
        "layers_per_block": nres[0] if len(set(nres)) == 1 else nres,
        "block_out_channels": [mc * m for m in mult],
        "down_block_types": down_types,
        "up_block_types": up_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if mid >= 0 else None,
        "transformer_layers_per_block": depths if any(d > 1 for d in depths) else 1,
        "cross_attention_dim": int(unet_config["context_dim"]),
        "attention_head_dim": attn,
        "use_linear_projection": bool(unet_config.get("use_linear_in_transformer", False)),
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
    }
    adm = unet_config.get("adm_in_channels")
    if adm:
        if family != "sdxl":
            raise UnsupportedModel("model: a class-conditioned (adm) UNet outside SDXL is not supported")
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=int(adm))  # fmt: skip
    return cfg


def unet_view(model, family: str):
    """A diffusers UNet2DConditionModel sharing the weight storage of the MODEL's ``diffusion_model``."""
    from diffusers import UNet2DConditionModel

    from popalign_core.models.single_file import _apply_module_map, unet_module_map

    unet_config = dict(model.model.model_config.unet_config)
    cfg = diffusers_unet_config(unet_config, family)
    with torch.device("meta"):
        view = UNet2DConditionModel(**cfg)
    names = _apply_module_map({k: k for k in view.state_dict()}, unet_module_map(view), "unet")  # original -> ours
    comfy_sd = model.model.diffusion_model.state_dict(keep_vars=True)
    unused = sorted(set(comfy_sd) - set(names))
    if unused:
        raise UnsupportedModel(
            f"model: the {model_type_name(model)} UNet has weights the diffusers layout has no place for: "
            + ", ".join(unused[:6])
            + (f" ... ({len(unused)} in all)" if len(unused) > 6 else "")
        )
    source = {ours: comfy_sd[orig].detach() for orig, ours in names.items() if orig in comfy_sd}
    _assign(view, source, "model (UNet)")
    return view.eval()


# ------------------------------------------------------------------------------------------------------ manual cast
_CAST_CLASSES: dict[type, type] = {}


def _cast_forward(self, x, *args, **kwargs):
    """Run the layer with its (frozen, stored in another dtype) weights cast to the input's dtype, as ComfyUI's
    ``manual_cast`` ops do: ComfyUI keeps text encoders in fp16 and computes in fp32."""
    base = type(self).__mro__[1]
    w = self.weight
    if w is not None and w.dtype != x.dtype and x.is_floating_point():
        b = self.bias
        return base.forward(_Swap(self, w.to(x.dtype), None if b is None else b.to(x.dtype)), x, *args, **kwargs)
    return base.forward(self, x, *args, **kwargs)


class _Swap:
    """A stand-in `self` for a layer's forward with cast weights (attribute lookups fall through to the layer)."""

    def __init__(self, layer, weight, bias):
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def _conv_forward(self, x, weight, bias):  # Conv2d.forward calls self._conv_forward(x, self.weight, self.bias)
        return type(self._layer)._conv_forward(self, x, weight, bias)


def _embedding_forward(self, ids):
    """Look up in the stored (possibly fp16) table and return float32 rows (exact), so that the layers after it
    compute in float32 as ComfyUI does (0.3.75 stores the CLIP embeddings in fp16 too, the 2024 copy in fp32)."""
    out = torch.nn.Embedding.forward(self, ids)
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def manual_cast(module: torch.nn.Module) -> int:
    """Make every Linear / LayerNorm / Conv2d / GroupNorm layer of `module` compute in its input's dtype (weights
    cast on the fly, storage untouched) and every Embedding return float32 rows. Returns how many layers were
    switched."""
    n = 0
    for m in module.modules():
        base = type(m)
        if base not in (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.Embedding):
            continue
        cls = _CAST_CLASSES.get(base)
        if cls is None:
            forward = _embedding_forward if base is torch.nn.Embedding else _cast_forward
            cls = _CAST_CLASSES[base] = type(f"Cast{base.__name__}", (base,), {"forward": forward})
        m.__class__ = cls
        n += 1
    return n


# ------------------------------------------------------------------------------------------------------ text encoders
def text_encoder_views(clip, family: str) -> list:
    """transformers CLIP text models sharing the weights of the CLIP's ComfyUI text encoders (core order)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from popalign_core.models.loading import FAMILY_CONFIG_DIRS

    views = []
    csm = clip.cond_stage_model
    for i, attr in enumerate(CLIP_ATTRS[family]):
        enc = getattr(csm, attr, None)
        if enc is None:
            raise UnsupportedModel(
                f"clip: the CLIP has no {attr} text encoder; a {family} model needs {', '.join(CLIP_ATTRS[family])}"
            )
        sub = "text_encoder" if i == 0 else "text_encoder_2"
        tcfg = CLIPTextConfig.from_pretrained(str(FAMILY_CONFIG_DIRS[family] / sub), local_files_only=True)
        cls = CLIPTextModelWithProjection if (family == "sdxl" and i == 1) else CLIPTextModel
        with torch.device("meta"):
            view = cls(tcfg)
        comfy_sd = enc.transformer.state_dict(keep_vars=True)
        source = {}
        for k in view.state_dict():
            for cand in (k, f"text_model.{k}"):
                if cand in comfy_sd:
                    source[k] = comfy_sd[cand].detach()
                    break
        _assign(view, source, f"clip ({attr})")
        manual_cast(view)  # ComfyUI stores text encoders in fp16 (embeddings in fp32) and computes in fp32
        views.append(view.eval())
    return views


# ---------------------------------------------------------------------------------------------------------------- VAE
def vae_view(vae, family: str, scaling_factor: float):
    """A diffusers AutoencoderKL sharing the weights of the ComfyUI VAE (full SD-style VAEs; TAESD cannot train)."""
    import json

    from diffusers import AutoencoderKL

    from popalign_core.models.loading import FAMILY_CONFIG_DIRS
    from popalign_core.models.single_file import _apply_module_map, vae_module_map

    fsm = vae.first_stage_model
    comfy_sd = fsm.state_dict(keep_vars=True)
    if not any(k.startswith("decoder.up.") for k in comfy_sd):
        raise UnsupportedModel(
            f"vae: {type(fsm).__name__} is not a Stable Diffusion AutoencoderKL (e.g. TAESD); load the full VAE"
        )
    cfg = {k: v for k, v in json.loads((FAMILY_CONFIG_DIRS[family] / "vae" / "config.json").read_text()).items()
           if not k.startswith("_")}  # fmt: skip
    cfg["scaling_factor"] = float(scaling_factor)
    with torch.device("meta"):
        view = AutoencoderKL(**cfg)
    names = _apply_module_map({k: k for k in view.state_dict()}, vae_module_map(view), "vae")
    own = view.state_dict()
    source = {}
    for orig, ours in names.items():
        t = comfy_sd.get(orig)
        if t is None:
            continue
        t = t.detach()
        if t.shape != own[ours].shape and t.numel() == own[ours].numel():
            t = t.view(own[ours].shape)  # mid-block attention: 1x1 conv weights -> linear weights (a view, no copy)
        source[ours] = t
    _assign(view, source, "vae")
    return view.eval()


# ------------------------------------------------------------------------------------------------------------ adapter
class NotEnoughMemory(RuntimeError):
    """The models cannot all be resident on their device for training (the message says how much is needed)."""


_MIB = 1 << 20


def patcher_bytes(patcher) -> tuple[int | None, int]:
    """(bytes of the patcher's weights resident on its load device, bytes of all its weights); the first is None
    where ComfyUI does not track it (the 2024 copy after a partial load)."""
    total = int(patcher.model_size())
    if hasattr(patcher, "loaded_size"):  # ComfyUI 0.3.x tracks what a (partial) load put on the device
        return int(patcher.loaded_size()), total
    on_device = str(getattr(patcher, "current_device", patcher.load_device)) == str(patcher.load_device)
    return (None if is_partial(patcher) else total if on_device else 0), total


def is_partial(patcher) -> bool:
    """Whether ComfyUI loaded the model partially (lowvram: some weights stay offloaded and are cast per layer)."""
    counter = getattr(patcher, "lowvram_patch_counter", None)
    return bool(
        getattr(patcher, "model_lowvram", False)  # the 2024 ModelPatcher
        or getattr(getattr(patcher, "model", None), "model_lowvram", False)  # ComfyUI 0.3.x (on the BaseModel)
        or (callable(counter) and counter() > 0)
    )


def memory_shortfall(need: int, device_total: int, reserve: int) -> int:
    """Bytes missing to hold `need` bytes of weights on a device of `device_total` bytes that must keep `reserve`
    bytes free for computing (activations, optimiser state): ``need + reserve - device_total``, 0 when it fits."""
    return max(0, int(need) + int(reserve) - int(device_total))


def load_for_training(*patchers) -> None:
    """Have ComfyUI load the models (MODEL, CLIP, VAE patchers) fully onto their load device for training.

    Through ComfyUI's own ``load_models_gpu``: other models are offloaded first, the memory accounting stays right,
    weight patches (e.g. LoRAs loaded upstream) are applied, and a model ComfyUI had loaded partially (``--lowvram``,
    or too little free memory) is loaded completely (``force_full_load``, ComfyUI 0.3.x). Training needs every weight
    resident: when the device is too small for that, or ComfyUI still keeps weights offloaded (``--novram``),
    NotEnoughMemory says how much memory is needed. Nothing else of ComfyUI's model state changes (the next queue
    samples as before)."""
    import inspect

    import comfy.model_management as mm

    ps = [p for p in patchers if p is not None]
    need: dict = {}  # load device (not the CPU) -> bytes of the weights that go there
    for p in ps:
        if p.load_device.type != "cpu":
            need[p.load_device] = need.get(p.load_device, 0) + patcher_bytes(p)[1]
    for dev, n in need.items():
        total, reserve = mm.get_total_memory(dev), mm.minimum_inference_memory()
        short = memory_shortfall(n, total, reserve)
        if short:
            raise NotEnoughMemory(
                f"training needs the whole model on {dev}: {n / _MIB:.0f} MiB of weights (MODEL, CLIP, VAE) plus "
                f"{reserve / _MIB:.0f} MiB to compute, but the device has {total / _MIB:.0f} MiB ({short / _MIB:.0f} "
                "MiB short); use a smaller model or a larger device"
            )
    params = inspect.signature(mm.load_models_gpu).parameters
    kwargs = {k: True for k in ("force_full_load", "force_patch_weights") if k in params}
    mm.load_models_gpu(ps, **kwargs)
    partial = [p for p in ps if is_partial(p)]
    if partial:
        sizes = [patcher_bytes(p) for p in partial]
        raise NotEnoughMemory(
            "training needs the whole model on one device, but ComfyUI kept part of it offloaded ("
            + ", ".join(
                f"{type(p.model).__name__}: "
                + (f"{lo / _MIB:.0f} of {tot / _MIB:.0f} MiB loaded" if lo is not None else f"{tot / _MIB:.0f} MiB")
                for p, (lo, tot) in zip(partial, sizes)
            )  # fmt: skip
            + f"); it needs {sum(t for _, t in sizes) / _MIB:.0f} MiB free on {partial[0].load_device}: restart "
            "ComfyUI without --lowvram / --novram, or free memory (unload other models)"
        )


def adapter_from_comfy(model, clip, vae, *, trainable: bool = True):
    """A `DiffusersAdapter` over the ComfyUI MODEL (and CLIP, VAE) sharing their weights (module docstring); for
    SD3 / Flux / FluxSchnell MODELs a `comfy_flow.ComfyFlowAdapter` (a FlowAdapter over views, nodes/comfy_flow.py).

    trainable: first turn ComfyUI's inference-tensor weights into ordinary tensors (`make_weights_trainable`),
    which backward needs. Must be called outside ``torch.inference_mode()``.
    """
    from popalign_core.models.diffusers_adapter import DiffusersAdapter
    from popalign_core.models.loading import _tokenizers

    if torch.is_inference_mode_enabled():
        raise RuntimeError("adapter_from_comfy must run outside torch.inference_mode() (wrap it in "
                           "torch.inference_mode(False))")  # fmt: skip
    family = family_of(model)
    if model_type_name(model) in COMFY_FLOW_FAMILIES:  # SD3 / FLUX: a FlowAdapter over views (comfy_flow.py)
        import sys

        from .comfy_flow import flow_adapter_from_comfy

        if clip is None or vae is None:
            raise ValueError(f"{'clip' if clip is None else 'vae'}: a CLIP and a VAE are required for training")
        return flow_adapter_from_comfy(model, clip, vae, sys.modules[__name__], trainable=trainable)
    noise = noise_scheduler_of(model)
    if clip is None:
        raise ValueError("clip: a CLIP is required (the core encodes prompts with the model's own text encoders)")
    if vae is None:
        raise ValueError("vae: a VAE is required (training encodes images, alignment decodes latents)")
    load_for_training(model, clip.patcher, vae.patcher)
    modules = [model.model.diffusion_model, clip.cond_stage_model, vae.first_stage_model]
    if trainable:
        for m in modules:
            make_weights_trainable(m)
    unet = unet_view(model, family)
    encoders = text_encoder_views(clip, family)
    scale = float(getattr(model.model.latent_format, "scale_factor", 0.18215))
    vae_mod = vae_view(vae, family, scale)
    toks = _tokenizers(family)
    tokenizers = [toks["tokenizer"]] + ([toks["tokenizer_2"]] if family == "sdxl" else [])
    adapter = DiffusersAdapter(unet, vae_mod, encoders, tokenizers, noise, family)
    adapter.comfy_model_type = model_type_name(model)
    return adapter
