"""`TorchAttributeClassifier`: the shared machinery of the torch attribute classifiers (FairFace, CLIP, DeepFace).

Detection + cropping (a detector instance or a registry name, `detectors.resolve_detector`), batching, validation,
softmax; subclasses implement ``_forward``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from popalign_core.classify.base import IMAGENET_MEAN, IMAGENET_STD, Classification, Face, FaceDetector, check_image
from popalign_core.classify.detectors import resolve_detector
from popalign_core.common.userinput import check_device


class TorchAttributeClassifier:
    """Shared machinery of the torch backends: detection + cropping, batching, validation, softmax.

    Subclasses set `name`, `axes` and `self.input_size`, `self.mean`, `self.std`, and implement `_forward(x)`:
    normalised [B, 3, S, S] -> {axis: logits [B, len(axes[axis])]} in the class order of `axes[axis]`.
    """

    name: str = ""
    axes: dict[str, tuple[str, ...]] = {}
    differentiable = True

    def __init__(self, detector: FaceDetector | str | None = None, device: str = "cpu", batch_size: int = 32):

        self.detector = resolve_detector(detector)
        self.device = check_device(device)
        self.batch_size = int(batch_size)
        self.input_size: tuple[int, int] = (224, 224)
        self.mean: tuple[float, ...] = IMAGENET_MEAN
        self.std: tuple[float, ...] = IMAGENET_STD

    # -- differentiable path
    def preprocess(self, x):
        """[B, 3, H, W] in [0, 1] -> resized (bilinear, antialiased) to `input_size` and normalised."""
        import torch
        import torch.nn.functional as F

        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
        x = x.to(self.device, torch.float32)
        if tuple(x.shape[-2:]) != tuple(self.input_size):
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def logits(self, images) -> dict[str, Any]:
        """Face crops [B, 3, H, W] in [0, 1] -> {axis: logits [B, n_classes]} (class order = `axes[axis]`).

        Differentiable end to end: gradients flow to `images` (the model's own weights are frozen)."""
        return self._forward(self.preprocess(images))

    def probs(self, images) -> dict[str, Any]:
        """softmax of `logits(images)` per axis (differentiable)."""
        return {axis: t.softmax(dim=-1) for axis, t in self.logits(images).items()}

    def _forward(self, x) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- audit path
    def classify(self, images: list[np.ndarray]) -> list[Classification]:
        """images: list of [H, W, 3] uint8 RGB. One Classification per image: largest face -> probabilities per
        axis; no face -> face_found=False; invalid image or failing detector -> face_found=False + error."""
        import torch

        results: list[Classification | None] = [None] * len(images)
        crops: list[tuple[int, Face]] = []
        for i, image in enumerate(images):
            try:
                image = check_image(image)
                face = self.detector.detect(image)
            except Exception as e:  # noqa: BLE001 - one bad image must not stop an audit
                results[i] = Classification(face_found=False, error=f"{type(e).__name__}: {e}")
                continue
            if face is None or face.crop is None or face.crop.size == 0 or min(face.crop.shape[:2]) < 2:
                results[i] = Classification(face_found=False)
                continue
            crops.append((i, face))
        for start in range(0, len(crops), self.batch_size):
            chunk = crops[start : start + self.batch_size]
            with torch.no_grad():
                x = torch.cat([self._crop_to_tensor(face.crop) for _, face in chunk])
                probs = {axis: p.float().cpu().numpy() for axis, p in self.probs(x).items()}
            for j, (i, face) in enumerate(chunk):
                results[i] = Classification(
                    face_found=True,
                    box=tuple(int(v) for v in face.box),
                    probs={axis: p[j].astype(np.float64) / p[j].sum() for axis, p in probs.items()},
                )
        return results  # type: ignore[return-value]

    def _crop_to_tensor(self, crop: np.ndarray):
        """uint8 [h, w, 3] crop -> [1, 3, S, S] float in [0, 1], resized like `preprocess` does."""
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(crop[:, :, :3])).permute(2, 0, 1)[None].float() / 255.0
        return F.interpolate(t, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)

    def _freeze(self, model):
        model.eval().requires_grad_(False)
        return model.to(self.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(detector={getattr(self.detector, 'name', '?')}, device={self.device})"
