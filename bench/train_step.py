"""Benchmark: one LoRA DPO / PopAlign training step, adapter-disabled reference vs a frozen UNet copy as reference.

    python bench/train_step.py                      # CPU, full-size SD1.5 UNet (random weights), 64x64, 2 pairs
    python bench/train_step.py --device cuda --family sdxl --resolution 1024 --dtype bf16   # lent GPU only
    python bench/train_step.py --family sd3 --layers 4 --dtype bf16   # SD3.5-medium-wide transformer, 4 blocks
    python bench/train_step.py --family flux --layers 1 --dtype bf16  # FLUX.1-dev-wide, 1 double + 1 single block

Variants (same seeded random weights, LoRA, batch, noise and timesteps):
- `adapter`: LoRA (rank 8 on attention) on the UNet; the reference is the same UNet with its adapters disabled
  (`DiffusersAdapter.reference()` with `reference_unet=None`) - no weight copy.
- `copy`: the same LoRA on the trained UNet; the reference is a frozen deep copy of the base UNet passed as
  `DiffusersAdapter(..., reference_unet=...)` (what a trainer without adapter toggling would hold).

Each (variant, loss) runs in its own process (this script re-invokes itself with `--variant ... --loss ...`), so the
peak memory of one cannot leak into another. A step is the trainer's: zero_grad, `preference_loss` (noise, trained
forward, reference forward under no_grad), backward, AdamW step. 2 warm-up steps, then the median of >= 5 timed
steps. Memory on CPU: resident set size - the process-lifetime peak (`getrusage(RUSAGE_SELF).ru_maxrss`), its
increment over the RSS right before the UNet is built (the number the ratio uses), the RSS after setup, and the peak
during the timed steps alone (VmHWM after resetting it through /proc/self/clear_refs, where allowed). On CUDA:
`torch.cuda.max_memory_allocated` (process lifetime, and the timed steps alone after a reset).

The parent prints a table, the ratios adapter/copy (targets: memory <= 0.6x, time <= 1.05x; copy/adapter is printed
too) with PASS/FAIL, and one JSON line at the end. The UNet is full size (from popalign_core/configs/<family>/unet);
text conditioning is random (no real text encoder / VAE: the tiny seeded ones from popalign_core.models.tiny fill the
adapter's slots and are never run). Flow families (sd3, flux): the transformer of popalign_core/configs/<family>/
transformer at full width; `--layers N` keeps N blocks (FLUX: N double and N single blocks) so that it fits a CPU
(full FLUX.1 is 11.9 B parameters); the variants are `FlowAdapter` with the adapter-off reference or a frozen copy
(`reference_transformer`), velocity targets, logit-normal timesteps.
With --dtype bf16/fp16 the frozen base weights are cast to that dtype, the LoRA
weights stay fp32 and the step runs under autocast (the diffusers LoRA training scripts' recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("adapter", "copy")
LOSSES = ("dpo", "popalign")
FLOW = ("sd3", "flux")
TARGET_MEMORY_RATIO = 0.6  # adapter / copy
TARGET_TIME_RATIO = 1.05  # adapter / copy
RESULT_PREFIX = "BENCH_RESULT "
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
GIB = 1024**3


# ------------------------------------------------------------------------------------------------ memory (CPU)
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return _maxrss_bytes()  # no /proc (macOS): the best we have


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ one variant (child)
def _build_transformer(args, device):
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if args.family == "sd3" else FluxTransformer2DModel
    if args.tiny:
        from popalign_core.models.tiny_flow import tiny_transformer_config

        config = tiny_transformer_config(args.family)
    else:
        config = dict(cls.load_config(str(ROOT / "popalign_core" / "configs" / args.family / "transformer")))
    if args.layers:
        config["num_layers"] = args.layers
        if args.family == "flux":
            config["num_single_layers"] = args.layers
    torch.manual_seed(args.seed)
    with torch.device(device):
        net = cls.from_config(config)
    return net.to(device=device, dtype=getattr(torch, _DTYPES[args.dtype]))


def _flow_batch(args, net, device, dtype, g):
    """Random conditioning of the shapes the flow transformer takes (77 CLIP + 77 T5 tokens for SD3, 256 T5 tokens
    for FLUX), with FLUX.1-dev's guidance input."""
    import torch

    from popalign_core.models.adapter import Conditioning

    b, cfg = 2 * args.pairs, net.config
    seq = 154 if args.family == "sd3" else 256
    embeds = torch.randn(b, seq, cfg.joint_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(b, cfg.pooled_projection_dim, generator=g).to(device, dtype)
    guidance = torch.full((b,), 3.5, device=device) if getattr(cfg, "guidance_embeds", False) else None
    return Conditioning(embeds=embeds, pooled=pooled, guidance=guidance)


def _build_flow_adapter(args, device):
    import copy

    from popalign_core.models.flow_adapter import FlowAdapter
    from popalign_core.models.tiny_flow import encoders_of, get_dummy_flow_components

    comps = get_dummy_flow_components(args.family, seed=args.seed)
    del comps["transformer"]
    encs, toks = encoders_of(comps, args.family)
    net = _build_transformer(args, device)
    ref = copy.deepcopy(net).requires_grad_(False).eval() if args.variant == "copy" else None
    return FlowAdapter(net, comps["vae"], encs, toks, comps["scheduler"], args.family, reference_transformer=ref)


def _build_unet(args, device):
    import torch
    from diffusers import UNet2DConditionModel

    if args.tiny:  # smoke test of the script itself: numbers are meaningless
        from popalign_core.models.tiny import tiny_unet_config

        config = tiny_unet_config(args.family)
    else:
        config = UNet2DConditionModel.load_config(str(ROOT / "popalign_core" / "configs" / args.family / "unet"))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        with torch.device(device):  # initialise on the GPU (same seed for every variant)
            unet = UNet2DConditionModel.from_config(config)
    else:
        unet = UNet2DConditionModel.from_config(config)
    return unet.to(device=device, dtype=getattr(torch, _DTYPES[args.dtype]))


def run_variant(args) -> dict:
    import copy

    import torch
    from diffusers import DDPMScheduler

    from popalign_core.lora.files import LoraSpec, add_lora
    from popalign_core.models.adapter import Conditioning
    from popalign_core.models.diffusers_adapter import DiffusersAdapter
    from popalign_core.models.tiny import get_dummy_components, tiny_scheduler_config
    from popalign_core.train.objective import preference_loss

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, _DTYPES[args.dtype])

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def mem_now() -> int:
        return torch.cuda.memory_allocated(device) if cuda else _rss_bytes()

    flow = args.family in FLOW
    if not flow:  # tiny seeded VAE / text encoders / tokenizers only fill the adapter's slots; they are never run
        comps = get_dummy_components(args.family, seed=args.seed)
        encs = [comps["text_encoder"]] + ([comps["text_encoder_2"]] if args.family == "sdxl" else [])
        toks = [comps["tokenizer"]] + ([comps["tokenizer_2"]] if args.family == "sdxl" else [])
        del comps["unet"]
    sync()
    mem_before = mem_now()
    t0 = time.perf_counter()

    if flow:
        adapter = _build_flow_adapter(args, device)
        unet = adapter.transformer
    else:
        unet = _build_unet(args, device)
        reference_unet = None
        if args.variant == "copy":
            reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        adapter = DiffusersAdapter(
            unet,
            comps["vae"],
            encs,
            toks,
            DDPMScheduler.from_config(tiny_scheduler_config(args.family)),
            args.family,
            reference_unet=reference_unet,
        )
    torch.manual_seed(args.seed + 1)  # same LoRA init in both variants
    counts = add_lora(adapter, LoraSpec(rank=args.rank, alpha=float(args.rank)))
    params = [p for p in adapter.trainable_parameters() if p.requires_grad]
    if dtype != torch.float32:
        for p in params:  # LoRA weights (the trained ones) in fp32, frozen base in `dtype`
            p.data = p.data.float()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4)

    # the batch: 2 pairs = [+1, +1, -1, -1] (k-th winner paired with k-th loser), random text conditioning
    b = 2 * args.pairs
    side = args.resolution // 8
    g = torch.Generator().manual_seed(args.seed + 2)
    latents = torch.randn(b, adapter.latent_channels, side, side, generator=g).to(device, dtype)
    cfg = unet.config
    if flow:
        cond = _flow_batch(args, unet, device, dtype, g)
    else:
        embeds = torch.randn(b, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
        pooled = time_ids = None
        if args.family == "sdxl":  # pooled text embeds: what the add-embedding takes besides the 6 time ids
            pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            pooled = torch.randn(b, pooled_dim, generator=g).to(device, dtype)
            r = args.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=dtype, device=device).repeat(b, 1)
        cond = Conditioning(embeds=embeds, pooled=pooled, time_ids=time_ids)
    label = torch.tensor([1.0] * args.pairs + [-1.0] * args.pairs, device=device)
    step_gen = torch.Generator().manual_seed(args.seed + 3)  # noise and timesteps: same sequence in every variant

    sync()
    setup_s = time.perf_counter() - t0
    mem_setup = mem_now()
    peak_setup = torch.cuda.max_memory_allocated(device) if cuda else _maxrss_bytes()

    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if dtype != torch.float32
        else torch.autocast(device_type=device.type, enabled=False)
    )

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = preference_loss(adapter, latents, cond, label, args.loss, generator=step_gen)
        out.loss.backward()
        opt.step()
        sync()
        return float(out.loss)

    losses, times, cpu_times = [], [], []
    for _ in range(args.warmup):
        losses.append(step())
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        window_reset = True
    else:
        window_reset = _reset_hwm()
    for _ in range(args.steps):
        ts, cs = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - ts)
        cpu_times.append(time.process_time() - cs)
    if cuda:
        peak_steps = torch.cuda.max_memory_allocated(device)
        peak_process = max(peak_setup, peak_steps)  # the counter was reset after warm-up
    else:
        hwm = _status_kib("VmHWM")
        peak_steps = hwm * 1024 if (window_reset and hwm is not None) else None
        peak_process = _maxrss_bytes()
    return {
        "variant": args.variant,
        "loss": args.loss,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "family": args.family,
        "resolution": args.resolution,
        "dtype": args.dtype,
        "batch": b,
        "lora_layers": counts.get("unet", counts.get("transformer", 0)),
        "lora_params": sum(p.numel() for p in params),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "torch_threads": torch.get_num_threads(),
        "memory_kind": "cuda_allocated" if cuda else "rss",
        "mem_before_build": mem_before,
        "mem_setup": mem_setup,
        "mem_peak_process": peak_process,
        "mem_peak_increment": peak_process - mem_before,
        "mem_peak_steps": peak_steps,
        "setup_s": setup_s,
        "step_times_s": times,
        "median_step_s": statistics.median(times),
        "step_cpu_s": cpu_times,  # CPU time of this process (all threads): less sensitive to a shared machine
        "median_step_cpu_s": statistics.median(cpu_times),
        "losses": losses,
    }


def _child_main(args) -> int:
    try:
        res = run_variant(args)
    except Exception as exc:  # an OOM (or any failure) is a result the parent reports, not a crash of the bench
        import torch

        oom = isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()
        res = {"variant": args.variant, "loss": args.loss, "error": f"{type(exc).__name__}: {exc}"[:500], "oom": oom}
    print(RESULT_PREFIX + json.dumps(res), flush=True)
    return 0 if "error" not in res else 1


# ------------------------------------------------------------------------------------------------ parent
def _forwarded(args) -> list[str]:
    out = [
        "--device", args.device, "--family", args.family, "--resolution", str(args.resolution),
        "--dtype", args.dtype, "--pairs", str(args.pairs), "--rank", str(args.rank), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--seed", str(args.seed), "--layers", str(args.layers),
    ]  # fmt: skip
    if args.tiny:
        out.append("--tiny")
    if args.gradient_checkpointing:
        out.append("--gradient-checkpointing")
    return out


def _run_child(args, variant: str, loss: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--loss", loss, *_forwarded(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"variant": variant, "loss": loss, "error": f"exit code {proc.returncode}: {tail}", "oom": False}


def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def _ratio(a, b):
    return None if (a is None or b is None or not b) else a / b


def _fmt_ratio(r) -> str:
    return "-" if r is None else f"{r:.3f}x"


def _parent_main(args) -> int:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench/train_step.py: --device {args.device} asked for, but CUDA is not available here; nothing run.")
        return 0
    wall0 = time.perf_counter()
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    side = args.resolution // 8
    print(
        f"train step bench: {'TINY (smoke) ' if args.tiny else 'full-size '}{args.family} "
        f"{'transformer' + (f' ({args.layers} blocks)' if args.layers else '') if args.family in FLOW else 'UNet'}, "
        "random weights, "
        f"{args.resolution}x{args.resolution} ({side}x{side} latents), {args.pairs} pairs (batch {2 * args.pairs}), "
        f"LoRA rank {args.rank} on attention, {args.dtype}, device {args.device}; {args.warmup} warm-up + "
        f"{args.steps} timed steps per variant, each variant in its own process",
        flush=True,
    )
    results = []
    for loss in args.losses:
        for variant in args.variants:
            t = time.perf_counter()
            res = _run_child(args, variant, loss)
            res["process_wall_s"] = time.perf_counter() - t
            results.append(res)
            msg = res.get("error") or f"median step {res['median_step_s']:.3f} s"
            print(f"  ran {loss}/{variant} in {res['process_wall_s']:.1f} s: {msg}", flush=True)

    cpu = not args.device.startswith("cuda")
    mem_name = "RSS" if cpu else "CUDA allocated"
    print()
    print(f"memory: {mem_name}, GiB. before = before the UNet is built; setup = after model, LoRA, optimizer;")
    print("peak = process lifetime peak; +peak = peak - before (used for the ratio); steps = peak in the timed steps")
    print("step times: wall seconds of the timed steps (median, min, max); cpu s = median CPU seconds (all threads)")
    hdr = (
        f"{'loss':<9} {'variant':<8} {'before':>7} {'setup':>7} {'peak':>7} {'+peak':>7} {'steps':>7} "
        f"{'median s':>9} {'min s':>7} {'max s':>7} {'cpu s':>7}  losses (first, last)"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if "error" in r:
            print(f"{r['loss']:<9} {r['variant']:<8} {'OOM' if r.get('oom') else 'FAILED'}: {r['error'][:200]}")
            continue
        ts = r["step_times_s"]
        print(
            f"{r['loss']:<9} {r['variant']:<8} {_gib(r['mem_before_build']):>7} {_gib(r['mem_setup']):>7} "
            f"{_gib(r['mem_peak_process']):>7} {_gib(r['mem_peak_increment']):>7} {_gib(r['mem_peak_steps']):>7} "
            f"{r['median_step_s']:>9.3f} {min(ts):>7.3f} {max(ts):>7.3f} {r['median_step_cpu_s']:>7.2f}  "
            f"{r['losses'][0]:.6g}, {r['losses'][-1]:.6g}"
        )

    by = {(r["loss"], r["variant"]): r for r in results}
    ratios, all_pass = {}, True
    print()
    print(
        f"ratios adapter/copy (targets: memory <= {TARGET_MEMORY_RATIO}x on +peak, time <= {TARGET_TIME_RATIO}x on "
        "the median step); copy/adapter in brackets"
    )
    for loss in args.losses:
        a, c = by.get((loss, "adapter")), by.get((loss, "copy"))
        if a is None or c is None:
            continue
        entry = {"error": None}
        if "error" in a or "error" in c:
            entry["error"] = "; ".join(f"{r['variant']}: {r['error'][:200]}" for r in (a, c) if "error" in r)
            # the adapter variant fitting where the copy did not is the memory win, but no ratio can be given
            entry["pass"] = False
            all_pass = False
            print(f"  {loss:<9} no ratio: {entry['error']}")
            ratios[loss] = entry
            continue
        mem = _ratio(a["mem_peak_increment"], c["mem_peak_increment"])
        mem_proc = _ratio(a["mem_peak_process"], c["mem_peak_process"])
        mem_steps = _ratio(a["mem_peak_steps"], c["mem_peak_steps"])
        tim = _ratio(a["median_step_s"], c["median_step_s"])
        mem_ok = mem is not None and mem <= TARGET_MEMORY_RATIO
        time_ok = tim is not None and tim <= TARGET_TIME_RATIO
        dl = max(abs(x - y) for x, y in zip(a["losses"], c["losses"]))
        t_min = _ratio(min(a["step_times_s"]), min(c["step_times_s"]))
        t_cpu = _ratio(a["median_step_cpu_s"], c["median_step_cpu_s"])
        spread = max(max(r["step_times_s"]) / min(r["step_times_s"]) for r in (a, c))
        entry = {
            "memory_increment": mem,
            "memory_process_peak": mem_proc,
            "memory_steps_peak": mem_steps,
            "time_median": tim,
            "time_min": t_min,
            "time_cpu_median": t_cpu,
            "time_spread_max_over_min": spread,
            "memory_pass": mem_ok,
            "time_pass": time_ok,
            "pass": mem_ok and time_ok,
            "max_abs_loss_diff": dl,
        }
        all_pass &= entry["pass"]
        ratios[loss] = entry
        inv = _ratio(c["mem_peak_increment"], a["mem_peak_increment"])
        inv_t = _ratio(c["median_step_s"], a["median_step_s"])
        print(
            f"  {loss:<9} memory +peak {_fmt_ratio(mem)} [{_fmt_ratio(inv)}] {'PASS' if mem_ok else 'FAIL'}   "
            f"time {_fmt_ratio(tim)} [{_fmt_ratio(inv_t)}] {'PASS' if time_ok else 'FAIL'}   "
            f"(process peak {_fmt_ratio(mem_proc)}, timed-steps peak {_fmt_ratio(mem_steps)}; "
            f"max |loss_adapter - loss_copy| over the steps {dl:.2e})"
        )
        print(
            f"  {'':<9} time, informational: fastest step {_fmt_ratio(t_min)}, median CPU time {_fmt_ratio(t_cpu)}; "
            f"slowest/fastest timed step within a variant: {spread:.2f}"
            + ("  <- noisy: the time verdict is not reliable" if spread > 1.5 else "")
        )
    wall = time.perf_counter() - wall0
    load = f"; load average (1 min) at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}" if load0 else ""
    print(f"\nwall time of the whole bench: {wall:.1f} s{load} ({os.cpu_count()} CPUs)")
    if cpu:
        print(
            f"note (CPU): RSS is dominated by the weights ({args.dtype} UNet) - activations at these sizes are small, "
            "so the memory ratio is mostly 'one UNet vs two'; times are noisy on a shared machine."
        )
    summary = {
        "bench": "train_step",
        "device": args.device,
        "family": args.family,
        "resolution": args.resolution,
        "dtype": args.dtype,
        "pairs": args.pairs,
        "rank": args.rank,
        "steps": args.steps,
        "warmup": args.warmup,
        "tiny": args.tiny,
        "gradient_checkpointing": args.gradient_checkpointing,
        "targets": {"memory": TARGET_MEMORY_RATIO, "time": TARGET_TIME_RATIO},
        "ratios": ratios,
        "pass": all_pass and bool(ratios),
        "wall_s": wall,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    print(json.dumps(summary))
    return 1 if any("error" in r and not r.get("oom") for r in results) else 0


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (cuda: skipped with exit 0 when unavailable)")
    p.add_argument("--family", default="sd15", choices=("sd15", "sd2", "sdxl", *FLOW))
    p.add_argument("--layers", type=int, default=0, help="flow families: keep this many blocks (0 = all)")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (latents: side / 8)")
    p.add_argument("--dtype", default="fp32", choices=tuple(_DTYPES))
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per batch (batch = 2 * pairs)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank) on the UNet attention projections")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (>= 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated, from: " + ", ".join(LOSSES))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations in backward")
    p.add_argument("--tiny", action="store_true", help="tiny UNet: a smoke test of this script, not a measurement")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    p.add_argument("--loss", choices=LOSSES, help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    args.losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    args.variants = [s.strip() for s in args.variants.split(",") if s.strip()]
    bad = [x for x in args.losses if x not in LOSSES] + [x for x in args.variants if x not in VARIANTS]
    if bad:
        p.error(f"unknown loss/variant {bad}; losses: {', '.join(LOSSES)}; variants: {', '.join(VARIANTS)}")
    if args.steps < 5:
        p.error(f"--steps={args.steps}: the median needs at least 5 timed steps")
    if args.warmup < 0 or args.pairs < 1 or args.rank < 1:
        p.error("--warmup must be >= 0, --pairs and --rank >= 1")
    if args.resolution % 8 or args.resolution < 8:
        p.error(f"--resolution={args.resolution}: expected a positive multiple of 8")
    if args.family in FLOW and args.resolution % 16:
        p.error(f"--resolution={args.resolution}: {args.family} needs a multiple of 16 (VAE 8 x patch 2)")
    if args.layers < 0 or (args.layers and args.family not in FLOW):
        p.error("--layers: a number >= 1 of transformer blocks, for the flow families only")
    if (args.variant is None) != (args.loss is None):
        p.error("--variant and --loss go together (they select one child run)")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if args.variant is not None:
        return _child_main(args)
    return _parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
