"""Shared helpers of the node modules: types, input tables, model folders, progress/cancel, output folders.

Only this package imports ComfyUI (lazily, inside functions, so that importing a node module outside ComfyUI, e.g. in
the static tests, works). `popalign_core` is the pack's own copy when it is not installed in the environment.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
try:  # the core: installed (pip install -e .) or the copy beside the nodes (a plain clone into custom_nodes/)
    import popalign_core  # noqa: F401
except ImportError:  # appended, not prepended: the pack root holds a folder named `nodes` like ComfyUI's nodes.py
    sys.path.append(str(PACK_ROOT))
    import popalign_core  # noqa: F401

CATEGORY = "PopAlign"
# sub-categories along the data flow (the node library shows PopAlign > prompts, population, ...)
SUBCATEGORIES = ("prompts", "population", "classify", "data", "train", "alignment", "audit")


#: RETURN_TYPES, RETURN_NAMES and OUTPUT_TOOLTIPS of the two training nodes (LoRA Trainer, Distributional Alignment)
TRAINED_OUTPUTS = (
    ("MODEL", "CLIP", "STRING", "STRING"),
    ("model", "clip", "lora_path", "summary"),
    (
        "the incoming MODEL with the trained LoRA applied",
        "the incoming CLIP with the LoRA applied (unchanged when the text encoder is not trained)",
        "the LoRA file: models/loras/popalign/<lora_name>.safetensors",
        "what was trained: steps, losses, resumed_from, run folder, memory (JSON)",
    ),
)


def category(sub: str) -> str:
    """The node category ``PopAlign/<sub>`` (one of SUBCATEGORIES)."""
    if sub not in SUBCATEGORIES:
        raise ValueError(f"unknown node sub-category {sub!r}; known: {SUBCATEGORIES}")
    return f"{CATEGORY}/{sub}"


# custom types passed between PopAlign nodes
POPULATION = "POPALIGN_POPULATION"  # {"rows": [row per IMAGE row], "settings": {...}}
CLASSIFIER = "POPALIGN_CLASSIFIER"  # ClassifierHandle
DETECTOR = "POPALIGN_DETECTOR"  # DetectorHandle
DATASET = "POPALIGN_DATASET"  # {"manifest": path, "kind": ..., "report": {...}}
TARGET = "POPALIGN_TARGET"  # {"target": {...}, "prompt_targets": {...}}

# model folders (under ComfyUI/models/), registered with folder_paths at import
MODEL_FOLDERS = {
    "popalign_classifiers": os.path.join("popalign", "classifiers"),
    "popalign_face_detectors": os.path.join("popalign", "face_detectors"),
    "popalign_face_banks": os.path.join("popalign", "face_banks"),
    "popalign_embedders": os.path.join("popalign", "embedders"),
    "deepface": "deepface",
}
WEIGHT_EXTENSIONS = {".safetensors", ".pt", ".pth", ".bin", ".onnx", ".h5", ".tflite", ".dat"}
AUTO = "auto"


def tip(kind, tooltip: str, **options):
    """An input spec with its tooltip: (kind, {"tooltip": ..., **options})."""
    if not tooltip:
        raise ValueError("every input needs a tooltip")
    return (kind, {"tooltip": tooltip, **options})


# ---------------------------------------------------------------------------------------------- input tables
# A node declares its inputs as a tuple of rows (name, spec), one row per input in widget order (saved workflows
# store widget values by position); `input_types` turns the tables into ComfyUI's INPUT_TYPES dict. The options of
# a spec keep the order they are given in (the dict ComfyUI serves in /object_info).


def row(name: str, kind, tooltip: str, **options) -> tuple:
    """One input: (name, (kind, {"tooltip": ..., **options})); `kind` is a type name or a list of choices."""
    return (name, tip(kind, tooltip, **options))


def LINK(name: str, kind: str, tooltip: str) -> tuple:
    """A connection (no widget): MODEL, IMAGE, a PopAlign type, ..."""
    return row(name, kind, tooltip)


def INT(name: str, tooltip: str, default: int, min: int, max: int, step: int | None = None) -> tuple:  # noqa: A002
    return row(name, "INT", tooltip, default=default, min=min, max=max, **({} if step is None else {"step": step}))


def FLOAT(name: str, tooltip: str, default: float, min: float, max: float, step: float, **more) -> tuple:  # noqa: A002
    """A float widget; `more`: e.g. round=False (no rounding to `step`)."""
    return row(name, "FLOAT", tooltip, default=default, min=min, max=max, step=step, **more)


def BOOLEAN(name: str, tooltip: str, default: bool) -> tuple:
    return row(name, "BOOLEAN", tooltip, default=default)


def STRING(name: str, tooltip: str, default: str, **more) -> tuple:
    """A text widget; `more`: multiline=True for a text box."""
    return row(name, "STRING", tooltip, default=default, **more)


def CHOICE(name: str, choices, tooltip: str, **more) -> tuple:
    """A dropdown of `choices`; `more`: default=..."""
    return row(name, list(choices), tooltip, **more)


def input_types(required=(), optional=(), hidden: dict | None = None) -> dict:
    """ComfyUI's INPUT_TYPES dict from input tables (rows of `row` / INT / ...); empty sections are left out."""
    names = [name for name, _ in (*required, *optional)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"input {twice[0]!r} is declared twice")
    out: dict = {"required": dict(required)}
    if optional:
        out["optional"] = dict(optional)
    if hidden:
        out["hidden"] = dict(hidden)
    return out


def register_folders() -> None:
    """Register the pack's model folders with ComfyUI's folder_paths (idempotent; no-op outside ComfyUI)."""
    try:
        import folder_paths
    except ImportError:
        return
    # the core's classifiers and embedders look for their weights under $POPALIGN_MODELS_DIR/popalign/...
    os.environ.setdefault("POPALIGN_MODELS_DIR", folder_paths.models_dir)
    for kind, rel in MODEL_FOLDERS.items():
        path = os.path.join(folder_paths.models_dir, rel)
        entry = folder_paths.folder_names_and_paths.get(kind)
        if entry is None:
            folder_paths.folder_names_and_paths[kind] = ([path], set(WEIGHT_EXTENSIONS))
        elif path not in entry[0]:
            entry[0].append(path)


def register_routes() -> None:
    """GET /popalign/losses: {loss: {"defaults": {...}, "summary": ...}} for the front end (the trainer's loss dropdown
    fills loss_params with the chosen loss's defaults). No-op without a running ComfyUI server."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    inst = getattr(PromptServer, "instance", None)
    if inst is None or getattr(inst, "_popalign_routes", False):
        return

    @inst.routes.get("/popalign/losses")
    async def _losses(request):
        from popalign_core.train.losses import LOSSES, loss_defaults

        return web.json_response({n: {"defaults": loss_defaults(n), "summary": s.summary} for n, s in LOSSES.items()})

    inst._popalign_routes = True


def models_dir() -> str | None:
    """ComfyUI's models folder (the core's backends look for their weights under it)."""
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths.models_dir


def folder_files(kind: str) -> list[str]:
    try:
        import folder_paths

        return sorted(folder_paths.get_filename_list(kind))
    except Exception:  # noqa: BLE001 - outside ComfyUI or no such folder: an empty list
        return []


def folder_subdirs(kind: str) -> list[str]:
    """Sub-folders of a model folder kind (face banks are folders of images)."""
    out = set()
    try:
        import folder_paths

        for base in folder_paths.get_folder_paths(kind):
            if os.path.isdir(base):
                out.update(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    except Exception:  # noqa: BLE001
        return []
    return sorted(out)


def resolve_file(kind: str, name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(kind, name)
    if path is None:
        dirs = folder_paths.get_folder_paths(kind) if kind in folder_paths.folder_names_and_paths else []
        raise FileNotFoundError(f"{name!r} is not in the {kind} model folder(s): {', '.join(dirs) or '(none)'}")
    return path


def resolve_subdir(kind: str, name: str) -> str:
    import folder_paths

    for base in folder_paths.get_folder_paths(kind):
        p = os.path.join(base, name)
        if os.path.isdir(p):
            return p
    raise FileNotFoundError(f"{name!r} is not a folder in the {kind} model folder(s)")


def safe_name(value: str, arg: str) -> str:
    """A plain file-name stem: letters, digits, '.', '_' and '-', no path separators, no leading dot (the core's
    `userinput.check_name`; a trailing .safetensors is dropped)."""
    from popalign_core.common.userinput import check_name

    return check_name(value, arg, strip_suffix=".safetensors")


def output_root() -> Path:
    """<ComfyUI output>/popalign: runs, data sets and reports of the nodes."""
    try:
        import folder_paths

        base = Path(folder_paths.get_output_directory())
    except ImportError:
        base = Path("output")
    return base / "popalign"


def loras_dir() -> Path:
    """<first ComfyUI loras folder>/popalign: where trained LoRAs are saved (the stock LoraLoader lists them)."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0]) / "popalign"


def parse_json(text: str, arg: str, default=None):
    """A JSON value typed into a node (YAML flow style such as ``{beta: 5e3}`` is accepted too); empty -> default."""
    text = (text or "").strip()
    if not text:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        from popalign_core.common.userinput import parse_yaml

        try:
            value = parse_yaml(text, arg)
        except ValueError:
            value = None
        if isinstance(value, dict | list):
            return value
        raise ValueError(f"{arg}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def prompt_lines(text: str, arg: str = "prompts") -> list[str]:
    lines = [ln.strip() for ln in str(text).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{arg}: no prompt (one prompt per line; lines starting with # are comments)")
    return lines


class Progress:
    """comfy.utils.ProgressBar: progress in the UI, and a cancel point (ComfyUI's hook raises on interrupt)."""

    def __init__(self, total: int, node_id: str | None = None):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(max(1, int(total)))

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set(self, value: int) -> None:
        self.bar.update_absolute(value)


def check_interrupt() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def send(event: str, data: dict) -> None:
    """A websocket message to the browser (the JS extension listens), no-op without a server."""
    try:
        from server import PromptServer

        PromptServer.instance.send_sync(event, data)
    except Exception:  # noqa: BLE001 - headless tests in a plain process: nothing to tell
        pass


def save_preview_png(fig_or_png: bytes, prefix: str) -> dict:
    """Write a PNG into ComfyUI's temp folder; the UI dict entry that shows it on the node."""
    import folder_paths

    temp = Path(folder_paths.get_temp_directory())
    temp.mkdir(parents=True, exist_ok=True)
    import hashlib

    name = f"{prefix}_{hashlib.sha256(fig_or_png).hexdigest()[:12]}.png"
    (temp / name).write_bytes(fig_or_png)
    return {"filename": name, "subfolder": "", "type": "temp"}


def image_batch_to_uint8(images) -> list:
    """ComfyUI IMAGE [B, H, W, C] float 0..1 -> list of [H, W, 3] uint8 arrays."""
    import numpy as np

    if images is None or images.ndim != 4 or images.shape[0] == 0:
        shape = None if images is None else tuple(images.shape)
        raise ValueError(f"images: expected a non-empty IMAGE batch [B, H, W, C], got shape {shape}")
    arr = (images[..., :3].detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return list(arr)


def check_population(images, population, arg: str = "population") -> list[dict]:
    rows = (population or {}).get("rows")
    if not isinstance(rows, list):
        raise ValueError(f"{arg}: expected a PopAlign population (from PopAlign Population Sampler)")
    if images is not None and len(rows) != int(images.shape[0]):
        raise ValueError(
            f"{arg}: {len(rows)} rows but the IMAGE batch has {int(images.shape[0])} images; connect the images and "
            "the population of the same node"
        )
    return rows
