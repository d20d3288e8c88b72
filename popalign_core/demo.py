"""The demo (README command #1): a short population-level alignment run, end to end, on the embedded toy world.

What it does, all seeded and offline (about a minute on 2 CPU cores):
1. loads the toy world shipped with the package (docs/toyworld.md: a tiny SD1.5-layout model that learned a designed
   bias; ``--model tiny`` uses a random tiny model of ``--family`` instead, which draws noise-like images);
2. measures the bias the model has: for three training roles' neutral prompts ("a photo of a baker"), the share of
   each ``form`` class (the toy world's gender analogue) among ``--eval-images`` images, judged by the toy
   *evaluation* classifier, and the discrepancy (PopAlign Eq. 13) against 50/50;
3. generates its own population preference data with the seeded sampler: for each neutral prompt, a *winning*
   population sampled from identity-augmented prompts ("a photo of a round baker", "... angular baker") and a
   *losing* population sampled from the neutral prompt itself; every image is captioned with the neutral prompt,
   as in PopAlign Sec. 4.1/6.1;
4. trains a LoRA on the UNet with the chosen loss (default PopAlign, Eq. 11), reference = adapter disabled;
5. measures, on held-out images of both populations with fixed noise, the implicit reward margin
   E_w[Lref - Lθ] - E_l[Lref - Lθ] (0 before training by construction; > 0 means the model now prefers the winning
   population for the neutral caption) and the implicit accuracy, and measures the bias of step 2 again;
6. writes the LoRA in both formats (kohya for ComfyUI's LoraLoader, diffusers/peft), metrics.jsonl, loss_curve.png
   and summary.json to the output folder, and prints the summary as its last line.
The population-pipeline issue grows this into the full audit -> data -> train -> audit demo with baselines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from .fileio import atomic_write_text
from .losses import LOSSES

MODELS = ("toyworld", "tiny")
# the random tiny model: real-world words (its text conditioning is random anyway)
NEUTRAL_PROMPTS = ("a photo of a doctor", "a photo of a nurse", "a photo of a chef")
IDENTITIES = ("female", "male")
# the toy world: three training roles with strong and mild `form` skews in both directions; its `form` keywords
TOY_NEUTRAL_PROMPTS = ("a photo of a baker", "a photo of a pilot", "a photo of a guard")
TOY_IDENTITIES = ("round", "angular")


def augment(prompt: str, identity: str) -> str:
    """'a photo of a doctor' + 'female' -> 'a photo of a female doctor' (the demo's fixed template)."""
    head, _, noun = prompt.rpartition(" a ")
    return f"{head} a {identity} {noun}" if head else f"{identity} {prompt}"


def build_data(
    adapter,
    images_per_population: int,
    seed: int,
    steps: int,
    guidance: float,
    prompts=NEUTRAL_PROMPTS,
    identities=IDENTITIES,
    calibrate: bool = True,
):
    """Winning (augmented prompts) and losing (neutral prompt) populations, as latents with neutral captions."""
    from .sampling import SamplerConfig, sample

    win_req, lose_req, captions_w, captions_l = [], [], [], []
    for p in prompts:
        for i in range(images_per_population):
            win_req.append((augment(p, identities[i % len(identities)]), i))
            captions_w.append(p)
            lose_req.append((p, i))
            captions_l.append(p)
    cfg = SamplerConfig(steps=steps, guidance_scale=guidance, scheduler="ddim", seed=seed, batch_size=16)
    images = sample(adapter, win_req + lose_req, cfg)
    with torch.no_grad():
        if calibrate:
            calibrate_vae_scale(adapter, images)
        latents = adapter.encode_images(images)
    n = len(win_req)
    label = torch.tensor([1] * n + [-1] * n)
    return latents, captions_w + captions_l, label, images, win_req + lose_req


def export_population(folder: Path, images: torch.Tensor, requests, captions, label) -> Path:
    """Write the generated populations as PNGs + a population manifest (docs/data-format.md): the data `popalign
    train` reads (see examples/train_demo.yaml)."""
    from PIL import Image

    from .data import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (img, (prompt, index), cap, lab) in enumerate(zip(images, requests, captions, label.tolist())):
        name = f"{k:04d}.png"
        arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / name)
        rows.append(
            {
                "set_id": cap,
                "population": "winning" if lab > 0 else "losing",
                "caption": cap,
                "image": name,
                "prompt": prompt,
                "index": index,
            }
        )
    manifest = folder / "population.jsonl"
    write_manifest(manifest, rows)
    return manifest


@torch.no_grad()
def calibrate_vae_scale(adapter, images: torch.Tensor) -> float:
    """Set the VAE's latent scaling factor to 1/std of the latents of `images` (the recipe behind SD's 0.18215).

    The tiny random VAE's latents have a std far from SD's, so the shipped 0.18215 would leave them ~100x smaller
    than the unit-variance noise and drown every difference between images in the forward process."""
    adapter.vae.register_to_config(scaling_factor=1.0)
    std = float(adapter.encode_images(images).float().std())
    factor = 1.0 / max(std, 1e-8)
    adapter.vae.register_to_config(scaling_factor=factor)
    return factor


def _split(label: torch.Tensor, holdout_per_pop: int, per_prompt: int):
    """Per prompt and population, the last `holdout_per_pop` images are held out."""
    idx = torch.arange(label.numel())
    pos_in_group = idx % per_prompt
    held = pos_in_group >= per_prompt - holdout_per_pop
    return idx[~held], idx[held]


@torch.no_grad()
def implicit_margin(adapter, latents, cond, label, draws: int = 16, seed: int = 1234) -> dict[str, float]:
    """E_w[g] - E_l[g] with g = Lref - Lθ over `draws` fixed noise/timestep draws (same draws before and after)."""
    from .losses import per_sample_error
    from .objective import shared_noise_and_timesteps

    gen = torch.Generator().manual_seed(seed)
    gs = []
    for _ in range(draws):
        noise, t = shared_noise_and_timesteps(label, latents.shape, adapter.num_train_timesteps, gen, pair=True)
        x_t = adapter.add_noise(latents, noise, t)
        target = adapter.target(latents, noise, t)
        lm = per_sample_error(adapter.predict(x_t, t, cond), target)
        with adapter.reference():
            lr = per_sample_error(adapter.predict(x_t, t, cond), target)
        gs.append(lr - lm)
    g = torch.stack(gs).mean(0)
    w, lo = label > 0, label < 0
    return {
        "margin": float(g[w].mean() - g[lo].mean()),
        "logratio_w": float(g[w].mean()),
        "logratio_l": float(g[lo].mean()),
        "implicit_acc": float(((g[w][:, None] - g[lo][None, :]) > 0).float().mean()),
    }


@torch.no_grad()
def measure_form_bias(adapter, prompts, n: int, seed: int, steps: int, guidance: float = 1.0) -> dict:
    """Per neutral prompt: shares of the toy `form` classes among `n` seeded images (guidance 1: the model's own
    distribution), judged by the toy *evaluation* classifier (hard labels among images with a face), and the
    discrepancy (PopAlign Eq. 13) against 50/50; plus their mean over prompts. Same seeds before and after."""
    import numpy as np

    from .metrics import discrepancy
    from .sampling import SamplerConfig, sample
    from .toyworld.classifier import ToyClassifier
    from .toyworld.world import FORM

    clf = ToyClassifier(which="eval")
    cfg = SamplerConfig(steps=steps, guidance_scale=guidance, scheduler="ddim", seed=seed + 7, batch_size=64)
    per = {}
    for p in prompts:
        imgs = sample(adapter, [(p, k) for k in range(n)], cfg)
        pred = clf.predict(list(imgs.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()))
        face = pred["face"] >= clf.face_threshold
        onehot = np.eye(len(FORM))[pred["form"][face].argmax(1)]
        shares = onehot.mean(0) if len(onehot) else np.zeros(len(FORM))
        disc = discrepancy(onehot, np.full(len(FORM), 1 / len(FORM))) if len(onehot) else float("nan")
        per[p] = {"shares": dict(zip(FORM, shares.round(4).tolist())), "faces": int(face.sum()), "discrepancy": disc}
    return {
        "n_per_prompt": n,
        "sampler": {"steps": steps, "guidance_scale": guidance, "scheduler": "ddim"},
        "judge": "toy evaluation classifier",
        "prompts": per,
        "mean_discrepancy": float(np.nanmean([v["discrepancy"] for v in per.values()])),
    }


def _plot(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(
    out: str | Path = "runs/demo",
    loss: str = "popalign",
    steps: int = 150,
    images_per_population: int = 12,
    holdout: int = 3,
    lr: float = 3e-3,
    rank: int = 4,
    seed: int = 0,
    family: str = "sd15",
    sample_steps: int | None = None,
    guidance: float = 3.0,
    model: str = "toyworld",
    eval_images: int = 48,
    overwrite: bool = False,
    log=print,
    **loss_hparams,
) -> dict:
    """Run the demo; returns the summary dict (also written to `out/summary.json`)."""
    from .lora_io import LoraSpec, add_lora, lora_metadata, model_hash, save_lora
    from .objective import preference_loss
    from .testing import get_dummy_adapter

    if model not in MODELS:
        raise ValueError(f"model={model!r} is not a demo model; valid values: {', '.join(MODELS)}")
    if not isinstance(eval_images, int) or eval_images < 0:
        raise ValueError(f"eval_images={eval_images!r} is invalid: must be an integer >= 0")
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not a known loss; valid values: {', '.join(LOSSES)}")
    for name, v, lo in (("steps", steps, 1), ("images_per_population", images_per_population, 2), ("rank", rank, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}={v!r} is invalid: must be an integer >= {lo}")
    if not 1 <= holdout < images_per_population:
        raise ValueError(f"holdout={holdout!r} is invalid: must be in [1, images_per_population - 1]")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} is not empty; pass overwrite=True (--overwrite) or another --out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(seed)
    toy = model == "toyworld"
    if toy:
        from .models import load_model

        adapter, prompts, identities = load_model("toyworld"), TOY_NEUTRAL_PROMPTS, TOY_IDENTITIES
        family, what = adapter.family, "the toy world"
    else:
        adapter, prompts, identities = get_dummy_adapter(family, seed=seed), NEUTRAL_PROMPTS, IDENTITIES
        what = f"the tiny {family} model"
    sample_steps = sample_steps or (25 if toy else 8)
    bias_before = measure_form_bias(adapter, prompts, eval_images, seed, sample_steps) if toy and eval_images else None
    if bias_before:
        log(f"[demo] form discrepancy before: {bias_before['mean_discrepancy']:.3f} ({eval_images} images/prompt)")
    log(f"[demo] {what} loaded; sampling {2 * images_per_population * len(prompts)} images")
    latents, captions, label, images, requests = build_data(
        adapter, images_per_population, seed, sample_steps, guidance, prompts, identities, calibrate=not toy
    )
    export_population(out / "data", images, requests, captions, label)
    with torch.no_grad():
        cond_all = adapter.encode_prompt(captions)
    train_idx, held_idx = _split(label, holdout, images_per_population)
    before = implicit_margin(adapter, latents[held_idx], cond_all.select(held_idx), label[held_idx])

    add_lora(adapter, LoraSpec(rank=rank, alpha=float(rank)))
    params = [p for p in adapter.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    tw = train_idx[label[train_idx] > 0]
    tl = train_idx[label[train_idx] < 0]
    per_step = min(4, len(tw), len(tl))
    history = []
    with open(out / "metrics.jsonl", "w") as mf:
        for step in range(1, steps + 1):
            pick_w = tw[torch.randperm(len(tw), generator=gen)[:per_step]]
            pick_l = tl[torch.randperm(len(tl), generator=gen)[:per_step]]
            idx = torch.cat([pick_w, pick_l])
            res = preference_loss(
                adapter, latents[idx], cond_all.select(idx), label[idx], loss, generator=gen, **loss_hparams
            )
            if not torch.isfinite(res.loss):
                raise FloatingPointError(f"loss became {float(res.loss)} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            res.loss.backward()
            opt.step()
            rec = {"step": step, **res.metrics}
            history.append(rec)
            mf.write(json.dumps(rec) + "\n")
            if step == 1 or step % max(1, steps // 6) == 0 or step == steps:
                log(f"[demo] step {step:4d}/{steps}  loss {res.metrics['loss']:.4f}")
    after = implicit_margin(adapter, latents[held_idx], cond_all.select(held_idx), label[held_idx])
    train_after = implicit_margin(adapter, latents[train_idx], cond_all.select(train_idx), label[train_idx])
    bias_after = measure_form_bias(adapter, prompts, eval_images, seed, sample_steps) if bias_before else None
    if bias_after:
        log(f"[demo] form discrepancy after: {bias_after['mean_discrepancy']:.3f}")

    data_hash = hashlib.sha256(latents.detach().float().numpy().tobytes() + "\n".join(captions).encode()).hexdigest()
    meta = lora_metadata(
        loss=loss,
        hyperparameters={**loss_hparams, "lr": lr, "steps": steps, "rank": rank, "seed": seed},
        base_model_hash=model_hash(adapter.unet),
        data_hash=data_hash,
    )
    save_lora(adapter, out / "popalign_demo_lora.safetensors", format="kohya", metadata=meta)
    save_lora(adapter, out / "diffusers_lora", format="diffusers", metadata=meta)
    _plot([h["loss"] for h in history], out / "loss_curve.png", f"{loss} on {what}")
    summary = {
        "loss": loss,
        "model": model,
        "family": family,
        "steps": steps,
        "train_images": int(train_idx.numel()),
        "heldout_images": int(held_idx.numel()),
        "first_loss": history[0]["loss"],
        "last_loss": history[-1]["loss"],
        "heldout_margin_before": before["margin"],
        "heldout_margin_after": after["margin"],
        "heldout_implicit_acc_after": after["implicit_acc"],
        "train_margin_after": train_after["margin"],
        "form_bias_before": bias_before,
        "form_bias_after": bias_after,
        "seconds": round(time.time() - t0, 1),
        "outputs": sorted(p.name for p in out.iterdir()),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="popalign demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    ap.add_argument("--loss", default="popalign", choices=list(LOSSES), help="loss from the zoo (default: popalign)")
    ap.add_argument("--steps", type=int, default=150, help="training steps (default: 150)")
    ap.add_argument("--images-per-population", type=int, default=12, help="images per population and prompt")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the LoRA (default: 3e-3)")
    ap.add_argument("--beta", type=float, default=None, help="override the loss's beta (its own default otherwise)")
    ap.add_argument("--seed", type=int, default=0, help="global seed (default: 0)")
    ap.add_argument("--model", default="toyworld", choices=list(MODELS), help="toyworld (default) or tiny")
    ap.add_argument("--family", default="sd15", choices=["sd15", "sd2", "sdxl"], help="family of --model tiny")
    ap.add_argument("--eval-images", type=int, default=48, help="toy world: images per prompt for the bias readout")
    ap.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out folder")
    a = ap.parse_args(argv)
    hp = {} if a.beta is None else {"beta": a.beta}
    try:
        summary = run_demo(
            a.out,
            loss=a.loss,
            steps=a.steps,
            images_per_population=a.images_per_population,
            lr=a.lr,
            seed=a.seed,
            family=a.family,
            model=a.model,
            eval_images=a.eval_images,
            overwrite=a.overwrite,
            log=lambda m: print(m, file=sys.stderr),
            **hp,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"popalign demo: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
