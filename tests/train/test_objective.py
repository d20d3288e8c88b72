"""The objective through the model adapter on tiny SD1.5 / SD2 (v-prediction) / SDXL models and the flow-matching
SD3 / FLUX models (velocity targets)."""

from __future__ import annotations

import math

import pytest
import torch

from popalign_core.lora.files import LoraSpec, add_lora
from popalign_core.models.tiny import get_dummy_adapter
from popalign_core.train.losses import LOSSES
from popalign_core.train.objective import preference_loss, shared_noise_and_timesteps

FAMILIES = ("sd15", "sd2", "sdxl", "sd3", "flux")


def test_pairs_share_noise_and_timestep_and_unpaired_do_not():
    label = torch.tensor([1, -1, 1, -1, -1, 1])
    g = torch.Generator().manual_seed(0)
    noise, t = shared_noise_and_timesteps(label, (6, 4, 2, 2), 1000, g, pair=True)
    for w, lo in ((0, 1), (2, 3), (5, 4)):
        assert torch.equal(noise[w], noise[lo]) and t[w] == t[lo]
    noise2, _ = shared_noise_and_timesteps(label, (6, 4, 2, 2), 1000, torch.Generator().manual_seed(0), pair=False)
    assert not torch.equal(noise2[0], noise2[1])


@pytest.fixture(scope="module", params=FAMILIES)
def batch(request):
    fam = request.param
    adapter = get_dummy_adapter(fam, seed=0)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(4, adapter.latent_channels, 16, 16, generator=g)
    with torch.no_grad():
        cond = adapter.encode_prompt(["a photo of a doctor"] * 4)
    label = torch.tensor([1, 1, -1, -1])
    add_lora(adapter, LoraSpec(rank=4, alpha=4.0))
    return fam, adapter, latents, cond, label


def _margin(adapter, latents, cond, label, seed=7):
    from popalign_core.train.losses import per_sample_error

    with torch.no_grad():
        noise, t = shared_noise_and_timesteps(
            label, latents.shape, 1000, torch.Generator().manual_seed(seed), pair=True
        )
        x_t = adapter.add_noise(latents, noise, t)
        tgt = adapter.target(latents, noise, t)
        lm = per_sample_error(adapter.predict(x_t, t, cond), tgt)
        with adapter.reference():
            lr = per_sample_error(adapter.predict(x_t, t, cond), tgt)
    g = lr - lm
    return float(g[label > 0].mean() - g[label < 0].mean())


@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_runs_through_the_adapter_and_starts_at_its_reference_point(batch, loss):
    fam, adapter, latents, cond, label = batch
    out = preference_loss(adapter, latents, cond, label, loss, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(out.loss)
    if loss in ("dpo", "popalign", "rpo"):  # fresh LoRA (B = 0): model == reference, logits 0, loss log 2
        assert float(out.loss.detach()) == pytest.approx(math.log(2.0), abs=1e-6)
    if LOSSES[loss].needs_ref:
        assert out.metrics["model_err"] == pytest.approx(out.metrics["ref_err"], abs=1e-6)


def test_v_prediction_target_is_the_velocity():
    adapter = get_dummy_adapter("sd2")
    x0, n = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.tensor([100, 900])
    ab = adapter.noise_scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(adapter.target(x0, n, t), ab.sqrt() * n - (1 - ab).sqrt() * x0)
    torch.testing.assert_close(adapter.add_noise(x0, n, t), ab.sqrt() * x0 + (1 - ab).sqrt() * n)


@pytest.mark.parametrize("loss", ["popalign", "dpo"])
def test_training_steps_raise_the_margin_and_keep_base_and_reference(batch, loss):
    fam, adapter, latents, cond, label = batch
    base = {k: v.detach().clone() for k, v in adapter.unet.state_dict().items() if "lora" not in k}
    with torch.no_grad():
        noise, t = shared_noise_and_timesteps(label, latents.shape, 1000, torch.Generator().manual_seed(7), pair=True)
        with adapter.reference():
            ref_before = adapter.predict(adapter.add_noise(latents, noise, t), t, cond)
    lora = [p for p in adapter.unet.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in lora]
    opt = torch.optim.Adam(lora, lr=1e-3)
    before = _margin(adapter, latents, cond, label)
    for _ in range(3):
        out = preference_loss(
            adapter, latents, cond, label, loss, generator=torch.Generator().manual_seed(7), beta=50.0
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = _margin(adapter, latents, cond, label)
    assert after > before
    for k, v in adapter.unet.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, base[k]), k
    with torch.no_grad(), adapter.reference():
        ref_after = adapter.predict(adapter.add_noise(latents, noise, t), t, cond)
    torch.testing.assert_close(ref_after, ref_before, rtol=0, atol=0)
    with torch.no_grad():  # restore the LoRA for the other parametrisations sharing this fixture
        for p, s in zip(lora, saved):
            p.copy_(s)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_reference_anchor_target_is_distillation_to_the_frozen_model(init):
    from popalign_core.train.objective import Anchor

    torch.manual_seed(0)
    ad = get_dummy_adapter("sd15", seed=0)
    add_lora(ad, LoraSpec(rank=2, alpha=2.0, init_lora_weights=init))
    g = torch.Generator().manual_seed(1)
    shape = (2, ad.latent_channels, 8, 8)
    lat, a_lat = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    a_noise, a_t = torch.randn(shape, generator=g), torch.tensor([100, 800])
    with torch.no_grad():
        cond, a_cond = ad.encode_prompt(["a cat", "a dog"]), ad.encode_prompt(["a red car", "a tree"])
    anchor = Anchor(a_lat, a_cond, noise=a_noise, timesteps=a_t)
    out = preference_loss(ad, lat, cond, torch.tensor([1, -1]), "popalign", generator=g, anchor=anchor,
                          anchor_weight=2.0, anchor_target="reference", beta=10.0)  # fmt: skip
    with torch.no_grad():
        x = ad.add_noise(a_lat, a_noise, a_t)
        m = ad.predict(x, a_t, a_cond)
        with ad.reference():
            r = ad.predict(x, a_t, a_cond)
    by_hand = float(((m - r) ** 2).mean(dim=(1, 2, 3)).mean())
    assert out.metrics["anchor_term"] == pytest.approx(by_hand, rel=1e-5, abs=1e-12)
    if init is True:  # a fresh LoRA is the reference: nothing to preserve yet
        assert out.metrics["anchor_term"] == 0.0
    else:
        assert by_hand > 0
    with pytest.raises(ValueError, match="anchor_target='model' is invalid"):
        preference_loss(ad, lat, cond, torch.tensor([1, -1]), "popalign", generator=g, anchor=anchor,
                        anchor_weight=2.0, anchor_target="model")  # fmt: skip
