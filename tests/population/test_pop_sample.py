"""Population runs (pop_sample): jobs, manifest rows, resume, crash consistency, data parallelism."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from popalign_core.models.sampling import SamplerConfig, derive_seed
from popalign_core.population.sample import (
    MANIFEST,
    SamplingStopped,
    image_name,
    population_jobs,
    read_samples,
    sample_population,
)

ROOT = Path(__file__).resolve().parents[2]
AUG = [
    {"neutral": "a photo of a baker", "prompt": "a photo of a round baker", "identity": {"form": "round"}, "index": 0},
    {"neutral": "a photo of a baker", "prompt": "a photo of an angular baker", "identity": {"form": "angular"},
     "index": 1},
    {"neutral": "a photo of a pilot", "prompt": "a photo of a round pilot", "identity": {"form": "round"}, "index": 0},
]  # fmt: skip
CFG = SamplerConfig(steps=3, guidance_scale=2.0, scheduler="ddim", seed=5, batch_size=2)


@pytest.fixture(scope="module")
def toy():
    from popalign_core.models.loading import load_model

    return load_model("toyworld")


def _disk(out: Path) -> set[str]:
    return {f"images/{p.name}" for p in (out / "images").iterdir()}


def _manifest(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / MANIFEST).read_text().splitlines() if x.strip()]


def test_population_jobs_counts_order_and_errors():
    jobs = population_jobs(AUG)
    assert [(j["prompt"], j["index"], j["population"]) for j in jobs] == [
        ("a photo of a round baker", 0, "winning"),
        ("a photo of an angular baker", 1, "winning"),
        ("a photo of a baker", 0, "losing"),
        ("a photo of a baker", 1, "losing"),
        ("a photo of a round pilot", 0, "winning"),
        ("a photo of a pilot", 0, "losing"),
    ]
    assert jobs[2]["identity"] == {} and jobs[0]["neutral"] == "a photo of a baker"
    assert sum(j["population"] == "losing" for j in population_jobs(AUG, neutral_per_prompt=3)) == 6
    with pytest.raises(ValueError, match="neutral_per_prompt"):
        population_jobs(AUG, neutral_per_prompt=-1)
    with pytest.raises(ValueError, match="has no 'prompt'"):
        population_jobs([{"neutral": "x", "index": 0}])
    with pytest.raises(ValueError, match="repeat"):
        population_jobs([AUG[0], AUG[0]])


def test_image_names_are_unique_and_safe():
    names = {image_name(p, i) for p in ("a/../b", "A B", "a b", "") for i in (0, 1)}
    assert len(names) == 8 and all("/" not in n and n.endswith(".png") for n in names)


def test_run_writes_images_and_rows_and_resumes_without_duplicates(tmp_path, toy):
    out = tmp_path / "run"
    jobs = population_jobs(AUG)
    s = sample_population(toy, jobs, out, CFG, "toyworld", model_hash="h0")
    assert s["done"] == s["jobs"] == 6 and s["sampled"] == 6 and s["complete"]
    rows = _manifest(out)
    assert [(r["prompt"], r["index"]) for r in rows] == [(j["prompt"], j["index"]) for j in jobs]
    assert {r["image"] for r in rows} == _disk(out)
    r = rows[0]
    assert r["seed"] == derive_seed(5, "a photo of a round baker", 0) and r["model"] == "toyworld"
    assert r["sampler"]["guidance_scale"] == 2.0 and r["sampler"]["steps"] == 3 and r["model_hash"] == "h0"
    assert r["identity"] == {"form": "round"} and r["population"] == "winning" and r["neutral"] == "a photo of a baker"
    again = sample_population(toy, jobs, out, CFG, "toyworld", model_hash="h0")
    assert again["sampled"] == 0 and again["skipped_existing"] == 6 and len(_manifest(out)) == 6
    # more jobs later: only the new ones are sampled
    more = population_jobs(AUG, neutral_per_prompt=3)
    s3 = sample_population(toy, more, out, CFG, "toyworld", model_hash="h0")
    assert s3["sampled"] == 3 and len(_manifest(out)) == 9 == len(_disk(out))
    # fewer jobs (a prompt removed): the other images stay, but are not counted as this run's and are reported
    logs: list[str] = []
    fewer = [j for j in more if j["neutral"] == "a photo of a baker"]
    s4 = sample_population(toy, fewer, out, CFG, "toyworld", model_hash="h0", log=logs.append)
    assert s4["done"] == s4["jobs"] == s4["skipped_existing"] == len(fewer) and s4["complete"]
    assert s4["other_images"] == 9 - len(fewer) > 0 and len(_manifest(out)) == 9
    assert any(f"also holds {9 - len(fewer)} image(s) of jobs this run does not have" in m for m in logs)
    # another run's settings never mix into the folder
    with pytest.raises(ValueError, match=r"holds images of another run \(sampler.guidance_scale differ"):
        sample_population(toy, jobs, out, SamplerConfig(steps=3, guidance_scale=3.0, seed=5), "toyworld",
                          model_hash="h0")  # fmt: skip


def test_interrupted_run_resumes_to_the_same_images(tmp_path, toy):
    jobs = population_jobs(AUG)
    full = tmp_path / "full"
    sample_population(toy, jobs, full, CFG, "toyworld", model_hash="h")

    def cancel(done, total):
        if done >= 2:
            raise KeyboardInterrupt("cancelled")

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        sample_population(toy, jobs, part, CFG, "toyworld", model_hash="h", progress=cancel)
    assert len(_manifest(part)) == 2 and {r["image"] for r in _manifest(part)} == _disk(part)
    s = sample_population(toy, jobs, part, CFG, "toyworld", model_hash="h")
    assert s["sampled"] == 4 and s["skipped_existing"] == 2
    assert [r["image"] for r in _manifest(part)] == [r["image"] for r in _manifest(full)]
    for r in _manifest(full):
        assert (part / r["image"]).read_bytes() == (full / r["image"]).read_bytes()


def test_write_error_leaves_manifest_consistent(tmp_path, toy, monkeypatch):
    import popalign_core.population.sample as ps

    real, calls = ps._save_png, {"n": 0}

    def flaky(img, path):
        calls["n"] += 1
        if calls["n"] == 4:  # second image of the second batch
            raise OSError(errno.ENOSPC, "No space left on device")
        real(img, path)

    monkeypatch.setattr(ps, "_save_png", flaky)
    out = tmp_path / "run"
    jobs = population_jobs(AUG)
    with pytest.raises(SamplingStopped, match="No space left on device.*2 finished images.*resume"):
        sample_population(toy, jobs, out, CFG, "toyworld", model_hash="h")
    assert len(_manifest(out)) == 2 and {r["image"] for r in _manifest(out)} == _disk(out)
    monkeypatch.setattr(ps, "_save_png", real)
    s = sample_population(toy, jobs, out, CFG, "toyworld", model_hash="h")
    assert s["sampled"] == 4 and len(_manifest(out)) == 6 == len(_disk(out))


def test_manifest_append_failure_cuts_back_the_file(tmp_path, monkeypatch):
    import popalign_core.population.sample as ps

    p = tmp_path / "m.jsonl"
    ps._append_rows(p, [{"image": "a", "prompt": "p", "index": 0}])

    def boom(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        ps._append_rows(p, [{"image": "b", "prompt": "p", "index": 1}])
    assert p.read_text() == '{"image": "a", "prompt": "p", "index": 0}\n'


def test_start_repairs_torn_lines_missing_and_orphan_images(tmp_path, toy):
    out = tmp_path / "run"
    jobs = population_jobs(AUG)
    sample_population(toy, jobs, out, CFG, "toyworld", model_hash="h")
    rows = _manifest(out)
    (out / rows[1]["image"]).unlink()  # row without image
    lines = (out / MANIFEST).read_text().splitlines(keepends=True)
    (out / MANIFEST).write_text("".join(lines[:2] + lines[3:]))  # image of a job of this run without its row
    (out / "images" / image_name("a photo of a stray", 7)).write_bytes(b"x")  # named like ours, not this run's job
    (out / "images" / "stray.png").write_bytes(b"mine")  # a file the run never wrote
    with open(out / MANIFEST, "a") as f:
        f.write('{"image": "images/half')  # torn last line
    logs = []
    s = sample_population(toy, jobs, out, CFG, "toyworld", model_hash="h", log=logs.append)
    assert s["dropped"] == {"torn_lines": 1, "missing_images": 1, "damaged_images": 0, "duplicate_rows": 0,
                            "orphan_images": 1}  # fmt: skip
    assert (out / "images" / "stray.png").read_bytes() == b"mine"  # files that are not this run's: never deleted
    assert (out / "images" / image_name("a photo of a stray", 7)).read_bytes() == b"x"
    assert any("2 file(s)" in m and "left alone" in m for m in logs)
    assert s["sampled"] == 2 and len(_manifest(out)) == 6 == len(_disk(out)) - 2
    assert any("made the folder consistent" in m for m in logs)
    assert len(read_samples(out)) == 6


def test_time_budget_stops_cleanly(tmp_path, toy):
    out = tmp_path / "run"
    s = sample_population(toy, population_jobs(AUG), out, CFG, "toyworld", model_hash="h", time_budget_s=1e-6)
    assert s["stopped_by"] == "time_budget" and s["done"] == 2 and not s["complete"]
    assert len(_manifest(out)) == 2 == len(_disk(out))
    with pytest.raises(ValueError, match="time_budget_s"):
        sample_population(toy, [], out, CFG, "toyworld", model_hash="h", time_budget_s=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_make_the_same_images_as_one(tmp_path):
    aug = tmp_path / "aug.jsonl"
    aug.write_text("".join(json.dumps(r) + "\n" for r in AUG))
    common = ["-m", "popalign_core.population", "sample", "--augmented", str(aug), "--model", "toyworld",
              "--steps", "3", "--guidance-scale", "2", "--seed", "5", "--batch-size", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         *common, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    summaries = [json.loads(ln) for ln in two.stdout.splitlines() if ln.startswith("{")]
    assert len(summaries) == 1  # the main process prints the summary
    assert summaries[0]["processes"] == 2 and summaries[0]["done"] == 6 and summaries[0]["complete"]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    r2, r1 = _manifest(tmp_path / "two"), _manifest(tmp_path / "one")
    assert [r["image"] for r in r2] == [r["image"] for r in r1]  # merged in job order, no shard left
    assert not list((tmp_path / "two").glob("manifest.rank*"))
    from PIL import Image

    for a, b in zip(r2, r1):
        x = np.asarray(Image.open(tmp_path / "two" / a["image"]), dtype=int)
        y = np.asarray(Image.open(tmp_path / "one" / b["image"]), dtype=int)
        # different batch composition: equal up to the sampler's batch tolerance, then 8-bit rounding
        assert np.abs(x - y).max() <= 2
