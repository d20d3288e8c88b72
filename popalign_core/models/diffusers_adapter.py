"""Model adapter over diffusers components (SD1.5-, SD2.x- and SDXL-style latent diffusion models)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from popalign_core.models.adapter import PREDICTION_TYPES, UNET_FAMILIES, Conditioning, check_family


def _peft_layers(modules) -> Iterator[torch.nn.Module]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: nothing can be an adapter layer
        return
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if isinstance(m, BaseTunerLayer):
                yield m


@contextmanager
def adapters_off(modules):
    """Context in which every enabled peft adapter layer under `modules` (None entries skipped) is disabled."""
    toggled = [m for m in _peft_layers(modules) if not m.disable_adapters]
    for m in toggled:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in toggled:
            m.enable_adapters(True)


class VAECodec:
    """`encode_images` / `decode` over ``self.vae`` (an AutoencoderKL) with its scaling and shift factors, for both
    adapters: latents = (z - shift_factor) * scaling_factor (SD3 / FLUX have a shift, SD1.5 / SDXL none)."""

    def _vae_factors(self) -> tuple[float, float]:
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return float(cfg.scaling_factor), float(shift)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        scale, shift = self._vae_factors()
        x = images.to(device=self.vae.device, dtype=self.vae.dtype) * 2.0 - 1.0
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        return ((z - shift) * scale).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        scale, shift = self._vae_factors()
        z = latents.to(device=self.vae.device, dtype=self.vae.dtype) / scale + shift
        x = self.vae.decode(z, return_dict=False)[0]
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class DiffusersAdapter(VAECodec):
    """Implements `popalign_core.models.adapter.ModelAdapter` over diffusers/transformers components.

    unet: UNet2DConditionModel; vae: AutoencoderKL; text_encoders: [CLIPTextModel] (SD1.5/SD2.x) or
    [CLIPTextModel, CLIPTextModelWithProjection] (SDXL); tokenizers: matching CLIPTokenizers;
    noise_scheduler: the training schedule (e.g. DDPMScheduler) whose config gives the prediction type.
    reference_unet: optional frozen copy used as the reference in full fine-tuning; with LoRA leave it None and the
    reference is the same network with its adapters disabled (no weight copy).
    """

    def __init__(
        self,
        unet,
        vae,
        text_encoders: Sequence,
        tokenizers: Sequence,
        noise_scheduler,
        family: str,
        *,
        reference_unet=None,
        force_zeros_for_empty_prompt: bool | None = None,
    ):
        check_family(family, UNET_FAMILIES, "a UNet model (SD3 / FLUX models load as a FlowAdapter)")
        want = 2 if family == "sdxl" else 1
        if len(text_encoders) != want or len(tokenizers) != want:
            raise ValueError(
                f"text_encoders/tokenizers: family {family!r} needs {want} of each, "
                f"got {len(text_encoders)} text encoder(s) and {len(tokenizers)} tokenizer(s)"
            )
        pt = noise_scheduler.config.prediction_type
        if pt not in PREDICTION_TYPES:
            raise ValueError(
                f"noise_scheduler.config.prediction_type={pt!r}; valid values: {', '.join(PREDICTION_TYPES)}"
            )
        self.unet, self.vae = unet, vae
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.noise_scheduler = noise_scheduler
        self.family = family
        self.reference_unet = reference_unet
        self.force_zeros_for_empty_prompt = (
            (family == "sdxl") if force_zeros_for_empty_prompt is None else bool(force_zeros_for_empty_prompt)
        )
        self._use_reference_unet = False

    # ------------------------------------------------------------------ properties
    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """Native image side in pixels (UNet sample size x VAE factor)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @classmethod
    def from_pipeline(cls, pipe, family: str | None = None, **kwargs) -> DiffusersAdapter:
        """Wrap a diffusers StableDiffusion(XL)Pipeline; `family` is inferred when not given."""
        te2 = getattr(pipe, "text_encoder_2", None)
        if family is None:
            if te2 is not None:
                family = "sdxl"
            elif (
                pipe.scheduler.config.prediction_type == "v_prediction"
                or getattr(pipe.text_encoder.config, "hidden_act", "quick_gelu") == "gelu"
            ):
                family = "sd2"
            else:
                family = "sd15"
        encs = [pipe.text_encoder] + ([te2] if te2 is not None else [])
        toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if te2 is not None else [])
        from diffusers import DDPMScheduler

        noise = DDPMScheduler.from_config(pipe.scheduler.config)
        return cls(pipe.unet, pipe.vae, encs, toks, noise, family, **kwargs)

    # ------------------------------------------------------------------ text
    def _tokenize(self, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
        return tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def encode_prompt(
        self, prompts: Sequence[str], height: int | None = None, width: int | None = None
    ) -> Conditioning:
        if isinstance(prompts, str):
            raise TypeError("prompts: expected a list of strings, got a single str")
        prompts = list(prompts)
        if self.family != "sdxl":
            enc = self.text_encoders[0]
            out = enc(self._tokenize(self.tokenizers[0], prompts), output_hidden_states=False)
            return Conditioning(embeds=out.last_hidden_state.to(self.dtype))
        # SDXL: penultimate hidden states of both encoders, concatenated; pooled = projected text embeds of encoder 2
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            out = enc(self._tokenize(tok, prompts), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
        embeds = torch.cat(states, dim=-1).to(self.dtype)
        pooled = pooled.to(self.dtype)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            if empty.any():
                embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
                pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        h = height or self.native_size
        w = width or self.native_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=embeds.device).repeat(len(prompts), 1)
        return Conditioning(embeds=embeds, pooled=pooled, time_ids=time_ids)

    # ------------------------------------------------------------------ diffusion
    def _timesteps(self, t: torch.Tensor, n: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(n)
        return t.long()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, noise, self._timesteps(t, x0.shape[0]))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(x0, noise, self._timesteps(t, x0.shape[0]))

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        unet = self.reference_unet if (self._use_reference_unet and self.reference_unet is not None) else self.unet
        added = None
        if self.family == "sdxl":
            added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return unet(
            x_t.to(self.dtype), t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False
        )[0]

    @contextmanager
    def reference(self):
        """Reference model: peft adapters disabled on UNet and text encoders (or the frozen copy, if one is set)."""
        self._use_reference_unet = self.reference_unet is not None
        try:
            with adapters_off([self.unet, *self.text_encoders]):
                yield self
        finally:
            self._use_reference_unet = False

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        mods = [self.unet, *self.text_encoders]
        return [p for m in mods for p in m.parameters() if p.requires_grad]
