"""The ComfyUI adapter on SD3 / FLUX MODELs (nodes/comfy_flow.py) against ComfyUI's own model and the standalone
`FlowAdapter` on the same weights. ComfyUI 0.3.75 only (the 2024 ComfyUI has neither): skipped on 2024.03.

SD3: the smallest transformer ComfyUI detects as SD3 (MMDiT depth 1: width 64, one head; text widths 4096 / 2048,
what ComfyUI's SD3 CLIP gives), written in ComfyUI's layout by our writer (`flow_single_file.transformer_to_original`)
with a full-shape random 16-channel VAE, loaded by the stock CheckpointLoaderSimple (fp32) and UNETLoader
(``weight_dtype`` fp8_e4m3fn; and a scaled-fp8 file, ``default``); the CLIP is ComfyUI's SD3 CLIP with a random
CLIP-L (what CLIPLoader type sd3 gives). FLUX: ComfyUI detects FLUX only at 3072 wide, so a tiny ComfyUI Flux /
FluxSchnell is built from `comfy.supported_models` with a small unet_config (as tests/nodes/test_comfyui_lora_flow.py),
with hand-made conditioning (T5-XXL cannot run in CI); its scaled-fp8 variants give the file's ``scaled_fp8`` marker
to the config as ``comfy/model_detection.py`` does, so ComfyUI's real scaled_fp8_ops build the layers. Checked in the
child (`comfy_support.run_in_comfy`): the view shares ComfyUI's storage (only the swapped final modulation halves are
copies), the prediction is ComfyUI's own velocity (and ``apply_model`` = x − σ·v), prompts encode as CLIPTextEncode
does, a LoRA step changes only LoRA weights and leaves ComfyUI's weights and output as they were, fp8 and scaled-fp8
weights train (their fp8 tensors and scales shared), fp8 matrix multiplication trains through the same view; in the
parent: per-sample flow losses and the popalign preference loss equal the standalone FlowAdapter's on the same
weights, inputs and LoRA.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path

import comfy_support as cs  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)
PROMPTS = ["a photo of a doctor", "a photo of a nurse", "a photo of a chef", "a photo of a pilot"]
LABELS = [1, 1, -1, -1]
SD3 = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=64, num_attention_heads=1,
           joint_attention_dim=4096, caption_projection_dim=64, pooled_projection_dim=2048, out_channels=16,
           pos_embed_max_size=16)  # fmt: skip
# the tiny FLUX (models.tiny_flow) in ComfyUI's unet_config terms
FLUX_UNET = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=32,
                 mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6], theta=10000,
                 patch_size=2, qkv_bias=True)  # fmt: skip
# the (shift, scale) -> (scale, shift) modulations: the only view tensors that are copies
_FINAL = {"norm_out.linear.weight", "norm_out.linear.bias"}
SWAPPED = {
    "sd3": _FINAL | {f"transformer_blocks.0.norm1_context.linear.{s}" for s in ("weight", "bias")},
    "flux": _FINAL,
}


@pytest.fixture(scope="module")
def comfy_075(comfy_dir, comfy_version):
    if comfy_version not in ("0.3.75", "custom"):
        pytest.skip(f"ComfyUI {comfy_version} has no SD3 / FLUX model types")
    return comfy_dir


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(7)
    return SD3Transformer2DModel(**SD3).eval()


def tiny_flux(guidance: bool):
    from popalign_core.models.tiny_flow import get_dummy_flow_components

    return get_dummy_flow_components("flux", seed=3, guidance_embeds=guidance)["transformer"]


def standalone(transformer, family: str, shift: float | None):
    """The core's FlowAdapter on `transformer` (its text encoders and VAE are never used here)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from popalign_core.models.flow_adapter import FlowAdapter
    from popalign_core.models.tiny_flow import encoders_of, flow_scheduler_config, get_dummy_flow_components

    comps = get_dummy_flow_components(family)
    encs, toks = encoders_of(comps, family)
    cfg = flow_scheduler_config(family) if shift is None else {"num_train_timesteps": 1000, "shift": shift}
    return FlowAdapter(transformer, comps["vae"], encs, toks, FlowMatchEulerDiscreteScheduler(**cfg), family)


def scaled_fp8(orig: dict, scale_input: bool) -> dict:
    """Original-layout tensors as a scaled-fp8 file stores them (ComfyUI ``comfy/ops.py`` scaled_fp8_ops): each
    Linear weight W (the 2-D ones) as fp8 W / s with a float32 ``scale_weight`` s = max|W| / 256 (never 1), the
    rest as they are, and the ``scaled_fp8`` marker (2 elements: no fp8 optimizations; empty: fp8 optimizations,
    with a ``scale_input`` per Linear, which only ComfyUI's fp8 matrix multiplication reads)."""
    fp8 = torch.float8_e4m3fn
    out = {"scaled_fp8": torch.empty(0 if scale_input else 2, dtype=fp8)}
    for k, v in orig.items():
        if not (k.endswith(".weight") and v.ndim == 2):
            out[k] = v.contiguous()
            continue
        s = v.abs().max().float() / 256
        out[k] = (v / s).to(fp8)
        out[k.removesuffix("weight") + "scale_weight"] = s
        if scale_input:
            out[k.removesuffix("weight") + "scale_input"] = torch.tensor(0.05)
    return out


def inputs(seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(4, 16, 8, 8, generator=g), "noise": torch.randn(4, 16, 8, 8, generator=g),
            "timesteps": torch.tensor([970.0, 640.0, 250.0, 20.0])}  # fmt: skip


def add_seeded_lora(adapter) -> None:
    from popalign_core.lora.files import LoraSpec, add_lora

    torch.manual_seed(123)
    add_lora(adapter, LoraSpec(rank=4, alpha=4.0, unet_targets="default", init_lora_weights="gaussian"))


def losses(adapter, t: dict, cond) -> dict:
    """Per-sample flow errors of model and reference and the popalign preference loss (objective.preference_loss)."""
    from popalign_core.train.losses import per_sample_error
    from popalign_core.train.objective import preference_loss

    out = preference_loss(adapter, t["latents"], cond, torch.tensor(LABELS), "popalign", noise=t["noise"],
                          timesteps=t["timesteps"])  # fmt: skip
    x_t = adapter.add_noise(t["latents"], t["noise"], t["timesteps"])
    target = adapter.target(t["latents"], t["noise"], t["timesteps"])
    with torch.no_grad():
        l_model = per_sample_error(adapter.predict(x_t, t["timesteps"], cond), target)
        with adapter.reference():
            l_ref = per_sample_error(adapter.predict(x_t, t["timesteps"], cond), target)
    return {"loss": float(out.loss.detach()), "per_sample": out.per_sample.detach().tolist(),
            "l_model": l_model.tolist(), "l_ref": l_ref.tolist()}  # fmt: skip


# ------------------------------------------------------------------------------------------------- child side
def _pack(repo: str):
    return cs.node_module("comfy_adapter", repo)


def _sharing(model, adapter) -> dict:
    comfy = {p.untyped_storage().data_ptr() for p in model.model.diffusion_model.state_dict().values()}
    view = adapter.transformer.state_dict()
    copies = sorted(k for k, v in view.items() if v.untyped_storage().data_ptr() not in comfy)
    return {"copies": copies, "n_view": len(view), "copied_bytes": adapter.copied_bytes,
            "view_dtypes": sorted({str(v.dtype) for v in view.values()})}  # fmt: skip


def _scaled_facts(model, adapter) -> dict:
    """Before any LoRA: ComfyUI's Linear classes, the view's fp8 bytes, its Linears' scales (ComfyUI's tensors?)."""
    dm = model.model.diffusion_model
    comfy = {m.scale_weight.data_ptr() for m in dm.modules() if getattr(m, "scale_weight", None) is not None}
    view = [m._buffers.get("scale_weight") for m in adapter.transformer.modules() if isinstance(m, torch.nn.Linear)]
    got = [s for s in view if s is not None]
    fp8 = sum(v.numel() for v in adapter.transformer.state_dict().values() if v.dtype == torch.float8_e4m3fn)
    return {"comfy_linear_ops": sorted({type(m).__qualname__ for m in dm.modules() if isinstance(m, torch.nn.Linear)}),
            "comfy_scale_input": any(getattr(m, "scale_input", None) is not None for m in dm.modules()),
            "n_linear": len(view), "n_scaled": len(got), "fp8_bytes": fp8,
            "scales_shared": all(s.data_ptr() in comfy for s in got),
            "scale_range": [min(map(float, got), default=1.0), max(map(float, got), default=1.0)]}  # fmt: skip


def _velocity_checks(model, adapter, t, cond, extra) -> dict:
    """Our predict vs ComfyUI's diffusion_model at timestep(σ) and apply_model (x − σ·v)."""
    ms = model.model.model_sampling
    sigma = t["timesteps"] / 1000.0
    x_t = adapter.add_noise(t["latents"], t["noise"], t["timesteps"])
    with torch.no_grad():
        ours = adapter.predict(x_t, t["timesteps"], cond).float()
    with torch.inference_mode():
        v = model.model.diffusion_model(x_t, ms.timestep(sigma), context=cond.embeds, y=cond.pooled, **extra).float()
        den = model.model.apply_model(x_t, sigma, c_crossattn=cond.embeds, y=cond.pooled, **extra).float()
    return {"v_diff": float((ours - v).abs().max()), "v_scale": float(v.abs().max()),
            "apply_model_diff": float((den - (x_t - sigma[:, None, None, None] * v)).abs().max())}  # fmt: skip


def _train_step(model, adapter, t, cond) -> dict:
    """One SGD step on a fresh LoRA: what changed (LoRA only), and ComfyUI's weights / output afterwards."""
    add_seeded_lora(adapter)
    sd = model.model.diffusion_model.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    lora = {n: p.detach().clone() for n, p in adapter.transformer.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in adapter.transformer.named_parameters() if not p.requires_grad}
    out = losses(adapter, t, cond)
    from popalign_core.train.objective import preference_loss

    loss = preference_loss(adapter, t["latents"], cond, torch.tensor(LABELS), "popalign", noise=t["noise"],
                           timesteps=t["timesteps"]).loss  # fmt: skip
    loss.backward()
    params = dict((n, p) for n, p in adapter.transformer.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p in params.values():
            p -= 0.1 * p.grad
    now = dict(adapter.transformer.named_parameters())
    out["train_loss"] = float(loss)
    out["grad_norm"] = float(sum(p.grad.float().norm() ** 2 for p in params.values()) ** 0.5)
    out["lora_unchanged"] = sorted(n for n, w in lora.items() if torch.equal(now[n], w))
    out["n_lora"] = len(lora)
    out["base_changed"] = [n for n, w in base.items() if not torch.equal(now[n].detach(), w)]
    out["comfy_changed"] = [k for k, v in model.model.diffusion_model.state_dict().items()
                            if not torch.equal(v.float(), before[k].float())]  # fmt: skip
    return out


def _random_clip_l(seed: int) -> dict:
    """A random CLIP-L state dict in the layout of a CLIPLoader file (ComfyUI's shapes are fixed by its config)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from popalign_core.models.loading import FAMILY_CONFIG_DIRS

    cfg = CLIPTextConfig.from_pretrained(str(FAMILY_CONFIG_DIRS["sd3"] / "text_encoder"), local_files_only=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPTextModelWithProjection(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        if "position_ids" not in k:
            name = ("" if k.startswith(("text_model.", "text_projection")) else "text_model.") + k
            out[name] = (torch.randn(s, generator=g) * 0.02).half()
    return out


def sd3_job(job: dict, log) -> dict:
    import comfy.sd
    from safetensors.torch import load_file, save_file

    import nodes as comfy_nodes

    ca = _pack(job["repo"])
    t = load_file(job["inputs"])
    clip = comfy.sd.load_text_encoder_state_dicts([_random_clip_l(11)], clip_type=comfy.sd.CLIPType.SD3)
    out, tensors = {}, {}
    unets = {"fp8": (job["unet"], "fp8_e4m3fn"), "scaled": (job["scaled"], "default")}
    for kind in ("checkpoint", "fp8", "scaled"):
        if kind == "checkpoint":
            model, _, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(job["ckpt"])[:3]
        else:
            model = comfy_nodes.UNETLoader().load_unet(*unets[kind])[0]
        r = {"model_type": ca.model_type_name(model), "weight_dtype": str(model.model.get_dtype())}
        with torch.inference_mode(False), torch.enable_grad():
            adapter = ca.adapter_from_comfy(model, clip, vae)
            r["adapter"] = type(adapter).__name__
            r.update(_sharing(model, adapter), **_scaled_facts(model, adapter))
            r["shift"] = float(adapter.noise_scheduler.config.shift)
            r["vae_shared"] = all(
                p.data_ptr() in {q.data_ptr() for q in vae.first_stage_model.parameters()}
                for p in adapter.vae.parameters()
            )
            r["vae_factors"] = [adapter.vae.config.scaling_factor, adapter.vae.config.shift_factor]
            cond = adapter.encode_prompt(PROMPTS)
            ref = [comfy_nodes.CLIPTextEncode().encode(clip, p)[0][0] for p in PROMPTS]
            r["cond_vs_cliptextencode"] = max(
                max(
                    float((cond.embeds[i] - emb[0]).abs().max()),
                    float((cond.pooled[i] - d["pooled_output"][0]).abs().max()),
                )
                for i, (emb, d) in enumerate(ref)
            )
            r["cond_shape"] = [list(cond.embeds.shape), list(cond.pooled.shape)]
            r.update(_velocity_checks(model, adapter, t, cond, {}))
            if kind == "checkpoint":
                tensors.update(embeds=cond.embeds.contiguous(), pooled=cond.pooled.contiguous())
            x = t["latents"][:1]
            with torch.inference_mode():
                den_before = model.model.apply_model(x, torch.tensor([0.5]), c_crossattn=cond.embeds[:1],
                                                     y=cond.pooled[:1]).clone()  # fmt: skip
            r.update(_train_step(model, adapter, t, cond))
            with torch.inference_mode():
                den_after = model.model.apply_model(x, torch.tensor([0.5]), c_crossattn=cond.embeds[:1],
                                                    y=cond.pooled[:1])  # fmt: skip
            r["comfy_output_change"] = float((den_after - den_before).abs().max())
            try:
                from popalign_core.lora.files import LoraSpec, add_lora

                add_lora(adapter, LoraSpec(rank=4, text_encoder_targets=("q_proj",)), adapter_name="te")
            except ValueError as e:
                r["te_lora_error"] = str(e)
        out[kind] = r
    save_file(tensors, job["cond"])
    return out


def _tiny_flux_model(weights: str, kind: str):
    """A tiny ComfyUI Flux / FluxSchnell MODEL built as ComfyUI's loaders build one. kind: the type, then -fp8
    (UNETLoader fp8_e4m3fn: fp8 weights, fp32 manual cast), -fp8-fast (UNETLoader fp8_e4m3fn_fast), -scaled (a
    scaled-fp8 file: its marker goes to the config as comfy/model_detection.py puts it), -fp8mm (ComfyUI started
    with --supports-fp8-compute, i.e. a GPU that multiplies in fp8), -mixed (a per-layer mixed-precision file)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from safetensors.torch import load_file

    name = kind.split("-")[0]
    prefix = name + ("-scaled." if "-scaled" in kind else ".")
    sd = {k.removeprefix(prefix): v for k, v in load_file(weights).items() if k.startswith(prefix)}
    cfg = getattr(comfy.supported_models, name)(dict(FLUX_UNET, guidance_embed=name == "Flux"))
    marker = sd.pop("scaled_fp8", None)
    if marker is not None:  # comfy/model_detection.py model_config_from_unet
        cfg.scaled_fp8, cfg.optimizations["fp8"] = marker.dtype, marker.nelement() != 2
    fp8 = "-fp8" in kind and "-scaled" not in kind
    cfg.set_inference_dtype(torch.float8_e4m3fn if fp8 else torch.float32, torch.float32 if fp8 else None)
    cfg.optimizations["fp8"] |= kind.endswith("-fast")
    if kind.endswith("-mixed"):  # a _quantization_metadata file (comfy/model_detection.py): img_in in fp8
        cfg.layer_quant_config = {"img_in": {"format": "float8_e4m3fn"}}
        sd["img_in.weight"], sd["img_in.weight_scale"] = sd["img_in.weight"].to(torch.float8_e4m3fn), torch.tensor(1.0)
    fp8_compute, mm.SUPPORT_FP8_OPS = mm.SUPPORT_FP8_OPS, kind.endswith(("-fp8mm", "-fast"))
    try:
        model = cfg.get_model(sd, "")  # comfy.ops.pick_operations chooses the Linear class here
    finally:
        mm.SUPPORT_FP8_OPS = fp8_compute
    model.load_model_weights(sd, "")  # inside inference mode, as ComfyUI's loaders run
    dev = mm.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)


def flux_job(job: dict, log) -> dict:
    from safetensors.torch import load_file

    ca = _pack(job["repo"])
    t = load_file(job["inputs"])
    flow = importlib.import_module("pa_nodes.comfy_flow")
    out = {"refused": {}, "fp8mm": {}}
    try:  # refused by name, before anything loads
        flow.flow_adapter_from_comfy(_tiny_flux_model(job["weights"], "Flux-mixed"), None, None, ca)
    except ca.UnsupportedModel as e:
        out["refused"]["Flux-mixed"] = str(e)
    for kind in ("Flux-scaled-fp8mm", "Flux-fp8-fast"):  # fp8 matmul in ComfyUI: trains, with a console note
        model = _tiny_flux_model(job["weights"], kind)
        g = torch.Generator().manual_seed(5)
        from popalign_core.models.adapter import Conditioning

        cond = Conditioning(embeds=torch.randn(4, 8, 64, generator=g), pooled=torch.randn(4, 32, generator=g),
                            guidance=torch.full((4,), 3.5))  # fmt: skip
        with torch.inference_mode(False), torch.enable_grad():
            adapter = flow.flow_adapter_from_comfy(model, None, None, ca)
            r = {"note": flow.check_comfy_ops(model, ca), "v": _view_velocity(adapter, t, cond)}
            r.update(_sharing(model, adapter), **_train_step(model, adapter, t, cond))
        out["fp8mm"][kind] = r
    for kind in ("Flux", "FluxSchnell", "Flux-fp8", "Flux-scaled"):
        name = kind.split("-")[0]
        model = _tiny_flux_model(job["weights"], kind)
        g = torch.Generator().manual_seed(5)
        from popalign_core.models.adapter import Conditioning

        cond = Conditioning(embeds=torch.randn(4, 8, 64, generator=g), pooled=torch.randn(4, 32, generator=g),
                            guidance=None if name == "FluxSchnell" else torch.full((4,), 3.5))  # fmt: skip
        extra = {} if name == "FluxSchnell" else {"guidance": cond.guidance}
        r = {"model_type": ca.model_type_name(model), "weight_dtype": str(model.model.get_dtype())}
        with torch.inference_mode(False), torch.enable_grad():
            adapter = flow.flow_adapter_from_comfy(model, None, None, ca)  # no CLIP / VAE: hand-made conditioning
            r.update(_sharing(model, adapter), **_scaled_facts(model, adapter))
            r["scheduler"] = dict(adapter.noise_scheduler.config)
            r.update(_velocity_checks(model, adapter, t, cond, extra), v=_view_velocity(adapter, t, cond))
            r.update(_train_step(model, adapter, t, cond))
        out[kind] = r
    return out


def _view_velocity(adapter, t, cond) -> list:
    with torch.no_grad():
        x_t = adapter.add_noise(t["latents"], t["noise"], t["timesteps"])
        return adapter.predict(x_t, t["timesteps"], cond).float().tolist()


# ------------------------------------------------------------------------------------------------ parent side
@pytest.fixture(scope="module")
def sd3_run(comfy_075, tmp_path_factory):
    import json as _json

    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    from popalign_core.models.flow_single_file import transformer_to_original
    from popalign_core.models.loading import FAMILY_CONFIG_DIRS
    from popalign_core.models.single_file import vae_to_original

    root = tmp_path_factory.mktemp("comfy_sd3")
    (root / "checkpoints").mkdir()
    (root / "diffusion_models").mkdir()
    orig = transformer_to_original(tiny_sd3(), "sd3")
    vcfg = {k: v for k, v in _json.loads((FAMILY_CONFIG_DIRS["sd3"] / "vae" / "config.json").read_text()).items()
            if not k.startswith("_")}  # fmt: skip
    torch.manual_seed(8)
    vae = AutoencoderKL(**vcfg)
    ckpt = {f"model.diffusion_model.{k}": v.contiguous() for k, v in orig.items()}
    ckpt.update({f"first_stage_model.{k}": v.half().contiguous() for k, v in vae_to_original(vae).items()})
    save_file(ckpt, str(root / "checkpoints" / "tiny_sd3.safetensors"))
    save_file({k: v.contiguous() for k, v in orig.items()}, str(root / "diffusion_models" / "tiny_sd3.safetensors"))
    save_file(scaled_fp8(orig, False), str(root / "diffusion_models" / "tiny_sd3_scaled.safetensors"))
    save_file(inputs(), str(root / "inputs.safetensors"))
    job = {"repo": str(REPO), "ckpt": "tiny_sd3.safetensors", "unet": "tiny_sd3.safetensors",
           "scaled": "tiny_sd3_scaled.safetensors",
           "inputs": str(root / "inputs.safetensors"), "cond": str(root / "cond.safetensors")}  # fmt: skip
    got = cs.run_in_comfy(f"{__file__}:sd3_job", job, comfy_dir=comfy_075, output_dir=root / "out",
                          folders={"checkpoints": root / "checkpoints",
                                   "diffusion_models": root / "diffusion_models"})  # fmt: skip
    got["cond"] = load_file(job["cond"])
    return got


@pytest.fixture(scope="module")
def flux_run(comfy_075, tmp_path_factory):
    from safetensors.torch import save_file

    from popalign_core.models.flow_single_file import transformer_to_original

    root = tmp_path_factory.mktemp("comfy_flux")
    weights = {}
    for kind, guidance in (("Flux", True), ("FluxSchnell", False)):
        weights.update({f"{kind}.{k}": v.contiguous() for k, v in
                        transformer_to_original(tiny_flux(guidance), "flux").items()})  # fmt: skip
    orig = transformer_to_original(tiny_flux(True), "flux")
    weights.update({f"Flux-scaled.{k}": v for k, v in scaled_fp8(orig, True).items()})
    save_file(weights, str(root / "weights.safetensors"))
    save_file(inputs(), str(root / "inputs.safetensors"))
    job = {"repo": str(REPO), "weights": str(root / "weights.safetensors"), "inputs": str(root / "inputs.safetensors")}
    return cs.run_in_comfy(f"{__file__}:flux_job", job, comfy_dir=comfy_075, output_dir=root / "out")


def _check_common(r: dict, family: str, parity: float) -> None:
    assert set(r["copies"]) == SWAPPED[family], r["copies"]  # everything else shares ComfyUI's storage
    assert r["v_diff"] <= parity * max(1.0, r["v_scale"]), (r["v_diff"], r["v_scale"])
    assert r["apply_model_diff"] < 1e-4
    # SD3's last block drops its context stream's output, so the context queries' LoRA gets no gradient
    idle = {"transformer_blocks.0.attn.add_q_proj.lora_A.default.weight",
            "transformer_blocks.0.attn.add_q_proj.lora_B.default.weight"} if family == "sd3" else set()  # fmt: skip
    assert r["n_lora"] > len(idle) and set(r["lora_unchanged"]) == idle and r["grad_norm"] > 0
    assert r["base_changed"] == [] and r["comfy_changed"] == []


def test_sd3_checkpoint_view_matches_comfyui(sd3_run):
    r = sd3_run["checkpoint"]
    assert (r["model_type"], r["adapter"], r["shift"]) == ("SD3", "ComfyFlowAdapter", 3.0)
    _check_common(r, "sd3", 1e-5)
    assert r["vae_shared"] and r["vae_factors"] == [1.5305, 0.0609]
    assert r["cond_vs_cliptextencode"] == 0.0 and r["cond_shape"] == [[4, 77, 4096], [4, 2048]]
    assert r["comfy_output_change"] == 0.0
    assert "no trainable text encoder" in r["te_lora_error"] and "ComfyUI's own CLIP" in r["te_lora_error"]


def test_sd3_fp8_weights_train_without_an_upcast_copy(sd3_run):
    r = sd3_run["fp8"]
    assert r["weight_dtype"] == "torch.float8_e4m3fn" and "torch.float8_e4m3fn" in r["view_dtypes"]
    _check_common(r, "sd3", 1e-4)  # ComfyUI's manual cast and ours compute the same fp32 products
    assert r["comfy_output_change"] == 0.0


@pytest.mark.parametrize("kind", ["Flux", "FluxSchnell", "Flux-fp8"])
def test_flux_view_matches_comfyui(flux_run, kind):
    r = flux_run[kind]
    assert r["model_type"] == kind.removesuffix("-fp8")
    fp8 = kind.endswith("-fp8")
    assert (r["weight_dtype"] == "torch.float8_e4m3fn") == fp8 and ("torch.float8_e4m3fn" in r["view_dtypes"]) == fp8
    _check_common(r, "flux", 1e-4 if fp8 else 1e-5)
    sch = r["scheduler"]
    if kind != "FluxSchnell":  # ModelSamplingFlux: FLUX's dynamic shift (training sigmas unshifted)
        assert sch["use_dynamic_shifting"] and sch["max_shift"] == 1.15
    else:  # ModelSamplingDiscreteFlow, shift 1, multiplier 1
        assert not sch["use_dynamic_shifting"] and sch["shift"] == 1.0


def _check_scaled(r: dict, copied: int) -> None:
    """A scaled-fp8 view: ComfyUI's own scaled_fp8_ops, every view Linear carrying ComfyUI's scale tensor (not 1),
    fp8 weights shared (only the swapped modulation halves copied: `copied` bytes, fp8 too), no upcast copy."""
    assert r["comfy_linear_ops"] == ["scaled_fp8_ops.<locals>.scaled_fp8_op.Linear"], r["comfy_linear_ops"]
    assert r["weight_dtype"] == "torch.float32" and "torch.float8_e4m3fn" in r["view_dtypes"]
    assert r["n_scaled"] == r["n_linear"] > 0 and r["scales_shared"], r
    assert 0 < r["scale_range"][0] <= r["scale_range"][1] < 0.01  # max|W| / 256 of a small random init
    assert r["copied_bytes"] == copied and r["fp8_bytes"] > 10 * copied
    assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0


def test_sd3_scaled_fp8_file_trains_over_comfyuis_own_tensors(sd3_run):
    r = sd3_run["scaled"]
    assert r["model_type"] == "SD3" and not r["comfy_scale_input"]  # a 2-element marker: no fp8 optimizations
    # copies: the swapped final and last-context modulations (fp8 weights and biases), 64 x 128 + 128 each
    _check_scaled(r, 2 * (64 * 128 + 128))
    _check_common(r, "sd3", 1e-4)
    assert r["comfy_output_change"] == 0.0


def test_flux_scaled_fp8_with_input_scales_trains_over_comfyuis_own_tensors(flux_run):
    r = flux_run["Flux-scaled"]
    assert r["model_type"] == "Flux" and r["comfy_scale_input"]  # an empty marker: fp8 optimizations, scale_input
    _check_scaled(r, 32 * 64 + 64)
    _check_common(r, "flux", 1e-4)


@pytest.mark.parametrize(
    ("kind", "same_as", "how"),
    [("Flux-scaled-fp8mm", "Flux-scaled", "a scaled-fp8 file with fp8 optimizations on a GPU with fp8 compute"),
     ("Flux-fp8-fast", "Flux-fp8", "UNETLoader weight_dtype fp8_e4m3fn_fast or --fast fp8_matrix_mult")],
)  # fmt: skip
def test_fp8_matrix_multiplication_trains_through_the_dequantised_weights(flux_run, kind, same_as, how):
    r = flux_run["fp8mm"][kind]
    assert r["note"].startswith("[PopAlign] the Flux model: ComfyUI runs its Linear layers (")
    assert "with fp8 matrix multiplication (" + how in r["note"] and "rounding each layer's input to fp8" in r["note"]
    assert torch.equal(torch.tensor(r["v"]), torch.tensor(flux_run[same_as]["v"]))  # the same view function
    assert set(r["copies"]) == SWAPPED["flux"] and r["base_changed"] == [] and r["comfy_changed"] == []
    assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0


def test_a_mixed_precision_file_is_refused_by_name(flux_run):
    msg = flux_run["refused"]["Flux-mixed"]
    assert msg.startswith("model: the Flux model is a per-layer mixed-precision quantised file (_quantization_")
    assert "load the bf16 / fp16 model instead (UNETLoader weight_dtype fp8_e4m3fn" in msg


@pytest.mark.parametrize("tokens", [1, 64])  # s on the weight (64 x 32 weight < input), on the input (1 token)
def test_cast_linear_computes_the_scaled_weight_in_forward_and_backward(tokens):
    """CastLinear over fp8 W with scale s = a Linear over the dequantised s·W (value and grad of x); no grad for W."""
    _pack(str(REPO))
    flow = importlib.import_module("pa_nodes.comfy_flow")
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(32, 64).requires_grad_(False)
    layer.weight.data = (torch.randn(64, 32, generator=g) * 100).to(torch.float8_e4m3fn)
    layer.register_buffer("scale_weight", torch.tensor(0.003), persistent=False)
    ref = torch.nn.Linear(32, 64).requires_grad_(False)
    ref.weight.data, ref.bias.data = layer.weight.float() * 0.003, layer.bias.clone()
    layer.__class__ = flow.CastLinear
    x = torch.randn(2, tokens, 32, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    (y * y_ref.detach()).sum().backward()
    (y_ref * y_ref.detach()).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert layer.weight.grad is None and layer.weight.dtype == torch.float8_e4m3fn


def _parity(got: dict, want: dict) -> None:
    for key in ("per_sample", "l_model", "l_ref"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), rtol=1e-4, atol=1e-6, msg=key)
    assert abs(got["loss"] - want["loss"]) <= 1e-4 * max(1.0, abs(want["loss"]))
    assert not torch.allclose(torch.tensor(want["l_model"]), torch.tensor(want["l_ref"]))  # the LoRA acts


def test_sd3_losses_equal_the_standalone_flow_adapters(sd3_run):
    from popalign_core.models.adapter import Conditioning

    ours = standalone(tiny_sd3(), "sd3", 3.0)
    add_seeded_lora(ours)
    want = losses(ours, inputs(), Conditioning(embeds=sd3_run["cond"]["embeds"], pooled=sd3_run["cond"]["pooled"]))
    _parity(sd3_run["checkpoint"], want)


@pytest.mark.parametrize("kind", ["Flux", "FluxSchnell"])
def test_flux_losses_equal_the_standalone_flow_adapters(flux_run, kind):
    from popalign_core.models.adapter import Conditioning

    ours = standalone(tiny_flux(kind == "Flux"), "flux", None)
    add_seeded_lora(ours)
    g = torch.Generator().manual_seed(5)
    cond = Conditioning(embeds=torch.randn(4, 8, 64, generator=g), pooled=torch.randn(4, 32, generator=g),
                        guidance=torch.full((4,), 3.5) if kind == "Flux" else None)  # fmt: skip
    _parity(flux_run[kind], losses(ours, inputs(), cond))


def test_an_unsupported_flow_type_is_named():
    ca = importlib.import_module("pa_nodes.comfy_adapter") if "pa_nodes" in sys.modules else _pack(str(REPO))
    model = types.SimpleNamespace(model=types.SimpleNamespace(model_config=type("AuraFlow", (), {})()))
    with pytest.raises(ca.UnsupportedModel, match=r"'AuraFlow' is not supported by PopAlign; supported types: "
                                                  r"SD15, .*, SD3, Flux, FluxSchnell"):  # fmt: skip
        ca.adapter_from_comfy(model, None, None)
