"""The alignment trainer: LoRA (or full) fine-tuning with any loss of the zoo, resumable, multi-process.

    popalign train --config run.yaml [--lr 1e-4 --loss dpo --loss-param beta=2500 ...]

Design (see docs/training.md; resume, checkpoints, metrics and the run loop: `train.loop.TrainerBase`):
- LoRA via peft on the UNet (target modules configurable) and/or the text encoder(s). The reference prediction is
  the same network with the adapters disabled (no weight copy); full fine-tuning uses a frozen copy instead.
- Every random choice of a step (which samples, caption dropout, noise, timesteps) is drawn from generators seeded by
  (seed, step, micro-step, rank) (`_step_generator`), so a resumed run replays the steps of an uninterrupted one.
- Multi-process data parallelism: every process draws the same *global* batch for a step and takes its share
  (rank::world); gradients of the trainable parameters are averaged with an all-reduce; PopAlign's mu is the global
  statistic (sums and counts reduced over processes).
- A NaN/inf loss or gradient stops the run with a clear message (`TrainingError`); the last good checkpoint stays.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from popalign_core.common.fileio import (
    atomic_path,
    read_safetensors,
    save_safetensors,
)
from popalign_core.common.userinput import (
    ArgumentParser,
    command,
    parse_value,
)
from popalign_core.lora.files import LoraSpec, add_lora, lora_metadata, model_hash
from popalign_core.lora.inject import denoiser_targets
from popalign_core.models.adapter import FLOW_PREDICTION, Conditioning
from popalign_core.models.sampling import SamplerConfig, sample
from popalign_core.train.config import (  # noqa: F401 - re-exported: the module's public API
    MIXED_PRECISION,
    OPTIMIZERS,
    POPULATION_SAMPLING,
    TrainConfig,
    load_config,
)
from popalign_core.train.data import load_image, load_preference_data, pair_population
from popalign_core.train.loop import (  # noqa: F401 - re-exported
    TRAIN_OUTPUTS,
    TrainerBase,
    TrainingError,
    load_training_model,
    train_outputs,
)
from popalign_core.train.losses import LOSSES, flow_hparams, loss_config
from popalign_core.train.objective import Anchor, preference_loss, shared_noise_and_timesteps, timestep_sampler
from popalign_core.train.runconfig import (  # noqa: F401 - re-exported
    LORA_FORMAT_CHOICES,
    config_fingerprint,
    load_yaml_config,
)


# ---------------------------------------------------------------------------------------------------- helpers
def _step_generator(seed: int, *parts: int) -> torch.Generator:
    h = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "big") & ((1 << 63) - 1))


# ---------------------------------------------------------------------------------------------------- the trainer
class Trainer(TrainerBase):
    """Runs one training job described by a TrainConfig (module docstring). `run()` returns a summary dict."""

    COMMAND = "train"

    def _mixed_precision(self) -> str:
        return self.cfg.mixed_precision

    def _progress_desc(self) -> str:
        return f"train {self.cfg.loss}"

    def _summary_facts(self, rows: list[dict]) -> dict:
        return {"loss": self.cfg.loss}

    def setup(self) -> Trainer:
        self._setup_model()
        self.base_hash = model_hash(self.adapter.unet) if not self.cfg.full_finetune else ""
        self._setup_data()
        self.data_hash = self.data.sha256()
        self._setup_anchors()
        self._setup_optimizer()
        return self

    # -------------------------------------------------------------------------------------------- setup
    def _setup_model(self):
        cfg = self.cfg
        adapter = self._load_adapter()
        self.loss_params = self._loss_params(adapter)
        torch.manual_seed(cfg.seed)
        if cfg.full_finetune:
            frozen = copy.deepcopy(adapter.unet).requires_grad_(False).eval()
            flow = adapter.prediction_type == FLOW_PREDICTION
            setattr(adapter, "reference_transformer" if flow else "reference_unet", frozen)
            for m in [adapter.vae, *adapter.text_encoders]:
                m.requires_grad_(False)
            adapter.unet.requires_grad_(True)
        else:
            spec = LoraSpec(
                rank=cfg.lora_rank,
                alpha=float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank),
                unet_targets=denoiser_targets(cfg.unet_targets) if cfg.train_unet else None,
                text_encoder_targets=tuple(cfg.text_encoder_targets) if cfg.train_text_encoder else None,
            )
            add_lora(adapter, spec)
        if cfg.gradient_checkpointing:
            adapter.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for te in adapter.text_encoders:
                    te.gradient_checkpointing_enable()
        adapter.unet.train()
        self._set_trainable(p for p in adapter.trainable_parameters() if p.requires_grad)

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
        f = self.adapter.vae_scale_factor * getattr(self.adapter, "patch_size", 1)  # SD3 / FLUX: 2x2 patches
        if size % f:
            what = f" ({self.adapter.family}: VAE factor x patch size)" if f != self.adapter.vae_scale_factor else ""
            raise ValueError(f"resolution={size} is invalid: must be a multiple of {f}{what}")
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

    def _loss_params(self, adapter) -> dict:
        """The loss hyper-parameters of this run: the config's, with an unset beta restated for velocity errors on
        a flow model (`losses.flow_hparams`: beta_v = beta_eps * E[(1 - sigma)^2])."""
        cfg = self.cfg
        scale = getattr(adapter, "beta_scale", None)
        if not callable(scale):
            return dict(cfg.loss_params)
        params = flow_hparams(cfg.loss, cfg.loss_params, scale())
        if params.get("beta") != cfg.loss_params.get("beta"):
            self.log(f"[train] {adapter.family}: flow model, beta = {params['beta']:.6g} (the {cfg.loss} default x "
                     f"E[(1 - sigma)^2] = {scale():.4f}; set loss_params.beta to choose another)")  # fmt: skip
        return params

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
        cfg = self.cfg
        g_idx, g_label = self._global_batch(step, micro)
        # every random draw is made for the GLOBAL batch from (seed, step, micro), then sharded: N processes with
        # batch b reproduce one process with batch N*b up to float summation order
        g = _step_generator(cfg.seed, step, micro, 1)
        latent_shape = (len(g_idx), self.adapter.latent_channels, self.size // self.adapter.vae_scale_factor) + (
            self.size // self.adapter.vae_scale_factor,
        )
        noise, tsteps = shared_noise_and_timesteps(
            torch.tensor(g_label), latent_shape, timestep_sampler(self.adapter), g, pair=True
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
                torch.ones(na), (na,) + latent_shape[1:], timestep_sampler(self.adapter), g, pair=False
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
                **self.loss_params,
            )
        return out

    # -------------------------------------------------------------------------------------------- outputs
    def _save_outputs(self, step: int) -> dict[str, str]:
        cfg = self.cfg
        if cfg.full_finetune:
            path = self.out / f"{cfg.lora_name}_unet.safetensors"
            sd = {k: v.detach().cpu().contiguous() for k, v in self.adapter.unet.state_dict().items()}
            save_safetensors(sd, path, metadata={"loss": cfg.loss, "step": str(step)})
            return {"unet": str(path)}
        meta = lora_metadata(
            loss=cfg.loss,
            hyperparameters={**loss_config(cfg.loss, **self.loss_params).__dict__, "lr": cfg.lr, "steps": step},
            base_model_hash=self.base_hash,
            data_hash=self.data_hash,
            popalign_step=str(step),
        )
        return self._save_lora(meta)

    def _plot(self, rows: list[dict]) -> None:
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

    # -------------------------------------------------------------------------------------------- one step
    def _train_step(self, step: int) -> dict[str, float]:
        """Gradients of the step's `grad_accum` micro-batches (averaged over processes), clip, optimiser step."""
        cfg = self.cfg
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
        self._all_reduce_grads(mean=True)
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
        return {**agg, "grad_norm": grad_norm}


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
    TrainConfig.add_arguments(ap, choices={"loss": list(LOSSES)}, skip=("loss_params",))
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
