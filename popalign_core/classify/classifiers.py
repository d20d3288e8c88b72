"""Attribute classifiers: face crop -> class probabilities per attribute axis (registry `CLASSIFIERS`).

Backends (keys of `CLASSIFIERS`, which feed CLI choices and ComfyUI dropdowns):

- ``fairface``: the FairFace ResNet-34 (Karkkainen & Joo, WACV 2021), race 7 (or 4) / gender / age 9.
  Weight file ``res34_fair_align_multi_7_20190809.pt`` (a plain state dict) or the same tensors as ``.safetensors``,
  in ``ComfyUI/models/popalign/classifiers/`` (standalone: ``<models_dir>/popalign/classifiers/``).
- ``clip``: open_clip zero-shot classification over text prompts per class (configurable), any open_clip
  architecture whose tokenizer is open_clip's built-in CLIP BPE (e.g. ``ViT-B-32``); weight file
  ``open_clip_<arch>.safetensors`` (or ``.pt`` / ``.bin`` state dict) in the same folder, or ``weights=PATH``.

Both are torch models and differentiable: ``logits(x)`` takes face crops ``x`` [B, 3, H, W] in [0, 1] and returns
per axis logits whose gradients reach the input pixels (the distributional-alignment loss needs this).
``classify(images)`` is the audit path: detector -> largest face -> crop -> probabilities.

Nothing is ever downloaded unless ``allow_download=True`` (and then only where the backend's package can fetch
its own weights: open_clip pretrained tags). Models folder: the ``models_dir=`` option (the ComfyUI nodes pass
ComfyUI's ``models`` folder), else the environment variable ``POPALIGN_MODELS_DIR``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.classify.age_gender import AgeGenderClassifier
from popalign_core.classify.base import (  # noqa: F401  (helpers re-exported: their home until this release)
    CLASSIFIER_SUBDIR,
    COMFY_FOLDER_HINT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackendUnavailable,
    Classification,
    Face,
    FaceDetector,
    FullImage,
    check_image,
    find_weights,
    load_state_dict,
    models_dir_candidates,
)
from popalign_core.classify.deepface_backend import DeepFaceClassifier
from popalign_core.classify.detectors import resolve_detector  # noqa: F401
from popalign_core.classify.torch_model import TorchAttributeClassifier
from popalign_core.common.attributes import AGE_FAIRFACE9, AXES, GENDER, RACE_FAIRFACE7, RACE_GROUP4
from popalign_core.toyworld.classifier import ToyClassifier

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------------------------------------ FairFace
FAIRFACE_FILES = {
    "fairface7": ("res34_fair_align_multi_7_20190809.pt", "res34_fair_align_multi_7_20190809.safetensors"),
    "group4": ("res34_fair_align_multi_4_20190809.pt", "res34_fair_align_multi_4_20190809.safetensors"),
}
# Output layout of the public FairFace models (fc with 18 outputs; predict.py of github.com/dchen236/FairFace):
#   [0:7]  race  White, Black, Latino_Hispanic, East Asian, Southeast Asian, Indian, Middle Eastern  (7-race model)
#   [0:4]  race  White, Black, Asian, Indian                                                          (4-race model)
#   [7:9]  gender  Male, Female   <- reversed w.r.t. our GENDER = ("female", "male")
#   [9:18] age  0-2, 3-9, 10-19, 20-29, 30-39, 40-49, 50-59, 60-69, 70+
# FAIRFACE_INDEX[race_set][axis][k] = output index of class axes[axis][k] (our canonical order).
FAIRFACE_INDEX = {
    "fairface7": {"race": list(range(0, 7)), "gender": [8, 7], "age": list(range(9, 18))},
    "group4": {"race": list(range(0, 4)), "gender": [8, 7], "age": list(range(9, 18))},
}


class FairFaceClassifier(TorchAttributeClassifier):
    """FairFace ResNet-34: torchvision ``resnet34`` with ``fc`` -> 18 outputs (race / gender / age heads).

    Preprocessing as in FairFace's predict.py: resize to 224 x 224, ImageNet mean/std. FairFace was trained on
    dlib-aligned face chips with 25 % padding, so pass crops of that kind (a detector with some margin).
    `race_set`: "fairface7" (``res34_fair_align_multi_7``) or "group4" (``res34_fair_align_multi_4``); guessed from
    the file name when `weights` is given. ``detector=None`` uses `FullImage` (the image is the face crop).
    """

    name = "fairface"

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        detector: FaceDetector | str | None = None,
        device: str = "cpu",
        allow_download: bool = False,
        race_set: str | None = None,
        models_dir: str | os.PathLike | None = None,
        batch_size: int = 32,
    ):
        super().__init__(detector=detector, device=device, batch_size=batch_size)
        if race_set is None:
            race_set = "group4" if weights is not None and "multi_4" in Path(weights).name else "fairface7"
        if race_set not in FAIRFACE_INDEX:
            raise ValueError(f"fairface: race_set must be one of {sorted(FAIRFACE_INDEX)}, got {race_set!r}")
        try:
            import torch
            import torchvision
        except ImportError as e:
            raise BackendUnavailable(f"fairface needs torch and torchvision: pip install torchvision ({e})") from e
        files = FAIRFACE_FILES[race_set]
        try:
            path = find_weights("fairface", files, weights, models_dir)
        except BackendUnavailable as e:
            if allow_download:
                raise BackendUnavailable(
                    f"{e} The FairFace weights are not downloaded automatically: get them from the FairFace "
                    "project (github.com/dchen236/FairFace, 'Download our models')."
                ) from e
            raise
        model = torchvision.models.resnet34(weights=None)
        model.fc = torch.nn.Linear(model.fc.in_features, 18)
        sd = load_state_dict(path)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"fairface: {str(path)!r} is not a FairFace ResNet-34 state dict (torchvision resnet34, fc -> 18): {e}"
            ) from e
        self.model = self._freeze(model)
        self.weights_path = path
        self.race_set = race_set
        race = RACE_FAIRFACE7 if race_set == "fairface7" else RACE_GROUP4
        self.axes = {"race": race, "gender": GENDER, "age": AGE_FAIRFACE9}
        self._index = {a: torch.tensor(ix, device=self.device) for a, ix in FAIRFACE_INDEX[race_set].items()}
        self.input_size, self.mean, self.std = (224, 224), IMAGENET_MEAN, IMAGENET_STD

    def _forward(self, x):
        out = self.model(x)
        return {axis: out.index_select(1, self._index[axis]) for axis in self.axes}


# ------------------------------------------------------------------------------------------------ CLIP zero-shot
def _prompts(template_list: Sequence[str], phrases: dict[str, str]) -> dict[str, list[str]]:
    return {c: [t.format(p) for t in template_list] for c, p in phrases.items()}


_PERSON = ("a photo of a {} person.", "a close-up portrait photo of a {} person.")
_AGE = ("a photo of {}.", "a close-up portrait photo of {}.")
# DEFAULT_CLIP_PROMPTS[axis][class] -> prompts (their normalised text embeddings are averaged per class)
DEFAULT_CLIP_PROMPTS: dict[str, dict[str, list[str]]] = {
    "gender": _prompts(_PERSON, {"female": "female", "male": "male"}),
    "race": _prompts(
        _PERSON,
        {
            "white": "White",
            "black": "Black",
            "latino_hispanic": "Latino Hispanic",
            "east_asian": "East Asian",
            "southeast_asian": "Southeast Asian",
            "asian": "Asian",
            "indian": "Indian",
            "middle_eastern": "Middle Eastern",
        },
    ),
    "age": _prompts(
        _AGE,
        {
            "0-2": "a baby",
            "3-9": "a child",
            "10-19": "a teenager",
            "20-29": "a person in their twenties",
            "30-39": "a person in their thirties",
            "40-49": "a person in their forties",
            "50-59": "a person in their fifties",
            "60-69": "a person in their sixties",
            "70+": "a person over seventy",
            "young": "a young person",
            "old": "an old person",
        },
    ),
}
DEFAULT_CLIP_AXES = {"gender": "binary", "race": "fairface7", "age": "fairface9"}


def load_open_clip(arch: str, path: str | os.PathLike | None, model_cfg: dict | None = None, pretrained=None):
    """An open_clip model `arch` with the state dict of `path` (read with weights_only=True), or, with path None,
    open_clip's own `pretrained` weights (only reached when downloads were allowed). Errors name the file."""
    import logging

    import open_clip

    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.ERROR)  # open_clip logs "model initialized randomly" before the file is loaded
        if path is None:
            return open_clip.create_model(arch, pretrained=pretrained, **(model_cfg or {}))
        model = open_clip.create_model(arch, pretrained=None, **(model_cfg or {}))
        try:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with file + arch
            raise ValueError(
                f"clip: cannot load {str(path)!r} into open_clip {arch!r} (wrong architecture or not a state dict; "
                f"TorchScript archives are not read): {type(e).__name__}: {e}"
            ) from e
        return model
    finally:
        root.setLevel(level)


class ClipZeroShotClassifier(TorchAttributeClassifier):
    """open_clip zero-shot: probabilities = softmax(logit_scale * cosine(image, class text embedding)) per axis.

    `arch`: an open_clip architecture name (built offline with ``pretrained=None``; the CLIP BPE tokenizer ships
    in the package). `model_cfg`: optional overrides of that architecture's config (e.g. a tiny test model).
    `weights`: an open_clip state dict (``.safetensors`` / ``.pt`` / ``.bin``, e.g. ``open_clip_model.safetensors``
    of an open_clip model repository); default file ``open_clip_<arch>.safetensors`` in the classifiers folder.
    OpenAI's original TorchScript ``.pt`` archives are not read (no unsafe unpickling): use a state-dict file.
    `axes`: {axis: class-set variant from `attributes.AXES`}, default gender/binary, race/fairface7, age/fairface9.
    `prompts`: {axis: {class: [prompt, ...]}} overriding `DEFAULT_CLIP_PROMPTS` class by class.
    With ``allow_download=True`` and no local file, open_clip fetches `pretrained` (a tag such as "openai").
    Images are resized to the model's input size (no centre crop: inputs are face crops), CLIP mean/std.
    ``detector=None`` uses `FullImage` (the image is the face crop).
    """

    name = "clip"

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        detector: FaceDetector | str | None = None,
        device: str = "cpu",
        allow_download: bool = False,
        arch: str = "ViT-B-32",
        model_cfg: dict[str, Any] | None = None,
        pretrained: str = "openai",
        axes: dict[str, str] | None = None,
        prompts: dict[str, dict[str, Sequence[str]]] | None = None,
        models_dir: str | os.PathLike | None = None,
        batch_size: int = 32,
    ):
        super().__init__(detector=detector, device=device, batch_size=batch_size)
        try:
            import open_clip
            import torch
        except ImportError as e:
            raise BackendUnavailable(f"clip needs open_clip: pip install open_clip_torch ({e})") from e
        if open_clip.get_model_config(arch) is None:
            raise ValueError(f"clip: unknown open_clip architecture {arch!r}; valid: {open_clip.list_models()}")
        self.axes = self._select_axes(axes)
        files = tuple(f"open_clip_{arch}{ext}" for ext in (".safetensors", ".pt", ".bin"))
        try:
            path = find_weights("clip", files, weights, models_dir)
        except BackendUnavailable:
            if not allow_download:
                raise
            path = None
        model = load_open_clip(arch, path, model_cfg, pretrained=pretrained)
        self.model = self._freeze(model)
        self.weights_path = path
        self.arch = arch
        visual = model.visual
        size = getattr(visual, "image_size", 224)
        self.input_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(cfg.get("mean", OPENAI_CLIP_MEAN))
        self.std = tuple(cfg.get("std", OPENAI_CLIP_STD))
        tokenizer = open_clip.get_tokenizer(arch, context_length=getattr(model, "context_length", None))
        self.prompts = self._select_prompts(prompts)
        with torch.no_grad():
            self._text = {}
            for axis, classes in self.axes.items():
                rows = []
                for c in classes:
                    emb = model.encode_text(tokenizer(list(self.prompts[axis][c])).to(self.device)).float()
                    emb = torch.nn.functional.normalize(emb, dim=-1).mean(0)
                    rows.append(torch.nn.functional.normalize(emb, dim=0))
                self._text[axis] = torch.stack(rows)  # [C, D]

    @staticmethod
    def _select_axes(axes: dict[str, str] | None) -> dict[str, tuple[str, ...]]:
        out = {}
        for axis, variant in (axes or DEFAULT_CLIP_AXES).items():
            if axis not in AXES or variant not in AXES[axis]:
                valid = {a: sorted(v) for a, v in AXES.items()}
                raise ValueError(f"clip: unknown axis/class set {axis!r}/{variant!r}; valid: {valid}")
            out[axis] = AXES[axis][variant]
        return out

    def _select_prompts(self, prompts: dict[str, dict[str, Sequence[str]]] | None) -> dict[str, dict[str, list]]:
        out = {}
        for axis, classes in self.axes.items():
            given = (prompts or {}).get(axis, {})
            unknown = set(given) - set(classes)
            if unknown:
                raise ValueError(f"clip: prompts for unknown {axis} classes {sorted(unknown)}; classes: {classes}")
            out[axis] = {}
            for c in classes:
                p = given.get(c) or DEFAULT_CLIP_PROMPTS.get(axis, {}).get(c)
                if not p:
                    raise ValueError(
                        f"clip: no prompt for {axis} class {c!r}: pass prompts={{{axis!r}: {{{c!r}: [...]}}}}"
                    )
                out[axis][c] = [p] if isinstance(p, str) else list(p)
        return out

    # -- embeddings for CLIPScore (metrics.clip_score): whole images and free texts, no face detection
    def embed_images(self, images: list[np.ndarray]):
        """Whole images (uint8 [H, W, 3] RGB) -> L2-normalised CLIP image embeddings [N, D] (numpy float64).

        Each image is resized to the model's input size (bilinear, antialiased; no crop) and normalised."""
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [check_image(im) for im in images[start : start + self.batch_size]]
            with torch.no_grad():
                x = torch.cat([self._crop_to_tensor(im) for im in chunk])
                e = self.model.encode_image(self.preprocess(x)).float()
                out.append(torch.nn.functional.normalize(e, dim=-1).cpu().numpy())
        dim = int(self.model.text_projection.shape[-1]) if hasattr(self.model, "text_projection") else 0
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, dim))

    def embed_texts(self, texts: Sequence[str]):
        """Texts -> L2-normalised CLIP text embeddings [N, D] (numpy float64), with the model's own tokenizer."""
        import open_clip
        import torch

        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"clip: `texts` must be a list of strings; got {texts!r}")
        tokenizer = open_clip.get_tokenizer(self.arch, context_length=getattr(self.model, "context_length", None))
        with torch.no_grad():
            e = self.model.encode_text(tokenizer(list(texts)).to(self.device)).float()
        return torch.nn.functional.normalize(e, dim=-1).cpu().numpy().astype(np.float64)

    def _forward(self, x):
        import torch

        img = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
        scale = self.model.logit_scale.exp().float()
        return {axis: scale * img @ text.T for axis, text in self._text.items()}


# ------------------------------------------------------------------------------------------------ registry

CLASSIFIERS: dict[str, Callable[..., Any]] = {
    "fairface": FairFaceClassifier,
    "clip": ClipZeroShotClassifier,
    "deepface": DeepFaceClassifier,
    "age_gender": AgeGenderClassifier,
    "toy": ToyClassifier,
}


def check_options(name: str, factory: Any, options: Mapping[str, Any], what: str = "classifier") -> None:
    """ValueError naming an option that `factory` (a backend class or function) does not take, with the valid ones."""
    import inspect

    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k != "self"]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ValueError(f"{what} {name!r} has no option {unknown[0]!r}; its options: {', '.join(valid)}")


def make_classifier(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    detector: FaceDetector | str | None = None,
    device: str = "cpu",
    allow_download: bool = False,
    **options: Any,
):
    """Build the classifier `name` (a key of `CLASSIFIERS`); `options` go to its constructor (e.g. `models_dir`,
    `arch`, `prompts`). ``detector=None`` -> `FullImage` (the whole image is the face crop)."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; valid: {sorted(CLASSIFIERS)}")
    check_options(name, CLASSIFIERS[name], options)
    return CLASSIFIERS[name](
        weights=weights, detector=detector, device=device, allow_download=allow_download, **options
    )
