"""Elastic Weight Consolidation (Kirkpatrick et al., 2017), online, with optional gamma gating.

After each task the diagonal Fisher information of the trainable (shared) parameters is
estimated from per-sample gradients of the log-likelihood — the mean of squared per-example
gradients, not the square of a batch gradient, which underestimates it. Across tasks it is
accumulated online: F <- decay * F + g * F_task, where g = 1, or, gamma-gated, the mean
neuromodulation gain seen while learning the task (the `neuromod/gain` signal, read every step,
so neuromod comes before ewc in `plugins:`). The penalty added to the loss is
lam * sum F * (theta - theta*)^2, whose gradient is 2 * lam * F * (theta - theta*).
"""
from __future__ import annotations

import random
from typing import Callable, Iterable

import torch

from ..models.modes import eval_mode
from ..plugins import Plugin, StepContext


def diagonal_fisher(params: dict[str, torch.nn.Parameter], samples: Iterable,
                    nll: Callable[[object], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean over samples of (d nll(sample) / d theta)^2 for each parameter."""
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for sample in samples:
        for p in params.values():
            p.grad = None
        nll(sample).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
        count += 1
    for p in params.values():
        p.grad = None
    return {n: f / max(count, 1) for n, f in fisher.items()}


def ewc_penalty(params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                anchor: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    terms = [(fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in params.items() if n in fisher]
    return lam * torch.stack(terms).sum() if terms else torch.zeros(())


def _trainables(model) -> dict[str, torch.nn.Parameter]:
    model = getattr(model, "module", model)  # DDP
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class EWC(Plugin):
    """Online EWC over the trainable parameters; `gamma_gated` scales each task's Fisher by the gain."""

    name = "ewc"

    def __init__(self, lam: float = 250.0, fisher_samples: int = 50, decay: float = 1.0,
                 gamma_gated: bool = False, seed: int = 0, **context):
        self.lam, self.fisher_samples, self.decay, self.gamma_gated = lam, fisher_samples, decay, gamma_gated
        self.seed = context["recipe"].seed if "recipe" in context else seed
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.tasks = 0
        self._gains: list[float] = []

    def before_stage(self, ctx: StepContext) -> None:
        self._gains = []

    def loss_term(self, ctx, batch, outputs):
        if not self.fisher:
            return None
        return ewc_penalty(_trainables(ctx.model), self.fisher, self.anchor, self.lam)

    def after_step(self, ctx, metrics):
        if self.gamma_gated:
            self._gains.append(float(ctx.signals.read("neuromod/gain", self.name)))
        return None

    def after_stage(self, ctx: StepContext) -> None:
        plan, objective, pad_id = ctx.plan, ctx.objective, ctx.pad_id
        rng = random.Random(f"{self.seed}:ewc:{ctx.stage_index}")
        picks = rng.sample(range(len(plan.items)), min(self.fisher_samples, len(plan.items)))
        model, params = ctx.model, _trainables(ctx.model)
        device = next(iter(params.values())).device

        def nll(i):  # summed negative log-likelihood of one example's labelled tokens
            batch = {k: v.to(device) for k, v in objective.collate([plan.items[i]], pad_id).items()}
            loss, _, _ = objective(model, batch)
            return loss * max(int((batch["labels"][:, 1:] != -100).sum()), 1)

        with eval_mode(model):  # no dropout: the Fisher of the model as it is
            task_fisher = diagonal_fisher(params, picks, nll)
        gain = sum(self._gains) / len(self._gains) if (self.gamma_gated and self._gains) else 1.0
        self.fisher = {n: self.decay * self.fisher.get(n, torch.zeros_like(f)) + gain * f
                       for n, f in task_fisher.items()}
        self.anchor = {n: p.detach().clone() for n, p in params.items()}
        self.tasks += 1

    def state_dict(self) -> dict:
        return {"fisher": self.fisher, "anchor": self.anchor, "tasks": self.tasks, "gains": self._gains}

    def load_state_dict(self, state: dict) -> None:
        self.fisher, self.anchor = state.get("fisher", {}), state.get("anchor", {})
        self.tasks, self._gains = state.get("tasks", 0), state.get("gains", [])
