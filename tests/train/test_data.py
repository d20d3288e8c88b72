"""Preference data on disk (popalign_core.train.data): manifests, validation, pairing, hashing, image loading."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from popalign_core.train.data import (
    DATA_KINDS,
    PreferenceData,
    Sample,
    load_image,
    load_preference_data,
    pair_population,
    write_manifest,
)

NEUTRAL = "a photo of a doctor"


def _png(path: Path, color=(10, 20, 30), size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _line(suffix: str, row: int) -> int:
    """The file line of a data row written by write_manifest (CSV: after the header)."""
    return row + (suffix == ".csv")


def _population_rows(folder: Path, sets=(("doctor", 3, 2), ("nurse", 2, 4))) -> list[dict]:
    """Rows of population sets (set_id, #winning, #losing); images written under folder/img."""
    rows = []
    for s, (set_id, nw, nl) in enumerate(sets):
        for pop, n in (("winning", nw), ("losing", nl)):
            for k in range(n):
                name = f"img/{set_id}_{pop}_{k}.png"
                _png(folder / name, (s * 40, k * 30, 100 if pop == "winning" else 200))
                prompt = f"a photo of a female {set_id}" if pop == "winning" else f"a photo of a {set_id}"
                rows.append(
                    {"set_id": set_id, "population": pop, "caption": f"a photo of a {set_id}", "image": name,
                     "prompt": prompt, "seed": 7, "index": k, "classifier": "female"}
                )  # fmt: skip
    return rows


def _pairwise_rows(folder: Path, n=3) -> list[dict]:
    rows = []
    for k in range(n):
        _png(folder / f"img/w{k}.png", (k, 200, 0))
        _png(folder / f"img/l{k}.png", (k, 0, 200))
        rows.append(
            {"id": f"p{k}", "caption": f"a cat, number {k}", "winner": f"img/w{k}.png", "loser": f"img/l{k}.png"}
        )
    return rows


# ------------------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_population_manifest_loads(tmp_path, suffix):
    rows = _population_rows(tmp_path)
    m = tmp_path / f"sets{suffix}"
    write_manifest(m, rows)
    data = load_preference_data(m)
    assert isinstance(data, PreferenceData) and data.kind == "population" and data.manifest == m
    assert len(data) == len(rows) == 11 and data.pairs == []
    for r, s in zip(rows, data.samples):
        assert isinstance(s, Sample)
        assert s.image == tmp_path / r["image"] and s.image.is_absolute()
        assert s.caption == r["caption"] and s.group == r["set_id"]
        assert s.label == (1 if r["population"] == "winning" else -1)
        assert s.meta == {"prompt": r["prompt"], "seed": 7, "index": r["index"], "classifier": "female"}
    assert [s.row for s in data.samples] == list(range(1, 12))
    assert data.winning() == [0, 1, 2, 5, 6] and data.losing() == [3, 4, 7, 8, 9, 10]
    assert data.groups() == {"doctor": [0, 1, 2, 3, 4], "nurse": [5, 6, 7, 8, 9, 10]}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_pairwise_manifest_loads(tmp_path, suffix):
    rows = _pairwise_rows(tmp_path)
    rows[1].pop("id")
    rows[2]["score"] = 0.75
    m = tmp_path / f"pairs{suffix}"
    write_manifest(m, rows)
    data = load_preference_data(m, kind="pairwise")
    assert data.kind == "pairwise" and len(data) == 6
    assert data.pairs == [(0, 1), (2, 3), (4, 5)]
    assert data.winning() == [0, 2, 4] and data.losing() == [1, 3, 5]
    assert [s.group for s in data.samples] == ["p0", "p0", "row2", "row2", "p2", "p2"]
    assert [s.row for s in data.samples] == [1, 1, 2, 2, 3, 3]
    w, lo = data.samples[4], data.samples[5]
    assert (w.image, lo.image) == (tmp_path / "img/w2.png", tmp_path / "img/l2.png")
    assert w.caption == lo.caption == "a cat, number 2"  # a quoted comma in CSV
    assert w.meta == {"score": 0.75 if suffix == ".jsonl" else "0.75"} and data.samples[0].meta == {}
    assert load_preference_data(m).kind == "pairwise"  # detected


def test_csv_quoting_bom_blank_lines_absolute_paths_and_label_spellings(tmp_path):
    for name in ("a", "b", "c"):
        _png(tmp_path / "img" / f"{name}.png")
    absolute = tmp_path / "img" / "c.png"
    text = (
        "\ufeffset_id,population,caption,image,note\r\n"
        "\r\n"
        's1,+1,"a photo of a doctor, smiling",img/a.png,"says ""hi"""\r\n'
        ",,,,\r\n"
        's1,-1,"a photo of a doctor, smiling",img/b.png,\r\n'
        f's1,Losing,"a photo of a doctor, smiling",{absolute},"multi\nline"\r\n'
    )
    m = tmp_path / "m.csv"
    m.write_bytes(text.encode("utf-8"))
    data = load_preference_data(m)
    assert [s.label for s in data.samples] == [1, -1, -1]
    assert [s.row for s in data.samples] == [1, 2, 3]
    assert data.samples[0].caption == "a photo of a doctor, smiling"
    assert data.samples[0].meta == {"note": 'says "hi"'} and data.samples[1].meta == {}
    assert data.samples[2].image == absolute and data.samples[2].meta == {"note": "multi\nline"}


def test_jsonl_blank_lines_and_integer_labels(tmp_path):
    _png(tmp_path / "img/a.png")
    _png(tmp_path / "img/b.png")
    m = tmp_path / "m.jsonl"
    m.write_text(
        '\n{"set_id": 3, "population": 1, "caption": "x", "image": "img/a.png"}\n\n'
        '{"set_id": 3, "population": -1, "caption": "x", "image": "img/b.png", "seed": "5"}\n'
    )
    data = load_preference_data(m)
    assert [(s.group, s.label, s.row) for s in data.samples] == [("3", 1, 1), ("3", -1, 2)]
    assert data.samples[1].meta == {"seed": 5}


def test_write_manifest_round_trips_and_is_atomic(tmp_path):
    rows = [{"a": "x, y", "b": 1, "c": None}, {"b": 2, "d": 'q"uote', "e": [1, 2]}]
    write_manifest(tmp_path / "sub/m.jsonl", rows)
    lines = (tmp_path / "sub/m.jsonl").read_text().splitlines()
    assert lines == ['{"a": "x, y", "b": 1, "c": null}', '{"b": 2, "d": "q\\"uote", "e": [1, 2]}']
    write_manifest(tmp_path / "m.csv", rows)
    import csv

    with open(tmp_path / "m.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert back == [
        {"a": "x, y", "b": "1", "c": "", "d": "", "e": ""},
        {"a": "", "b": "2", "c": "", "d": 'q"uote', "e": "[1, 2]"},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "sub"]  # no temporary file left
    with pytest.raises(ValueError, match=r"unknown manifest suffix '\.txt'"):
        write_manifest(tmp_path / "m.txt", rows)
    with pytest.raises(ValueError, match=r"rows\[1\] must be a dict"):
        write_manifest(tmp_path / "m.csv", [{"a": 1}, ["a"]])
    assert (tmp_path / "m.csv").read_text().startswith("a,b,c,d,e\n")  # the failed write left the old file


# ------------------------------------------------------------------------------------------------------ pairing
def test_pair_population_seeded_within_sets_without_replacement(tmp_path):
    rows = _population_rows(tmp_path, (("doctor", 5, 3), ("nurse", 4, 6), ("chef", 6, 6)))
    write_manifest(tmp_path / "m.jsonl", rows)
    data = load_preference_data(tmp_path / "m.jsonl")
    pairs = pair_population(data, seed=0)
    assert len(pairs) == 3 + 4 + 6
    used = [i for p in pairs for i in p]
    assert len(used) == len(set(used))  # without replacement
    for w, lo in pairs:
        assert data.samples[w].label == 1 and data.samples[lo].label == -1
        assert data.samples[w].group == data.samples[lo].group
    assert [data.samples[w].group for w, _ in pairs] == ["doctor"] * 3 + ["nurse"] * 4 + ["chef"] * 6
    assert pair_population(data, seed=0) == pairs and data.pairs == []  # deterministic, data untouched
    other = [pair_population(data, seed=s) for s in (1, 2, 3)]
    assert all(o != pairs for o in other)
    # a set's pairing depends only on the seed and its own rows
    write_manifest(tmp_path / "m2.jsonl", [r for r in rows if r["set_id"] != "doctor"])
    sub = load_preference_data(tmp_path / "m2.jsonl")
    key = lambda d, ps: [(d.samples[w].image, d.samples[lo].image) for w, lo in ps]  # noqa: E731
    assert key(sub, pair_population(sub, 0)) == key(data, pairs)[3:]
    with pytest.raises(ValueError, match="seed=1.5 is invalid"):
        pair_population(data, 1.5)
    write_manifest(tmp_path / "p.csv", _pairwise_rows(tmp_path))
    with pytest.raises(ValueError, match="needs population data"):
        pair_population(load_preference_data(tmp_path / "p.csv"), 0)


# ------------------------------------------------------------------------------------------------------ hashing
def test_sha256_tracks_manifest_and_image_bytes(tmp_path):
    rows = _population_rows(tmp_path, (("doctor", 2, 2),))
    m = tmp_path / "m.csv"
    write_manifest(m, rows)
    h0 = load_preference_data(m).sha256()
    assert re.fullmatch(r"[0-9a-f]{64}", h0) and load_preference_data(m).sha256() == h0
    img = tmp_path / rows[1]["image"]
    original = img.read_bytes()
    _png(img, (1, 2, 3))
    h1 = load_preference_data(m).sha256()
    assert h1 != h0
    img.write_bytes(original)
    assert load_preference_data(m).sha256() == h0
    rows[0]["classifier"] = "male"
    write_manifest(m, rows)
    assert load_preference_data(m).sha256() not in (h0, h1)
    # a copy of the data folder elsewhere has the same hash
    h2 = load_preference_data(m).sha256()
    copy = shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}_copy")
    try:
        assert load_preference_data(copy / "m.csv").sha256() == h2
    finally:
        shutil.rmtree(copy)


# ------------------------------------------------------------------------------------------------------ images
def test_load_image_resizes_shorter_side_and_center_crops(tmp_path):
    # 10 wide x 4 high, one distinct color per column: a square target of the short side only crops
    arr = np.zeros((4, 10, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(10)[None, :] * 25
    arr[:, :, 1] = 100
    arr[:, :, 2] = np.arange(4)[:, None] * 60
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 4)
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(arr[:, 3:7]).permute(2, 0, 1).float() / 255)  # columns 3..6 (centre)
    # downscale by 2 (Lanczos): 16 x 64 (h x w), red left half, blue right half -> size 8: 8 x 32, columns 12..19.
    # Columns 0 and 7 of the crop lie farther from the colour edge than the kernel reaches (3 output pixels).
    big = np.zeros((16, 64, 3), dtype=np.uint8)
    big[:, :32, 0] = 255
    big[:, 32:, 2] = 255
    Image.fromarray(big).save(tmp_path / "halves.png")
    y = load_image(tmp_path / "halves.png", 8)
    assert y.shape == (3, 8, 8) and 0.0 <= y.min() and y.max() <= 1.0
    red, blue = torch.tensor([1.0, 0.0, 0.0])[:, None], torch.tensor([0.0, 0.0, 1.0])[:, None]
    assert torch.allclose(y[:, :, 0], red, atol=1 / 255) and torch.allclose(y[:, :, 7], blue, atol=1 / 255)
    assert y[0, :, :4].mean() > 0.9 and y[2, :, 4:].mean() > 0.9  # the edge is in the middle of the crop
    # (height, width) target on a portrait image: scaled to cover, cropped vertically
    Image.fromarray(np.ascontiguousarray(arr.transpose(1, 0, 2))).save(tmp_path / "tall.png")  # 4 wide x 10 high
    z = load_image(tmp_path / "tall.png", (6, 4))
    assert z.shape == (3, 6, 4)
    assert torch.equal(z, torch.from_numpy(arr.transpose(1, 0, 2)[2:8]).permute(2, 0, 1).float() / 255)


def test_load_image_exif_orientation_alpha_and_errors(tmp_path):
    arr = np.zeros((2, 4, 3), dtype=np.uint8)
    arr[:, :2] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=100)
    x = load_image(tmp_path / "rot.jpg", (4, 2))  # displayed: 2 wide x 4 high, top half white
    assert x.shape == (3, 4, 2) and x[:, :2].mean() > 0.9 and x[:, 2:].mean() < 0.1
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # fully transparent black -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert torch.equal(load_image(tmp_path / "alpha.png", 2), torch.ones(3, 2, 2))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png", 4)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png is unreadable"):
        load_image(tmp_path / "bad.png", 4)
    for bad in (0, -1, True, (4,), (4, 0), 2.0):
        with pytest.raises(ValueError, match="size="):
            load_image(tmp_path / "alpha.png", bad)


# ------------------------------------------------------------------------------------------------------ validation
def _write(tmp_path: Path, name: str, text: str) -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path / name


def test_manifest_level_errors(tmp_path):
    with pytest.raises(ValueError, match=r"kind='dpo' is invalid; valid values: pairwise, population"):
        load_preference_data(tmp_path / "m.csv", kind="dpo")
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: manifest file not found"):
        load_preference_data(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"unknown manifest suffix '\.json'"):
        load_preference_data(_write(tmp_path, "m.json", "{}"))
    for name, text in (("e.jsonl", "\n \n"), ("e.csv", ""), ("h.csv", "caption,winner,loser\n\n")):
        with pytest.raises(ValueError, match=rf"{re.escape(name)}: manifest is empty"):
            load_preference_data(_write(tmp_path, name, text))
    pattern = (
        r"c\.csv: columns \['caption', 'image'\] fit no data kind \(pairwise needs columns caption, winner, loser; "
        r"population needs columns set_id, population, caption, image\)"
    )
    with pytest.raises(ValueError, match=pattern):
        load_preference_data(_write(tmp_path, "c.csv", "caption,image\nx,a.png\n"))
    both = "set_id,population,caption,image,winner,loser\ns,winning,x,a.png,a.png,b.png\n"
    with pytest.raises(ValueError, match=r"fit both data kinds; pass kind="):
        load_preference_data(_write(tmp_path, "b.csv", both))
    with pytest.raises(ValueError, match=r"p\.csv, line 1 \(header\): missing required columns 'winner', 'loser'"):
        load_preference_data(_write(tmp_path, "p.csv", "caption,image\nx,a.png\n"), kind="pairwise")
    with pytest.raises(ValueError, match=r"d\.csv, line 1: the header names column 'caption' twice"):
        load_preference_data(_write(tmp_path, "d.csv", "caption,caption,winner,loser\nx,x,a,b\n"))
    assert DATA_KINDS == ("pairwise", "population")


def test_bad_json_lines_reported_with_line_numbers(tmp_path):
    text = '{"caption": "x", "winner": "a", "loser": "b"}\n\n{"caption": "x",\n[1, 2]\n'
    pattern = (
        r"(?s)2 problems.*j\.jsonl, row 2 \(line 3\): invalid JSON.*j\.jsonl, row 3 \(line 4\): expected a JSON object"
    )
    with pytest.raises(ValueError, match=pattern):
        load_preference_data(_write(tmp_path, "j.jsonl", text))


def test_csv_extra_and_missing_fields_reported(tmp_path):
    text = "caption,winner,loser\nx,a.png,b.png,c.png\n"
    with pytest.raises(ValueError, match=r"f\.csv, row 1 \(line 2\): 4 fields but the header has 3 columns"):
        load_preference_data(_write(tmp_path, "f.csv", text))
    text = "caption,winner,loser\nx,a.png,b.png\ny,a.png\n"
    with pytest.raises(ValueError, match=r"s\.csv, row 2 \(line 3\): column 'loser' is empty"):
        load_preference_data(_write(tmp_path, "s.csv", text))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_population_row_errors_are_collected(tmp_path, suffix):
    rows = _population_rows(tmp_path, (("doctor", 2, 2),))
    rows[0]["caption"] = ""  # row 1
    rows[1]["population"] = "neutral"  # row 2
    rows[2]["seed"] = "x"  # row 3
    m = tmp_path / f"bad{suffix}"
    write_manifest(m, rows)
    name, line = re.escape(m.name), lambda row: _line(suffix, row)
    with pytest.raises(ValueError) as err:
        load_preference_data(m)
    msg = str(err.value)
    assert msg.startswith(f"{m}: 3 problems:")
    assert re.search(rf"{name}, row 1 \(line {line(1)}\): column 'caption' is empty", msg)
    valid = r"valid values: 'winning', 'losing', '\+1', '1', '-1'"
    assert re.search(
        rf"{name}, row 2 \(line {line(2)}\): column 'population' has invalid value 'neutral'; {valid}", msg
    )
    assert re.search(rf"{name}, row 3 \(line {line(3)}\): column 'seed' must be an integer, got 'x'", msg)


def test_jsonl_missing_column_per_row(tmp_path):
    text = '{"caption": "x", "winner": "a.png", "loser": "b.png"}\n{"caption": "y", "winner": "a.png"}\n'
    with pytest.raises(ValueError, match=r"k\.jsonl, row 2 \(line 2\): missing required column 'loser'"):
        load_preference_data(_write(tmp_path, "k.jsonl", text), kind="pairwise")


def test_many_bad_rows_listed_first_20_and_counted(tmp_path):
    rows = [{"caption": "x", "winner": f"w{k}.png", "loser": f"l{k}.png"} for k in range(30)]
    write_manifest(tmp_path / "many.csv", rows)
    with pytest.raises(FileNotFoundError) as err:
        load_preference_data(tmp_path / "many.csv")
    msg = str(err.value)
    assert "60 problems (first 20 shown)" in msg and "... and 40 more" in msg
    assert re.search(r"many\.csv, row 1 \(line 2\): column 'winner': image file '.*w0\.png' does not exist", msg)
    assert re.search(r"many\.csv, row 1 \(line 2\): column 'loser': image file '.*l0\.png' does not exist", msg)
    assert "row 10 " in msg and "row 11 " not in msg


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_missing_and_unreadable_images(tmp_path, suffix):
    rows = _population_rows(tmp_path, (("doctor", 2, 2),))
    (tmp_path / rows[1]["image"]).unlink()  # row 2 missing
    m = tmp_path / f"img{suffix}"
    write_manifest(m, rows)
    where = rf"{re.escape(m.name)}, row 2 \(line {_line(suffix, 2)}\)"
    with pytest.raises(
        FileNotFoundError, match=rf"{where}: column 'image': image file '.*doctor_winning_1\.png' does not"
    ):
        load_preference_data(m)
    (tmp_path / rows[1]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # unreadable
    (tmp_path / rows[3]["image"]).unlink()  # row 4 missing
    with pytest.raises(ValueError, match=r"(?s)2 problems.*row 2 .*is unreadable.*row 4 .*does not exist") as err:
        load_preference_data(m)
    assert not isinstance(err.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match=r"row 4"):  # existence is checked even without verify
        load_preference_data(m, check_images=False)
    _png(tmp_path / rows[3]["image"])
    assert len(load_preference_data(m, check_images=False)) == 4


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_empty_population_sides(tmp_path, suffix):
    rows = _population_rows(tmp_path, (("doctor", 2, 0), ("nurse", 1, 1), ("chef", 0, 2)))
    m = tmp_path / f"sets{suffix}"
    write_manifest(m, rows)
    with pytest.raises(ValueError) as err:
        load_preference_data(m)
    msg = str(err.value)
    assert f"{m}: set 'doctor' (rows 1, 2) has no losing images (empty set)" in msg
    assert f"{m}: set 'chef' (rows 5, 6) has no winning images (empty set)" in msg
    assert "nurse" not in msg


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_mismatched_captions_in_a_set(tmp_path, suffix):
    rows = _population_rows(tmp_path, (("doctor", 2, 2),))
    rows[2]["caption"] = "a photo of a physician"
    m = tmp_path / f"cap{suffix}"
    write_manifest(m, rows)
    captions = r"'a photo of a doctor' \(rows 1, 2, 4\); 'a photo of a physician' \(row 3\)"
    with pytest.raises(ValueError, match=rf"{re.escape(m.name)}: set 'doctor' has mismatched captions .*{captions}"):
        load_preference_data(m)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_duplicate_image_in_a_set(tmp_path, suffix):
    rows = _population_rows(tmp_path, (("doctor", 2, 2), ("nurse", 1, 1)))
    rows.append(dict(rows[0], population="losing"))  # row 7: doctor's row-1 image again, other side
    rows.append(dict(rows[0], set_id="nurse", caption="a photo of a nurse"))  # same image in another set: fine
    m = tmp_path / f"dup{suffix}"
    write_manifest(m, rows)
    where = rf"{re.escape(m.name)}, row 7 \(line {_line(suffix, 7)}\)"
    pattern = rf"{where}: image '.*doctor_winning_0\.png' is listed twice in set 'doctor' \(rows 1 and 7\)$"
    with pytest.raises(ValueError, match=pattern):
        load_preference_data(m)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_pairwise_errors(tmp_path, suffix):
    rows = _pairwise_rows(tmp_path, 2)
    rows.append(dict(rows[0], id="p9", caption="again"))  # row 3: same pair as row 1
    rows.append({"id": "p3", "caption": "x", "winner": "img/w1.png", "loser": "./img/../img/w1.png"})  # row 4
    rows.append(dict(rows[1]))  # row 5: id p1 again
    m = tmp_path / f"pairs{suffix}"
    write_manifest(m, rows)
    with pytest.raises(ValueError) as err:
        load_preference_data(m)
    msg = str(err.value)
    name = re.escape(m.name)
    pair = r"the pair \('img/w0.png', 'img/l0.png'\) is listed twice \(rows 1 and 3\)"
    assert re.search(rf"{name}, row 3 \(line {_line(suffix, 3)}\): {pair}", msg)
    assert re.search(
        rf"{name}, row 4 \(line {_line(suffix, 4)}\): winner and loser are the same image 'img/w1.png'", msg
    )
    assert re.search(rf"{name}, row 5 \(line {_line(suffix, 5)}\): pair id 'p1' is used twice \(rows 2 and 5\)", msg)
    assert "3 problems" in msg


def test_pairwise_empty_caption_csv(tmp_path):
    rows = _pairwise_rows(tmp_path, 2)
    rows[1]["caption"] = "   "
    write_manifest(tmp_path / "p.csv", rows)
    with pytest.raises(ValueError, match=r"p\.csv, row 2 \(line 3\): column 'caption' is empty"):
        load_preference_data(tmp_path / "p.csv")


def test_manifest_readers_and_writers_stay_importable_from_data(tmp_path):
    from popalign_core.common import manifest
    from popalign_core.train import data

    for name in ("MANIFEST_SUFFIXES", "format_manifest", "read_manifest_csv", "read_manifest_jsonl", "write_manifest"):
        assert getattr(data, name) is getattr(manifest, name)
    rows = [{"a": 1, "b": [1, 2]}, {"a": "x"}]
    for suffix in (".jsonl", ".csv"):
        manifest.write_manifest(tmp_path / f"m{suffix}", rows)
        columns, read = (manifest.read_manifest_jsonl if suffix == ".jsonl" else manifest.read_manifest_csv)(
            tmp_path / f"m{suffix}"
        )
        assert columns == ["a", "b"] and [r.row for r in read] == [1, 2]
