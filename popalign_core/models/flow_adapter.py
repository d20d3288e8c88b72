"""Model adapter over diffusers' rectified-flow transformers: SD3.x (`SD3Transformer2DModel`) and FLUX.1
(`FluxTransformer2DModel`).

The adapter speaks the same `ModelAdapter` interface as the UNet adapter, with the flow schedule of `models.flow`:

- timesteps are t = 1000·σ (float, σ ∈ [0, 1], 1 = pure noise), the convention of diffusers'
  ``FlowMatchEulerDiscreteScheduler`` and of SD3's transformer input (FLUX's transformer takes σ itself);
- ``add_noise``: x_t = (1 − σ)·x0 + σ·ε; ``target``: v = ε − x0; ``predict``: the network's velocity;
- ``sample_timesteps``: training σ from uniform or logit-normal density (SD3 paper Eq. 19), then the family's
  static shift (SD3: s = 3, as diffusers' SD3 trainer draws them from the shifted scheduler; FLUX: none, its shift
  is dynamic and only applies at sampling);
- ``reference()``: the same network with its peft adapters off (no weight copy).

Conditioning (diffusers' StableDiffusion3Pipeline / FluxPipeline ``encode_prompt``):

- SD3: CLIP-L and CLIP-G penultimate hidden states, side by side, zero-padded to T5's width, then T5's last hidden
  states along the sequence; pooled = both CLIP text projections. Without T5 (SD3's optional encoder) its rows are
  zeros of ``max_sequence_length`` tokens, as diffusers does.
- FLUX: T5's last hidden states; pooled = CLIP-L's pooled output; ``guidance`` (FLUX.1-dev) a per-row scale.
  Latents are packed into 2×2 patches with (0, row, column) position ids; text ids are zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from popalign_core.models import flow
from popalign_core.models.adapter import FLOW_FAMILIES, FLOW_PREDICTION, Conditioning, check_family
from popalign_core.models.diffusers_adapter import VAECodec, adapters_off
from popalign_core.models.families import FAMILY_SPECS

#: default embedded guidance of FLUX.1-dev (diffusers' FluxPipeline and its LoRA trainer)
FLUX_GUIDANCE = 3.5


class FlowAdapter(VAECodec):
    """Implements `popalign_core.models.adapter.ModelAdapter` for the flow families ("sd3", "flux").

    transformer: SD3Transformer2DModel or FluxTransformer2DModel; vae: AutoencoderKL (16 latent channels, with
    shift_factor); text_encoders / tokenizers: SD3 [CLIP-L, CLIP-G, T5 or None], FLUX [CLIP-L, T5] (CLIP encoders
    are CLIPTextModel(WithProjection), T5 a T5EncoderModel); noise_scheduler: a FlowMatchEulerDiscreteScheduler
    whose config holds the shift (SD3) or the dynamic-shift line (FLUX).
    timestep_sampling: training σ density, a key of `models.flow.TIMESTEP_SAMPLING`.
    guidance: FLUX.1-dev's embedded guidance for training passes (ignored by models without a guidance input).
    max_sequence_length: T5 tokens per prompt (default: the family's, capped by the tokenizer's).
    native_size: default image side in pixels (None: from the transformer's config).
    reference_transformer: optional frozen copy used as the reference in full fine-tuning; with LoRA leave it None
    and the reference is the same network with its adapters disabled (no weight copy).
    """

    prediction_type = FLOW_PREDICTION

    def __init__(
        self,
        transformer,
        vae,
        text_encoders: Sequence,
        tokenizers: Sequence,
        noise_scheduler,
        family: str,
        *,
        timestep_sampling: str = "logit_normal",
        guidance: float = FLUX_GUIDANCE,
        max_sequence_length: int | None = None,
        native_size: int | None = None,
        reference_transformer=None,
    ):
        check_family(family, FLOW_FAMILIES, "a flow-matching adapter (UNet models load as a DiffusersAdapter)")
        spec = FAMILY_SPECS[family]
        n = len(spec.text_encoders)
        if len(text_encoders) != n or len(tokenizers) != n:
            raise ValueError(
                f"text_encoders/tokenizers: family {family!r} needs {n} of each ({', '.join(spec.text_encoders)}; "
                f"None for an optional one), got {len(text_encoders)} and {len(tokenizers)}"
            )
        for k, (name, enc, tok) in enumerate(zip(spec.text_encoders, text_encoders, tokenizers)):
            if (enc is None or tok is None) and name not in spec.optional_encoders:
                raise ValueError(
                    f"text_encoders[{k}]: the {name} text encoder and its tokenizer are required for {family!r}"
                    + (" (only T5 is optional, for SD3)" if family == "sd3" else "")
                )
        if timestep_sampling not in flow.TIMESTEP_SAMPLING:
            raise ValueError(
                f"timestep_sampling={timestep_sampling!r}; valid values: {', '.join(flow.TIMESTEP_SAMPLING)}"
            )
        self.transformer, self.vae = transformer, vae
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.noise_scheduler = noise_scheduler
        self.family = family
        self.spec = spec
        self.timestep_sampling = timestep_sampling
        self.guidance = float(guidance)
        self._native_size = native_size
        self.reference_transformer = reference_transformer
        self._use_reference = False
        t5_tok = self.tokenizers[-1]
        cap = int(getattr(t5_tok, "model_max_length", 0) or 0) if t5_tok is not None else 0
        want = spec.max_sequence_length if max_sequence_length is None else int(max_sequence_length)
        self.max_sequence_length = min(want, cap) if 0 < cap < 10**6 else want

    # ------------------------------------------------------------------ properties
    @property
    def unet(self):
        """The denoising network (the transformer; named like the UNet adapter's so LoRA code serves both)."""
        return self.transformer

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    @property
    def patch_size(self) -> int:
        return int(self.spec.patch_size)

    @property
    def latent_channels(self) -> int:
        c = int(self.transformer.config.in_channels)
        return c // 4 if self.family == "flux" else c

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """Native image side in pixels: the one given, else the transformer's sample size × VAE factor (FLUX's
        config has none: 128 latents, 1024 px, as its pipeline's default)."""
        if self._native_size:
            return int(self._native_size)
        size = getattr(self.transformer.config, "sample_size", None) or 128
        return int(size) * self.vae_scale_factor

    @property
    def guidance_embeds(self) -> bool:
        """The network takes the guidance scale as an input (FLUX.1-dev) instead of running classifier-free
        guidance."""
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    # ------------------------------------------------------------------ text
    def _ids(self, tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def _clip(self, k: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states [B, 77, D], pooled [B, P]) of CLIP encoder k (pooled = text projection when
        the encoder has one, else the pooled output)."""
        enc, tok = self.text_encoders[k], self.tokenizers[k]
        out = enc(self._ids(tok, prompts, tok.model_max_length), output_hidden_states=True)
        pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
        return out.hidden_states[-2], pooled

    def _t5(self, prompts: list[str], width: int) -> torch.Tensor:
        enc, tok = self.text_encoders[-1], self.tokenizers[-1]
        if enc is None:  # SD3 without T5: zeros in its place (diffusers' _get_t5_prompt_embeds)
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=self.device, dtype=self.dtype)
        return enc(self._ids(tok, prompts, self.max_sequence_length))[0]

    def encode_prompt(
        self, prompts: Sequence[str], height: int | None = None, width: int | None = None
    ) -> Conditioning:
        if isinstance(prompts, str):
            raise TypeError("prompts: expected a list of strings, got a single str")
        prompts = list(prompts)
        if self.family == "flux":
            _, pooled = self._clip(0, prompts)
            embeds = self._t5(prompts, int(self.transformer.config.joint_attention_dim))
            guidance = None
            if self.guidance_embeds:
                guidance = torch.full((len(prompts),), self.guidance, device=self.device, dtype=torch.float32)
            return Conditioning(embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype), guidance=guidance)
        (l_states, l_pooled), (g_states, g_pooled) = self._clip(0, prompts), self._clip(1, prompts)
        clip = torch.cat([l_states, g_states], dim=-1)
        t5_width = int(self.transformer.config.joint_attention_dim)
        if clip.shape[-1] > t5_width:
            raise ValueError(
                f"text encoders: CLIP-L + CLIP-G width {clip.shape[-1]} exceeds the transformer's "
                f"joint_attention_dim {t5_width}; the encoders do not belong to this SD3 model"
            )
        clip = torch.nn.functional.pad(clip, (0, t5_width - clip.shape[-1]))
        t5 = self._t5(prompts, t5_width).to(clip.dtype)
        embeds = torch.cat([clip, t5], dim=-2)
        pooled = torch.cat([l_pooled, g_pooled], dim=-1)
        return Conditioning(embeds=embeds.to(self.dtype), pooled=pooled.to(self.dtype))

    # ------------------------------------------------------------------ schedule
    def sigmas(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """σ = t / num_train_timesteps for timesteps `t` (scalar or [n])."""
        t = torch.as_tensor(t, device=self.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(n)
        return t / self.num_train_timesteps

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n training timesteps t = 1000·σ (float32, CPU): σ from `timestep_sampling`, then the static shift (SD3)."""
        sigma = flow.sample_sigmas(n, self.timestep_sampling, generator)
        shift = self.noise_scheduler.config.get("shift", 1.0)
        if not self.noise_scheduler.config.get("use_dynamic_shifting", False) and shift != 1.0:
            sigma = flow.shift_sigma(sigma, float(shift))
        return (sigma * self.num_train_timesteps).float()

    def beta_scale(self) -> float:
        """E[(1 − σ)²] under this adapter's training σ density: the factor that restates an ε-scale β for velocity
        errors (β_v = β_ε · beta_scale(); `models.flow.mean_eps_weight`)."""
        shift = self.noise_scheduler.config.get("shift", 1.0)
        static = 1.0 if self.noise_scheduler.config.get("use_dynamic_shifting", False) else float(shift)
        return flow.mean_eps_weight(self.timestep_sampling, static)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow.add_noise(x0, noise, self.sigmas(t, x0.shape[0]).to(x0.dtype))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow.velocity_target(x0, noise)

    # ------------------------------------------------------------------ network
    def check_latent_size(self, h: int, w: int, what: str = "latents") -> None:
        p = self.patch_size
        if h % p or w % p:
            f = self.vae_scale_factor
            raise ValueError(
                f"{what}: latent size {h}x{w} (image {h * f}x{w * f}) is not divisible by the {self.family} patch "
                f"size {p}; image sides must be multiples of {f * p} pixels"
            )

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = x_t.shape
        self.check_latent_size(h, w)
        t = self.sigmas(t, b) * self.num_train_timesteps
        x = x_t.to(self.dtype)
        net = self.reference_transformer if self._use_reference else self.transformer
        if self.family == "sd3":
            return net(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=cond.embeds,
                pooled_projections=cond.pooled,
                return_dict=False,
            )[0]
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=self.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=self.dtype)
        guidance = None
        if self.guidance_embeds:
            g = cond.guidance if cond.guidance is not None else torch.full((b,), self.guidance, device=x.device)
            guidance = g.to(device=x.device, dtype=torch.float32)
        out = net(
            hidden_states=packed,
            timestep=t / self.num_train_timesteps,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=txt_ids,
            img_ids=img_ids.reshape(-1, 3),
            return_dict=False,
        )[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    @contextmanager
    def reference(self):
        """Reference model: peft adapters disabled on the transformer and the text encoders (or the frozen copy, if
        one is set)."""
        self._use_reference = self.reference_transformer is not None
        try:
            with adapters_off([self.transformer, *self.text_encoders]):
                yield self
        finally:
            self._use_reference = False

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        mods = [self.transformer, *[e for e in self.text_encoders if e is not None]]
        return [p for m in mods for p in m.parameters() if p.requires_grad]
