"""Plugins attach to the engine's hooks (Avalanche's before_/after_ style, with narrow state).

A plugin never reaches into the engine: each hook gets a `StepContext` with what it may read,
`loss_term` returns a tensor that the engine adds to the loss (EWC, distillation...), and
`after_step` returns extra metrics to log, `transform_items` may swap items of a micro-batch
(replay), `lr_scale` multiplies the scheduled learning rate, `group_lr` sets one parameter group's rate
(per-expert seeding/consolidation), and setting `ctx.stop` ends the stage
(early stopping). `state_dict`/`load_state_dict` (JSON values and tensors) ride in every
checkpoint so a resumed run restores plugin state too.

A new plugin is one file: subclass :class:`Plugin`, override the hooks it needs, and name it in
a recipe by dotted path (``plugins: [{name: mypkg.plugins:MyPlugin, k: 1}]``).

Plugins talk to each other only through `ctx.signals` (:class:`Signals`): one publishes a value
during a step, another reads it in the same step. The engine clears them as each optimizer step
begins, and the hooks of one step run plugin by plugin in `plugins:` order, so a reader must be
listed after its publisher; one listed before it gets an error naming both, never the previous
step's value. The signals the bundled plugins exchange (`SIGNALS`):

    neuromod/gain   float in [1/scale, scale]: the step's neuromodulation gain, published by
                    neuromod in after_step; gamma-gated ewc reads it in after_step and scales each
                    task's Fisher by its mean over the task
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .data.batching import BatchPlan
    from .objectives.base import Objective

# signal -> the plugin (registered name) that publishes it; see the module doc
SIGNALS = {"neuromod/gain": "neuromod"}


class Signals:
    """Values plugins publish for others to read within the same optimizer step."""

    def __init__(self):
        self._values: dict[str, Any] = {}

    def publish(self, name: str, value: Any) -> None:
        self._values[name] = value

    def read(self, name: str, reader: str) -> Any:
        """The value published this step; `reader` (the reading plugin's name) is for the error."""
        if name not in self._values:
            publisher = repr(SIGNALS[name]) if name in SIGNALS else "the plugin that publishes it"
            raise UserError(f"plugin {reader!r} reads the signal {name!r}, which no plugin has published this step: "
                            f"list {publisher} before {reader!r} in plugins:")
        return self._values[name]

    def clear(self) -> None:
        self._values.clear()


@dataclass
class StepContext:
    model: torch.nn.Module           # the (possibly wrapped) model being trained
    stage: str
    stage_index: int
    step: int                        # optimizer steps done in this stage
    total_steps: int
    alert: Callable[..., None]       # alert(severity, kind, message)
    # what the engine provides for the stage (a context built by hand, in a test, may leave them out)
    plan: BatchPlan | None = None    # the stage's batches: items, sources, epoch order
    objective: Objective | None = None
    pad_id: int = 0
    accelerator: Accelerator | None = None
    validation: list = field(default_factory=list)  # items held out of training (data.validation_fraction)
    grad_accum: int = 1              # micro-batches per optimizer step
    run_dir: Path | None = None      # where the run writes; None when nothing is written
    signals: Signals = field(default_factory=Signals)
    stop: bool = False               # a plugin sets it to end the stage after this step (early stopping)


class Plugin:
    name = "plugin"

    def before_stage(self, ctx: StepContext) -> None: ...
    def transform_items(self, ctx: StepContext, items: list) -> list: return items  # e.g. mix in replay
    def lr_scale(self, ctx: StepContext) -> float: return 1.0                       # e.g. neuromodulation
    def group_lr(self, ctx: StepContext, group: dict, lr: float) -> float: return lr  # e.g. per-expert rates
    def loss_term(self, ctx: StepContext, batch: dict, outputs: Any) -> torch.Tensor | None: return None
    def after_step(self, ctx: StepContext, metrics: dict) -> dict | None: return None
    def after_stage(self, ctx: StepContext) -> None: ...
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...
