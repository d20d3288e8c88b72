"""LoRA creation and the diffusers / kohya files (lora.files), on the tiny seeded models of every family."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from popalign_core.lora import files as L
from popalign_core.models.diffusers_adapter import DiffusersAdapter
from popalign_core.models.tiny import get_dummy_adapter, get_dummy_pipeline

FAMILIES = ("sd15", "sd2", "sdxl")
PROMPTS = ["a photo of a doctor", ""]
# every Linear / Conv2d kind of the UNet (attention, MLP, 1x1 proj_in/out, 3x3 convs, time/add embeddings)
ALL_UNET_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "time_emb_proj", "conv_shortcut", "conv", "conv_in", "conv_out", "linear_1", "linear_2",
)  # fmt: skip
SPEC = L.LoraSpec(
    rank=4, alpha=2.0, unet_targets=ALL_UNET_TARGETS, text_encoder_targets=L.TEXT_ENCODER_TARGETS,
    init_lora_weights="gaussian",
)  # fmt: skip  # alpha != rank: scale 0.5


@functools.cache
def _fixed_cond(family: str):
    """One conditioning per family, the same for every model: isolates the UNet LoRA from the text-encoder LoRA."""
    with torch.no_grad():
        cond = get_dummy_adapter(family).encode_prompt(PROMPTS)
    cond.embeds = cond.embeds + 0.1 * torch.randn(cond.embeds.shape, generator=torch.Generator().manual_seed(1))
    return cond


def _outputs(adapter) -> dict[str, torch.Tensor]:
    """Text-encoder and UNet outputs on fixed inputs (prompt embeddings, pooled, noise predictions)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        cond = adapter.encode_prompt(PROMPTS)
        out = {"embeds": cond.embeds, "pred": adapter.predict(x, t, cond)}
        out["pred_fixed_cond"] = adapter.predict(x, t, _fixed_cond(adapter.family))
        if cond.pooled is not None:
            out["pooled"] = cond.pooled
    return out


def _assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def base():
    """{family: outputs of the base model}."""
    return {fam: _outputs(get_dummy_adapter(fam)) for fam in FAMILIES}


@pytest.fixture(scope="module")
def trained():
    """{family: (adapter with a non-zero LoRA on UNet and text encoder(s), its outputs)}; never modified by tests."""
    out = {}
    for fam in FAMILIES:
        torch.manual_seed(123)
        ad = get_dummy_adapter(fam)
        L.add_lora(ad, SPEC)
        out[fam] = (ad, _outputs(ad))
    return out


# ------------------------------------------------------------------------------------------------ creation
@pytest.mark.parametrize("family", FAMILIES)
def test_add_lora_freezes_base_and_changes_outputs(family, base, trained):
    ad, outs = trained[family]
    trainable = [n for m in (ad.unet, *ad.text_encoders, ad.vae) for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(ad.trainable_parameters()) == len(trainable)
    n_te = 2 if family == "sdxl" else 1
    assert sum(".lora_" in n for te in ad.text_encoders for n, _ in te.named_parameters()) == n_te * 2 * 2 * 6
    # the LoRA is non-zero on both UNet and text encoder(s) ...
    assert not torch.allclose(outs["pred_fixed_cond"], base[family]["pred_fixed_cond"], atol=1e-3)
    assert not torch.allclose(outs["embeds"], base[family]["embeds"], atol=1e-3)
    # ... and reference() is the base model
    with ad.reference():
        ref = _outputs(ad)
    _assert_close(ref, base[family], atol=1e-6)


def test_lora_spec_and_targets_are_validated():
    with pytest.raises(ValueError, match="init_lora_weights"):
        L.LoraSpec(init_lora_weights="kaiming")
    with pytest.raises(ValueError, match="unet_targets"):
        L.LoraSpec(unet_targets="to_q")  # a bare str, not a tuple
    with pytest.raises(ValueError, match="nothing to adapt"):
        L.LoraSpec(unet_targets=None)
    with pytest.raises(ValueError, match="rank"):
        L.LoraSpec(rank=0)
    ad = get_dummy_adapter("sd15")
    with pytest.raises(ValueError, match=r"'to_qq'.*match no Linear/Conv2d module.*to_q"):
        L.add_lora(ad, L.LoraSpec(unet_targets=("to_q", "to_qq")))
    with pytest.raises(ValueError, match=r"\['down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out'.*Linear"):
        L.add_lora(ad, L.LoraSpec(unet_targets=("to_out",)))  # a ModuleList, not the Linear to_out.0
    with pytest.raises(ValueError, match=r"text_encoder_targets.*'query'.*q_proj"):
        L.add_lora(ad, L.LoraSpec(text_encoder_targets=("query",)))
    assert not any(".lora_" in n for m in (ad.unet, *ad.text_encoders) for n, _ in m.named_parameters())  # untouched
    L.add_lora(ad, L.LoraSpec())
    with pytest.raises(ValueError, match="already has a LoRA"):
        L.add_lora(ad, L.LoraSpec())


def test_text_encoder_targets_may_exist_in_one_encoder_only(tmp_path):
    """SDXL: text_projection exists in text_encoder_2 only; ComfyUI would skip it, so saving kohya warns."""
    ad = get_dummy_adapter("sdxl")
    counts = L.add_lora(ad, L.LoraSpec(unet_targets=None, text_encoder_targets=("q_proj", "text_projection")))
    assert counts == {"text_encoder": 2, "text_encoder_2": 3}
    with pytest.warns(UserWarning, match=r"ComfyUI.*skip 1 module\(s\).*text_projection"):
        path = L.save_lora(ad, tmp_path / "l.safetensors")
    sd, _, _ = L.read_lora(path)
    assert "lora_te2_text_projection.lora_up.weight" in sd
    fresh = get_dummy_adapter("sdxl")
    L.load_lora(fresh, path)
    _assert_close(_outputs(fresh), _outputs(ad))


# ------------------------------------------------------------------------------------------------ converters
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_kohya_round_trip_is_exact(family, trained):
    ad, _ = trained[family]
    sd, alphas = L.get_lora_state_dict(ad)
    assert set(alphas.values()) == {2.0}
    kohya = L.peft_to_kohya(sd, family, alphas)
    assert len(kohya) == len(sd) // 2 * 3
    te_prefixes = {k.split("_text_model_")[0] for k in kohya if "_text_model_" in k}
    assert te_prefixes == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})
    back, back_alphas = L.kohya_to_peft(kohya, family)
    assert back.keys() == sd.keys() and back_alphas == alphas
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_kohya_key_names_sd15():
    ad = get_dummy_adapter("sd15")
    L.add_lora(ad, L.LoraSpec(text_encoder_targets=L.TEXT_ENCODER_TARGETS))
    sd, alphas = L.get_lora_state_dict(ad)
    names = set(L.peft_to_kohya(sd, "sd15", alphas))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in names
    # the tiny sd15 UNet has cross-attention in down block 0, the mid block and up block 1 (two attentions)
    blocks = [
        "down_blocks_0_attentions_0",
        "mid_block_attentions_0",
        "up_blocks_1_attentions_0",
        "up_blocks_1_attentions_1",
    ]
    modules = [
        f"lora_unet_{b}_transformer_blocks_0_{attn}_{proj}"
        for b in blocks
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out_0")
    ]
    te = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    modules += [f"lora_te_text_model_encoder_layers_{i}_{m}" for i in (0, 1) for m in te]
    expected = {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert names == expected


# ------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_file_loads_in_diffusers_and_in_load_lora(family, trained, base, tmp_path):
    ad, outs = trained[family]
    written = L.save_lora(ad, tmp_path / "lora", format="diffusers")
    assert written == os.path.join(tmp_path / "lora", "pytorch_lora_weights.safetensors")
    assert os.listdir(tmp_path / "lora") == ["pytorch_lora_weights.safetensors"]
    sd, meta, fmt = L.read_lora(tmp_path / "lora")
    assert fmt == "diffusers"
    assert all(k.split(".")[0] in ("unet", "text_encoder", "text_encoder_2") for k in sd)
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 2.0

    pipe = get_dummy_pipeline(family)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    _assert_close(_outputs(DiffusersAdapter.from_pipeline(pipe, family)), outs)

    fresh = get_dummy_adapter(family)
    assert L.load_lora(fresh, tmp_path / "lora")["lora_format"] == "diffusers"
    _assert_close(_outputs(fresh), outs)
    with fresh.reference():
        _assert_close(_outputs(fresh), base[family], atol=1e-6)


def test_diffusers_alpha_is_carried_by_lora_adapter_metadata(trained, tmp_path):
    """Without `lora_adapter_metadata` diffusers assumes alpha == rank: the test above would then fail (scale 1)."""
    import safetensors.torch

    ad, outs = trained["sd15"]
    L.save_lora(ad, tmp_path / "lora", format="diffusers")
    sd, meta, _ = L.read_lora(tmp_path / "lora")
    del meta["lora_adapter_metadata"]
    os.makedirs(tmp_path / "stripped")
    safetensors.torch.save_file(sd, str(tmp_path / "stripped" / "pytorch_lora_weights.safetensors"), metadata=meta)
    pipe = get_dummy_pipeline("sd15")
    pipe.load_lora_weights(str(tmp_path / "stripped"))
    assert not torch.allclose(_outputs(DiffusersAdapter.from_pipeline(pipe, "sd15"))["pred"], outs["pred"], atol=1e-3)


def test_load_lora_reads_a_file_written_by_diffusers(trained, tmp_path):
    """A file from diffusers' own save_lora_weights (peft config in its metadata) loads; our layout matches it."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    ad, outs = trained["sd15"]
    unet, te = ad.unet, ad.text_encoders[0]
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "theirs"),
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te.peft_config["default"].to_dict(),
    )
    theirs, _, fmt = L.read_lora(tmp_path / "theirs")
    assert fmt == "diffusers"
    L.save_lora(ad, tmp_path / "ours", format="diffusers")
    ours, _, _ = L.read_lora(tmp_path / "ours")
    # same keys, except that ours spell the transformers-4 `text_model.` level transformers 5 dropped
    assert {k.replace("text_encoder.text_model.", "text_encoder.") for k in ours} == set(theirs)
    fresh = get_dummy_adapter("sd15")
    L.load_lora(fresh, tmp_path / "theirs")
    _assert_close(_outputs(fresh), outs)


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_file_round_trip(family, trained, base, tmp_path):
    ad, outs = trained[family]
    path = L.save_lora(ad, tmp_path / "lora.safetensors")  # kohya is the default format
    sd, meta, fmt = L.read_lora(path)
    assert fmt == "kohya" and all(k.startswith(("lora_unet_", "lora_te")) for k in sd)
    assert sd["lora_unet_conv_in.lora_down.weight"].shape == (4, 4, 3, 3)  # conv LoRA keeps peft's 4-D shapes
    proj_in = next(v for k, v in sd.items() if k.endswith("attentions_0_proj_in.lora_down.weight"))
    assert proj_in.ndim == (4 if family == "sd15" else 2)  # 1x1 conv in SD1.5, linear in SD2 / SDXL
    fresh = get_dummy_adapter(family)
    L.load_lora(fresh, path)
    _assert_close(_outputs(fresh), outs)
    trainable = [p for p in fresh.trainable_parameters()]
    assert trainable and len(trainable) == len(ad.trainable_parameters())
    with fresh.reference():
        _assert_close(_outputs(fresh), base[family], atol=1e-6)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_file_loads_in_diffusers(family, tmp_path):
    """diffusers' own kohya reader (`_convert_non_diffusers_lora_to_diffusers`) reads our names and alphas."""
    torch.manual_seed(5)
    ad = get_dummy_adapter(family)
    L.add_lora(
        ad, L.LoraSpec(rank=4, alpha=8.0, text_encoder_targets=L.TEXT_ENCODER_TARGETS, init_lora_weights="gaussian")
    )
    path = L.save_lora(ad, tmp_path / "lora.safetensors", format="kohya")
    pipe = get_dummy_pipeline(family)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    _assert_close(_outputs(DiffusersAdapter.from_pipeline(pipe, family)), _outputs(ad))
    assert os.path.basename(path) == "lora.safetensors"


def test_load_lora_overwrites_an_existing_lora(trained, tmp_path):
    ad, outs = trained["sd15"]
    path = L.save_lora(ad, tmp_path / "lora.safetensors")
    fresh = get_dummy_adapter("sd15")
    L.add_lora(
        fresh,
        L.LoraSpec(rank=4, alpha=4.0, unet_targets=ALL_UNET_TARGETS, text_encoder_targets=L.TEXT_ENCODER_TARGETS),
    )
    L.load_lora(fresh, path)  # same modules and ranks; weights and alpha (4 -> 2) replaced
    _assert_close(_outputs(fresh), outs)
    other = get_dummy_adapter("sd15")
    L.add_lora(other, L.LoraSpec(rank=8))
    with pytest.raises(ValueError, match="other modules or ranks"):
        L.load_lora(other, path)


def test_metadata_and_model_hash(trained, tmp_path):
    ad, _ = trained["sd2"]
    base_hash = L.model_hash(get_dummy_adapter("sd2"))
    assert L.model_hash(ad) == base_hash  # peft wrapping and LoRA tensors do not change the base hash
    changed = get_dummy_adapter("sd2")
    with torch.no_grad():
        changed.unet.conv_in.bias[0] += 1.0
    assert L.model_hash(changed) != base_hash
    meta = L.lora_metadata(loss="popalign", hyperparameters={"beta": 5000.0, "lr": 1e-4}, base_model_hash=base_hash,
                           data_hash="abc123", run="r1")  # fmt: skip
    for fmt, dest in (("kohya", tmp_path / "l.safetensors"), ("diffusers", tmp_path / "d")):
        _, got, _ = L.read_lora(L.save_lora(ad, dest, format=fmt, metadata=meta))
        assert got["base_model_hash"] == base_hash and got["loss"] == "popalign" and got["data_hash"] == "abc123"
        assert json.loads(got["hyperparameters"]) == {"beta": 5000.0, "lr": 1e-4} and got["run"] == "r1"
        assert got["popalign_version"] and got["family"] == "sd2" and got["lora_format"] == fmt
        assert got["lora_rank"] == "4" and got["lora_alpha"] == "2"
        assert json.loads(got["lora_unet_targets"]) == sorted(ALL_UNET_TARGETS)
        assert json.loads(got["lora_text_encoder_targets"]) == sorted(L.TEXT_ENCODER_TARGETS)
    _, got, _ = L.read_lora(tmp_path / "l.safetensors")
    assert (got["ss_network_dim"], got["ss_network_alpha"], got["ss_base_model_version"]) == ("4", "2", "sd_v2_v")
    with pytest.raises(ValueError, match="metadata"):
        L.save_lora(ad, tmp_path / "x.safetensors", metadata={"epoch": 3})


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_save_is_atomic(format, trained, tmp_path, monkeypatch):
    import safetensors.torch

    ad, _ = trained["sd15"]
    dest = tmp_path / ("lora.safetensors" if format == "kohya" else "lora")
    final = L.save_lora(ad, dest, format=format)
    before = open(final, "rb").read()
    real_save = safetensors.torch.save_file

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        L.save_lora(ad, tmp_path / "new.safetensors" if format == "kohya" else tmp_path / "new", format=format)
    with pytest.raises(OSError, match="disk full"):
        L.save_lora(ad, dest, format=format)  # over an existing good file
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert os.listdir(os.path.dirname(final)) == [os.path.basename(final)]  # no temporary file left behind
    if format == "diffusers":
        assert os.listdir(tmp_path / "new") == []  # the folder was created, but holds no file
    assert open(final, "rb").read() == before


def test_file_errors(trained, tmp_path):
    import safetensors.torch

    ad, _ = trained["sd15"]
    with pytest.raises(ValueError, match=r"format='lycoris'.*valid values: diffusers, kohya"):
        L.save_lora(ad, tmp_path / "x.safetensors", format="lycoris")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        L.save_lora(ad, tmp_path / "x.pt", format="kohya")
    safetensors.torch.save_file({"model.weight": torch.zeros(2, 2)}, str(tmp_path / "notlora.safetensors"))
    with pytest.raises(ValueError, match="no recognised LoRA keys"):
        L.read_lora(tmp_path / "notlora.safetensors")
    with pytest.raises(ValueError, match="no recognised LoRA keys"):
        L.load_lora(get_dummy_adapter("sd15"), tmp_path / "notlora.safetensors")
    sd, meta, _ = L.read_lora(L.save_lora(ad, tmp_path / "ok.safetensors"))
    first = next(k for k in sd if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    safetensors.torch.save_file({**sd, f"{first}.dora_scale": torch.ones(1)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(ValueError, match="unsupported kinds.*dora_scale"):
        L.read_lora(tmp_path / "dora.safetensors")
    xl, _ = trained["sdxl"]
    path = L.save_lora(xl, tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="text_encoder_2"):
        L.load_lora(get_dummy_adapter("sd15"), path)
    with pytest.raises(ValueError, match="family='sd4'"):
        L.peft_to_kohya({}, "sd4")


def test_public_names_importable_from_files_and_package():
    import popalign_core.lora as pkg
    from popalign_core.lora import files, inject, kohya, metadata

    for name in files.__all__:
        assert getattr(pkg, name) is getattr(files, name)
    assert set(dir(pkg)) == set(files.__all__)
    assert files.add_lora is inject.add_lora and files.LoraSpec is inject.LoraSpec
    assert files.peft_to_kohya is kohya.peft_to_kohya and files.model_hash is metadata.model_hash


def test_metadata_checked_before_writing(tmp_path):
    adapter = get_dummy_adapter("sd15")
    L.add_lora(adapter, L.LoraSpec(rank=2, alpha=2.0))
    with pytest.raises(ValueError, match=r"offending keys: \[1\]"):
        L.save_lora(adapter, tmp_path / "a.safetensors", metadata={1: "x"})
    with pytest.raises(ValueError, match=r"key\(s\) \['format'\] are reserved"):
        L.save_lora(adapter, tmp_path / "a.safetensors", metadata={"format": "x"})
    assert not list(tmp_path.iterdir())
