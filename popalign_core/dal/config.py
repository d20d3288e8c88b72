"""`DALConfig`: a ``popalign dal`` run (a `RunConfig` plus the prompts and their target distribution, the OT
targets, the classifier, the embedders and weights of the losses, the DFT sampler and what is trained);
`load_dal_config` reads it from YAML, `build_target` turns its `target` into an `attributes.Target`."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import ClassVar

from popalign_core.classify.classifiers import CLASSIFIERS
from popalign_core.common import attributes as A
from popalign_core.common.fields import help_field as _help
from popalign_core.dal.dft import GRADIENTS, DFTConfig
from popalign_core.dal.ot import METHODS, MODES
from popalign_core.train.runconfig import RunConfig, bad, integer, load_yaml_config, one_of

TRAIN_TARGETS = {
    "text_encoder": "LoRA on the text encoder(s): attention and MLP (the patent's main setting)",
    "unet": "LoRA on the UNet attention layers",
    "both": "LoRA on the text encoder(s) and the UNet",
    "prefix": "a soft prompt prefix (textual inversion), prepended to every prompt",
}
#: DFTConfig field -> the DALConfig field that sets it (the same name where not listed; `negative_prompt`: none)
DFT_FIELDS = {"steps": "sampler_steps", "height": "resolution", "width": "resolution"}


def _num(lo=None, hi=None, lo_open=False):
    """A finite number (not a bool) in [lo, hi] (lo excluded when `lo_open`)."""

    def check(cfg, name):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            bad(cfg, name, "must be a finite number")
        if lo is not None and (v <= lo if lo_open else v < lo):
            bad(cfg, name, f"must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and v > hi:
            bad(cfg, name, f"must be <= {hi}")

    return check


def _threshold(cfg, name):
    v = cfg.threshold
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < float(v) <= 1:
        bad(cfg, name, "expected a confidence threshold C in (0, 1]")


def _classifier(cfg, name):
    if cfg.classifier not in CLASSIFIERS:
        bad(cfg, name, f"valid values: {', '.join(CLASSIFIERS)}")


def _prompt_targets(cfg, name):
    pt = cfg.prompt_targets
    if not isinstance(pt, dict) or not all(isinstance(k, str) and k.strip() and isinstance(v, dict)
                                           for k, v in pt.items()):  # fmt: skip
        bad(cfg, name, "expected a mapping {prompt: {axis: probabilities}}")


def _target(cfg, name):
    if not isinstance(cfg.target, dict) or not cfg.target:
        bad(cfg, name, "expected a non-empty mapping (see the help of `target`)")


def _embedders(cfg, name):
    if not isinstance(cfg.embedders, list):
        bad(cfg, name, "expected a list of embedder names")


@dataclass
class DALConfig(RunConfig):
    """A distributional-alignment run; YAML keys and CLI flags share the names (dashes for underscores)."""

    # model (redeclared fields: DAL's own default or help text)
    model: str = _help("base model: a checkpoint, a diffusers folder, 'toyworld' or 'tiny:<family>'", default="")
    model_config_dir: str | None = _help("diffusers config folder for a single-file checkpoint", default=None)
    prediction_type: str | None = _help("override the prediction type: epsilon or v_prediction", default=None)
    # prompts and target
    prompts: list = _help("neutral training prompts (or use prompts_file)", default_factory=list)
    prompts_file: str | None = _help("text file with one neutral training prompt per line", default=None)
    target: dict = _help(
        "target distribution: {axis: [p_1, ..., p_K] or {class: p}} (independent axes), or "
        "{joint: {axes: [a, b], probs: {'c1|c2': p, ...}}}; axes and classes are the classifier's",
        default_factory=dict,
    )
    prompt_targets: dict = _help(
        "prompts with their own target, merged per axis over `target`, e.g. {'a photo of a female doctor': "
        "{gender: [1, 0]}}: identity-specific prompts that must keep their identity while neutral prompts are "
        "aligned (they join the training prompts)",
        default_factory=dict,
    )
    neutral_share: float = _help(
        "with prompt_targets: the probability that a step's prompt is drawn from the neutral prompts", default=0.5
    )
    threshold: float = _help("confidence threshold C of the dynamic targets, in (0, 1]", default=0.8)
    ot_method: str = _help(f"expected-OT method: {', '.join(METHODS)}", default="exact")
    ot_mode: str = _help(f"several axes: {', '.join(MODES)}", default="per_axis")
    ot_draws: int = _help("target draws of the monte_carlo / fast methods", default=256)
    # classifier
    classifier: str = _help("attribute classifier (registry name; must be differentiable), e.g. toy, fairface",
                            default="toy")  # fmt: skip
    classifier_weights: str | None = _help("classifier weights (file or folder; default: the backend's)", default=None)
    classifier_options: dict = _help("extra classifier options, e.g. {which: train} for toy", default_factory=dict)
    detector: str | None = _help("face detector for non-toy classifiers (registry name; none = whole image)",
                                 default=None)  # fmt: skip
    # semantics and face realism
    embedders: list = _help("image-embedding providers of L_img (e.g. [clip, dinov2]; [] = no L_img)",
                            default_factory=lambda: ["toy"])  # fmt: skip
    embedder_weights: dict = _help("weights per embedder name (file or folder)", default_factory=dict)
    lambda_img1: float = _help("L_img weight where the target agrees with the original's class", default=8.0)
    lambda_img2: float = _help("L_img weight outside the face where it does not (patent: 0.2 x lambda_img1)",
                               default=1.6)  # fmt: skip
    lambda_img3: float = _help("L_img weight inside the face box where it does not (patent: 0.2 x lambda_img2)",
                               default=0.32)  # fmt: skip
    lambda_face: float = _help("weight of the face-realism loss (0 = off)", default=1.0)
    face_embedder: str | None = _help("embedder of L_face (default: the first of `embedders`)", default=None)
    face_bank: str | None = _help("folder of real face images (embeddings cached), or 'toy' (the toy world's bank)",
                                  default=None)  # fmt: skip
    face_own_threshold: float = _help(
        "use the original's own face as the L_face reference when it already has the target class with at least "
        "this confidence",
        default=0.9,
    )
    # sampler (DFT)
    sampler_steps: int = _help("DFT sampling steps (DPM-Solver++ ~20)", default=20)
    guidance_scale: float = _help("classifier-free guidance of the DFT sampler", default=7.5)
    scheduler: str = _help("DFT scheduler (deterministic)", default="dpmpp_2m")
    gradient: str = _help(f"gradient through the sampler: {', '.join(GRADIENTS)}", default="a1")
    checkpointing: bool = _help("gradient checkpointing of the UNet calls and the VAE decoder", default=True)
    resolution: int | None = _help("image side in pixels (default: the model's native size)", default=None)
    # what is trained
    train: str = _help(f"what is trained: {', '.join(TRAIN_TARGETS)}", default="text_encoder")
    lora_rank: int = _help("LoRA rank (patent: 50)", default=50)
    lora_alpha: float | None = _help("LoRA alpha (default: the rank)", default=None)
    unet_targets: list = _help(
        "UNet / transformer modules with a LoRA; default: the family's attention projections (DEFAULT_UNET_TARGETS)",
        default_factory=lambda: ["default"],
    )
    text_encoder_targets: list = _help(
        "text-encoder modules with a LoRA",
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    )
    prefix_tokens: int = _help("soft prefix length (train: prefix)", default=5)
    prefix_token: str = _help("placeholder token of the soft prefix", default="<popalign>")
    prefix_init: str = _help("text whose token embeddings initialise the prefix", default="person")
    # optimisation
    images_per_prompt: int = _help("N: images per prompt and step (the OT batch)", default=8)
    prompts_per_step: int = _help("prompts per step (each gets its own OT batch)", default=1)
    micro_batch: int = _help("images generated with gradient at once (0 = all of a prompt's N)", default=0)
    lr: float = _help("learning rate (patent: 5e-5, AdamW)", default=5e-5)
    seed: int = _help("seed: LoRA init, prompt order, noise, OT tie-breaking", default=0)
    # output
    output_dir: str = _help("output folder", default="runs/dal")
    lora_name: str = _help("file name stem of the saved LoRA / embedding", default="popalign_dal")
    lora_formats: list = _help("LoRA layouts: kohya, diffusers", default_factory=lambda: ["kohya", "diffusers"])
    checkpoint_every: int = _help("steps between resumable checkpoints (0 = only at the end)", default=25)
    keep_checkpoints: int = _help("recent checkpoints kept", default=2)
    resume: str | None = _help("'auto', a checkpoint folder, or none", default="auto")

    CHECKS: ClassVar[dict] = {
        **RunConfig.CHECKS,
        "train": one_of(tuple(TRAIN_TARGETS)),
        "classifier": _classifier,
        "threshold": _threshold,
        "ot_method": one_of(METHODS),
        "ot_mode": one_of(MODES),
        "gradient": one_of(tuple(GRADIENTS)),
        **dict.fromkeys(["lambda_img1", "lambda_img2", "lambda_img3", "lambda_face", "guidance_scale"], _num(lo=0)),
        **dict.fromkeys(["face_own_threshold", "neutral_share"], _num(lo=0, hi=1)),
        "prompt_targets": _prompt_targets,
        **dict.fromkeys(
            ["images_per_prompt", "prompts_per_step", "prefix_tokens", "ot_draws", "sampler_steps"], integer(1)
        ),  # fmt: skip
        "micro_batch": integer(0),
        "target": _target,
        "embedders": _embedders,
    }
    PLACE_AFTER: ClassVar[dict[str, str]] = {
        "prompts": "prediction_type",
        "train": "resolution",
        "prefix_tokens": "text_encoder_targets",
        "images_per_prompt": "steps",
    }

    def check_rules(self) -> None:
        if not isinstance(self.classifier_options, dict) or not isinstance(self.embedder_weights, dict):
            raise ValueError("classifier_options and embedder_weights must be mappings")
        if self.lambda_face > 0 and self.face_bank is None:
            why = "lambda_face > 0 needs a face bank folder (or 'toy'); set lambda_face: 0 to disable"
            bad(self, "face_bank", why)
        self.dft()  # the sampler settings, checked by DFTConfig

    def dft(self) -> DFTConfig:
        """The DFT sampler's settings: every DFTConfig field this config sets (`DFT_FIELDS`)."""
        names = {f.name: DFT_FIELDS.get(f.name, f.name) for f in dataclasses.fields(DFTConfig)}
        return DFTConfig(**{k: getattr(self, v) for k, v in names.items() if hasattr(self, v)})


def load_dal_config(path: str | os.PathLike | None = None, **overrides) -> DALConfig:
    """A DALConfig from a YAML file (optional) and keyword overrides; unknown keys are errors. `prompts_file` and
    `face_bank` written relative in the file are relative to the file."""
    return load_yaml_config(DALConfig, path, overrides, relative_keys=("prompts_file", "face_bank"))


# ------------------------------------------------------------------------------------------------ targets
def build_target(spec: dict, axes: dict[str, tuple[str, ...]]):
    """An `attributes.Target` over the classifier's `axes` from the config's `target` (see DALConfig.target)."""

    def axis(name):
        if name not in axes:
            raise ValueError(f"target: axis {name!r} is not an axis of the classifier; valid axes: {list(axes)}")
        return A.Axis(name, "classifier", tuple(axes[name]))

    if "joint" in spec:
        j = spec["joint"]
        if set(spec) != {"joint"} or not isinstance(j, dict) or set(j) != {"axes", "probs"}:
            raise ValueError("target: a joint target is {joint: {axes: [...], probs: ...}} and nothing else")
        return A.joint([axis(a) for a in j["axes"]], j["probs"])
    return A.per_axis({axis(a): v for a, v in spec.items()})
