"""Reuse-or-create on an unlabelled stream: synthetic measurements, then real chunks of three skills."""
from __future__ import annotations

import json

import pytest
import torch

from skillstream.errors import UserError
from skillstream.experts.novelty import NoveltyDetector
from skillstream.experts.router import Router, RouterTrainer, pooled_features
from skillstream.experts.signals import ExpertProfile, compute_signal, similarity
from skillstream.models.backbone import load_backbone
from test_experts_skills import SKILLS, one_thread, skill_texts  # noqa: F401


def test_decisions_on_a_synthetic_stream_of_measurements():
    det = NoveltyDetector(entropy_threshold=0.5, similarity_threshold=0.6, window=2)
    stream = [  # (entropy, best similarity, best expert)
        (None, None, None),          # 0 no experts yet -> create expert_0
        (None, 0.80, "expert_0"),    # 1 one expert, close profile -> reuse
        (None, 0.30, "expert_0"),    # 2 one odd chunk -> wait
        (None, 0.75, "expert_0"),    # 3 back to the skill -> reuse (streak resets, no expert created)
        (None, 0.20, "expert_0"),    # 4 new skill begins -> wait
        (None, 0.25, "expert_0"),    # 5 novel for `window` chunks -> create expert_1
        (0.10, 0.90, "expert_1"),    # 6 confident router and close profile -> reuse
        (0.90, 0.85, "expert_0"),    # 7 close profile but the router is unsure -> wait
        (0.05, 0.20, "expert_1"),    # 8 a confident router does not veto novelty -> wait (streak 1)
        (0.20, 0.10, "expert_1"),    # 9 -> create expert_2
    ]
    records = [det.observe(*m) for m in stream]
    assert [r["decision"] for r in records] == ["create", "reuse", "wait", "reuse", "wait", "create", "reuse",
                                                "wait", "wait", "create"]
    assert [r["expert"] for r in records] == ["expert_0"] * 5 + ["expert_1"] * 4 + ["expert_2"]
    assert [r["streak"] for r in records] == [1, 0, 1, 0, 1, 2, 0, 0, 1, 2]
    assert records[5] == {"chunk": 5, "entropy": None, "similarity": 0.25, "decision": "create", "expert": "expert_1",
                          "streak": 2, "entropy_threshold": 0.5, "similarity_threshold": 0.6, "window": 2}


def test_state_rides_in_json_and_resumes_the_same_decisions():
    stream = [(None, None, None), (None, 0.2, "expert_0"), (None, 0.1, "expert_0"), (0.1, 0.9, "expert_1")]
    whole = NoveltyDetector(similarity_threshold=0.5, window=2)
    expected = [whole.observe(*m) for m in stream]
    first = NoveltyDetector(similarity_threshold=0.5, window=2)
    first.observe(*stream[0])
    first.observe(*stream[1])                     # mid-streak
    resumed = NoveltyDetector()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.observe(*m) for m in stream[2:]] == expected[2:]
    assert resumed.state_dict() == whole.state_dict()


def test_calibrated_thresholds_follow_each_experts_own_spread():
    """An expert whose chunks all come back at ~0.97 takes a 0.90 chunk as novel; the absolute 0.85 would reuse."""
    det = NoveltyDetector(similarity_threshold=0.85, window=2, spread_z=2.0, min_spread=0.02)
    assert det.observe(None, None, None)["decision"] == "create"                 # expert_0
    for sim in (0.96, 0.98, 0.97):                                                # its own chunks
        assert det.observe(None, sim, "expert_0", {"expert_0": sim})["decision"] == "reuse"
    assert det.threshold("expert_0") == pytest.approx(0.97 - 2 * 0.02)           # std 0.01 < min_spread
    near = det.observe(None, 0.90, "expert_0", {"expert_0": 0.90})               # a related, new skill
    assert near["decision"] == "wait" and near["expert_thresholds"] == {"expert_0": 0.93}
    assert det.observe(None, 0.91, "expert_0", {"expert_0": 0.91})["decision"] == "create"  # expert_1
    # expert_1 has no history yet: the absolute threshold; a chunk passing only expert_1's reuses it,
    # though expert_0 is closer
    rec = det.observe(0.1, 0.92, "expert_0", {"expert_0": 0.92, "expert_1": 0.88})
    assert (rec["decision"], rec["expert"]) == ("reuse", "expert_1")
    # an unsure router makes a close chunk wait; it still trains the current expert, so it counts
    assert det.observe(0.9, 0.95, "expert_1", {"expert_0": 0.5, "expert_1": 0.95})["decision"] == "wait"
    assert det.history == {"expert_0": [0.96, 0.98, 0.97], "expert_1": [0.88, 0.95]}
    # the absolute threshold is a floor: a loose expert never accepts less than it
    loose = NoveltyDetector(similarity_threshold=0.85, spread_z=2.0, history={"e": [0.86, 0.99, 0.88]})
    assert loose.threshold("e") == 0.85
    # without spread_z the same measurements reuse at the absolute threshold (the old rule)
    plain = NoveltyDetector(similarity_threshold=0.85, window=2)
    plain.observe(None, None, None)
    assert plain.observe(None, 0.90, "expert_0", {"expert_0": 0.90})["decision"] == "reuse"


def test_thresholds_are_checked():
    with pytest.raises(UserError, match=r"entropy_threshold must be in \[0, 1\]"):
        NoveltyDetector(entropy_threshold=1.5)
    with pytest.raises(UserError, match="window must be at least 1"):
        NoveltyDetector(window=0)
    with pytest.raises(UserError, match="spread_z must be >= 0"):
        NoveltyDetector(spread_z=-1.0)


CHUNK, PER_SKILL = 16, 3


def test_real_chunks_create_one_expert_per_skill_at_the_boundaries():
    """bash, bash, bash, math, math, math, prose, prose, prose — no labels given to the learner.

    The learner computes each chunk's triple signal and router entropy, asks the detector, and
    then creates an expert (profile from the novel chunks, one more router row), reuses one
    (refresh its profile, train the router on the chunk), or waits (hold the chunk as a candidate).
    """
    model, tok = load_backbone("tiny", seed=0)
    stream = [(s, skill_texts(s, 120 + CHUNK * i, CHUNK)) for s in SKILLS for i in range(PER_SKILL)]
    det = NoveltyDetector(entropy_threshold=0.5, similarity_threshold=0.62, window=2)
    profiles: dict[str, ExpertProfile] = {}
    index: dict[str, int] = {}
    trainer = RouterTrainer(Router(64, 1, seed=0), feature_alpha=0.5, seed=0)
    held = []  # (signal, features) of the current novel streak
    records = []
    for skill, texts in stream:
        signal = compute_signal(model, tok, texts)
        feats = pooled_features(model, tok(texts, return_tensors="pt", padding=True))
        sims = {name: similarity(signal, p) for name, p in profiles.items()}
        best = max(sims, key=sims.get) if sims else None
        entropy = trainer.router.entropy(feats).mean().item() if len(profiles) >= 2 else None
        rec = det.observe(entropy, sims.get(best), best)
        records.append({**rec, "skill": skill})
        if rec["decision"] == "create":
            name = rec["expert"]
            profiles[name] = ExpertProfile(name)
            index[name] = trainer.add_expert() if index else 0
            chunks = held + [(signal, feats)]
            held = []
        elif rec["decision"] == "reuse":
            name, chunks, held = rec["expert"], [(signal, feats)], []
        else:
            held = held + [(signal, feats)] if rec["streak"] else []
            continue
        for sig, f in chunks:
            profiles[name].refresh(sig)
            for _ in range(20):
                trainer.step(f, index[name])

    for r in records:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if "threshold" not in k})
    decisions = [r["decision"] for r in records]
    created_at = [r["chunk"] for r in records if r["decision"] == "create"]
    # measured similarities: create, reuse 0.68, reuse 0.73, wait 0.28, create 0.28, reuse 0.97,
    # wait 0.59 (prose vs the bash profile: both English, just below the 0.62 threshold), create 0.56,
    # reuse 0.76; router entropy on the first prose chunk 0.50, on math after its expert 0.20
    assert len(profiles) == len(SKILLS)                       # experts created = skills in the stream
    assert created_at == [0, 4, 7]                            # boundaries 3 and 6, + window - 1
    assert decisions == ["create", "reuse", "reuse", "wait", "create", "reuse", "wait", "create", "reuse"]
    # every chunk that reused an expert went to the expert created for its own skill
    owner = {r["expert"]: r["skill"] for r in records if r["decision"] == "create"}
    assert all(owner[r["expert"]] == r["skill"] for r in records if r["decision"] == "reuse")
