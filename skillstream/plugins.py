"""Plugins attach to the engine's hooks (Avalanche's before_/after_ style, with narrow state).

A plugin never reaches into the engine: each hook gets a `StepContext` with what it may read,
`loss_term` returns a tensor that the engine adds to the loss (EWC, distillation...), and
`after_step` returns extra metrics to log, `transform_items` may swap items of a micro-batch
(replay), `lr_scale` multiplies the scheduled learning rate, `group_lr` sets one parameter group's rate
(per-expert seeding/consolidation), and setting `ctx.stop` ends the stage
(early stopping). `state_dict`/`load_state_dict` (JSON values and tensors) ride in every
checkpoint so a resumed run restores plugin state too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class StepContext:
    model: torch.nn.Module           # the (possibly wrapped) model being trained
    stage: str
    stage_index: int
    step: int                        # optimizer steps done in this stage
    total_steps: int
    alert: Callable[..., None]       # alert(severity, kind, message)
    extras: dict[str, Any] = field(default_factory=dict)  # plan, objective, pad_id, seed
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
