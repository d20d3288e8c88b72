"""Differentiable image embeddings (registry `EMBEDDERS`) and a bank of real-face embeddings (`FaceBank`).

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

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.classify.base import CLASSIFIER_SUBDIR, IMAGENET_MEAN, IMAGENET_STD, BackendUnavailable
from popalign_core.classify.classifiers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from popalign_core.common.fileio import load_rgb
from popalign_core.common.userinput import check_device

__all__ = [
    "EMBEDDERS",
    "EMBEDDER_SUBDIR",
    "IMAGE_EXTENSIONS",
    "ClipEmbedder",
    "Dinov2Embedder",
    "Embedder",
    "EmbedderSpec",
    "FaceBank",
    "Preprocess",
    "ToyEmbedder",
    "make_embedder",
]

EMBEDDER_SUBDIR = os.path.join("popalign", "embedders")
COMFY_EMBEDDER_HINT = "ComfyUI/models/popalign/embedders/"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
DTYPES = ("float32", "float16", "bfloat16")
RESIZE_MODES = ("shortest", "squash", "longest")
INTERPOLATIONS = ("bicubic", "bilinear")
DINOV2_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
BANK_FORMAT = "popalign-facebank-v1"


# ------------------------------------------------------------------------------------------------ preprocessing
def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = (int(s) for s in size)
    return h, w


@dataclass(frozen=True)
class Preprocess:
    """A model's eval transform, in torch on [B, 3, H, W] float images in [0, 1] (differentiable).

    resize: "shortest" (short side to `resize_size` when it is an int, as torchvision's ``Resize(int)``: long side
    ``int(size * long / short)``; keep-ratio cover of a (h, w) target otherwise, as open_clip's ``ResizeKeepRatio``),
    "squash" (exactly `resize_size`) or "longest" (fit inside `resize_size`, keep ratio). Then, when `crop_size` is
    set, a centre crop to it (padding with `fill` where the image is smaller), with torchvision's offsets
    ``int(round((H - h) / 2))``. Resizing uses ``F.interpolate(..., antialias=True)``, the same kernel as torchvision's
    tensor ``Resize``, then a clamp to [0, 1] (bicubic overshoots; PIL and uint8 tensor pipelines clamp too; the
    clamp passes no gradient to pixels whose resized value is outside [0, 1]). The models' own pipelines resize
    uint8 images (PIL, or torchvision on uint8 tensors) and so round to 1/255 steps; where the size is unchanged,
    resizing is the identity in every pipeline and the results agree exactly.
    """

    resize: str
    resize_size: int | tuple[int, int]
    crop_size: tuple[int, int] | None
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    fill: float = 0.0

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {list(RESIZE_MODES)}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {self.mean!r}, {self.std!r}")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of the model input, or None when it follows the image's aspect ratio (shortest, no crop)."""
        if self.crop_size is not None:
            return _pair(self.crop_size)
        if self.resize == "shortest" and isinstance(self.resize_size, int):
            return None
        return _pair(self.resize_size)

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        """Size after the resize step for an input of size (h, w)."""
        if self.resize == "squash":
            return _pair(self.resize_size)
        if self.resize == "shortest" and isinstance(self.resize_size, (int, np.integer)):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = int(self.resize_size), int(int(self.resize_size) * long / short)
            return (new_long, new_short) if w <= h else (new_short, new_long)
        th, tw = _pair(self.resize_size)
        ratios = (h / th, w / tw)
        ratio = min(ratios) if self.resize == "shortest" else max(ratios)
        return round(h / ratio), round(w / ratio)

    def __call__(self, x):
        import torch
        import torch.nn.functional as F

        h, w = x.shape[-2:]
        nh, nw = self.resized_shape(int(h), int(w))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)  # as PIL / uint8 pipelines do after bicubic overshoot
        if self.crop_size is not None:
            ch, cw = _pair(self.crop_size)
            if ch > nh or cw > nw:
                pad = [(cw - nw) // 2, (cw - nw + 1) // 2, (ch - nh) // 2, (ch - nh + 1) // 2]
                x = F.pad(x, [max(p, 0) for p in pad], value=float(self.fill))
                nh, nw = x.shape[-2:]
            top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
            x = x[..., top : top + ch, left : left + cw]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------------------ helpers
_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, streamed; memoised per (path, size, mtime_ns) within the process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def _search_roots(models_dir: str | os.PathLike | None) -> list[Path]:
    if models_dir is not None:
        return [Path(models_dir)]
    if os.environ.get("POPALIGN_MODELS_DIR"):
        return [Path(os.environ["POPALIGN_MODELS_DIR"])]
    return []


def _searched(folders: Sequence[Path]) -> str:
    return ", ".join(str(f) for f in folders) or "none (no models_dir given, $POPALIGN_MODELS_DIR unset)"


def _check_dtype(name: str, dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"{name}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def _check_resize_mode(name: str, resize_mode: str | None) -> None:
    if resize_mode is not None and resize_mode not in RESIZE_MODES:
        raise ValueError(f"{name}: resize_mode must be one of {list(RESIZE_MODES)} or None, got {resize_mode!r}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


# ------------------------------------------------------------------------------------------------ base class
class Embedder:
    """An image-embedding provider: ``embed(images [B, 3, H, W] in [0, 1]) -> [B, D]`` L2-normalised, float32.

    Differentiable with respect to `images`; the model is frozen. Attributes: `name` (registry key), `id` (the
    embedder + its weights + its preprocessing, for caches; computed on first use: it hashes the weight files),
    `dim` (D), `device`, `preprocess` (a `Preprocess`, or None when the backend resizes itself), `model`.
    """

    name: str = ""

    def __init__(self, device: str = "cpu"):
        import torch

        self.device = check_device(device)
        self.dtype = torch.float32
        self.dim = 0
        self.model: Any = None
        self.preprocess: Preprocess | None = None
        self._id: str | None = None

    # -- identity
    def _id_parts(self) -> tuple[str, list[Path], dict[str, Any]]:  # pragma: no cover - abstract
        """(tag, weight files, config that changes the output) -> id "<name>-<tag>-<12 hex>"."""
        raise NotImplementedError

    @property
    def id(self) -> str:
        if self._id is None:
            tag, files, config = self._id_parts()
            payload = {"files": [file_sha256(f) for f in files], "config": config}
            digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
            self._id = f"{self.name}-{_slug(tag)}-{digest[:12]}"
        return self._id

    # -- embedding
    def _check(self, images):
        import torch

        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"{self.name}: expected images [B, 3, H, W] float in [0, 1], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"{self.name}: expected float images in [0, 1], got dtype {images.dtype}")
        return images.to(self.device, torch.float32)

    def _forward(self, x):  # pragma: no cover - abstract
        """Preprocessed model input (in `self.dtype`) -> raw embeddings [B, D]."""
        raise NotImplementedError

    def embed(self, images):
        """[B, 3, H, W] float in [0, 1] -> L2-normalised embeddings [B, D] (float32), differentiable."""
        import torch.nn.functional as F

        x = self.preprocess(self._check(images))
        return F.normalize(self._forward(x.to(self.dtype)).float(), dim=-1)

    def __call__(self, images):
        return self.embed(images)

    def embed_arrays(self, images: Sequence[np.ndarray], batch_size: int = 32):
        """uint8 [H, W, 3] RGB arrays (any sizes) -> embeddings [N, D] on the CPU, without gradients. Images of the
        same size are batched together; the output keeps the input order."""
        import torch

        out = torch.zeros(len(images), self.dim)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(np.asarray(im).shape), []).append(i)
        for idx in groups.values():
            for s in range(0, len(idx), max(int(batch_size), 1)):
                chunk = idx[s : s + max(int(batch_size), 1)]
                x = torch.stack([_to_tensor(images[i]) for i in chunk])
                with torch.no_grad():
                    out[chunk] = self.embed(x).float().cpu()
        return out

    def _freeze(self, model):
        model.eval().requires_grad_(False)
        return model.to(self.device, self.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, device={self.device})"


def _to_tensor(image: np.ndarray):
    import torch

    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {a.dtype} {a.shape}")
    a = np.ascontiguousarray(a) if a.flags.writeable else np.array(a)
    return torch.from_numpy(a).permute(2, 0, 1).float() / 255.0


# ------------------------------------------------------------------------------------------------ toy
class ToyEmbedder(Embedder):
    """The toy world's trunk features (`ToyClassifier(weights, which).embed`): resize to 32x32 (bilinear,
    antialiased), CNN, global average pool, L2 norm. `weights`: a toy-world folder (default: the shipped one)."""

    name = "toy"

    def __init__(self, weights: str | os.PathLike | None = None, device: str = "cpu", which: str = "train"):
        super().__init__(device=device)
        from popalign_core.toyworld.classifier import ToyClassifier

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
        from popalign_core.classify.classifiers import load_open_clip

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
        files = tuple(f"open_clip_{arch}{ext}" for ext in (".safetensors", ".pt", ".bin"))
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise BackendUnavailable(
                    f"clip embedder: weight file {str(path)!r} not found. Pass an existing open_clip state-dict "
                    f"file, or put {files[0]!r} in {COMFY_EMBEDDER_HINT} "
                    f"(standalone: <models_dir>/{EMBEDDER_SUBDIR}/)."
                )
            return path
        folders = [r / sub for r in _search_roots(models_dir) for sub in (EMBEDDER_SUBDIR, CLASSIFIER_SUBDIR)]
        for folder in folders:
            for name in files:
                if (folder / name).is_file():
                    return folder / name
        raise BackendUnavailable(
            f"clip embedder: weight file {files[0]!r} not found (also accepted: {', '.join(files[1:])}). Put it in "
            f"{COMFY_EMBEDDER_HINT} (standalone: <models_dir>/{EMBEDDER_SUBDIR}/ with models_dir= or "
            f"$POPALIGN_MODELS_DIR; <models_dir>/{CLASSIFIER_SUBDIR}/ is searched too), or pass weights=PATH. For "
            f"ViT-H-14 that is open_clip_model.safetensors of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, renamed. "
            f"Searched: {_searched(folders)}."
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
        folders = [r / EMBEDDER_SUBDIR / model for r in _search_roots(models_dir)]
        for folder in folders:
            if ok(folder):
                return folder
        raise BackendUnavailable(
            f"dinov2 embedder: model folder {model!r} ({need}; for dinov2-vitb14 the files of facebook/dinov2-base) "
            f"not found. Put it at {COMFY_EMBEDDER_HINT}{model}/ (standalone: <models_dir>/{EMBEDDER_SUBDIR}/{model}/ "
            f"with models_dir= or $POPALIGN_MODELS_DIR), or pass weights=FOLDER. Searched: {_searched(folders)}."
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


# ------------------------------------------------------------------------------------------------ face bank
def _list_images(folder: Path, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    out = []
    for p in it:
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue  # hidden files and folders (the cache, macOS "._x.jpg" resource forks)
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


class FaceBank:
    """Embeddings of real face images [M, D] (float32, L2-normalised, CPU) for the face-realism loss (patent
    [0108]): ``L_face = 1 - max_F cos(emb(face(x)), emb(F))``; `nearest` gives that max and its index.

    `paths`: the image of each row (relative to `folder`) when built from a folder; `skipped`: [(path, reason)] of
    unreadable images; `from_cache`: whether the embeddings came from the cache file `cache_file`.
    """

    def __init__(
        self,
        embeddings,
        *,
        embedder_id: str | None = None,
        paths: Sequence[str] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
        folder: str | os.PathLike | None = None,
        from_cache: bool = False,
        cache_file: str | os.PathLike | None = None,
    ):
        import torch

        e = torch.as_tensor(embeddings)
        if e.ndim != 2 or e.shape[0] == 0 or e.shape[1] == 0:
            raise ValueError(f"FaceBank: embeddings must be a non-empty [M, D] tensor, got {tuple(e.shape)}")
        e = e.detach().to("cpu", torch.float32)
        if not torch.isfinite(e).all():
            raise ValueError("FaceBank: embeddings contain NaN or inf")
        norms = e.norm(dim=-1)
        if (norms == 0).any():
            raise ValueError(f"FaceBank: {int((norms == 0).sum())} embedding row(s) are zero (no direction)")
        self.embeddings = e / norms[:, None]
        if paths is not None and len(paths) != len(e):
            raise ValueError(f"FaceBank: {len(paths)} paths for {len(e)} embeddings")
        self.paths = list(paths) if paths is not None else None
        self.embedder_id = embedder_id
        self.skipped = [tuple(s) for s in skipped]
        self.folder = Path(folder) if folder is not None else None
        self.from_cache = bool(from_cache)
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._on_device: dict[str, Any] = {}

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def __repr__(self) -> str:
        src = f", folder={str(self.folder)!r}" if self.folder else ""
        return f"FaceBank({len(self)} x {self.dim}{src}, skipped={self.n_skipped}, from_cache={self.from_cache})"

    @classmethod
    def from_tensor(cls, embeddings, embedder_id: str | None = None, paths: Sequence[str] | None = None) -> FaceBank:
        """A bank from embeddings [M, D] (rows are L2-normalised here), e.g. ``ToyClassifier().face_bank()``."""
        return cls(embeddings, embedder_id=embedder_id, paths=paths)

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        embedder: Embedder,
        cache: bool = True,
        *,
        recursive: bool = False,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 32,
        progress: Callable[[str], None] | None = None,
    ) -> FaceBank:
        """Embed the face images of `folder` (.png/.jpg/.jpeg/.webp, sorted by relative path; subfolders too when
        `recursive`; hidden names starting with "." are ignored) with `embedder`, batched per image size.

        Cache: a safetensors file ``.popalign_facebank-<embedder id>.safetensors`` in `folder` (or
        ``facebank-<embedder id>-<folder hash>.safetensors`` in `cache_dir`), reused only when the embedder id and
        the list of (relative path, size, mtime_ns) of the images are unchanged. A cache that cannot be written is
        a warning. Unreadable images are skipped with one warning and counted (`skipped`); a folder with no
        readable image is a ValueError naming it.
        """
        import torch

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"FaceBank: face folder {str(folder)!r} does not exist or is not a folder")
        files = _list_images(folder, recursive)
        rels = [p.relative_to(folder).as_posix() for p in files]
        stats = [p.stat() for p in files]
        listing = [[r, s.st_size, s.st_mtime_ns] for r, s in zip(rels, stats)]
        key = hashlib.sha256(json.dumps({"recursive": bool(recursive), "files": listing}).encode()).hexdigest()
        cache_file = None
        if cache:
            eid = embedder.id
            if cache_dir is None:
                cache_file = folder / f".popalign_facebank-{_slug(eid)}.safetensors"
            else:
                where = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
                cache_file = Path(cache_dir) / f"facebank-{_slug(eid)}-{where}.safetensors"
            hit = cls._load_cache(cache_file, eid, key)
            if hit is not None:
                emb, paths, skipped = hit
                _warn_skipped(folder, skipped, cached=True)
                return cls(emb, embedder_id=eid, paths=paths, skipped=skipped, folder=folder,
                           from_cache=True, cache_file=cache_file)  # fmt: skip
        paths, skipped, rows = [], [], []
        pending: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}

        def flush(shape):
            items = pending.pop(shape)
            x = torch.stack([_to_tensor(a) for _, a in items])
            with torch.no_grad():
                e = embedder.embed(x).float().cpu()
            for (rel, _), row in zip(items, e):
                paths.append(rel)
                rows.append(row)

        for n, (rel, path) in enumerate(zip(rels, files)):
            try:
                a = load_rgb(path)
                if min(a.shape[:2]) < 2:
                    raise ValueError(f"image too small: {a.shape[1]}x{a.shape[0]}")
            except Exception as e:  # noqa: BLE001 - an unreadable file is counted, never fatal
                skipped.append((rel, f"{type(e).__name__}: {e}"))
                continue
            pending.setdefault(a.shape, []).append((rel, a))
            if len(pending[a.shape]) >= max(int(batch_size), 1):
                flush(a.shape)
            if progress and (n + 1) % 1000 == 0:
                progress(f"face bank: {n + 1}/{len(files)} images read")
        for shape in list(pending):
            flush(shape)
        _warn_skipped(folder, skipped, cached=False)
        if not rows:
            raise ValueError(
                f"FaceBank: no readable face image ({', '.join(IMAGE_EXTENSIONS)}) in {str(folder)!r} "
                f"(recursive={recursive}; {len(skipped)} unreadable skipped)"
            )
        order = sorted(range(len(paths)), key=lambda i: paths[i])  # batching per size reorders: restore path order
        emb = torch.stack([rows[i] for i in order])
        paths = [paths[i] for i in order]
        if cache_file is not None:
            cls._save_cache(cache_file, emb, embedder.id, key, paths, skipped, folder)
        return cls(emb, embedder_id=embedder.id, paths=paths, skipped=skipped, folder=folder, cache_file=cache_file)

    @staticmethod
    def _load_cache(path: Path, embedder_id: str, key: str):
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if (meta.get("format"), meta.get("embedder_id"), meta.get("files")) != (BANK_FORMAT, embedder_id, key):
                    return None
                emb = f.get_tensor("embeddings")
            paths = json.loads(meta["paths"])
            skipped = [tuple(s) for s in json.loads(meta["skipped"])]
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            return None
        if emb.ndim != 2 or emb.shape[0] != len(paths) or emb.shape[0] == 0:
            return None
        return emb, paths, skipped

    @staticmethod
    def _save_cache(path: Path, emb, embedder_id: str, key: str, paths, skipped, folder: Path) -> None:
        from safetensors.torch import save_file

        from popalign_core.common.fileio import atomic_path

        meta = {"format": BANK_FORMAT, "embedder_id": embedder_id, "files": key, "folder": str(folder),
                "paths": json.dumps(paths), "skipped": json.dumps([list(s) for s in skipped])}  # fmt: skip
        try:
            with atomic_path(path) as tmp:
                save_file({"embeddings": emb.contiguous()}, str(tmp), metadata=meta)
        except OSError as e:
            warnings.warn(f"FaceBank: cannot write the cache {str(path)!r} ({e}); continuing without it", stacklevel=3)

    # -- lookup
    def to(self, device) -> FaceBank:
        """Keep a copy of the embeddings on `device` for `nearest` (also done on first use)."""
        self._bank_on(device)
        return self

    def _bank_on(self, device):
        import torch

        device = torch.device(device)
        if str(device) not in self._on_device:
            self._on_device[str(device)] = self.embeddings.to(device)
        return self._on_device[str(device)]

    def nearest(self, emb, chunk: int = 65536):
        """emb [B, D] -> (cos [B], index [B]): max over the bank of cos(emb, bank row) and the row attaining it.

        `cos` is differentiable with respect to `emb` (emb is L2-normalised inside, so raw embeddings work). The
        arg-max is found without gradients in chunks of `chunk` rows; the cosine is then recomputed with gradients
        for the chosen rows only (the gradient of a max is that of its arg-max), so memory stays O(B x D)."""
        import torch
        import torch.nn.functional as F

        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[1] != self.dim:
            shape = tuple(emb.shape) if hasattr(emb, "shape") else type(emb).__name__
            raise ValueError(f"FaceBank.nearest: expected embeddings [B, {self.dim}], got {shape}")
        bank = self._bank_on(emb.device)
        e = F.normalize(emb.float(), dim=-1)
        best = torch.full((e.shape[0],), -2.0, device=e.device)
        index = torch.zeros(e.shape[0], dtype=torch.long, device=e.device)
        with torch.no_grad():
            ed = e.detach()
            for s in range(0, len(bank), max(int(chunk), 1)):
                v, i = (ed @ bank[s : s + max(int(chunk), 1)].T).max(dim=1)
                better = v > best
                best = torch.where(better, v, best)
                index = torch.where(better, i + s, index)
        cos = (e * bank[index]).sum(dim=-1)
        return cos, index


def _warn_skipped(folder: Path, skipped: Sequence[tuple[str, str]], cached: bool) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{p} ({r})" for p, r in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
    when = " (as when the cache was built)" if cached else ""
    warnings.warn(
        f"FaceBank: skipped {len(skipped)} unreadable image(s) in {str(folder)!r}{when}: {shown}", stacklevel=3
    )
