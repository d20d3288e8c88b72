"""userinput: numbers as users write them (flags, YAML 1.1's float trap, config fields), names, one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from popalign_core.common import userinput as U
from popalign_core.dal.dft import DFTConfig
from popalign_core.dal.trainer import DALConfig
from popalign_core.models.sampling import SamplerConfig
from popalign_core.population.build import BuildConfig
from popalign_core.population.filter import FilterConfig
from popalign_core.train.losses import LOSSES, loss_config
from popalign_core.train.trainer import TrainConfig

WRITTEN = {"1e-4": 1e-4, "5e-5": 5e-5, "2.0e-3": 2e-3, "5e3": 5000.0, "3.0e-3": 3e-3, "1E-4": 1e-4, "+5e3": 5000.0,
           "-1e-3": -1e-3, ".5": 0.5, "1.": 1.0, "0.0001": 1e-4}  # fmt: skip


@pytest.mark.parametrize("text", list(WRITTEN))
def test_yaml_values_read_scientific_notation_as_floats(text):
    assert U.parse_value(text) == pytest.approx(WRITTEN[text]) and isinstance(U.parse_value(text), float)
    assert U.parse_yaml(f"lr: {text}")["lr"] == pytest.approx(WRITTEN[text])  # YAML 1.1 alone gives a str here


def test_yaml_keeps_ints_bools_strings_and_structures():
    assert U.parse_value("12") == 12 and isinstance(U.parse_value("12"), int)
    assert U.parse_value("010") == 10 and U.parse_value("0o17") == 15  # YAML 1.1 would read 010 as octal 8
    assert U.parse_value("1:5") == "1:5"  # YAML 1.1 would read base-60 65
    assert U.parse_yaml("steps: 010\nlr: -1e-4") == {"steps": 10, "lr": -1e-4}
    assert U.parse_value("1_000") == 1000 and U.parse_value("0x10") == 16
    assert U.parse_value("true") is True and U.parse_value("~") is None
    assert U.parse_value("1e") == "1e" and U.parse_value("abc") == "abc" and U.parse_value("v1.5") == "v1.5"
    assert U.parse_value("{beta: 5e3, alpha: 0.5}") == {"beta": 5000.0, "alpha": 0.5}
    assert U.parse_value("[1e-4, 2]") == [1e-4, 2]
    assert U.parse_value("") == ""  # an explicitly empty flag value is a value to validate


def test_plain_safe_loader_is_not_changed():
    import yaml

    assert yaml.safe_load("x: 1e-4")["x"] == "1e-4"  # the global SafeLoader keeps YAML 1.1 (we only subclass it)


def test_yaml_syntax_error_is_one_line_with_position(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: toyworld\nlr: [1, 2\nsteps: 3\n")
    with pytest.raises(ValueError) as e:
        U.read_yaml(f, "config file")
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and "line 3" in msg and "not valid YAML" in msg


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"- a\n- b\n", "expected a mapping"), (b"\xff\xfe\x00bad", "not UTF-8"), (None, "does not exist")],
)
def test_read_yaml_errors_name_the_file(tmp_path, content, match):
    f = tmp_path / "c.yaml"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        U.read_yaml(f, "config file")
    assert U.read_yaml(_write(tmp_path / "e.yaml", ""), "x") == {}


def _write(p, text):
    p.write_text(text)
    return p


@pytest.mark.parametrize(("text", "value"), [("100", 100), ("1e3", 1000), ("1_000", 1000), ("2.0e2", 200)])
def test_integer_flags(text, value):
    assert U.integer(text) == value and isinstance(U.integer(text), int)


@pytest.mark.parametrize("text", ["1.5", "abc", "1e", "", "nan"])
def test_integer_flags_refuse_non_integers(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer"):
        U.integer(text)


@pytest.mark.parametrize("text", list(WRITTEN))
def test_number_flags(text):
    assert U.number(text) == pytest.approx(WRITTEN[text])


@pytest.mark.parametrize("text", ["abc", "inf", ".nan", ""])
def test_number_flags_refuse_non_numbers(text):
    with pytest.raises(argparse.ArgumentTypeError, match="finite number"):
        U.number(text)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_config_takes_numbers_written_as_strings(loss):
    """A hyper-parameter typed "5e3" (YAML 1.1 reader, a UI text field, JSON from an API) is the number."""
    defaults = dataclasses.asdict(loss_config(loss))
    numeric = {k: v for k, v in defaults.items() if isinstance(v, float) and not isinstance(v, bool)}
    cfg = loss_config(loss, **{k: f"{v:e}" for k, v in numeric.items()})
    for k, v in numeric.items():
        assert getattr(cfg, k) == pytest.approx(v), k


def test_config_classes_coerce_numeric_strings_and_integral_floats(tmp_path):
    t = TrainConfig(model="tiny:sd15", data="x.jsonl", lr="1e-4", steps=1e3, batch_size="2", output_dir=str(tmp_path))
    assert t.lr == 1e-4 and t.steps == 1000 and isinstance(t.steps, int) and t.batch_size == 2
    s = SamplerConfig(steps="25", guidance_scale="7.5e0", seed="1e3")
    assert (s.steps, s.guidance_scale, s.seed) == (25, 7.5, 1000)
    assert DFTConfig(steps=2e1).steps == 20
    f = FilterConfig(threshold="8e-1")
    f.check()
    assert f.threshold == 0.8
    b = BuildConfig(set_size=5.0)
    b.check()
    assert b.set_size == 5 and isinstance(b.set_size, int)
    d = DALConfig(model="toyworld", prompts=["a photo of a baker"], target={"form": [0.5, 0.5]}, lr="1e-4",
                  face_bank="toy", steps="1e1")  # fmt: skip
    assert d.lr == 1e-4 and d.steps == 10


def test_coercion_leaves_bad_values_for_validation_to_name():
    with pytest.raises(ValueError, match=r"steps=2.5 is invalid: must be an integer"):
        TrainConfig(model="tiny:sd15", data="x.jsonl", steps=2.5)
    with pytest.raises(ValueError, match=r"lr='fast' is invalid"):
        TrainConfig(model="tiny:sd15", data="x.jsonl", lr="fast")
    with pytest.raises(ValueError, match=r"lr=-0.0001 is invalid"):
        TrainConfig(model="tiny:sd15", data="x.jsonl", lr="-1e-4")
    with pytest.raises(ValueError, match=r"data=\['a', 'b'\] is invalid: expected text \(a list was given\)"):
        TrainConfig(model="tiny:sd15", data=["a", "b"])  # `data: [a, b]` in a YAML file
    assert TrainConfig(model="tiny:sd15", data="x.jsonl", output_dir=2024).output_dir == "2024"
    from popalign_core.population.sample import population_jobs

    rows = [{"neutral": "a photo of a baker", "prompt": "a photo of a round baker", "index": 0}]
    assert len(population_jobs(rows, neutral_per_prompt=2e0)) == 3  # `neutral_per_prompt: 2e0` in a pipeline YAML


@pytest.mark.parametrize("name", ["", " ", ".hidden", "..", "a/b", "a\\b", "x" * 101, "a..b", "-x", "a b", "ü"])
def test_check_name_refuses(name):
    with pytest.raises(ValueError, match=r"lora_name=.* is not a plain name"):
        U.check_name(name, "lora_name")


@pytest.mark.parametrize("name", ["popalign_lora", "v1.5-fair", "A9", "x" * 100])
def test_check_name_accepts(name):
    assert U.check_name(name, "lora_name") == name
    assert U.check_name(name + ".safetensors", "n", strip_suffix=".safetensors") == name


# ------------------------------------------------------------------------------------------------ one-line errors
def _cmd(exc):
    @U.command("popalign thing")
    def main(argv):
        raise exc

    return main


@pytest.mark.parametrize(
    "exc",
    [ValueError("lr='x' is invalid\n  second line"), FileNotFoundError("config file 'a.yaml' does not exist"),
     FileExistsError("--out 'd' holds files"), PermissionError(13, "Permission denied", "/root/x"),
     U.UsageError("unrecognized arguments: --bogus")],
)  # fmt: skip
def test_user_errors_are_one_line_with_status_2(capsys, exc):
    assert _cmd(exc)([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("popalign thing: error: ") and "Traceback" not in err
    if isinstance(exc, PermissionError):
        assert "Permission denied: /root/x" in err


def test_registered_runtime_errors_are_user_errors(capsys):
    from popalign_core.classify.base import BackendUnavailable
    from popalign_core.population.sample import SamplingStopped
    from popalign_core.train.trainer import TrainingError

    for cls in (TrainingError, BackendUnavailable, SamplingStopped):
        assert _cmd(cls("what to do"))([]) == 2
        assert capsys.readouterr().err == "popalign thing: error: what to do\n"


def test_unexpected_errors_are_one_line_with_status_1_and_debug_shows_the_traceback(capsys, monkeypatch):
    assert _cmd(TypeError("boom"))([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error (TypeError: boom)" in err and "--debug" in err
    with pytest.raises(TypeError):
        _cmd(TypeError("boom"))(["--debug"])
    monkeypatch.setenv("POPALIGN_DEBUG", "1")
    with pytest.raises(ValueError):
        _cmd(ValueError("x"))([])


def test_ctrl_c_and_disk_full(capsys):
    assert _cmd(KeyboardInterrupt())([]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert _cmd(OSError(28, "No space left on device", "/data/x"))([]) == 2
    assert capsys.readouterr().err == "popalign thing: error: OSError: No space left on device: /data/x\n"


def test_flags_of_text_fields_keep_the_text_and_negative_numbers_are_values():
    from popalign_core.train.trainer import build_parser

    a = build_parser().parse_args(["--lora-name", "007", "--output-dir", "#run1", "--steps", "010", "--lr", "-1e-4",
                                   "--unet-targets", "[to_q, to_k]", "--progress", "false"])  # fmt: skip
    assert (a.lora_name, a.output_dir, a.steps, a.lr) == ("007", "#run1", 10, -1e-4)
    assert a.unet_targets == ["to_q", "to_k"] and a.progress is False
    with pytest.raises(U.UsageError, match=r"argument --steps: value '\[1' is not valid YAML"):
        build_parser().parse_args(["--steps", "[1"])


def test_argument_parser_errors_are_one_line(capsys):
    @U.command("popalign p")
    def main(argv):
        ap = U.ArgumentParser(prog="popalign p")
        ap.add_argument("--n", type=U.integer, required=True)
        ap.parse_args(argv)
        return 0

    assert main(["--n", "x"]) == 2
    assert capsys.readouterr().err == (
        "popalign p: error: argument --n: expected an integer, got 'x' (see popalign p --help)\n"
    )
    assert main(["--n", "1e3"]) == 0


BOOLS = [("false", False), ("No", False), ("off", False), (0, False), ("0", False), ("true", True), ("YES", True),
         (1, True), (True, True)]  # fmt: skip


@pytest.mark.parametrize(("value", "want"), BOOLS)
def test_boolean_fields_take_true_and_false_as_people_write_them(value, want):
    assert TrainConfig(model="tiny:sd15", data="x.jsonl", train_text_encoder=value).train_text_encoder is want
    b = BuildConfig(pairs=value)
    b.check()
    assert b.pairs is want


@pytest.mark.parametrize("value", ["maybe", "", 2, 0.5, [], None])
def test_boolean_fields_refuse_anything_else(value):
    """A non-empty text would be true for Python: `train_unet: "no"` must not train the UNet by accident."""
    want = re.escape(f"train_unet={value!r} is invalid: expected true or false")
    with pytest.raises(ValueError, match=want):
        TrainConfig(model="tiny:sd15", data="x.jsonl", train_unet=value)


def test_list_and_mapping_fields_refuse_a_single_text():
    with pytest.raises(ValueError, match=r"unet_targets=.to_q. is invalid: expected a list, written in YAML as"):
        TrainConfig(model="tiny:sd15", data="x.jsonl", unet_targets="to_q")
    with pytest.raises(ValueError, match=r"loss_params='beta=5' is invalid: expected a mapping"):
        TrainConfig(model="tiny:sd15", data="x.jsonl", loss_params="beta=5")
    with pytest.raises(ValueError, match=r"axes='form' is invalid: expected a list"):
        FilterConfig(axes="form").check()
    assert FilterConfig(axes=("form",)).axes == ("form",)


def test_devices_that_do_not_exist_here_are_named():
    import torch

    assert U.check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='gpu' is not a torch device"):
        U.check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device='cuda:1': torch .* finds no cuda device on this machine"):
            U.check_device("cuda:1", "--device")
    else:
        n = torch.cuda.device_count()
        with pytest.raises(ValueError, match=rf"this machine has {n} cuda device\(s\)"):
            U.check_device(f"cuda:{n}")
