"""DeepFace backends (`popalign_core.classify.deepface_backend`) against the real deepface package.

No real weights exist here: the weight files are made from deepface's own model classes (seeded random init, heads
given known biases), saved under deepface's exact file names in a temporary DEEPFACE_HOME, and our outputs are
compared with deepface's own clients and preprocessing run on them. Every network access is blocked.
"""

from __future__ import annotations

import socket
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepface")
pytest.importorskip("cv2")

from popalign_core.classify import deepface_backend as dfb  # noqa: E402
from popalign_core.classify.base import BackendUnavailable, Classification, Face  # noqa: E402
from popalign_core.common import attributes  # noqa: E402

# deepface label -> our class name, written out here (not taken from the module under test)
GENDER_MAP = {"Woman": "female", "Man": "male"}
RACE_MAP = {
    "asian": "asian",
    "indian": "indian",
    "black": "black",
    "white": "white",
    "middle eastern": "middle_eastern",
    "latino hispanic": "latino_hispanic",
}
# head biases of the generated weights, in deepface's label order: Woman wins; races distinct, "latino hispanic"
# highest; ages peaked at 35
GENDER_BIAS = [3.0, 0.0]
RACE_BIAS = [0.0, 0.6, 1.2, 1.8, 2.4, 3.0]
AGE_BIAS = [-0.02 * (k - 35) ** 2 for k in range(101)]
ASTRONAUT_FACE = (178, 66, 272, 170)  # as in tests/classify/test_detectors.py


def iou(a, b) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt (gdown, requests, a raw socket) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    import gdown
    import requests

    monkeypatch.setattr(gdown, "download", refuse)
    monkeypatch.setattr(requests, "head", refuse)
    monkeypatch.setattr(requests, "get", refuse)


@pytest.fixture(scope="module")
def deepface_models():
    """deepface's pytorch demography modules. In 0.0.103 they import werkzeug (via deepface.modules.verification
    -> commons.image_utils) although only the API extra installs it: a stub stands in while this module runs."""
    with pytest.MonkeyPatch.context() as mp:
        try:
            import werkzeug.datastructures  # noqa: F401
        except ImportError:
            stub, ds = types.ModuleType("werkzeug"), types.ModuleType("werkzeug.datastructures")
            ds.FileStorage = type("FileStorage", (), {})
            stub.datastructures = ds
            mp.setitem(sys.modules, "werkzeug", stub)
            mp.setitem(sys.modules, "werkzeug.datastructures", ds)
        from deepface.models.demography import DemographyUtils
        from deepface.models.demography.pytorch import Age, Gender, Race

        yield {"gender": Gender, "race": Race, "age": Age, "utils": DemographyUtils}


@pytest.fixture(scope="module")
def deepface_home(tmp_path_factory, deepface_models):
    """A DEEPFACE_HOME whose .deepface/weights/ holds the three files, built with deepface's own classes."""
    home = tmp_path_factory.mktemp("deepface_home")
    folder = home / ".deepface" / "weights"
    folder.mkdir(parents=True)
    for seed, (axis, bias) in enumerate((("gender", GENDER_BIAS), ("race", RACE_BIAS), ("age", AGE_BIAS))):
        torch.manual_seed(seed)
        model = deepface_models[axis].base_model()
        with torch.no_grad():
            model.predictions.weight.mul_(30.0)  # outputs that depend visibly on the input
            model.predictions.bias.copy_(torch.tensor(bias))
        torch.save(model.state_dict(), folder / dfb.DEEPFACE_FILES[axis])
        del model
    return home


@pytest.fixture(scope="module")
def clf(deepface_home):
    return dfb.DeepFaceClassifier(weights=deepface_home, batch_size=2)  # a DEEPFACE_HOME-like folder


@pytest.fixture(scope="module")
def photo():
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the astronaut test photo")
    return data.astronaut()


# ------------------------------------------------------------------------------------------------ classifier
def test_axes_and_files(clf, deepface_home):
    assert clf.axes == {"gender": attributes.GENDER, "race": attributes.RACE_PAPER6, "age": attributes.AGE_FAIRFACE9}
    assert clf.differentiable and clf.name == "deepface"
    assert {a: p.name for a, p in clf.weights_paths.items()} == {
        "gender": "gender_model_weights.pth",
        "race": "race_model_single_batch.pth",
        "age": "age_model_weights.pth",
    }
    assert all(p.parent == deepface_home / ".deepface" / "weights" for p in clf.weights_paths.values())


def test_matches_deepface_own_pipeline(clf, deepface_home, deepface_models, photo, monkeypatch):
    """Our probabilities = deepface's own clients' predictions on deepface's own preprocessing, reordered by the
    written-out label maps; age = the 101-way softmax summed into bins; apparent age = deepface's."""
    from deepface.modules.preprocessing import resize_image

    monkeypatch.setenv("DEEPFACE_HOME", str(deepface_home))  # deepface's clients find the files there, no download
    crop = photo[20:260, 140:350]  # 240 x 210: letterboxed with padding on both sides
    (ours,) = clf.classify([crop])
    assert ours.face_found and ours.box == (0, 0, 210, 240) and ours.error is None
    bgr = resize_image(img=(crop / 255.0).astype(np.float32)[:, :, ::-1], target_size=(224, 224))  # [1, 224, 224, 3]
    labels = deepface_models["utils"]
    for axis, client_cls, names, mapping in (
        ("gender", deepface_models["gender"].GenderClient, labels.GENDER_LABELS, GENDER_MAP),
        ("race", deepface_models["race"].RaceClient, labels.RACE_LABELS, RACE_MAP),
    ):
        client = client_cls()
        ref = client.predict(bgr[0])
        expected = np.array([ref[names.index(next(k for k, v in mapping.items() if v == c))] for c in clf.axes[axis]])
        np.testing.assert_allclose(ours.probs[axis], expected / expected.sum(), atol=2e-4)
        del client
    age_client = deepface_models["age"].ApparentAgeClient()
    p101 = age_client._predict_internal(bgr)  # the 101-way softmax
    bins = [(0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 100)]
    np.testing.assert_allclose(ours.probs["age"], [p101[lo : hi + 1].sum() for lo, hi in bins], atol=2e-4)
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        assert float(clf.apparent_age(x)[0]) == pytest.approx(float(age_client.predict(bgr[0])), abs=0.05)


def test_classify_contract_and_known_outputs(clf, photo):
    """The biases make Woman, "latino hispanic" and age 35 win: the mapped names must win in our order. Invalid
    images are counted as errors, not raised; a face-less image gives face_found=False."""
    rng = np.random.default_rng(0)
    grey = (rng.random((40, 70)) * 255).astype(np.uint8)
    results = clf.classify([photo[:260, 140:360], np.zeros((8, 8, 3), np.float32), grey])
    assert [type(r) for r in results] == [Classification] * 3
    assert results[1].face_found is False and "uint8" in results[1].error
    for r in (results[0], results[2]):
        assert r.face_found and r.error is None
        for axis, classes in clf.axes.items():
            assert r.probs[axis].shape == (len(classes),) and r.probs[axis].dtype == np.float64
            assert r.probs[axis].sum() == pytest.approx(1.0, abs=1e-6) and (r.probs[axis] >= 0).all()
        assert clf.axes["gender"][int(np.argmax(r.probs["gender"]))] == "female"
        assert clf.axes["race"][int(np.argmax(r.probs["race"]))] == "latino_hispanic"
        assert clf.axes["age"][int(np.argmax(r.probs["age"]))] == "30-39"

    class NoFace:
        name = "no_face"

        def detect(self, image):
            return None

    clf_detector = clf.detector
    try:
        clf.detector = NoFace()
        assert clf.classify([photo]) == [Classification(face_found=False)]
    finally:
        clf.detector = clf_detector


@pytest.fixture(scope="module")
def gender_clf(deepface_home):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPFACE_HOME", str(deepface_home))
        mp.delenv("POPALIGN_MODELS_DIR", raising=False)
        return dfb.DeepFaceClassifier(attributes=("gender",))  # found through $DEEPFACE_HOME


def test_deepface_home_and_gradients(gender_clf, deepface_home):
    assert gender_clf.weights_paths["gender"] == deepface_home / ".deepface" / "weights" / "gender_model_weights.pth"
    assert list(gender_clf.axes) == ["gender"]
    x = torch.rand(1, 3, 150, 120, requires_grad=True)
    logits = gender_clf.logits(x)["gender"]
    assert logits.shape == (1, 2)
    (logits[0, 0] - logits[0, 1]).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in gender_clf.models["gender"].parameters())


def test_age_bins_cover_every_age_once():
    for variant, (classes, ranges) in dfb.AGE_BINS.items():
        assert classes == attributes.AXES["age"][variant]
        ages = [k for lo, hi in ranges for k in range(lo, hi + 1)]
        assert ages == list(range(101)), variant


def test_missing_weights_names_files_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    monkeypatch.delenv("POPALIGN_MODELS_DIR", raising=False)
    with pytest.raises(BackendUnavailable) as err:
        dfb.DeepFaceClassifier()
    msg = str(err.value)
    for name in ("gender_model_weights.pth", "race_model_single_batch.pth", "age_model_weights.pth"):
        assert name in msg
    assert str(tmp_path / ".deepface" / "weights") in msg and "allow_download=True" in msg
    with pytest.raises(BackendUnavailable, match="age_model_weights.pth") as err:
        dfb.DeepFaceClassifier(attributes=("age",), weights=tmp_path / "elsewhere")
    assert "gender_model" not in str(err.value) and "elsewhere" in str(err.value)


def test_allow_download_uses_deepface_downloader_only_when_asked(tmp_path, monkeypatch):
    from deepface.commons import weight_utils

    calls = []

    def fake_download(file_name, source_url, compress_type=None):
        calls.append((file_name, list(source_url)))
        raise RuntimeError("stop here")

    monkeypatch.setattr(weight_utils, "download_weights_if_necessary", fake_download)
    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    with pytest.raises(BackendUnavailable):
        dfb.DeepFaceClassifier(attributes=("race",))
    assert calls == []
    with pytest.raises(RuntimeError, match="stop here"):
        dfb.DeepFaceClassifier(attributes=("race",), allow_download=True)
    assert calls[0][0] == "race_model_single_batch.pth" and calls[0][1][0].endswith("/race_model_single_batch.pth")
    assert (tmp_path / ".deepface" / "weights").is_dir()


def test_models_dir_dict_and_bad_files(tmp_path, deepface_home, monkeypatch):
    src = deepface_home / ".deepface" / "weights" / "gender_model_weights.pth"
    folder = tmp_path / "popalign" / "classifiers"
    folder.mkdir(parents=True)
    (folder / "gender_model_weights.pth").symlink_to(src)
    files = {"gender": ("gender_model_weights.pth",)}
    found = dfb.find_deepface_files("deepface", files, None, tmp_path)
    assert found == {"gender": folder / "gender_model_weights.pth"}
    assert dfb.find_deepface_files("deepface", files, {"gender": src}, None) == {"gender": src}
    assert dfb.find_deepface_files("deepface", files, src, None) == {"gender": src}
    torch.save({"x": torch.zeros(2)}, tmp_path / "age_model_weights.pth")
    with pytest.raises(ValueError, match="not deepface's pytorch age model"):
        dfb.DeepFaceClassifier(weights=tmp_path, attributes=("age",))
    with pytest.raises(ValueError, match="attributes"):
        dfb.DeepFaceClassifier(weights=tmp_path, attributes=("emotion",))
    with pytest.raises(ValueError, match="age_bins"):
        dfb.DeepFaceClassifier(weights=tmp_path, attributes=("age",), age_bins="decades")


def test_missing_torch_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(BackendUnavailable, match="pip install torch"):
        dfb.DeepFaceClassifier()


def test_registry_if_registered():
    from popalign_core.classify.classifiers import CLASSIFIERS

    if "deepface" not in CLASSIFIERS:
        pytest.skip("deepface not registered in CLASSIFIERS")
    assert CLASSIFIERS["deepface"] is dfb.DeepFaceClassifier


# ------------------------------------------------------------------------------------------------ detectors
def test_opencv_detector_on_astronaut(photo):
    det = dfb.DeepFaceOpenCVDetector()
    assert det.name == "deepface_opencv"
    face = det.detect(photo)
    assert isinstance(face, Face) and iou(face.box, ASTRONAUT_FACE) > 0.5, face
    x0, y0, x1, y1 = face.box
    assert np.array_equal(face.crop, photo[y0:y1, x0:x1]) and face.score > 0
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert det.detect(noise) is None and det.detect(np.full((256, 256, 3), 200, np.uint8)) is None
    with pytest.raises(ValueError, match="uint8"):
        det.detect(photo.astype(np.float32))


def test_classifier_with_deepface_detector(clf, photo):
    old = clf.detector
    try:
        clf.detector = dfb.DeepFaceOpenCVDetector()
        (r,) = clf.classify([photo])
    finally:
        clf.detector = old
    assert r.face_found and iou(r.box, ASTRONAUT_FACE) > 0.5


def test_yunet_missing_weights_and_box_mapping(tmp_path, monkeypatch):
    import cv2

    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    monkeypatch.delenv("POPALIGN_MODELS_DIR", raising=False)
    with pytest.raises(BackendUnavailable) as err:
        dfb.DeepFaceYuNetDetector()
    assert "face_detection_yunet_2023mar.onnx" in str(err.value)
    assert str(tmp_path / ".deepface" / "weights") in str(err.value)

    class FakeYuNet:  # rows: x, y, w, h, 5 landmarks (10 values), score (cv2.FaceDetectorYN.detect)
        def setInputSize(self, size):
            self.size = size

        def setScoreThreshold(self, t):
            pass

        def detect(self, img):
            rows = [[10, 20, 30, 40, *range(10), 0.95], [50, 5, 60, 70, *range(10), 0.91]]
            return 1, np.array(rows, np.float32)

    seen = []
    monkeypatch.setattr(cv2, "FaceDetectorYN_create", lambda path, *a: seen.append(path) or FakeYuNet())
    (tmp_path / "face_detection_yunet_2023mar.onnx").write_bytes(b"")
    det = dfb.DeepFaceYuNetDetector(weights=tmp_path / "face_detection_yunet_2023mar.onnx")
    image = np.zeros((100, 100, 3), np.uint8)
    face = det.detect(image)
    assert seen and face is not None and face.box == (50, 5, 100, 75) and face.score == pytest.approx(0.91)
    assert dfb.DeepFaceYuNetDetector(weights=tmp_path, min_score=0.93).detect(image).box == (10, 20, 40, 60)


def test_retinaface_from_generated_weights(tmp_path, monkeypatch, photo):
    from retinaface.commons import backend_utils

    if backend_utils.get_backend_engine() != "pytorch":
        pytest.skip("retina-face is not on its pytorch engine")
    from retinaface.model import retinaface_pth_model

    monkeypatch.setenv("DEEPFACE_HOME", str(tmp_path))
    monkeypatch.delenv("POPALIGN_MODELS_DIR", raising=False)
    with pytest.raises(BackendUnavailable, match="retinaface.pth"):
        dfb.DeepFaceRetinaFaceDetector()
    torch.manual_seed(0)
    folder = tmp_path / ".deepface" / "weights"
    folder.mkdir(parents=True)
    torch.save(retinaface_pth_model.RetinaFace().state_dict(), folder / "retinaface.pth")
    det = dfb.DeepFaceRetinaFaceDetector()
    face = det.detect(photo[::2, ::2])  # random weights: any answer, but a valid one
    assert face is None or (
        isinstance(face, Face) and face.crop.shape[:2] == (face.box[3] - face.box[1], face.box[2] - face.box[0])
    )


@pytest.mark.parametrize(
    "cls", [dfb.DeepFaceOpenCVDetector, dfb.DeepFaceYuNetDetector, dfb.DeepFaceRetinaFaceDetector]
)
def test_detector_missing_package_says_what_to_install(cls, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepface", None)
    with pytest.raises(BackendUnavailable) as err:
        cls()
    msg = str(err.value)
    assert dfb.DEEPFACE_INSTALL in msg and "'deepface'" in msg and cls.name in msg
    assert cls.__doc__ and "Score" in cls.__doc__
