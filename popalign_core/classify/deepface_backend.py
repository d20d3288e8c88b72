"""DeepFace backends: the ``deepface`` attribute classifier (gender, race, age; the PopAlign paper's choice) and
DeepFace's face detectors (``deepface_opencv``, ``deepface_yunet``, ``deepface_retinaface``; they live in
deepface_detectors.py, which the detector registry imports, and are re-exported here).

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

Mapping to our class sets (``popalign_core.common.attributes``):

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

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from popalign_core.classify.base import BackendUnavailable, FaceDetector, load_state_dict
from popalign_core.classify.deepface_detectors import (  # noqa: F401  (the detectors: re-exported, documented here)
    DEEPFACE_INSTALL,
    DeepFaceDetector,
    DeepFaceOpenCVDetector,
    DeepFaceRetinaFaceDetector,
    DeepFaceYuNetDetector,
    deepface_weights_dir,
    download_weights,
    find_deepface_files,
)
from popalign_core.classify.torch_model import TorchAttributeClassifier
from popalign_core.common.attributes import AGE_BINARY, AGE_FAIRFACE9, GENDER, RACE_PAPER6

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
        self.weights_paths = find_deepface_files("deepface", files, weights, models_dir, urls, allow_download)
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
