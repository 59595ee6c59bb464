"""The calibrated reuse decider: P(reusing this expert succeeds) learned from the outcomes of past decisions.

The Adaptive Learner's playbook (phase 3) replaces a fixed similarity threshold by a learned
calibrator of p_reuse with UCB exploration. Here p_reuse is a logistic model over

    x = (1, embedding similarity, gradient similarity, context similarity, router entropy)

(the chunk against one expert's profile; entropy 0 while the router has one expert), fitted online
on outcomes the stream produces itself (skillstream/experts/lifecycle.py):

- after a reuse of expert E: did the round raise E's loss on its own held-out examples by more
  than `harm_tolerance` (relative)?  raised -> 0 (a failed reuse), else 1;
- after a create (best old expert B): did the new expert beat reuse, i.e. is its held-out loss on
  its new examples below B's on the same examples by more than `harm_tolerance`?  yes -> 0 (reusing
  B would have failed), else 1.

The fit is the maximum a posteriori weights under a Gaussian prior N(w0, I / prior_precision)
(Newton's method / IRLS: the problem is 5-dimensional and strictly convex, so a few exact steps
converge; no library in the dependencies fits a logistic model with a non-zero prior mean). The prior
mean is the threshold rule written as a logistic model, w0 = slope * (-similarity_threshold,
w_embedding, w_gradient, w_context, 0): with no outcome the decider decides as the threshold does.
Exploration: while fewer than `explore_outcomes` outcomes exist, a candidate's logit gets a bonus of
`explore` standard deviations of its Laplace-approximate posterior (sqrt(x^T H^-1 x)), the UCB score:
an expert whose reuse the model is unsure of is tried, which produces the outcome that settles it.

Calibration is measured prequentially: each outcome is scored with the probability the decider
gave at decision time (before it knew the outcome): Brier score and a reliability curve by bins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FEATURES = ("bias", "embedding", "gradient", "context", "entropy")


def features(components: dict[str, float], entropy: float | None) -> list[float]:
    """The logistic model's input for one (chunk, expert) pair."""
    return [1.0, components["embedding"], components["gradient"], components["context"],
            0.0 if entropy is None else float(entropy)]


def fit_map(x: torch.Tensor, y: torch.Tensor, prior_mean: torch.Tensor, precision: float,
            iterations: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, Hessian) of the MAP logistic regression: minimise
    sum_i log(1 + exp(x_i w)) - y_i x_i w + precision / 2 * |w - prior_mean|^2, by Newton steps."""
    w = prior_mean.clone().double()
    x, y, m = x.double(), y.double(), prior_mean.double()
    eye = torch.eye(len(w), dtype=torch.float64) * precision
    hessian = eye.clone()
    for _ in range(iterations):
        p = torch.sigmoid(x @ w) if len(x) else torch.zeros(0, dtype=torch.float64)
        grad = x.T @ (p - y) + precision * (w - m)
        hessian = x.T @ (x * (p * (1 - p)).unsqueeze(1)) + eye
        step = torch.linalg.solve(hessian, grad)
        w = w - step
        if float(step.abs().max()) < 1e-12:
            break
    p = torch.sigmoid(x @ w) if len(x) else torch.zeros(0, dtype=torch.float64)
    hessian = x.T @ (x * (p * (1 - p)).unsqueeze(1)) + eye
    return w, hessian


@dataclass
class ReuseCalibrator:
    prior_mean: list[float]
    prior_precision: float = 1.0
    explore: float = 1.0
    explore_outcomes: int = 10
    outcomes: list[dict] = field(default_factory=list)  # {"x", "y", "p"}: input, outcome, probability at decision
    weights: list[float] | None = None                  # fitted (None: nothing fitted yet)
    hessian: torch.Tensor | None = field(default=None, repr=False)  # of the last fit (the posterior's precision)

    @classmethod
    def from_threshold(cls, similarity_threshold: float, weights: dict[str, float], slope: float, **kw) -> "ReuseCalibrator":
        prior = [-slope * similarity_threshold, slope * weights["embedding"], slope * weights["gradient"],
                 slope * weights["context"], 0.0]
        return cls(prior_mean=prior, **kw)

    def _fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor([o["x"] for o in self.outcomes], dtype=torch.float64).reshape(-1, len(FEATURES))
        y = torch.tensor([float(o["y"]) for o in self.outcomes], dtype=torch.float64)
        return fit_map(x, y, torch.tensor(self.prior_mean, dtype=torch.float64), self.prior_precision)

    def refit(self) -> None:
        w, self.hessian = self._fit()
        self.weights = w.tolist()

    def _posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hessian is None or self.weights is None:
            self.refit()
        return torch.tensor(self.weights, dtype=torch.float64), self.hessian

    def logit(self, x: list[float]) -> tuple[float, float]:
        """(mean logit, its posterior standard deviation) for input x."""
        w, h = self._posterior()
        v = torch.tensor(x, dtype=torch.float64)
        return float(v @ w), math.sqrt(max(0.0, float(v @ torch.linalg.solve(h, v))))

    def probability(self, x: list[float]) -> float:
        return 1.0 / (1.0 + math.exp(-self.logit(x)[0]))

    def exploring(self) -> bool:
        return self.explore > 0 and len(self.outcomes) < self.explore_outcomes

    def upper(self, x: list[float]) -> float:
        """The UCB score: the probability with the exploration bonus while outcomes are few."""
        mean, sd = self.logit(x)
        bonus = self.explore * sd if self.exploring() else 0.0
        return 1.0 / (1.0 + math.exp(-(mean + bonus)))

    def record(self, x: list[float], y: bool, p: float) -> None:
        """An outcome, with the probability the decider gave it at decision time; the model is refit."""
        self.outcomes.append({"x": [float(v) for v in x], "y": int(bool(y)), "p": float(p)})
        self.refit()

    def calibration(self, bins: int = 5) -> dict:
        """Prequential calibration of the decisions so far: Brier score and a reliability curve."""
        n = len(self.outcomes)
        curve = []
        for b in range(bins):
            lo, hi = b / bins, (b + 1) / bins
            inside = [o for o in self.outcomes if lo <= o["p"] < hi or (b == bins - 1 and o["p"] == 1.0)]
            if inside:
                curve.append({"bin": [lo, hi], "n": len(inside),
                              "mean_predicted": sum(o["p"] for o in inside) / len(inside),
                              "observed": sum(o["y"] for o in inside) / len(inside)})
        return {"outcomes": n, "brier": sum((o["p"] - o["y"]) ** 2 for o in self.outcomes) / n if n else None,
                "reliability": curve, "weights": dict(zip(FEATURES, self.weights or self.prior_mean)),
                "successes": sum(o["y"] for o in self.outcomes)}

    def state_dict(self) -> dict:
        return {"outcomes": [dict(o) for o in self.outcomes]}

    def load_state_dict(self, state: dict) -> None:
        self.outcomes = [dict(o) for o in state.get("outcomes", [])]
        self.refit()
