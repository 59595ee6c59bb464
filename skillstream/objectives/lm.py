"""Language-modelling / SFT objective: token cross-entropy on the labelled (non -100) positions.

The LM head is applied only where a label follows. For SFT most tokens are prompt (chat
template, instruction, request) and a 49k-word head over every one of them is a large share of
the compute, so skipping them is the single largest saving on a small model. Models whose head
does more than a linear map (logit soft-capping, scaling), and DDP-wrapped models (calling a
submodule would bypass DDP's gradient hooks; likewise DeepSpeed's and FSDP's wrappers, which pass the
model's attributes through, so every multi-process run goes this way), take the plain full-logits path.
`head_logits` and `labelled_logits` are that choice for every objective and plugin that needs logits
(DPO, PPO, the automatic curriculum).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..data.batching import collate, device_batches
from ..data.render import IGNORE
from ..models.modes import eval_mode
from .base import Objective


def _plain_head_parts(model):
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        return None  # DeepSpeed and FSDP wrappers pass attributes through (DDP does not): go by the process group
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    if not (hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")):
        return None  # a plain nn.Module such as BDH
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except NotImplementedError:
        # custom (trust_remote_code) models leave these abstract: no separable decoder and head, so
        # head_logits takes the model's own full-logits path (tests/test_objectives.py)
        return None
    if decoder is None or decoder is base or not isinstance(head, torch.nn.Linear):
        return None  # head_logits runs the model's own forward (tests/test_objectives.py)
    return decoder, head


class HeadOutput(NamedTuple):
    logits: torch.Tensor                # the LM head's logits at the picked positions, in the dtype it computed
    hidden: torch.Tensor | None         # the last hidden states there (asked for with hidden=True)
    model_loss: torch.Tensor | None     # the model's own loss: `labels` given and the model ran whole


def head_logits(model, input_ids, attention_mask, pick: Callable[[torch.Tensor], torch.Tensor], *,
                position_ids=None, labels=None, hidden: bool = False) -> HeadOutput:
    """The LM head's logits at the positions `pick` takes from a (batch, length, ...) tensor.

    Where the model allows it (see the module doc) the head runs only there, on the decoder's last
    hidden states; otherwise the model runs whole (with `labels`, so it computes its own loss too)
    and the positions are taken from its logits."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    parts = _plain_head_parts(model)
    if parts is not None:
        decoder, head = parts
        states = pick(decoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state)
        return HeadOutput(head(states), states if hidden else None, None)
    if labels is not None:
        extra["labels"] = labels
    if hidden:
        extra["output_hidden_states"] = True
    out = model(input_ids=input_ids, attention_mask=attention_mask, **extra)
    return HeadOutput(pick(out.logits), pick(out.hidden_states[-1]) if hidden else None,
                      out.loss if labels is not None else None)


def labelled_logits(model, input_ids, attention_mask, labels, *, model_loss: bool = False):
    """(logits where a label follows, as float; their targets; the (batch, length - 1) mask of those
    positions; with `model_loss`, the model's own loss when it ran whole, else None)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    out = head_logits(model, input_ids, attention_mask, lambda t: t[:, :-1][keep],
                      labels=labels if model_loss else None)
    return out.logits.float(), targets[keep], keep, out.model_loss


def labelled_nll(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed next-token negative log-likelihood of each row's labelled tokens, how many
    labelled tokens each row has), both (batch,); differentiable."""
    logits, targets, keep, _ = labelled_logits(model, input_ids, attention_mask, labels)
    token_nll = F.cross_entropy(logits, targets, reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(keep.shape[0], device=token_nll.device, dtype=token_nll.dtype).index_add(0, rows, token_nll)
    return sums, keep.sum(1)


def example_losses(model, batch) -> torch.Tensor:
    """(batch,) mean next-token loss of each row on its labelled tokens (differentiable)."""
    sums, counts = labelled_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return sums / counts.clamp(min=1)


@torch.no_grad()
def per_example_loss(model, items, pad_id: int, batch_size: int = 8) -> list[float]:
    """Mean next-token loss of each item on its labelled tokens (eval mode, no dropout); the head runs
    on the labelled positions only, so long prompts with short labels cost no full-vocabulary logits."""
    out = []
    with eval_mode(model):
        for batch in device_batches(items, pad_id, batch_size, next(model.parameters()).device):
            out += example_losses(model, batch).tolist()
    return out


def causal_lm_loss(model, batch: dict[str, torch.Tensor]):
    """(mean token loss, logits at labelled positions (detached), their targets).

    The head runs only on labelled positions where the model allows it; otherwise the loss is the
    model's own (from its full logits)."""
    logits, targets, _, own_loss = labelled_logits(model, batch["input_ids"], batch["attention_mask"],
                                                   batch["labels"], model_loss=True)
    loss = own_loss if own_loss is not None else F.cross_entropy(logits, targets)
    return loss, logits.detach(), targets


class LMObjective(Objective):
    """Loss = mean next-token cross-entropy over trainable tokens (completion or assistant turns)."""

    name = "lm"
    token_cross_entropy = True

    def tokenize(self, example, renderer):
        return renderer.tokenize(example)

    def collate(self, items, pad_id: int):
        return collate(items, pad_id)

    def trainable(self, item) -> bool:
        return any(label != IGNORE for label in item.labels[1:])  # the first token is never a target

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def __call__(self, model, batch: dict[str, torch.Tensor]):
        loss, logits, targets = causal_lm_loss(model, batch)
        # cheap training signals (neuromodulation reads them): only over the labelled positions
        logp = torch.log_softmax(logits, -1)
        metrics = {"lm/token_accuracy": (logits.argmax(-1) == targets).float().mean().item() if len(targets) else 0.0,
                   "lm/entropy": -(logp.exp() * logp).sum(-1).mean().item() if len(targets) else 0.0}
        return loss, metrics, None
