"""The toy world's attribute classifiers (backend `toy`), face detector analogue, image embedder and face bank.

Two independently trained networks judge toy images:

* the **training classifier** (``which="train"``): a small CNN used for filtering preference data and inside
  distributional alignment. Differentiable; calibrated by label smoothing and a per-head temperature fitted on
  held-out renders (its probabilities are not saturated at 0/1);
* the **evaluation classifier** (``which="eval"``): a different architecture and seed, trained only on renders
  passed through the toy VAE (so they look like generated images); it grades every efficacy result, so no method
  is graded by the classifier it was trained through.

Both have the heads: ``face`` (is a face visible: the face-detector analogue, with a box regression head),
``form`` / ``hue`` / ``stature`` (the identity axes), ``concept`` (person, tree, house, boat, sun) and ``role``.
`ToyClassifier.embed_images` gives L2-normalised trunk features (the toy image-embedding provider), and
`face_bank()` the embeddings of rendered faces (the toy face bank for realism-preserving losses).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.classify.base import BackendUnavailable, Classification, check_image
from popalign_core.common.fileio import read_safetensors
from popalign_core.common.userinput import check_device
from popalign_core.toyworld.render import Spec, render
from popalign_core.toyworld.world import CONCEPTS, ROLE_NAMES, TOY_AXES

CONCEPT_CLASSES = ("person",) + CONCEPTS
HEADS: dict[str, int] = {
    "face": 1,
    "box": 4,
    "form": len(TOY_AXES["form"]),
    "hue": len(TOY_AXES["hue"]),
    "stature": len(TOY_AXES["stature"]),
    "concept": len(CONCEPT_CLASSES),
    "role": len(ROLE_NAMES),
}
FILES = {"train": "toy_train.safetensors", "eval": "toy_eval.safetensors"}
CONFIG_FILE = "toy_classifiers.json"
FACE_BANK_FILE = "toy_face_bank.safetensors"


def _nets():
    import torch
    from torch import nn

    class TrainNet(nn.Module):
        """Global-average-pooled CNN (the training classifier)."""

        def __init__(self, width: int = 32):
            super().__init__()
            w = width

            def block(i, o, s):
                return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.GroupNorm(8, o), nn.SiLU())

            self.trunk = nn.Sequential(block(3, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
                                       block(2 * w, 3 * w, 2), block(3 * w, 3 * w, 2))  # fmt: skip
            self.dim = 3 * w
            self.heads = nn.ModuleDict({k: nn.Linear(self.dim, n) for k, n in HEADS.items()})

        def features(self, x):
            return self.trunk(x).mean(dim=(2, 3))

        def forward(self, x):
            f = self.features(x)
            return {k: h(f) for k, h in self.heads.items()}, f

    class EvalNet(nn.Module):
        """A different design: 5x5 stem, max-pooling, flattened 4x4 map and an MLP (the evaluation classifier)."""

        def __init__(self, width: int = 40):
            super().__init__()
            w = width
            self.trunk = nn.Sequential(
                nn.Conv2d(3, w, 5, 1, 2), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(w, 2 * w, 3, 1, 1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            )  # fmt: skip
            self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU())
            self.dim = 128
            self.heads = nn.ModuleDict({k: nn.Linear(self.dim, n) for k, n in HEADS.items()})

        def features(self, x):
            return self.mlp(self.trunk(x))

        def forward(self, x):
            f = self.features(x)
            return {k: h(f) for k, h in self.heads.items()}, f

    return {"train": TrainNet, "eval": EvalNet}, torch


# ------------------------------------------------------------------------------------------------ training data
def _labels(truth, size: int) -> dict[str, Any]:
    s = truth.spec
    out = {"face": float(truth.face_box is not None), "box": np.zeros(4, np.float32), "mask_box": 0.0}
    if truth.face_box is not None:
        out["box"] = np.asarray(truth.face_box, np.float32) / size
        out["mask_box"] = 1.0
    person = s.kind == "figure"
    out["concept"] = 0 if person else 1 + CONCEPTS.index(s.concept)
    out["role"] = ROLE_NAMES.index(s.role) if person else -1
    for axis, classes in TOY_AXES.items():
        out[axis] = classes.index(getattr(s, axis)) if person and not s.hidden else -1
    return out


def labelled_renders(n: int, seed: int, size: int = 32):
    """n renders with uniform attributes (every role x class), 12% cloaked, 12% concepts -> (uint8 imgs, labels)."""
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, size, size, 3), np.uint8)
    labels: dict[str, list] = {k: [] for k in ("face", "box", "mask_box", "concept", "role", *TOY_AXES)}
    for i in range(n):
        u = rng.random()
        if u < 0.12:
            spec = Spec("concept", concept=CONCEPTS[int(rng.integers(len(CONCEPTS)))])
        else:
            ident = {a: c[int(rng.integers(len(c)))] for a, c in TOY_AXES.items()}
            spec = Spec("figure", role=ROLE_NAMES[int(rng.integers(len(ROLE_NAMES)))], hidden=u < 0.24, **ident)
        imgs[i], t = render(spec, rng, size)
        for k, v in _labels(t, size).items():
            labels[k].append(v)
    return imgs, {k: np.asarray(v) for k, v in labels.items()}


def vae_roundtrip(vae, imgs: np.ndarray, noise: float = 0.0, seed: int = 0, batch: int = 256) -> np.ndarray:
    """Encode + decode uint8 images with the toy VAE (latent noise `noise` x std, to mimic sampling error)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for s in range(0, len(imgs), batch):
            x = torch.from_numpy(imgs[s : s + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
            z = vae.encode(x).latent_dist.mean
            if noise:
                z = z + noise * z.std() * torch.randn(z.shape, generator=g)
            y = vae.decode(z).sample.clamp(-1, 1)
            out.append(((y + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def _loss(out, lab, torch, smoothing: float):
    import torch.nn.functional as F

    total = F.binary_cross_entropy_with_logits(out["face"][:, 0], lab["face"].float())
    m = lab["mask_box"] > 0
    if m.any():
        total = total + 4.0 * F.smooth_l1_loss(torch.sigmoid(out["box"][m]), lab["box"][m].float(), beta=0.02)
    for k in ("form", "hue", "stature", "concept", "role"):
        keep = lab[k] >= 0
        if keep.any():
            total = total + F.cross_entropy(out[k][keep], lab[k][keep].long(), label_smoothing=smoothing)
    return total


def train_net(which: str, imgs: np.ndarray, labels: dict, steps: int, seed: int, progress=None, batch: int = 128):
    nets, torch = _nets()
    torch.manual_seed(seed)
    net = nets[which]()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1), pct_start=0.15)
    rng = np.random.default_rng(seed)
    x_all = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    lab_all = {k: torch.from_numpy(np.asarray(v)) for k, v in labels.items()}
    smoothing = 0.1 if which == "train" else 0.0
    net.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(imgs), batch))
        x = x_all[idx].float() / 255.0
        x = (x + 0.02 * torch.randn_like(x)).clamp(0, 1)  # mild pixel noise
        out, _ = net(x)
        loss = _loss(out, {k: v[idx] for k, v in lab_all.items()}, torch, smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 500 == 0 or step == steps - 1):
            progress(f"{which} classifier step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return net.eval().requires_grad_(False)


def fit_temperatures(net, imgs: np.ndarray, labels: dict) -> dict[str, float]:
    """Per-head temperature minimising the held-out NLL (grid search over 0.5..4): calibrated probabilities."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        out, _ = net(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0)
    temps = {}
    grid = np.exp(np.linspace(np.log(0.5), np.log(4.0), 41))
    for k in ("face", "form", "hue", "stature", "concept", "role"):
        y = torch.from_numpy(np.asarray(labels[k]))
        if k == "face":
            nll = [F.binary_cross_entropy_with_logits(out[k][:, 0] / t, y.float()).item() for t in grid]
        else:
            keep = y >= 0
            nll = [F.cross_entropy(out[k][keep] / t, y[keep].long()).item() for t in grid]
        temps[k] = float(grid[int(np.argmin(nll))])
    return temps


def train_classifiers(
    folder: str | os.PathLike, vae, cfg, progress=None, n: int | None = None, steps: int | None = None
) -> dict[str, Any]:
    """Train both classifiers (and the face bank) into ``folder/classifiers/``; returns their held-out accuracy."""
    import torch
    from safetensors.torch import save_file

    out = Path(folder) / "classifiers"
    out.mkdir(parents=True, exist_ok=True)
    n = n or cfg.classifier_images
    steps = steps or cfg.classifier_steps
    imgs, labels = labelled_renders(n, cfg.seed + 10)
    rt = vae_roundtrip(vae, imgs, seed=cfg.seed + 11)
    rt_noisy = vae_roundtrip(vae, imgs, noise=0.15, seed=cfg.seed + 12)
    hold_imgs, hold_labels = labelled_renders(max(n // 10, 500), cfg.seed + 20)
    hold_rt = vae_roundtrip(vae, hold_imgs, seed=cfg.seed + 21)
    # training classifier: clean renders and VAE round trips; evaluation classifier: round trips with and without
    # latent noise (what generated images look like) and clean renders (world v2: trained on round trips alone it
    # confused short round figures with angular ones on the 56 backgrounds, 0.965 on renders)
    data = {
        "train": (np.concatenate([imgs, rt]), {k: np.concatenate([v, v]) for k, v in labels.items()}),
        "eval": (np.concatenate([rt, rt_noisy, imgs]), {k: np.concatenate([v, v, v]) for k, v in labels.items()}),
    }
    config: dict[str, Any] = {"heads": HEADS, "concepts": list(CONCEPT_CLASSES), "roles": list(ROLE_NAMES),
                              "axes": {a: list(c) for a, c in TOY_AXES.items()}, "nets": {}}  # fmt: skip
    for which, seed in (("train", cfg.seed + 30), ("eval", cfg.seed + 40)):
        net = train_net(which, *data[which], steps, seed, progress)
        temps = fit_temperatures(net, hold_rt, hold_labels) if which == "train" else {k: 1.0 for k in HEADS}
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / FILES[which]))
        config["nets"][which] = {"file": FILES[which], "temperature": temps, "seed": seed}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    clf = ToyClassifier(folder, which="train")
    bank = clf.embed_images(list(hold_imgs[hold_labels["face"] > 0][:512]))
    save_file({"embeddings": torch.from_numpy(bank).float().contiguous()}, str(out / FACE_BANK_FILE))
    acc = {w: ToyClassifier(folder, which=w).accuracy(hold_imgs, hold_labels) for w in ("train", "eval")}
    if progress:
        progress(f"classifier held-out accuracy (clean renders): {acc}")
    return acc


# ------------------------------------------------------------------------------------------------ backend
def default_toyworld_dir() -> Path:
    """The toy world shipped with the package (built by ``popalign toyworld build``)."""
    return Path(__file__).resolve().parent / "assets" / "toyworld"


class ToyClassifier:
    """Backend `toy`: the toy world's classifiers behind the `AttributeClassifier` interface.

    weights: a toy-world folder (default: the shipped one) or its ``classifiers/`` folder. which: "train"
    (filtering, distributional alignment; calibrated) or "eval" (grading). The face head is the detector: a face
    is found when P(face) >= `face_threshold`; the box comes from the box head. Probabilities come from the whole
    image (the figure fills it). ``detector`` must be None (the face head is the detector).

    The face head was trained on toy renders only; on images unlike any render it can fire on nothing (a blank or
    uniformly coloured image, random noise). So the detector also requires a drawn picture (`drawn`): some contrast
    (spatial pixel standard deviation of the most varied channel >= `MIN_STD` at the classifier's 32x32 input) and the
    smoothness of drawn shapes (mean absolute difference of neighbouring pixels <= `MAX_TV`). Measured on 216 model
    images of every role and concept (guidance 1 and 2): std >= 0.126, TV <= 0.069; a uniformly coloured image has
    std 0, random noise at 32x32 TV 0.33.
    """

    MIN_STD = 0.03
    MAX_TV = 0.12

    name = "toy"
    differentiable = True

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        which: str = "train",
        detector: Any = None,
        device: str = "cpu",
        allow_download: bool = False,
        models_dir: str | os.PathLike | None = None,
        batch_size: int = 256,
        face_threshold: float = 0.5,
    ):
        if which not in FILES:
            raise ValueError(f"toy: `which` must be one of {sorted(FILES)}; got {which!r}")
        if detector is not None:
            raise ValueError("toy: `detector` must be None: the toy classifier's face head is its detector")
        if not 0.0 < float(face_threshold) < 1.0:
            raise ValueError(f"toy: `face_threshold` must be in (0, 1); got {face_threshold!r}")
        nets, torch = _nets()
        folder = Path(weights) if weights is not None else default_toyworld_dir()
        cdir = folder if (folder / CONFIG_FILE).is_file() else folder / "classifiers"
        cfg_file = cdir / CONFIG_FILE
        if not cfg_file.is_file():
            raise BackendUnavailable(
                f"toy: no {CONFIG_FILE} in {cdir}: build the toy world with `popalign toyworld build --out DIR` "
                "and pass weights=DIR"
            )
        self.config = json.loads(cfg_file.read_text())
        info = self.config["nets"][which]

        net = nets[which]()
        sd, _ = read_safetensors(cdir / info["file"], "toy classifier weight file", "rebuild the toy world "
                                 "(`popalign toyworld build`) or reinstall the package")  # fmt: skip
        net.load_state_dict(sd, strict=True)
        self.net = net.eval().requires_grad_(False).to(check_device(device))
        self.temperature = {k: float(v) for k, v in info["temperature"].items()}
        self.which, self.folder, self.device = which, folder, torch.device(device)
        self.weights_path = cdir / info["file"]
        self.batch_size = int(batch_size)
        self.face_threshold = float(face_threshold)
        self.axes = {a: tuple(c) for a, c in TOY_AXES.items()}
        self.detector = None

    # -- differentiable path
    def heads(self, images):
        """[B, 3, H, W] in [0, 1] (resized to 32x32 if needed) -> (temperature-scaled logits per head, features)."""
        import torch.nn.functional as F

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"toy: expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        x = images.to(self.device).float()
        if tuple(x.shape[-2:]) != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        out, feats = self.net(x)
        scaled = {k: (v / self.temperature.get(k, 1.0) if k != "box" else v) for k, v in out.items()}
        return scaled, feats

    def logits(self, images) -> dict[str, Any]:
        """{axis: logits} for the identity axes (differentiable; gradients flow to `images`)."""
        out, _ = self.heads(images)
        return {a: out[a] for a in self.axes}

    def probs(self, images) -> dict[str, Any]:
        return {a: t.softmax(dim=-1) for a, t in self.logits(images).items()}

    @classmethod
    def drawn(cls, x) -> Any:
        """[B, 3, 32, 32] in [0, 1] -> bool [B]: the images look drawn (see the class docstring)."""
        std = x.flatten(2).std(2).amax(1)  # spatial contrast of the most varied channel
        tv = (
            (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))
            + (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3))
        ) / 2  # noqa: E501
        return (std >= cls.MIN_STD) & (tv <= cls.MAX_TV)

    def _face_prob(self, out, x) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        if tuple(x.shape[-2:]) != (32, 32):
            x = F.interpolate(x.float(), size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        p = torch.sigmoid(out["face"][:, 0]).detach().cpu()
        return torch.where(self.drawn(x.detach().cpu()), p, torch.zeros_like(p)).numpy()

    # -- audit path
    def classify(self, images: list[np.ndarray]) -> list[Classification]:
        import torch

        results: list[Classification | None] = [None] * len(images)
        ok = []
        for i, im in enumerate(images):
            try:
                ok.append((i, check_image(im)))
            except Exception as e:  # noqa: BLE001 - one bad image never stops an audit
                results[i] = Classification(face_found=False, error=f"{type(e).__name__}: {e}")
        for s in range(0, len(ok), self.batch_size):
            chunk = ok[s : s + self.batch_size]
            x = torch.stack([self._to_tensor(im) for _, im in chunk])
            with torch.no_grad():
                out, _ = self.heads(x)
            face = self._face_prob(out, x)
            box = torch.sigmoid(out["box"]).cpu().numpy()
            probs = {a: out[a].softmax(-1).double().cpu().numpy() for a in self.axes}
            for j, (i, im) in enumerate(chunk):
                if face[j] < self.face_threshold:
                    results[i] = Classification(face_found=False)
                    continue
                h, w = im.shape[:2]
                b = box[j] * np.array([w, h, w, h])
                x0, y0 = int(np.clip(np.floor(b[0]), 0, w - 1)), int(np.clip(np.floor(b[1]), 0, h - 1))
                x1, y1 = int(np.clip(np.ceil(b[2]), x0 + 1, w)), int(np.clip(np.ceil(b[3]), y0 + 1, h))
                results[i] = Classification(
                    face_found=True, box=(x0, y0, x1, y1), probs={a: p[j] / p[j].sum() for a, p in probs.items()}
                )
        return results  # type: ignore[return-value]

    def predict(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """All heads as numpy: face probability, class probabilities per head (concept, role, axes)."""
        import torch

        x = torch.stack([self._to_tensor(np.asarray(im)) for im in images])
        res: dict[str, list] = {}
        with torch.no_grad():
            for s in range(0, len(x), self.batch_size):
                out, _ = self.heads(x[s : s + self.batch_size])
                res.setdefault("face", []).append(self._face_prob(out, x[s : s + self.batch_size]))
                for k in ("form", "hue", "stature", "concept", "role"):
                    res.setdefault(k, []).append(out[k].softmax(-1).numpy())
        return {k: np.concatenate(v) for k, v in res.items()}

    def accuracy(self, imgs: np.ndarray, labels: dict) -> dict[str, float]:
        """Accuracy per head against renderer ground truth (labels from `labelled_renders`)."""
        p = self.predict(list(imgs))
        acc = {"face": float(((p["face"] >= self.face_threshold) == (labels["face"] > 0)).mean())}
        for k in ("form", "hue", "stature", "concept", "role"):
            keep = labels[k] >= 0
            acc[k] = float((p[k][keep].argmax(1) == labels[k][keep]).mean())
        return acc

    # -- embeddings
    def embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        """L2-normalised trunk features [N, D] (the toy image-embedding provider)."""
        import torch

        x = torch.stack([self._to_tensor(np.asarray(im)) for im in images])
        with torch.no_grad():
            f = torch.cat([self.heads(x[s : s + self.batch_size])[1] for s in range(0, len(x), self.batch_size)])
        return torch.nn.functional.normalize(f, dim=-1).double().numpy()

    def embed(self, images):
        """Differentiable embeddings of [B, 3, H, W] images in [0, 1] (L2-normalised trunk features)."""
        import torch

        return torch.nn.functional.normalize(self.heads(images)[1], dim=-1)

    def face_bank(self):
        """The toy face bank: trunk embeddings [M, D] of rendered faces (torch tensor)."""

        path = self.weights_path.parent / FACE_BANK_FILE
        if not path.is_file():
            raise BackendUnavailable(f"toy: face bank {path} is missing: rebuild the toy world")
        return read_safetensors(path, "toy face bank", "rebuild the toy world", keys=["embeddings"])[0]["embeddings"]

    @staticmethod
    def _to_tensor(im: np.ndarray):
        """[H, W, 3] uint8 -> [3, 32, 32] in [0, 1] (resized as `heads` resizes a batch), so images of any size
        batch together."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(im[:, :, :3])).permute(2, 0, 1).float() / 255.0
        if tuple(x.shape[-2:]) != (32, 32):
            x = F.interpolate(x[None], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)[0]
        return x

    def __repr__(self) -> str:
        return f"ToyClassifier(which={self.which!r}, folder={str(self.folder)!r})"
