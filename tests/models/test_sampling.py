"""Tests of the seeded batched sampler (popalign_core.models.sampling)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import fields, replace

import pytest
import torch

from popalign_core.models.adapter import Conditioning
from popalign_core.models.sampling import (
    OUTPUTS,
    SCHEDULERS,
    SamplerConfig,
    batch_invariance_tolerance,
    build_scheduler,
    derive_seed,
    initial_noise,
    sample,
)
from popalign_core.models.tiny import get_dummy_adapter, get_dummy_pipeline, tiny_scheduler_config

REQUESTS = [
    ("a photo of a doctor", 0),
    ("a photo of a doctor", 1),
    ("a photo of a nurse", 0),
    ("an engineer at work", 3),
    ("", 2),
]
TOL = 1e-4  # on [0, 1] images


@pytest.fixture(scope="module")
def adapters():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = get_dummy_adapter(family)
        return cache[family]

    return get


def _cfg(**kw) -> SamplerConfig:
    return SamplerConfig(**{"steps": 4, **kw})


# ------------------------------------------------------------------------------------------------- derive_seed
# (global_seed, prompt, index) -> seed, computed by hand from the documented encoding:
# sha256(b"popalign-seed-v1\n{global_seed}\n{index}\n{prompt}") -> first 8 bytes big-endian, top bit cleared.
# The comment gives the first 8 digest bytes; e.g. 0xb58b7378d426159c & (2**63 - 1) = 0x358b7378d426159c.
GOLDEN = [
    ((0, "", 0), 7218179864074578770),  # 642c2057c30aeb52
    ((0, "a photo of a doctor", 0), 954393501745545704),  # 0d3eafd54f7c01e8
    ((0, "a photo of a doctor", 1), 631928772576177804),  # 08c50fdedcc06e8c
    ((1, "a photo of a doctor", 0), 3858304468565497244),  # b58b7378d426159c (top bit cleared)
    ((42, "\u00c4rztin, \u533b\u751f \U0001fa7a", 7), 8003292045791162866),  # 6f1167b65f1771f2
    ((2**40 + 3, "line1\nline2", 123456789), 902372218371957057),  # 0c85dec06b3de141
]


@pytest.mark.parametrize(("args", "expected"), GOLDEN)
def test_derive_seed_golden_values(args, expected):
    assert derive_seed(*args) == expected


@pytest.mark.parametrize(("args", "expected"), GOLDEN)
def test_derive_seed_matches_documented_encoding(args, expected):
    global_seed, prompt, index = args
    payload = ("popalign-seed-v1\n" + str(global_seed) + "\n" + str(index) + "\n" + prompt).encode("utf-8")
    digest = hashlib.sha256(payload).digest()
    independent = int(digest[:8].hex(), 16) % (2**63)
    assert independent == expected == derive_seed(global_seed, prompt, index)


@pytest.mark.parametrize("hashseed", ["0", "4242"])
def test_derive_seed_stable_across_processes(hashseed):
    code = (
        "import json, sys; from popalign_core.models.sampling import derive_seed; "
        "cases = json.loads(sys.stdin.read()); print(json.dumps([derive_seed(*c) for c in cases]))"
    )
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    res = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([list(a) for a, _ in GOLDEN]),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert json.loads(res.stdout) == [e for _, e in GOLDEN]


def test_derive_seed_range_and_sensitivity():
    seeds = {derive_seed(s, p, i) for s in (0, 1) for p in ("a", "b", "a ", "A") for i in range(5)}
    assert len(seeds) == 2 * 4 * 5
    assert all(0 <= s < 2**63 for s in seeds)
    # no ambiguity between fields: the prompt cannot impersonate the index
    assert derive_seed(0, "1\nx", 0) != derive_seed(0, "x", 1)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, "a", 0), "global_seed"),
        ((0, "a", -1), "index"),
        ((0, b"a", 0), "prompt"),
        ((True, "a", 0), "global_seed"),
        ((0, "a", 1.0), "index"),
        ((0, "\ud800", 0), "prompt"),
    ],
)
def test_derive_seed_rejects_invalid_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        derive_seed(*args)


# ----------------------------------------------------------------------------------------------- invariance
@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_batch_size_invariance(adapters, family):
    adapter = adapters(family)
    cfg = _cfg(steps=6)
    outs = {bs: sample(adapter, REQUESTS, replace(cfg, batch_size=bs)) for bs in (1, 2, 5)}
    assert outs[1].shape == (5, 3, 32, 32) and outs[1].dtype == torch.float32
    diffs = {bs: float((outs[bs] - outs[1]).abs().max()) for bs in (2, 5)}
    print(f"\n{family}: max |batch size b - batch size 1| = {diffs}")
    assert max(diffs.values()) <= TOL
    # request order does not matter either
    perm = [3, 0, 4, 2, 1]
    permuted = sample(adapter, [REQUESTS[k] for k in perm], replace(cfg, batch_size=2))
    assert (permuted - outs[1][perm]).abs().max() <= TOL


def test_batch_invariance_tolerance_reports_small_value(adapters):
    tol = batch_invariance_tolerance(adapters("sd15"), _cfg(steps=3), REQUESTS[:3])
    print(f"\nsd15 batch_invariance_tolerance = {tol:.3g}")
    assert isinstance(tol, float) and 0.0 <= tol <= TOL


@pytest.mark.parametrize(("scheduler", "eta"), [("euler_ancestral", 0.0), ("ddpm", 0.0), ("ddim", 1.0)])
def test_stochastic_step_noise_is_per_request(adapters, scheduler, eta):
    adapter = adapters("sd15")
    cfg = _cfg(steps=4, scheduler=scheduler, eta=eta)
    reqs = REQUESTS[:3]
    one = sample(adapter, reqs, replace(cfg, batch_size=1))
    full = sample(adapter, reqs, replace(cfg, batch_size=3))
    print(f"\n{scheduler} eta={eta}: max |bs 3 - bs 1| = {float((one - full).abs().max()):.3g}")
    assert (one - full).abs().max() <= TOL
    # the step noise matters: a different global seed changes the result
    other = sample(adapter, reqs, replace(cfg, batch_size=3, seed=1))
    assert (other - full).abs().max() > 1e-3


def test_different_requests_differ_and_duplicates_are_identical(adapters):
    adapter = adapters("sd15")
    reqs = [
        ("a photo of a doctor", 0),
        ("a photo of a doctor", 1),
        ("a photo of a nurse", 0),
        ("a photo of a doctor", 0),
    ]
    calls = []
    out = sample(adapter, reqs, _cfg(batch_size=2), progress=lambda d, t: calls.append((d, t)))
    assert torch.equal(out[0], out[3])
    assert (out[0] - out[1]).abs().max() > 1e-3  # other index
    assert (out[0] - out[2]).abs().max() > 1e-3  # other prompt
    again = sample(adapter, reqs[:1], _cfg(batch_size=1))
    assert (again[0] - out[0]).abs().max() <= TOL
    assert calls == [(3, 4), (4, 4)]  # the duplicate is counted with its first occurrence
    other_seed = sample(adapter, reqs[:1], _cfg(seed=7))
    assert (other_seed[0] - out[0]).abs().max() > 1e-3


def test_progress_called_after_each_batch(adapters):
    calls = []
    sample(adapters("sd15"), REQUESTS, _cfg(steps=2, batch_size=2), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_progress_exception_stops_sampling(adapters):
    class Cancelled(Exception):
        pass

    calls = []

    def cancel(done, total):
        calls.append(done)
        raise Cancelled

    with pytest.raises(Cancelled):
        sample(adapters("sd15"), REQUESTS, _cfg(steps=2, batch_size=2), progress=cancel)
    assert calls == [2]


# ------------------------------------------------------------------------------------------------ schedulers
UNET_SCHEDULERS = [k for k, s in SCHEDULERS.items() if not s.flow]


@pytest.mark.parametrize("family", ["sd15", "sd2"])
@pytest.mark.parametrize("scheduler", UNET_SCHEDULERS)
def test_every_scheduler_runs(adapters, scheduler, family):
    adapter = adapters(family)
    out = sample(adapter, REQUESTS[:2], _cfg(steps=3, scheduler=scheduler))
    assert out.shape == (2, 3, 32, 32)
    assert torch.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    assert out.std() > 1e-3  # not a constant image


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_schedulers_keep_training_schedule_and_pin_algorithm(adapters, family):
    train = dict(adapters(family).noise_scheduler.config)
    # flags that a model's original scheduler config may carry; they must not change what a name means
    doctored = {**train, "use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}
    for name in SCHEDULERS:
        for cfg in (train, doctored):
            s = build_scheduler(name, cfg)
            assert s.config.prediction_type == train["prediction_type"]
            for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
                assert s.config[key] == train[key], (name, key)
            if "use_karras_sigmas" in inspect.signature(type(s).__init__).parameters:
                assert s.config.use_karras_sigmas == (name == "dpmpp_2m_karras"), name
    for name in ("dpmpp_2m", "dpmpp_2m_karras"):
        s = build_scheduler(name, doctored)
        assert (s.config.algorithm_type, s.config.solver_order) == ("dpmsolver++", 2)
    assert build_scheduler("ddim", train).config.set_alpha_to_one is False  # carried from the model config


class GaussianOracle:
    """A ModelAdapter whose `predict` is the exact denoiser of Gaussian data N(MU, SD^2) (no network).

    Any correct sampler maps N(0, I) noise to (approximately) N(MU, SD^2), whatever the prediction type.
    """

    MU, SD = 0.5, 0.5
    family = "sd15"
    latent_channels = 4
    vae_scale_factor = 8
    native_size = 64
    num_train_timesteps = 1000
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, prediction_type: str):
        from diffusers import DDPMScheduler

        self.prediction_type = prediction_type
        self.noise_scheduler = DDPMScheduler.from_config(
            dict(tiny_scheduler_config("sd15"), prediction_type=prediction_type)
        )
        ac = self.noise_scheduler.alphas_cumprod.double()
        self.log_sigmas = ((1 - ac) / ac).sqrt().log()
        self.encoded = []

    def encode_prompt(self, prompts, height=None, width=None):
        self.encoded.append(list(prompts))
        return Conditioning(embeds=torch.zeros(len(prompts), 1, 1))

    def predict(self, x, t, cond):
        t = float(t)  # fractional timesteps (Karras sigmas): log-sigma interpolation, as diffusers does
        lo = min(int(t), 998)
        w = t - lo
        s2 = ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]).exp() ** 2
        a, s = (1 / (1 + s2)).sqrt(), (s2 / (1 + s2)).sqrt()
        x = x.double()
        x0 = self.MU + a * self.SD**2 / (a * a * self.SD**2 + s * s) * (x - a * self.MU)
        eps = (x - a * x0) / s
        return (eps if self.prediction_type == "epsilon" else a * eps - s * x0).float()

    def decode(self, z):
        return z.clamp(0, 1)

    def reference(self):
        return nullcontext()


class FlowGaussianOracle(GaussianOracle):
    """The exact velocity of Gaussian data N(MU, SD^2) under x = (1 - sigma) x0 + sigma eps (sigma = t / 1000):
    with d = (1 - sigma)^2 SD^2 + sigma^2 and r = x - (1 - sigma) MU, E[x0|x] = MU + (1 - sigma) SD^2 r / d and
    E[eps|x] = sigma r / d, so v = E[eps|x] - E[x0|x]."""

    family = "sd3"
    patch_size = 1

    def __init__(self, shift: float = 3.0):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.prediction_type = "flow"
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        self.encoded = []

    def predict(self, x, t, cond):
        sig = float(t) / 1000
        x = x.double()
        d = (1 - sig) ** 2 * self.SD**2 + sig**2
        r = x - (1 - sig) * self.MU
        return (sig * r / d - (self.MU + (1 - sig) * self.SD**2 * r / d)).float()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_samples_the_target_distribution(shift):
    """flow_euler ("auto" on a flow model) maps N(0, I) to N(MU, SD^2) with the exact velocity; ddim is refused."""
    reqs = [(f"p{k}", k) for k in range(16)]
    cfg = SamplerConfig(steps=100, output="latents", batch_size=16, guidance_scale=3.0)
    out = sample(FlowGaussianOracle(shift), reqs, cfg)
    mean, std = float(out.mean()), float(out.std())
    assert abs(mean - GaussianOracle.MU) < 0.04 and abs(std - GaussianOracle.SD) < 0.04
    with pytest.raises(ValueError, match="scheduler='ddim' cannot sample 'sd3', a flow-matching model"):
        sample(FlowGaussianOracle(shift), reqs, SamplerConfig(steps=2, scheduler="ddim"))
    with pytest.raises(ValueError, match="scheduler='flow_euler' cannot sample 'sd15', an epsilon / v-prediction"):
        sample(GaussianOracle("epsilon"), reqs, SamplerConfig(steps=2, scheduler="flow_euler"))


@pytest.mark.parametrize("scheduler", UNET_SCHEDULERS)
def test_scheduler_samples_target_distribution_eps_and_v(scheduler):
    reqs = [(f"p{k}", k) for k in range(16)]
    cfg = SamplerConfig(steps=100, scheduler=scheduler, output="latents", batch_size=16, guidance_scale=3.0)
    eps = sample(GaussianOracle("epsilon"), reqs, cfg)
    v = sample(GaussianOracle("v_prediction"), reqs, cfg)
    # the same model in eps or v parameterisation gives the same samples
    assert (eps - v).abs().max() < 1e-4
    mean, std = float(eps.mean()), float(eps.std())
    print(f"\n{scheduler}: sample mean {mean:.4f} std {std:.4f} (target {GaussianOracle.MU}, {GaussianOracle.SD})")
    assert abs(mean - GaussianOracle.MU) < 0.04 and abs(std - GaussianOracle.SD) < 0.04


# ----------------------------------------------------------------------------------- agreement with diffusers
@pytest.mark.parametrize(
    ("family", "scheduler"), [("sd15", "ddim"), ("sd2", "ddim"), ("sdxl", "ddim"), ("sd15", "euler_ancestral")]
)
def test_matches_diffusers_pipeline(family, scheduler):
    from diffusers import EulerAncestralDiscreteScheduler

    from popalign_core.models.diffusers_adapter import DiffusersAdapter

    pipe = get_dummy_pipeline(family)  # its own scheduler is a DDIMScheduler
    pipe.set_progress_bar_config(disable=True)
    if scheduler == "euler_ancestral":  # swapped the documented diffusers way, independently of SCHEDULERS
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    adapter = DiffusersAdapter.from_pipeline(pipe, family=family)
    reqs = REQUESTS[:3]
    cfg = _cfg(steps=5, scheduler=scheduler, guidance_scale=7.5)
    ours = sample(adapter, reqs, cfg)
    noise = initial_noise(adapter, reqs, cfg)
    # the pipeline's step noise comes from the same per-request generators, advanced past the initial draw
    gens = [torch.Generator().manual_seed(derive_seed(cfg.seed, p, i)) for p, i in reqs]
    for g in gens:
        torch.randn((1, *noise.shape[1:]), generator=g)
    ref = pipe(
        prompt=[p for p, _ in reqs],
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        height=32,
        width=32,
        latents=noise.clone(),
        generator=gens,
        output_type="pt",
    ).images
    diff = float((ours - ref).abs().max())
    print(f"\n{family}/{scheduler}: max |ours - diffusers pipeline| = {diff:.3g}")
    assert diff <= 1e-5


def test_guidance_scale_one_skips_unconditional_pass(adapters):
    adapter = adapters("sd15")
    rows = []
    original = adapter.predict

    def spy(x, t, cond):
        rows.append(x.shape[0])
        return original(x, t, cond)

    adapter.predict = spy
    try:
        out = sample(adapter, REQUESTS[:3], _cfg(steps=2, guidance_scale=1.0, negative_prompt="ugly"))
        assert rows == [3, 3]
        rows.clear()
        guided = sample(adapter, REQUESTS[:3], _cfg(steps=2, guidance_scale=1.5, negative_prompt="ugly"))
        assert rows == [6, 6]
    finally:
        del adapter.predict
    assert torch.isfinite(out).all() and (out - guided).abs().max() > 1e-4
    oracle = GaussianOracle("epsilon")
    sample(oracle, REQUESTS[:2], SamplerConfig(steps=2, guidance_scale=1.0, negative_prompt="ugly"))
    assert ["ugly"] not in oracle.encoded


def test_guidance_scale_one_matches_pipeline():
    from popalign_core.models.diffusers_adapter import DiffusersAdapter

    pipe = get_dummy_pipeline("sd2")
    pipe.set_progress_bar_config(disable=True)
    adapter = DiffusersAdapter.from_pipeline(pipe, family="sd2")
    cfg = _cfg(steps=3, guidance_scale=1.0)
    ours = sample(adapter, REQUESTS[:2], cfg)
    ref = pipe(
        prompt=[p for p, _ in REQUESTS[:2]],
        num_inference_steps=3,
        guidance_scale=1.0,
        latents=initial_noise(adapter, REQUESTS[:2], cfg),
        output_type="pt",
    ).images
    assert (ours - ref).abs().max() <= 1e-5


def test_latents_output_and_custom_size(adapters):
    adapter = adapters("sd15")
    cfg = _cfg(steps=2, height=48, width=32)
    images = sample(adapter, REQUESTS[:2], cfg)
    latents = sample(adapter, REQUESTS[:2], replace(cfg, output="latents"))
    assert images.shape == (2, 3, 48, 32) and latents.shape == (2, 4, 24, 16)
    with torch.no_grad():
        assert (adapter.decode(latents) - images).abs().max() <= TOL


def test_sdxl_non_native_size(adapters):
    out = sample(adapters("sdxl"), REQUESTS[:1], _cfg(steps=2, height=32, width=48))
    assert out.shape == (1, 3, 32, 48) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------ validation
def test_config_fields_have_help():
    assert set(SamplerConfig.help()) == {f.name for f in fields(SamplerConfig)}
    assert all(SamplerConfig.help().values())
    assert SamplerConfig().scheduler == "auto" and SamplerConfig().steps == 25 and OUTPUTS == ("tensor", "latents")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"scheduler": "plms"}, "scheduler.*valid values: auto, ddim"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"batch_size": 0}, "batch_size"),
        ({"height": 0}, "height"),
        ({"width": -32}, "width"),
        ({"seed": -1}, "seed"),
        ({"eta": -0.1}, "eta"),
        ({"eta": 0.5, "scheduler": "euler"}, "eta"),
        ({"output": "png"}, "output.*valid values: tensor, latents"),
        ({"negative_prompt": None}, "negative_prompt"),
    ],
)
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**kwargs)


def test_validate_catches_mutation():
    cfg = SamplerConfig()
    cfg.steps = 0
    with pytest.raises(ValueError, match="steps"):
        cfg.validate()


@pytest.mark.parametrize(
    ("requests", "cfg", "progress", "match"),
    [
        (REQUESTS, SamplerConfig(height=30), None, "height.*multiple of the VAE scale factor 8"),
        (REQUESTS, SamplerConfig(width=60), None, "width"),
        ([], SamplerConfig(), None, "requests"),
        ("a prompt", SamplerConfig(), None, "requests"),
        ([("a", -1)], SamplerConfig(), None, r"requests\[0\]"),
        ([("a", 0), ("b",)], SamplerConfig(), None, r"requests\[1\]"),
        ([(1, 0)], SamplerConfig(), None, r"requests\[0\]"),
        (REQUESTS, SamplerConfig(steps=1001, scheduler="euler"), None, "steps"),
        (REQUESTS, SamplerConfig(), "not callable", "progress"),
        (REQUESTS, {"steps": 3}, None, "config"),
    ],
)
def test_invalid_sample_arguments_raise_before_computation(requests, cfg, progress, match):
    oracle = GaussianOracle("epsilon")  # native 64 px, VAE factor 8
    with pytest.raises(ValueError, match=match):
        sample(oracle, requests, cfg, progress=progress)
    assert oracle.encoded == []


def test_vae_factor_checked_for_real_adapter(adapters):
    with pytest.raises(ValueError, match="height=33 must be a multiple of the VAE scale factor 2"):
        sample(adapters("sd15"), REQUESTS, SamplerConfig(height=33))
