"""The toy-world build (`ci` preset: the full build's code path in minutes), the `toy` classifiers and the check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from popalign_core.toyworld.build import PRESETS, BuildConfig, build

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("tw") / "toyworld"
    lines = []
    build(out, BuildConfig(seed=0, **PRESETS["ci"]), progress=lines.append)
    return out, lines


def test_build_layout_and_refusals(built, tmp_path):
    out, lines = built
    for f in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
              "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json", "toyworld.json",
              "classifiers/toy_classifiers.json", "classifiers/toy_train.safetensors",
              "classifiers/toy_eval.safetensors", "classifiers/toy_face_bank.safetensors"):  # fmt: skip
        assert (out / f).is_file(), f
    assert not out.with_name(out.name + ".partial").exists()
    meta = json.loads((out / "toyworld.json").read_text())
    assert meta["config"]["unet_steps"] == PRESETS["ci"]["unet_steps"] and meta["seconds"] > 0
    assert any("vae step" in m for m in lines) and any("unet step" in m for m in lines)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        build(out, BuildConfig(**PRESETS["ci"]))
    from popalign_core.common.fileio import check_clearable
    from popalign_core.toyworld.build import COMMAND, OUTPUTS

    assert check_clearable(out, COMMAND, OUTPUTS)  # --overwrite may replace exactly this build
    (out / "my_notes.txt").write_text("mine")
    try:
        with pytest.raises(FileExistsError, match="'my_notes.txt'.*nothing was deleted"):
            build(out, BuildConfig(**PRESETS["ci"]), overwrite=True)  # refused before building
    finally:
        (out / "my_notes.txt").unlink()


TINY = {"n_images": 300, "vae_steps": 2, "unet_steps": 3, "unet_batch": 8, "text_pretrain_steps": 2,
        "classifier_images": 200, "classifier_steps": 2}  # fmt: skip


@pytest.mark.parametrize("stage", ["vae step", "text pretrain", "unet step", "eval classifier"])
def test_a_build_interrupted_at_any_stage_leaves_no_folder_that_looks_complete(tmp_path, stage):
    def boom(msg):
        if msg.startswith(stage):
            raise KeyboardInterrupt

    out = tmp_path / "tw"
    with pytest.raises(KeyboardInterrupt):
        build(out, BuildConfig(**TINY), progress=boom)
    assert not out.exists() and (tmp_path / "tw.partial").is_dir()
    if stage == "eval classifier":  # the last stage: the next build clears the unfinished folder and completes
        build(out, BuildConfig(**TINY), progress=None)
        assert (out / "classifiers" / "toy_classifiers.json").is_file() and not (tmp_path / "tw.partial").exists()


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path):
    def boom(msg):
        if msg.startswith("unet step"):
            raise KeyboardInterrupt

    out = tmp_path / "tw"
    with pytest.raises(KeyboardInterrupt):
        build(out, BuildConfig(n_images=300, vae_steps=2, unet_steps=3, unet_batch=8), progress=boom)
    assert not out.exists()
    partial = out.with_name("tw.partial")
    assert partial.is_dir()
    (partial / "stray.txt").write_text("not the build's")  # a killed build's folder is cleared only when all ours
    with pytest.raises(FileExistsError, match="'stray.txt'"):
        build(out, BuildConfig(n_images=300, vae_steps=2, unet_steps=3, unet_batch=8), classifiers=False)
    (partial / "stray.txt").unlink()
    from popalign_core.common.fileio import check_clearable
    from popalign_core.toyworld.build import COMMAND, OUTPUTS

    assert check_clearable(partial, COMMAND, OUTPUTS) is not None  # the next build may clear it: all of it is ours


def test_classifiers_only_retrains_the_classifiers_of_a_build(built, tmp_path):
    """`--classifiers-only`: the classifiers are written anew from the build's VAE and recorded config; the model's
    weights are untouched; a leftover unfinished folder of ours is cleared; a folder without a build is refused."""
    import shutil

    from popalign_core.toyworld.build import rebuild_classifiers

    out = tmp_path / "tw"
    shutil.copytree(built[0], out)
    unet = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    (out / "classifiers" / "toy_eval.safetensors").write_bytes(b"stale")
    shutil.copytree(out, tmp_path / "tw.partial")  # a killed earlier run's copy
    lines = []
    rebuild_classifiers(out, progress=lines.append)
    assert (out / "classifiers" / "toy_eval.safetensors").read_bytes() != b"stale"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == unet
    assert not (tmp_path / "tw.partial").exists() and any(m.startswith("retrained the classifiers") for m in lines)
    assert json.loads((out / "toyworld.json").read_text())["classifiers_seconds"] > 0
    from popalign_core.classify.classifiers import make_classifier

    assert make_classifier("toy", weights=out, which="eval").predict([np.zeros((32, 32, 3), np.uint8)])["face"].shape
    with pytest.raises(FileNotFoundError, match="holds no toy-world build"):
        rebuild_classifiers(tmp_path / "nothing")


def test_model_loads_and_samples_through_the_sd15_path(built):
    from popalign_core.models.loading import load_model
    from popalign_core.models.sampling import SamplerConfig, sample

    out, _ = built
    adapter = load_model(str(out))
    assert adapter.family == "sd15"
    imgs = sample(adapter, [("a photo of a baker", 0), ("a photo of a tree", 1)], SamplerConfig(steps=4, height=32,
                  width=32))  # fmt: skip
    assert imgs.shape == (2, 3, 32, 32) and torch.isfinite(imgs).all()


def test_toy_classifier_backend(built):
    from popalign_core.classify.classifiers import make_classifier
    from popalign_core.toyworld.classifier import labelled_renders

    out, _ = built
    clf = make_classifier("toy", weights=out, which="train")
    imgs, labels = labelled_renders(64, seed=3)
    res = clf.classify(list(imgs) + [np.zeros((5, 5), np.float32)])
    assert len(res) == 65 and res[-1].error and not res[-1].face_found
    for r in res[:-1]:
        if r.face_found:
            assert set(r.probs) == {"form", "hue", "stature"}
            assert all(abs(p.sum() - 1) < 1e-9 for p in r.probs.values())
            x0, y0, x1, y1 = r.box
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
    x = torch.from_numpy(imgs[:4]).permute(0, 3, 1, 2).float().div(255).requires_grad_(True)
    sum(v.sum() for v in clf.probs(x).values()).backward()  # differentiable
    logits = clf.logits(x.detach())
    assert x.grad is not None and logits["hue"].shape == (4, 4)
    emb = clf.embed_images(list(imgs[:3]))
    assert emb.shape[0] == 3 and np.allclose(np.linalg.norm(emb, axis=1), 1)
    assert clf.face_bank().ndim == 2
    ev = make_classifier("toy", weights=out, which="eval")
    assert type(ev.net).__name__ != type(clf.net).__name__  # independent architecture
    with pytest.raises(ValueError, match="`which` must be one of"):
        make_classifier("toy", weights=out, which="best")
    with pytest.raises(ValueError, match="`detector` must be None"):
        make_classifier("toy", weights=out, detector="opencv_haar")


def test_check_runs_and_reports_every_field(built):
    from popalign_core.toyworld.check import main

    out, _ = built
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--model", str(out), "--n", "4", "--n-identity", "2", "--n-concept", "2", "--steps", "3"]) == 0
    res = json.loads(buf.getvalue().strip().splitlines()[-1])
    for k in ("world", "roles", "base_discrepancy", "base_discrepancy_held_out", "skew_error_mean",
              "skew_error_floor", "skew_error_by_split", "identity_recall", "concept_accuracy", "classifier_accuracy",
              "classifier_accuracy_per_head", "classifier_agreement", "train_classifier_calibration", "sampler",
              "targets", "passed", "build_seconds", "weights_mb"):  # fmt: skip
        assert k in res, k
    assert res["classifier_accuracy"] == min(res["classifier_accuracy_per_head"].values())
    assert set(res["classifier_accuracy_per_head"]) == {"face", "form", "hue", "stature", "concept", "role"}
    w = res["world"]
    assert (w["roles"], w["held_out_roles"], w["validation_roles"], w["train_roles"]) == (56, 14, 8, 34)
    assert w["held_out_strongest_skew"]["form"]["round"] >= 0.85 and res["passed"]["held_out_strong"]
    assert set(res["passed"]) == set(res["targets"]) and res["build_seconds"] > 0 and res["weights_mb"] > 0
    for v in res["train_classifier_calibration"].values():
        assert 0 <= v["ece"] <= 1 and 0 < v["mean_confidence"] <= 1 and 0 <= v["saturated_share"] <= 1
    assert set(res["base_discrepancy"]) == {"form", "hue", "stature"}
    assert res["sampler"]["guidance_scale"] == 1.5 and res["n_per_role"] == 4


def test_audit_of_the_toy_model_folder_with_the_toy_backend(built, tmp_path):
    """`popalign audit` on a model folder loaded from disk (the toy world) with the `toy` classifier and the toy
    axes, a non-uniform target on one of them."""
    from popalign_core.evaluate.audit import main

    out, _ = built
    rc = main(["--model", str(out), "--prompts", str(_prompts(tmp_path)), "--images-per-prompt", "3",
               "--classifier", "toy", "--weights", str(out), "--axes", "form,hue,stature", "--steps", "3",
               "--guidance", "1", "--targets", '{"stature": {"tall": 0.25, "short": 0.75}}', "--n-boot", "20",
               "--out", str(tmp_path / "a")])  # fmt: skip
    assert rc == 0
    res = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert res["settings"]["classifier"] == "toy" and res["counts"]["images"] == 6
    assert res["axes"]["stature"]["target"] == [0.25, 0.75] and res["axes"]["hue"]["classes"] == [
        "red", "green", "blue", "gold"]  # fmt: skip
    assert (tmp_path / "a" / "report.html").is_file()


def _prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a photo of a baker\na photo of a pilot\n")
    return f


def test_caption_labels_by_hand():
    from popalign_core.toyworld.build import AUX_HEADS, caption_labels
    from popalign_core.toyworld.world import ROLE_BY_NAME

    # a role is read out through its parts (setting, shade), never as an identity of its own
    assert list(AUX_HEADS) == ["setting", "shade", "concept", "hidden", "form", "hue", "stature"]
    caps = ["a photo of a tall red baker", "a photo of a tree", "", "a photo of an angular pilot in a cloak",
            "a photo of a small emerald curvy chef"]  # fmt: skip

    def parts(role):
        return [1 + ROLE_BY_NAME[role].setting, 1 + ROLE_BY_NAME[role].shade]

    assert parts("baker") == [7, 6]  # setting 6 (grid), shade 5 (0.76)
    assert caption_labels(caps).tolist() == [
        [*parts("baker"), 0, 0, 0, 1, 1],
        [0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
        [*parts("pilot"), 0, 1, 2, 0, 0],
        [*parts("chef"), 0, 0, 1, 2, 2],
    ]


def test_text_pretraining_makes_every_named_attribute_readable():
    """After the caption-attribute pretraining, linear read-outs recover every named attribute (and "not named")
    from every position from the end-of-text token on, for captions it was trained on."""
    from transformers import CLIPTextModel

    from popalign_core.toyworld.build import (
        EOS_ID,
        TextAux,
        caption_labels,
        pretrain_text,
        text_encoder_config,
        tokenize,
    )
    from popalign_core.toyworld.data import make_dataset

    torch.manual_seed(0)
    cfg = BuildConfig(text_hidden=32, text_layers=1, text_pretrain_steps=150)
    _, caps, _ = make_dataset(400, seed=1)
    text = CLIPTextModel(text_encoder_config(cfg))
    aux = TextAux(cfg.text_hidden, seed=0)
    ids, labels = tokenize(caps).input_ids, caption_labels(caps)
    with torch.no_grad():
        before = float(aux.loss(text(ids)[0], ids, labels))
    pretrain_text(text, caps, cfg, aux)
    with torch.no_grad():
        states = text(ids)[0]
        after = float(aux.loss(states, ids, labels))
        eos = (ids == EOS_ID).int().argmax(1)
        last = states[torch.arange(len(caps)), -1]  # the last padding position
        acc = [float((head(last).argmax(1) == labels[:, k]).float().mean()) for k, head in enumerate(aux.heads)]
    assert (eos < ids.shape[1] - 1).all()
    assert after < 0.1 * before, (before, after)
    assert min(acc) > 0.98, acc


def test_shipped_toy_world_is_complete_current_and_small():
    """The committed build: every file, built by the current build version with the `full` preset, <= 20 MB."""
    from popalign_core.toyworld.build import BUILD_VERSION
    from popalign_core.toyworld.classifier import default_toyworld_dir

    d = default_toyworld_dir()
    files = [p for p in d.rglob("*") if p.is_file()]
    names = {str(p.relative_to(d)) for p in files}
    expected = ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "vae/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json", "toyworld.json",
                "scheduler/scheduler_config.json", "classifiers/toy_classifiers.json",
                "classifiers/toy_train.safetensors", "classifiers/toy_eval.safetensors",
                "classifiers/toy_face_bank.safetensors"]  # fmt: skip
    assert not set(expected) - names
    assert sum(p.stat().st_size for p in files) <= 20 * 1024 * 1024
    meta = json.loads((d / "toyworld.json").read_text())
    assert meta["build_version"] == BUILD_VERSION
    assert meta["config"] == BuildConfig(**PRESETS["full"]).to_dict() | {"threads": meta["config"]["threads"]}


def test_calibration_statistics_by_hand():
    from popalign_core.toyworld.check import _calibration

    form = np.array([[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.65, 0.35]])

    class Fixed:
        def predict(self, imgs):
            return {"form": form, "stature": form, "hue": np.tile([1.0, 0, 0, 0], (4, 1))}

    labels = {"form": [0, 1, 0, -1], "stature": [0, 1, 0, -1], "hue": [0, 0, 0, 0]}
    res = _calibration(Fixed(), np.zeros((4, 32, 32, 3), np.uint8), labels)
    # bin 9: conf 0.95, accuracy 1/2, weight 2/3; bin 6: conf 0.65, accuracy 1, weight 1/3
    assert res["form"]["ece"] == pytest.approx(0.45 * 2 / 3 + 0.35 / 3)
    assert res["form"]["mean_confidence"] == pytest.approx(0.85) and res["form"]["saturated_share"] == 0
    assert res["hue"] == {"ece": 0.0, "mean_confidence": 1.0, "saturated_share": 1.0}
