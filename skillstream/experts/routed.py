"""Task-agnostic inference: the router picks each input's experts inside any forward or `generate`.

`routed(model, router, names, maturity, ...)` is a context manager. Inside it, every forward pass
that starts a new sequence (no KV cache yet: a generate's prefill, option scoring's prompt pass,
a perplexity pass) reads the frozen backbone's features of its inputs (`Router.read`), asks the router for
per-sample probabilities, turns them into mixing weights with the hybrid policy (a sample whose
top expert is mature is delegated to its top-k experts; otherwise it is served by the dense mix),
and keeps them for the cached decoding steps that follow. With `expert=NAME` every sample is
answered by that expert alone (the oracle / a user's choice). `Routing.choices` records, per
sample, the weights used, so callers can show which experts answered. With `features=` a
`FeatureCache`, a batch the router has read before is not read again.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import UserError
from ..evaluation.memo import tensor_digest
from .mixing import hybrid_weights, mixing, one_hot
from .router import Router, depths_of


@dataclass
class Routing:
    names: list[str]
    choices: list[list[float]] = field(default_factory=list)  # one row of weights per new sequence
    features: list[torch.Tensor] = field(default_factory=list)  # the router's features, batch by batch

    def top(self) -> list[str]:
        return [self.names[max(range(len(w)), key=w.__getitem__)] for w in self.choices]

    def describe(self, row: int = -1) -> str:
        w = self.choices[row]
        parts = sorted(((v, n) for n, v in zip(self.names, w) if v >= 0.005), reverse=True)
        return ", ".join(f"{n} {v:.2f}" for v, n in parts)


class FeatureCache:
    """The router's features of the batches it has read, for a backbone that does not change.

    The router reads the frozen backbone alone (adapters off), so the same token ids and mask give the
    same features every time. A skill stream scores every task after every stage on the same batches:
    with the cache only the first of those evaluations pays the router's pass through the backbone (to
    its deepest depth); the later ones route from the features kept here, the same numbers, so the same
    choices. Only for a frozen backbone: stream_run makes one per run where `model.freeze_backbone`."""

    def __init__(self) -> None:
        self._features: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._features)

    def read(self, router: Router, model, batch: dict) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        key = (router.pooling, depths_of(router.depth), tensor_digest(ids),
               None if mask is None else tensor_digest(mask))
        if key not in self._features:
            self._features[key] = router.read(model, batch).cpu()
        return self._features[key]


def _cache_len(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


@contextmanager
def routed(model, router: Router | None, names: list[str], maturity: torch.Tensor | None = None, *,
           threshold: float = 0.5, top_k: int = 1, expert: str | None = None,
           features: FeatureCache | None = None) -> Iterator[Routing]:
    if expert is not None and expert not in names:
        raise UserError(f"unknown expert {expert!r}; the run has {names}")
    if expert is None and (router is None or router.n_experts != len(names)):
        raise ValueError(f"routed: the router scores {getattr(router, 'n_experts', 0)} experts, the pool has {len(names)}")
    maturity = torch.ones(len(names)) if maturity is None else maturity
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    routing = Routing(list(names))
    with mixing(model, names) as mix:
        def choose(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            if ids is None:
                raise ValueError("routed: the model was called without input_ids")
            if _cache_len(kwargs.get("past_key_values")) == 0:  # a new sequence: route it
                if expert is not None:
                    w = one_hot(torch.full((ids.shape[0],), names.index(expert)), len(names))
                else:
                    mix.paused = True  # the router reads the backbone alone
                    try:
                        batch = {"input_ids": ids, "attention_mask": mask}
                        feats = router.read(model, batch) if features is None else features.read(router, model, batch)
                    finally:
                        mix.paused = False
                    routing.features.append(feats.cpu())
                    with torch.no_grad():
                        w = hybrid_weights(router.probs(feats.cpu()), maturity, threshold, top_k)
                routing.choices += w.tolist()
                mix.weights = w
            elif mix.weights is not None and mix.weights.shape[0] != ids.shape[0]:
                # option scoring repeats each prompt's cache once per option
                mix.weights = mix.weights.repeat_interleave(ids.shape[0] // mix.weights.shape[0], 0)
            return None

        handle = hf.register_forward_pre_hook(choose, with_kwargs=True)
        try:
            yield routing
        finally:
            handle.remove()
