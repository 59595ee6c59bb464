"""The calibrated reuse decider: a MAP logistic fit of reuse outcomes, checked against a fit done by
hand with torch's L-BFGS on a fixed history, its UCB exploration and its prequential calibration."""
from __future__ import annotations

import math

import pytest
import torch

from skillstream.experts.calibration import FEATURES, ReuseCalibrator, features

WEIGHTS = {"embedding": 0.4, "gradient": 0.4, "context": 0.2}

# (similarity components, router entropy, outcome): reuses of close experts mostly succeed, far ones fail
HISTORY = [
    ({"embedding": 0.95, "gradient": 0.90, "context": 0.97}, 0.10, 1),
    ({"embedding": 0.91, "gradient": 0.70, "context": 0.95}, 0.30, 1),
    ({"embedding": 0.88, "gradient": 0.85, "context": 0.80}, 0.20, 1),
    ({"embedding": 0.86, "gradient": 0.40, "context": 0.90}, 0.60, 0),
    ({"embedding": 0.70, "gradient": 0.60, "context": 0.70}, 0.50, 0),
    ({"embedding": 0.60, "gradient": 0.20, "context": 0.85}, 0.80, 0),
    ({"embedding": 0.93, "gradient": 0.95, "context": 0.60}, 0.05, 1),
    ({"embedding": 0.80, "gradient": 0.80, "context": 0.90}, 0.40, 1),
    ({"embedding": 0.75, "gradient": 0.30, "context": 0.95}, 0.70, 0),
    ({"embedding": 0.90, "gradient": 0.50, "context": 0.50}, 0.35, 0),
]


def calibrator(**kw) -> ReuseCalibrator:
    return ReuseCalibrator.from_threshold(0.8, WEIGHTS, 20.0, **{"prior_precision": 0.5, **kw})


def lbfgs_fit(x: torch.Tensor, y: torch.Tensor, prior: torch.Tensor, precision: float) -> torch.Tensor:
    """The same MAP objective minimised by a different method: torch's L-BFGS on the negative log posterior."""
    w = prior.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w
        nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        loss = nll + precision / 2 * ((w - prior) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def test_the_fit_matches_a_logistic_fit_done_by_hand():
    cal = calibrator()
    for comps, entropy, y in HISTORY:
        x = features(comps, entropy)
        cal.record(x, bool(y), cal.probability(x))
    x = torch.tensor([features(c, e) for c, e, _ in HISTORY], dtype=torch.float64)
    y = torch.tensor([float(o) for _, _, o in HISTORY], dtype=torch.float64)
    expected = lbfgs_fit(x, y, torch.tensor(cal.prior_mean, dtype=torch.float64), 0.5)
    assert cal.weights == pytest.approx(expected.tolist(), abs=1e-6)
    probe = features({"embedding": 0.85, "gradient": 0.6, "context": 0.9}, 0.3)
    assert cal.probability(probe) == pytest.approx(float(torch.sigmoid(torch.tensor(probe, dtype=torch.float64) @ expected)),
                                                   abs=1e-9)


def test_without_outcomes_it_decides_as_the_threshold_rule():
    cal = calibrator()
    assert len(cal.prior_mean) == len(FEATURES)
    for comps in ({"embedding": 0.9, "gradient": 0.85, "context": 0.8},    # weighted 0.86 >= 0.8
                  {"embedding": 0.7, "gradient": 0.75, "context": 0.9}):   # weighted 0.76 < 0.8
        weighted = sum(WEIGHTS[k] * v for k, v in comps.items())
        p = cal.probability(features(comps, 0.2))
        assert (p >= 0.5) == (weighted >= 0.8)
        assert p == pytest.approx(1 / (1 + math.exp(-20 * (weighted - 0.8))))


def test_ucb_explores_while_outcomes_are_few_then_stops():
    cal = calibrator(explore=1.0, explore_outcomes=3)
    far = features({"embedding": 0.7, "gradient": 0.75, "context": 0.9}, 0.2)   # the threshold says: create
    assert cal.probability(far) < 0.5 <= cal.upper(far)  # unsure: optimistic enough to try the reuse
    for comps, entropy, y in HISTORY[:3]:
        x = features(comps, entropy)
        cal.record(x, bool(y), cal.probability(x))
    assert not cal.exploring() and cal.upper(far) == cal.probability(far)


def test_calibration_is_scored_with_the_probabilities_given_at_decision_time():
    cal = calibrator()
    given = []
    for comps, entropy, y in HISTORY:
        x = features(comps, entropy)
        given.append((cal.probability(x), y))
        cal.record(x, bool(y), given[-1][0])
    report = cal.calibration(bins=2)
    assert report["outcomes"] == 10 and report["successes"] == 5
    assert report["brier"] == pytest.approx(sum((p - y) ** 2 for p, y in given) / 10)
    low = [(p, y) for p, y in given if p < 0.5]
    assert report["reliability"][0]["n"] == len(low)
    assert report["reliability"][0]["observed"] == pytest.approx(sum(y for _, y in low) / len(low))
    assert sum(b["n"] for b in report["reliability"]) == 10
    restored = calibrator()
    restored.load_state_dict(cal.state_dict())
    assert restored.weights == cal.weights and restored.calibration() == cal.calibration()
