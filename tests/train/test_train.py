"""The trainer on tiny SD1.5 / SD2 (v-prediction) / SDXL models: every loss, resume, NaN, CLI, config errors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from popalign_core.train.losses import LOSSES
from popalign_core.train.trainer import TrainConfig, Trainer, TrainingError, load_config, main

ROOT = Path(__file__).resolve().parents[2]


def make_population_data(folder: Path, sets=("a photo of a doctor", "a photo of a nurse"), per_side=3, size=32):
    """Population sets on disk: winning images reddish, losing images bluish (a population difference to learn)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for s, caption in enumerate(sets):
        for side, base in (("winning", (200, 60, 60)), ("losing", (60, 60, 200))):
            for i in range(per_side):
                arr = np.clip(np.array(base) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                name = f"img_{s}_{side}_{i}.png"
                Image.fromarray(arr).save(folder / name)
                rows.append({"set_id": f"set{s}", "population": side, "caption": caption, "image": name})
    manifest = folder / "population.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_population_data(tmp_path_factory.mktemp("data"))


def _cfg(data, out, **kw):
    base = dict(
        model="tiny:sd15",
        data=str(data),
        output_dir=str(out),
        steps=2,
        batch_size=2,
        lr=1e-2,
        lora_rank=2,
        checkpoint_every=0,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _lora_params(trainer):
    return {n: p.detach().clone() for n, p in zip(trainer.param_names, trainer.params)}


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_trains_the_lora_and_keeps_base_and_reference(data, tmp_path, family, loss):
    cfg = _cfg(data, tmp_path, model=f"tiny:{family}", loss=loss)
    tr = Trainer(cfg, log=lambda m: None)
    tr._setup_model()
    init = _lora_params(tr)
    base = {k: v.clone() for k, v in tr.adapter.unet.state_dict().items() if "lora" not in k}
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([50, 600])
    with torch.no_grad():
        c = tr.adapter.encode_prompt(["a photo of a doctor"] * 2)
        with tr.adapter.reference():
            ref_before = tr.adapter.predict(x, t, c)
    summary = tr.run()  # rebuilds the model from the same seed: identical init
    after = _lora_params(tr)
    assert set(after) == set(init)
    changed = [n for n in after if not torch.equal(after[n], init[n])]
    assert changed, "no LoRA parameter changed"
    for k, v in tr.adapter.unet.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, base[k]), k
    with torch.no_grad(), tr.adapter.reference():
        torch.testing.assert_close(tr.adapter.predict(x, t, c), ref_before, rtol=0, atol=0)
    assert summary["steps"] == 2 and summary["loss"] == loss
    assert Path(summary["outputs"]["kohya"]).is_file() and Path(summary["outputs"]["diffusers"]).is_file()
    for f in ("metrics.jsonl", "metrics.csv", "loss_curve.png", "summary.json", "config.yaml"):
        assert (tmp_path / f).is_file(), f


def test_text_encoder_lora_trains_with_its_own_reference(data, tmp_path):
    cfg = _cfg(data, tmp_path, model="tiny:sdxl", loss="dpo", train_text_encoder=True)
    tr = Trainer(cfg, log=lambda m: None)
    tr.run()
    te_names = [n for n in tr.param_names if n.startswith("text_encoder")]
    assert any(n.startswith("text_encoder.") for n in te_names)
    assert any(n.startswith("text_encoder_2.") for n in te_names)
    from popalign_core.lora.files import read_lora

    sd, _, _ = read_lora(tmp_path / "popalign_lora.safetensors")
    assert any(k.startswith("lora_te1_") for k in sd) and any(k.startswith("lora_te2_") for k in sd)


def test_text_encoder_only_lora(data, tmp_path):
    """train_unet: false with train_text_encoder: true trains the text encoder alone (no UNet key in the file)."""
    cfg = _cfg(data, tmp_path, loss="popalign", train_unet=False, train_text_encoder=True)
    tr = Trainer(cfg, log=lambda m: None)
    tr.run()
    assert tr.param_names and all(n.startswith("text_encoder") for n in tr.param_names)
    from popalign_core.lora.files import read_lora

    sd, _, _ = read_lora(tmp_path / "popalign_lora.safetensors")
    assert sd and all(k.startswith("lora_te") for k in sd)


def test_full_finetune_uses_a_frozen_reference(data, tmp_path):
    cfg = _cfg(data, tmp_path, loss="popalign", full_finetune=True, train_unet=False, lr=1e-3)
    tr = Trainer(cfg, log=lambda m: None)
    summary = tr.run()
    ref = tr.adapter.reference_unet.state_dict()
    moved = [k for k, v in tr.adapter.unet.state_dict().items() if not torch.equal(v, ref[k])]
    assert moved and Path(summary["outputs"]["unet"]).is_file()


def test_caption_dropout_anchor_and_accumulation_run(data, tmp_path):
    cfg = _cfg(
        data,
        tmp_path,
        loss="popalign",
        caption_dropout=0.5,
        grad_accum=2,
        loss_params={"anchor_weight": 0.5},
        anchor_prompts=["a photo of a tree"],
        anchor_images_per_prompt=2,
        anchor_sampler_steps=2,
    )
    summary = Trainer(cfg, log=lambda m: None).run()
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("anchor_term" in r for r in rows)
    assert list(tmp_path.glob("anchors_*.safetensors")), "anchor samples are cached"
    assert summary["last_loss"] is not None


def test_anchor_reaches_a_text_encoder_lora(data, tmp_path):
    """With a text-encoder-only LoRA the anchor conditions the trained model with the *trained* encoder (grad) and
    the reference with the frozen one: the anchor term changes what is learned (it once used the frozen encoder's
    cached states for both, so it had no path to the LoRA and changed nothing)."""
    from popalign_core.lora.files import read_lora

    common = dict(loss="sft", train_unet=False, train_text_encoder=True, lr=1e-2, anchor_prompts=["a photo of a tree"],
                  anchor_images_per_prompt=2, anchor_sampler_steps=2)  # fmt: skip
    files = {}
    for w in (0.0, 50.0):
        out = tmp_path / f"w{w:g}"
        params = {"anchor_weight": w, "anchor_target": "reference"} if w else {}
        Trainer(_cfg(data, out, loss_params=params, **common), log=lambda m: None).run()
        files[w] = read_lora(out / "popalign_lora.safetensors")[0]
        if w:
            rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
            assert rows[0]["anchor_term"] == 0.0  # the LoRA starts at zero: trained == reference
            assert rows[-1]["anchor_term"] > 0.0
    assert files[0.0].keys() == files[50.0].keys()
    assert any(not torch.allclose(files[0.0][k].float(), files[50.0][k].float()) for k in files[0.0])


def _final_lora(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "popalign_lora.safetensors"))


def test_resume_after_a_stop_gives_the_same_lora(data, tmp_path):
    full = Trainer(_cfg(data, tmp_path / "full", steps=6, checkpoint_every=2, loss="dpo"), log=lambda m: None)
    full.run()
    part = tmp_path / "part"
    Trainer(_cfg(data, part, steps=4, checkpoint_every=2, loss="dpo"), log=lambda m: None).run()
    resumed = Trainer(_cfg(data, part, steps=6, checkpoint_every=2, loss="dpo"), log=lambda m: None)
    s = resumed.run()
    assert s["resumed_from"] == 4
    a, b = _final_lora(tmp_path / "full"), _final_lora(part)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    rows = [json.loads(ln)["step"] for ln in (part / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]


def test_gradient_checkpointing_may_be_switched_on_when_resuming(data, tmp_path):
    """A memory switch (runconfig.MEMORY_SWITCHES): the run resumes with it flipped and ends where it would have."""
    from popalign_core.train.runconfig import config_fingerprint

    full = tmp_path / "full"
    Trainer(_cfg(data, full, steps=4, checkpoint_every=2, loss="dpo"), log=lambda m: None).run()
    part = tmp_path / "part"
    Trainer(_cfg(data, part, steps=2, checkpoint_every=2, loss="dpo"), log=lambda m: None).run()
    cfg = _cfg(data, part, steps=4, checkpoint_every=2, loss="dpo", gradient_checkpointing=True)
    assert Trainer(cfg, log=lambda m: None).run()["resumed_from"] == 2
    a, b = _final_lora(full), _final_lora(part)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    d = cfg.to_dict()  # runs fingerprinted before the switch was normalised keep resuming
    assert config_fingerprint(d) == config_fingerprint({**d, "gradient_checkpointing": False})
    assert config_fingerprint(d, switches_as_set=True) != config_fingerprint(d)


def test_killed_run_resumes_to_the_uninterrupted_result(data, tmp_path):
    """A real process killed (SIGKILL) at a random point after its first checkpoint, then resumed."""
    args = [
        "--model", "tiny:sd15", "--data", str(data), "--steps", "30", "--batch-size", "2", "--lr", "0.01",
        "--lora-rank", "2", "--checkpoint-every", "2", "--progress", "false", "--loss", "popalign",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "popalign_core.train", *args, "--output-dir", str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not list((killed / "checkpoints").glob("step_*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.0))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run must really be killed mid-way"
    assert not (killed / "popalign_lora.safetensors").exists()
    # whatever carries a final name is complete: checkpoints have both files, no LoRA was written yet
    for ck in (killed / "checkpoints").glob("step_*"):
        assert (ck / "state.safetensors").is_file() and (ck / "trainer_state.json").is_file()

    # resume, and an uninterrupted run, in processes with the same thread count as the killed one (the float
    # summation order of a CPU matmul depends on it)
    def run(out):
        cmd = [sys.executable, "-m", "popalign_core.train", *args, "--output-dir", str(out)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]

    run(killed)
    assert not list(killed.glob("*.tmp")) and not list((killed / "checkpoints").glob(".tmp_*"))
    steps = [json.loads(ln)["step"] for ln in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    run(tmp_path / "straight")
    a, b = _final_lora(killed), _final_lora(tmp_path / "straight")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(data, tmp_path):
    cfg = _cfg(data, tmp_path, steps=6, checkpoint_every=1, loss="dpo", lr=1e30, max_grad_norm=0.0)
    with pytest.raises(TrainingError, match=r"not finite \(NaN/inf\) at step \d+.*Last good checkpoint: .*step_"):
        Trainer(cfg, log=lambda m: None).run()
    assert not (tmp_path / "popalign_lora.safetensors").exists()
    assert list((tmp_path / "checkpoints").glob("step_*"))


def test_config_errors_name_the_field(data, tmp_path):
    with pytest.raises(ValueError, match=r"loss='nope' is not a known loss"):
        _cfg(data, tmp_path, loss="nope")
    with pytest.raises(ValueError, match=r"'gamma' is not a hyper-parameter of loss 'dpo'"):
        _cfg(data, tmp_path, loss="dpo", loss_params={"gamma": 1})
    with pytest.raises(ValueError, match=r"lr=0 is invalid"):
        _cfg(data, tmp_path, lr=0)
    with pytest.raises(ValueError, match=r"caption_dropout=1.0 is invalid"):
        _cfg(data, tmp_path, caption_dropout=1.0)
    with pytest.raises(ValueError, match=r"lora_name='\.\./x' is not a plain name"):
        _cfg(data, tmp_path, lora_name="../x")
    with pytest.raises(ValueError, match=r"anchor_weight > 0 needs anchor_prompts"):
        _cfg(data, tmp_path, loss_params={"anchor_weight": 1.0})
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rate'"):
        load_config(None, learning_rate=1.0)


def test_cli_yaml_config_with_flag_overrides(data, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: tiny:sd15\ndata: {data}\nloss: popalign\nloss_params: {{beta: 100.0}}\nsteps: 1\nbatch_size: 2\n"
        f"progress: false\ncheckpoint_every: 0\noutput_dir: {tmp_path / 'out'}\n"
    )
    assert main(["--config", str(cfg), "--steps", "2", "--loss-param", "alpha=0.3", "--lora-rank", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "beta: 100.0" in saved and "alpha: 0.3" in saved and "lora_rank: 2" in saved
    from popalign_core.lora.files import read_lora

    _, meta, _ = read_lora(tmp_path / "out" / "popalign_lora.safetensors")
    assert meta["loss"] == "popalign" and json.loads(meta["hyperparameters"])["beta"] == 100.0
    # switching the loss switches to its own defaults (popalign's beta does not leak into dpo)
    rc = main(["--config", str(cfg), "--loss", "dpo", "--output-dir", str(tmp_path / "dpo"), "--lora-rank", "2"])
    assert rc == 0
    assert "loss_params: {}" in (tmp_path / "dpo" / "config.yaml").read_text()


def test_cli_reports_data_errors_with_file_and_row(data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    ok = str(data.parent / "img_0_losing_0.png")
    rows = [
        {"set_id": "a", "population": "winning", "caption": "x", "image": "missing.png"},
        {"set_id": "a", "population": "losing", "caption": "x", "image": ok},
    ]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["--model", "tiny:sd15", "--data", str(bad), "--output-dir", str(tmp_path / "o"), "--steps", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 1" in err and "missing.png" in err


def test_memory_options_run_and_change_nothing_else(data, tmp_path):
    """Gradient checkpointing, no latent cache and bf16 autocast are real code paths: they train the same LoRA
    (checkpointing / no cache exactly, bf16 closely)."""
    ref = Trainer(_cfg(data, tmp_path / "ref", loss="dpo"), log=lambda m: None)
    ref.run()
    ckpt = Trainer(_cfg(data, tmp_path / "ck", loss="dpo", gradient_checkpointing=True, cache_latents=False))
    ckpt.log = lambda m: None
    ckpt.run()
    a, b = _final_lora(tmp_path / "ref"), _final_lora(tmp_path / "ck")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    bf = Trainer(_cfg(data, tmp_path / "bf", loss="dpo", mixed_precision="bf16"), log=lambda m: None)
    s = bf.run()
    assert s["last_loss"] is not None and all(torch.isfinite(v).all() for v in _final_lora(tmp_path / "bf").values())


def test_adamw8bit_without_bitsandbytes_says_what_to_install(data, tmp_path):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(TrainingError, match=r"adamw8bit' needs bitsandbytes: pip install bitsandbytes"):
        Trainer(_cfg(data, tmp_path, optimizer="adamw8bit"), log=lambda m: None).run()


def test_train_and_dal_configs_share_the_run_config_base():
    """TrainConfig and DALConfig inherit RunConfig's fields, and a shared field has one check for both."""
    import dataclasses

    from popalign_core.dal.trainer import DALConfig
    from popalign_core.train.runconfig import RunConfig

    shared = {f.name for f in dataclasses.fields(RunConfig)}
    assert issubclass(TrainConfig, RunConfig) and issubclass(DALConfig, RunConfig)
    assert shared <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert shared <= {f.name for f in dataclasses.fields(DALConfig)}
    assert {"model", "lora_rank", "lr", "steps", "seed", "output_dir", "resume", "progress"} <= shared
    dal = dict(model="toyworld", prompts=["a photo of a baker"], target={"form": [0.5, 0.5]}, face_bank="toy")
    for make in (
        lambda **kw: TrainConfig(model="tiny:sd15", data="x.jsonl", **kw),
        lambda **kw: DALConfig(**dal, **kw),
    ):
        with pytest.raises(ValueError, match=r"lr=0 is invalid: must be a finite number > 0"):
            make(lr=0)
        with pytest.raises(ValueError, match=r"lora_rank=0 is invalid: must be an integer >= 1"):
            make(lora_rank=0)
        with pytest.raises(ValueError, match=r"resolution=4 is invalid: must be None .* \[8, 8192\] pixels"):
            make(resolution=4)
        with pytest.raises(ValueError, match=r"family='sd4' is not supported; valid values: auto, sd15, sd2, sdx"):
            make(family="sd4")
    # the order of the YAML keys / flags is each config's own, not "inherited fields first"
    assert list(TrainConfig().to_dict())[:6] == ["model", "family", "model_config_dir", "prediction_type", "data",
                                                 "data_kind"]  # fmt: skip
    assert list(DALConfig(**dal).to_dict())[4] == "prompts"
    assert list(TrainConfig.fields_help()) == list(TrainConfig().to_dict())
    assert DALConfig(**dal, resolution=64).dft().height == 64


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("loss", ["popalign", "dspo"])
def test_flow_models_train_a_transformer_lora(data, tmp_path, family, loss):
    """`popalign train --model tiny:sd3|flux`: velocity targets, logit-normal timesteps; base and reference kept."""
    tr = Trainer(_cfg(data, tmp_path, model=f"tiny:{family}", loss=loss), log=lambda m: None)
    tr._setup_model()
    init = _lora_params(tr)
    base = {k: v.clone() for k, v in tr.adapter.transformer.state_dict().items() if "lora" not in k}
    summary = tr.run()
    after = _lora_params(tr)
    assert [n for n in after if not torch.equal(after[n], init[n])], "no LoRA parameter changed"
    for k, v in tr.adapter.transformer.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, base[k]), k
    assert summary["steps"] == 2 and Path(summary["outputs"]["kohya"]).is_file()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_prediction_type_and_resolution_are_checked_for_flow_models(data, tmp_path):
    with pytest.raises(ValueError, match="prediction_type='epsilon': sd3 is a flow-matching model"):
        Trainer(_cfg(data, tmp_path, model="tiny:sd3", prediction_type="epsilon"), log=lambda m: None).run()
    with pytest.raises(ValueError, match=r"resolution=30 is invalid: must be a multiple of 4 \(flux: VAE factor x "):
        Trainer(_cfg(data, tmp_path / "r", model="tiny:flux", resolution=30), log=lambda m: None).run()
