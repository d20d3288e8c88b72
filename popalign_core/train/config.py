"""`TrainConfig`: a ``popalign train`` run (a `RunConfig` plus the preference data, the loss, what is trained, the
batches and the prior-preservation anchors); `load_config` reads it from YAML."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from popalign_core.common.fields import help_field as _help
from popalign_core.train.losses import LOSSES, loss_config
from popalign_core.train.runconfig import RunConfig, bad, finite, integer, load_yaml_config, one_of

MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
POPULATION_SAMPLING = ("balanced", "uniform")


def _loss(cfg, name):
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss={cfg.loss!r} is not a known loss; valid values: {', '.join(LOSSES)}")


def _loss_params(cfg, name):
    if not isinstance(cfg.loss_params, dict):
        bad(cfg, name, "expected a mapping of hyper-parameter names to values")
    loss_config(cfg.loss, **cfg.loss_params)  # names and values checked by the loss's own config


def _caption_dropout(cfg, name):
    if not (isinstance(cfg.caption_dropout, int | float) and 0.0 <= cfg.caption_dropout < 1.0):
        bad(cfg, name, "must lie in [0, 1)")


@dataclass
class TrainConfig(RunConfig):
    """Everything a training run needs; YAML keys and CLI flags have the same names (dashes for underscores)."""

    # data
    data: str = _help("preference data manifest (.jsonl or .csv; see docs/data-format.md)", default="")
    data_kind: str | None = _help("pairwise or population (default: detected from the manifest columns)", default=None)
    # loss
    loss: str = _help(f"loss of the zoo: {', '.join(LOSSES)}", default="popalign")
    loss_params: dict = _help(
        "hyper-parameters of the loss; unset ones keep the loss's own defaults", default_factory=dict
    )
    # what is trained
    train_unet: bool = _help("train a LoRA on the UNet", default=True)
    train_text_encoder: bool = _help("train a LoRA on the text encoder(s) too (attention + MLP)", default=False)
    full_finetune: bool = _help("train every UNet weight instead of a LoRA (reference: a frozen copy)", default=False)
    # optimisation
    batch_size: int = _help("per step and process: pairs (pairwise losses) or images (population losses)", default=4)
    grad_accum: int = _help("micro-batches accumulated per optimiser step", default=1)
    optimizer: str = _help("adamw, or adamw8bit (bitsandbytes, when installed)", default="adamw")
    mixed_precision: str = _help("no, fp16 or bf16 (accelerate autocast)", default="no")
    gradient_checkpointing: bool = _help(
        "recompute the UNet / transformer blocks in backward to save memory (a memory switch: runs resume with it "
        "flipped; advised for SD3 / FLUX)",
        default=False,
    )
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

    CHECKS: ClassVar[dict] = {
        **RunConfig.CHECKS,
        "data_kind": one_of(("pairwise", "population"), none=True),
        "loss": _loss,
        "loss_params": _loss_params,
        "batch_size": integer(1),
        "grad_accum": integer(1),
        "optimizer": one_of(OPTIMIZERS),
        "mixed_precision": one_of(MIXED_PRECISION),
        "caption_dropout": _caption_dropout,
        "population_sampling": one_of(POPULATION_SAMPLING),
        "anchor_images_per_prompt": integer(1),
        "anchor_batch_size": integer(1),
        "anchor_sampler_steps": integer(0),
        "anchor_guidance": finite(0),
    }
    PLACE_AFTER: ClassVar[dict[str, str]] = {
        "data": "prediction_type",
        "loss": "resolution",
        "batch_size": "steps",
        "optimizer": "lr",
        "mixed_precision": "max_grad_norm",
    }

    def check_rules(self) -> None:
        if not self.train_unet and not self.train_text_encoder and not self.full_finetune:
            raise ValueError("train_unet, train_text_encoder and full_finetune are all false: nothing to train")
        if self.full_finetune and self.train_text_encoder:
            raise ValueError("full_finetune with train_text_encoder is not supported: choose one")
        if float(self.loss_params.get("anchor_weight", 0.0)) > 0 and not self.anchor_prompts:
            raise ValueError(
                "loss_params.anchor_weight > 0 needs anchor_prompts (prompts the reference generates from)"
            )


def load_config(path: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) and keyword overrides; unknown keys are errors."""
    return load_yaml_config(TrainConfig, path, overrides)
