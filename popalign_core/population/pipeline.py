"""``popalign data``: the population data pipeline (PopAlign Sec. 4.1).

``popalign data augment --prompts FILE --out augmented.jsonl [--keywords default|toy|FILE.json] [--axes race,gender]
[--template T] [--samples-per-prompt N] [--seed S]``: identity-neutral prompts -> identity-augmented prompts, one
JSONL row per sample ({"neutral", "prompt", "identity", "index"}). Prompts that already name an identity are
reported and not augmented (`prompts.is_identity_specific`). The last line printed is a JSON summary.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from popalign_core.classify.classifiers import make_classifier
from popalign_core.common.fileio import atomic_write_text, check_replaceable, claim_output_dir
from popalign_core.common.manifest import write_manifest
from popalign_core.common.userinput import (
    PROMPTS_FOLDER,
    ArgumentParser,
    command,
    integer,
    number,
    parse_number,
    parse_value,
    read_text,
    read_yaml,
)
from popalign_core.models.loading import load_model
from popalign_core.models.loading_options import MODEL_FILE_OPTIONS, add_model_file_arguments, model_file_kwargs
from popalign_core.models.sampling import SCHEDULER_CHOICES, SamplerConfig
from popalign_core.population.build import BUILD_OUTPUTS, BUILD_RULES, ON_SHORT, BuildConfig, build_preferences
from popalign_core.population.filter import FILTER_OUTPUTS, FilterConfig, check_rows, filter_population
from popalign_core.population.prompts import (
    AUGMENT_KEYWORDS,
    DEFAULT_KEYWORDS,
    AugmentConfig,
    augment_prompts,
    check_keyword_config,
)
from popalign_core.population.sample import SAMPLE_OUTPUTS, population_jobs, sample_population

#: What `popalign data pipeline` writes in its `out` folder (`fileio.claim_output_dir`).
PIPELINE_OUTPUTS = {
    "augmented.jsonl": None,
    "samples": SAMPLE_OUTPUTS,
    "filtered": FILTER_OUTPUTS,
    "data": BUILD_OUTPUTS,
    "pipeline_summary.json": None,
}


def read_prompt_file(path: str | Path) -> tuple[list[str], dict[str, Any]]:
    """Prompts of a text file (one per line; ``#`` starts a comment line; blank lines skipped) and a report
    {"blank_lines": [line numbers], "duplicate_lines": [line numbers]} (duplicates: later copies, dropped)."""
    p = Path(path)
    text = read_text(p, "prompts file", folder=PROMPTS_FOLDER)
    prompts, seen, blank, dup = [], set(), [], []
    for no, line in enumerate(text.splitlines(), start=1):
        text = " ".join(line.split())
        if not text:
            blank.append(no)
            continue
        if text.startswith("#"):
            continue
        bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise ValueError(f"prompts file {str(p)!r}, line {no}: control character {bad!r} in a prompt (a binary "
                             "file?); prompts are plain text, one per line")  # fmt: skip
        if text in seen:
            dup.append(no)
            continue
        seen.add(text)
        prompts.append(text)
    if not prompts:
        raise ValueError(f"prompts file {str(p)!r} holds no prompt (only blank or # comment lines)")
    return prompts, {"blank_lines": blank, "duplicate_lines": dup}


def keyword_sets(spec: str) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, list[str]]], tuple[str, ...]]:
    """(augmentation keywords, detector keywords, default axes) for --keywords: "default" (the paper's gender and
    race keywords; age optional), "toy" (the toy world's) or a JSON file {axis: {class: [keyword, ...]}} (the
    first keyword of each class is written by augmentation, all of them are detected)."""
    if not isinstance(spec, str):
        raise ValueError(f"keywords must be 'default', 'toy' or a JSON file; got {spec!r}")
    if spec == "default":
        return {a: dict(v) for a, v in AUGMENT_KEYWORDS.items()}, DEFAULT_KEYWORDS, ("race", "gender")
    if spec == "toy":
        from popalign_core.toyworld.world import KEYWORDS

        detect = {a: {c: list(k) for c, k in v.items()} for a, v in KEYWORDS.items()}
        return {a: {c: k[0] for c, k in v.items()} for a, v in detect.items()}, detect, ("form",)
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"--keywords must be 'default', 'toy' or a JSON file; {spec!r} is none of them")
    try:
        detect = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--keywords {spec!r}: not valid JSON ({e})") from e

    try:
        check_keyword_config(detect)
    except ValueError as e:
        raise ValueError(f"--keywords {spec!r}: {e}") from e
    return {a: {c: list(k)[0] for c, k in v.items()} for a, v in detect.items()}, detect, tuple(detect)


# ------------------------------------------------------------------------------------------------ pipeline config
PIPELINE_SECTIONS: dict[str, tuple[str, ...]] = {
    "augment": ("keywords", "axes", "template", "samples_per_prompt", "seed"),
    "sample": ("steps", "guidance_scale", "scheduler", "seed", "batch_size", "neutral_per_prompt", "time_budget_s",
               "height", "width", "negative_prompt"),
    "filter": ("classifier", "classifier_options", "threshold", "axes"),
    "build": ("set_size", "set_count", "rule", "group_axes", "pairs", "seed", "on_short"),
}  # fmt: skip
PIPELINE_TOP = ("model", "prompts", "out", "family", "dtype", "device", *MODEL_FILE_OPTIONS, "augment", "sample",
                "filter", "build")  # fmt: skip


def load_pipeline_config(path: str | Path | None = None, **overrides) -> dict:
    """A pipeline config (YAML) checked for unknown keys: top level `PIPELINE_TOP`, sections `PIPELINE_SECTIONS`.
    `overrides` replace top-level keys (e.g. out=...)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        data = read_yaml(p, "config file")
        if isinstance(data.get("prompts"), str) and not Path(data["prompts"]).is_absolute():
            data["prompts"] = str((p.parent / data["prompts"]).resolve())
        aug = data.get("augment")
        kw = aug.get("keywords") if isinstance(aug, dict) else None
        if isinstance(kw, str) and kw not in ("default", "toy") and not Path(kw).is_absolute():
            aug["keywords"] = str((p.parent / kw).resolve())  # a keywords file beside the config, like `prompts`
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(data) - set(PIPELINE_TOP))
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(PIPELINE_TOP)}")
    for sec, keys in PIPELINE_SECTIONS.items():
        val = data.setdefault(sec, {}) or {}
        if not isinstance(val, dict):
            raise ValueError(f"config section {sec!r}: expected a mapping, got {type(val).__name__}")
        bad = sorted(set(val) - set(keys))
        if bad:
            raise ValueError(f"unknown key {bad[0]!r} in section {sec!r}; valid keys: {', '.join(keys)}")
        data[sec] = val
    for key in ("model", "prompts", "out"):
        if not str(data.get(key) or "").strip():
            raise ValueError(f"config key {key!r} is required (and not empty)")
    return data


def augment_config(section: dict) -> tuple[AugmentConfig, dict]:
    keywords, detect, axes = keyword_sets(section.get("keywords", "default"))
    ax = section.get("axes") or axes
    if isinstance(ax, str):
        ax = [x.strip() for x in ax.split(",") if x.strip()]
    kw: dict[str, Any] = {"axes": tuple(ax), "keywords": keywords, "detect": detect}
    for k in ("template", "samples_per_prompt", "seed"):
        if section.get(k) is not None:
            kw[k] = section[k]
    cfg = AugmentConfig(**kw)
    cfg.check()
    return cfg, detect


def sampler_config(section: dict):
    kw = {k: v for k, v in section.items() if k not in ("neutral_per_prompt", "time_budget_s") and v is not None}
    return SamplerConfig(**kw)


def make_filter_classifier(section: dict):
    name = section.get("classifier", "toy")
    return make_classifier(name, **(section.get("classifier_options") or {}))


def filter_config(section: dict):
    kw = {k: v for k, v in section.items() if k in ("threshold", "axes") and v is not None}
    if "axes" in kw:
        kw["axes"] = tuple(kw["axes"])
    cfg = FilterConfig(**kw)
    cfg.check()
    return cfg


def build_config(section: dict):
    kw = dict(section)
    if kw.get("group_axes"):
        kw["group_axes"] = tuple(kw["group_axes"])
    cfg = BuildConfig(**kw)
    cfg.check()
    return cfg


def run_pipeline(config: dict, adapter=None, log=print, progress=None) -> dict:
    """augment -> sample -> filter -> build, into config["out"]/{augmented.jsonl, samples/, filtered/, data/}.
    Resumable: re-running skips finished images (sampling) and redoes the cheap stages. Returns the summary (also
    written to out/pipeline_summary.json). `adapter`: an already loaded model adapter (else config["model"])."""

    out = Path(config["out"])
    t0 = time.time()
    timings: dict[str, float] = {}
    # validate every section before any work
    acfg, _ = augment_config(config["augment"])
    scfg = sampler_config(config["sample"])
    fcfg = filter_config(config["filter"])
    bcfg = build_config(config["build"])
    clf = make_filter_classifier(config["filter"])
    prompts = config["prompts"]
    if isinstance(prompts, str):
        prompts, report = read_prompt_file(prompts)
    else:
        prompts, report = list(prompts), {"blank_lines": [], "duplicate_lines": []}
    res = augment_prompts(prompts, acfg)
    check_augmented(res, len(prompts), "prompts")
    for key in ("neutral_per_prompt", "time_budget_s"):  # numbers written as text ("6e2") are numbers
        v = config["sample"].get(key)
        if isinstance(v, str) and parse_number(v) is not None:
            config["sample"][key] = parse_number(v)
    jobs = population_jobs(res.rows, config["sample"].get("neutral_per_prompt"))
    check_rows(jobs, clf, fcfg, "the augmented prompts")  # the filter's axes and classes, before any sampling
    budget = config["sample"].get("time_budget_s")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0):
        raise ValueError(f"sample.time_budget_s: expected a number > 0 (seconds) or none, got {budget!r}")
    if adapter is None:
        from popalign_core.models.loading import resolve_model_path

        if not Path(resolve_model_path(config["model"])).exists():
            raise FileNotFoundError(f"model {config['model']!r} does not exist (a checkpoint file, a diffusers "
                                    "folder or 'toyworld')")  # fmt: skip
    claim_output_dir(out, "data pipeline", PIPELINE_OUTPUTS, arg="out", signature="augmented.jsonl")
    write_manifest(out / "augmented.jsonl", res.rows)
    timings["augment"] = time.time() - t0
    log(f"[pipeline] augment: {len(res.rows)} rows, {len(res.skipped)} identity-specific prompts skipped")
    if adapter is None:
        from popalign_core.models.loading import load_model

        kw = {k: config[k] for k in ("family", "dtype", "device") if config.get(k)}
        adapter = load_model(config["model"], **kw, **model_file_kwargs(config))
    t = time.time()
    ssum = sample_population(
        adapter, jobs, out / "samples", scfg, str(config["model"]),
        time_budget_s=config["sample"].get("time_budget_s"), progress=progress, log=log,
    )  # fmt: skip
    timings["sample"] = time.time() - t
    if not ssum["complete"]:
        log(f"[pipeline] sampling stopped at {ssum['done']}/{ssum['jobs']} images ({ssum['stopped_by']}); "
            "the next stages use the finished images; re-run to sample the rest")  # fmt: skip
    t = time.time()
    frep = filter_population(out / "samples", clf, out / "filtered", fcfg, log)
    timings["filter"] = time.time() - t
    t = time.time()
    bsum = build_preferences(out / "filtered", out / "data", bcfg, log)
    timings["build"] = time.time() - t
    summary = {
        "out": str(out),
        "augment": {"rows": len(res.rows), "skipped": res.skipped, "duplicates": res.duplicates, **report},
        "sample": ssum,
        "filter": {k: frep[k] for k in ("images", "kept", "reasons", "per_population", "skipped_rows")},
        "build": {k: bsum[k] for k in ("sets", "pairs", "images_in_sets", "shortfalls", "ties_dropped", "files")},
        "seconds": {k: round(v, 2) for k, v in timings.items()} | {"total": round(time.time() - t0, 2)},
    }
    atomic_write_text(out / "pipeline_summary.json", json.dumps(summary, indent=2))
    return summary


def check_augmented(res, n_prompts: int, arg: str = "--prompts") -> None:
    """No silent success: augmentation that leaves no row (every prompt names an identity) is an error."""
    if res.rows:
        return
    if res.skipped and len(res.skipped) >= n_prompts - len(res.duplicates or []):
        shown = "; ".join(repr(s["prompt"]) for s in res.skipped[:3])
        raise ValueError(
            f"{arg}: no identity-neutral prompt left: all {len(res.skipped)} prompt(s) already name an identity "
            f"(e.g. {shown}), and augmentation needs neutral prompts such as 'a photo of a doctor'"
        )
    raise ValueError(f"{arg}: augmentation produced no row (samples_per_prompt or the axes leave nothing to write)")


# ------------------------------------------------------------------------------------------------ CLI
def _sampler_args(p: ArgumentParser) -> None:
    h = SamplerConfig.help()
    p.add_argument("--steps", type=integer, default=25, help=h["steps"])
    p.add_argument("--guidance-scale", type=number, default=7.5, help=h["guidance_scale"])
    p.add_argument("--scheduler", default="auto", choices=list(SCHEDULER_CHOICES), help=h["scheduler"])
    p.add_argument("--seed", type=integer, default=0, help=h["seed"])
    p.add_argument("--batch-size", type=integer, default=8, help=h["batch_size"])
    p.add_argument("--height", type=integer, default=None, help=h["height"])
    p.add_argument("--width", type=integer, default=None, help=h["width"])
    p.add_argument("--negative-prompt", default="", help=h["negative_prompt"])


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="popalign data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    aug = sub.add_parser("augment", help="identity-neutral prompts -> identity-augmented prompts (JSONL)")
    aug.add_argument("--prompts", required=True, help="text file: one neutral prompt a line, # comments")
    aug.add_argument("--out", required=True, help="output JSONL (one row per augmented sample)")
    aug.add_argument("--keywords", default="default", help="'default' (paper's gender/race), 'toy', or a JSON file")
    aug.add_argument("--axes", default=None, help="comma-separated axes to combine (default: race,gender; toy: form)")
    aug.add_argument("--template", default=None, help=f"augmentation template (default: {AugmentConfig.template!r})")
    aug.add_argument("--samples-per-prompt", type=integer, default=12, help="augmented samples per neutral prompt")
    aug.add_argument("--seed", type=integer, default=0, help="seed of the identity order")

    smp = sub.add_parser("sample", help="sample the images of a population run (resumable, data-parallel)")
    smp.add_argument("--augmented", required=True, help="JSONL written by `popalign data augment`")
    smp.add_argument("--model", required=True, help="toyworld, a .safetensors checkpoint, a diffusers folder")
    smp.add_argument("--out", required=True, help="run folder (images/, manifest.jsonl, run.json); resumed if present")
    smp.add_argument("--neutral-per-prompt", type=integer, default=None,
                     help="losing images per neutral prompt (default: as many as its augmented rows)")  # fmt: skip
    smp.add_argument("--time-budget", type=number, default=None, help="stop cleanly after this many seconds")
    smp.add_argument("--family", default="auto", help="model family: auto, sd15, sd2, sdxl, sd3, flux")
    smp.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16")
    smp.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    add_model_file_arguments(smp)
    _sampler_args(smp)

    flt = sub.add_parser("filter", help="classify a run's images; keep those that match their keywords")
    flt.add_argument("--samples", required=True, help="run folder written by `popalign data sample`")
    flt.add_argument("--out", required=True, help="output folder (filtered.jsonl, decisions.jsonl, report)")
    flt.add_argument("--classifier", default="toy", help="classifier backend (see `popalign audit --help`)")
    flt.add_argument("--classifier-option", action="append", default=[], metavar="KEY=VALUE",
                     help="classifier constructor option, e.g. which=train (repeatable)")  # fmt: skip
    fh = {f: FilterConfig.__dataclass_fields__[f].metadata["help"] for f in ("threshold", "axes")}
    flt.add_argument("--threshold", type=number, default=FilterConfig.threshold, help=fh["threshold"])
    flt.add_argument("--axes", default=None, help=fh["axes"] + " (comma-separated)")

    bld = sub.add_parser("build", help="population sets and pairs in the trainer's format")
    bld.add_argument("--filtered", required=True, help="folder (or filtered.jsonl) written by `popalign data filter`")
    bld.add_argument("--out", required=True, help="output folder (population.jsonl, pairwise.jsonl, report)")
    bh = {f.name: f.metadata["help"] for f in BuildConfig.__dataclass_fields__.values()}
    bld.add_argument("--set-size", type=integer, default=BuildConfig.set_size, help=bh["set_size"])
    bld.add_argument("--set-count", type=integer, default=None, help=bh["set_count"])
    bld.add_argument("--rule", default="augmented", choices=list(BUILD_RULES), help=bh["rule"])
    bld.add_argument("--group-axes", default=None, help=bh["group_axes"] + " (comma-separated)")
    bld.add_argument("--no-pairs", action="store_true", help="do not write pairwise.jsonl")
    bld.add_argument("--seed", type=integer, default=0, help=bh["seed"])
    bld.add_argument("--on-short", default="error", choices=list(ON_SHORT), help=bh["on_short"])

    pip = sub.add_parser("pipeline", help="augment -> sample -> filter -> build from one YAML config")
    pip.add_argument("--config", required=True, help="pipeline YAML (see examples/pipeline_toy.yaml)")
    pip.add_argument("--out", default=None, help="override the config's out folder")
    return ap


def _options(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"--classifier-option {it!r}: expected KEY=VALUE")
        out[k.strip()] = parse_value(v)
    return out


def _axes(text: str | None, arg: str = "--axes"):
    """Comma-separated axis names; None when the flag is absent. An explicitly empty list is an error."""
    if text is None:
        return None
    axes = tuple(x.strip() for x in text.split(",") if x.strip())
    if not axes:
        raise ValueError(f"{arg} {text!r} names no axis: give comma-separated axis names, or leave the flag out")
    return axes


def _prog(argv: list[str]) -> str:
    sub = next((x for x in argv if not x.startswith("-")), "")
    return f"popalign data {sub}" if sub in ("augment", "sample", "filter", "build", "pipeline") else "popalign data"


@command(_prog)
def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    err = sys.stderr

    def log(m: str) -> None:
        print(m, file=err)

    if a.cmd == "augment":
        summary = _augment_cmd(a)
    elif a.cmd == "sample":
        summary = _sample_cmd(a, log)
    elif a.cmd == "filter":
        from popalign_core.population.filter import FilterConfig, filter_population

        cfg = FilterConfig(threshold=a.threshold, axes=_axes(a.axes))
        cfg.check()
        clf = make_filter_classifier({"classifier": a.classifier, "classifier_options": _options(
            a.classifier_option)})  # fmt: skip
        summary = filter_population(a.samples, clf, a.out, cfg, log)
    elif a.cmd == "build":
        from popalign_core.population.build import BuildConfig, build_preferences

        cfg = BuildConfig(set_size=a.set_size, set_count=a.set_count, rule=a.rule,
                          group_axes=_axes(a.group_axes, "--group-axes"),
                          pairs=not a.no_pairs, seed=a.seed, on_short=a.on_short)  # fmt: skip
        summary = build_preferences(a.filtered, a.out, cfg, log)
    else:
        summary = run_pipeline(load_pipeline_config(a.config, out=a.out), log=log)
    if os.environ.get("RANK", "0") == "0":  # one summary line under torchrun / accelerate launch
        print(json.dumps(summary))
    return 0


def _augment_cmd(a) -> dict:
    prompts, report = read_prompt_file(a.prompts)
    keywords, detect, axes = keyword_sets(a.keywords)
    cfg = AugmentConfig(
        axes=_axes(a.axes) or axes,
        keywords=keywords,
        samples_per_prompt=a.samples_per_prompt,
        seed=a.seed,
        detect=detect,
        **({"template": a.template} if a.template else {}),
    )
    res = augment_prompts(prompts, cfg)

    check_augmented(res, len(prompts))
    for s in res.skipped:
        terms = ", ".join(f"{t['term']} ({t['axis']}={t['class']})" for t in s["terms"])
        print(f"skipped (identity-specific): {s['prompt']!r}: {terms}", file=sys.stderr)
    out = Path(a.out)
    if out.exists() and out.resolve() == Path(a.prompts).resolve():
        raise ValueError(f"--out {str(out)!r} is the --prompts file: augmentation would overwrite its own input")
    check_replaceable(out, "popalign data augment", _is_augmented_file)
    write_manifest(out, res.rows)
    return {
        "out": str(a.out),
        "neutral_prompts": len(prompts) - len(res.skipped),
        "rows": len(res.rows),
        "identities": len(cfg.identities()),
        "skipped": res.skipped,
        **report,
    }


def _is_augmented_file(path: Path) -> bool:
    """True when every line of `path` is a row of `popalign data augment` (so re-running may replace it)."""
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        rows = [json.loads(ln) for ln in lines]
    except (OSError, ValueError):
        return False
    keys = {"neutral", "prompt", "identity", "index"}
    return bool(rows) and all(isinstance(r, dict) and set(r) == keys for r in rows)


def _sample_cmd(a, log) -> dict:
    p = Path(a.augmented)
    text = read_text(p, "--augmented", missing=": write it with `popalign data augment`")
    rows = []
    for no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--augmented {str(p)!r} line {no}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"--augmented {str(p)!r} line {no}: expected a JSON object, got "
                                 f"{type(row).__name__}")  # fmt: skip
            rows.append(row)
    if not rows:
        raise ValueError(f"--augmented {str(p)!r} has no rows: nothing to sample (write it with `popalign data "
                         "augment` from identity-neutral prompts)")  # fmt: skip
    cfg = SamplerConfig(steps=a.steps, guidance_scale=a.guidance_scale, scheduler=a.scheduler, seed=a.seed,
                        batch_size=a.batch_size, height=a.height, width=a.width,
                        negative_prompt=a.negative_prompt)  # fmt: skip
    jobs = population_jobs(rows, a.neutral_per_prompt)
    kw = {"family": a.family, "dtype": a.dtype}
    if a.device:
        kw["device"] = a.device
    adapter = load_model(a.model, **kw, **model_file_kwargs(a))
    return sample_population(adapter, jobs, a.out, cfg, a.model, time_budget_s=a.time_budget, log=log)


if __name__ == "__main__":
    raise SystemExit(main())
