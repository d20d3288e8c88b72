"""The ComfyUI model adapter (nodes/comfy_adapter.py) against the diffusers one, on the same checkpoint.

One seeded tiny SD1.5 checkpoint is loaded (a) by the core's diffusers loader in this process and (b) by ComfyUI's
stock CheckpointLoaderSimple in a child process (tests/comfy_support.py), wrapped by `adapter_from_comfy`. Both get
the same seeded LoRA (UNet + text encoder, gaussian init so that model and reference differ) and the same latents,
noise, timesteps and prompts. The per-sample L of the loss (PopAlign Eq. 11's inner ||eps - eps_theta||^2 term, for
the model and the LoRA-disabled reference) and the loss itself must agree, for eps- and (through ComfyUI's
ModelSamplingDiscrete node) v-prediction. The child also checks that the raw prediction equals the one recovered from
ComfyUI's own ``apply_model`` (which returns the denoised x0), that no weight is copied (storage shared), that
backward works, and that ComfyUI's model output is unchanged by the training step.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import comfy_support as cs  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)
PROMPTS = ["a photo of a doctor", "a photo of a nurse", "a photo of a chef", "a photo of a pilot"]
LABELS = [1, 1, -1, -1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_parity")
    ckpt = cs.build_tiny_sd15_checkpoint(root / "ckpt" / "tiny.safetensors", config_dir=root / "config")
    g = torch.Generator().manual_seed(3)
    inputs = {
        "latents": torch.randn(4, 4, 8, 8, generator=g),
        "noise": torch.randn(4, 4, 8, 8, generator=g),
        "timesteps": torch.tensor([999, 640, 250, 20]),
    }
    from safetensors.torch import save_file

    save_file(inputs, str(root / "inputs.safetensors"))
    yield {"ckpt": ckpt, "config": root / "config", "inputs": root / "inputs.safetensors", "tensors": inputs}
    ckpt.unlink(missing_ok=True)


def add_seeded_lora(adapter) -> None:
    from popalign_core.lora.files import LoraSpec, add_lora

    torch.manual_seed(123)
    add_lora(adapter, LoraSpec(rank=4, alpha=4.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
                               text_encoder_targets=("q_proj", "v_proj"), init_lora_weights="gaussian"))  # fmt: skip


def losses(adapter, t: dict) -> dict:
    from popalign_core.train.objective import preference_loss

    cond = adapter.encode_prompt(PROMPTS)
    out = preference_loss(adapter, t["latents"], cond, torch.tensor(LABELS), "popalign", noise=t["noise"],
                          timesteps=t["timesteps"])  # fmt: skip
    from popalign_core.train.losses import per_sample_error

    x_t = adapter.add_noise(t["latents"], t["noise"], t["timesteps"])
    target = adapter.target(t["latents"], t["noise"], t["timesteps"])
    with torch.no_grad():
        l_model = per_sample_error(adapter.predict(x_t, t["timesteps"], cond), target)
        with adapter.reference():
            l_ref = per_sample_error(adapter.predict(x_t, t["timesteps"], adapter.encode_prompt(PROMPTS)), target)
    return {"loss": float(out.loss.detach()), "per_sample": out.per_sample.detach().tolist(),
            "l_model": l_model.tolist(), "l_ref": l_ref.tolist(),
            "abar": adapter.noise_scheduler.alphas_cumprod.double().tolist()}  # fmt: skip


def comfy_job(job: dict, log) -> dict:
    """Child process (ComfyUI imported, inside inference mode as a node would run)."""
    from safetensors.torch import load_file

    import nodes as comfy_nodes

    sys.path.append(job["repo"])
    spec = importlib.util.spec_from_file_location("pa_comfy_adapter", Path(job["repo"]) / "nodes" / "comfy_adapter.py")
    ca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ca)
    t = load_file(job["inputs"])
    model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(job["ckpt"])[:3]
    if job["prediction"] == "v_prediction":
        import comfy_extras.nodes_model_advanced as adv

        model = adv.ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    out: dict = {"model_type": ca.model_type_name(model)}
    ms = ca.model_sampling(model)
    x_t_probe = t["latents"]
    sig = ms.sigmas[t["timesteps"]]
    with torch.inference_mode(False), torch.enable_grad():
        adapter = ca.adapter_from_comfy(model, clip, vae)
        out["prediction_type"] = adapter.prediction_type
        comfy_ptrs = {p.data_ptr() for p in model.model.diffusion_model.parameters()}
        out["unet_shared"] = all(p.data_ptr() in comfy_ptrs for p in adapter.unet.parameters())
        te_ptrs = {p.data_ptr() for p in clip.cond_stage_model.parameters()}
        out["te_shared"] = all(p.data_ptr() in te_ptrs for p in adapter.text_encoders[0].parameters())
        with torch.no_grad():
            cond = adapter.encode_prompt(PROMPTS)
            raw = adapter.predict(x_t_probe, t["timesteps"], cond)
        # ComfyUI's own forward returns x0; turn it back into the raw prediction for comparison
        xc = x_t_probe * (1 + sig**2).sqrt()[:, None, None, None]
    before = model.model.apply_model(xc, sig, c_crossattn=cond.embeds).clone()
    with torch.inference_mode(False), torch.enable_grad():
        abar = (1 / (1 + sig**2))[:, None, None, None]
        eps = (xc - before) / sig[:, None, None, None]
        x0 = before  # ComfyUI denoises to x0 in data scale: xc = x0 + sigma * eps
        raw_from_comfy = eps if adapter.prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
        out["raw_vs_apply_model"] = float((raw_from_comfy - raw).abs().max())
        add_seeded_lora(adapter)
        out.update(losses(adapter, t))
        # one optimiser step works (backward through shared, formerly inference, weights)
        params = [p for p in adapter.trainable_parameters() if p.requires_grad]
        from popalign_core.train.objective import preference_loss

        loss = preference_loss(adapter, t["latents"], adapter.encode_prompt(PROMPTS), torch.tensor(LABELS),
                               "popalign", noise=t["noise"], timesteps=t["timesteps"]).loss  # fmt: skip
        loss.backward()
        out["grad_norm"] = float(sum(p.grad.norm() ** 2 for p in params if p.grad is not None) ** 0.5)
    after = model.model.apply_model(xc, sig, c_crossattn=cond.embeds)
    out["comfy_output_change"] = float((after - before).abs().max())
    return out


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_comfy_adapter_gives_the_diffusers_adapters_losses(tiny, prediction, comfy_dir, tmp_path):
    from popalign_core.models.loading import load_model

    ours = load_model(tiny["ckpt"], config_dir=tiny["config"], prediction_type=prediction)
    add_seeded_lora(ours)
    want = losses(ours, tiny["tensors"])
    job = {"ckpt": tiny["ckpt"].name, "inputs": str(tiny["inputs"]), "repo": str(REPO), "prediction": prediction}
    got = cs.run_in_comfy(f"{__file__}:comfy_job", job, comfy_dir=comfy_dir,
                          folders={"checkpoints": tiny["ckpt"].parent}, output_dir=tmp_path)  # fmt: skip
    assert got["model_type"] == "SD15" and got["prediction_type"] == prediction
    assert got["unet_shared"] and got["te_shared"], "the adapter copied weights instead of sharing them"
    assert got["raw_vs_apply_model"] < 1e-4
    assert torch.allclose(
        torch.tensor(got["abar"]), torch.tensor(want["abar"]), rtol=2e-6, atol=1e-7
    )  # float32 sigmas
    for key in ("per_sample", "l_model", "l_ref"):
        assert torch.allclose(torch.tensor(got[key]), torch.tensor(want[key]), rtol=1e-4, atol=1e-6), key
    assert abs(got["loss"] - want["loss"]) <= 1e-4 * max(1.0, abs(want["loss"]))
    assert not torch.allclose(torch.tensor(want["l_model"]), torch.tensor(want["l_ref"]))  # the LoRA does something
    assert got["grad_norm"] > 0
    assert got["comfy_output_change"] == 0.0


class _Cfg:  # stand-ins shaped like ComfyUI's model objects, for the error message only
    pass


def test_unsupported_model_type_is_named():
    spec = importlib.util.spec_from_file_location("pa_comfy_adapter_static", REPO / "nodes" / "comfy_adapter.py")
    ca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ca)
    other = type("AuraFlow", (), {})()  # SD3 / FLUX are supported since issue 19 (nodes/comfy_flow.py)
    model = type("M", (), {})()
    model.model = type("B", (), {"model_config": other})()
    with pytest.raises(ca.UnsupportedModel, match=r"ComfyUI model type 'AuraFlow' is not supported by PopAlign; "
                                                  r"supported types: SD15, SD20, SDXL"):  # fmt: skip
        ca.family_of(model)


# ------------------------------------------------------------------------------ full-size layouts, without memory
def layout_job(job: dict, log) -> dict:
    """Child: ComfyUI's own detection on the original-layout keys of each family's full-size UNet (meta tensors),
    then the adapter's diffusers config from ComfyUI's unet_config, compared with the shipped diffusers config."""
    import comfy.model_detection as md
    from diffusers import UNet2DConditionModel

    sys.path.append(job["repo"])
    spec = importlib.util.spec_from_file_location("pa_ca_layout", Path(job["repo"]) / "nodes" / "comfy_adapter.py")
    ca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ca)
    from popalign_core.models.loading import FAMILY_CONFIG_DIRS
    from popalign_core.models.single_file import _apply_module_map, unet_module_map, unet_to_original

    out = {}
    for family in ("sd15", "sd2", "sdxl"):
        shipped = UNet2DConditionModel.load_config(str(FAMILY_CONFIG_DIRS[family] / "unet"))
        with torch.device("meta"):
            ref = UNet2DConditionModel.from_config(shipped)
        orig = unet_to_original(ref)
        mc = md.model_config_from_unet(orig, "")
        cfg = ca.diffusers_unet_config(dict(mc.unet_config), family)
        with torch.device("meta"):
            view = UNet2DConditionModel(**cfg)
        names = _apply_module_map({k: k for k in view.state_dict()}, unet_module_map(view), "unet")
        ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        out[family] = {
            "comfy_type": type(mc).__name__,
            "keys_equal": sorted(names) == sorted(orig),
            "shapes_equal": {k: tuple(v.shape) for k, v in view.state_dict().items()} == ref_shapes,
            "cfg": {k: cfg[k] for k in ("block_out_channels", "down_block_types", "up_block_types", "mid_block_type",
                                        "cross_attention_dim", "use_linear_projection")},  # fmt: skip
            "shipped": {k: shipped.get(k) for k in ("block_out_channels", "down_block_types", "up_block_types",
                                                    "mid_block_type", "cross_attention_dim", "use_linear_projection")},
        }  # fmt: skip
    return out


def test_comfy_unet_configs_map_to_the_full_size_diffusers_layouts(comfy_dir, tmp_path):
    got = cs.run_in_comfy(f"{__file__}:layout_job", {"repo": str(REPO)}, comfy_dir=comfy_dir, output_dir=tmp_path)
    expect = {"sd15": "SD15", "sd2": "SD20", "sdxl": "SDXL"}
    for family, r in ((f, got[f]) for f in expect):
        assert r["comfy_type"] == expect[family], family
        assert r["keys_equal"] and r["shapes_equal"], family
        shipped = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in r["shipped"].items()}
        shipped["mid_block_type"] = shipped["mid_block_type"] or "UNetMidBlock2DCrossAttn"
        shipped["use_linear_projection"] = bool(shipped["use_linear_projection"])
        assert r["cfg"] == shipped, family


def text_layout_job(job: dict, log) -> dict:
    """Child: ComfyUI's own SD1.5 / SD2 / SDXL text-encoder modules built on `meta` (no memory), wrapped by the
    adapter's transformers views (every view weight must find a ComfyUI weight of the same shape)."""
    import importlib

    import comfy.sd1_clip
    import comfy.sdxl_clip

    try:  # ComfyUI 0.3.x moved it into comfy/text_encoders/
        sd2_clip = importlib.import_module("comfy.text_encoders.sd2_clip")
    except ModuleNotFoundError:
        sd2_clip = importlib.import_module("comfy.sd2_clip")

    sys.path.append(job["repo"])
    spec = importlib.util.spec_from_file_location("pa_ca_text", Path(job["repo"]) / "nodes" / "comfy_adapter.py")
    ca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ca)
    out = {}
    classes = {"sd15": comfy.sd1_clip.SD1ClipModel, "sd2": sd2_clip.SD2ClipModel,
               "sdxl": comfy.sdxl_clip.SDXLClipModel}  # fmt: skip
    for family, cls in classes.items():
        clip = type("FakeCLIP", (), {})()
        clip.cond_stage_model = cls(device="meta")
        views = ca.text_encoder_views(clip, family)
        out[family] = [[type(v).__name__, v.config.num_hidden_layers, v.config.hidden_size] for v in views]
    return out


def test_text_encoder_views_cover_comfyuis_sd15_sd2_sdxl_encoders(comfy_dir, tmp_path):
    got = cs.run_in_comfy(f"{__file__}:text_layout_job", {"repo": str(REPO)}, comfy_dir=comfy_dir, output_dir=tmp_path)
    assert got["sd15"] == [["CLIPTextModel", 12, 768]]
    assert got["sd2"] == [["CLIPTextModel", 23, 1024]]  # diffusers' SD2 encoder: 23 of OpenCLIP's 24 blocks
    assert got["sdxl"] == [["CLIPTextModel", 12, 768], ["CLIPTextModelWithProjection", 32, 1280]]


# --------------------------------------------------------------------------------- LoRAs loaded upstream
def upstream_lora_job(job: dict, log) -> dict:
    """Child: a LoRA applied with ComfyUI's own loader before the adapter is built; the adapter must see the patched
    weights (training happens on top of them) and the unpatched MODEL must stay as it was."""
    import comfy.sd
    import comfy.utils
    from safetensors.torch import load_file

    import nodes as comfy_nodes

    sys.path.append(job["repo"])
    spec = importlib.util.spec_from_file_location("pa_ca_up", Path(job["repo"]) / "nodes" / "comfy_adapter.py")
    ca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ca)
    t = load_file(job["inputs"])
    model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(job["ckpt"])[:3]
    sig = ca.model_sampling(model).sigmas[t["timesteps"]]
    xc = t["latents"] * (1 + sig**2).sqrt()[:, None, None, None]
    ctx = torch.zeros(4, 77, 768)
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    before = model.model.apply_model(xc, sig, c_crossattn=ctx).clone()
    lora = comfy.utils.load_torch_file(job["lora"], safe_load=True)
    model_l, clip_l = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    with torch.inference_mode(False), torch.no_grad():
        adapter = ca.adapter_from_comfy(model_l, clip_l, vae)
        pred = adapter.predict(t["latents"], t["timesteps"], adapter.encode_prompt(PROMPTS))
    mm.load_models_gpu([model])  # back to the MODEL without the LoRA: ComfyUI restores its weights
    after = model.model.apply_model(xc, sig, c_crossattn=ctx)
    return {"pred": pred.tolist(), "unpatched_change": float((after - before).abs().max())}


def test_a_lora_loaded_upstream_is_part_of_the_trained_model(tiny, comfy_dir, tmp_path):
    from popalign_core.lora.files import save_lora
    from popalign_core.models.loading import load_model

    ours = load_model(tiny["ckpt"], config_dir=tiny["config"])
    add_seeded_lora(ours)
    lora = save_lora(ours, tmp_path / "upstream.safetensors", format="kohya")
    t = tiny["tensors"]
    with torch.no_grad():
        want = ours.predict(t["latents"], t["timesteps"], ours.encode_prompt(PROMPTS))
    job = {"ckpt": tiny["ckpt"].name, "inputs": str(tiny["inputs"]), "repo": str(REPO), "lora": str(lora)}
    got = cs.run_in_comfy(f"{__file__}:upstream_lora_job", job, comfy_dir=comfy_dir,
                          folders={"checkpoints": tiny["ckpt"].parent}, output_dir=tmp_path / "out")  # fmt: skip
    pred = torch.tensor(got["pred"])
    # ComfyUI merges the text-encoder LoRA into its fp16 weights (rounding ~1e-3); ours keeps it unmerged in fp32
    assert torch.allclose(pred, want, rtol=1e-3, atol=5e-3), float((pred - want).abs().max())
    with torch.no_grad(), ours.reference():
        base = ours.predict(t["latents"], t["timesteps"], ours.encode_prompt(PROMPTS))
    assert float((pred - base).abs().max()) > 10 * float((pred - want).abs().max())  # the LoRA is really in it
    assert got["unpatched_change"] == 0.0


# ---------------------------------------------------------------------------------------------- model management
def partial_load_job(job: dict, log) -> dict:
    """Child: the MODEL loaded by ComfyUI, then left partially loaded as ``--lowvram`` or too little free memory
    leaves it (0.3.x: ``partially_unload``; the 2024 copy: a lowvram load); then what the training nodes do first."""
    import comfy.model_management as mm

    import nodes as comfy_nodes

    sys.path.append(job["repo"])
    spec = importlib.util.spec_from_file_location("pa_ca_mm", Path(job["repo"]) / "nodes" / "comfy_adapter.py")
    ca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ca)
    model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(job["ckpt"])[:3]
    x, sig = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 0.5])
    ctx = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))
    mm.load_models_gpu([model])
    out = {"full_before": ca.patcher_bytes(model), "partial_before": ca.is_partial(model)}
    before = model.model.apply_model(x, sig, c_crossattn=ctx).clone()
    half = ca.patcher_bytes(model)[1] // 2
    if hasattr(model, "partially_unload"):
        model.partially_unload(model.offload_device, half)
    else:
        model.unpatch_model()
        model.patch_model_lowvram(device_to=model.load_device, lowvram_model_memory=half)
    out["partial"] = ca.is_partial(model)
    try:
        ca.load_for_training(model, clip.patcher, vae.patcher)
    except ca.NotEnoughMemory as e:
        out["error"] = str(e)
    else:
        out["loaded"] = ca.patcher_bytes(model)
        out["partial_after"] = ca.is_partial(model)
        out["output_change"] = float((model.model.apply_model(x, sig, c_crossattn=ctx) - before).abs().max())
    return out


def test_a_partially_loaded_model_is_loaded_fully_for_training_or_refused(tiny, comfy_dir, comfy_version, tmp_path):
    job = {"ckpt": tiny["ckpt"].name, "repo": str(REPO)}
    got = cs.run_in_comfy(f"{__file__}:partial_load_job", job, comfy_dir=comfy_dir,
                          folders={"checkpoints": tiny["ckpt"].parent}, output_dir=tmp_path)  # fmt: skip
    size = got["full_before"][1]
    assert got["full_before"] == [size, size] and not got["partial_before"]
    assert got["partial"], "the test did not leave the model partially loaded"
    if comfy_version == "2024.03":  # no way to force a full load there: a clear stop
        mib = f"{size / 2**20:.0f} MiB"
        assert got["error"] == (
            f"training needs the whole model on one device, but ComfyUI kept part of it offloaded (BaseModel: {mib}); "
            f"it needs {mib} free on cpu: restart ComfyUI without --lowvram / --novram, or free memory (unload other "
            "models)"
        )
    else:  # ComfyUI 0.3.x loads it completely (force_full_load) and it computes as before
        assert "error" not in got, got["error"]
        assert got["loaded"] == [size, size] and not got["partial_after"]
        assert got["output_change"] == 0.0


def _static_adapter():
    spec = importlib.util.spec_from_file_location("pa_comfy_adapter_static2", REPO / "nodes" / "comfy_adapter.py")
    ca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ca)
    return ca


@pytest.mark.parametrize(
    "need, total, reserve, short",
    [(4 << 30, 24 << 30, 1 << 30, 0), (23 << 30, 24 << 30, 1 << 30, 0), (23 << 30, 24 << 30, 2 << 30, 1 << 30),
     (10, 5, 0, 5)],
)  # fmt: skip
def test_memory_shortfall_is_weights_plus_reserve_minus_device(need, total, reserve, short):
    assert _static_adapter().memory_shortfall(need, total, reserve) == short


def test_is_partial_reads_both_comfyui_generations():
    ca = _static_adapter()
    old = type("P", (), {"model_lowvram": True})()  # the 2024 ModelPatcher
    new = type("P", (), {"model": type("M", (), {"model_lowvram": True})(), "lowvram_patch_counter": lambda s: 0})()
    counted = type(
        "P", (), {"model": type("M", (), {"model_lowvram": False})(), "lowvram_patch_counter": lambda s: 3}
    )()
    full = type("P", (), {"model": type("M", (), {"model_lowvram": False})(), "lowvram_patch_counter": lambda s: 0})()
    assert ca.is_partial(old) and ca.is_partial(new) and ca.is_partial(counted) and not ca.is_partial(full)
