"""Plugins attach to the engine's hooks (Avalanche's before_/after_ style, with narrow state).

A plugin never reaches into the engine: each hook gets a `StepContext` with what it may read,
`loss_term` returns a tensor that the engine adds to the loss (EWC, distillation...), and
`after_step` returns extra metrics to log. `state_dict`/`load_state_dict` (JSON-able) ride in
every checkpoint so a resumed run restores plugin state too.
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
    extras: dict[str, Any] = field(default_factory=dict)


class Plugin:
    name = "plugin"

    def before_stage(self, ctx: StepContext) -> None: ...
    def loss_term(self, ctx: StepContext, batch: dict, outputs: Any) -> torch.Tensor | None: return None
    def after_step(self, ctx: StepContext, metrics: dict) -> dict | None: return None
    def after_stage(self, ctx: StepContext) -> None: ...
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...
