"""The training nodes on an SD3 MODEL and the FLUX workflows, in a real ComfyUI 0.3.75 server (POST /prompt).

ComfyUI 0.3.75 only (the 2024 ComfyUI has no SD3 / FLUX types and no FLUX nodes): skipped on 2024.03.

The server gets a tiny SD3 all-in-one checkpoint that ComfyUI's own detection loads as SD3 (CheckpointLoaderSimple):
the MMDiT of tests/nodes/test_comfy_flow_adapter.py (depth 1, width 64), a random full-size CLIP-L under
``text_encoders.clip_l.`` (so ComfyUI builds its SD3 CLIP with CLIP-L only: 77 x 4096 context, 2048 pooled) and a
random full-size 16-channel VAE; plus the random FairFace-shaped file of the other node tests.

FLUX itself cannot run here: ComfyUI detects a FLUX transformer only at its full width (3072) and its FLUX CLIP
always builds a full T5-XXL (4.7B parameters, from a fixed config), whatever the files hold. So the FLUX workflows
are checked (a) structurally against /object_info (node types, inputs, widget counts, links; the committed files are
what tools/make_workflows.py writes) and (b) by running the same graphs with the three FLUX loaders (UNETLoader,
DualCLIPLoader, VAELoader) swapped for the tiny SD3 checkpoint (`swap_loaders`): every other node, FluxGuidance and
EmptySD3LatentImage included, runs as in the workflow. The trained LoRA is loaded by the stock LoraLoader and
changes the images.
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import comfy_support as cs  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)
import make_workflows as mw  # noqa: E402  (tools/ is on sys.path: tests/conftest.py)
import pytest
import test_comfyui_nodes as tn  # noqa: E402  (shrink(), api_workflow())

REPO = Path(__file__).resolve().parents[2]
TINY_SD3 = "tiny_sd3_all_in_one.safetensors"
FAIRFACE = "res34_fair_align_multi_7_20190809.pt"
pytestmark = pytest.mark.timeout(900)
# FLUX loader outputs -> the checkpoint's: UNETLoader MODEL, DualCLIPLoader CLIP, VAELoader VAE
LOADERS = {"UNETLoader": 0, "DualCLIPLoader": 1, "VAELoader": 2}
# test sizes of the stock nodes the FLUX workflows add (PopAlign nodes: tn.SHRINK)
SHRINK = {
    "EmptySD3LatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 2},
    "PopAlignLoRATrainer": {"steps": 2, "learning_rate": 1e-2},  # large: 2 steps must change 8-bit images
}


# ------------------------------------------------------------------------------------------------------ fixtures
def write_tiny_sd3_checkpoint(path: Path) -> Path:
    """The tiny SD3 transformer + random full-size CLIP-L (fp16) + random 16-channel VAE (fp16), ComfyUI layout."""
    import test_comfy_flow_adapter as tfa  # tiny_sd3(), _random_clip_l()
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from popalign_core.models.flow_single_file import transformer_to_original
    from popalign_core.models.loading import FAMILY_CONFIG_DIRS
    from popalign_core.models.single_file import vae_to_original

    vcfg = json.loads((FAMILY_CONFIG_DIRS["sd3"] / "vae" / "config.json").read_text())
    torch.manual_seed(8)
    vae = AutoencoderKL(**{k: v for k, v in vcfg.items() if not k.startswith("_")})
    sd = {f"model.diffusion_model.{k}": v for k, v in transformer_to_original(tfa.tiny_sd3(), "sd3").items()}
    sd.update({f"first_stage_model.{k}": v.half() for k, v in vae_to_original(vae).items()})
    sd.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in tfa._random_clip_l(11).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def server(comfy_dir, comfy_version, tmp_path_factory):
    if comfy_version not in ("0.3.75", "custom"):
        pytest.skip(f"ComfyUI {comfy_version} has no SD3 / FLUX model types and no FLUX nodes")
    import torch
    import torchvision

    root = tmp_path_factory.mktemp("comfy_flow")
    write_tiny_sd3_checkpoint(root / "checkpoints" / TINY_SD3)
    (root / "classifiers").mkdir()
    torch.manual_seed(0)
    net = torchvision.models.resnet34()
    net.fc = torch.nn.Linear(512, 18)
    torch.save(net.state_dict(), root / "classifiers" / FAIRFACE)
    (root / "custom_nodes").mkdir()
    (root / "custom_nodes" / "PopAlign").symlink_to(REPO, target_is_directory=True)
    folders = {"checkpoints": root / "checkpoints", "popalign_classifiers": root / "classifiers",
               "custom_nodes": root / "custom_nodes"}  # fmt: skip
    with cs.comfy_server(comfy_dir, root / "work", folders=folders, threads=2) as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info", timeout=60)


def swap_loaders(api: dict) -> dict:
    """The FLUX graph with its three loaders replaced by one CheckpointLoaderSimple of the tiny SD3 checkpoint (node
    "1"), every link to their outputs re-pointed; the rest shrunk to test sizes (tn.SHRINK, SHRINK)."""
    out = copy.deepcopy(api)
    gone = {k: LOADERS[n["class_type"]] for k, n in api.items() if n["class_type"] in LOADERS}
    assert sorted(gone.values()) == [0, 1, 2], "a FLUX workflow loads MODEL, CLIP and VAE with the stock loaders"
    for k in gone:
        del out[k]
    out["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD3}}
    for node in out.values():
        for name, v in node["inputs"].items():
            if mw._is_link(v) and v[0] in gone:
                node["inputs"][name] = ["1", gone[v[0]]]
    out = tn.shrink(out)
    out["1"]["inputs"]["ckpt_name"] = TINY_SD3
    for node in out.values():
        node["inputs"].update(SHRINK.get(node["class_type"], {}))
    return out


def flux_api(name: str) -> dict:
    return json.loads((tn.WORKFLOWS / "api" / f"{name}.api.json").read_text())


def lora_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def _branch(start: int, model, seed: int = 42) -> dict:
    """A stock sampling branch of the SD3 checkpoint (empty SD3 latent, euler, simple, cfg 1)."""
    s = str
    return {
        s(start): {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a doctor", "clip": ["1", 1]}},
        s(start + 1): {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        s(start + 2): {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": [s(start), 0], "negative": [s(start), 0], "latent_image": [s(start + 1), 0], "denoise": 1.0}},
        s(start + 3): {"class_type": "VAEDecode", "inputs": {"samples": [s(start + 2), 0], "vae": ["1", 2]}},
        s(start + 4): {"class_type": "SaveImage", "inputs": {"images": [s(start + 3), 0],
                                                             "filename_prefix": f"flow{start}"}},
    }  # fmt: skip


# -------------------------------------------------------------------------------------------- static checks
def test_flux_workflows_are_current_and_use_existing_nodes(object_info, tmp_path):
    assert set(mw.available(object_info)) == set(mw.WORKFLOWS)  # 0.3.75 has every node of every workflow
    for name in mw.FLUX_WORKFLOWS:
        for p in (tmp_path / "api" / f"{name}.api.json", tmp_path / f"{name}.json"):
            p.unlink(missing_ok=True)
    written = mw.write_all(object_info, tmp_path)
    for p in written:
        rel = p.relative_to(tmp_path)
        assert (tn.WORKFLOWS / rel).read_text() == p.read_text(), f"example_workflows/{rel} is stale"
    for name in mw.FLUX_WORKFLOWS:
        tn.test_ui_workflow_uses_existing_nodes_and_inputs(object_info, name)
        api = flux_api(name)
        types_ = {n["class_type"] for n in api.values()}
        assert {"UNETLoader", "DualCLIPLoader", "VAELoader"} <= types_ and "CheckpointLoaderSimple" not in types_
        clip = next(n for n in api.values() if n["class_type"] == "DualCLIPLoader")["inputs"]
        assert clip["type"] == "flux" and clip["type"] in object_info["DualCLIPLoader"]["input"]["required"]["type"][0]
        unet = object_info["UNETLoader"]["input"]["required"]["weight_dtype"][0]
        assert "fp8_e4m3fn" in unet
        for n in api.values():
            if n["class_type"] == "PopAlignPopulationSampler":
                assert (n["inputs"]["cfg"], n["inputs"]["sampler_name"], n["inputs"]["scheduler"],
                        n["inputs"]["guidance"]) == (1.0, "euler", "simple", 3.5)  # fmt: skip
            if n["class_type"] == "PopAlignDistributionalAlignment":
                assert n["inputs"]["train"] == "unet" and n["inputs"]["gradient"] == "solver"
            if n["class_type"] == "PopAlignLoRATrainer":
                assert n["inputs"]["train_text_encoder"] is False


def _pack():
    return cs.node_module("train_nodes"), cs.node_module("dal_nodes")


def _model(type_name: str):
    return types.SimpleNamespace(model=types.SimpleNamespace(model_config=type(type_name, (), {})()))


DAL_SETTINGS = dict(prompts="a photo of a doctor", lora_name="x", steps=2, learning_rate=1e-4, lora_rank=4,
                    images_per_prompt=2, sampler_steps=2, guidance=3.5, threshold=0.8, embedder="none",
                    face_bank="none", face_detection=False, resolution=64, micro_batch=0, seed=0,
                    checkpoint_every=1, restart=False)  # fmt: skip


@pytest.mark.parametrize("type_name", ["SD3", "Flux", "FluxSchnell"])
def test_flow_models_map_the_dal_sampler_and_refuse_a_text_encoder_lora(type_name):
    train_nodes, dal_nodes = _pack()
    clf = types.SimpleNamespace(name="toy", weights=None, options={}, detector=None)
    target = {"target": {"gender": {"female": 0.75, "male": 0.25}}}
    for gradient, want in (("a1", "solver"), ("solver", "solver"), ("exact", "exact")):
        cfg = dal_nodes.dal_config(_model(type_name), target, clf, train="unet", gradient=gradient, **DAL_SETTINGS)
        assert (cfg.scheduler, cfg.gradient, cfg.train) == ("flow_euler", want, "unet")
    sd15 = dal_nodes.dal_config(_model("SD15"), target, clf, train="unet", gradient="a1", **DAL_SETTINGS)
    assert (sd15.scheduler, sd15.gradient) == ("dpmpp_2m", "a1")  # UNet models (and their run keys) unchanged
    for train in ("text_encoder", "both"):
        with pytest.raises(
            ValueError, match=rf"train='{train}': the MODEL is {type_name} .*valid value: train='unet'"
        ):
            dal_nodes.dal_config(_model(type_name), target, clf, train=train, gradient="a1", **DAL_SETTINGS)
    dataset = {"manifest": str(REPO / "no_such_manifest.json")}
    settings = dict(steps=2, learning_rate=1e-4, lora_rank=4, batch_size=2, resolution=64, seed=0,
                    checkpoint_every=1, restart=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"train_text_encoder=True: .*valid value: train_text_encoder=False"):
        train_nodes.train_config(_model(type_name), dataset, "popalign", "{}", "x", train_text_encoder=True,
                                 **settings)  # fmt: skip


@pytest.mark.parametrize("type_name", ["SD3", "Flux", "FluxSchnell", "SD15", "SDXL"])
def test_gradient_checkpointing_is_on_for_flow_models_unless_turned_off(type_name):
    train_nodes, _ = _pack()
    dataset = {"manifest": str(REPO / "no_such_manifest.json")}
    settings = dict(steps=2, learning_rate=1e-4, lora_rank=4, batch_size=2, resolution=64, seed=0,
                    checkpoint_every=1, restart=False, train_text_encoder=False)  # fmt: skip

    def ckpt(**more):
        return train_nodes.train_config(_model(type_name), dataset, "popalign", "{}", "x", **settings, **more)

    flow = type_name in ("SD3", "Flux", "FluxSchnell")
    assert ckpt().gradient_checkpointing is flow  # a graph saved before the input existed: "auto"
    assert ckpt(gradient_checkpointing="auto").gradient_checkpointing is flow
    assert ckpt(gradient_checkpointing="on").gradient_checkpointing is True
    assert ckpt(gradient_checkpointing="off").gradient_checkpointing is False
    with pytest.raises(ValueError, match=r"gradient_checkpointing: 'yes' is not valid; valid: auto, on, off"):
        ckpt(gradient_checkpointing="yes")


# -------------------------------------------------------------------------------------------- the workflows
@pytest.fixture(scope="module")
def train_run(server):
    return server.run_prompt(swap_loaders(flux_api("flux_popalign_train")), timeout=600)


def test_flux_bias_audit_graph_runs_on_sd3(server):
    entry = server.run_prompt(swap_loaders(flux_api("flux_bias_audit")), timeout=300)
    chart = tn.ui_of(entry, "7", "popalign_chart")[0]
    assert chart["axis"] == "gender" and len(chart["shares"]) == 2
    assert len(server.output_images(entry, "8")) == 4  # 2 prompts x 2 neutral images, 64 x 64


def test_a_text_encoder_lora_on_sd3_fails_naming_the_input(server, train_run):
    """Right after the training run: ComfyUI's cache has every node up to the data set, so only the trainer runs."""
    wf = swap_loaders(flux_api("flux_popalign_train"))
    wf = {k: v for k, v in wf.items() if int(k) <= 10}
    wf["10"]["inputs"].update(train_text_encoder=True, lora_name="te_refused")
    with pytest.raises(RuntimeError, match=r"train_text_encoder=True: the MODEL is SD3 \(sd3\)"):
        server.run_prompt(wf, timeout=300)
    assert not (server.loras / "popalign" / "te_refused.safetensors").exists()


def test_trainer_on_sd3_saves_a_transformer_lora_the_stock_loader_applies(server, train_run):
    import numpy as np
    from PIL import Image

    lora = server.loras / "popalign" / "popalign_flux_lora.safetensors"
    keys = lora_keys(lora)
    assert keys and all(k.startswith("lora_transformer_") for k in keys), keys[:3]
    assert [r["step"] for r in tn.ui_of(train_run, "10", "popalign_loss")[0]["rows"]] == [1, 2]
    assert len(server.output_images(train_run, "26")) == 1  # the FluxGuidance preview of the trained MODEL
    assert tn.ui_of(train_run, "14", "popalign_chart")[0]["label"] == "after"
    # the stock LoraLoader applies the file: the same seeds give other images
    wf = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD3}},
          "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "strength_model": 1.0,
                "strength_clip": 1.0, "lora_name": "popalign/popalign_flux_lora.safetensors"}}}  # fmt: skip
    wf.update(_branch(100, ["1", 0]))
    wf.update(_branch(200, ["2", 0]))
    entry = server.run_prompt(wf, timeout=300)
    a = [np.asarray(Image.open(p), dtype=np.int16) for p in server.output_images(entry, "104")]
    b = [np.asarray(Image.open(p), dtype=np.int16) for p in server.output_images(entry, "204")]
    assert len(a) == len(b) == 2
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) > 0, "the LoRA does not change the images"
    log = server.log().lower()
    assert "lora key not loaded" not in log and "not loaded" not in log


@pytest.mark.slow  # ~50 s; the fast tier covers the node mapping and the core DAL on flow models
def test_flux_distributional_alignment_graph_runs_on_sd3(server):
    entry = server.run_prompt(swap_loaders(flux_api("flux_distributional_alignment")), timeout=600)
    keys = lora_keys(server.loras / "popalign" / "popalign_flux_dal_75_25.safetensors")
    assert keys and all(k.startswith("lora_transformer_") for k in keys), keys[:3]
    assert tn.ui_of(entry, "11", "popalign_chart")[0]["target"] == [0.75, 0.25]
    assert len(server.output_images(entry, "26")) == 1


@pytest.mark.slow
def test_interrupt_on_sd3_keeps_a_checkpoint_and_requeuing_resumes(server, train_run):
    import time

    wf = swap_loaders(flux_api("flux_popalign_train"))
    wf = {k: v for k, v in wf.items() if int(k) <= 10}
    wf["10"]["inputs"].update(lora_name="flow_interrupted", steps=400, checkpoint_every=1000, seed=11)
    runs = server.output_dir / "popalign" / "train"
    prompt_id, deadline, metrics = server.queue(wf), time.time() + 300, None
    while time.time() < deadline and metrics is None:
        found = sorted(runs.glob("flow_interrupted-*/metrics.jsonl"))
        metrics = found[0] if found and len(found[0].read_text().splitlines()) >= 3 else None
        time.sleep(0.1)
    assert metrics is not None, "training did not start"
    server.post("/interrupt", {})
    with pytest.raises(RuntimeError, match="interrupt|Interrupt"):
        server.wait(prompt_id, timeout=120)
    ckpts = sorted((metrics.parent / "checkpoints").glob("step_*"))
    step = int(ckpts[-1].name.split("_")[1]) if ckpts else 0
    assert 3 <= step < 400 and not (server.loras / "popalign" / "flow_interrupted.safetensors").exists()
    wf["10"]["inputs"]["steps"] = step  # re-queued: resumes from the checkpoint (and only re-exports)
    server.run_prompt(wf, timeout=300)
    assert json.loads((metrics.parent / "node_summary.json").read_text())["resumed_from"] == step
    assert all(k.startswith("lora_transformer_") for k in lora_keys(server.loras / "popalign" /
                                                                    "flow_interrupted.safetensors"))  # fmt: skip
