"""Offline loading of the flow families (SD3.x, FLUX.1): a diffusers folder -> pipeline, and the components of single
files (`models.flow_parts` gathers them from one all-in-one file or separate component files).

`models.loading.load_pipeline` / `load_model` dispatch here for "sd3" and "flux"; `load_model` wraps the pipeline in
a `FlowAdapter`. Nothing is fetched: configs come from ``popalign_core/configs/{sd3,flux}`` (official SD3.5-medium and
FLUX.1-dev values) or ``config_dir``, CLIP tokenizers are the shipped ones, the T5 tokenizer is the user's.

Single-file layout (ComfyUI 0.3.75's ``CheckpointLoaderSimple``: ``comfy/sd.py`` ``load_state_dict_guess_config``
with the ``SD3`` / ``Flux`` entries of ``comfy/supported_models.py``):

- transformer ``model.diffusion_model.*`` in the original MMDiT (SD3: ``joint_blocks.N.{x,context}_block``) or BFL
  (FLUX: ``double_blocks.N`` / ``single_blocks.N``) layout: fused q/k/v, shift-before-scale final modulation;
- VAE ``first_stage_model.*`` (SD3) or ``vae.*`` (FLUX; ``first_stage_model.*`` is read too), LDM layout;
- text encoders ``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*`` (SD3) and
  ``text_encoders.t5xxl.transformer.*`` (optional for SD3), transformers layout.

The transformer's shape (depth, width, heads, dual-attention layers, qk norm, guidance input, ...) is read from its
keys, as ComfyUI does, so one shipped config serves SD3-medium, SD3.5-medium/large, FLUX.1-dev and -schnell; the
config folder supplies what keys cannot tell (head dim, RoPE axes, sample size, VAE and encoder configs, schedule).
Components are built with diffusers' own single-file loaders, each reading only its prefix's tensors. diffusers'
FLUX conversion hard-codes the FLUX.1 width (3072): other widths (test models) are converted with the same table
`transformer_layout` (the inverse of diffusers' conversion, checked against it at 3072 in the tests).

SD3's CLIP-L text projection is the identity in both diffusers' single-file loader and ComfyUI (which uses the
unprojected pooled output); files carry no projection for it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from popalign_core.models.loading_common import (
    check_materialised,
    component_weights,
    read_json,
    require_files,
)
from popalign_core.models.tokenizers import T5_TOKENIZER_FILES, clip_tokenizer, t5_tokenizer

TRANSFORMER_PREFIX = "model.diffusion_model."
#: the key (after the prefix) that marks each flow family's transformer
TRANSFORMER_MARKERS = {"sd3": "joint_blocks.", "flux": "double_blocks."}
TEXT_ENCODER_PREFIXES = {
    "sd3": {
        "text_encoder": "text_encoders.clip_l.transformer.",
        "text_encoder_2": "text_encoders.clip_g.transformer.",
        "text_encoder_3": "text_encoders.t5xxl.transformer.",
    },
    "flux": {
        "text_encoder": "text_encoders.clip_l.transformer.",
        "text_encoder_2": "text_encoders.t5xxl.transformer.",
    },
}
VAE_PREFIXES = {"sd3": ("first_stage_model.",), "flux": ("vae.", "first_stage_model.")}
T5_COMPONENT = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}
T5_TOKENIZER_DIRS = {"sd3": "tokenizer_3", "flux": "tokenizer_2"}
PIPELINE_CLASSES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
#: the width diffusers' FLUX single-file conversion assumes (every FLUX.1 model)
FLUX_WIDTH = 3072
NOT_TRANSFORMER = ("text_encoders.", "first_stage_model.", "vae.", "cond_stage_model.", "conditioner.")
_T5_WHERE = (
    "the T5 tokenizer: pass t5_tokenizer=<folder> (the diffusers model's {dir}/ folder, or ComfyUI's "
    "comfy/text_encoders/t5_tokenizer/), or put tokenizer.json / spiece.model into {where}"
)

Rule = tuple[str, tuple[str, ...], bool]


# ------------------------------------------------------------------------------------------------ transformer layout
def _sd3_pairs(transformer) -> list[Rule]:
    p: list[Rule] = [
        ("pos_embed", ("pos_embed.pos_embed",), False),
        ("x_embedder.proj", ("pos_embed.proj",), False),
        ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",), False),
        ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",), False),
        ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",), False),
        ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",), False),
        ("context_embedder", ("context_embedder",), False),
    ]
    for i, block in enumerate(transformer.transformer_blocks):
        x, c, d = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
        p += [
            (f"{x}.attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), False),
            (f"{c}.attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"), False),
            (f"{x}.attn.proj", (f"{d}.attn.to_out.0",), False),
            (f"{x}.adaLN_modulation.1", (f"{d}.norm1.linear",), False),
            # the last block's context norm is an AdaLayerNormContinuous: (shift, scale) in the original
            (f"{c}.adaLN_modulation.1", (f"{d}.norm1_context.linear",), bool(block.context_pre_only)),
            (f"{x}.mlp.fc1", (f"{d}.ff.net.0.proj",), False),
            (f"{x}.mlp.fc2", (f"{d}.ff.net.2",), False),
        ]
        if block.attn.norm_q is not None:
            p += [(f"{x}.attn.ln_{n}", (f"{d}.attn.norm_{n}",), False) for n in "qk"]
            p += [(f"{c}.attn.ln_{n}", (f"{d}.attn.norm_added_{n}",), False) for n in "qk"]
        if not block.context_pre_only:
            p += [
                (f"{c}.attn.proj", (f"{d}.attn.to_add_out",), False),
                (f"{c}.mlp.fc1", (f"{d}.ff_context.net.0.proj",), False),
                (f"{c}.mlp.fc2", (f"{d}.ff_context.net.2",), False),
            ]
        if getattr(block, "attn2", None) is not None:
            p += [
                (f"{x}.attn2.qkv", (f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"), False),
                (f"{x}.attn2.proj", (f"{d}.attn2.to_out.0",), False),
            ]
            if block.attn2.norm_q is not None:
                p += [(f"{x}.attn2.ln_{n}", (f"{d}.attn2.norm_{n}",), False) for n in "qk"]
    p += [("final_layer.linear", ("proj_out",), False), ("final_layer.adaLN_modulation.1", ("norm_out.linear",), True)]
    return p


def _flux_pairs(transformer) -> list[Rule]:
    p: list[Rule] = [
        ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), False),
        ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), False),
        ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), False),
        ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), False),
        ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), False),
        ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), False),
        ("txt_in", ("context_embedder",), False),
        ("img_in", ("x_embedder",), False),
    ]
    for i in range(len(transformer.transformer_blocks)):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        p += [
            (f"{o}.img_mod.lin", (f"{d}.norm1.linear",), False),
            (f"{o}.txt_mod.lin", (f"{d}.norm1_context.linear",), False),
            (f"{o}.img_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), False),
            (f"{o}.txt_attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"), False),
            (f"{o}.img_attn.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",), False),
            (f"{o}.img_attn.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",), False),
            (f"{o}.txt_attn.norm.query_norm.scale", (f"{d}.attn.norm_added_q.weight",), False),
            (f"{o}.txt_attn.norm.key_norm.scale", (f"{d}.attn.norm_added_k.weight",), False),
            (f"{o}.img_mlp.0", (f"{d}.ff.net.0.proj",), False),
            (f"{o}.img_mlp.2", (f"{d}.ff.net.2",), False),
            (f"{o}.txt_mlp.0", (f"{d}.ff_context.net.0.proj",), False),
            (f"{o}.txt_mlp.2", (f"{d}.ff_context.net.2",), False),
            (f"{o}.img_attn.proj", (f"{d}.attn.to_out.0",), False),
            (f"{o}.txt_attn.proj", (f"{d}.attn.to_add_out",), False),
        ]
    for i in range(len(transformer.single_transformer_blocks)):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        p += [
            (f"{o}.modulation.lin", (f"{d}.norm.linear",), False),
            (f"{o}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"), False),
            (f"{o}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",), False),
            (f"{o}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",), False),
            (f"{o}.linear2", (f"{d}.proj_out",), False),
        ]
    p += [("final_layer.linear", ("proj_out",), False), ("final_layer.adaLN_modulation.1", ("norm_out.linear",), True)]
    return p


def transformer_layout(transformer, family: str) -> list[Rule]:
    """The original-layout key table of an `SD3Transformer2DModel` / `FluxTransformer2DModel` (meta models work).

    Returns (original key, diffusers keys concatenated along dim 0, swap halves) per tensor, built from the model's
    blocks: the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` /
    ``convert_flux_transformer_checkpoint_to_diffusers`` (fused q/k/v [and FLUX's single-block MLP input]; final
    (and SD3's last context) modulation stored (shift, scale), diffusers' (scale, shift)). Every parameter and
    persistent buffer is covered, else a ValueError names the uncovered ones.
    """
    pairs = _sd3_pairs(transformer) if family == "sd3" else _flux_pairs(transformer)
    keys = set(transformer.state_dict())
    rules: list[Rule] = []
    for orig, diff, swap in pairs:
        if diff[0] in keys:
            rules.append((orig, diff, swap))
            continue
        for s in ("weight", "bias"):
            if f"{diff[0]}.{s}" in keys:
                rules.append((f"{orig}.{s}", tuple(f"{d}.{s}" for d in diff), swap))
    left = sorted(keys - {d for _, diff, _ in rules for d in diff})
    if left:
        raise ValueError(f"{family} transformer: no original-layout name for parameter(s) {', '.join(left[:8])}")
    return rules


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along dim 0: diffusers' (scale, shift) <-> the original (shift, scale); its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def layout_to_original(sd: Mapping[str, torch.Tensor], rules: Iterable[Rule]) -> dict[str, torch.Tensor]:
    """Diffusers-layout tensors -> original-layout ones by `rules` (single tensors shared, not copied)."""
    out = {}
    for orig, diff, swap in rules:
        t = sd[diff[0]] if len(diff) == 1 else torch.cat([sd[d] for d in diff], dim=0)
        out[orig] = swap_halves(t) if swap else t
    return out


def layout_from_original(orig: Mapping[str, torch.Tensor], rules: Iterable[Rule], shapes: Mapping, what: str) -> dict:
    """Original-layout tensors -> diffusers layout by `rules`; `shapes`: the diffusers model's tensor shapes."""
    rules = list(rules)
    missing = [o for o, _, _ in rules if o not in orig]
    if missing:
        raise ValueError(f"{what}: missing transformer weight(s) {', '.join(missing[:8])} ({len(missing)} in all)")
    out = {}
    for o, diff, swap in rules:
        t = swap_halves(orig[o]) if swap else orig[o]
        parts = t.split([shapes[d][0] for d in diff], dim=0) if len(diff) > 1 else (t,)
        out.update(zip(diff, parts))
    return out


# ------------------------------------------------------------------------------------------------- reading a file
def flow_family_of_keys(keys: Iterable[str]) -> tuple[str, str] | None:
    """(family, transformer key prefix) of a flow checkpoint by its key names, or None. The prefix is
    ``model.diffusion_model.`` (all-in-one files) or "" (a transformer-only file, e.g. BFL's own FLUX release)."""
    keys = list(keys)
    for prefix in (TRANSFORMER_PREFIX, ""):
        for family, marker in TRANSFORMER_MARKERS.items():
            if any(k.startswith(prefix + marker) for k in keys):
                return family, prefix
    return None


def _count(sd: Mapping, head: str) -> int:
    return len({k[len(head) :].split(".", 1)[0] for k in sd if k.startswith(head)})


def transformer_overrides(sd: Mapping[str, torch.Tensor], family: str, base: Mapping) -> dict:
    """The transformer config values its original-layout tensors determine (as ComfyUI's model detection reads
    them); `base`: the config folder's transformer/config.json (head dim, RoPE axes)."""
    head_dim = int(base.get("attention_head_dim", 64 if family == "sd3" else 128))
    if family == "sd3":
        x = sd["x_embedder.proj.weight"]
        hidden, p = x.shape[0], x.shape[2]
        out = dict(
            num_layers=_count(sd, "joint_blocks."),
            in_channels=x.shape[1],
            patch_size=p,
            out_channels=sd["final_layer.linear.weight"].shape[0] // (p * p),
            joint_attention_dim=sd["context_embedder.weight"].shape[1],
            caption_projection_dim=sd["context_embedder.weight"].shape[0],
            pooled_projection_dim=sd["y_embedder.mlp.0.weight"].shape[1],
            pos_embed_max_size=math.isqrt(sd["pos_embed"].shape[1]),
            qk_norm="rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in sd else None,
            dual_attention_layers=tuple(
                sorted(int(k.split(".")[1]) for k in sd if k.endswith("x_block.attn2.qkv.weight"))
            ),
        )
    else:
        hidden = sd["img_in.weight"].shape[0]
        head_dim = sd["double_blocks.0.img_attn.norm.key_norm.scale"].shape[0]
        axes = tuple(base.get("axes_dims_rope", (16, 56, 56)))
        if sum(axes) != head_dim:
            raise ValueError(
                f"transformer/config.json: axes_dims_rope {list(axes)} sum to {sum(axes)}, but the checkpoint's "
                f"attention heads are {head_dim} wide; use a config folder of this model"
            )
        out = dict(
            num_layers=_count(sd, "double_blocks."),
            num_single_layers=_count(sd, "single_blocks."),
            in_channels=sd["img_in.weight"].shape[1],
            out_channels=sd["final_layer.linear.weight"].shape[0],
            joint_attention_dim=sd["txt_in.weight"].shape[1],
            pooled_projection_dim=sd["vector_in.in_layer.weight"].shape[1],
            guidance_embeds="guidance_in.in_layer.weight" in sd,
        )
    if hidden % head_dim:
        raise ValueError(f"transformer width {hidden} is not a multiple of the config's attention_head_dim {head_dim}")
    return dict(out, attention_head_dim=head_dim, num_attention_heads=hidden // head_dim)


def load_transformer(sd: dict, where: str, family: str, cfg: Path, torch_dtype: torch.dtype):
    """The SD3 / FLUX transformer from its original-layout tensors `sd` (no prefix); `where`: the file, for errors."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    base = read_json(cfg / "transformer" / "config.json")
    try:
        over = transformer_overrides(sd, family, base)
    except KeyError as e:
        raise ValueError(f"{where}: not a complete {family} transformer (no {e.args[0]!r} weight)") from None
    if family == "flux" and over["attention_head_dim"] * over["num_attention_heads"] != FLUX_WIDTH:
        with torch.device("meta"):
            meta = cls.from_config({**base, **over})
        shapes = {k: v.shape for k, v in meta.state_dict().items()}
        sd = layout_from_original(sd, transformer_layout(meta, family), shapes, where)
    common = {"config": str(cfg), "subfolder": "transformer", "local_files_only": True, "torch_dtype": torch_dtype}
    return cls.from_single_file(sd, **common, **over)


def load_text_encoder(sd: dict, family: str, name: str, cfg: Path, torch_dtype: torch.dtype):
    """Text encoder `name` (text_encoder, text_encoder_2 [, text_encoder_3]) from its tensors in the transformers
    layout (no prefix: ``text_model.*`` [+ ``text_projection.weight``], T5 ``shared.weight`` + ``encoder.*``)."""
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        create_diffusers_t5_model_from_checkpoint,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    prefix = TEXT_ENCODER_PREFIXES[family][name]
    common = {"config": str(cfg), "subfolder": name, "local_files_only": True, "torch_dtype": torch_dtype}
    if name == T5_COMPONENT[family]:
        sd = {prefix + k: v for k, v in sd.items()}
        model = create_diffusers_t5_model_from_checkpoint(T5EncoderModel, checkpoint=sd, **common)
        model.tie_weights()  # files hold `shared` only; the encoder's embedding is the same tensor
        return model.eval()  # diffusers' T5 loader leaves it in training mode (dropout on)
    # CLIP-L's projection is the identity / unused (module docstring): only CLIP-G's is read
    keep = ("text_model.", "text_projection.") if name == "text_encoder_2" else ("text_model.",)
    sd = {prefix + k: v for k, v in sd.items() if k.startswith(keep)}
    cls = CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel
    return create_diffusers_clip_model_from_ldm(cls, checkpoint=sd, **common)


def resolve_t5_tokenizer(family: str, folder: Path | None, t5_tokenizer_dir, where: str):
    """The T5 tokenizer: `t5_tokenizer_dir` when given, else `folder` (a model or config folder's tokenizer_2|3)
    when it has tokenizer files, else a FileNotFoundError saying what to put where."""
    if t5_tokenizer_dir is not None:
        return t5_tokenizer(t5_tokenizer_dir)
    if folder is not None and any((folder / f).is_file() for f in T5_TOKENIZER_FILES):
        return t5_tokenizer(folder)
    raise FileNotFoundError(
        f"no T5 tokenizer for {where}: " + _T5_WHERE.format(dir=T5_TOKENIZER_DIRS[family], where=folder or where)
    )


def clip_tokenizers(family: str) -> dict:
    toks = {"tokenizer": clip_tokenizer("clip")}
    if family == "sd3":
        toks["tokenizer_2"] = clip_tokenizer("openclip")
    return toks


def flow_config_files(family: str, t5: bool = True) -> list[str]:
    names = ["transformer", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sd3" else [])
    names += [T5_COMPONENT[family]] if t5 else []
    return ["model_index.json", *[f"{n}/config.json" for n in names], "scheduler/scheduler_config.json"]


def flow_scheduler(root: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = read_json(root / "scheduler" / "scheduler_config.json")
    if cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(
            f"{root / 'scheduler' / 'scheduler_config.json'}: _class_name={cfg['_class_name']!r}; a flow model "
            "needs FlowMatchEulerDiscreteScheduler"
        )
    return FlowMatchEulerDiscreteScheduler.from_pretrained(str(root), subfolder="scheduler", local_files_only=True)


def pipeline_class(family: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline if family == "sd3" else FluxPipeline


# ------------------------------------------------------------------------------------------------- diffusers folder
def load_flow_folder(root: Path, index: dict, family: str, torch_dtype, t5, t5_tokenizer_dir):
    """A StableDiffusion3Pipeline / FluxPipeline folder (safetensors only), offline. SD3 without a text_encoder_3/
    folder (or with t5=False) loads without T5."""
    found = PIPELINE_CLASSES[index["_class_name"]]
    if family not in ("auto", found):
        raise ValueError(
            f"family={family!r} does not match {root} ({index['_class_name']}); valid values: auto, {found}"
        )
    family, t5_name = found, T5_COMPONENT[found]
    use_t5 = (root / t5_name).is_dir() and t5 is not False
    if not use_t5 and (family == "flux" or t5):
        raise FileNotFoundError(f"diffusers folder {root} is missing {t5_name}/ (the T5 text encoder)")
    names = [n for n in flow_config_files(family, use_t5) if n.endswith("/config.json")]
    require_files(root, names + ["scheduler/scheduler_config.json"], "diffusers folder")
    variants = {
        component_weights(root, n.split("/")[0], (index.get(n.split("/")[0]) or ["diffusers"])[0]) for n in names
    }
    extras = {}
    for tok_name, tok in clip_tokenizers(family).items():
        if not (root / tok_name).is_dir():
            extras[tok_name] = tok
    tok_dir = T5_TOKENIZER_DIRS[family]
    if use_t5:
        if not any((root / tok_dir / f).is_file() for f in T5_TOKENIZER_FILES) or t5_tokenizer_dir is not None:
            extras[tok_dir] = resolve_t5_tokenizer(family, root / tok_dir, t5_tokenizer_dir, str(root))
    else:
        extras.update({t5_name: None, tok_dir: None})
    pipe = pipeline_class(family).from_pretrained(
        str(root),
        local_files_only=True,
        use_safetensors=True,
        torch_dtype=torch_dtype,
        variant="fp16" if variants == {"fp16"} else None,
        **extras,
    )
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    check_materialised(modules, f"diffusers folder {root}")
    return pipe, family


def check_flow_arguments(family: str, prediction_type, t5, t5_tokenizer_dir) -> None:
    """prediction_type must be None for a flow model (it always predicts the velocity); t5 None/True/False."""
    if prediction_type is not None:
        raise ValueError(
            f"prediction_type={prediction_type!r}: a {family} model is a rectified-flow model (it predicts the "
            "velocity); valid values: None"
        )
    if t5 not in (None, True, False):
        raise ValueError(f"t5={t5!r}; valid values: None (use T5 when present), True, False")
    if t5 is False and family == "flux":
        raise ValueError("t5=False: FLUX cannot run without its T5 text encoder; valid values: None, True")
    if t5_tokenizer_dir is not None and not Path(os.fspath(t5_tokenizer_dir)).expanduser().is_dir():
        raise FileNotFoundError(f"t5_tokenizer {str(t5_tokenizer_dir)!r} is not a folder")
