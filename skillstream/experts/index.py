"""Which experts a chunk is compared with in full: all of them, or an ANN index's nearest ones.

The full similarity (signals.py) is w_e cos(embedding) + w_g (cos(gradient) + cos(fisher)) / 2 +
w_c context, and its first two parts are one inner product: key = (ê, ĝ, f̂) for a profile (unit
parts), query = (w_e ê, w_g/2 ĝ, w_g/2 f̂) for a chunk. The context part (two scalars) is not, so the
index ranks experts by the inner-product part and the `candidates` best get the full similarity;
a pool below `exact_below` experts is compared in full, every expert (exact search).

The index is hnswlib's HNSW graph (inner-product space), rebuilt from the profiles in pool order
whenever one changed, single-threaded with a fixed seed: the same profiles give the same graph, so a
resumed run finds the same candidates as the uninterrupted one (an index updated in place would
depend on the order of past updates). A rebuild of a few hundred profiles costs milliseconds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from .signals import ExpertProfile, SimilarityWeights, TaskSignal


def key_vector(signal: TaskSignal) -> torch.Tensor:
    return torch.cat([F.normalize(signal.embedding.float(), dim=0), F.normalize(signal.gradient.float(), dim=0),
                      F.normalize(signal.fisher.float(), dim=0)])


def query_vector(signal: TaskSignal, weights: SimilarityWeights) -> torch.Tensor:
    return torch.cat([weights.embedding * F.normalize(signal.embedding.float(), dim=0),
                      weights.gradient / 2 * F.normalize(signal.gradient.float(), dim=0),
                      weights.gradient / 2 * F.normalize(signal.fisher.float(), dim=0)])


class ProfileIndex:
    def __init__(self, weights: SimilarityWeights, *, kind: str = "hnsw", exact_below: int = 32, candidates: int = 8,
                 ef: int = 64, m: int = 16, seed: int = 0):
        if kind not in ("exact", "hnsw"):
            raise UserError(f"experts.index.kind must be 'exact' or 'hnsw', got {kind!r}")
        self.weights, self.kind, self.exact_below, self.k = weights, kind, exact_below, candidates
        self.ef, self.m, self.seed = ef, m, seed
        self.names: list[str] = []
        self.graph = None
        self.stale = True

    def invalidate(self) -> None:
        """A profile changed, or an expert came or went: the next query rebuilds the index."""
        self.stale = True

    def uses_ann(self, n_profiles: int) -> bool:
        return self.kind == "hnsw" and n_profiles >= self.exact_below

    def _rebuild(self, profiles: dict[str, ExpertProfile]) -> None:
        try:
            import hnswlib  # the [ann] extra: needed only once a pool reaches exact_below experts
        except ImportError:
            raise UserError(f"experts.index.kind: hnsw needs hnswlib once the pool has {self.exact_below} experts "
                            "(pip install 'skillstream[ann]'), or set experts.index.kind: exact") from None

        self.names = [n for n, p in profiles.items() if p.signal is not None]
        keys = torch.stack([key_vector(profiles[n].signal) for n in self.names]).numpy()
        graph = hnswlib.Index(space="ip", dim=keys.shape[1])
        graph.init_index(max_elements=len(self.names), M=self.m, ef_construction=max(self.ef, self.k),
                         random_seed=self.seed)
        graph.set_num_threads(1)  # deterministic construction
        graph.add_items(keys, list(range(len(self.names))))
        graph.set_ef(max(self.ef, self.k))
        self.graph, self.stale = graph, False

    def candidates(self, signal: TaskSignal, profiles: dict[str, ExpertProfile]) -> list[str]:
        """The experts whose full similarity to the chunk is computed (every one below exact_below)."""
        ready = [n for n, p in profiles.items() if p.signal is not None]
        if not self.uses_ann(len(ready)) or len(ready) <= self.k:
            return ready
        if self.stale or self.graph is None:
            self._rebuild(profiles)
        labels, _ = self.graph.knn_query(query_vector(signal, self.weights).numpy()[None], k=self.k)
        return [self.names[i] for i in labels[0].tolist()]
