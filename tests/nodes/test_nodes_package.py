"""The node package without ComfyUI: module isolation, input validation helpers (nodes import comfy lazily)."""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_nodes(folder: Path, name: str):
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pack():
    return load_nodes(REPO / "nodes", "popalign_nodes_unit")


def test_every_node_module_loads_and_ids_are_prefixed(pack):
    SUBCATEGORIES = ("prompts", "population", "classify", "data", "train", "alignment", "audit")
    assert not pack.LOAD_ERRORS
    assert len(pack.NODE_CLASS_MAPPINGS) == 13
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("PopAlign") and node_id == cls.__name__
        assert cls.CATEGORY.startswith("PopAlign/") and cls.CATEGORY.split("/")[1] in SUBCATEGORIES, cls.CATEGORY
        assert cls.DESCRIPTION.strip()
        tips = cls.OUTPUT_TOOLTIPS
        assert len(tips) == len(cls.RETURN_TYPES) and all(t.strip() for t in tips), node_id
        assert callable(getattr(cls, cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))


def test_a_broken_module_disables_only_its_own_nodes(tmp_path, caplog):
    folder = tmp_path / "nodes"
    shutil.copytree(REPO / "nodes", folder, ignore=shutil.ignore_patterns("__pycache__"))
    dal = folder / "dal_nodes.py"
    text = dal.read_text().replace(
        "from __future__ import annotations\n",
        "from __future__ import annotations\n\nimport popalign_missing_dep\n",
        1,
    )
    dal.write_text(text)
    with caplog.at_level(logging.ERROR, logger="popalign"):
        mod = load_nodes(folder, "popalign_nodes_broken")
    assert set(mod.LOAD_ERRORS) == {"dal_nodes"}
    assert "No module named 'popalign_missing_dep'" in mod.LOAD_ERRORS["dal_nodes"]
    assert "PopAlignDistributionalAlignment" not in mod.NODE_CLASS_MAPPINGS
    assert "PopAlignTargetDistribution" not in mod.NODE_CLASS_MAPPINGS
    assert "PopAlignLoRATrainer" in mod.NODE_CLASS_MAPPINGS and len(mod.NODE_CLASS_MAPPINGS) == 11
    assert "nodes of dal_nodes are disabled" in caplog.text


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", ".hidden", "", "x" * 101, "..", "a b"])
def test_safe_name_refuses_paths(pack, name):
    common = sys.modules["popalign_nodes_unit._common"]
    with pytest.raises(ValueError, match="lora_name=.* is not a plain name"):
        common.safe_name(name, "lora_name")


def test_text_fields_take_numbers_as_users_write_them(pack):
    """loss_params typed into a node: JSON, or YAML flow style, with 5e3 / 5e-1 read as numbers."""
    common = sys.modules["popalign_nodes_unit._common"]
    assert common.parse_json('{"beta": 5e3}', "loss_params") == {"beta": 5000.0}
    assert common.parse_json("{beta: 5e3, alpha: 5e-1}", "loss_params") == {"beta": 5000.0, "alpha": 0.5}
    assert common.parse_json("  ", "loss_params", {}) == {}
    with pytest.raises(ValueError, match="loss_params: not valid JSON"):
        common.parse_json("{beta: ", "loss_params")
    with pytest.raises(ValueError, match="loss_params: not valid JSON"):
        common.parse_json("beta", "loss_params")


def test_safe_name_accepts_plain_names(pack):
    common = sys.modules["popalign_nodes_unit._common"]
    assert common.safe_name("my_lora-v1.2", "lora_name") == "my_lora-v1.2"
    assert common.safe_name("my_lora.safetensors", "lora_name") == "my_lora"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "expected a JSON object"),
        ({"gender": {"female": 0.7, "male": 0.2}}, "sum to 1 \\(they sum to 0.8999"),
        ({"gender": {"female": -0.5, "male": 1.5}}, "must be >= 0"),
        ({"gender": {"female": "a"}}, "expected \\{class: share\\} with numbers"),
    ],
)
def test_target_checks(pack, spec, message):
    dal = sys.modules["popalign_nodes_unit.dal_nodes"]
    with pytest.raises(ValueError, match=message):
        dal.check_target(spec)


def test_target_node_output(pack):
    node = pack.NODE_CLASS_MAPPINGS["PopAlignTargetDistribution"]()
    target, text = node.run('{"gender": {"female": 0.75, "male": 0.25}}', '{"a female doctor": {"gender": [1, 0]}}')
    assert target == {"target": {"gender": {"female": 0.75, "male": 0.25}},
                      "prompt_targets": {"a female doctor": {"gender": [1, 0]}}}  # fmt: skip
    with pytest.raises(ValueError, match=r"prompt_targets_json\['x'\]: target_json: axis 'gender': shares must"):
        node.run('{"gender": [0.5, 0.5]}', '{"x": {"gender": [0.5, 0.6]}}')


def test_sampler_jobs_from_rows_and_plain_prompts(pack):
    pop = sys.modules["popalign_nodes_unit.population_nodes"]
    rows = json.dumps([
        {"neutral": "a doctor", "prompt": "a female doctor", "identity": {"gender": "female"}, "index": 0},
        {"neutral": "a doctor", "prompt": "a male doctor", "identity": {"gender": "male"}, "index": 1},
    ])  # fmt: skip
    jobs = pop._jobs(rows, -1)
    assert [(j["prompt"], j["population"]) for j in jobs] == [
        ("a female doctor", "winning"), ("a male doctor", "winning"), ("a doctor", "losing"), ("a doctor", "losing"),
    ]  # fmt: skip
    plain = pop._jobs("a chef\n# comment\na pilot\na chef", 2)
    assert [(j["prompt"], j["index"]) for j in plain] == [("a chef", 0), ("a chef", 1), ("a pilot", 0), ("a pilot", 1)]
    with pytest.raises(ValueError, match="prompts: empty"):
        pop._jobs("  ", -1)


def test_augment_node_lists_skipped_prompts(pack):
    node = pack.NODE_CLASS_MAPPINGS["PopAlignAugmentPrompts"]()
    rows, prompts, skipped = node.run("a photo of a doctor\na photo of a female nurse", "default", "gender", 2, 0)
    assert sorted(prompts.splitlines()) == [
        "a realistic photo of a female doctor",
        "a realistic photo of a male doctor",
    ]
    assert [r["neutral"] for r in json.loads(rows)] == ["a photo of a doctor"] * 2
    assert skipped == "a photo of a female nurse  <- female"
    with pytest.raises(ValueError, match="every prompt was skipped as identity-specific"):
        node.run("a photo of a female nurse", "default", "gender", 2, 0)


def test_metrics_refuse_an_empty_batch(pack):
    import torch

    node = pack.NODE_CLASS_MAPPINGS["PopAlignBiasMetrics"]()
    with pytest.raises(ValueError, match="images: the IMAGE batch is empty; nothing to measure"):
        node.run(torch.zeros(0, 64, 64, 3), classifier=None, axis="gender", label="x", hard_labels=True)
    common = sys.modules["popalign_nodes_unit._common"]
    with pytest.raises(
        ValueError, match=r"images: expected a non-empty IMAGE batch \[B, H, W, C\], got shape \(0, 8, 8, 3\)"
    ):
        common.image_batch_to_uint8(torch.zeros(0, 8, 8, 3))


def test_node_functions_are_thin_and_inputs_are_tables():
    """Every node's FUNCTION method is at most 30 lines (the work is the core's); input declarations are data tables
    that ruff formats as they are (no `# fmt: skip` in the node modules)."""
    for path in sorted((REPO / "nodes").glob("*_nodes.py")):
        text = path.read_text()
        assert "fmt: skip" not in text, path.name
        for cls in [n for n in ast.parse(text).body if isinstance(n, ast.ClassDef)]:
            function = [
                a.value.value
                for a in cls.body
                if isinstance(a, ast.Assign) and any(getattr(t, "id", None) == "FUNCTION" for t in a.targets)
            ]
            if not function:
                continue
            method = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == function[0])
            length = method.end_lineno - method.lineno + 1
            assert length <= 30, f"{path.name}: {cls.name}.{method.name} has {length} lines"


def test_input_tables_keep_the_order_of_rows_and_options(pack):
    common = sys.modules["popalign_nodes_unit._common"]
    types = common.input_types(
        (
            common.LINK("images", "IMAGE", "the images"),
            common.INT("steps", "steps", 20, 1, 100),
            common.INT("width", "width", 512, 64, 4096, 8),
            common.FLOAT("lr", "rate", 1e-4, 1e-8, 1.0, 1e-5, round=False),
            common.STRING("text", "text", "", multiline=True),
            common.row("prompts", "STRING", "prompts", multiline=True, default="a"),
            common.CHOICE("loss", ("a", "b"), "loss", default="b"),
            common.BOOLEAN("restart", "restart", False),
        ),
        (common.LINK("target", "T", "target"),),
        hidden={"unique_id": "UNIQUE_ID"},
    )
    want = {
        "required": {
            "images": ("IMAGE", {"tooltip": "the images"}),
            "steps": ("INT", {"tooltip": "steps", "default": 20, "min": 1, "max": 100}),
            "width": ("INT", {"tooltip": "width", "default": 512, "min": 64, "max": 4096, "step": 8}),
            "lr": (
                "FLOAT",
                {"tooltip": "rate", "default": 1e-4, "min": 1e-8, "max": 1.0, "step": 1e-5, "round": False},
            ),
            "text": ("STRING", {"tooltip": "text", "default": "", "multiline": True}),
            "prompts": ("STRING", {"tooltip": "prompts", "multiline": True, "default": "a"}),
            "loss": (["a", "b"], {"tooltip": "loss", "default": "b"}),
            "restart": ("BOOLEAN", {"tooltip": "restart", "default": False}),
        },
        "optional": {"target": ("T", {"tooltip": "target"})},
        "hidden": {"unique_id": "UNIQUE_ID"},
    }
    assert json.dumps(types) == json.dumps(want)
    assert common.input_types((common.LINK("x", "IMAGE", "x"),)) == {"required": {"x": ("IMAGE", {"tooltip": "x"})}}
    with pytest.raises(ValueError, match="every input needs a tooltip"):
        common.INT("steps", "", 1, 0, 2)
    with pytest.raises(ValueError, match="input 'x' is declared twice"):
        common.input_types((common.LINK("x", "IMAGE", "x"), common.LINK("x", "IMAGE", "y")))
