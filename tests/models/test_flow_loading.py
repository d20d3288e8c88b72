"""Offline loading of SD3 / FLUX models (`models.loading` -> `models.loading_flow`) and the original-layout writer
(`models.flow_single_file`): round trips of the tiny models, the writer against diffusers' own conversion at the real
widths, ComfyUI's detection of the written SD3 transformer, the shipped configs, and the user-facing errors."""

from __future__ import annotations

import json
from pathlib import Path

import comfy_support as cs  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)
import pytest
import torch

from popalign_core.models.flow_adapter import FlowAdapter
from popalign_core.models.flow_single_file import save_single_file, to_original_state_dict
from popalign_core.models.loading import FAMILY_CONFIG_DIRS, detect_family, load_model
from popalign_core.models.loading_flow import T5_COMPONENT, T5_TOKENIZER_DIRS, transformer_layout
from popalign_core.models.tiny_flow import encoders_of, get_dummy_flow_components

FLOW = ("sd3", "flux")
PROMPTS = ["a photo of a doctor", "portrait of an old farmer"]
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


# ------------------------------------------------------------------------------------------------------------ helpers
def tiny_components(family: str, t5: bool = True) -> dict:
    """The tiny components (SD3's CLIP-L projection is the identity there, as in the real model)."""
    return get_dummy_flow_components(family, seed=3, t5=t5)


def write_tiny_config_dir(comps: dict, family: str, folder: Path, tokenizer: bool = True) -> Path:
    """A diffusers config folder for the tiny components (what ``config_dir=`` takes), with the tiny T5 tokenizer in
    tokenizer_2/ (FLUX) or tokenizer_3/ (SD3) unless `tokenizer` is False."""
    names = ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    for name in [n for n in names if comps.get(n) is not None]:
        model = comps[name]
        (model.save_config if hasattr(model, "save_config") else model.config.save_pretrained)(folder / name)
    comps["scheduler"].save_config(folder / "scheduler")
    if tokenizer:
        comps[T5_TOKENIZER_DIRS[family]].save_pretrained(folder / T5_TOKENIZER_DIRS[family])
    (folder / "model_index.json").write_text(json.dumps({"_class_name": PIPELINES[family]}))
    return folder


def adapter_of(comps: dict, family: str) -> FlowAdapter:
    encoders, tokenizers = encoders_of(comps, family)
    return FlowAdapter(comps["transformer"], comps["vae"], encoders, tokenizers, comps["scheduler"], family)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), what
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"{what}: {differ[:5]}"


def assert_same_outputs(a, b) -> None:
    """Two flow adapters encode PROMPTS and predict a seeded batch bit for bit alike."""
    with torch.no_grad():
        ca, cb = a.encode_prompt(PROMPTS), b.encode_prompt(PROMPTS)
        assert torch.equal(ca.embeds, cb.embeds) and torch.equal(ca.pooled, cb.pooled)
        x = torch.randn(2, a.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([250.0, 800.0])
        assert torch.equal(a.predict(x, t, ca), b.predict(x, t, cb))


@pytest.fixture(scope="module", params=FLOW)
def saved(request, tmp_path_factory) -> dict:
    family = request.param
    root = tmp_path_factory.mktemp(f"tiny_{family}")
    comps = tiny_components(family)
    path = save_single_file(comps, family, root / f"tiny_{family}.safetensors")
    return {
        "family": family,
        "comps": comps,
        "path": path,
        "config": write_tiny_config_dir(comps, family, root / "cfg"),
    }


# ------------------------------------------------------------------------------------------------------- round trip
def test_round_trip_is_bit_identical(saved):
    family, comps = saved["family"], saved["comps"]
    loaded = load_model(saved["path"], config_dir=saved["config"])
    assert isinstance(loaded, FlowAdapter) and loaded.family == family
    assert_same_weights(comps["transformer"], loaded.transformer, "transformer")
    assert_same_weights(comps["vae"], loaded.vae, "vae")
    for k, (enc, got) in enumerate(zip(encoders_of(comps, family)[0], loaded.text_encoders)):
        assert_same_weights(enc, got, f"text encoder {k}")

    assert_same_outputs(adapter_of(comps, family), loaded)
    assert loaded.noise_scheduler.config.get("shift") == comps["scheduler"].config.get("shift")


def test_file_has_the_comfyui_layout(saved):
    from safetensors import safe_open

    with safe_open(str(saved["path"]), "pt") as f:
        keys = list(f.keys())
    heads = {".".join(k.split(".")[:3]) for k in keys if k.startswith("text_encoders.")}
    vae = "first_stage_model." if saved["family"] == "sd3" else "vae."
    want = {"text_encoders.clip_l.transformer", "text_encoders.t5xxl.transformer"}
    if saved["family"] == "sd3":
        want.add("text_encoders.clip_g.transformer")
    assert heads == want
    assert any(k.startswith(vae) for k in keys)
    assert all(k.startswith(("model.diffusion_model.", vae, "text_encoders.")) for k in keys)
    assert detect_family(keys) == saved["family"]
    assert detect_family([k.removeprefix("model.diffusion_model.") for k in keys]) == saved["family"]


# ---------------------------------------------------------------- the writer against diffusers' own conversion
def _labelled(model) -> dict[str, torch.Tensor]:
    """One [rows, 1] int32 tensor per diffusers tensor, each row labelled uniquely: the conversions only cut, join
    and swap along dim 0, so labels show every row's destination at no memory cost."""
    out, start = {}, 0
    for k, v in model.state_dict().items():
        rows = v.shape[0] if v.ndim else 1
        out[k] = torch.arange(start, start + rows, dtype=torch.int32).view(rows, 1)
        start += rows
    return out


@pytest.mark.parametrize(
    "family,config",
    [
        ("sd3", dict(num_layers=3, dual_attention_layers=(0,), qk_norm="rms_norm")),  # SD3.5-medium's kind of block
        ("sd3", dict(num_layers=2, dual_attention_layers=(), qk_norm=None)),  # SD3-medium's
        ("flux", dict(num_layers=1, num_single_layers=2)),  # FLUX.1-dev's width (diffusers hard-codes 3072)
        ("flux", dict(num_layers=1, num_single_layers=1, guidance_embeds=False)),  # schnell
    ],
)
def test_writer_inverts_diffusers_conversion_at_full_width(family, config):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    from popalign_core.models.loading_common import read_json
    from popalign_core.models.loading_flow import layout_to_original

    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    base = read_json(FAMILY_CONFIG_DIRS[family] / "transformer" / "config.json")
    with torch.device("meta"):
        model = cls.from_config({**base, **config})
    labels = _labelled(model)
    original = layout_to_original(labels, transformer_layout(model, family))
    ckpt = {"model.diffusion_model." + k: v for k, v in original.items()}
    convert = (
        convert_sd3_transformer_checkpoint_to_diffusers
        if family == "sd3"
        else convert_flux_transformer_checkpoint_to_diffusers
    )
    back = convert(ckpt)
    assert not ckpt, f"keys diffusers did not read: {sorted(ckpt)[:5]}"
    assert back.keys() == labels.keys()
    assert all(torch.equal(back[k], labels[k]) for k in labels)


def test_comfyui_detects_the_tiny_sd3_transformer(tmp_path):
    """ComfyUI 0.3.75 detects our tiny SD3 file as SD3. (No FLUX counterpart: ComfyUI's FLUX detection hard-codes
    the FLUX.1 width, 24 heads x 128, so the smallest detectable FLUX has ~531M parameters.)"""
    comfy = cs.comfyui_or_skip("0.3.75")
    path = save_single_file(tiny_components("sd3"), "sd3", tmp_path / "tiny_sd3.safetensors")
    result = cs.run_in_comfy(f"{__file__}:comfy_detect_job", {"path": str(path)}, comfy_dir=comfy)
    assert result["config"] == "SD3", result
    assert result["missing"] == [] and result["unexpected"] == [], result
    assert result["depth"] == 1


def comfy_detect_job(job: dict, log) -> dict:
    """Runs in the ComfyUI child process: ComfyUI's own detection and model class on the file's transformer."""
    import comfy.model_detection
    from safetensors.torch import load_file

    sd = load_file(job["path"])
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    model = config.get_model(sd, prefix)
    unet = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    missing, unexpected = model.diffusion_model.load_state_dict(unet, strict=False)
    return {
        "config": type(config).__name__,
        "missing": list(missing),
        "unexpected": list(unexpected),
        "depth": config.unet_config.get("depth"),
    }


# ------------------------------------------------------------------------------------------------- other inputs
def test_sd3_without_t5(tmp_path):
    comps = tiny_components("sd3", t5=False)
    path = save_single_file(comps, "sd3", tmp_path / "no_t5.safetensors")
    cfg = write_tiny_config_dir(tiny_components("sd3"), "sd3", tmp_path / "cfg", tokenizer=False)
    loaded = load_model(path, config_dir=cfg)  # no T5 weights, so no T5 tokenizer needed
    assert loaded.text_encoders[2] is None and loaded.tokenizers[2] is None
    with torch.no_grad():
        assert torch.equal(
            loaded.encode_prompt(PROMPTS).embeds, adapter_of(comps, "sd3").encode_prompt(PROMPTS).embeds
        )
    with pytest.raises(ValueError, match=r"text_encoders\.t5xxl\.transformer.*t5=False"):
        load_model(path, config_dir=cfg, t5=True)


def test_t5_tokenizer_from_argument_or_a_clear_error(saved, tmp_path):
    family = saved["family"]
    bare = write_tiny_config_dir(saved["comps"], family, tmp_path / "cfg", tokenizer=False)
    with pytest.raises(FileNotFoundError, match=rf"t5_tokenizer=.*{T5_TOKENIZER_DIRS[family]}/.*t5_tokenizer/"):
        load_model(saved["path"], config_dir=bare)
    tok = tmp_path / "t5_tok"
    saved["comps"][T5_TOKENIZER_DIRS[family]].save_pretrained(tok)
    loaded = load_model(saved["path"], config_dir=bare, t5_tokenizer=tok)
    assert loaded.text_encoders[-1] is not None and loaded.tokenizers[-1] is not None


def test_diffusers_folders(saved, tmp_path):
    from popalign_core.models.loading_flow import pipeline_class

    family, comps = saved["family"], dict(saved["comps"])
    if family == "sd3":  # SD3 folder without T5 loads without it
        comps.update(text_encoder_3=None, tokenizer_3=None)
    pipeline_class(family)(**comps).save_pretrained(tmp_path / "model", safe_serialization=True)
    loaded = load_model(tmp_path / "model")
    assert loaded.family == family
    assert_same_weights(saved["comps"]["transformer"], loaded.transformer, "transformer")
    assert (loaded.text_encoders[-1] is None) == (family == "sd3")
    with pytest.raises(ValueError, match="family='sd15' does not match"):
        load_model(tmp_path / "model", family="sd15")


def test_transformer_only_files_name_what_to_add(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(saved["path"]))
    unet = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    save_file(unet, str(tmp_path / "prefixed.safetensors"))
    save_file(
        {k.removeprefix("model.diffusion_model."): v for k, v in unet.items()}, str(tmp_path / "bfl.safetensors")
    )
    for name in ("prefixed", "bfl"):
        with pytest.raises(ValueError, match=r"transformer-only file: no weights for text_encoders\.clip_l"):
            load_model(tmp_path / f"{name}.safetensors", config_dir=saved["config"])
    no_t5 = {k: v for k, v in sd.items() if not k.startswith("text_encoders.t5xxl.")}
    save_file(no_t5, str(tmp_path / "no_t5.safetensors"))
    if saved["family"] == "flux":  # FLUX always needs T5
        with pytest.raises(ValueError, match=r"incomplete: no weights for text_encoders\.t5xxl"):
            load_model(tmp_path / "no_t5.safetensors", config_dir=saved["config"])


def test_bad_arguments_are_named(saved, tmp_path):
    path, cfg = saved["path"], saved["config"]
    with pytest.raises(ValueError, match="prediction_type='epsilon'.*rectified-flow.*valid values: None"):
        load_model(path, config_dir=cfg, prediction_type="epsilon")
    with pytest.raises(ValueError, match=f"family='sdxl' but .* is a '{saved['family']}' checkpoint"):
        load_model(path, config_dir=cfg, family="sdxl")
    with pytest.raises(ValueError, match="t5=False: FLUX cannot run"):
        load_model(path, config_dir=cfg, family="flux", t5=False)
    with pytest.raises(ValueError, match="pickles"):
        (tmp_path / "m.ckpt").write_bytes(b"x")
        load_model(tmp_path / "m.ckpt")


def test_unsupported_families_are_named():
    with pytest.raises(ValueError, match=r"FLUX\.2 model .* not supported; supported families: sd15, .*sd3, flux"):
        detect_family(
            [
                "model.diffusion_model.double_stream_modulation_img.lin.weight",
                "model.diffusion_model.double_blocks.0.x",
            ]
        )
    with pytest.raises(ValueError, match=r"cannot detect .*joint_blocks.*\(sd3\).*Supported families"):
        detect_family(["foo.bar"])


def test_sd3_clip_l_projection_must_be_identity():
    comps = get_dummy_flow_components("sd3", seed=3)
    torch.testing.assert_close(comps["text_encoder"].text_projection.weight, torch.eye(32), rtol=0, atol=0)
    with torch.no_grad():
        comps["text_encoder"].text_projection.weight.mul_(2.0)
    with pytest.raises(ValueError, match="CLIP-L text projection must be the identity"):
        to_original_state_dict(comps, "sd3")


# ---------------------------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("family,params", [("sd3", 2.24e9), ("flux", 11.9e9)])
def test_shipped_configs_build_the_real_models(family, params):
    """SD3.5-medium (2.24B transformer parameters without pos_embed, reported as 2.5B with the encoders' share)
    and FLUX.1-dev (11.9B), built on the meta device from the shipped folders."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import AutoConfig

    from popalign_core.models.loading_flow import flow_config_files

    cfg = FAMILY_CONFIG_DIRS[family]
    assert all((cfg / f).is_file() for f in flow_config_files(family))
    assert not any((cfg / d).exists() for d in ("tokenizer", "tokenizer_2", "tokenizer_3"))  # nothing copied
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(str(cfg), subfolder="transformer"))
        AutoencoderKL.from_config(AutoencoderKL.load_config(str(cfg), subfolder="vae"))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.03, n
    t5 = AutoConfig.from_pretrained(str(cfg / T5_COMPONENT[family]), local_files_only=True)
    assert (t5.d_model, t5.num_layers, t5.vocab_size) == (4096, 24, 32128)
