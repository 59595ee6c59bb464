"""Dense-to-sparse training (`experts.training: dense_to_sparse`): a chunk trains the router and the
experts through the router's weighted mixture.

For each micro-batch the router reads the frozen backbone's features of the inputs' prompts and
gives per-input probabilities; the hybrid policy (`mixing.hybrid_weights`, the same rule inference
uses) turns them into mixing weights: an input whose top expert is still immature is served by
the dense mix of every expert (dense collaboration: a young expert's skill is carried by the
experts that exist while it learns), an input whose top expert is mature by its top-k experts,
renormalised (sparse delegation). The LM loss is computed on the mixed model, so its gradient
reaches every expert in proportion to its weight AND the router through the weights. Where inputs
are delegated sparsely a load-balancing term (Switch Transformer / GShard) is added, so top-k
routing does not collapse onto one expert.

PEFT serves one adapter per sample (`adapter_names=`) and merges several into a new adapter
(`add_weighted_adapter`), but has no per-sample weighted sum of several adapters with a gradient
to the weights: `mixing.mixing` (a forward hook on every LoRA Linear) is that sum, and this module
only wraps the stage's objective in it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..data.render import IGNORE
from ..objectives.base import Objective
from .mixing import hybrid_weights, mixing
from .router import Router


def load_balance(probs: torch.Tensor, k: int = 1) -> torch.Tensor:
    """n * sum_i f_i * P_i (Switch Transformer eq. 4; GShard's mean-gate form): f_i is the share of
    the inputs' top-k assignments that go to expert i (no gradient: an argmax), P_i the mean router
    probability of i (the gradient). 1.0 when both are uniform; n when every input goes to one expert."""
    n = probs.shape[-1]
    k = max(1, min(k, n))
    chosen = torch.zeros_like(probs).scatter(-1, probs.detach().topk(k, dim=-1).indices, 1.0)
    share = chosen.mean(0) / k
    return n * (share * probs.mean(0)).sum()


def prompt_mask(batch: dict, eos_id: int | None) -> torch.Tensor:
    """The attention mask cut to each row's prompt: the tokens before its first supervised label.
    With causal attention the backbone's states there are those of the prompt read alone, so the
    router reads what it reads at inference. A row with no prompt (plain text, every token
    supervised) is read whole without the end-of-sequence token training appends to it, as
    inference reads a plain-text request."""
    mask = batch["attention_mask"]
    prompt = mask * ((batch["labels"] != IGNORE).long().cumsum(-1) == 0).long()
    text = mask.clone()
    last = mask.sum(-1) - 1  # right padding: each row's last real position
    rows = torch.arange(mask.shape[0], device=mask.device)
    ends_in_eos = (batch["input_ids"][rows, last] == eos_id) & (last > 0) if eos_id is not None \
        else torch.zeros_like(last, dtype=torch.bool)
    text[rows[ends_in_eos], last[ends_in_eos]] = 0
    return torch.where((prompt.sum(-1) == 0).unsqueeze(-1), text, prompt)


class MixtureObjective(Objective):
    """The stage's objective computed on the router's per-input mixture of the named experts, plus
    the load-balancing term over the inputs delegated sparsely. `model` is the unwrapped PeftModel
    (its LoRA layers carry the mixing hooks; the engine may call a DDP wrapper of it)."""

    def __init__(self, inner: Objective, model, router: Router, names: list[str], maturity: torch.Tensor, *,
                 threshold: float, top_k: int, balance: float, eos_id: int | None):
        self.inner, self.model, self.router, self.names, self.eos_id = inner, model, router, list(names), eos_id
        self.maturity, self.threshold, self.top_k, self.balance = maturity, threshold, top_k, balance
        self.name = f"{inner.name}+mixture"
        self.token_cross_entropy = inner.token_cross_entropy

    def tokenize(self, example, renderer):
        return self.inner.tokenize(example, renderer)

    def collate(self, items: list, pad_id: int) -> dict:
        return self.inner.collate(items, pad_id)

    def loss_weight(self, batch: dict) -> int | None:
        return self.inner.loss_weight(batch)

    def weights(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router probabilities, mixing weights, which rows are delegated sparsely); the first two
        carry the router's gradient."""
        feats = self.router.read(self.model, {"input_ids": batch["input_ids"], "attention_mask": prompt_mask(batch, self.eos_id)})
        probs = self.router.probs(feats.to(next(self.router.parameters()).device))
        sparse = self.maturity[probs.detach().argmax(-1)] >= self.threshold
        return probs, hybrid_weights(probs, self.maturity, self.threshold, self.top_k), sparse

    def __call__(self, model, batch: dict):
        probs, w, sparse = self.weights(batch)
        with mixing(self.model, self.names, w):
            loss, metrics, outputs = self.inner(model, batch)
        metrics["router/dense_share"] = float(1 - sparse.float().mean())
        if bool(sparse.any()) and self.balance > 0:
            term = load_balance(probs[sparse], self.top_k)
            metrics["router/load_balance"] = float(term.detach())
            loss = loss + self.balance * term.to(loss.device)
        return loss, metrics, outputs


@contextmanager
def synced_router_grads(router: Router, accelerator) -> Iterator[None]:
    """With several processes, each backward's router gradient is averaged over them (as DDP averages
    the model's), so every process steps the router alike: the router is not part of the wrapped
    model. Averaging each micro-batch's gradient is the same as averaging their sum."""
    if accelerator.num_processes == 1:
        yield
        return
    handles = [p.register_hook(lambda g: accelerator.reduce(g.contiguous(), reduction="mean"))
               for p in router.parameters()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
