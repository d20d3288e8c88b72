"""SD3 / FLUX single files, all-in-one or in separate component files -> pipeline (`models.loading_flow` builds each
component).

A flow model is read from up to five parts, each a set of tensors in one ``.safetensors`` file (`Part`):

- the transformer: the main file, ``model.diffusion_model.*`` or, in a transformer-only file, without the prefix
  (BFL's ``flux1-dev.safetensors`` in ComfyUI's ``models/unet/`` or ``models/diffusion_models/``: UNETLoader);
- the text encoders: bundled in the main file (``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``) and/or
  separate files (``text_encoders=[...]``, ComfyUI's ``models/clip/`` or ``models/text_encoders/``: DualCLIPLoader /
  TripleCLIPLoader) in the transformers layout: CLIP ``text_model.*`` [+ ``text_projection.weight``], T5
  ``shared.weight`` + ``encoder.block.*``. Which slot a file fills is read from its keys and shapes against the
  config folder's ``text_encoder*/config.json`` (width and depth: CLIP-L 768 x 12, CLIP-G 1280 x 32, T5-XXL 4096 x
  24 in the shipped configs); files fitting several slots (equal shapes, e.g. test models) fill them in the order
  given (clip_l before clip_g). A file given separately replaces the bundled one;
- the VAE: bundled (``first_stage_model.*`` / ``vae.*``) or ``vae=<file>`` (ComfyUI's ``models/vae/ae.safetensors``:
  VAELoader) in the LDM (``encoder.down.*``) or diffusers (``encoder.down_blocks.*``) layout, prefixed or not.

float8 tensors (``t5xxl_fp8_e4m3fn.safetensors``) are upcast to the compute dtype when read; ComfyUI's scaled fp8
files (``scaled_fp8`` marker, per-layer ``scale_weight``) are dequantised as ComfyUI computes them (``comfy/ops.py``
``scaled_fp8_op``: weight x scale_weight).

T5 tokenizer: ``t5_tokenizer=<folder>``, else the config folder's ``tokenizer_3/`` (SD3) / ``tokenizer_2/`` (FLUX),
else, when a model file lies in a ComfyUI tree (``<root>/models/{unet,checkpoints,diffusion_models,clip,
text_encoders}/...``), ``<root>/comfy/text_encoders/t5_tokenizer/``; else an error naming the folder to pass.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from popalign_core.common.fileio import read_safetensors
from popalign_core.models.loading_common import (
    DAMAGED_HINT,
    PICKLE_SUFFIXES,
    check_materialised,
    checkpoint_keys,
    read_json,
    require_files,
)
from popalign_core.models.loading_flow import (
    NOT_TRANSFORMER,
    T5_COMPONENT,
    T5_TOKENIZER_DIRS,
    TEXT_ENCODER_PREFIXES,
    VAE_PREFIXES,
    clip_tokenizers,
    flow_config_files,
    flow_family_of_keys,
    flow_scheduler,
    load_text_encoder,
    load_transformer,
    pipeline_class,
    resolve_t5_tokenizer,
)
from popalign_core.models.tokenizers import T5_TOKENIZER_FILES, t5_tokenizer

#: text-encoder slot (ComfyUI's name) -> diffusers component, per family, in the order files fill them
ROLES = {
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
    "flux": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
}
#: the usual file of each slot (ComfyUI's model downloads), for messages
ROLE_FILES = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}
VAE_FILES = {
    "sd3": "the SD3 VAE, e.g. vae/diffusion_pytorch_model.safetensors of the diffusers model",
    "flux": "ae.safetensors",
}
FAMILY_NAMES = {"sd3": "SD3", "flux": "FLUX"}
#: ComfyUI model folders whose files locate the ComfyUI tree (root = the folder above ``models/``)
COMFY_MODEL_DIRS = ("unet", "checkpoints", "diffusion_models", "clip", "text_encoders")
COMFY_T5_TOKENIZER = Path("comfy", "text_encoders", "t5_tokenizer")
FLOAT8 = tuple(d for d in vars(torch).values() if isinstance(d, torch.dtype) and "float8" in str(d))
_SCALED_FP8 = ("scaled_fp8",)
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")


@dataclass(frozen=True)
class Part:
    """One component's tensors: the keys of `path` starting with `prefix` (prefix removed), less `exclude`."""

    path: Path
    prefix: str = ""
    exclude: tuple[str, ...] = ()


def read_part(part: Part, torch_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of `part` (prefix removed); float8 ones upcast to `torch_dtype`, scaled fp8 dequantised."""
    pre, exc = part.prefix, part.exclude
    sd = read_safetensors(
        part.path, "checkpoint", DAMAGED_HINT, keys=lambda k: k.startswith(pre) and not k.startswith(exc)
    )[0]
    sd = {k[len(pre) :]: v for k, v in sd.items()}
    return dequantize(sd, torch_dtype)


def dequantize(sd: dict[str, torch.Tensor], torch_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """float8 tensors -> `torch_dtype`; ComfyUI's scaled fp8 (``X.weight`` with ``X.scale_weight``) -> weight x
    scale_weight, computed in float32; the scale tensors and the ``scaled_fp8`` marker are dropped."""
    out = {}
    for k, v in sd.items():
        if k in _SCALED_FP8 or k.endswith(_SCALE_SUFFIXES):
            continue
        scale = sd.get(k.removesuffix("weight") + "scale_weight") if k.endswith(".weight") else None
        if scale is not None:
            v = (v.to(torch.float32) * scale.to(torch.float32)).to(torch_dtype)
        elif v.dtype in FLOAT8:
            v = v.to(torch_dtype)
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------ separate files
def _seen(keys: Iterable[str]) -> str:
    seen = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{p}.* ({n})" for p, n in seen.most_common(6)) or "no tensors at all"


def part_keys(path, what: str) -> tuple[Path, list[str]]:
    """(path, tensor names) of a component file given as `what`; missing, pickle or non-safetensors files are
    errors naming `what`."""
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist (or is a folder); give a .safetensors file")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{what} {str(p)!r}: pickle files are never loaded here; convert it to .safetensors first")
    if p.suffix.lower() != ".safetensors":
        raise ValueError(f"{what} {str(p)!r}: unsupported file type {p.suffix or '(none)'!r}; valid: .safetensors")
    return p, checkpoint_keys(p)


def _shape(path: Path, key: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return tuple(f.get_slice(key).get_shape())


def _depth(keys: Iterable[str], head: str) -> int:
    return len({k[len(head) :].split(".", 1)[0] for k in keys if k.startswith(head)})


def encoder_shape(path: Path, keys: list[str], what: str) -> tuple[str, int, int]:
    """("t5" | "clip", width, layers) of a text-encoder file in the transformers layout, else a ValueError."""
    if "shared.weight" in keys or any(k.startswith("encoder.block.") for k in keys):
        emb = "shared.weight" if "shared.weight" in keys else "encoder.embed_tokens.weight"
        width = _shape(path, emb)[1] if emb in keys else 0
        return "t5", width, _depth(keys, "encoder.block.")
    if "text_model.embeddings.token_embedding.weight" in keys:
        width = _shape(path, "text_model.embeddings.token_embedding.weight")[1]
        return "clip", width, _depth(keys, "text_model.encoder.layers.")
    raise ValueError(
        f"{what} {str(path)!r} is not a text encoder in the layout ComfyUI's CLIP loaders read: expected CLIP keys "
        f"text_model.* (clip_l, clip_g) or T5 keys shared.weight / encoder.block.* (t5xxl); seen: {_seen(keys)}"
    )


def slot_shapes(family: str, cfg: Path) -> dict[str, tuple[int, int]]:
    """slot -> (width, layers) of the model's text encoders, from the config folder (slots without a config: none)."""
    out = {}
    for role, name in ROLES[family].items():
        f = cfg / name / "config.json"
        if f.is_file():
            c = read_json(f)
            t5 = role == "t5xxl"
            out[role] = (
                int(c["d_model" if t5 else "hidden_size"]),
                int(c["num_layers" if t5 else "num_hidden_layers"]),
            )
    return out


def assign_text_encoders(files: Sequence, family: str, cfg: Path) -> dict[str, Part]:
    """component name -> Part of each separately given text-encoder file, its slot read from keys and shapes
    (module docstring); a file that fits no slot, or a slot given twice, is a ValueError naming the files."""
    shapes = slot_shapes(family, cfg)
    taken: dict[str, Path] = {}
    for i, f in enumerate(files):
        what = f"text_encoders[{i}]"
        path, keys = part_keys(f, what)
        kind, width, layers = encoder_shape(path, keys, what)
        fits = [r for r, s in shapes.items() if (r == "t5xxl") == (kind == "t5") and s == (width, layers)]
        free = [r for r in fits if r not in taken]
        if not fits:
            slots = ", ".join(f"{r} ({w} wide, {n} layers)" for r, (w, n) in shapes.items())
            raise ValueError(
                f"{what} {str(path)!r} is a {'T5' if kind == 't5' else 'CLIP'} text encoder {width} wide with "
                f"{layers} layers, which fits none of the {FAMILY_NAMES[family]} model's text encoders: {slots} "
                f"(config folder {cfg}); give the {'/'.join(shapes)} files of this model"
            )
        if not free:
            raise ValueError(
                f"{what} {str(path)!r} and {str(taken[fits[0]])!r} are both {' / '.join(fits)} text encoders; "
                f"{FAMILY_NAMES[family]} takes one each of {', '.join(shapes)}"
            )
        taken[free[0]] = path
    return {ROLES[family][r]: Part(p) for r, p in taken.items()}


def vae_part(path) -> Part:
    """The Part of a VAE file (LDM or diffusers layout, with or without ``first_stage_model.`` / ``vae.``)."""
    p, keys = part_keys(path, "vae")
    for prefix in ("first_stage_model.", "vae.", ""):
        if any(k.startswith((prefix + "encoder.down", prefix + "decoder.up")) for k in keys):
            return Part(p, prefix)
    raise ValueError(
        f"vae {str(p)!r} is not a VAE: expected LDM keys encoder.down.* / decoder.up.* (ComfyUI's models/vae/ "
        f"files) or diffusers keys encoder.down_blocks.*, optionally under first_stage_model. / vae.; seen: "
        f"{_seen(keys)}"
    )


# ----------------------------------------------------------------------------------------------------- the plan
def bundled_parts(path: Path, family: str, keys: list[str], prefix: str) -> dict[str, Part]:
    """The parts the main file holds: its transformer and any bundled text encoders and VAE."""
    parts = {"transformer": Part(path, prefix, () if prefix else NOT_TRANSFORMER)}
    for name, p in TEXT_ENCODER_PREFIXES[family].items():
        if any(k.startswith(p) for k in keys):
            parts[name] = Part(path, p)
    vp = next((p for p in VAE_PREFIXES[family] if any(k.startswith(p) for k in keys)), None)
    if vp is not None:
        parts["vae"] = Part(path, vp)
    return parts


def plan_parts(path: Path, family: str, keys: list[str], cfg: Path, t5, text_encoders=(), vae=None):
    """(component -> Part, use T5): the main file's parts, replaced / completed by the separate files; what is
    still missing is a ValueError saying which file to give where."""
    prefix = flow_family_of_keys(keys)[1]
    bundled = bundled_parts(path, family, keys, prefix)
    parts = dict(bundled)
    given = assign_text_encoders(list(text_encoders or ()), family, cfg)
    t5_name = T5_COMPONENT[family]
    if t5 is False and t5_name in given:
        raise ValueError(f"t5=False, but text_encoders gives a T5 file ({given[t5_name].path}); drop one of them")
    parts.update(given)
    if vae is not None:
        parts["vae"] = vae_part(vae)
    roles = {n: r for r, n in ROLES[family].items()}
    need = [n for n in roles if n != t5_name or family == "flux" or t5]
    missing = [n for n in need if n not in parts]
    if missing or "vae" not in parts:
        raise ValueError(_missing_message(path, family, bundled, missing, "vae" not in parts, t5, prefix))
    return parts, t5_name in parts and t5 is not False


def _missing_message(path: Path, family: str, bundled: dict, missing: list[str], no_vae: bool, t5, prefix) -> str:
    roles = {n: r for r, n in ROLES[family].items()}
    items = [f"{TEXT_ENCODER_PREFIXES[family][n]}* ({roles[n]})" for n in missing]
    items += [f"{VAE_PREFIXES[family][0]}* (VAE)"] if no_vae else []
    kind = "a transformer-only file" if not prefix or len(bundled) == 1 else "incomplete"
    need = [r for r in ROLES[family] if r != "t5xxl" or family == "flux" or t5]
    give = []
    if missing:
        files = ", ".join(ROLE_FILES[roles[n]] for n in missing)
        slots = ", ".join(f"<{roles[n]} file>" for n in missing)
        give.append(f"text_encoders=[{slots}] (ComfyUI's models/text_encoders/ or clip/: {files})")
    if no_vae:
        give.append(f"vae=<VAE file> (ComfyUI's models/vae/: {VAE_FILES[family]})")
    hint = " (SD3 without T5: t5=False)" if family == "sd3" and t5 and T5_COMPONENT[family] in missing else ""
    return (
        f"{path} is {kind}: no weights for {', '.join(items)}, and none given separately. "
        f"{FAMILY_NAMES[family]} needs {' and '.join(need)} text encoders and a VAE: give {' and '.join(give)}; or "
        f"load an all-in-one checkpoint (the layout of ComfyUI's CheckpointLoaderSimple) or the diffusers model "
        f"folder{hint}"
    )


# ---------------------------------------------------------------------------------------------------- tokenizer
def comfyui_root(path: Path) -> Path | None:
    """The ComfyUI folder `path` lies in (``<root>/models/<unet|checkpoints|...>/...``), or None."""
    p = Path(path).expanduser().absolute()
    for parent in p.parents:
        if parent.name == "models" and p.relative_to(parent).parts[0] in COMFY_MODEL_DIRS:
            return parent.parent
    return None


def find_t5_tokenizer(family: str, cfg: Path, t5_tokenizer_dir, files: Sequence[Path], where: str):
    """The T5 tokenizer (module docstring: argument, config folder, ComfyUI tree); else a FileNotFoundError naming
    the folder to pass."""
    own = cfg / T5_TOKENIZER_DIRS[family]
    if t5_tokenizer_dir is not None or any((own / f).is_file() for f in T5_TOKENIZER_FILES):
        return resolve_t5_tokenizer(family, own, t5_tokenizer_dir, where)
    roots = list(dict.fromkeys(r for f in files if (r := comfyui_root(f)) is not None))
    for root in roots:
        folder = root / COMFY_T5_TOKENIZER
        if any((folder / f).is_file() for f in T5_TOKENIZER_FILES):
            return t5_tokenizer(folder)
    if roots:
        folder = roots[0] / COMFY_T5_TOKENIZER
        raise FileNotFoundError(
            f"no T5 tokenizer for {where}: it lies in the ComfyUI folder {roots[0]}, but {folder}/ has none of "
            f"{', '.join(T5_TOKENIZER_FILES)} (an incomplete ComfyUI copy?); pass t5_tokenizer=<folder> with the "
            f"folder that holds them: {folder}/ of a complete ComfyUI, or the diffusers model's "
            f"{T5_TOKENIZER_DIRS[family]}/ folder"
        )
    return resolve_t5_tokenizer(family, own, None, where)


# --------------------------------------------------------------------------------------------------------- load
def load_flow_single_file(
    path: Path, family: str, keys: list[str], torch_dtype, cfg: Path, t5, t5_tokenizer_dir, text_encoders=(), vae=None
):
    """An SD3 / FLUX pipeline from an original-layout single file and optional separate component files (module
    docstring); each component reads only its own tensors, each tensor is read once."""
    from diffusers import AutoencoderKL

    require_files(cfg, flow_config_files(family, t5=False), "config folder")
    parts, use_t5 = plan_parts(path, family, keys, cfg, t5, text_encoders, vae)
    t5_name = T5_COMPONENT[family]
    files = [path, *(part.path for part in parts.values())]
    tok = find_t5_tokenizer(family, cfg, t5_tokenizer_dir, files, str(path)) if use_t5 else None
    require_files(cfg, flow_config_files(family, use_t5), "config folder")
    tf = parts["transformer"]
    comps = {"transformer": load_transformer(read_part(tf, torch_dtype), str(tf.path), family, cfg, torch_dtype)}
    common = {"config": str(cfg), "local_files_only": True, "torch_dtype": torch_dtype}
    comps["vae"] = AutoencoderKL.from_single_file(read_part(parts["vae"], torch_dtype), subfolder="vae", **common)
    for name in TEXT_ENCODER_PREFIXES[family]:
        if name in parts and (name != t5_name or use_t5):
            comps[name] = load_text_encoder(read_part(parts[name], torch_dtype), family, name, cfg, torch_dtype)
    sources = sorted({str(part.path) for part in parts.values()})
    check_materialised(comps, f"{' + '.join(sources)} with config {cfg}")
    comps[t5_name] = comps.get(t5_name)
    comps[T5_TOKENIZER_DIRS[family]] = tok
    comps["scheduler"] = flow_scheduler(cfg)
    return pipeline_class(family)(**comps, **clip_tokenizers(family))
