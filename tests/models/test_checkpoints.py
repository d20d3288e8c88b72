"""Diffusers -> original-layout conversion (`models.single_file`), checked against diffusers' own single-file
conversion (the inverse direction), against OpenCLIP's text tower, and against the shipped full-size configs
(built on the meta device: no memory, no weights)."""

from __future__ import annotations

import os

import pytest
import torch

from popalign_core.models.loading import FAMILY_CONFIG_DIRS
from popalign_core.models.single_file import (
    CLIP_PREFIXES,
    OPENCLIP_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    save_single_file,
    to_original_state_dict,
    unet_to_original,
    vae_to_original,
)
from popalign_core.models.tiny import get_dummy_components

FAMILIES = ("sd15", "sd2", "sdxl")


# ------------------------------------------------------------------------------------------------------------ helpers
def _sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _diffusers_unet(ckpt: dict, config) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(ckpt, dict(config))


def _diffusers_vae(ckpt: dict, config) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(ckpt, dict(config))


def _flat(sd: dict) -> dict:
    """transformers >= 5.6 `CLIPTextModel` keys have no ``text_model.`` prefix; compare in that form."""
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def _diffusers_clip(ckpt: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    return _flat(convert_ldm_clip_checkpoint(ckpt))


def _diffusers_openclip(model, ckpt: dict, prefix: str) -> dict:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    return convert_open_clip_checkpoint(model, ckpt, prefix=prefix)


def _assert_same(expected: dict, got: dict, exact: bool = True) -> None:
    assert set(got) == set(expected), (sorted(set(expected) - set(got))[:5], sorted(set(got) - set(expected))[:5])
    for k, v in expected.items():
        assert tuple(got[k].shape) == tuple(v.shape), k
        if exact:
            assert torch.equal(got[k], v), k


def _text_encoders(components: dict, family: str) -> dict:
    """The round trip of the text encoder(s) through diffusers' own conversion functions."""
    sd = to_original_state_dict(components, family)
    out = {}
    if family == "sd15":
        out["text_encoder"] = _diffusers_clip({k: v for k, v in sd.items() if k.startswith(CLIP_PREFIXES["sd15"])})
    elif family == "sd2":
        enc = components["text_encoder"]
        got = _flat(_diffusers_openclip(enc, sd, OPENCLIP_PREFIXES["sd2"]))
        # the extra OpenCLIP block has no CLIPTextModel layer: diffusers skips it (its ignore list names block 23,
        # the full-size one; for other depths its loader drops keys the model does not have)
        extra = f"encoder.layers.{enc.config.num_hidden_layers}."
        out["text_encoder"] = {k: v for k, v in got.items() if not k.startswith(extra)}
    else:
        out["text_encoder"] = _diffusers_clip({k: v for k, v in sd.items() if k.startswith(CLIP_PREFIXES["sdxl"])})
        p = OPENCLIP_PREFIXES["sdxl"]
        out["text_encoder_2"] = _diffusers_openclip(components["text_encoder_2"], sd, p)
    return out


def meta_components(family: str) -> dict:
    """Full-size models built from the shipped configs on the meta device (shapes only, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = FAMILY_CONFIG_DIRS[family]
    with torch.device("meta"):
        comps = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")),
        }
        if family == "sdxl":
            cfg = CLIPTextConfig.from_pretrained(root / "text_encoder_2")
            comps["text_encoder_2"] = CLIPTextModelWithProjection(cfg)
    return comps


# ------------------------------------------------------------------------------------------------- tiny round trips
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_components_round_trip_through_diffusers_conversion(family):
    comps = get_dummy_components(family)
    sd = to_original_state_dict(comps, family)
    assert all(k.startswith((UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.")) for k in sd)
    _assert_same(comps["unet"].state_dict(), _diffusers_unet(sd, comps["unet"].config))
    _assert_same(comps["vae"].state_dict(), _diffusers_vae(sd, comps["vae"].config))
    for name, got in _text_encoders(comps, family).items():
        _assert_same(comps[name].state_dict(), got)


def test_sd15_text_encoder_and_vae_layout():
    sd = to_original_state_dict(get_dummy_components("sd15"), "sd15")
    te = _sub(sd, "cond_stage_model.transformer.")
    assert te and all(k.startswith("text_model.") for k in te)  # original checkpoints keep the text_model. level
    assert "text_model.embeddings.token_embedding.weight" in te
    attn = _sub(sd, "first_stage_model.encoder.mid.attn_1.")
    assert set(attn) == {f"{n}.{p}" for n in ("norm", "q", "k", "v", "proj_out") for p in ("weight", "bias")}
    assert attn["q.weight"].shape == (64, 64, 1, 1)  # 1x1 convolutions in the original VAE


def test_sd2_openclip_layout_extra_zero_block_and_identity_projection():
    comps = get_dummy_components("sd2")
    te = _sub(to_original_state_dict(comps, "sd2"), "cond_stage_model.model.")
    n = comps["text_encoder"].config.num_hidden_layers
    blocks = {int(k.split(".")[2]) for k in te if k.startswith("transformer.resblocks.")}
    assert blocks == set(range(n + 1))  # one block more than the CLIPTextModel, like the real ViT-H tower (24 vs 23)
    extra = _sub(te, f"transformer.resblocks.{n}.")
    assert set(extra) == set(_sub(te, "transformer.resblocks.0.")) and all(not v.any() for v in extra.values())
    assert te["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 32, 32)
    assert torch.equal(te["text_projection"], torch.eye(32))
    assert {"positional_embedding", "token_embedding.weight", "ln_final.weight", "logit_scale"} <= set(te)


def test_sdxl_text_projection_is_stored_transposed():
    comps = get_dummy_components("sdxl")
    te2 = _sub(to_original_state_dict(comps, "sdxl"), "conditioner.embedders.1.model.")
    assert torch.equal(te2["text_projection"], comps["text_encoder_2"].text_projection.weight.T)
    assert any(
        k.startswith("conditioner.embedders.0.transformer.text_model.") for k in to_original_state_dict(comps, "sdxl")
    )


def _unet(**kw):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    base = dict(sample_size=8, in_channels=4, out_channels=4, norm_num_groups=8, cross_attention_dim=16)
    return UNet2DConditionModel(**{**base, **kw}).eval()


@pytest.mark.parametrize(
    "kw",
    [
        # three levels, two res blocks each, transformer depth 2 (SDXL-like nesting), mid block
        dict(
            block_out_channels=(8, 16, 16),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=2,
            transformer_layers_per_block=(1, 2, 2),
            use_linear_projection=True,
        ),
        # one level and no mid block (the tiny UNet ComfyUI still detects as SD1.5)
        dict(
            block_out_channels=(16,),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("UpBlock2D",),
            mid_block_type=None,
            attention_head_dim=2,
        ),
    ],
    ids=["three-levels-depth2", "one-level-no-mid"],
)
def test_unet_structures_round_trip(kw):
    unet = _unet(**kw)
    orig = unet_to_original(unet)
    if unet.mid_block is None:
        assert not any(k.startswith("middle_block.") for k in orig)
    _assert_same(unet.state_dict(), _diffusers_unet({UNET_PREFIX + k: v for k, v in orig.items()}, unet.config))


def test_unsupported_unet_block_type_is_refused():
    unet = _unet(
        block_out_channels=(8,),
        layers_per_block=1,
        down_block_types=("AttnDownBlock2D",),
        up_block_types=("UpBlock2D",),
        attention_head_dim=2,
    )
    with pytest.raises(ValueError, match=r"down_block_types.*AttnDownBlock2D.*valid values"):
        unet_to_original(unet)


def test_peft_wrapped_models_must_be_merged_first():
    from peft import LoraConfig

    comps = get_dummy_components("sd15")
    comps["unet"].add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]))
    with pytest.raises(ValueError, match=r"peft adapter weights.*merge them first"):
        to_original_state_dict(comps, "sd15")


def test_vae_up_and_down_sampler_names():
    vae = get_dummy_components("sd15")["vae"]
    orig = vae_to_original(vae)
    assert orig["decoder.up.1.upsample.conv.weight"].shape == vae.decoder.up_blocks[0].upsamplers[0].conv.weight.shape
    assert "encoder.down.0.downsample.conv.weight" in orig and "encoder.down.1.downsample.conv.weight" not in orig


def test_bad_arguments():
    comps = get_dummy_components("sd15")
    with pytest.raises(ValueError, match=r"family='sd3'.*valid values: sd15, sd2, sdxl"):
        to_original_state_dict(comps, "sd3")
    with pytest.raises(ValueError, match=r"components: missing text_encoder_2"):
        to_original_state_dict(comps, "sdxl")
    with pytest.raises(ValueError, match=r"dtype='fp8'.*valid values: fp32, fp16, bf16"):
        save_single_file(comps, "sd15", "x.safetensors", dtype="fp8")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_single_file(comps, "sd15", "x.ckpt")


def test_save_single_file_atomic_dtype_and_metadata(tmp_path):
    from safetensors import safe_open

    comps = get_dummy_components("sd15")
    path = save_single_file(comps, "sd15", tmp_path / "sub" / "m.safetensors", dtype="fp16")
    assert sorted(os.listdir(path.parent)) == ["m.safetensors"]  # no temp file left behind
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["popalign.family"] == "sd15"
        keys = list(f.keys())
        assert f.get_tensor("model.diffusion_model.input_blocks.0.0.weight").dtype == torch.float16
    assert set(keys) == set(to_original_state_dict(comps, "sd15"))
    # overwriting goes through a temp file + os.replace as well
    save_single_file(comps, "sd15", path, dtype="bf16")
    assert sorted(os.listdir(path.parent)) == ["m.safetensors"]


# ---------------------------------------------------------------------------------------------- OpenCLIP equivalence
def _openclip_tower(sd: dict, cfg, layers: int):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import TextTransformer

    tower = TextTransformer(
        context_length=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size,
        width=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        layers=layers,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        output_dim=sd["text_projection"].shape[1],
        act_layer=torch.nn.GELU,
    )
    del open_clip
    missing, unexpected = tower.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"attn_mask"}, (missing, unexpected)
    return tower.eval()


def _run_blocks(tower, ids, n_blocks):
    x = tower.token_embedding(ids) + tower.positional_embedding
    for blk in tower.transformer.resblocks[:n_blocks]:
        x = blk(x, attn_mask=tower.attn_mask)
    return x


@torch.no_grad()
def test_openclip_layout_matches_open_clip_text_tower():
    """The written OpenCLIP state dicts load into open_clip's own text tower and compute what diffusers computes."""
    from popalign_core.models.tokenizers import clip_tokenizer

    ids = clip_tokenizer("openclip")(["a photo of a doctor", "x"], padding="max_length", return_tensors="pt").input_ids
    # SD2: N+1 blocks, the extra all-zero block is an identity
    comps = get_dummy_components("sd2")
    enc = comps["text_encoder"]
    sd = _sub(to_original_state_dict(comps, "sd2"), "cond_stage_model.model.")
    sd.pop("logit_scale")
    n = enc.config.num_hidden_layers
    tower = _openclip_tower(sd, enc.config, n + 1)
    hf = enc(ids, output_hidden_states=True)
    torch.testing.assert_close(tower.ln_final(_run_blocks(tower, ids, n + 1)), hf.last_hidden_state)
    torch.testing.assert_close(tower.ln_final(_run_blocks(tower, ids, n)), hf.last_hidden_state)
    # SDXL encoder 2: every layer's hidden state and the projected pooled embedding
    comps = get_dummy_components("sdxl")
    enc2 = comps["text_encoder_2"]
    sd = _sub(to_original_state_dict(comps, "sdxl"), "conditioner.embedders.1.model.")
    sd.pop("logit_scale")
    tower = _openclip_tower(sd, enc2.config, enc2.config.num_hidden_layers)
    hf = enc2(ids, output_hidden_states=True)
    for k in range(enc2.config.num_hidden_layers + 1):
        torch.testing.assert_close(_run_blocks(tower, ids, k), hf.hidden_states[k])
    pooled = tower(ids)
    pooled = pooled[0] if isinstance(pooled, tuple) else pooled
    torch.testing.assert_close(pooled, hf.text_embeds)


# ---------------------------------------------------------------------------------- shipped configs on meta device
# Per-component key counts of the original checkpoints (ComfyUI's loader accepts exactly these; real SD1.5 / SDXL
# files have one more key each: the text encoder's position_ids buffer).
EXPECTED_COUNTS = {
    "sd15": {UNET_PREFIX: 686, VAE_PREFIX: 248, "cond_stage_model.transformer.": 196},
    "sd2": {UNET_PREFIX: 686, VAE_PREFIX: 248, "cond_stage_model.model.": 294},
    "sdxl": {
        UNET_PREFIX: 1680,
        VAE_PREFIX: 248,
        "conditioner.embedders.0.transformer.": 196,
        "conditioner.embedders.1.model.": 390,
    },
}
LANDMARK_SHAPES = {
    "sd15": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.text_projection": (1024, 1024),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.weight": (1280,),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
    },
}
DIFFUSERS_MODEL_TYPE = {"sd15": "v1", "sd2": "v2", "sdxl": "xl_base"}


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_configs_agree_with_converter_and_diffusers(family):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from popalign_core.models.loading import detect_family

    comps = meta_components(family)
    assert all(p.is_meta for m in ("unet", "vae") for p in comps[m].parameters())
    sd = to_original_state_dict(comps, family)
    counts = {p: sum(k.startswith(p) for k in sd) for p in EXPECTED_COUNTS[family]}
    assert counts == EXPECTED_COUNTS[family]
    assert len(sd) == sum(EXPECTED_COUNTS[family].values())
    for key, shape in LANDMARK_SHAPES[family].items():
        assert tuple(sd[key].shape) == shape, key
    # what diffusers' single-file loader infers from these keys, and what it converts them back to
    assert infer_diffusers_model_type(sd) == DIFFUSERS_MODEL_TYPE[family]
    assert detect_family(sd) == family
    _assert_same(comps["unet"].state_dict(), _diffusers_unet(sd, comps["unet"].config), exact=False)
    _assert_same(comps["vae"].state_dict(), _diffusers_vae(sd, comps["vae"].config), exact=False)
    for name, got in _text_encoders(comps, family).items():
        _assert_same(
            _flat(comps[name].state_dict()) if name == "text_encoder" else comps[name].state_dict(), got, False
        )
