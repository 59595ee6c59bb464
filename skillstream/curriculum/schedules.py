"""Learning-rate schedules as multipliers of the peak rate (what LambdaLR expects).

The DyLoRA-MoE public code returned absolute rates from a LambdaLR lambda, so the effective
rate became base x intended; these return factors in [0, 1] and are tested for that.
"""
from __future__ import annotations

import math

from ..config import TrainConfig


def warmup_stable_decay(step: int, *, warmup_steps: int, decay_start: int, decay_steps: int,
                        peak: float = 1.0, end: float = 0.0) -> float:
    """Warmup-stable-decay: `peak * (step + 1) / warmup_steps` while warming up, `peak` until
    `decay_start`, then linear from `peak` (at `decay_start`) to `end` (at `decay_start + decay_steps`),
    and `end` after it. A factor with the defaults; an absolute rate given absolute `peak` and `end`."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if step < decay_start:
        return peak
    return peak + (end - peak) * min(1.0, (step - decay_start) / max(1, decay_steps))


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
    decay_steps = int(cfg.decay_fraction * total)
    return warmup_stable_decay(step, warmup_steps=warm, decay_start=total - decay_steps, decay_steps=decay_steps,
                               end=floor)
