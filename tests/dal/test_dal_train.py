"""The DAL trainer (popalign_core.dal.trainer, `popalign dal`) on the toy world: bad input before any work, a run
with resume equal to an uninterrupted run, micro-batching equal to one batch, the prefix target, skipped no-face
batches, the gradient mask of the face region, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from popalign_core.dal import trainer as D
from popalign_core.toyworld.world import TRAIN_ROLES, caption

PROMPTS = [caption(r) for r in TRAIN_ROLES[:3]]
TARGET = {"form": [0.5, 0.5], "stature": [0.75, 0.25]}


def small(tmp_path, **kw):
    base = dict(model="toyworld", prompts=PROMPTS, target=TARGET, face_bank="toy", steps=2, images_per_prompt=4,
                sampler_steps=4, guidance_scale=1.0, lora_rank=4, lr=1e-3, output_dir=str(tmp_path / "run"),
                progress=False, checkpoint_every=1, lora_formats=["kohya"])  # fmt: skip
    base.update(kw)
    return D.load_dal_config(None, **base)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"threshold": 0}, r"threshold=0 is invalid: expected a confidence threshold C in \(0, 1\]"),
        ({"threshold": 1.5}, r"threshold=1.5 is invalid"),
        ({"train": "vae"}, "train='vae' is invalid: valid values: text_encoder, unet, both, prefix"),
        ({"gradient": "adjusted"}, "gradient='adjusted' is invalid: valid values: a1, solver, exact"),
        ({"classifier": "nope"}, "classifier='nope' is invalid"),
        ({"lambda_face": 1.0, "face_bank": None}, "face_bank=None is invalid: lambda_face > 0 needs a face bank"),
        ({"target": {}}, "target={} is invalid"),
        ({"images_per_prompt": 0}, "images_per_prompt=0 is invalid: must be an integer >= 1"),
        ({"scheduler": "euler_ancestral"}, "DFT needs a deterministic scheduler"),
    ],
)
def test_config_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        small(tmp_path, **kw)


def test_unknown_config_key(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'stepz'"):
        D.load_dal_config(None, stepz=3)


@pytest.mark.parametrize(
    "target, match",
    [
        ({"form": [0.6, 0.6]}, "sum"),
        ({"gender": [0.5, 0.5]}, "axis 'gender' is not an axis of the classifier; valid axes: \\['form', 'hue', "),
        ({"form": {"round": 0.5, "square": 0.5}}, "square"),
        ({"form": [0.5, 0.25, 0.25]}, "form"),
    ],
)
def test_bad_targets_fail_before_the_model_loads(tmp_path, target, match):
    tr = D.DALTrainer(small(tmp_path, target=target))
    with pytest.raises(ValueError, match=match):
        tr.run()
    assert not hasattr(tr, "adapter")  # nothing was generated or loaded


def test_non_differentiable_classifier_is_refused(tmp_path):
    """age_gender (ONNX models, weights shipped in its package) has no gradient: refused before the model loads."""
    tr = D.DALTrainer(small(tmp_path, classifier="age_gender", target={"gender": [0.5, 0.5]}, embedders=[],
                            lambda_face=0.0))  # fmt: skip
    with pytest.raises(ValueError, match="classifier 'age_gender' is not differentiable: DAL back-propagates"):
        tr.run()
    assert not hasattr(tr, "adapter")


def test_box_mask_and_gradient_mask():
    boxes = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    m = D._box_mask(boxes, (2, 3, 4, 4), torch.tensor([0.25, 1.0]), "cpu")
    want0 = torch.ones(4, 4)
    want0[:2, :2] = 0.25
    torch.testing.assert_close(m[0, 0], want0)
    torch.testing.assert_close(m[1, 0], torch.ones(4, 4))
    x = torch.ones(2, 3, 4, 4, requires_grad=True)
    D._GradMask.apply(x, m).sum().backward()
    torch.testing.assert_close(x.grad[:, 0], m[:, 0])


def test_build_target_forms():
    axes = {"form": ("round", "angular"), "stature": ("tall", "short")}
    t = D.build_target({"form": {"round": 0.5, "angular": 0.5}, "stature": [0.75, 0.25]}, axes)
    np.testing.assert_allclose(t.probs, [0.375, 0.125, 0.375, 0.125])
    j = D.build_target({"joint": {"axes": ["form", "stature"], "probs": [0.4, 0.1, 0.4, 0.1]}}, axes)
    np.testing.assert_allclose(j.marginal(j.axes[1]).probs, [0.8, 0.2])
    with pytest.raises(ValueError, match="a joint target is"):
        D.build_target({"joint": {"axes": ["form"]}, "form": [0.5, 0.5]}, axes)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dal_full")
    cfg = small(tmp, steps=3)
    return cfg, D.run_dal(cfg)


def test_run_writes_outputs_and_metrics(full_run):
    from popalign_core.lora.files import read_lora

    cfg, summary = full_run
    assert summary["steps"] == 3 and summary["method"] == "dal" and summary["skipped_groups"] == 0
    sd, meta, fmt = read_lora(summary["outputs"]["kohya"])
    assert fmt == "kohya" and any(k.startswith("lora_te_") for k in sd) and not any("unet" in k for k in sd)
    assert meta["loss"] == "dal" and json.loads(meta["hyperparameters"])["train"] == "text_encoder"
    rows = [json.loads(x) for x in open(f"{cfg.output_dir}/metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k in ("loss", "align", "img", "face", "grad_norm", "batch_error_form", "confident_stature"):
            assert np.isfinite(r[k]), k
        assert r["loss"] == pytest.approx(r["align"] + r["img"] + r["face"], rel=1e-5)


def test_resume_equals_uninterrupted(full_run, tmp_path):
    """2 steps, then resume to 3: the same LoRA as 3 steps in one go (same noise, targets and optimiser state)."""
    from popalign_core.lora.files import read_lora

    cfg, summary = full_run
    first = D.run_dal(small(tmp_path, steps=2))
    assert first["steps"] == 2
    second = D.run_dal(small(tmp_path, steps=3))
    assert second["resumed_from"] == 2
    a, _, _ = read_lora(summary["outputs"]["kohya"])
    b, _, _ = read_lora(second["outputs"]["kohya"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_cancel_keeps_a_resumable_checkpoint(tmp_path):
    def cancel(step, total, row):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        D.run_dal(small(tmp_path, steps=3, checkpoint_every=0), on_step=cancel)
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "trainer_state.json").is_file()


def test_micro_batches_give_the_same_gradient(tmp_path):
    grads = []
    for mb in (0, 1):
        tr = D.DALTrainer(small(tmp_path / str(mb), micro_batch=mb)).setup()
        row, live = tr._accumulate(1)
        assert live
        grads.append([p.grad.clone() for p in tr.params])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-4 * float(g0.abs().max()) + 1e-12)


def test_prefix_target_saves_a_textual_inversion(tmp_path):
    from popalign_core.dal.prefix import SoftPrefix

    s = D.run_dal(small(tmp_path, train="prefix", steps=1, prefix_tokens=3))
    path = s["outputs"]["embedding"]
    from popalign_core.models.loading import load_model

    ad = load_model("toyworld")
    pre = SoftPrefix.load(path, ad)
    assert len(pre.apply(["a"])[0].split()) == 4  # 3 prefix tokens + the prompt


def test_faceless_batches_are_skipped_and_counted(tmp_path):
    with pytest.warns(UserWarning, match="had no face and were skipped"):
        s = D.run_dal(small(tmp_path, prompts=["a photo of a tree"], steps=1))
    assert s["skipped_groups"] == 1


def test_cli(tmp_path, capsys):
    import yaml

    cfg = small(tmp_path, steps=1).to_dict()
    cfg.pop("target")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    rc = D.main(["--config", str(tmp_path / "run.yaml"), "--targets", json.dumps({"form": [0.5, 0.5]})])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 1
    rc = D.main(["--config", str(tmp_path / "run.yaml"), "--targets", "{not json"])
    assert rc == 2
    assert "--targets: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    "pt, match",
    [
        ({"a photo of a round baker": {"hue": [1, 0, 0, 0]}}, r"axes \['hue'\] are not axes of `target`"),
        ({"a photo of a round baker": {"form": {"square": 1.0}}}, "prompt_targets\\['a photo of a round baker'\\]"),
    ],
)
def test_prompt_target_errors(tmp_path, pt, match):
    tr = D.DALTrainer(small(tmp_path, prompt_targets=pt))
    with pytest.raises(ValueError, match=match):
        tr.run()


def test_prompt_targets_keep_their_identity(tmp_path):
    """neutral_share 0: every step draws an identity prompt, whose target on its axis is one-hot."""
    pt = {caption(TRAIN_ROLES[0], {"form": "round"}): {"form": [1.0, 0.0]}}
    tr = D.DALTrainer(small(tmp_path, prompt_targets=pt, neutral_share=0.0, steps=1)).setup()
    assert tr._step_prompts(1) == list(pt)
    row, live = tr._accumulate(1)
    t = live[0]["targets"]
    assert set(t.targets["form"][live[0]["face_x"]]) == {0}  # every face: target round, confidence 1
    assert "identity_error_form" in row and "batch_error_form" not in row


def test_example_config_runs(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "dal_toy.yaml"
    cfg = D.load_dal_config(example, steps=1, images_per_prompt=2, sampler_steps=2, prompts_per_step=1,
                            output_dir=str(tmp_path / "ex"), progress=False)  # fmt: skip
    assert Path(cfg.prompts_file).is_file() and len(cfg.prompt_targets) == 4
    assert D.run_dal(cfg)["steps"] == 1


def test_exact_ot_too_large_is_refused_at_setup(tmp_path):
    """Three toy axes make 16 joint classes: exact OT over N = 16 images would enumerate C(31, 15) count vectors.
    The trainer refuses it when it builds the target, before any image is sampled (it once failed at the first
    OT step, after minutes of work)."""
    tr = D.DALTrainer(small(tmp_path, target={"form": [0.5, 0.5], "hue": [0.25] * 4, "stature": [0.5, 0.5]},
                            images_per_prompt=16, ot_method="exact"))  # fmt: skip
    with pytest.raises(ValueError, match=r"ot_method='exact' with images_per_prompt=16 and the target's 16 joint "
                                         r"classes: method='exact' would solve 300540195 count vectors"):  # fmt: skip
        tr.setup()
