"""DeepFace backends: the ``deepface`` attribute classifier (gender, race, age; the PopAlign paper's choice) and
DeepFace's face detectors (``deepface_opencv``, ``deepface_yunet``, ``deepface_retinaface``).

Classifier
----------
deepface (github.com/serengil/deepface, 0.0.103) predicts age, gender and race with three VGG-Face networks, each
the VGG-Face trunk up to fc7 plus a 1x1-convolution head (``VggFaceClassifier`` in
``deepface/models/demography/pytorch/TorchDemography.py``; trunk in
``deepface/models/facial_recognition/pytorch/VGGFace.py``). Its pytorch backend reads one state-dict file per model:

- gender: ``gender_model_weights.pth`` (2 outputs, ``GENDER_LABELS`` = Woman, Man)
- race: ``race_model_single_batch.pth`` (6 outputs, ``RACE_LABELS`` = asian, indian, black, white, middle eastern,
  latino hispanic)
- age: ``age_model_weights.pth`` (101 outputs, one per age 0..100; deepface reports the expectation)

The network is rebuilt here with the same parameter names, so those files load with ``strict=True`` and the model
runs in torch, differentiably: `DeepFaceClassifier` is a `TorchAttributeClassifier`. (We do not import deepface's
own module for it: in 0.0.103 ``VGGFace.py`` imports ``deepface.modules.verification``, which imports
``werkzeug`` - a Flask dependency of the ``deepface[api]`` extra only - so it fails without werkzeug.) The
tensorflow ``.h5`` files of the same models are not read.

Weight folders, in order: ``weights=FOLDER`` (a folder holding the files, or a DEEPFACE_HOME-like folder holding
``.deepface/weights/``) or ``weights={axis: FILE}``; otherwise ``<models_dir>/popalign/classifiers/`` (with
``models_dir=`` or ``$POPALIGN_MODELS_DIR``), then deepface's own ``$DEEPFACE_HOME/.deepface/weights/`` with
DEEPFACE_HOME defaulting to the home folder (``deepface/commons/folder_utils.py``). Nothing is downloaded unless
``allow_download=True``; then deepface's own downloader (``deepface/commons/weight_utils.py``) fetches the missing
files into ``$DEEPFACE_HOME/.deepface/weights/``.

Mapping to our class sets (``popalign_core.attributes``):

- gender: Woman -> ``female``, Man -> ``male`` (`GENDER` order, same as deepface's).
- race: deepface's six labels -> `RACE_PAPER6` (white, black, latino_hispanic, asian, indian, middle_eastern),
  one to one; "middle eastern" -> ``middle_eastern``, "latino hispanic" -> ``latino_hispanic``.
- age: P(bin) = sum of the 101-way softmax over the integer ages of the bin (inclusive): `AGE_FAIRFACE9`
  0-2, 3-9, 10-19, ..., 60-69, 70+ (= 70..100), or `AGE_BINARY` young = 0..39, old = 40..100. The age logits
  returned by `logits()` are the log-sum-exp of the 101 logits over each bin, so their softmax is exactly that sum.
  `apparent_age()` gives deepface's own number, the expectation sum_k k * p_k (``find_apparent_age`` in
  ``deepface/models/demography/DemographyUtils.py``).

Preprocessing follows ``deepface.modules.demography.analyze``: the face crop (RGB, [0, 1]) is turned into BGR and
letterboxed to 224 x 224 (``deepface/modules/preprocessing.py`` ``resize_image``: aspect-preserving bilinear resize,
black padding centred), no mean subtraction. Face detection and eye alignment are not part of the classifier: pass
``detector=`` (``detector="deepface_opencv"`` is deepface's default detector; deepface additionally rotates the
face to level the eyes, which we do not).

Detectors
---------
`DeepFaceDetector` wraps deepface's detector clients (``deepface/models/face_detection/*.py``), built from weight
files found in the same folders (``weights=FILE_OR_FOLDER``, ``<models_dir>/popalign/classifiers/``,
``$DEEPFACE_HOME/.deepface/weights/``) and never downloaded unless ``allow_download=True``:

- ``opencv``: OpenCV Haar cascades ``haarcascade_frontalface_default.xml`` + ``haarcascade_eye.xml`` (shipped in
  ``cv2/data`` of OpenCV 4 wheels: no download). Score = deepface's ``(100 - level weight) / 100``.
- ``yunet``: ``face_detection_yunet_2023mar.onnx`` via ``cv2.FaceDetectorYN`` (OpenCV >= 4.8); score threshold
  0.9 (deepface reads ``$yunet_score_threshold``). Score = the YuNet face score.
- ``retinaface``: the retina-face package's ResNet-50 RetinaFace, ``retinaface.pth`` on its pytorch engine or
  ``retinaface.onnx`` on its onnx engine (its tensorflow engine is not supported here); threshold 0.9.
  Score = the RetinaFace face probability.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from popalign_core.attributes import AGE_BINARY, AGE_FAIRFACE9, GENDER, RACE_PAPER6
from popalign_core.classify.base import BackendUnavailable, Face, FaceDetector
from popalign_core.classify.classifiers import (
    COMFY_FOLDER_HINT,
    TorchAttributeClassifier,
    load_state_dict,
    models_dir_candidates,
)

__all__ = [
    "DEEPFACE_FILES",
    "DEEPFACE_INSTALL",
    "DeepFaceClassifier",
    "DeepFaceDetector",
    "DeepFaceOpenCVDetector",
    "DeepFaceRetinaFaceDetector",
    "DeepFaceYuNetDetector",
    "deepface_weights_dir",
]

DEEPFACE_INSTALL = "pip install deepface==0.0.103"  # brings retina-face, onnxruntime, opencv-contrib-python-headless

# ------------------------------------------------------------------------------------------------ weights
# file names and sources of deepface's pytorch demography weights (WEIGHTS_URL in
# deepface/models/demography/pytorch/{Gender,Race,Age}.py, deepface 0.0.103)
_RELEASE = "https://github.com/serengil/deepface_models/releases/download/v1.0/"
_HF = "https://huggingface.co/serengil/deepface/resolve/main/"
DEEPFACE_FILES = {
    "gender": "gender_model_weights.pth",
    "race": "race_model_single_batch.pth",
    "age": "age_model_weights.pth",
}
DEEPFACE_URLS = {axis: [_RELEASE + f, _HF + f] for axis, f in DEEPFACE_FILES.items()}
DEEPFACE_OUTPUTS = {"gender": 2, "race": 6, "age": 101}

# deepface's output labels (deepface/models/demography/DemographyUtils.py) and our names for them
DEEPFACE_GENDER_LABELS = ("Woman", "Man")
DEEPFACE_RACE_LABELS = ("asian", "indian", "black", "white", "middle eastern", "latino hispanic")
DEEPFACE_TO_OURS = {
    "gender": {"Woman": "female", "Man": "male"},
    "race": {
        "asian": "asian",
        "indian": "indian",
        "black": "black",
        "white": "white",
        "middle eastern": "middle_eastern",
        "latino hispanic": "latino_hispanic",
    },
}
# age bins as inclusive ranges of deepface's integer ages 0..100
AGE_BINS: dict[str, tuple[tuple[str, ...], tuple[tuple[int, int], ...]]] = {
    "fairface9": (
        AGE_FAIRFACE9,
        ((0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 100)),
    ),
    "binary": (AGE_BINARY, ((0, 39), (40, 100))),
}
INPUT_SIZE = (224, 224)


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


def _find_files(
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
            found[key] = _download(backend, files[key][0], urls[key])
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


def _download(backend: str, file_name: str, urls: Sequence[str]) -> Path:
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


# ------------------------------------------------------------------------------------------------ model
# VGG-Face conv blocks (output channels, convolutions); layer names conv{block}_{i}, fc6, fc7 as in
# deepface/models/facial_recognition/pytorch/VGGFace.py (VggFaceBaseModel)
_VGG_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def _vgg_face_classifier(classes: int):
    """deepface's ``VggFaceClassifier(classes)`` rebuilt (same state-dict keys: ``backbone.conv1_1.*`` ...
    ``backbone.fc7.*``, ``predictions.*``), returning pre-softmax logits instead of probabilities. Built on the
    meta device: weights come from `load_state_dict(..., assign=True)`."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Trunk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c_in = 3
            for b, (c, n) in enumerate(_VGG_BLOCKS, start=1):
                for i in range(1, n + 1):
                    setattr(self, f"conv{b}_{i}", nn.Conv2d(c_in, c, kernel_size=3, padding=1))
                    c_in = c
            self.fc6 = nn.Conv2d(512, 4096, kernel_size=7)
            self.fc7 = nn.Conv2d(4096, 4096, kernel_size=1)

        def forward(self, x):
            for b, (_, n) in enumerate(_VGG_BLOCKS, start=1):
                for i in range(1, n + 1):
                    x = F.relu(getattr(self, f"conv{b}_{i}")(x))
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            x = F.relu(self.fc7(F.relu(self.fc6(x))))  # dropout between them is the identity in eval mode
            return torch.flatten(x, start_dim=1)

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = Trunk()
            self.predictions = nn.Conv2d(4096, classes, kernel_size=1)

        def forward(self, x):
            return torch.flatten(self.predictions(self.backbone(x)[:, :, None, None]), start_dim=1)

    with torch.device("meta"):
        return Classifier()


def letterbox(x, size: tuple[int, int] = INPUT_SIZE):
    """[B, C, H, W] -> [B, C, *size]: aspect-preserving bilinear resize (no antialiasing, like cv2.resize's
    INTER_LINEAR) and zero padding centred, as ``resize_image`` in deepface/modules/preprocessing.py.
    Differentiable."""
    import torch.nn.functional as F

    h, w = int(x.shape[-2]), int(x.shape[-1])
    factor = min(size[0] / h, size[1] / w)
    nh, nw = max(1, int(h * factor)), max(1, int(w * factor))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)
    dh, dw = size[0] - nh, size[1] - nw
    if dh or dw:
        x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
    return x


class DeepFaceClassifier(TorchAttributeClassifier):
    """deepface's gender / race / age models (pytorch weights), mapped to gender `GENDER`, race `RACE_PAPER6` and
    age bins (`AGE_FAIRFACE9` or `AGE_BINARY`, see the module docstring for every rule).

    `attributes`: the axes to load, a subset of ("gender", "race", "age"); each is a separate ~540 MB VGG-Face
    network, so leave out what you do not need. `age_bins`: "fairface9" or "binary". `weights`: a folder holding
    the files (or a DEEPFACE_HOME-like folder holding ``.deepface/weights/``) or a dict {axis: file}; default:
    ``<models_dir>/popalign/classifiers/``, then ``$DEEPFACE_HOME/.deepface/weights/``.
    ``detector=None`` uses `FullImage` (the image is the face crop).
    """

    name = "deepface"

    def __init__(
        self,
        weights: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
        detector: FaceDetector | str | None = None,
        device: str = "cpu",
        allow_download: bool = False,
        models_dir: str | os.PathLike | None = None,
        batch_size: int = 32,
        attributes: Sequence[str] = ("gender", "race", "age"),
        age_bins: str = "fairface9",
    ):
        try:
            import torch
        except ImportError as e:
            raise BackendUnavailable(f"deepface needs torch: pip install torch ({e})") from e
        attributes = tuple(attributes)
        bad = [a for a in attributes if a not in DEEPFACE_FILES]
        if bad or not attributes or len(set(attributes)) != len(attributes):
            raise ValueError(
                f"deepface: attributes must be distinct names of {list(DEEPFACE_FILES)}; got {attributes}"
            )
        if age_bins not in AGE_BINS:
            raise ValueError(f"deepface: age_bins must be one of {sorted(AGE_BINS)}, got {age_bins!r}")
        super().__init__(detector=detector, device=device, batch_size=batch_size)
        files = {a: (DEEPFACE_FILES[a], DEEPFACE_FILES[a].replace(".pth", ".safetensors")) for a in attributes}
        urls = {a: DEEPFACE_URLS[a] for a in attributes}
        self.weights_paths = _find_files("deepface", files, weights, models_dir, urls, allow_download)
        self.models = {}
        for axis, path in self.weights_paths.items():
            model = _vgg_face_classifier(DEEPFACE_OUTPUTS[axis])
            sd = {k: v.float() for k, v in load_state_dict(path).items()}
            try:
                model.load_state_dict(sd, strict=True, assign=True)
            except RuntimeError as e:
                raise ValueError(
                    f"deepface: {str(path)!r} is not deepface's pytorch {axis} model (VGG-Face trunk + 1x1 conv to "
                    f"{DEEPFACE_OUTPUTS[axis]} outputs): {e}"
                ) from e
            self.models[axis] = self._freeze(model)
        classes, ranges = AGE_BINS[age_bins]
        self.age_bins = age_bins
        self.axes = {}
        self._index = {}
        for axis in attributes:
            if axis == "gender":
                self.axes[axis] = GENDER
                labels = [next(k for k, v in DEEPFACE_TO_OURS["gender"].items() if v == c) for c in GENDER]
                self._index[axis] = torch.tensor([DEEPFACE_GENDER_LABELS.index(lb) for lb in labels])
            elif axis == "race":
                self.axes[axis] = RACE_PAPER6
                labels = [next(k for k, v in DEEPFACE_TO_OURS["race"].items() if v == c) for c in RACE_PAPER6]
                self._index[axis] = torch.tensor([DEEPFACE_RACE_LABELS.index(lb) for lb in labels])
            else:
                self.axes[axis] = classes
                member = torch.full((len(ranges), DEEPFACE_OUTPUTS["age"]), float("-inf"))
                for j, (lo, hi) in enumerate(ranges):
                    member[j, lo : hi + 1] = 0.0
                self._index[axis] = member  # [bins, 101]: 0 inside the bin, -inf outside
        self._index = {a: t.to(self.device) for a, t in self._index.items()}
        self.input_size, self.mean, self.std = INPUT_SIZE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    # -- preprocessing: letterbox instead of the base class's stretch; RGB -> BGR, values stay in [0, 1]
    def preprocess(self, x):
        """[B, 3, H, W] RGB in [0, 1] -> [B, 3, 224, 224] BGR in [0, 1], letterboxed (deepface's analyze)."""
        import torch

        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
        x = letterbox(x.to(self.device, torch.float32), self.input_size)
        return x.flip(1)

    def _crop_to_tensor(self, crop: np.ndarray):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(crop[:, :, :3])).permute(2, 0, 1)[None].float() / 255.0
        return letterbox(t, self.input_size)

    def raw_logits(self, images) -> dict[str, Any]:
        """deepface's own pre-softmax outputs in deepface's label order: {axis: [B, 2 | 6 | 101]}."""
        x = self.preprocess(images)
        return {axis: model(x) for axis, model in self.models.items()}

    def _forward(self, x) -> dict[str, Any]:
        out = {}
        for axis, model in self.models.items():
            z = model(x)
            if axis == "age":
                out[axis] = (z[:, None, :] + self._index[axis][None]).logsumexp(dim=-1)
            else:
                out[axis] = z.index_select(1, self._index[axis])
        return out

    def apparent_age(self, images):
        """deepface's age estimate: sum_k k * softmax(age logits)_k over k = 0..100, per image [B]
        (``find_apparent_age``). Differentiable."""
        import torch

        if "age" not in self.models:
            raise ValueError("deepface: built without the age model (attributes=...)")
        p = self.models["age"](self.preprocess(images)).softmax(dim=-1)
        return p @ torch.arange(p.shape[-1], dtype=p.dtype, device=p.device)


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
        return _find_files(self.name, files, weights, models_dir, urls, allow_download)

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
        from popalign_core.classify.detectors import _as_rgb, _pick

        image = _as_rgb(image)
        regions = self._client.detect_faces(np.ascontiguousarray(image[:, :, ::-1]))  # deepface expects BGR
        candidates = []
        for r in regions:
            score = float(r.confidence) if r.confidence is not None else 0.0
            if self.min_score is None or score >= self.min_score:
                candidates.append(((r.x, r.y, r.x + r.w, r.y + r.h), score))
        return _pick(image, candidates)

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
