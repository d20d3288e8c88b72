"""LoRA on the flow families (SD3, FLUX): creation on the transformer and the CLIP encoders, the kohya
(`lora_transformer_`) and diffusers (`transformer.`) layouts, diffusers' own `load_lora_weights`, family checks."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from popalign_core.lora import files as L
from popalign_core.models.flow_adapter import FlowAdapter
from popalign_core.models.tiny import get_dummy_adapter
from popalign_core.models.tiny_flow import encoders_of, get_dummy_flow_components

FAMILIES = ("sd3", "flux")
PROMPTS = ["a photo of a doctor", ""]
SPEC = L.LoraSpec(rank=4, alpha=2.0, text_encoder_targets=L.TEXT_ENCODER_TARGETS, init_lora_weights="gaussian")
# the default transformer targets each tiny model has: SD3's only (= last) joint block has no to_add_out; FLUX's
# single block has to_q/k/v only
EXPECTED_MODULES = {
    "sd3": {f"transformer_blocks.0.attn.{m}" for m in L.FLOW_ATTENTION_TARGETS if m != "to_add_out"},
    "flux": {f"transformer_blocks.0.attn.{m}" for m in L.FLOW_ATTENTION_TARGETS}
    | {f"single_transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")},
}
CLIP_PREFIXES = {"sd3": {"text_encoder", "text_encoder_2"}, "flux": {"text_encoder"}}


@functools.cache
def _fixed_cond(family: str):
    """One conditioning per family for every model: isolates the transformer LoRA from the text-encoder LoRA."""
    with torch.no_grad():
        cond = get_dummy_adapter(family).encode_prompt(PROMPTS)
    g = torch.Generator().manual_seed(1)
    cond.embeds = cond.embeds + 0.1 * torch.randn(cond.embeds.shape, generator=g)
    cond.pooled = cond.pooled + 0.1 * torch.randn(cond.pooled.shape, generator=g)
    return cond


def _outputs(adapter) -> dict[str, torch.Tensor]:
    """Prompt embeddings, pooled embeddings and the velocity on fixed inputs (fixed and own conditioning)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, adapter.latent_channels, 16, 16, generator=g)
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        cond = adapter.encode_prompt(PROMPTS)
        return {
            "embeds": cond.embeds,
            "pooled": cond.pooled,
            "v": adapter.predict(x, t, cond),
            "v_fixed_cond": adapter.predict(x, t, _fixed_cond(adapter.family)),
        }


def _assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def base():
    return {fam: _outputs(get_dummy_adapter(fam)) for fam in FAMILIES}


@pytest.fixture(scope="module")
def trained():
    """{family: (adapter with a non-zero LoRA, alpha/rank = 0.5, on transformer and CLIP encoders, its outputs)}."""
    out = {}
    for fam in FAMILIES:
        torch.manual_seed(123)
        ad = get_dummy_adapter(fam)
        L.add_lora(ad, SPEC)
        out[fam] = (ad, _outputs(ad))
    return out


# ------------------------------------------------------------------------------------------------ creation
@pytest.mark.parametrize("family", FAMILIES)
def test_add_lora_targets_both_streams_and_clip_only(family, base, trained):
    ad, outs = trained[family]
    sd, alphas = L.get_lora_state_dict(ad)
    modules = {k.removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight")}
    assert {m.removeprefix("transformer.") for m in modules if m.startswith("transformer.")} == EXPECTED_MODULES[
        family
    ]
    assert {m.split(".")[0] for m in modules} == {"transformer"} | CLIP_PREFIXES[family]
    assert set(alphas.values()) == {2.0}
    t5 = ad.text_encoders[-1]
    assert not any(".lora_" in n for n, _ in t5.named_parameters()), "T5 must not get a LoRA"
    trainable = [
        n for m in (ad.transformer, *ad.text_encoders, ad.vae) for n, p in m.named_parameters() if p.requires_grad
    ]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(ad.trainable_parameters()) == len(trainable) == 2 * len(modules)
    assert not torch.allclose(outs["v_fixed_cond"], base[family]["v_fixed_cond"], atol=1e-3)
    # the CLIP LoRA shows in the pooled embedding (FLUX's sequence embedding is T5's alone)
    assert not torch.allclose(outs["pooled"], base[family]["pooled"], atol=1e-3)
    if family == "sd3":
        assert not torch.allclose(outs["embeds"], base[family]["embeds"], atol=1e-3)
    else:
        torch.testing.assert_close(outs["embeds"], base[family]["embeds"], atol=1e-6, rtol=0)
    with ad.reference():
        ref = _outputs(ad)
    _assert_close(ref, base[family], atol=1e-6)


def test_default_targets_per_family_and_errors():
    assert L.LoraSpec().unet_targets == "default"
    assert L.DEFAULT_UNET_TARGETS["sd3"] == L.DEFAULT_UNET_TARGETS["flux"] == L.FLOW_ATTENTION_TARGETS
    assert L.DEFAULT_UNET_TARGETS["sd15"] == L.UNET_ATTENTION_TARGETS
    ad = get_dummy_adapter("flux")
    # an explicit target the model lacks is an error (the default list takes what exists)
    with pytest.raises(ValueError, match=r"'to_qq'.*match no Linear/Conv2d module of transformer.*add_q_proj"):
        L.add_lora(ad, L.LoraSpec(unet_targets=("to_q", "to_qq")))
    # T5's attention (q/k/v/o) is not a LoRA target: the message says why
    with pytest.raises(ValueError, match=r"CLIP encoders only: T5 is never adapted.*'o'"):
        L.add_lora(ad, L.LoraSpec(unet_targets=None, text_encoder_targets=("q_proj", "o")))
    assert not any(".lora_" in n for m in (ad.transformer, *ad.text_encoders) for n, _ in m.named_parameters())
    assert L.add_lora(ad, L.LoraSpec(unet_targets=("to_add_out",))) == {"transformer": 1}
    assert L.lora_components("sd3") == ("transformer", "text_encoder", "text_encoder_2")
    assert L.lora_components("flux") == ("transformer", "text_encoder")
    assert L.lora_components("sdxl") == ("unet", "text_encoder", "text_encoder_2")


# ------------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_layout_names_and_round_trip(family, trained):
    ad, _ = trained[family]
    sd, alphas = L.get_lora_state_dict(ad)
    kohya = L.peft_to_kohya(sd, family, alphas)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    want = {f"lora_transformer_{m.replace('.', '_')}" for m in EXPECTED_MODULES[family]}
    assert {n for n in names if n.startswith("lora_transformer_")} == want
    assert {n.split("_text_model_")[0] for n in names if "_text_model_" in n} == (
        {"lora_te1", "lora_te2"} if family == "sd3" else {"lora_te1"}
    )
    assert len(kohya) == len(sd) // 2 * 3
    back, back_alphas = L.kohya_to_peft(kohya, family)  # module paths rebuilt without a model
    assert back.keys() == sd.keys() and back_alphas == alphas
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_save_and_load_round_trip(family, format, trained, tmp_path):
    ad, outs = trained[family]
    path = L.save_lora(ad, tmp_path / ("l.safetensors" if format == "kohya" else "l"), format=format)
    _, meta, fmt = L.read_lora(path)
    assert fmt == format and meta["family"] == family and meta["lora_rank"] == "4" and meta["lora_alpha"] == "2"
    assert json.loads(meta["lora_unet_targets"])  # the transformer targets are recorded
    if format == "kohya":
        assert meta["ss_base_model_version"] == {"sd3": "sd3", "flux": "flux1"}[family]
    else:
        cfg = json.loads(meta["lora_adapter_metadata"])
        assert cfg["transformer.r"] == 4 and cfg["transformer.lora_alpha"] == 2.0
    fresh = get_dummy_adapter(family)
    L.load_lora(fresh, path)
    _assert_close(_outputs(fresh), outs)


def test_family_mismatch_is_refused(trained, tmp_path):
    sd3, _ = trained["sd3"]
    transformer_only = get_dummy_adapter("sd3")
    L.add_lora(transformer_only, L.LoraSpec(rank=2, alpha=2.0))
    for format in ("kohya", "diffusers"):
        name = "{}.safetensors" if format == "kohya" else "{}"
        path = L.save_lora(transformer_only, tmp_path / name.format("t"), format=format)
        # sd3 and flux transformers share the key names: the recorded family tells them apart
        with pytest.raises(ValueError, match=r"trained on family 'sd3'.*the model is family 'flux'"):
            L.load_lora(get_dummy_adapter("flux"), path)
        full = L.save_lora(sd3, tmp_path / name.format("full"), format=format)
        with pytest.raises(ValueError, match=r"text_encoder_2.*(sd3).*'flux'"):  # CLIP-G: FLUX has none
            L.load_lora(get_dummy_adapter("flux"), full)
        # a flow LoRA on a UNet model: the keys alone say so
        with pytest.raises(ValueError, match=r"transformer.*a LoRA for sd3 / flux.*'sd15'"):
            L.load_lora(get_dummy_adapter("sd15"), path)
    unet = get_dummy_adapter("sd15")
    L.add_lora(unet, L.LoraSpec(rank=2, alpha=2.0))
    path = L.save_lora(unet, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match=r"lora_unet_\* keys \(unet\).*family='flux'.*sd15 / sd2 / sdxl"):
        L.load_lora(get_dummy_adapter("flux"), path)
    with pytest.raises(ValueError, match=r"transformer\.\* keys, which family='sdxl' has no component"):
        L.peft_to_kohya(L.get_lora_state_dict(sd3)[0], "sdxl")


# ------------------------------------------------------------------------------------------------ diffusers
def _pipeline(family: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    comps = get_dummy_flow_components(family)
    pipe = (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline)(**comps)
    encs, toks = encoders_of(comps, family)
    adapter = FlowAdapter(comps["transformer"], comps["vae"], encs, toks, comps["scheduler"], family, native_size=32)
    return pipe, adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_pipeline_loads_the_diffusers_layout(family, base, trained, tmp_path):
    """diffusers' own `load_lora_weights` on the pipeline gives the transformer and CLIP encoders we trained."""
    ad, outs = trained[family]
    folder = tmp_path / "lora"
    L.save_lora(ad, folder, format="diffusers")
    pipe, view = _pipeline(family)
    _assert_close(_outputs(view), base[family], atol=1e-6)  # the pipeline's components are our base model
    pipe.load_lora_weights(str(folder))
    _assert_close(_outputs(view), outs)


def test_diffusers_flux_pipeline_loads_the_kohya_layout(trained, tmp_path):
    """FluxPipeline reads `lora_transformer_` / `lora_te1_` files too (alpha folded into the weights)."""
    ad, outs = trained["flux"]
    path = L.save_lora(ad, tmp_path / "flux.safetensors", format="kohya")
    pipe, view = _pipeline("flux")
    pipe.load_lora_weights(str(path))
    _assert_close(_outputs(view), outs)
