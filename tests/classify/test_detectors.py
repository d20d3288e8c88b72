"""Face-detector backends (`popalign_core.classify.detectors`): each installed backend on a real photo.

Backends whose package is not installed are skipped (they are optional extras); the registry / error-message tests
need none of them.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from popalign_core.classify import detectors
from popalign_core.classify.base import BackendUnavailable, Face, FaceDetector, pick_face

# backend name -> the module it imports (for importorskip)
MODULES = {
    "opencv_haar": "cv2",
    "mtcnn": "facenet_pytorch",
    "mediapipe": "mediapipe",
    "deepface_opencv": "deepface",
    "deepface_yunet": "deepface",
    "deepface_retinaface": "deepface",
}

# The astronaut's (Eileen Collins) face in skimage.data.astronaut() (512 x 512), (x0, y0, x1, y1): determined by eye
# and from the three backends' boxes (haar (177, 66, 272, 161), mtcnn (181, 62, 268, 172), mediapipe
# (178, 83, 273, 178)); every backend must overlap it with IoU > 0.5.
ASTRONAUT_FACE = (178, 66, 272, 170)


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    data = pytest.importorskip("skimage.data", reason="scikit-image provides the astronaut test photo")
    return data.astronaut()


@pytest.fixture(scope="module", params=sorted(detectors.DETECTORS))
def detector(request) -> FaceDetector:
    """One instance per installed backend (built once: MTCNN takes a few seconds to load)."""
    pytest.importorskip(MODULES[request.param], reason=f"optional backend; {detectors.INSTALL[request.param]}")
    try:
        return detectors.make_detector(request.param)
    except BackendUnavailable as err:
        pytest.skip(str(err))


def two_faces(astronaut: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A grey canvas with the astronaut's head at 3/4 size on the left and full size on the right (3/4 is the
    smallest at which every backend, MediaPipe short-range included, finds both faces); returns the image and the
    region of the large paste."""
    from PIL import Image

    head = astronaut[20:230, 130:320]  # 210 x 190, face with some context
    small = np.asarray(Image.fromarray(head).resize((head.shape[1] * 3 // 4, head.shape[0] * 3 // 4)))
    canvas = np.full((300, 560, 3), 128, np.uint8)
    canvas[40 : 40 + small.shape[0], 30 : 30 + small.shape[1]] = small
    y, x = 40, 300
    canvas[y : y + head.shape[0], x : x + head.shape[1]] = head
    return canvas, (x, y, x + head.shape[1], y + head.shape[0])


def test_detects_astronaut_face(detector: FaceDetector, astronaut: np.ndarray) -> None:
    face = detector.detect(astronaut)
    assert isinstance(face, Face), f"{detector.name} found no face on the astronaut photo"
    assert iou(face.box, ASTRONAUT_FACE) > 0.5, (detector.name, face.box)
    x0, y0, x1, y1 = face.box
    assert all(isinstance(v, int) for v in face.box)
    assert face.crop.shape == (y1 - y0, x1 - x0, 3) and face.crop.dtype == np.uint8
    assert np.array_equal(face.crop, astronaut[y0:y1, x0:x1])
    assert face.score > 0


def test_no_face_on_blank_or_noise(detector: FaceDetector) -> None:
    rng = np.random.default_rng(0)
    assert detector.detect(np.full((256, 256, 3), 200, np.uint8)) is None
    assert detector.detect(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) is None


def test_largest_face_is_chosen(detector: FaceDetector, astronaut: np.ndarray) -> None:
    image, (px0, py0, px1, py1) = two_faces(astronaut)
    face = detector.detect(image)
    assert face is not None, detector.name
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    assert px0 <= cx <= px1 and py0 <= cy <= py1, (detector.name, face.box)
    # the large paste's face is the astronaut's face shifted into the canvas
    expected = (
        ASTRONAUT_FACE[0] - 130 + px0,
        ASTRONAUT_FACE[1] - 20 + py0,
        ASTRONAUT_FACE[2] - 130 + px0,
        ASTRONAUT_FACE[3] - 20 + py0,
    )
    assert iou(face.box, expected) > 0.5, (detector.name, face.box, expected)


def test_pick_chooses_largest_clipped_box() -> None:
    """Backend-independent: candidates are clipped to the image, then the largest area wins whatever its score."""
    image = np.arange(100 * 120 * 3, dtype=np.uint8).reshape(100, 120, 3)
    candidates = [((10.2, 10, 30, 30), 0.99), ((-20, 50, 40.6, 130), 0.5), ((200, 200, 250, 250), 1.0)]
    face = pick_face(image, candidates)
    assert face is not None and face.box == (0, 50, 41, 100) and face.score == 0.5
    assert np.array_equal(face.crop, image[50:100, 0:41])
    assert pick_face(image, [((200, 200, 250, 250), 1.0)]) is None
    assert pick_face(image, []) is None


def test_rejects_bad_images(detector: FaceDetector) -> None:
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        detector.detect(np.zeros((64, 64, 2), np.uint8))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        detectors.make_detector("no_such_detector")
    message = str(err.value)
    assert "no_such_detector" in message
    for name in detectors.DETECTORS:
        assert name in message


@pytest.mark.parametrize("name", sorted(detectors.DETECTORS))
def test_missing_package_says_what_to_install(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, MODULES[name], None)  # makes `import <module>` raise ImportError
    with pytest.raises(BackendUnavailable) as err:
        detectors.make_detector(name)
    message = str(err.value)
    assert "pip install" in message and detectors.INSTALL[name] in message
    assert name in message and MODULES[name] in message


def test_missing_opencv_message_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(BackendUnavailable, match=r'pip install "opencv-python-headless<5"'):
        detectors.make_detector("opencv_haar")


def test_every_registered_detector_is_documented() -> None:
    doc = detectors.__doc__ or ""
    for name, factory in detectors.DETECTORS.items():
        assert f"- `{name}`:" in doc, f"{name} missing from the detectors module docstring"
        assert name in detectors.INSTALL and "pip install" in detectors.INSTALL[name]
        assert detectors.INSTALL[name] in " ".join(doc.split()), f"{name}'s install command differs in the docstring"
        assert factory.__doc__ and "Score" in factory.__doc__, f"{name}'s class docstring must say what score is"
        assert getattr(factory, "name", None) == name
