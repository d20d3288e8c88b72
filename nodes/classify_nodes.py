"""Face detector / attribute classifier loaders, classification and population filtering."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from . import _common as C

NO_DETECTOR = "none (whole image)"


@dataclass
class DetectorHandle:
    name: str
    options: dict = field(default_factory=dict)

    def build(self):
        from popalign_core.classify.detectors import make_detector

        return make_detector(self.name, **self.options)


@dataclass
class ClassifierHandle:
    """What a loaded classifier is (so that DAL can rebuild it in its own config) plus the instance."""

    name: str
    weights: str | None
    detector: DetectorHandle | None
    options: dict
    device: str
    instance: object = None

    def get(self):
        if self.instance is None:
            from popalign_core.classify.classifiers import make_classifier

            det = self.detector.build() if self.detector is not None else None
            self.instance = make_classifier(
                self.name, weights=self.weights, detector=det, device=self.device, **self.options
            )
        return self.instance

    def describe(self) -> dict:
        weights = os.path.basename(self.weights) if self.weights else None
        return {"name": self.name, "weights": weights, "detector": self.detector.name if self.detector else None}


def _set_deepface_home() -> None:
    # DeepFace reads its weights from $DEEPFACE_HOME/.deepface/weights/: point it at ComfyUI/models/deepface
    base = C.models_dir()
    if base and "DEEPFACE_HOME" not in os.environ:
        os.environ["DEEPFACE_HOME"] = os.path.join(base, "deepface")


def _device(choice: str) -> str:
    if choice != C.AUTO:
        return choice
    import comfy.model_management as mm

    dev = mm.get_torch_device()
    return str(dev) if getattr(dev, "type", "cpu") != "cpu" else "cpu"


class PopAlignFaceDetectorLoader:
    DESCRIPTION = "A face detector for the classifier (weights ship in the detector's pip package; DeepFace's YuNet / "
    "RetinaFace files go in models/deepface/.deepface/weights/)."
    CATEGORY = C.category("classify")
    FUNCTION = "load"
    RETURN_TYPES = (C.DETECTOR,)
    RETURN_NAMES = ("detector",)
    OUTPUT_TOOLTIPS = ("a face detector, for PopAlign Classifier Loader's detector input",)

    @classmethod
    def INPUT_TYPES(cls):
        from popalign_core.classify.detectors import DETECTORS

        return C.input_types(
            (
                C.CHOICE("backend", DETECTORS, "detector backend (see docs/classifiers.md)", default="opencv_haar"),
                C.STRING("options_json", 'backend options as JSON, e.g. {"min_neighbors": 5}; {} = defaults', "{}"),
            )
        )

    def load(self, backend, options_json):
        _set_deepface_home()
        opts = C.parse_json(options_json, "options_json", {})
        if not isinstance(opts, dict):
            raise ValueError("options_json: expected a JSON object")
        handle = DetectorHandle(backend, opts)
        handle.build()  # fail here, naming the missing package, rather than in a later node
        return (handle,)


BACKEND_TIP = "classifier backend: fairface (ResNet-34), clip (zero-shot), deepface, age_gender, toy (the toy world's)"
WEIGHTS_TIP = "weight file in models/popalign/classifiers/; auto = the backend's default file name"


class PopAlignClassifierLoader:
    DESCRIPTION = (
        "An attribute classifier (gender / race / age ...). Weight files go in ComfyUI/models/popalign/classifiers/ "
        "(e.g. FairFace's res34_fair_align_multi_7_20190809.pt, open_clip_ViT-B-32.safetensors); nothing downloads."
    )
    CATEGORY = C.category("classify")
    FUNCTION = "load"
    RETURN_TYPES = (C.CLASSIFIER,)
    RETURN_NAMES = ("classifier",)
    OUTPUT_TOOLTIPS = (
        "the classifier (face detection + attribute model), for Classify, Filter Population, Bias Metrics and "
        "Distributional Alignment",
    )

    @classmethod
    def INPUT_TYPES(cls):
        from popalign_core.classify.classifiers import CLASSIFIERS

        required = (
            C.CHOICE("backend", CLASSIFIERS, BACKEND_TIP, default="fairface"),
            C.CHOICE("weights", [C.AUTO] + C.folder_files("popalign_classifiers"), WEIGHTS_TIP),
            C.CHOICE("device", [C.AUTO, "cpu", "cuda"], "where the classifier runs; auto = ComfyUI's device"),
            C.STRING("options_json", 'backend options as JSON, e.g. {"arch": "ViT-B-32"}', "{}"),
        )
        optional = (C.LINK("detector", C.DETECTOR, "face detector; unconnected = the whole image is the face crop"),)
        return C.input_types(required, optional)

    def load(self, backend, weights, device, options_json, detector=None):
        _set_deepface_home()
        opts = C.parse_json(options_json, "options_json", {})
        if not isinstance(opts, dict):
            raise ValueError("options_json: expected a JSON object")
        path = None if weights == C.AUTO else C.resolve_file("popalign_classifiers", weights)
        if backend in ("fairface", "clip") and "models_dir" not in opts and C.models_dir():
            opts["models_dir"] = C.models_dir()
        handle = ClassifierHandle(backend, path, detector, opts, _device(device))
        handle.get()  # a missing weight file fails here, saying where to put it
        return (handle,)


def _classify(handle: ClassifierHandle, images) -> list:
    arrays = C.image_batch_to_uint8(images)
    clf = handle.get()
    out, bar = [], C.Progress(len(arrays))
    for s in range(0, len(arrays), 32):
        out += clf.classify(arrays[s : s + 32])
        bar.update(len(arrays[s : s + 32]))
    return out


def classification_rows(handle: ClassifierHandle, images) -> list[dict]:
    """Per image: {"face": bool, "box", "probs": {axis: [..]}, "label": {axis: class}, "error"}."""
    clf = handle.get()
    rows = []
    for res in _classify(handle, images):
        probs = {a: [float(x) for x in p] for a, p in (res.probs or {}).items()}
        label = {a: clf.axes[a][max(range(len(p)), key=p.__getitem__)] for a, p in probs.items() if p}
        box = list(res.box) if res.box else None
        rows.append({"face": bool(res.face_found), "box": box, "probs": probs, "label": label, "error": res.error})
    return rows


class PopAlignClassify:
    DESCRIPTION = "Classifies every image of a batch: face found, box, class probabilities per axis (JSON)."
    CATEGORY = C.category("classify")
    FUNCTION = "run"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("classification_json",)
    OUTPUT_TOOLTIPS = ("per image: face found, face box and class probabilities per axis (JSON)",)

    @classmethod
    def INPUT_TYPES(cls):
        return C.input_types(
            (
                C.LINK("images", "IMAGE", "images to classify"),
                C.LINK("classifier", C.CLASSIFIER, "from PopAlign Classifier Loader"),
            )
        )

    def run(self, images, classifier):
        return (json.dumps(classification_rows(classifier, images)),)


THRESHOLD_TIP = "minimum probability of the keyword's class on every named axis; 0 = only the argmax must match"
REQUIRE_FACE_TIP = "drop images without a detected face (off: images without faces are classified whole)"


class PopAlignFilterPopulation:
    DESCRIPTION = (
        "PopAlign's filter: keeps an augmented (winning) image only when the classifier finds a face and reads the "
        "prompt's identity with at least `threshold` confidence; neutral (losing) images need a face only."
    )
    CATEGORY = C.category("population")
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", C.POPULATION, "STRING")
    RETURN_NAMES = ("images", "population", "report")
    OUTPUT_TOOLTIPS = (
        "the kept images",
        "the metadata rows of the kept images, with their classifications",
        "how many images were kept and why the others were dropped (JSON)",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return C.input_types(
            (
                C.LINK("images", "IMAGE", "the population's images"),
                C.LINK("population", C.POPULATION, "the population's metadata (same node as the images)"),
                C.LINK("classifier", C.CLASSIFIER, "attribute classifier"),
                C.FLOAT("threshold", THRESHOLD_TIP, 0.8, 0.0, 1.0, 0.01),
                C.BOOLEAN("require_face", REQUIRE_FACE_TIP, True),
            )
        )

    def run(self, images, population, classifier, threshold, require_face):
        from popalign_core.population.filter import filter_batch

        rows = C.check_population(images, population)
        keep, kept_rows, report = filter_batch(
            rows, classifier.get(), _indexed(classifier, images), threshold, require_face, classifier.describe()
        )
        return (
            images[keep],
            {"rows": kept_rows, "settings": population.get("settings", {})},
            json.dumps(report, indent=2),
        )


def _indexed(handle: ClassifierHandle, images):
    """classify(indices) over an IMAGE batch, for the core's `filter_batch`."""
    import torch

    def classify(indices: list[int]) -> list:
        return _classify(handle, images if len(indices) == int(images.shape[0]) else images[torch.tensor(indices)])

    return classify


NODE_CLASS_MAPPINGS = {
    "PopAlignFaceDetectorLoader": PopAlignFaceDetectorLoader,
    "PopAlignClassifierLoader": PopAlignClassifierLoader,
    "PopAlignClassify": PopAlignClassify,
    "PopAlignFilterPopulation": PopAlignFilterPopulation,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PopAlignFaceDetectorLoader": "PopAlign Face Detector Loader",
    "PopAlignClassifierLoader": "PopAlign Classifier Loader",
    "PopAlignClassify": "PopAlign Classify",
    "PopAlignFilterPopulation": "PopAlign Filter Population",
}
