"""Each expert's own held-out examples, and its loss on them.

Of every chunk an expert trains on, `holdout` examples (a seeded choice per chunk) are kept out of
its training and join its held-out set, up to `capacity` (the first ones: a full set stays fixed).
After a training round the expert's loss on the examples that were in its set BEFORE the round,
compared with the loss on the same examples before it, is the round's change: the trend maturity
reads (pool.py), and the outcome of a reuse the calibrated decider learns from (calibration.py).
The per-example losses are the LM loss on the labelled tokens, the objective the expert trains on
(objectives/lm.per_example_loss).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..data.batching import device_batches
from ..data.render import Tokenized
from ..models.modes import eval_mode
from ..objectives.lm import labelled_logits


@dataclass
class HeldOut:
    holdout: int = 0           # examples held out of each chunk (0: off)
    capacity: int = 8          # examples kept per expert
    seed: int = 0
    sets: dict[str, list[Tokenized]] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.holdout > 0

    def split(self, chunks: list[tuple[int, list[Tokenized]]]) -> tuple[list[Tokenized], list[Tokenized]]:
        """(training items, held-out items) of the chunks (index, items) a round trains on. A chunk
        always keeps at least one training example; the choice is seeded by the chunk's index."""
        train, held = [], []
        for index, items in chunks:
            n = min(self.holdout, len(items) - 1)
            order = list(range(len(items)))
            random.Random(f"{self.seed}:holdout:{index}").shuffle(order)
            out = set(order[:n])
            held += [it for i, it in enumerate(items) if i in out]
            train += [it for i, it in enumerate(items) if i not in out]
        return train, held

    def add(self, name: str, items: list[Tokenized]) -> None:
        kept = self.sets.setdefault(name, [])
        kept += items[:max(0, self.capacity - len(kept))]

    def of(self, name: str) -> list[Tokenized]:
        return list(self.sets.get(name, []))

    def merge(self, names: list[str], into: str) -> None:
        """The held-out sets of merged experts become the merged expert's (up to capacity)."""
        items = [it for n in names for it in self.sets.pop(n, [])]
        self.sets[into] = items[:self.capacity]

    def drop(self, name: str) -> None:
        self.sets.pop(name, None)

    def state_dict(self) -> dict:
        return {n: [[it.input_ids, it.labels, it.truncated] for it in items] for n, items in self.sets.items()}

    def load_state_dict(self, state: dict) -> None:
        self.sets = {n: [Tokenized(list(a), list(b), bool(t)) for a, b, t in items] for n, items in state.items()}


@torch.no_grad()
def output_divergence(model, names: tuple[str, str], items: list[Tokenized], pad_id: int,
                      batch_size: int = 8) -> float:
    """Mean per-token symmetric KL divergence (nats) of two experts' next-token distributions on the
    items' labelled positions: how far their outputs are apart (0 = the same function there)."""
    total, tokens = 0.0, 0
    with eval_mode(model):
        for batch in device_batches(items, pad_id, batch_size, next(model.parameters()).device):
            logp = []
            for name in names:
                model.set_adapter(name)
                logits, _, _, _ = labelled_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
                logp.append(logits.log_softmax(-1))
            a, b = logp
            total += float(((a.exp() - b.exp()) * (a - b)).sum())  # KL(a||b) + KL(b||a), summed over positions
            tokens += a.shape[0]
    return total / max(tokens, 1)
