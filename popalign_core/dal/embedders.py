"""Differentiable image embeddings: the providers and their registry `EMBEDDERS` (the face bank: `dal.facebank`).

Distributional alignment (patent [0107]-[0108]) needs image embeddings WITH gradients to the generated pixels:

- the semantics-preserving loss ``1 - cos(emb(x), emb(o))`` with CLIP (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) and
  DINOv2 (dinov2-vitb14) between a generated image ``x`` and the frozen model's image ``o`` (Eq. 7);
- the face-realism loss ``1 - max_F cos(emb(face(x)), emb(F))`` against a bank of real faces F (CelebA, FairFace).

Every provider takes ``images`` [B, 3, H, W] float in [0, 1] and returns L2-normalised embeddings [B, D]; the model's
own eval preprocessing (resize with antialias, centre crop, mean/std) is re-done in torch so gradients reach the
pixels; model parameters are frozen (eval mode, ``requires_grad_(False)``). Nothing is ever downloaded.

    from popalign_core.dal.embedders import EMBEDDERS, FaceBank, make_embedder

    emb = make_embedder("clip", models_dir="ComfyUI/models")          # open_clip_ViT-H-14.safetensors
    e = emb.embed(images)                                              # [B, D], differentiable w.r.t. images
    bank = FaceBank.from_folder("faces/", emb)                         # cached beside the images
    cos, index = bank.nearest(e)                                       # max cosine over the bank, differentiable

Weights: ``weights=PATH``, else ``<models_dir>/popalign/embedders/`` (ComfyUI: ``ComfyUI/models/popalign/embedders/``;
the CLIP file is also found in the classifiers folder ``popalign/classifiers/``, so one file serves the ``clip``
classifier and embedder), else ``$POPALIGN_MODELS_DIR``. See docs/embedders.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popalign_core.classify.base import (
    CLASSIFIER_SUBDIR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackendUnavailable,
    find_weights,
    models_dir_candidates,
    searched_text,
)
from popalign_core.classify.classifiers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_open_clip
from popalign_core.dal.embedding import (
    COMFY_EMBEDDER_HINT,
    DTYPES,
    EMBEDDER_SUBDIR,
    INTERPOLATIONS,
    RESIZE_MODES,
    Embedder,
    Preprocess,
    _check_dtype,
    _check_resize_mode,
    _pair,
    file_sha256,
)
from popalign_core.dal.facebank import BANK_FORMAT, IMAGE_EXTENSIONS, FaceBank
from popalign_core.toyworld.classifier import ToyClassifier

__all__ = [  # with the names of `dal.embedding` and `dal.facebank` this module has always exported
    "BANK_FORMAT",
    "DTYPES",
    "EMBEDDERS",
    "EMBEDDER_SUBDIR",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "RESIZE_MODES",
    "ClipEmbedder",
    "Dinov2Embedder",
    "Embedder",
    "EmbedderSpec",
    "FaceBank",
    "Preprocess",
    "ToyEmbedder",
    "file_sha256",
    "make_embedder",
]

DINOV2_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ------------------------------------------------------------------------------------------------ toy
class ToyEmbedder(Embedder):
    """The toy world's trunk features (`ToyClassifier(weights, which).embed`): resize to 32x32 (bilinear,
    antialiased), CNN, global average pool, L2 norm. `weights`: a toy-world folder (default: the shipped one)."""

    name = "toy"

    def __init__(self, weights: str | os.PathLike | None = None, device: str = "cpu", which: str = "train"):
        super().__init__(device=device)

        self.classifier = ToyClassifier(weights, which=which, device=device)
        self.model = self.classifier.net
        self.dim = int(self.model.dim)
        self.which = which
        self.weights_path = Path(self.classifier.weights_path)

    def _id_parts(self):
        return self.which, [self.weights_path], {"which": self.which}

    def embed(self, images):
        return self.classifier.embed(self._check(images))


# ------------------------------------------------------------------------------------------------ CLIP
class ClipEmbedder(Embedder):
    """The open_clip image tower (``model.visual``; the text tower is dropped after loading).

    `arch`: open_clip architecture (default "ViT-H-14": the patent's laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
    `weights`: an open_clip state dict (.safetensors / .pt / .bin, read without unpickling objects), default file
    ``open_clip_<arch>.safetensors`` (or .pt / .bin) in ``<models_dir>/popalign/embedders/`` or, as the ``clip``
    classifier's, ``<models_dir>/popalign/classifiers/``. `model_cfg`: overrides of the architecture's config (tests).
    Preprocessing: the model's own (``visual.preprocess_cfg``: for ViT-H-14 bicubic resize of the short side to 224,
    centre crop 224, OpenAI CLIP mean/std); `resize_mode` overrides it ("squash": the whole image, no crop).
    `dtype`: the model's dtype (the output is float32).
    """

    name = "clip"

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str = "cpu",
        arch: str = "ViT-H-14",
        model_cfg: dict[str, Any] | None = None,
        models_dir: str | os.PathLike | None = None,
        resize_mode: str | None = None,
        dtype: str = "float32",
    ):
        super().__init__(device=device)
        self.dtype = _check_dtype("clip", dtype)
        _check_resize_mode("clip", resize_mode)
        try:
            import open_clip
        except ImportError as e:
            raise BackendUnavailable(f"clip embedder needs open_clip: pip install open_clip_torch ({e})") from e
        if open_clip.get_model_config(arch) is None:
            raise ValueError(f"clip: unknown open_clip architecture {arch!r}; valid: {open_clip.list_models()}")
        path = self._find(arch, weights, models_dir)

        model = load_open_clip(arch, path, model_cfg)
        visual = model.visual
        del model  # the text tower is not needed
        self.model = self._freeze(visual)
        self.arch, self.model_cfg, self.weights_path = arch, dict(model_cfg or {}), path
        cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
        size = getattr(visual, "image_size", None) or cfg.get("size", 224)
        size = _pair(size)
        mode = resize_mode or cfg.get("resize_mode", "shortest")
        mode_size: int | tuple[int, int] = size[0] if (mode == "shortest" and size[0] == size[1]) else size
        self.preprocess = Preprocess(
            resize=mode,
            resize_size=mode_size,
            crop_size=None if mode == "squash" else size,
            interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic",
            mean=tuple(float(v) for v in cfg.get("mean", OPENAI_CLIP_MEAN)),
            std=tuple(float(v) for v in cfg.get("std", OPENAI_CLIP_STD)),
            fill=float(cfg.get("fill_color", 0)) / 255.0,
        )
        self.dim = int(getattr(visual, "output_dim", 0) or 0) or self._probe_dim()

    @staticmethod
    def _find(arch: str, weights: str | os.PathLike | None, models_dir: str | os.PathLike | None) -> Path:
        return find_weights(
            "clip embedder",
            tuple(f"open_clip_{arch}{ext}" for ext in (".safetensors", ".pt", ".bin")),
            weights,
            models_dir,
            subdirs=(EMBEDDER_SUBDIR, CLASSIFIER_SUBDIR),
            hint=COMFY_EMBEDDER_HINT,
            kind="open_clip state-dict file",
            note="For ViT-H-14 that is open_clip_model.safetensors of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, "
            "renamed. ",
        )

    def _probe_dim(self) -> int:
        import torch

        h, w = self.preprocess.output_size or (224, 224)
        with torch.no_grad():
            return int(self._forward(torch.zeros(1, 3, h, w, device=self.device, dtype=self.dtype)).shape[-1])

    def _forward(self, x):
        return self.model(x)

    def _id_parts(self):
        config = {"arch": self.arch, "model_cfg": self.model_cfg, "preprocess": self.preprocess.as_dict()}
        return self.arch, [self.weights_path], {**config, "dtype": str(self.dtype)}


# ------------------------------------------------------------------------------------------------ DINOv2
# DINOv2's eval transform (facebook/dinov2-* preprocessor_config.json): bicubic resize of the short side to 256,
# centre crop 224, ImageNet mean/std. Used when the folder has no preprocessor_config.json.
DINOV2_DEFAULT_PROCESSOR = {
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "resample": 3,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
}


class Dinov2Embedder(Embedder):
    """transformers ``Dinov2Model``; the embedding is ``pooler_output``: the CLS token after the final layer norm
    (identical to ``last_hidden_state[:, 0]``, which transformers also normalises), i.e. the official DINOv2
    ``x_norm_clstoken`` used for image retrieval / similarity in the DINOv2 paper.

    `weights`: a folder in ``save_pretrained`` layout (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``, optional ``preprocessor_config.json``), e.g. a copy of the hub repo facebook/dinov2-base
    (= dinov2-vitb14, the patent's); default ``<models_dir>/popalign/embedders/<model>/`` with `model` default
    "dinov2-vitb14". Preprocessing from ``preprocessor_config.json`` (else DINOv2's: short side 256 bicubic, crop
    224, ImageNet mean/std); `resize_mode` "squash" resizes the whole image to the crop size instead.
    """

    name = "dinov2"

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str = "cpu",
        model: str = "dinov2-vitb14",
        models_dir: str | os.PathLike | None = None,
        resize_mode: str | None = None,
        dtype: str = "float32",
    ):
        super().__init__(device=device)
        self.dtype = _check_dtype("dinov2", dtype)
        _check_resize_mode("dinov2", resize_mode)
        if not isinstance(model, str) or not model or Path(model).name != model:
            raise ValueError(f"dinov2: `model` must be a folder name (e.g. 'dinov2-vitb14'), got {model!r}")
        try:
            from transformers import Dinov2Model
        except ImportError as e:
            raise BackendUnavailable(f"dinov2 embedder needs transformers with Dinov2Model ({e})") from e
        folder = self._find(model, weights, models_dir)
        try:
            net, info = Dinov2Model.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the folder
            raise ValueError(f"dinov2: cannot load a Dinov2Model from {str(folder)!r}: {type(e).__name__}: {e}") from e
        if getattr(net.config, "model_type", None) != "dinov2":
            raise ValueError(f"dinov2: {str(folder)!r} holds a {net.config.model_type!r} model, not dinov2")
        missing = [k for k in info.get("missing_keys", []) if "mask_token" not in k]
        if missing:
            raise ValueError(f"dinov2: weights in {str(folder)!r} miss {len(missing)} tensors, e.g. {missing[:5]}")
        self.model = self._freeze(net)
        self.folder, self.model_name = folder, model
        self.weight_files = [folder / n for n in ("config.json", *DINOV2_WEIGHT_FILES) if (folder / n).is_file()]
        self.processor_config = self._processor_config(folder)
        self.preprocess = self._make_preprocess(self.processor_config, resize_mode)
        self.dim = int(net.config.hidden_size)

    @staticmethod
    def _find(model: str, weights: str | os.PathLike | None, models_dir: str | os.PathLike | None) -> Path:
        need = f"config.json + {' or '.join(DINOV2_WEIGHT_FILES)}"

        def ok(folder: Path) -> bool:
            return (folder / "config.json").is_file() and any((folder / n).is_file() for n in DINOV2_WEIGHT_FILES)

        if weights is not None:
            path = Path(weights)
            folder = path.parent if path.is_file() else path
            if not ok(folder):
                raise BackendUnavailable(
                    f"dinov2 embedder: {str(path)!r} is not a model folder ({need}, as written by save_pretrained / "
                    f"the facebook/dinov2-base repository). Pass such a folder, or put it at "
                    f"{COMFY_EMBEDDER_HINT}{model}/ (standalone: <models_dir>/{EMBEDDER_SUBDIR}/{model}/)."
                )
            return folder
        folders = [f / model for f in models_dir_candidates(models_dir, (EMBEDDER_SUBDIR,))]
        for folder in folders:
            if ok(folder):
                return folder
        raise BackendUnavailable(
            f"dinov2 embedder: model folder {model!r} ({need}; for dinov2-vitb14 the files of facebook/dinov2-base) "
            f"not found. Put it at {COMFY_EMBEDDER_HINT}{model}/ (standalone: <models_dir>/{EMBEDDER_SUBDIR}/{model}/ "
            f"with models_dir= or $POPALIGN_MODELS_DIR), or pass weights=FOLDER. Searched: {searched_text(folders)}."
        )

    @staticmethod
    def _processor_config(folder: Path) -> dict[str, Any]:
        cfg = dict(DINOV2_DEFAULT_PROCESSOR)
        path = folder / "preprocessor_config.json"
        if path.is_file():
            try:
                cfg.update(json.loads(path.read_text()))
            except (OSError, ValueError) as e:
                raise ValueError(f"dinov2: cannot read {str(path)!r}: {e}") from e
        return cfg

    @staticmethod
    def _make_preprocess(cfg: dict[str, Any], resize_mode: str | None) -> Preprocess:
        def hw(d: Any, what: str) -> tuple[int, int]:
            if isinstance(d, dict) and "height" in d and "width" in d:
                return int(d["height"]), int(d["width"])
            if isinstance(d, (int, float)):
                return int(d), int(d)
            raise ValueError(f"dinov2: unsupported {what} {d!r} in preprocessor_config.json")

        size = cfg.get("size", {})
        crop = hw(cfg["crop_size"], "crop_size") if cfg.get("do_center_crop", True) else None
        if isinstance(size, dict) and "shortest_edge" in size:
            resize, resize_size = "shortest", int(size["shortest_edge"])
        else:
            resize, resize_size = "squash", hw(size, "size")
        if not cfg.get("do_resize", True):
            raise ValueError("dinov2: preprocessor_config.json with do_resize=false is not supported")
        target = crop or _pair(resize_size)
        if resize_mode == "squash":
            resize, resize_size, crop = "squash", target, None
        elif resize_mode == "longest":
            resize, resize_size, crop = "longest", target, target
        resample = int(cfg.get("resample", 3))
        if resample not in (2, 3):
            raise ValueError(f"dinov2: resample {resample} unsupported (2 = bilinear, 3 = bicubic)")
        return Preprocess(
            resize=resize,
            resize_size=resize_size,
            crop_size=crop,
            interpolation="bicubic" if resample == 3 else "bilinear",
            mean=tuple(float(v) for v in cfg.get("image_mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in cfg.get("image_std", IMAGENET_STD)),
        )

    def _forward(self, x):
        return self.model(pixel_values=x).pooler_output

    def _id_parts(self):
        config = {"model": self.model_name, "preprocess": self.preprocess.as_dict(), "dtype": str(self.dtype)}
        return self.folder.name, self.weight_files, config


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class EmbedderSpec:
    """A registry entry: the class, the option names it accepts (beyond weights / device) and a help line."""

    factory: Callable[..., Embedder]
    options: tuple[str, ...]
    help: str


# name -> spec; keys feed CLI choices and node dropdowns
EMBEDDERS: dict[str, EmbedderSpec] = {
    "toy": EmbedderSpec(
        ToyEmbedder, ("which",), "toy world trunk features (the toy training classifier; shipped, 96-d)"
    ),
    "clip": EmbedderSpec(
        ClipEmbedder,
        ("arch", "model_cfg", "models_dir", "resize_mode", "dtype"),
        "open_clip image tower, default ViT-H-14 (laion2B-s32B-b79K, as the patent); open_clip_<arch>.safetensors",
    ),
    "dinov2": EmbedderSpec(
        Dinov2Embedder,
        ("model", "models_dir", "resize_mode", "dtype"),
        "DINOv2 CLS token (transformers Dinov2Model), default dinov2-vitb14 folder (facebook/dinov2-base)",
    ),
}


def make_embedder(
    name: str, weights: str | os.PathLike | None = None, device: str = "cpu", **options: Any
) -> Embedder:
    """Build the embedder `name` (a key of `EMBEDDERS`); `options` must be among the entry's `options`.

    Raises ValueError for an unknown name or option (listing the valid ones), `BackendUnavailable` for a missing
    package or weight file (naming the file and the folder to put it in)."""
    if name not in EMBEDDERS:
        raise ValueError(f"unknown embedder {name!r}; valid: {sorted(EMBEDDERS)}")
    spec = EMBEDDERS[name]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"embedder {name!r}: unknown option(s) {unknown}; valid: {list(spec.options)}")
    return spec.factory(weights=weights, device=device, **options)
