"""Target distributions and OT distributional alignment (DAL + adjusted direct fine-tuning) on the user's MODEL."""

from __future__ import annotations

import json

from . import _common as C
from .train_nodes import check_flow_text_encoder, run_training

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


PROMPT_TARGETS_TIP = (
    'per-prompt targets (conditional), e.g. {"a photo of a female doctor": {"gender": {"female": 1, "male": 0}}}; '
    "{} = none"
)


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
        required = (
            C.STRING("target_json", "target shares per axis, e.g. " + DEFAULT_TARGET, DEFAULT_TARGET, multiline=True),
        )
        optional = (C.STRING("prompt_targets_json", PROMPT_TARGETS_TIP, "{}", multiline=True),)
        return C.input_types(required, optional)

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


GRADIENT_TIP = (
    "gradient through the sampler: a1 (adjusted, Algorithm A.1), solver (exact A_t = 1), exact (plain backprop); "
    "SD3 / FLUX: a1 runs as solver (A.1 needs a DDPM schedule; A_t = 1 is exact for their flow-Euler sampler)"
)
TRAIN_TIP = (
    "what gets a LoRA: text_encoder (patent default), unet or both; SD3 / FLUX MODELs: unet (the transformer) only"
)
SAMPLER_STEPS_TIP = "steps of the generation with gradient (DPM-Solver++; flow-Euler on SD3 / FLUX)"
GUIDANCE_TIP = "classifier-free guidance of that generation; FLUX.1-dev: its embedded guidance instead (typical 3.5)"
EMBEDDER_TIP = (
    "image embedder of the semantics-preserving loss (weights in models/popalign/embedders/); none = no L_img"
)
FACE_BANK_TIP = "folder of real faces in models/popalign/face_banks/ for the face-realism loss; none = off"
FACE_DETECTION_TIP = (
    "use the classifier's face detector (off: the whole image is the face; for models that draw no faces)"
)


class PopAlignDistributionalAlignment:
    DESCRIPTION = (
        "Distributional alignment (OT dynamic targets, Eq. 6, with semantics and face-realism losses) trained by "
        "adjusted direct fine-tuning through ComfyUI's model: images are generated with gradient (DPM-Solver++; "
        "flow-Euler on SD3 / FLUX, where the LoRA goes on the transformer), "
        "classified, and pushed towards the target. Saves a kohya LoRA in models/loras/popalign/."
    )
    CATEGORY = C.category("alignment")
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES, RETURN_NAMES, OUTPUT_TOOLTIPS = C.TRAINED_OUTPUTS

    @classmethod
    def INPUT_TYPES(cls):
        from popalign_core.dal.dft import GRADIENTS
        from popalign_core.dal.embedders import EMBEDDERS
        from popalign_core.dal.trainer import TRAIN_TARGETS

        trainable = [t for t in TRAIN_TARGETS if t != "prefix"]
        required = (
            C.LINK("model", "MODEL", "the model to align (left untouched; the output carries the LoRA)"),
            C.LINK("clip", "CLIP", "its text encoder"),
            C.LINK("vae", "VAE", "its VAE (the gradient flows through its decoder)"),
            C.row(
                "prompts",
                "STRING",
                "identity-neutral training prompts, one per line",
                multiline=True,
                default="a photo of a doctor\na photo of a nurse",
            ),
            C.LINK("target", C.TARGET, "target distribution (PopAlign Target Distribution)"),
            C.LINK("classifier", C.CLASSIFIER, "a differentiable classifier (fairface, clip, deepface, toy)"),
            C.STRING("lora_name", "file name in models/loras/popalign/", "popalign_dal"),
            C.CHOICE("train", trainable, TRAIN_TIP, default="text_encoder"),
            C.INT("steps", "optimiser steps", 100, 1, 1000000),
            C.FLOAT("learning_rate", "AdamW learning rate (patent: 5e-5)", 5e-5, 1e-8, 1.0, 1e-6, round=False),
            C.INT("lora_rank", "LoRA rank (patent: 50)", 50, 1, 256),
            C.INT("images_per_prompt", "N: images per prompt and step (the OT batch)", 8, 2, 256),
            C.INT("sampler_steps", SAMPLER_STEPS_TIP, 20, 1, 200),
            C.FLOAT("guidance", GUIDANCE_TIP, 7.5, 0.0, 30.0, 0.1),
            C.CHOICE("gradient", GRADIENTS, GRADIENT_TIP, default="a1"),
            C.FLOAT("threshold", "confidence threshold of the dynamic targets", 0.8, 0.01, 1.0, 0.01),
            C.CHOICE("embedder", ["none"] + list(EMBEDDERS), EMBEDDER_TIP, default="none"),
            C.CHOICE("face_bank", ["none"] + C.folder_subdirs("popalign_face_banks"), FACE_BANK_TIP),
            C.BOOLEAN("face_detection", FACE_DETECTION_TIP, True),
            C.INT("resolution", "image side in pixels; 0 = native", 0, 0, 4096, 8),
            C.INT("micro_batch", "images generated with gradient at once (0 = all N; lower = less memory)", 0, 0, 256),
            C.INT("seed", "seed of the LoRA init, prompt order and noise", 0, 0, 0xFFFFFFFF),
            C.INT("checkpoint_every", "steps between resumable checkpoints", 25, 1, 1000000),
            C.BOOLEAN("restart", "start over instead of resuming the same run", False),
        )
        return C.input_types(required, hidden={"unique_id": "UNIQUE_ID"})

    def train(self, model, clip, vae, target, classifier, unique_id=None, **settings):
        from popalign_core.dal.trainer import DALTrainer

        cfg = dal_config(model, target, classifier, **settings)
        return run_training("dal", DALTrainer, cfg, model, clip, vae, unique_id)


def dal_config(model, target, classifier, prompts, lora_name, train, steps, learning_rate, lora_rank, **more):
    """The core's DALConfig from the node's inputs (checked in widget order; an unsupported MODEL fails early)."""
    from popalign_core.dal.trainer import DALConfig

    name = C.safe_name(lora_name, "lora_name")
    if not isinstance(target, dict) or "target" not in target:
        raise ValueError("target: expected a PopAlign target (PopAlign Target Distribution)")
    flow = check_flow_text_encoder(model, "train", train, train != "unet", "'unet'")
    emb = [] if more["embedder"] == "none" else [more["embedder"]]
    bank = more["face_bank"]
    detector = classifier.detector.name if (classifier.detector and more["face_detection"]) else None
    cfg = DALConfig(
        model="comfyui",
        prompts=C.prompt_lines(prompts),
        target=target["target"],
        prompt_targets=target.get("prompt_targets") or {},
        threshold=float(more["threshold"]),
        classifier=classifier.name,
        classifier_weights=classifier.weights,
        classifier_options=dict(classifier.options),
        detector=detector,
        embedders=emb,
        lambda_face=1.0 if bank != "none" else 0.0,
        face_bank=None if bank == "none" else C.resolve_subdir("popalign_face_banks", bank),
        face_embedder=emb[0] if emb else None,
        sampler_steps=int(more["sampler_steps"]),
        guidance_scale=float(more["guidance"]),
        **(flow_sampler(more["gradient"]) if flow else {"gradient": more["gradient"]}),
        resolution=int(more["resolution"]) or None,
        train=train,
        lora_rank=int(lora_rank),
        steps=int(steps),
        images_per_prompt=int(more["images_per_prompt"]),
        micro_batch=int(more["micro_batch"]),
        lr=float(learning_rate),
        seed=int(more["seed"]),
        lora_name=name,
        lora_formats=["kohya"],
        checkpoint_every=int(more["checkpoint_every"]),
        progress=False,
        resume="none" if more["restart"] else "auto",
    )
    if bank != "none" and not emb:
        raise ValueError("face_bank: the face-realism loss needs an embedder (choose one besides 'none')")
    return cfg


def flow_sampler(gradient: str) -> dict:
    """DALConfig's sampler of a flow model (SD3 / FLUX): the flow-Euler scheduler, and "solver" for "a1" (the core
    refuses both the DDPM / DPM-Solver++ schedulers and A.1 on flow models: A.1's C_t = 1/A_t comes from a DDPM
    training schedule; for flow-Euler, z_0 = z_T + sum_i (sigma_i+1 - sigma_i) v_i, so A_t = 1, i.e. "solver", is
    A.1's adjusted gradient made exact). UNet models keep the node's DPM-Solver++ default (their run keys too)."""
    if gradient == "a1":
        print("[PopAlign] DAL on an SD3 / FLUX MODEL: gradient 'a1' runs as 'solver' (A_t = 1, flow-Euler sampler)")
    return {"scheduler": "flow_euler", "gradient": "solver" if gradient == "a1" else gradient}


NODE_CLASS_MAPPINGS = {
    "PopAlignTargetDistribution": PopAlignTargetDistribution,
    "PopAlignDistributionalAlignment": PopAlignDistributionalAlignment,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PopAlignTargetDistribution": "PopAlign Target Distribution",
    "PopAlignDistributionalAlignment": "PopAlign Distributional Alignment",
}
