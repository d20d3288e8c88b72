"""SD3 / FLUX from separate component files (`models.flow_parts`): the tiny models written in the layouts ComfyUI's
UNETLoader / DualCLIPLoader / TripleCLIPLoader / VAELoader read, loaded back bit-identically to the all-in-one file;
fp8 text encoders; the errors; the T5 tokenizer found in a ComfyUI tree; the options in configs and on the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from popalign_core.models.flow_single_file import save_single_file, t5_to_original, to_original_state_dict
from popalign_core.models.flow_single_file import transformer_to_original as tf_original
from popalign_core.models.loading import load_model
from popalign_core.models.loading_flow import T5_COMPONENT
from popalign_core.models.single_file import _hf_clip_state_dict, vae_to_original
from popalign_core.models.tiny_flow import TINY_T5_TOKENS, get_dummy_flow_components
from popalign_core.models.tokenizers import tiny_t5_tokenizer

from .test_flow_loading import PROMPTS, adapter_of, assert_same_outputs, assert_same_weights, write_tiny_config_dir


def _save(sd: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))
    return path


def write_parts(comps: dict, family: str, folder: Path) -> dict[str, Path]:
    """The tiny model as separate files. FLUX: BFL transformer without prefix, clip_l, t5xxl, LDM ``ae``. SD3: the
    ``sd3.5_large`` kind of file (prefixed transformer with both CLIPs bundled), plus a prefixed transformer-only
    file, clip_l (with its identity projection, as ComfyUI's clip_l files may have), clip_g, t5xxl and a
    diffusers-layout VAE."""
    t5 = comps[T5_COMPONENT[family]]
    files = {
        "clip_l": _save(_hf_clip_state_dict(comps["text_encoder"]), folder / "clip" / "clip_l.safetensors"),
        "t5xxl": _save(t5_to_original(t5), folder / "clip" / "t5xxl_fp16.safetensors"),
    }
    if family == "flux":
        files["transformer"] = _save(tf_original(comps["transformer"], family), folder / "unet" / "flux1.safetensors")
        files["vae"] = _save(vae_to_original(comps["vae"]), folder / "vae" / "ae.safetensors")
        return files
    files["clip_g"] = _save(_hf_clip_state_dict(comps["text_encoder_2"]), folder / "clip" / "clip_g.safetensors")
    files["vae"] = _save(comps["vae"].state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors")
    bundled = to_original_state_dict({**comps, "text_encoder_3": None}, "sd3")
    bundled = {k: v for k, v in bundled.items() if not k.startswith("first_stage_model.")}
    files["bundled"] = _save(bundled, folder / "checkpoints" / "sd3_clips.safetensors")
    only = {k: v for k, v in bundled.items() if k.startswith("model.diffusion_model.")}
    files["transformer"] = _save(only, folder / "unet" / "sd3.safetensors")
    return files


@pytest.fixture(scope="module", params=("sd3", "flux"))
def tiny(request, tmp_path_factory) -> dict:
    family = request.param
    root = tmp_path_factory.mktemp(f"parts_{family}")
    comps = get_dummy_flow_components(family, seed=3)
    return {
        "family": family,
        "comps": comps,
        "all": save_single_file(comps, family, root / f"all_{family}.safetensors"),
        "cfg": write_tiny_config_dir(comps, family, root / "cfg"),
        "bare_cfg": write_tiny_config_dir(comps, family, root / "bare_cfg", tokenizer=False),
        "files": write_parts(comps, family, root / "parts"),
    }


def separate(tiny) -> dict:
    """load_model keywords of the fully separate layout."""
    f, roles = tiny["files"], ("clip_l", "clip_g", "t5xxl") if tiny["family"] == "sd3" else ("clip_l", "t5xxl")
    return {"text_encoders": [f[r] for r in roles], "vae": f["vae"]}


def assert_same_model(a, b) -> None:
    assert_same_weights(a.transformer, b.transformer, "transformer")
    assert_same_weights(a.vae, b.vae, "vae")
    for k, (x, y) in enumerate(zip(a.text_encoders, b.text_encoders, strict=True)):
        assert_same_weights(x, y, f"text encoder {k}")
    assert_same_outputs(a, b)


# ------------------------------------------------------------------------------------------------------ layouts
def test_separate_files_load_as_the_all_in_one_file(tiny):
    ref = load_model(tiny["all"], config_dir=tiny["cfg"])
    got = load_model(tiny["files"]["transformer"], config_dir=tiny["cfg"], **separate(tiny))
    assert got.family == tiny["family"]
    assert_same_model(ref, got)
    if tiny["family"] == "sd3":  # bundled CLIPs completed by a separate T5 and VAE
        f = tiny["files"]
        assert_same_model(
            ref, load_model(f["bundled"], config_dir=tiny["cfg"], text_encoders=f["t5xxl"], vae=f["vae"])
        )


def test_a_separate_component_replaces_the_bundled_one(tiny, tmp_path):
    family = tiny["family"]
    other = get_dummy_flow_components(family, seed=11)
    clip = _save(_hf_clip_state_dict(other["text_encoder"]), tmp_path / "clip_l_other.safetensors")
    vae = _save(vae_to_original(other["vae"]), tmp_path / "vae_other.safetensors")
    got = load_model(tiny["all"], config_dir=tiny["cfg"], text_encoders=[clip], vae=vae)
    assert_same_weights(other["text_encoder"], got.text_encoders[0], "replaced clip_l")
    assert_same_weights(other["vae"], got.vae, "replaced vae")
    assert_same_weights(tiny["comps"]["transformer"], got.transformer, "bundled transformer")
    assert_same_weights(tiny["comps"][T5_COMPONENT[family]], got.text_encoders[-1], "bundled t5")


def _fp8_t5(t5, scaled: bool) -> tuple[dict, dict]:
    """(file tensors, expected weights) of a float8_e4m3fn T5 (ComfyUI's t5xxl_fp8_e4m3fn[_scaled].safetensors)."""
    stored, expected = {}, {}
    for k, v in t5_to_original(t5).items():
        scale = v.abs().max().clamp(min=1e-12) / 448.0 if scaled and v.ndim == 2 else None
        w8 = (v / scale if scale is not None else v).to(torch.float8_e4m3fn)
        stored[k] = w8
        expected[k] = w8.to(torch.float32) * scale if scale is not None else w8.to(torch.float32)
        if scale is not None:
            stored[k.removesuffix("weight") + "scale_weight"] = scale.reshape(())
    if scaled:
        stored["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return stored, expected


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "scaled_fp8"])
def test_fp8_t5_files_load_into_the_compute_dtype(tiny, tmp_path, scaled):
    family = tiny["family"]
    stored, expected = _fp8_t5(tiny["comps"][T5_COMPONENT[family]], scaled)
    t5 = _save(stored, tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    kw = separate(tiny)
    kw["text_encoders"] = [*kw["text_encoders"][:-1], t5]
    got = load_model(tiny["files"]["transformer"], config_dir=tiny["cfg"], **kw)
    sd = got.text_encoders[-1].state_dict()
    assert all(sd[k].dtype == torch.float32 and torch.equal(sd[k], v) for k, v in expected.items())
    with torch.no_grad():
        assert torch.isfinite(got.encode_prompt(PROMPTS).embeds).all()


# ------------------------------------------------------------------------------------------------------- errors
def test_missing_parts_name_what_to_give(tiny):
    f, cfg, family = tiny["files"], tiny["cfg"], tiny["family"]
    if family == "flux":
        want = r"FLUX needs clip_l and t5xxl text encoders and a VAE: give text_encoders=\[<t5xxl file>\] \(ComfyUI's "
        with pytest.raises(ValueError, match=want + "models/text_encoders/ or clip/: t5xxl"):
            load_model(f["transformer"], config_dir=cfg, text_encoders=[f["clip_l"]], vae=f["vae"])
        want = r"transformer-only file: .*text_encoders=\[<clip_l file>, <t5xxl file>\].* and vae=<VAE file> "
        with pytest.raises(ValueError, match=want + r"\(ComfyUI's models/vae/: ae\.safetensors\)"):
            load_model(f["transformer"], config_dir=cfg)
    else:
        with pytest.raises(ValueError, match=r"incomplete: no weights for first_stage_model\.\* \(VAE\).*give vae="):
            load_model(f["bundled"], config_dir=cfg)
        with pytest.raises(ValueError, match=r"SD3 needs clip_l and clip_g and t5xxl .*<t5xxl file>.*t5=False"):
            load_model(f["bundled"], config_dir=cfg, vae=f["vae"], t5=True)
        with pytest.raises(ValueError, match=r"t5=False, but text_encoders gives a T5 file"):
            load_model(f["bundled"], config_dir=cfg, vae=f["vae"], t5=False, text_encoders=[f["t5xxl"]])


def test_wrong_files_are_named(tiny, tmp_path):
    from transformers import CLIPTextModel

    from popalign_core.models.tiny_parts import tiny_text_encoder_config

    f, cfg, family = tiny["files"], tiny["cfg"], tiny["family"]
    wide = _save(
        _hf_clip_state_dict(CLIPTextModel(tiny_text_encoder_config(hidden_size=48))), tmp_path / "g.safetensors"
    )
    slots = r"clip_l \(32 wide, 2 layers\), clip_g \(32 wide, 2 layers\)" if family == "sd3" else r"clip_l \(32 wide"
    want = r"text_encoders\[1\] '.*g\.safetensors' is a CLIP text encoder 48 wide with 2 layers, which fits none "
    with pytest.raises(ValueError, match=want + rf"of the .* text encoders: {slots}"):
        load_model(f["transformer"], config_dir=cfg, text_encoders=[f["clip_l"], wide, f["t5xxl"]], vae=f["vae"])
    want = r"text_encoders\[0\] '.*/vae/.*' is not a text encoder in the layout .*seen: (en|de)coder\."
    with pytest.raises(ValueError, match=want):
        load_model(f["transformer"], config_dir=cfg, text_encoders=[f["vae"]])
    with pytest.raises(ValueError, match=r"vae '.*t5xxl_fp16\.safetensors' is not a VAE: expected LDM keys"):
        load_model(f["transformer"], config_dir=cfg, vae=f["t5xxl"])
    with pytest.raises(ValueError, match=r"text_encoders\[1\] '.*t5xxl_fp16.*' and '.*t5xxl_fp16.*' are both t5xxl"):
        load_model(f["transformer"], config_dir=cfg, text_encoders=[f["t5xxl"], f["t5xxl"]])
    with pytest.raises(FileNotFoundError, match=r"text_encoders\[0\] '.*nope\.safetensors' does not exist"):
        load_model(f["transformer"], config_dir=cfg, text_encoders=[tmp_path / "nope.safetensors"])
    with pytest.raises(ValueError, match=r"text_encoders=3 is invalid: expected a list of text-encoder"):
        load_model(f["transformer"], config_dir=cfg, text_encoders=3)


def _comfy_tree(tiny, root: Path, tokenizer: bool) -> Path:
    """A ComfyUI folder with the tiny model's files where ComfyUI keeps them; returns the transformer file."""
    f = tiny["files"]
    for name, sub in (("clip_l", "clip"), ("t5xxl", "text_encoders"), ("clip_g", "clip"), ("vae", "vae")):
        if name in f:
            (root / "models" / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(f[name], root / "models" / sub / f[name].name)
    unet = root / "models" / "diffusion_models" / "flow" / f["transformer"].name
    unet.parent.mkdir(parents=True)
    shutil.copy(f["transformer"], unet)
    if tokenizer:
        tiny_t5_tokenizer(TINY_T5_TOKENS).save_pretrained(root / "comfy" / "text_encoders" / "t5_tokenizer")
    return unet


def test_t5_tokenizer_is_found_in_a_comfyui_tree(tiny, tmp_path):
    family, f = tiny["family"], tiny["files"]
    unet = _comfy_tree(tiny, tmp_path / "ComfyUI", tokenizer=True)
    models = tmp_path / "ComfyUI" / "models"
    te = [models / ("text_encoders" if r == "t5xxl" else "clip") / f[r].name for r in ("clip_l", "clip_g", "t5xxl")
          if r in f]  # fmt: skip
    got = load_model(unet, config_dir=tiny["bare_cfg"], text_encoders=te, vae=models / "vae" / f["vae"].name)
    assert_same_model(adapter_of(tiny["comps"], family), got)
    assert (tmp_path / "ComfyUI" / "comfy" / "text_encoders" / "t5_tokenizer" / "tokenizer.json").is_file()


def test_t5_tokenizer_not_found_names_the_folder(tiny, tmp_path):
    f, bare = tiny["files"], tiny["bare_cfg"]
    kw = separate(tiny)
    want = r"no T5 tokenizer .*: pass t5_tokenizer=<folder> \(the diffusers model's tokenizer_[23]/ folder, or "
    with pytest.raises(FileNotFoundError, match=want + "ComfyUI's comfy/text_encoders/"):
        load_model(f["transformer"], config_dir=bare, **kw)
    unet = _comfy_tree(tiny, tmp_path / "ComfyUI", tokenizer=False)
    folder = tmp_path / "ComfyUI" / "comfy" / "text_encoders" / "t5_tokenizer"
    want = rf"lies in the ComfyUI folder {tmp_path / 'ComfyUI'}, but {folder}/ has none of tokenizer\.json"
    with pytest.raises(FileNotFoundError, match=want):
        load_model(unet, config_dir=bare, **kw)


# -------------------------------------------------------------------------------------------- configs and CLI
def test_new_fields_at_their_defaults_keep_old_fingerprints():
    from popalign_core.train.runconfig import OMIT_AT_DEFAULT, config_fingerprint
    from popalign_core.train.trainer import TrainConfig

    cfg = TrainConfig(model="m.safetensors", data="d.jsonl")
    old = {k: v for k, v in cfg.to_dict().items() if k not in OMIT_AT_DEFAULT}
    assert cfg.fingerprint() == config_fingerprint(old)
    assert cfg.fingerprint() == "862d5dc364f0f400"  # computed by the code before these fields existed (2b66a68)
    assert TrainConfig(model="m.safetensors", data="d.jsonl", model_vae="ae.safetensors").fingerprint() != (
        cfg.fingerprint()
    )


@pytest.mark.parametrize("command", ["train", "dal", "audit", "data sample"])
def test_every_model_loading_command_has_the_flags(command, capsys):
    from popalign_core import cli

    with pytest.raises(SystemExit):
        cli.main([*command.split(), "--help"])
    out = capsys.readouterr().out
    for flag in ("--model-config-dir", "--model-text-encoders", "--model-vae", "--t5-tokenizer"):
        assert flag in out, (command, flag)


def test_popalign_train_on_separate_flux_files(tmp_path, capsys):
    """``popalign train`` for one step on the tiny FLUX written as ComfyUI's separate files."""
    from popalign_core import cli

    family = "flux"
    comps = get_dummy_flow_components(family, seed=3)
    f = write_parts(comps, family, tmp_path / "parts")
    cfg = write_tiny_config_dir(comps, family, tmp_path / "cfg", tokenizer=False)
    tok = tmp_path / "t5_tok"
    tiny_t5_tokenizer(TINY_T5_TOKENS).save_pretrained(tok)
    rows, rng = [], np.random.default_rng(0)
    for side in ("winning", "losing"):
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{side}{i}.png")
            rows.append(
                {"set_id": "s0", "population": side, "caption": "a photo of a doctor", "image": f"{side}{i}.png"}
            )
    (tmp_path / "pop.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--model", str(f["transformer"]), "--model-config-dir", str(cfg),
            "--model-text-encoders", f"[{f['clip_l']}, {f['t5xxl']}]", "--model-vae", str(f["vae"]),
            "--t5-tokenizer", str(tok), "--data", str(tmp_path / "pop.jsonl"), "--output-dir", str(tmp_path / "out"),
            "--steps", "1", "--batch-size", "2", "--lora-rank", "2", "--checkpoint-every", "0",
            "--progress", "false"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 1 and Path(summary["outputs"]["kohya"]).is_file()


def test_model_file_options_are_refused_where_they_would_be_ignored(tmp_path, capsys):
    from popalign_core import cli
    from popalign_core.evaluate.audit_compute import audit_adapter
    from popalign_core.models.loading import load_pipeline

    with pytest.raises(ValueError, match=r"t5_tokenizer: SD3 / FLUX only .*is a UNet diffusers folder, which has"):
        load_pipeline("toyworld", t5_tokenizer=str(tmp_path))
    with pytest.raises(ValueError, match=r"vae: only used for checkpoints and model folders; tiny:sd15 is built"):
        audit_adapter({"model": "tiny:sd15", "vae": "ae.safetensors"})
    assert cli.main(["audit", "--images", str(tmp_path), "--out", str(tmp_path / "a"), "--model-vae", "ae.sft"]) == 2
    assert "--model-vae: a model-file option needs --model" in capsys.readouterr().err


def test_one_text_encoder_path_is_a_list_on_every_command():
    from popalign_core.models.loading_options import add_model_file_arguments
    from popalign_core.train.trainer import TrainConfig

    ap = __import__("argparse").ArgumentParser()
    add_model_file_arguments(ap)
    assert ap.parse_args(["--model-text-encoders", "t5xxl.safetensors"]).model_text_encoders == ["t5xxl.safetensors"]
    assert ap.parse_args(["--model-text-encoders", "[a.safetensors, b.safetensors]"]).model_text_encoders == [
        "a.safetensors", "b.safetensors"]  # fmt: skip
    TrainConfig(model="m.safetensors", data="d.jsonl", model_text_encoders=["t5xxl.safetensors"]).validate()
