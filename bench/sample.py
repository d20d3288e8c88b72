"""Benchmark: population runs (`pop_sample.sample_population`) vs a per-image loop over the diffusers pipeline.

    python bench/sample.py                          # CPU: the toy world and the SD1.5-shaped tiny model
    python bench/sample.py --model toyworld --images 256 --batch-size 128
    python bench/sample.py --device cuda --model /path/to/sd15.safetensors --images 64 --steps 25   # lent GPU

Both sides make the same number of images with the same model weights, sampler (DDIM, same steps and guidance)
and output (8-bit PNG files on disk):
- `loop`: the user's obvious script: for each image, one call of the model's diffusers pipeline
  (`pipe(prompt, num_inference_steps=..., guidance_scale=..., generator=torch.Generator().manual_seed(seed))`) and a
  PNG save;
- `population`: `sample_population` over the same jobs (batched seeded sampling, PNG + manifest row per image,
  fsynced per batch).
One run each (the loop first), wall time, images/s, and the ratio population/loop (target >= 3x on the toy model on
CPU). The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_RATIO = 3.0  # population / loop, toy model, CPU


def _pipeline(model: str, device: str, dtype: str):
    """(diffusers pipeline, adapter over the same modules, model id)."""
    from popalign_core.models.diffusers_adapter import DiffusersAdapter

    if model == "tiny-sd15":
        from popalign_core.models.tiny import get_dummy_pipeline

        pipe, family = get_dummy_pipeline("sd15", seed=0), "sd15"
    else:
        from popalign_core.models.loading import load_pipeline

        pipe, family = load_pipeline(model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), DiffusersAdapter.from_pipeline(pipe, family=family)


def _jobs(n: int) -> list[dict]:
    roles = ("baker", "pilot", "farmer", "guard")
    forms = ("round", "angular")
    jobs = []
    for k in range(n):
        role, form = roles[k % len(roles)], forms[(k // len(roles)) % 2]
        art = "an" if form[0] in "aeiou" else "a"
        jobs.append({"prompt": f"a photo of {art} {form} {role}", "index": k, "neutral": f"a photo of a {role}",
                     "identity": {"form": form}, "population": "winning"})  # fmt: skip
    return jobs


def bench(model: str, images: int, steps: int, guidance: float, batch_size: int, device: str, dtype: str) -> dict:
    import torch

    from popalign_core.models.sampling import SamplerConfig, derive_seed, resolve_size
    from popalign_core.population.sample import image_name, sample_population

    pipe, adapter = _pipeline(model, device, dtype)
    jobs = _jobs(images)
    cfg = SamplerConfig(steps=steps, guidance_scale=guidance, scheduler="ddim", seed=0, batch_size=batch_size)
    h, w = resolve_size(adapter, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "loop").mkdir()
        # warm-up: one image each way (lazy inits, allocator)
        pipe(jobs[0]["prompt"], num_inference_steps=2, guidance_scale=guidance, height=h, width=w)
        t = time.perf_counter()
        for j in jobs:
            g = torch.Generator(device="cpu").manual_seed(derive_seed(0, j["prompt"], j["index"]))
            img = pipe(j["prompt"], num_inference_steps=steps, guidance_scale=guidance, generator=g, height=h,
                       width=w).images[0]  # fmt: skip
            img.save(tmp / "loop" / image_name(j["prompt"], j["index"]))
        loop_s = time.perf_counter() - t
        t = time.perf_counter()
        s = sample_population(adapter, jobs, tmp / "pop", cfg, model, model_hash="bench")
        pop_s = time.perf_counter() - t
        assert s["done"] == images
    return {
        "model": model,
        "device": device,
        "images": images,
        "steps": steps,
        "guidance": guidance,
        "batch_size": batch_size,
        "loop_s": round(loop_s, 2),
        "population_s": round(pop_s, 2),
        "loop_images_per_s": round(images / loop_s, 3),
        "population_images_per_s": round(images / pop_s, 3),
        "ratio": round(loop_s / pop_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=None,
                    help="toyworld, tiny-sd15, or a checkpoint / diffusers folder (repeatable; default: toyworld and "
                         "tiny-sd15)")  # fmt: skip
    ap.add_argument("--images", type=int, default=128, help="images per side (default: 128)")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps (default: 25)")
    ap.add_argument("--guidance", type=float, default=2.0, help="CFG scale (default: 2)")
    ap.add_argument("--batch-size", type=int, default=64, help="population run batch size (default: 64)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", help="fp32, fp16, bf16 (checkpoints only)")
    a = ap.parse_args(argv)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    rows = []
    for m in a.model or ["toyworld", "tiny-sd15"]:
        r = bench(m, a.images, a.steps, a.guidance, a.batch_size, a.device, a.dtype)
        rows.append(r)
        print(f"{m:>12}: loop {r['loop_images_per_s']:8.2f} img/s | population {r['population_images_per_s']:8.2f} "
              f"img/s | ratio {r['ratio']:.2f}x", flush=True)  # fmt: skip
    toy = next((r for r in rows if r["model"] == "toyworld"), None)
    verdict = None
    if toy is not None and a.device == "cpu":
        verdict = "PASS" if toy["ratio"] >= TARGET_RATIO else "FAIL"
        print(f"toy world ratio {toy['ratio']:.2f}x (target >= {TARGET_RATIO}x): {verdict}")
    print(json.dumps({"results": rows, "toy_verdict": verdict, "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
