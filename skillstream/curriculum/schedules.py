"""Learning-rate schedules as multipliers of the peak rate (what LambdaLR expects).

The DyLoRA-MoE public code returned absolute rates from a LambdaLR lambda, so the effective
rate became base x intended; these return factors in [0, 1] and are tested for that.
"""
from __future__ import annotations

import math

from ..config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    total, warm, floor = max(cfg.steps, 1), cfg.warmup_steps, cfg.min_lr_ratio
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if cfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1.0 - (1 - floor) * progress
    # wsd: warmup, stable at the peak, then a linear decay over the last decay_fraction of steps
    decay_start = total - int(cfg.decay_fraction * total)
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - decay_start) / max(1, total - decay_start))
