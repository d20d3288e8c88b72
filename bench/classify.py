"""Throughput of every installed face detector and attribute classifier on CPU (images per second).

    .venv/bin/python bench/classify.py [--images 32] [--size 512] [--repeats 3]

Detectors run on `skimage.data.astronaut()` (a real 512x512 photo with one face) resized to --size. Classifiers run
on the same images with the full-image "detector" (so their own cost is measured) and with weights of the real
architecture at random values (speed does not depend on the values): FairFace's ResNet-34 and open_clip ViT-B-32.
Backends whose package is missing are listed as unavailable. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _images(n: int, size: int) -> list[np.ndarray]:
    try:
        from skimage.data import astronaut
        from skimage.transform import resize

        img = astronaut()
        if img.shape[0] != size:
            img = (resize(img, (size, size), anti_aliasing=True) * 255).astype(np.uint8)
    except ImportError:
        img = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return [img.copy() for _ in range(n)]


def _rate(fn, images, repeats: int) -> tuple[float, float]:
    fn(images[:2])  # warm-up (lazy model loading, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return len(images) / med, med


def _classifier_weights(name: str, folder: Path) -> dict:
    import torch

    if name == "fairface":
        import torchvision
        from safetensors.torch import save_file

        torch.manual_seed(0)
        m = torchvision.models.resnet34(weights=None)
        m.fc = torch.nn.Linear(m.fc.in_features, 18)
        path = folder / "res34_fair_align_multi_7_20190809.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
        return {"weights": str(path)}
    if name == "clip":
        import open_clip
        from safetensors.torch import save_file

        m = open_clip.create_model("ViT-B-32", pretrained=None)
        path = folder / "open_clip_ViT-B-32.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
        return {"weights": str(path), "arch": "ViT-B-32"}
    if name in ("age_gender", "toy"):
        return {}  # age_gender: CC0 models ship in the package; toy: the shipped toy world (if built)
    if name == "deepface":
        # seeded random weights in deepface's file format (VGG-Face trunk + head, ~540 MB per attribute)
        from popalign_core.classify.deepface_backend import DEEPFACE_FILES, DEEPFACE_OUTPUTS, _vgg_face_classifier

        torch.manual_seed(0)
        for axis, file in DEEPFACE_FILES.items():
            m = _vgg_face_classifier(DEEPFACE_OUTPUTS[axis]).to_empty(device="cpu")
            with torch.no_grad():
                for p in m.parameters():
                    p.normal_(0.0, 0.01)
            torch.save(m.state_dict(), folder / file)
        return {"weights": str(folder)}
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32, help="images per timed run (default 32)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    a = ap.parse_args(argv)
    import torch

    from popalign_core.classify.base import BackendUnavailable
    from popalign_core.classify.classifiers import CLASSIFIERS, make_classifier
    from popalign_core.classify.detectors import DETECTORS, make_detector

    torch.set_num_threads(max(1, torch.get_num_threads()))
    images = _images(a.images, a.size)
    rows = []
    for name in DETECTORS:
        try:
            det = make_detector(name)
            rate, med = _rate(lambda ims, d=det: [d.detect(i) for i in ims], images, a.repeats)
            found = sum(det.detect(i) is not None for i in images[:4])
            rows.append({"kind": "detector", "name": name, "images_per_s": rate, "median_s": med, "faces_in_4": found})
        except (BackendUnavailable, ImportError) as exc:
            rows.append({"kind": "detector", "name": name, "unavailable": str(exc).splitlines()[0]})
    with tempfile.TemporaryDirectory() as tmp:
        for name in CLASSIFIERS:
            try:
                clf = make_classifier(name, **_classifier_weights(name, Path(tmp)))
                rate, med = _rate(clf.classify, images, a.repeats)
                rows.append({"kind": "classifier", "name": name, "images_per_s": rate, "median_s": med})
            except (BackendUnavailable, ImportError) as exc:
                rows.append({"kind": "classifier", "name": name, "unavailable": str(exc).splitlines()[0]})
    print(f"{'kind':11s} {'backend':14s} {'images/s':>10s} {'median s':>10s}  (N={a.images}, {a.size}px, CPU)")
    for r in rows:
        if "unavailable" in r:
            print(f"{r['kind']:11s} {r['name']:14s} unavailable: {r['unavailable']}")
        else:
            print(f"{r['kind']:11s} {r['name']:14s} {r['images_per_s']:10.1f} {r['median_s']:10.3f}")
    print(json.dumps({"images": a.images, "size": a.size, "threads": torch.get_num_threads(), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
