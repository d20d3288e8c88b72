"""PopAlign Section 5 (1-D mixture of three Gaussians): model, data, CLI and the measured behaviour of each loss.

Behavioural thresholds are what the implementation shows (docs/mog.md, seeds 0-4), not the paper's picture. To keep
the file fast, runs stop once the asserted state is reached rather than at the 3000-step default: the anchored run
has converged (to 6 decimals) by step 500, plain PopAlign has passed balance by step ~200 and settled on the
over-corrected side by step ~1000, and SFT's w2 is below 0.02 by step 800 (it keeps decaying towards 0).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from popalign_core.experiments import mog

REF_W = torch.softmax(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64), dim=0)


@pytest.fixture(scope="module")
def popalign_run():
    return mog.run(loss="popalign", steps=1200)


@pytest.fixture(scope="module")
def sft_run():
    return mog.run(loss="sft", steps=800)


@pytest.fixture(scope="module")
def anchored_run():
    return mog.run(loss="popalign", anchor_weight=0.1, steps=500)


def _ratio(row):
    return row[1] / row[3]


# ------------------------------------------------------------------------------------------------ model and data
def test_reference_model_matches_paper():
    ref = mog.GaussianMixture1D.reference()
    torch.testing.assert_close(ref.weights().detach(), REF_W)
    torch.testing.assert_close(ref.means.detach(), torch.tensor([-7.0, 0.0, 7.0], dtype=torch.float64))
    torch.testing.assert_close(ref.sigmas().detach(), torch.ones(3, dtype=torch.float64))
    assert sum(p.numel() for p in ref.parameters() if p.requires_grad) == 9


def test_log_prob_is_exact_mixture_density():
    model = mog.GaussianMixture1D([0.3, -0.2, 0.5], [-2.0, 0.5, 3.0], [0.7, 1.3, 2.0])
    x = torch.linspace(-6, 6, 25, dtype=torch.float64)
    w = model.weights().detach()
    dens = sum(
        w[k] * torch.distributions.Normal(model.means[k].detach(), model.sigmas()[k].detach()).log_prob(x).exp()
        for k in range(3)
    )
    torch.testing.assert_close(model.log_prob(x).detach(), dens.log())
    np_dens = mog.mixture_density(x.numpy(), w.numpy(), model.means.detach().numpy(), model.sigmas().detach().numpy())
    torch.testing.assert_close(torch.from_numpy(np_dens), dens)


def test_data_has_no_g2_samples_and_the_right_balance():
    for seed in range(3):
        data = mog.make_data(seed)
        assert data.x.shape == (2000,) and data.label.shape == (2000,)
        assert set(data.component.tolist()) <= {0, 2}, "preference data must not contain G2 samples"
        win, lose = data.component[data.label > 0], data.component[data.label < 0]
        assert len(win) == len(lose) == 1000
        assert int((win == 0).sum()) == int((win == 2).sum()) == 500
        # losers: reference restricted to G1/G3, P(G1) = e / (e + 1/e) ~ 0.881 (binomial sd ~ 0.01)
        assert abs(float((lose == 0).float().mean()) - math.e / (math.e + 1 / math.e)) < 0.04
        # each sample lies on its own component's side
        sign = torch.where(data.component == 0, -1.0, 1.0).to(data.x.dtype)
        assert bool((sign * data.x > 0).all())
        # the anchor set comes from the full reference, G2 included
        assert data.anchor_x.shape == (1000,)
        assert abs(float((data.anchor_component == 1).float().mean()) - float(REF_W[1])) < 0.06
    assert float(mog.make_data(0).x.abs().min()) > 3.5  # the default data set is far from G2 altogether


def test_data_is_seeded():
    a, b, c = mog.make_data(0), mog.make_data(0), mog.make_data(1)
    assert torch.equal(a.x, b.x) and torch.equal(a.anchor_x, b.anchor_x)
    assert not torch.equal(a.x, c.x)


def test_initial_weights_and_trajectory_format():
    r = mog.run(loss="popalign", steps=7, trajectory_points=3)
    steps = [row[0] for row in r["trajectory"]]
    assert steps[0] == 0 and steps[-1] == 7 and steps == sorted(steps)
    torch.testing.assert_close(torch.tensor(r["trajectory"][0][1:], dtype=torch.float64), REF_W, atol=1e-6, rtol=0)
    assert all(len(row) == 4 and abs(sum(row[1:]) - 1) < 1e-5 for row in r["trajectory"])
    json.dumps(r)  # JSON-able


def test_minibatch_and_determinism():
    a = mog.run(loss="popalign", steps=5, batch_size=64, seed=3)
    b = mog.run(loss="popalign", steps=5, batch_size=64, seed=3)
    assert a["weights"] == b["weights"] and a["config"]["batch_size"] == 64
    assert a["weights"] != mog.run(loss="popalign", steps=5, seed=3)["weights"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"loss": "dpo"}, "loss"),
        ({"anchor_weight": -1.0}, "anchor_weight"),
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": -2}, "batch_size"),
        ({"beta": -0.5}, "beta"),
    ],
)
def test_invalid_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mog.run(**kwargs)


def test_invalid_loss_lists_valid_values():
    with pytest.raises(ValueError, match="popalign, sft"):
        mog.run(loss="kto")


def test_cli_invalid_loss_names_the_argument(capsys):
    assert mog.main(["--loss", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("popalign mog: error: argument --loss: invalid choice")
    assert "--loss" in err and "popalign" in err and "sft" in err


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_last_stdout_line_is_json(tmp_path):
    plot = tmp_path / "fig.png"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "popalign_core.experiments.mog", "--loss", "sft", "--steps", "20", "--out",
         str(tmp_path), "--plot", str(plot)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    assert {"weights", "trajectory", "means", "sigmas"} <= set(out)
    assert len(out["weights"]) == 3
    assert out["trajectory"][0][0] == 0 and out["trajectory"][-1][0] == 20
    assert plot.stat().st_size > 1000
    assert (tmp_path / "result_sft_seed0.json").exists()
    assert "[mog]" in proc.stderr  # progress goes to stderr


# ------------------------------------------------------------------------------------------------ behaviour (Sec. 5)
def test_sft_collapses_g2(sft_run):
    w = sft_run["weights"]
    assert w[1] < 0.05, w
    assert 0.8 <= w[0] / w[2] <= 1.25, w  # SFT also balances G1/G3 (Fig. 3 right)
    assert sft_run["region_mass"]["middle"] < 0.05


def test_popalign_passes_through_balance_with_g2_alive(popalign_run):
    # Default seed 0 (also seeds 1, 2; for seeds 3, 4 w2 has already fallen to ~0.1 at balance, see docs/mog.md).
    hits = [row for row in popalign_run["trajectory"] if 0.8 <= _ratio(row) <= 1.25 and row[2] >= 0.2]
    assert hits, popalign_run["trajectory"][:40]
    assert popalign_run["balance"]["first_step"] is not None


def test_popalign_without_anchor_over_corrects(popalign_run):
    # What this implementation shows (not the paper's claim): past balance, plain PopAlign keeps moving mass to G3
    # (the stationary point of Eq. 11 with exact ratios has w3/w1 ~ e^(2/beta - 2) = e^2 at beta = 0.5).
    w = popalign_run["weights"]
    assert w[2] > 0.6 and w[0] / w[2] < 0.5, w
    assert w[1] < 0.2, w


def test_popalign_ends_where_the_stationarity_analysis_says(popalign_run):
    w1, w2, w3 = mog.stationary_weights(mog.make_data(0), beta=0.5)
    assert w2 == 0.0 and 0.12 < w1 < 0.18
    mass = popalign_run["region_mass"]
    assert abs(mass["left"] - w1) < 0.02 and abs(mass["right"] - w3) < 0.03, (mass, w1)
    assert mass["middle"] < 0.05  # the G2 mode at 0 is gone (the G2 component, if alive, sits near G3)
    # beta = 1 would end balanced; beta = 2 under-corrects
    assert 0.45 < mog.stationary_weights(mog.make_data(0), beta=1.0)[0] < 0.55
    assert mog.stationary_weights(mog.make_data(0), beta=2.0)[0] > 0.7


def test_anchored_popalign_ends_balanced_and_keeps_g2(anchored_run):
    w = anchored_run["weights"]
    assert 0.8 <= w[0] / w[2] <= 1.25, w
    assert abs(w[1] - 0.245) <= 0.2 * 0.245, w
    assert abs(anchored_run["means"][1]) < 0.5  # G2 stays where it was
    assert abs(anchored_run["region_mass"]["middle"] - 0.245) <= 0.2 * 0.245


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_other_seeds(seed):
    """What holds for every data seed: plain PopAlign crosses balance; anchored PopAlign keeps G2 and ends near
    (not always inside [0.8, 1.25]: 1.21-1.36 over seeds 0-4) balance."""
    plain = mog.run(loss="popalign", steps=300, seed=seed)
    assert 100 <= plain["balance"]["first_step"] <= 200
    anchored = mog.run(loss="popalign", anchor_weight=0.1, steps=500, seed=seed)
    w = anchored["weights"]
    assert 0.8 <= w[0] / w[2] <= 1.4, w
    assert abs(w[1] - 0.245) <= 0.2 * 0.245, w
    assert abs(anchored["region_mass"]["middle"] - 0.245) <= 0.2 * 0.245
