"""The sequence-level router: pooled frozen-backbone features, grown one expert at a time, with and
without feature replay, on three real skills (bash requests, arithmetic, documentation prose)."""
from __future__ import annotations

import math

import pytest
import torch

from skillstream.config import LoraConfig, RecipeConfig
from skillstream.experts.router import Router, RouterTrainer, normalized_entropy, pooled_features
from skillstream.models.backbone import load_backbone
from skillstream.model_setup import attach_lora
from test_experts_skills import SKILLS, one_thread, skill_texts  # noqa: F401

N_TRAIN, N_TEST, BATCH, EPOCHS = 160, 80, 16, 3


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny", seed=0)


@pytest.fixture(scope="module")
def features(tiny):
    model, tok = tiny

    def feats(skill, start, n):
        return pooled_features(model, tok(skill_texts(skill, start, n), return_tensors="pt", padding=True))

    return {s: (feats(s, 0, N_TRAIN), feats(s, N_TRAIN, N_TEST)) for s in SKILLS}


def train_sequentially(features, kind="linear", feature_alpha=0.5) -> RouterTrainer:
    """Skill 1 with one expert, then add expert 2 and train on skill 2 only, then skill 3."""
    trainer = RouterTrainer(Router(64, 1, kind=kind, seed=0), feature_alpha=feature_alpha, seed=0)
    for expert, skill in enumerate(SKILLS):
        if expert:
            trainer.add_expert()
        train = features[skill][0]
        for _ in range(EPOCHS):
            for i in range(0, N_TRAIN, BATCH):
                trainer.step(train[i:i + BATCH], expert)
    return trainer


@torch.no_grad()
def accuracy(router: Router, features) -> list[float]:
    return [round((router(features[s][1]).argmax(-1) == e).float().mean().item(), 3) for e, s in enumerate(SKILLS)]


def joint_ceiling(features, kind="linear") -> list[float]:
    """The same router and steps, trained on all three skills at once: what the features allow."""
    router = Router(64, 3, kind=kind, seed=0)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(EPOCHS * 3):
        for i in range(0, N_TRAIN, BATCH):
            x = torch.cat([features[s][0][i:i + BATCH] for s in SKILLS])
            y = torch.arange(3).repeat_interleave(len(x) // 3)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(router(x), y).backward()
            opt.step()
    return accuracy(router, features)


def test_pooled_features_ignore_padding_and_adapters(tiny):
    model, tok = tiny
    texts = ["list files", "What is 2 + 2? And what is 3 + 3?"]
    together = pooled_features(model, tok(texts, return_tensors="pt", padding=True))
    alone = pooled_features(model, tok(texts[:1], return_tensors="pt"))
    assert (together[0] - alone[0]).abs().max().item() < 1e-5
    # with a trained-looking LoRA active, the router still sees the frozen backbone, and the
    # adapters' requires_grad flags (set for training) survive the call
    fresh, _ = load_backbone("tiny", seed=0)
    peft_model = attach_lora(fresh, RecipeConfig(name="t", lora=LoraConfig(r=4)))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    via_peft = pooled_features(peft_model, tok(texts, return_tensors="pt", padding=True))
    assert torch.allclose(via_peft, together, atol=1e-5)
    assert flags == {n: p.requires_grad for n, p in peft_model.named_parameters()}


def test_last_token_features_at_a_depth_are_that_layers_state_whatever_the_padding(tiny):
    model, tok = tiny
    texts = ["list files", "What is 2 + 2? And what is 3 + 3?"]
    n_layers = model.config.num_hidden_layers
    depth = 0.5
    layer = round(depth * n_layers)  # hidden_states[layer] is the output of that many decoder layers
    for side in ("left", "right"):
        tok.padding_side = side
        batch = tok(texts, return_tensors="pt", padding=True)
        feats = pooled_features(model, batch, pooling="last", depth=depth)
        for i, text in enumerate(texts):
            alone = model.model(**tok([text], return_tensors="pt"), output_hidden_states=True).hidden_states[layer][0, -1]
            assert torch.allclose(feats[i], alone, atol=1e-5), side
    tok.padding_side = "right"
    # depth 1.0 is the final normed output, as before; a router remembers how it reads
    full = pooled_features(model, tok(texts, return_tensors="pt", padding=True), pooling="last")
    assert not torch.allclose(full, feats)
    router = Router(full.shape[1], 2, pooling="last", depth=depth)
    assert Router(**router.config()).read(model, tok(texts[:1], return_tensors="pt")).shape == (1, full.shape[1])
    with pytest.raises(Exception, match="depth must be in"):
        Router(8, 2, depth=1.5)


def test_several_depths_concatenate_each_depths_features_and_each_block_is_normalised_alone(tiny):
    model, tok = tiny
    batch = tok(["list files", "What is 2 + 2? And what is 3 + 3?"], return_tensors="pt", padding=True)
    one = {d: pooled_features(model, batch, pooling="last", depth=d) for d in (0.25, 0.5, 1.0)}
    both = pooled_features(model, batch, pooling="last", depth=[0.25, 0.5])
    assert torch.allclose(both, torch.cat([one[0.25], one[0.5]], -1), atol=1e-6)
    with_final = pooled_features(model, batch, pooling="last", depth=[0.5, 1.0])  # 1.0: the whole stack runs
    assert torch.allclose(with_final, torch.cat([one[0.5], one[1.0]], -1), atol=1e-6)
    router = Router(both.shape[1], 3, pooling="last", depth=[0.25, 0.5], seed=0)
    again = Router(**router.config())
    assert again.depth == [0.25, 0.5] and again.read(model, batch).shape == both.shape
    # scaling one depth's block leaves the logits as they were (up to layer norm's epsilon, felt by
    # the tiny model's small states): the blocks are normalised separately
    h = one[0.25].shape[1]
    scaled = torch.cat([both[:, :h] * 10.0, both[:, h:]], -1)
    assert torch.allclose(router(scaled), router(both), atol=1e-2)
    with pytest.raises(Exception, match="equal blocks"):
        Router(both.shape[1] + 1, 2, depth=[0.25, 0.5])
    with pytest.raises(Exception, match="depth must be in"):
        Router(8, 2, depth=[])


def test_a_recipe_router_depth_outside_the_unit_interval_is_rejected_by_key():
    from skillstream.config import load_recipe
    from skillstream.errors import UserError

    with pytest.raises(UserError, match=r"experts\.router\.depth.*\(0, 1\]"):
        load_recipe("dylora_moe", overrides={"experts.router.depth": [0.4, 1.5]})


def test_router_does_not_forget_skill_one_with_feature_replay(features):
    with_replay = accuracy(train_sequentially(features, feature_alpha=0.5).router, features)
    without = accuracy(train_sequentially(features, feature_alpha=0.0).router, features)
    ceiling = joint_ceiling(features)
    print(f"\nrouter accuracy per skill {SKILLS}: replay {with_replay}, no replay {without}, joint {ceiling}")
    # measured: replay [0.8, 1.0, 0.837], no replay [0.125, 1.0, 0.962], joint [0.863, 1.0, 0.9]
    # (bash requests and documentation prose are both English: the tiny random backbone tells them
    # apart only so well, and the jointly trained router shows that ceiling)
    assert with_replay[0] >= 0.75 and without[0] <= 0.2
    assert with_replay[0] - without[0] >= 0.6
    assert with_replay[0] >= ceiling[0] - 0.1
    assert with_replay[1] >= 0.95
    assert sum(with_replay) / 3 >= sum(ceiling) / 3 - 0.05


def test_mlp_router_also_needs_replay(features):
    with_replay = accuracy(train_sequentially(features, kind="mlp", feature_alpha=0.5).router, features)
    without = accuracy(train_sequentially(features, kind="mlp", feature_alpha=0.0).router, features)
    print(f"\nmlp router per skill: replay {with_replay}, no replay {without}")
    # measured: replay [0.825, 1.0, 0.938], no replay [0.0, 0.0, 1.0]: the shared hidden layer
    # moves for every new expert, so without replay the MLP forgets both earlier skills entirely
    assert with_replay[0] >= 0.75 and without[0] <= 0.1
    assert with_replay[1] >= 0.95 and without[1] <= 0.05


def test_refit_on_the_memory_brings_the_stream_router_to_the_joint_ceiling(features):
    trainer = train_sequentially(features, feature_alpha=0.5)
    before = accuracy(trainer.router, features)
    loss = trainer.refit(100)
    after, ceiling = accuracy(trainer.router, features), joint_ceiling(features)
    print(f"\nrouter per skill: stream {before}, after refit {after}, joint {ceiling}, refit loss {loss:.3f}")
    assert loss < 0.5
    # measured: stream [0.8, 1.0, 0.837], refit [0.812, 1.0, 0.863], joint [0.863, 1.0, 0.9]; the
    # memory keeps 64 of each skill's 160 training features, the joint router trains on all of them
    assert sum(after) / 3 >= sum(ceiling) / 3 - 0.05
    assert sum(after) / 3 >= sum(before) / 3               # and no worse than the stream router
    empty = RouterTrainer(Router(64, 2, seed=0), seed=0)
    weights = [p.detach().clone() for p in empty.router.parameters()]
    assert math.isnan(empty.refit(10))                      # nothing stored: nothing to fit
    assert all(torch.equal(a, b) for a, b in zip(weights, empty.router.parameters()))


def test_add_expert_keeps_old_rows_and_starts_the_new_one_at_zero():
    router = Router(8, 2, kind="mlp", seed=3)
    x = torch.randn(5, 8)
    before = router(x).detach()
    rng_before = torch.random.get_rng_state()
    assert router.add_expert() == 2
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # growing does not consume the global RNG
    after = router(x).detach()
    assert torch.equal(after[:, :2], before)
    assert torch.equal(after[:, 2], torch.zeros(5))
    assert normalized_entropy(torch.full((1, 4), 0.25)).item() == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([[1.0, 0.0, 0.0]])).item() == pytest.approx(0.0)


def test_trainer_save_load_resumes_exactly(features, tmp_path):
    """Saved in the middle of skill 2 and reloaded, the trainer (router, feature memory, Adam moments)
    finishes skills 2 and 3 exactly like an uninterrupted run."""
    def steps(trainer, expert, skill, start, stop):
        for i in range(start, stop, BATCH):
            trainer.step(features[skill][0][i:i + BATCH], expert)

    a = RouterTrainer(Router(64, 1, kind="mlp", seed=0), feature_alpha=0.5, capacity_per_expert=16, seed=0)
    steps(a, 0, "bash", 0, N_TRAIN)
    a.add_expert()
    steps(a, 1, "math", 0, N_TRAIN // 2)
    a.save(tmp_path / "router")
    assert sorted(p.name for p in (tmp_path / "router").iterdir()) == [
        "router.json", "router.safetensors", "router_trainer.json", "router_trainer.safetensors"]
    b = RouterTrainer.load(tmp_path / "router")
    assert b.memory.seen == a.memory.seen == [N_TRAIN, N_TRAIN // 2]
    for t in (a, b):
        steps(t, 1, "math", N_TRAIN // 2, N_TRAIN)
        t.add_expert()
        steps(t, 2, "prose", 0, N_TRAIN)
    x = torch.cat([features[s][1] for s in SKILLS])
    assert torch.equal(a.router(x), b.router(x))
