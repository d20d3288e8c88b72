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
            self.instance = make_classifier(self.name, weights=self.weights, detector=det, device=self.device,
                                            **self.options)  # fmt: skip
        return self.instance

    def describe(self) -> dict:
        return {"name": self.name, "weights": os.path.basename(self.weights) if self.weights else None,
                "detector": self.detector.name if self.detector else None}  # fmt: skip


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

        return {
            "required": {
                "backend": C.tip(list(DETECTORS), "detector backend (see docs/classifiers.md)", default="opencv_haar"),
                "options_json": C.tip(
                    "STRING", 'backend options as JSON, e.g. {"min_neighbors": 5}; {} = defaults', default="{}"
                ),  # fmt: skip
            }
        }

    def load(self, backend, options_json):
        _set_deepface_home()
        opts = C.parse_json(options_json, "options_json", {})
        if not isinstance(opts, dict):
            raise ValueError("options_json: expected a JSON object")
        handle = DetectorHandle(backend, opts)
        handle.build()  # fail here, naming the missing package, rather than in a later node
        return (handle,)


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

        return {
            "required": {
                "backend": C.tip(
                    list(CLASSIFIERS),
                    "classifier backend: fairface (ResNet-34), clip (zero-shot), "
                    "deepface, age_gender, toy (the toy world's)",
                    default="fairface",
                ),  # fmt: skip
                "weights": C.tip(
                    [C.AUTO] + C.folder_files("popalign_classifiers"),
                    "weight file in models/popalign/classifiers/; auto = the backend's default file name",
                ),  # fmt: skip
                "device": C.tip([C.AUTO, "cpu", "cuda"], "where the classifier runs; auto = ComfyUI's device"),
                "options_json": C.tip(
                    "STRING", 'backend options as JSON, e.g. {"arch": "ViT-B-32"}', default="{}"
                ),  # fmt: skip
            },
            "optional": {
                "detector": C.tip(C.DETECTOR, "face detector; unconnected = the whole image is the face crop"),
            },
        }

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
        rows.append({"face": bool(res.face_found), "box": list(res.box) if res.box else None, "probs": probs,
                     "label": label, "error": res.error})  # fmt: skip
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
        return {"required": {"images": C.tip("IMAGE", "images to classify"),
                             "classifier": C.tip(C.CLASSIFIER, "from PopAlign Classifier Loader")}}  # fmt: skip

    def run(self, images, classifier):
        return (json.dumps(classification_rows(classifier, images)),)


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
        return {
            "required": {
                "images": C.tip("IMAGE", "the population's images"),
                "population": C.tip(C.POPULATION, "the population's metadata (same node as the images)"),
                "classifier": C.tip(C.CLASSIFIER, "attribute classifier"),
                "threshold": C.tip(
                    "FLOAT",
                    "minimum probability of the keyword's class on every named axis; 0 = only the argmax must match",
                    default=0.8,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                ),  # fmt: skip
                "require_face": C.tip(
                    "BOOLEAN",
                    "drop images without a detected face (off: images without faces are classified whole)",
                    default=True,
                ),  # fmt: skip
            }
        }

    def run(self, images, population, classifier, threshold, require_face):
        import numpy as np
        import torch

        from popalign_core.population.filter import FilterConfig, decide

        rows = C.check_population(images, population)
        clf = classifier.get()
        caxes = {a: tuple(c) for a, c in clf.axes.items()}
        for r in rows:
            for axis, cls in (r.get("identity") or {}).items():
                if axis not in caxes or cls not in caxes[axis]:
                    raise ValueError(
                        f"population: prompt {r['prompt']!r} names {axis}={cls!r}, which the {classifier.name} "
                        f"classifier cannot read (its axes: { {a: list(c) for a, c in caxes.items()} })"
                    )
        cfg = FilterConfig(threshold=max(float(threshold), 1e-9))
        results = _classify(classifier, images)
        faceless = [k for k, res in enumerate(results) if res is not None and not res.face_found and not res.error]
        if faceless and not require_face and hasattr(clf, "detector"):
            from popalign_core.classify.classifiers import FullImage

            own = clf.detector
            clf.detector = FullImage()  # classify the whole image instead
            try:
                whole = _classify(classifier, images[torch.tensor(faceless)])
            finally:
                clf.detector = own
            for k, res in zip(faceless, whole):
                results[k] = res
        keep, kept_rows, reasons = [], [], {}
        for k, (r, res) in enumerate(zip(rows, results)):
            reason = decide(r, res, caxes, cfg)
            reasons[reason] = reasons.get(reason, 0) + 1
            if reason == "kept":
                keep.append(k)
                attrs = {a: caxes[a][int(np.argmax(p))] for a, p in res.probs.items()}
                kept_rows.append({**r, "attributes": attrs})
        report = {"images": len(rows), "kept": len(keep), "reasons": dict(sorted(reasons.items())),
                  "threshold": float(threshold), "require_face": bool(require_face),
                  "classifier": classifier.describe()}  # fmt: skip
        if not keep:
            raise ValueError(
                f"filter: no image was kept ({json.dumps(report['reasons'])}); lower the threshold, turn off "
                "require_face for models that draw no faces, or sample more images"
            )
        kept = images[torch.tensor(keep)]
        return (kept, {"rows": kept_rows, "settings": population.get("settings", {})}, json.dumps(report, indent=2))


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
