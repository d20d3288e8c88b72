"""Direct finetuning through the sampler (popalign_core.dal.dft): forward parity with `sampling.sample`, the solver's
coefficients against finite differences, and the hooked (adjusted) gradient against an independent step-by-step
construction sum_i C_i a_i (d eps_i / d theta)^T dL/dz_0 on a tiny model."""

from __future__ import annotations

import pytest
import torch

from popalign_core.dal import dft
from popalign_core.models import sampling
from popalign_core.models.adapter import Conditioning
from popalign_core.models.tiny import get_dummy_adapter

REQ = [("a photo of a cat", 0), ("a photo of a dog", 1)]


@pytest.fixture(scope="module")
def adapter():
    ad = get_dummy_adapter("sd15", seed=0)
    ad.unet.requires_grad_(False)
    for enc in ad.text_encoders:
        enc.requires_grad_(False)
    return ad


def _noise(ad, steps=5, gs=3.0):
    return sampling.initial_noise(ad, REQ, sampling.SamplerConfig(steps=steps, guidance_scale=gs))


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "ddim", "euler"])
@pytest.mark.parametrize("gs", [1.0, 3.0])
def test_forward_is_the_sampler(adapter, scheduler, gs):
    cfg = dft.DFTConfig(steps=5, guidance_scale=gs, scheduler=scheduler)
    sc = sampling.SamplerConfig(steps=5, guidance_scale=gs, scheduler=scheduler, output="latents")
    with torch.no_grad():
        z = dft.generate(adapter, [p for p, _ in REQ], _noise(adapter), cfg, output="latents")
    torch.testing.assert_close(z, sampling.sample(adapter, REQ, sc), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "ddim", "euler", "unipc"])
def test_solver_coefficients_match_finite_differences(adapter, scheduler):
    cfg = dft.DFTConfig(steps=7, scheduler=scheduler)
    a = dft.solver_coefficients(adapter, cfg)
    gen = torch.Generator().manual_seed(0)
    outs = [torch.randn(1, 4, 3, 3, generator=gen, dtype=torch.float64) for _ in range(7)]
    z_t = torch.randn(1, 4, 3, 3, generator=gen, dtype=torch.float64)

    def run(eps):
        sch = dft._scheduler(adapter, cfg, device="cpu")
        z = z_t * sch.init_noise_sigma
        for e, t in zip(eps, sch.timesteps):
            z = sch.step(e, t, z, return_dict=False)[0]
        return z

    base = run(outs)
    for i in range(7):
        bumped = [o + (1.0 if k == i else 0.0) for k, o in enumerate(outs)]
        fd = run(bumped) - base  # linear in the outputs: a unit bump gives a_i exactly (diffusers steps in float32)
        torch.testing.assert_close(fd, torch.full_like(fd, float(a[i])), rtol=1e-5, atol=1e-5)
    assert (a < 0).all()


def test_a1_coefficients_by_hand(adapter):
    cfg = dft.DFTConfig(steps=4)
    ns = adapter.noise_scheduler
    ts = dft._scheduler(adapter, cfg, device="cpu").timesteps.tolist()
    raw = []
    for t in ts:
        ab, beta = float(ns.alphas_cumprod[t]), float(ns.betas[t])
        raw.append(1.0 / ((1 / ab**0.5) * beta / (1 - ab) ** 0.5))  # C_i = 1 / A_t (Algorithm A.1)
    gm = torch.tensor(raw, dtype=torch.float64).log().mean().exp()
    torch.testing.assert_close(dft.a1_coefficients(adapter, cfg), torch.tensor(raw, dtype=torch.float64) / gm)
    assert float(dft.a1_coefficients(adapter, cfg).log().sum()) == pytest.approx(0.0, abs=1e-9)  # geometric mean 1
    s = dft.grad_coefficients(adapter, dft.DFTConfig(steps=4, gradient="solver"))
    torch.testing.assert_close(s * dft.solver_coefficients(adapter, cfg), torch.full((4,), -1.0, dtype=torch.float64))
    assert dft.grad_coefficients(adapter, dft.DFTConfig(gradient="exact")) is None


def _loss_weights(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(5))


def _trainable(ad):
    params = [p for n, p in ad.unet.named_parameters() if "attn2" in n or "conv_out" in n]
    for p in params:
        p.requires_grad_(True)
    return params


@pytest.mark.parametrize("gradient", ["a1", "solver"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_adjusted_gradient_matches_step_by_step_construction(adapter, gradient, checkpointing):
    cfg = dft.DFTConfig(steps=5, guidance_scale=3.0, gradient=gradient, checkpointing=checkpointing)
    prompts = [p for p, _ in REQ]
    noise = _noise(adapter)
    params = _trainable(adapter)
    try:
        # hooked gradient (what training uses)
        images = dft.generate(adapter, prompts, noise, cfg)
        w = _loss_weights(images.shape)
        hooked = torch.autograd.grad((images * w).sum(), params)

        # independent construction: trajectory, dL/dz_0, then one VJP per step
        traj: list[torch.Tensor] = []
        with torch.no_grad():
            z0 = dft.generate(adapter, prompts, noise, cfg, output="latents", trajectory=traj)
        z0 = z0.detach().requires_grad_(True)
        (g,) = torch.autograd.grad((adapter.decode(z0) * w).sum(), z0)
        a = dft.solver_coefficients(adapter, cfg)
        c = dft.grad_coefficients(adapter, cfg)
        sch = dft._scheduler(adapter, cfg)
        cond = adapter.encode_prompt(prompts)
        uncond = adapter.encode_prompt([""]).repeat(len(prompts))
        both = Conditioning.cat([uncond, cond])
        built = [torch.zeros_like(p) for p in params]
        assert len(traj) == len(sch.timesteps) == 5
        for i, t in enumerate(sch.timesteps):
            x = sch.scale_model_input(torch.cat([traj[i], traj[i]]), t)
            pu, pc = adapter.predict(x, t, both).float().chunk(2)
            eps = pu + 3.0 * (pc - pu)
            vjp = torch.autograd.grad(eps, params, grad_outputs=float(c[i] * a[i]) * g)
            built = [b + v for b, v in zip(built, vjp)]
        for h, b in zip(hooked, built):
            torch.testing.assert_close(h, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))  # float32 sums
        assert any(float(h.abs().max()) > 0 for h in hooked)
    finally:
        for p in params:
            p.requires_grad_(False)


def test_exact_gradient_is_the_true_derivative(adapter):
    """`exact` = plain backprop through the chain: its directional derivative matches a central difference."""
    ad = get_dummy_adapter("sd15", seed=0)
    ad.unet.double()
    ad.vae.double()
    ad.text_encoders[0].double()
    ad.unet.requires_grad_(False)
    p = ad.unet.conv_out.weight
    p.requires_grad_(True)
    cfg = dft.DFTConfig(steps=4, guidance_scale=2.0, gradient="exact", checkpointing=False)
    noise = _noise(ad, steps=4, gs=2.0).double()
    prompts = [pp for pp, _ in REQ]
    w = _loss_weights((2, 3, 32, 32)).double()

    def loss():
        return (dft.generate(ad, prompts, noise, cfg) * w).sum()

    (grad,) = torch.autograd.grad(loss(), p)
    d = torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        p.add_(h * d)
        up = float(loss())
        p.sub_(2 * h * d)
        down = float(loss())
        p.add_(h * d)
    assert float((grad * d).sum()) == pytest.approx((up - down) / (2 * h), rel=1e-4)
    # the adjusted gradients are different directions
    adj = dft.DFTConfig(steps=4, guidance_scale=2.0, gradient="solver", checkpointing=False)
    (g_adj,) = torch.autograd.grad((dft.generate(ad, prompts, noise, adj) * w).sum(), p)
    assert not torch.allclose(g_adj, grad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps: expected an int >= 1"),
        ({"guidance_scale": -1}, "guidance_scale: expected a finite number >= 0"),
        ({"scheduler": "euler_ancestral"}, "DFT needs a deterministic scheduler"),
        ({"scheduler": "nope"}, "DFT needs a deterministic scheduler"),
        ({"gradient": "adjusted"}, "gradient='adjusted' is not known; valid values: a1, solver, exact"),
        ({"checkpointing": 2}, "checkpointing=2 is invalid: expected true or false"),
        ({"height": 0}, "height: expected None or an int >= 1"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dft.DFTConfig(**kwargs)


def test_generate_checks_prompts(adapter):
    with pytest.raises(ValueError, match="prompts: expected a list of 2 prompts"):
        dft.generate(adapter, ["only one"], _noise(adapter), dft.DFTConfig(steps=2))
    with pytest.raises(ValueError, match="output='png'"):
        dft.generate(adapter, ["a", "b"], _noise(adapter), dft.DFTConfig(steps=2), output="png")
