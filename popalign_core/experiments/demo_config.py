"""The demo's settings: popalign_core/configs/demo.yaml, its `quick` sizes, a user's YAML and overrides merged over
it, every value checked before any work (`load_demo_config`), and the training roles of the preference data
(`train_roles`). See `experiments.demo` for what the settings drive.
"""

from __future__ import annotations

import copy
from pathlib import Path

from popalign_core.common.userinput import parse_number, read_yaml
from popalign_core.dal.trainer import DALConfig
from popalign_core.toyworld.world import HELD_OUT_ROLES, ROLE_NAMES, TRAIN_ROLES, VALIDATION_ROLES
from popalign_core.train.losses import LOSSES, loss_config
from popalign_core.train.trainer import TrainConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
METHODS = ("popalign", "popalign_anchor", "sft", "dpo", "dal")


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if k not in out:
            raise ValueError(f"unknown demo config key {where + k!r}; valid keys: {', '.join(sorted(out))}")
        if isinstance(out[k], dict) and k != "methods" and not (k == "every_stage" and v is False):
            if not isinstance(v, dict):
                raise ValueError(f"demo config key {where + k!r}: expected a mapping, got {type(v).__name__}")
            out[k] = _merge(out[k], v, f"{where}{k}.")
        else:
            out[k] = copy.deepcopy(v)
    return out


# `popalign train` settings the demo sets itself (the rest can be given per method as `options`)
_DEMO_TRAIN_KEYS = frozenset({
    "model", "data", "loss", "loss_params", "lr", "lora_rank", "batch_size", "seed", "steps", "checkpoint_every",
    "keep_checkpoints", "progress", "lora_formats", "lora_name", "output_dir", "resume", "anchor_prompts",
    "anchor_images_per_prompt", "anchor_guidance", "anchor_sampler_steps", "anchor_batch_size",
})  # fmt: skip


def _check_lr(name: str, m: dict) -> None:
    lr = parse_number(m["lr"]) if isinstance(m["lr"], str) else m["lr"]
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < float("inf"):
        raise ValueError(f"methods.{name}.lr={m['lr']!r} is invalid: must be a finite number > 0")
    m["lr"] = float(lr)


def _check_options(name: str, m: dict, config_cls, taken: frozenset, command: str) -> None:
    """`methods.<name>.options`: settings of `command`'s config (`config_cls`) that the demo does not set itself."""
    opts = m.get("options") or {}
    if not isinstance(opts, dict):
        raise ValueError(f"methods.{name}.options: expected a mapping of `{command}` settings, got {opts!r}")
    for k in opts:
        if k in taken or k not in config_cls.__dataclass_fields__:
            free = sorted(set(config_cls.__dataclass_fields__) - taken)
            raise ValueError(f"methods.{name}.options: {k!r} is not a `{command}` setting the demo leaves open; "
                             f"valid: {', '.join(free)}")  # fmt: skip


def _check_method(name: str, m: dict) -> None:
    """A method's loss, learning rate, batch size and loss hyper-parameters, checked before any work."""

    if m["loss"] not in LOSSES:
        raise ValueError(f"methods.{name}.loss={m['loss']!r} is not a known loss; valid values: {', '.join(LOSSES)}")
    _check_lr(name, m)
    bs = m.get("batch_size", 1)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"methods.{name}.batch_size={bs!r} is invalid: must be an integer >= 1")
    params = m.get("loss_params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"methods.{name}.loss_params: expected a mapping of hyper-parameters, got {params!r}")
    try:
        loss_config(m["loss"], **params)
    except ValueError as e:
        raise ValueError(f"methods.{name}.loss_params: {e}") from None

    _check_options(name, m, TrainConfig, _DEMO_TRAIN_KEYS, "popalign train")


# `popalign dal` settings the demo sets itself for the `dal` method (the rest can be given as `options`)
_DEMO_DAL_KEYS = frozenset({
    "model", "prompts", "prompts_file", "target", "prompt_targets", "classifier", "classifier_options", "lr",
    "lora_rank", "seed", "steps", "checkpoint_every", "keep_checkpoints", "progress", "lora_formats", "lora_name",
    "output_dir", "resume",
})  # fmt: skip


def _check_dal_method(name: str, m: dict) -> None:
    """The `dal` method: distributional alignment (`popalign dal`) of the training roles' neutral prompts towards
    the uniform target on every axis, its identity-specific prompts kept to their named class (`prompt_targets`)."""

    if name != "dal" or m["loss"] != "dal" or m["data"] != "prompts":
        raise ValueError(
            f"methods.{name}: distributional alignment is the method `dal` with loss: dal and "
            "data: prompts (it trains on the training roles' prompts, not on preference data)"
        )
    _check_lr(name, m)
    st = m.get("steps", 1)
    if isinstance(st, bool) or not isinstance(st, int) or st < 1:
        raise ValueError(f"methods.{name}.steps={st!r} is invalid: must be an integer >= 1")
    extra = set(m) - {"loss", "data", "lr", "steps", "options"}
    if extra:
        raise ValueError(f"methods.{name}: unknown key {sorted(extra)[0]!r}; valid: loss, data, lr, steps, options")
    _check_options(name, m, DALConfig, _DEMO_DAL_KEYS, "popalign dal")
    opts = m.get("options") or {}
    if opts.get("ot_method", DALConfig.__dataclass_fields__["ot_method"].default) == "exact":
        import math

        from popalign_core.dal.ot import check_exact_size
        from popalign_core.toyworld.world import TOY_AXES

        n = opts.get("images_per_prompt", DALConfig.__dataclass_fields__["images_per_prompt"].default)
        try:  # the demo's target is uniform on every toy axis: their joint classes
            check_exact_size(n, math.prod(len(c) for c in TOY_AXES.values()))
        except ValueError as exc:
            raise ValueError(f"methods.{name}.options: {exc}") from None


def load_demo_config(path: str | Path | None = None, quick: bool = False, **overrides) -> dict:
    """The demo's settings: the packaged demo.yaml, then `quick`'s sizes, then `path` (merged: the user's values win
    and are all validated), then `overrides`."""
    cfg = read_yaml(DEFAULT_CONFIG, "packaged demo config")
    quick_over = cfg.pop("quick")
    quick_dal = quick_over.pop("dal")
    if quick:
        cfg = _merge(cfg, quick_over)
        dal = cfg["methods"]["dal"]
        dal.update(steps=quick_dal["steps"], options={**dal.get("options", {}), **quick_dal["options"]})
    if path is not None:
        cfg = _merge(cfg, read_yaml(path, "demo config"))
    cfg = _merge(cfg, overrides)
    for name, m in cfg["methods"].items():
        if name not in METHODS:
            raise ValueError(f"methods: unknown method {name!r}; valid: {', '.join(METHODS)}")
        for key in ("loss", "data", "lr"):
            if key not in m:
                raise ValueError(f"methods.{name}: {key!r} is required")
        if name == "dal" or m["loss"] == "dal":
            _check_dal_method(name, m)
            continue
        if m["data"] not in ("population", "pairwise"):
            raise ValueError(f"methods.{name}.data must be 'population' or 'pairwise'; got {m['data']!r}")
        _check_method(name, m)
    positive = {
        "eval": ("n_per_role", "n_per_identity", "n_per_concept", "steps"),
        "select": ("n_per_role", "stages", "n_per_identity", "n_per_concept"),
        "train": ("steps", "batch_size", "lora_rank"),
    }
    for sec, keys in positive.items():
        for k in keys:
            v = cfg[sec][k]
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{sec}.{k}: expected an int >= 1, got {v!r}")
    every = cfg["eval"].get("every_stage")
    if every is not False:
        if not isinstance(every, dict) or set(every) != {"n_per_role", "n_per_identity", "n_per_concept"}:
            raise ValueError(f"eval.every_stage={every!r}: expected false or a mapping with n_per_role, "
                             "n_per_identity and n_per_concept")  # fmt: skip
        for k, v in every.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"eval.every_stage.{k}: expected an int >= 1, got {v!r}")
    if cfg["train"]["steps"] < cfg["select"]["stages"]:
        raise ValueError("train.steps must be >= select.stages (each stage trains at least one step)")
    train_roles(cfg)
    return cfg


def train_roles(cfg: dict) -> tuple[str, ...]:
    """`data.train_roles`: the training roles whose prompts make the preference data (``all`` = the toy world's 34
    `TRAIN_ROLES`). Held-out roles are refused (they are what is measured), and so are validation roles (they
    choose checkpoints)."""

    v = cfg["data"]["train_roles"]
    if v == "all":
        return TRAIN_ROLES
    if isinstance(v, str) or not isinstance(v, list) or not v:
        raise ValueError(f"data.train_roles={v!r}: expected 'all' or a non-empty list of training roles "
                         f"({', '.join(TRAIN_ROLES)})")  # fmt: skip
    for r in v:
        if r in HELD_OUT_ROLES:
            raise ValueError(f"data.train_roles: {r!r} is a held-out role (held out: {', '.join(HELD_OUT_ROLES)}); "
                             "training on it would measure nothing held out")  # fmt: skip
        if r in VALIDATION_ROLES:
            raise ValueError(f"data.train_roles: {r!r} is a validation role (validation: {', '.join(VALIDATION_ROLES)}"
                             "); it chooses checkpoints, so it stays out of the training data")  # fmt: skip
        if r not in ROLE_NAMES:
            raise ValueError(f"data.train_roles: unknown role {r!r}; training roles: {', '.join(TRAIN_ROLES)}")
    if len(set(v)) != len(v):
        raise ValueError(f"data.train_roles: {next(r for r in v if v.count(r) > 1)!r} is listed twice")
    return tuple(v)
