"""fileio: atomic writes with ordinary permissions, several files as one step, output folders that are ours, and
weight files read with errors that name them."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from popalign_core.common import fileio as F


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


# ------------------------------------------------------------------------------------------------ permissions
def test_written_files_get_ordinary_permissions(tmp_path, umask022):
    F.atomic_write_text(tmp_path / "a.json", "{}")
    F.save_safetensors({"x": torch.zeros(2)}, tmp_path / "w.safetensors")  # safetensors alone creates 0600
    F.atomic_copy(tmp_path / "w.safetensors", tmp_path / "c.safetensors")
    with F.atomic_path(tmp_path / "folder") as tmp:
        tmp.mkdir()
        F.save_safetensors({"x": torch.zeros(2)}, tmp / "inner.safetensors")
        os.chmod(tmp / "inner.safetensors", 0o600)
    for f in ("a.json", "w.safetensors", "c.safetensors", "folder/inner.safetensors"):
        assert _mode(tmp_path / f) == 0o644, f
    assert _mode(tmp_path / "folder") == 0o755


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        F.save_safetensors({"x": torch.zeros(2)}, tmp_path / "w.safetensors")
        assert _mode(tmp_path / "w.safetensors") == 0o640
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------ temporaries
def test_clean_temporaries_removes_only_its_own_names(tmp_path):
    own = [tmp_path / ".lora.safetensors.0123456789ab.tmp", tmp_path / ".ckpt.0123456789ab.old.tmp"]
    own[0].write_text("x")
    own[1].mkdir()
    users = [tmp_path / "notes.tmp", tmp_path / ".cache.tmp", tmp_path / "x.0123456789ab.tmp"]
    for u in users:
        u.write_text("mine")
    assert sorted(F.clean_temporaries(tmp_path)) == sorted(p.name for p in own)
    assert all(u.read_text() == "mine" for u in users) and not any(p.exists() for p in own)


def test_atomic_path_removes_its_temporary_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with F.atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ several files as one
def _publish(folder, step, fail_after=None, monkeypatch=None):
    if fail_after is not None:
        real, calls = F._swap_in, []

        def swap(tmp, target):
            if len(calls) == fail_after:
                raise KeyboardInterrupt("killed")  # a kill between two renames
            calls.append(target)
            real(tmp, target)

        monkeypatch.setattr(F, "_swap_in", swap)
    with F.publish_together(folder) as st:
        st.stage(folder / "a.txt").write_text(f"step {step}")
        d = st.stage(folder / "b_diffusers")
        d.mkdir()
        (d / "w.txt").write_text(f"step {step}")
        st.stage(folder / "c.json").write_text(json.dumps({"step": step}))


def _state(folder):
    return {(folder / "a.txt").read_text(), (folder / "b_diffusers" / "w.txt").read_text(),
            f"step {json.loads((folder / 'c.json').read_text())['step']}"}  # fmt: skip


@pytest.mark.parametrize("fail_after", [0, 1, 2, 3])
def test_publish_together_is_one_step_after_a_kill_between_renames(tmp_path, monkeypatch, fail_after):
    """Renames: 0 = the journal's own (the commit), 1-3 = the three outputs. Killed before the commit: the old step
    stays; after it: the next start completes the new step. Never a mix, never a temporary left."""
    _publish(tmp_path, 1)
    with pytest.raises(KeyboardInterrupt):
        _publish(tmp_path, 2, fail_after=fail_after, monkeypatch=monkeypatch)
    monkeypatch.undo()
    assert (tmp_path / F.PUBLISH_JOURNAL).is_file() == (fail_after > 0)
    F.clean_temporaries(tmp_path)  # what the next run does first
    assert _state(tmp_path) == {"step 2" if fail_after else "step 1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b_diffusers", "c.json"]


def test_publish_together_keeps_the_old_files_when_writing_fails(tmp_path):
    _publish(tmp_path, 1)
    with pytest.raises(OSError):
        with F.publish_together(tmp_path) as st:
            st.stage(tmp_path / "a.txt").write_text("step 2")
            raise OSError(28, "No space left on device")
    assert _state(tmp_path) == {"step 1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b_diffusers", "c.json"]


def test_a_damaged_journal_is_not_replayed(tmp_path):
    _publish(tmp_path, 1)
    (tmp_path / F.PUBLISH_JOURNAL).write_text("{trunc")
    (tmp_path / ".a.txt.0123456789ab.tmp").write_text("step 2")
    F.clean_temporaries(tmp_path)
    assert _state(tmp_path) == {"step 1"} and len(list(tmp_path.iterdir())) == 3


# ------------------------------------------------------------------------------------------------ output folders
LAYOUT = {"result.json": None, "*.png": None, "images": {"*.png": None}, "model": F.ANY}


def test_claim_new_empty_own_and_other_commands_folder(tmp_path):
    d = F.claim_output_dir(tmp_path / "new" / "run", "cmd", LAYOUT)
    assert F.read_marker(d)["command"] == "cmd"
    (d / "result.json").write_text("{}")
    assert F.claim_output_dir(d, "cmd", LAYOUT) == d  # an earlier run of the same command
    with pytest.raises(FileExistsError, match=r"holds the output of `cmd`; give `other` a folder of its own"):
        F.claim_output_dir(d, "other", LAYOUT)
    (tmp_path / "empty").mkdir()
    F.claim_output_dir(tmp_path / "empty", "cmd", LAYOUT)
    with pytest.raises(NotADirectoryError, match="is a file"):
        F.claim_output_dir(d / "result.json", "cmd", LAYOUT)


def test_claim_refuses_a_folder_with_foreign_files_and_changes_nothing(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "holiday.jpg").write_text("photo")
    (tmp_path / "result.json").write_text("{}")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(FileExistsError, match=r"did not write \('images/holiday.jpg'\).*nothing was changed"):
        F.claim_output_dir(tmp_path, "cmd", LAYOUT, signature="result.json")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_claim_adopts_a_run_of_an_older_version_only_by_its_signature(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_text("x")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "anything.bin").write_text("x")
    # names that merely fit the layout (a folder of the user's PNGs) are not a run: refused, unchanged
    with pytest.raises(FileExistsError, match=r"did not write \('images/', 'model/'\)"):
        F.claim_output_dir(tmp_path, "cmd", LAYOUT, signature="result.json")
    assert F.read_marker(tmp_path) is None
    (tmp_path / "result.json").write_text("{}")  # what every run of the command writes first
    with pytest.raises(FileExistsError):
        F.claim_output_dir(tmp_path, "cmd", LAYOUT)  # no signature given: never adopted
    F.claim_output_dir(tmp_path, "cmd", LAYOUT, signature="result.json")
    assert F.read_marker(tmp_path)["command"] == "cmd"


def test_clear_deletes_only_a_folder_the_command_wrote(tmp_path):
    d = F.claim_output_dir(tmp_path / "run", "cmd", LAYOUT)
    (d / "result.json").write_text("{}")
    (d / "images").mkdir()
    (d / "images" / "0.png").write_text("x")
    F.clear_output_dir(d, "cmd", LAYOUT)
    assert [p.name for p in d.iterdir()] == [F.OUTPUT_MARKER]


@pytest.mark.parametrize("extra", ["notes.txt", "images/holiday.jpg", "sub/"])
def test_clear_refuses_when_anything_else_is_inside_and_deletes_nothing(tmp_path, extra):
    d = F.claim_output_dir(tmp_path / "run", "cmd", LAYOUT)
    (d / "result.json").write_text("{}")
    (d / "images").mkdir()
    target = d / extra.rstrip("/")
    target.mkdir() if extra.endswith("/") else target.write_text("mine")
    before = sorted(p.relative_to(d) for p in d.rglob("*"))
    with pytest.raises(FileExistsError, match=rf"did not write \('{extra}'\).*nothing was deleted"):
        F.clear_output_dir(d, "cmd", LAYOUT)
    assert sorted(p.relative_to(d) for p in d.rglob("*")) == before


def test_clear_refuses_a_folder_without_the_marker(tmp_path):
    (tmp_path / "result.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"no \.popalign-output\.json marker.*nothing was deleted"):
        F.clear_output_dir(tmp_path, "cmd", LAYOUT)
    assert (tmp_path / "result.json").is_file()
    F.clear_output_dir(tmp_path, "cmd", LAYOUT, signature="result.json")  # an older version's folder
    assert not (tmp_path / "result.json").exists()


def test_clear_never_follows_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.png").write_text("x")
    d = F.claim_output_dir(tmp_path / "run", "cmd", LAYOUT)
    (d / "link.png").symlink_to(outside / "precious.png")
    F.clear_output_dir(d, "cmd", LAYOUT)
    assert (outside / "precious.png").read_text() == "x" and not (d / "link.png").exists()


def test_check_replaceable(tmp_path):
    f = tmp_path / "grid.png"
    f.write_text("user's picture")
    with pytest.raises(FileExistsError, match="was not written by `x`"):
        F.check_replaceable(f, "x", lambda p: False)
    F.check_replaceable(f, "x", lambda p: True)
    with pytest.raises(IsADirectoryError):
        F.check_replaceable(tmp_path, "x", lambda p: True)


# ------------------------------------------------------------------------------------------------ reading weights
def _weights(p):
    F.save_safetensors({"a": torch.arange(1000.0), "b": torch.ones(3)}, p, {"k": "v"})
    return p


def test_read_safetensors(tmp_path):
    sd, meta = F.read_safetensors(_weights(tmp_path / "w.safetensors"))
    assert set(sd) == {"a", "b"} and meta == {"k": "v"}
    assert set(F.read_safetensors(tmp_path / "w.safetensors", keys=lambda k: k == "b")[0]) == {"b"}
    assert F.safetensors_keys(tmp_path / "w.safetensors")[0] == ["a", "b"]
    with pytest.raises(ValueError, match="has no tensor 'c'"):
        F.read_safetensors(tmp_path / "w.safetensors", "LoRA file", keys=["c"])


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "header"])
def test_damaged_weight_files_name_the_file_and_say_what_to_do(tmp_path, damage):
    p = _weights(tmp_path / "w.safetensors")
    data = p.read_bytes()
    p.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"hello world, not weights" * 9,
                   "header": data[:8] + b"{not json" + data[17:]}[damage])  # fmt: skip
    with pytest.raises(F.CorruptFileError) as e:
        F.read_safetensors(p, "LoRA file", "re-export it")
    msg = str(e.value)
    assert msg.startswith(f"LoRA file {str(p)!r}") and "damaged, truncated or not a safetensors file" in msg
    assert msg.endswith("; re-export it") and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="LoRA file .* does not exist"):
        F.read_safetensors(tmp_path / "nope.safetensors", "LoRA file")
