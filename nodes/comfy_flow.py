"""The flow part of the ComfyUI model adapter: SD3 / FLUX MODELs (ComfyUI 0.3.x types SD3, Flux, FluxSchnell).

`flow_adapter_from_comfy(model, clip, vae, base)` returns a `ComfyFlowAdapter`, a thin `FlowAdapter` whose

- transformer is a diffusers ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` **view of ComfyUI's own
  weights**: built on ``meta``, filled with ``load_state_dict(assign=True)`` from ComfyUI's ``diffusion_model``
  through the original-layout key table (`popalign_core.models.loading_flow.transformer_layout`). Fused q/k/v
  (and FLUX's single-block ``linear1``) are split into row slices, which are views, so no weight is copied. The one
  copy: the final modulation (and SD3's last context modulation) is stored (shift, scale) by ComfyUI and
  (scale, shift) by diffusers; its swapped halves are a new tensor (FLUX.1: 3072 x 6144 + bias, 0.16 % of the
  model; `ComfyFlowAdapter.copied_bytes` says how much).
- VAE is a view as for the UNet families (16 channels, ``configs/sd3|flux/vae``) with the latent scale / shift of
  the MODEL's ``latent_format`` (``process_in``: (z − shift)·scale);
- schedule comes from the MODEL's model sampling: ``ModelSamplingDiscreteFlow`` (SD3, FLUX.1-schnell; a
  ModelSamplingSD3 patch counts) gives diffusers' FlowMatchEulerDiscreteScheduler with its ``shift`` (SD3 3.0,
  schnell 1.0); ``ModelSamplingFlux`` (FLUX.1-dev) gives FLUX's dynamic-shift schedule (training σ unshifted, as
  `FlowAdapter` trains FLUX; μ only shifts sampling). ComfyUI feeds the network ``multiplier``·σ; the diffusers view
  takes 1000·σ (SD3) or σ (FLUX), so the multiplier must be 1000 / 1 (else UnsupportedModel).
- prompts are encoded by **ComfyUI's own CLIP** (``clip.tokenize`` + ``clip.encode_from_tokens(...,
  return_pooled=True)``, what CLIPTextEncode runs), not by transformers views: the LoRA then trains on exactly the
  conditioning ComfyUI samples with (T5's 77 / 256-token minimum, SD3's zero rows for a missing CLIP-G or T5, prompt
  weights, fp8 / scaled T5 files), and memory is the same either way (frozen, shared weights, no graph). Rows of
  different lengths are repeated to their least common multiple as ComfyUI batches them (``comfy/conds.py``
  CONDCrossAttn.concat: repeating keys does not change attention). Encodings are cached per prompt. Text encoders
  are therefore not trainable here: the adapter has no ``text_encoders`` (a text-encoder LoRA is refused).

Weights stored in another dtype than the compute dtype (UNETLoader ``weight_dtype`` fp8_e4m3fn / e5m2, or bf16
with ComfyUI's manual cast) are used as stored: each Linear of the view becomes a `CastLinear`, whose autograd
function casts the weight per layer in forward and again in backward and saves the **stored** tensor, so a training
step holds at most one layer's cast weight (not a compute-dtype copy of the model); other layers with stored weights
(patch-embedding conv, RMS norms, SD3's position table) cast theirs on the fly (small).

Scaled-fp8 files (``sd3.5_large_fp8_scaled``, Comfy-Org's ``*_fp8_scaled`` FLUX): ComfyUI 0.3.75 detects the
``scaled_fp8`` marker (``comfy/model_detection.py``) and builds every Linear from ``comfy/ops.py`` scaled_fp8_ops:
an fp8 weight W (and bias), a float32 per-tensor ``scale_weight`` s, and with fp8 optimizations (a marker that is
not 2 elements long) a ``scale_input``. Without fp8 matrix multiplication its forward is y = x·(s·W)ᵀ + b in the
compute dtype, s multiplying the smaller of W and x (both cast first); ``scale_input`` is then unused. A view's
Linear shares W and s (s a non-persistent buffer; a fused q/k/v's s goes to each of its slices) and `CastLinear`
computes the same products in forward and backward: no dequantised copy. fp8 matrix multiplication (ComfyUI's
scaled_fp8_ops with ``fp8_matrix_mult``, or fp8_ops from UNETLoader fp8_e4m3fn_fast / ``--fast fp8_matrix_mult``,
on a GPU with fp8 compute such as H100 / RTX 40xx): ComfyUI then quantises each layer's input to fp8 (x /
scale_input clamped to ±448, 3 mantissa bits) for ``torch._scaled_mm``, a step function with zero gradient almost
everywhere. The views train through the same stored weights without that input rounding (what ComfyUI computes
without fp8 matrix multiplication; the usual way to train over a quantised base, e.g. QLoRA, kohya ``--fp8_base``),
and the console says so: the LoRA then applies to ComfyUI's fp8 path as any LoRA does. Refused, by name
(UnsupportedModel): per-layer mixed-precision files (``_quantization_metadata``, ``comfy/quant_ops.py``
QuantizedTensor weights). Load the bf16 / fp16 model instead (UNETLoader fp8_e4m3fn keeps the memory low).

The helpers shared with the UNet adapter (errors, model sampling, inference-tensor replacement, VAE view, loading)
are passed in as `base` (the ``comfy_adapter`` module): the pack's import graph stays acyclic.
"""

from __future__ import annotations

import json
import math

import torch

from popalign_core.models.families import FAMILY_SPECS
from popalign_core.models.flow_adapter import FLUX_GUIDANCE, FlowAdapter

#: the ComfyUI timestep multiplier (t = multiplier·σ) each diffusers transformer's timestep convention matches
MULTIPLIERS = {"sd3": 1000.0, "flux": 1.0}
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_SCALES = (".scale_weight", ".scale_input")  # a scaled-fp8 Linear's per-tensor scales in ComfyUI (comfy/ops.py)
LOAD_INSTEAD = "load the bf16 / fp16 model instead (UNETLoader weight_dtype fp8_e4m3fn keeps its memory low)"
NO_TEXT_ENCODER = (
    "SD3 / FLUX in ComfyUI encode prompts with ComfyUI's own CLIP, which PopAlign does not train; train the "
    "transformer only (turn train_text_encoder off)"
)


# --------------------------------------------------------------------------------------------------- cast layers
def _scaled(a: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None):
    """(a, W) cast to a's dtype with the per-tensor scale s on the smaller of the two: ComfyUI's scaled_fp8_ops
    Linear (``comfy/ops.py``: ``weight.numel() < input.numel()`` scales W, else the input), so products round
    alike."""
    w = weight.to(a.dtype)
    if scale is None:
        return a, w
    s = scale.to(a.dtype)
    return (a, w * s) if w.numel() < a.numel() else (a * s, w)


class _FrozenCastLinear(torch.autograd.Function):
    """y = x (s·W)ᵀ + b with a frozen W stored in another dtype and an optional per-tensor scale s (scaled fp8;
    None: s = 1): W (and s) are cast to x's dtype in forward and again in backward; only the stored tensors are
    saved (grad x = grad y · s·W; W, b and s get no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale):
        ctx.save_for_backward(weight, scale)
        return torch.nn.functional.linear(*_scaled(x, weight, scale), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        g, w = _scaled(grad, weight, scale)
        return g @ w, None, None, None


class CastLinear(torch.nn.Linear):
    """A frozen Linear whose weight stays in its stored dtype (fp8 / bf16), cast per call (`_FrozenCastLinear`);
    a ``scale_weight`` buffer (scaled fp8) multiplies the cast weight as ComfyUI's scaled_fp8_ops do."""

    def forward(self, x):
        scale = self._buffers.get("scale_weight")
        if scale is None and self.weight.dtype == x.dtype:
            return super().forward(x)
        if self.weight.requires_grad:
            raise RuntimeError(
                f"a {self.weight.dtype} weight cast per layer cannot be trained itself; train a LoRA over it"
            )
        return _FrozenCastLinear.apply(x, self.weight, self.bias, scale)


def _cast_pos_embed(self, height, width):
    """PatchEmbed.cropped_pos_embed with the (stored) table cropped first, then cast: only the crop is converted."""
    return type(self).__mro__[1].cropped_pos_embed(self, height, width).to(self.compute_dtype)


def _cast_forward(self, x, *args, **kwargs):
    """Run the layer (Conv2d, LayerNorm, GroupNorm, RMSNorm) with its stored weights cast to x's dtype (small)."""
    w, b = self.weight, getattr(self, "bias", None)
    layer = self
    if w is not None and w.dtype != x.dtype:
        layer = self._swap_cls(self, w.to(x.dtype), None if b is None else b.to(x.dtype))
    return type(self).__mro__[1].forward(layer, x, *args, **kwargs)


def cast_stored_weights(view: torch.nn.Module, compute: torch.dtype, base) -> int:
    """Make every layer of `view` whose tensors are not stored in `compute` compute in `compute` (module docstring).
    Returns how many layers were switched; UnsupportedModel names a layer type it cannot switch."""
    n = 0
    for name, m in view.named_modules():
        own = [t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None and t.is_floating_point()]
        if not any(t.dtype != compute for t in own) and "scale_weight" not in m._buffers:
            continue
        cls = type(m)
        if cls is torch.nn.Linear:
            m.__class__ = CastLinear
        elif cls.__name__ == "PatchEmbed":  # SD3's position table: crop, then cast (the patch conv is handled below)
            m.__class__ = type(f"Cast{cls.__name__}", (cls,), {"cropped_pos_embed": _cast_pos_embed})
            m.compute_dtype = compute
        elif cls in (torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm) or cls.__name__ == "RMSNorm":
            m.__class__ = type(f"Cast{cls.__name__}", (cls,), {"forward": _cast_forward, "_swap_cls": base._Swap})
        else:
            raise base.UnsupportedModel(
                f"model: layer {name} ({cls.__name__}) stores its weights as {own[0].dtype}, which the view cannot "
                f"compute in {compute}"
            )
        n += 1
    return n


def compute_dtype(model) -> torch.dtype:
    """The dtype ComfyUI computes the MODEL in: its manual-cast dtype, else the weights' own (fp8 weights without a
    manual cast: bfloat16)."""
    mc = getattr(model.model, "manual_cast_dtype", None)
    dtype = mc if mc is not None else model.model.get_dtype()
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


# ------------------------------------------------------------------------------------------------------ facts
def flow_family_of(model, base) -> str:
    name = base.model_type_name(model)
    if name not in base.COMFY_FLOW_FAMILIES:
        raise base.UnsupportedModel(
            f"model: ComfyUI model type {name!r} is not a supported flow model; supported: "
            f"{', '.join(base.COMFY_FLOW_FAMILIES)}"
        )
    return base.COMFY_FLOW_FAMILIES[name]


def flow_scheduler_of(model, family: str, base):
    """diffusers FlowMatchEulerDiscreteScheduler with the MODEL's (possibly patched) model sampling (module
    docstring); UnsupportedModel for a non-flow parameterisation or a multiplier the view cannot match."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from popalign_core.models.tiny_flow import flow_scheduler_config

    ms = base.model_sampling(model)
    mro = [c.__name__ for c in type(ms).__mro__]
    param = next((c.__name__ for c in type(ms).__mro__ if "calculate_denoised" in vars(c)), "?")
    what = f"the {base.model_type_name(model)} model's sampling ({type(ms).__name__}, {param})"
    if param != "CONST":
        raise base.UnsupportedModel(f"model: {what} is not rectified flow (CONST); PopAlign trains flow models so")
    if "ModelSamplingFlux" in mro:
        if family != "flux":
            raise base.UnsupportedModel(f"model: {what}: FLUX's sampling on a {family} model")
        return FlowMatchEulerDiscreteScheduler(**flow_scheduler_config("flux"))
    if "ModelSamplingDiscreteFlow" not in mro:
        raise base.UnsupportedModel(f"model: {what}; supported: ModelSamplingDiscreteFlow, ModelSamplingFlux")
    mult = float(ms.multiplier)
    if mult != MULTIPLIERS[family]:
        raise base.UnsupportedModel(
            f"model: {what} feeds the network {mult:g}·sigma, but a {family} network takes "
            f"{MULTIPLIERS[family]:g}·sigma; remove the model-sampling patch that changed it"
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(ms.shift))


# ------------------------------------------------------------------------------------------------ transformer
def transformer_config(comfy_sd: dict, family: str, model, base) -> dict:
    """diffusers config of the MODEL's transformer: the shipped config with what ComfyUI's tensors and unet_config
    determine (`loading_flow.transformer_overrides`; FLUX's RoPE axes from unet_config)."""
    from popalign_core.models.loading import FAMILY_CONFIG_DIRS
    from popalign_core.models.loading_flow import transformer_overrides

    cfg = json.loads((FAMILY_CONFIG_DIRS[family] / "transformer" / "config.json").read_text())
    uc = dict(model.model.model_config.unet_config)
    if family == "flux":
        if int(uc.get("patch_size", 2)) != 2 or float(uc.get("theta", 10000)) != 10000.0:
            raise base.UnsupportedModel(f"model: FLUX patch {uc.get('patch_size')} / RoPE theta {uc.get('theta')}; "
                                        "the diffusers FLUX transformer has patch 2 and theta 10000")  # fmt: skip
        cfg["axes_dims_rope"] = list(uc.get("axes_dim", cfg["axes_dims_rope"]))
    try:
        over = transformer_overrides(comfy_sd, family, cfg)
    except (KeyError, ValueError) as e:
        raise base.UnsupportedModel(f"model: the {family} transformer has no diffusers layout ({e})") from None
    return {**{k: v for k, v in cfg.items() if not k.startswith("_")}, **over}


def _fp8_matmul(layer) -> str | None:
    """How ComfyUI's Linear `layer` multiplies in fp8, quantising its input (``comfy/ops.py`` fp8_linear, e4m3fn
    weights only), or None: scaled_fp8_ops built with ``fp8_matrix_mult`` (read from its forward's closure), or
    fp8_ops (chosen only on a GPU with fp8 compute)."""
    if not FP8_DTYPES or getattr(getattr(layer, "weight", None), "dtype", None) != FP8_DTYPES[0]:
        return None
    fn = getattr(type(layer), "forward_comfy_cast_weights", None)
    free = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    if "fp8_matrix_mult" in free:
        on = fn.__closure__[free.index("fp8_matrix_mult")].cell_contents
        return "a scaled-fp8 file with fp8 optimizations on a GPU with fp8 compute" if on else None
    if type(layer).__qualname__.startswith("fp8_ops."):
        return "UNETLoader weight_dtype fp8_e4m3fn_fast or --fast fp8_matrix_mult on a GPU with fp8 compute"
    return None


def check_comfy_ops(model, base) -> str | None:
    """Before anything loads: UnsupportedModel naming a per-layer mixed-precision quantised MODEL (the views cannot
    train over it); for a MODEL ComfyUI runs with fp8 matrix multiplication, the note the console prints (module
    docstring: training goes through the dequantised weights), else None."""
    what = f"the {base.model_type_name(model)} model"
    if getattr(model.model.model_config, "layer_quant_config", None):
        raise base.UnsupportedModel(
            f"model: {what} is a per-layer mixed-precision quantised file (_quantization_metadata, ComfyUI "
            f"quant_ops), which PopAlign cannot train over; {LOAD_INSTEAD}"
        )
    for name, m in model.model.diffusion_model.named_modules():
        how = _fp8_matmul(m)
        if how is not None:
            return (
                f"[PopAlign] {what}: ComfyUI runs its Linear layers ({name}, ...) with fp8 matrix multiplication "
                f"({how}), rounding each layer's input to fp8; training goes through the same fp8 weights without "
                "that rounding (it has no gradient), and the LoRA applies to ComfyUI's fp8 path as any LoRA does"
            )
    return None


def comfy_scales(model, comfy_sd: dict, base) -> dict[str, torch.Tensor]:
    """The per-tensor ``scale_weight`` of each scaled-fp8 Linear of the MODEL's ``diffusion_model`` by module name
    ({} for other models); UnsupportedModel for a scale that is not one value."""
    scales = {k.removesuffix(".scale_weight"): v for k, v in comfy_sd.items() if k.endswith(".scale_weight")}
    bad = next((k for k, v in scales.items() if v.numel() != 1), None)
    if bad is not None:
        raise base.UnsupportedModel(f"model: {bad}.scale_weight has shape {tuple(scales[bad].shape)}; scaled fp8 "
                                    f"has one scale per weight tensor")  # fmt: skip
    return scales


def _attach_scales(view: torch.nn.Module, rules, scales: dict[str, torch.Tensor], base) -> None:
    """Give each view Linear made from a scaled ComfyUI Linear (or a row slice of one) that Linear's scale: the
    same tensor, as a non-persistent ``scale_weight`` buffer (`CastLinear` applies it)."""
    done = set()
    for orig, diff, _ in rules:
        name = orig.removesuffix(".weight")
        if name != orig and name in scales:
            for d in diff:
                view.get_submodule(d.removesuffix(".weight")).register_buffer("scale_weight", scales[name], False)
            done.add(name)
    if done != set(scales):
        left = sorted(set(scales) - done)[:6]
        raise base.UnsupportedModel(f"model: scaled-fp8 layers without a view Linear: {left}")


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def transformer_view(model, family: str, base):
    """(diffusers transformer sharing the MODEL's ``diffusion_model`` weight storage, bytes of its tensors that are
    copies: the swapped modulation halves)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from popalign_core.models.loading_flow import layout_from_original, transformer_layout

    comfy_sd = {k: v.detach() for k, v in model.model.diffusion_model.state_dict(keep_vars=True).items()}
    scales = comfy_scales(model, comfy_sd, base)
    comfy_sd = {k: v for k, v in comfy_sd.items() if not k.endswith(_SCALES)}
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    with torch.device("meta"):
        view = cls.from_config(transformer_config(comfy_sd, family, model, base))
    rules = transformer_layout(view, family)
    unused = sorted(set(comfy_sd) - {o for o, _, _ in rules})
    if unused:
        raise base.UnsupportedModel(f"model: the {base.model_type_name(model)} transformer has weights the diffusers "
                                    f"layout has no place for: {', '.join(unused[:6])}")  # fmt: skip
    shapes = {k: v.shape for k, v in view.state_dict().items()}
    try:
        source = layout_from_original(comfy_sd, rules, shapes, "model (transformer)")
    except ValueError as e:
        raise base.UnsupportedModel(str(e)) from None
    base._assign(view, source, "model (transformer)")
    _attach_scales(view, rules, scales, base)
    shared = _storages(comfy_sd.values())
    copied = sum(p.numel() * p.element_size() for p in view.state_dict().values()
                 if p.untyped_storage().data_ptr() not in shared)  # fmt: skip
    return view.eval(), copied


# ---------------------------------------------------------------------------------------------------- adapter
def _lcm_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[1, S_i, D] rows -> [B, L, D], L = lcm(S_i), each row repeated L / S_i times (ComfyUI's batching)."""
    n = math.lcm(*(t.shape[1] for t in tensors))
    return torch.cat([t.repeat(1, n // t.shape[1], 1) for t in tensors], dim=0)


class ComfyFlowAdapter(FlowAdapter):
    """`FlowAdapter` over views of a ComfyUI SD3 / FLUX MODEL (module docstring). clip: ComfyUI's CLIP (None: no
    prompt encoding; pass Conditionings yourself); compute: the dtype ComfyUI computes the MODEL in (the views'
    weights may be stored in fp8 / bf16)."""

    def __init__(self, transformer, vae, clip, noise_scheduler, family: str, *, compute: torch.dtype, **kwargs):
        n = len(FAMILY_SPECS[family].text_encoders)
        # FlowAdapter wants one encoder per slot; ComfyUI's CLIP encodes them all, so the slots are left empty
        super().__init__(transformer, vae, ["comfyui-clip"] * n, ["comfyui-clip"] * n, noise_scheduler, family,
                         **kwargs)  # fmt: skip
        self.text_encoders, self.tokenizers = [], []
        self.no_text_encoder_reason = NO_TEXT_ENCODER
        self.clip, self.compute_dtype = clip, compute
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.copied_bytes = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._prompt_cache.get(prompt)
        if hit is None:
            with torch.inference_mode():
                out = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True, return_dict=True)
            hit = (out["cond"].clone(), out["pooled_output"].clone())  # ordinary tensors outside inference mode
            self._prompt_cache[prompt] = hit
        return hit

    def encode_prompt(self, prompts, height=None, width=None):
        from popalign_core.models.adapter import Conditioning

        if isinstance(prompts, str):
            raise TypeError("prompts: expected a list of strings, got a single str")
        if self.clip is None:
            raise ValueError("clip: no CLIP was given to the adapter, so it cannot encode prompts (connect a CLIP)")
        rows = [self._encode_one(p) for p in prompts]
        kw = {"device": self.device, "dtype": self.dtype}
        embeds = _lcm_rows([c for c, _ in rows]).to(**kw)
        pooled = torch.cat([p for _, p in rows], dim=0).to(**kw)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((len(rows),), self.guidance, device=self.device, dtype=torch.float32)
        return Conditioning(embeds=embeds, pooled=pooled, guidance=guidance)

    def _need_vae(self):
        if self.vae is None:
            raise ValueError("vae: no VAE was given to the adapter, so it cannot encode or decode images")

    def encode_images(self, images, generator=None):
        self._need_vae()
        return super().encode_images(images, generator)

    def decode(self, latents):
        self._need_vae()
        return super().decode(latents)


def flow_adapter_from_comfy(model, clip, vae, base, *, trainable: bool = True) -> ComfyFlowAdapter:
    """The `ComfyFlowAdapter` of an SD3 / Flux / FluxSchnell MODEL (module docstring); `base`: the comfy_adapter
    module. clip / vae may be None (no prompt encoding / no images). Outside ``torch.inference_mode()``."""
    family = flow_family_of(model, base)
    noise = flow_scheduler_of(model, family, base)
    note = check_comfy_ops(model, base)
    if note:
        print(note)
    base.load_for_training(model, *(x.patcher for x in (clip, vae) if x is not None))
    if trainable:
        base.make_weights_trainable(model.model.diffusion_model)
        if vae is not None:
            base.make_weights_trainable(vae.first_stage_model)
    transformer, copied = transformer_view(model, family, base)
    compute = compute_dtype(model)
    cast_stored_weights(transformer, compute, base)
    vae_mod = None
    if vae is not None:
        fmt = model.model.latent_format
        vae_mod = base.vae_view(vae, family, float(fmt.scale_factor))
        vae_mod.register_to_config(shift_factor=float(fmt.shift_factor))
    adapter = ComfyFlowAdapter(transformer, vae_mod, clip, noise, family, compute=compute, guidance=FLUX_GUIDANCE)
    adapter.copied_bytes = copied
    adapter.comfy_model_type = base.model_type_name(model)
    return adapter
