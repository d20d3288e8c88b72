"""The rectified-flow schedule of SD3 / FLUX (`models.flow`): hand-computed values, exact Euler integration of a
straight path, and the shifts checked against diffusers' FlowMatchEulerDiscreteScheduler and FLUX's calculate_shift."""

from __future__ import annotations

import math

import pytest
import torch

from popalign_core.models import flow as F


def test_forward_process_velocity_and_inverses_by_hand():
    x0, eps = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    xt = F.add_noise(x0, eps, torch.tensor([0.25]))
    assert xt.item() == pytest.approx(0.75 * 2 + 0.25 * -1)  # 1.25
    v = F.velocity_target(x0, eps)
    assert v.item() == -3.0
    assert F.x0_from_velocity(xt, v, torch.tensor([0.25])).item() == pytest.approx(2.0)
    assert F.noise_from_velocity(xt, v, torch.tensor([0.25])).item() == pytest.approx(-1.0)
    # per-sample sigma broadcasts over [B, C, H, W]; sigma 0 is the clean latent, 1 pure noise
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    xt = F.add_noise(x0, eps, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], (x0[1] + eps[1]) / 2)
    torch.testing.assert_close(xt[2], eps[2])


def test_euler_steps_integrate_a_straight_path_exactly():
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    v = F.velocity_target(x0, eps)
    sigmas = F.sampling_sigmas(7, shift=lambda s: F.shift_sigma(s, 3.0))
    x = eps.clone()
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = F.euler_step(x, v, s, s_next)
    torch.testing.assert_close(x, x0)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0 and (sigmas[:-1] > sigmas[1:]).all()


def test_sd3_shift_by_hand_and_against_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    assert F.shift_sigma(0.5, 3.0).item() == pytest.approx(1.5 / 2.0)  # 0.75
    assert F.shift_sigma(0.0).item() == 0.0 and F.shift_sigma(1.0).item() == 1.0
    assert F.shift_sigma(0.3, 1.0).item() == pytest.approx(0.3)  # shift 1 = identity
    sched = FlowMatchEulerDiscreteScheduler(shift=F.SD3_SHIFT)
    n = sched.config.num_train_timesteps
    unshifted = torch.arange(n, 0, -1, dtype=torch.float64) / n
    torch.testing.assert_close(F.shift_sigma(unshifted, F.SD3_SHIFT).float(), sched.sigmas.float())


def test_flux_shift_by_hand_and_against_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert F.flux_mu(256) == pytest.approx(0.5) and F.flux_mu(4096) == pytest.approx(1.15)
    assert F.flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)  # 0.63
    for tokens in (256, 1024, 4096, 64 * 64):
        assert F.flux_mu(tokens) == pytest.approx(calculate_shift(tokens))
    sigma = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    mu = F.flux_mu(4096)
    want = torch.tensor([0.0] + [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in (0.1, 0.5, 0.9, 1.0)])
    torch.testing.assert_close(F.time_shift(mu, sigma), want.double())
    # the two families' shifts are one map: shift s == time_shift(log s)
    torch.testing.assert_close(F.time_shift(math.log(3.0), sigma), F.shift_sigma(sigma, 3.0))


@pytest.mark.parametrize("scheme", sorted(F.TIMESTEP_SAMPLING))
def test_training_sigmas_follow_their_density(scheme):
    g = torch.Generator().manual_seed(0)
    s = F.sample_sigmas(20000, scheme, generator=g)
    assert s.shape == (20000,) and s.dtype == torch.float64 and ((s > 0) & (s < 1)).all()
    if scheme == "uniform":
        assert s.mean().item() == pytest.approx(0.5, abs=0.01) and s.var().item() == pytest.approx(1 / 12, abs=0.003)
    else:  # logit(sigma) ~ N(0, 1) (SD3's rf/lognorm(0.00, 1.00))
        u = torch.logit(s)
        assert u.mean().item() == pytest.approx(0.0, abs=0.03) and u.std().item() == pytest.approx(1.0, abs=0.03)
        u = torch.logit(F.sample_sigmas(20000, scheme, generator=g, mean=1.0, std=0.5))
        assert u.mean().item() == pytest.approx(1.0, abs=0.02) and u.std().item() == pytest.approx(0.5, abs=0.02)
    again = F.sample_sigmas(20000, scheme, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, s)  # seeded: the same generator state gives the same draws


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: F.sample_sigmas(4, "cosine"), "scheme='cosine' is not a timestep sampling; valid values: uniform, "),
        (lambda: F.sample_sigmas(0), "n must be an integer >= 1"),
        (lambda: F.add_noise(torch.zeros(1), torch.zeros(1), 1.5), r"sigma must lie in \[0, 1\]"),
        (lambda: F.euler_step(torch.zeros(1), torch.zeros(1), 0.5, -0.1), r"sigma_next must lie in \[0, 1\]"),
        (lambda: F.shift_sigma(0.5, 0.0), "shift must be a finite number > 0"),
        (lambda: F.flux_mu(0), "image_tokens must be an integer >= 1"),
        (lambda: F.sampling_sigmas(0), "steps must be an integer >= 1"),
    ],
)
def test_bad_input_is_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("loss", ["dpo", "popalign", "kto"])
def test_velocity_errors_are_epsilon_errors_scaled_by_one_minus_sigma_squared(loss):
    """At one noise level σ, ε_θ − ε = (1 − σ)(v_θ − v) (ε = x_σ + (1 − σ)v), so L_ε = (1 − σ)² L_v and a loss on
    velocity errors with β_v = (1 − σ)² β_ε equals the loss on ε errors with β_ε (docs/training.md, flow models)."""
    from popalign_core.train.losses import LossInputs, compute_loss

    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    sigma = torch.full((4,), 0.6)
    xt = F.add_noise(x0, eps, sigma)
    v = F.velocity_target(x0, eps)
    v_model = v + 0.3 * torch.randn(4, 4, 8, 8, generator=g)
    v_ref = v + 0.3 * torch.randn(4, 4, 8, 8, generator=g)
    label = torch.tensor([1.0, -1.0, 1.0, -1.0])
    as_eps = {k: F.noise_from_velocity(xt, t, sigma) for k, t in (("m", v_model), ("r", v_ref), ("t", v))}
    torch.testing.assert_close(as_eps["t"], eps, atol=1e-5, rtol=1e-5)
    beta_eps = 40.0
    on_eps = compute_loss(loss, LossInputs(label=label, model_pred=as_eps["m"], ref_pred=as_eps["r"],
                                           target=as_eps["t"]), beta=beta_eps)  # fmt: skip
    on_v = compute_loss(loss, LossInputs(label=label, model_pred=v_model, ref_pred=v_ref, target=v),
                        beta=beta_eps * (1 - 0.6) ** 2)  # fmt: skip
    torch.testing.assert_close(on_v.per_sample, on_eps.per_sample, atol=1e-5, rtol=1e-4)
    assert on_v.loss.item() == pytest.approx(on_eps.loss.item(), rel=1e-4)


@pytest.mark.parametrize("scheme,shift", [("uniform", 1.0), ("logit_normal", 1.0), ("logit_normal", 3.0),
                                          ("uniform", 3.0)])  # fmt: skip
def test_mean_eps_weight_is_the_expectation_of_one_minus_sigma_squared(scheme, shift):
    g = torch.Generator().manual_seed(0)
    s = F.sample_sigmas(400_000, scheme, g)
    s = F.shift_sigma(s, shift) if shift != 1.0 else s
    mc = float(((1 - s) ** 2).mean())
    assert F.mean_eps_weight(scheme, shift) == pytest.approx(mc, abs=2e-3)
    if (scheme, shift) == ("uniform", 1.0):
        assert F.mean_eps_weight(scheme, shift) == pytest.approx(1 / 3, abs=1e-9)  # ∫ (1 − σ)² dσ
