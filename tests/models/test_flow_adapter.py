"""The flow-matching adapter (SD3, FLUX) on tiny models: parity with diffusers' own pipelines (prompt encoding and
whole sampling runs), the rectified-flow forward process and velocity target by hand, the training timestep
density with the family's shift, the adapter-off reference, every loss on velocity targets, and bad input."""

from __future__ import annotations

import pytest
import torch

from popalign_core.lora.files import LoraSpec, add_lora
from popalign_core.models import flow
from popalign_core.models.flow_adapter import FlowAdapter
from popalign_core.models.sampling import SamplerConfig, initial_noise, sample
from popalign_core.models.tiny import get_dummy_adapter
from popalign_core.models.tiny_flow import encoders_of, get_dummy_flow_components
from popalign_core.train.losses import LOSSES, LossInputs, compute_loss
from popalign_core.train.objective import preference_loss

FAMILIES = ("sd3", "flux")
PROMPTS = ["a photo of a doctor", "a portrait of a female nurse"]
REQ = [("a photo of a doctor", 0), ("a portrait of a female nurse", 3)]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def _pipeline(family):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    comps = get_dummy_flow_components(family)
    return (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline)(**comps)


def test_prompt_encoding_is_the_pipelines(family):
    pipe, ad = _pipeline(family), get_dummy_adapter(family)
    with torch.no_grad():
        c = ad.encode_prompt(PROMPTS)
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=16)  # fmt: skip
        else:
            embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=16)
    torch.testing.assert_close(c.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(c.pooled, pooled, rtol=0, atol=0)
    assert (c.guidance is not None) == (family == "flux")


def test_sampling_is_the_pipelines(family):
    """`sample` with flow-Euler = diffusers' StableDiffusion3Pipeline / FluxPipeline from the same initial noise."""
    pipe, ad = _pipeline(family), get_dummy_adapter(family)
    cfg = SamplerConfig(steps=4, guidance_scale=4.0, output="latents")
    mine = sample(ad, REQ, cfg)
    noise = initial_noise(ad, REQ, cfg)
    kw = dict(num_inference_steps=4, guidance_scale=4.0, height=32, width=32, output_type="latent",
              max_sequence_length=16)  # fmt: skip
    prompts = [p for p, _ in REQ]
    with torch.no_grad():
        if family == "sd3":
            theirs = pipe(prompt=prompts, negative_prompt="", latents=noise, **kw).images
        else:
            packed = pipe._pack_latents(noise, 2, 16, 16, 16)
            theirs = pipe._unpack_latents(pipe(prompt=prompts, latents=packed, **kw).images, 32, 32, 2)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)


def test_forward_process_and_target_by_hand(family):
    ad = get_dummy_adapter(family)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([250.0, 900.0])
    s = torch.tensor([0.25, 0.9]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(ad.add_noise(x0, eps, t), (1 - s) * x0 + s * eps)
    torch.testing.assert_close(ad.target(x0, eps, t), eps - x0)
    assert ad.prediction_type == "flow" and ad.latent_channels == 16 and ad.patch_size == 2


def test_training_timesteps_follow_the_family_shift(family):
    ad = get_dummy_adapter(family)
    t = ad.sample_timesteps(4000, torch.Generator().manual_seed(0))
    u = torch.sigmoid(torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    want = flow.shift_sigma(u, 3.0) if family == "sd3" else u  # FLUX shifts only at sampling (dynamic)
    torch.testing.assert_close(t.double(), (want * 1000), rtol=1e-6, atol=1e-4)
    uni = get_dummy_adapter(family, timestep_sampling="uniform").sample_timesteps(4000, torch.Generator())
    assert 0 <= float(uni.min()) and float(uni.max()) <= 1000


def test_reference_is_the_network_without_its_lora(family):
    ad = get_dummy_adapter(family)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 16, 16, generator=g)
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        cond = ad.encode_prompt(PROMPTS)
        base = ad.predict(x, t, cond)
    add_lora(ad, LoraSpec(rank=4, alpha=4.0, init_lora_weights="gaussian"))
    with torch.no_grad():
        for n, p in ad.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=g)
        adapted = ad.predict(x, t, cond)
        with ad.reference():
            ref = ad.predict(x, t, cond)
    assert float((adapted - base).abs().max()) > 1e-3
    torch.testing.assert_close(ref, base, rtol=0, atol=0)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_takes_velocity_errors(family, loss):
    """preference_loss on a flow model = the loss on L = mean (v_theta - (eps - x0))^2 (the Flow-DPO form)."""
    ad = get_dummy_adapter(family)
    add_lora(ad, LoraSpec(rank=2, alpha=2.0, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(4, 16, 16, 16, generator=g)
    noise, t = torch.randn(4, 16, 16, 16, generator=g), torch.tensor([100.0, 100.0, 800.0, 800.0])
    label = torch.tensor([1, -1, 1, -1])
    with torch.no_grad():
        cond = ad.encode_prompt(["a photo of a doctor"] * 4)
    emb = torch.randn(4, 8, generator=g)
    out = preference_loss(ad, lat, cond, label, loss, noise=noise, timesteps=t, embeddings=emb)
    out.loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in ad.trainable_parameters())
    with torch.no_grad():
        s = (t / 1000).reshape(-1, 1, 1, 1)
        x_t = (1 - s) * lat + s * noise
        pred = ad.predict(x_t, t, cond)
        with ad.reference():
            ref = ad.predict(x_t, t, cond)
    inputs = LossInputs(label=label, model_pred=pred, ref_pred=ref, target=noise - lat, embeddings=emb)
    assert float(out.loss.detach()) == pytest.approx(float(compute_loss(loss, inputs).loss), rel=1e-5, abs=1e-6)


def test_bad_input():
    comps = get_dummy_flow_components("flux")
    encs, toks = encoders_of(comps, "flux")
    with pytest.raises(ValueError, match=r"family='sd15' is not supported for a flow-matching adapter.*sd3, flux"):
        FlowAdapter(comps["transformer"], comps["vae"], encs, toks, comps["scheduler"], "sd15")
    with pytest.raises(ValueError, match=r"text_encoders\[1\]: the t5 text encoder and its tokenizer are required"):
        FlowAdapter(comps["transformer"], comps["vae"], [encs[0], None], [toks[0], None], comps["scheduler"], "flux")
    with pytest.raises(ValueError, match="timestep_sampling='beta'; valid values: uniform, logit_normal"):
        get_dummy_adapter("sd3", timestep_sampling="beta")
    ad = get_dummy_adapter("flux")
    with torch.no_grad(), pytest.raises(ValueError, match=r"latent size 15x16 \(image 30x32\) is not divisible by the "
                                                          r"flux patch size 2; .*multiples of 4 pixels"):  # fmt: skip
        ad.predict(torch.zeros(1, 16, 15, 16), torch.tensor([500.0]), ad.encode_prompt(["a"]))
    with pytest.raises(ValueError, match=r"height=30 must be a multiple of the VAE factor x patch size 4"):
        sample(ad, [("a", 0)], SamplerConfig(steps=1, height=30, width=32))
    with pytest.raises(ValueError, match="scheduler='ddim' cannot sample 'flux', a flow-matching model"):
        sample(ad, [("a", 0)], SamplerConfig(steps=1, scheduler="ddim"))


def test_sd3_runs_without_t5():
    """SD3's T5 is optional: without it its tokens are zeros, max_sequence_length of them (256 unless set: diffusers'
    behaviour), and the CLIP part is unchanged."""
    full, no_t5 = get_dummy_adapter("sd3"), get_dummy_adapter("sd3", t5=False)
    with torch.no_grad():
        a, b = full.encode_prompt(PROMPTS), no_t5.encode_prompt(PROMPTS)
    torch.testing.assert_close(a.embeds[:, :77], b.embeds[:, :77], rtol=0, atol=0)
    assert float(b.embeds[:, 77:].abs().max()) == 0.0 and b.embeds.shape == (2, 77 + 256, 64)
    assert sample(no_t5, REQ[:1], SamplerConfig(steps=2)).shape == (1, 3, 32, 32)
