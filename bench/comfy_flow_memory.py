"""Memory of LoRA training on a ComfyUI FLUX MODEL: the node pack's weight-sharing views (nodes/comfy_flow.py).

    python bench/comfy_flow_memory.py                          # FLUX.1 width, 2 double + 2 single blocks, fp8
    python bench/comfy_flow_memory.py --layers 19 --single-layers 38 --compute bf16 --steps 1   # all of FLUX.1
    python bench/comfy_flow_memory.py --checkpointing off      # keep every block's activations (the node's "off")
    python bench/comfy_flow_memory.py --weight-dtype bf16 --layers 4
    python bench/comfy_flow_memory.py --variants views,copy    # also the second-copy baseline
    python bench/comfy_flow_memory.py --resolution 256 --steps 1   # quicker smoke run (numbers: smaller activations)

The model is a ComfyUI ``Flux`` built from ``comfy.supported_models.Flux`` at FLUX.1's full width (hidden 3072, 24
heads, RoPE axes [16, 56, 56], 16 latent channels, T5 width 4096, CLIP-pooled 768, guidance embedding) with
``--layers`` double and ``--single-layers`` single blocks (default: as many as double), random weights stored as
UNETLoader holds them: fp8_e4m3fn or bf16 with ComfyUI's manual cast to the compute dtype (``--compute``: fp32, what
ComfyUI casts to on CPU, or bf16), loaded under ``torch.inference_mode()`` (inference tensors, as ComfyUI's loaders
leave them). Each variant runs in its own ComfyUI 0.3.75 child process (tests/comfy_support.py) with
``MALLOC_MMAP_THRESHOLD_=65536`` (else glibc keeps freed blocks and RSS only grows). After the model is loaded, the RSS
is read (base), the high-water mark reset, then

- ``views`` (what the LoRA Trainer node does): `nodes.comfy_flow.flow_adapter_from_comfy(model, None, None, base)`
  (no CLIP: hand-made conditioning T5 [B, 256, 4096], pooled [B, 768], guidance 3.5): a diffusers
  FluxTransformer2DModel sharing ComfyUI's storage, Linear weights cast per layer (`CastLinear`);
- ``copy`` (the baseline: a trainer with its own model): the same weights loaded into a diffusers
  FluxTransformer2DModel in the compute dtype (the view is built first and dropped; its clone of the weights is
  freed before the copy is made),

then a LoRA (rank 8, the default flow targets), gradient checkpointing of the transformer's blocks as the LoRA
Trainer node turns it on for SD3 / FLUX (``--checkpointing on``, the default; each block's activations are recomputed
in backward, only its inputs are kept), AdamW and ``--steps`` PopAlign steps (batch 2 = one +/- pair,
64x64 latents at 512x512 = 1024 image tokens + 256 text tokens). Printed: the model's size as ComfyUI holds it, the
RSS increase over base at its peak (VmHWM), that as a multiple of the model's size (target for views: <= 0.15x),
step times, and the breakdown that can be counted: LoRA weights, gradients and AdamW state (exact), tensors saved
for backward during one step (autograd saved-tensor hooks, unique storages: the activations outside the
checkpointed blocks, i.e. all of them with ``--checkpointing off``), and the largest
single per-layer cast weight (the cast buffer a `CastLinear` holds at a time).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
TEXT_TOKENS, GUIDANCE, VARIANTS = 256, 3.5, ("views", "copy")


def flux_unet_config(layers: int, single: int | None = None) -> dict:
    """ComfyUI's unet_config of FLUX.1-dev with `layers` double and `single` (default: `layers`) single blocks."""
    single = layers if single is None else single
    return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=layers, depth_single_blocks=single,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)  # fmt: skip


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def build_flux(layers: int, weight_dtype: str, compute: str, seed: int = 0, single: int | None = None):
    """ModelPatcher of the ComfyUI Flux (module docstring); weights N(0, 1/fan_in), norm scales 1, filled per tensor
    in place under inference mode (no second copy of the model at any time)."""
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    wd = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16}[weight_dtype]
    cd = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute]
    cfg = comfy.supported_models.Flux(flux_unet_config(layers, single))
    cfg.set_inference_dtype(wd, None if cd == wd else cd)
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        model = cfg.get_model({})
        for k, p in model.diffusion_model.state_dict(keep_vars=True).items():
            if k.endswith("scale"):
                p.fill_(1.0)
            else:
                fan_in = p.shape[1] if p.dim() > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() == 1 else fan_in**-0.5))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _pack():
    """(comfy_adapter, comfy_flow) of the node pack, imported as the package pa_nodes (ComfyUI owns `nodes`)."""
    import comfy_support as cs

    return cs.node_module("comfy_adapter", ROOT), cs.node_module("comfy_flow", ROOT)


def _copy_adapter(model, ca, cf):
    """The baseline: a diffusers FluxTransformer2DModel holding its own compute-dtype copy of the weights."""
    import torch
    from diffusers import FluxTransformer2DModel

    view_adapter = cf.flow_adapter_from_comfy(model, None, None, ca)
    compute, noise = view_adapter.compute_dtype, view_adapter.noise_scheduler
    with torch.device("meta"):
        tr = FluxTransformer2DModel.from_config(view_adapter.transformer.config)
    sd = {k: v.detach().to(compute, copy=True) for k, v in view_adapter.transformer.state_dict().items()}
    del view_adapter
    tr.load_state_dict(sd, assign=True)
    del sd
    tr.eval().requires_grad_(False)
    return cf.ComfyFlowAdapter(tr, None, None, noise, "flux", compute=compute, guidance=cf.FLUX_GUIDANCE)


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while active (the step's activations)."""

    def __init__(self, exclude: set[int]):
        self.storages: dict[int, int] = {}
        self.exclude = exclude  # the model's and the LoRA's own storages: saved, but not new memory

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.exclude:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _largest_cast(transformer, compute) -> int:
    """Bytes of the largest stored-dtype Linear weight cast to `compute` (one such cast weight lives at a time)."""
    import torch

    sizes = [m.weight.numel() for m in transformer.modules()
             if isinstance(m, torch.nn.Linear) and m.weight.dtype != compute]  # fmt: skip
    return max(sizes, default=0) * torch.empty((), dtype=compute).element_size()


def job(job: dict, log) -> dict:
    """Child process: build the ComfyUI Flux, then one variant (module docstring)."""
    import torch

    from popalign_core.lora.files import LoraSpec, add_lora
    from popalign_core.models.adapter import Conditioning
    from popalign_core.train.objective import preference_loss

    ca, cf = _pack()
    model = build_flux(job["layers"], job["weight_dtype"], job["compute"], single=job["single_layers"])
    size = sum(t.numel() * t.element_size() for t in model.model.diffusion_model.state_dict().values())
    gc.collect()
    base = _status("VmRSS")
    _reset_hwm()
    out = {"model_bytes": size, "base_rss": base, "params": sum(p.numel() for p in model.model.parameters())}
    with torch.inference_mode(False), torch.enable_grad():
        t0 = time.perf_counter()
        if job["variant"] == "views":
            adapter = cf.flow_adapter_from_comfy(model, None, None, ca)
        else:
            adapter = _copy_adapter(model, ca, cf)
        gc.collect()
        out.update(setup_rss=_status("VmRSS"), setup_peak=_status("VmHWM"), setup_s=time.perf_counter() - t0)
        out["compute"], out["copied_bytes"] = str(adapter.dtype), getattr(adapter, "copied_bytes", 0)
        out["largest_cast_bytes"] = _largest_cast(adapter.transformer, adapter.dtype)
        torch.manual_seed(0)
        add_lora(adapter, LoraSpec(rank=8, alpha=8.0, unet_targets="default"))
        if job["checkpointing"] == "on":
            adapter.transformer.enable_gradient_checkpointing()
        params = [p for p in adapter.trainable_parameters() if p.requires_grad]
        out["lora_bytes"] = sum(p.numel() * p.element_size() for p in params)
        out["lora_dtypes"] = sorted({str(p.dtype) for p in params})
        opt = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator().manual_seed(0)
        b, side = 2, job["resolution"] // 8
        lat = torch.randn(b, 16, side, side, generator=g)
        cond = Conditioning(embeds=torch.randn(b, TEXT_TOKENS, 4096, generator=g) * 0.1,
                            pooled=torch.randn(b, 768, generator=g) * 0.1,
                            guidance=torch.full((b,), GUIDANCE)).to(adapter.dtype)  # fmt: skip
        out["lora_rss"] = _status("VmRSS")
        own = {t.untyped_storage().data_ptr() for t in adapter.transformer.state_dict(keep_vars=True).values()}
        steps = []
        for i in range(job["steps"]):
            _reset_hwm()
            saved = SavedBytes(own)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                res = preference_loss(adapter, lat, cond, torch.tensor([1, -1]), "popalign", generator=g)
            res.loss.backward()
            opt.step()
            steps.append({"s": time.perf_counter() - t0, "peak": _status("VmHWM"), "after": _status("VmRSS"),
                          "saved": saved.total, "loss": float(res.loss.detach())})  # fmt: skip
            if job.get("log"):
                with open(job["log"], "a") as f:
                    f.write(f"{job['variant']} step {i}: {json.dumps({**steps[-1], 'base': base})}\n")
        out["opt_state_bytes"] = sum(t.numel() * t.element_size() for s in opt.state.values()
                                     for t in s.values() if torch.is_tensor(t))  # fmt: skip
    out["steps"] = steps
    out["peak"] = max([out["setup_peak"]] + [s["peak"] for s in steps])
    return out


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def _report(args, rows: dict) -> None:
    r0 = next(iter(rows.values()))
    size = r0["model_bytes"]
    print(f"ComfyUI Flux, {args.layers}+{args.single_layers} blocks, {r0['params'] / 1e9:.3f}B params, weights "
          f"{args.weight_dtype}, compute {r0['compute']}, {args.resolution}x{args.resolution}, batch 2, "
          f"{args.steps} PopAlign steps, gradient checkpointing {args.checkpointing}; model as ComfyUI holds it: "
          f"{_gib(size)} GiB")  # fmt: skip
    print("| variant | base RSS | after setup | +setup | +peak | +peak / model | step s | losses |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for v, r in rows.items():
        plus = r["peak"] - r["base_rss"]
        times = ", ".join(f"{s['s']:.1f}" for s in r["steps"])
        losses = ", ".join(f"{s['loss']:.4f}" for s in r["steps"])
        print(f"| {v} | {_gib(r['base_rss'])} | {_gib(r['setup_rss'])} | {_gib(r['setup_rss'] - r['base_rss'])} | "
              f"{_gib(plus)} | {plus / size:.3f}x | {times} | {losses} |")  # fmt: skip
    for v, r in rows.items():
        lora = r["lora_bytes"]
        print(f"{v}: GiB: +setup {_gib(r['setup_rss'] - r['base_rss'])} (copied modulation "
              f"{r['copied_bytes'] / 2**20:.1f} MiB); LoRA {lora / 2**20:.1f} MiB {r['lora_dtypes']} + grads "
              f"{lora / 2**20:.1f} MiB + AdamW {r['opt_state_bytes'] / 2**20:.1f} MiB; saved for backward per step "
              f"{', '.join(_gib(s['saved']) for s in r['steps'])}; largest cast weight "
              f"{r['largest_cast_bytes'] / 2**20:.1f} MiB; RSS after each step "
              f"{', '.join(_gib(s['after'] - r['base_rss']) for s in r['steps'])} over base")  # fmt: skip
    if set(rows) == set(VARIANTS):
        pv, pc = (rows[v]["peak"] - rows[v]["base_rss"] for v in VARIANTS)
        print(f"views / copy (+peak): {pv / pc:.3f}x")
    print(json.dumps({v: {k: r[k] for k in r if k != "log"} for v, r in rows.items()}))


def main(argv=None) -> int:
    import comfy_support as cs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="flux", choices=["flux"], help="flow family (SD3: not yet)")
    ap.add_argument("--layers", type=int, default=2, help="double blocks (FLUX.1: 19)")
    ap.add_argument("--single-layers", type=int, help="single blocks (FLUX.1: 38; default: as many as --layers)")
    ap.add_argument("--checkpointing", default="on", choices=["on", "off"],
                    help="gradient checkpointing of the blocks (the LoRA Trainer node: on for FLUX)")  # fmt: skip
    ap.add_argument("--weight-dtype", default="fp8", choices=["fp8", "bf16"], help="stored weights (UNETLoader)")
    ap.add_argument("--compute", default="fp32", choices=["fp32", "bf16"], help="ComfyUI's manual-cast dtype")
    ap.add_argument("--resolution", type=int, default=512, help="image side (latent = side / 8)")
    ap.add_argument("--steps", type=int, default=3, help="PopAlign training steps")
    ap.add_argument("--variants", default="views", help="comma-separated: views, copy (default: %(default)s)")
    ap.add_argument("--log", help="append each step's numbers to this file as they come")
    args = ap.parse_args(argv)
    args.single_layers = args.layers if args.single_layers is None else args.single_layers
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise SystemExit(f"--variants: {bad or variants} not valid; valid: {', '.join(VARIANTS)}")
    if min(args.layers, args.single_layers, args.steps) < 1 or args.resolution % 16:
        raise SystemExit(f"--layers {args.layers} / --single-layers {args.single_layers} / --steps {args.steps} must "
                         f"be >= 1, --resolution "
                         f"{args.resolution} a multiple of 16")  # fmt: skip
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the child: freed memory goes back to the OS
    comfy = cs.obtain_comfyui(version="0.3.75")
    rows = {}
    for v in variants:
        job_ = {"variant": v, "layers": args.layers, "single_layers": args.single_layers, "log": args.log,
                "weight_dtype": args.weight_dtype, "compute": args.compute, "resolution": args.resolution,
                "steps": args.steps, "checkpointing": args.checkpointing}  # fmt: skip
        rows[v] = cs.run_in_comfy(f"{__file__}:job", job_, comfy_dir=comfy, timeout=7200)
    _report(args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
