"""The demo (README command #1) end to end, reduced in size."""

from __future__ import annotations

import json

import pytest
import torch

from popalign_core.demo import augment, main, run_demo


def test_augment_inserts_the_identity_before_the_noun():
    assert augment("a photo of a doctor", "female") == "a photo of a female doctor"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = run_demo(out, steps=6, images_per_population=4, holdout=1, eval_images=6, log=lambda m: None)
    return out, summary


def test_demo_writes_every_output_and_a_consistent_summary(demo_run):
    out, s = demo_run
    for name in (
        "popalign_demo_lora.safetensors",
        "diffusers_lora",
        "metrics.jsonl",
        "loss_curve.png",
        "summary.json",
    ):
        assert (out / name).exists(), name
    assert json.loads((out / "summary.json").read_text()) == s
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # fresh LoRA: model == reference, logits 0
    assert s["heldout_margin_before"] == 0.0 and s["train_images"] + s["heldout_images"] == 2 * 4 * 3
    assert s["model"] == "toyworld" and s["family"] == "sd15"
    for key in ("form_bias_before", "form_bias_after"):
        b = s[key]
        assert b["n_per_prompt"] == 6 and set(b["prompts"]) == {"a photo of a baker", "a photo of a pilot",
                                                                 "a photo of a guard"}  # fmt: skip
        for v in b["prompts"].values():
            assert 0 <= v["faces"] <= 6 and set(v["shares"]) == {"round", "angular"}
            if v["faces"]:  # Eq. 13 for K = 2 hard labels: sqrt(2) * |share_round - 0.5|
                assert v["discrepancy"] == pytest.approx(2**0.5 * abs(v["shares"]["round"] - 0.5), abs=1e-3)
    data = [json.loads(ln) for ln in (out / "data" / "population.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in data if r["population"] == "winning"} == {
        f"a photo of a {f} {r}" for f in ("round", "angular") for r in ("baker", "pilot", "guard")}  # fmt: skip


def test_demo_on_the_random_tiny_model(tmp_path):
    s = run_demo(tmp_path, model="tiny", steps=2, images_per_population=2, holdout=1, log=lambda m: None)
    assert s["model"] == "tiny" and s["form_bias_before"] is None and s["heldout_images"] == 2 * 3
    with pytest.raises(ValueError, match="model='sdxl' is not a demo model"):
        run_demo(tmp_path / "x", model="sdxl")


def test_demo_lora_files_reload_to_the_trained_model(demo_run):
    from popalign_core.lora_io import load_lora, read_lora
    from popalign_core.models import load_model

    out, s = demo_run
    sd, meta, fmt = read_lora(out / "popalign_demo_lora.safetensors")
    assert fmt == "kohya" and meta["loss"] == "popalign" and len(meta["base_model_hash"]) == 64
    assert any(k.startswith("lora_unet_") for k in sd)
    a = load_model("toyworld")
    b = load_model("toyworld")
    load_lora(a, out / "popalign_demo_lora.safetensors")
    load_lora(b, out / "diffusers_lora")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        c = a.encode_prompt(["a photo of a baker"] * 2)
        pa, pb = a.predict(x, t, c), b.predict(x, t, c)
        with a.reference():
            base = a.predict(x, t, c)
    torch.testing.assert_close(pa, pb)
    assert not torch.allclose(pa, base)  # the trained LoRA changes the model


def test_demo_cli_refuses_a_non_empty_output_and_unknown_losses(demo_run, capsys):
    out, _ = demo_run
    assert main(["--out", str(out), "--steps", "1"]) == 2
    assert "is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--loss", "nope"])
    with pytest.raises(ValueError, match="holdout=4 is invalid"):
        run_demo(out / "x", images_per_population=4, holdout=4)


def test_demo_data_feeds_the_example_training_config(demo_run, tmp_path):
    """examples/train_demo.yaml trains on the population data the demo exports (reduced to 2 steps)."""
    from pathlib import Path

    from popalign_core.data import load_preference_data
    from popalign_core.train import load_config, train

    out, _ = demo_run
    data = load_preference_data(out / "data" / "population.jsonl")
    assert data.kind == "population" and len(data.samples) == 2 * 4 * 3
    assert {data.samples[i].caption for i in data.winning()} == {data.samples[i].caption for i in data.losing()}
    example = Path(__file__).resolve().parents[1] / "examples" / "train_demo.yaml"
    cfg = load_config(
        example, data=str(out / "data" / "population.jsonl"), output_dir=str(tmp_path), steps=2, progress=False
    )
    summary = train(cfg, log=lambda m: None)
    assert Path(summary["outputs"]["kohya"]).is_file()
