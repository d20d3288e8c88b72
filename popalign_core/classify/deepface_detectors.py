"""DeepFace's face detectors (``deepface_opencv``, ``deepface_yunet``, ``deepface_retinaface``) and the weight-file
helpers shared with the DeepFace classifier (deepface_backend.py, which documents both): built from local weight
files only; nothing is downloaded unless asked.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from popalign_core.classify.base import (  # noqa: F401
    COMFY_FOLDER_HINT,
    BackendUnavailable,
    Face,
    FaceDetector,
    as_rgb,
    models_dir_candidates,
    pick_face,
)

DEEPFACE_INSTALL = "pip install deepface==0.0.103"  # brings retina-face, onnxruntime, opencv-contrib-python-headless


# ------------------------------------------------------------------------------------------------ weight files
def deepface_weights_dir() -> Path:
    """deepface's weight folder ``$DEEPFACE_HOME/.deepface/weights`` (DEEPFACE_HOME defaults to the home folder, as
    in ``deepface/commons/folder_utils.py`` ``get_deepface_home``)."""
    return Path(os.getenv("DEEPFACE_HOME", default=os.path.expanduser("~"))) / ".deepface" / "weights"


def _folders(weights: str | os.PathLike | None, models_dir: str | os.PathLike | None) -> list[Path]:
    """Folders searched for deepface weight files (see the module docstring)."""
    if weights is not None:
        root = Path(weights)
        return [root, root / ".deepface" / "weights"]
    return [*models_dir_candidates(models_dir), deepface_weights_dir()]


def find_deepface_files(
    backend: str,
    files: Mapping[str, Sequence[str]],
    weights: str | os.PathLike | Mapping[str, Any] | None,
    models_dir: str | os.PathLike | None,
    urls: Mapping[str, Sequence[str]] | None = None,
    allow_download: bool = False,
) -> dict[str, Path]:
    """{key: path} of the first existing name of `files[key]` in the searched folders; with `allow_download`,
    deepface fetches the missing ones into ``$DEEPFACE_HOME/.deepface/weights``. Raises BackendUnavailable naming
    every missing file and the folder to put it in."""
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(files)
        if unknown:
            raise ValueError(f"{backend}: weights= has unknown keys {sorted(unknown)}; valid: {sorted(files)}")
        out = {}
        for key in files:
            if key not in weights:
                raise ValueError(f"{backend}: weights= must give a file for each of {sorted(files)}")
            if not Path(weights[key]).is_file():
                raise BackendUnavailable(
                    f"{backend}: weight file {str(weights[key])!r} for {key} not found (expected deepface's "
                    f"{files[key][0]!r})."
                )
            out[key] = Path(weights[key])
        return out
    if weights is not None and Path(weights).is_file():
        if len(files) != 1:
            raise ValueError(
                f"{backend}: weights= is a file but {len(files)} files are needed ({[f[0] for f in files.values()]}):"
                " pass the folder holding them, or a dict {axis: file}"
            )
        return {next(iter(files)): Path(weights)}
    folders = _folders(weights, models_dir)
    found: dict[str, Path] = {}
    for key, names in files.items():
        for folder in folders:
            hit = next((folder / n for n in names if (folder / n).is_file()), None)
            if hit is not None:
                found[key] = hit
                break
    missing = [k for k in files if k not in found]
    if missing and allow_download and urls is not None and weights is None:
        for key in missing:
            found[key] = download_weights(backend, files[key][0], urls[key])
        missing = []
    if missing:
        names = ", ".join(repr(files[k][0]) for k in missing)
        searched = ", ".join(str(f) for f in folders)
        where = (
            f"the folder {str(weights)!r} (or its .deepface/weights/)"
            if weights is not None
            else f"{deepface_weights_dir()} ($DEEPFACE_HOME/.deepface/weights/; DEEPFACE_HOME defaults to the home "
            f"folder) or {COMFY_FOLDER_HINT} (standalone: <models_dir>/popalign/classifiers/), or pass "
            "weights=FOLDER"
        )
        sources = ""
        if urls is not None:
            sources = " Sources: " + "; ".join(f"{files[k][0]}: {urls[k][0]}" for k in missing) + "."
        raise BackendUnavailable(
            f"{backend}: weight file(s) {names} not found. Put them in {where}. Searched: {searched}. "
            f"Nothing is downloaded unless allow_download=True.{sources}"
        )
    return found


def download_weights(backend: str, file_name: str, urls: Sequence[str]) -> Path:
    """Fetch `file_name` with deepface's own downloader into ``$DEEPFACE_HOME/.deepface/weights`` (only called
    with allow_download=True)."""
    try:
        from deepface.commons import folder_utils, weight_utils
    except ImportError as e:
        raise BackendUnavailable(
            f"{backend}: allow_download=True needs the deepface package to fetch {file_name!r}: {DEEPFACE_INSTALL} "
            f"({e}); or put the file in {deepface_weights_dir()} yourself"
        ) from e
    folder_utils.initialize_folder()
    return Path(weight_utils.download_weights_if_necessary(file_name=file_name, source_url=list(urls)))


# ------------------------------------------------------------------------------------------------ detectors
def _import(module: str, name: str) -> ModuleType:
    try:
        importlib.import_module(module.split(".")[0])  # fails when the package is gone, cached submodules or not
        return importlib.import_module(module)
    except ImportError as err:
        raise BackendUnavailable(
            f"face detector {name!r} needs the Python module {module.split('.')[0]!r} ({module} cannot be imported: "
            f"{err}). Install it with: {DEEPFACE_INSTALL}"
        ) from err


class DeepFaceDetector:
    """One of deepface's face detectors (`backend`: "opencv", "yunet" or "retinaface"), built from local weight
    files only (see the module docstring), returning the largest face. Score = deepface's ``confidence`` of the
    backend (see each backend's class); faces scoring below `min_score` (None: keep all) are dropped.

    `weights`: the weight file (backends with one file) or a folder holding them; default: the deepface weight
    folders. deepface works on BGR images: the RGB input is converted. No eye alignment is done.
    """

    backend = ""
    name = ""
    # backend -> {key: (file name, ...)} of the weight files it needs (opencv: found in cv2/data first)
    FILES: dict[str, dict[str, tuple[str, ...]]] = {
        "opencv": {"face": ("haarcascade_frontalface_default.xml",), "eye": ("haarcascade_eye.xml",)},
        "yunet": {"model": ("face_detection_yunet_2023mar.onnx",)},
        "retinaface": {"model": ("retinaface.pth",)},  # ("retinaface.onnx",) on the onnx engine
    }

    def __init__(
        self,
        backend: str | None = None,
        weights: str | os.PathLike | None = None,
        models_dir: str | os.PathLike | None = None,
        allow_download: bool = False,
        min_score: float | None = None,
    ) -> None:
        backend = backend or self.backend
        if backend not in self.FILES:
            raise ValueError(f"deepface detector backend must be one of {sorted(self.FILES)}, got {backend!r}")
        self.backend = backend
        self.name = self.name or f"deepface_{backend}"
        self.min_score = None if min_score is None else float(min_score)
        self._args = (weights, models_dir, allow_download)
        self._client = getattr(self, f"_build_{backend}")()

    def _weights(self, files: dict[str, tuple[str, ...]], urls: dict[str, Any]) -> dict[str, Path]:
        """Local weight files; `urls` (from deepface's / retina-face's detector module) only for allow_download."""
        weights, models_dir, allow_download = self._args
        urls = {k: [u] if isinstance(u, str) else list(u or []) for k, u in urls.items()}
        return find_deepface_files(self.name, files, weights, models_dir, urls, allow_download)

    def _build_opencv(self):
        cv2 = _import("cv2", self.name)
        mod = _import("deepface.models.face_detection.OpenCv", self.name)
        if not hasattr(cv2, "CascadeClassifier"):
            raise BackendUnavailable(
                f"{self.name}: OpenCV {cv2.__version__} has no CascadeClassifier: {DEEPFACE_INSTALL}"
            )
        # deepface looks in <cv2 package>/data first (OpenCvClient.__get_opencv_path), then in its weight folder
        cv2_data = Path(os.path.dirname(cv2.__file__)) / "data"
        paths, rest = {}, {}
        for key, names in self.FILES["opencv"].items():
            if (cv2_data / names[0]).is_file():
                paths[key] = cv2_data / names[0]
            else:
                rest[key] = names
        if rest:
            urls = {key: mod.HAARCASCADE_URL.format(file_name=names[0]) for key, names in rest.items()}
            paths.update(self._weights(rest, urls))
        client = mod.OpenCvClient.__new__(mod.OpenCvClient)  # skip __init__: it would download missing files
        client.model = {
            "face_detector": cv2.CascadeClassifier(str(paths["face"])),
            "eye_detector": cv2.CascadeClassifier(str(paths["eye"])),
        }
        if client.model["face_detector"].empty() or client.model["eye_detector"].empty():
            raise BackendUnavailable(f"{self.name}: OpenCV could not load the cascades {paths}")
        return client

    def _build_yunet(self):
        cv2 = _import("cv2", self.name)
        mod = _import("deepface.models.face_detection.YuNet", self.name)
        major, minor = (int(v) for v in cv2.__version__.split(".")[:2])
        if (major, minor) < (4, 8):  # deepface's YuNetClient.build_model check
            raise BackendUnavailable(f"{self.name}: YuNet needs OpenCV >= 4.8, found {cv2.__version__}")
        path = self._weights(self.FILES["yunet"], {"model": mod.WEIGHTS_URL})["model"]
        try:
            model = cv2.FaceDetectorYN_create(str(path), "", (0, 0))
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{self.name}: cannot load {str(path)!r} as a YuNet ONNX model: {e}") from e
        client = mod.YuNetClient.__new__(mod.YuNetClient)
        client.model = model
        return client

    def _build_retinaface(self):
        mod = _import("deepface.models.face_detection.RetinaFace", self.name)  # imports retina-face's engine
        engines = _import("retinaface.commons.backend_utils", self.name)
        engine = engines.get_backend_engine()
        if engine == "pytorch":
            import torch

            arch = _import("retinaface.model.retinaface_pth_model", self.name)
            path = self._weights({"model": ("retinaface.pth",)}, {"model": arch.WEIGHTS_URLS})["model"]
            model = arch.RetinaFace()
            try:
                model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
            except Exception as e:  # noqa: BLE001 - re-raised with the file name
                raise ValueError(f"{self.name}: {str(path)!r} is not retina-face's pytorch RetinaFace: {e}") from e
            model.eval()
        elif engine == "onnx":
            ort = _import("onnxruntime", self.name)
            arch = _import("retinaface.model.retinaface_onnx_model", self.name)
            path = self._weights({"model": ("retinaface.onnx",)}, {"model": arch.WEIGHTS_URLS})["model"]
            model = arch.RetinaFace(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
        else:
            raise BackendUnavailable(
                f"{self.name}: retina-face runs on its {engine} engine, which is not supported here; set "
                "DEEPFACE_BACKEND_ENGINE=pytorch (or onnx) before importing it, and put retinaface.pth "
                f"(or retinaface.onnx) in {deepface_weights_dir()}"
            )
        client = mod.RetinaFaceClient.__new__(mod.RetinaFaceClient)
        client.model = model
        return client

    def detect(self, image: np.ndarray) -> Face | None:
        """Largest face of an [H, W, 3] uint8 RGB image, or None."""
        image = as_rgb(image)
        regions = self._client.detect_faces(np.ascontiguousarray(image[:, :, ::-1]))  # deepface expects BGR
        candidates = []
        for r in regions:
            score = float(r.confidence) if r.confidence is not None else 0.0
            if self.min_score is None or score >= self.min_score:
                candidates.append(((r.x, r.y, r.x + r.w, r.y + r.h), score))
        return pick_face(image, candidates)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"


class DeepFaceOpenCVDetector(DeepFaceDetector):
    """deepface's default detector ("opencv"): OpenCV Haar cascades (files shipped in ``cv2/data``), scale 1.1,
    10 neighbours. Score = deepface's ``(100 - level weight) / 100`` from ``detectMultiScale3`` (can exceed 1 or be
    negative: not a probability)."""

    backend = "opencv"
    name = "deepface_opencv"

    def __init__(self, **options: Any) -> None:
        super().__init__(backend="opencv", **options)


class DeepFaceYuNetDetector(DeepFaceDetector):
    """deepface's "yunet": OpenCV's YuNet CNN, weight file ``face_detection_yunet_2023mar.onnx``. Score = the YuNet
    face score (faces under 0.9 are dropped by deepface)."""

    backend = "yunet"
    name = "deepface_yunet"

    def __init__(self, **options: Any) -> None:
        super().__init__(backend="yunet", **options)


class DeepFaceRetinaFaceDetector(DeepFaceDetector):
    """deepface's "retinaface": retina-face's ResNet-50 RetinaFace, weight file ``retinaface.pth`` (pytorch engine)
    or ``retinaface.onnx`` (onnx engine). Score = the face probability (faces under 0.9 are dropped)."""

    backend = "retinaface"
    name = "deepface_retinaface"

    def __init__(self, **options: Any) -> None:
        super().__init__(backend="retinaface", **options)
