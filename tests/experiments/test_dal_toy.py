"""The DAL acceptance run on the toy world (popalign_core.experiments.dal_toy): metrics by hand, a --quick run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from popalign_core.experiments import dal_toy as X


def test_tv_floor_binary_by_hand():
    # n = 2, t = 0.75: c ~ Bin(2, .75): P = .0625, .375, .5625 for c = 0, 1, 2; |c/2 - .75| = .75, .25, .25
    assert X.tv_floor(np.array([0.75, 0.25]), 2, np.random.default_rng(0)) == pytest.approx(
        0.0625 * 0.75 + 0.375 * 0.25 + 0.5625 * 0.25
    )
    assert math.isnan(X.tv_floor(np.array([0.5, 0.5]), 0, np.random.default_rng(0)))
    # K = 3 by Monte-Carlo against the exact sum over all compositions (n = 3)
    t = np.array([0.5, 0.3, 0.2])
    exact = 0.0
    for a in range(4):
        for b in range(4 - a):
            c = 3 - a - b
            pmf = math.factorial(3) / (math.factorial(a) * math.factorial(b) * math.factorial(c))
            pmf *= t[0] ** a * t[1] ** b * t[2] ** c
            exact += pmf * np.abs(np.array([a, b, c]) / 3 - t).sum() / 2
    assert X.tv_floor(t, 3, np.random.default_rng(0), draws=200_000) == pytest.approx(exact, abs=3e-3)


def test_target_errors_by_hand():
    # form: labels 0 = round, 1 = angular; -1 = no face (ignored)
    labels = {"judge": {"form": np.array([0, 0, 0, 1, -1])}, "smith": {"form": np.array([0, 1, 1, 1])}}
    out = X.target_errors(labels, {"form": [0.5, 0.5]}, seed=0)
    assert out["form"]["per_role"]["judge"]["error"] == pytest.approx(0.25)  # shares .75/.25
    assert out["form"]["per_role"]["smith"]["error"] == pytest.approx(0.25)
    assert out["form"]["mean"] == pytest.approx(0.25)
    assert out["form"]["per_role"]["judge"]["faces"] == 4
    floor4 = 0.0625 * 0.5 + 0.25 * 0.25 + 0.375 * 0 + 0.25 * 0.25 + 0.0625 * 0.5  # Bin(4, .5), |c/4 - .5|
    assert out["form"]["floor"] == pytest.approx(floor4)


def test_quick_run_writes_results(tmp_path, capsys):
    assert X.main(["--out", str(tmp_path / "q"), "--quick"]) == 0
    res = json.loads((tmp_path / "q" / "results.json").read_text())
    from popalign_core.common.fileio import foreign_entries

    assert foreign_entries(tmp_path / "q", X._outputs()) == []  # the declared layout covers every output
    assert set(res["target_error_mean"]) == {"form", "stature"}
    for key in ("target_error_floor", "target_error_mean_before"):
        assert set(res[key]) == {"form", "stature"}
    assert 0 <= res["identity_recall"] <= 1
    assert res["concept_accuracy_drop"] == pytest.approx(
        100 * (res["concept_accuracy_before"] - res["concept_accuracy_after"])
    )
    assert set(res["acceptance"]) == {"target_error_form<=0.05", "target_error_stature<=0.05",
                                      "identity_recall>=0.95", "concept_accuracy_drop<=3"}  # fmt: skip
    assert res["settings"]["eval"]["n_per_role"] == 16 and res["training"]["steps"] == 3
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["target_error_mean"] == res["target_error_mean"]
