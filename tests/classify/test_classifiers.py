"""Attribute classifiers (`popalign_core.classify.classifiers`): every backend of `CLASSIFIERS`, loaded through the
real weight-file code path from seeded random weights built with the backends' own model classes (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from popalign_core.classify.base import BackendUnavailable, Classification, Face  # noqa: E402
from popalign_core.classify.classifiers import (  # noqa: E402
    CLASSIFIERS,
    FAIRFACE_FILES,
    FullImage,
    make_classifier,
)
from popalign_core.common import attributes  # noqa: E402

# a tiny open_clip model: ViT-B-32's code path with a 1-layer, 32-wide tower each (1.6M params, mostly the vocab)
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
EXPECTED_AXES = {
    "fairface": {"race": attributes.RACE_FAIRFACE7, "gender": attributes.GENDER, "age": attributes.AGE_FAIRFACE9},
    "clip": {"gender": attributes.GENDER, "race": attributes.RACE_FAIRFACE7, "age": attributes.AGE_FAIRFACE9},
}


def _save(sd: dict, folder, stem: str) -> dict[str, str]:
    from safetensors.torch import save_file

    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    pt, st = folder / f"{stem}.pt", folder / f"{stem}.safetensors"
    torch.save(sd, pt)
    save_file(sd, str(st))
    return {"pt": str(pt), "safetensors": str(st)}


def fairface_state_dict(seed: int = 0, fc_bias: dict[int, float] | None = None) -> dict:
    """torchvision resnet34 + fc -> 18, seeded; fc weights scaled down so the heads are not saturated, and
    optionally a bias that makes given output indices win."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet34(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, 18)
    with torch.no_grad():
        model.fc.weight.mul_(0.01)
        for i, b in (fc_bias or {}).items():
            model.fc.bias[i] = b
    return model.state_dict()


def clip_state_dict(seed: int = 0) -> dict:
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP_CFG).state_dict()


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """{backend: {"pt": path, "safetensors": path}} of seeded random weights."""
    folder = tmp_path_factory.mktemp("classifier_weights")
    files = {"fairface": _save(fairface_state_dict(), folder, "fairface_random")}
    if _has("open_clip"):
        files["clip"] = _save(clip_state_dict(), folder, "clip_tiny")
    return files


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _options(name: str) -> dict:
    return {"model_cfg": TINY_CLIP_CFG} if name == "clip" else {}


def _require(name: str) -> None:
    if name == "clip":
        pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def classifiers(weight_files):
    return {
        name: make_classifier(name, weights=files["safetensors"], **_options(name))
        for name, files in weight_files.items()
    }


def _get(classifiers, name):
    _require(name)
    return classifiers[name]


@pytest.fixture(scope="module")
def images():
    """A real face photo (scikit-image's astronaut, when installed), a synthetic RGB image and a grey image."""
    rng = np.random.default_rng(0)
    try:
        from skimage import data

        photo = data.astronaut()[:260, 140:360]  # the face region of the 512 x 512 photo
    except ImportError:
        photo = (rng.random((120, 100, 3)) * 255).astype(np.uint8)
    synthetic = np.zeros((64, 48, 3), np.uint8)
    synthetic[16:48, 12:36] = (200, 150, 120)
    grey = (rng.random((50, 50)) * 255).astype(np.uint8)
    return [photo, synthetic, grey]


class NoFace:
    """A detector that never finds a face."""

    name = "no_face"

    def detect(self, image):
        return None


class CentreBox:
    """A detector returning the central half of the image as the face."""

    name = "centre_box"

    def detect(self, image):
        h, w = image.shape[:2]
        box = (w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2)
        return Face(box=box, score=0.9, crop=image[box[1] : box[3], box[0] : box[2]])


# backends tested here from generated state-dict files; the others have their own test modules
BACKENDS = ["clip", "fairface"]
OWN_TEST_MODULE = {
    "deepface": "tests/classify/test_deepface_backend.py",
    "age_gender": "tests/classify/test_age_gender_backend.py",
    "toy": "tests/toyworld/test_toyworld_build.py",
}


# ------------------------------------------------------------------------------------------------ registry
def test_registry_and_unknown_name():
    from pathlib import Path

    assert set(CLASSIFIERS) == set(BACKENDS) | set(OWN_TEST_MODULE)
    root = Path(__file__).resolve().parents[2]
    assert all((root / f).is_file() for f in OWN_TEST_MODULE.values())
    with pytest.raises(ValueError, match="valid: \\['age_gender', 'clip', 'deepface', 'fairface', 'toy'\\]"):
        make_classifier("nope")


def test_full_image_detector():
    image = np.zeros((30, 20, 3), np.uint8)
    face = FullImage().detect(image)
    assert face.box == (0, 0, 20, 30) and face.crop is image


# ------------------------------------------------------------------------------------------------ every backend
@pytest.mark.parametrize("name", BACKENDS)
def test_output_structure(name, classifiers, images):
    clf = _get(classifiers, name)
    assert clf.name == name and clf.differentiable
    assert clf.axes == EXPECTED_AXES[name]
    assert isinstance(clf.detector, FullImage)
    results = clf.classify(images)
    assert len(results) == len(images)
    for image, r in zip(images, results):
        assert isinstance(r, Classification) and r.face_found and r.error is None
        assert r.box == (0, 0, image.shape[1], image.shape[0])
        assert set(r.probs) == set(clf.axes)
        for axis, p in r.probs.items():
            assert p.shape == (len(clf.axes[axis]),)
            assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-6


@pytest.mark.parametrize("name", BACKENDS)
def test_deterministic_and_formats_identical(name, classifiers, weight_files, images):
    clf = _get(classifiers, name)
    first, second = clf.classify(images), clf.classify(images)
    other = make_classifier(name, weights=weight_files[name]["pt"], **_options(name)).classify(images)
    for a, b, c in zip(first, second, other):
        for axis in a.probs:
            np.testing.assert_array_equal(a.probs[axis], b.probs[axis])
            np.testing.assert_array_equal(a.probs[axis], c.probs[axis])  # .pt and .safetensors: same tensors


@pytest.mark.parametrize("name", BACKENDS)
def test_classify_matches_differentiable_probs(name, classifiers, images):
    clf = _get(classifiers, name)
    image = images[0]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        probs = clf.probs(x)
    result = clf.classify([image])[0]
    for axis in clf.axes:
        np.testing.assert_allclose(result.probs[axis], probs[axis][0].numpy(), atol=1e-5)


@pytest.mark.parametrize("name", BACKENDS)
def test_no_face_and_detector_box(name, weight_files, images):
    _require(name)
    clf = make_classifier(name, weights=weight_files[name]["pt"], detector=NoFace(), **_options(name))
    assert all(r == Classification(face_found=False) for r in clf.classify(images))
    clf.detector = CentreBox()
    r = clf.classify([images[1]])[0]
    assert r.face_found and r.box == (12, 16, 36, 48)


@pytest.mark.parametrize("name", BACKENDS)
def test_invalid_images_give_errors_not_exceptions(name, classifiers, images):
    clf = _get(classifiers, name)
    bad = [np.zeros((8, 8, 3), np.float32), np.zeros((5,), np.uint8), None, np.zeros((8, 8, 2), np.uint8)]
    results = clf.classify([images[1], *bad])
    assert results[0].face_found and results[0].error is None
    for r in results[1:]:
        assert not r.face_found and r.error and not r.probs
    assert "uint8" in results[1].error and "shape" in results[2].error


@pytest.mark.parametrize("name", BACKENDS)
def test_logits_differentiable(name, classifiers):
    clf = _get(classifiers, name)
    x = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(0)).requires_grad_()
    logits = clf.logits(x)
    assert {a: t.shape for a, t in logits.items()} == {a: (2, len(c)) for a, c in clf.axes.items()}
    logits["gender"][:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in clf.model.parameters())  # frozen model, gradients only to the pixels


@pytest.mark.parametrize("name", BACKENDS)
def test_missing_weights_message(name, tmp_path, monkeypatch):
    _require(name)
    monkeypatch.delenv("POPALIGN_MODELS_DIR", raising=False)
    with pytest.raises(BackendUnavailable, match="POPALIGN_MODELS_DIR unset"):
        make_classifier(name, **_options(name))
    with pytest.raises(BackendUnavailable) as e:
        make_classifier(name, models_dir=tmp_path, **_options(name))
    msg = str(e.value)
    expected_file = FAIRFACE_FILES["fairface7"][0] if name == "fairface" else "open_clip_ViT-B-32.safetensors"
    assert expected_file in msg and "ComfyUI/models/popalign/classifiers/" in msg and str(tmp_path) in msg
    with pytest.raises(BackendUnavailable, match="missing.pt"):
        make_classifier(name, weights=tmp_path / "missing.pt", **_options(name))


@pytest.mark.parametrize("name", BACKENDS)
def test_weights_found_in_models_dir(name, weight_files, tmp_path, monkeypatch, images):
    _require(name)
    folder = tmp_path / "popalign" / "classifiers"
    folder.mkdir(parents=True)
    file_name = FAIRFACE_FILES["fairface7"][1] if name == "fairface" else "open_clip_ViT-B-32.safetensors"
    (folder / file_name).write_bytes(open(weight_files[name]["safetensors"], "rb").read())
    monkeypatch.setenv("POPALIGN_MODELS_DIR", str(tmp_path))
    clf = make_classifier(name, **_options(name))
    assert clf.weights_path == folder / file_name
    assert clf.classify(images[:1])[0].face_found


@pytest.mark.parametrize("name", BACKENDS)
def test_unreadable_weight_file(name, tmp_path):
    _require(name)
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="garbage.pt"):
        make_classifier(name, weights=bad, **_options(name))


# ------------------------------------------------------------------------------------------------ FairFace
def test_fairface_output_index_mapping(tmp_path, images):
    """Public layout: race [0:7], gender [7:9] = (Male, Female), age [9:18]. A head that prefers the public code's
    Female index (8), East Asian (3) and 70+ (17) must read as our "female", "east_asian", "70+"."""
    files = _save(fairface_state_dict(seed=1, fc_bias={8: 20.0, 3: 20.0, 17: 20.0}), tmp_path, "biased")
    clf = make_classifier("fairface", weights=files["pt"])
    r = clf.classify(images)
    for res in r:
        assert attributes.GENDER[int(np.argmax(res.probs["gender"]))] == "female"
        assert attributes.RACE_FAIRFACE7[int(np.argmax(res.probs["race"]))] == "east_asian"
        assert attributes.AGE_FAIRFACE9[int(np.argmax(res.probs["age"]))] == "70+"
    files = _save(fairface_state_dict(seed=1, fc_bias={7: 20.0}), tmp_path, "male")
    r = make_classifier("fairface", weights=files["safetensors"]).classify(images[:1])[0]
    assert attributes.GENDER[int(np.argmax(r.probs["gender"]))] == "male"


def test_fairface_group4_model(tmp_path, images):
    files = _save(fairface_state_dict(seed=2, fc_bias={2: 20.0}), tmp_path, "res34_fair_align_multi_4_20190809")
    clf = make_classifier("fairface", weights=files["pt"])  # race set guessed from the file name
    assert clf.axes["race"] == attributes.RACE_GROUP4
    r = clf.classify(images[:1])[0]
    assert r.probs["race"].shape == (4,) and attributes.RACE_GROUP4[int(np.argmax(r.probs["race"]))] == "asian"


def test_fairface_wrong_state_dict(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(ValueError, match="resnet18.pt.*not a FairFace ResNet-34"):
        make_classifier("fairface", weights=tmp_path / "resnet18.pt")


# ------------------------------------------------------------------------------------------------ CLIP
def test_clip_probs_are_scaled_cosine_softmax(classifiers):
    clf = _get(classifiers, "clip")
    import open_clip

    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tok = open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        img = torch.nn.functional.normalize(clf.model.encode_image(clf.preprocess(x)), dim=-1)
        rows = []
        for c in attributes.GENDER:
            t = torch.nn.functional.normalize(clf.model.encode_text(tok(clf.prompts["gender"][c])), dim=-1)
            rows.append(torch.nn.functional.normalize(t.mean(0), dim=0))
        expected = (clf.model.logit_scale.exp() * img @ torch.stack(rows).T).softmax(-1)
        torch.testing.assert_close(clf.probs(x)["gender"], expected, atol=1e-5, rtol=1e-5)
    assert clf.prompts["gender"]["female"][0] == "a photo of a female person."


def test_clip_axes_and_prompts_options(weight_files, images):
    pytest.importorskip("open_clip")
    path = weight_files["clip"]["pt"]
    clf = make_classifier(
        "clip",
        weights=path,
        model_cfg=TINY_CLIP_CFG,
        axes={"race": "paper6", "age": "binary"},
        prompts={"age": {"young": ["a photo of a young adult"]}},
    )
    assert clf.axes == {"race": attributes.RACE_PAPER6, "age": attributes.AGE_BINARY}
    assert clf.prompts["age"]["young"] == ["a photo of a young adult"]
    r = clf.classify(images[:1])[0]
    assert r.probs["race"].shape == (6,) and r.probs["age"].shape == (2,)
    with pytest.raises(ValueError, match="unknown gender classes"):
        make_classifier("clip", weights=path, model_cfg=TINY_CLIP_CFG, prompts={"gender": {"other": ["x"]}})
    with pytest.raises(ValueError, match="unknown axis/class set"):
        make_classifier("clip", weights=path, model_cfg=TINY_CLIP_CFG, axes={"race": "nope"})


def test_clip_wrong_architecture(weight_files):
    pytest.importorskip("open_clip")
    with pytest.raises(ValueError, match="cannot load .*clip_tiny.pt.* into open_clip 'ViT-B-32'"):
        make_classifier("clip", weights=weight_files["clip"]["pt"], model_cfg={**TINY_CLIP_CFG, "embed_dim": 16})


def test_find_weights_searches_subfolders_in_order(tmp_path, monkeypatch):
    from popalign_core.classify.base import find_weights, models_dir_candidates

    monkeypatch.delenv("POPALIGN_MODELS_DIR", raising=False)
    assert models_dir_candidates() == []
    first, second = tmp_path / "a", tmp_path / "b"
    second.mkdir()
    (second / "w.bin").write_bytes(b"")
    assert find_weights("x", ("w.pt", "w.bin"), None, tmp_path, subdirs=("a", "b")) == second / "w.bin"
    first.mkdir()
    (first / "w.bin").write_bytes(b"")
    assert find_weights("x", ("w.pt", "w.bin"), None, tmp_path, subdirs=("a", "b")) == first / "w.bin"
    with pytest.raises(BackendUnavailable) as e:
        find_weights("x", ("w.safetensors",), None, tmp_path, subdirs=("a", "b"), hint="HINT/", note="From Y. ")
    assert str(e.value) == (
        "x: weight file 'w.safetensors' not found (also accepted: -). Put it in HINT/ (standalone: <models_dir>/a/ "
        "with models_dir= or $POPALIGN_MODELS_DIR; <models_dir>/b/ is searched too), or pass weights=PATH. From Y. "
        f"Searched: {first}, {second}."
    )
