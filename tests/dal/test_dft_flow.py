"""Direct finetuning through the flow-Euler sampler (SD3, FLUX): the sampler is z_0 = z_T + sum_i (sigma_i+1 -
sigma_i) v_i, so its solver coefficients are the sigma steps (checked by hand), the forward pass is `sampling.sample`,
the "solver" gradient (A_t = 1) equals the step-by-step construction -sum_i (d v_i / d theta)^T dL/dz_0, "exact" is
the true derivative, and "a1" (a DDPM-schedule rule) is refused with the reason."""

from __future__ import annotations

import pytest
import torch

from popalign_core.dal import dft
from popalign_core.models import sampling
from popalign_core.models.tiny import get_dummy_adapter

REQ = [("a photo of a doctor", 0), ("a photo of a nurse", 1)]
FAMILIES = ["sd3", "flux"]
FAMILIES_FAST_SD3 = ["sd3", pytest.param("flux", marks=pytest.mark.slow)]  # the longer runs: FLUX in the slow tier


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    ad = get_dummy_adapter(request.param, seed=0)
    ad.transformer.requires_grad_(False)
    for enc in ad.text_encoders:
        enc.requires_grad_(False)
    return ad


def _noise(ad, steps=4):
    return sampling.initial_noise(ad, REQ, sampling.SamplerConfig(steps=steps))


def _cfg(**kw):
    return dft.DFTConfig(**{"steps": 4, "guidance_scale": 3.0, "scheduler": "flow_euler", "gradient": "solver", **kw})


@pytest.mark.parametrize("scheduler", ["flow_euler", "auto"])
def test_forward_is_the_sampler(adapter, scheduler):
    cfg = _cfg(scheduler=scheduler)
    sc = sampling.SamplerConfig(steps=4, guidance_scale=3.0, scheduler=scheduler, output="latents")
    with torch.no_grad():
        z = dft.generate(adapter, [p for p, _ in REQ], _noise(adapter), cfg, output="latents")
    torch.testing.assert_close(z, sampling.sample(adapter, REQ, sc), rtol=0, atol=1e-6)


def test_solver_coefficients_are_the_sigma_steps(adapter):
    cfg = _cfg(steps=6)
    sigmas = dft._scheduler(adapter, cfg, device="cpu").sigmas.double()  # steps + 1 entries, the last one 0
    assert len(sigmas) == 7 and float(sigmas[-1]) == 0.0 and float(sigmas[0]) == pytest.approx(1.0)
    a = dft.solver_coefficients(adapter, cfg)
    torch.testing.assert_close(a, sigmas[1:] - sigmas[:-1], rtol=1e-6, atol=1e-7)
    assert float(a.sum()) == pytest.approx(-1.0, abs=1e-6)  # z_0 = z_T - sum |a_i| v_i: the steps cover sigma 1 -> 0
    c = dft.grad_coefficients(adapter, cfg)
    torch.testing.assert_close(c * a, torch.full((6,), -1.0, dtype=torch.float64))


def _trainable(ad):
    params = [p for n, p in ad.transformer.named_parameters() if n.startswith("transformer_blocks.0.attn.to_")]
    for p in params:
        p.requires_grad_(True)
    return params


def test_solver_gradient_matches_step_by_step_construction(adapter):
    cfg = _cfg()
    prompts = [p for p, _ in REQ]
    noise = _noise(adapter)
    params = _trainable(adapter)
    try:
        images = dft.generate(adapter, prompts, noise, cfg)
        w = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
        hooked = torch.autograd.grad((images * w).sum(), params)

        traj: list[torch.Tensor] = []
        with torch.no_grad():
            z0 = dft.generate(adapter, prompts, noise, cfg, output="latents", trajectory=traj)
        z0 = z0.detach().requires_grad_(True)
        (g,) = torch.autograd.grad((adapter.decode(z0) * w).sum(), z0)
        sch = dft._scheduler(adapter, cfg)
        cond = adapter.encode_prompt(prompts)
        if cond.guidance is not None:  # FLUX.1-dev: the scale is the guidance input, one pass
            cond.guidance = torch.full_like(cond.guidance, 3.0)
        else:
            uncond = adapter.encode_prompt([""]).repeat(len(prompts))
            cond = type(cond).cat([uncond, cond])
        built = [torch.zeros_like(p) for p in params]
        assert len(traj) == len(sch.timesteps) == 4
        for i, t in enumerate(sch.timesteps):
            if adapter.guidance_embeds:
                v = adapter.predict(traj[i], t, cond).float()
            else:
                vu, vc = adapter.predict(torch.cat([traj[i], traj[i]]), t, cond).float().chunk(2)
                v = vu + 3.0 * (vc - vu)
            vjp = torch.autograd.grad(v, params, grad_outputs=-g)  # C_i a_i = -1 for every step
            built = [b + x for b, x in zip(built, vjp)]
        for h, b in zip(hooked, built):
            torch.testing.assert_close(h, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        assert any(float(h.abs().max()) > 0 for h in hooked)
    finally:
        for p in params:
            p.requires_grad_(False)


@pytest.mark.parametrize("family", FAMILIES_FAST_SD3)
def test_exact_gradient_is_the_true_derivative(family):
    """`exact` = backprop through the chain. diffusers' flow-Euler step and our VAE decode compute in float32, so
    the derivative is checked by central differences of an independent float64 Euler chain (x <- x + (sigma' -
    sigma) v) on the latents."""
    ad = get_dummy_adapter(family, seed=0)
    for m in [ad.transformer, ad.vae, *ad.text_encoders]:
        m.double().requires_grad_(False)
    p = ad.transformer.proj_out.weight
    p.requires_grad_(True)
    cfg = _cfg(steps=3, guidance_scale=2.0, gradient="exact", checkpointing=False)
    noise = _noise(ad, steps=3).double()
    prompts = [pp for pp, _ in REQ]
    w = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sch = dft._scheduler(ad, cfg, device="cpu")
    cond = ad.encode_prompt(prompts)
    if cond.guidance is not None:
        cond.guidance = torch.full_like(cond.guidance, 2.0)
    else:
        cond = type(cond).cat([ad.encode_prompt([""]).repeat(2), cond])

    def chain():
        z = noise
        for t, s0, s1 in zip(sch.timesteps, sch.sigmas[:-1], sch.sigmas[1:]):
            if ad.guidance_embeds:
                v = ad.predict(z, t, cond)
            else:
                vu, vc = ad.predict(torch.cat([z, z]), t, cond).chunk(2)
                v = vu + 2.0 * (vc - vu)
            z = z + (float(s1) - float(s0)) * v
        return (z * w).sum()

    (grad,) = torch.autograd.grad((dft.generate(ad, prompts, noise, cfg, output="latents") * w).sum(), p)
    (ref,) = torch.autograd.grad(chain(), p)
    torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    d = torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-3  # FLUX's rotary embedding runs in float32 even in a float64 model: a step well above its rounding
    with torch.no_grad():
        p.add_(h * d)
        up = float(chain())
        p.sub_(2 * h * d)
        down = float(chain())
        p.add_(h * d)
    assert float((ref * d).sum()) == pytest.approx((up - down) / (2 * h), rel=1e-4)


def test_a1_and_ddpm_samplers_are_refused(adapter):
    noise = _noise(adapter)
    with pytest.raises(ValueError, match=r"gradient='a1' is not defined for '(sd3|flux)'.*'solver'"):
        dft.generate(adapter, ["a"] * 2, noise, _cfg(gradient="a1"))
    with pytest.raises(ValueError, match=r"scheduler='dpmpp_2m' cannot sample .*valid values: auto, flow_euler"):
        dft.generate(adapter, ["a"] * 2, noise, _cfg(scheduler="dpmpp_2m"))
    with pytest.raises(ValueError, match=r"height=30 must be a multiple of 4 for '(sd3|flux)' \(VAE factor x patch"):
        dft.generate(adapter, ["a"] * 2, noise, _cfg(height=30))


def test_flow_sampler_refused_on_a_unet_model():
    ad = get_dummy_adapter("sd15")
    with pytest.raises(ValueError, match="scheduler='flow_euler' cannot sample 'sd15', an epsilon / v-prediction"):
        dft.generate(ad, ["a"], torch.zeros(1, 4, 16, 16), _cfg(gradient="a1"))


@pytest.mark.parametrize("family", FAMILIES_FAST_SD3)
def test_dal_trains_a_flow_model_end_to_end(family, tmp_path):
    """`popalign dal --model tiny:sd3|flux --scheduler flow_euler --gradient solver --train unet`: a transformer
    LoRA trained through the flow sampler; the default 'a1' gradient is refused at setup, before any step."""
    from popalign_core.dal import trainer as D
    from popalign_core.lora.files import read_lora
    from popalign_core.toyworld.world import TRAIN_ROLES, caption

    base = dict(model=f"tiny:{family}", prompts=[caption(r) for r in TRAIN_ROLES[:2]], face_bank="toy",
                target={"form": [0.5, 0.5]}, steps=2, images_per_prompt=2, sampler_steps=3, guidance_scale=1.0,
                lora_rank=2, lr=1e-2, progress=False, checkpoint_every=0, lora_formats=["kohya"], train="unet",
                scheduler="flow_euler")  # fmt: skip
    with pytest.raises(ValueError, match=r"gradient='a1' is not defined for"):
        D.DALTrainer(D.load_dal_config(None, **base, output_dir=str(tmp_path / "a1")), log=lambda m: None).setup()
    summary = D.run_dal(D.load_dal_config(None, **base, gradient="solver", output_dir=str(tmp_path / "run")))
    assert summary["steps"] == 2 and summary["skipped_groups"] == 0
    sd, meta, fmt = read_lora(summary["outputs"]["kohya"])
    assert fmt == "kohya" and sd and meta["loss"] == "dal"
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert ups and any(float(u.abs().max()) > 0 for u in ups)  # trained away from the zero init
