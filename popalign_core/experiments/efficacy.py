"""The efficacy study (docs/efficacy.md): what limits the transfer of debiasing to roles never trained on.

    python -m popalign_core.experiments.efficacy run --study roles --out runs/efficacy   # one factor
    python -m popalign_core.experiments.efficacy run --study all --out runs/efficacy     # every PopAlign row
    python -m popalign_core.experiments.efficacy run --study dal --out runs/efficacy     # the DAL rows
    python -m popalign_core.experiments.efficacy report --out runs/efficacy --doc docs/efficacy  # tables + plots
    python -m popalign_core.experiments.efficacy list                                     # the rows of each study

Every row is one PopAlign run of the demo (`experiments/demo.py`, configs/demo.yaml) with one factor changed
(`STUDIES`): the number of training roles (`data.train_roles`), images per role, training steps, the LoRA's
target (UNet attention, + text encoder, text encoder only) and beta / lr; and `popalign dal-toy` runs for DAL.
For each row the study measures, with the toy *evaluation* classifier:

* **held-out** (what a user cares about): the mean discrepancy (PopAlign Eq. 13, uniform target, mean over roles
  and axes) over the 14 held-out roles before and after, its reduction with a 95%
  bootstrap interval, identity recall and concept accuracy — exactly the demo's audit (`demo.evaluate`);
* **in-distribution**: the same discrepancy over the row's *training* roles on seeds of its own (`IN_DIST_SEED`),
  base model against the chosen checkpoint.

The checkpoint of a row is chosen as in the demo (`demo.choose_stage`: the validation roles, the training
classifier), never on held-out roles. Rows whose settings coincide (e.g. the default row of several factors)
are run once: a row's files are named by the hash of its config. Population data are shared by rows with the same
data settings. A row that is already on disk is not run again, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from popalign_core.common.fileio import atomic_write_text
from popalign_core.common.userinput import ArgumentParser, command
from popalign_core.experiments import dal_toy
from popalign_core.experiments.dal_toy import target_errors
from popalign_core.experiments.demo import build_data, train_method
from popalign_core.experiments.demo_config import load_demo_config, train_roles
from popalign_core.experiments.demo_measure import (
    _mean_disc,
    bootstrap,
    evaluate,
    neutral_labels,
    validation,
    validation_roles_bias,
)
from popalign_core.lora.files import load_lora
from popalign_core.models.loading import load_model
from popalign_core.toyworld.classifier import ToyClassifier
from popalign_core.toyworld.world import HELD_OUT_ROLES, ROLE_NAMES, TRAIN_ROLES, caption

#: the 34 training roles in the order the `roles` factor adds them (nested subsets: the first k): a seeded
#: permutation (NumPy default_rng(0), the first whose first 4 roles hold strong skews in both directions on `form`
#: and `stature`).
ROLE_ORDER = ("banker", "poet", "doctor", "baker", "fisher", "cleaner", "ranger", "tailor", "miner", "writer", "nurse",
              "hunter", "porter", "gardener", "dentist", "weaver", "builder", "judge", "teacher", "barber", "sailor",
              "waiter", "archer", "farmer", "plumber", "cook", "singer", "artist", "scholar", "smith", "clerk",
              "officer", "surgeon", "mason")  # fmt: skip
#: the points of the scaling curve (number of training roles)
ROLE_COUNTS = (4, 8, 17, 34)
IN_DIST_SEED = 7  # added to the demo's seed for the in-distribution audit (the selection uses +1 and +2)
IN_DIST_N = 64  # images per training role in the in-distribution audit


def _pop(lr: float = 1e-3, beta: float = 200.0, anchor_weight: float = 0.0, **options) -> dict:
    params: dict[str, Any] = {"beta": beta}
    if anchor_weight:
        params.update(anchor_weight=anchor_weight, anchor_target="reference")
    m: dict[str, Any] = {"loss": "popalign", "data": "population", "lr": lr, "loss_params": params}
    if options:
        m["options"] = options
    return {"methods": {"popalign": m}}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "methods" else v
    return out


def _roles(k: int) -> dict:
    """The first `k` roles of `ROLE_ORDER`, listed in the world's order (so all 34 are the demo's `all`)."""

    return {"data": {"train_roles": [r for r in TRAIN_ROLES if r in ROLE_ORDER[:k]]}}


def _images(n: int) -> dict:
    return {"data": {"samples_per_prompt": n, "neutral_per_prompt": n}}


#: cross-attention keys and values only: a linear map of the text states, the least a LoRA can change to re-read a
#: role's code (on v2 the codes share the parts' structure)
CROSS_KV = ["attn2.to_k", "attn2.to_v"]

#: study -> rows (label, demo-config overrides; `popalign` is the only method). The demo's defaults are the row
#: "default" of every factor: 34 roles, 16 + 16 images per role, 360 steps in 2 stages, UNet attention, beta 200,
#: lr 1e-3.
STUDIES: dict[str, list[tuple[str, dict]]] = {
    "roles": [(f"{k} roles", _merge(_pop(), _roles(k))) for k in ROLE_COUNTS],
    "images": [(f"{n} + {n} images per role", _merge(_pop(), _images(n))) for n in (8, 16, 32)],
    "steps": [
        ("120 steps, 2 stages", _merge(_pop(), {"train": {"steps": 120}})),
        ("720 steps, 4 stages", _merge(_pop(), {"train": {"steps": 720}, "select": {"stages": 4}})),
    ],
    "target": [
        ("UNet attention", _pop()),
        ("UNet cross-attention k/v", _pop(unet_targets=CROSS_KV)),
        ("UNet cross-attention k/v, lr 3e-3", _pop(lr=3e-3, unet_targets=CROSS_KV)),
        ("UNet cross-attention k/v, lr 1e-2", _pop(lr=1e-2, unet_targets=CROSS_KV)),
        ("UNet attention + text encoder", _pop(train_text_encoder=True)),
        ("text encoder only", _pop(train_unet=False, train_text_encoder=True)),
    ],
    "beta_lr": [
        ("beta 200, lr 1e-3", _pop()),
        ("beta 200, lr 3e-3", _pop(lr=3e-3)),
        ("beta 200, lr 1e-2", _pop(lr=1e-2)),
        ("beta 50, lr 1e-3", _pop(beta=50.0)),
        ("beta 1000, lr 1e-3", _pop(beta=1000.0)),
    ],
    # the prior-preservation anchor (the frozen model's images of the training roles' identity-specific prompts
    # and of the concepts; `anchor_target: reference`) with each LoRA target: does it keep the keywords that a
    # text-encoder LoRA loses?
    "anchor": [
        ("UNet attention + anchor 50 (lr 5e-3)", _pop(lr=5e-3, anchor_weight=50.0)),
        ("UNet + text encoder + anchor 50", _pop(anchor_weight=50.0, train_text_encoder=True)),
        ("UNet + text encoder + anchor 200", _pop(anchor_weight=200.0, train_text_encoder=True)),
        ("text encoder only + anchor 50", _pop(anchor_weight=50.0, train_unet=False, train_text_encoder=True)),
    ],
}
#: rows whose every stage is also audited on the held-out roles (the reader's trade-off curve; never for selection)
EVAL_EVERY_STAGE = {"steps"}

#: DAL rows: `popalign dal-toy` overrides (experiments/dal_toy.py DEFAULTS: 150 steps, text encoder + UNet, 34 roles)
DAL_STUDY: list[tuple[str, dict]] = [
    ("8 roles, 150 steps", {"train_roles": list(ROLE_ORDER[:8])}),
    ("34 roles, 150 steps (default)", {}),
]


def row_config(overrides: dict, quick: bool = False) -> dict:
    """The demo config of a row: configs/demo.yaml (with its `quick` sizes if `quick`) with `overrides` merged,
    validated like a user's --config."""

    return load_demo_config(quick=quick, **overrides)


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def row_key(cfg: dict) -> str:
    """A row's name on disk: the hash of the parts of its config that change its numbers, with `data.train_roles`
    spelled out (``all`` = the list); the demo's reference times and its every-stage audit sizes do not count."""

    eval_ = {k: v for k, v in cfg["eval"].items() if k != "every_stage"}
    return _key({**{k: v for k, v in cfg.items() if k != "budgets"}, "eval": eval_,
                 "data": {**cfg["data"], "train_roles": list(train_roles(cfg))}})  # fmt: skip


def _data_key(cfg: dict) -> str:
    return _key({"seed": cfg["seed"], "roles": train_roles(cfg), **{k: v for k, v in cfg["data"].items()
                                                                     if k != "train_roles"}})  # fmt: skip


def _labels_json(labels: dict) -> dict:
    return {r: {k: np.asarray(v).tolist() for k, v in lab.items()} for r, lab in labels.items()}


def _labels_np(labels: dict) -> dict:
    return {r: {k: np.asarray(v) for k, v in lab.items()} for r, lab in labels.items()}


def in_distribution(adapter, cfg: dict, clf) -> dict:
    """Mean discrepancy over the row's training roles (neutral prompts, audit sampler, `IN_DIST_N` per role, seed
    `IN_DIST_SEED` + seed), evaluation classifier. Returns the labels and the mean."""

    per = neutral_labels(adapter, cfg, train_roles(cfg), IN_DIST_N, cfg["seed"] + IN_DIST_SEED, clf)
    return {"labels": per, "mean": _mean_disc(per)}


def _in_dist_json(adapter, cfg: dict, clf) -> dict:
    d = in_distribution(adapter, cfg, clf)
    return {"labels": _labels_json(d["labels"]), "mean": d["mean"]}


def _target_errors(d: dict, target: dict, seed: int) -> dict:
    return {a: v["mean"] for a, v in target_errors(d["labels"], target, seed).items()}


def _cached(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    v = make()
    atomic_write_text(path, json.dumps(v, default=float))
    return v


def _held_out_json(e: dict) -> dict:
    return {"labels": _labels_json(e["labels"]), "mean": e["bias"]["mean"], "per_axis": e["bias"]["per_axis"],
            "identity_recall": e["identity_recall"], "identity_recall_per_axis": e["identity_recall_per_axis"],
            "concept_accuracy": e["concept_accuracy"]}  # fmt: skip


def run_row(study: str, label: str, overrides: dict, out: Path, log=print, quick: bool = False) -> dict:
    """One PopAlign row (module docstring); its result is written to out/rows/<key>.json and returned. `quick`: the
    demo's smoke sizes (numbers meaningless; for tests)."""

    cfg = row_config(overrides, quick)
    key = row_key(cfg)
    row_file = out / "rows" / f"{key}.json"
    if row_file.is_file():
        res = json.loads(row_file.read_text())
        log(f"[efficacy] {study}: {label}: on disk ({row_file})")
        return res
    t0 = time.time()
    seed = cfg["seed"]
    eval_clf, sel_clf = ToyClassifier(which="eval"), ToyClassifier(which="train")
    base = load_model("toyworld")
    base_eval = _cached(out / "base" / f"held_out_{_key(cfg['eval'])}.json",
                        lambda: _held_out_json(evaluate(base, cfg, seed, eval_clf)))  # fmt: skip
    dkey = _data_key(cfg)
    base_in = _cached(out / "base" / f"in_dist_{dkey}.json", lambda: _in_dist_json(base, cfg, eval_clf))
    base_sel = _cached(
        out / "base" / f"select_{dkey}.json",
        lambda: {
            "validation_roles_discrepancy": validation_roles_bias(base, cfg, seed, sel_clf),
            **validation(base, cfg, seed, sel_clf),
        },
    )
    data_dir = out / "data" / dkey / "run" / "data"
    if not (data_dir / "population.jsonl").is_file():
        build_data(cfg, out / "data" / dkey / "run", base, log)
    t_data = time.time() - t0
    work = out / "work" / key
    tr = train_method("popalign", cfg, data_dir, work, sel_clf, {"recall": base_sel["recall"],
                      "concept_accuracy": base_sel["concept_accuracy"]}, log)  # fmt: skip
    stages = tr["curve"] if study in EVAL_EVERY_STAGE else [tr["best"]]
    held = {}
    for st in stages:
        model = load_model("toyworld")
        load_lora(model, work / st["lora"])
        held[st["step"]] = _held_out_json(evaluate(model, cfg, seed, eval_clf))
    model = load_model("toyworld")
    load_lora(model, work / tr["best"]["lora"])
    ind = in_distribution(model, cfg, eval_clf)
    after = held[tr["best"]["step"]]
    ci = bootstrap(_labels_np(base_eval["labels"]), _labels_np(after["labels"]), cfg["eval"]["bootstrap"], seed)
    ci_in = bootstrap(_labels_np(base_in["labels"]), ind["labels"], cfg["eval"]["bootstrap"], seed)
    res = {
        "study": study,
        "label": label,
        "key": key,
        "quick": quick,
        "overrides": overrides,
        "train_roles": list(train_roles(cfg)),
        "n_train_roles": len(train_roles(cfg)),
        "held_out": {"before": base_eval["mean"], "after": after["mean"], "reduction": 1 - after["mean"] /
                     base_eval["mean"], "after_ci": ci["after"], "reduction_ci": ci["reduction"],
                     "per_axis_after": after["per_axis"], "identity_recall": after["identity_recall"],
                     "identity_recall_per_axis": after["identity_recall_per_axis"],
                     "concept_accuracy_drop": 100 * (base_eval["concept_accuracy"] - after["concept_accuracy"])},
        "in_distribution": {"before": base_in["mean"], "after": ind["mean"], "reduction": 1 - ind["mean"] /
                            base_in["mean"], "reduction_ci": ci_in["reduction"], "n_per_role": IN_DIST_N},
        "selection": {"base": base_sel, "curve": tr["curve"], "chosen_step": tr["best"]["step"], "rule": tr["why"]},
        "stages_held_out": {str(s): {k: v for k, v in h.items() if k != "labels"} for s, h in held.items()},
        "data": json.loads((data_dir.parent / "pipeline_summary.json").read_text()),
        "seconds": {"total": round(time.time() - t0, 1), "data": round(t_data, 1),
                    "train": round(tr["train_seconds"], 1), "select": round(tr["select_seconds"], 1)},
    }  # fmt: skip
    atomic_write_text(row_file, json.dumps(res, indent=1, default=float))
    h, i = res["held_out"], res["in_distribution"]
    log(f"[efficacy] {study}: {label}: held-out {h['before']:.3f} -> {h['after']:.3f} ({100 * h['reduction']:.1f}%), "
        f"recall {h['identity_recall']:.3f}; in-distribution {i['before']:.3f} -> {i['after']:.3f} "
        f"({100 * i['reduction']:.1f}%); step {tr['best']['step']}; {res['seconds']['total']:.0f} s")  # fmt: skip
    return res


def run_dal_row(label: str, overrides: dict, out: Path, log=print, quick: bool = False) -> dict:
    """One DAL row: `popalign dal-toy` with `overrides`, into out/dal/<key>/ (its results.json is the row)."""

    cfg = dal_toy._merge(dal_toy._merge(dal_toy.DEFAULTS, dal_toy.QUICK) if quick else dal_toy.DEFAULTS, overrides)
    key = _key(cfg)
    d = out / "dal" / key
    if (d / "results.json").is_file():
        res = json.loads((d / "results.json").read_text())
    else:
        res = dal_toy.run(d, cfg, log=log)
    # in-distribution beside held-out: the same target errors on the training roles (audit sampler, own seeds)

    roles = res["settings"]["train_roles"]
    icfg = row_config({"data": {"train_roles": list(roles)}}, quick)
    clf, target = ToyClassifier(which="eval"), cfg["dal"]["target"]
    base = _cached(
        out / "base" / f"dal_in_dist_{_key([roles, target, quick])}.json",
        lambda: _target_errors(in_distribution(load_model("toyworld"), icfg, clf), target, cfg["seed"]),
    )
    model = load_model("toyworld")
    load_lora(model, res["training"]["outputs"]["kohya"])
    after = _target_errors(in_distribution(model, icfg, clf), target, cfg["seed"])
    row = {"study": "dal", "label": label, "key": key, "quick": quick, "overrides": overrides, "results": res,
           "in_distribution": {"before": base, "after": after, "n_per_role": IN_DIST_N}}  # fmt: skip
    atomic_write_text(out / "rows" / f"dal_{key}.json", json.dumps(row, indent=1, default=float))
    return row


def study_names(study: str) -> list[str]:
    """`--study`: a study, several separated by commas (run in that order), or ``all`` (the PopAlign studies)."""
    names = list(STUDIES) if study == "all" else [s.strip() for s in study.split(",") if s.strip()]
    bad = [n for n in names if n not in STUDIES and n != "dal"]
    if bad or not names:
        raise ValueError(f"--study {study!r}: unknown study {', '.join(bad) or '(none)'}; valid: "
                         f"{', '.join([*STUDIES, 'dal', 'all'])}")  # fmt: skip
    return names


def run_study(study: str, out: str | Path, log=print, quick: bool = False) -> list[dict]:
    """Every row of the studies named by `study` (`study_names`); rows on disk are read, not run again."""
    out = Path(out)
    names = study_names(study)
    for name in names:  # every row validated before any work
        for _, o in STUDIES.get(name, []):
            row_config(o, quick)
    rows = []
    for name in names:
        if name == "dal":
            rows += [run_dal_row(label, o, out, log, quick) for label, o in DAL_STUDY]
            continue
        rows += [run_row(name, label, o, out, log, quick) for label, o in STUDIES[name]]
    return rows


# ------------------------------------------------------------------------------------------------ role codes
def role_codes(adapter, roles) -> np.ndarray:
    """The text encoder's state at the first end-of-text token of ``"a photo of a <role>"`` for each role, [R, D]
    (through causal attention that position sees the whole caption; the UNet's cross-attention reads it)."""
    import torch

    prompts = [caption(r) for r in roles]
    tok = adapter.tokenizers[0]
    with torch.no_grad():
        states = adapter.encode_prompt(prompts).embeds.float().cpu().numpy()
    ids = tok(prompts, padding="max_length", max_length=states.shape[1], truncation=True)["input_ids"]
    pos = [row.index(tok.eos_token_id) for row in ids]
    return np.stack([states[i, p] for i, p in enumerate(pos)])


def code_span(adapter=None) -> dict:
    """How much of each held-out role's code the training roles' codes span, for the `roles` factor's subsets.

    Codes are centred by the mean over the training roles (no held-out information). For a held-out role h and a
    training subset S, outside(h, S) = |c_h - P_S c_h|^2 / |c_h|^2, with P_S the orthogonal projection onto the span
    of the centred codes of S (0: inside the span, 1: orthogonal to it). Also the mean pairwise cosine of the
    centred codes. A LoRA that learns a correction as a function of the training roles' codes acts on a held-out
    role only through the part of its code inside that span."""

    adapter = adapter or load_model("toyworld")
    codes = dict(zip(ROLE_NAMES, role_codes(adapter, ROLE_NAMES)))
    mean = np.mean([codes[r] for r in TRAIN_ROLES], axis=0)
    c = {r: v - mean for r, v in codes.items()}
    unit = np.stack([v / np.linalg.norm(v) for v in c.values()])
    cos = unit @ unit.T
    out = {"mean_pairwise_cosine": float(cos[np.triu_indices(len(unit), 1)].mean()), "outside_span": {}}
    for k in ROLE_COUNTS:
        basis, _ = np.linalg.qr(np.stack([c[r] for r in ROLE_ORDER[:k]]).T)
        res = {h: float(np.sum((c[h] - basis @ (basis.T @ c[h])) ** 2) / np.sum(c[h] ** 2)) for h in HELD_OUT_ROLES}
        out["outside_span"][k] = {"per_role": res, "mean": float(np.mean(list(res.values())))}
    return out


# ------------------------------------------------------------------------------------------------ report
def _rows(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "rows").glob("*.json"))}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _goal_line(ax, x: float, text: str) -> None:
    """The 56 % line (the PopAlign paper's SDXL gender reduction) with its label at `x`, and room above it."""
    ax.axhline(56, ls="--", c="grey", lw=0.8)
    ax.text(x, 57, text, fontsize=7, color="grey")
    ax.set_ylim(top=max(ax.get_ylim()[1], 62))


def _fallback(r: dict) -> bool:
    """Whether a row kept its first stage because no stage stayed within the validation limits."""
    return r["selection"]["rule"].startswith("no stage")


def _anchored(r: dict) -> bool:
    """Whether a row trains with the prior-preservation anchor (`loss_params.anchor_weight` > 0)."""
    m = r.get("overrides", {}).get("methods", {}).get("popalign", {})
    return float(m.get("loss_params", {}).get("anchor_weight", 0.0)) > 0


def _kept_table(by_key: dict[str, dict], default_key: str) -> list[str]:
    """Markdown: every row's kept stage, sorted by held-out identity recall (highest first), the trade-off all the
    settings share; the row with the demo's defaults is named so."""
    if not by_key:
        return []
    md = ["### kept stages by held-out identity recall", "",
          "| row | held-out reduction | identity recall | concept drop | kept stage within the validation limits |",
          "|---|---|---|---|---|"]  # fmt: skip
    for key, r in sorted(by_key.items(), key=lambda kv: (-kv[1]["held_out"]["identity_recall"], kv[0])):
        h = r["held_out"]
        name = "the defaults" if key == default_key else f"{r['study']}: {r['label']}"
        inside = "no (first stage)" if _fallback(r) else "yes"
        md.append(f"| {name} | {_pct(h['reduction'])} | {h['identity_recall']:.3f} | "
                  f"{h['concept_accuracy_drop']:.0f} | {inside} |")  # fmt: skip
    return [*md, ""]


def report(out: str | Path, doc: str | Path) -> str:
    """Markdown tables of every study (rows found on disk) and the plots (scaling curve, trade-off curve), written
    to `doc`/tables.md, `doc`/scaling.png, `doc`/tradeoff.png, `doc`/rows.json; returns the markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, doc = Path(out), Path(doc)
    doc.mkdir(parents=True, exist_ok=True)
    rows = _rows(out)
    by_key = {r["key"]: r for r in rows.values() if r.get("study") != "dal"}
    quick = any(r.get("quick") for r in by_key.values())
    md = []
    for study, spec in STUDIES.items():
        got = [(label, by_key.get(row_key(row_config(o, quick)))) for label, o in spec]
        if not any(r for _, r in got):
            continue
        md += [
            f"### {study}",
            "",
            "| setting | held-out after | held-out reduction (95% CI) | identity recall | "
            "concept drop | in-distribution reduction (95% CI) | chosen step |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, r in got:
            if r is None:
                md.append(f"| {label} | not run | | | | | |")
                continue
            h, i = r["held_out"], r["in_distribution"]
            md.append(f"| {label} | {h['after']:.3f} | {_pct(h['reduction'])} [{_pct(h['reduction_ci'][0])}, "
                      f"{_pct(h['reduction_ci'][1])}] | {h['identity_recall']:.3f} | {h['concept_accuracy_drop']:.0f} "
                      f"| {_pct(i['reduction'])} [{_pct(i['reduction_ci'][0])}, {_pct(i['reduction_ci'][1])}] | "
                      f"{r['selection']['chosen_step']} / {r['selection']['curve'][-1]['step']}"
                      f"{' ⚠' if _fallback(r) else ''} |")  # fmt: skip
        md.append("")
    md += _kept_table(by_key, row_key(row_config(_pop(), quick)))
    dal = [r for r in rows.values() if r.get("study") == "dal"]
    if dal:
        md += [
            "### dal (target: form 50/50, stature 75/25; error = mean over roles of |share - target|)",
            "",
            "| setting | held-out form error | held-out stature error | identity recall | concept drop | "
            "in-distribution form error | in-distribution stature error |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in dal:
            res, ind = r["results"], r.get("in_distribution") or {}
            err, b = res["target_error_mean"], res["target_error_mean_before"]
            ib, ia = ind.get("before", {}), ind.get("after", {})
            cells = [f"{b[a]:.3f} → {err[a]:.3f}" for a in ("form", "stature")]
            icells = [f"{ib[a]:.3f} → {ia[a]:.3f}" if a in ia else "" for a in ("form", "stature")]
            md.append(
                f"| {r['label']} | {cells[0]} | {cells[1]} | {res['identity_recall']:.3f} | "
                f"{res['concept_accuracy_drop']:.0f} | {icells[0]} | {icells[1]} |"
            )
        md.append("")
    # scaling curve: held-out and in-distribution reduction against the number of training roles
    pts = [
        (r["n_train_roles"], r) for label, o in STUDIES["roles"] if (r := by_key.get(row_key(row_config(o, quick))))
    ]
    if pts:
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        xs = [p[0] for p in pts]
        for part, colour in (("held_out", "C0"), ("in_distribution", "C1")):
            ys = np.array([100 * p[1][part]["reduction"] for p in pts])
            lo = np.array([100 * p[1][part]["reduction_ci"][0] for p in pts])
            hi = np.array([100 * p[1][part]["reduction_ci"][1] for p in pts])
            ax.errorbar(xs, ys, yerr=[ys - lo, hi - ys], marker="o", capsize=3, color=colour,
                        label=part.replace("_", "-") + " roles")  # fmt: skip
        _goal_line(ax, xs[0], "paper (SDXL gender): 56%")
        ax.set_xlabel("training roles (prompts)")
        ax.set_ylabel("discrepancy reduction (%)")
        ax.set_xticks(xs)
        ax.legend(fontsize=8)
        ax.set_title("PopAlign on the toy world: reduction vs training roles", fontsize=9)
        fig.tight_layout()
        fig.savefig(doc / "scaling.png")
        plt.close(fig)
    # trade-off: held-out reduction against identity recall, the kept stage of every row and every audited stage of
    # the rows that audit them all (reader only)
    trade = [r for r in by_key.values() if len(r["stages_held_out"]) > 1]
    if by_key:
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        for anchored, colour, name in ((False, "0.55", "kept stage of a row"), (True, "C3", "kept stage, anchored")):
            pts = [(r["held_out"]["identity_recall"], 100 * r["held_out"]["reduction"]) for r in by_key.values()
                   if _anchored(r) == anchored]  # fmt: skip
            if pts:
                ax.scatter(*zip(*pts), s=14, c=colour, marker="s" if anchored else "o", label=name, zorder=3)
        for r in trade:
            st = sorted(r["stages_held_out"].items(), key=lambda kv: int(kv[0]))
            before = r["held_out"]["before"]
            x = [v["identity_recall"] for _, v in st]
            y = [100 * (1 - v["mean"] / before) for _, v in st]
            ax.plot(x, y, marker="o", label=r["label"])
            for (s, _), xi, yi in zip(st, x, y):
                ax.annotate(s, (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.axvline(0.95, ls="--", c="grey", lw=0.8)
        ax.set_xlabel("held-out identity recall")
        ax.set_ylabel("held-out reduction (%)")
        ax.legend(fontsize=7)
        _goal_line(ax, ax.get_xlim()[0], "goal: 56% at recall >= 0.95")
        ax.set_title("held-out reduction vs recall (kept stages; every stage of the steps rows)", fontsize=9)
        fig.tight_layout()
        fig.savefig(doc / "tradeoff.png")
        plt.close(fig)
    text = "\n".join(md)
    atomic_write_text(doc / "tables.md", text + "\n")
    slim = {k: {kk: vv for kk, vv in r.items() if kk != "results"} | (
        {"results": {kk: vv for kk, vv in r["results"].items() if kk != "labels"}} if "results" in r else {})
        for k, r in rows.items()}  # fmt: skip
    atomic_write_text(doc / "rows.json", json.dumps(slim, indent=1, default=float) + "\n")
    return text


@command("popalign efficacy")
def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="popalign efficacy", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the rows of a study (rows on disk are kept)")
    r.add_argument("--study", required=True, help=f"{', '.join([*STUDIES, 'dal'])}, several separated by commas, "
                   "or all (every PopAlign study)")  # fmt: skip
    r.add_argument("--out", default="runs/efficacy")
    r.add_argument("--quick", action="store_true", help="the demo's smoke sizes (numbers meaningless)")
    p = sub.add_parser("report", help="tables and plots from the rows on disk")
    p.add_argument("--out", default="runs/efficacy")
    p.add_argument("--doc", default="docs/efficacy")
    sub.add_parser("list", help="the rows of every study")
    c = sub.add_parser("codes", help="how much of the held-out roles' text codes the training roles span (JSON)")
    c.add_argument("--out", default=None, help="also write the JSON to this file")
    a = ap.parse_args(argv)
    if a.cmd == "list":
        for name, spec in {**STUDIES, "dal": DAL_STUDY}.items():
            print(f"{name}: " + "; ".join(label for label, _ in spec))
        return 0
    if a.cmd == "codes":
        text = json.dumps(code_span())
        if a.out:
            atomic_write_text(Path(a.out), text + "\n")
        print(text)
        return 0
    if a.cmd == "run":
        run_study(a.study, a.out, quick=a.quick)
        return 0
    print(report(a.out, a.doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
