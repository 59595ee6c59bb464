"""The profile index: every expert below `exact_below`, an HNSW graph's nearest ones above it, which
contain the expert the full similarity would pick, and the same ones for the same profiles."""
from __future__ import annotations

import torch

from skillstream.experts.index import ProfileIndex, key_vector, query_vector
from skillstream.experts.signals import ExpertProfile, SimilarityWeights, TaskSignal, similarity

WEIGHTS = SimilarityWeights(0.4, 0.4, 0.2)


def random_signal(g: torch.Generator, dim: int = 96) -> TaskSignal:
    return TaskSignal(torch.randn(dim, generator=g), torch.randn(32, generator=g), torch.randn(32, generator=g),
                      2.0, 40.0, 8)


def near(s: TaskSignal, g: torch.Generator, noise: float = 0.3) -> TaskSignal:
    jitter = lambda t: t + noise * t.norm() / t.numel() ** 0.5 * torch.randn(t.shape, generator=g)  # noqa: E731
    return TaskSignal(jitter(s.embedding), jitter(s.gradient), jitter(s.fisher), 2.0, 40.0, 8)


def profiles(n: int, seed: int = 0) -> dict[str, ExpertProfile]:
    g = torch.Generator().manual_seed(seed)
    return {f"e{i}": ExpertProfile(f"e{i}", random_signal(g)) for i in range(n)}


def test_the_inner_product_part_is_the_similarity_without_context():
    g = torch.Generator().manual_seed(1)
    a, b = random_signal(g), random_signal(g)
    ip = float(query_vector(a, WEIGHTS) @ key_vector(b))
    assert abs(ip + WEIGHTS.context * 1.0 - similarity(a, b, WEIGHTS)) < 1e-5  # equal context stats: context = 1


def test_below_exact_below_every_expert_is_a_candidate():
    pool = profiles(20)
    index = ProfileIndex(WEIGHTS, exact_below=32, candidates=4)
    assert index.candidates(pool["e3"].signal, pool) == list(pool)
    assert ProfileIndex(WEIGHTS, kind="exact", exact_below=2, candidates=4).candidates(pool["e3"].signal, pool) == list(pool)


def test_above_it_the_index_returns_the_best_expert_among_few_and_deterministically():
    pool = profiles(300)
    index = ProfileIndex(WEIGHTS, exact_below=32, candidates=8)
    again = ProfileIndex(WEIGHTS, exact_below=32, candidates=8)
    g = torch.Generator().manual_seed(7)
    found = 0
    for i in range(0, 300, 10):
        query = near(pool[f"e{i}"].signal, g)
        exact = max(pool, key=lambda n: similarity(query, pool[n], WEIGHTS))
        got = index.candidates(query, pool)
        assert len(got) == 8 and got == again.candidates(query, pool)
        found += exact in got
    assert found == 30  # recall of the exact best over 30 queries
    index.invalidate()
    assert index.candidates(query, pool) == again.candidates(query, pool)  # rebuilt from the same profiles
