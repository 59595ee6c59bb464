"""Reuse-or-create decisions on an unlabelled stream of chunks.

For each chunk the caller measures the router's normalised entropy (0 = certain, 1 = uniform;
None while the router has fewer than two experts and cannot express a choice) and the best
similarity of the chunk's signal to the expert profiles (None while there are no experts). Then:

- novel  = similarity < similarity_threshold: no expert's profile is close. The streak of
           consecutive novel chunks grows; when it reaches `window` -> "create" a new expert,
           before that -> "wait" (keep training the current expert: one odd chunk is not a skill).
- match  = similarity >= similarity_threshold and (entropy is None or entropy <= entropy_threshold)
           -> "reuse" the best expert; the streak restarts.
- otherwise (similar to a profile, but the router is unsure between experts) -> "wait"; the
           streak restarts, since a chunk that resembles a known skill is not novel.

Why low router entropy does not veto novelty: a softmax router is confident on inputs unlike
anything it was trained on, so a confident route says little about novelty; the similarity to the
profiles is the direct evidence. Entropy guards reuse instead: an unsure router means the chunk
sits between experts. The very first chunk (no experts yet) creates at once. Every decision record
carries the thresholds, so the log says why each decision was taken.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import UserError


@dataclass
class NoveltyDetector:
    entropy_threshold: float = 0.5
    similarity_threshold: float = 0.5
    window: int = 2
    prefix: str = "expert_"
    streak: int = 0            # consecutive novel chunks so far
    created: int = 0           # experts this detector has created (names prefix0, prefix1, ...)
    current: str | None = None # the expert being trained
    chunks: int = 0            # chunks observed

    def __post_init__(self):
        if not 0.0 <= self.entropy_threshold <= 1.0:
            raise UserError(f"novelty entropy_threshold must be in [0, 1], got {self.entropy_threshold}")
        if self.window < 1:
            raise UserError(f"novelty window must be at least 1, got {self.window}")

    def observe(self, entropy: float | None, similarity: float | None, best_expert: str | None) -> dict:
        """Decide for the next chunk; returns {chunk, entropy, similarity, decision, expert, streak, thresholds}."""
        chunk, self.chunks = self.chunks, self.chunks + 1
        if similarity is None or best_expert is None:  # nothing to reuse yet
            streak, decision = 1, "create"
        elif similarity < self.similarity_threshold:
            streak = self.streak + 1
            decision = "create" if streak >= self.window else "wait"
        elif entropy is None or entropy <= self.entropy_threshold:
            streak, decision, self.current = 0, "reuse", best_expert
        else:
            streak, decision = 0, "wait"
        if decision == "create":
            self.current, self.created = f"{self.prefix}{self.created}", self.created + 1
        self.streak = 0 if decision == "create" else streak
        return {"chunk": chunk, "entropy": entropy, "similarity": similarity, "decision": decision,
                "expert": self.current, "streak": streak, "entropy_threshold": self.entropy_threshold,
                "similarity_threshold": self.similarity_threshold, "window": self.window}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        known = {f.name for f in fields(self)}
        for key, value in state.items():
            if key in known:
                setattr(self, key, value)
        self.__post_init__()
