"""`popalign data augment` (the CLI of the population pipeline's augmentation step)."""

from __future__ import annotations

import json

import pytest

from popalign_core.cli import main as cli_main
from popalign_core.population import keyword_sets, read_prompt_file


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
