"""PopAlign Section 5: population-level alignment of a skewed 1-D mixture of three Gaussians (paper Fig. 3).

Model (paper Eq. 12)::

    P_theta(x) = sum_{i=1..3} w_i N(x; mu_i, sigma_i^2),   w = softmax(logits),   sigma = exp(log_sigma)

with all nine parameters trainable, initialised at the reference
``P_ref: w_ref = softmax(1, 0, -1) ~ (0.665, 0.245, 0.090), mu_ref = (-7, 0, 7), sigma_ref = (1, 1, 1)``
(G1, G2, G3). G1/G3 play the biased attribute pair (G3 under-represented, w1:w3 = e^2 ~ 7.4); G2 plays unrelated
content that the preference data never shows.

Data (Section 5 of the PopAlign paper, as set up there):

* winning population: ``n_win`` samples balanced over G1/G3 (half from N(-7, 1), half from N(7, 1));
* losing population: ``n_lose`` samples from the reference mixture conditioned on G1 or G3 (so G1:G3 ~ 7.4:1,
  never G2);
* anchor set (only used with ``anchor_weight > 0``, prior preservation): ``n_anchor`` samples from the frozen
  reference over all three components, drawn once.

Training uses the exact per-sample log-likelihood ratio ``logratio = log P_theta(x) - log P_ref(x)`` (the 1-D
analogue of the per-step diffusion ratio in Eq. 11) fed to the project's loss zoo (`popalign_core.train.losses`):

* ``popalign``: Eq. 11, ``-log sigmoid(gamma * beta * (logratio - mu))`` with ``gamma = +1/-1`` for the
  winning/losing population and ``mu = alpha * mean_w + (1 - alpha) * mean_l`` of the batch (detached, App. A.3);
* ``sft``: maximum likelihood on the winners, ``-mean(logratio over winners)``;
* either plus ``anchor_weight * (-mean(anchor logratio))`` (maximum likelihood on reference samples).

Optimiser: Adam, full batch by default (the model has nine parameters; 2000 points cost microseconds).

CLI::

    python -m popalign_core.experiments.mog --loss popalign|sft [--anchor-weight X] [--steps N] [--lr LR]
        [--batch-size B] [--seed S] [--out DIR] [--plot PATH]

Progress goes to stderr; the last stdout line is one JSON object with at least ``weights`` and ``trajectory``
(``[[step, w1, w2, w3], ...]``, sampled at regular intervals, step 0 and the last step included).
See docs/mog.md for measured results and how they compare with the paper.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from popalign_core.common.fileio import (
    atomic_path,
    atomic_write_text,
    check_replaceable,
    claim_output_dir,
    png_software,
)
from popalign_core.common.userinput import ArgumentParser, command, integer, number
from popalign_core.train.losses import LossInputs, compute_loss

#: What `popalign mog` writes in its --out folder (`fileio.claim_output_dir`).
MOG_OUTPUTS = {"result_*.json": None, "mog_*.png": None}

SUPPORTED_LOSSES = ("popalign", "sft")

REF_LOGITS = (1.0, 0.0, -1.0)
REF_MEANS = (-7.0, 0.0, 7.0)
REF_SIGMAS = (1.0, 1.0, 1.0)
COMPONENT_NAMES = ("G1", "G2", "G3")

# Defaults (see docs/mog.md, "Defaults"): Adam at lr 0.01 moves each parameter by at most ~0.01 per step, so the
# logit gap of 2 between G1 and G3 is closed in a few hundred steps and the trajectory is sampled finely enough
# (every 10 steps) to see where it passes through balance; 3000 steps lets every run settle into its end state.
DEFAULT_STEPS = 3000
DEFAULT_LR = 0.01
DEFAULT_BETA = 0.5
DEFAULT_ALPHA = 0.5
DEFAULT_SEED = 0
DEFAULT_N_WIN = 1000
DEFAULT_N_LOSE = 1000
DEFAULT_N_ANCHOR = 1000
DEFAULT_TRAJECTORY_POINTS = 300
BALANCE_BAND = (0.8, 1.25)  # w1 / w3 counted as "balanced"
REGION_EDGE = 3.5  # |x| <= 3.5 is "the G2 region" (3.5 reference sigmas from G1 and G3)

DTYPE = torch.float64


class GaussianMixture1D(torch.nn.Module):
    """Trainable 1-D mixture of Gaussians, paper Eq. 12: ``sum_i softmax(logits)_i N(x; mu_i, exp(log_sigma_i)^2)``.

    The simplex constraint on the weights is the softmax; the positivity of sigma is the exp.
    """

    def __init__(self, logits, means, sigmas, dtype: torch.dtype = DTYPE):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=dtype).clone())
        self.means = torch.nn.Parameter(torch.as_tensor(means, dtype=dtype).clone())
        self.log_sigmas = torch.nn.Parameter(torch.as_tensor(sigmas, dtype=dtype).log().clone())
        if not (self.logits.shape == self.means.shape == self.log_sigmas.shape and self.logits.ndim == 1):
            raise ValueError("logits, means, sigmas: must be 1-D and of equal length")

    @classmethod
    def reference(cls) -> GaussianMixture1D:
        """The paper's P_ref: w = softmax(1, 0, -1), mu = (-7, 0, 7), sigma = (1, 1, 1)."""
        return cls(REF_LOGITS, REF_MEANS, REF_SIGMAS)

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)

    def sigmas(self) -> torch.Tensor:
        return self.log_sigmas.exp()

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """[N, K]: log w_k + log N(x; mu_k, sigma_k^2)."""
        x = x.to(self.means.dtype).reshape(-1, 1)
        z = (x - self.means) / self.sigmas()
        log_normal = -0.5 * z.square() - self.log_sigmas - 0.5 * math.log(2 * math.pi)
        return torch.log_softmax(self.logits, dim=0) + log_normal

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """[N]: log P_theta(x), exact (logsumexp over the components)."""
        return torch.logsumexp(self.component_log_prob(x), dim=1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, components=None) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples and their component ids; `components` restricts (and renormalises) the mixture to a subset."""
        w = self.weights().clone()
        if components is not None:
            mask = torch.zeros_like(w, dtype=torch.bool)
            mask[list(components)] = True
            w = torch.where(mask, w, torch.zeros_like(w))
        comp = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
        noise = torch.randn(n, generator=generator, dtype=w.dtype)
        return self.means[comp] + self.sigmas()[comp] * noise, comp

    @torch.no_grad()
    def region_mass(self, edge: float = REGION_EDGE) -> dict[str, float]:
        """P_theta(x < -edge), P_theta(|x| <= edge), P_theta(x > edge): where the mass is, whichever component has it.

        A component may migrate (e.g. G2's mean drifting towards G3), so the weights alone can hide that the mode at
        0 is gone; the middle mass measures what Fig. 3 shows.
        """
        lo = torch.special.ndtr((-edge - self.means) / self.sigmas())
        hi = torch.special.ndtr((edge - self.means) / self.sigmas())
        w = self.weights()
        return {
            "left": round(float((w * lo).sum()), 6),
            "middle": round(float((w * (hi - lo)).sum()), 6),
            "right": round(float((w * (1 - hi)).sum()), 6),
        }

    def state(self) -> dict:
        return {
            "weights": _floats(self.weights()),
            "means": _floats(self.means),
            "sigmas": _floats(self.sigmas()),
            "region_mass": self.region_mass(),
        }


@dataclass
class MoGData:
    """The Section 5 preference data. label is +1 (winning population) / -1 (losing); component is 0/1/2 (G1/G2/G3)."""

    x: torch.Tensor
    label: torch.Tensor
    component: torch.Tensor
    anchor_x: torch.Tensor
    anchor_component: torch.Tensor

    @property
    def winners(self) -> torch.Tensor:
        return self.x[self.label > 0]

    @property
    def losers(self) -> torch.Tensor:
        return self.x[self.label < 0]


def make_data(
    seed: int = DEFAULT_SEED,
    n_win: int = DEFAULT_N_WIN,
    n_lose: int = DEFAULT_N_LOSE,
    n_anchor: int = DEFAULT_N_ANCHOR,
) -> MoGData:
    """Section 5 data: winners balanced over G1/G3, losers from P_ref restricted to G1/G3, anchors from P_ref."""
    for name, value in (("n_win", n_win), ("n_lose", n_lose)):
        if value < 2:
            raise ValueError(f"{name}={value!r}: need at least 2 samples")
    if n_anchor < 0:
        raise ValueError(f"n_anchor={n_anchor!r}: must be >= 0")
    gen = torch.Generator().manual_seed(int(seed))
    ref = GaussianMixture1D.reference()
    half = n_win // 2
    win_comp = torch.cat([torch.zeros(half, dtype=torch.long), torch.full((n_win - half,), 2, dtype=torch.long)])
    win_x = ref.means.detach()[win_comp] + ref.sigmas().detach()[win_comp] * torch.randn(
        n_win, generator=gen, dtype=DTYPE
    )
    lose_x, lose_comp = ref.sample(n_lose, gen, components=(0, 2))
    anchor_x, anchor_comp = ref.sample(n_anchor, gen)
    label = torch.cat([torch.ones(n_win, dtype=DTYPE), -torch.ones(n_lose, dtype=DTYPE)])
    return MoGData(
        x=torch.cat([win_x, lose_x]),
        label=label,
        component=torch.cat([win_comp, lose_comp]),
        anchor_x=anchor_x,
        anchor_component=anchor_comp,
    )


def _floats(t: torch.Tensor, ndigits: int = 6) -> list[float]:
    return [round(float(v), ndigits) for v in t.detach().reshape(-1).tolist()]


def _check_args(loss: str, anchor_weight: float, steps: int, lr: float, batch_size: int | None, beta: float) -> None:
    if loss not in SUPPORTED_LOSSES:
        raise ValueError(f"loss={loss!r} is not supported; valid values: {', '.join(SUPPORTED_LOSSES)}")
    if not anchor_weight >= 0:
        raise ValueError(f"anchor_weight={anchor_weight!r}: must be >= 0")
    if steps < 1:
        raise ValueError(f"steps={steps!r}: must be >= 1")
    if not lr > 0:
        raise ValueError(f"lr={lr!r}: must be > 0")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be >= 1, or None/0 for full batch")
    if not beta > 0:
        raise ValueError(f"beta={beta!r}: must be > 0")


def _loss_fn(loss: str, beta: float, alpha: float, anchor_weight: float):
    kwargs: dict = {}
    if loss == "popalign":
        kwargs.update(beta=beta, alpha=alpha)
    if anchor_weight > 0:
        kwargs["anchor_weight"] = anchor_weight

    def fn(logratio, label, anchor_logratio):
        return compute_loss(
            loss, LossInputs(logratio=logratio, label=label, anchor_logratio=anchor_logratio), **kwargs
        )

    return fn


def stationary_weights(
    data: MoGData | None = None, beta: float = DEFAULT_BETA, alpha: float = DEFAULT_ALPHA
) -> tuple[float, float, float]:
    """Where plain PopAlign (Eq. 11, exact ratios, detached mu, no anchor) must end, idealising every x as lying
    cleanly in one component whose shape stays at the reference (see docs/mog.md, "Why it over-corrects").

    With g_k = log(w_k / w_ref,k) and Delta = g3 - g1, the normaliser is mu = a*g1 + b*g3 with
    a = alpha*n_w1/N_w + (1 - alpha)*n_l1/N_l and b = 1 - a, so g1 - mu = -b*Delta and g3 - mu = a*Delta. The logit
    gradient is C_k - w_k*C (C_k: sum of dLoss/dg over the samples of G_k, C = sum over all). No sample lies in G2,
    so C_2 = 0 and stationarity forces w2*C = 0; C = 0 would need C_1 = C_3 = 0, two equations for the one unknown
    Delta, so w2 -> 0 and w1 solves C_1*w3 = C_3*w1 with w3/w1 = (w_ref,3/w_ref,1)*exp(Delta). Returns (w1, 0, w3);
    the region masses (left, middle, right) of a converged run are the thing to compare with.
    """
    from scipy.optimize import brentq

    data = data if data is not None else make_data()
    win, lose = data.component[data.label > 0], data.component[data.label < 0]
    nw1, nw3 = int((win == 0).sum()), int((win == 2).sum())
    nl1, nl3 = int((lose == 0).sum()), int((lose == 2).sum())
    a = alpha * nw1 / (nw1 + nw3) + (1 - alpha) * nl1 / (nl1 + nl3)
    b = 1.0 - a
    log_ref_odds = REF_LOGITS[2] - REF_LOGITS[0]

    def sig(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    def residual(delta: float) -> float:
        d1, d3 = -b * delta, a * delta
        c1 = nw1 * sig(-beta * d1) - nl1 * sig(beta * d1)
        c3 = nw3 * sig(-beta * d3) - nl3 * sig(beta * d3)
        r = math.exp(delta + log_ref_odds)  # w3 / w1
        return c1 * r - c3

    delta = brentq(residual, -60.0, 60.0)
    r = math.exp(delta + log_ref_odds)
    return 1.0 / (1.0 + r), 0.0, r / (1.0 + r)


def _ratio(w: list[float]) -> float:
    return w[0] / w[2] if w[2] > 0 else math.inf


def run(
    loss: str = "popalign",
    anchor_weight: float = 0.0,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    batch_size: int | None = None,
    seed: int = DEFAULT_SEED,
    beta: float = DEFAULT_BETA,
    alpha: float = DEFAULT_ALPHA,
    n_win: int = DEFAULT_N_WIN,
    n_lose: int = DEFAULT_N_LOSE,
    n_anchor: int = DEFAULT_N_ANCHOR,
    trajectory_points: int = DEFAULT_TRAJECTORY_POINTS,
    plot: str | Path | None = None,
    verbose: bool = False,
) -> dict:
    """Train P_theta (Eq. 12, initialised at P_ref) with `loss` on the Section 5 data; return a JSON-able summary.

    batch_size: samples per population per step (minibatches of winners + losers, and as many anchors, drawn with a
    generator seeded by `seed`); None or 0 = full batch. The returned dict has ``weights``/``means``/``sigmas``
    (final), ``trajectory`` (``[[step, w1, w2, w3], ...]`` every ``ceil(steps / trajectory_points)`` steps, plus
    step 0 and `steps`), ``balance`` (``first_step``: first step with w1/w3 in BALANCE_BAND, checked every step, or
    None; ``closest_*``: the step where |log(w1/w3)| is smallest and the mixture there), ``final_ratio`` (w1/w3),
    ``final_loss`` and ``config``.
    """
    batch_size = batch_size or None
    _check_args(loss, anchor_weight, steps, lr, batch_size, beta)
    loss_fn = _loss_fn(loss, beta, alpha, anchor_weight)
    if anchor_weight > 0 and n_anchor < 1:
        raise ValueError(f"n_anchor={n_anchor!r}: must be >= 1 when anchor_weight > 0")
    data = make_data(seed, n_win, n_lose, n_anchor)

    ref = GaussianMixture1D.reference().requires_grad_(False)
    model = GaussianMixture1D.reference()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.no_grad():  # P_ref is frozen: its log-densities are computed once
        ref_logp = ref.log_prob(data.x)
        ref_anchor_logp = ref.log_prob(data.anchor_x)
    win_idx = torch.nonzero(data.label > 0).squeeze(1)
    lose_idx = torch.nonzero(data.label < 0).squeeze(1)
    batch_gen = torch.Generator().manual_seed(int(seed) + 1)

    def pick(idx: torch.Tensor) -> torch.Tensor:
        if batch_size is None or batch_size >= len(idx):
            return idx
        return idx[torch.randperm(len(idx), generator=batch_gen)[:batch_size]]

    record_every = max(1, math.ceil(steps / max(1, trajectory_points)))
    log_every = max(1, steps // 20)
    trajectory: list[list[float]] = []
    best = {"dist": math.inf}
    first_balanced: int | None = None
    last_loss = math.nan
    for step in range(steps + 1):
        with torch.no_grad():
            w = _floats(model.weights())
        ratio = _ratio(w)
        dist = abs(math.log(ratio)) if 0 < ratio < math.inf else math.inf
        if dist < best["dist"]:
            best = {"dist": dist, "step": step, "ratio": ratio, **model.state()}
        if first_balanced is None and BALANCE_BAND[0] <= ratio <= BALANCE_BAND[1]:
            first_balanced = step
        if step % record_every == 0 or step == steps:
            trajectory.append([step, *w])
        if step == steps:
            break

        idx = torch.cat([pick(win_idx), pick(lose_idx)])
        logratio = model.log_prob(data.x[idx]) - ref_logp[idx]
        anchor_logratio = None
        if anchor_weight > 0:
            a_idx = pick(torch.arange(len(data.anchor_x)))
            anchor_logratio = model.log_prob(data.anchor_x[a_idx]) - ref_anchor_logp[a_idx]
        out = loss_fn(logratio, data.label[idx], anchor_logratio)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        last_loss = float(out.loss.detach())
        if verbose and (step % log_every == 0 or step == steps - 1):
            print(
                f"[mog] {loss} step {step + 1}/{steps} loss {last_loss:.5f} "
                f"w {[round(v, 4) for v in _floats(model.weights())]}",
                file=sys.stderr,
            )

    final = model.state()
    result = {
        **final,
        "trajectory": trajectory,
        "final_ratio": round(_ratio(final["weights"]), 6),
        "final_loss": round(last_loss, 6),
        "balance": {
            "band": list(BALANCE_BAND),
            "first_step": first_balanced,
            "closest_step": best["step"],
            "closest_ratio": round(best["ratio"], 6),
            "closest_weights": best["weights"],
            "closest_means": best["means"],
            "closest_sigmas": best["sigmas"],
            "closest_region_mass": best["region_mass"],
        },
        "config": {
            "loss": loss,
            "anchor_weight": anchor_weight,
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "beta": beta,
            "alpha": alpha,
            "n_win": n_win,
            "n_lose": n_lose,
            "n_anchor": n_anchor if anchor_weight > 0 else 0,
            "optimizer": "adam",
        },
    }
    if plot:
        plot_result(result, data, plot)
        if verbose:
            print(f"[mog] wrote {plot}", file=sys.stderr)
    return result


def mixture_density(x, weights, means, sigmas):
    """Density of Eq. 12 at the points x (numpy, for plotting)."""
    import numpy as np

    x = np.asarray(x, dtype=float)[:, None]
    w, m, s = (np.asarray(v, dtype=float) for v in (weights, means, sigmas))
    return (w * np.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))).sum(axis=1)


def plot_result(result: dict, data: MoGData, path: str | Path, title: str | None = None) -> Path:
    """Fig. 3-style plot: reference vs trained density over the winning/losing histograms, and weights vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = result["config"]
    xs = np.linspace(-12, 12, 600)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.4, 1]})
    bins = np.linspace(-12, 12, 97)
    ax.hist(data.winners.numpy(), bins=bins, density=True, alpha=0.35, color="tab:green", label="winning data")
    ax.hist(data.losers.numpy(), bins=bins, density=True, alpha=0.35, color="tab:red", label="losing data")
    ax.plot(
        xs,
        mixture_density(xs, np.exp(REF_LOGITS) / np.exp(REF_LOGITS).sum(), REF_MEANS, REF_SIGMAS),
        "k--",
        lw=1.5,
        label="reference $P_{ref}$",
    )
    bal = result["balance"]
    distinct = max(abs(a - b) for a, b in zip(bal["closest_weights"], result["weights"])) > 0.02
    if bal["first_step"] is not None and distinct:
        ax.plot(
            xs,
            mixture_density(xs, bal["closest_weights"], bal["closest_means"], bal["closest_sigmas"]),
            color="tab:orange",
            lw=1.3,
            ls=":",
            label=f"trained, step {bal['closest_step']} (most balanced)",
        )
    ax.plot(
        xs,
        mixture_density(xs, result["weights"], result["means"], result["sigmas"]),
        color="tab:blue",
        lw=2,
        label=f"trained, step {cfg['steps']} (final)",
    )
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.legend(fontsize=7, loc="upper center")
    traj = np.asarray(result["trajectory"], dtype=float)
    for k, (name, color) in enumerate(zip(COMPONENT_NAMES, ("tab:purple", "tab:gray", "tab:cyan"))):
        bx.plot(traj[:, 0], traj[:, 1 + k], color=color, label=f"$w_{k + 1}$ ({name})")
    if bal["first_step"] is not None and distinct:
        bx.axvline(bal["closest_step"], color="tab:orange", ls=":", lw=1)
    bx.set_xlabel("step")
    bx.set_ylabel("mixture weight")
    bx.set_ylim(0, 1)
    bx.legend(fontsize=7)
    anchor = f", anchor {cfg['anchor_weight']:g}" if cfg["anchor_weight"] else ""
    w = ", ".join(f"{v:.3f}" for v in result["weights"])
    beta = f"beta {cfg['beta']:g}, " if cfg["loss"] == "popalign" else ""
    default_title = f"{cfg['loss']}{anchor} ({beta}lr {cfg['lr']:g}, seed {cfg['seed']}): final w = [{w}]"
    fig.suptitle(title or default_title, fontsize=10)
    fig.tight_layout()

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=72, format="png", metadata={"Software": "popalign mog"})
    plt.close(fig)
    return path


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="popalign mog",
        description="PopAlign Section 5: align a skewed 1-D mixture of three Gaussians (Fig. 3).",
    )
    p.add_argument("--loss", required=True, choices=SUPPORTED_LOSSES, help="training loss")
    p.add_argument("--anchor-weight", type=number, default=0.0, help="weight of the reference-sample anchor term")
    p.add_argument("--steps", type=integer, default=DEFAULT_STEPS, help=f"Adam steps (default {DEFAULT_STEPS})")
    p.add_argument("--lr", type=number, default=DEFAULT_LR, help=f"Adam learning rate (default {DEFAULT_LR})")
    p.add_argument("--batch-size", type=integer, default=0, help="samples per population per step; 0 = full batch")
    p.add_argument("--seed", type=integer, default=DEFAULT_SEED, help="data (and minibatch) seed")
    p.add_argument("--beta", type=number, default=DEFAULT_BETA, help=f"PopAlign beta (default {DEFAULT_BETA})")
    p.add_argument("--out", default="runs/mog", help="directory for result.json and the plot (default runs/mog)")
    p.add_argument("--plot", default=None, help="plot path (default OUT/mog_<loss>[_anchor<w>]_seed<S>.png)")
    return p


@command("popalign mog")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    tag = f"{args.loss}{f'_anchor{args.anchor_weight:g}' if args.anchor_weight else ''}_seed{args.seed}"
    plot = Path(args.plot) if args.plot else out / f"mog_{tag}.png"
    if not str(plot).lower().endswith(".png"):
        raise ValueError(f"--plot {str(plot)!r}: the plot is written as PNG; give a file name ending in .png")
    claim_output_dir(out, "mog", MOG_OUTPUTS)
    check_replaceable(plot, "popalign mog", lambda p: png_software(p) == "popalign mog", arg="--plot")
    result = run(
        loss=args.loss,
        anchor_weight=args.anchor_weight,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        beta=args.beta,
        plot=plot,
        verbose=True,
    )
    atomic_write_text(out / f"result_{tag}.json", json.dumps(result, indent=1))
    print(
        f"[mog] final w {result['weights']} (w1/w3 {result['final_ratio']:.3f}); balance {result['balance']}",
        file=sys.stderr,
    )
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
