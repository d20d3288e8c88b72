"""Seeded build of the toy world's text-to-image model (diffusers format) and its classifiers.

``popalign toyworld build --out DIR [--preset full|ci] [--seed 0] [--overwrite]``

Steps: render a training set with the designed skews (`data.make_dataset`) -> train a tiny `AutoencoderKL`
(32x32 RGB <-> 4x8x8 latents) -> encode the set -> pretrain a tiny `CLIPTextModel` (full CLIP BPE vocabulary,
shipped tokenizer) on caption attributes (`TextAux`) -> train a tiny `UNet2DConditionModel` jointly with it (Min-SNR-γ
weighting, 10% caption dropout for classifier-free guidance, the `TextAux` loss kept on) -> train the two toy
classifiers (`classifier.py`) -> write a Stable-Diffusion-1.x-layout diffusers folder.

The folder is written to ``DIR.partial`` and renamed when complete: an interrupted build never leaves weights that
look complete, and an existing build is kept unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.common.fileio import (
    OUTPUT_MARKER,
    check_clearable,
    claim_output_dir,
    clear_output_dir,
    set_default_permissions,
)
from popalign_core.models.tokenizers import clip_tokenizer
from popalign_core.toyworld.classifier import train_classifiers
from popalign_core.toyworld.data import CaptionMix, make_dataset
from popalign_core.toyworld.world import CONCEPTS, ROLE_BY_NAME, SETTINGS, SHADES, TOY_AXES, parse_caption

BUILD_VERSION = 3  # 3: world v2 (56 roles built from parts, text pretraining reads the parts)
EOS_ID = 49407  # CLIP's end-of-text token, also its padding token


@dataclass
class BuildConfig:
    """Hyper-parameters of a toy-world build (presets: `PRESETS`)."""

    seed: int = 0
    n_images: int = 100000  # rendered training images (base model)
    vae_steps: int = 600
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    unet_steps: int = 13000
    unet_batch: int = 32  # small batches, many updates: faster learning per sample at this size
    unet_lr: float = 5e-4
    unet_channels: tuple[int, ...] = (64, 64)
    unet_layers: int = 1
    vae_channels: tuple[int, ...] = (32, 32, 32)
    text_hidden: int = 64
    text_layers: int = 2
    cond_dropout: float = 0.1
    text_pretrain_steps: int = 400  # caption-attribute pretraining of the text encoder (see `TextAux`)
    text_aux_weight: float = 0.1  # weight of the caption-attribute loss while training the UNet (0: off)
    snr_gamma: float = 5.0  # Min-SNR-gamma loss weighting (Hang et al. 2023) of the UNet loss (0: off)
    ema_decay: float = 0.999
    classifier_images: int = 20000  # labelled renders for the toy classifiers
    classifier_steps: int = 1800  # training steps of each toy classifier
    mix: CaptionMix = field(default_factory=CaptionMix)
    threads: int = 0  # torch threads (0: leave as is)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["unet_channels"] = list(self.unet_channels)
        d["vae_channels"] = list(self.vae_channels)
        return d


PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    # the same code path in minutes (CI): a smaller set and far fewer steps; check metrics are not expected to pass
    "ci": {
        "n_images": 3000,
        "vae_steps": 150,
        "unet_steps": 200,
        "unet_batch": 64,
        "classifier_images": 4000,
        "classifier_steps": 100,
        "text_pretrain_steps": 50,
    },  # fmt: skip
}


def text_encoder_config(cfg: BuildConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 2,
        num_attention_heads=4,
        num_hidden_layers=cfg.text_layers,
        max_position_embeddings=77,
        projection_dim=cfg.text_hidden,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def vae_config(cfg: BuildConfig) -> dict[str, Any]:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def unet_config(cfg: BuildConfig) -> dict[str, Any]:
    ch = tuple(cfg.unet_channels)
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=cfg.unet_layers,
        block_out_channels=ch,
        down_block_types=("CrossAttnDownBlock2D",) * (len(ch) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(ch) - 1),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def scheduler_config() -> dict[str, Any]:
    # Stable Diffusion 1.x's training schedule
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def _log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress:
        progress(msg)


def train_vae(imgs: np.ndarray, cfg: BuildConfig, progress=None):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**vae_config(cfg))
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.vae_steps, 1), eta_min=cfg.vae_lr * 0.05)
    gen = np.random.default_rng(cfg.seed + 1)
    x_all = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    t0 = time.time()
    for step in range(cfg.vae_steps):
        idx = torch.from_numpy(gen.integers(0, len(imgs), cfg.vae_batch))
        x = x_all[idx].float() / 127.5 - 1.0
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        kl = post.kl().mean() / (x[0].numel())
        loss = torch.nn.functional.mse_loss(rec, x) + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.vae_steps - 1:
            _log(progress, f"vae step {step + 1}/{cfg.vae_steps} mse {loss.item():.5f} ({time.time() - t0:.0f}s)")
    vae.eval().requires_grad_(False)
    return vae


def encode_all(vae, imgs: np.ndarray, batch: int = 256):
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(imgs), batch):
            x = torch.from_numpy(imgs[s : s + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            out.append(vae.encode(x).latent_dist.mean)
    return torch.cat(out)


def tokenize(captions: list[str]):
    tok = clip_tokenizer()
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")


# caption attributes the text encoder is taught to expose at every position from the end-of-text token on
AUX_HEADS: dict[str, tuple[str, ...]] = {
    "setting": SETTINGS,  # a role's parts, not its identity: role codes share structure (see `TextAux`)
    "shade": tuple(str(g) for g in SHADES),
    "concept": CONCEPTS,
    "hidden": ("cloak",),
    **TOY_AXES,
}


def caption_labels(captions: list[str]):
    """[N, len(AUX_HEADS)] long labels: 0 = not named in the caption, 1 + class index otherwise."""
    import torch

    rows = []
    for c in captions:
        p = parse_caption(c)
        role = ROLE_BY_NAME.get(p["role"])
        parts = {"setting": SETTINGS[role.setting], "shade": str(SHADES[role.shade])} if role else {}
        named = {**parts, "concept": p["concept"], "hidden": "cloak" if p["hidden"] else None, **p["identity"]}
        rows.append([0 if named.get(h) is None else 1 + classes.index(named[h]) for h, classes in AUX_HEADS.items()])
    return torch.tensor(rows, dtype=torch.long)


class TextAux:
    """Linear read-outs of the caption's attributes from the text encoder's last hidden states.

    A real text-to-image model starts from a pretrained text encoder (CLIP) whose states already separate "red"
    from "blue". The toy world's encoder starts from random weights; trained only through the UNet's loss it
    learns the role (which changes the whole background) long before the identity keywords (a small part of the
    image), and the UNet then cannot follow them. This loss - cross-entropy of per-head linear read-outs at every
    position from the first end-of-text token on (those positions see the whole caption through causal attention)
    - teaches the encoder to expose every named attribute; it is used to pretrain the encoder and, weighted by
    ``text_aux_weight``, while training the UNet. The read-outs are discarded after the build.

    The role is read out through its parts (``setting``, ``shade``), never as a role identity: a read-out of the
    role's identity trains the codes of different roles to be told apart (world v1: nearly orthogonal, most of a
    held-out role's code outside the training roles' span), while a real text encoder's occupation codes share
    structure. Roles that share a part share a direction of their code."""

    def __init__(self, hidden: int, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, 1 + len(c)) for c in AUX_HEADS.values())
        for h in self.heads:
            torch.nn.init.normal_(h.weight, std=hidden**-0.5, generator=g)
            torch.nn.init.zeros_(h.bias)

    def parameters(self):
        return self.heads.parameters()

    def loss(self, states, ids, labels):
        import torch

        eos = (ids == EOS_ID).int().argmax(dim=1)
        mask = torch.arange(ids.shape[1])[None, :] >= eos[:, None]  # [B, L]
        total = states.new_zeros(())
        for k, head in enumerate(self.heads):
            logits = head(states[mask])  # [M, C]
            lab = labels[:, k][:, None].expand_as(mask)[mask]
            total = total + torch.nn.functional.cross_entropy(logits, lab)
        return total / len(self.heads)


def pretrain_text(text, captions: list[str], cfg: BuildConfig, aux: TextAux, progress=None) -> None:
    """Caption-attribute pretraining of the text encoder (see `TextAux`) on the build's distinct captions."""
    import torch

    uniq = sorted(set(captions) | {""})
    ids = tokenize(uniq).input_ids
    labels = caption_labels(uniq)
    opt = torch.optim.AdamW([*text.parameters(), *aux.parameters()], lr=1e-3, weight_decay=1e-2)
    gen = np.random.default_rng(cfg.seed + 5)
    for step in range(cfg.text_pretrain_steps):
        idx = torch.from_numpy(gen.integers(0, len(uniq), 256))
        loss = aux.loss(text(ids[idx])[0], ids[idx], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.text_pretrain_steps - 1:
            _log(progress, f"text pretrain step {step + 1}/{cfg.text_pretrain_steps} loss {loss.item():.4f}")


def train_unet(latents, captions: list[str], cfg: BuildConfig, progress=None):
    """Train UNet + text encoder on scaled latents; returns (unet_ema, text_encoder_ema)."""
    import copy

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(cfg.seed + 2)
    unet = UNet2DConditionModel(**unet_config(cfg))
    text = CLIPTextModel(text_encoder_config(cfg))
    noise_sched = DDPMScheduler(**scheduler_config())
    ac = noise_sched.alphas_cumprod
    ids_all = tokenize(captions).input_ids
    labels_all = caption_labels(captions)
    empty = tokenize([""]).input_ids[0]
    empty_labels = caption_labels([""])[0]
    aux = TextAux(cfg.text_hidden, cfg.seed + 6)
    if cfg.text_pretrain_steps:
        pretrain_text(text, captions, cfg, aux, progress)
    params = list(unet.parameters()) + list(text.parameters())
    if cfg.text_aux_weight:
        params += list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    warm = min(500, max(cfg.unet_steps // 10, 1))

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(cfg.unet_steps - warm, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    gen = np.random.default_rng(cfg.seed + 3)
    tgen = torch.Generator().manual_seed(cfg.seed + 4)
    t0 = time.time()
    avg = None
    for step in range(cfg.unet_steps):
        idx = torch.from_numpy(gen.integers(0, len(latents), cfg.unet_batch))
        x0 = latents[idx]
        ids = ids_all[idx].clone()
        drop = torch.from_numpy(gen.random(cfg.unet_batch) < cfg.cond_dropout)
        ids[drop] = empty
        labels = labels_all[idx].clone()
        labels[drop] = empty_labels
        noise = torch.randn(x0.shape, generator=tgen)
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=tgen)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        emb = text(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=emb).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if cfg.snr_gamma:  # Min-SNR-gamma for epsilon prediction: weight min(SNR, gamma) / SNR (Hang et al. 2023)
            snr = (a / (1 - a)).flatten()
            per = per * snr.clamp(max=cfg.snr_gamma) / snr
        mse = per.mean()
        loss = mse + cfg.text_aux_weight * aux.loss(emb, ids, labels) if cfg.text_aux_weight else mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in ((unet, ema_unet), (text, ema_text)):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - d)
        avg = mse.item() if avg is None else 0.98 * avg + 0.02 * mse.item()
        if step % 500 == 0 or step == cfg.unet_steps - 1:
            el = time.time() - t0
            _log(
                progress, f"unet step {step + 1}/{cfg.unet_steps} loss {avg:.4f} ({el:.0f}s, {(step + 1) / el:.1f}/s)"
            )
    return ema_unet.eval(), ema_text.eval()


def save_pipeline(out: Path, vae, unet, text, scaling: float, meta: dict[str, Any]) -> None:
    """Write a SD-1.x-layout diffusers folder into `out` (new or empty); UNet and text encoder in fp16."""
    from diffusers import DDIMScheduler

    out.mkdir(parents=True, exist_ok=True)
    vae.register_to_config(scaling_factor=float(scaling))
    vae.save_pretrained(out / "vae", safe_serialization=True)
    # UNet and text encoder are stored in fp16 (the repository budget is 20 MB; the full-vocabulary token
    # embedding alone is 49408 x 64); they are loaded back as fp32 by `models.load_model`.
    for module, name in ((unet, "unet"), (text, "text_encoder")):
        module.half().save_pretrained(out / name, safe_serialization=True)
        module.float()
    clip_tokenizer().save_pretrained(out / "tokenizer")
    DDIMScheduler(**scheduler_config(), set_alpha_to_one=False, steps_offset=1).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "toyworld.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


COMMAND = "toyworld build"
#: What a toy-world build holds (`fileio.claim_output_dir`): a diffusers folder plus the classifiers.
OUTPUTS = {
    "model_index.json": None,
    "toyworld.json": None,
    "unet": {"config.json": None, "diffusion_pytorch_model.safetensors": None},
    "vae": {"config.json": None, "diffusion_pytorch_model.safetensors": None},
    "text_encoder": {"config.json": None, "model.safetensors": None},
    "tokenizer": {"*.json": None, "*.txt": None},
    "scheduler": {"scheduler_config.json": None},
    "classifiers": {"toy_classifiers.json": None, "toy_*.safetensors": None},
}


def build(
    out_dir: str | os.PathLike,
    cfg: BuildConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = print,
    classifiers: bool = True,
) -> Path:
    """Build the toy world into `out_dir` (see the module docstring). Returns the folder."""
    import torch

    cfg = cfg or BuildConfig()
    if isinstance(cfg.threads, bool) or not isinstance(cfg.threads, int) or cfg.threads < 0:
        raise ValueError(f"threads={cfg.threads!r} is invalid: an integer >= 0 (0 keeps torch's default)")
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"--out {str(out)!r} exists; pass overwrite=True (--overwrite) to rebuild it")
        check_clearable(out, COMMAND, OUTPUTS, signature="toyworld.json")  # before the build: nothing foreign lost
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # a killed build's folder: only ever our own
        clear_output_dir(partial, COMMAND, OUTPUTS, arg="the unfinished build")  # needs our marker
    claim_output_dir(partial, COMMAND, OUTPUTS, arg="the unfinished build")
    t0 = time.time()
    _log(progress, f"rendering {cfg.n_images} training images")
    imgs, caps, truths = make_dataset(cfg.n_images, cfg.seed, cfg.mix)
    vae = train_vae(imgs, cfg, progress)
    lat = encode_all(vae, imgs)
    scaling = float(1.0 / lat.std())
    unet, text = train_unet(lat * scaling, caps, cfg, progress)
    meta = {"build_version": BUILD_VERSION, "config": cfg.to_dict(), "seconds": None, "torch": torch.__version__}
    save_pipeline(partial, vae, unet, text, scaling, meta)
    if classifiers:
        from popalign_core.toyworld.classifier import train_classifiers

        train_classifiers(partial, vae, cfg, progress)
    meta["seconds"] = round(time.time() - t0, 1)
    (partial / "toyworld.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _replace(partial, out)
    _log(progress, f"built {out} in {meta['seconds']}s")
    return out


def _replace(partial: Path, out: Path) -> None:
    """Put the complete build `partial` in place of `out` (an earlier build, all of it ours, or nothing)."""

    if out.exists():
        _remove_build(out, signature="toyworld.json")
    set_default_permissions(partial)
    os.replace(partial, out)


def _remove_build(path: Path, **kwargs) -> None:
    """Delete the build folder `path` (refused, nothing deleted, unless all of it is ours), claim marker included."""

    clear_output_dir(path, COMMAND, OUTPUTS, **kwargs)
    (path / OUTPUT_MARKER).unlink(missing_ok=True)
    path.rmdir()


def config_from_meta(meta: dict[str, Any]) -> BuildConfig:
    """The `BuildConfig` a build recorded in its toyworld.json."""
    c = dict(meta["config"])
    c["unet_channels"], c["vae_channels"] = tuple(c["unet_channels"]), tuple(c["vae_channels"])
    c["mix"] = CaptionMix(**c["mix"])
    return BuildConfig(**c)


def rebuild_classifiers(out_dir: str | os.PathLike, progress: Callable[[str], None] | None = print) -> Path:
    """Retrain the two toy classifiers and the face bank of an existing build with the current recipe, from the
    build's own VAE and recorded config (the classifier stage depends on nothing else, so the result is what a full
    build would write). Works on a copy (``DIR.partial``) that replaces ``DIR`` only when complete."""
    import shutil

    from diffusers import AutoencoderKL

    out = Path(out_dir)
    if not (out / "toyworld.json").is_file():
        raise FileNotFoundError(f"--out {str(out)!r} holds no toy-world build (no toyworld.json) to retrain")
    check_clearable(out, COMMAND, OUTPUTS, signature="toyworld.json")
    meta = json.loads((out / "toyworld.json").read_text())
    cfg = config_from_meta(meta)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        _remove_build(partial, arg="the unfinished build")
    shutil.copytree(out, partial, ignore=shutil.ignore_patterns("classifiers"))
    t0 = time.time()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    vae = AutoencoderKL.from_pretrained(partial / "vae").eval().requires_grad_(False)
    train_classifiers(partial, vae, cfg, progress)
    meta["classifiers_seconds"] = round(time.time() - t0, 1)
    (partial / "toyworld.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _replace(partial, out)
    _log(progress, f"retrained the classifiers of {out} in {meta['classifiers_seconds']}s")
    return out
