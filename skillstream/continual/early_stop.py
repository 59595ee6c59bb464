"""Early stopping per task on a validation metric (patience, minimum epochs, minimum delta).

The validation items are held out of the stage's training data (`data.validation_fraction`), so
the test split is never looked at. Every `eval_every` steps (default: once per epoch of the
stage's plan) the mean token loss on them is measured; after `min_epochs` epochs, `patience`
evaluations in a row without an improvement of at least `min_delta` end the stage. The history
and the step it stopped at are kept in the plugin state and logged.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..plugins import Plugin, StepContext


@torch.no_grad()
def validation_loss(model, objective, items, pad_id: int, batch_size: int = 16) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(p for p in model.parameters()).device
    for i in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in objective.collate(items[i:i + batch_size], pad_id).items()}
        loss, _, _ = objective(model, batch)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return total / max(count, 1)


class EarlyStopping(Plugin):
    name = "early_stop"

    def __init__(self, patience: int = 3, min_epochs: int = 1, min_delta: float = 0.0,
                 eval_every: int | None = None, **context):
        if patience < 1:
            raise UserError(f"early_stop.patience {patience}: expected at least 1")
        self.patience, self.min_epochs, self.min_delta, self.eval_every = patience, min_epochs, min_delta, eval_every
        self.history: dict[str, list[list[float]]] = {}   # stage -> [[step, val_loss], ...]
        self.stopped: dict[str, int] = {}

    def _every(self, ctx) -> int:
        return self.eval_every or max(1, len(ctx.extras["plan"].epoch(0)) // max(1, ctx.extras.get("grad_accum", 1)))

    def after_step(self, ctx: StepContext, metrics: dict):
        items = ctx.extras.get("validation") or []
        if not items or ctx.step % self._every(ctx):
            return None
        loss = validation_loss(ctx.model, ctx.extras["objective"], items, ctx.extras["pad_id"])
        hist = self.history.setdefault(ctx.stage, [])
        hist.append([ctx.step, loss])
        best_i = 0
        for i, (_, v) in enumerate(hist):  # a new best must beat the old one by min_delta
            if v < hist[best_i][1] - self.min_delta:
                best_i = i
        best = hist[best_i][1]
        epochs = ctx.step // self._every(ctx)
        if len(hist) - 1 - best_i >= self.patience and epochs >= self.min_epochs:
            ctx.stop = True
            self.stopped[ctx.stage] = ctx.step
        return {"early_stop/val_loss": loss, "early_stop/best": best}

    def state_dict(self) -> dict:
        return {"history": self.history, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.stopped = state.get("history", {}), state.get("stopped", {})
