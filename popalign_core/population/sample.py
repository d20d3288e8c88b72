"""Population runs: the images of a population data set, sampled with the core's seeded sampler.

    from popalign_core.population.sample import population_jobs, sample_population
    jobs = population_jobs(augmented_rows, neutral_per_prompt=None)     # winning (augmented) + losing (neutral) jobs
    summary = sample_population(adapter, jobs, "runs/pop/samples", SamplerConfig(...), model_id="toyworld")

One job is one image: (prompt, index) plus its neutral prompt, identity keywords and population. Each image's seed
is `sampling.derive_seed(config.seed, prompt, index)`, so an image depends only on its job and the sampler
settings, never on which process, batch or run produced it.

On disk (`out/`):
- ``images/<slug>-<index>-<hash8>.png``: one 8-bit PNG per finished job (name fixed by (prompt, index));
- ``manifest.jsonl``: one row per finished image {"image", "prompt", "neutral", "identity", "population",
  "index", "seed", "sampler", "model", "model_hash"}, in job order once a run completes;
- ``run.json``: the settings every image of the folder shares (sampler settings but the batch size, seed, model
  hash); a run with other settings refuses the folder instead of mixing images.

Resumable and crash-consistent: an image is written to a temporary file and renamed, *then* its row is appended
(flushed and fsynced per batch). On start, rows whose image is missing or damaged (not a complete PNG: signature and
final IEND chunk), duplicate rows and a torn last line are dropped (and counted), and images of this run without a row
are deleted, so the manifest always lists exactly the images on disk; the remaining jobs, the damaged ones among
them, are then sampled. The folder must be new, empty or a run of `popalign data sample` (`fileio.claim_output_dir`):
files it did not write are never deleted. A write error (disk full) removes the images of the failed batch that have
no row and stops with a message; re-running resumes.

Data parallel (``torchrun`` / ``accelerate launch``): process r samples every world-th pending job into
``manifest.rank<r>.jsonl``; after a barrier the main process merges the shards into ``manifest.jsonl``. Same
images as one process within the sampler's batch tolerance (`sampling.batch_invariance_tolerance`).

`sample_population` reads as three steps: `_validate_sampling` (settings and jobs, then the folder: claimed, its
run.json checked, made consistent), `_sample_pending` (the batches, each written before the next) and
`_write_sampling` (the merged manifest and the summary).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from popalign_core.common.distributed import Distributed
from popalign_core.common.fileio import atomic_path, atomic_write_text, claim_output_dir, clean_temporaries
from popalign_core.common.manifest import write_manifest
from popalign_core.common.userinput import user_error
from popalign_core.models.sampling import SamplerConfig, derive_seed, resolve_scheduler, sample

__all__ = ["MANIFEST", "RUN_FILE", "SamplingStopped", "image_name", "population_jobs", "read_samples",
           "sample_population"]  # fmt: skip

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
IMAGES = "images"
_SHARD = re.compile(r"^manifest\.rank(\d+)\.jsonl$")
_IMAGE = re.compile(r"^[a-z0-9-]+-\d{5,}-[0-9a-f]{8}\.png$")  # `image_name`
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: What `popalign data sample` writes in its output folder (`fileio.claim_output_dir`).
SAMPLE_OUTPUTS = {RUN_FILE: None, MANIFEST: None, _SHARD: None, IMAGES: {_IMAGE: None}}
_RUN_KEYS = ("steps", "guidance_scale", "scheduler", "height", "width", "negative_prompt", "seed", "eta")


@user_error
class SamplingStopped(RuntimeError):
    """Sampling stopped by a write error; the folder is consistent and a re-run resumes."""


def population_jobs(rows: Sequence[Mapping[str, Any]], neutral_per_prompt: int | None = None) -> list[dict]:
    """Jobs of a population run from augmentation rows ({"neutral", "prompt", "identity", "index"}): every row is a
    *winning* job; each neutral prompt adds `neutral_per_prompt` *losing* jobs (the neutral prompt itself, indices
    0..n-1; default: as many as its augmented rows). Order: per neutral prompt, its winning then its losing jobs."""
    if isinstance(neutral_per_prompt, float) and neutral_per_prompt.is_integer():
        neutral_per_prompt = int(neutral_per_prompt)  # `neutral_per_prompt: 2e0` in a YAML config
    if neutral_per_prompt is not None and (
        isinstance(neutral_per_prompt, bool) or not isinstance(neutral_per_prompt, int) or neutral_per_prompt < 0
    ):
        raise ValueError(f"neutral_per_prompt: expected None or an int >= 0, got {neutral_per_prompt!r}")
    by_neutral: dict[str, list[dict]] = {}
    for k, r in enumerate(rows):
        for key in ("neutral", "prompt", "index"):
            if key not in r:
                raise ValueError(f"augmented row {k + 1} has no {key!r}: expected rows of `popalign data augment`")
        if not _is_index(r["index"]):
            raise ValueError(f"augmented row {k + 1}: index={r['index']!r} is not an integer >= 0")
        if not isinstance(r["prompt"], str) or not r["prompt"].strip() or not isinstance(r["neutral"], str):
            raise ValueError(f"augmented row {k + 1}: 'prompt' and 'neutral' must be non-empty strings")
        if not isinstance(r.get("identity") or {}, dict):
            raise ValueError(f"augmented row {k + 1}: identity={r['identity']!r} is not a mapping axis -> class")
        by_neutral.setdefault(str(r["neutral"]), []).append(r)
    jobs, seen = [], set()
    for neutral, rs in by_neutral.items():
        for r in rs:
            job = {
                "prompt": str(r["prompt"]),
                "index": int(r["index"]),
                "neutral": neutral,
                "identity": dict(r.get("identity") or {}),
                "population": "winning",
            }
            if (job["prompt"], job["index"]) in seen:
                raise ValueError(f"augmented rows repeat (prompt, index) = ({job['prompt']!r}, {job['index']})")
            seen.add((job["prompt"], job["index"]))
            jobs.append(job)
        n = len(rs) if neutral_per_prompt is None else neutral_per_prompt
        for i in range(n):
            if (neutral, i) in seen:
                raise ValueError(f"neutral prompt {neutral!r} is also an augmented prompt with index {i}")
            seen.add((neutral, i))
            jobs.append({"prompt": neutral, "index": i, "neutral": neutral, "identity": {}, "population": "losing"})
    return jobs


def slug(text: str, length: int = 48) -> str:
    """A filesystem-safe, readable stem of `text`: lower-case runs of [a-z0-9] joined by "-" (at most `length`)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def image_name(prompt: str, index: int) -> str:
    """File name of the image of (prompt, index): readable slug + index + a hash of both (unique, filesystem-safe)."""
    h = hashlib.sha256(f"{index}\n{prompt}".encode()).hexdigest()[:8]
    return f"{slug(prompt)}-{index:05d}-{h}.png"


def _run_settings(config, model_id: str, model_hash: str) -> dict:
    d = asdict(config)
    return {"sampler": {k: d[k] for k in _RUN_KEYS}, "model": model_id, "model_hash": model_hash}


def _read_rows(path: Path) -> tuple[list[dict], list[int]]:
    """Rows of one manifest file; lines that do not parse as a row (a torn write, a damaged line) are dropped ->
    (rows, their line numbers)."""
    rows, bad = [], []
    if not path.is_file():
        return rows, bad
    text = path.read_bytes().decode("utf-8", errors="replace")
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(no)
            continue
        if isinstance(row, dict) and "image" in row and "prompt" in row and _is_index(row.get("index")):
            rows.append(row)
        else:
            bad.append(no)
    return rows, bad


def _is_index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def png_complete(path: str | os.PathLike) -> bool:
    """True when `path` is a whole PNG file: the PNG signature at the start and the IEND chunk at the end (a file cut
    short by a crash or a full disk has no IEND)."""
    try:
        p = Path(path)
        if p.stat().st_size < 57:  # the smallest valid PNG
            return False
        with open(p, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return False
            f.seek(-12, os.SEEK_END)
            tail = f.read(12)
        return tail[4:8] == b"IEND"
    except OSError:
        return False


def _manifests(out: Path) -> list[Path]:
    return [out / MANIFEST, *sorted(p for p in out.glob("manifest.rank*.jsonl") if _SHARD.match(p.name))]


def read_samples_report(out: str | os.PathLike) -> tuple[list[dict], dict]:
    """(the finished rows of a population run folder, what was skipped): rows of the merged manifest and any shards
    whose image exists; skipped = {"bad_lines": ["manifest.jsonl:7", ...], "missing_images": [...],
    "duplicate_rows": n}."""
    out = Path(out)
    rows, seen = [], set()
    skipped: dict[str, Any] = {"bad_lines": [], "missing_images": [], "duplicate_rows": 0}
    for f in _manifests(out):
        rs, bad = _read_rows(f)
        skipped["bad_lines"] += [f"{f.name}:{n}" for n in bad]
        for r in rs:
            key = (r["prompt"], int(r["index"]))
            if key in seen:
                skipped["duplicate_rows"] += 1
            elif not (out / r["image"]).is_file():
                skipped["missing_images"].append(str(r["image"]))
            else:
                seen.add(key)
                rows.append(r)
    return rows, skipped


def read_samples(out: str | os.PathLike) -> list[dict]:
    """The finished rows of a population run folder (merged manifest and any shards; rows whose image exists)."""
    return read_samples_report(out)[0]


def _reconcile(out: Path, log: Callable[[str], None], own: set[str] | None = None) -> dict:
    """Make the folder consistent (see module docstring); returns {"rows": [...], "dropped": {...}}. `own`: the image
    names of this run's jobs; an image without a row is deleted only when it has one of them (any other file in
    images/ is not this run's: it is left alone and counted)."""
    files = _manifests(out)
    rows, seen = [], set()
    dropped = {"torn_lines": 0, "missing_images": 0, "damaged_images": 0, "duplicate_rows": 0, "orphan_images": 0}
    for f in files:
        rs, bad = _read_rows(f)
        dropped["torn_lines"] += len(bad)
        for r in rs:
            key = (r["prompt"], int(r["index"]))
            if key in seen:
                dropped["duplicate_rows"] += 1
            elif not (out / r["image"]).is_file():
                dropped["missing_images"] += 1
            elif not png_complete(out / r["image"]):
                dropped["damaged_images"] += 1  # truncated / not a PNG: sampled again below
            else:
                seen.add(key)
                rows.append(r)
    listed = {Path(r["image"]).name for r in rows}
    img_dir = out / IMAGES
    if img_dir.is_dir():
        clean_temporaries(img_dir)
        foreign = []
        for p in img_dir.iterdir():
            if p.name in listed:
                continue
            if p.is_file() and not p.is_symlink() and _IMAGE.match(p.name) and (own is None or p.name in own):
                p.unlink()  # an image of this run's jobs without its row: sampled again
                dropped["orphan_images"] += 1
            else:
                foreign.append(p.name)
        if foreign:
            log(f"[sample] warning: {len(foreign)} file(s) in {img_dir} are not images of this run and were left "
                f"alone (e.g. {foreign[0]!r})")  # fmt: skip
    if any(dropped.values()) or len(files) > 1 or not (out / MANIFEST).exists():
        write_manifest(out / MANIFEST, rows)
        for f in files[1:]:
            f.unlink()
    if any(dropped.values()):
        log(f"[sample] made the folder consistent: {dropped}")
    return {"rows": rows, "dropped": dropped}


def _append_rows(path: Path, rows: Sequence[Mapping]) -> None:
    """Append rows with one write + fsync; on failure, cut the file back to its old size (no torn line)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    with open(path, "ab") as f:
        size = f.tell()
        try:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            try:
                f.truncate(size)
            except OSError:
                pass  # the torn line is dropped on the next start
            raise


def _save_png(img, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def sample_population(
    adapter,
    jobs: Sequence[Mapping[str, Any]],
    out: str | os.PathLike,
    config,
    model_id: str,
    *,
    model_hash: str | None = None,
    time_budget_s: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Sample every job not yet on disk into `out` (see the module docstring); returns a summary
    {"out", "jobs", "done", "sampled", "skipped_existing", "complete", "seconds", "images_per_s", "dropped",
    "processes", "stopped_by"}.

    config: a `sampling.SamplerConfig` (its batch_size is the unit of work between manifest writes). model_id: how
    the rows name the model (a path or spec). model_hash: `lora_io.model_hash` of the adapter (computed if None).
    time_budget_s: stop cleanly after the batch that crosses it (re-run to continue). progress(done, total):
    called after each batch; an exception from it (a cancel) stops after that batch's rows are written."""
    run = _validate_sampling(adapter, jobs, Path(out), config, model_id, model_hash, time_budget_s, log)
    _sample_pending(run, progress)
    return _write_sampling(run)


@dataclass
class _SamplingRun:
    """One `sample_population` call: its checked inputs, the folder's state, and what was sampled."""

    adapter: Any
    jobs: list[dict]
    keys: list[tuple[str, int]]
    out: Path
    config: Any
    model_id: str
    model_hash: str
    time_budget_s: float | None
    log: Callable[[str], None]
    dist: Any
    t0: float
    own: set[str] = field(default_factory=set)
    state: dict = field(default_factory=dict)
    done_keys: set = field(default_factory=set)
    finished: int = 0
    sampled: int = 0
    stopped_by: str | None = None


# ------------------------------------------------------------------------------------------------ validate
def _validate_sampling(adapter, jobs, out: Path, config, model_id, model_hash, time_budget_s, log) -> _SamplingRun:
    """The settings and jobs (before any write), then the folder: claimed, its run.json matching these settings (a
    folder of another run is refused), made consistent (`_reconcile`)."""

    log = log or (lambda m: None)
    jobs, keys = _check_sampling(jobs, config, time_budget_s)
    config = replace(config, scheduler=resolve_scheduler(adapter, config.scheduler))  # "auto" -> recorded by name
    t0 = time.time()
    if model_hash is None:
        from popalign_core.lora.files import model_hash as _mh

        model_hash = _mh(adapter)
    run = _SamplingRun(
        adapter, jobs, keys, out, config, model_id, model_hash, time_budget_s, log, Distributed("no"), t0
    )
    run.own = {image_name(p, i) for p, i in keys}
    _open_folder(run)
    return run


def _check_sampling(jobs, config, time_budget_s) -> tuple[list[dict], list[tuple[str, int]]]:
    """The sampler settings, the time budget and the jobs (each (prompt, index) once) -> (jobs, their keys)."""

    if not isinstance(config, SamplerConfig):
        raise ValueError(f"config: expected a SamplerConfig, got {type(config).__name__}")
    config.validate()
    if config.output != "tensor":
        raise ValueError("config.output must be 'tensor': a population run writes images")
    if time_budget_s is not None and not (isinstance(time_budget_s, int | float) and time_budget_s > 0):
        raise ValueError(f"time_budget_s: expected None or a number > 0, got {time_budget_s!r}")
    jobs = [dict(j) for j in jobs]
    if not jobs:
        raise ValueError("jobs is empty: nothing to sample (no augmented rows and no neutral images requested)")
    keys = [(j["prompt"], int(j["index"])) for j in jobs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"jobs repeat (prompt, index) = {dup}: every image needs its own (prompt, index)")
    return jobs, keys


def _open_folder(run: _SamplingRun) -> None:
    """Main process: claim the folder, check or write run.json, make the folder consistent; the others read the
    manifest after the barrier. Sets `run.state` and the jobs already done."""
    out, dist = run.out, run.dist
    settings = _run_settings(run.config, run.model_id, run.model_hash)
    if dist.main:
        claim_output_dir(out, "data sample", SAMPLE_OUTPUTS, arg="--out", signature=RUN_FILE)  # + its temporaries
        (out / IMAGES).mkdir(parents=True, exist_ok=True)
        _check_run_file(out, settings)
        run.state = _reconcile(out, run.log, run.own)
    dist.barrier()
    if not dist.main:
        run.state = {"rows": _read_rows(out / MANIFEST)[0], "dropped": {}}
    on_disk = {(r["prompt"], int(r["index"])) for r in run.state["rows"]}
    run.done_keys = on_disk & set(run.keys)
    others = len(on_disk - run.done_keys)  # images of an earlier run with other prompts: kept, never this run's
    if others:
        run.log(f"[sample] warning: {out} also holds {others} image(s) of jobs this run does not have "
                "(other prompts or indices of an earlier run); they stay in the manifest, and `data filter` / `data "
                "build` will use them: sample into a new folder to keep them out")  # fmt: skip


def _check_run_file(out: Path, settings: dict) -> None:
    """run.json of an earlier run must name the same model hash and sampler settings; a new folder gets one."""
    run_file = out / RUN_FILE
    if not run_file.is_file():
        atomic_write_text(run_file, json.dumps(settings, indent=2))
        return
    try:
        old = json.loads(run_file.read_text(encoding="utf-8"))
        old.get("sampler")
    except (ValueError, AttributeError):
        raise ValueError(f"{run_file} is damaged: it cannot tell which settings the images of {out} were "
                         "sampled with; use another output folder") from None  # fmt: skip
    diff = [k for k in ("model_hash",) if old.get(k) != settings[k]]
    diff += [f"sampler.{k}" for k in _RUN_KEYS if old.get("sampler", {}).get(k) != settings["sampler"][k]]
    if diff:
        raise ValueError(
            f"{out} holds images of another run ({', '.join(diff)} differ): use another output folder, or "
            "the same model and sampler settings to resume"
        )


# ------------------------------------------------------------------------------------------------ compute
def _sample_pending(run: _SamplingRun, progress: Callable[[int, int], None] | None) -> None:
    """Sample this process's share of the pending jobs batch by batch, each batch's images then rows written before
    the next (crash-consistent); stops after the batch that crosses the time budget."""

    dist, config, out = run.dist, run.config, run.out
    pending = [j for j, k in zip(run.jobs, run.keys) if k not in run.done_keys]
    mine = pending[dist.rank :: dist.world]
    shard = out / (MANIFEST if dist.world == 1 else f"manifest.rank{dist.rank}.jsonl")
    total, run.finished = len(run.jobs), len(run.done_keys)
    run.log(f"[sample] {len(run.jobs)} jobs: {len(run.done_keys)} on disk, {len(pending)} to sample "
            f"({dist.world} process(es))")  # fmt: skip
    step = config.batch_size
    for s in range(0, len(mine), step):
        chunk = mine[s : s + step]
        imgs = sample(run.adapter, [(j["prompt"], int(j["index"])) for j in chunk], config)
        _write_batch(run, chunk, imgs, shard)
        run.sampled += len(chunk)
        run.finished += len(chunk) * dist.world if dist.world > 1 else len(chunk)
        if progress is not None:
            progress(min(run.finished, total), total)
        if run.time_budget_s is not None and time.time() - run.t0 > run.time_budget_s and s + step < len(mine):
            run.stopped_by = "time_budget"
            run.log(f"[sample] time budget of {run.time_budget_s:.0f} s reached; re-run to continue")
            break


def _write_batch(run: _SamplingRun, chunk: list[dict], imgs, shard: Path) -> None:
    """One batch's PNGs (atomically), then its manifest rows in one append; on a write error the batch's images
    without a row are removed and `SamplingStopped` says how to resume."""
    import numpy as np
    import torch

    out, config = run.out, run.config
    sampler_info = {k: v for k, v in asdict(config).items() if k != "output"}
    arr = (imgs.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()).astype(np.uint8)
    written, rows = [], []
    try:
        for j, a in zip(chunk, arr):
            rel = f"{IMAGES}/{image_name(j['prompt'], int(j['index']))}"
            _save_png(a, out / rel)
            written.append(out / rel)
            rows.append(
                {
                    "image": rel,
                    "prompt": j["prompt"],
                    "neutral": j.get("neutral", j["prompt"]),
                    "identity": j.get("identity", {}),
                    "population": j.get("population", "losing" if not j.get("identity") else "winning"),
                    "index": int(j["index"]),
                    "seed": derive_seed(config.seed, j["prompt"], int(j["index"])),
                    "sampler": sampler_info,
                    "model": run.model_id,
                    "model_hash": run.model_hash,
                }
            )
        _append_rows(shard, rows)
    except OSError as e:
        for p in written:
            p.unlink(missing_ok=True)
        raise SamplingStopped(
            f"sampling stopped: could not write to {out} ({e.strerror or e}); the manifest lists the "
            f"{run.finished} finished images, all on disk. Free space and run again to resume."
        ) from e


# ------------------------------------------------------------------------------------------------ write
def _write_sampling(run: _SamplingRun) -> dict:
    """Main process: merge the shards into manifest.jsonl in job order; returns the summary."""
    dist, out, keys = run.dist, run.out, run.keys
    dist.barrier()
    rows = run.state["rows"]
    if dist.main:
        merged = _reconcile(out, run.log, run.own)["rows"]
        order = {k: i for i, k in enumerate(keys)}
        merged.sort(key=lambda r: order.get((r["prompt"], int(r["index"])), len(order)))
        write_manifest(out / MANIFEST, merged)
        rows = merged
    dist.barrier()
    seconds = time.time() - run.t0
    done = len({(r["prompt"], int(r["index"])) for r in rows} & set(keys)) if dist.main else run.finished
    return {
        "out": str(out),
        "jobs": len(run.jobs),
        "done": done,
        "sampled": run.sampled,
        "skipped_existing": len(run.done_keys),
        "other_images": len(rows) - done if dist.main else 0,
        "complete": done >= len(run.jobs),
        "seconds": round(seconds, 2),
        "images_per_s": round(run.sampled / seconds, 3) if seconds > 0 else None,
        "dropped": run.state["dropped"],
        "processes": dist.world,
        "stopped_by": run.stopped_by,
    }
