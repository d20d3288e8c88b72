"""Interfaces shared by every face-detector and attribute-classifier backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..userinput import user_error


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
    axes: dict[str, tuple[str, ...]]  # axis -> class names (from popalign_core.attributes)
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
