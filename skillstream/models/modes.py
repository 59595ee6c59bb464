"""Training/evaluation mode of a torch module, switched for a block and restored after it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """`model.eval()` for the block (no dropout: measurements, rollouts and generation do not depend
    on the training mode), then every submodule back in the mode it was in, also when the block
    raises. Restored module by module, not with `model.train(was_training)`: a part that was in eval
    mode while the rest trained (a frozen reference, say) stays so."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
