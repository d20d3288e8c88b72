"""The alignment trainer: LoRA (or full) fine-tuning with any loss of the zoo, resumable, multi-process.

    popalign train --config run.yaml [--lr 1e-4 --loss dpo --loss-param beta=2500 ...]

Design (see docs/training.md):
- LoRA via peft on the UNet (target modules configurable) and/or the text encoder(s). The reference prediction is
  the same network with the adapters disabled (no weight copy); full fine-tuning uses a frozen copy instead.
- Every random choice of a step (which samples, caption dropout, noise, timesteps) is drawn from generators seeded by
  (seed, step, micro-step, rank), never from a carried RNG state. A resumed run therefore replays exactly the steps an
  uninterrupted run would have taken: the checkpoint only needs the trainable weights, the optimiser state and the
  step.
- Multi-process data parallelism: every process draws the same *global* batch for a step and takes its share
  (rank::world); gradients of the trainable parameters are averaged with an all-reduce; PopAlign's mu is the global
  statistic (sums and counts reduced over processes).
- Checkpoints and final files are written to a temporary name and renamed: the output folder never holds a
  half-written LoRA. A NaN/inf loss stops the run with a clear message; the last good checkpoint stays.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from popalign_core.common.fileio import (
    atomic_path,
    atomic_write_text,
    claim_output_dir,
    clean_temporaries,
    read_safetensors,
    save_safetensors,
    temporary_name,
)
from popalign_core.common.userinput import (
    ArgumentParser,
    check_containers,
    check_name,
    coerce_numbers,
    coerce_strings,
    command,
    flag_type,
    parse_value,
    read_yaml,
    user_error,
)
from popalign_core.train.losses import LOSSES, loss_config

MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
POPULATION_SAMPLING = ("balanced", "uniform")
LORA_FORMAT_CHOICES = ("kohya", "diffusers")


@user_error
class TrainingError(RuntimeError):
    """A run stopped for a reason the user must act on (NaN loss, bad data, ...)."""


def train_outputs(lora_name: str) -> dict:
    """What `popalign train` / `popalign dal` write in their output folder (`fileio.claim_output_dir`) for a run
    named `lora_name`: the LoRA in both layouts (or the full UNet, or a prefix embedding), checkpoints, metrics, the
    loss plot, the anchor cache, the demo's per-stage copies and the node pack's summary."""
    n = re.escape(lora_name)
    return {
        "config.yaml": None,
        "metrics.jsonl": None,
        "metrics.csv": None,
        "summary.json": None,
        "node_summary.json": None,
        "loss_curve.png": None,
        re.compile(rf"{n}(_unet|_step\d+)?\.safetensors"): None,
        re.compile(r"anchors_[0-9a-f]{16}\.safetensors"): None,
        f"{lora_name}_diffusers": {"pytorch_lora_weights.safetensors": None},
        "checkpoints": {
            re.compile(r"step_\d{8}"): {"state.safetensors": None, "trainer_state.json": None},
            re.compile(r"\.tmp_step_\d{8}"): "any",  # an older version's unfinished checkpoint
        },
    }


TRAIN_OUTPUTS = train_outputs("popalign_lora")  # the default run name's layout


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """Everything a training run needs; YAML keys and CLI flags have the same names (dashes for underscores)."""

    # model and data
    model: str = _help(
        "base model: a .safetensors checkpoint, a diffusers folder, or 'tiny:<sd15|sd2|sdxl>' (a seeded tiny model "
        "built from configs, for tests and examples)",
        default="",
    )
    family: str = _help("model family: auto, sd15, sd2, sdxl", default="auto")
    model_config_dir: str | None = _help(
        "diffusers config folder for a single-file checkpoint (default: the shipped config of its family)",
        default=None,
    )
    prediction_type: str | None = _help(
        "override the scheduler's prediction type: epsilon or v_prediction", default=None
    )
    data: str = _help("preference data manifest (.jsonl or .csv; see docs/data-format.md)", default="")
    data_kind: str | None = _help("pairwise or population (default: detected from the manifest columns)", default=None)
    resolution: int | None = _help("training image side in pixels (default: the model's native size)", default=None)
    # loss
    loss: str = _help(f"loss of the zoo: {', '.join(LOSSES)}", default="popalign")
    loss_params: dict = _help(
        "hyper-parameters of the loss; unset ones keep the loss's own defaults", default_factory=dict
    )
    # what is trained
    train_unet: bool = _help("train a LoRA on the UNet", default=True)
    train_text_encoder: bool = _help("train a LoRA on the text encoder(s) too (attention + MLP)", default=False)
    full_finetune: bool = _help("train every UNet weight instead of a LoRA (reference: a frozen copy)", default=False)
    lora_rank: int = _help("LoRA rank", default=8)
    lora_alpha: float | None = _help("LoRA alpha (default: equal to the rank, i.e. scale 1)", default=None)
    unet_targets: list = _help(
        "UNet modules that get a LoRA", default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"]
    )
    text_encoder_targets: list = _help(
        "text-encoder modules that get a LoRA",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    )
    # optimisation
    steps: int = _help("optimiser steps", default=100)
    batch_size: int = _help("per step and process: pairs (pairwise losses) or images (population losses)", default=4)
    grad_accum: int = _help("micro-batches accumulated per optimiser step", default=1)
    lr: float = _help("learning rate (PopAlign paper: 5e-7 for full SDXL; LoRA usually 1e-5..1e-4)", default=1e-4)
    optimizer: str = _help("adamw, or adamw8bit (bitsandbytes, when installed)", default="adamw")
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    max_grad_norm: float = _help("gradient clipping norm (0 = off)", default=1.0)
    mixed_precision: str = _help("no, fp16 or bf16 (accelerate autocast)", default="no")
    gradient_checkpointing: bool = _help("recompute UNet activations in backward to save memory", default=False)
    cache_latents: bool = _help("encode every image with the VAE once, before training", default=True)
    caption_dropout: float = _help(
        "probability of training a sample with an empty caption (public PopAlign code: 0.2; default off)", default=0.0
    )
    population_sampling: str = _help(
        "population data: 'balanced' (half winning, half losing per step) or 'uniform' over all images",
        default="balanced",
    )
    anchor_prompts: list = _help(
        "prior preservation: prompts the frozen reference generates anchor samples from (cached); "
        "used when loss_params.anchor_weight > 0",
        default_factory=list,
    )
    anchor_images_per_prompt: int = _help("anchor samples generated per anchor prompt", default=4)
    anchor_batch_size: int = _help("anchor samples per step and process", default=2)
    anchor_sampler_steps: int = _help("sampler steps for anchor generation", default=25)
    anchor_guidance: float = _help("CFG scale for anchor generation", default=5.0)
    seed: int = _help("global seed: LoRA init, batches, noise, timesteps, caption dropout", default=0)
    # output
    output_dir: str = _help("output folder (checkpoints, metrics, LoRA files)", default="runs/train")
    lora_name: str = _help("file name stem of the saved LoRA", default="popalign_lora")
    lora_formats: list = _help(
        "LoRA layouts written at the end: kohya, diffusers", default_factory=lambda: ["kohya", "diffusers"]
    )
    checkpoint_every: int = _help("steps between resumable checkpoints (0 = only at the end)", default=50)
    keep_checkpoints: int = _help("how many recent checkpoints to keep", default=2)
    resume: str | None = _help(
        "'auto' (latest checkpoint in output_dir), a checkpoint folder, or none", default="auto"
    )
    progress: bool = _help("show a progress bar", default=True)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        def bad(name, why):
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid: {why}")

        coerce_numbers(self)
        check_containers(self)
        coerce_strings(self)
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not a known loss; valid values: {', '.join(LOSSES)}")
        if not isinstance(self.loss_params, dict):
            bad("loss_params", "expected a mapping of hyper-parameter names to values")
        loss_config(self.loss, **self.loss_params)  # names and values checked by the loss's own config
        if self.family not in ("auto", "sd15", "sd2", "sdxl"):
            raise ValueError(f"family={self.family!r} is not supported; valid values: auto, sd15, sd2, sdxl")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            bad("prediction_type", "valid values: epsilon, v_prediction")
        if self.data_kind not in (None, "pairwise", "population"):
            bad("data_kind", "valid values: pairwise, population")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "lora_rank",
            "anchor_images_per_prompt",
            "anchor_batch_size",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be an integer >= 1")
        for name in ("checkpoint_every", "keep_checkpoints", "seed", "anchor_sampler_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "must be an integer >= 0")
        r = self.resolution
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not 8 <= r <= 8192):
            bad("resolution", "must be None (the model's native size) or an integer in [8, 8192] pixels")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            bad("lr", "must be a finite number > 0")
        for name in ("weight_decay", "max_grad_norm", "anchor_guidance"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < float("inf")):
                bad(name, "must be a finite number >= 0")
        if not (isinstance(self.caption_dropout, (int, float)) and 0.0 <= self.caption_dropout < 1.0):
            bad("caption_dropout", "must lie in [0, 1)")
        if self.mixed_precision not in MIXED_PRECISION:
            bad("mixed_precision", f"valid values: {', '.join(MIXED_PRECISION)}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"valid values: {', '.join(OPTIMIZERS)}")
        if self.population_sampling not in POPULATION_SAMPLING:
            bad("population_sampling", f"valid values: {', '.join(POPULATION_SAMPLING)}")
        if self.lora_alpha is not None and not (isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0):
            bad("lora_alpha", "must be a number > 0")
        if not self.train_unet and not self.train_text_encoder and not self.full_finetune:
            raise ValueError("train_unet, train_text_encoder and full_finetune are all false: nothing to train")
        if self.full_finetune and self.train_text_encoder:
            raise ValueError("full_finetune with train_text_encoder is not supported: choose one")
        fmts = list(self.lora_formats)
        if not fmts or any(f not in LORA_FORMAT_CHOICES for f in fmts):
            bad("lora_formats", f"a non-empty list of: {', '.join(LORA_FORMAT_CHOICES)}")
        check_name(self.lora_name, "lora_name")
        if float(self.loss_params.get("anchor_weight", 0.0)) > 0 and not self.anchor_prompts:
            raise ValueError(
                "loss_params.anchor_weight > 0 needs anchor_prompts (prompts the reference generates from)"
            )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the fields that must not change across a resume (everything but output/progress/steps)."""
        return config_fingerprint(self.to_dict())

    @classmethod
    def fields_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def config_fingerprint(d: dict, paths_as_given: bool = False) -> str:
    """Hash of a run config's fields that must not change across a resume (not output/progress/steps). Paths of
    existing files count by their real location, so `data/x.jsonl` and `/abs/data/x.jsonl` are the same run
    (`paths_as_given`: the fingerprint of versions before that, still accepted on resume)."""
    d = dict(d)
    for k in ("output_dir", "progress", "resume", "steps", "checkpoint_every", "keep_checkpoints"):
        d.pop(k, None)
    for k in ("model", "data", "model_config_dir", "prompts_file", "face_bank"):
        v = d.get(k)
        if not paths_as_given and isinstance(v, str) and v and os.path.exists(v):
            d[k] = os.path.realpath(v)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_yaml_config(cls, path: str | os.PathLike | None, overrides: dict, relative_keys: tuple[str, ...] = ()):
    """An instance of the config dataclass `cls` from a YAML file (optional) and keyword overrides (None values are
    ignored); unknown keys are errors. relative_keys: path-valued keys that, written relative in the file, are
    relative to the file's folder."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        data = read_yaml(p, "config file")
        for key in relative_keys:
            v = data.get(key)
            if isinstance(v, str) and v != "toy" and not Path(v).is_absolute():
                data[key] = str(p.parent / v)
    data.update({k: v for k, v in overrides.items() if v is not None})
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(sorted(valid))}")
    return cls(**data)


def load_config(path: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) and keyword overrides; unknown keys are errors."""
    return load_yaml_config(TrainConfig, path, overrides)


# ---------------------------------------------------------------------------------------------------- helpers
def _step_generator(seed: int, *parts: int) -> torch.Generator:
    h = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "big") & ((1 << 63) - 1))


def load_training_model(cfg: TrainConfig):
    """The model adapter for `cfg.model` (a checkpoint, a diffusers folder or 'tiny:<family>[:seed]')."""
    if cfg.model.startswith("tiny:"):
        from popalign_core.models.tiny import get_dummy_adapter

        if cfg.model_config_dir is not None:
            raise ValueError("model_config_dir: only used for single-file checkpoints; a tiny model is built from the "
                             "package's own configs")  # fmt: skip
        parts = cfg.model.split(":")
        fam = parts[1]
        seed = parse_value(parts[2]) if len(parts) > 2 else 0
        if len(parts) > 3 or isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"model={cfg.model!r}: a tiny model is 'tiny:<sd15|sd2|sdxl>[:<integer seed>]'")
        adapter = get_dummy_adapter(fam, seed=seed)
        if cfg.prediction_type is not None and cfg.prediction_type != adapter.prediction_type:
            from diffusers import DDPMScheduler

            adapter.noise_scheduler = DDPMScheduler.from_config(
                adapter.noise_scheduler.config, prediction_type=cfg.prediction_type
            )
        return adapter
    if not cfg.model:
        raise ValueError("model is empty: give a .safetensors checkpoint, a diffusers folder or 'tiny:sd15'")
    from popalign_core.models.loading import load_model

    return load_model(
        cfg.model, family=cfg.family, prediction_type=cfg.prediction_type, config_dir=cfg.model_config_dir
    )


class _Dist:
    """Process-group facts from accelerate (torchrun / accelerate launch), plus mixed precision.

    Autocast and the fp16 gradient scaler are handled here with torch's own API rather than through accelerate's
    process-wide `AcceleratorState`, whose precision cannot change within one process: ComfyUI (and tests) run several
    trainings with different settings in one process.
    """

    def __init__(self, mixed_precision: str):
        from accelerate import Accelerator

        cuda = torch.cuda.is_available()
        # cpu=True is what makes accelerate see a torchrun / multi-process launch on a machine without CUDA
        self.acc = Accelerator(cpu=not cuda)
        self.rank = self.acc.process_index
        self.world = self.acc.num_processes
        self.device = self.acc.device
        self.main = self.acc.is_main_process
        mp = mixed_precision
        if self.device.type == "cpu" and mp == "fp16":
            mp = "bf16"  # CPU autocast runs in bfloat16; fp16 is a GPU format
        self.mixed_precision = mp
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
        self.scaler = torch.amp.GradScaler("cuda") if (mp == "fp16" and self.device.type == "cuda") else None

    def autocast(self):
        if self.autocast_dtype is None:
            import contextlib

            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt) -> None:
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        t = t.clone().to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu() if t.device.type != "cpu" else t

    def barrier(self):
        if self.world > 1:
            self.acc.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------- the trainer
class Trainer:
    """Runs one training job described by a TrainConfig. `run()` returns a summary dict."""

    def __init__(self, cfg: TrainConfig, log=None, adapter=None, on_step=None):
        """adapter: an already loaded model adapter to train (e.g. ComfyUI's MODEL wrapped by the node pack);
        `cfg.model` is then only a label. It stays on its own device. on_step(step, total, metrics) is called
        after every step; an exception it raises (a cancel) stops the run after saving a resumable checkpoint of
        the last finished step, then propagates."""
        self.cfg = cfg.validate()
        if not str(cfg.output_dir).strip():
            raise ValueError("output_dir is empty: name the run's folder (an empty path would mean the current one)")
        self.out = Path(cfg.output_dir)
        self.dist = _Dist(cfg.mixed_precision)
        self.log = log or (lambda m: print(m, file=sys.stderr))
        self._given_adapter = adapter
        self.on_step = on_step

    # -------------------------------------------------------------------------------------------- setup
    def _setup_model(self):
        from popalign_core.lora.files import LoraSpec, add_lora

        cfg = self.cfg
        self.adapter = adapter = self._given_adapter or load_training_model(cfg)
        if self._given_adapter is None:
            for m in [adapter.unet, adapter.vae, *adapter.text_encoders]:
                m.to(self.dist.device)
        torch.manual_seed(cfg.seed)
        if cfg.full_finetune:
            adapter.reference_unet = copy.deepcopy(adapter.unet).requires_grad_(False).eval()
            for m in [adapter.vae, *adapter.text_encoders]:
                m.requires_grad_(False)
            adapter.unet.requires_grad_(True)
        else:
            spec = LoraSpec(
                rank=cfg.lora_rank,
                alpha=float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank),
                unet_targets=tuple(cfg.unet_targets) if cfg.train_unet else None,
                text_encoder_targets=tuple(cfg.text_encoder_targets) if cfg.train_text_encoder else None,
            )
            add_lora(adapter, spec)
        if cfg.gradient_checkpointing:
            adapter.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for te in adapter.text_encoders:
                    te.gradient_checkpointing_enable()
        adapter.unet.train()
        self.params = [p for p in adapter.trainable_parameters() if p.requires_grad]
        self.param_names = [
            n
            for root_name, root in self._roots()
            for n, p in ((f"{root_name}.{k}", v) for k, v in root.named_parameters())
            if p.requires_grad
        ]
        if not self.params:
            raise TrainingError("no trainable parameter: check unet_targets / text_encoder_targets")

    def _roots(self):
        yield "unet", self.adapter.unet
        for i, te in enumerate(self.adapter.text_encoders):
            yield f"text_encoder{'' if i == 0 else '_2'}", te

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        named = {n: p for rn, r in self._roots() for n, p in ((f"{rn}.{k}", v) for k, v in r.named_parameters())}
        return {n: named[n].detach().cpu().contiguous() for n in self.param_names}

    def _setup_optimizer(self):
        cfg = self.cfg
        if cfg.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError as exc:
                raise TrainingError("optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes") from exc
            self.opt = bnb.optim.AdamW8bit(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _setup_data(self):
        from popalign_core.train.data import load_image, load_preference_data, pair_population

        cfg = self.cfg
        self.data = data = load_preference_data(cfg.data, kind=cfg.data_kind)
        spec = LOSSES[cfg.loss]
        if spec.pairwise:
            self.pairs = list(data.pairs) if data.kind == "pairwise" else pair_population(data, cfg.seed)
            if not self.pairs:
                raise TrainingError(f"{data.manifest}: no (winner, loser) pair could be formed for loss {cfg.loss!r}")
        self.win_idx = data.winning()
        self.lose_idx = data.losing()
        size = cfg.resolution or self.adapter.native_size
        if size % self.adapter.vae_scale_factor:
            raise ValueError(f"resolution={size} is invalid: must be a multiple of {self.adapter.vae_scale_factor}")
        self.size = size
        self._load_image = lambda i: load_image(data.samples[i].image, size)
        self.latent_cache: torch.Tensor | None = None
        if cfg.cache_latents:
            self.latent_cache = self._encode_indices(list(range(len(data.samples))), chunk=16)
        captions = sorted({s.caption for s in data.samples} | {""})
        self.text_cache = None
        self.ref_text_cache = None
        if not cfg.train_text_encoder:
            with torch.no_grad():
                cond = self.adapter.encode_prompt(captions, self.size, self.size)
            self.text_cache = {c: cond.select([i]) for i, c in enumerate(captions)}
        else:
            with torch.no_grad(), self.adapter.reference():
                cond = self.adapter.encode_prompt(captions, self.size, self.size)
            self.ref_text_cache = {c: cond.select([i]) for i, c in enumerate(captions)}

    @torch.no_grad()
    def _encode_indices(self, idx: list[int], chunk: int = 16) -> torch.Tensor:
        out = []
        for s in range(0, len(idx), chunk):
            imgs = torch.stack([self._load_image(i) for i in idx[s : s + chunk]]).to(self.dist.device)
            out.append(self.adapter.encode_images(imgs).float().cpu())
        return torch.cat(out)

    def _setup_anchors(self):
        cfg = self.cfg
        self.anchors = None
        if float(cfg.loss_params.get("anchor_weight", 0.0)) <= 0:
            return
        from popalign_core.models.sampling import SamplerConfig, sample

        key = hashlib.sha256(
            json.dumps(
                [
                    cfg.model,
                    cfg.seed,
                    list(cfg.anchor_prompts),
                    cfg.anchor_images_per_prompt,
                    cfg.anchor_sampler_steps,
                    cfg.anchor_guidance,
                    self.size,
                ]
            ).encode()
        ).hexdigest()[:16]
        path = self.out / f"anchors_{key}.safetensors"
        lat = None
        if path.is_file():
            try:
                lat = read_safetensors(path, "anchor cache", keys=["latents"])[0]["latents"]
            except ValueError as e:  # a damaged cache is only a cache: rebuild it
                self.log(f"[train] {e}; regenerating it")
        if lat is None:
            reqs = [(p, i) for p in cfg.anchor_prompts for i in range(cfg.anchor_images_per_prompt)]
            sc = SamplerConfig(
                steps=cfg.anchor_sampler_steps,
                guidance_scale=cfg.anchor_guidance,
                seed=cfg.seed,
                height=self.size,
                width=self.size,
                output="latents",
                batch_size=8,
            )
            with self.adapter.reference():  # the frozen reference model generates the anchors
                lat = sample(self.adapter, reqs, sc).float()
            if self.dist.main:
                save_safetensors({"latents": lat.contiguous()}, path)
        prompts = [p for p in cfg.anchor_prompts for _ in range(cfg.anchor_images_per_prompt)]
        with torch.no_grad(), self.adapter.reference():
            cond = self.adapter.encode_prompt(prompts, self.size, self.size)
        self.anchors = (lat, cond)  # the frozen reference's conditioning
        self.anchor_prompts = prompts

    # -------------------------------------------------------------------------------------------- batches
    def _global_batch(self, step: int, micro: int) -> tuple[list[int], list[int]]:
        """(sample indices, labels) of the global batch of one micro-step, drawn from (seed, step, micro) only."""
        cfg = self.cfg
        g = _step_generator(cfg.seed, step, micro, 0)
        n = cfg.batch_size * self.dist.world
        if LOSSES[cfg.loss].pairwise:
            pick = torch.randint(0, len(self.pairs), (n,), generator=g).tolist()
            return [self.pairs[k][0] for k in pick] + [self.pairs[k][1] for k in pick], [1] * n + [-1] * n
        if cfg.population_sampling == "balanced" and self.win_idx and self.lose_idx:
            nw = (n + 1) // 2
            w = [self.win_idx[k] for k in torch.randint(0, len(self.win_idx), (nw,), generator=g).tolist()]
            lo = [self.lose_idx[k] for k in torch.randint(0, len(self.lose_idx), (n - nw,), generator=g).tolist()]
            idx = w + lo
        else:
            idx = torch.randint(0, len(self.data.samples), (n,), generator=g).tolist()
        perm = torch.randperm(len(idx), generator=g).tolist()
        idx = [idx[k] for k in perm]
        return idx, [self.data.samples[i].label for i in idx]

    def _mine(self, n_global: int) -> list[int]:
        """Positions of the global batch this process handles (pairwise: positions of its pairs' winners and losers,
        winners first, so the k-th +1 is still paired with the k-th -1)."""
        r, w = self.dist.rank, self.dist.world
        if LOSSES[self.cfg.loss].pairwise:
            n = n_global // 2
            mine = list(range(r, n, w))
            return mine + [n + k for k in mine]
        return list(range(r, n_global, w))

    def _micro_step(self, step: int, micro: int):
        from popalign_core.models.adapter import Conditioning
        from popalign_core.train.objective import Anchor, preference_loss, shared_noise_and_timesteps

        cfg = self.cfg
        g_idx, g_label = self._global_batch(step, micro)
        # every random draw is made for the GLOBAL batch from (seed, step, micro), then sharded: N processes with
        # batch b reproduce one process with batch N*b up to float summation order
        g = _step_generator(cfg.seed, step, micro, 1)
        latent_shape = (len(g_idx), self.adapter.latent_channels, self.size // self.adapter.vae_scale_factor) + (
            self.size // self.adapter.vae_scale_factor,
        )
        noise, tsteps = shared_noise_and_timesteps(
            torch.tensor(g_label), latent_shape, self.adapter.num_train_timesteps, g, pair=True
        )
        captions = [self.data.samples[i].caption for i in g_idx]
        if cfg.caption_dropout > 0:
            drop = torch.rand(len(g_idx), generator=g) < cfg.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        anchor_pick = None
        if self.anchors is not None:
            na = cfg.anchor_batch_size * self.dist.world
            anchor_pick = torch.randint(0, self.anchors[0].shape[0], (na,), generator=g).tolist()
            a_noise, a_t = shared_noise_and_timesteps(
                torch.ones(na), (na,) + latent_shape[1:], self.adapter.num_train_timesteps, g, pair=False
            )
        mine = self._mine(len(g_idx))
        if not mine:
            return None
        idx = [g_idx[k] for k in mine]
        label = [g_label[k] for k in mine]
        captions = [captions[k] for k in mine]
        dev = self.dist.device
        if self.latent_cache is not None:
            latents = self.latent_cache[idx].to(dev)
        else:
            latents = self._encode_indices(idx).to(dev)
        latents = latents.to(self.adapter.dtype)
        ref_cond = None
        if self.text_cache is not None:
            cond = Conditioning.cat([self.text_cache[c] for c in captions]).to(dev)
        else:
            cond = self.adapter.encode_prompt(captions, self.size, self.size)
            ref_cond = Conditioning.cat([self.ref_text_cache[c] for c in captions]).to(dev)
        anchor = None
        if anchor_pick is not None:
            lat, acond = self.anchors
            r, w = self.dist.rank, self.dist.world
            ka = list(range(r, len(anchor_pick), w))
            k = [anchor_pick[j] for j in ka]
            ref_acond = acond.select(k).to(dev)
            # a trained text encoder conditions the trained model's anchor prediction too (else the anchor could
            # not hold what the text-encoder LoRA changes); the reference keeps the frozen encoder's conditioning
            acond_k = ref_acond if self.text_cache is not None else self.adapter.encode_prompt(
                [self.anchor_prompts[j] for j in k], self.size, self.size)  # fmt: skip
            anchor = Anchor(lat[k].to(dev, self.adapter.dtype), acond_k, ref_cond=ref_acond)
            anchor.noise, anchor.timesteps = a_noise[ka].to(dev), a_t[ka].to(dev)
        reduce = self.dist.sum if self.dist.world > 1 else None
        with self.dist.autocast():
            out = preference_loss(
                self.adapter,
                latents,
                cond,
                torch.tensor(label, device=dev),
                cfg.loss,
                generator=g,
                anchor=anchor,
                reduce=reduce,
                ref_cond=ref_cond,
                noise=noise[mine],
                timesteps=tsteps[mine],
                **cfg.loss_params,
            )
        return out

    # -------------------------------------------------------------------------------------------- checkpoints
    def _ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def _save_checkpoint(self, step: int) -> None:
        if not self.dist.main:
            return
        tensors = {f"param.{k}": v for k, v in self._trainable_state().items()}
        sd = self.opt.state_dict()
        scalars: dict = {"param_groups": sd["param_groups"], "state": {}}
        name_of = {i: n for i, n in enumerate(self.param_names)}
        for i, st in sd["state"].items():
            sc = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    tensors[f"opt.{name_of[int(i)]}.{k}"] = v.detach().cpu().contiguous()
                else:
                    sc[k] = float(v) if isinstance(v, torch.Tensor) else v
            scalars["state"][str(i)] = sc
        meta = {
            "step": step,
            "fingerprint": self.cfg.fingerprint(),
            "optimizer": scalars,
            "config": self.cfg.to_dict(),
        }
        with atomic_path(self._ckpt_dir() / f"step_{step:08d}") as tmp:  # the folder appears complete or not at all
            tmp.mkdir()
            save_safetensors(tensors, tmp / "state.safetensors")
            atomic_write_text(tmp / "trainer_state.json", json.dumps(meta, default=str), fsync=True)
        ckpts = [p for p in self._checkpoints() if self._only_checkpoint(p)]
        for old in ckpts[: max(0, len(ckpts) - max(1, self.cfg.keep_checkpoints))]:
            gone = temporary_name(old, ".old")  # renamed first: a kill mid-delete leaves no half checkpoint
            os.replace(old, gone)
            shutil.rmtree(gone, ignore_errors=True)

    def _latest_checkpoint(self) -> Path | None:
        ckpts = self._checkpoints()
        return ckpts[-1] if ckpts else None

    def _checkpoints(self) -> list[Path]:
        """The checkpoint folders (`step_<8 digits>` holding trainer_state.json), oldest first; never a symlink."""
        return sorted(
            p
            for p in self._ckpt_dir().glob("step_*")
            if re.fullmatch(r"step_\d{8}", p.name) and not p.is_symlink() and (p / "trainer_state.json").is_file()
        )

    @staticmethod
    def _only_checkpoint(p: Path) -> bool:
        """A checkpoint folder holding nothing but what `_save_checkpoint` writes (only such a folder is rotated out;
        one with anything else in it is kept)."""
        return {c.name for c in p.iterdir()} <= {"state.safetensors", "trainer_state.json"}

    def _find_resume(self) -> Path | None:
        r = self.cfg.resume
        if r in (None, "", "none", False):
            return None
        if r == "auto":
            latest = self._latest_checkpoint()
            broken = [p for p in self._ckpt_dir().glob("step_*") if p.is_dir() and p not in self._checkpoints()]
            broken = [p for p in broken if latest is None or p.name > latest.name]
            if broken:
                self.log(f"[{self.COMMAND}] warning: checkpoint folder {max(broken)} is incomplete (no "
                         f"trainer_state.json); resuming from {latest or 'the start'}")  # fmt: skip
            return latest
        p = Path(r)
        if not (p / "trainer_state.json").is_file():
            raise FileNotFoundError(f"resume={r!r}: {p / 'trainer_state.json'} does not exist")
        return p

    def _resume_hint(self, path: Path) -> str:
        older = [p for p in self._checkpoints() if p.name < path.name]
        alt = (
            f"resume from the older checkpoint with --resume {older[-1]}" if older else "start over with --resume none"
        )
        return f"{alt}, or delete {path} (resume=auto then takes the one before it)"

    def _load_checkpoint(self, path: Path) -> int:
        hint = self._resume_hint(path)
        try:
            meta = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            meta["fingerprint"], meta["optimizer"]["param_groups"], int(meta["step"])  # noqa: B018 - shape check
        except (ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"checkpoint file {path / 'trainer_state.json'} is damaged ({e}); {hint}") from None
        legacy = config_fingerprint(self.cfg.to_dict(), paths_as_given=True)
        if meta["fingerprint"] not in (self.cfg.fingerprint(), legacy):
            raise TrainingError(
                f"checkpoint {path} was written by a run with a different configuration; use another output_dir "
                "or resume=none to start over"
            )
        tensors, _ = read_safetensors(path / "state.safetensors", "training checkpoint", hint)
        missing = [n for n in self.param_names if f"param.{n}" not in tensors]
        if missing:
            raise TrainingError(f"training checkpoint {path} lacks {len(missing)} trained tensor(s), e.g. "
                                f"{missing[0]!r}; {hint}")  # fmt: skip
        named = {n: p for rn, r in self._roots() for n, p in ((f"{rn}.{k}", v) for k, v in r.named_parameters())}
        with torch.no_grad():
            for n in self.param_names:
                named[n].copy_(tensors[f"param.{n}"])
        sd = {"param_groups": meta["optimizer"]["param_groups"], "state": {}}
        for i, n in enumerate(self.param_names):
            sc = meta["optimizer"]["state"].get(str(i))
            if sc is None:
                continue
            st = {k: torch.tensor(v) for k, v in sc.items()}
            for key, v in tensors.items():
                if key.startswith(f"opt.{n}."):
                    st[key[len(f"opt.{n}.") :]] = v
            sd["state"][i] = st
        self.opt.load_state_dict(sd)
        return int(meta["step"])

    # -------------------------------------------------------------------------------------------- outputs
    def _save_outputs(self, step: int) -> dict[str, str]:
        from popalign_core.lora.files import lora_metadata, save_lora_formats

        if not self.dist.main:
            return {}
        cfg = self.cfg
        if cfg.full_finetune:
            path = self.out / f"{cfg.lora_name}_unet.safetensors"
            sd = {k: v.detach().cpu().contiguous() for k, v in self.adapter.unet.state_dict().items()}
            save_safetensors(sd, path, metadata={"loss": cfg.loss, "step": str(step)})
            return {"unet": str(path)}
        meta = lora_metadata(
            loss=cfg.loss,
            hyperparameters={**loss_config(cfg.loss, **cfg.loss_params).__dict__, "lr": cfg.lr, "steps": step},
            base_model_hash=self.base_hash,
            data_hash=self.data_hash,
            popalign_step=str(step),
        )
        targets = {
            fmt: self.out / (f"{cfg.lora_name}.safetensors" if fmt == "kohya" else f"{cfg.lora_name}_diffusers")
            for fmt in cfg.lora_formats
        }
        return save_lora_formats(self.adapter, targets, metadata=meta)  # every layout from the same step, as one

    def _plot(self, rows: list[dict]) -> None:
        if not self.dist.main or not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{self.cfg.loss} loss")
        ax.set_title(f"{self.cfg.loss}: {Path(self.cfg.data).name}")
        fig.tight_layout()
        with atomic_path(self.out / "loss_curve.png") as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        from popalign_core.lora.files import model_hash

        cfg = self.cfg
        t0 = time.time()
        self._claim_output()
        self._setup_model()
        self.base_hash = model_hash(self.adapter.unet) if not cfg.full_finetune else ""
        self._setup_data()
        self.data_hash = self.data.sha256()
        self._setup_anchors()
        self._setup_optimizer()
        start, rows, bar = self._begin("train", f"train {cfg.loss}")
        step = start
        try:
            for step in range(start + 1, cfg.steps + 1):
                ts = time.time()
                self.opt.zero_grad(set_to_none=True)
                agg: dict[str, float] = {}
                for micro in range(cfg.grad_accum):
                    out = self._micro_step(step, micro)
                    finite = torch.tensor([1.0 if out is None or bool(torch.isfinite(out.loss)) else 0.0])
                    if float(self.dist.sum(finite)) < self.dist.world:
                        last = self._latest_checkpoint()
                        raise TrainingError(
                            f"loss is not finite (NaN/inf) at step {step}; nothing was saved for this step. "
                            f"Last good checkpoint: {last or 'none'}. Lower lr or beta, or check the data."
                        )
                    if out is None:
                        continue
                    self.dist.backward(out.loss / cfg.grad_accum)
                    for k, v in out.metrics.items():
                        agg[k] = agg.get(k, 0.0) + v / cfg.grad_accum
                if self.dist.world > 1:
                    flat = torch.cat(
                        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params]
                    )
                    flat = self.dist.sum(flat.float().cpu()) / self.dist.world
                    off = 0
                    for p in self.params:
                        n = p.numel()
                        p.grad = flat[off : off + n].view_as(p).to(p.device, p.dtype)
                        off += n
                self.dist.unscale(self.opt)
                grads_ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.params)
                gfin = torch.tensor([1.0 if grads_ok else 0.0])
                # with the fp16 gradient scaler an overflow is routine: the scaler skips that update, lowers its scale
                if float(self.dist.sum(gfin)) < self.dist.world and self.dist.scaler is None:
                    raise TrainingError(
                        f"gradients are not finite (NaN/inf) at step {step}; the update was not applied and nothing "
                        f"was saved for this step. Last good checkpoint: {self._latest_checkpoint() or 'none'}. "
                        "Lower lr or beta."
                    )
                grad_norm = 0.0
                if cfg.max_grad_norm > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
                self.dist.step(self.opt)
                if self.dist.world > 1:
                    keys = sorted(agg)
                    vals = self.dist.sum(torch.tensor([agg[k] for k in keys], dtype=torch.float64)) / self.dist.world
                    agg = dict(zip(keys, vals.tolist()))
                row = {"step": step, **agg, "grad_norm": grad_norm, "lr": cfg.lr, "step_seconds": time.time() - ts}
                self._record(step, row, rows, bar)
                self.dist.barrier()
        except BaseException as exc:
            self._on_stop(exc, rows, start)
            raise
        finally:
            if bar is not None:
                bar.close()
        self._save_checkpoint(step)
        written = self._save_outputs(step)
        self._plot(rows)
        self.dist.barrier()
        summary = {
            "steps": step,
            "resumed_from": start,
            "loss": cfg.loss,
            "first_loss": rows[0].get("loss") if rows else None,
            "last_loss": rows[-1].get("loss") if rows else None,
            "outputs": written,
            "seconds": round(time.time() - t0, 2),
            "processes": self.dist.world,
        }
        if self.dist.main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary

    def _record(self, step: int, row: dict, rows: list[dict], bar) -> None:
        """After a step: metrics row (kept, logged), progress bar, periodic checkpoint, then `on_step` (which may
        raise to cancel: the step is already recorded)."""
        rows.append(row)
        if self.dist.main:
            self._append_metrics(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}")
        if self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0 and step < self.cfg.steps:
            self._save_checkpoint(step)
        if self.on_step is not None:
            self.on_step(step, self.cfg.steps, row)

    def _on_stop(self, exc: BaseException, rows: list[dict], start: int) -> None:
        """A run stopped by an exception: a cancel (on_step, Ctrl-C) keeps a resumable checkpoint of the last finished
        step; a TrainingError (NaN...) saves nothing for the failed step."""
        done = rows[-1]["step"] if rows and rows[-1]["step"] > start else start
        if done > start and not isinstance(exc, TrainingError):
            self._save_checkpoint(done)

    def _begin(self, tag: str, desc: str):
        """Resume (cfg.resume), metrics truncated to the resumed step, config.yaml, progress bar:
        (start step, metric rows so far, tqdm bar or None)."""
        start = 0
        ck = self._find_resume()
        if ck is not None:
            start = self._load_checkpoint(ck)
            self.log(f"[{tag}] resumed from {ck} at step {start}")
        rows = self._read_metrics(start)
        if self.dist.main:
            atomic_write_text(self.out / "config.yaml", _to_yaml(self.cfg.to_dict()))
        bar = None
        if self.cfg.progress and self.dist.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, initial=start, desc=desc, file=sys.stderr)
        return start, rows, bar

    # metrics files: JSONL (every key) and CSV (columns fixed by the first row), truncated to the resumed step
    def _read_metrics(self, upto: int) -> list[dict]:
        p = self.out / "metrics.jsonl"
        rows = []
        if p.is_file():
            for ln in p.read_text().splitlines():
                try:
                    r = json.loads(ln)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed run
                if isinstance(r, dict) and r.get("step", upto + 1) <= upto:
                    rows.append(r)
        self._csv_cols = None
        if self.dist.main:
            atomic_write_text(p, "".join(json.dumps(r) + "\n" for r in rows))
            self._write_csv(rows)
        return rows

    def _append_metrics(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._csv_cols is None:
            self._write_csv([row])
            return
        with open(self.out / "metrics.csv", "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._csv_cols, extrasaction="ignore").writerow(
                {k: row.get(k, "") for k in self._csv_cols}
            )

    def _write_csv(self, rows: list[dict]) -> None:
        if not rows:
            self._csv_cols = None
            (self.out / "metrics.csv").unlink(missing_ok=True)
            return
        cols = ["step", "loss"] + sorted({k for r in rows for k in r} - {"step", "loss"})
        self._csv_cols = cols
        with atomic_path(self.out / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in cols})

    COMMAND = "train"

    @property
    def OUTPUTS(self) -> dict:  # noqa: N802 - the layout of this run (its lora_name)
        return train_outputs(self.cfg.lora_name)

    @staticmethod
    def SIGNATURE(folder: Path) -> bool:  # noqa: N802 - how a run of an older version (no marker yet) is recognised
        """The run's config.yaml (a mapping with the model, data or prompts, and the run name) and metrics.jsonl:
        what every run writes first."""
        try:
            cfg = read_yaml(folder / "config.yaml", "config file")
        except (OSError, ValueError):
            return False
        return isinstance(cfg, dict) and {"model", "lora_name"} <= set(cfg) and (folder / "metrics.jsonl").is_file()

    def _claim_output(self) -> None:
        """The output folder is this command's (new, empty, or an earlier run's: `fileio.claim_output_dir`); then the
        temporaries and half-finished publications a killed run left are cleaned up / completed."""
        if self.dist.main:
            claim_output_dir(self.out, self.COMMAND, self.OUTPUTS, arg="output_dir", signature=self.SIGNATURE)
            for p in (self._ckpt_dir(), self._ckpt_dir().parent):
                if p.is_symlink():
                    raise ValueError(f"output_dir: {p} is a symbolic link; the trainer writes and deletes "
                                     "checkpoints there: use a real folder")  # fmt: skip
            clean_temporaries(self._ckpt_dir())  # (the output folder's own: claim_output_dir)
            for p in self._ckpt_dir().glob(".tmp_step_*"):  # the temporaries of older versions
                shutil.rmtree(p, ignore_errors=True)
        self.dist.barrier()
        self.out.mkdir(parents=True, exist_ok=True)


def _to_yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


def train(cfg: TrainConfig | None = None, log=None, adapter=None, on_step=None, **overrides) -> dict:
    """Run a training job: `train(TrainConfig(...))` or `train(model=..., data=..., loss=...)`."""
    if cfg is None:
        cfg = load_config(None, **overrides)
    elif overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return Trainer(cfg, log=log, adapter=adapter, on_step=on_step).run()


# ---------------------------------------------------------------------------------------------------- CLI
_parse_value = parse_value  # command-line values: YAML with YAML 1.2 floats (1e-4 is a number)


def build_parser():
    ap = ArgumentParser(
        prog="popalign train",
        description="Train a LoRA (or the full UNet) with a loss of the zoo. Every config key is also a flag.",
    )
    ap.add_argument("--config", help="YAML file with TrainConfig keys (flags override it)")
    ap.add_argument(
        "--loss-param", action="append", default=[], metavar="NAME=VALUE", help="set one loss hyper-parameter"
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "loss_params":
            continue
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if f.name == "loss":
            ap.add_argument(flag, choices=list(LOSSES), default=None, help=helptext)
        else:
            ap.add_argument(flag, type=flag_type(hints[f.name]), default=None, metavar="VALUE", help=helptext)
    return ap


@command("popalign train")
def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    overrides = {k: v for k, v in vars(a).items() if k not in ("config", "loss_param") and v is not None}
    base = {}
    if a.config:
        base = load_config(a.config).to_dict()
    lp = dict(base.get("loss_params", {}))
    for item in a.loss_param:
        if "=" not in item:
            raise ValueError(f"--loss-param {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        if not k.strip():
            raise ValueError(f"--loss-param {item!r}: expected NAME=VALUE")
        lp[k.strip()] = _parse_value(v)
    if overrides.get("loss") and overrides["loss"] != base.get("loss") and not a.loss_param:
        lp = {}  # switching the loss switches to its own defaults
    base.update(overrides)
    base["loss_params"] = lp
    cfg = load_config(None, **base)
    summary = Trainer(cfg).run()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
