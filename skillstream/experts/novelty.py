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

Calibrated thresholds (`spread_z` set): how close a chunk of a known skill comes to its expert's
profile depends on the stream (examples per signal, how varied one skill's inputs are), so one
absolute threshold cannot fit every stream. Each expert then remembers the similarity of every
chunk it took as its own (a reuse, or a wait on an unsure router that trains the current expert;
measured before the chunk refreshed the profile) and its own threshold is

    threshold(E) = max(similarity_threshold, mean_E - spread_z * max(std_E, min_spread))

(std with one remembered chunk: min_spread; none yet: the absolute threshold). A chunk is novel
when it is below the threshold of every expert; it reuses the closest expert whose threshold it
passes. The absolute threshold stays a floor, so calibration only makes a tight skill stricter.

Why low router entropy does not veto novelty: a softmax router is confident on inputs unlike
anything it was trained on, so a confident route says little about novelty; the similarity to the
profiles is the direct evidence. Entropy guards reuse instead: an unsure router means the chunk
sits between experts. The very first chunk (no experts yet) creates at once. Every decision record
carries the thresholds, so the log says why each decision was taken.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, fields

from ..errors import UserError


@dataclass
class NoveltyDetector:
    entropy_threshold: float = 0.5
    similarity_threshold: float = 0.5
    window: int = 2
    prefix: str = "expert_"
    spread_z: float | None = None  # calibrated per-expert thresholds (module docstring); None = absolute only
    min_spread: float = 0.01
    streak: int = 0            # consecutive novel chunks so far
    created: int = 0           # experts this detector has created (names prefix0, prefix1, ...)
    current: str | None = None # the expert being trained
    chunks: int = 0            # chunks observed
    history: dict[str, list[float]] = field(default_factory=dict)  # similarities of the chunks each expert took as its own

    def __post_init__(self):
        if not 0.0 <= self.entropy_threshold <= 1.0:
            raise UserError(f"novelty entropy_threshold must be in [0, 1], got {self.entropy_threshold}")
        if self.window < 1:
            raise UserError(f"novelty window must be at least 1, got {self.window}")
        if self.spread_z is not None and (self.spread_z < 0 or self.min_spread <= 0):
            raise UserError(f"novelty spread_z must be >= 0 and min_spread > 0, got {self.spread_z}, {self.min_spread}")

    def threshold(self, expert: str) -> float:
        """The similarity a chunk needs to reuse `expert` (absolute, or calibrated on its history)."""
        seen = self.history.get(expert, [])
        if self.spread_z is None or not seen:
            return self.similarity_threshold
        spread = max(statistics.stdev(seen) if len(seen) > 1 else 0.0, self.min_spread)
        return max(self.similarity_threshold, statistics.fmean(seen) - self.spread_z * spread)

    def observe(self, entropy: float | None, similarity: float | None, best_expert: str | None,
                similarities: dict[str, float] | None = None, reusable: dict[str, float] | None = None) -> dict:
        """Decide for the next chunk; returns {chunk, entropy, similarity, decision, expert, streak, thresholds}.

        `similarities` (every expert's, best included) is needed for calibrated thresholds; without it
        only the best expert is compared, with its own threshold. `reusable` replaces the thresholds and
        the entropy guard by another decider's verdict (calibration.py): the experts the chunk may reuse,
        each with its score (the highest is reused); the window and the held-back chunks stay the same.
        """
        chunk, self.chunks = self.chunks, self.chunks + 1
        sims = similarities if similarities else ({best_expert: similarity} if best_expert is not None else {})
        thresholds = {e: self.threshold(e) for e in sims}  # before this chunk joins a history
        passing = ({e: s for e, s in sims.items() if s is not None and s >= thresholds[e]} if reusable is None
                   else dict(reusable))
        if similarity is None or best_expert is None:  # nothing to reuse yet
            streak, decision = 1, "create"
        elif not passing:
            streak = self.streak + 1
            decision = "create" if streak >= self.window else "wait"
        elif reusable is not None or entropy is None or entropy <= self.entropy_threshold:
            streak, decision, self.current = 0, "reuse", max(passing, key=passing.get)
        else:
            streak, decision = 0, "wait"
        if self.spread_z is not None and decision != "create" and streak == 0 and self.current in passing:
            # the chunk trains the current expert as one of its own (a reuse, or a wait on an unsure
            # router): its similarity calibrates that expert's threshold
            self.history.setdefault(self.current, []).append(float(sims[self.current]))
        if decision == "create":
            self.current, self.created = f"{self.prefix}{self.created}", self.created + 1
        self.streak = 0 if decision == "create" else streak
        record = {"chunk": chunk, "entropy": entropy, "similarity": similarity, "decision": decision,
                  "expert": self.current, "streak": streak, "entropy_threshold": self.entropy_threshold,
                  "similarity_threshold": self.similarity_threshold, "window": self.window}
        if self.spread_z is not None:  # the calibrated thresholds this decision used
            record["expert_thresholds"] = {e: round(t, 4) for e, t in thresholds.items()}
        return record

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        known = {f.name for f in fields(self)}
        for key, value in state.items():
            if key in known:
                setattr(self, key, value)
        self.__post_init__()
