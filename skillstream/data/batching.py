"""Seeded, resumable batch order with length grouping, and padding collation.

The order of epoch e is a pure function of (seed, e), so a run resumed at (epoch, batch) sees
exactly the batches the uninterrupted run would have seen. Batches are planned at the global
size (per-process batch x processes) and sliced per process, so 1 and N processes see the same
global batches.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import torch

from .render import IGNORE, Tokenized


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0


def item_length(item) -> int:
    """Tokens in an item: `length` if the objective's item defines it (DPO pairs), else its input_ids."""
    return getattr(item, "length", None) or len(item.input_ids)


class BatchPlan:
    def __init__(self, sources: list[list[Tokenized]], weights: list[float], batch_size: int, seed: int,
                 length_grouped: bool = True, group_factor: int = 16):
        self.sources, self.weights = list(sources), weights  # a copy: hold_out() replaces entries
        self._index()
        self.batch_size, self.seed = batch_size, seed
        self.length_grouped, self.group_factor = length_grouped, group_factor
        self.mixed = False  # set_weights() switches to run-time mixing
        # held out of training by the stage (data.validation_fraction): early stopping and the held-out
        # preference score read them; never trained on
        self.validation: list[Tokenized] = []
        self.validation_examples: list = []
        self.validation_sources: list[str] = []  # the `source` of the training source each held-out example came from

    def _index(self) -> None:
        """The flat list of items and where each source starts in it (batches hold flat indices)."""
        self.items = [t for src in self.sources for t in src]
        self.offsets = [sum(len(s) for s in self.sources[:i]) for i in range(len(self.sources))]

    def set_weights(self, weights: list[float]) -> None:
        """Mix the sources by these weights from now on (a curriculum that re-weights at run time).

        In this mode batch b of block e is drawn from the mixture with Random(seed:mix:e:b) under the
        weights in force when it is drawn: source by weight, then an example of that source
        uniformly, with replacement. A block has as many batches as an epoch of the plain plan. The
        batches are a pure function of (seed, position, weights), so a resumed run that restores
        the weights sees exactly the batches of the uninterrupted run. The switch happens at the
        next block boundary when made mid-epoch (make it before iterating, as plugins do in
        before_stage)."""
        if len(weights) != len(self.sources) or any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be {len(self.sources)} non-negative numbers, not all 0 (got {weights})")
        self.weights, self.mixed = [float(w) for w in weights], True

    def hold_out(self, source: int, indices: list[int]) -> list[Tokenized]:
        """Remove these examples of one source from training and return them (a probe that must
        measure what the model generalises to, not what it memorised). Call before iterating."""
        drop = set(indices)
        src = self.sources[source]
        if not drop or len(drop) >= len(src):
            raise ValueError(f"cannot hold out {len(drop)} of the {len(src)} examples of source {source}")
        taken = [src[j] for j in sorted(drop)]
        self.sources[source] = [t for j, t in enumerate(src) if j not in drop]
        self._index()
        return taken

    def _mixed_batch(self, epoch: int, b: int) -> list[int]:
        rng = random.Random(f"{self.seed}:mix:{epoch}:{b}")
        picks = rng.choices(range(len(self.sources)), weights=self.weights, k=self.batch_size)
        return [self.offsets[s] + rng.randrange(len(self.sources[s])) for s in picks]

    def _epoch_indices(self, rng: random.Random) -> list[int]:
        if len(set(self.weights)) <= 1:
            idx = list(range(len(self.items)))
            rng.shuffle(idx)
            return idx
        # Weighted mixing: each source contributes in proportion to its weight per epoch,
        # cycling through a fresh permutation of a small source when it must repeat.
        total, wsum, idx = len(self.items), sum(self.weights), []
        for src, w, off in zip(self.sources, self.weights, self.offsets):
            want = max(1, round(total * w / wsum))
            pool: list[int] = []
            while len(pool) < want:
                perm = list(range(len(src)))
                rng.shuffle(perm)
                pool += perm
            idx += [off + i for i in pool[:want]]
        rng.shuffle(idx)
        return idx

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        idx = self._epoch_indices(rng)
        if self.length_grouped:
            chunk = self.batch_size * self.group_factor
            grouped = []
            for start in range(0, len(idx), chunk):
                grouped += sorted(idx[start:start + chunk], key=lambda i: -item_length(self.items[i]))
            batches = [grouped[i:i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
            rng.shuffle(batches)
        else:
            batches = [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        return [b for b in batches if len(b) == self.batch_size] or batches[:1]

    def iterate(self, pos: Position):
        """Yield (global batch indices, position after it) forever, starting at pos."""
        epoch, start = pos.epoch, pos.batch
        while True:
            if self.mixed:  # weights are read as each batch is drawn
                for b in range(start, max(1, len(self.items) // self.batch_size)):
                    yield self._mixed_batch(epoch, b), Position(epoch, b + 1)
            else:
                batches = self.epoch(epoch)
                for b in range(start, len(batches)):
                    yield batches[b], Position(epoch, b + 1)
            epoch, start = epoch + 1, 0


def token_pieces(items: list, max_tokens: int | None) -> list[list]:
    """A micro-batch's items cut into pieces of at most `max_tokens` padded tokens (rows x longest),
    longest first: the pieces of a length-grouped batch pad no more than the batch did. An item
    longer than the cap is a piece alone; None: one piece, the items as they are."""
    if max_tokens is None or len(items) * max(item_length(t) for t in items) <= max_tokens:
        return [items]
    pieces: list[list] = []
    for item in sorted(items, key=lambda t: -item_length(t)):  # stable: equal lengths keep their order
        if pieces and (len(pieces[-1]) + 1) * item_length(pieces[-1][0]) <= max_tokens:
            pieces[-1].append(item)
        else:
            pieces.append([item])
    return pieces


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    return pad_batch([t.input_ids for t in items], [t.labels for t in items], pad_id)


def device_batches(items: list[Tokenized], pad_id: int, batch_size: int, device) -> Iterator[dict[str, torch.Tensor]]:
    """`items` collated `batch_size` at a time and moved to `device`: the batches of the scoring loops."""
    for i in range(0, len(items), batch_size):
        yield {k: v.to(device) for k, v in collate(items[i:i + batch_size], pad_id).items()}


def pad_batch(input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Sequences padded on the right to the longest: input_ids (pad_id), labels (IGNORE) and
    attention_mask (1 on the sequence, 0 on padding), each (len(input_ids), longest)."""
    width = max(len(s) for s in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    padded_labels = torch.full((len(input_ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(input_ids, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        padded_labels[i, :len(s)] = torch.tensor(lab)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "labels": padded_labels, "attention_mask": mask}


def left_pad(input_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) padded on the left to the longest, so that every sequence ends at
    the last position (where generation and option scoring go on)."""
    width = max(len(s) for s in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for i, s in enumerate(input_ids):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask
