"""The image-embedder interface (`Embedder`) and the models' eval preprocessing redone in torch (`Preprocess`).

Every provider takes ``images`` [B, 3, H, W] float in [0, 1] and returns L2-normalised embeddings [B, D]; the model's
own eval preprocessing (resize with antialias, centre crop, mean/std) is re-done in torch so gradients reach the
pixels; model parameters are frozen (eval mode, ``requires_grad_(False)``). The providers and their registry:
`dal.embedders`; the bank of real-face embeddings: `dal.facebank`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.classify.classifiers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from popalign_core.common.userinput import check_device

__all__ = ["DTYPES", "EMBEDDER_SUBDIR", "Embedder", "Preprocess", "file_sha256"]

EMBEDDER_SUBDIR = os.path.join("popalign", "embedders")
COMFY_EMBEDDER_HINT = "ComfyUI/models/popalign/embedders/"
DTYPES = ("float32", "float16", "bfloat16")
RESIZE_MODES = ("shortest", "squash", "longest")
INTERPOLATIONS = ("bicubic", "bilinear")


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
