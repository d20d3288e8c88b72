"""Offline model loading (`models.loading`): single-file round trips for the three families, family detection,
prediction-type and dtype options, diffusers folders, and the error messages users see."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from popalign_core.models.loading import DTYPES, FAMILY_CONFIG_DIRS, detect_family, load_model, load_pipeline
from popalign_core.models.single_file import save_single_file, to_original_state_dict
from popalign_core.models.tiny import get_dummy_adapter, get_dummy_components, get_dummy_pipeline

FAMILIES = ("sd15", "sd2", "sdxl")


# ------------------------------------------------------------------------------------------------------------ helpers
def write_tiny_config_dir(family: str, root: Path) -> Path:
    """A diffusers config folder (no weights, no tokenizer) for the tiny components, via their own save methods."""
    pipe = get_dummy_pipeline(family)
    pipe.save_config(root)  # model_index.json
    index = json.loads((root / "model_index.json").read_text())
    for name in ("tokenizer", "tokenizer_2"):  # like the shipped folders: tokenizers are always passed in
        if name in index:
            index[name] = [None, None]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(root / name)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).config.save_pretrained(root / name)
    return root


def _modules(adapter) -> dict:
    mods = {"unet": adapter.unet, "vae": adapter.vae, "text_encoder": adapter.text_encoders[0]}
    if adapter.family == "sdxl":
        mods["text_encoder_2"] = adapter.text_encoders[1]
    return mods


def _assert_weights_equal(components: dict, adapter_or_modules) -> None:
    mods = adapter_or_modules if isinstance(adapter_or_modules, dict) else _modules(adapter_or_modules)
    for name, module in mods.items():
        want, got = components[name].state_dict(), module.state_dict()
        assert set(got) == set(want), name
        for k, v in want.items():
            assert torch.equal(got[k], v), f"{name}.{k}"


def _prediction(adapter, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    with torch.no_grad():
        cond = adapter.encode_prompt(["a photo of a doctor", ""])
        return adapter.predict(x.to(adapter.dtype), torch.tensor([10, 500]), cond)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per family: a tiny config folder and a single-file checkpoint of `get_dummy_components(family)`."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family in FAMILIES:
        cfg = write_tiny_config_dir(family, root / f"{family}-config")
        ckpt = save_single_file(get_dummy_components(family), family, root / f"{family}.safetensors")
        out[family] = (cfg, ckpt)
    return out


# --------------------------------------------------------------------------------------------------- single files
@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip_is_exact(tiny, family):
    cfg, ckpt = tiny[family]
    adapter = load_model(ckpt, config_dir=cfg)
    assert adapter.family == family
    assert adapter.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    _assert_weights_equal(get_dummy_components(family), adapter)
    assert torch.equal(_prediction(adapter), _prediction(get_dummy_adapter(family)))


def test_config_dir_needs_no_tokenizer_and_works_with_pipeline_from_single_file(tiny):
    """The config-folder layout also serves diffusers' whole-pipeline from_single_file, given our tokenizers.

    Without one it fails loudly: the folders list the tokenizer as null. (Listed as a CLIPTokenizer with no
    tokenizer/ folder, diffusers + transformers 5 silently build a 2-token tokenizer instead.)
    """
    from diffusers import StableDiffusionPipeline

    from popalign_core.models.tokenizers import clip_tokenizer

    cfg, ckpt = tiny["sd2"]
    assert not (cfg / "tokenizer").exists()
    # diffusers 0.42.1 means to raise "expected ... but only ... were passed" and trips on its own set arithmetic
    with pytest.raises((ValueError, TypeError)):
        StableDiffusionPipeline.from_single_file(str(ckpt), config=str(cfg), local_files_only=True)
    pipe = StableDiffusionPipeline.from_single_file(
        str(ckpt), config=str(cfg), local_files_only=True, tokenizer=clip_tokenizer("openclip")
    )
    _assert_weights_equal(get_dummy_components("sd2"), {n: getattr(pipe, n) for n in ("unet", "vae", "text_encoder")})


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_family_from_saved_keys(tiny, family):
    from safetensors import safe_open

    with safe_open(str(tiny[family][1]), framework="pt") as f:
        assert detect_family(f.keys()) == family


def test_detect_family_error_lists_what_was_seen():
    keys = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"]
    with pytest.raises(ValueError, match=r"cannot detect.*seen: .*model\.diffusion_model\.\* \(1\)"):
        detect_family(keys)
    with pytest.raises(ValueError, match="no keys at all"):
        detect_family([])


def test_prediction_type_override_sd2(tiny):
    cfg, ckpt = tiny["sd2"]
    v = load_model(ckpt, config_dir=cfg)
    eps = load_model(ckpt, config_dir=cfg, prediction_type="epsilon")
    assert (v.prediction_type, eps.prediction_type) == ("v_prediction", "epsilon")
    x0, noise, t = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16), torch.tensor([700])
    assert torch.equal(eps.target(x0, noise, t), noise)
    assert not torch.allclose(v.target(x0, noise, t), noise)
    # the sampling scheduler follows too
    pipe, _ = load_pipeline(ckpt, config_dir=cfg, prediction_type="epsilon")
    assert pipe.scheduler.config.prediction_type == "epsilon"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtype(tiny, dtype):
    cfg, ckpt = tiny["sd15"]
    adapter = load_model(ckpt, config_dir=cfg, dtype=dtype)
    assert adapter.dtype == DTYPES[dtype]
    for name, module in _modules(adapter).items():
        assert {p.dtype for p in module.parameters()} == {DTYPES[dtype]}, name
    want = get_dummy_components("sd15")["unet"].state_dict()
    got = adapter.unet.state_dict()
    assert all(torch.equal(got[k], v.to(DTYPES[dtype])) for k, v in want.items())


def test_sdxl_fp16_keeps_vae_fp32(tiny):
    cfg, ckpt = tiny["sdxl"]
    adapter = load_model(ckpt, config_dir=cfg, dtype="fp16")
    assert adapter.dtype == torch.float16 and adapter.text_encoders[1].dtype == torch.float16
    assert adapter.vae.dtype == torch.float32


def test_fp16_checkpoint_file_loads(tmp_path, tiny):
    cfg, _ = tiny["sd15"]
    ckpt = save_single_file(get_dummy_components("sd15"), "sd15", tmp_path / "half.safetensors", dtype="fp16")
    adapter = load_model(ckpt, config_dir=cfg)  # fp16 file, fp32 model
    assert adapter.dtype == torch.float32
    want = get_dummy_components("sd15")["unet"].state_dict()
    assert all(torch.equal(adapter.unet.state_dict()[k], v.half().float()) for k, v in want.items())


# ---------------------------------------------------------------------------------------------- diffusers folders
@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder(tmp_path, family):
    get_dummy_pipeline(family).save_pretrained(tmp_path / "model")
    adapter = load_model(tmp_path / "model")
    assert adapter.family == family
    _assert_weights_equal(get_dummy_components(family), adapter)
    assert torch.equal(_prediction(adapter), _prediction(get_dummy_adapter(family)))


def test_diffusers_folder_without_tokenizer_uses_shipped_one(tmp_path):
    get_dummy_pipeline("sd15").save_pretrained(tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "tokenizer")
    adapter = load_model(tmp_path / "model", prediction_type="v_prediction")
    assert adapter.tokenizers[0].model_max_length == 77 and adapter.prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------------------------------ errors
def test_missing_path_says_what_to_put_where(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors.*does not exist.*models/checkpoints.*model_index"):
        load_model(missing)


def test_folder_without_model_index(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model_index\.json.*a\.safetensors"):
        load_model(tmp_path)


def test_missing_component_file_is_named(tmp_path):
    get_dummy_pipeline("sd15").save_pretrained(tmp_path / "model")
    os.remove(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"unet/diffusion_pytorch_model\.safetensors"):
        load_model(tmp_path / "model")
    os.remove(tmp_path / "model" / "vae" / "config.json")
    with pytest.raises(FileNotFoundError, match=r"vae/config\.json"):
        load_model(tmp_path / "model")


@pytest.mark.parametrize("keep", [0, 10], ids=["a-lora-file", "half-the-weights"])
def test_weight_file_of_another_model_is_named_not_filled_in(tmp_path, keep):
    from safetensors.torch import load_file, save_file

    get_dummy_pipeline("sd15").save_pretrained(tmp_path / "model")
    f = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    kept = {k: sd[k] for k in sorted(sd)[:keep]} or {"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}
    save_file(kept, f)
    with pytest.raises(ValueError, match=r"diffusers folder .*model: no weights for unet parameter\(s\) .*copy the"):
        load_model(tmp_path / "model")


def test_pickle_weights_in_folder_are_refused(tmp_path):
    get_dummy_pipeline("sd15").save_pretrained(tmp_path / "model")
    unet = tmp_path / "model" / "unet"
    os.replace(unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickle.*diffusion_pytorch_model\.bin.*safetensors"):
        load_model(tmp_path / "model")


def test_missing_config_file_is_named(tiny, tmp_path):
    cfg, ckpt = tiny["sd15"]
    partial = shutil.copytree(cfg, tmp_path / "cfg")
    os.remove(partial / "scheduler" / "scheduler_config.json")
    with pytest.raises(FileNotFoundError, match=r"scheduler/scheduler_config\.json"):
        load_model(ckpt, config_dir=partial)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")  # never opened: refused by its name
    with pytest.raises(ValueError, match=r"pickle.*never loaded.*Convert it to \.safetensors"):
        load_model(path)


def test_other_file_types_and_bad_files(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unsupported file type '\.gguf'"):
        load_model(tmp_path / "m.gguf")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"checkpoint '.*broken\.safetensors' \(7 bytes\) is damaged, truncated or "
                       r"not a safetensors file .*; the file is damaged or incomplete"):  # fmt: skip
        load_model(tmp_path / "broken.safetensors")


def test_unknown_layout_is_refused_before_loading(tmp_path):
    from safetensors.torch import save_file

    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match=r"cannot detect the model family.*down_blocks\.0"):
        load_model(tmp_path / "unet.safetensors")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"family": "sd4"}, r"family='sd4'.*valid values: auto, sd15, sd2, sdxl, sd3, flux"),
        ({"dtype": "fp8"}, r"dtype='fp8'.*valid values: fp32, fp16, bf16"),
        ({"prediction_type": "sample"}, r"prediction_type='sample'.*valid values: None, epsilon, v_prediction"),
    ],
)
def test_bad_argument_names(tiny, kwargs, pattern):
    cfg, ckpt = tiny["sd15"]
    with pytest.raises(ValueError, match=pattern):
        load_model(ckpt, config_dir=cfg, **kwargs)


def test_family_mismatch(tiny):
    cfg, ckpt = tiny["sd15"]
    with pytest.raises(ValueError, match=r"family='sdxl' but .* is a 'sd15' checkpoint.*valid values: auto, sd15"):
        load_model(ckpt, config_dir=cfg, family="sdxl")


def test_checkpoint_config_disagreement_is_reported(tiny):
    cfg, ckpt = tiny["sd15"]
    with pytest.raises(ValueError, match=r"cannot load the unet with the sd15 config"):
        load_model(ckpt)  # tiny weights vs the shipped full-size SD1.5 config


# ---------------------------------------------------------------------------------------------------- shipped dirs
def test_shipped_config_dirs_hold_configs_only():
    for family, root in FAMILY_CONFIG_DIRS.items():
        if family in ("sd3", "flux"):  # the flow families' folders: tests/models/test_flow_loading.py
            continue
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        want = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json"]
        want += ["text_encoder_2/config.json"] if family == "sdxl" else []
        assert files == sorted([*want, "unet/config.json", "vae/config.json"]), family
        index = json.loads((root / "model_index.json").read_text())
        assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
        assert index["tokenizer"] == [None, None]  # never loaded from here: passed in from models.tokenizers
    sched = json.loads((FAMILY_CONFIG_DIRS["sd2"] / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"


# ------------------------------------------------------------------------------------------------------------- slow
def _random_fill_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if ("norm" in name and name.endswith("weight")) else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))


@pytest.mark.slow
def test_full_size_sd15_checkpoint_loads_with_shipped_config(tmp_path):
    """A full-size SD1.5 checkpoint (random weights, built on meta and materialised in fp16) loads offline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = FAMILY_CONFIG_DIRS["sd15"]
    with torch.device("meta"):
        comps = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")),
        }
    for i, (name, module) in enumerate(comps.items()):
        comps[name] = module.to(torch.float16).to_empty(device="cpu")
        _random_fill_(comps[name], i)
    ckpt = save_single_file(comps, "sd15", tmp_path / "sd15-random.safetensors", dtype="fp16")
    w = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"
    want = to_original_state_dict(comps, "sd15")[w].clone()
    del comps
    assert ckpt.stat().st_size > 1.5e9

    adapter = load_model(ckpt, dtype="bf16")  # the shipped config; bf16 runs on any CPU
    assert adapter.family == "sd15" and adapter.native_size == 512 and adapter.dtype == torch.bfloat16
    assert adapter.unet.config.cross_attention_dim == 768
    got = adapter.unet.up_blocks[3].attentions[2].transformer_blocks[0].attn2.to_k.weight
    assert torch.equal(got, want.to(torch.bfloat16))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = adapter.predict(x, torch.tensor([500]), adapter.encode_prompt(["a photo of a nurse"]))
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    del adapter, got

    # the shipped folder also configures diffusers' whole-pipeline loader, offline, given our tokenizer
    from diffusers import StableDiffusionPipeline

    from popalign_core.models.tokenizers import clip_tokenizer

    pipe = StableDiffusionPipeline.from_single_file(
        str(ckpt), config=str(root), local_files_only=True, torch_dtype=torch.bfloat16, tokenizer=clip_tokenizer()
    )
    assert torch.equal(pipe.unet.up_blocks[3].attentions[2].transformer_blocks[0].attn2.to_k.weight, want.bfloat16())
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "PNDMScheduler"


def test_toyworld_spec_names_the_shipped_model(monkeypatch, tmp_path):
    from popalign_core.models.loading import resolve_model_path
    from popalign_core.toyworld import classifier

    assert resolve_model_path("toyworld") == classifier.default_toyworld_dir()
    assert resolve_model_path("~/x.safetensors") == Path.home() / "x.safetensors"
    adapter = load_model("toyworld")
    assert adapter.family == "sd15" and adapter.unet.dtype == torch.float32  # stored fp16, loaded fp32
    monkeypatch.setattr(classifier, "default_toyworld_dir", lambda: tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="rebuild it with `popalign toyworld build --out"):
        load_model("toyworld")
