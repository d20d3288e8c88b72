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

REPO = Path(__file__).resolve().parents[1]
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
    from popalign_core.lora_io import LoraSpec, add_lora

    torch.manual_seed(123)
    add_lora(adapter, LoraSpec(rank=4, alpha=4.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
                               text_encoder_targets=("q_proj", "v_proj"), init_lora_weights="gaussian"))  # fmt: skip


def losses(adapter, t: dict) -> dict:
    from popalign_core.objective import preference_loss

    cond = adapter.encode_prompt(PROMPTS)
    out = preference_loss(adapter, t["latents"], cond, torch.tensor(LABELS), "popalign", noise=t["noise"],
                          timesteps=t["timesteps"])  # fmt: skip
    from popalign_core.losses import per_sample_error

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
        from popalign_core.objective import preference_loss

        loss = preference_loss(adapter, t["latents"], adapter.encode_prompt(PROMPTS), torch.tensor(LABELS),
                               "popalign", noise=t["noise"], timesteps=t["timesteps"]).loss  # fmt: skip
        loss.backward()
        out["grad_norm"] = float(sum(p.grad.norm() ** 2 for p in params if p.grad is not None) ** 0.5)
    after = model.model.apply_model(xc, sig, c_crossattn=cond.embeds)
    out["comfy_output_change"] = float((after - before).abs().max())
    return out


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_comfy_adapter_gives_the_diffusers_adapters_losses(tiny, prediction, tmp_path):
    comfy = cs.comfyui_or_skip()
    from popalign_core.models import load_model

    ours = load_model(tiny["ckpt"], config_dir=tiny["config"], prediction_type=prediction)
    add_seeded_lora(ours)
    want = losses(ours, tiny["tensors"])
    job = {"ckpt": tiny["ckpt"].name, "inputs": str(tiny["inputs"]), "repo": str(REPO), "prediction": prediction}
    got = cs.run_in_comfy(f"{__file__}:comfy_job", job, comfy_dir=comfy, folders={"checkpoints": tiny["ckpt"].parent},
                          output_dir=tmp_path)  # fmt: skip
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
    sd3 = type("SD3", (), {})()
    model = type("M", (), {})()
    model.model = type("B", (), {"model_config": sd3})()
    with pytest.raises(ca.UnsupportedModel, match=r"ComfyUI model type 'SD3' is not supported by PopAlign; "
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
    from popalign_core.checkpoints import _apply_module_map, unet_module_map, unet_to_original
    from popalign_core.models import FAMILY_CONFIG_DIRS

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


def test_comfy_unet_configs_map_to_the_full_size_diffusers_layouts(tmp_path):
    comfy = cs.comfyui_or_skip()
    got = cs.run_in_comfy(f"{__file__}:layout_job", {"repo": str(REPO)}, comfy_dir=comfy, output_dir=tmp_path)
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
    import comfy.sd1_clip
    import comfy.sd2_clip
    import comfy.sdxl_clip

    sys.path.append(job["repo"])
    spec = importlib.util.spec_from_file_location("pa_ca_text", Path(job["repo"]) / "nodes" / "comfy_adapter.py")
    ca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ca)
    out = {}
    classes = {"sd15": comfy.sd1_clip.SD1ClipModel, "sd2": comfy.sd2_clip.SD2ClipModel,
               "sdxl": comfy.sdxl_clip.SDXLClipModel}  # fmt: skip
    for family, cls in classes.items():
        clip = type("FakeCLIP", (), {})()
        clip.cond_stage_model = cls(device="meta")
        views = ca.text_encoder_views(clip, family)
        out[family] = [[type(v).__name__, v.config.num_hidden_layers, v.config.hidden_size] for v in views]
    return out


def test_text_encoder_views_cover_comfyuis_sd15_sd2_sdxl_encoders(tmp_path):
    comfy = cs.comfyui_or_skip()
    got = cs.run_in_comfy(f"{__file__}:text_layout_job", {"repo": str(REPO)}, comfy_dir=comfy, output_dir=tmp_path)
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


def test_a_lora_loaded_upstream_is_part_of_the_trained_model(tiny, tmp_path):
    comfy = cs.comfyui_or_skip()
    from popalign_core.lora_io import save_lora
    from popalign_core.models import load_model

    ours = load_model(tiny["ckpt"], config_dir=tiny["config"])
    add_seeded_lora(ours)
    lora = save_lora(ours, tmp_path / "upstream.safetensors", format="kohya")
    t = tiny["tensors"]
    with torch.no_grad():
        want = ours.predict(t["latents"], t["timesteps"], ours.encode_prompt(PROMPTS))
    job = {"ckpt": tiny["ckpt"].name, "inputs": str(tiny["inputs"]), "repo": str(REPO), "lora": str(lora)}
    got = cs.run_in_comfy(f"{__file__}:upstream_lora_job", job, comfy_dir=comfy,
                          folders={"checkpoints": tiny["ckpt"].parent}, output_dir=tmp_path / "out")  # fmt: skip
    pred = torch.tensor(got["pred"])
    # ComfyUI merges the text-encoder LoRA into its fp16 weights (rounding ~1e-3); ours keeps it unmerged in fp32
    assert torch.allclose(pred, want, rtol=1e-3, atol=5e-3), float((pred - want).abs().max())
    with torch.no_grad(), ours.reference():
        base = ours.predict(t["latents"], t["timesteps"], ours.encode_prompt(PROMPTS))
    assert float((pred - base).abs().max()) > 10 * float((pred - want).abs().max())  # the LoRA is really in it
    assert got["unpatched_change"] == 0.0
