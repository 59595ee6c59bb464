"""Early stopping per task on a validation metric (patience, minimum epochs, minimum delta).

The validation items are held out of the stage's training data (`data.validation_fraction`), so
the test split is never looked at. Every `eval_every` steps the mean token loss on them is
measured; `patience` evaluations in a row without an improvement on the best so far end the
stage, once it has trained on `min_epochs` epochs of its training data (`min_epochs` x the
optimizer steps of one pass over it; fractions allowed, 0 lets it stop at any validation). The
history and the step it stopped at are kept in the plugin state and logged.

Cadence: by default (`eval_every` unset) a stage is validated `evals_per_stage` (10) times, every
`train.steps // evals_per_stage` steps, whatever its length. Why not once per epoch: stages are
often only a few epochs long (the adaptive_learner recipe's 150 steps of 8 on 450 items are 2.7
epochs), and patience 3 needs 4 validations, so a per-epoch check could never stop them. With 10
per stage, patience p stops a stage whose validation loss has not improved for p tenths of it;
the cost is 10 forward passes over the validation items per stage. `eval_every: N` validates
every N steps instead.

An improvement is a validation loss below the best by more than `min_delta` (absolute, default
0) and more than `min_rel_delta` x the best (relative, default 0.001). Why relative by default: a
stage that has learned what it can still creeps down by millionths (a learning rate too small to
matter does that too), and with a zero threshold each creep restarts the patience, so it never
stops; a relative threshold means the same at any loss scale (10 nats for an untrained model,
0.1 for a fine-tuned classifier). Set `min_rel_delta: 0` for any decrease to count.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..models.modes import eval_mode
from ..plugins import Plugin, StepContext


@torch.no_grad()
def validation_loss(model, objective, items, pad_id: int, batch_size: int = 16) -> float:
    total, count = 0.0, 0
    device = next(p for p in model.parameters()).device
    with eval_mode(model):
        for i in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in objective.collate(items[i:i + batch_size], pad_id).items()}
            loss, _, _ = objective(model, batch)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


class EarlyStopping(Plugin):
    name = "early_stop"

    def __init__(self, patience: int = 3, min_epochs: float = 1, min_delta: float = 0.0,
                 min_rel_delta: float = 1e-3, eval_every: int | None = None, evals_per_stage: int = 10, **context):
        if patience < 1:
            raise UserError(f"early_stop.patience {patience}: expected at least 1")
        if evals_per_stage < 1 or (eval_every is not None and eval_every < 1):
            raise UserError(f"early_stop: evals_per_stage {evals_per_stage} and eval_every {eval_every} must be "
                            "at least 1")
        if min_epochs < 0 or min_delta < 0 or min_rel_delta < 0:
            raise UserError(f"early_stop: min_epochs {min_epochs}, min_delta {min_delta} and min_rel_delta "
                            f"{min_rel_delta} must not be negative")
        self.patience, self.min_epochs, self.eval_every = patience, min_epochs, eval_every
        self.min_delta, self.min_rel_delta, self.evals_per_stage = min_delta, min_rel_delta, evals_per_stage
        self.history: dict[str, list[list[float]]] = {}   # stage -> [[step, val_loss], ...]
        self.stopped: dict[str, int] = {}
        self._cadence: tuple[int, int] | None = None      # the current stage's cadence()

    def before_stage(self, ctx: StepContext) -> None:
        self._cadence = None  # each stage has its own length and data

    def cadence(self, ctx: StepContext) -> tuple[int, int]:
        """(steps between validations, optimizer steps in one epoch of the stage's training data)."""
        if self._cadence is None:
            every = self.eval_every or max(1, ctx.total_steps // self.evals_per_stage)
            # the plan's batches per epoch; grad_accum of them make one optimizer step
            epoch = max(1, len(ctx.plan.epoch(0)) // max(1, ctx.grad_accum))
            self._cadence = (every, epoch)
        return self._cadence

    def improves(self, loss: float, best: float) -> bool:
        return loss < best - max(self.min_delta, self.min_rel_delta * abs(best))

    def after_step(self, ctx: StepContext, metrics: dict):
        items = ctx.validation
        if not items:
            return None
        every, epoch_steps = self.cadence(ctx)
        if ctx.step % every:
            return None
        loss = validation_loss(ctx.model, ctx.objective, items, ctx.pad_id)
        hist = self.history.setdefault(ctx.stage, [])
        hist.append([ctx.step, loss])
        best_i = 0
        for i, (_, v) in enumerate(hist):
            if self.improves(v, hist[best_i][1]):
                best_i = i
        best = hist[best_i][1]
        if len(hist) - 1 - best_i >= self.patience and ctx.step >= self.min_epochs * epoch_steps:
            ctx.stop = True
            self.stopped[ctx.stage] = ctx.step
        return {"early_stop/val_loss": loss, "early_stop/best": best}

    def state_dict(self) -> dict:
        return {"history": self.history, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.stopped = state.get("history", {}), state.get("stopped", {})
