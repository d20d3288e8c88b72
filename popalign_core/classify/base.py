"""Interfaces and helpers shared by every face-detector and attribute-classifier backend: the `Face` / `Classification`
results, the `FaceDetector` protocol, `BackendUnavailable`, image checks, the weight-file search of the models folder,
and the box helpers of the detectors. Imports no other module of this package."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from popalign_core.common.userinput import user_error


@user_error
class BackendUnavailable(RuntimeError):
    """A backend's package or weight file is missing; the message says what to install / where to put which file."""


@dataclass
class Face:
    """The largest detected face of an image: box (x0, y0, x1, y1) in pixels, detector score, RGB uint8 crop."""

    box: tuple[int, int, int, int]
    score: float
    crop: np.ndarray  # [h, w, 3] uint8 RGB


@runtime_checkable
class FaceDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> Face | None:
        """image: [H, W, 3] uint8 RGB. Returns the LARGEST face (by box area) or None."""


@dataclass
class Classification:
    """Result for one image: face found, its box, and per attribute axis the class probabilities (summing to 1,
    in the order of the classifier's `axes[axis]`)."""

    face_found: bool
    box: tuple[int, int, int, int] | None = None
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None  # e.g. an unreadable image: counted and skipped by audits


@runtime_checkable
class AttributeClassifier(Protocol):
    name: str
    axes: dict[str, tuple[str, ...]]  # axis -> class names (from popalign_core.common.attributes)
    differentiable: bool

    def classify(self, images: list[np.ndarray]) -> list[Classification]:
        """images: list of [H, W, 3] uint8 RGB arrays. One Classification per image."""


def largest(boxes_scores: list[tuple[tuple[int, int, int, int], float]]) -> int | None:
    """Index of the largest box by area (ties: higher score), or None for an empty list."""
    if not boxes_scores:
        return None
    areas = [((b[2] - b[0]) * (b[3] - b[1]), s) for b, s in boxes_scores]
    return max(range(len(areas)), key=lambda i: areas[i])


def crop_box(image: np.ndarray, box: tuple[int, int, int, int], margin: float = 0.0) -> np.ndarray:
    """Crop `box` (clipped to the image), optionally enlarged by `margin` x its size on each side."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    x0, y0 = max(0, int(round(x0 - mx))), max(0, int(round(y0 - my)))
    x1, y1 = min(w, int(round(x1 + mx))), min(h, int(round(y1 + my)))
    return np.ascontiguousarray(image[y0:y1, x0:x1])


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER_SUBDIR = os.path.join("popalign", "classifiers")
COMFY_FOLDER_HINT = "ComfyUI/models/popalign/classifiers/"


# ------------------------------------------------------------------------------------------------ detectors
class FullImage:
    """The "no detection" detector: the whole image is the face crop (box = the full image, score 1).

    For images that are already face crops (aligned FairFace-style chips, the toy world's rendered faces) and for
    tests. Every classifier uses it when built with ``detector=None``; real detectors come from
    ``popalign_core.classify.detectors.make_detector``.
    """

    name = "full_image"

    def detect(self, image: np.ndarray) -> Face | None:
        """Return the whole image as the face (never None)."""
        h, w = image.shape[:2]
        return Face(box=(0, 0, int(w), int(h)), score=1.0, crop=image)


# ------------------------------------------------------------------------------------------------ helpers
def check_image(image: Any) -> np.ndarray:
    """Validate one image and return it as [H, W, 3] uint8 RGB (grey [H, W] and RGBA are converted).

    Raises ValueError with a message that says what is wrong (used as `Classification.error`).
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy array [H, W, 3] uint8 RGB, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected dtype uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"expected shape [H, W, 3], got {tuple(image.shape)}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"image too small: {tuple(image.shape)}")
    return np.ascontiguousarray(image[:, :, :3])


def search_roots(models_dir: str | os.PathLike | None = None) -> list[Path]:
    """The models folders searched for weights: `models_dir` when given, else ``$POPALIGN_MODELS_DIR`` when that
    variable is set, else none. (The core never imports ComfyUI: the ComfyUI nodes pass
    ``models_dir=folder_paths.models_dir``.)"""
    if models_dir is not None:
        return [Path(models_dir)]
    if os.environ.get("POPALIGN_MODELS_DIR"):
        return [Path(os.environ["POPALIGN_MODELS_DIR"])]
    return []


def searched_text(folders: Sequence[Path]) -> str:
    """The searched folders, for an error message."""
    return ", ".join(str(f) for f in folders) or "none (no models_dir given, $POPALIGN_MODELS_DIR unset)"


def models_dir_candidates(
    models_dir: str | os.PathLike | None = None, subdirs: Sequence[str] = (CLASSIFIER_SUBDIR,)
) -> list[Path]:
    """Folders searched for weights: ``<root>/<subdir>`` for each of `search_roots(models_dir)` and `subdirs`
    (default ``popalign/classifiers``)."""
    return [r / sub for r in search_roots(models_dir) for sub in subdirs]


def find_weights(
    backend: str,
    file_names: Sequence[str],
    weights: str | os.PathLike | None,
    models_dir: str | os.PathLike | None,
    *,
    subdirs: Sequence[str] = (CLASSIFIER_SUBDIR,),
    hint: str = COMFY_FOLDER_HINT,
    kind: str = "file",
    note: str = "",
) -> Path:
    """The weight file: `weights` if given (must exist), else the first of `file_names` in the searched folders
    (`models_dir_candidates(models_dir, subdirs)`, in order).

    Raises BackendUnavailable naming the file and the folder to put it in: `hint` (the ComfyUI folder), the first of
    `subdirs` (standalone; the others are named as searched too); `kind` names what an explicit `weights` must be,
    `note` adds where the file comes from.
    """
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise BackendUnavailable(
                f"{backend}: weight file {str(path)!r} not found. Pass an existing {kind}, or put "
                f"{file_names[0]!r} in {hint} (standalone: <models_dir>/{subdirs[0]}/)."
            )
        return path
    folders = models_dir_candidates(models_dir, subdirs)
    for folder in folders:
        for name in file_names:
            if (folder / name).is_file():
                return folder / name
    also = "".join(f"; <models_dir>/{sub}/ is searched too" for sub in subdirs[1:])
    raise BackendUnavailable(
        f"{backend}: weight file {file_names[0]!r} not found (also accepted: {', '.join(file_names[1:]) or '-'}). "
        f"Put it in {hint} (standalone: <models_dir>/{subdirs[0]}/ with models_dir= or "
        f"$POPALIGN_MODELS_DIR{also}), or pass weights=PATH. {note}Searched: {searched_text(folders)}."
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors of a ``.safetensors`` file or a torch state-dict file, read with ``weights_only=True`` (no arbitrary
    pickled objects). A ``{"state_dict": ...}`` wrapper and a DataParallel ``module.`` prefix are removed."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        from popalign_core.common.fileio import CorruptFileError

        raise CorruptFileError(
            f"cannot read weight file {str(path)!r} as a safetensors file or a torch state dict "
            f"(torch.load weights_only=True): {type(e).__name__}: {e}; the file is damaged, truncated or of another "
            "format: copy it again from its source"
        ) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"weight file {str(path)!r} holds no state dict (got {type(sd).__name__})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


# ------------------------------------------------------------------------------------------------ detector helpers
def as_rgb(image: np.ndarray) -> np.ndarray:
    """Validate a detector input: [H, W, 3] uint8 RGB (a [H, W] grey or [H, W, 4] RGBA image is converted)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"face detectors take uint8 images (0..255), got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"face detectors take [H, W, 3] RGB images, got shape {image.shape}")
    return np.ascontiguousarray(image)


def clip_box(box: Any, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Round a float (x0, y0, x1, y1) box to ints clipped to the image; None if nothing of it is left inside."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0 = max(0, int(round(x0))), max(0, int(round(y0)))
    x1, y1 = min(width, int(round(x1))), min(height, int(round(y1)))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def pick_face(image: np.ndarray, candidates: list[tuple[Any, float]]) -> Face | None:
    """Clip candidate (box, score) pairs to the image and return the largest as a Face (crop = the box)."""
    height, width = image.shape[:2]
    boxes_scores = []
    for box, score in candidates:
        clipped = clip_box(box, width, height)
        if clipped is not None:
            boxes_scores.append((clipped, float(score)))
    index = largest(boxes_scores)
    if index is None:
        return None
    box, score = boxes_scores[index]
    x0, y0, x1, y1 = box
    return Face(box=box, score=score, crop=np.ascontiguousarray(image[y0:y1, x0:x1]))
