"""The training monitor: alerts on what goes wrong, per-layer firing rates, and (for spiking
models) the firing-rate regulariser. A plugin, usable by every recipe::

    plugins:
      - {name: monitor, grad_norm_max: 100, firing_rate_max: 0.5, on_critical: stop}

Each check runs on every optimizer step; an alert is a line of ``alerts.jsonl`` (``step``,
``severity``, ``kind``, ``message``), a line on stderr, and shows in ``skillstream monitor``:

==================  =========  ==============================================================
kind                severity   when
==================  =========  ==============================================================
``nan_loss``        critical   the loss is NaN or infinite
``nan_grad``        critical   the gradient norm is NaN or infinite
``loss_high``       critical   loss > ``loss_max`` if set, else (the default) loss > ``loss_factor``
                               x the mean of the stage's first ``loss_ref_steps`` losses (checked
                               from the step after them)
``loss_spike``      warning    loss > ``spike_factor`` x the mean of the last ``spike_window`` losses
``grad_explosion``  warning    gradient norm > ``grad_norm_max``
``dead_layer``      critical   a layer's firing rate is exactly 0 (no neuron fired in the step's
                               micro-batches: the network sends no gradient into that block)
``saturation``      warning    a layer's firing rate > ``firing_rate_max``
``loss_plateau``    warning    the best loss of the last ``plateau_window`` steps is not
                               ``plateau_min_delta`` (relative) below the best before them
==================  =========  ==============================================================

Why ``loss_high`` is relative by default: what a high loss is depends on the model and the data.
An untrained model starts near ln(vocabulary size) -- 10.8 nats for a 49k vocabulary, so any fixed
bound of 10 fires on its first step -- while a pretrained one fine-tuning starts far lower. Against
the stage's own first ``loss_ref_steps`` steps (default 10: a mean over several batches, not one
lucky or unlucky batch) a loss ``loss_factor`` (default 3) times higher means training has made the
model much worse than where the stage began: it diverged. (``loss_spike`` warns on a jump against the
recent losses instead.) The reference is kept in checkpoints, so a run resumed mid-stage compares
with the same level. ``loss_max: 10.0`` (an absolute bound) replaces the relative check.

In training, a step with a NaN or infinite loss or gradient norm is skipped and alerted by the
engine itself (``nonfinite_step``, skillstream/step_health.py) before plugins see it; ``nan_loss`` and
``nan_grad`` fire for numbers given to :meth:`Monitor.check` directly.

The same kind is not raised again within ``cooldown`` steps (a dead network would otherwise
write one line per step). ``on_critical: stop`` ends the run at the first critical alert (after
writing it: exit status 2 and one line naming it; the checkpoints written before it stay, so
``--resume`` restarts from the last one -- the roll-back -- or, when none was written yet, starts
the run over: the line says which); ``continue`` only records it.

Every step it also measures the training itself (``stats: false`` turns this off), logged with the
step's metrics:

* ``activation/mean``, ``activation/std`` -- of the outputs of the model's blocks (the longest
  ``nn.ModuleList`` of the model: its decoder layers), over the step's training micro-batches, and
  ``activation/<i>/std`` per block (a block whose spread collapses or explodes stands out);
* ``weight/norm`` -- the L2 norm of the trainable weights; ``weight/update_ratio`` -- the norm of
  this step's change of them over their norm before it (about 1e-3 is the usual healthy order);
  it keeps a copy of the trainable weights, small for LoRA, the model's size for ``lora: null``;
* ``nonfinite/activations``, ``nonfinite/weights`` -- how many NaN or infinite values the blocks'
  outputs and the trainable weights held.

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

from ..checkpoint import resume_hint
from ..errors import UserError
from ..plugins import Plugin, StepContext

KINDS = ("nan_loss", "nan_grad", "loss_high", "loss_spike", "grad_explosion", "dead_layer", "saturation",
         "loss_plateau")


def _unwrap(model):
    return getattr(model, "module", model)


class Monitor(Plugin):
    name = "monitor"

    def __init__(self, loss_max: float | None = None, loss_factor: float = 3.0, loss_ref_steps: int = 10,
                 grad_norm_max: float = 100.0, firing_rate_max: float = 0.5,
                 spike_factor: float = 2.0, spike_window: int = 20, plateau_window: int = 500,
                 plateau_min_delta: float = 0.01, cooldown: int = 50, on_critical: str = "continue",
                 rate_weight: float = 0.0, target_rate: float = 0.1, stats: bool = True, **context):
        if on_critical not in ("continue", "stop"):
            raise UserError(f"monitor.on_critical {on_critical!r}: expected 'continue' or 'stop'")
        if loss_factor <= 1 or loss_ref_steps < 1:
            raise UserError(f"monitor: loss_factor {loss_factor} must be above 1 and loss_ref_steps "
                            f"{loss_ref_steps} at least 1")
        self.loss_max, self.grad_norm_max, self.firing_rate_max = loss_max, grad_norm_max, firing_rate_max
        self.loss_factor, self.loss_ref_steps = loss_factor, loss_ref_steps
        self.loss_ref: list[float] = []         # the current stage's first loss_ref_steps losses
        self.loss_ref_stage: str | None = None
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
        self.stats = stats
        self._hooks: list = []
        self._act: list[torch.Tensor | None] = []  # per block: [sum of means, sum of stds, non-finite, n]
        self._before: dict[str, torch.Tensor] = {}  # the trainable weights before this step

    # -- hooks ----------------------------------------------------------------------------------
    def before_stage(self, ctx: StepContext) -> None:
        run_dir, acc = ctx.run_dir, ctx.accelerator
        if run_dir is not None and (acc is None or acc.is_main_process):
            from .metrics_log import ALERTS
            (run_dir / ALERTS).touch()  # present and empty when nothing went wrong
        self.losses.clear()
        self.history = []
        # a stage resumed mid-way keeps the reference of its first steps (restored from the
        # checkpoint); re-measuring it on the resumed, already lower losses would tighten the bound
        if ctx.step == 0 or self.loss_ref_stage != ctx.stage:
            self.loss_ref, self.loss_ref_stage = [], ctx.stage
        self.halted = False  # a resumed run starts again from its last checkpoint
        if self.stats:
            self._watch(ctx.model)

    def after_stage(self, ctx: StepContext) -> None:
        self._unwatch()

    # -- training statistics ------------------------------------------------------------------------
    def _unwatch(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._act, self._before = [], [], {}

    def _watch(self, model) -> None:
        """Forward hooks on the model's blocks, and the trainable weights as they stand."""
        self._unwatch()
        lists = [m for m in _unwrap(model).modules() if isinstance(m, torch.nn.ModuleList)]
        blocks = max(lists, key=len) if lists else []
        self._act = [None] * len(blocks)
        for i, block in enumerate(blocks):
            self._hooks.append(block.register_forward_hook(self._block_hook(i)))
        self._before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def _block_hook(self, i: int):
        def hook(module, args, output):
            if not module.training or not torch.is_grad_enabled():  # evaluation, sampling: not training
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not torch.is_tensor(out) or not out.is_floating_point():
                return
            x = out.detach().float()
            finite = torch.isfinite(x)
            x = torch.where(finite, x, torch.zeros_like(x))
            now = torch.stack([x.mean(), x.std(), (~finite).sum().float(), torch.ones((), device=x.device)])
            self._act[i] = now if self._act[i] is None else self._act[i] + now
        return hook

    def _step_stats(self, model) -> dict:
        """The step's activation, weight, update and non-finite numbers (see the module doc)."""
        out = {}
        acts = [a.cpu() for a in self._act if a is not None]
        if acts:
            per_block = [(a[0] / a[3], a[1] / a[3]) for a in acts]
            out["activation/mean"] = float(sum(m for m, _ in per_block)) / len(per_block)
            out["activation/std"] = float(sum(sd for _, sd in per_block)) / len(per_block)
            out.update({f"activation/{i}/std": float(sd) for i, (_, sd) in enumerate(per_block)})
            out["nonfinite/activations"] = int(sum(a[2] for a in acts))
        self._act = [None] * len(self._act)
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if params:
            norm2 = sum(float(p.float().pow(2).sum()) for p in params.values())
            out["weight/norm"] = math.sqrt(norm2)
            out["nonfinite/weights"] = sum(int((~torch.isfinite(p)).sum()) for p in params.values())
            before = {n: self._before[n] for n in params if n in self._before}
            if before:
                delta2 = sum(float((params[n].float() - b.float()).pow(2).sum()) for n, b in before.items())
                was2 = sum(float(b.float().pow(2).sum()) for b in before.values())
                out["weight/update_ratio"] = math.sqrt(delta2) / max(math.sqrt(was2), 1e-12)
            self._before = {n: p.clone() for n, p in params.items()}
        return out

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
        if self.stats:
            out.update(self._step_stats(ctx.model))
        self.check(ctx, metrics.get("loss"), metrics.get("grad_norm"), rates)
        return out

    def state_dict(self) -> dict:
        return {"last_raised": self.last_raised, "global_step": self.global_step, "halted": self.halted,
                "counts": self.counts, "loss_ref": self.loss_ref, "loss_ref_stage": self.loss_ref_stage}

    def load_state_dict(self, state: dict) -> None:
        self.last_raised = dict(state.get("last_raised", {}))
        self.global_step = state.get("global_step", 0)
        self.halted = state.get("halted", False)
        self.counts = dict(state.get("counts", {}))
        self.loss_ref, self.loss_ref_stage = list(state.get("loss_ref", [])), state.get("loss_ref_stage")

    def loss_bound(self) -> tuple[float, str] | None:
        """The loss above which ``loss_high`` fires, and how it was set; None while the stage's
        reference steps are still being measured."""
        if self.loss_max is not None:
            return self.loss_max, "loss_max"
        if len(self.loss_ref) < self.loss_ref_steps:
            return None
        ref = sum(self.loss_ref) / len(self.loss_ref)
        return self.loss_factor * ref, f"{self.loss_factor} x the mean {ref:.3f} of the stage's first {len(self.loss_ref)} steps"

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
                bound = self.loss_bound()
                if bound is not None and loss > bound[0]:
                    alert("critical", "loss_high", f"loss {loss:.3f} > {bound[0]:.3f} ({bound[1]})")
                if len(self.loss_ref) < self.loss_ref_steps:
                    self.loss_ref.append(loss)
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
            run_dir = ctx.run_dir
            # what --resume would do depends on whether a checkpoint was written before this step
            where = f"; see alerts.jsonl, and {resume_hint(run_dir / 'checkpoints')}" if run_dir is not None else ""
            raise UserError(f"run stopped by a critical alert at step {ctx.step} of stage {ctx.stage!r} "
                            f"({', '.join(k for k in raised)}; monitor.on_critical: stop){where}")
        return raised
