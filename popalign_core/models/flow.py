"""Rectified-flow (flow-matching) schedule of SD3.x and FLUX.1: the forward process, the velocity target, the models'
timestep shifts, training-time sampling and the Euler sampler step. Plain torch on tensors, no model.

Conventions (SD3 paper, Esser et al. 2024, "Scaling Rectified Flow Transformers", Sec. 2-3; diffusers'
``FlowMatchEulerDiscreteScheduler``): σ ∈ [0, 1] is the noise level, σ = 1 pure noise, σ = 0 the clean latent.

- forward process  x_σ = (1 − σ)·x0 + σ·ε                         (`add_noise`; SD3 Eq. 2 with a_t = 1 − t, b_t = t)
- velocity target  v = dx_σ/dσ = ε − x0                            (`velocity_target`; the model predicts v)
- back to x0 / ε   x0 = x_σ − σ·v,  ε = x_σ + (1 − σ)·v            (`x0_from_velocity`, `noise_from_velocity`)
- Euler step       x_{σ'} = x_σ + (σ' − σ)·v                       (`euler_step`; exact when v is constant)
- shift (SD3)      σ ↦ s·σ / (1 + (s − 1)·σ), s = 3.0 for SD3 at 1024²  (`shift_sigma`; SD3 Sec. 5.3.2)
- shift (FLUX)     σ ↦ e^μ / (e^μ + 1/σ − 1), μ linear in the number of image tokens between (256, 0.5) and
                   (4096, 1.15)                                     (`flux_mu`, `time_shift`; FLUX.1 reference code)
- training σ       uniform, or logit-normal: σ = sigmoid(u), u ~ N(m, s²), SD3's default rf/lognorm(0, 1)
                   (`TIMESTEP_SAMPLING`, `sample_sigmas`; SD3 Eq. 19)

The shifts of both families are the same map: `shift_sigma(σ, s)` equals `time_shift(log s, σ)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: SD3 / SD3.5's constant shift (their scheduler_config ``shift``)
SD3_SHIFT = 3.0
#: FLUX.1's resolution-dependent shift: (image tokens, μ) at both ends of the line (scheduler_config)
FLUX_BASE = (256, 0.5)
FLUX_MAX = (4096, 1.15)


def _check_sigma(sigma: torch.Tensor | float, name: str = "sigma") -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float64 if not torch.is_tensor(sigma) else None)
    if not torch.isfinite(s).all() or (s < 0).any() or (s > 1).any():
        raise ValueError(f"{name} must lie in [0, 1] (1 = pure noise); got {sigma!r}")
    return s


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ of shape [B] (or scalar) broadcast against a [B, ...] latent."""
    sigma = sigma.to(device=like.device, dtype=like.dtype)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε (σ per sample, shape [B], or one scalar)."""
    s = _expand(_check_sigma(sigma), x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target v = ε − x0 (the derivative of x_σ in σ)."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0 = x_σ − σ·v."""
    return x_t - _expand(_check_sigma(sigma), x_t) * v


def noise_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """ε = x_σ + (1 − σ)·v."""
    return x_t + (1 - _expand(_check_sigma(sigma), x_t)) * v


def euler_step(x_t: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One flow-Euler step from σ to σ' (σ' < σ when sampling): x_{σ'} = x_σ + (σ' − σ)·v."""
    _check_sigma(sigma)
    _check_sigma(sigma_next, "sigma_next")
    return x_t + (float(sigma_next) - float(sigma)) * v


def shift_sigma(sigma: torch.Tensor | float, shift: float = SD3_SHIFT) -> torch.Tensor:
    """SD3's timestep shift σ ↦ s·σ / (1 + (s − 1)·σ): more steps at high noise for s > 1; 0 and 1 stay fixed."""
    if not (isinstance(shift, int | float) and not isinstance(shift, bool) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0; got {shift!r}")
    s = _check_sigma(sigma)
    return shift * s / (1 + (shift - 1) * s)


def flux_mu(image_tokens: int, base: tuple[int, float] = FLUX_BASE, high: tuple[int, float] = FLUX_MAX) -> float:
    """FLUX.1's shift parameter μ: linear in the number of image tokens through `base` and `high`.

    image_tokens = (H / 16)·(W / 16) for an H×W image (8× VAE, 2×2 patches): 1024² → 4096 tokens → μ = 1.15."""
    if isinstance(image_tokens, bool) or not isinstance(image_tokens, int) or image_tokens < 1:
        raise ValueError(f"image_tokens must be an integer >= 1; got {image_tokens!r}")
    (n0, mu0), (n1, mu1) = base, high
    return mu0 + (mu1 - mu0) * (image_tokens - n0) / (n1 - n0)


def time_shift(mu: float, sigma: torch.Tensor | float) -> torch.Tensor:
    """FLUX.1's shift σ ↦ e^μ / (e^μ + 1/σ − 1) (σ = 0 stays 0); with μ = log s it is SD3's `shift_sigma`."""
    s = _check_sigma(sigma)
    e = math.exp(mu)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, e / (e + 1 / safe - 1), torch.zeros_like(s))


def _uniform(n: int, generator: torch.Generator | None, **_) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64)


def _logit_normal(n: int, generator: torch.Generator | None, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, dtype=torch.float64))


#: Training-time σ densities: name -> sampler(n, generator, **options). SD3 trains with logit_normal(0, 1).
TIMESTEP_SAMPLING: dict[str, Callable[..., torch.Tensor]] = {"uniform": _uniform, "logit_normal": _logit_normal}


def sample_sigmas(
    n: int, scheme: str = "logit_normal", generator: torch.Generator | None = None, **options
) -> torch.Tensor:
    """n training noise levels σ ∈ (0, 1) from a density of `TIMESTEP_SAMPLING` (float64, shape [n])."""
    if scheme not in TIMESTEP_SAMPLING:
        raise ValueError(f"scheme={scheme!r} is not a timestep sampling; valid values: {', '.join(TIMESTEP_SAMPLING)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1; got {n!r}")
    return TIMESTEP_SAMPLING[scheme](n, generator, **options)


def sampling_sigmas(steps: int, shift: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The σ of a `steps`-step sampler: linspace(1, 0, steps + 1), shifted (0 stays the last entry)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return s if shift is None else shift(s)


def mean_eps_weight(scheme: str = "logit_normal", shift: float = 1.0, points: int = 20001) -> float:
    """E[(1 − σ)²] under the training density `scheme` with the static `shift` applied to σ (trapezoid rule).

    At one noise level the ε error is (1 − σ)² times the velocity error (docs/training.md), so a β tuned on ε-scale
    errors keeps its mean strength on velocity errors as β_v = β_ε · E[(1 − σ)²]: 1/3 (uniform), 0.2934
    (logit-normal, FLUX: no static shift), 0.1134 (logit-normal with SD3's shift 3), 0.1760 (uniform, shift 3)."""
    if scheme not in TIMESTEP_SAMPLING:
        raise ValueError(f"scheme={scheme!r} is not a timestep sampling; valid values: {', '.join(TIMESTEP_SAMPLING)}")
    if scheme == "uniform":
        x = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
        w = torch.ones_like(x)
    else:  # σ = sigmoid(u), u ~ N(0, 1)
        u = torch.linspace(-12.0, 12.0, points, dtype=torch.float64)
        x, w = torch.sigmoid(u), torch.exp(-(u**2) / 2) / math.sqrt(2 * math.pi)
        x = x.clamp(0.0, 1.0)
    s = shift_sigma(x, shift) if shift != 1.0 else x
    grid = x if scheme == "uniform" else torch.linspace(-12.0, 12.0, points, dtype=torch.float64)
    return float(torch.trapezoid(w * (1 - s) ** 2, grid))
