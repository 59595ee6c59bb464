"""The objective contract: everything the engine and the run call on an objective.

    objective: dpo                                  # a registered name (components.OBJECTIVES)
    objective: mypkg.objectives:MyObjective         # or any importable subclass of Objective

A new objective is one file: subclass :class:`Objective`, define `name`, `tokenize`, `collate`
and `__call__`, and name the class in a recipe (tests/toy_objective.py is a complete example).
Every other part has a default that does nothing, so an objective overrides only what it uses;
the engine calls each part unconditionally, never probing for it.

Constructed as ``cls(**arguments, tokenizer=, renderer=, recipe=)``: the recipe's keyword
arguments plus the run's objects, which the base ``__init__`` accepts and ignores.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..data.render import Renderer


class Objective(ABC):
    name = "objective"  # what logs and errors call it
    # the loss is a mean token cross-entropy: the engine's step guard then knows its uniform-guess
    # value, ln(vocabulary), and warns when the loss sits there (step_health.py)
    token_cross_entropy = False

    def __init__(self, **context):
        pass

    # -- required ------------------------------------------------------------------------------------
    # (abstract: a class that leaves one out is refused by components.build before the run starts)
    @abstractmethod
    def tokenize(self, example, renderer: Renderer) -> Any:
        """One example -> the item the batch plan groups and shuffles (it needs `length` or `input_ids`)."""

    @abstractmethod
    def collate(self, items: list, pad_id: int) -> dict:
        """Items -> one micro-batch; the engine moves its tensors to the device and counts
        `attention_mask` as the step's tokens, so the batch must have one."""

    @abstractmethod
    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict, Any]:
        """(loss, {metric name: float}, outputs that plugins' loss_term receive, or None)."""

    # -- optional: the defaults do nothing ----------------------------------------------------------
    def trainable(self, item) -> bool:
        """Whether the item gives the loss something to learn from. Items that do not (every
        trainable token cut off by data.max_length) are left out of training and counted: a batch
        of them would make a mean over no tokens, a NaN loss."""
        return True

    def extra_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Trainables outside the model (PPO's value head), optimized and checkpointed with it."""
        return {}

    def loss_weight(self, batch: dict) -> int | None:
        """What the loss is a mean over in this batch (LM: labelled tokens). With several processes
        each one's loss is weighted by its share of the total, so the averaged gradient is that of
        the global batch. None: every process's loss counts alike."""
        return None

    def begin_stage(self, model) -> None:
        """Fix what the stage needs from the model as it starts (DPO's and PPO's reference); called
        once per stage before the optimizer is built, and on resume before the weights load."""

    def implicit_rewards(self, model, examples: list, renderer: Renderer, pad_id: int,
                         batch_size: int) -> dict | None:
        """Held-out preference pairs scored by the objective itself (DPO: TRL's rewards/* against
        its reference, plus the `preference` metric under "ranking"). None: the run scores them with
        the `preference` metric alone."""
        return None

    def state_dict(self) -> dict:
        """JSON values and tensors that ride in every checkpoint (PPO's rollout buffer)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; `{}` when the checkpoint has nothing for it."""
