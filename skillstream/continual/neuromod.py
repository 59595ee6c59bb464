"""Neuromodulation: one gain from normalised training signals, logged every step.

Each signal (NLL, token accuracy, gradient norm, prediction entropy) is z-scored against its own
running mean and variance (exponential moving averages), so the gain reacts to surprise rather
than to the signal's scale. The drive s = w_nll*z_nll - w_acc*z_acc + w_grad*z_grad + w_ent*z_ent
is positive when the model meets something harder than usual, and
    gain = scale ** tanh(s)        in [1/scale, scale], 1 when nothing is unusual.
Gamma-gated EWC reads the gain as the `neuromod/gain` signal (consolidate more what was learned
under high gain; ewc comes after neuromod in `plugins:`), and with `modulate_lr` the learning rate
is multiplied by gain ** lr_power.
"""
from __future__ import annotations

import math

from ..plugins import Plugin, StepContext

SIGNALS = {"nll": "loss", "accuracy": "lm/token_accuracy", "grad_norm": "grad_norm", "entropy": "lm/entropy"}


class RunningZ:
    """z-score against an exponential moving mean/variance (no z until `warmup` updates).

    The spread is floored at `rel_floor` of the mean's size, so a signal that barely moves (a
    loss flat to the third decimal) does not turn its noise into large z-scores.
    """

    def __init__(self, momentum: float = 0.9, warmup: int = 3, rel_floor: float = 0.05):
        self.momentum, self.warmup, self.rel_floor = momentum, warmup, rel_floor
        self.mean, self.var, self.n = 0.0, 1.0, 0

    def update(self, x: float) -> float:
        spread = max(math.sqrt(self.var), self.rel_floor * abs(self.mean), 1e-6)
        z = 0.0 if self.n < self.warmup else (x - self.mean) / spread
        if self.n == 0:
            self.mean, self.var = x, 1e-4
        else:
            d = x - self.mean
            self.mean += (1 - self.momentum) * d
            self.var = self.momentum * (self.var + (1 - self.momentum) * d * d)
        self.n += 1
        return max(-5.0, min(5.0, z))


class Neuromodulation(Plugin):
    name = "neuromod"

    def __init__(self, scale: float = 3.0, weights: dict | None = None, momentum: float = 0.9,
                 modulate_lr: bool = False, lr_power: float = 0.5, **context):
        self.scale, self.modulate_lr, self.lr_power = scale, modulate_lr, lr_power
        self.weights = {"nll": 1.0, "accuracy": 0.5, "grad_norm": 0.5, "entropy": 0.5, **(weights or {})}
        self.z = {k: RunningZ(momentum) for k in SIGNALS}
        self.gain = 1.0

    def lr_scale(self, ctx: StepContext) -> float:
        return self.gain ** self.lr_power if self.modulate_lr else 1.0

    def after_step(self, ctx: StepContext, metrics: dict) -> dict:
        drive = 0.0
        for name, key in SIGNALS.items():
            if key in metrics:
                z = self.z[name].update(float(metrics[key]))
                drive += self.weights[name] * (-z if name == "accuracy" else z)
        self.gain = self.scale ** math.tanh(drive)
        ctx.signals.publish("neuromod/gain", self.gain)
        return {"neuromod/gain": self.gain, "neuromod/drive": drive}

    def state_dict(self) -> dict:
        return {"gain": self.gain, "z": {k: [z.mean, z.var, z.n] for k, z in self.z.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.gain = state.get("gain", 1.0)
        for k, (mean, var, n) in state.get("z", {}).items():
            self.z[k].mean, self.z[k].var, self.z[k].n = mean, var, n
