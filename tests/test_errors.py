"""Bad input and crash safety, one test group per case class of docs/errors.md, driving `popalign` as users do:

1. no data loss: --overwrite and output folders never delete or replace what a command did not write;
2. numbers as users write them (1e-4, 5e-5, 2.0e-3, 5e3) in flags, --loss-param and YAML;
3. every user mistake is one line naming the input, exit status 2, no traceback; damaged files say what to do;
4. no silent success on empty, corrupt or faceless input;
5. consistent multi-file outputs after a kill at any point, no temporaries left, ordinary permissions.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from popalign_core.cli import COMMANDS
from popalign_core.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers
def popalign(*args, cwd=None, timeout=300, **popen) -> subprocess.CompletedProcess:
    """`popalign ARGS` in a fresh process (what users type), with the test environment's interpreter."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("POPALIGN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "popalign_core.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False, **popen)  # fmt: skip


def error_line(err: str, prog: str) -> str:
    """The one error line of a failed command: the last stderr line, `prog: error: ...`, and no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(f"{prog}: error: "), err
    assert sum(": error: " in ln for ln in lines) == 1, err
    return lines[-1]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(folder: Path) -> dict[str, bytes]:
    """A folder of the user's own files (what must survive every command)."""
    (folder / "photos").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8 my photo")
    (folder / "results.json").write_text('{"mine": true}')  # a name the commands also write
    return tree(folder)


@pytest.fixture(scope="module")
def pop_data(tmp_path_factory):
    """Population preference data (reddish winners, bluish losers) for `train --model tiny:sd15`."""
    folder = tmp_path_factory.mktemp("pop")
    rng = np.random.default_rng(0)
    rows = []
    for s, caption in enumerate(("a photo of a doctor", "a photo of a nurse")):
        for side, base in (("winning", (200, 60, 60)), ("losing", (60, 60, 200))):
            for i in range(3):
                arr = np.clip(np.array(base) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{s}_{side}_{i}.png")
                rows.append(
                    {"set_id": f"s{s}", "population": side, "caption": caption, "image": f"{s}_{side}_{i}.png"}
                )
    (folder / "population.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "population.jsonl"


TRAIN = ["--model", "tiny:sd15", "--steps", "2", "--batch-size", "2", "--lora-rank", "2", "--checkpoint-every", "0",
         "--progress", "false"]  # fmt: skip


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A small population run of the toy world: augmented.jsonl, samples/, filtered/ (in-process, ~5 s)."""
    d = tmp_path_factory.mktemp("toyrun")
    (d / "prompts.txt").write_text("a photo of a baker\na photo of a farmer\n")
    assert cli(["data", "augment", "--prompts", d / "prompts.txt", "--keywords", "toy", "--axes", "form",
                "--samples-per-prompt", "4", "--out", d / "aug.jsonl"]) == 0  # fmt: skip
    assert cli(["data", "sample", "--augmented", d / "aug.jsonl", "--model", "toyworld", "--out", d / "samples",
                "--steps", "4", "--guidance-scale", "2", "--batch-size", "16"]) == 0  # fmt: skip
    return d


# ================================================================================================ 1. no data loss
def test_demo_overwrite_never_deletes_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    before = user_folder(out)
    p = popalign("demo", "--quick", "--overwrite", "--out", out)
    line = error_line(p.stderr, "popalign demo")
    assert p.returncode == 2 and "nothing was deleted" in line and str(out) in line
    assert tree(out) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_demo_out_dot_in_a_project_deletes_nothing(tmp_path, overwrite):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("# my project")
    (project / "src" / "main.py").write_text("print(1)")
    before = tree(project)
    p = popalign("demo", "--quick", "--out", ".", *(["--overwrite"] if overwrite else []), cwd=project)
    line = error_line(p.stderr, "popalign demo")
    assert p.returncode == 2 and ("nothing was deleted" in line if overwrite else "is not empty" in line)
    assert tree(project) == before


def test_toyworld_build_overwrite_refuses_a_foreign_folder_before_building(tmp_path):
    out = tmp_path / "tw"
    before = user_folder(out)
    t = time.time()
    p = popalign("toyworld", "build", "--out", out, "--preset", "ci", "--overwrite")
    assert p.returncode == 2 and "nothing was deleted" in error_line(p.stderr, "popalign toyworld build")
    assert tree(out) == before and time.time() - t < 60  # refused before any training


def _foreign_cases(pop_data, toy_run):
    d = toy_run
    return {
        "train": ["train", *TRAIN, "--data", pop_data, "--output-dir"],
        "data sample": [
            "data",
            "sample",
            "--augmented",
            d / "aug.jsonl",
            "--model",
            "toyworld",
            "--steps",
            "2",
            "--out",
        ],  # fmt: skip
        "data filter": ["data", "filter", "--samples", d / "samples", "--classifier-option", "which=train", "--out"],
        "data pipeline": ["data", "pipeline", "--config", ROOT / "examples" / "pipeline_toy.yaml", "--out"],
        "audit": [
            "audit",
            "--images",
            d / "samples" / "images",
            "--manifest",
            d / "samples" / "manifest.jsonl",
            "--classifier",
            "toy",
            "--axes",
            "form",
            "--out",
        ],  # fmt: skip
        "mog": ["mog", "--loss", "sft", "--steps", "2", "--out"],
    }


@pytest.mark.parametrize("command", ["train", "data sample", "data filter", "data pipeline", "audit", "mog"])
def test_commands_refuse_output_folders_holding_foreign_files(pop_data, toy_run, tmp_path, capsys, command):
    out = tmp_path / "out"
    before = user_folder(out)
    argv = [str(a) for a in _foreign_cases(pop_data, toy_run)[command]] + [str(out)]
    assert cli(argv) == 2
    line = error_line(capsys.readouterr().err, f"popalign {command}")
    assert "did not write" in line and "nothing was changed" in line and "notes.txt" in line
    assert tree(out) == before


def test_single_file_outputs_never_replace_a_file_of_the_user(toy_run, tmp_path, capsys):
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"my": "data"}\n')
    assert cli(["data", "augment", "--prompts", str(toy_run / "prompts.txt"), "--keywords", "toy", "--out",
                str(mine)]) == 2  # fmt: skip
    assert "was not written by `popalign data augment`" in error_line(capsys.readouterr().err, "popalign data augment")
    assert mine.read_text() == '{"my": "data"}\n'
    prompts = toy_run / "prompts.txt"
    text = prompts.read_text()
    assert cli(["data", "augment", "--prompts", str(prompts), "--keywords", "toy", "--out", str(prompts)]) == 2
    assert "would overwrite its own input" in capsys.readouterr().err and prompts.read_text() == text
    grid = tmp_path / "grid.png"
    Image.new("RGB", (4, 4)).save(grid)
    photo = grid.read_bytes()
    assert cli(["toyworld", "render", "--prompt", "a photo of a baker", "--n", "1", "--out", str(grid)]) == 2
    assert "was not written by" in capsys.readouterr().err and grid.read_bytes() == photo
    ours = tmp_path / "ours.png"
    for _ in range(2):  # its own earlier output is replaced
        assert cli(["toyworld", "render", "--prompt", "a photo of a baker", "--n", "1", "--out", str(ours)]) == 0


def test_checkpoint_rotation_keeps_what_it_did_not_write(pop_data, tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["train", *TRAIN, "--data", str(pop_data), "--checkpoint-every", "1", "--keep-checkpoints", "1",
            "--output-dir", str(out)]  # fmt: skip
    assert cli([*argv, "--steps", "1"]) == 0
    (out / "checkpoints" / "step_00000001" / "my_notes.txt").write_text("mine")  # inside an old checkpoint
    (out / "checkpoints" / "step_00000000").mkdir()  # a folder merely named like one
    (out / "checkpoints" / "step_00000000" / "keep.txt").write_text("mine")
    assert cli([*argv, "--steps", "3"]) == 0
    assert (out / "checkpoints" / "step_00000001" / "my_notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "step_00000000" / "keep.txt").read_text() == "mine"
    assert not (out / "checkpoints" / "step_00000002").exists() and (out / "checkpoints" / "step_00000003").is_dir()
    # a checkpoints folder that is a link to elsewhere is refused (the trainer deletes old checkpoints there)
    elsewhere = tmp_path / "elsewhere"
    (out / "checkpoints").rename(elsewhere)
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    capsys.readouterr()
    assert cli([*argv, "--steps", "4"]) == 2
    assert "is a symbolic link" in error_line(capsys.readouterr().err, "popalign train")


def test_an_unmarked_folder_is_a_runs_only_with_its_real_signature(pop_data, tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "config.yaml").write_text("lr: 1\n")  # not a run's config
    (out / "metrics.jsonl").write_text("")
    (out / "popalign_lora.safetensors").write_bytes(b"the user's LoRA")
    assert cli(["train", *TRAIN, "--data", str(pop_data), "--output-dir", str(out)]) == 2
    assert "did not write" in error_line(capsys.readouterr().err, "popalign train")
    assert (out / "popalign_lora.safetensors").read_bytes() == b"the user's LoRA"


def test_sampling_resume_never_deletes_files_it_did_not_write(toy_run, tmp_path):
    run = tmp_path / "samples"
    assert cli(["data", "sample", "--augmented", str(toy_run / "aug.jsonl"), "--model", "toyworld", "--out", str(run),
                "--steps", "2", "--batch-size", "16"]) == 0  # fmt: skip
    (run / "images" / "my_drawing.png").write_bytes(b"mine")
    assert cli(["data", "sample", "--augmented", str(toy_run / "aug.jsonl"), "--model", "toyworld", "--out", str(run),
                "--steps", "2", "--batch-size", "16"]) == 0  # fmt: skip
    assert (run / "images" / "my_drawing.png").read_bytes() == b"mine"


# ================================================================================================ 2. numbers
def test_numbers_as_users_write_them_in_flags_loss_params_and_yaml(pop_data, tmp_path):
    out = tmp_path / "t"
    p = popalign("train", *TRAIN, "--data", pop_data, "--lr", "1e-4", "--loss-param", "beta=5e3",
                 "--loss-param", "alpha=5e-1", "--max-grad-norm", "1e0", "--output-dir", out)  # fmt: skip
    assert p.returncode == 0, p.stderr
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 1e-4 and saved["loss_params"] == {"beta": 5000.0, "alpha": 0.5}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: tiny:sd15\ndata: {pop_data}\nlr: 5e-5\nsteps: 1e0\nweight_decay: 2.0e-3\n"
                   f"loss_params: {{beta: 5e3}}\nprogress: false\noutput_dir: {tmp_path / 'y'}\nlora_rank: 2\n"
                   "batch_size: 2\ncheckpoint_every: 0\n")  # fmt: skip
    assert cli(["train", "--config", str(cfg)]) == 0
    saved = yaml.safe_load((tmp_path / "y" / "config.yaml").read_text())
    assert (saved["lr"], saved["steps"], saved["weight_decay"]) == (5e-5, 1, 2e-3)


@pytest.mark.parametrize(
    ("build", "argv", "attr", "value"),
    [
        ("dal", ["--lr", "1e-4", "--steps", "1e1", "--guidance-scale", "2.0e0"], ("lr", "steps", "guidance_scale"),
         (1e-4, 10, 2.0)),
        ("audit", ["--out", "o", "--guidance", "7.5e0", "--images-per-prompt", "1e2", "--max-unreadable", "5e-2"],
         ("guidance", "images_per_prompt", "max_unreadable"), (7.5, 100, 0.05)),
        ("data", ["filter", "--samples", "s", "--out", "o", "--threshold", "8e-1"], ("threshold",), (0.8,)),
        ("data", ["sample", "--augmented", "a", "--model", "m", "--out", "o", "--guidance-scale", "2e0",
                  "--time-budget", "6e2", "--steps", "2.5e1"], ("guidance_scale", "time_budget", "steps"),
         (2.0, 600.0, 25)),
        ("mog", ["--loss", "popalign", "--lr", "1e-2", "--beta", "5e3", "--steps", "3e3"], ("lr", "beta", "steps"),
         (0.01, 5000.0, 3000)),
    ],
)  # fmt: skip
def test_every_command_parses_scientific_notation(build, argv, attr, value):
    if build == "dal":
        from popalign_core.dal.trainer import build_parser, load_dal_config

        a = vars(build_parser().parse_args(argv))
        cfg = load_dal_config(None, model="toyworld", prompts=["a photo of a baker"], target={"form": [0.5, 0.5]},
                              face_bank="toy", **{k: v for k, v in a.items() if v is not None})  # fmt: skip
        got = tuple(getattr(cfg, k) for k in attr)
    else:
        from importlib import import_module

        mod = {
            "audit": "popalign_core.evaluate.audit",
            "data": "popalign_core.population.pipeline",
            "mog": "popalign_core.experiments.mog",
        }
        m = import_module(mod[build])
        parser = m._parser() if hasattr(m, "_parser") else m.build_parser()
        a = parser.parse_args(argv)
        got = tuple(getattr(a, k) for k in attr)
    assert got == pytest.approx(value)
    assert all(isinstance(g, type(v)) for g, v in zip(got, value))


# ================================================================================================ 3. one-line errors
def _bad_files(tmp: Path) -> dict[str, Path]:
    f = {
        "bad_yaml": tmp / "bad.yaml",
        "list_yaml": tmp / "list.yaml",
        "garbage": tmp / "garbage.safetensors",
        "empty": tmp / "empty.jsonl",
        "specific": tmp / "specific.txt",
        "notjson": tmp / "not.json",
    }
    f["bad_yaml"].write_text("model: toyworld\nlr: [1, 2\nsteps: 3\n")
    f["list_yaml"].write_text("- a\n- b\n")
    f["garbage"].write_bytes(b"not weights " * 30)
    f["empty"].write_text("")
    f["specific"].write_text("a photo of a round baker\na photo of an angular baker\n")
    f["notjson"].write_text("{not json")
    f["neutral"] = tmp / "neutral.txt"
    f["neutral"].write_text("a photo of a baker\n")
    f["badindex"] = tmp / "badindex.jsonl"
    f["badindex"].write_text('{"neutral": "a photo of a baker", "prompt": "a photo of a round baker", "index": "x"}\n')
    f["brokenmodel"] = tmp / "tw"
    f["brokenmodel"].mkdir()
    (f["brokenmodel"] / "model_index.json").write_text("{broken")
    f["latin1"] = tmp / "latin1.json"
    f["latin1"].write_bytes(b"\xff\xfe caf\xe9")
    f["badlr"] = tmp / "badlr.yaml"
    f["badlr"].write_text("methods: {sft: {loss: sft, data: population, lr: fast}}\n")
    f["pipe_nomodel"] = tmp / "pipe.yaml"
    f["pipe_nomodel"].write_text(f"model: nope.safetensors\nprompts: [a photo of a baker]\nout: {tmp / 'pipe_out'}\n"
                                 "augment: {keywords: toy, axes: [form], samples_per_prompt: 2}\n")  # fmt: skip
    f["pipe_race"] = tmp / "pipe_race.yaml"  # the default (race, gender) keywords with the toy filter classifier
    f["pipe_race"].write_text(f"model: toyworld\nprompts: [a photo of a baker]\nout: {tmp / 'pipe_out'}\n")
    f["nul"] = tmp / "nul.txt"
    f["nul"].write_bytes(b"a photo of\x00 a baker\n")
    f["dup_keys"] = tmp / "dup.yaml"
    f["dup_keys"].write_text("steps: 2\nlr: 1e-4\nsteps: 3\n")
    f["loras"] = tmp / "loras"  # a ComfyUI loras folder: files whose names fit the trainer's outputs, no marker
    f["loras"].mkdir()
    (f["loras"] / "my_style.safetensors").write_bytes(b"a LoRA of the user")
    (f["loras"] / "popalign_lora.safetensors").write_bytes(b"another LoRA of the user")
    return f


CATALOGUE = [
    # (command words, argv after them (with {placeholders}), prog, what the one line must name)
    ("train --config {bad_yaml}", "popalign train", "bad.yaml' is not valid YAML at line 3"),
    ("train --config {list_yaml}", "popalign train", "expected a mapping"),
    ("train --config {o}/nope.yaml", "popalign train", "nope.yaml' does not exist"),
    ("train --model tiny:sd15 --data {pop} --lora-name .hidden --output-dir {o}/t", "popalign train",
     "lora_name='.hidden'"),
    ("train --model tiny:sd15 --data {pop} --lora-name {none} --output-dir {o}/t", "popalign train",
     "argument --lora-name: empty text"),
    ("train --model tiny:sd15 --data {pop} --output-dir {none}", "popalign train", "--output-dir: empty text"),
    ("data sample --augmented {aug} --model toyworld --out {none}", "popalign data sample", "--out: empty text"),
    ("mog --loss sft --out {none}", "popalign mog", "argument --out: empty text"),
    ("audit compare {none} {notjson} --out {o}/c", "popalign audit compare", "argument before: empty text"),
    ("train --model tiny:sd15 --data {pop} --unet-targets to_q --output-dir {o}/t", "popalign train",
     "unet_targets='to_q' is invalid: expected a list, written in YAML as [to_q]"),
    ("train --model tiny:sd15 --data {pop} --loss-param anchor_weight=1 --anchor-prompts a_doctor --output-dir {o}/t",
     "popalign train", "anchor_prompts='a_doctor' is invalid: expected a list"),
    ("train --model tiny:sd15 --data {pop} --model-config-dir {o} --output-dir {o}/t", "popalign train",
     "model_config_dir: only used for single-file checkpoints"),
    ("data sample --augmented {aug} --model toyworld --device cuda:7 --out {o}/s", "popalign data sample",
     "device='cuda:7'"),
    ("audit --images {o} --classifier toy --axes form --device cuda:7 --out {o}/a", "popalign audit",
     "device='cuda:7'"),
    ("audit --images {o} --classifier toy --axes form --device gpu --out {o}/a", "popalign audit",
     "device='gpu' is not a torch device"),
    ("train --model {garbage} --data {pop} --output-dir {o}/t", "popalign train", "garbage.safetensors"),
    ("train --model tiny:sd15 --data {empty} --output-dir {o}/t", "popalign train", "empty.jsonl"),
    ("train --model tiny:sd15 --data {pop} --steps 0 --output-dir {o}/t", "popalign train", "steps=0"),
    ("train --model tiny:sd15 --data {pop} --loss-param gamma=1 --output-dir {o}/t", "popalign train", "'gamma'"),
    ("train --bogus 1", "popalign train", "--bogus"),
    ("dal --config {bad_yaml}", "popalign dal", "bad.yaml"),
    ("dal --targets {notjson}", "popalign dal", "--targets"),
    ("demo --config {bad_yaml} --out {o}/d", "popalign demo", "bad.yaml"),
    ("demo --methods , --out {o}/d", "popalign demo", "--methods"),
    ("dal-toy --config {bad_yaml} --out {o}/d", "popalign dal-toy", "bad.yaml"),
    ("audit --images {o}/nope --classifier toy --axes form --out {o}/a", "popalign audit", "nope"),
    ("audit --images {o} --classifier toy --axes gendr --out {o}/a", "popalign audit", "gendr"),
    ("audit --images {o} --classifier fairface --weights {garbage} --out {o}/a", "popalign audit", "garbage"),
    ("audit --images {o} --classifier toy --n-boot x --out {o}/a", "popalign audit", "--n-boot"),
    ("audit --model toyworld --prompts {empty} --classifier toy --axes form --out {o}/a", "popalign audit",
     "empty.jsonl"),
    ("audit --model toyworld --prompts {specific} --scheduler nope --classifier toy --axes form --out {o}/a",
     "popalign audit", "scheduler='nope'"),
    ("audit compare {o}/nope {notjson} --out {o}/c", "popalign audit compare", "nope"),
    ("audit compare {notjson} {notjson} --out {o}/c", "popalign audit compare", "not.json"),
    ("data augment --prompts {o}/nope.txt --out {o}/a.jsonl", "popalign data augment", "nope.txt"),
    ("data augment --prompts {specific} --keywords toy --out {o}/a.jsonl", "popalign data augment", "identity"),
    ("data augment --prompts {specific} --keywords {notjson} --out {o}/a.jsonl", "popalign data augment", "not.json"),
    ("data augment --prompts {neutral} --keywords toy --axes , --out {o}/a.jsonl", "popalign data augment",
     "--axes ',' names no axis"),
    ("data augment --prompts {neutral} --keywords toy --samples-per-prompt 1e12 --out {o}/a.jsonl",
     "popalign data augment", "samples_per_prompt"),
    ("data augment --prompts {neutral} --keywords toy --seed -1 --out {o}/a.jsonl", "popalign data augment",
     "`seed` must be an integer >= 0"),
    ("data sample --augmented {badindex} --model toyworld --out {o}/s", "popalign data sample", "index='x'"),
    ("data filter --samples {samples} --axes colour --out {o}/f", "popalign data filter", "no axis 'colour'"),
    ("data build --filtered {decisions} --out {o}/b", "popalign data build", "an image the filter dropped"),
    ("train --model tiny:sd15 --data {pop} --lora-rank 1e9 --output-dir {o}/t", "popalign train",
     "lora_rank=1000000000"),
    ("train --model tiny:sd15 --data [{pop}] --output-dir {o}/t", "popalign train", "unknown manifest suffix"),
    ("train --model tiny:sd15 --data {pop} --output-dir {loras}", "popalign train", "my_style.safetensors"),
    ("data sample --augmented {empty} --model toyworld --out {o}/s", "popalign data sample", "empty.jsonl"),
    ("data sample --augmented {aug} --model {garbage} --out {o}/s", "popalign data sample", "garbage.safetensors"),
    ("data filter --samples {samples} --classifier-option bogus=1 --out {o}/f", "popalign data filter", "'bogus'"),
    ("data filter --samples {o}/nope --out {o}/f", "popalign data filter", "nope"),
    ("data build --filtered {filtered} --group-axes fomr --out {o}/b", "popalign data build", "'fomr'"),
    ("data pipeline --config {bad_yaml}", "popalign data pipeline", "bad.yaml"),
    ("toyworld check --model {o}/nope", "popalign toyworld check", "nope"),
    ("toyworld render --prompt xyzzy --out {o}/r.png", "popalign toyworld render", "xyzzy"),
    ("toyworld build --out {garbage} --preset ci", "popalign toyworld build", "garbage"),
    ("toyworld foo", "popalign toyworld", "'foo'"),
    ("toyworld check --n 0", "popalign toyworld check", "--n 0"),
    ("toyworld check --model {brokenmodel}", "popalign toyworld check", "model_index.json"),
    ("toyworld render --prompt a_photo --n 1 --out {o}/r.jpg", "popalign toyworld render", ".png"),
    ("audit compare {latin1} {latin1} --out {o}/c", "popalign audit compare", "latin1.json' is not UTF-8"),
    ("demo --config {badlr} --quick --out {o}/d", "popalign demo", "methods.sft.lr='fast'"),
    ("train --model tiny:sd15 --data {pop} --lora-name * --output-dir {o}/t", "popalign train", "lora_name='*'"),
    ("train --model tiny:sd15 --data {pop} --resolution -64 --output-dir {o}/t", "popalign train", "resolution=-64"),
    ("train --model tiny:sd15 --data {pop} --lr -1e-4 --output-dir {o}/t", "popalign train", "lr=-0.0001 is invalid"),
    ("mog --loss sft --plot {o}/x.jpg --out {o}/m", "popalign mog", "x.jpg"),
    ("train --model tiny:sd15 --data {pop} --anchor-guidance -5e0 --output-dir {o}/t", "popalign train",
     "anchor_guidance=-5.0"),
    ("data filter --samples {samples} --axes hue --out {o}/f", "popalign data filter", "no prompt of"),
    ("data pipeline --config {pipe_nomodel}", "popalign data pipeline", "nope.safetensors' does not exist"),
    ("data pipeline --config {pipe_race}", "popalign data pipeline", "the classifier 'toy' has no axis 'race'"),
    ("train --config {dup_keys}", "popalign train", "line 3, column 1: the key 'steps' is repeated (first at line 1)"),
    ("train --model tiny:sd15 --data {pop} --train-unet maybe --output-dir {o}/t", "popalign train",
     "train_unet='maybe' is invalid: expected true or false"),
    ("data augment --prompts {nul} --keywords toy --out {o}/a.jsonl", "popalign data augment",
     "line 1: control character '\\x00'"),
    ("data augment --prompts {o} --keywords toy --out {o}/a.jsonl", "popalign data augment", "is a folder"),
    ("data filter --samples {aug} --out {o}/f", "popalign data filter", "aug.jsonl' is a file; give the run folder"),
    ("audit --images {aug} --classifier toy --axes form --out {o}/a", "popalign audit", "aug.jsonl' is a file"),
    ("mog --steps 3", "popalign mog", "--loss"),
    ("losses --bogus", "popalign losses", "--bogus"),
]  # fmt: skip


@pytest.fixture(scope="module")
def filtered(toy_run):
    out = toy_run / "filtered"
    if not out.exists():
        assert cli(["data", "filter", "--samples", str(toy_run / "samples"), "--classifier-option", "which=train",
                    "--out", str(out)]) == 0  # fmt: skip
    return out


@pytest.mark.parametrize(("cmd", "prog", "names"), CATALOGUE, ids=[c[0].split(" {")[0] + f"-{i}" for i, c in
                                                                       enumerate(CATALOGUE)])  # fmt: skip
def test_every_user_mistake_is_one_line_naming_the_input(tmp_path, capsys, pop_data, toy_run, filtered, cmd, prog,
                                                         names):  # fmt: skip
    f = _bad_files(tmp_path)
    subs = {**{k: str(v) for k, v in f.items()}, "o": str(tmp_path), "pop": str(pop_data),
            "aug": str(toy_run / "aug.jsonl"), "samples": str(toy_run / "samples"),
            "filtered": str(filtered), "decisions": str(tmp_path / "decisions.jsonl"), "none": ""}  # fmt: skip
    rows = [json.loads(x) for x in (filtered / "decisions.jsonl").read_text().splitlines()]
    rows[1]["reason"] = "no_face"  # a decisions file lists the dropped images too
    (tmp_path / "decisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [w.format(**subs) for w in cmd.split(" ")]

    assert cli(argv) == 2
    line = error_line(capsys.readouterr().err, prog)
    assert names in line
    assert not (tmp_path / "pipe_out").exists()  # the pipeline validates everything before writing anything


def test_the_entry_point_prints_one_line_where_it_printed_tracebacks(tmp_path):
    f = _bad_files(tmp_path)
    for args, prog in ((["train", "--config", f["bad_yaml"]], "popalign train"),
                       (["audit", "--images", tmp_path / "nope", "--out", tmp_path / "a"], "popalign audit"),
                       (["toyworld", "render", "--prompt", "xyzzy", "--out", tmp_path / "r.png"],
                        "popalign toyworld render")):  # fmt: skip
        p = popalign(*args)
        assert p.returncode == 2 and [ln for ln in p.stderr.splitlines() if ln.strip()] == [error_line(p.stderr, prog)]
    p = popalign("--debug", "train", "--config", f["bad_yaml"])
    assert p.returncode == 1 and "Traceback" in p.stderr  # --debug shows it


def test_overwrite_of_another_commands_folder_says_whose_it_is(pop_data, tmp_path, capsys):
    out = tmp_path / "t"
    assert cli(["train", *TRAIN, "--data", str(pop_data), "--output-dir", str(out)]) == 0
    before = tree(out)
    assert cli(["demo", "--quick", "--overwrite", "--out", str(out)]) == 2
    line = error_line(capsys.readouterr().err, "popalign demo")
    assert "holds the output of `train`, not of `demo`" in line and "nothing was deleted" in line
    assert tree(out) == before


def test_resume_accepts_the_same_data_file_written_differently(pop_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "t"
    argv = ["train", *TRAIN, "--checkpoint-every", "1", "--output-dir", str(out)]
    assert cli([*argv, "--data", str(pop_data)]) == 0
    monkeypatch.chdir(pop_data.parent.parent)
    relative = os.path.relpath(pop_data)
    assert cli([*argv, "--data", relative, "--steps", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_from"] == 2


def test_no_command_is_an_error_line():
    p = popalign()
    assert p.returncode == 2 and error_line(p.stderr, "popalign").endswith(
        "a command is required (see popalign --help)"
    )


def test_every_command_is_listed_in_docs_errors():
    text = (ROOT / "docs" / "errors.md").read_text()
    for name in COMMANDS:
        assert f"`popalign {name}" in text, name


def test_damaged_checkpoint_names_the_file_and_the_older_one(pop_data, tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["train", *TRAIN, "--data", str(pop_data), "--output-dir", str(out), "--checkpoint-every", "1",
            "--keep-checkpoints", "3"]  # fmt: skip
    assert cli(argv) == 0
    state = out / "checkpoints" / "step_00000002" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    assert cli([*argv, "--steps", "3"]) == 2
    line = error_line(capsys.readouterr().err, "popalign train")
    assert str(state) in line and "damaged, truncated" in line
    assert f"--resume {out / 'checkpoints' / 'step_00000001'}" in line
    assert cli([*argv, "--steps", "3", "--resume", str(out / "checkpoints" / "step_00000001")]) == 0


def test_damaged_lora_file_names_the_file(tmp_path):
    from popalign_core.common.fileio import CorruptFileError
    from popalign_core.lora.files import read_lora

    bad = tmp_path / "lora.safetensors"
    bad.write_bytes(b"half a file")
    with pytest.raises(CorruptFileError, match=r"LoRA file '.*lora\.safetensors' \(11 bytes\) is damaged.*re-export"):
        read_lora(bad)


# ================================================================================================ 4. no silent success
def _images(folder: Path, good: int, bad: int, source: Path) -> None:
    d = folder / "a photo of a baker"
    d.mkdir(parents=True)
    pngs = sorted((source / "images").glob("*.png"))
    for i in range(good):
        (d / f"g{i}.png").write_bytes(pngs[i % len(pngs)].read_bytes())
    for i in range(bad):
        (d / f"b{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut")


def test_empty_inputs_fail_from_the_command_line(tmp_path):
    """The entry point users call: prompts that all name an identity, then sampling an empty file, then an audit of
    unreadable images: each exits 2 with one line, and nothing reports success."""
    (tmp_path / "p.txt").write_text("a photo of a round baker\na photo of a tall farmer\n")
    p = popalign(
        "data", "augment", "--prompts", tmp_path / "p.txt", "--keywords", "toy", "--out", tmp_path / "a.jsonl"
    )
    assert p.returncode == 2 and "no identity-neutral prompt left" in error_line(p.stderr, "popalign data augment")
    assert not (tmp_path / "a.jsonl").exists()
    (tmp_path / "a.jsonl").write_text("\n")
    p = popalign("data", "sample", "--augmented", tmp_path / "a.jsonl", "--model", "toyworld", "--out", tmp_path / "s")
    assert p.returncode == 2 and "has no rows: nothing to sample" in error_line(p.stderr, "popalign data sample")
    (tmp_path / "imgs" / "a baker").mkdir(parents=True)
    (tmp_path / "imgs" / "a baker" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    p = popalign(
        "audit", "--images", tmp_path / "imgs", "--classifier", "toy", "--axes", "form", "--out", tmp_path / "o"
    )
    assert p.returncode == 2 and "none of the 1 images could be read" in error_line(p.stderr, "popalign audit")


@pytest.mark.parametrize(("good", "bad", "expect"), [(0, 4, "none of the 4 images"), (1, 9, "9 of 10 images (90%)")])
def test_audit_of_corrupt_images_is_an_error(toy_run, tmp_path, capsys, good, bad, expect):
    _images(tmp_path / "imgs", good, bad, toy_run / "samples")
    assert cli(["audit", "--images", str(tmp_path / "imgs"), "--classifier", "toy", "--axes", "form", "--out",
                str(tmp_path / "o")]) == 2  # fmt: skip
    line = error_line(capsys.readouterr().err, "popalign audit")
    assert expect in line and "b0.png" in line and not (tmp_path / "o").exists()


def test_audit_with_a_few_corrupt_images_counts_and_warns(toy_run, tmp_path, capsys):
    _images(tmp_path / "imgs", 12, 1, toy_run / "samples")  # 1 of 13 (8 %) is within the default 10 %
    assert cli(["audit", "--images", str(tmp_path / "imgs"), "--classifier", "toy", "--axes", "form", "--out",
                str(tmp_path / "o"), "--no-report"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: 1 of 13 image(s) could not be read or classified and were skipped (first:" in err
    assert json.loads((tmp_path / "o" / "audit.json").read_text())["counts"]["corrupt"] == 1


def test_no_face_on_blank_images_is_an_error(tmp_path, capsys):
    d = tmp_path / "imgs" / "a photo of a baker"
    d.mkdir(parents=True)
    for i, v in enumerate((0, 128, 255)):
        Image.new("RGB", (64, 64), (v, v, v)).save(d / f"{i}.png")
    Image.new("RGB", (64, 64), (200, 30, 90)).save(d / "c.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / "noise.png")
    assert cli(["audit", "--images", str(tmp_path / "imgs"), "--classifier", "toy", "--axes", "form", "--out",
                str(tmp_path / "o")]) == 2  # fmt: skip
    assert "no face was detected in any of the 5 readable images" in error_line(capsys.readouterr().err,
                                                                                  "popalign audit")  # fmt: skip


def test_truncated_png_on_resume_is_sampled_again(toy_run, tmp_path, capsys):
    run = tmp_path / "s"
    argv = ["data", "sample", "--augmented", str(toy_run / "aug.jsonl"), "--model", "toyworld", "--out", str(run),
            "--steps", "2", "--batch-size", "16"]  # fmt: skip
    assert cli(argv) == 0
    capsys.readouterr()
    img = sorted((run / "images").glob("*.png"))[3]
    good = img.read_bytes()
    img.write_bytes(good[: len(good) // 2])
    assert cli(argv) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["dropped"]["damaged_images"] == 1 and s["sampled"] == 1 and s["complete"]
    # seeded: the same image again (sampled alone instead of in a batch of 16: float-level differences in the
    # batched convolutions may move a pixel value by a step or two, nothing more)
    again = np.asarray(Image.open(img), dtype=int)
    first = np.asarray(Image.open(io.BytesIO(good)), dtype=int)
    assert again.shape == first.shape and np.abs(again - first).max() <= 3 and np.abs(again - first).mean() < 0.05


def test_filter_counts_and_warns_about_broken_manifest_lines(toy_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "s"
    shutil.copytree(toy_run / "samples", run)
    lines = (run / "manifest.jsonl").read_text().splitlines()
    lines[2] = lines[2][:25]
    (run / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    assert cli(["data", "filter", "--samples", str(run), "--classifier-option", "which=train", "--out",
                str(tmp_path / "f")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: skipped 1 manifest row(s)" in err and "manifest.jsonl:3" in err
    rep = json.loads((tmp_path / "f" / "filter_report.json").read_text())
    assert rep["skipped_rows"]["count"] == 1 and rep["images"] == len(lines) - 1


def test_filter_that_keeps_nothing_is_an_error(toy_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "s"
    shutil.copytree(toy_run / "samples", run)
    for img in (run / "images").glob("*.png"):
        Image.new("RGB", (32, 32), (128, 128, 128)).save(img)  # whole PNGs, but nothing drawn: no face anywhere
    assert cli(["data", "filter", "--samples", str(run), "--classifier-option", "which=train", "--out",
                str(tmp_path / "f")]) == 2  # fmt: skip
    line = error_line(capsys.readouterr().err, "popalign data filter")
    n = len(list((run / "images").glob("*.png")))
    assert f"no image of {run} was kept ({n} classified: no_face {n})" in line and "decisions.jsonl" in line


def test_build_from_a_run_whose_images_are_gone_is_an_error(toy_run, filtered, tmp_path, capsys):
    import shutil

    shutil.copytree(toy_run / "samples", tmp_path / "samples")
    shutil.copytree(filtered, tmp_path / "filtered")
    for img in (tmp_path / "samples" / "images").glob("*.png"):
        img.unlink()
    assert cli(["data", "build", "--filtered", str(tmp_path / "filtered"), "--set-size", "2", "--on-short", "skip",
                "--out", str(tmp_path / "d")]) == 2  # fmt: skip
    line = error_line(capsys.readouterr().err, "popalign data build")
    assert "16 of 16 listed images do not exist" in line and not (tmp_path / "d").exists()


def test_audit_counts_a_repeated_manifest_row_once_and_says_so(toy_run, tmp_path, capsys):
    rows = [json.loads(x) for x in (toy_run / "samples" / "manifest.jsonl").read_text().splitlines()]
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:3]))
    assert cli(["audit", "--manifest", str(m), "--images", str(toy_run / "samples"), "--classifier", "toy",
                "--axes", "form", "--out", str(tmp_path / "o"), "--no-report"]) == 0  # fmt: skip
    assert "warning: 3 manifest row(s) repeat an image of the same prompt and were counted once" in (
        capsys.readouterr().err
    )
    a = json.loads((tmp_path / "o" / "audit.json").read_text())
    assert a["counts"]["images"] == len(rows) and a["counts"]["duplicate_rows"] == 3


def test_compare_of_audits_without_a_shared_prompt_is_an_error(tmp_path, capsys):
    for name, prompt in (("a", "x"), ("b", "y")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "audit.json").write_text(json.dumps({"prompts": [prompt], "axes": {"form": {}},
                                                                "settings": {}}))  # fmt: skip
    assert cli(["audit", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 2
    assert "share no prompt" in error_line(capsys.readouterr().err, "popalign audit compare")


# ================================================================================================ 5. consistency
def _step_of(path: Path) -> str:
    from popalign_core.common.fileio import safetensors_keys

    return safetensors_keys(path)[1]["popalign_step"]


def test_lora_formats_stay_one_step_after_a_kill_between_them(pop_data, tmp_path, monkeypatch):
    from popalign_core.common import fileio
    from popalign_core.train.trainer import TrainConfig, Trainer

    def cfg(steps):
        return TrainConfig(model="tiny:sd15", data=str(pop_data), output_dir=str(tmp_path), steps=steps, batch_size=2,
                           lora_rank=2, checkpoint_every=1, progress=False)  # fmt: skip

    Trainer(cfg(2)).run()
    real, calls = fileio._swap_in, []

    def kill_after_first_output(tmp, target):
        if target.name.endswith((".safetensors", "_diffusers")) and target.parent == tmp_path:
            calls.append(target.name)
            if len(calls) == 2:
                raise KeyboardInterrupt("SIGKILL between the two LoRA files")
        real(tmp, target)

    monkeypatch.setattr(fileio, "_swap_in", kill_after_first_output)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(3)).run()
    monkeypatch.undo()
    assert (tmp_path / fileio.PUBLISH_JOURNAL).is_file()
    summary = Trainer(cfg(3)).run()  # the next start completes the publication first
    kohya, diffusers = tmp_path / "popalign_lora.safetensors", tmp_path / "popalign_lora_diffusers"
    assert _step_of(kohya) == _step_of(diffusers / "pytorch_lora_weights.safetensors") == "3" == str(summary["steps"])
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name == fileio.PUBLISH_JOURNAL]
    assert leftovers == []


def test_an_output_dir_through_a_symlink_and_dotdot_is_where_the_system_puts_it(pop_data, tmp_path, capsys):
    """`link/../o` is `<link target's parent>/o` for the operating system, not `./o`: every file (the LoRA files too)
    lands there, and the user's `./o` is left alone."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    out = f"{tmp_path}/link/../o"
    assert cli(["train", *TRAIN, "--data", str(pop_data), "--output-dir", out]) == 0, capsys.readouterr().err
    assert (tmp_path / "real" / "o" / "popalign_lora.safetensors").is_file()
    assert (tmp_path / "real" / "o" / "popalign_lora_diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["notes.txt"]


_KILL_AT_NTH_RENAME = """
import os, signal, sys
n, count, real = int(sys.argv[1]), [0], os.replace
def replace(a, b, *args, **kwargs):
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up runs: what a power cut or the OOM killer leaves
    return real(a, b, *args, **kwargs)
os.replace = replace
from popalign_core.cli import main
sys.argv = ["popalign", *sys.argv[2:]]
sys.exit(main())
"""


def killed_at_rename(n: int, *args) -> int:
    """Run `popalign ARGS`, SIGKILLed at its n-th `os.replace` (each final file appears by one); its exit status."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", _KILL_AT_NTH_RENAME, str(n), *map(str, args)], env=env,
                          capture_output=True, timeout=300, check=False).returncode  # fmt: skip


def test_a_kill_at_every_rename_of_filter_leaves_one_run_for_build_and_nothing_behind(toy_run, tmp_path):
    """`data filter` over an earlier filter run, SIGKILLed at each of its renames in turn: `data build` (the next
    reader) sees the files of one run, and the next `data filter` leaves no temporary behind."""
    out = tmp_path / "f"
    base = ["data", "filter", "--samples", toy_run / "samples", "--classifier-option", "which=train", "--out", out]
    assert popalign(*base).returncode == 0
    for n in range(1, 12):
        rc = killed_at_rename(n, *base, "--threshold", "0.999")
        if rc == 0:
            break
        assert rc == -signal.SIGKILL
        b = popalign("data", "build", "--filtered", out, "--set-size", "2", "--on-short", "skip", "--out",
                     tmp_path / f"b{n}")  # fmt: skip
        assert b.returncode in (0, 2), b.stderr
        report = json.loads((out / "filter_report.json").read_text())
        rows = (out / "filtered.jsonl").read_text().splitlines()
        assert report["kept"] == len(rows), f"kill at rename {n}: filtered.jsonl and its report from two runs"
        assert popalign(*base).returncode == 0
        assert [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".popalign-pub")] == []
    assert n > 3  # the publication has several renames, and each was a kill point


def test_a_kill_while_an_old_checkpoint_is_deleted_leaves_no_half_checkpoint(pop_data, tmp_path, monkeypatch):
    import shutil

    from popalign_core import train as T
    from popalign_core.train import loop

    def cfg(steps):
        return T.TrainConfig(model="tiny:sd15", data=str(pop_data), output_dir=str(tmp_path), steps=steps,
                             batch_size=2, lora_rank=2, checkpoint_every=1, keep_checkpoints=1,
                             progress=False)  # fmt: skip

    real = shutil.rmtree

    def killed_mid_delete(path, *a, **k):
        p = Path(path)
        next(p.iterdir()).unlink()  # one file of the old checkpoint is gone, then the process dies
        raise KeyboardInterrupt("SIGKILL while deleting an old checkpoint")

    monkeypatch.setattr(loop.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        T.Trainer(cfg(3)).run()
    monkeypatch.setattr(loop.shutil, "rmtree", real)
    for ck in (tmp_path / "checkpoints").glob("step_*"):  # whatever carries a checkpoint's name is whole
        assert {p.name for p in ck.iterdir()} == {"state.safetensors", "trainer_state.json"}, ck
    assert T.Trainer(cfg(3)).run()["steps"] == 3
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]


def test_sigterm_saves_a_checkpoint_leaves_no_temporaries_and_resumes(pop_data, tmp_path):
    out = tmp_path / "t"
    args = ["train", "--model", "tiny:sd15", "--data", pop_data, "--steps", "400", "--batch-size", "2",
            "--lora-rank", "2", "--checkpoint-every", "0", "--progress", "false", "--output-dir", out]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "popalign_core.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    metrics = out / "metrics.jsonl"
    t0 = time.time()
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.time() - t0 < 120:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert ckpts and not (out / "popalign_lora.safetensors").exists()
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []
    step = int(ckpts[-1].name.split("_")[1])
    args[6] = str(step + 1)  # --steps: one more step than the checkpoint
    p = popalign(*args)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["resumed_from"] == step


def test_outputs_have_ordinary_permissions(pop_data, tmp_path):
    out = tmp_path / "t"
    p = popalign("train", *TRAIN, "--data", pop_data, "--checkpoint-every", "1", "--output-dir", out,
                 preexec_fn=lambda: os.umask(0o022))  # fmt: skip
    assert p.returncode == 0, p.stderr
    files = [f for f in out.rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files) and len(files) > 6
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    for d in [out, *[x for x in out.rglob("*") if x.is_dir()]]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
