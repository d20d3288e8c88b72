"""Image-embedding providers and the face bank (`popalign_core.dal.embedders`): every `EMBEDDERS` entry built through
`make_embedder` from real weight files (the shipped toy world; a tiny random-weight open_clip model and a tiny
`Dinov2Model` saved to tmp), compared with the models' own preprocessing + forward; the face-bank cache."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from popalign_core.classify.base import BackendUnavailable  # noqa: E402
from popalign_core.dal.embedders import EMBEDDERS, FaceBank, Preprocess, make_embedder  # noqa: E402
from popalign_core.toyworld.classifier import ToyClassifier, labelled_renders  # noqa: E402

# a tiny open_clip model: ViT-B-32's code path, 1-layer 32-wide towers, 32x32 input
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# a tiny DINOv2: 28x28 input (2x2 patches of 14), short side resized to 32 then centre crop 28 (as 256 -> 224)
TINY_DINO_PROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 32},
    "do_center_crop": True,
    "crop_size": {"height": 28, "width": 28},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}
# image size at which each model's own preprocessing leaves pixels unresized (so PIL and torch agree exactly)
NATIVE = {"toy": (32, 32), "clip": (32, 40), "dinov2": (32, 40)}
OPTIONS = {"toy": {}, "clip": {"arch": "ViT-B-32", "model_cfg": TINY_CLIP_CFG}, "dinov2": {}}


def test_every_registry_entry_is_tested_here():
    assert set(EMBEDDERS) == set(NATIVE)
    for spec in EMBEDDERS.values():
        assert spec.help and callable(spec.factory)


def _save_clip(path, seed):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP_CFG)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _save_dino(folder, seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=28, patch_size=14
    )
    transformers.Dinov2Model(cfg).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(TINY_DINO_PROCESSOR))
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """{name: weights argument for make_embedder} of real files (toy: the shipped world, weights=None)."""
    folder = tmp_path_factory.mktemp("embedder_weights")
    out = {"toy": None}
    try:
        out["clip"] = _save_clip(folder / "clip_tiny.safetensors", seed=0)
    except pytest.skip.Exception:
        pass
    try:
        out["dinov2"] = _save_dino(folder / "dino_tiny", seed=0)
    except pytest.skip.Exception:
        pass
    return out


@pytest.fixture(scope="module")
def embedders(weights):
    return {name: make_embedder(name, weights=w, **OPTIONS[name]) for name, w in weights.items()}


def _get(embedders, name):
    if name not in embedders:
        pytest.skip(f"{name}: backend package not installed")
    return embedders[name]


def _smooth(h, w, seed=0):
    """A smooth uint8 RGB image (a photo-like signal: resampling kernels agree on it to ~1/255)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    ch = [
        128 + 90 * np.sin(xx / rng.uniform(3, 6) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(3, 6)) for _ in "rgb"
    ]
    return np.clip(np.stack(ch, -1), 0, 255).astype(np.uint8)


def _tensor(a):
    return torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 255.0


def _reference(name, weights, images):
    """The model's own pipeline on PIL images: open_clip's eval transform + encode_image; transformers'
    AutoImageProcessor + Dinov2Model CLS token; ToyClassifier.embed_images."""
    from PIL import Image

    if name == "toy":
        return torch.from_numpy(ToyClassifier().embed_images(images)).float()
    if name == "clip":
        import open_clip

        model = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP_CFG)
        open_clip.load_checkpoint(model, str(weights), strict=True)
        tf = open_clip.image_transform(32, is_train=False)
        with torch.no_grad():
            e = model.eval().encode_image(torch.stack([tf(Image.fromarray(a)) for a in images]))
        return torch.nn.functional.normalize(e, dim=-1)
    from transformers import AutoImageProcessor, Dinov2Model

    proc = AutoImageProcessor.from_pretrained(str(weights))
    model = Dinov2Model.from_pretrained(str(weights)).eval()
    with torch.no_grad():
        pv = proc(images=[Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"]
        return torch.nn.functional.normalize(model(pixel_values=pv).last_hidden_state[:, 0], dim=-1)


# ------------------------------------------------------------------------------------------------ interface
@pytest.mark.parametrize("name", sorted(NATIVE))
def test_shape_normalisation_and_frozen(embedders, name):
    emb = _get(embedders, name)
    x = torch.rand(3, 3, 37, 45)
    e = emb.embed(x)
    assert e.shape == (3, emb.dim) and e.dtype == torch.float32 and emb.dim > 0
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    assert not e.requires_grad  # no parameter asks for gradients
    assert not emb.model.training and not any(p.requires_grad for p in emb.model.parameters())
    assert emb.name == name and emb.id.startswith(f"{name}-")
    torch.testing.assert_close(emb(x), e)  # __call__ = embed
    with pytest.raises(ValueError, match=f"{name}: expected images \\[B, 3, H, W\\]"):
        emb.embed(torch.rand(3, 45, 45))
    with pytest.raises(ValueError, match="float"):
        emb.embed(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_gradient_reaches_images_not_model(embedders, name):
    emb = _get(embedders, name)
    x = torch.rand(2, 3, 40, 52, requires_grad=True)
    target = torch.nn.functional.normalize(torch.randn(2, emb.dim), dim=-1)
    loss = (1 - (emb.embed(x) * target).sum(-1)).mean()  # the semantics-preserving loss shape, Eq. 7
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in emb.model.parameters())


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_matches_model_own_pipeline_exactly_at_native_size(embedders, weights, name):
    emb = _get(embedders, name)
    h, w = NATIVE[name]
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(3)]  # noise: any resize would show
    ours = emb.embed(torch.cat([_tensor(a) for a in images]))
    torch.testing.assert_close(ours, _reference(name, weights[name], images), atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", ["clip", "dinov2"])
@pytest.mark.parametrize("size", [(48, 64), (64, 44), (20, 30)])
def test_matches_model_own_pipeline_after_resize(embedders, weights, name, size):
    """With resizing, the models' pipelines work on uint8 (PIL / torchvision uint8 kernels) and ours on floats:
    preprocessed pixels agree to ~1/255 on a smooth image, the embeddings to < 1e-3."""
    emb = _get(embedders, name)
    a = _smooth(*size)
    ours = emb.embed(_tensor(a))
    ref = _reference(name, weights[name], [a])
    assert (ours - ref).abs().max() < 5e-3, (ours - ref).abs().max()  # measured <= 8e-4
    assert float((ours * ref).sum()) > 0.99999


def test_preprocess_modes_match_open_clip_transforms():
    open_clip = pytest.importorskip("open_clip")
    x = 0.2 + 0.6 * torch.rand(3, 48, 70)
    for mode, ours in (
        ("shortest", Preprocess("shortest", 32, (32, 32))),
        ("squash", Preprocess("squash", (32, 32), None)),
    ):
        # open_clip on a float tensor runs torchvision's float kernel (the same as ours); values in [0.2, 0.8] keep
        # bicubic overshoot inside [0, 1], where our clamp is inactive
        tf = open_clip.image_transform(32, is_train=False, resize_mode=mode)
        torch.testing.assert_close(ours(x[None])[0], tf(x), atol=1e-5, rtol=0)
    # longest: fit inside, pad (PIL only in open_clip); unchanged size -> exact
    from PIL import Image

    a = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    tf = open_clip.image_transform(32, is_train=False, resize_mode="longest", fill_color=0)
    ref = tf(Image.fromarray(a))
    torch.testing.assert_close(Preprocess("longest", (32, 32), (32, 32))(_tensor(a))[0], ref, atol=1e-6, rtol=0)
    # non-square target, open_clip's ResizeKeepRatio + CenterCrop
    tf = open_clip.image_transform((32, 24), is_train=False)
    ours = Preprocess("shortest", (32, 24), (32, 24))
    b = np.random.default_rng(1).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    torch.testing.assert_close(ours(_tensor(b))[0], tf(Image.fromarray(b)), atol=1e-6, rtol=0)


def test_toy_is_the_toy_classifier_embedding(embedders):
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(embedders["toy"].embed(x), ToyClassifier(which="train").embed(x))
    assert embedders["toy"].dim == 96


# ------------------------------------------------------------------------------------------------ ids, options
def test_id_keys_weights_and_options(weights, embedders, tmp_path):
    ids = {name: e.id for name, e in embedders.items()}
    assert len(set(ids.values())) == len(ids)
    for name, e in embedders.items():  # stable across loads
        assert make_embedder(name, weights=weights[name], **OPTIONS[name]).id == e.id
    assert make_embedder("toy", which="eval").id != ids["toy"]
    if "clip" in embedders:
        other = make_embedder("clip", weights=_save_clip(tmp_path / "clip_seed1.safetensors", 1), **OPTIONS["clip"])
        assert other.id != ids["clip"] and other.id.startswith("clip-ViT-B-32-")
        squash = make_embedder("clip", weights=weights["clip"], resize_mode="squash", **OPTIONS["clip"])
        assert squash.id != ids["clip"] and squash.preprocess.crop_size is None
    if "dinov2" in embedders:
        squash = make_embedder("dinov2", weights=weights["dinov2"], resize_mode="squash")
        assert squash.id != ids["dinov2"] and squash.preprocess.resize_size == (28, 28)


def test_registry_validation(weights):
    with pytest.raises(ValueError, match=r"unknown embedder 'sfnet'; valid: \['clip', 'dinov2', 'toy'\]"):
        make_embedder("sfnet")
    with pytest.raises(ValueError, match=r"embedder 'toy': unknown option\(s\) \['arch'\]; valid: \['which'\]"):
        make_embedder("toy", arch="ViT-H-14")
    with pytest.raises(ValueError, match="toy: `which`"):
        make_embedder("toy", which="test")
    if "clip" in weights:
        with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-Z'"):
            make_embedder("clip", weights=weights["clip"], arch="ViT-Z")
        with pytest.raises(ValueError, match="resize_mode must be one of"):
            make_embedder("clip", weights=weights["clip"], resize_mode="crop", **OPTIONS["clip"])
        with pytest.raises(ValueError, match="dtype must be one of"):
            make_embedder("clip", weights=weights["clip"], dtype="fp8", **OPTIONS["clip"])
        with pytest.raises(ValueError, match="cannot load .*clip_tiny.safetensors.* into open_clip 'ViT-B-32'"):
            make_embedder(
                "clip", weights=weights["clip"], arch="ViT-B-32", model_cfg={**TINY_CLIP_CFG, "embed_dim": 16}
            )
    if "dinov2" in weights:
        with pytest.raises(ValueError, match="`model` must be a folder name"):
            make_embedder("dinov2", model="a/b")


# ------------------------------------------------------------------------------------------------ weights lookup
def test_missing_weights_name_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("POPALIGN_MODELS_DIR", raising=False)
    pytest.importorskip("open_clip")
    with pytest.raises(BackendUnavailable, match="'open_clip_ViT-H-14.safetensors' not found") as err:
        make_embedder("clip", models_dir=tmp_path)
    assert "ComfyUI/models/popalign/embedders/" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(BackendUnavailable, match="no models_dir given"):
        make_embedder("clip")
    with pytest.raises(BackendUnavailable, match="weight file .*nope.safetensors.* not found"):
        make_embedder("clip", weights=tmp_path / "nope.safetensors")
    pytest.importorskip("transformers")
    with pytest.raises(BackendUnavailable, match="model folder 'dinov2-vitb14'.*config.json") as err:
        make_embedder("dinov2", models_dir=tmp_path)
    assert os.path.join("popalign", "embedders", "dinov2-vitb14") in str(err.value)
    with pytest.raises(BackendUnavailable, match="is not a model folder"):
        make_embedder("dinov2", weights=tmp_path)
    with pytest.raises(BackendUnavailable, match="toy_classifiers.json"):
        make_embedder("toy", weights=tmp_path)


def test_weights_found_in_models_dir(weights, embedders, tmp_path, monkeypatch):
    import shutil

    if "clip" not in weights or "dinov2" not in weights:
        pytest.skip("open_clip and transformers needed")
    # clip: the classifiers folder is searched too (one file for the clip classifier and embedder), via the env var
    (tmp_path / "popalign" / "classifiers").mkdir(parents=True)
    shutil.copy(weights["clip"], tmp_path / "popalign" / "classifiers" / "open_clip_ViT-B-32.safetensors")
    monkeypatch.setenv("POPALIGN_MODELS_DIR", str(tmp_path))
    clip = make_embedder("clip", **OPTIONS["clip"])
    assert clip.weights_path.parent.name == "classifiers" and clip.id == embedders["clip"].id
    shutil.copytree(weights["dinov2"], tmp_path / "popalign" / "embedders" / "dinov2-vitb14")
    dino = make_embedder("dinov2", models_dir=tmp_path)
    x = torch.rand(1, 3, 30, 30)
    torch.testing.assert_close(dino.embed(x), embedders["dinov2"].embed(x))


def test_dinov2_rejects_incomplete_weights(weights, tmp_path):
    if "dinov2" not in weights:
        pytest.skip("transformers needed")
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((weights["dinov2"] / "config.json").read_text())
    sd = load_file(str(weights["dinov2"] / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if "encoder" not in k}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="miss .* tensors"):
        make_embedder("dinov2", weights=folder)


# ------------------------------------------------------------------------------------------------ face bank
def _faces(n, seed, size=32):
    imgs, labels = labelled_renders(4 * n, seed, size=size)
    return imgs[labels["face"] > 0][:n]


@pytest.fixture
def face_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "faces"
    (folder / "sub").mkdir(parents=True)
    faces = _faces(6, seed=3)
    for i, ext in enumerate(["png", "png", "jpg", "jpeg", "webp", "PNG"]):
        Image.fromarray(faces[i]).save(folder / f"f{i}.{ext}", quality=95)
    Image.fromarray(_faces(1, seed=4, size=40)[0]).save(folder / "g_large.png")  # another size: another batch
    Image.fromarray(faces[0]).save(folder / "sub" / "s0.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    return folder


def _read(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_face_bank_rows_cache_hit_and_skipped(face_folder, embedders):
    emb = embedders["toy"]
    with pytest.warns(UserWarning, match="skipped 1 unreadable image.*broken.jpg") as record:
        bank = FaceBank.from_folder(face_folder, emb, batch_size=2)
    assert len(record) == 1  # one warning for all skipped files, nothing else
    names = ["f0.png", "f1.png", "f2.jpg", "f3.jpeg", "f4.webp", "f5.PNG", "g_large.png"]
    assert bank.paths == names and len(bank) == 7 and bank.dim == emb.dim
    assert bank.n_skipped == 1 and bank.skipped[0][0] == "broken.jpg" and not bank.from_cache
    expected = emb.embed_arrays([_read(face_folder / n) for n in names])
    torch.testing.assert_close(bank.embeddings, expected, atol=1e-6, rtol=0)
    assert bank.cache_file.parent == face_folder and bank.cache_file.name.startswith(".popalign_facebank-toy-")
    with pytest.warns(UserWarning, match="skipped 1"):
        again = FaceBank.from_folder(face_folder, emb)
    assert again.from_cache and again.paths == names and again.n_skipped == 1 and again.embedder_id == emb.id
    torch.testing.assert_close(again.embeddings, bank.embeddings, atol=0, rtol=0)
    # recursive: the subfolder's image joins, and it is a different listing -> a rebuild
    with pytest.warns(UserWarning):
        rec = FaceBank.from_folder(face_folder, emb, recursive=True)
    assert not rec.from_cache and rec.paths == names[:6] + ["g_large.png", "sub/s0.png"]


def test_face_bank_cache_invalidation(face_folder, embedders):
    from PIL import Image

    emb = embedders["toy"]
    (face_folder / "broken.jpg").unlink()
    first = FaceBank.from_folder(face_folder, emb)
    assert FaceBank.from_folder(face_folder, emb).from_cache
    # changed content (same name, same size in bytes is not required: mtime_ns and size are both keys)
    st = (face_folder / "f1.png").stat()
    Image.fromarray(_faces(1, seed=9)[0]).save(face_folder / "f1.png")
    os.utime(face_folder / "f1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    changed = FaceBank.from_folder(face_folder, emb)
    assert not changed.from_cache and changed.paths == first.paths
    assert not torch.allclose(changed.embeddings[1], first.embeddings[1])
    torch.testing.assert_close(changed.embeddings[0], first.embeddings[0])
    assert FaceBank.from_folder(face_folder, emb).from_cache
    # an added and a removed file
    Image.fromarray(_faces(1, seed=10)[0]).save(face_folder / "f9.png")
    added = FaceBank.from_folder(face_folder, emb)
    assert not added.from_cache and len(added) == len(first) + 1
    (face_folder / "f0.png").unlink()
    removed = FaceBank.from_folder(face_folder, emb)
    assert not removed.from_cache and "f0.png" not in removed.paths
    # another embedder: its own cache file, both kept
    ev = make_embedder("toy", which="eval")
    other = FaceBank.from_folder(face_folder, ev)
    assert not other.from_cache and other.dim == ev.dim != emb.dim and other.cache_file != removed.cache_file
    assert FaceBank.from_folder(face_folder, emb).from_cache and FaceBank.from_folder(face_folder, ev).from_cache
    # a damaged cache file is rebuilt
    removed.cache_file.write_bytes(b"garbage")
    rebuilt = FaceBank.from_folder(face_folder, emb)
    assert not rebuilt.from_cache and FaceBank.from_folder(face_folder, emb).from_cache


def test_face_bank_cache_dir_and_no_cache(face_folder, embedders, tmp_path):
    emb = embedders["toy"]
    (face_folder / "broken.jpg").unlink()
    cache_dir = tmp_path / "cache"
    bank = FaceBank.from_folder(face_folder, emb, cache_dir=cache_dir)
    assert bank.cache_file.parent == cache_dir and not list(face_folder.glob(".popalign_facebank*"))
    assert FaceBank.from_folder(face_folder, emb, cache_dir=cache_dir).from_cache
    plain = FaceBank.from_folder(face_folder, emb, cache=False)
    assert plain.cache_file is None and not plain.from_cache and not list(face_folder.glob(".popalign_facebank*"))
    torch.testing.assert_close(plain.embeddings, bank.embeddings)


@pytest.mark.parametrize("name", ["clip", "dinov2"])
def test_face_bank_with_model_embedders(face_folder, embedders, name):
    emb = _get(embedders, name)
    (face_folder / "broken.jpg").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bank = FaceBank.from_folder(face_folder, emb)
    assert len(bank) == 7 and bank.dim == emb.dim and bank.cache_file.name.startswith(f".popalign_facebank-{name}-")
    assert FaceBank.from_folder(face_folder, emb).from_cache
    cos, index = bank.nearest(emb.embed(_tensor(_read(face_folder / "f2.jpg"))))
    assert index.tolist() == [2] and abs(float(cos[0]) - 1) < 1e-5


def test_face_bank_errors(tmp_path, embedders):
    emb = embedders["toy"]
    with pytest.raises(FileNotFoundError, match="missing"):
        FaceBank.from_folder(tmp_path / "missing", emb)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"no readable face image .* in '{empty}'"):
        FaceBank.from_folder(empty, emb)
    (empty / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(ValueError, match="1 unreadable skipped"):
        FaceBank.from_folder(empty, emb)
    with pytest.raises(ValueError, match="non-empty \\[M, D\\]"):
        FaceBank.from_tensor(torch.zeros(5))
    with pytest.raises(ValueError, match="zero"):
        FaceBank.from_tensor(torch.zeros(2, 4))
    bank = FaceBank.from_tensor(torch.randn(3, 4))
    with pytest.raises(ValueError, match="expected embeddings \\[B, 4\\]"):
        bank.nearest(torch.randn(2, 5))


# ------------------------------------------------------------------------------------------------ nearest
def test_nearest_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    bank_raw = torch.randn(50, 8, generator=g, dtype=torch.float64)
    emb = torch.randn(4, 8, generator=g, dtype=torch.float64) * 3  # raw, not normalised
    bank = FaceBank.from_tensor(bank_raw.float())
    b, e = bank_raw.numpy(), emb.numpy()
    cos_all = (e @ b.T) / np.linalg.norm(e, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None]
    for chunk in (65536, 7):
        x = emb.float().clone().requires_grad_(True)
        cos, index = bank.nearest(x, chunk=chunk)
        assert index.tolist() == cos_all.argmax(1).tolist()
        np.testing.assert_allclose(cos.detach().numpy(), cos_all.max(1), atol=1e-6)
        cos.sum().backward()
        # d/de cos(e, b) = b_hat / |e| - cos * e / |e|^2
        bh = b[cos_all.argmax(1)] / np.linalg.norm(b[cos_all.argmax(1)], axis=1, keepdims=True)
        n = np.linalg.norm(e, axis=1, keepdims=True)
        grad = bh / n - cos_all.max(1)[:, None] * e / n**2
        np.testing.assert_allclose(x.grad.numpy(), grad, atol=1e-6)


def test_toy_face_bank_and_face_loss_gradient(embedders):
    clf = ToyClassifier()
    bank = FaceBank.from_tensor(clf.face_bank())
    assert bank.dim == embedders["toy"].dim and bank.paths is None
    cos, index = bank.nearest(bank.embeddings[:5])
    torch.testing.assert_close(cos, torch.ones(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(bank.embeddings[index], bank.embeddings[:5], atol=1e-5, rtol=0)
    x = _tensor(_faces(2, seed=5)[0]).repeat(2, 1, 1, 1).requires_grad_(True)
    cos, _ = bank.nearest(embedders["toy"].embed(x))
    (1 - cos).mean().backward()  # the face-realism loss, patent [0108]
    assert float(cos.detach().min()) > 0.5 and x.grad.abs().sum() > 0


def test_clip_missing_weights_message_in_full(tmp_path, monkeypatch):
    from popalign_core.dal.embedders import ClipEmbedder

    monkeypatch.delenv("POPALIGN_MODELS_DIR", raising=False)
    with pytest.raises(BackendUnavailable) as err:
        ClipEmbedder._find("ViT-H-14", None, tmp_path)
    folders = f"{tmp_path / 'popalign' / 'embedders'}, {tmp_path / 'popalign' / 'classifiers'}"
    assert str(err.value) == (
        "clip embedder: weight file 'open_clip_ViT-H-14.safetensors' not found (also accepted: open_clip_ViT-H-14.pt, "
        "open_clip_ViT-H-14.bin). Put it in ComfyUI/models/popalign/embedders/ (standalone: "
        "<models_dir>/popalign/embedders/ with models_dir= or $POPALIGN_MODELS_DIR; "
        "<models_dir>/popalign/classifiers/ is searched too), or pass weights=PATH. For ViT-H-14 that is "
        f"open_clip_model.safetensors of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, renamed. Searched: {folders}."
    )
    with pytest.raises(BackendUnavailable) as err:
        ClipEmbedder._find("ViT-H-14", tmp_path / "nope.pt", None)
    assert str(err.value) == (
        f"clip embedder: weight file {str(tmp_path / 'nope.pt')!r} not found. Pass an existing open_clip state-dict "
        "file, or put 'open_clip_ViT-H-14.safetensors' in ComfyUI/models/popalign/embedders/ (standalone: "
        "<models_dir>/popalign/embedders/)."
    )


def test_old_names_stay_importable_from_embedders():
    from popalign_core import dal
    from popalign_core.dal import embedders, embedding, facebank

    assert embedders.FaceBank is facebank.FaceBank is dal.FaceBank
    assert embedders.IMAGE_EXTENSIONS is facebank.IMAGE_EXTENSIONS and embedders.BANK_FORMAT is facebank.BANK_FORMAT
    for name in ("Embedder", "Preprocess", "file_sha256", "DTYPES", "EMBEDDER_SUBDIR", "RESIZE_MODES"):
        assert getattr(embedders, name) is getattr(embedding, name)
    assert all(hasattr(embedders, name) for name in embedders.__all__)
