"""Offline model loading: a diffusers folder or a lone single-file ``.safetensors`` checkpoint -> `DiffusersAdapter`.

Single files (the format of ComfyUI's ``models/checkpoints/``, A1111, CivitAI) are loaded with diffusers'
own single-file conversion (`from_single_file`), configured from the small config folders shipped in
``popalign_core/configs/{sd15,sd2,sdxl}`` (official SD1.5, SD2.1-768 and SDXL-base-1.0 values), so nothing is
ever fetched from the hub. Tokenizers come from `popalign_core.models.tokenizers.clip_tokenizer` (one shipped CLIP BPE
vocabulary), never from the config folders: their ``model_index.json`` lists the tokenizers as null, so diffusers'
whole-pipeline ``from_single_file(path, config=<folder>, tokenizer=...)`` needs them passed in and raises without
(diffusers 0.42.1: a TypeError from its own error path). Listed as CLIPTokenizer with no ``tokenizer/`` folder,
diffusers would instead silently build a 2-token tokenizer.
The safety checker and feature extractor are null too. Pickle files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``)
are refused: nothing here ever unpickles.

Family detection (`detect_family`) reads only the checkpoint's key names (the safetensors header), by text encoder:
SDXL ``conditioner.embedders.1.model.``, SD2.x ``cond_stage_model.model.``, SD1.x ``cond_stage_model.transformer.``.
Keys cannot tell an SD2.x v-prediction model (768, e.g. SD2.1) from an epsilon one (SD2.x-base, 512): the shipped
sd2 config is v-prediction, so load SD2-base checkpoints with ``prediction_type="epsilon"``.

Flow models (SD3, FLUX): `load_model` returns a `FlowAdapter` (`models.loading_flow` builds the components,
`models.flow_parts` gathers them from the files). Files: a StableDiffusion3Pipeline / FluxPipeline diffusers folder,
or single files:

- all-in-one, the layout ComfyUI's CheckpointLoaderSimple reads: transformer ``model.diffusion_model.*`` (original
  MMDiT ``joint_blocks`` / BFL ``double_blocks``), VAE ``first_stage_model.*`` (SD3) or ``vae.*`` (FLUX), text
  encoders ``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*`` (SD3) and
  ``text_encoders.t5xxl.transformer.*`` (FLUX always; optional for SD3, which then runs without T5; ``t5=False``
  skips it);
- separate, as ComfyUI's UNETLoader / DualCLIPLoader / TripleCLIPLoader / VAELoader read them: the transformer file is
  `path` (BFL's ``flux1-dev.safetensors`` without the prefix, ``sd3.5_large.safetensors`` with it and maybe bundled
  encoders / VAE); ``text_encoders=[...]`` adds text-encoder files in the transformers layout (``clip_l``: CLIP
  ``text_model.*``, ``clip_g``: with ``text_projection.weight``, ``t5xxl``: ``shared.weight`` + ``encoder.block.*``;
  fp16, fp32, float8 (upcast when read) or ComfyUI's scaled fp8), each file's slot read from its keys and its width /
  depth against the config folder (CLIP-L 768, CLIP-G 1280, T5-XXL 4096 wide in the shipped configs); ``vae=`` a
  VAE file (LDM ``encoder.down.*`` / ``decoder.up.*``, e.g. FLUX's ``ae.safetensors``, or diffusers layout, with or
  without a ``first_stage_model.`` / ``vae.`` prefix). A component given separately replaces the bundled one; what
  is still missing is an error naming the file, the missing parts and which file to give (e.g. "FLUX needs clip_l
  and t5xxl text encoders and a VAE: give text_encoders=[<t5xxl file>]").

The transformer's shape is read from its keys; the rest comes from ``popalign_core/configs/{sd3,flux}``
(SD3.5-medium, FLUX.1-dev) or ``config_dir``. The T5 tokenizer is never shipped: ``t5_tokenizer=<folder>``, else
``<config_dir>/tokenizer_3`` (SD3) / ``tokenizer_2`` (FLUX), else (single files) ``<root>/comfy/text_encoders/
t5_tokenizer/`` when a model file lies in a ComfyUI tree (``<root>/models/{unet,checkpoints,diffusion_models,clip,
text_encoders}/...``), else a diffusers folder's own; else an error naming the folder to pass. ``prediction_type``
must be None (flow models predict the velocity). ``text_encoders`` / ``vae`` are refused for the UNet families and
for diffusers folders.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from popalign_core.common.fileio import safetensors_keys
from popalign_core.common.userinput import check_device
from popalign_core.models.adapter import FAMILIES, FLOW_FAMILIES, PREDICTION_TYPES
from popalign_core.models.diffusers_adapter import DiffusersAdapter
from popalign_core.models.loading_common import (
    DAMAGED_HINT,
    DTYPES,
    PICKLE_SUFFIXES,
    check_choice,
    check_materialised,
    check_parts_arguments,
    checkpoint_keys,
    component_weights,
    quiet_loading,
    read_json,
    read_prefixed,
    require_files,
)
from popalign_core.models.tokenizers import clip_tokenizer

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
FAMILY_CONFIG_DIRS = {family: CONFIGS_DIR / family for family in FAMILIES}
# text-encoder key prefix that identifies each family, checked in this order (an SDXL file has no cond_stage_model)
FAMILY_KEY_MARKERS = {
    "sdxl": "conditioner.embedders.1.model.",
    "sd2": "cond_stage_model.model.",
    "sd15": "cond_stage_model.transformer.",
}
# original-layout key prefixes each component is read from
COMPONENT_PREFIXES = {
    "unet": ("model.diffusion_model.",),
    "vae": ("first_stage_model.",),
    "text_encoder": {
        "sd15": ("cond_stage_model.transformer.",),
        "sd2": ("cond_stage_model.model.",),
        "sdxl": ("conditioner.embedders.0.transformer.",),
    },
    "text_encoder_2": {"sdxl": ("conditioner.embedders.1.model.",)},
}
PIPELINE_CLASSES = {"StableDiffusionPipeline": ("sd15", "sd2"), "StableDiffusionXLPipeline": ("sdxl",)}
#: families we recognise by their keys but do not support (checked before the supported ones' markers)
UNSUPPORTED_KEY_MARKERS = {
    "FLUX.2": "model.diffusion_model.double_stream_modulation_img.",
    "Chroma": "model.diffusion_model.distilled_guidance_layer.",
    "SDXL refiner": "conditioner.embedders.0.model.",
}

_WHERE = (
    "put a single-file checkpoint (.safetensors, e.g. in ComfyUI's models/checkpoints/ folder) at that path, "
    "or a diffusers model folder containing model_index.json"
)


def _components(family: str) -> list[str]:
    return ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])


def detect_family(keys: Iterable[str] | Mapping) -> str:
    """Family ("sd15", "sd2", "sdxl", "sd3" or "flux") of an original-layout checkpoint from its key names.

    keys: the checkpoint's keys (or the state dict itself). Only names are read. UNet families by text encoder
    (`FAMILY_KEY_MARKERS`), flow families by transformer (``joint_blocks.``: SD3, ``double_blocks.``: FLUX, with the
    ``model.diffusion_model.`` prefix or, in a transformer-only file, without). A recognised family that is not
    supported (`UNSUPPORTED_KEY_MARKERS`) is a ValueError naming it and the supported ones.
    SD2.x detection cannot tell v-prediction from epsilon (see the module docstring).
    """
    from popalign_core.models.loading_flow import TRANSFORMER_MARKERS, flow_family_of_keys

    keys = list(keys)
    for name, marker in UNSUPPORTED_KEY_MARKERS.items():
        if any(k.startswith(marker) for k in keys):
            raise ValueError(
                f"the checkpoint is a {name} model (keys {marker}*), which is not supported; "
                f"supported families: {', '.join(FAMILIES)}"
            )
    flow = flow_family_of_keys(keys)
    if flow is not None:
        return flow[0]
    for family, marker in FAMILY_KEY_MARKERS.items():
        if any(k.startswith(marker) for k in keys):
            return family
    seen = Counter(".".join(k.split(".")[:2]) for k in keys)
    shown = ", ".join(f"{p}.* ({n})" for p, n in seen.most_common(8)) or "no keys at all"
    flow_markers = [f"'model.diffusion_model.{m}' ({f})" for f, m in TRANSFORMER_MARKERS.items()]
    raise ValueError(
        "cannot detect the model family from the checkpoint keys: expected text-encoder keys starting with "
        + ", ".join([f"{m!r} ({f})" for f, m in FAMILY_KEY_MARKERS.items()] + flow_markers)
        + f"; seen: {shown}. Supported families: {', '.join(FAMILIES)}. UNet-only files, diffusers-layout single "
        "files and SDXL refiners are not supported."
    )


def _config_files(family: str) -> list[str]:
    return ["model_index.json", *[f"{c}/config.json" for c in _components(family)], "scheduler/scheduler_config.json"]


def _scheduler_from_dir(root: Path, prediction_type: str | None):
    import diffusers

    cfg = read_json(root / "scheduler" / "scheduler_config.json")
    name = cfg.get("_class_name", "DDIMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None or not issubclass(cls, diffusers.SchedulerMixin):
        raise ValueError(
            f"{root / 'scheduler' / 'scheduler_config.json'}: _class_name={name!r} is not a diffusers scheduler"
        )
    sched = cls.from_pretrained(str(root), subfolder="scheduler", local_files_only=True)
    return _override_prediction_type(sched, prediction_type)


def _override_prediction_type(scheduler, prediction_type: str | None):
    if prediction_type is None or scheduler.config.prediction_type == prediction_type:
        return scheduler
    return type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)


def _tokenizers(family: str) -> dict:
    if family == "sd15":
        return {"tokenizer": clip_tokenizer("clip")}
    if family == "sd2":
        return {"tokenizer": clip_tokenizer("openclip")}
    return {"tokenizer": clip_tokenizer("clip"), "tokenizer_2": clip_tokenizer("openclip")}


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _pipeline_extras(family: str) -> dict:
    if family == "sdxl":
        return {"add_watermarker": False}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


# ------------------------------------------------------------------------------------------------------ single file
def _load_single_file_pipeline(
    path: Path, family: str, prediction_type: str | None, torch_dtype: torch.dtype, config_dir: Path
):
    """Build the pipeline component by component with diffusers' single-file loaders, reading each component's
    tensors from the file separately (each tensor is read once; no full-checkpoint dict is held at once).

    Text encoders get only their own prefix's tensors: diffusers' whole-pipeline `from_single_file` picks the text
    encoder layout by probing keys and shapes, which is ambiguous when both SDXL encoders have the same width.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    common = {"config": str(config_dir), "local_files_only": True, "torch_dtype": torch_dtype}
    comps = {}
    for name in _components(family):
        prefixes = COMPONENT_PREFIXES[name] if name in ("unet", "vae") else COMPONENT_PREFIXES[name][family]
        sd = read_prefixed(path, prefixes)
        if not sd:
            raise ValueError(f"{path}: no {name} weights (no keys starting with {' or '.join(prefixes)})")
        try:
            if name == "unet":
                comps[name] = UNet2DConditionModel.from_single_file(sd, subfolder="unet", **common)
            elif name == "vae":
                comps[name] = AutoencoderKL.from_single_file(sd, subfolder="vae", **common)
            else:
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                comps[name] = create_diffusers_clip_model_from_ldm(cls, checkpoint=sd, subfolder=name, **common)
        except (ValueError, RuntimeError, KeyError) as e:
            raise ValueError(f"{path}: cannot load the {name} with the {family} config in {config_dir}: {e}") from e
        del sd
    check_materialised(comps, f"{path} with config {config_dir}")
    comps["scheduler"] = _scheduler_from_dir(config_dir, prediction_type)
    comps.update(_tokenizers(family))
    return _pipeline_class(family)(**comps, **_pipeline_extras(family))


# -------------------------------------------------------------------------------------------------- diffusers folder
def _folder_family(root: Path, index: dict, family: str) -> str:
    cls_name = index.get("_class_name")
    if cls_name not in PIPELINE_CLASSES:
        raise ValueError(
            f"{root / 'model_index.json'}: _class_name={cls_name!r} is not supported; valid values: "
            f"{', '.join([*PIPELINE_CLASSES, 'StableDiffusion3Pipeline', 'FluxPipeline'])}"
        )
    if cls_name == "StableDiffusionXLPipeline":
        guessed = "sdxl"
    else:
        te_cfg = root / "text_encoder" / "config.json"
        act = read_json(te_cfg).get("hidden_act", "quick_gelu") if te_cfg.is_file() else "quick_gelu"
        guessed = "sd2" if act == "gelu" else "sd15"
    if family == "auto":
        return guessed
    if family not in PIPELINE_CLASSES[cls_name]:
        raise ValueError(f"family={family!r} does not match {root} ({cls_name}); valid values: auto, {guessed}")
    return family


def _load_folder_pipeline(root: Path, family: str, prediction_type: str | None, torch_dtype: torch.dtype):
    index = read_json(root / "model_index.json")
    family = _folder_family(root, index, family)
    names = _components(family)
    require_files(root, [f"{c}/config.json" for c in names] + ["scheduler/scheduler_config.json"], "diffusers folder")
    variants = set()
    for name in names:
        library = (index.get(name) or ["diffusers"])[0]
        variants.add(component_weights(root, name, library))
    variant = "fp16" if variants == {"fp16"} else None

    for name in names:  # a damaged weight file is named before diffusers reads it
        for f in sorted((root / name).glob("*.safetensors")):
            safetensors_keys(f, f"{name} weight file", DAMAGED_HINT.replace("checkpoint", "diffusers model"))
    extras = _pipeline_extras(family)
    for tok_name, tok in _tokenizers(family).items():  # the folder's own tokenizer wins when it has one
        tok_dir = root / tok_name
        if not (tok_dir.is_dir() and any(tok_dir.iterdir())):
            extras[tok_name] = tok
    pipe = _pipeline_class(family).from_pretrained(
        str(root), local_files_only=True, use_safetensors=True, torch_dtype=torch_dtype, variant=variant, **extras
    )
    modules = {n: m for n in names if isinstance(m := getattr(pipe, n, None), torch.nn.Module)}
    check_materialised(modules, f"diffusers folder {root}")  # e.g. a weight file replaced by a LoRA
    pipe.scheduler = _override_prediction_type(pipe.scheduler, prediction_type)
    return pipe, family


# --------------------------------------------------------------------------------------------------------------- API
TOYWORLD = "toyworld"  # model spec of the toy world shipped with the package (docs/toyworld.md)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """`path` as a Path; the spec ``"toyworld"`` names the toy-world model shipped with the package."""
    if str(path) == TOYWORLD:
        from popalign_core.toyworld.classifier import default_toyworld_dir

        p = default_toyworld_dir()
        if not (p / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the shipped toy world is missing from {p}: rebuild it with `popalign toyworld build --out {p}`"
            )
        return p
    return Path(path).expanduser()


def _check_no_t5_options(t5, t5_tokenizer, what: str) -> None:
    """t5 / t5_tokenizer given for a UNet model (which has no T5): an error, not an option silently ignored."""
    given = [n for n, v in (("t5", t5), ("t5_tokenizer", t5_tokenizer)) if v is not None]
    if given:
        raise ValueError(f"{given[0]}: SD3 / FLUX only (their T5 text encoder); {what}, which has none: leave unset")


def load_pipeline(
    path: str | os.PathLike,
    *,
    family: str = "auto",
    prediction_type: str | None = None,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    config_dir: str | os.PathLike | None = None,
    t5: bool | None = None,
    t5_tokenizer: str | os.PathLike | None = None,
    text_encoders: Sequence[str | os.PathLike] | None = None,
    vae: str | os.PathLike | None = None,
):
    """Load a diffusers pipeline offline (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
    `StableDiffusion3Pipeline` or `FluxPipeline`); returns (pipeline, family).

    Arguments as in `load_model`. Everything cheap (path, suffix, argument names, config files, checkpoint key names)
    is validated before any weight is read.
    """
    from popalign_core.models import loading_flow as lf
    from popalign_core.models.flow_parts import load_flow_single_file

    check_choice("family", family, ("auto", *FAMILIES))
    check_choice("dtype", dtype, DTYPES)
    if family in FLOW_FAMILIES:
        lf.check_flow_arguments(family, prediction_type, t5, t5_tokenizer)
    check_choice("prediction_type", prediction_type, (None, *PREDICTION_TYPES))
    check_choice("t5", t5, (None, True, False))
    text_encoders = check_parts_arguments(text_encoders, vae)
    parts_given = bool(text_encoders) or vae is not None
    torch_dtype = DTYPES[dtype]
    check_device(device)
    p = resolve_model_path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path {str(p)!r} does not exist: {_WHERE}")

    if p.is_dir():
        if config_dir is not None or parts_given:
            name = "config_dir" if config_dir is not None else "text_encoders" if text_encoders else "vae"
            raise ValueError(
                f"{name}: only used for single-file checkpoints; a diffusers folder has its own configs and components"
            )
        if not (p / "model_index.json").is_file():
            found = sorted(x.name for x in p.glob("*.safetensors"))
            hint = f" (it holds {', '.join(found[:5])}: pass one of those files instead)" if found else ""
            raise FileNotFoundError(
                f"{p} is a folder but has no model_index.json, so it is no diffusers model{hint}; {_WHERE}"
            )
        index = read_json(p / "model_index.json")
        if index.get("_class_name") in lf.PIPELINE_CLASSES:
            lf.check_flow_arguments(lf.PIPELINE_CLASSES[index["_class_name"]], prediction_type, t5, t5_tokenizer)
            with quiet_loading(f"diffusers folder {p}"):
                pipe, family = lf.load_flow_folder(p, index, family, torch_dtype, t5, t5_tokenizer)
        else:
            _check_no_t5_options(t5, t5_tokenizer, f"{p} is a UNet diffusers folder")
            with quiet_loading(f"diffusers folder {p}"):
                pipe, family = _load_folder_pipeline(p, family, prediction_type, torch_dtype)
    else:
        suffix = p.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise ValueError(
                f"{p}: {suffix} files are pickles and are never loaded here (loading one can run arbitrary code). "
                "Convert it to .safetensors first (e.g. with a trusted converter script or ComfyUI's CheckpointSave)."
            )
        if suffix != ".safetensors":
            raise ValueError(
                f"{p}: unsupported file type {suffix or '(none)'!r}; valid: .safetensors or a diffusers folder"
            )
        keys = checkpoint_keys(p)
        detected = detect_family(keys)
        if family not in ("auto", detected):
            raise ValueError(
                f"family={family!r} but {p} is a {detected!r} checkpoint by its keys; valid values: auto, {detected}"
            )
        family = detected
        flow = family in FLOW_FAMILIES
        if parts_given and not flow:
            raise ValueError(
                f"text_encoders / vae: separate component files are read for SD3 / FLUX only; {p} is a {family!r} "
                "checkpoint, which holds its own text encoders and VAE"
            )
        files = lf.flow_config_files(family, t5 is not False) if flow else _config_files(family)
        cfg = Path(config_dir).expanduser() if config_dir is not None else FAMILY_CONFIG_DIRS[family]
        if not cfg.is_dir():
            raise FileNotFoundError(f"config_dir {str(cfg)!r} is not a folder (it needs {', '.join(files)})")
        if flow:
            lf.check_flow_arguments(family, prediction_type, t5, t5_tokenizer)
            with quiet_loading(f"checkpoint {p}"):
                pipe = load_flow_single_file(p, family, keys, torch_dtype, cfg, t5, t5_tokenizer, text_encoders, vae)
        else:
            _check_no_t5_options(t5, t5_tokenizer, f"{p} is a {family!r} checkpoint")
            require_files(cfg, files, "config folder")
            with quiet_loading(f"checkpoint {p}"):
                pipe = _load_single_file_pipeline(p, family, prediction_type, torch_dtype, cfg)

    if family == "sdxl" and torch_dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
        # the SDXL VAE overflows in fp16 (NaN images); the adapter encodes/decodes in the VAE's own dtype
        pipe.vae.to(torch.float32)
    pipe.to(device)
    return pipe, family


def load_model(
    path: str | os.PathLike,
    *,
    family: str = "auto",
    prediction_type: str | None = None,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    config_dir: str | os.PathLike | None = None,
    t5: bool | None = None,
    t5_tokenizer: str | os.PathLike | None = None,
    text_encoders: Sequence[str | os.PathLike] | None = None,
    vae: str | os.PathLike | None = None,
):
    """Load a Stable Diffusion model offline and wrap it in a `DiffusersAdapter` (UNet families) or a `FlowAdapter`
    (SD3, FLUX).

    path: a single-file ``.safetensors`` checkpoint in the original layout (ComfyUI's ``models/checkpoints/``,
        A1111, CivitAI), or a diffusers folder with ``model_index.json`` (loaded with ``from_pretrained``,
        safetensors only; a folder without tokenizer files gets the shipped CLIP tokenizer), or ``"toyworld"``
        (the toy world shipped with the package).
        SD3 / FLUX: an all-in-one single file (transformer, VAE, text encoders: ComfyUI's checkpoint layout), a
        transformer file completed by `text_encoders` / `vae`, or a StableDiffusion3Pipeline / FluxPipeline folder
        (module docstring, "Flow models").
    family: "auto" (detected from the checkpoint keys or the folder's configs), "sd15", "sd2", "sdxl", "sd3" or
        "flux"; an explicit family must match what is detected.
    prediction_type: None (the config's), "epsilon" or "v_prediction". SD2.x checkpoints cannot be told apart by
        their keys: the shipped sd2 config is v-prediction (SD2.1-768); pass "epsilon" for SD2.x-base models.
        Flow models predict the velocity: only None.
    dtype: "fp32", "fp16" or "bf16" (SDXL in fp16 keeps its VAE in fp32, as diffusers' ``force_upcast`` does).
    device: where the models go ("cpu", "cuda", ...).
    config_dir: diffusers config folder used for single files instead of the shipped one of the detected family
        (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` [, ``text_encoder_2/``], ``scheduler/``;
        SD3 / FLUX: ``transformer/``, ``vae/``, ``text_encoder*/``, ``scheduler/``, optionally the T5 tokenizer in
        ``tokenizer_3/`` (SD3) / ``tokenizer_2/`` (FLUX)).
    t5: SD3 / FLUX only. None: use T5 when the file or folder has it (FLUX always needs it); True: T5 required
        (an error when missing); False: load SD3 without T5 (saves its ~4.7B parameters; zeros in its place).
    t5_tokenizer: folder of the T5 tokenizer (``tokenizer.json`` or ``spiece.model``: the diffusers model's
        ``tokenizer_2/`` (FLUX) / ``tokenizer_3/`` (SD3), or ComfyUI's ``comfy/text_encoders/t5_tokenizer/``); needed
        for single files unless the config folder has one or the file lies in a ComfyUI tree (module docstring);
        overrides a folder's own.
    text_encoders: SD3 / FLUX single files only: text-encoder files (one path or a list; ComfyUI's
        ``models/clip/`` / ``models/text_encoders/`` files: clip_l, clip_g, t5xxl, fp8 ones too) completing or
        replacing the ones bundled in `path`; each file's slot is read from its keys and shapes.
    vae: SD3 / FLUX single files only: a VAE file (e.g. ComfyUI's ``models/vae/ae.safetensors``) completing or
        replacing the bundled one.
    Raises FileNotFoundError (missing path or config/component file, naming it), ValueError (bad argument, pickle
    file, unknown layout).
    """

    pipe, family = load_pipeline(
        path,
        family=family,
        prediction_type=prediction_type,
        dtype=dtype,
        device=device,
        config_dir=config_dir,
        t5=t5,
        t5_tokenizer=t5_tokenizer,
        text_encoders=text_encoders,
        vae=vae,
    )
    if family in FLOW_FAMILIES:
        from popalign_core.models.flow_adapter import FlowAdapter
        from popalign_core.models.tiny_flow import encoders_of

        encoders, tokenizers = encoders_of(pipe.components, family)
        return FlowAdapter(pipe.transformer, pipe.vae, encoders, tokenizers, pipe.scheduler, family)
    return DiffusersAdapter.from_pipeline(pipe, family=family)
