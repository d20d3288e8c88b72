"""The two on-disk LoRA layouts, diffusers and kohya (`LORA_FORMATS`): save, read, load.

    from popalign_core.lora.files import LoraSpec, add_lora, save_lora, load_lora, lora_metadata, model_hash
    add_lora(adapter, LoraSpec(rank=8, alpha=8.0, text_encoder_targets=TEXT_ENCODER_TARGETS))
    ...train...
    save_lora(adapter, "out/lora.safetensors", format="kohya", metadata=lora_metadata(loss="popalign", ...))
    load_lora(fresh_adapter, "out/lora.safetensors")       # format detected from the keys

LoRA creation and the in-memory (peft) layout: `lora.inject`; the kohya keys: `lora.kohya`; metadata:
`lora.metadata`. This module re-exports their public names.

Formats (`LORA_FORMATS`):
- "diffusers": a folder holding `pytorch_lora_weights.safetensors`, as `StableDiffusion(XL)Pipeline.save_lora_weights`
  writes it (`unet.` / `text_encoder.` keys; SD3 and FLUX: `transformer.` / `text_encoder.` [/ `text_encoder_2.`],
  as `StableDiffusion3Pipeline` / `FluxPipeline.save_lora_weights`); `pipe.load_lora_weights(folder)` loads it.
  alpha != rank travels in the safetensors metadata key `lora_adapter_metadata` (see `lora.metadata`).
- "kohya": one `.safetensors` with `lora_unet_...` (SD3 / FLUX: `lora_transformer_...`) / `lora_te_...` lora_down /
  lora_up / alpha keys (see `lora.kohya`): the format ComfyUI's `LoraLoader` reads, A1111 / Forge and diffusers
  too (FLUX; SD3 in diffusers: the "diffusers" layout).

A file records the family it was trained on (metadata `family`); `load_lora` refuses it on another family.

Saves are atomic: tensors go to a uniquely named temporary file beside the destination, which `os.replace` then moves
onto the final name, so an interrupted save never leaves a partial file under the final name; `save_lora_formats`
writes several layouts as one step (`fileio.publish_together`). Reading (`read_lora`) names a damaged or truncated
file and says what to do (`fileio.CorruptFileError`).
"""

from __future__ import annotations

import collections
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from popalign_core.common.fileio import publish_together, read_safetensors, save_safetensors
from popalign_core.lora.inject import (
    _PEFT_KEY,
    _SUPPORTED_LAYERS,
    _TEXT_MODEL,
    DEFAULT_UNET_TARGETS,
    FLOW_ATTENTION_TARGETS,
    TEXT_ENCODER_TARGETS,
    UNET_ATTENTION_TARGETS,
    LoraSpec,
    _add_adapter,
    _canonical_te,
    _components,
    _freeze_base,
    _group_peft,
    _has_adapter,
    _is_te,
    _lora_layers,
    _supported_layers,
    add_lora,
    get_lora_state_dict,
    lora_components,
)
from popalign_core.lora.kohya import (
    _COMFY_TE_MODULE,
    _KOHYA_KEY,
    _kohya_to_peft,
    _resolve_by_vocabulary,
    kohya_to_peft,
    peft_to_kohya,
)
from popalign_core.lora.metadata import (
    DIFFUSERS_METADATA_KEY,
    _alphas_from_diffusers_metadata,
    _base_metadata,
    _check_metadata,
    _diffusers_adapter_metadata,
    _most_common,
    check_lora_family,
    lora_metadata,
    model_hash,
)
from popalign_core.models.families import FAMILIES

__all__ = [
    "DEFAULT_UNET_TARGETS",
    "DIFFUSERS_WEIGHT_NAME",
    "FLOW_ATTENTION_TARGETS",
    "LORA_FORMATS",
    "LoraFormat",
    "LoraSpec",
    "TEXT_ENCODER_TARGETS",
    "UNET_ATTENTION_TARGETS",
    "add_lora",
    "check_lora_family",
    "get_lora_state_dict",
    "kohya_to_peft",
    "load_lora",
    "lora_components",
    "lora_metadata",
    "model_hash",
    "peft_to_kohya",
    "read_lora",
    "save_lora",
]

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


# ------------------------------------------------------------------------------------------------------ formats
@dataclass(frozen=True)
class LoraFormat:
    """An on-disk LoRA layout. `is_folder`: the path names a folder (diffusers) rather than one file (kohya)."""

    name: str
    description: str
    is_folder: bool


LORA_FORMATS = {
    "diffusers": LoraFormat(
        "diffusers",
        f"diffusers/peft layout: a folder with {DIFFUSERS_WEIGHT_NAME} (unet. or transformer. / text_encoder. "
        "lora_A/lora_B keys); "
        "for diffusers' load_lora_weights",
        is_folder=True,
    ),
    "kohya": LoraFormat(
        "kohya",
        "kohya/A1111 layout: one .safetensors (lora_unet_ or lora_transformer_ / lora_te_ lora_down/lora_up/alpha "
        "keys); "
        "for ComfyUI's LoraLoader, A1111/Forge and diffusers",
        is_folder=False,
    ),
}


def _check_format(format: str) -> None:
    if format not in LORA_FORMATS:
        raise ValueError(f"format={format!r} is not supported; valid values: {', '.join(LORA_FORMATS)}")


def _check_target(path: str, format: str) -> None:
    if format == "kohya":
        if not path.endswith(".safetensors"):
            raise ValueError(f"path={path!r}: format 'kohya' writes one file, whose name must end in .safetensors")
        if os.path.isdir(path):
            raise ValueError(f"path={path!r} is a folder; format 'kohya' needs a file path")
    elif os.path.isfile(path):
        raise ValueError(f"path={path!r} is a file; format 'diffusers' needs a folder path")


def lora_file_contents(
    adapter, format: str = "kohya", metadata: Mapping[str, str] | None = None, adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of the adapter's LoRA `adapter_name` in layout `format` (see `save_lora`)."""
    _check_format(format)
    _check_metadata(metadata)
    sd, alphas = get_lora_state_dict(adapter, adapter_name)
    meta = dict(metadata or {})
    meta.update(_base_metadata(adapter, sd, alphas, format, adapter_name))
    tensors = {k: v.contiguous() for k, v in sd.items()}
    if format == "kohya":
        ignored = sorted(
            k.removesuffix(".lora_A.weight")
            for k in sd
            if k.startswith("text_encoder") and k.endswith(".lora_A.weight") and not _COMFY_TE_MODULE.match(k)
        )
        if ignored:
            warnings.warn(
                f"save_lora: ComfyUI's LoraLoader applies text-encoder LoRA only to q/k/v/out_proj and fc1/fc2 of the "
                f"encoder layers; it will skip {len(ignored)} module(s), e.g. {ignored[:3]}",
                stacklevel=3,
            )
        tensors = peft_to_kohya(tensors, adapter.family, alphas)
    else:
        meta["format"] = "pt"
        peft_kwargs = _diffusers_adapter_metadata(adapter, sd, alphas, adapter_name)
        meta[DIFFUSERS_METADATA_KEY] = json.dumps(peft_kwargs, indent=2, sort_keys=True)  # as diffusers writes it
    return tensors, meta


def save_lora(
    adapter,
    path: str | os.PathLike,
    format: str = "kohya",
    metadata: Mapping[str, str] | None = None,
    adapter_name: str = "default",
) -> str:
    """Save the adapter's LoRA `adapter_name` atomically; returns the written file's path.

    format "kohya": `path` is the .safetensors file (ComfyUI: put it in models/loras/); "diffusers": `path` is a
    folder (created if needed) that receives `pytorch_lora_weights.safetensors`. metadata: extra str -> str
    entries (see `lora_metadata`); popalign_version, lora_format, family, lora_rank, lora_alpha and the targets are
    always written (and for kohya the ss_* keys kohya-trained LoRAs carry). Files get ordinary permissions (0644
    under the usual umask). Several layouts at once, as one step: `save_lora_formats`.
    """

    _check_format(format)
    path = os.fspath(path)
    _check_metadata(metadata)
    _check_target(path, format)
    tensors, meta = lora_file_contents(adapter, format, metadata, adapter_name)
    if format == "kohya":
        target = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)
        target = os.path.join(path, DIFFUSERS_WEIGHT_NAME)
    save_safetensors(tensors, target, meta)
    return target


def save_lora_formats(
    adapter,
    targets: Mapping[str, str | os.PathLike],
    metadata: Mapping[str, str] | None = None,
    adapter_name: str = "default",
) -> dict[str, str]:
    """Save the LoRA in several layouts ({format: path}, paths as in `save_lora`, all in one folder) as one step
    (`fileio.publish_together`): after a kill at any point, the next writer's start leaves either all old or all new
    files, never a mix of two steps. Returns {format: written file}."""
    import safetensors.torch

    _check_metadata(metadata)
    paths = {fmt: os.fspath(p) for fmt, p in targets.items()}
    for fmt, p in paths.items():
        _check_format(fmt)
        _check_target(p, fmt)
    folders = {os.path.realpath(os.path.dirname(p) or ".") for p in paths.values()}  # as the system finds it
    if len(folders) != 1:
        raise ValueError(f"save_lora_formats: every target must be in one folder, got {sorted(folders)}")
    written = {}
    with publish_together(folders.pop()) as st:
        for fmt, p in paths.items():
            tensors, meta = lora_file_contents(adapter, fmt, metadata, adapter_name)
            tmp = st.stage(p)
            if fmt == "kohya":
                safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
                written[fmt] = p
            else:
                tmp.mkdir()
                safetensors.torch.save_file(tensors, str(tmp / DIFFUSERS_WEIGHT_NAME), metadata=meta)
                written[fmt] = os.path.join(p, DIFFUSERS_WEIGHT_NAME)
    return written


def _detect_format(keys: list[str]) -> str | None:
    for name, pattern in (("kohya", _KOHYA_KEY), ("diffusers", _PEFT_KEY)):
        matched = [k for k in keys if pattern.match(k)]
        if matched and len(matched) == len(keys):
            return name
        if matched:
            other = [k for k in keys if not pattern.match(k)]
            raise ValueError(
                f"a {name}-layout LoRA with {len(other)} key(s) of unsupported kinds (e.g. {other[:3]}); supported: "
                "plain LoRA down/up (A/B) weights and alphas (not LoCon mid, LoHa, LoKr, DoRA, LoRA bias)"
            )
    return None


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(state_dict, metadata, format) of a LoRA file, or of a folder holding `pytorch_lora_weights.safetensors`
    (or exactly one .safetensors). Only safetensors are read (no pickle). The format ("diffusers" or "kohya") is
    detected from the keys; ValueError when the keys are neither, `fileio.CorruptFileError` for a damaged file.
    """

    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, DIFFUSERS_WEIGHT_NAME)):
            path = os.path.join(path, DIFFUSERS_WEIGHT_NAME)
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(files) != 1:
                raise ValueError(
                    f"path={path!r}: folder holds no {DIFFUSERS_WEIGHT_NAME} and {len(files)} .safetensors files "
                    f"({files[:5]}); name the file"
                )
            path = os.path.join(path, files[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file {path!r} does not exist")
    sd, metadata = read_safetensors(
        path,
        "LoRA file",
        "re-export it (re-running `popalign train` with the same output folder writes it again from "
        "its last checkpoint) or choose another LoRA",
    )
    fmt = _detect_format(list(sd))
    if fmt is None:
        lora_like = [k for k in sd if "lora" in k.lower()]
        raise ValueError(
            f"path={path!r}: no recognised LoRA keys ({len(sd)} tensors, {len(lora_like)} with 'lora' in the name, "
            f"e.g. {list(sd)[:3]}); valid formats: {', '.join(LORA_FORMATS)} ('<unet|transformer|text_encoder>."
            "<module>.lora_A|lora_B.weight' or 'lora_<unet|transformer|te|te1|te2>_<module>.lora_down|lora_up."
            "weight|alpha')"
        )
    return sd, metadata, fmt


def _module_resolver(comps: Mapping[str, torch.nn.Module]) -> Callable[[str, str], str]:
    cache: dict[str, dict[str, str]] = {}

    def resolve(prefix: str, underscored: str) -> str:
        if prefix not in comps:
            return _resolve_by_vocabulary(underscored)
        if prefix not in cache:
            names = {}
            for n in _supported_layers(comps[prefix]):
                canonical = _canonical_te(n) if _is_te(prefix) else n
                names[canonical.replace(".", "_")] = canonical
            cache[prefix] = names
        return cache[prefix].get(underscored) or _resolve_by_vocabulary(underscored)

    return resolve


_Plan = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]  # {prefix: {module: (A, B, alpha)}}


def _resolve_module(
    path, prefix: str, module: str, value, existing: Mapping[str, torch.nn.Module], family: str
) -> str:
    """The name of `module` in the model (text-encoder names with or without `text_model.`); ValueError when it is
    not a Linear/Conv2d layer there or the LoRA's shapes do not fit its weight."""
    name = module
    if name not in existing and _is_te(prefix) and name.startswith(_TEXT_MODEL):
        name = name.removeprefix(_TEXT_MODEL)
    elif name not in existing and _is_te(prefix):
        name = _TEXT_MODEL + name
    target = existing.get(name)
    base = getattr(target, "base_layer", target)
    if not isinstance(base, _SUPPORTED_LAYERS):
        raise ValueError(
            f"{path!s}: LoRA module {prefix}.{module} is not a Linear/Conv2d module of this {prefix} "
            f"(is the file for another model family or architecture than {family!r}?)"
        )
    a, b, _ = value
    w = base.weight
    expect_a = (a.shape[0], *w.shape[1:]) if isinstance(base, torch.nn.Conv2d) else (a.shape[0], w.shape[1])
    expect_b = (w.shape[0], a.shape[0], 1, 1) if isinstance(base, torch.nn.Conv2d) else (w.shape[0], a.shape[0])
    if tuple(a.shape) != expect_a or tuple(b.shape) != expect_b:
        raise ValueError(
            f"{path!s}: {prefix}.{module}: LoRA shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit the "
            f"layer's weight {tuple(w.shape)} (expected {expect_a} / {expect_b})"
        )
    return name


def _check_components(path, sd, family: str, comps: Mapping[str, torch.nn.Module]) -> None:
    """ValueError naming the families a peft-layout LoRA's components belong to when the model lacks one."""
    for prefix in sorted({p for p, _ in _group_peft(sd)}):
        if prefix not in comps:
            owners = [f for f in FAMILIES if prefix in lora_components(f)]
            raise ValueError(
                f"{path!s}: the LoRA has {prefix}.* weights (a LoRA for {' / '.join(owners)}) but family "
                f"{family!r} has no {prefix}"
            )


def _load_plan(adapter, path, sd, alphas, comps: Mapping[str, torch.nn.Module]) -> _Plan:
    """{prefix: {module name in the model: (A, B, alpha)}} of a peft-layout state dict, every module checked."""
    _check_components(path, sd, adapter.family, comps)
    plan: _Plan = collections.defaultdict(dict)
    for (prefix, module), ab in _group_peft(sd).items():
        plan[prefix][module] = (ab["lora_A"], ab["lora_B"], alphas[f"{prefix}.{module}.alpha"])
    for prefix, mods in list(plan.items()):
        existing = dict(comps[prefix].named_modules())
        plan[prefix] = {
            _resolve_module(path, prefix, module, value, existing, adapter.family): value
            for module, value in mods.items()
        }
    return plan


def _check_existing(plan: _Plan, comps: Mapping[str, torch.nn.Module], adapter_name: str) -> None:
    """A component that already holds `adapter_name` must hold it on exactly the plan's modules and ranks."""
    for prefix, model in comps.items():
        layers = _lora_layers(model, adapter_name)
        if not layers and not _has_adapter(model, adapter_name):
            continue
        if prefix not in plan:
            raise ValueError(
                f"adapter_name={adapter_name!r}: {prefix} already has a LoRA of that name but the file has none "
                f"for {prefix}; load into a fresh adapter or use another adapter_name"
            )
        same_ranks = set(layers) == set(plan[prefix]) and all(
            layers[n].r[adapter_name] == v[0].shape[0] for n, v in plan[prefix].items()
        )
        if not same_ranks:
            raise ValueError(
                f"adapter_name={adapter_name!r}: {prefix} already has a LoRA of that name on other modules or ranks "
                "than the file's; load into a fresh adapter or use another adapter_name"
            )


def _apply_plan(plan: _Plan, comps: Mapping[str, torch.nn.Module], adapter_name: str) -> None:
    """Create the missing LoRA layers (the most common rank / alpha, the others as patterns), copy the weights."""
    from peft import LoraConfig

    for prefix, mods in plan.items():
        model = comps[prefix]
        if not _lora_layers(model, adapter_name):
            ranks = {n: int(v[0].shape[0]) for n, v in mods.items()}
            alpha_of = {n: float(v[2]) for n, v in mods.items()}
            r, alpha = int(_most_common(ranks.values())), float(_most_common(alpha_of.values()))
            config = LoraConfig(
                r=r,
                lora_alpha=alpha,
                target_modules=sorted(mods),
                rank_pattern={f"^{re.escape(n)}": v for n, v in ranks.items() if v != r},
                alpha_pattern={f"^{re.escape(n)}": v for n, v in alpha_of.items() if v != alpha},
            )
            _add_adapter(model, config, adapter_name)
        layers = _lora_layers(model, adapter_name)
        with torch.no_grad():
            for name, (a, b, alpha) in mods.items():
                layer = layers[name]
                layer.lora_A[adapter_name].weight.copy_(a)
                layer.lora_B[adapter_name].weight.copy_(b)
                layer.lora_alpha[adapter_name] = alpha
                layer.set_scale(adapter_name, 1.0)
        if hasattr(model, "set_adapter"):
            model.set_adapter(adapter_name)


def load_lora(adapter, path: str | os.PathLike, adapter_name: str = "default") -> dict[str, str]:
    """Load a LoRA file (format detected from its keys) into `adapter` as `adapter_name`; returns the metadata.

    When a component has no LoRA of that name yet, its LoRA layers are created with the file's ranks, alphas and
    modules; when it has one, it must cover the same modules with the same ranks, and its weights and alphas are
    overwritten (e.g. to resume training). Base weights are frozen as in `add_lora`; the LoRA is active.
    Everything is checked before any model is changed; a file whose metadata names another family than the
    adapter's is refused (ValueError naming both).
    """
    sd, metadata, fmt = read_lora(path)
    comps = _components(adapter)
    if fmt == "kohya":  # (checks the components first, as _check_components does for the diffusers layout)
        sd, alphas = _kohya_to_peft(sd, adapter.family, _module_resolver(comps))
    else:
        _check_components(path, sd, adapter.family, comps)
        alphas = _alphas_from_diffusers_metadata(sd, metadata)
    check_lora_family(path, metadata, adapter.family)  # before the modules: e.g. sd3 <-> flux share the keys
    plan = _load_plan(adapter, path, sd, alphas, comps)
    _check_existing(plan, comps, adapter_name)
    _apply_plan(plan, comps, adapter_name)
    _freeze_base(adapter, adapter_name)
    return metadata
