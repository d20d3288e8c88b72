"""The model-adapter interface shared by the diffusers and ComfyUI worlds.

Everything above this seam (losses, trainer, sampler, OT targets, metrics) is plain torch on tensors; everything
below it is the only code that knows diffusers or comfy internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch

from popalign_core.models.families import FAMILIES, FLOW_FAMILIES, UNET_FAMILIES, check_family

#: what a UNet family predicts (the flow families predict the velocity: `FLOW_PREDICTION`)
PREDICTION_TYPES = ("epsilon", "v_prediction")
FLOW_PREDICTION = "flow"

__all__ = [
    "FAMILIES",
    "FLOW_FAMILIES",
    "FLOW_PREDICTION",
    "PREDICTION_TYPES",
    "UNET_FAMILIES",
    "Conditioning",
    "ModelAdapter",
    "check_family",
]


@dataclass
class Conditioning:
    """Text conditioning for a batch.

    embeds:   [B, S, D] cross-attention context (SDXL: both encoders' penultimate states concatenated).
    pooled:   [B, P] pooled text embedding (SDXL's text_embeds), else None.
    time_ids: [B, 6] SDXL micro-conditioning (original size, crop top-left, target size), else None.
    guidance: [B] the guidance scale a guidance-distilled model takes as input (FLUX.1-dev), else None.

    SD3: embeds = CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width, then T5's states
    along the sequence; pooled = both CLIP projections. FLUX: embeds = T5 states, pooled = CLIP-L's pooled output.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def _map(self, fn) -> Conditioning:
        return replace(
            self,
            embeds=fn(self.embeds),
            pooled=None if self.pooled is None else fn(self.pooled),
            time_ids=None if self.time_ids is None else fn(self.time_ids),
            guidance=None if self.guidance is None else fn(self.guidance),
        )

    def select(self, index) -> Conditioning:
        """Rows `index` (a slice, an int list or a LongTensor)."""
        return self._map(lambda t: t[index])

    def to(self, *args, **kwargs) -> Conditioning:
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> Conditioning:
        return self._map(lambda t: t.detach())

    def repeat(self, n: int) -> Conditioning:
        """Each row repeated n times in place (row i -> rows i*n .. i*n+n-1)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        if not items:
            raise ValueError("items: cannot concatenate an empty list of conditionings")
        first = items[0]

        def cat_field(name):
            vals = [getattr(c, name) for c in items]
            if all(v is None for v in vals):
                return None
            if any(v is None for v in vals):
                raise ValueError(f"items: field {name!r} is set in some conditionings and not in others")
            return torch.cat(vals, dim=0)

        return replace(
            first,
            embeds=cat_field("embeds"),
            pooled=cat_field("pooled"),
            time_ids=cat_field("time_ids"),
            guidance=cat_field("guidance"),
        )


@runtime_checkable
class ModelAdapter(Protocol):
    """What the core needs from a text-to-image latent diffusion model."""

    family: str  # one of FAMILIES
    prediction_type: str  # one of PREDICTION_TYPES, or FLOW_PREDICTION for the flow families
    num_train_timesteps: int
    latent_channels: int
    vae_scale_factor: int

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode_prompt(
        self, prompts: Sequence[str], height: int | None = None, width: int | None = None
    ) -> Conditioning:
        """Text conditioning for `prompts` (SDXL time ids use height/width, default: the model's native size)."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process of the model's training schedule: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (UNets);
        x_t = (1 - sigma) x0 + sigma noise with sigma = t / num_train_timesteps (flow families)."""

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What `predict` is trained towards: the noise (epsilon), the velocity (v-prediction) or, for the flow
        families, the flow velocity noise - x0."""

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Raw network prediction (eps or v) with the trainable adapter as currently enabled."""

    def reference(self) -> AbstractContextManager:
        """Context in which `predict`/`encode_prompt` give the reference model (trainable adapters disabled)."""

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, H, W] images in [0, 1] -> scaled latents [B, C, H/f, W/f]."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> [B, 3, H, W] images in [0, 1]."""
