"""The trainer skeleton both trainers share (`TrainerBase`): the output folder, resume and checkpoints, metrics,
multi-process bookkeeping (`common.distributed.Distributed`), progress / ``on_step`` / cancel, and the `run` loop.
A trainer (the preference trainer `train.trainer.Trainer`, DAL's `dal.trainer.DALTrainer`) supplies `setup` (model,
trainable parameters `params` / `param_names`, optimiser `opt`), `_train_step` (one optimiser step: its metrics row),
`_save_outputs`, `_plot` and its summary facts.

- Every random choice of a step is drawn from generators seeded by (seed, step, ...), never from a carried RNG
  state: a resumed run replays exactly the steps an uninterrupted run would have taken, so a checkpoint only needs
  the trainable weights, the optimiser state and the step (`_save_checkpoint`; the configuration's `fingerprint`
  must match on resume).
- Checkpoints and final files are written to a temporary name and renamed: the output folder never holds a
  half-written file. A NaN/inf loss stops the run (`TrainingError`) and saves nothing for that step; a cancel
  (an exception of ``on_step``, Ctrl-C) keeps a resumable checkpoint of the last finished step (`_on_stop`).
- Metrics: one row per step in metrics.jsonl (every key) and metrics.csv (columns fixed by the first row), both
  truncated to the resumed step.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from popalign_core.common.distributed import Distributed
from popalign_core.common.fileio import (
    atomic_path,
    atomic_write_text,
    claim_output_dir,
    clean_temporaries,
    read_safetensors,
    save_safetensors,
    temporary_name,
)
from popalign_core.common.userinput import parse_value, read_yaml, user_error
from popalign_core.lora.files import save_lora_formats
from popalign_core.models.families import FLOW_FAMILIES
from popalign_core.models.loading import load_model
from popalign_core.train.runconfig import config_fingerprint


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


def load_training_model(cfg):
    """The model adapter for `cfg.model` (a checkpoint, a diffusers folder or 'tiny:<family>[:seed]')."""
    if cfg.model.startswith("tiny:"):
        from popalign_core.models.tiny import get_dummy_adapter

        for name in ("model_config_dir", "model_vae", "t5_tokenizer", "model_text_encoders"):
            if getattr(cfg, name) not in (None, []):
                raise ValueError(f"{name}: only used for single-file checkpoints and model folders; a tiny model is "
                                 "built from the package's own configs")  # fmt: skip
        parts = cfg.model.split(":")
        fam = parts[1]
        seed = parse_value(parts[2]) if len(parts) > 2 else 0
        if len(parts) > 3 or isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"model={cfg.model!r}: a tiny model is 'tiny:<sd15|sd2|sdxl|sd3|flux>[:<integer seed>]'")
        adapter = get_dummy_adapter(fam, seed=seed)
        if cfg.prediction_type is not None and fam in FLOW_FAMILIES:
            raise ValueError(
                f"prediction_type={cfg.prediction_type!r}: {fam} is a flow-matching model, it predicts the velocity; "
                "leave prediction_type unset"
            )
        if cfg.prediction_type is not None and cfg.prediction_type != adapter.prediction_type:
            from diffusers import DDPMScheduler

            adapter.noise_scheduler = DDPMScheduler.from_config(
                adapter.noise_scheduler.config, prediction_type=cfg.prediction_type
            )
        return adapter
    if not cfg.model:
        raise ValueError("model is empty: give a .safetensors checkpoint, a diffusers folder or 'tiny:sd15'")

    return load_model(
        cfg.model,
        family=cfg.family,
        prediction_type=cfg.prediction_type,
        config_dir=cfg.model_config_dir,
        text_encoders=cfg.model_text_encoders or None,
        vae=cfg.model_vae,
        t5_tokenizer=cfg.t5_tokenizer,
    )


# ---------------------------------------------------------------------------------------------------- the skeleton
class TrainerBase:
    """One training run of a `RunConfig`: `run()` returns a summary dict (subclasses: module docstring)."""

    COMMAND = "train"  # the command that owns the output folder (`fileio.claim_output_dir`) and the log tag

    def __init__(self, cfg, log=None, adapter=None, on_step=None):
        """adapter: an already loaded model adapter to train (e.g. ComfyUI's MODEL wrapped by the node pack);
        `cfg.model` is then only a label. It stays on its own device. on_step(step, total, metrics) is called
        after every step; an exception it raises (a cancel) stops the run after saving a resumable checkpoint of
        the last finished step, then propagates."""
        self.cfg = cfg.validate()
        if not str(cfg.output_dir).strip():
            raise ValueError("output_dir is empty: name the run's folder (an empty path would mean the current one)")
        self.out = Path(cfg.output_dir)
        self.dist = Distributed(self._mixed_precision())
        self.log = log or (lambda m: print(m, file=sys.stderr))
        self._given_adapter = adapter
        self.on_step = on_step

    # -------------------------------------------------------------------------------------- what a trainer supplies
    def _mixed_precision(self) -> str:
        return "no"

    def setup(self):
        """Everything before the first step: `adapter`, `params`, `param_names`, `opt`; returns self."""
        raise NotImplementedError

    def _train_step(self, step: int) -> dict[str, float]:
        """One optimiser step: its metrics (the row without step, lr and step_seconds)."""
        raise NotImplementedError

    def _save_outputs(self, step: int) -> dict[str, str]:
        """The final files (main process only): {kind: path}."""
        raise NotImplementedError

    def _save_lora(self, metadata: dict[str, str]) -> dict[str, str]:
        """This step's LoRA in every layout of ``cfg.lora_formats``, published as one step: {format: path}."""

        cfg = self.cfg
        targets = {
            fmt: self.out / (f"{cfg.lora_name}.safetensors" if fmt == "kohya" else f"{cfg.lora_name}_diffusers")
            for fmt in cfg.lora_formats
        }
        return save_lora_formats(self.adapter, targets, metadata=metadata)

    def _plot(self, rows: list[dict]) -> None:
        """The loss plot of the metric rows (main process only)."""

    def _summary_facts(self, rows: list[dict]) -> dict:
        """The trainer's own entries of the summary."""
        return {}

    def _progress_desc(self) -> str:
        return self.COMMAND

    # -------------------------------------------------------------------------------------------- shared setup
    def _load_adapter(self):
        """The model adapter (the given one, or `cfg.model` loaded and moved to this process's device)."""
        self.adapter = adapter = self._given_adapter or load_training_model(self.cfg)
        if self._given_adapter is None:
            for m in [adapter.unet, adapter.vae, *adapter.text_encoders]:
                m.to(self.dist.device)
        return adapter

    def _set_trainable(self, params) -> None:
        """`params` (the trainable tensors, in order) and their names under `_roots`."""
        self.params = list(params)
        self.param_names = [
            f"{rn}.{k}" for rn, r in self._roots() for k, p in r.named_parameters() if p.requires_grad
        ]  # fmt: skip
        if not self.params:
            raise TrainingError("no trainable parameter: check unet_targets / text_encoder_targets")

    def _roots(self):
        yield "unet", self.adapter.unet
        for i, te in enumerate(self.adapter.text_encoders):
            yield f"text_encoder{'' if i == 0 else '_2'}", te

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        named = {n: p for rn, r in self._roots() for n, p in ((f"{rn}.{k}", v) for k, v in r.named_parameters())}
        return {n: named[n].detach().cpu().contiguous() for n in self.param_names}

    def _all_reduce_grads(self, mean: bool) -> None:
        """Several processes: every parameter's gradient becomes the sum (`mean`: the average) over processes."""
        if self.dist.world == 1:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])
        flat = self.dist.sum(flat.float().cpu())
        if mean:
            flat = flat / self.dist.world
        off = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[off : off + n].view_as(p).to(p.device, p.dtype)
            off += n

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
        d = self.cfg.to_dict()
        legacy = {config_fingerprint(d, paths_as_given=True), config_fingerprint(d, switches_as_set=True),
                  config_fingerprint(d, paths_as_given=True, switches_as_set=True)}  # fmt: skip
        if meta["fingerprint"] != self.cfg.fingerprint() and meta["fingerprint"] not in legacy:
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

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        cfg = self.cfg
        t0 = time.time()
        self._claim_output()
        self.setup()
        start, rows, bar = self._begin()
        step = start
        try:
            for step in range(start + 1, cfg.steps + 1):
                ts = time.time()
                row = {"step": step, **self._train_step(step), "lr": cfg.lr, "step_seconds": time.time() - ts}
                self._record(step, row, rows, bar)
                self.dist.barrier()
        except BaseException as exc:
            self._on_stop(exc, rows, start)
            raise
        finally:
            if bar is not None:
                bar.close()
        self._save_checkpoint(step)
        written = self._save_outputs(step) if self.dist.main else {}
        if self.dist.main and rows:
            self._plot(rows)
        self.dist.barrier()
        summary = {
            "steps": step,
            "resumed_from": start,
            **self._summary_facts(rows),
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

    def _begin(self):
        """Resume (cfg.resume), metrics truncated to the resumed step, config.yaml, progress bar:
        (start step, metric rows so far, tqdm bar or None)."""
        start = 0
        ck = self._find_resume()
        if ck is not None:
            start = self._load_checkpoint(ck)
            self.log(f"[{self.COMMAND}] resumed from {ck} at step {start}")
        rows = self._read_metrics(start)
        if self.dist.main:
            atomic_write_text(self.out / "config.yaml", _to_yaml(self.cfg.to_dict()))
        bar = None
        if self.cfg.progress and self.dist.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, initial=start, desc=self._progress_desc(), file=sys.stderr)
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
