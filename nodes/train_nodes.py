"""The LoRA trainer on the user's MODEL / CLIP (the core's loss zoo) and its helpers.

Memory: the core trains diffusers views that share ComfyUI's weight storage (nodes/comfy_adapter.py): no copy of the
UNet. Cancel: ComfyUI's progress bar raises on interrupt; the trainer then saves a resumable checkpoint of the last
finished step, and re-queuing the graph resumes from it. Runs live in output/popalign/train/<name>-<key>/, where
the key hashes the model (a sample of its weights and its upstream patches), the data and every setting but
`steps`: the same graph resumes (or, when finished, only re-exports), a changed setting starts a new run, and raising
`steps` continues a finished run.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from . import _common as C


def model_key(model, clip=None) -> str:
    """A cheap identity of a ComfyUI MODEL (+ CLIP): type, parameter shapes, 4 KiB of a spread of its tensors and its
    weight patches (e.g. LoRAs loaded upstream, with strengths)."""
    import torch

    h = hashlib.sha256()
    for mod in [model.model.diffusion_model] + ([clip.cond_stage_model] if clip is not None else []):
        items = list(mod.state_dict(keep_vars=True).items())
        h.update(f"{type(mod).__name__}:{len(items)}".encode())
        for name, t in items[:: max(1, len(items) // 16)]:
            flat = t.detach().reshape(-1)[:1024].to("cpu", torch.float32).contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(flat.numpy().tobytes())
    for patcher in [model] + ([clip.patcher] if clip is not None else []):
        for key in sorted(getattr(patcher, "patches", {})):
            for p in patcher.patches[key]:
                h.update(f"{key}:{p[0]}:{p[2] if len(p) > 2 else ''}".encode())
                w = p[1][0] if isinstance(p[1], tuple) and p[1] and hasattr(p[1][0], "shape") else None
                if w is not None:
                    h.update(w.detach().reshape(-1)[:256].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def publish_lora(src: Path, name: str) -> Path:
    """Copy the finished kohya file to <loras>/popalign/<name>.safetensors atomically (never a half-written file)."""
    dest_dir = C.loras_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{name}.safetensors"
    from popalign_core.common.fileio import atomic_copy

    atomic_copy(src, dest)
    try:
        import folder_paths

        folder_paths.filename_list_cache.pop("loras", None)  # the LoraLoader dropdown sees the new file
    except Exception:  # noqa: BLE001
        pass
    return dest


def apply_lora(model, clip, path: Path):
    """model.clone() / clip.clone() with the LoRA as weight patches (exactly what the stock LoraLoader does)."""
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)


def loss_curve_ui(run_dir: Path, rows: list[dict], node_id) -> dict:
    ui: dict = {"popalign_loss": [{"node": str(node_id), "rows": rows[-2000:]}]}
    png = run_dir / "loss_curve.png"
    if png.is_file():
        ui["images"] = [C.save_preview_png(png.read_bytes(), "popalign_loss")]
    return ui


def read_metric_rows(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append({k: r[k] for k in ("step", "loss") if k in r})
    return rows


def peak_memory() -> dict:
    import resource

    import torch

    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def model_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict(keep_vars=True).values())


class StepReporter:
    """on_step callback: progress bar (and cancel), websocket loss events for the live curve."""

    def __init__(self, total: int, node_id, start: int = 0):
        self.bar = C.Progress(total)
        self.node_id = str(node_id)
        self.bar.set(start)

    def __call__(self, step: int, total: int, row: dict) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        C.send(
            "popalign.loss",
            {"node": self.node_id, "step": step, "total": total, "loss": row.get("loss"), "metrics": metrics},
        )
        self.bar.set(step)  # ComfyUI's hook raises InterruptProcessingException here when the user cancels


LOSS_TIP = "training loss; its default hyper-parameters apply unless overridden in loss_params"
TEXT_ENCODER_TIP = (
    "also train a LoRA on the text encoder(s) (SD1.x / SD2.x / SDXL; an SD3 / FLUX MODEL trains the transformer "
    "only: leave it off)"
)
CHECKPOINTING = ("auto", "on", "off")
CHECKPOINTING_TIP = (
    "gradient checkpointing: recompute the denoiser's blocks in the backward pass instead of keeping their "
    "activations (much less memory, one more forward pass per step); auto = on for SD3 / FLUX (their activations "
    "would dominate a step's memory), off for SD1.x / SD2.x / SDXL; switching it keeps the run (resumes)"
)
LOSS_PARAMS_TIP = "JSON overrides of the loss's hyper-parameters, e.g. {\"beta\": 500}; {} = the loss's defaults"


class PopAlignLoRATrainer:
    DESCRIPTION = (
        "Trains a LoRA on the MODEL (and optionally the CLIP) with a loss of the core's zoo (PopAlign Eq. 11, DPO, "
        "RPO, DSPO, ...), reference = the same model with the LoRA disabled. Saves the kohya LoRA to "
        "models/loras/popalign/<lora_name>.safetensors (the stock LoraLoader reads it) and outputs the model with it "
        "applied; the incoming MODEL is untouched. Cancel keeps a checkpoint; re-queue resumes."
    )
    CATEGORY = C.category("train")
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES, RETURN_NAMES, OUTPUT_TOOLTIPS = C.TRAINED_OUTPUTS

    @classmethod
    def INPUT_TYPES(cls):
        from popalign_core.train.losses import LOSSES

        required = (
            C.LINK("model", "MODEL", "the model to fine-tune (left untouched; the output carries the LoRA)"),
            C.LINK("clip", "CLIP", "its text encoder (encodes captions; trained when train_text_encoder)"),
            C.LINK("vae", "VAE", "its VAE (encodes the training images)"),
            C.LINK("dataset", C.DATASET, "preference data (PopAlign Build / Load Preference Data)"),
            C.CHOICE("loss", LOSSES, LOSS_TIP, default="popalign"),
            C.STRING("loss_params", LOSS_PARAMS_TIP, "{}", multiline=True),
            C.STRING(
                "lora_name", "file name of the LoRA in models/loras/popalign/ (no path separators)", "popalign_lora"
            ),
            C.INT("steps", "optimiser steps (raising it continues a finished run)", 200, 1, 1000000),
            C.FLOAT("learning_rate", "AdamW learning rate", 1e-4, 1e-8, 1.0, 1e-5, round=False),
            C.INT("lora_rank", "LoRA rank", 8, 1, 256),
            C.INT("batch_size", "images (population losses) or pairs per step", 4, 1, 256),
            C.BOOLEAN("train_text_encoder", TEXT_ENCODER_TIP, False),
            C.INT("resolution", "training image side in pixels; 0 = the model's native size", 0, 0, 4096, 8),
            C.INT("seed", "seed of the LoRA init, batches, noise and timesteps", 0, 0, 0xFFFFFFFF),
            C.INT(
                "checkpoint_every", "steps between resumable checkpoints (a cancel always saves one)", 50, 1, 1000000
            ),
            C.BOOLEAN("restart", "ignore an existing checkpoint of the same run and start over", False),
        )
        optional = (C.CHOICE("gradient_checkpointing", CHECKPOINTING, CHECKPOINTING_TIP, default="auto"),)
        return C.input_types(required, optional, hidden={"unique_id": "UNIQUE_ID"})

    def train(self, model, clip, vae, dataset, loss, loss_params, lora_name, unique_id=None, **settings):
        from popalign_core.train.trainer import Trainer

        cfg = train_config(model, dataset, loss, loss_params, lora_name, **settings)
        return run_training("train", Trainer, cfg, model, clip, vae, unique_id)


def train_config(model, dataset, loss, loss_params, lora_name, **s):
    """The core's TrainConfig from the trainer node's inputs (checked first; an unsupported MODEL fails early)."""
    from popalign_core.train.trainer import TrainConfig

    name = C.safe_name(lora_name, "lora_name")
    params = C.parse_json(loss_params, "loss_params", {})
    if not isinstance(params, dict):
        raise ValueError('loss_params: expected a JSON object of hyper-parameters, e.g. {"beta": 500}')
    if not isinstance(dataset, dict) or "manifest" not in dataset:
        raise ValueError("dataset: expected a PopAlign data set (PopAlign Build / Load Preference Data)")
    te = bool(s["train_text_encoder"])
    flow = check_flow_text_encoder(model, "train_text_encoder", te, te, "False")
    ckpt = s.get("gradient_checkpointing", "auto")  # optional: graphs saved before it existed run as "auto"
    if ckpt not in CHECKPOINTING:
        raise ValueError(f"gradient_checkpointing: {ckpt!r} is not valid; valid: {', '.join(CHECKPOINTING)}")
    return TrainConfig(
        model="comfyui",
        data=dataset["manifest"],
        loss=loss,
        loss_params=params,
        steps=int(s["steps"]),
        lr=float(s["learning_rate"]),
        lora_rank=int(s["lora_rank"]),
        batch_size=int(s["batch_size"]),
        train_text_encoder=bool(s["train_text_encoder"]),
        gradient_checkpointing=ckpt == "on" or (ckpt == "auto" and flow),
        resolution=int(s["resolution"]) or None,
        seed=int(s["seed"]),
        lora_name=name,
        lora_formats=["kohya"],
        checkpoint_every=int(s["checkpoint_every"]),
        progress=False,
        resume="none" if s["restart"] else "auto",
        output_dir="",
    )


def check_flow_text_encoder(model, arg: str, value, text_encoder: bool, valid: str) -> bool:
    """Whether `model` is a flow model (SD3 / FLUX); an unsupported model type fails here (before anything else),
    and so does a text-encoder LoRA on a flow model: ComfyUI's CLIP encodes their prompts (CLIP-L / -G and T5-XXL;
    nodes/comfy_flow.py) and PopAlign does not train it. An error, not a silent transformer-only run: the CLIP output
    would not carry what the settings ask for, and the run folder key would name a run that never happened.
    `value`: the input's value as the message names it; `valid`: the value that works."""
    from popalign_core.models.families import FLOW_FAMILIES

    from .comfy_adapter import family_of, model_type_name

    family = family_of(model)
    if family in FLOW_FAMILIES and text_encoder:
        raise ValueError(
            f"{arg}={value!r}: the MODEL is {model_type_name(model)} ({family}), whose text encoders PopAlign does "
            f"not train in ComfyUI (its prompts go through ComfyUI's own CLIP); valid value: {arg}={valid} (a LoRA "
            "on the transformer)"
        )
    return family in FLOW_FAMILIES


def run_training(kind: str, trainer_cls, cfg, model, clip, vae, unique_id):
    """The shared body of the training nodes: run folder output/popalign/<kind>/<name>-<key> (see the module
    docstring), views of the MODEL, the core trainer with progress / cancel, then the LoRA published and applied.
    `cfg` (TrainConfig / DALConfig) names the LoRA (lora_name), the steps and restart (resume "none")."""
    import torch

    from popalign_core.train.trainer import config_fingerprint

    from .comfy_adapter import adapter_from_comfy, load_for_training

    # loaded first: ComfyUI 0.3.x leaves a model patched by the last sampler that used it (e.g. with another
    # branch's LoRA) until this patcher is loaded; the key then sees this MODEL's own weights
    load_for_training(model, clip.patcher if clip is not None else None, vae.patcher if vae is not None else None)
    name, steps, restart = cfg.lora_name, int(cfg.steps), cfg.resume == "none"
    key = hashlib.sha256(f"{model_key(model, clip)}:{config_fingerprint(cfg.to_dict())}".encode()).hexdigest()
    run_dir = C.output_root() / kind / f"{name}-{key[:10]}"
    cfg.output_dir, cfg.model = str(run_dir), f"comfyui:{key[:10]}"
    if restart and run_dir.exists():
        from popalign_core.common.fileio import clear_output_dir
        from popalign_core.train.trainer import train_outputs

        layout = train_outputs(cfg.lora_name)  # only the run's own files; else nothing is deleted
        clear_output_dir(run_dir, trainer_cls.COMMAND, layout, arg="run folder", signature=trainer_cls.SIGNATURE)
    t0 = time.time()
    start = _checkpoint_step(run_dir)
    with torch.inference_mode(False), torch.enable_grad():
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        adapter = adapter_from_comfy(model, clip, vae)
        size = model_bytes(adapter.unet, *adapter.text_encoders, adapter.vae)
        reporter = StepReporter(steps, unique_id, start)
        summary = trainer_cls(cfg, log=print, adapter=adapter, on_step=reporter).run()
        del adapter
    dest = publish_lora(Path(summary["outputs"]["kohya"]), name)
    out_model, out_clip = apply_lora(model, clip, dest)
    seconds = round(time.time() - t0, 2)
    summary.update(lora=str(dest), run_dir=str(run_dir), model_bytes=size, node_seconds=seconds, **peak_memory())
    from popalign_core.common.fileio import atomic_write_text

    atomic_write_text(run_dir / "node_summary.json", json.dumps(summary, indent=2))
    ui = loss_curve_ui(run_dir, read_metric_rows(run_dir), unique_id)
    return {"ui": ui, "result": (out_model, out_clip, str(dest), json.dumps(summary, indent=2))}


def _checkpoint_step(run_dir: Path) -> int:
    ck = sorted((run_dir / "checkpoints").glob("step_*")) if run_dir.exists() else []
    try:
        return int(ck[-1].name.split("_")[1]) if ck else 0
    except ValueError:
        return 0


class PopAlignLossDefaults:
    DESCRIPTION = "The default hyper-parameters of a loss of the zoo, as JSON (a starting point for loss_params)."
    CATEGORY = C.category("train")
    FUNCTION = "run"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("loss_params",)
    OUTPUT_TOOLTIPS = ("the loss's default hyper-parameters as JSON (edit them and feed loss_params)",)

    @classmethod
    def INPUT_TYPES(cls):
        from popalign_core.train.losses import LOSSES

        return C.input_types((C.CHOICE("loss", LOSSES, "loss of the zoo", default="popalign"),))

    def run(self, loss):
        from popalign_core.train.losses import loss_defaults

        return (json.dumps(loss_defaults(loss), indent=2),)


NODE_CLASS_MAPPINGS = {
    "PopAlignLoRATrainer": PopAlignLoRATrainer,
    "PopAlignLossDefaults": PopAlignLossDefaults,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PopAlignLoRATrainer": "PopAlign LoRA Trainer",
    "PopAlignLossDefaults": "PopAlign Loss Defaults",
}
