"""The expert pool: LoRA experts on one frozen tiny backbone, forked, saved, merged, pruned, maturing."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from skillstream.config import LoraConfig, RecipeConfig
from skillstream.data.batching import collate
from skillstream.data.render import Tokenized
from skillstream.experts.pool import ExpertPool, MaturityRule
from skillstream.models.backbone import load_backbone
from skillstream.model_setup import attach_lora
from test_experts_skills import one_thread, skill_texts  # noqa: F401  (one_thread: autouse fixture)

RANK = 4


def new_pool(**kw) -> tuple[ExpertPool, object]:
    backbone, tok = load_backbone("tiny", seed=0)
    model = attach_lora(backbone, RecipeConfig(name="t", lora=LoraConfig(r=RANK, alpha=8, dropout=0.0)))
    model.eval()
    return ExpertPool(model, **kw), tok


def lm_batch(tok, texts: list[str]) -> dict:
    return collate([Tokenized(ids, ids, False) for ids in tok(texts)["input_ids"]], tok.pad_token_id)


def train(pool: ExpertPool, name: str, batch: dict, steps: int = 3, lr: float = 1e-2) -> None:
    pool.activate(name)
    opt = torch.optim.AdamW(pool.parameters_of(name).values(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        pool.model(**batch).loss.backward()
        opt.step()
    pool.record_training(name, steps)


@torch.no_grad()
def logits(pool: ExpertPool, name: str, batch: dict) -> torch.Tensor:
    pool.activate(name)
    return pool.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_adding_an_expert_adds_exactly_its_lora_parameters():
    pool, _ = new_pool()
    before = {n: p.data_ptr() for n, p in pool.model.named_parameters()}
    pool.create("bash", skill="bash")
    after = dict(pool.model.named_parameters())
    added = {n: p for n, p in after.items() if n not in before}
    # all-linear on the 2-layer, 64-wide Llama: r * (in + out) summed over q,k,v,o,gate,up,down
    # = r * (128 + 96 + 96 + 128 + 192 + 192 + 192) per layer = 1024 r per layer
    assert sum(p.numel() for p in added.values()) == 2 * 1024 * RANK == 8192
    assert set(added) == set(pool.parameters_of("bash"))
    assert all(".lora_A.bash." in n or ".lora_B.bash." in n for n in added)
    # the backbone is shared, not copied: every old tensor is the same storage
    assert all(after[n].data_ptr() == ptr for n, ptr in before.items())
    pool.prune("bash")
    assert {n for n, _ in pool.model.named_parameters()} == set(before)
    assert pool.names == ["default"]


def test_fork_starts_equal_to_its_source_then_diverges():
    pool, tok = new_pool()
    probe = lm_batch(tok, skill_texts("prose", 0, 4))
    pool.create("bash")
    train(pool, "bash", lm_batch(tok, skill_texts("bash", 0, 8)))
    bash_before = {n: p.clone() for n, p in pool.parameters_of("bash").items()}
    pool.create("math", fork_from="bash", step=3)
    assert pool.record("math").forked_from == "bash"
    assert torch.equal(logits(pool, "math", probe), logits(pool, "bash", probe))
    train(pool, "math", lm_batch(tok, skill_texts("math", 0, 8)))
    gap = (logits(pool, "math", probe) - logits(pool, "bash", probe)).abs().max().item()
    assert gap > 1e-3, gap  # measured about 0.1
    # training the fork leaves its source untouched
    assert all(torch.equal(p, bash_before[n]) for n, p in pool.parameters_of("bash").items())


def test_fresh_experts_are_seeded_by_pool_seed_and_name():
    a, _ = new_pool(seed=7)
    b, _ = new_pool(seed=7)
    a.create("x")
    b.create("x")
    pa, pb = a.parameters_of("x"), b.parameters_of("x")
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_save_and_load_round_trip_outputs_and_metadata(tmp_path):
    pool, tok = new_pool(rule=MaturityRule(mature_steps=6))
    probe = lm_batch(tok, skill_texts("math", 100, 4))
    pool.create("bash", skill="bash", step=0, tasks=["nl2bash"])
    train(pool, "bash", lm_batch(tok, skill_texts("bash", 0, 8)))
    pool.create("math", fork_from="bash", skill="math", step=3)
    train(pool, "math", lm_batch(tok, skill_texts("math", 0, 8)))
    pool.record_validation("math", 1.0, 0.5)
    pool.tag("math", task="arith")
    expected = {n: logits(pool, n, probe) for n in pool.names}

    pool.save(tmp_path / "experts")
    assert sorted(p.name for p in (tmp_path / "experts").iterdir()) == ["bash", "default", "math", "pool.json"]
    meta = json.loads((tmp_path / "experts" / "pool.json").read_text())
    assert [e["name"] for e in meta["experts"]] == ["default", "bash", "math"]

    loaded = ExpertPool.load(tmp_path / "experts", load_backbone("tiny", seed=0)[0])
    loaded.model.eval()
    for name in pool.names:
        assert torch.equal(logits(loaded, name, probe), expected[name]), name
    assert loaded.record("math") == pool.record("math")
    assert loaded.record("math").tasks == ["arith"]
    assert loaded.maturity("bash") == pool.maturity("bash") == 0.5  # 3 of 6 steps, no validation
    assert loaded.template.r == RANK

    # each expert folder is a standard PEFT adapter on its own
    alone = PeftModel.from_pretrained(load_backbone("tiny", seed=0)[0], str(tmp_path / "experts" / "math")).eval()
    with torch.no_grad():
        out = alone(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert torch.equal(out, expected["math"])

    # saving again after a prune leaves no folder that would read as an expert
    pool.prune("bash")
    pool.save(tmp_path / "experts")
    assert sorted(p.name for p in (tmp_path / "experts").iterdir()) == ["default", "math", "pool.json"]


def test_merging_one_expert_with_weight_one_reproduces_it():
    pool, tok = new_pool()
    probe = lm_batch(tok, skill_texts("bash", 100, 4))
    pool.create("bash")
    train(pool, "bash", lm_batch(tok, skill_texts("bash", 0, 8)))
    pool.merge(["bash"], [1.0], "linear", "bash_copy")
    gap = (logits(pool, "bash_copy", probe) - logits(pool, "bash", probe)).abs().max().item()
    assert gap < 1e-5, gap
    assert pool.record("bash_copy").merged_from == ["bash"]

    # TIES / DARE merges of two experts give a third expert unlike either
    pool.create("math", fork_from="bash")
    train(pool, "math", lm_batch(tok, skill_texts("math", 0, 8)))
    for method in ("ties", "dare_linear"):
        pool.merge(["bash", "math"], [0.5, 0.5], method, f"m_{method}", density=0.5)
        out = logits(pool, f"m_{method}", probe)
        assert (out - logits(pool, "bash", probe)).abs().max() > 1e-4
        assert (out - logits(pool, "math", probe)).abs().max() > 1e-4
    pool.prune("m_ties")
    assert "m_ties" not in pool and "m_ties" not in pool.model.peft_config


def test_maturity_follows_steps_and_rises_only_when_the_held_out_loss_flattens():
    pool, _ = new_pool(rule=MaturityRule(mature_steps=10, trend_window=2, flat_tolerance=0.02, needs_validation=True))
    pool.create("e")
    pool.record_training("e", 15)
    assert pool.maturity("e") == 0.0                   # steps complete, but no evidence the loss has flattened
    pool.record_validation("e", 2.0, 1.0)              # the round halved the held-out loss
    assert pool.trend("e") is None and pool.maturity("e") == 0.0   # one round: a window of 2 needs two
    pool.record_validation("e", 1.0, 0.9)              # -10%: still learning fast
    assert pool.trend("e") == pytest.approx(-0.3) and pool.maturity("e") == 0.0
    pool.record_validation("e", 0.9, 0.9 * 0.99)       # -1%, the window's mean: (-10% - 1%) / 2 = -5.5%
    assert pool.maturity("e") == 0.0
    pool.record_validation("e", 1.0, 0.99)             # -1% again: half the 2% tolerance
    assert pool.maturity("e") == pytest.approx(0.5)
    pool.record_validation("e", 1.0, 1.005)            # the loss rose a little: mean -0.25%
    assert pool.maturity("e") == pytest.approx(1 - 0.0025 / 0.02)
    pool.record_validation("e", 0.8, 0.9)             # rising: flat, not learning
    assert pool.maturity("e") == 1.0
    pool.record("e").steps_trained = 5
    assert pool.maturity("e") == 0.5                   # flat, but half the steps: progress still counts
    assert pool.record("e").val_loss == 0.9

    floored, _ = new_pool(rule=MaturityRule(mature_steps=10, flat_tolerance=0.02, needs_validation=True, loss_floor=0.01))
    floored.create("e")
    floored.record_training("e", 10)
    floored.record_validation("e", 0.5, 0.45)          # -10% of a loss above the floor: still learning
    assert floored.maturity("e") == 0.0
    floored.record_validation("e", 2e-4, 1.4e-4)       # -30% of a loss that is ~0: 0.6% of the floor, flat
    assert floored.trend("e") == pytest.approx(-0.006) and floored.maturity("e") == pytest.approx(0.7)

    steps_only, _ = new_pool(rule=MaturityRule(mature_steps=10))
    steps_only.create("e")
    steps_only.record_training("e", 5)
    assert steps_only.maturity("e") == 0.5             # validation off: steps alone, as before
    with pytest.raises(ValueError, match="finite and positive"):
        steps_only.record_validation("e", 0.0, 1.0)


def test_unknown_and_duplicate_expert_names_are_user_errors():
    from skillstream.errors import UserError
    pool, _ = new_pool()
    with pytest.raises(UserError, match="unknown expert 'nope'"):
        pool.create("x", fork_from="nope")
    with pytest.raises(UserError, match="already exists"):
        pool.create("default")
    with pytest.raises(UserError, match="letters, digits"):
        pool.create("a/b")
    with pytest.raises(UserError, match="'lora_' prefix"):  # PEFT would re-initialise it on load
        pool.create("a")
