"""LoRA file metadata: training provenance (`lora_metadata`, `model_hash`) and what `save_lora` writes beside it.

Metadata (safetensors str -> str) written by `save_lora`: popalign_version, lora_format, family, lora_rank,
lora_alpha, lora_unet_targets / lora_text_encoder_targets (JSON lists), kohya's ss_network_module / ss_network_dim /
ss_network_alpha / ss_base_model_version / ss_v2 (kohya files), format="pt" and lora_adapter_metadata (diffusers
files), plus the caller's entries, e.g. from `lora_metadata` (loss, hyperparameters as JSON, base_model_hash,
data_hash).

alpha != rank in the "diffusers" layout is carried the way diffusers' own training scripts carry it: the metadata key
`lora_adapter_metadata` holds a JSON object of prefixed `LoraConfig` kwargs (`"unet.r"`, `"unet.lora_alpha"`,
`"unet.target_modules"`, ...), which `diffusers.loaders.lora_base` (`_fetch_state_dict` ->
`_load_sft_state_dict_metadata`) reads and `diffusers.utils.peft_utils._create_lora_config` turns into the
`LoraConfig` (diffusers >= 0.34, PR #11324; older versions ignore it and assume alpha == rank).
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from collections.abc import Iterable, Mapping

import torch

from popalign_core import __version__
from popalign_core.common.fileio import check_safetensors_metadata
from popalign_core.lora.inject import (
    _TEXT_MODEL,
    _components,
    _group_peft,
    _is_te,
    _lora_layers,
    _short_name,
    _supported_layers,
    _target_matches,
    denoiser_prefix,
)

__all__ = ["DIFFUSERS_METADATA_KEY", "KOHYA_MODEL_VERSIONS", "check_lora_family", "lora_metadata", "model_hash"]

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
#: kohya's `ss_base_model_version` per family (sd-scripts: "sd_v1", "sd_v2", "sdxl_base_v1-0", flux_utils'
#: "flux1"; "sd3" for SD3); informational: no loader reads it to select the model
KOHYA_MODEL_VERSIONS = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}


def model_hash(module) -> str:
    """sha256 (hex) over a model's base (non-LoRA) weights: each state-dict entry's name, dtype, shape and bytes.

    `module`: an nn.Module, a sequence of them, or an adapter (its UNet then its text encoders). peft wrapping is
    ignored (`.base_layer` dropped from names, LoRA tensors skipped), so the hash is the same with or without a
    LoRA. Cost: one streamed pass over every weight byte, one tensor at a time (each is copied to the CPU if it is
    not there): about 1-2 s per GB on a CPU core (SD1.5 UNet + text encoder in fp32 ~ 4 GB: several seconds), no
    extra memory beyond the largest tensor. Compute it once per base model, not at every save.
    """
    if hasattr(module, "unet") and hasattr(module, "text_encoders"):
        modules = [module.unet, *(m for m in module.text_encoders if m is not None)]  # SD3 may run without T5
    elif isinstance(module, torch.nn.Module):
        modules = [module]
    else:
        modules = list(module)
        if not modules or not all(isinstance(m, torch.nn.Module) for m in modules):
            raise ValueError("module: expected an nn.Module, a non-empty sequence of them, or an adapter")
    h = hashlib.sha256()
    for i, mod in enumerate(modules):
        for name, t in mod.state_dict(keep_vars=True).items():
            if ".lora_" in name or name.startswith("lora_"):
                continue
            name = name.replace(".base_layer.", ".")
            t = t.detach()
            h.update(f"{i}:{name}:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)}\n".encode())
            if t.numel():
                flat = t.to("cpu").contiguous().reshape(-1).view(torch.uint8)
                h.update(memoryview(flat.numpy()))
    return h.hexdigest()


def lora_metadata(
    *,
    loss: str | None = None,
    hyperparameters: Mapping | None = None,
    base_model_hash: str | None = None,
    data_hash: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """Training provenance as safetensors metadata (str -> str), to pass to `save_lora(..., metadata=...)`.

    loss: loss name (e.g. a key of `popalign_core.train.losses.LOSSES`); hyperparameters: JSON-serialisable mapping,
    stored as a sorted JSON string; base_model_hash: `model_hash(...)` of the base model; data_hash: a hash of the
    training data; extra: more str values. `save_lora` itself adds popalign_version, the format, family and the
    LoRA's rank / alpha / targets.
    """
    meta = {}
    if loss is not None:
        meta["loss"] = str(loss)
    if hyperparameters is not None:
        if not isinstance(hyperparameters, Mapping):
            raise ValueError(f"hyperparameters: expected a mapping, got {type(hyperparameters).__name__}")
        try:
            meta["hyperparameters"] = json.dumps(dict(hyperparameters), sort_keys=True)
        except TypeError as e:
            raise ValueError(f"hyperparameters: not JSON-serialisable ({e})") from None
    if base_model_hash is not None:
        meta["base_model_hash"] = str(base_model_hash)
    if data_hash is not None:
        meta["data_hash"] = str(data_hash)
    for k, v in extra.items():
        if not isinstance(v, str):
            raise ValueError(f"{k}={v!r}: metadata values must be str")
        meta[k] = v
    return meta


def _most_common(values: Iterable) -> float:
    return collections.Counter(values).most_common(1)[0][0]


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _compact_targets(model: torch.nn.Module, adapter_name: str) -> list[str]:
    """The shortest target list (peft list semantics) that selects exactly the modules holding the LoRA.

    Candidates: the peft config's `target_modules` (the `LoraSpec` targets after `add_lora`), the modules' short
    names; else the full module paths (text-encoder paths without "text_model.", which suffix matching finds with or
    without that level).
    """
    names = set(_lora_layers(model, adapter_name))
    candidates = []
    cfg = (getattr(model, "peft_config", None) or {}).get(adapter_name)
    if cfg is not None and cfg.target_modules and not isinstance(cfg.target_modules, str):
        candidates.append(sorted(cfg.target_modules))
    candidates.append(sorted({_short_name(n) for n in names}))
    layers = _supported_layers(model)
    exact = [c for c in candidates if {n for n in layers if any(_target_matches(n, t) for t in c)} == names]
    return min(exact, key=len) if exact else sorted(n.removeprefix(_TEXT_MODEL) for n in names)


def _base_metadata(adapter, sd, alphas, format: str, adapter_name: str) -> dict[str, str]:
    groups = _group_peft(sd)
    ranks = [ab["lora_A"].shape[0] for ab in groups.values()]
    comps = _components(adapter)
    targets = {p: _compact_targets(comps[p], adapter_name) for p in {p for p, _ in groups}}
    te_targets = next((targets[p] for p in ("text_encoder", "text_encoder_2") if p in targets), None)
    rank, alpha = int(_most_common(ranks)), float(_most_common(alphas.values()))
    meta = {
        "popalign_version": __version__,
        "lora_format": format,
        "family": adapter.family,
        "lora_rank": str(rank),
        "lora_alpha": _fmt_number(alpha),
        "lora_unet_targets": json.dumps(targets.get(denoiser_prefix(adapter.family))),
        "lora_text_encoder_targets": json.dumps(te_targets),
    }
    if format == "kohya":
        version = KOHYA_MODEL_VERSIONS[adapter.family]
        if adapter.family == "sd2" and getattr(adapter, "prediction_type", "epsilon") == "v_prediction":
            version += "_v"  # kohya's get_model_version_str_for_sd1_sd2
        meta.update(
            ss_network_module="networks.lora",
            ss_network_dim=str(rank),
            ss_network_alpha=_fmt_number(alpha),
            ss_base_model_version=version,
            ss_v2=str(adapter.family == "sd2"),
        )
    return meta


def _diffusers_adapter_metadata(adapter, sd, alphas, adapter_name: str) -> dict:
    """diffusers' `lora_adapter_metadata` object: prefixed `LoraConfig` kwargs per component (see module doc)."""
    out = {}
    comps = _components(adapter)
    by_prefix: dict[str, dict[str, tuple[int, float]]] = collections.defaultdict(dict)
    for (prefix, module), ab in _group_peft(sd).items():
        by_prefix[prefix][module] = (int(ab["lora_A"].shape[0]), float(alphas[f"{prefix}.{module}.alpha"]))
    for prefix, mods in by_prefix.items():
        # names as a model matches them: UNet paths as-is; text-encoder paths without "text_model." (peft's
        # suffix match then finds them with or without that level)
        names = {(m.removeprefix(_TEXT_MODEL) if _is_te(prefix) else m): ra for m, ra in mods.items()}
        r = int(_most_common(v[0] for v in names.values()))
        alpha = float(_most_common(v[1] for v in names.values()))
        out.update(
            {
                f"{prefix}.r": r,
                f"{prefix}.lora_alpha": alpha,
                f"{prefix}.target_modules": _compact_targets(comps[prefix], adapter_name),
                f"{prefix}.rank_pattern": {re.escape(n): v[0] for n, v in sorted(names.items()) if v[0] != r},
                f"{prefix}.alpha_pattern": {re.escape(n): v[1] for n, v in sorted(names.items()) if v[1] != alpha},
            }
        )
    return out


# ------------------------------------------------------------------------------------------------------ save / read
def check_lora_family(path, metadata: Mapping[str, str], family: str) -> None:
    """ValueError naming both families when a LoRA file's recorded `family` (written by `save_lora`) is not the
    model's: a LoRA trained on one family means nothing on another (other modules, widths and, for UNet vs flow,
    another prediction). Files without the entry (made by other tools) are checked by their keys only."""
    recorded = metadata.get("family")
    if recorded is not None and recorded != family:
        raise ValueError(
            f"{path!s}: the LoRA was trained on family {recorded!r} (its metadata says so) but the model is family "
            f"{family!r}; load it onto a {recorded!r} model, or train one for {family!r}"
        )


def _check_metadata(metadata: Mapping[str, str] | None) -> None:
    check_safetensors_metadata(metadata, reserved=("format", DIFFUSERS_METADATA_KEY))


def _alphas_from_diffusers_metadata(sd, metadata: Mapping[str, str]) -> dict[str, float]:
    """Per-module alphas of a diffusers-layout file: from `lora_adapter_metadata` when present, else alpha = rank."""
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    cfg = json.loads(raw) if raw else {}
    alphas = {}
    for (prefix, module), ab in _group_peft(sd).items():
        r = int(ab["lora_A"].shape[0])
        if f"{prefix}.r" not in cfg and f"{prefix}.lora_alpha" not in cfg:
            alphas[f"{prefix}.{module}.alpha"] = float(r)
            continue
        if cfg.get(f"{prefix}.use_rslora") or cfg.get(f"{prefix}.use_dora"):
            raise ValueError(f"{prefix}: rsLoRA / DoRA LoRAs are not supported")
        alpha = float(cfg.get(f"{prefix}.lora_alpha", cfg.get(f"{prefix}.r", r)))
        for pattern, value in (cfg.get(f"{prefix}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):  # peft's get_pattern_key rule
                alpha = float(value)
                break
        alphas[f"{prefix}.{module}.alpha"] = alpha
    return alphas
