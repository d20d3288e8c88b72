"""Memory of LoRA training on a ComfyUI MODEL: the node pack's weight-sharing views against a second copy.

    python bench/comfy_train_memory.py              # full-size SD1.5 UNet (random weights, built here), CPU
    python bench/comfy_train_memory.py --tiny       # the tests' tiny SD1.5 checkpoint (smoke test of the script)
    python bench/comfy_train_memory.py --checkpoint path/to/model.safetensors   # a real SD1.5 / SDXL checkpoint
    python bench/comfy_train_memory.py --comfyui 0.3.75   # one ComfyUI of the test matrix (default: each in turn)

Each variant runs in its own ComfyUI child process (tests/comfy_support.py), inside ``torch.inference_mode()`` as a
node does: the checkpoint is loaded with the stock CheckpointLoaderSimple, the resident set size is read, then

- ``views`` (what the PopAlign LoRA Trainer node does): `adapter_from_comfy` (diffusers / transformers views that
  share ComfyUI's weight storage; inference tensors replaced one at a time), a LoRA (rank 8, UNet attention), 3
  PopAlign training steps;
- ``copy`` (the baseline: a trainer that loads its own model): the same checkpoint loaded again by the core's
  diffusers loader (`popalign_core.models.loading.load_model`), the same LoRA and steps.

Printed: the model's size (UNet + text encoder(s) + VAE as ComfyUI holds them), the RSS increase over the RSS after
ComfyUI's load (`+peak`, the process high-water mark, reset before the variant starts), that increase as a multiple of
the model's size, and views / copy. Target: views' +peak well below the model's size (no second copy).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def job(job: dict, log) -> dict:
    """Child process: one variant."""
    import importlib.util

    import torch

    import nodes as comfy_nodes

    sys.path.append(str(ROOT))
    spec = importlib.util.spec_from_file_location("pa_ca", ROOT / "nodes" / "comfy_adapter.py")
    ca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ca)
    from popalign_core.lora.files import LoraSpec, add_lora
    from popalign_core.train.objective import preference_loss

    model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(job["ckpt"])[:3]
    ca.load_for_training(model, clip.patcher, vae.patcher)  # as ComfyUI loads for sampling: counted in the base
    comfy_mods = [model.model.diffusion_model, clip.cond_stage_model, vae.first_stage_model]
    size = sum(t.numel() * t.element_size() for m in comfy_mods for t in m.state_dict().values())
    import gc

    gc.collect()
    base = _rss()
    _reset_hwm()
    with torch.inference_mode(False), torch.enable_grad():
        if job["variant"] == "views":
            adapter = ca.adapter_from_comfy(model, clip, vae)
        else:
            from popalign_core.models.loading import load_model

            adapter = load_model(job["path"], config_dir=job.get("config_dir"))
        setup = _rss()
        torch.manual_seed(0)
        add_lora(adapter, LoraSpec(rank=8, alpha=8.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0")))
        params = [p for p in adapter.trainable_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator().manual_seed(0)
        side = job["latent"]
        lat = torch.randn(4, adapter.latent_channels, side, side, generator=g)
        cond = adapter.encode_prompt(["a photo of a doctor"] * 4)
        losses = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            out = preference_loss(adapter, lat, cond.detach(), torch.tensor([1, 1, -1, -1]), "popalign", generator=g)
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.detach()))
    return {"model_bytes": size, "base_rss": base, "setup_rss": setup, "peak": _hwm(), "losses": losses}


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def build_full_sd15(path: Path, config_dir: Path) -> Path:
    """A full-size SD1.5 checkpoint (UNet 861M parameters, random weights, fp16) and its config folder."""
    import shutil

    import comfy_support as cs
    import torch
    from diffusers import UNet2DConditionModel

    from popalign_core.models.loading import FAMILY_CONFIG_DIRS
    from popalign_core.models.single_file import save_single_file

    shutil.copytree(FAMILY_CONFIG_DIRS["sd15"], config_dir, dirs_exist_ok=True)
    comps = cs.tiny_sd15_components(0)
    torch.manual_seed(0)
    comps["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(config_dir / "unet"))).eval()
    return save_single_file(comps, "sd15", path, dtype="fp16")


def main(argv=None) -> int:
    import comfy_support as cs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny SD1.5 checkpoint (smoke test)")
    ap.add_argument("--checkpoint", help="a real checkpoint (.safetensors); its diffusers config: --config-dir")
    ap.add_argument("--config-dir", help="diffusers config folder of --checkpoint (default: its family's shipped one)")
    ap.add_argument("--latent", type=int, default=8, help="latent side (8 = 64x64 images)")
    ap.add_argument("--comfyui", default=",".join(cs.matrix_versions()),
                    help="ComfyUI version(s) of the test matrix, comma-separated (default: %(default)s)")  # fmt: skip
    args = ap.parse_args(argv)
    versions = [v.strip() for v in args.comfyui.split(",") if v.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.checkpoint:
            ckpt, config_dir = Path(args.checkpoint).resolve(), args.config_dir
        elif args.tiny:
            ckpt = cs.build_tiny_sd15_checkpoint(tmp / "ckpt" / "tiny.safetensors", config_dir=tmp / "config")
            config_dir = str(tmp / "config")
        else:
            ckpt = build_full_sd15(tmp / "ckpt" / "sd15_random.safetensors", tmp / "config")
            config_dir = str(tmp / "config")
        for version in versions:
            comfy = cs.obtain_comfyui(version=version)
            rows = {}
            for variant in ("views", "copy"):
                res = cs.run_in_comfy(
                    f"{__file__}:job",
                    {"ckpt": ckpt.name, "path": str(ckpt), "config_dir": config_dir, "variant": variant,
                     "latent": args.latent},  # fmt: skip
                    comfy_dir=comfy, folders={"checkpoints": ckpt.parent}, timeout=3600,
                )  # fmt: skip
                rows[variant] = res
            _report(version, ckpt, rows)
    return 0


def _report(version: str, ckpt: Path, rows: dict) -> None:
    size = rows["views"]["model_bytes"]
    print(f"ComfyUI {version}; checkpoint: {ckpt.name}; model as ComfyUI holds it: {_gib(size)} GiB")
    print("| variant | RSS after ComfyUI load | after setup | peak | +peak | +peak / model | losses |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for v, r in rows.items():
        plus = r["peak"] - r["base_rss"]
        print(f"| {v} | {_gib(r['base_rss'])} | {_gib(r['setup_rss'])} | {_gib(r['peak'])} | {_gib(plus)} | "
              f"{plus / size:.2f}x | {', '.join(f'{x:.4f}' for x in r['losses'])} |")  # fmt: skip
    pv = rows["views"]["peak"] - rows["views"]["base_rss"]
    pc = rows["copy"]["peak"] - rows["copy"]["base_rss"]
    print(f"views / copy (+peak): {pv / pc:.2f}x")
    keys = ("model_bytes", "base_rss", "setup_rss", "peak")
    print(json.dumps({"comfyui": version, **{v: {k: r[k] for k in keys} for v, r in rows.items()}}))


if __name__ == "__main__":
    raise SystemExit(main())
