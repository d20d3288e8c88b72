"""Benchmark: peak memory of adjusted direct finetuning (one generation with gradient + backward) with and without
gradient checkpointing, and with micro-batches, against plain sampling without gradient (same images).

    python bench/dft_memory.py                               # CPU: tiny SD1.5-shaped UNet, 128 px, 4 images
    python bench/dft_memory.py --unet full --resolution 256  # full-size SD1.5 UNet (slow on CPU: minutes)
    python bench/dft_memory.py --device cuda --unet full --resolution 512 --batch 4   # lent GPU

Variants (each in its own process, so that peaks do not mix):
  sample      `dft.generate` under no_grad (the floor: weights + one UNet call's activations)
  dft         gradient "a1", checkpointing off: every UNet call's activations are kept for the backward pass
  dft_ckpt    gradient "a1", checkpointing on: each UNet call (and the VAE decoder) is recomputed in backward
  dft_ckpt_mb checkpointing on, micro-batches of 1 image (generate + backward per image, gradients accumulated)

Memory: on CPU the growth of the resident set over the RSS after setup (VmHWM reset through /proc/self/clear_refs
right before the measured call); on CUDA torch.cuda.max_memory_allocated over the allocation after setup. Ratios
are printed against `dft` (the unadjusted memory use). Targets: dft_ckpt <= 0.5x dft, dft_ckpt_mb <= dft_ckpt.
The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("sample", "dft", "dft_ckpt", "dft_ckpt_mb")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _adapter(args):
    import torch

    from popalign_core.models.tiny import get_dummy_adapter

    ad = get_dummy_adapter("sd15", seed=0)
    if args.unet == "full":
        from diffusers import UNet2DConditionModel

        cfg = UNet2DConditionModel.load_config(str(ROOT / "popalign_core" / "configs" / "sd15" / "unet"))
        cfg["cross_attention_dim"] = ad.text_encoders[0].config.hidden_size  # the tiny text encoder's width
        torch.manual_seed(0)
        ad.unet = UNet2DConditionModel.from_config(cfg)
    ad.unet.to(args.device)
    ad.vae.to(args.device)
    ad.text_encoders[0].to(args.device)
    return ad


def child(args) -> dict:
    import torch

    from popalign_core.dal import dft
    from popalign_core.lora.files import LoraSpec, add_lora
    from popalign_core.models import sampling

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ad = _adapter(args)
    for m in (ad.unet, ad.vae, *ad.text_encoders):
        m.requires_grad_(False)
    add_lora(ad, LoraSpec(rank=8, alpha=8.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0")))
    params = [p for p in ad.unet.parameters() if p.requires_grad]
    reqs = [(f"a photo of a person {k}", k) for k in range(args.batch)]
    sc = sampling.SamplerConfig(steps=args.steps, guidance_scale=args.guidance, height=args.resolution,
                                width=args.resolution)  # fmt: skip
    noise = sampling.initial_noise(ad, reqs, sc)
    prompts = [p for p, _ in reqs]
    ckpt = args.variant in ("dft_ckpt", "dft_ckpt_mb")
    cfg = dft.DFTConfig(steps=args.steps, guidance_scale=args.guidance, checkpointing=ckpt, height=args.resolution,
                        width=args.resolution)  # fmt: skip
    w = torch.randn(args.batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(1))
    cuda = args.device.startswith("cuda")

    def work():
        if args.variant == "sample":
            with torch.no_grad():
                dft.generate(ad, prompts, noise, cfg)
            return
        mb = 1 if args.variant == "dft_ckpt_mb" else args.batch
        for s in range(0, args.batch, mb):
            img = dft.generate(ad, prompts[s : s + mb], noise[s : s + mb], cfg)
            ((img * w[s : s + mb].to(img.device)).sum() / w.numel()).backward()  # the same loss in pieces

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kib("VmRSS") * 1024
        reset = _reset_peak()
    t0 = time.perf_counter()
    work()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (_rss_kib("VmHWM") * 1024 - base) if reset else float("nan")
    grad_norm = float(sum(float(p.grad.norm()) ** 2 for p in params if p.grad is not None) ** 0.5)
    return {"variant": args.variant, "peak_mib": peak / 2**20, "seconds": time.perf_counter() - t0,
            "grad_norm": grad_norm, "setup_mib": base / 2**20}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unet", choices=("tiny", "full"), default="tiny", help="tiny SD1.5-shaped UNet or full size")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="images generated with gradient")
    ap.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.variant:
        print(json.dumps(child(a)))
        return 0
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("CUDA is not available: skipped")
            return 0
    rows = {}
    for v in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            v,
            "--unet",
            a.unet,
            "--resolution",
            str(a.resolution),
            "--batch",
            str(a.batch),
            "--steps",
            str(a.steps),
            "--guidance",
            str(a.guidance),
            "--device",
            a.device,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)  # fmt: skip
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            rows[v] = {"variant": v, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
            continue
        rows[v] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = rows.get("dft", {}).get("peak_mib")
    for v, r in rows.items():
        if "error" in r:
            print(f"{v:12s} ERROR {r['error']}")
            continue
        r["ratio_vs_dft"] = round(r["peak_mib"] / ref, 3) if ref else None
        print(f"{v:12s} +peak {r['peak_mib']:9.1f} MiB | {r['ratio_vs_dft']}x dft | {r['seconds']:7.2f} s | "
              f"grad norm {r['grad_norm']:.6g}", flush=True)  # fmt: skip
    ok = None
    if all("error" not in rows[v] for v in ("dft", "dft_ckpt", "dft_ckpt_mb")):
        ok = {"dft_ckpt<=0.5x": rows["dft_ckpt"]["ratio_vs_dft"] <= 0.5,
              "mb<=ckpt": rows["dft_ckpt_mb"]["peak_mib"] <= rows["dft_ckpt"]["peak_mib"]}  # fmt: skip
        print(f"targets: {ok}")
    print(json.dumps({"settings": vars(a) | {"variant": None}, "results": rows, "targets": ok}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
