"""Shared test set-up.

pytest runs with ``--import-mode=importlib``, which puts no test folder on ``sys.path``: the tests folder (for
``comfy_support``), tests/nodes (for the helpers of ``test_comfyui_nodes``) and tools/ (for ``make_workflows``) are
added here. Also the node pack in a real ComfyUI server (fixtures `comfy_pack_env` / `comfy_pack_server`, one
server per test module): this repository symlinked into ``custom_nodes/`` as a clone would be, a seeded tiny SD1.5
checkpoint that ComfyUI detects as SD15 and draws no faces, and a seeded random FairFace-shaped weight file where
users put the real one. `comfy_version` parametrizes
every real-ComfyUI test over the matrix of tests/comfy_support.py (ComfyUI 2024.03 and 0.3.75): a module's tests run
on one version, then on the next (pytest groups them by the module-scoped parameter).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for _p in (TESTS, TESTS / "nodes", REPO / "tools"):
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
    yield {"root": root, "checkpoint": ckpt, "classifiers": clf_dir, "custom_nodes": nodes_dir}
    ckpt.unlink(missing_ok=True)
    (clf_dir / FAIRFACE).unlink(missing_ok=True)


def _matrix() -> list[str]:
    import comfy_support as cs

    return cs.matrix_versions()


@pytest.fixture(scope="module", params=_matrix(), ids=lambda v: f"comfyui-{v}")
def comfy_version(request) -> str:
    """The ComfyUI version (a key of comfy_support.COMFYUI_RELEASES, or "custom") a module's tests run on."""
    return request.param


@pytest.fixture(scope="module")
def comfy_dir(comfy_version) -> Path:
    """That ComfyUI's folder (fetched once into .cache/comfyui/; skips with no network)."""
    import comfy_support as cs

    return cs.comfyui_or_skip(comfy_version)


@pytest.fixture(scope="module")
def comfy_pack_server(comfy_pack_env, comfy_dir, comfy_version):
    """A ComfyUI server of `comfy_version` with the pack; ``.loras`` is where the trainer nodes write (the first
    loras folder: the server's private copy of ComfyUI's models/loras/), ``.version`` / ``.frontend`` say which."""
    import comfy_support as cs

    env = comfy_pack_env
    folders = {"checkpoints": env["checkpoint"].parent, "popalign_classifiers": env["classifiers"],
               "custom_nodes": env["custom_nodes"]}  # fmt: skip
    work = env["root"] / f"work-{comfy_version}"
    with cs.comfy_server(comfy_dir, work, folders=folders, threads=2) as srv:
        yield srv
