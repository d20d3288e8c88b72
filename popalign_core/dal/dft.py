"""Direct finetuning (DFT) of the sampling process: generation with a gradient (patent [0110]-[0114]).

    from popalign_core.dal.dft import DFTConfig, generate
    noise = sampling.initial_noise(adapter, requests, SamplerConfig(...))       # the images `sample` would start from
    images = generate(adapter, prompts, noise, DFTConfig(steps=20, guidance_scale=7.5))
    loss_fn(images).backward()                                                  # gradients reach the LoRA / prefix

The sampler is the scheduler of `sampling.SCHEDULERS` (default DPM-Solver++(2M), ~20 steps, as the patent uses),
run on the model's training-schedule config exactly as `sampling.sample` runs it, so that with the same initial
noise the images (forward pass) are the ones `sample` draws. Every scheduler step used here is linear in the latent
and in the model output, so the final latent is

    z_0 = L(z_T) + sum_i a_i * eps_i                                                           (patent Eq. 10)

where eps_i is the (guided) model output at step i and a_i the solver's own coefficient of it ("A_t" up to sign:
the patent writes z_0 = -sum_t A_t eps^(t) + ...). The exact gradient (Eq. 9) is
dL/dtheta = sum_i a_i (d eps_i/d theta)^T B_i^T dL/dz_0, where B_i collects every path through later UNet inputs.

Gradients (`DFTConfig.gradient`, the keys of `GRADIENTS`):

- ``"a1"`` (default): Algorithm A.1 as written. The UNet sees the detached latent (B_t = I: no path through
  later UNet inputs; the scheduler update keeps the non-detached latent, so the linear path to z_0 stays) and each
  step's noise prediction gets a backward hook multiplying its gradient by C_i = 1/A_{t_i},
  A_t = (1/sqrt(abar_t)) * beta_t / sqrt(1 - abar_t) from the *training* schedule (beta_t = 1 - alpha_t), normalised
  by the geometric mean of the C_i. The resulting gradient is sum_i C_i a_i (d eps_i/d theta)^T dL/dz_0.
- ``"solver"``: the same with C_i = 1 / |a_i|, so C_i a_i = -1 for every step (a_i < 0): a true A_t = 1, i.e. the
  patent's adjusted gradient -sum_i (d eps_i/d theta)^T dL/dz_0 for *this* solver (A.1's C_i only approximates it:
  its A_t is the coefficient of a 1000-step DDPM chain, not of a 20-step solver). The sign is kept (|a_i|, not
  a_i), so that the step still descends the loss; see docs/dal.md.
- ``"exact"``: no detach and no hook: plain backpropagation through the whole chain (Eq. 9), for comparison (the
  patent's Fig. 6a: it hardly trains).

Memory: with `checkpointing` each UNet call (and the VAE decoder) is recomputed in the backward pass instead of
storing its activations (torch.utils.checkpoint, non-reentrant), so the activation memory of a generation is about
one UNet call plus the latents; micro-batching (the DAL trainer generates a batch in pieces and accumulates
gradients) bounds it further. `bench/dft_memory.py` measures both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from popalign_core.common.fields import help_field as _help
from popalign_core.common.userinput import check_containers, coerce_numbers
from popalign_core.models.adapter import Conditioning
from popalign_core.models.sampling import (
    AUTO_SCHEDULER,
    SCHEDULERS,
    prepare_scheduler,
    resolve_scheduler,
    scale_model_input,
)

__all__ = ["GRADIENTS", "DFTConfig", "a1_coefficients", "generate", "grad_coefficients", "solver_coefficients"]

GRADIENTS: dict[str, str] = {
    "a1": "Algorithm A.1 as written: detached UNet input, step gradient x C_i = 1/A_t (training schedule), "
    "normalised by the geometric mean",
    "solver": "detached UNet input, step gradient x 1/|a_i| with a_i the solver's coefficient of eps_i in z_0 "
    "(a true A_t = 1)",
    "exact": "unadjusted: backpropagation through the whole sampling chain (Eq. 9)",
}


@dataclass
class DFTConfig:
    """Settings of `generate` (validated on construction)."""

    steps: int = _help(
        "Sampling steps (UNet evaluations per image); the patent uses ~20 with DPM-Solver++.", default=20
    )
    guidance_scale: float = _help(
        "Classifier-free guidance scale (>= 0); 1 skips the unconditional pass.", default=7.5
    )
    scheduler: str = _help(
        "Sampling scheduler (deterministic ones only): "
        + ", ".join(k for k, s in SCHEDULERS.items() if not s.stochastic)
        + "; auto: dpmpp_2m, or flow_euler for SD3 / FLUX",
        default="dpmpp_2m",
    )
    gradient: str = _help("Gradient through the sampler: " + "; ".join(f"{k}: {v}" for k, v in GRADIENTS.items()),
                          default="a1")  # fmt: skip
    checkpointing: bool = _help("Recompute each UNet call and the VAE decoder in the backward pass.", default=True)
    negative_prompt: str = _help("Prompt of the unconditional branch of classifier-free guidance.", default="")
    height: int | None = _help("Image height in pixels; None = the model's native size.", default=None)
    width: int | None = _help("Image width in pixels; None = the model's native size.", default=None)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        coerce_numbers(self)
        check_containers(self)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {self.steps!r}")
        gs = self.guidance_scale
        if isinstance(gs, bool) or not isinstance(gs, int | float) or not math.isfinite(gs) or gs < 0:
            raise ValueError(f"guidance_scale: expected a finite number >= 0, got {gs!r}")
        ok = [AUTO_SCHEDULER, *(k for k, s in SCHEDULERS.items() if not s.stochastic)]
        if self.scheduler not in ok:
            raise ValueError(f"scheduler={self.scheduler!r}: DFT needs a deterministic scheduler; valid values: "
                             f"{', '.join(ok)}")  # fmt: skip
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient={self.gradient!r} is not known; valid values: {', '.join(GRADIENTS)}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt: expected a str, got {type(self.negative_prompt).__name__}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}: expected None or an int >= 1 (pixels), got {v!r}")

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


# ------------------------------------------------------------------------------------------- coefficients
def check_model(adapter, config: DFTConfig) -> None:
    """ValueError unless `config` can run on `adapter`: a flow model (SD3, FLUX) needs the flow-Euler sampler
    (scheduler "flow_euler" or "auto") and the "solver" or "exact" gradient; epsilon / v models any other."""
    flow = getattr(adapter, "prediction_type", None) == "flow"
    resolve_scheduler(adapter, config.scheduler, deterministic=True)
    f = int(adapter.vae_scale_factor) * int(getattr(adapter, "patch_size", 1))
    for name, v in zip(("height", "width"), _size(adapter, config)):
        if v % f:
            raise ValueError(f"{name}={v} must be a multiple of {f} for {adapter.family!r} (VAE factor x patch size)")
    if flow and config.gradient == "a1":
        raise ValueError(
            f"gradient='a1' is not defined for {adapter.family!r}: Algorithm A.1's C_t = 1/A_t comes from a DDPM "
            "training schedule (betas, alphas_cumprod), which a flow-matching model does not have. Use "
            "gradient='solver' (the flow-Euler sampler is z_0 = z_T + sum_i (sigma_i+1 - sigma_i) v_i, so A_t = 1 "
            "is exact for it) or 'exact'"
        )


def _scheduler(adapter, config: DFTConfig, device=None):
    name = resolve_scheduler(adapter, config.scheduler, auto="dpmpp_2m")  # "auto": dpmpp_2m, flow_euler (SD3 / FLUX)
    return prepare_scheduler(adapter, name, config.steps, _size(adapter, config), device)


def solver_coefficients(adapter, config: DFTConfig) -> torch.Tensor:
    """a_i: the coefficient of step i's model output in the final latent z_0 ([steps] float64).

    Every step is linear in (latent, model output), so a_i = d z_0 / d eps_i for a constant eps_i; computed by
    autograd on a 1-pixel run of the scheduler in float64 (the latent path is kept, as in `generate`)."""
    sch = _scheduler(adapter, config, device="cpu")
    n = len(sch.timesteps)
    with torch.enable_grad():  # also when called under no_grad / inference mode
        e = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        z = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
        for i, t in enumerate(sch.timesteps):
            z = sch.step(e[i].reshape(1, 1, 1, 1) + 0 * z, t, z, return_dict=False)[0]
        (g,) = torch.autograd.grad(z.sum(), e)
    return g.detach()


def a1_coefficients(adapter, config: DFTConfig) -> torch.Tensor:
    """Algorithm A.1's C_i = 1/A_{t_i} = sqrt(abar_t) sqrt(1 - abar_t) / beta_t at the sampler's timesteps (training
    schedule), divided by their geometric mean ([steps] float64)."""
    ns = adapter.noise_scheduler
    abar = ns.alphas_cumprod.double().cpu()
    betas = ns.betas.double().cpu()
    sch = _scheduler(adapter, config, device="cpu")
    t = sch.timesteps.long().clamp(0, len(abar) - 1)
    c = abar[t].sqrt() * (1 - abar[t]).sqrt() / betas[t]
    return c / c.log().mean().exp()


def grad_coefficients(adapter, config: DFTConfig) -> torch.Tensor | None:
    """The per-step gradient multipliers C_i of `config.gradient` ([steps] float64), or None for "exact"."""
    check_model(adapter, config)
    if config.gradient == "exact":
        return None
    if config.gradient == "a1":
        return a1_coefficients(adapter, config)
    return 1.0 / solver_coefficients(adapter, config).abs()


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient x c backward (A.1's `grad_hook(g: g * C[i])`)."""

    @staticmethod
    def forward(ctx, x, c: float):
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.c, None


def scale_grad(x: torch.Tensor, c: float) -> torch.Tensor:
    return _ScaleGrad.apply(x, float(c))


# ----------------------------------------------------------------------------------------------- generation
def _size(adapter, config: DFTConfig) -> tuple[int, int]:
    native = int(getattr(adapter, "native_size", 0) or 0)
    return config.height or native, config.width or native


def _unet(adapter, x, t, embeds, pooled, time_ids, guidance):
    return adapter.predict(x, t, Conditioning(embeds, pooled, time_ids, guidance)).float()


def generate(
    adapter,
    prompts: Sequence[str],
    noise: torch.Tensor,
    config: DFTConfig,
    *,
    output: str = "images",
    trajectory: list | None = None,
) -> torch.Tensor:
    """Generate one image per prompt from `noise` ([N, C, h, w] standard normal, e.g. `sampling.initial_noise`),
    differentiably (module docstring). output: "images" ([N, 3, H, W] in [0, 1]) or "latents" (z_0).

    Gradients flow to whatever requires them (LoRA, text encoder, a soft prefix) when autograd is enabled; under
    `torch.no_grad()` this is a plain sampler. trajectory: if a list is given, the detached UNet input latents z_i
    of every step are appended to it (for tests and analysis)."""
    config.validate()
    check_model(adapter, config)
    if output not in ("images", "latents"):
        raise ValueError(f"output={output!r}; valid values: images, latents")
    if isinstance(prompts, str) or len(prompts) != noise.shape[0]:
        raise ValueError(f"prompts: expected a list of {noise.shape[0]} prompts (one per noise row)")
    device = adapter.device
    sch = _scheduler(adapter, config)
    coef = grad_coefficients(adapter, config)
    h, w = _size(adapter, config)
    cond = adapter.encode_prompt(list(prompts), h, w)
    gs = float(config.guidance_scale)
    if cond.guidance is not None:  # guidance-distilled model (FLUX.1-dev): the scale is an input
        cond = Conditioning(cond.embeds, cond.pooled, cond.time_ids, torch.full_like(cond.guidance, gs))
    guided = config.guidance_scale != 1 and cond.guidance is None
    if guided:
        uncond = adapter.encode_prompt([config.negative_prompt], h, w).repeat(len(prompts))
        cond = Conditioning.cat([uncond, cond])
    z = noise.to(device=device, dtype=torch.float32) * getattr(sch, "init_noise_sigma", 1.0)
    ckpt = config.checkpointing and torch.is_grad_enabled()
    for i, t in enumerate(sch.timesteps):
        z_in = z if coef is None else z.detach()  # B_t = I: the UNet sees the detached latent
        if trajectory is not None:
            trajectory.append(z_in.detach().clone())
        x_in = torch.cat([z_in, z_in]) if guided else z_in
        x_in = scale_model_input(sch, x_in, t)
        args = (adapter, x_in, t, cond.embeds, cond.pooled, cond.time_ids, cond.guidance)
        pred = checkpoint(_unet, *args, use_reentrant=False) if ckpt else _unet(*args)
        if guided:
            pu, pc = pred.chunk(2)
            pred = pu + gs * (pc - pu)
        if coef is not None and pred.requires_grad:
            pred = scale_grad(pred, float(coef[i]))
        z = sch.step(pred, t, z, return_dict=False)[0]
    if output == "latents":
        return z
    if ckpt:
        return checkpoint(adapter.decode, z, use_reentrant=False)
    return adapter.decode(z)


def describe(adapter, config: DFTConfig) -> dict[str, Any]:
    """The timesteps, solver coefficients a_i and gradient multipliers C_i (for logs and docs)."""
    sch = _scheduler(adapter, config, device="cpu")
    a = solver_coefficients(adapter, config)
    c = grad_coefficients(adapter, config)
    return {
        "timesteps": [float(t) if float(t) != int(t) else int(t) for t in sch.timesteps],
        "a": [float(v) for v in a],
        "C": None if c is None else [float(v) for v in c],
        "C_times_a": None if c is None else [float(v) for v in c * a],
    }
