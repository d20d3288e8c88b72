"""Seeded, batched text-to-image sampling against the `ModelAdapter` interface.

    from popalign_core.models.sampling import SamplerConfig, sample
    images = sample(adapter, [("a photo of a doctor", 0), ("a photo of a doctor", 1)], SamplerConfig(steps=25))
    # images: [2, 3, H, W] float32 in [0, 1], on the CPU, in request order

Reproducibility contract:
- A request is a (prompt, index) pair. Its initial noise comes from its own CPU `torch.Generator` seeded with
  `derive_seed(config.seed, prompt, index)`; stochastic schedulers (euler_ancestral, ddpm, ddim with eta > 0) draw
  their step noise from the same per-request generator (diffusers schedulers accept a list of generators, one per
  batch row). So a request's image does not depend on which other requests share its batch, on the batch size or on
  the request order, up to floating-point differences of batched matrix products. Duplicated requests are computed
  once and give bit-identical outputs.
- Measured batch invariance (max abs difference of [0, 1] images between batch sizes 1 and 2 or 5, 5 requests, the
  tiny seeded test models of `popalign_core.models.tiny`, CPU float32, torch 2.14.1, diffusers 0.42.1, ddim, guidance
  7.5, 6-10 steps): sd15 (epsilon) 2.2e-6, sd2 (v-prediction) 3.9e-6, sdxl 2.1e-6; stochastic steps on sd15
  (euler_ancestral 3.6e-6, ddpm 3.2e-6, ddim eta=1 3.1e-6); all eight schedulers on sd15/sd2 stay below 8e-6.
  The tests hold every family to 1e-4. Bigger models, GPUs (TF32, cuBLAS/cuDNN kernels chosen by batch shape) and
  half precision give larger differences; measure them on the target setup with `batch_invariance_tolerance`.
- Agreement with diffusers: with `initial_noise(...)` as `latents=` (and, for stochastic schedulers, the same
  per-request generators as `generator=`), StableDiffusionPipeline / StableDiffusionXLPipeline give bit-identical
  images (max difference 0.0 on the tiny models for ddim on sd15/sd2/sdxl and every scheduler on sd15/sdxl).
- `derive_seed` is part of the data format: data sets generated later record (seed, prompt, index) and rely on it
  never changing. Its encoding is documented in its docstring and pinned by golden-value tests.

Classifier-free guidance runs the unconditional branch (`negative_prompt`) in the same UNet batch as the conditional
one: pred = uncond + guidance_scale * (cond - uncond), as the diffusers pipelines do. With guidance_scale == 1 the
unconditional pass is skipped (the result is the conditional prediction). The sampler uses the adapter as currently
enabled; for reference-model images wrap the call in `with adapter.reference():`.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from popalign_core.common.fields import help_field as _help
from popalign_core.common.userinput import check_containers, coerce_numbers
from popalign_core.models.adapter import Conditioning
from popalign_core.models.flow import flux_mu, sampling_sigmas

__all__ = [
    "OUTPUTS",
    "SCHEDULERS",
    "SCHEDULER_CHOICES",
    "SEED_ENCODING_VERSION",
    "SamplerConfig",
    "SchedulerSpec",
    "batch_invariance_tolerance",
    "build_scheduler",
    "prepare_scheduler",
    "resolve_scheduler",
    "derive_seed",
    "initial_noise",
    "resolve_size",
    "sample",
]

# ------------------------------------------------------------------------------------------------------ seeds
SEED_ENCODING_VERSION = "popalign-seed-v1"
_SEED_MASK = (1 << 63) - 1


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def derive_seed(global_seed: int, prompt: str, index: int) -> int:
    """The per-request seed for (global seed, prompt, index): a 63-bit non-negative int, stable forever.

    Encoding (version "popalign-seed-v1"), independent of the Python process (never uses the salted `hash`):

        payload = UTF-8 bytes of f"popalign-seed-v1\\n{global_seed}\\n{index}\\n{prompt}"
        seed    = int.from_bytes(sha256(payload).digest()[:8], "big") & (2**63 - 1)

    global_seed and index are written in decimal (no sign, no leading zeros); the prompt comes last, verbatim (no
    Unicode normalisation, no stripping), so the encoding is unambiguous whatever the prompt contains.
    Any change to this function must come with a new version string and a new function; data sets depend on it.
    """
    if not _is_int(global_seed) or global_seed < 0:
        raise ValueError(f"global_seed: expected a non-negative int, got {global_seed!r}")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a str, got {type(prompt).__name__}")
    if not _is_int(index) or index < 0:
        raise ValueError(f"index: expected a non-negative int, got {index!r}")
    try:
        payload = f"{SEED_ENCODING_VERSION}\n{global_seed}\n{index}\n{prompt}".encode()
    except UnicodeEncodeError as e:  # lone surrogates
        raise ValueError(f"prompt: not encodable as UTF-8 ({e})") from None
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") & _SEED_MASK


# ------------------------------------------------------------------------------------------------- schedulers
@dataclass(frozen=True, eq=False)
class SchedulerSpec:
    """How to build one sampling scheduler from a model's training-schedule config.

    The training config (betas, prediction type, timestep spacing/offset, set_alpha_to_one, ...) goes through
    diffusers' `from_config`, exactly as when swapping a pipeline's scheduler; `overrides` then pins the keys that
    define the named algorithm, so that flags carried over from the model's original scheduler config (e.g.
    use_karras_sigmas, algorithm_type) cannot silently change what the name means.
    """

    class_name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    help: str = ""
    flow: bool = False  # a flow-matching sampler (velocity models: SD3, FLUX); the others need epsilon / v models

    def __call__(self, train_config: Mapping[str, Any]):
        """A fresh diffusers scheduler for `train_config` (e.g. `adapter.noise_scheduler.config`)."""
        import diffusers

        cls = getattr(diffusers, self.class_name)
        return cls.from_config(dict(train_config), **dict(self.overrides))


_NO_SIGMA_SCHEDULES = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_DPMPP_2M = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
}

# Name -> SchedulerSpec (keys feed CLI choices and node dropdowns). Notes on diffusers behaviour, kept as is:
# - ddim follows the model's set_alpha_to_one (SD: False, so the last step lands on alphas_cumprod[0], not on x0);
# - ddim computes prev_timestep = t - T // steps, which only matches "leading"/"trailing" spacing; with a model config
#   that sets timestep_spacing="linspace" its steps are inconsistent (diffusers' DDIMScheduler does the same).
SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler", {}, help="DDIM; deterministic with eta=0 (stochastic with eta > 0)"),
    "euler": SchedulerSpec("EulerDiscreteScheduler", dict(_NO_SIGMA_SCHEDULES), help="Euler (deterministic)"),
    "euler_ancestral": SchedulerSpec(
        "EulerAncestralDiscreteScheduler", {}, stochastic=True, help="Euler ancestral (fresh noise every step)"
    ),
    "dpmpp_2m": SchedulerSpec(
        "DPMSolverMultistepScheduler", {**_DPMPP_2M, **_NO_SIGMA_SCHEDULES}, help="DPM-Solver++(2M)"
    ),
    "dpmpp_2m_karras": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        {**_DPMPP_2M, **_NO_SIGMA_SCHEDULES, "use_karras_sigmas": True},
        help="DPM-Solver++(2M) with Karras sigmas",
    ),
    "unipc": SchedulerSpec(
        "UniPCMultistepScheduler",
        {"solver_order": 2, "predict_x0": True, "solver_type": "bh2", "use_flow_sigmas": False, **_NO_SIGMA_SCHEDULES},
        help="UniPC (bh2, order 2)",
    ),
    "ddpm": SchedulerSpec("DDPMScheduler", {}, stochastic=True, help="DDPM ancestral sampling"),
    "heun": SchedulerSpec(
        "HeunDiscreteScheduler", dict(_NO_SIGMA_SCHEDULES), help="Heun (2nd order, two UNet passes per step)"
    ),
    "flow_euler": SchedulerSpec(
        "FlowMatchEulerDiscreteScheduler",
        {"stochastic_sampling": False, "invert_sigmas": False, **_NO_SIGMA_SCHEDULES},
        help="flow-matching Euler with the model's shift (SD3, FLUX): x <- x + (sigma' - sigma) v",
        flow=True,
    ),
}
#: `SamplerConfig.scheduler` value that picks the model's default: flow_euler for flow models, ddim for the others
AUTO_SCHEDULER = "auto"
SCHEDULER_CHOICES = (AUTO_SCHEDULER, *SCHEDULERS)


def build_scheduler(name: str, train_config: Mapping[str, Any]):
    """Build the sampling scheduler `name` (a key of SCHEDULERS) from a training-schedule config."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is not a known scheduler; valid values: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](train_config)


def scale_model_input(scheduler, x: torch.Tensor, t) -> torch.Tensor:
    """The scheduler's input scaling (flow schedulers have none: the model takes x_sigma as it is)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


def _is_flow(adapter) -> bool:
    return getattr(adapter, "prediction_type", None) == "flow"


def resolve_scheduler(adapter, name: str, auto: str = "ddim", deterministic: bool = False) -> str:
    """The scheduler `name` means for `adapter`: "auto" is flow_euler for a flow model, `auto` otherwise; a flow
    sampler on an epsilon / v model or the reverse is a ValueError naming the valid ones (only the deterministic
    ones with `deterministic`, as DFT needs)."""
    flow = _is_flow(adapter)
    if name == AUTO_SCHEDULER:
        return "flow_euler" if flow else auto
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is not a known scheduler; valid values: {', '.join(SCHEDULER_CHOICES)}")
    if SCHEDULERS[name].flow != flow:
        ok = (k for k, v in SCHEDULERS.items() if v.flow == flow and not (deterministic and v.stochastic))
        valid = [AUTO_SCHEDULER, *ok]
        kind = "a flow-matching model (velocity)" if flow else "an epsilon / v-prediction model"
        raise ValueError(
            f"scheduler={name!r} cannot sample {getattr(adapter, 'family', 'this model')!r}, {kind}; valid values: "
            + ", ".join(valid)
        )
    return name


def prepare_scheduler(adapter, name: str, steps: int, size: tuple[int, int], device=None):
    """A fresh scheduler `name` for `adapter` with its `steps` timesteps set. Flow models with a dynamic shift
    (FLUX) get the sigmas of FLUX.1's reference sampler and diffusers' FluxPipeline, linspace(1, 0, steps + 1)
    shifted with μ from the number of image tokens of an image of `size` (`models.flow.flux_mu`); SD3 gets the
    scheduler's own (diffusers' StableDiffusion3Pipeline)."""
    scheduler = build_scheduler(resolve_scheduler(adapter, name), adapter.noise_scheduler.config)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):  # FLUX: sigmas linspace(1, 0, steps + 1), shifted by mu
        f = int(adapter.vae_scale_factor) * int(getattr(adapter, "patch_size", 1))
        c = scheduler.config  # the model's own line (diffusers' scheduler_config / ComfyUI's ModelSamplingFlux)
        line = {"base": (c.base_image_seq_len, c.base_shift), "high": (c.max_image_seq_len, c.max_shift)}
        kwargs["mu"] = flux_mu((size[0] // f) * (size[1] // f), **line)
        kwargs["sigmas"] = sampling_sigmas(steps)[:-1].numpy()
        steps = None
    scheduler.set_timesteps(steps, device=device if device is not None else adapter.device, **kwargs)
    return scheduler


# ---------------------------------------------------------------------------------------------------- config
OUTPUTS = ("tensor", "latents")


@dataclass
class SamplerConfig:
    """Settings of `sample`. Validated on construction; call `validate()` again after mutating fields."""

    steps: int = _help("Number of sampling steps (scheduler inference steps).", default=25)
    guidance_scale: float = _help(
        "Classifier-free guidance scale (>= 0); 1 skips the unconditional pass, 0 gives the unconditional model. "
        "FLUX.1-dev takes it as its embedded guidance input instead (no unconditional pass).",
        default=7.5,
    )
    scheduler: str = _help(
        f"Sampling scheduler; one of: {', '.join(SCHEDULER_CHOICES)} (auto: ddim, or flow_euler for SD3 / FLUX).",
        default=AUTO_SCHEDULER,
    )
    height: int | None = _help(
        "Image height in pixels; None = the model's native size. Must be a multiple of the VAE factor.", default=None
    )
    width: int | None = _help(
        "Image width in pixels; None = the model's native size. Must be a multiple of the VAE factor.", default=None
    )
    negative_prompt: str = _help("Prompt of the unconditional branch of classifier-free guidance.", default="")
    batch_size: int = _help("Requests per UNet batch (the batch holds 2x this many rows with guidance).", default=8)
    seed: int = _help("Global seed; each request's seed is derive_seed(seed, prompt, index).", default=0)
    eta: float = _help(
        "DDIM eta (0 = deterministic DDIM); only the 'ddim' scheduler accepts a non-zero eta.", default=0.0
    )
    output: str = _help(
        "'tensor': images [N, 3, H, W] in [0, 1]; 'latents': final scaled latents [N, C, H/f, W/f].", default="tensor"
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field (model-independent checks; see also `resolve_size`)."""
        coerce_numbers(self)
        check_containers(self)
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {self.steps!r}")
        gs = self.guidance_scale
        if not isinstance(gs, int | float) or isinstance(gs, bool) or not math.isfinite(gs) or gs < 0:
            raise ValueError(f"guidance_scale: expected a finite number >= 0, got {gs!r}")
        if self.scheduler not in SCHEDULER_CHOICES:
            raise ValueError(
                f"scheduler={self.scheduler!r} is not a known scheduler; valid values: {', '.join(SCHEDULER_CHOICES)}"
            )
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name}: expected None or an int >= 1 (pixels), got {v!r}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt: expected a str, got {type(self.negative_prompt).__name__}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {self.batch_size!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {self.seed!r}")
        eta = self.eta
        if not isinstance(eta, int | float) or isinstance(eta, bool) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta: expected a finite number >= 0, got {eta!r}")
        if eta != 0 and self.scheduler != "ddim":
            raise ValueError(f"eta={eta!r}: only the 'ddim' scheduler takes eta; use eta=0 with {self.scheduler!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output={self.output!r} is not a known output; valid values: {', '.join(OUTPUTS)}")

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (for CLI arguments and node tooltips)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def resolve_size(adapter, config: SamplerConfig) -> tuple[int, int]:
    """(height, width) in pixels: the config's, or the model's native size; checked against the VAE factor times the
    model's patch size (2 for SD3 / FLUX)."""
    f = int(adapter.vae_scale_factor) * int(getattr(adapter, "patch_size", 1))
    native = int(getattr(adapter, "native_size", 0) or 0)
    out = []
    for name in ("height", "width"):
        v = getattr(config, name)
        if v is None:
            if native <= 0:
                raise ValueError(f"{name}: the adapter has no native_size; set {name} explicitly")
            v = native
        if v % f:
            what = "VAE scale factor" if f == int(adapter.vae_scale_factor) else "VAE factor x patch size"
            raise ValueError(f"{name}={v} must be a multiple of the {what} {f} (e.g. {max(f, v // f * f)})")
        out.append(v)
    return out[0], out[1]


def _check_requests(requests: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    if isinstance(requests, str | bytes) or not isinstance(requests, Sequence):
        raise ValueError(f"requests: expected a sequence of (prompt, index) pairs, got {type(requests).__name__}")
    if len(requests) == 0:
        raise ValueError("requests: expected at least one (prompt, index) pair, got an empty sequence")
    out = []
    for k, r in enumerate(requests):
        if not isinstance(r, tuple | list) or len(r) != 2:
            raise ValueError(f"requests[{k}]: expected a (prompt, index) pair, got {r!r}")
        prompt, index = r
        if not isinstance(prompt, str):
            raise ValueError(f"requests[{k}]: prompt must be a str, got {type(prompt).__name__}")
        if not _is_int(index) or index < 0:
            raise ValueError(f"requests[{k}]: index must be a non-negative int, got {index!r}")
        out.append((prompt, int(index)))
    return out


# --------------------------------------------------------------------------------------------------- sampling
def _generators(requests: Sequence[tuple[str, int]], seed: int) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(derive_seed(seed, p, i)) for p, i in requests]


def _draw_noise(generators: Sequence[torch.Generator], shape: tuple[int, int, int]) -> torch.Tensor:
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])


def initial_noise(adapter, requests: Sequence[tuple[str, int]], config: SamplerConfig) -> torch.Tensor:
    """The standard-normal initial noise `sample` starts from: [N, C, H/f, W/f] float32 on the CPU.

    Row k is the first draw of a CPU generator seeded with derive_seed(config.seed, *requests[k]) (before the
    scheduler's init_noise_sigma scaling). Pass it as `latents=` to a diffusers pipeline to reproduce `sample`.
    """
    requests = _check_requests(requests)
    config.validate()
    h, w = resolve_size(adapter, config)
    f = int(adapter.vae_scale_factor)
    return _draw_noise(_generators(requests, config.seed), (int(adapter.latent_channels), h // f, w // f))


def _sample_batch(
    adapter, requests: list[tuple[str, int]], config: SamplerConfig, size: tuple[int, int], uncond
) -> torch.Tensor:
    height, width = size
    f = int(adapter.vae_scale_factor)
    device = adapter.device
    n = len(requests)
    gens = _generators(requests, config.seed)
    latents = _draw_noise(gens, (int(adapter.latent_channels), height // f, width // f)).to(device)

    scheduler = prepare_scheduler(adapter, config.scheduler, config.steps, size, device)  # fresh for every batch
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers start at sigma = 1
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs: dict[str, Any] = {}
    if "generator" in step_params:
        step_kwargs["generator"] = gens  # one generator per row: step noise independent of the batch composition
    if "eta" in step_params:
        step_kwargs["eta"] = float(config.eta)
    elif config.eta != 0:  # validate() already forbids it; keep the guarantee local
        raise ValueError(f"eta: scheduler {config.scheduler!r} does not take eta")

    cond = adapter.encode_prompt([p for p, _ in requests], height, width)
    gs = float(config.guidance_scale)
    if cond.guidance is not None:  # guidance-distilled model (FLUX.1-dev): the scale is an input, no uncond pass
        cond = replace(cond, guidance=torch.full_like(cond.guidance, gs))
    guided = uncond is not None
    if guided:
        cond = Conditioning.cat([uncond.repeat(n), cond])

    for t in scheduler.timesteps:
        x_in = torch.cat([latents, latents]) if guided else latents
        x_in = scale_model_input(scheduler, x_in, t)
        pred = adapter.predict(x_in, t, cond).float()
        if guided:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + gs * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]

    if config.output == "latents":
        return latents.float().cpu()
    return adapter.decode(latents).float().cpu()


def sample(
    adapter,
    requests: Sequence[tuple[str, int]],
    config: SamplerConfig,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Generate one image (or latent) per (prompt, index) request, in request order.

    Returns float32 CPU tensors: images [N, 3, H, W] in [0, 1] (config.output == "tensor") or the final scaled
    latents [N, C, H/f, W/f] (config.output == "latents"). Requests are processed in batches of config.batch_size
    (duplicates are computed once). `progress(done, total)` is called after each batch with the number of requests
    finished so far and len(requests); an exception raised by it (e.g. a cancel) stops sampling.
    """
    if not isinstance(config, SamplerConfig):
        raise ValueError(f"config: expected a SamplerConfig, got {type(config).__name__}")
    requests = _check_requests(requests)
    config.validate()
    size = resolve_size(adapter, config)
    resolve_scheduler(adapter, config.scheduler)
    if config.steps > int(adapter.num_train_timesteps):
        raise ValueError(f"steps={config.steps} exceeds the model's num_train_timesteps={adapter.num_train_timesteps}")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress: expected a callable (done, total) or None, got {type(progress).__name__}")

    unique = list(dict.fromkeys(requests))  # first-occurrence order
    slot = {r: k for k, r in enumerate(unique)}
    multiplicity = [0] * len(unique)
    for r in requests:
        multiplicity[slot[r]] += 1

    total = len(requests)
    results: list[torch.Tensor] = []
    done = 0
    with torch.no_grad():
        uncond = None
        if config.guidance_scale != 1 and not getattr(adapter, "guidance_embeds", False):
            uncond = adapter.encode_prompt([config.negative_prompt], *size)
        for start in range(0, len(unique), config.batch_size):
            chunk = unique[start : start + config.batch_size]
            results.append(_sample_batch(adapter, chunk, config, size, uncond))
            done += sum(multiplicity[start : start + len(chunk)])
            if progress is not None:
                progress(done, total)
    out = torch.cat(results)
    if len(unique) != total:
        out = out[torch.tensor([slot[r] for r in requests])]
    return out


def batch_invariance_tolerance(adapter, config: SamplerConfig, requests: Sequence[tuple[str, int]]) -> float:
    """Max abs difference between `sample` outputs at batch size 1 and at batch size len(requests)."""
    requests = _check_requests(requests)
    config.validate()
    one = sample(adapter, requests, replace(config, batch_size=1))
    full = sample(adapter, requests, replace(config, batch_size=len(requests)))
    return float((one - full).abs().max())
