"""Our SD3 / FLUX kohya LoRA files mean in ComfyUI 0.3.75 what was trained (ComfyUI's own models and LoRA code).

For each flow family, a LoRA (alpha / rank = 0.5, random non-zero weights) on the default transformer targets and
on the CLIP encoders is saved as a "kohya" file (`lora_transformer_` / `lora_te1_` / `lora_te2_` keys). In a child
process (`comfy_support.run_in_comfy`):

- ComfyUI's own model is built from the tiny transformer's weights in ComfyUI's layout
  (`models.flow_single_file.transformer_to_original`): SD3 through ComfyUI's detection
  (`comfy.model_detection.detect_unet_config` -> `model_config_from_unet_config` -> `comfy.supported_models.SD3`);
  FLUX with the detected config but the tiny model's heads and RoPE axes (ComfyUI's detection hard-codes 24 heads
  of 128 and axes 16/56/56), i.e. `comfy.supported_models.Flux(unet_config)`; wrapped in a
  `comfy.model_patcher.ModelPatcher`. As a cross-check, ComfyUI's own diffusers converter
  (`comfy.model_detection.convert_diffusers_mmdit`) gives the same weights from the diffusers state dict.
- the transformer part is applied with `comfy.sd.load_lora_for_models(model, None, lora, 1, 0)` (what the stock
  `LoraLoaderModelOnly` calls) and the patches are put on the weights (`load_models_gpu`);
- the CLIP part is mapped with `comfy.lora.model_lora_keys_clip` over a module whose weights carry the names of
  ComfyUI's SD3 / FLUX CLIP (`clip_l.transformer.text_model...`, `clip_g...`), loaded with `comfy.lora.load_lora`
  and applied with `comfy.lora.calculate_weight`.

Asserted: no "lora key not loaded" / "NOT LOADED" message (a negative control shows the messages are captured),
every module of the file patches a weight, and ComfyUI's patched weights equal our base weights plus the LoRA
delta (alpha / rank) B A, converted to ComfyUI's layout: q/k/v go to the right rows of the fused qkv / linear1.
ComfyUI 0.3.75 only (the 2024 ComfyUI has no FLUX; its SD3 LoRA key map differs): skipped on 2024.03.
"""

from __future__ import annotations

from pathlib import Path

import comfy_support as cs  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)
import pytest
import torch

pytestmark = pytest.mark.timeout(300)

FAMILIES = ("sd3", "flux")
# the tiny FLUX transformer's shape that ComfyUI cannot detect (models.tiny_flow.tiny_transformer_config)
FLUX_OVERRIDES = {"num_heads": 2, "axes_dim": [4, 6, 6]}
NOT_LOADED_MARKERS = ("lora key not loaded", "not loaded")
BOGUS_MODULE = "lora_transformer_no_such_block_attn_to_q"
# ComfyUI weights the default targets patch (q/k/v of a stream are slices of one fused weight)
PATCHED = {
    "sd3": {"joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.attn.qkv.weight",
            "joint_blocks.0.x_block.attn.proj.weight"},
    "flux": {"double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.qkv.weight",
             "double_blocks.0.img_attn.proj.weight", "double_blocks.0.txt_attn.proj.weight",
             "single_blocks.0.linear1.weight"},
}  # fmt: skip


@pytest.fixture(scope="module")
def comfy_075(comfy_dir, comfy_version):
    if comfy_version not in ("0.3.75", "custom"):
        pytest.skip(f"ComfyUI {comfy_version} has no FLUX and another SD3 LoRA key map; the check targets 0.3.75")
    return comfy_dir


def _merged(module: torch.nn.Module, sd: dict, alphas: dict, prefix: str) -> dict[str, torch.Tensor]:
    """{weight name: W + alpha / r * B @ A} of the modules a peft-layout LoRA `sd` adapts, names without `prefix.`"""
    out = {}
    weights = dict(module.named_parameters())
    for key in sd:
        if key.startswith(prefix + ".") and key.endswith(".lora_A.weight"):
            mod = key.removesuffix(".lora_A.weight")
            a, b = sd[key], sd[mod + ".lora_B.weight"]
            name = mod.removeprefix(prefix + ".").removeprefix("text_model.") + ".weight"
            if name not in weights:
                name = "text_model." + name
            out[name] = weights[name].detach() + alphas[mod + ".alpha"] / a.shape[0] * (b @ a)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Per family: the kohya file, the base / expected (base + delta) weights in ComfyUI's layout, the diffusers
    state dict, and the CLIP encoders' base / expected weights under ComfyUI's CLIP names."""
    from safetensors.torch import save_file

    from popalign_core.lora import files as L
    from popalign_core.models.flow_single_file import transformer_to_original
    from popalign_core.models.tiny import get_dummy_adapter
    from popalign_core.models.tiny_flow import get_dummy_flow_components

    root = tmp_path_factory.mktemp("flow_lora")
    out = {}
    for family in FAMILIES:
        torch.manual_seed(5)
        ad = get_dummy_adapter(family)
        L.add_lora(ad, L.LoraSpec(rank=4, alpha=2.0, text_encoder_targets=L.TEXT_ENCODER_TARGETS,
                                  init_lora_weights="gaussian"))  # fmt: skip
        kohya = Path(L.save_lora(ad, root / f"{family}.safetensors", format="kohya"))
        sd, alphas = L.get_lora_state_dict(ad)
        fresh = get_dummy_flow_components(family)
        transformer = fresh["transformer"]
        base = {k: v.clone() for k, v in transformer_to_original(transformer, family).items()}  # not views
        with torch.no_grad():
            for name, w in _merged(transformer, sd, alphas, "transformer").items():
                transformer.get_parameter(name).copy_(w)
        expected = {k: v.clone() for k, v in transformer_to_original(transformer, family).items()}
        clip = {}
        for prefix, comfy_name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"))[
            : 2 if family == "sd3" else 1
        ]:
            enc = fresh[prefix]
            names = {n: ("" if n.startswith("text_model.") else "text_model.") + n for n, _ in enc.named_parameters()}
            clip.update({f"{comfy_name}.transformer.{names[n]}": p.detach() for n, p in enc.named_parameters()})
            for n, w in _merged(enc, sd, alphas, prefix).items():
                clip[f"expected.{comfy_name}.transformer.{names[n]}"] = w
        tensors = root / f"{family}_tensors.safetensors"
        save_file(
            {**{f"base.{k}": v for k, v in base.items()}, **{f"expected.{k}": v for k, v in expected.items()},
             **{f"diffusers.{k}": v for k, v in get_dummy_flow_components(family)["transformer"].state_dict().items()},
             **{f"clip.{k}": v for k, v in clip.items()}},
            str(tensors),
        )  # fmt: skip
        n_te = sum(1 for k in sd if k.startswith("text_encoder") and k.endswith(".lora_A.weight"))
        out[family] = {"kohya": kohya, "tensors": tensors, "n_modules": len(sd) // 2, "n_te": n_te}
    return out


# ------------------------------------------------------------------------------------------- the ComfyUI job
def _comfy_model(family: str, sd: dict, log):
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    if family == "flux":
        unet_config.update(FLUX_OVERRIDES)
        model_config = comfy.supported_models.Flux(unet_config)
    else:
        model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device), model_config


def _named_weights(weights: dict) -> torch.nn.Module:
    """A module holding `weights` under their dotted names (ComfyUI's CLIP names: `clip_l.transformer.text_model...`):
    ComfyUI's text-encoder key map (`model_lora_keys_clip`) reads a CLIP model's weight names only."""
    root = torch.nn.Module()
    for name, value in weights.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    return root


def comfy_flow_lora_job(job: dict, log) -> dict:
    """Runs in the ComfyUI child process (see `comfy_support.run_in_comfy`)."""
    import comfy.lora
    import comfy.model_detection
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    from safetensors.torch import load_file, save_file

    family = job["family"]
    t = load_file(job["tensors"])
    base = {k.removeprefix("base."): v for k, v in t.items() if k.startswith("base.")}
    diffusers = {k.removeprefix("diffusers."): v for k, v in t.items() if k.startswith("diffusers.")}
    result, out = {}, {}
    converted = comfy.model_detection.convert_diffusers_mmdit(dict(diffusers), "")
    result["converter_mismatch"] = sorted(
        k
        for k in set(base) | set(converted)
        if k not in base or k not in converted or not torch.equal(base[k], converted[k])
    )
    model, model_config = _comfy_model(family, dict(base), log)
    result["load_log"] = log.take()
    result["model_config"] = type(model_config).__name__
    result["model_class"] = type(model.model).__name__

    lora = comfy.utils.load_torch_file(job["lora"], safe_load=True)
    unet_lora = {k: v for k, v in lora.items() if k.startswith("lora_transformer_")}
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    result["n_unet_loaded"] = len(comfy.lora.load_lora(unet_lora, key_map, log_missing=False))
    patched, _ = comfy.sd.load_lora_for_models(model, None, unet_lora, 1.0, 0.0)
    result["lora_log"] = log.take()
    result["patched"] = sorted(k.removeprefix("diffusion_model.") for k in patched.patches)
    bogus = {**unet_lora, **{BOGUS_MODULE + k[k.index(".") :]: v for k, v in unet_lora.items() if "_attn_to_q." in k}}
    comfy.sd.load_lora_for_models(model, None, bogus, 1.0, 0.0)
    result["bogus_log"] = log.take()
    comfy.model_management.load_models_gpu([patched])  # puts the patches on the weights
    out.update({f"patched.{k}": v.detach().clone() for k, v in patched.model.diffusion_model.state_dict().items()})
    comfy.model_management.load_models_gpu([model])  # and takes them off again
    out.update({f"unpatched.{k}": v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()})
    result["patch_log"] = log.take()

    # the CLIP part: ComfyUI's key map over its CLIP weight names, its loader and its weight calculation
    clip_base = {k.removeprefix("clip."): v for k, v in t.items() if k.startswith("clip.clip_")}
    te_lora = {k: v for k, v in lora.items() if not k.startswith("lora_transformer_")}
    te_map = comfy.lora.model_lora_keys_clip(_named_weights(clip_base), {})
    te_patches = comfy.lora.load_lora(te_lora, te_map)
    result["te_log"] = log.take()
    result["n_te_loaded"] = len(te_patches)
    for key, patch in te_patches.items():
        weight = clip_base[key].clone()
        out[f"te.{key}"] = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight, key)
    save_file({k: v.float().contiguous() for k, v in out.items()}, job["out"])
    return result


@pytest.fixture(scope="module")
def comfy_runs(comfy_075, files, tmp_path_factory) -> dict:
    from safetensors.torch import load_file

    runs = {}
    for family in FAMILIES:
        out = tmp_path_factory.mktemp(f"comfy_{family}")
        job = {"family": family, "lora": str(files[family]["kohya"]), "tensors": str(files[family]["tensors"]),
               "out": str(out / "out.safetensors")}  # fmt: skip
        runs[family] = cs.run_in_comfy(f"{__file__}:comfy_flow_lora_job", job, comfy_dir=comfy_075, output_dir=out)
        runs[family]["tensors"] = load_file(job["out"])
    return runs


# ------------------------------------------------------------------------------------------------------ tests
def _not_loaded(lines: list[str]) -> list[str]:
    return [ln for ln in lines if any(m in ln.lower() for m in NOT_LOADED_MARKERS)]


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_builds_the_model_from_our_weights(family, comfy_runs):
    run = comfy_runs[family]
    assert run["model_config"] == {"sd3": "SD3", "flux": "Flux"}[family], run["load_log"]
    assert run["model_class"] == {"sd3": "SD3", "flux": "Flux"}[family]
    problems = [ln for ln in run["load_log"] if ln.startswith(("WARNING", "ERROR")) or "missing" in ln]
    assert not problems, problems
    assert run["converter_mismatch"] == [], "ComfyUI's diffusers converter disagrees with ours"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_lora_key_is_loaded(family, comfy_runs, files):
    run = comfy_runs[family]
    assert not _not_loaded(run["lora_log"]) and not _not_loaded(run["te_log"]), run["lora_log"] + run["te_log"]
    n_unet = files[family]["n_modules"] - files[family]["n_te"]
    assert run["n_unet_loaded"] == n_unet  # one patch per module of the file (q/k/v: slices of one weight)
    assert run["n_te_loaded"] == files[family]["n_te"] > 0
    assert set(run["patched"]) == PATCHED[family]
    reported = [ln for ln in run["bogus_log"] if "lora key not loaded" in ln]  # the negative control
    assert len(reported) == 3 and all(BOGUS_MODULE in ln for ln in reported), run["bogus_log"]


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_patched_weights_are_base_plus_our_delta(family, comfy_runs, files):
    from safetensors.torch import load_file

    t = load_file(str(files[family]["tensors"]))
    got = comfy_runs[family]["tensors"]
    changed = 0
    for key in (
        k.removeprefix("expected.") for k in t if k.startswith("expected.") and not k.startswith("expected.clip")
    ):
        want, base = t[f"expected.{key}"], t[f"base.{key}"]
        torch.testing.assert_close(got[f"patched.{key}"], want, atol=1e-6, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        assert torch.equal(got[f"unpatched.{key}"], base), f"{key}: ComfyUI did not restore the base weight"
        changed += not torch.equal(want, base)
    assert changed == len(PATCHED[family])  # exactly the weights the LoRA patches differ from the base
    te = {k.removeprefix("te."): v for k, v in got.items() if k.startswith("te.")}
    assert len(te) == files[family]["n_te"]
    for key, value in te.items():
        torch.testing.assert_close(
            value, t[f"clip.expected.{key}"], atol=1e-6, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
        )
