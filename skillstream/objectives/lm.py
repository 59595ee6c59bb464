"""Language-modelling / SFT objective: token cross-entropy on the labelled (non -100) positions.

The LM head is applied only where a label follows. For SFT most tokens are prompt (chat
template, instruction, request) and a 49k-word head over every one of them is a large share of
the compute, so skipping them is the single largest saving on a small model. Models whose head
does more than a linear map (logit soft-capping, scaling), and DDP-wrapped models (calling a
submodule would bypass DDP's gradient hooks; likewise DeepSpeed's and FSDP's wrappers, which pass the
model's attributes through, so every multi-process run goes this way), take the plain full-logits path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.batching import collate
from ..data.render import IGNORE
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
        # causal_lm_loss takes the model's own full-logits path (tests/test_objectives.py)
        return None
    if decoder is None or decoder is base or not isinstance(head, torch.nn.Linear):
        return None  # causal_lm_loss runs the model's own forward with labels (tests/test_objectives.py)
    return decoder, head


def causal_lm_loss(model, batch: dict[str, torch.Tensor]):
    """(mean token loss, logits at labelled positions (detached), their targets).

    The head runs only on labelled positions where the model allows it."""
    parts = _plain_head_parts(model)
    if parts is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        return out.loss, out.logits[:, :-1][keep].detach().float(), targets[keep]
    decoder, head = parts
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep]), logits.detach(), targets[keep]


class LMObjective(Objective):
    """Loss = mean next-token cross-entropy over trainable tokens (completion or assistant turns)."""

    name = "lm"
    token_cross_entropy = True

    def tokenize(self, example, renderer):
        return renderer.tokenize(example)

    def collate(self, items, pad_id: int):
        return collate(items, pad_id)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def __call__(self, model, batch: dict[str, torch.Tensor]):
        loss, logits, targets = causal_lm_loss(model, batch)
        # cheap training signals (neuromodulation reads them): only over the labelled positions
        logp = torch.log_softmax(logits, -1)
        metrics = {"lm/token_accuracy": (logits.argmax(-1) == targets).float().mean().item() if len(targets) else 0.0,
                   "lm/entropy": -(logp.exp() * logp).sum(-1).mean().item() if len(targets) else 0.0}
        return loss, metrics, None
