"""Packaging rules: ComfyUI entry point, core independence from ComfyUI, install files, CI = README command."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

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


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports, read from the source (ast): every import statement, at module
    level or inside a function (a function-local import is an edge all the same). ``from a.b import c`` points at
    ``a.b.c`` when that is a module, else at ``a.b``."""
    files = {}
    for pkg in packages:
        for f in (root / pkg).rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        here = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                up = here[: len(here) - node.level + 1]
                base = (".".join([*up, node.module or ""]) if node.level else node.module or "").strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_import_cycle_in_the_core_or_the_nodes():
    graph = import_graph(ROOT, ("popalign_core", "nodes"))
    assert len(graph) > 50 and "popalign_core.classify.base" in graph["popalign_core.classify.classifiers"]
    assert import_cycles(graph) == []


def test_the_cycle_check_finds_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg.c import x\n")  # a function-local import counts
    (pkg / "c.py").write_text("import pkg.a\nx = 1\n")
    (pkg / "d.py").write_text("from . import a\n")  # imports into the cycle, is not part of it
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


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


def test_moved_modules_import_under_their_old_paths_as_the_same_module():
    """0.1 paths (`popalign_core.audit`, ...) still import, for one release: the very same module object (so patches
    and isinstance agree), with a DeprecationWarning naming the new path; packages that were modules re-export the
    old module's public names."""
    import importlib
    import warnings

    import popalign_core

    assert len(popalign_core.MOVED) >= 25
    for old, new in popalign_core.MOVED.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sys.modules.pop(old, None)
            mod = importlib.import_module(old)
        assert mod is importlib.import_module(new) and mod.__name__ == new and mod.__spec__.name == new, old
        assert any(f"{old} moved to {new}" in str(w.message) for w in caught), old
        assert (ROOT / (new.replace(".", "/") + ".py")).is_file() or (ROOT / new.replace(".", "/")).is_dir(), new
    from popalign_core.models import DiffusersAdapter, load_model
    from popalign_core.models.diffusers_adapter import DiffusersAdapter as Direct
    from popalign_core.train import TrainConfig, Trainer  # noqa: F401

    assert DiffusersAdapter is Direct and callable(load_model)
    for pkg in ("models", "population", "train", "dal", "lora", "evaluate"):
        mod = importlib.import_module(f"popalign_core.{pkg}")
        for name in dir(mod):
            if not name.startswith("_") and name not in ("lazy_exports",):
                assert getattr(mod, name) is not None, (pkg, name)
    try:
        popalign_core.models.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("unknown names must raise AttributeError")


def test_old_module_paths_run_with_python_dash_m():
    for path in ("popalign_core.dal_train", "popalign_core.train", "popalign_core.dal", "popalign_core.population"):
        out = subprocess.run([sys.executable, "-W", "ignore", "-m", path, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.startswith("usage: popalign "), (path, out.stderr[-500:])


MAX_MODULE_LINES = 600


def test_no_core_module_is_over_600_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "popalign_core").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_every_core_package_says_its_place_in_the_flow():
    for init in (ROOT / "popalign_core").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, init


def test_common_imports_no_other_core_package():
    graph = import_graph(ROOT, ("popalign_core",))
    outside = {(m, t) for m, ts in graph.items() if m.startswith("popalign_core.common") for t in ts
               if not t.startswith("popalign_core.common")}  # fmt: skip
    assert outside == set()
