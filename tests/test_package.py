"""Packaging rules: ComfyUI entry point, core independence from ComfyUI, install files, CI = README command."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_comfyui_entry_point_imports_as_a_package_and_lists_the_nodes():
    spec = importlib.util.spec_from_file_location(
        "popalign_comfy_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    assert isinstance(mod.NODE_CLASS_MAPPINGS, dict) and isinstance(mod.NODE_DISPLAY_NAME_MAPPINGS, dict)
    assert mod.WEB_DIRECTORY == "./js" and (ROOT / "js").is_dir()
    assert all(k.startswith("PopAlign") for k in mod.NODE_CLASS_MAPPINGS)
    assert len(mod.NODE_CLASS_MAPPINGS) == 13 and set(mod.NODE_DISPLAY_NAME_MAPPINGS) == set(mod.NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize(
    "module",
    ["popalign_core.classify.detectors", "popalign_core.classify.classifiers", "popalign_core.classify.base",
     "popalign_core.toyworld.classifier", "popalign_core.models", "popalign_core.population"],
)  # fmt: skip
def test_module_imports_first_in_a_fresh_process(module):
    """No circular import whichever module a process imports first (the registries import backends at their end)."""
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_core_never_imports_comfy():
    pat = re.compile(r"^\s*(import comfy|from comfy|import folder_paths|from folder_paths)", re.M)
    offenders = [str(p) for p in (ROOT / "popalign_core").rglob("*.py") if pat.search(p.read_text())]
    assert offenders == []


def test_importing_the_core_is_cheap_and_torch_free():
    code = "import sys, popalign_core, popalign_core.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_requirements_never_pin_torch_and_pyproject_is_complete():
    req = (ROOT / "requirements.txt").read_text().lower()
    lines = [ln.strip() for ln in req.splitlines() if ln.strip() and not ln.startswith("#")]
    names = [re.split(r"[<>=!~ \[]", ln)[0] for ln in lines]
    assert "torch" not in names and "torchvision" not in names
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "comfy" in py["tool"]
    assert not any(d.lower().startswith("torch") for d in py["project"]["dependencies"])
    assert py["tool"]["ruff"]["line-length"] == 119
    assert any(m.startswith("slow:") for m in py["tool"]["pytest"]["ini_options"]["markers"])
    for d in ("nodes", "example_workflows", "js", "tests", "popalign_core"):
        assert (ROOT / d).is_dir(), d


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    cmd = "bash scripts/test.sh"
    assert cmd in readme and "bash scripts/demo.sh" in readme
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci = [ln.strip() for ln in ci_lines if ln.strip() and not ln.startswith("#")]
    assert cmd in ci


def test_cli_lists_losses_and_rejects_unknown_commands():
    from popalign_core.cli import main

    assert main(["losses", "--json"]) == 0
    assert main(["nope"]) == 2
