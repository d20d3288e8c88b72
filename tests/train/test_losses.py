"""Every loss against a hand-written reference of its formula, its direction, and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from popalign_core.train.losses import LOSSES, LossInputs, compute_loss, loss_config, loss_defaults

B_PAIRS = 3
SHAPE = (2 * B_PAIRS, 4, 3, 3)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def make_inputs(seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(SHAPE, generator=g)
    ref = target + torch.randn(SHAPE, generator=g) * 0.5
    model = ref + torch.randn(SHAPE, generator=g) * scale
    label = torch.tensor([1, -1, 1, 1, -1, -1])  # interleaved: pairs are (0,1), (2,4), (3,5)
    emb = torch.randn(SHAPE[0], 8, generator=g)
    return LossInputs(model_pred=model, ref_pred=ref, target=target, label=label, embeddings=emb)


def errors(x: LossInputs):
    lm = [mse(x.model_pred[i], x.target[i]) for i in range(SHAPE[0])]
    lr = [mse(x.ref_pred[i], x.target[i]) for i in range(SHAPE[0])]
    w = [i for i in range(SHAPE[0]) if x.label[i] == 1]
    lo = [i for i in range(SHAPE[0]) if x.label[i] == -1]
    return lm, lr, w, lo


# ------------------------------------------------------------------------------------------- hand-written references
def ref_sft(x, **_):
    lm, _, w, _ = errors(x)
    return sum(lm[i] for i in w) / len(w)


def ref_dpo(x, beta=5000.0, scale=0.5, **_):
    lm, lr, w, lo = errors(x)
    vals = []
    for i, j in zip(w, lo):
        u = -scale * beta * ((lm[i] - lm[j]) - (lr[i] - lr[j]))
        vals.append(-logsig(u))
    return sum(vals) / len(vals)


def ref_popalign(x, beta=5000.0, alpha=0.5, weight_winning=1.0, weight_losing=1.0, **_):
    lm, lr, w, lo = errors(x)
    g = [lr[i] - lm[i] for i in range(len(lm))]
    mu = alpha * sum(g[i] for i in w) / len(w) + (1 - alpha) * sum(g[i] for i in lo) / len(lo)
    tot = 0.0
    for i in range(len(g)):
        gamma = 1.0 if i in w else -1.0
        lam = weight_winning if i in w else weight_losing
        tot += -lam * logsig(gamma * beta * (g[i] - mu))
    return tot / len(g)


def ref_rpo(x, beta=5000.0, scale=0.5, tau=0.5, **_):
    lm, lr, w, lo = errors(x)
    e = x.embeddings.double()
    m = len(w)
    total = 0.0
    for i in w:
        raw = []
        for j in lo:
            cos = float(e[i] @ e[j] / (e[i].norm() * e[j].norm()))
            raw.append(math.exp(-(1 - cos) / tau))
        z = sum(raw)
        for k, j in enumerate(lo):
            u = -scale * beta * ((lm[i] - lm[j]) - (lr[i] - lr[j]))
            total += (raw[k] / z) * logsig(u)
    return -total / m


def ref_dspo(x, beta=0.001, scale=0.5, form="sd15", threshold=0.1, **_):
    lm, lr, w, lo = errors(x)
    vals = []
    if form == "sd15":
        for i, j in zip(w, lo):
            u = -scale * beta * ((lm[i] - lm[j]) - (lr[i] - lr[j]))
            r = x.model_pred[i].double() - x.target[i].double()
            r = r - beta * (1 - sig(u)) * (x.model_pred[i].double() - x.ref_pred[i].double())
            vals.append(float((r**2).mean()))
        return sum(vals) / len(vals)
    p = torch.stack([x.model_pred[i].double() - x.ref_pred[i].double() for i in w])
    use_p = float((p**2).mean()) >= threshold
    for k, (i, j) in enumerate(zip(w, lo)):
        u = -scale * beta * ((lm[i] - lm[j]) - (lr[i] - lr[j]))
        s = 1 - sig(u)
        vals.append(float(((s * p[k]) ** 2).mean()) if use_p else s**2)
    return sum(vals) / len(vals)


def ref_kto(x, beta=1000.0, weight_desirable=1.0, weight_undesirable=1.0, **_):
    lm, lr, w, _ = errors(x)
    g = [lr[i] - lm[i] for i in range(len(lm))]
    z = max(sum(g) / len(g), 0.0)
    tot = 0.0
    for i in range(len(g)):
        gamma, lam = (1.0, weight_desirable) if i in w else (-1.0, weight_undesirable)
        tot += lam * (1 - sig(gamma * beta * (g[i] - z)))
    return tot / len(g)


def ref_mapo(x, beta=0.1, snr=0.5, **_):
    lm, _, w, lo = errors(x)

    def f(v):
        return snr * v / (math.exp(snr * v) - 1)

    vals = [lm[i] - beta * logsig(1000 * (f(lm[i]) - f(lm[j]))) for i, j in zip(w, lo)]
    return sum(vals) / len(vals)


def ref_orpo(x, beta=0.1, **_):
    lm, _, w, lo = errors(x)
    vals = [lm[i] - beta * logsig(lm[j] - lm[i]) for i, j in zip(w, lo)]
    return sum(vals) / len(vals)


REFERENCES = {
    "sft": ref_sft,
    "dpo": ref_dpo,
    "popalign": ref_popalign,
    "rpo": ref_rpo,
    "dspo": ref_dspo,
    "kto": ref_kto,
    "mapo": ref_mapo,
    "orpo": ref_orpo,
}

# hyper-parameter sets: defaults, and values that keep the sigmoids away from saturation on these inputs
CASES = {
    "sft": [{}],
    "dpo": [{}, {"beta": 20.0}],
    "popalign": [{}, {"beta": 30.0, "alpha": 0.3, "weight_winning": 2.0, "weight_losing": 0.5}],
    "rpo": [{}, {"beta": 20.0, "tau": 0.05}],
    "dspo": [{}, {"beta": 0.5}, {"form": "sdxl", "beta": 30.0}, {"form": "sdxl", "beta": 30.0, "threshold": 0.0}],
    "kto": [{}, {"beta": 20.0, "weight_desirable": 1.5}],
    "mapo": [{}, {"beta": 0.3, "snr": 1.0}],
    "orpo": [{}, {"beta": 0.5}],
}


def test_every_registered_loss_has_a_reference_and_cases():
    assert set(REFERENCES) == set(LOSSES) == set(CASES)


@pytest.mark.parametrize("name,hp", [(n, hp) for n in LOSSES for hp in CASES[n]])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_hand_written_reference(name, hp, seed):
    x = make_inputs(seed)
    out = compute_loss(name, x, **hp)
    expected = REFERENCES[name](x, **hp)
    assert out.loss.ndim == 0
    assert float(out.loss) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # per_sample: one value per sample (unpaired) or per pair / winner row (pairwise); its mean is the loss
    n = SHAPE[0] // 2 if LOSSES[name].pairwise else SHAPE[0]
    assert out.per_sample.shape == (n,)
    if name == "sft":
        assert float(out.per_sample.sum() / (x.label == 1).sum()) == pytest.approx(float(out.loss), rel=1e-6)
    else:
        assert float(out.per_sample.mean()) == pytest.approx(float(out.loss), rel=1e-6)
    assert all(isinstance(v, float) for v in out.metrics.values())


def test_dspo_sdxl_takes_both_branches():
    x = make_inputs(0)
    big = compute_loss("dspo", x, form="sdxl", beta=30.0, threshold=0.0)
    small = compute_loss("dspo", x, form="sdxl", beta=30.0, threshold=1e9)
    assert big.metrics["sdxl_branch_p"] == 1.0 and small.metrics["sdxl_branch_p"] == 0.0


def test_rpo_without_embeddings_is_dpo():
    x = make_inputs(0)
    x.embeddings = None
    r = compute_loss("rpo", x, beta=20.0).loss
    d = compute_loss("dpo", x, beta=20.0).loss
    assert float(r) == pytest.approx(float(d), rel=1e-6)


def test_rpo_identical_embeddings_weight_uniformly():
    x = make_inputs(0)
    x.embeddings = torch.ones(SHAPE[0], 4)
    out = compute_loss("rpo", x)
    assert out.metrics["weight_diag"] == pytest.approx(1.0 / B_PAIRS)


def test_popalign_mu_is_detached_and_global():
    x = make_inputs(0)
    x.model_pred.requires_grad_(True)
    out = compute_loss("popalign", x, beta=30.0)
    lm, lr, w, lo = errors(x)
    g = [lr[i] - lm[i] for i in range(6)]
    mu = 0.5 * sum(g[i] for i in w) / 3 + 0.5 * sum(g[i] for i in lo) / 3
    assert out.metrics["mu"] == pytest.approx(mu, rel=1e-5)
    # gradient equals the formula's gradient with mu held constant
    out.loss.backward()
    grad = x.model_pred.grad.clone()
    xm = x.model_pred.detach().clone().requires_grad_(True)
    lmt = ((xm - x.target) ** 2).reshape(6, -1).mean(1)
    lrt = ((x.ref_pred - x.target) ** 2).reshape(6, -1).mean(1)
    z = x.label.float() * 30.0 * ((lrt - lmt) - mu)
    (-torch.nn.functional.logsigmoid(z).mean()).backward()
    torch.testing.assert_close(grad, xm.grad, rtol=1e-5, atol=1e-8)


def test_popalign_mu_from_reduced_statistics():
    """A `reduce` that adds another process's sums/counts changes mu to the global statistic."""
    x = make_inputs(0)
    other = torch.tensor([4.0, 2.0, -1.0, 5.0], dtype=torch.float64)  # sum_w, n_w, sum_l, n_l elsewhere
    out = compute_loss("popalign", x, beta=30.0, reduce=lambda t: t + other)
    lm, lr, w, lo = errors(x)
    g = [lr[i] - lm[i] for i in range(6)]
    mu = 0.5 * (sum(g[i] for i in w) + 4.0) / (3 + 2) + 0.5 * (sum(g[i] for i in lo) - 1.0) / (3 + 5)
    assert out.metrics["mu"] == pytest.approx(mu, rel=1e-6)
    assert out.metrics["n_winning"] == 5 and out.metrics["n_losing"] == 8


def test_popalign_single_group_falls_back_and_logs():
    x = make_inputs(0)
    x.label = torch.ones(6, dtype=torch.long)
    out = compute_loss("popalign", x, beta=30.0)
    lm, lr, _, _ = errors(x)
    assert out.metrics["mu_fallback"] == 1.0
    assert out.metrics["mu"] == pytest.approx(sum(r - m for r, m in zip(lr, lm)) / 6, rel=1e-5)


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if not s.needs_pred])
def test_exact_logratios_match_prediction_form(name):
    """With exact log-ratios g the losses on implicit rewards use g where they used Lref - Lθ."""
    x = make_inputs(0)
    lm, lr, _, _ = errors(x)
    g = torch.tensor([r - m for r, m in zip(lr, lm)])
    hp = CASES[name][-1]
    a = compute_loss(name, x, **hp)
    b = compute_loss(name, LossInputs(logratio=g, label=x.label, embeddings=x.embeddings), **hp)
    if name == "sft":  # sft on log-ratios is -mean over winners of g (maximum likelihood up to a constant)
        w = x.label == 1
        assert float(b.loss) == pytest.approx(float(-g[w].mean()), rel=1e-6)
    else:
        assert float(b.loss) == pytest.approx(float(a.loss), rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------------------- direction
def _one_step(name, hp, lr):
    x = make_inputs(3, scale=0.0)  # model == reference: logits start at 0
    param = x.model_pred.clone().requires_grad_(True)
    x.model_pred = param
    before = ((param.detach() - x.target) ** 2).reshape(6, -1).mean(1)
    out = compute_loss(name, x, **hp)
    out.loss.backward()
    with torch.no_grad():
        param -= lr * param.grad / param.grad.abs().max()
    after = ((param.detach() - x.target) ** 2).reshape(6, -1).mean(1)
    w = x.label == 1
    return before, after, w


DIRECTION_CASES = [(n, hp) for n in LOSSES for hp in CASES[n] if hp.get("threshold") != 0.0]


@pytest.mark.parametrize("name,hp", DIRECTION_CASES)
def test_one_step_prefers_the_preferred(name, hp):
    before, after, w = _one_step(name, hp, lr=1e-3)
    if name == "sft":  # ignores the loser: lowers the preferred error
        assert after[w].mean() < before[w].mean()
        assert torch.equal(after[~w], before[~w])
        return
    gap_before = before[w].mean() - before[~w].mean()
    gap_after = after[w].mean() - after[~w].mean()
    assert gap_after < gap_before


def test_dspo_sdxl_p_branch_has_no_gradient_at_the_reference():
    """The simplified SDXL form's ((1-σ(u))·p)^2 branch is flat where the model equals the reference (p = 0):
    that is why the official code switches to (1-σ(u))^2 below the threshold (excluded from the direction test)."""
    x = make_inputs(3, scale=0.0)
    x.model_pred = x.model_pred.clone().requires_grad_(True)
    compute_loss("dspo", x, form="sdxl", beta=30.0, threshold=0.0).loss.backward()
    assert float(x.model_pred.grad.abs().max()) == 0.0


def test_orpo_sign_is_correct_and_public_sign_is_not():
    """log p ≈ -L: the corrected log-odds (L_l - L_w) lowers L_w - L_l at a pure odds-ratio step (no SFT term);
    the public script's log-odds (L_w - L_l) raises it: it rewards the rejected sample."""
    x = make_inputs(3, scale=0.0)
    w, lo = torch.tensor([0, 2, 3]), torch.tensor([1, 4, 5])

    def step(sign):
        p = x.model_pred.clone().requires_grad_(True)
        lm = ((p - x.target) ** 2).reshape(6, -1).mean(1)
        odds = sign * (lm[lo] - lm[w])
        (-torch.nn.functional.logsigmoid(odds).mean()).backward()
        with torch.no_grad():
            q = p - 1e-2 * p.grad
        lq = ((q - x.target) ** 2).reshape(6, -1).mean(1)
        return float((lq[w] - lq[lo]).mean() - (lm[w] - lm[lo]).mean())

    assert step(+1.0) < 0 < step(-1.0)
    # and our registered orpo uses the corrected sign
    x2 = make_inputs(0)
    lm, _, ww, ll = errors(x2)
    out = compute_loss("orpo", x2, beta=0.5)
    assert out.metrics["log_odds"] == pytest.approx(sum(lm[j] - lm[i] for i, j in zip(ww, ll)) / 3, rel=1e-5)


@pytest.mark.parametrize("name", list(LOSSES))
def test_anchor_term_adds_likelihood_on_reference_samples(name):
    x = make_inputs(0)
    g = torch.Generator().manual_seed(9)
    x.anchor_model_pred = torch.randn(2, 4, 3, 3, generator=g)
    x.anchor_target = torch.randn(2, 4, 3, 3, generator=g)
    hp = CASES[name][-1]
    base = compute_loss(name, x, **hp)
    anch = compute_loss(name, x, anchor_weight=0.25, **hp)
    expected = float(base.loss) + 0.25 * mse(x.anchor_model_pred, x.anchor_target)
    assert float(anch.loss) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------------- validation
def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match=r"loss='nope' is not a known loss; valid values: sft, dpo, popalign"):
        compute_loss("nope", make_inputs())


def test_unknown_hyperparameter_is_named():
    with pytest.raises(ValueError, match=r"'gamma' is not a hyper-parameter of loss 'dpo'; valid hyper-parameters"):
        compute_loss("dpo", make_inputs(), gamma=1.0)


@pytest.mark.parametrize(
    "name,hp,match",
    [
        ("dpo", {"beta": -1.0}, r"beta=-1.0 is invalid for DPOConfig"),
        ("dpo", {"beta": float("nan")}, r"beta=nan is invalid"),
        ("popalign", {"alpha": 1.5}, r"alpha=1.5 is invalid for PopAlignConfig: must lie in \[0, 1\]"),
        ("rpo", {"tau": 0.0}, r"tau=0.0 is invalid"),
        ("dspo", {"form": "sd3"}, r"form='sd3' is invalid for DSPOConfig; valid values: sd15, sdxl"),
        ("kto", {"anchor_weight": -0.1}, r"anchor_weight=-0.1 is invalid"),
    ],
)
def test_invalid_hyperparameters(name, hp, match):
    with pytest.raises(ValueError, match=match):
        compute_loss(name, make_inputs(), **hp)


def test_invalid_inputs_are_named():
    x = make_inputs()
    with pytest.raises(ValueError, match=r"label: values must be \+1"):
        compute_loss("dpo", LossInputs(**{**x.__dict__, "label": torch.tensor([1, 0, 1, 1, -1, -1])}))
    with pytest.raises(ValueError, match=r"equal, non-zero counts; got 4 preferred and 2 rejected"):
        compute_loss("dpo", LossInputs(**{**x.__dict__, "label": torch.tensor([1, 1, 1, 1, -1, -1])}))
    with pytest.raises(ValueError, match=r"ref_pred: required by loss 'dpo'"):
        compute_loss("dpo", LossInputs(**{**x.__dict__, "ref_pred": None}))
    with pytest.raises(ValueError, match=r"target: shape \(6, 4, 3, 2\) differs from model_pred"):
        compute_loss("sft", LossInputs(**{**x.__dict__, "target": torch.zeros(6, 4, 3, 2)}))
    with pytest.raises(ValueError, match=r"loss 'orpo' needs model_pred/target"):
        compute_loss("orpo", LossInputs(logratio=torch.zeros(6), label=x.label))
    with pytest.raises(ValueError, match=r"anchor_weight > 0 needs anchor samples"):
        compute_loss("popalign", x, anchor_weight=1.0)
    with pytest.raises(ValueError, match=r"embeddings: expected \[B, D\]"):
        compute_loss("rpo", LossInputs(**{**x.__dict__, "embeddings": torch.zeros(5, 3)}))


def test_defaults_are_documented_per_loss():
    assert loss_defaults("dpo")["beta"] == 5000.0 and loss_defaults("dpo")["scale"] == 0.5
    assert loss_defaults("popalign")["beta"] == 5000.0 and loss_defaults("popalign")["alpha"] == 0.5
    assert loss_defaults("dspo")["beta"] == 0.001
    assert loss_defaults("kto")["beta"] == 1000.0
    for name in LOSSES:
        cfg = loss_config(name)
        import dataclasses

        for f in dataclasses.fields(cfg):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


def test_flow_hparams_restate_an_unset_beta_for_velocity_errors():
    from popalign_core.train.losses import FLOW_RESTATED_BETA, flow_hparams

    for name in FLOW_RESTATED_BETA:
        out = flow_hparams(name, {"anchor_weight": 0.5}, 0.25)
        assert out == {"anchor_weight": 0.5, "beta": loss_defaults(name)["beta"] * 0.25}
        assert flow_hparams(name, {"beta": 7.0}, 0.25) == {"beta": 7.0}  # the user's beta is kept
    for name in set(LOSSES) - set(FLOW_RESTATED_BETA):  # sft, dspo, mapo, orpo: beta is not on error differences
        assert flow_hparams(name, {}, 0.25) == {}
    with pytest.raises(ValueError, match=r"beta_scale=0.0: expected E\[\(1 - sigma\)\^2\] in \(0, 1\]"):
        flow_hparams("dpo", {}, 0.0)
