"""`popalign data augment` (the CLI of the population pipeline's augmentation step)."""

from __future__ import annotations

import json

import pytest

from popalign_core.cli import main as cli_main
from popalign_core.population.pipeline import keyword_sets, read_prompt_file


def test_prompt_file_reports_blank_and_duplicate_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# neutral prompts\na photo of a doctor\n\n  a photo of  a doctor \na chef\n   \n")
    prompts, report = read_prompt_file(f)
    assert prompts == ["a photo of a doctor", "a chef"]
    assert report == {"blank_lines": [3, 6], "duplicate_lines": [4]}
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")


def test_data_augment_cli(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a photo of a doctor\na photo of a female nurse\n\na photo of a doctor\n")
    out = tmp_path / "aug.jsonl"
    assert cli_main(["data", "augment", "--prompts", str(f), "--out", str(out), "--samples-per-prompt", "24"]) == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert summary["rows"] == 24 and summary["neutral_prompts"] == 1 and summary["identities"] == 12
    assert summary["blank_lines"] == [3] and summary["duplicate_lines"] == [4]
    assert "skipped (identity-specific): 'a photo of a female nurse': female (gender=female)" in cap.err
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows) == 24 and {r["neutral"] for r in rows} == {"a photo of a doctor"}
    assert len({r["prompt"] for r in rows}) == 12  # every race x gender twice
    assert "a realistic photo of a Latino Hispanic female doctor" in {r["prompt"] for r in rows}


def test_data_augment_toy_and_file_keywords(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a photo of a baker\n")
    out = tmp_path / "aug.jsonl"
    assert cli_main(["data", "augment", "--prompts", str(f), "--out", str(out), "--keywords", "toy",
                     "--axes", "form,hue", "--samples-per-prompt", "8",
                     "--template", "a photo of {article} {identity} {subject}"]) == 0  # fmt: skip
    prompts = sorted(json.loads(ln)["prompt"] for ln in out.read_text().splitlines())
    assert prompts == sorted(f"a photo of {'an' if f == 'angular' else 'a'} {f} {h} baker"
                             for f in ("round", "angular") for h in ("red", "green", "blue", "gold"))  # fmt: skip
    kw = tmp_path / "kw.json"
    kw.write_text(json.dumps({"mood": {"happy": ["happy", "cheerful"], "sad": ["sad"]}}))
    aug, detect, axes = keyword_sets(str(kw))
    assert aug == {"mood": {"happy": "happy", "sad": "sad"}} and axes == ("mood",) and detect["mood"]["happy"][1]
    kw.write_text(json.dumps({"mood": {"happy": []}}))
    capsys.readouterr()
    assert cli_main(["data", "augment", "--prompts", str(f), "--out", str(out), "--keywords", str(kw)]) == 2
    assert "must be a non-empty list of keywords" in capsys.readouterr().err
    assert cli_main(["data", "augment", "--prompts", str(f), "--out", str(out), "--keywords", "nope"]) == 2
    assert "--keywords must be 'default', 'toy' or a JSON file" in capsys.readouterr().err
    assert cli_main(["data", "augment", "--prompts", str(f), "--out", str(out), "--axes", "religion"]) == 2
    assert "unknown axes ['religion']" in capsys.readouterr().err


def test_pipeline_config_and_cli_end_to_end(tmp_path, capsys):
    from pathlib import Path

    from popalign_core.population.pipeline import load_pipeline_config
    from popalign_core.train.data import load_preference_data

    example = Path(__file__).resolve().parents[2] / "examples" / "pipeline_toy.yaml"
    cfg = load_pipeline_config(example, out=str(tmp_path / "p"))
    assert Path(cfg["prompts"]).is_file() and cfg["augment"]["axes"] == ["stature", "form", "hue"]
    small = tmp_path / "small.yaml"
    import yaml

    cfg["prompts"] = ["a photo of a baker", "a photo of a pilot", "a photo of a round pilot"]
    cfg["augment"]["samples_per_prompt"] = 6
    cfg["sample"].update(steps=10, neutral_per_prompt=6, batch_size=32)
    cfg["build"].update(set_size=2)
    small.write_text(yaml.safe_dump(cfg))
    assert cli_main(["data", "pipeline", "--config", str(small)]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["augment"]["rows"] == 12 and s["sample"]["done"] == 24 and s["filter"]["images"] == 24
    assert s["build"]["sets"] >= 2 and set(s["seconds"]) == {"augment", "sample", "filter", "build", "total"}
    assert s["augment"]["skipped"][0]["prompt"] == "a photo of a round pilot"  # names a toy identity
    data = load_preference_data(tmp_path / "p" / "data" / "population.jsonl")
    assert {x.caption for x in data.samples} <= {"a photo of a baker", "a photo of a pilot"}
    from popalign_core.common.fileio import foreign_entries, read_marker
    from popalign_core.population.pipeline import PIPELINE_OUTPUTS

    assert foreign_entries(tmp_path / "p", PIPELINE_OUTPUTS) == []  # the declared layout covers every output
    assert read_marker(tmp_path / "p")["command"] == "data pipeline"
    # re-running resumes: nothing is sampled again
    assert cli_main(["data", "pipeline", "--config", str(small)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sample"]["sampled"] == 0
    # the step commands on the same run
    p = tmp_path / "p"
    flt = ["data", "filter", "--samples", str(p / "samples"), "--out", str(tmp_path / "f")]
    assert cli_main([*flt, "--classifier", "toy", "--classifier-option", "which=train", "--threshold", "0.9"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["images"] == 24 and rep["config"]["threshold"] == 0.9
    assert cli_main(["data", "build", "--filtered", str(tmp_path / "f"), "--out", str(tmp_path / "d"),
                     "--set-size", "1", "--no-pairs"]) == 0  # fmt: skip
    b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert b["sets"] >= 2 and "pairwise" not in b["files"]
    assert cli_main(["data", "build", "--filtered", str(tmp_path / "f"), "--out", str(tmp_path / "d"),
                     "--set-size", "2", "--set-count", "50"]) == 2  # fmt: skip
    assert "50 sets of 2 need 100 winning and 100 losing images" in capsys.readouterr().err
    assert cli_main([*flt, "--classifier-option", "which"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_pipeline_config_errors(tmp_path):
    from popalign_core.population.pipeline import load_pipeline_config

    f = tmp_path / "c.yaml"
    f.write_text("model: toyworld\nprompts: [a]\nout: x\nsampel: {}\n")
    with pytest.raises(ValueError, match="unknown config key 'sampel'"):
        load_pipeline_config(f)
    f.write_text("model: toyworld\nprompts: [a]\nout: x\nsample: {guidance: 2}\n")
    with pytest.raises(ValueError, match="unknown key 'guidance' in section 'sample'"):
        load_pipeline_config(f)
    f.write_text("model: toyworld\nout: x\n")
    with pytest.raises(ValueError, match="config key 'prompts' is required"):
        load_pipeline_config(f)
    with pytest.raises(FileNotFoundError):
        load_pipeline_config(tmp_path / "none.yaml")


def test_keyword_config_with_unknown_axis_is_reported(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a photo of a baker\n")
    assert cli_main(["data", "augment", "--prompts", str(f), "--out", str(tmp_path / "a.jsonl"), "--keywords", "toy",
                     "--axes", "form,mood"]) == 2  # fmt: skip
    assert "unknown axes ['mood']" in capsys.readouterr().err
