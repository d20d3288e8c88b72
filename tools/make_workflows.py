"""Writes the shared ComfyUI workflows: UI format (example_workflows/<name>.json), API format (api/<name>.api.json).

The UI files sit where ComfyUI's Templates browser (frontend 1.3x) looks: a pack's ``example_workflows/*.json``,
with ``<name>.jpg`` beside each as its thumbnail (written by the browser tests: tests/nodes/test_comfyui_js.py). That
folder name is the first ComfyUI serves the template files from; under ``workflows/`` they would be shadowed by
this repository's ``examples/`` folder. The API files sit one folder down, so the browser does not list them.

The graphs are defined once here, in API format, with defaults for a real SD1.5 checkpoint. The UI-format files
(what ComfyUI's "Load" / drag-and-drop reads) are derived from them and from ComfyUI's /object_info (widget order,
input and output types), with a left-to-right layout by graph depth. An API node's ``_meta.title`` (ComfyUI's API
format has it) becomes the UI node's title. The FLUX.1 workflows (`FLUX_WORKFLOWS`) use nodes of ComfyUI 0.3.x only:
`write_all` writes the workflows whose nodes the given /object_info has (`available`), so the script starts 0.3.75.

    python tools/make_workflows.py            # starts a headless ComfyUI 0.3.75 (tests/comfy_support.py)
    python tools/make_workflows.py --object-info info.json   # or reads a saved /object_info

The tests (tests/nodes/test_comfyui_nodes.py) check that the committed files are what this script writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_workflows"

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
FAIRFACE = "res34_fair_align_multi_7_20190809.pt"
AUDIT_PROMPTS = "a photo of a doctor\na photo of a nurse\na photo of a CEO\na photo of a teacher"
TRAIN_PROMPTS = "a photo of a doctor\na photo of a nurse\na photo of a chef\na photo of a firefighter"
SAMPLER = {"seed": 0, "steps": 25, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "width": 512,
           "height": 512, "batch_size": 4, "negative_prompt": ""}  # fmt: skip


def _ckpt():
    return {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}


def _classifier(detector_id: str):
    return {
        "class_type": "PopAlignClassifierLoader",
        "inputs": {"backend": "fairface", "weights": FAIRFACE, "device": "auto", "options_json": "{}",
                   "detector": [detector_id, 0]},
    }  # fmt: skip


def _detector():
    return {"class_type": "PopAlignFaceDetectorLoader", "inputs": {"backend": "opencv_haar", "options_json": "{}"}}


def _sampler(model, clip, vae, prompts, n: int, seed: int = 0):
    return {
        "class_type": "PopAlignPopulationSampler",
        "inputs": {"model": model, "clip": clip, "vae": vae, "prompts": prompts, "neutral_per_prompt": n,
                   **SAMPLER, "seed": seed},
    }  # fmt: skip


def _metrics(images, label: str, population=None, target=None, classifier=("3", 0)):
    inputs = {"images": images, "classifier": list(classifier), "axis": "gender", "label": label, "hard_labels": True}
    if population is not None:
        inputs["population"] = population
    if target is not None:
        inputs["target"] = target
    return {"class_type": "PopAlignBiasMetrics", "inputs": inputs}


def _save(images, prefix: str):
    return {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def bias_audit() -> dict:
    """(a) Bias audit of a checkpoint: 50 images per neutral prompt -> FairFace gender shares, discrepancy, chart."""
    return {
        "1": _ckpt(),
        "2": _detector(),
        "3": _classifier("2"),
        "4": _sampler(["1", 0], ["1", 1], ["1", 2], AUDIT_PROMPTS, 50),
        "5": _metrics(["4", 0], "audit", population=["4", 1]),
        "6": _save(["4", 0], "popalign/audit"),
    }


def popalign_train() -> dict:
    """(b) PopAlign: augment -> sample -> filter -> build data -> train (Eq. 11) -> audit before / after."""
    return {
        "1": _ckpt(),
        "2": _detector(),
        "3": _classifier("2"),
        "4": {
            "class_type": "PopAlignAugmentPrompts",
            "inputs": {
                "prompts": TRAIN_PROMPTS,
                "keywords": "default",
                "axes": "gender",
                "samples_per_prompt": 20,
                "seed": 0,
                "template": "",
            },
        },  # fmt: skip
        "5": _sampler(["1", 0], ["1", 1], ["1", 2], ["4", 0], -1, seed=1),
        "6": {
            "class_type": "PopAlignFilterPopulation",
            "inputs": {
                "images": ["5", 0],
                "population": ["5", 1],
                "classifier": ["3", 0],
                "threshold": 0.8,
                "require_face": True,
            },
        },  # fmt: skip
        "7": {
            "class_type": "PopAlignBuildPreferenceData",
            "inputs": {
                "images": ["6", 0],
                "population": ["6", 1],
                "name": "popalign_data",
                "set_size": 5,
                "rule": "augmented",
                "on_short": "skip",
                "seed": 0,
            },
        },  # fmt: skip
        "8": {
            "class_type": "PopAlignLoRATrainer",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "dataset": ["7", 0],
                "loss": "popalign",
                "loss_params": "{}",
                "lora_name": "popalign_lora",
                "steps": 500,
                "learning_rate": 1e-4,
                "lora_rank": 8,
                "batch_size": 4,
                "train_text_encoder": False,
                "resolution": 0,
                "seed": 0,
                "checkpoint_every": 50,
                "restart": False,
            },
        },  # fmt: skip
        "9": _sampler(["1", 0], ["1", 1], ["1", 2], AUDIT_PROMPTS, 50, seed=2),
        "10": _metrics(["9", 0], "before", population=["9", 1]),
        "11": _sampler(["8", 0], ["8", 1], ["1", 2], AUDIT_PROMPTS, 50, seed=2),
        "12": _metrics(["11", 0], "after", population=["11", 1]),
    }


def distributional_alignment() -> dict:
    """(c) Distributional alignment of neutral prompts to a 75/25 female/male target (DAL + adjusted DFT)."""
    return {
        "1": _ckpt(),
        "2": _detector(),
        "3": _classifier("2"),
        "4": {
            "class_type": "PopAlignTargetDistribution",
            "inputs": {"target_json": '{"gender": {"female": 0.75, "male": 0.25}}', "prompt_targets_json": "{}"},
        },  # fmt: skip
        "5": {
            "class_type": "PopAlignDistributionalAlignment",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "vae": ["1", 2],
                "prompts": TRAIN_PROMPTS,
                "target": ["4", 0],
                "classifier": ["3", 0],
                "lora_name": "popalign_dal_75_25",
                "train": "text_encoder",
                "steps": 300,
                "learning_rate": 5e-5,
                "lora_rank": 50,
                "images_per_prompt": 8,
                "sampler_steps": 20,
                "guidance": 7.5,
                "gradient": "a1",
                "threshold": 0.8,
                "embedder": "none",
                "face_bank": "none",
                "face_detection": True,
                "resolution": 0,
                "micro_batch": 2,
                "seed": 0,
                "checkpoint_every": 25,
                "restart": False,
            },
        },  # fmt: skip
        "6": _sampler(["1", 0], ["1", 1], ["1", 2], AUDIT_PROMPTS, 50, seed=3),
        "7": _metrics(["6", 0], "before", population=["6", 1], target=["4", 0]),
        "8": _sampler(["5", 0], ["5", 1], ["1", 2], AUDIT_PROMPTS, 50, seed=3),
        "9": _metrics(["8", 0], "after", population=["8", 1], target=["4", 0]),
    }


def compare_lora() -> dict:
    """(d) A LoRA before / after: the same seeds with and without it (stock LoraLoader), both measured."""
    return {
        "1": _ckpt(),
        "2": _detector(),
        "3": _classifier("2"),
        "4": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": "popalign/popalign_lora.safetensors",
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        },  # fmt: skip
        "5": _sampler(["1", 0], ["1", 1], ["1", 2], AUDIT_PROMPTS, 25, seed=4),
        "6": _metrics(["5", 0], "without LoRA", population=["5", 1]),
        "7": _sampler(["4", 0], ["4", 1], ["1", 2], AUDIT_PROMPTS, 25, seed=4),
        "8": _metrics(["7", 0], "with LoRA", population=["7", 1]),
        "9": _save(["5", 0], "popalign/without_lora"),
        "10": _save(["7", 0], "popalign/with_lora"),
    }


# ------------------------------------------------------------------------------------------------- FLUX.1
# The same flows on FLUX.1-dev, loaded as ComfyUI's stock FLUX graphs load it (docs/comfyui.md, "FLUX and SD3"):
# UNETLoader (models/diffusion_models/), DualCLIPLoader type flux (clip_l + t5xxl, models/text_encoders/), VAELoader
# (models/vae/ae.safetensors); sampling as FLUX.1-dev is sampled (cfg 1.0, euler, simple; its embedded guidance is
# 3.5: the Population Sampler's guidance input, and FluxGuidance in the stock preview branch). Nodes of ComfyUI >= 0.3
# only.
FLUX_UNET = "flux1-dev.safetensors"
FLUX_CLIP = ("clip_l.safetensors", "t5xxl_fp16.safetensors")
FLUX_VAE = "ae.safetensors"
FLUX_GUIDANCE = 3.5
FLUX_SAMPLER = {**SAMPLER, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "width": 1024,
                "height": 1024, "batch_size": 2, "guidance": FLUX_GUIDANCE}  # fmt: skip
FLUX_TRAIN_RESOLUTION = 512  # training / DAL image side (FLUX samples at 1024; 512 keeps activations small)


def _flux_loaders() -> dict:
    """Nodes 1-3: MODEL, CLIP, VAE of FLUX.1-dev (titles carry the notes a user needs)."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_UNET, "weight_dtype": "default"},
              "_meta": {"title": "Load FLUX.1-dev (weight_dtype fp8_e4m3fn works)"}},
        "2": {"class_type": "DualCLIPLoader",
              "inputs": {"clip_name1": FLUX_CLIP[0], "clip_name2": FLUX_CLIP[1], "type": "flux"},
              "_meta": {"title": "CLIP-L + T5-XXL (t5xxl_fp8_e4m3fn works)"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": FLUX_VAE}, "_meta": {"title": "FLUX VAE (ae)"}},
    }  # fmt: skip


def _flux_preview(start: int, model, prefix: str) -> dict:
    """A stock FLUX.1-dev sample of `model` (CLIPTextEncode -> FluxGuidance -> KSampler cfg 1, euler, simple)."""
    s = str
    return {
        s(start): {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a doctor", "clip": ["2", 0]}},
        s(start + 1): {"class_type": "FluxGuidance", "inputs": {"conditioning": [s(start), 0],
                                                                 "guidance": FLUX_GUIDANCE}},
        s(start + 2): {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        s(start + 3): {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024,
                                                                        "batch_size": 1}},
        s(start + 4): {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 0, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": [s(start + 1), 0], "negative": [s(start + 2), 0], "latent_image": [s(start + 3), 0],
            "denoise": 1.0}},
        s(start + 5): {"class_type": "VAEDecode", "inputs": {"samples": [s(start + 4), 0], "vae": ["3", 0]}},
        s(start + 6): _save([s(start + 5), 0], prefix),
    }  # fmt: skip


def _flux_version(graph: dict, sampler_ids: tuple[str, ...], seed_of: dict) -> dict:
    """An SD1.5 graph (nodes "1" checkpoint, "2" detector, "3" classifier, ...) on FLUX: the checkpoint's outputs
    become the three loaders' (node ids shifted by 2), samplers use FLUX's settings."""
    shift = {k: str(int(k) + 2) for k in graph if k != "1"}
    remap = {0: ("1", 0), 1: ("2", 0), 2: ("3", 0)}  # MODEL, CLIP, VAE of the checkpoint -> UNET, CLIP, VAE loaders

    def link(v):
        if _is_link(v):
            return list(remap[v[1]]) if v[0] == "1" else [shift[v[0]], v[1]]
        return v

    out = _flux_loaders()
    for k, node in graph.items():
        if k == "1":
            continue
        new = {**node, "inputs": {n: link(v) for n, v in node["inputs"].items()}}
        if k in sampler_ids:
            new["inputs"].update(FLUX_SAMPLER, seed=seed_of[k])
        out[shift[k]] = new
    return out


def flux_bias_audit() -> dict:
    """(a) on FLUX.1-dev: 50 images per neutral prompt -> FairFace gender shares, discrepancy, chart."""
    return _flux_version(bias_audit(), ("4",), {"4": 0})


def flux_popalign_train() -> dict:
    """(b) on FLUX.1-dev: PopAlign LoRA on the transformer (lora_transformer_* keys), audit before / after, and a
    stock FLUX sample of the trained model."""
    g = _flux_version(popalign_train(), ("5", "9", "11"), {"5": 1, "9": 2, "11": 2})
    g["10"]["inputs"].update(resolution=FLUX_TRAIN_RESOLUTION, batch_size=2, lora_name="popalign_flux_lora")
    return {**g, **_flux_preview(20, ["10", 0], "popalign/flux_lora_preview")}


def flux_distributional_alignment() -> dict:
    """(c) on FLUX.1-dev: DAL on the transformer (train unet, flow-Euler sampler, solver gradient, embedded
    guidance 3.5) to a 75/25 female/male target, audit before / after, and a stock FLUX sample."""
    g = _flux_version(distributional_alignment(), ("6", "8"), {"6": 3, "8": 3})
    g["7"]["inputs"].update(lora_name="popalign_flux_dal_75_25", train="unet", lora_rank=16, learning_rate=1e-5,
                            sampler_steps=20, guidance=FLUX_GUIDANCE, gradient="solver",
                            resolution=FLUX_TRAIN_RESOLUTION, micro_batch=1)  # fmt: skip
    return {**g, **_flux_preview(20, ["7", 0], "popalign/flux_dal_preview")}


SD_WORKFLOWS = {
    "bias_audit": bias_audit,
    "popalign_train": popalign_train,
    "distributional_alignment": distributional_alignment,
    "compare_lora": compare_lora,
}
FLUX_WORKFLOWS = {
    "flux_bias_audit": flux_bias_audit,
    "flux_popalign_train": flux_popalign_train,
    "flux_distributional_alignment": flux_distributional_alignment,
}
WORKFLOWS = {**SD_WORKFLOWS, **FLUX_WORKFLOWS}


def _fits(node: dict, info: dict) -> bool:
    """`info` has the node's type with every input it sets, and every dropdown value it sets (model file names
    aside: those are whatever the server's folders hold)."""
    spec = info.get(node["class_type"])
    if spec is None:
        return False
    inputs = {**(spec["input"].get("required") or {}), **(spec["input"].get("optional") or {})}
    for name, v in node["inputs"].items():
        if name not in inputs:
            return False
        kind = inputs[name][0]
        if isinstance(kind, list) and not _is_link(v) and v not in kind and not str(v).endswith(MODEL_FILES):
            return False
    return True


MODEL_FILES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def available(info: dict) -> list[str]:
    """The workflows `info` (/object_info) can run (`_fits` for every node): the FLUX ones need ComfyUI >= 0.3 (the
    2024 ComfyUI has no FluxGuidance, no UNETLoader weight_dtype, no DualCLIPLoader type flux)."""
    return [n for n, fn in WORKFLOWS.items() if all(_fits(node, info) for node in fn().values())]


# --------------------------------------------------------------------------------------------------- UI format
def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


def _widget_inputs(spec: dict) -> list[tuple[str, object]]:
    """(name, spec) of the inputs the legacy frontend shows as widgets, in its order."""
    out = []
    for section in ("required", "optional"):
        for name, s in (spec["input"].get(section) or {}).items():
            kind, opts = s[0], (s[1] if len(s) > 1 else {})
            if isinstance(kind, list) or (
                kind in ("INT", "FLOAT", "STRING", "BOOLEAN") and not opts.get("forceInput")
            ):
                out.append((name, s))
    return out


def _has_control(name: str, s) -> bool:
    kind, opts = s[0], (s[1] if len(s) > 1 else {})
    return kind == "INT" and (name in ("seed", "noise_seed") or bool(opts.get("control_after_generate")))


# extra height of the pack's front-end widgets (js/popalign.js: chart, editor, loss curve) before any data
_DOM_EXTRA = {"PopAlignBiasMetrics": 60, "PopAlignTargetDistribution": 120, "PopAlignLoRATrainer": 60,
              "PopAlignDistributionalAlignment": 60}  # fmt: skip


def _height(spec: dict) -> int:
    """A node's height in the legacy frontend: title, slots, one row per widget, multiline text boxes."""
    widgets = _widget_inputs(spec)
    slots = max(len([1 for s in (spec["input"].get("required") or {}).values()
                     if not isinstance(s[0], list) and s[0] not in ("INT", "FLOAT", "STRING", "BOOLEAN")]),
                len(spec["output"]))  # fmt: skip
    multiline = sum(1 for _, s in widgets if len(s) > 1 and s[1].get("multiline"))
    controls = sum(_has_control(n, s) for n, s in widgets)
    return 30 + 22 * slots + 26 * (len(widgets) + controls) + 90 * multiline + _DOM_EXTRA.get(spec["name"], 0)


def to_ui(api: dict, info: dict, title: str) -> dict:
    """UI-format workflow (LiteGraph serialisation) of an API-format one."""
    ids = {nid: int(nid) for nid in api}
    depth: dict[str, int] = {}

    def d(nid):
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if _is_link(v)]
            depth[nid] = 1 + max((d(u) for u in ups), default=-1)
        return depth[nid]

    for nid in api:
        d(nid)
    rows: dict[int, int] = {}
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid in sorted(api, key=int):
        node = api[nid]
        spec = info[node["class_type"]]
        inputs, widgets = [], []
        for section in ("required", "optional"):
            for name, s in (spec["input"].get(section) or {}).items():
                v = node["inputs"].get(name)
                is_widget = (name, s) in _widget_inputs(spec)
                if _is_link(v):
                    link_id = len(links) + 1
                    src, slot = v
                    typ = info[api[src]["class_type"]]["output"][slot]
                    links.append([link_id, ids[src], slot, ids[nid], None, typ])
                    entry = {"name": name, "type": s[0] if not isinstance(s[0], list) else "COMBO", "link": link_id}
                    if is_widget:
                        entry["widget"] = {"name": name}
                    inputs.append(entry)
                    out_links.setdefault((src, slot), []).append(link_id)
                    if is_widget:
                        opts = s[1] if len(s) > 1 else {}
                        widgets.append(opts.get("default", s[0][0] if isinstance(s[0], list) else ""))
                        if _has_control(name, s):
                            widgets.append("fixed")
                elif is_widget:
                    if v is None:
                        opts = s[1] if len(s) > 1 else {}
                        v = opts.get("default", s[0][0] if isinstance(s[0], list) else "")
                    widgets.append(v)
                    if _has_control(name, s):
                        widgets.append("fixed")
                elif section == "required":
                    raise ValueError(f"{title}: node {nid} ({node['class_type']}) has no link for input {name!r}")
        for k, inp in enumerate(inputs):  # slot index = position among the node's input slots
            links[inp["link"] - 1][4] = k
        col = depth[nid]
        height = _height(spec)
        top = rows.get(col, 40)
        rows[col] = top + height + 50
        nodes.append({
            "id": ids[nid], "type": node["class_type"], "pos": [40 + 400 * col, top], "size": [360, height],
            "flags": {}, "order": 0, "mode": 0, "inputs": inputs,
            "outputs": [{"name": n, "type": t, "links": None, "slot_index": i}
                        for i, (n, t) in enumerate(zip(spec["output_name"], spec["output"]))],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
            **({"title": node["_meta"]["title"]} if "_meta" in node else {}),
        })  # fmt: skip
    for n in nodes:
        for o in n["outputs"]:
            o["links"] = out_links.get((str(n["id"]), o["slot_index"])) or None
    order = sorted(api, key=lambda k: (depth[k], int(k)))
    for n in nodes:
        n["order"] = order.index(str(n["id"]))
    return {
        "last_node_id": max(ids.values()), "last_link_id": len(links), "nodes": nodes, "links": links,
        "groups": [], "config": {}, "extra": {"popalign_workflow": title}, "version": 0.4,
    }  # fmt: skip


def write_all(info: dict, out: Path = OUT) -> list[Path]:
    """Write every workflow `info` (/object_info) has the nodes for (`available`); the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in available(info):
        api = WORKFLOWS[name]()
        for path, data in ((out / "api" / f"{name}.api.json", api), (out / f"{name}.json", to_ui(api, info, name))):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2) + "\n")
            written.append(path)
    return written


def _object_info_from_server() -> dict:
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    import comfy_support as cs

    comfy = cs.obtain_comfyui(version="0.3.75")  # the FLUX workflows need its nodes
    with tempfile.TemporaryDirectory() as tmp:
        nodes_dir = Path(tmp) / "custom_nodes"
        nodes_dir.mkdir()
        (nodes_dir / "PopAlign").symlink_to(ROOT, target_is_directory=True)
        with cs.comfy_server(comfy, Path(tmp) / "work", folders={"custom_nodes": nodes_dir}) as server:
            return server.get("/object_info", timeout=60)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--object-info", help="a saved /object_info JSON (default: start a headless ComfyUI)")
    args = ap.parse_args(argv)
    info = json.loads(Path(args.object_info).read_text()) if args.object_info else _object_info_from_server()
    for p in write_all(info):
        print(p.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
