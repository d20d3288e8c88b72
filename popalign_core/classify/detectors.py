"""Face detectors: registry `DETECTORS = {name: factory}` and `make_detector(name, **options)`.

Every backend implements `popalign_core.classify.base.FaceDetector`: `detect(image)` takes one `[H, W, 3]` uint8
RGB array and returns the LARGEST face (by box area, ties broken by score) as `Face(box, score, crop)` or None.
`box` is `(x0, y0, x1, y1)` in integer pixels, clipped to the image, and `crop` is exactly `image[y0:y1, x0:x1]`
(use `base.crop_box(image, face.box, margin)` for a crop with context). No backend downloads anything: each one
uses model files that ship inside its pip package.

Backends (name: package, install command, score):

- `opencv_haar`: OpenCV's Haar cascade `haarcascade_frontalface_default.xml` from `cv2.data.haarcascades`.
  Install `pip install "opencv-python-headless<5"` (OpenCV 5 wheels ship no cascade files). Options: `scale_factor`
  (1.1), `min_neighbors` (5), `min_size` ((30, 30)), `cascade` (file name in `cv2.data.haarcascades` or a path),
  `equalize` (False: histogram-equalise the grey image first). Score = the number of neighbouring raw detections
  merged into the box (from `detectMultiScale2`; >= `min_neighbors`): a vote count, not a probability.
- `mtcnn`: facenet-pytorch's MTCNN (P/R/O-Net weights ship in the wheel; runs on torch + torchvision ops).
  Install `pip install --no-deps facenet-pytorch==2.6.0` (its declared pins on torch/numpy/pillow are old; it runs
  with current ones). Options: `device` ("cpu"), `min_face_size` (20), `thresholds` ((0.6, 0.7, 0.7)),
  `factor` (0.709), `min_score` (0.0: drop faces whose probability is lower). Score = the O-Net face probability.
- `mediapipe`: MediaPipe face detection (BlazeFace `.tflite` models ship in mediapipe 0.10.21; later releases
  ship none). Install `pip install --no-deps mediapipe==0.10.21 "protobuf>=4.25.3,<5" absl-py flatbuffers`
  (`--no-deps`: its metadata asks for numpy<2 and opencv-contrib-python, which the face-detection graph does
  not need). Options: `model_selection` (0: short range, faces within ~2 m; 1: full range), `min_confidence`
  (0.5). Score = the detection confidence. One detector object must not be shared between threads.
- `deepface_opencv`: DeepFace's default detector (OpenCV Haar cascades from the cv2 wheel plus DeepFace's eye
  check; no weight file). Install `pip install deepface==0.0.103`. Score = DeepFace's confidence for the box.
- `deepface_yunet`: DeepFace's YuNet client; needs `face_detection_yunet_2023mar.onnx` in
  `$DEEPFACE_HOME/.deepface/weights/` (never downloaded). Install `pip install deepface==0.0.103`. Score = YuNet's
  face score.
- `deepface_retinaface`: DeepFace's RetinaFace client; needs `retinaface.pth` (pytorch engine) or
  `retinaface.onnx` in `$DEEPFACE_HOME/.deepface/weights/`. Install `pip install deepface==0.0.103`. Score =
  RetinaFace's face probability. See docs/classifiers.md for all DeepFace options.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from popalign_core.classify.base import BackendUnavailable, Face, FaceDetector, FullImage, as_rgb, pick_face
from popalign_core.classify.deepface_detectors import (
    DeepFaceOpenCVDetector,
    DeepFaceRetinaFaceDetector,
    DeepFaceYuNetDetector,
)

__all__ = [
    "DETECTORS",
    "INSTALL",
    "MTCNNDetector",
    "MediaPipeDetector",
    "OpenCVHaarDetector",
    "make_detector",
]

# backend name -> the command that installs its package (quoted in BackendUnavailable messages)
INSTALL: dict[str, str] = {
    "opencv_haar": 'pip install "opencv-python-headless<5"',
    "mtcnn": "pip install --no-deps facenet-pytorch==2.6.0",
    "mediapipe": 'pip install --no-deps mediapipe==0.10.21 "protobuf>=4.25.3,<5" absl-py flatbuffers',
    "deepface_opencv": "pip install deepface==0.0.103",
    "deepface_yunet": "pip install deepface==0.0.103",
    "deepface_retinaface": "pip install deepface==0.0.103",
}


def _import(module: str, backend: str) -> ModuleType:
    """Import `module` for `backend`, or raise BackendUnavailable saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise BackendUnavailable(
            f"face detector {backend!r} needs the Python module {module!r}, which cannot be imported ({err}). "
            f"Install it with: {INSTALL[backend]}"
        ) from err


class OpenCVHaarDetector:
    """OpenCV Haar-cascade face detector (frontal faces; fast, CPU only, more misses on turned faces).

    Score = number of merged neighbouring detections (a vote count >= `min_neighbors`, not a probability).
    """

    name = "opencv_haar"

    def __init__(
        self,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: tuple[int, int] = (30, 30),
        cascade: str = "haarcascade_frontalface_default.xml",
        equalize: bool = False,
    ) -> None:
        cv2 = _import("cv2", self.name)
        self._cv2 = cv2
        path = cascade
        if not os.path.isabs(cascade):
            folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
            if not folder:
                raise BackendUnavailable(
                    f"OpenCV {cv2.__version__} has no `cv2.data.haarcascades` (OpenCV 5 wheels ship no cascade "
                    f'files). Install an OpenCV 4 wheel: {INSTALL[self.name]}, or pass cascade="/path/to/{cascade}"'
                )
            path = os.path.join(folder, cascade)
        if not os.path.isfile(path):
            raise BackendUnavailable(
                f"Haar cascade file not found: {path} (pass `cascade` as a file name in "
                f"cv2.data.haarcascades or an absolute path to an OpenCV cascade XML)"
            )
        self._classifier = cv2.CascadeClassifier(path)
        if self._classifier.empty():
            raise BackendUnavailable(f"OpenCV could not load the Haar cascade {path}")
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.min_size = (int(min_size[0]), int(min_size[1]))
        self.equalize = bool(equalize)

    def detect(self, image: np.ndarray) -> Face | None:
        """Largest frontal face of an [H, W, 3] uint8 RGB image, or None."""
        image = as_rgb(image)
        grey = self._cv2.cvtColor(image, self._cv2.COLOR_RGB2GRAY)
        if self.equalize:
            grey = self._cv2.equalizeHist(grey)
        rects, neighbours = self._classifier.detectMultiScale2(
            grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=self.min_size
        )
        candidates = [((x, y, x + w, y + h), float(n)) for (x, y, w, h), n in zip(rects, neighbours)]
        return pick_face(image, candidates)


class MTCNNDetector:
    """facenet-pytorch MTCNN face detector (P/R/O-Net cascade; weights ship inside the facenet-pytorch wheel).

    Score = the O-Net face probability.
    """

    name = "mtcnn"

    def __init__(
        self,
        device: str = "cpu",
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        min_score: float = 0.0,
    ) -> None:
        facenet = _import("facenet_pytorch", self.name)
        self._mtcnn = facenet.MTCNN(
            keep_all=True,
            device=device,
            min_face_size=int(min_face_size),
            thresholds=list(thresholds),
            factor=float(factor),
            post_process=False,
        )
        self.min_score = float(min_score)

    def detect(self, image: np.ndarray) -> Face | None:
        """Largest face of an [H, W, 3] uint8 RGB image, or None."""
        import torch

        image = as_rgb(image)
        with torch.no_grad():
            boxes, probs = self._mtcnn.detect(image)
        if boxes is None:
            return None
        candidates = [(box, float(p)) for box, p in zip(boxes, probs) if p is not None and p >= self.min_score]
        return pick_face(image, candidates)


class MediaPipeDetector:
    """MediaPipe (BlazeFace) face detector from mediapipe 0.10.21's legacy `solutions.face_detection`.

    Score = the detection confidence. Not thread-safe: use one detector per thread.
    """

    name = "mediapipe"

    def __init__(self, model_selection: int = 0, min_confidence: float = 0.5) -> None:
        mp = _import("mediapipe", self.name)
        solutions = getattr(mp, "solutions", None)
        if solutions is None or not hasattr(solutions, "face_detection"):
            raise BackendUnavailable(
                f"mediapipe {getattr(mp, '__version__', '?')} has no `solutions.face_detection` with bundled models "
                f"(releases after 0.10.21 ship none). Install: {INSTALL[self.name]}"
            )
        if model_selection not in (0, 1):
            raise ValueError(f"model_selection must be 0 (short range) or 1 (full range), got {model_selection!r}")
        self._detector = solutions.face_detection.FaceDetection(
            model_selection=model_selection, min_detection_confidence=float(min_confidence)
        )

    def detect(self, image: np.ndarray) -> Face | None:
        """Largest face of an [H, W, 3] uint8 RGB image, or None."""
        image = as_rgb(image)
        height, width = image.shape[:2]
        result = self._detector.process(image)
        candidates = []
        for detection in result.detections or []:
            rel = detection.location_data.relative_bounding_box
            box = (
                rel.xmin * width,
                rel.ymin * height,
                (rel.xmin + rel.width) * width,
                (rel.ymin + rel.height) * height,
            )
            candidates.append((box, float(detection.score[0]) if detection.score else 0.0))
        return pick_face(image, candidates)

    def close(self) -> None:
        """Release the MediaPipe graph (also done when the object is garbage-collected)."""
        self._detector.close()


DETECTORS: dict[str, Callable[..., FaceDetector]] = {
    "opencv_haar": OpenCVHaarDetector,
    "mtcnn": MTCNNDetector,
    "mediapipe": MediaPipeDetector,
    "deepface_opencv": DeepFaceOpenCVDetector,
    "deepface_yunet": DeepFaceYuNetDetector,
    "deepface_retinaface": DeepFaceRetinaFaceDetector,
}


def make_detector(name: str, **options: Any) -> FaceDetector:
    """Build the face detector registered as `name` with backend `options` (see the module docstring).

    Raises ValueError for an unknown name (listing the valid ones) and BackendUnavailable when the backend's
    package is missing (saying what to pip install).
    """
    try:
        factory = DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown face detector {name!r}; valid names: {', '.join(sorted(DETECTORS))}") from None
    return factory(**options)


def resolve_detector(detector: FaceDetector | str | None) -> FaceDetector:
    """`None` -> FullImage(); a registry name -> `make_detector(name)`."""
    if detector is None:
        return FullImage()
    if isinstance(detector, str):
        if detector in ("full_image", "none"):
            return FullImage()
        return make_detector(detector)
    if not callable(getattr(detector, "detect", None)):
        raise TypeError(f"detector must have a detect(image) -> Face | None method, got {type(detector).__name__}")
    return detector
