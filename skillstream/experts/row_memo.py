"""A stream's evaluation of a task, used again where the same expert, unchanged, would answer it alone.

In a skill stream an old skill's expert usually trains no more once its stage is over, and the router
keeps sending that skill's prompts to it. Scoring the skill again after every later stage then repeats
one computation: the frozen backbone plus that expert, with weight exactly 1, on the same prompts.
`RowMemo` keeps, per task, the router's features of its prompts (the frozen backbone's, so the same
every time; see `FeatureCache`) and the last row one expert answered alone, with a digest of that
expert's weights. Before a task is scored again it routes those features with the router and maturity
of now: if every prompt goes to that same expert alone and its weights have the same digest, the
evaluation would compute what it computed then (greedy decoding, deterministic), so the earlier row is
returned, marked `"memo": true`. The oracle row of `_oracle_row` rests on the same argument.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..evaluation.memo import tensor_digest
from .mixing import hybrid_weights, lora_layers


def expert_digest(model, name: str) -> str:
    """A digest of every tensor of expert `name` (its LoRA A and B in every adapted layer) and of its scale
    in each of those layers (alpha / r, which PEFT's set_scale can change)."""
    h = hashlib.sha256()
    h.update(repr([float(layer.scaling[name]) for layer in lora_layers(model) if name in layer.scaling]).encode())
    for pname, p in model.named_parameters():
        if f".{name}." in pname and "lora_" in pname:
            h.update(f"{pname}:{tensor_digest(p)};".encode())
    return h.hexdigest()


@dataclass
class _Served:
    expert: str
    digest: str
    row: dict


class RowMemo:
    """Per task: its prompts' router features and the last row one expert answered alone."""

    def __init__(self) -> None:
        self.features: dict[str, list[torch.Tensor]] = {}  # batch by batch, as the router read them
        self.served: dict[str, _Served] = {}

    def lookup(self, task: str, model, router, names: list[str], maturity: torch.Tensor, threshold: float,
               top_k: int) -> dict | None:
        """The task's earlier row where routing now gives every prompt to that row's expert alone and
        the expert's weights are those it answered with; else None (the task is scored)."""
        feats, last = self.features.get(task), self.served.get(task)
        if feats is None or last is None or last.expert not in names or router.n_experts != len(names):
            return None
        alone = torch.zeros(len(names))
        alone[names.index(last.expert)] = 1.0
        with torch.no_grad():  # batch by batch, as `routed` computes them: the same numbers, not just close ones
            weights = [hybrid_weights(router.probs(f), maturity, threshold, top_k) for f in feats]
        if not all(bool((w == alone).all()) for w in weights) or expert_digest(model, last.expert) != last.digest:
            return None
        return {**last.row, "memo": True}

    def remember(self, task: str, model, features: list[torch.Tensor], row: dict) -> None:
        """After a task was scored routed: its prompts' features (batch by batch, in the order routed) and,
        where one expert answered every prompt alone, that row with the expert's digest."""
        if features:
            self.features[task] = list(features)
        expert = row.get("served_by")
        if expert is None:
            self.served.pop(task, None)
        else:
            self.served[task] = _Served(expert, expert_digest(model, expert), row)
