"""Shared test set-up.

pytest runs with ``--import-mode=importlib``, which puts no test folder on ``sys.path``: the tests folder (for
``comfy_support``) and tools/ (for ``make_workflows``) are added here. Also the node pack in a real ComfyUI server
(fixtures `comfy_pack_env` / `comfy_pack_server`, one server per test module): this repository symlinked into
``custom_nodes/`` as a clone would be, a seeded tiny SD1.5 checkpoint that ComfyUI detects as SD15 and draws no
faces, and a seeded random FairFace-shaped weight file where users put the real one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for _p in (TESTS, REPO / "tools"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

TINY = "tiny_sd15.safetensors"
FAIRFACE = "res34_fair_align_multi_7_20190809.pt"


@pytest.fixture(scope="module")
def comfy_pack_env(tmp_path_factory):
    import comfy_support as cs
    import torch
    import torchvision

    root = tmp_path_factory.mktemp("comfy_pack")
    ckpt = cs.build_tiny_sd15_checkpoint(root / "checkpoints" / TINY)
    clf_dir = root / "classifiers"
    clf_dir.mkdir()
    torch.manual_seed(0)
    net = torchvision.models.resnet34()
    net.fc = torch.nn.Linear(512, 18)
    torch.save(net.state_dict(), clf_dir / FAIRFACE)  # a random FairFace-shaped file (the real one: same name)
    nodes_dir = root / "custom_nodes"
    nodes_dir.mkdir()
    (nodes_dir / "PopAlign").symlink_to(REPO, target_is_directory=True)
    # trained LoRAs go to the first loras folder: the server's private copy of ComfyUI's models/loras/
    loras = root / "work" / "ComfyUI" / "models" / "loras"
    yield {"root": root, "checkpoint": ckpt, "loras": loras, "classifiers": clf_dir, "custom_nodes": nodes_dir}
    ckpt.unlink(missing_ok=True)
    (clf_dir / FAIRFACE).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def comfy_pack_server(comfy_pack_env):
    import comfy_support as cs

    comfy = cs.comfyui_or_skip()
    env = comfy_pack_env
    folders = {"checkpoints": env["checkpoint"].parent, "popalign_classifiers": env["classifiers"],
               "custom_nodes": env["custom_nodes"]}  # fmt: skip
    with cs.comfy_server(comfy, env["root"] / "work", folders=folders, threads=2) as srv:
        yield srv
