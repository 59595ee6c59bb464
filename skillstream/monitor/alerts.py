"""The training monitor: alerts on what goes wrong, per-layer firing rates, and (for spiking
models) the firing-rate regulariser. A plugin, usable by every recipe::

    plugins:
      - {name: monitor, loss_max: 10, grad_norm_max: 100, firing_rate_max: 0.5, on_critical: stop}

Each check runs on every optimizer step; an alert is a line of ``alerts.jsonl`` (``step``,
``severity``, ``kind``, ``message``), a line on stderr, and shows in ``skillstream monitor``:

==================  =========  ==============================================================
kind                severity   when
==================  =========  ==============================================================
``nan_loss``        critical   the loss is NaN or infinite
``nan_grad``        critical   the gradient norm is NaN or infinite
``loss_high``       critical   loss > ``loss_max``
``loss_spike``      warning    loss > ``spike_factor`` x the mean of the last ``spike_window`` losses
``grad_explosion``  warning    gradient norm > ``grad_norm_max``
``dead_layer``      critical   a layer's firing rate is exactly 0 (no neuron fired in the step's
                               micro-batches: the network sends no gradient into that block)
``saturation``      warning    a layer's firing rate > ``firing_rate_max``
``loss_plateau``    warning    the best loss of the last ``plateau_window`` steps is not
                               ``plateau_min_delta`` (relative) below the best before them
==================  =========  ==============================================================

The same kind is not raised again within ``cooldown`` steps (a dead network would otherwise
write one line per step). ``on_critical: stop`` ends the run at the first critical alert (after
writing it: exit status 2 and one line naming it; the checkpoints written before it stay, so
``--resume`` restarts from the last one -- the roll-back); ``continue`` only records it.

Firing rates come from models that expose ``last_firing_rates`` (one float per layer, the mean
over the forward's neurons and positions; :class:`skillstream.models.bdh_lm.BDHForCausalLM` for
``bdh-spiking``); they are averaged over the step's micro-batches and logged as
``firing_rate/<layer>``. With ``rate_weight > 0`` the plugin's ``loss_term`` adds
``rate_weight * mean_layers (rate - target_rate)^2`` (through the surrogate gradient).
"""
from __future__ import annotations

import math
import sys
from collections import deque

import torch

from ..errors import UserError
from ..plugins import Plugin, StepContext

KINDS = ("nan_loss", "nan_grad", "loss_high", "loss_spike", "grad_explosion", "dead_layer", "saturation",
         "loss_plateau")


def _unwrap(model):
    return getattr(model, "module", model)


class Monitor(Plugin):
    name = "monitor"

    def __init__(self, loss_max: float = 10.0, grad_norm_max: float = 100.0, firing_rate_max: float = 0.5,
                 spike_factor: float = 2.0, spike_window: int = 20, plateau_window: int = 500,
                 plateau_min_delta: float = 0.01, cooldown: int = 50, on_critical: str = "continue",
                 rate_weight: float = 0.0, target_rate: float = 0.1, **context):
        if on_critical not in ("continue", "stop"):
            raise UserError(f"monitor.on_critical {on_critical!r}: expected 'continue' or 'stop'")
        self.loss_max, self.grad_norm_max, self.firing_rate_max = loss_max, grad_norm_max, firing_rate_max
        self.spike_factor, self.spike_window = spike_factor, spike_window
        self.plateau_window, self.plateau_min_delta = plateau_window, plateau_min_delta
        self.cooldown, self.on_critical = cooldown, on_critical
        self.rate_weight, self.target_rate = rate_weight, target_rate
        self.losses: deque = deque(maxlen=max(spike_window, 1))
        self.history: list[float] = []          # every step's loss of the current stage (plateau check)
        self.last_raised: dict[str, int] = {}   # kind -> global step it was last raised
        self.global_step = 0
        self.halted = False
        self.counts: dict[str, int] = {}
        self._rates_sum: list[float] | None = None
        self._rates_n = 0

    # -- hooks ----------------------------------------------------------------------------------
    def before_stage(self, ctx: StepContext) -> None:
        run_dir = ctx.extras.get("run_dir")
        acc = ctx.extras.get("accelerator")
        if run_dir is not None and (acc is None or acc.is_main_process):
            from .metrics_log import ALERTS
            (run_dir / ALERTS).touch()  # present and empty when nothing went wrong
        self.losses.clear()
        self.history = []
        self.halted = False  # a resumed run starts again from its last checkpoint

    def loss_term(self, ctx: StepContext, batch: dict, outputs) -> torch.Tensor | None:
        model = _unwrap(ctx.model)
        bdh = getattr(model, "bdh", None)
        rates = getattr(model, "last_firing_rates", None)
        if rates is None:
            return None
        self._rates_sum = [a + b for a, b in zip(self._rates_sum, rates)] if self._rates_sum else list(rates)
        self._rates_n += 1
        if self.rate_weight > 0 and bdh is not None and hasattr(bdh, "firing_rate_loss"):
            return self.rate_weight * bdh.firing_rate_loss(self.target_rate)
        return None

    def after_step(self, ctx: StepContext, metrics: dict) -> dict | None:
        self.global_step += 1
        out = {}
        rates = None
        if self._rates_sum is not None:
            rates = [r / self._rates_n for r in self._rates_sum]
            out = {f"firing_rate/{i}": r for i, r in enumerate(rates)}
            out["firing_rate/mean"] = sum(rates) / len(rates)
            self._rates_sum, self._rates_n = None, 0
        self.check(ctx, metrics.get("loss"), metrics.get("grad_norm"), rates)
        return out

    def state_dict(self) -> dict:
        return {"last_raised": self.last_raised, "global_step": self.global_step, "halted": self.halted,
                "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        self.last_raised = dict(state.get("last_raised", {}))
        self.global_step = state.get("global_step", 0)
        self.halted = state.get("halted", False)
        self.counts = dict(state.get("counts", {}))

    # -- checks ---------------------------------------------------------------------------------
    def check(self, ctx: StepContext, loss: float | None, grad_norm: float | None,
              rates: list[float] | None) -> list[str]:
        """Run every check on one step's numbers; returns the kinds raised."""
        raised = []

        def alert(severity: str, kind: str, message: str):
            last = self.last_raised.get(kind)
            if last is not None and self.global_step - last < self.cooldown:
                return
            self.last_raised[kind] = self.global_step
            self.counts[kind] = self.counts.get(kind, 0) + 1
            ctx.alert(severity, kind, message)
            print(f"[{severity}] {kind} at step {ctx.step} of stage {ctx.stage!r}: {message}", file=sys.stderr,
                  flush=True)
            raised.append(kind)
            if severity == "critical" and self.on_critical == "stop":
                self.halted = True

        if loss is not None:
            loss = float(loss)
            if not math.isfinite(loss):
                alert("critical", "nan_loss", f"loss is {loss}")
            else:
                if loss > self.loss_max:
                    alert("critical", "loss_high", f"loss {loss:.3f} > {self.loss_max}")
                if len(self.losses) >= min(5, self.losses.maxlen):
                    mean = sum(self.losses) / len(self.losses)
                    if loss > self.spike_factor * mean:
                        alert("warning", "loss_spike", f"loss {loss:.3f} > {self.spike_factor} x recent mean {mean:.3f}")
                self.losses.append(loss)
                self.history.append(loss)
                w = self.plateau_window
                if w and len(self.history) >= 2 * w and len(self.history) % w == 0:
                    before, recent = min(self.history[:-w]), min(self.history[-w:])
                    if recent > before * (1 - self.plateau_min_delta):
                        alert("warning", "loss_plateau",
                              f"best loss of the last {w} steps {recent:.4f} is not {self.plateau_min_delta:.0%} "
                              f"below the best before them {before:.4f}")
        if grad_norm is not None:
            g = float(grad_norm)
            if not math.isfinite(g):
                alert("critical", "nan_grad", f"gradient norm is {g}")
            elif g > self.grad_norm_max:
                alert("warning", "grad_explosion", f"gradient norm {g:.2f} > {self.grad_norm_max}")
        if rates is not None:
            dead = [i for i, r in enumerate(rates) if r == 0.0]
            if dead:
                alert("critical", "dead_layer", f"firing rate exactly 0 in layer(s) {dead}: no neuron fired, "
                      "no gradient reaches those blocks")
            hot = [f"{i}: {r:.3f}" for i, r in enumerate(rates) if r > self.firing_rate_max]
            if hot:
                alert("warning", "saturation", f"firing rate > {self.firing_rate_max} in layer(s) {', '.join(hot)}")
        if self.halted:
            raise UserError(f"run stopped by a critical alert at step {ctx.step} of stage {ctx.stage!r} "
                            f"({', '.join(k for k in raised)}; monitor.on_critical: stop); see alerts.jsonl, "
                            "and --resume continues from the last checkpoint")
        return raised
