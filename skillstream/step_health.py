"""The engine's own guard on every optimizer step, on whatever plugins a recipe lists.

Two things no run may do silently:

- **Diverge.** A step whose loss or gradient norm is not finite is skipped (the optimizer does not
  step, so the weights stay as they were), counted and alerted. After `train.max_bad_steps` such
  steps in a row the run stops with :class:`TrainingDiverged` (CLI exit status 3) before anything
  more is saved: the checkpoints written before stay, and the message names the one `--resume`
  would use.
- **Collapse.** A model whose gradient norm is exactly 0, or whose token loss sits at the
  uniform-guess value ln(vocabulary) (it predicts nothing), for `train.collapse_steps` steps in a
  row still "trains" without error; a `collapsed` warning says so (once per streak).

The counters live in the stage's `StageState`, so a resumed run continues a streak where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TrainingDiverged

# a loss this close (relative) to ln(vocabulary) is the uniform guess: constant logits give it
# exactly, while a model that learns anything leaves the band within a few steps
UNIFORM_TOLERANCE = 1e-3


@dataclass
class StepCounts:
    """Saved in each checkpoint with the stage's position."""
    bad_in_row: int = 0     # non-finite steps in a row (skipped)
    skipped: int = 0        # non-finite steps in the stage, in all
    flat_in_row: int = 0    # collapsed-looking steps in a row


@dataclass
class Verdict:
    apply: bool                                   # step the optimizer with this step's gradients
    alerts: list[tuple[str, str, str]] = field(default_factory=list)  # (severity, kind, message)


class StepHealth:
    def __init__(self, max_bad_steps: int, collapse_steps: int, uniform_loss: float | None):
        """`uniform_loss`: ln(vocabulary) for objectives whose loss is a token cross-entropy, else None."""
        self.max_bad_steps, self.collapse_steps, self.uniform_loss = max_bad_steps, collapse_steps, uniform_loss

    def judge(self, counts: StepCounts, loss: float, grad_norm: float | None) -> Verdict:
        """`grad_norm` None: the backend did not report one (DeepSpeed); the loss alone decides."""
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            counts.bad_in_row += 1
            counts.skipped += 1
            counts.flat_in_row = 0
            return Verdict(False, [("critical", "nonfinite_step",
                                    f"loss {loss}, gradient norm {grad_norm}: optimizer step skipped, weights unchanged "
                                    f"({counts.bad_in_row} in a row; the run stops at {self.max_bad_steps})")])
        counts.bad_in_row = 0
        flat = grad_norm == 0.0 or (self.uniform_loss is not None
                                    and abs(loss - self.uniform_loss) <= UNIFORM_TOLERANCE * self.uniform_loss)
        counts.flat_in_row = counts.flat_in_row + 1 if flat else 0
        if counts.flat_in_row == self.collapse_steps:
            why = "gradient norm 0" if grad_norm == 0.0 else \
                f"loss {loss:.4f} = ln(vocabulary) {self.uniform_loss:.4f}, the uniform guess"
            return Verdict(True, [("warning", "collapsed",
                                   f"{why} for {self.collapse_steps} steps in a row: the model has stopped learning "
                                   "(a learning rate far too high? frozen weights?)")])
        return Verdict(True)

    def stop_if_diverged(self, counts: StepCounts, step: int, stage: str, checkpoints: Path | None) -> None:
        if counts.bad_in_row < self.max_bad_steps:
            return
        from .checkpoint import resume_hint
        where = resume_hint(checkpoints) if checkpoints is not None else "nothing was saved"
        raise TrainingDiverged(
            f"training diverged: {counts.bad_in_row} steps in a row (to step {step} of stage {stage!r}) had a non-finite "
            f"loss or gradient and were skipped (train.max_bad_steps: {self.max_bad_steps}); nothing was saved after "
            f"them; {where} (lower train.lr in a new --out to start over)")
