"""Preference data from a filtered population run, in the trainer's on-disk format (docs/data-format.md).

    from popalign_core.population.build import BuildConfig, build_preferences
    summary = build_preferences("runs/pop/filtered", "runs/pop/data", BuildConfig(set_size=5, seed=0))

Per neutral prompt, the kept *winning* images (sampled from its identity-augmented prompts) and *losing* images
(sampled from the neutral prompt) are shuffled with a seed drawn from (config.seed, neutral prompt) — independent
of the prompt's position in the file — and then:

- **population sets** (``population.jsonl``, for PopAlign / SFT / KTO): set k of the prompt pairs winning images
  [kS, (k+1)S) with losing images [kS, (k+1)S) (S = `set_size`), each set drawn without replacement; every image is
  captioned with the *neutral* prompt (PopAlign Sec. 4.1). `set_count` sets per prompt (default: as many as fit).
  With ``rule="distinct_groups"`` (the public PopAlign code's rule) the set holding more distinct identity groups
  (classifier attributes over the filter's axes) wins, whichever prompt produced it; sets with as many groups are
  dropped (counted in the summary).
- **pairs** (``pairwise.jsonl``, for the DPO family): each winning image paired with a losing image of the same
  neutral prompt, without replacement (min(W, L) pairs per prompt).

Image paths are written relative to the output folder. Asking for more sets than the images allow is an error
naming the prompt and its counts (``on_short="skip"`` builds what fits and reports the shortfall instead).

`build_preferences` reads as three steps: `_validate_build` (settings, filtered rows, output folder),
`_compute_build` (sets and pairs in memory) and `_write_build` (the files and their report, published together).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from popalign_core.common.fields import help_field
from popalign_core.common.fileio import claim_output_dir, publish_together, recover_publish
from popalign_core.common.manifest import format_manifest
from popalign_core.common.userinput import check_containers, coerce_numbers
from popalign_core.population.filter import FILTERED
from popalign_core.population.sample import slug

__all__ = ["BUILD_RULES", "BuildConfig", "build_preferences"]

BUILD_RULES = {
    "augmented": "the set sampled from identity-augmented prompts wins (PopAlign Sec. 4.1)",
    "distinct_groups": "the set with more distinct identity groups wins; ties are dropped (public PopAlign code)",
}
ON_SHORT = ("error", "skip")
#: What `popalign data build` writes in its output folder (`fileio.claim_output_dir`).
BUILD_OUTPUTS = {"population.jsonl": None, "pairwise.jsonl": None, "build_report.json": None}


@dataclass
class BuildConfig:
    """Settings of `build_preferences`."""

    set_size: int = help_field("images per population set (public PopAlign code: 5)", default=5)
    set_count: int | None = help_field("sets per neutral prompt (default: as many as the images allow)", default=None)
    rule: str = help_field(f"which set wins: {', '.join(BUILD_RULES)}", default="augmented")
    group_axes: tuple[str, ...] | None = help_field(
        "axes that define a group for rule=distinct_groups (default: all)", default=None
    )
    pairs: bool = help_field("also write pairwise data (pairwise.jsonl)", default=True)
    seed: int = help_field("seed of the shuffles", default=0)
    on_short: str = help_field("when set_count x set_size exceeds a prompt's images: error or skip", default="error")

    def check(self) -> None:
        coerce_numbers(self)
        check_containers(self)
        if not isinstance(self.set_size, int) or isinstance(self.set_size, bool) or self.set_size < 1:
            raise ValueError(f"set_size: expected an int >= 1, got {self.set_size!r}")
        if self.set_count is not None and (not isinstance(self.set_count, int) or self.set_count < 1):
            raise ValueError(f"set_count: expected None or an int >= 1, got {self.set_count!r}")
        if self.rule not in BUILD_RULES:
            raise ValueError(f"rule={self.rule!r} is not a known rule; valid values: {', '.join(BUILD_RULES)}")
        if self.on_short not in ON_SHORT:
            raise ValueError(f"on_short={self.on_short!r}: expected one of {', '.join(ON_SHORT)}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected an int >= 0, got {self.seed!r}")


def _rng(seed: int, text: str, what: str):
    import numpy as np

    digest = int.from_bytes(hashlib.sha256(f"{what}\n{text}".encode()).digest()[:8], "big")
    return np.random.default_rng([seed, digest])


def _groups(rows: list[dict], axes: tuple[str, ...] | None) -> int:
    keys = set()
    for r in rows:
        attrs = r.get("attributes") or {}
        keys.add(tuple((a, attrs.get(a)) for a in sorted(axes or attrs)))
    return len(keys)


def _read_filtered(manifest: Path) -> list[dict]:
    """Rows of filtered.jsonl; a damaged line or a row without its columns is an error naming file and line."""
    rows = []
    text = manifest.read_bytes().decode("utf-8", errors="replace")
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{manifest}, line {no}: not valid JSON ({e.msg}); run `popalign data filter` again"
            ) from None
        need = ("image", "prompt", "neutral", "population")
        missing = [k for k in need if not isinstance(r, dict) or k not in r]
        if (
            missing
            or r["population"] not in ("winning", "losing")
            or not isinstance(r.get("attributes") or {}, dict)
            or not isinstance(r.get("identity") or {}, dict)
        ):
            raise ValueError(
                f"{manifest}, line {no}: not a row of `popalign data filter` (needs image, prompt, neutral, "
                "population winning|losing, and mappings for identity and attributes)"
            )
        if r.get("reason", "kept") != "kept":
            raise ValueError(
                f"{manifest}, line {no}: an image the filter dropped (reason {r['reason']!r}): this is a decisions "
                "file listing every image; give filtered.jsonl or its folder"
            )
        rows.append(r)
    return rows


def _slug(text: str) -> str:
    return slug(text, 40)


def build_preferences(
    filtered: str | os.PathLike,
    out: str | os.PathLike,
    config: BuildConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Build population sets (and pairs) from the filtered run folder (or its filtered.jsonl) into `out`."""
    cfg = config or BuildConfig()
    manifest, rows, out = _validate_build(filtered, out, cfg)
    built = _compute_build(rows, manifest, out, cfg)
    return _write_build(built, manifest, out, cfg, log or (lambda m: None))


# ------------------------------------------------------------------------------------------------ validate
def _validate_build(filtered: str | os.PathLike, out: str | os.PathLike, cfg: BuildConfig) -> tuple[Path, list, Path]:
    """The settings, the kept rows of filtered.jsonl (each image on disk, the group axes known), then the output
    folder is claimed -> (filtered.jsonl, its rows, the output folder)."""

    cfg.check()
    filtered = Path(filtered)
    manifest = filtered / FILTERED if filtered.is_dir() else filtered
    recover_publish(manifest.parent)  # a `data filter` killed mid-publication: its committed files, all of them
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: run `popalign data filter` first")
    rows = _read_filtered(manifest)
    if not rows:
        raise ValueError(f"{manifest} holds no kept image: every image was filtered out (see filter_report.json)")
    if cfg.group_axes:
        known = sorted({a for r in rows for a in (r.get("attributes") or {})})
        unknown = [a for a in cfg.group_axes if a not in known]
        if unknown:
            raise ValueError(f"group_axes: unknown axis {unknown[0]!r}; the filtered images have the axes "
                             f"{', '.join(known) or '(none)'}")  # fmt: skip
    base = manifest.parent
    missing = [r["image"] for r in rows if not (base / r["image"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{manifest}: {len(missing)} of {len(rows)} listed images do not exist (first: {base / missing[0]}); "
            "re-run `popalign data sample` and `popalign data filter` on that run"
        )
    out = Path(out)
    claim_output_dir(out, "data build", BUILD_OUTPUTS, arg="--out", signature="build_report.json")
    return manifest, rows, out


# ------------------------------------------------------------------------------------------------ compute
def _compute_build(rows: list[dict], manifest: Path, out: Path, cfg: BuildConfig) -> dict[str, Any]:
    """Per neutral prompt (module docstring): its population sets and pairs, image paths relative to `out` ->
    {"population": rows, "pairwise": rows, "prompts": per-prompt counts, "shortfalls", "ties", "flipped"}; no set
    at all is an error."""
    base = manifest.parent
    by_prompt: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        r = {**r, "image": os.path.relpath(base / r["image"], out)}
        by_prompt.setdefault(r["neutral"], {"winning": [], "losing": []})[r["population"]].append(r)
    built: dict[str, Any] = {"population": [], "pairwise": [], "prompts": {}, "shortfalls": [], "ties": 0,
                             "flipped": 0}  # fmt: skip
    for neutral, pops in by_prompt.items():
        rng = _rng(cfg.seed, neutral, "sets")
        w = [pops["winning"][i] for i in rng.permutation(len(pops["winning"]))]
        lo = [pops["losing"][i] for i in rng.permutation(len(pops["losing"]))]
        sets = _prompt_sets(neutral, w, lo, cfg, built)
        pairs = _prompt_pairs(neutral, w, lo, cfg, built["pairwise"]) if cfg.pairs else 0
        built["prompts"][neutral] = {"winning": len(w), "losing": len(lo), "sets": sets, "pairs": pairs}
    if not built["population"]:
        raise ValueError(
            f"no population set could be built from {manifest}: every prompt has fewer than set_size="
            f"{cfg.set_size} kept images in one of its populations" + (" or every set tied" if built["ties"] else "")
        )
    return built


def _prompt_sets(neutral: str, w: list[dict], lo: list[dict], cfg: BuildConfig, built: dict) -> int:
    """The population sets of one neutral prompt (shuffled winning / losing images), appended to
    built["population"]; shortfalls, ties and flips counted in `built`. Returns the number of sets."""
    fit = min(len(w), len(lo)) // cfg.set_size
    n_sets = fit if cfg.set_count is None else cfg.set_count
    if n_sets > fit:
        msg = (
            f"neutral prompt {neutral!r}: {n_sets} sets of {cfg.set_size} need {n_sets * cfg.set_size} winning "
            f"and {n_sets * cfg.set_size} losing images; {len(w)} winning and {len(lo)} losing images were kept"
        )
        if cfg.on_short == "error":
            raise ValueError(msg + " (lower set_size / set_count, sample more, or pass on_short='skip')")
        built["shortfalls"].append(msg)
        n_sets = fit
    count = 0
    for k in range(n_sets):
        sw = w[k * cfg.set_size : (k + 1) * cfg.set_size]
        sl = lo[k * cfg.set_size : (k + 1) * cfg.set_size]
        if cfg.rule == "distinct_groups":
            gw, gl = _groups(sw, cfg.group_axes), _groups(sl, cfg.group_axes)
            if gw == gl:
                built["ties"] += 1
                continue
            if gl > gw:
                built["flipped"] += 1
                sw, sl = sl, sw
        set_id = f"{_slug(neutral)}-{k:04d}"
        for pop, members in (("winning", sw), ("losing", sl)):
            built["population"] += [_set_row(set_id, pop, neutral, r) for r in members]
        count += 1
    return count


def _set_row(set_id: str, population: str, neutral: str, r: dict) -> dict:
    """One image of a population set: captioned with the neutral prompt (PopAlign Sec. 4.1)."""
    return {
        "set_id": set_id,
        "population": population,
        "caption": neutral,
        "image": r["image"],
        "prompt": r["prompt"],
        "seed": r.get("seed"),
        "index": r.get("index"),
        "identity": r.get("identity") or {},
        "attributes": r.get("attributes") or {},
    }


def _prompt_pairs(neutral: str, w: list[dict], lo: list[dict], cfg: BuildConfig, pair_rows: list[dict]) -> int:
    """Each winning image of one neutral prompt paired with a losing one, without replacement (own shuffle);
    appended to `pair_rows`. Returns min(W, L)."""
    prng = _rng(cfg.seed, neutral, "pairs")
    pw = [w[i] for i in prng.permutation(len(w))]
    pl = [lo[i] for i in prng.permutation(len(lo))]
    for k, (a, b) in enumerate(zip(pw, pl)):
        pair_rows.append({"id": f"{_slug(neutral)}-{k:05d}", "caption": neutral, "winner": a["image"],
                          "loser": b["image"], "winner_prompt": a["prompt"]})  # fmt: skip
    return min(len(pw), len(pl))


# ------------------------------------------------------------------------------------------------ write
def _write_build(built: dict[str, Any], manifest: Path, out: Path, cfg: BuildConfig, log) -> dict:
    """population.jsonl, pairwise.jsonl (when there are pairs) and build_report.json, published together (all
    from this run, or all from the last); returns the summary (the report)."""

    pop_rows, pair_rows, per_prompt = built["population"], built["pairwise"], built["prompts"]
    files = {"population": str(out / "population.jsonl")}
    if pair_rows:
        files["pairwise"] = str(out / "pairwise.jsonl")
    summary: dict[str, Any] = {
        "filtered": str(manifest),
        "out": str(out),
        "config": {**asdict(cfg), "group_axes": list(cfg.group_axes) if cfg.group_axes else None},
        "sets": sum(v["sets"] for v in per_prompt.values()),
        "pairs": len(pair_rows),
        "images_in_sets": len(pop_rows),
        "prompts": per_prompt,
        "shortfalls": built["shortfalls"],
        "ties_dropped": built["ties"],
        "sets_flipped": built["flipped"],
        "files": files,
    }
    with publish_together(out) as st:
        st.stage(out / "population.jsonl").write_text(format_manifest(pop_rows), encoding="utf-8")
        if pair_rows:
            st.stage(out / "pairwise.jsonl").write_text(format_manifest(pair_rows), encoding="utf-8")
        st.stage(out / "build_report.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if not pair_rows:
        (out / "pairwise.jsonl").unlink(missing_ok=True)  # an earlier run's pairs would not match these sets
    log(f"[build] {summary['sets']} sets ({len(pop_rows)} images), {len(pair_rows)} pairs -> {out}")
    return summary
