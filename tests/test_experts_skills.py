"""Three real, distinct "skills" for the expert tests, from data every install has.

- bash:  NL2Bash requests (the nl2bash builtin, from the icalfa package),
- math:  arithmetic questions generated from a seed,
- prose: long English sentences from Python's own documentation (pydoc_data.topics).

Other test_experts_* files import `skill_texts` and the `one_thread` fixture from here; the test
below pins down the data.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache

import pytest
import torch

from skillstream.config import SourceConfig
from skillstream.data.examples import load_examples

SKILLS = ("bash", "math", "prose")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The expert tests run many tiny ops; on a shared, busy CPU one thread is ~30x faster than
    several threads waiting on each other. Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@lru_cache(maxsize=None)
def _all_texts() -> dict[str, tuple[str, ...]]:
    bash = [ex.prompt for ex in load_examples(SourceConfig(source="nl2bash"))]
    rng = random.Random(0)
    # short questions (about 9 tokens): styles that differ in length too, as real skills do
    math = [f"What is {rng.randint(2, 999)} {rng.choice('+-*')} {rng.randint(2, 999)}?" for _ in range(240)]
    from pydoc_data.topics import topics
    prose = []
    for key in sorted(topics):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(topics[key].split())):
            # plain sentences only: no code, markup or parentheses
            if 90 <= len(s) <= 220 and re.match(r"^[A-Z][a-z]", s) and not re.search(r"[{}\[\]()=<>*`'\"]", s):
                prose.append(s)
    # shuffled (seeded) so that any range of a skill is a random sample of it, not one NL2Bash file
    random.Random(1).shuffle(prose)
    random.Random(2).shuffle(bash)
    return {"bash": tuple(bash), "math": tuple(math), "prose": tuple(prose[:240])}


def skill_texts(skill: str, start: int = 0, n: int = 16) -> list[str]:
    """n texts of one skill from position `start` (disjoint ranges give disjoint batches)."""
    return list(_all_texts()[skill][start:start + n])


def test_three_skills_are_distinct_and_large_enough():
    texts = _all_texts()
    assert [len(texts[s]) for s in SKILLS] == [240, 240, 240]
    assert not set(texts["bash"]) & set(texts["prose"])
    assert "list files in the current directory" in texts["bash"]
    assert all(any(c.isdigit() for c in t) for t in texts["math"])
