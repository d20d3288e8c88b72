"""Target distributions and OT distributional alignment (DAL + adjusted direct fine-tuning) on the user's MODEL."""

from __future__ import annotations

import json

from . import _common as C
from .train_nodes import run_training

DEFAULT_TARGET = '{"gender": {"female": 0.75, "male": 0.25}}'


def check_target(spec) -> dict:
    """Shape checks of a target spec ({axis: {class: p} or [p...]} or {joint: ...}); shares must sum to 1."""
    if not isinstance(spec, dict) or not spec:
        raise ValueError("target_json: expected a JSON object {axis: {class: share}}, e.g. " + DEFAULT_TARGET)
    if "joint" in spec:
        return spec
    for axis, probs in spec.items():
        vals = list(probs.values()) if isinstance(probs, dict) else probs
        if not isinstance(vals, list) or not vals or not all(isinstance(v, (int, float)) for v in vals):
            raise ValueError(f"target_json: axis {axis!r}: expected {{class: share}} with numbers, got {probs!r}")
        if any(v < 0 for v in vals) or abs(sum(vals) - 1.0) > 1e-6:
            raise ValueError(f"target_json: axis {axis!r}: shares must be >= 0 and sum to 1 (they sum to {sum(vals)})")
    return spec


class PopAlignTargetDistribution:
    DESCRIPTION = (
        "A target distribution over classifier classes: independent axes {axis: {class: share}}, a joint one "
        "{joint: {axes: [...], probs: {'c1|c2': p}}}, and optional per-prompt targets (conditional: identity-specific "
        "prompts that keep their identity). The sliders on the node edit the JSON and keep each axis summing to 1."
    )
    CATEGORY = C.category("alignment")
    FUNCTION = "run"
    RETURN_TYPES = (C.TARGET, "STRING")
    RETURN_NAMES = ("target", "target_json")
    OUTPUT_TOOLTIPS = (
        "the target, for Bias Metrics and Distributional Alignment",
        "the same target as JSON",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "target_json": C.tip(
                    "STRING", "target shares per axis, e.g. " + DEFAULT_TARGET, default=DEFAULT_TARGET, multiline=True
                ),  # fmt: skip
            },
            "optional": {
                "prompt_targets_json": C.tip(
                    "STRING",
                    'per-prompt targets (conditional), e.g. {"a photo of a '
                    'female doctor": {"gender": {"female": 1, "male": 0}}}; {} = none',
                    default="{}",
                    multiline=True,
                ),  # fmt: skip
            },
        }

    def run(self, target_json, prompt_targets_json="{}"):
        target = check_target(C.parse_json(target_json, "target_json"))
        pt = C.parse_json(prompt_targets_json, "prompt_targets_json", {}) or {}
        if not isinstance(pt, dict):
            raise ValueError("prompt_targets_json: expected a JSON object {prompt: {axis: {class: share}}}")
        for prompt, spec in pt.items():
            try:
                check_target(spec)
            except ValueError as exc:
                raise ValueError(f"prompt_targets_json[{prompt!r}]: {exc}") from None
        out = {"target": target, "prompt_targets": pt}
        return (out, json.dumps(out))


class PopAlignDistributionalAlignment:
    DESCRIPTION = (
        "Distributional alignment (OT dynamic targets, Eq. 6, with semantics and face-realism losses) trained by "
        "adjusted direct fine-tuning through ComfyUI's model: images are generated with gradient (DPM-Solver++), "
        "classified, and pushed towards the target. Saves a kohya LoRA in models/loras/popalign/."
    )
    CATEGORY = C.category("alignment")
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "STRING")
    RETURN_NAMES = ("model", "clip", "lora_path", "summary")
    OUTPUT_TOOLTIPS = (
        "the incoming MODEL with the trained LoRA applied",
        "the incoming CLIP with the LoRA applied (unchanged when the text encoder is not trained)",
        "the LoRA file: models/loras/popalign/<lora_name>.safetensors",
        "what was trained: steps, losses, resumed_from, run folder, memory (JSON)",
    )

    @classmethod
    def INPUT_TYPES(cls):
        from popalign_core.dal.dft import GRADIENTS
        from popalign_core.dal.embedders import EMBEDDERS
        from popalign_core.dal.trainer import TRAIN_TARGETS

        trainable = [t for t in TRAIN_TARGETS if t != "prefix"]
        return {
            "required": {
                "model": C.tip("MODEL", "the model to align (left untouched; the output carries the LoRA)"),
                "clip": C.tip("CLIP", "its text encoder"),
                "vae": C.tip("VAE", "its VAE (the gradient flows through its decoder)"),
                "prompts": C.tip(
                    "STRING",
                    "identity-neutral training prompts, one per line",
                    multiline=True,
                    default="a photo of a doctor\na photo of a nurse",
                ),  # fmt: skip
                "target": C.tip(C.TARGET, "target distribution (PopAlign Target Distribution)"),
                "classifier": C.tip(C.CLASSIFIER, "a differentiable classifier (fairface, clip, deepface, toy)"),
                "lora_name": C.tip("STRING", "file name in models/loras/popalign/", default="popalign_dal"),
                "train": C.tip(
                    trainable, "what gets a LoRA: text_encoder (patent default), unet or both", default="text_encoder"
                ),  # fmt: skip
                "steps": C.tip("INT", "optimiser steps", default=100, min=1, max=1000000),
                "learning_rate": C.tip(
                    "FLOAT",
                    "AdamW learning rate (patent: 5e-5)",
                    default=5e-5,
                    min=1e-8,
                    max=1.0,
                    step=1e-6,
                    round=False,
                ),  # fmt: skip
                "lora_rank": C.tip("INT", "LoRA rank (patent: 50)", default=50, min=1, max=256),
                "images_per_prompt": C.tip(
                    "INT", "N: images per prompt and step (the OT batch)", default=8, min=2, max=256
                ),  # fmt: skip
                "sampler_steps": C.tip(
                    "INT", "DPM-Solver++ steps of the generation with gradient", default=20, min=1, max=200
                ),  # fmt: skip
                "guidance": C.tip(
                    "FLOAT", "classifier-free guidance of that generation", default=7.5, min=0.0, max=30.0, step=0.1
                ),  # fmt: skip
                "gradient": C.tip(
                    list(GRADIENTS),
                    "gradient through the sampler: a1 (adjusted, Algorithm A.1), "
                    "solver (exact A_t = 1), exact (plain backprop)",
                    default="a1",
                ),  # fmt: skip
                "threshold": C.tip(
                    "FLOAT", "confidence threshold of the dynamic targets", default=0.8, min=0.01, max=1.0, step=0.01
                ),  # fmt: skip
                "embedder": C.tip(
                    ["none"] + list(EMBEDDERS),
                    "image embedder of the semantics-preserving loss "
                    "(weights in models/popalign/embedders/); none = no L_img",
                    default="none",
                ),  # fmt: skip
                "face_bank": C.tip(
                    ["none"] + C.folder_subdirs("popalign_face_banks"),
                    "folder of real faces in models/popalign/face_banks/ for the face-realism loss; none = off",
                ),  # fmt: skip
                "face_detection": C.tip(
                    "BOOLEAN",
                    "use the classifier's face detector (off: the whole image is the "
                    "face; for models that draw no faces)",
                    default=True,
                ),  # fmt: skip
                "resolution": C.tip("INT", "image side in pixels; 0 = native", default=0, min=0, max=4096, step=8),
                "micro_batch": C.tip(
                    "INT",
                    "images generated with gradient at once (0 = all N; lower = less memory)",
                    default=0,
                    min=0,
                    max=256,
                ),  # fmt: skip
                "seed": C.tip(
                    "INT", "seed of the LoRA init, prompt order and noise", default=0, min=0, max=0xFFFFFFFF
                ),  # fmt: skip
                "checkpoint_every": C.tip(
                    "INT", "steps between resumable checkpoints", default=25, min=1, max=1000000
                ),  # fmt: skip
                "restart": C.tip("BOOLEAN", "start over instead of resuming the same run", default=False),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, clip, vae, prompts, target, classifier, lora_name, train, steps, learning_rate, lora_rank,
              images_per_prompt, sampler_steps, guidance, gradient, threshold, embedder, face_bank, face_detection,
              resolution, micro_batch, seed, checkpoint_every, restart, unique_id=None):  # fmt: skip

        from popalign_core.dal.trainer import DALConfig, DALTrainer

        from .comfy_adapter import family_of

        name = C.safe_name(lora_name, "lora_name")
        if not isinstance(target, dict) or "target" not in target:
            raise ValueError("target: expected a PopAlign target (PopAlign Target Distribution)")
        family_of(model)
        emb = [] if embedder == "none" else [embedder]
        opts = dict(classifier.options)
        cfg = DALConfig(
            model="comfyui", prompts=C.prompt_lines(prompts), target=target["target"],
            prompt_targets=target.get("prompt_targets") or {}, threshold=float(threshold),
            classifier=classifier.name, classifier_weights=classifier.weights, classifier_options=opts,
            detector=(classifier.detector.name if (classifier.detector and face_detection) else None),
            embedders=emb, lambda_face=1.0 if face_bank != "none" else 0.0,
            face_bank=None if face_bank == "none" else C.resolve_subdir("popalign_face_banks", face_bank),
            face_embedder=emb[0] if emb else None, sampler_steps=int(sampler_steps), guidance_scale=float(guidance),
            gradient=gradient, resolution=int(resolution) or None, train=train, lora_rank=int(lora_rank),
            steps=int(steps), images_per_prompt=int(images_per_prompt), micro_batch=int(micro_batch),
            lr=float(learning_rate), seed=int(seed), lora_name=name, lora_formats=["kohya"],
            checkpoint_every=int(checkpoint_every), progress=False, resume="none" if restart else "auto",
        )  # fmt: skip
        if face_bank != "none" and not emb:
            raise ValueError("face_bank: the face-realism loss needs an embedder (choose one besides 'none')")
        return run_training("dal", DALTrainer, cfg, name, model, clip, vae, int(steps), bool(restart), unique_id)


NODE_CLASS_MAPPINGS = {
    "PopAlignTargetDistribution": PopAlignTargetDistribution,
    "PopAlignDistributionalAlignment": PopAlignDistributionalAlignment,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PopAlignTargetDistribution": "PopAlign Target Distribution",
    "PopAlignDistributionalAlignment": "PopAlign Distributional Alignment",
}
