"""A bank of real-face embeddings (`FaceBank`) for the face-realism loss (patent [0108]):
``L_face = 1 - max_F cos(emb(face(x)), emb(F))`` against real faces F (CelebA, FairFace).

    from popalign_core.dal.facebank import FaceBank

    bank = FaceBank.from_folder("faces/", embedder)                    # cached beside the images
    cos, index = bank.nearest(embedder.embed(images))                  # max cosine over the bank, differentiable
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.common.fileio import atomic_path, load_rgb
from popalign_core.dal.embedding import Embedder, _slug, _to_tensor

__all__ = ["BANK_FORMAT", "FaceBank", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
BANK_FORMAT = "popalign-facebank-v1"


def _list_images(folder: Path, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    out = []
    for p in it:
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue  # hidden files and folders (the cache, macOS "._x.jpg" resource forks)
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


class FaceBank:
    """Embeddings of real face images [M, D] (float32, L2-normalised, CPU) for the face-realism loss (patent
    [0108]): ``L_face = 1 - max_F cos(emb(face(x)), emb(F))``; `nearest` gives that max and its index.

    `paths`: the image of each row (relative to `folder`) when built from a folder; `skipped`: [(path, reason)] of
    unreadable images; `from_cache`: whether the embeddings came from the cache file `cache_file`.
    """

    def __init__(
        self,
        embeddings,
        *,
        embedder_id: str | None = None,
        paths: Sequence[str] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
        folder: str | os.PathLike | None = None,
        from_cache: bool = False,
        cache_file: str | os.PathLike | None = None,
    ):
        import torch

        e = torch.as_tensor(embeddings)
        if e.ndim != 2 or e.shape[0] == 0 or e.shape[1] == 0:
            raise ValueError(f"FaceBank: embeddings must be a non-empty [M, D] tensor, got {tuple(e.shape)}")
        e = e.detach().to("cpu", torch.float32)
        if not torch.isfinite(e).all():
            raise ValueError("FaceBank: embeddings contain NaN or inf")
        norms = e.norm(dim=-1)
        if (norms == 0).any():
            raise ValueError(f"FaceBank: {int((norms == 0).sum())} embedding row(s) are zero (no direction)")
        self.embeddings = e / norms[:, None]
        if paths is not None and len(paths) != len(e):
            raise ValueError(f"FaceBank: {len(paths)} paths for {len(e)} embeddings")
        self.paths = list(paths) if paths is not None else None
        self.embedder_id = embedder_id
        self.skipped = [tuple(s) for s in skipped]
        self.folder = Path(folder) if folder is not None else None
        self.from_cache = bool(from_cache)
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._on_device: dict[str, Any] = {}

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def __repr__(self) -> str:
        src = f", folder={str(self.folder)!r}" if self.folder else ""
        return f"FaceBank({len(self)} x {self.dim}{src}, skipped={self.n_skipped}, from_cache={self.from_cache})"

    @classmethod
    def from_tensor(cls, embeddings, embedder_id: str | None = None, paths: Sequence[str] | None = None) -> FaceBank:
        """A bank from embeddings [M, D] (rows are L2-normalised here), e.g. ``ToyClassifier().face_bank()``."""
        return cls(embeddings, embedder_id=embedder_id, paths=paths)

    @classmethod
    def from_folder(
        cls,
        folder: str | os.PathLike,
        embedder: Embedder,
        cache: bool = True,
        *,
        recursive: bool = False,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 32,
        progress: Callable[[str], None] | None = None,
    ) -> FaceBank:
        """Embed the face images of `folder` (.png/.jpg/.jpeg/.webp, sorted by relative path; subfolders too when
        `recursive`; hidden names starting with "." are ignored) with `embedder`, batched per image size.

        Cache: a safetensors file ``.popalign_facebank-<embedder id>.safetensors`` in `folder` (or
        ``facebank-<embedder id>-<folder hash>.safetensors`` in `cache_dir`), reused only when the embedder id and
        the list of (relative path, size, mtime_ns) of the images are unchanged. A cache that cannot be written is
        a warning. Unreadable images are skipped with one warning and counted (`skipped`); a folder with no
        readable image is a ValueError naming it.
        """
        import torch

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"FaceBank: face folder {str(folder)!r} does not exist or is not a folder")
        files = _list_images(folder, recursive)
        rels = [p.relative_to(folder).as_posix() for p in files]
        stats = [p.stat() for p in files]
        listing = [[r, s.st_size, s.st_mtime_ns] for r, s in zip(rels, stats)]
        key = hashlib.sha256(json.dumps({"recursive": bool(recursive), "files": listing}).encode()).hexdigest()
        cache_file = None
        if cache:
            eid = embedder.id
            if cache_dir is None:
                cache_file = folder / f".popalign_facebank-{_slug(eid)}.safetensors"
            else:
                where = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
                cache_file = Path(cache_dir) / f"facebank-{_slug(eid)}-{where}.safetensors"
            hit = cls._load_cache(cache_file, eid, key)
            if hit is not None:
                emb, paths, skipped = hit
                _warn_skipped(folder, skipped, cached=True)
                return cls(emb, embedder_id=eid, paths=paths, skipped=skipped, folder=folder,
                           from_cache=True, cache_file=cache_file)  # fmt: skip
        paths, skipped, rows = [], [], []
        pending: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}

        def flush(shape):
            items = pending.pop(shape)
            x = torch.stack([_to_tensor(a) for _, a in items])
            with torch.no_grad():
                e = embedder.embed(x).float().cpu()
            for (rel, _), row in zip(items, e):
                paths.append(rel)
                rows.append(row)

        for n, (rel, path) in enumerate(zip(rels, files)):
            try:
                a = load_rgb(path)
                if min(a.shape[:2]) < 2:
                    raise ValueError(f"image too small: {a.shape[1]}x{a.shape[0]}")
            except Exception as e:  # noqa: BLE001 - an unreadable file is counted, never fatal
                skipped.append((rel, f"{type(e).__name__}: {e}"))
                continue
            pending.setdefault(a.shape, []).append((rel, a))
            if len(pending[a.shape]) >= max(int(batch_size), 1):
                flush(a.shape)
            if progress and (n + 1) % 1000 == 0:
                progress(f"face bank: {n + 1}/{len(files)} images read")
        for shape in list(pending):
            flush(shape)
        _warn_skipped(folder, skipped, cached=False)
        if not rows:
            raise ValueError(
                f"FaceBank: no readable face image ({', '.join(IMAGE_EXTENSIONS)}) in {str(folder)!r} "
                f"(recursive={recursive}; {len(skipped)} unreadable skipped)"
            )
        order = sorted(range(len(paths)), key=lambda i: paths[i])  # batching per size reorders: restore path order
        emb = torch.stack([rows[i] for i in order])
        paths = [paths[i] for i in order]
        if cache_file is not None:
            cls._save_cache(cache_file, emb, embedder.id, key, paths, skipped, folder)
        return cls(emb, embedder_id=embedder.id, paths=paths, skipped=skipped, folder=folder, cache_file=cache_file)

    @staticmethod
    def _load_cache(path: Path, embedder_id: str, key: str):
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if (meta.get("format"), meta.get("embedder_id"), meta.get("files")) != (BANK_FORMAT, embedder_id, key):
                    return None
                emb = f.get_tensor("embeddings")
            paths = json.loads(meta["paths"])
            skipped = [tuple(s) for s in json.loads(meta["skipped"])]
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            return None
        if emb.ndim != 2 or emb.shape[0] != len(paths) or emb.shape[0] == 0:
            return None
        return emb, paths, skipped

    @staticmethod
    def _save_cache(path: Path, emb, embedder_id: str, key: str, paths, skipped, folder: Path) -> None:
        from safetensors.torch import save_file

        meta = {"format": BANK_FORMAT, "embedder_id": embedder_id, "files": key, "folder": str(folder),
                "paths": json.dumps(paths), "skipped": json.dumps([list(s) for s in skipped])}  # fmt: skip
        try:
            with atomic_path(path) as tmp:
                save_file({"embeddings": emb.contiguous()}, str(tmp), metadata=meta)
        except OSError as e:
            warnings.warn(f"FaceBank: cannot write the cache {str(path)!r} ({e}); continuing without it", stacklevel=3)

    # -- lookup
    def to(self, device) -> FaceBank:
        """Keep a copy of the embeddings on `device` for `nearest` (also done on first use)."""
        self._bank_on(device)
        return self

    def _bank_on(self, device):
        import torch

        device = torch.device(device)
        if str(device) not in self._on_device:
            self._on_device[str(device)] = self.embeddings.to(device)
        return self._on_device[str(device)]

    def nearest(self, emb, chunk: int = 65536):
        """emb [B, D] -> (cos [B], index [B]): max over the bank of cos(emb, bank row) and the row attaining it.

        `cos` is differentiable with respect to `emb` (emb is L2-normalised inside, so raw embeddings work). The
        arg-max is found without gradients in chunks of `chunk` rows; the cosine is then recomputed with gradients
        for the chosen rows only (the gradient of a max is that of its arg-max), so memory stays O(B x D)."""
        import torch
        import torch.nn.functional as F

        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[1] != self.dim:
            shape = tuple(emb.shape) if hasattr(emb, "shape") else type(emb).__name__
            raise ValueError(f"FaceBank.nearest: expected embeddings [B, {self.dim}], got {shape}")
        bank = self._bank_on(emb.device)
        e = F.normalize(emb.float(), dim=-1)
        best = torch.full((e.shape[0],), -2.0, device=e.device)
        index = torch.zeros(e.shape[0], dtype=torch.long, device=e.device)
        with torch.no_grad():
            ed = e.detach()
            for s in range(0, len(bank), max(int(chunk), 1)):
                v, i = (ed @ bank[s : s + max(int(chunk), 1)].T).max(dim=1)
                better = v > best
                best = torch.where(better, v, best)
                index = torch.where(better, i + s, index)
        cos = (e * bank[index]).sum(dim=-1)
        return cos, index


def _warn_skipped(folder: Path, skipped: Sequence[tuple[str, str]], cached: bool) -> None:
    if not skipped:
        return
    shown = "; ".join(f"{p} ({r})" for p, r in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
    when = " (as when the cache was built)" if cached else ""
    warnings.warn(
        f"FaceBank: skipped {len(skipped)} unreadable image(s) in {str(folder)!r}{when}: {shown}", stacklevel=3
    )
