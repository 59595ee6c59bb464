"""The expert lifecycle on the tiny model: maturity from each expert's held-out loss, merging converged
experts (router classes folded) and pruning unused ones (router class removed)."""
from __future__ import annotations

import pytest
import torch

from skillstream.config import ExpertsConfig, LoraConfig, RecipeConfig
from skillstream.data.render import Renderer, Tokenized
from skillstream.errors import UserError
from skillstream.experts.lifecycle import Lifecycle
from skillstream.experts.signals import ExpertProfile, TaskSignal
from skillstream.model_setup import attach_lora
from skillstream.models.backbone import load_backbone
from test_experts_skills import one_thread, skill_texts  # noqa: F401  (one_thread: autouse fixture)


def lifecycle(**experts) -> Lifecycle:
    backbone, tok = load_backbone("tiny", seed=0)
    cfg = RecipeConfig(name="t", lora=LoraConfig(r=4, alpha=8, dropout=0.0), experts=ExpertsConfig(**experts))
    model = attach_lora(backbone, cfg)
    return Lifecycle(model, tok, Renderer(tok, 64), cfg.experts, seed=0, max_length=64)


def items(life: Lifecycle, skill: str, start: int, n: int) -> list[Tokenized]:
    return [Tokenized(ids, list(ids), False) for ids in life.tok(skill_texts(skill, start, n))["input_ids"]]


def train(life: Lifecycle, name: str, train_items: list[Tokenized], steps: int, lr: float,
          opt: torch.optim.Optimizer | None = None) -> None:
    from skillstream.data.batching import collate
    life.pool.set_trainable([name])
    life.pool.activate(name)
    opt = opt or torch.optim.Adam(life.pool.parameters_of(name).values(), lr=lr)
    batch = collate(train_items, life.pad_id)
    for _ in range(steps):
        opt.zero_grad()
        life.model(**batch).loss.backward()
        opt.step()
    life.pool.record_training(name, steps)
    life.schedule.steps[name] = life.schedule.steps.get(name, 0) + steps


def signal(seed: int, dim: int = 64) -> TaskSignal:
    g = torch.Generator().manual_seed(seed)
    return TaskSignal(torch.randn(dim, generator=g), torch.randn(16, generator=g), torch.rand(16, generator=g),
                      2.0, 20.0, 8)


def test_maturity_rises_only_when_the_held_out_loss_flattens_and_then_the_expert_consolidates():
    life = lifecycle(validation={"holdout": 2, "trend_window": 1, "flat_tolerance": 0.02},
                     router={"mature_steps": 4, "maturity_threshold": 0.5},
                     seeding={"lr": 1e-3, "steps": 100}, consolidation={"lr": 1e-5})
    name = "expert_0"
    seen = []
    opt = torch.optim.Adam(life.pool.parameters_of(name).values(), lr=3e-3)
    for round_, steps in enumerate([8, 8, 0]):
        # one request eight times: the tiny random backbone barely generalises from a few different texts
        # (its held-out loss moves by tenths of a percent), so here the held-out examples are learnable
        chunk = items(life, "bash", 0, 1) * 8
        train_items = life.begin_round(name, [(round_, chunk)])
        assert len(train_items) == 6                       # 2 of the chunk's 8 held out
        train(life, name, train_items, steps, 0.0, opt)
        life.end_round(name)
        info = life.rounds[name]
        seen.append((info.get("val_change"), info["maturity"], life.schedule.rate(name)))
        assert len(life.heldout.of(name)) == 2 * (round_ + 1)  # the held-out items joined its set
    (c0, m0, r0), (c1, m1, r1), (c2, m2, r2) = seen
    assert c0 is None and m0 == 0.0                        # first round: nothing to compare yet
    assert c1 < -0.02 and m1 == 0.0                       # the loss still falls fast: immature, still seeding
    assert r1 == 1e-3
    assert c2 == 0.0 and m2 == 1.0                         # a round that trained nothing: flat -> mature
    assert r2 == 1e-5                                      # ... and the expert consolidates, before its 100 seeding steps


def test_validation_off_keeps_the_step_count_maturity_and_calibrated_or_merge_need_it():
    life = lifecycle(router={"mature_steps": 4})
    chunk = items(life, "bash", 0, 8)
    assert life.begin_round("expert_0", [(0, chunk)]) == chunk  # nothing held out
    life.pool.record_training("expert_0", 2)
    assert life.pool.maturity("expert_0") == 0.5
    with pytest.raises(UserError, match="experts.validation.holdout"):
        lifecycle(novelty={"decider": "calibrated"})
    with pytest.raises(UserError, match="experts.validation.holdout"):
        lifecycle(merge={"method": "ties"})


def probe_logits(life: Lifecycle, name: str, probe: list[Tokenized]) -> torch.Tensor:
    from skillstream.data.batching import collate
    life.pool.activate(name)
    batch = collate(probe, life.pad_id)
    with torch.no_grad():
        return life.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_two_identical_experts_merge_into_one_equal_to_either_and_their_router_classes_fold(method):
    life = lifecycle(validation={"holdout": 2}, merge={"method": method, "similarity": 0.99, "max_output_kl": 1e-6})
    train(life, "expert_0", items(life, "bash", 0, 8), 4, 1e-2)
    life.pool.create("expert_1", fork_from="expert_0")  # the same weights: a skill split in two
    life.trainer.add_expert()
    life.novelty.created = 2
    life.heldout.add("expert_0", items(life, "bash", 20, 2))
    life.heldout.add("expert_1", items(life, "bash", 30, 2))
    for name in ("expert_0", "expert_1"):
        life.profiles[name] = ExpertProfile(name, signal(0))
        life.trainer.learn_chunk(torch.randn(4, life.router.dim), life.index_of(name), 2)
    probe = items(life, "bash", 100, 4)
    before = probe_logits(life, "expert_0", probe)
    assert torch.equal(before, probe_logits(life, "expert_1", probe))

    events = life.maintain({"expert_0": 1.0}, ["expert_1"], step=8)
    assert [e["merge"] for e in events] == [["expert_0", "expert_1"]] and events[0]["into"] == "expert_2"
    assert events[0]["output_kl"] <= 1e-6 and events[0]["profile_similarity"] >= 0.99
    assert life.pool.names == ["expert_2"] and life.pool.record("expert_2").merged_from == ["expert_0", "expert_1"]
    gap = (probe_logits(life, "expert_2", probe) - before).abs().max().item()
    assert gap < 1e-5, gap                                  # the merge of two equal experts is either of them
    assert life.router.n_experts == 1 and len(life.trainer.memory.buffers) == 1
    assert life.trainer.memory.seen == [8]                  # both classes' features, folded
    assert set(life.profiles) == {"expert_2"} and len(life.heldout.of("expert_2")) == 4
    assert life.pool.model.peft_config["expert_2"].r == 4   # the template's shape: restorable as any expert


def test_different_experts_are_not_merged():
    life = lifecycle(validation={"holdout": 2}, merge={"method": "ties", "similarity": 0.99, "max_output_kl": 1e-3})
    life.pool.create("expert_1")
    life.trainer.add_expert()
    train(life, "expert_0", items(life, "bash", 0, 8), 4, 1e-2)
    train(life, "expert_1", items(life, "math", 0, 8), 4, 1e-2)
    for name, skill in (("expert_0", "bash"), ("expert_1", "math")):
        life.heldout.add(name, items(life, skill, 20, 2))
        life.profiles[name] = ExpertProfile(name, signal(0))  # profiles alike: only the outputs differ
    assert life.maintain({}, ["expert_1"], step=8) == []
    assert life.pool.names == ["expert_0", "expert_1"]


def test_heldout_gain_merges_two_experts_of_one_skill_that_learned_unequally_but_not_two_skills():
    """Twins of one skill (one trained twice as long, so their outputs moved by different amounts) each
    recover most of the other's held-out gain over the backbone; an expert of another skill does not."""
    life = lifecycle(validation={"holdout": 2}, merge={"method": "ties", "similarity": 0.5, "criterion": "heldout_gain"})
    for name in ("expert_1", "expert_2"):
        life.pool.create(name)
        life.trainer.add_expert()
    life.novelty.created = 3
    bash, math = items(life, "bash", 0, 4), items(life, "math", 0, 4)
    # repeated texts: the tiny random backbone learns what it sees, barely what it does not
    train(life, "expert_0", bash * 2, 8, 1e-2)
    train(life, "expert_1", bash * 2, 4, 1e-2)
    train(life, "expert_2", math * 2, 8, 1e-2)
    for name, held in (("expert_0", bash[:2]), ("expert_1", bash[2:]), ("expert_2", math[:2])):
        life.heldout.add(name, held)
        life.profiles[name] = ExpertProfile(name, signal(0))  # profiles alike: the held-out gains decide
        life.trainer.learn_chunk(torch.randn(4, life.router.dim), life.index_of(name), 2)

    # the share is the other's gain over the backbone on an expert's held-out set, over the expert's own
    from skillstream.objectives.lm import per_example_loss
    def loss(name, held):
        if name is None:
            with life.model.disable_adapter():
                return sum(per_example_loss(life.model, held, life.pad_id)) / len(held)
        life.pool.activate(name)
        return sum(per_example_loss(life.model, held, life.pad_id)) / len(held)
    base = loss(None, bash[:2])
    by_hand = (base - loss("expert_1", bash[:2])) / (base - loss("expert_0", bash[:2]))
    assert life.transfer("expert_0", "expert_1")[0] == pytest.approx(by_hand, rel=1e-6)

    assert life.maintain({}, ["expert_2"], step=8) == []       # math against either bash expert: apart
    checks = life.merge_checks
    assert [c["pair"] for c in checks] == [["expert_2", "expert_0"], ["expert_2", "expert_1"]]
    assert all(min(t for t in c["transfer"] if t is not None) < 0.5 for c in checks)

    [event] = life.maintain({}, ["expert_1"], step=9)          # the twins: merged
    assert event["merge"] == ["expert_0", "expert_1"] and event["into"] == "expert_3"
    assert min(event["transfer"]) >= 0.5 and "output_kl" not in event
    assert life.pool.names == ["expert_2", "expert_3"] and life.router.n_experts == 2


def test_merged_gain_tries_the_merge_and_keeps_it_only_if_the_merge_does_both_jobs():
    """The criterion merges, measures the merge on each expert's held-out examples, and keeps it only if
    it keeps min_transfer of each one's own gain there; a merge it does not keep leaves the pool, the
    weights and the random state as they were, and the one it keeps is the one it measured."""
    def twins(min_transfer: float) -> Lifecycle:
        torch.manual_seed(0)  # the same two experts each time
        life = lifecycle(validation={"holdout": 2},
                         merge={"method": "ties", "similarity": 0.5, "criterion": "merged_gain", "min_transfer": min_transfer})
        life.pool.create("expert_1")
        life.trainer.add_expert()
        life.novelty.created = 2
        bash = items(life, "bash", 0, 4)
        train(life, "expert_0", bash * 2, 8, 1e-2)
        train(life, "expert_1", bash * 2, 4, 1e-2)
        for name, held in (("expert_0", bash[:2]), ("expert_1", bash[2:])):
            life.heldout.add(name, held)
            life.profiles[name] = ExpertProfile(name, signal(0))
            life.trainer.learn_chunk(torch.randn(4, life.router.dim), life.index_of(name), 2)
        return life

    from skillstream.objectives.lm import per_example_loss
    def loss(life, name, held):
        life.pool.activate(name)
        return sum(per_example_loss(life.model, held, life.pad_id)) / len(held)

    # asked for more than any merge keeps (every share of an expert's own gain is below 1 here): not merged
    strict = twins(min_transfer=0.999)
    weights = {k: v.clone() for k, v in strict.model.state_dict().items() if "lora_" in k}
    rng = torch.random.get_rng_state()
    assert strict.maintain({}, ["expert_1"], step=9) == []
    [check] = strict.merge_checks
    assert 0 < min(check["merged_share"]) < 0.999
    assert strict.pool.names == ["expert_0", "expert_1"] and strict.novelty.created == 2
    assert torch.equal(torch.random.get_rng_state(), rng)
    after = {k: v for k, v in strict.model.state_dict().items() if "lora_" in k}
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)

    # at the default 0.5 the same twins merge, into the merge that was measured
    life = twins(min_transfer=0.5)
    held = life.heldout.of("expert_0")
    with life.model.disable_adapter():
        base = sum(per_example_loss(life.model, held, life.pad_id)) / len(held)
    own = loss(life, "expert_0", held)
    [event] = life.maintain({}, ["expert_1"], step=9)
    assert event["merge"] == ["expert_0", "expert_1"] and event["into"] == "expert_2"
    assert event["merged_share"] == check["merged_share"] and min(event["merged_share"]) >= 0.5
    # the shares follow the checked pair, (expert_1, expert_0): expert_0's is the second
    assert check["pair"] == ["expert_1", "expert_0"]
    assert event["merged_share"][1] == pytest.approx((base - loss(life, "expert_2", held)) / (base - own), abs=1e-4)
    assert life.pool.names == ["expert_2"] and life.router.n_experts == 1


def test_prune_removes_only_the_unused_expert_and_its_router_class():
    life = lifecycle(prune={"unused_chunks": 2})
    for name in ("expert_1", "expert_2"):
        life.pool.create(name)
        life.trainer.add_expert()
    for i, name in enumerate(life.pool.names):
        life.profiles[name] = ExpertProfile(name, signal(i))
        life.trainer.learn_chunk(torch.randn(4, life.router.dim) + i, i, 3)
    life.novelty.current = "expert_2"
    head = life.router.head.weight.detach().clone()
    bias = life.router.head.bias.detach().clone()
    memory = [b.clone() for b in life.trainer.memory.buffers]
    routed = {"expert_0": 0.5, "expert_2": 0.5}                # expert_1 gets no input
    assert life.maintain(routed, [], step=1) == []            # one chunk unused: kept
    assert life.maintain(routed, [], step=2) == [{"prune": "expert_1", "unused_chunks": 2}]
    assert life.pool.names == ["expert_0", "expert_2"] and "expert_1" not in life.model.peft_config
    assert life.router.n_experts == 2
    assert torch.equal(life.router.head.weight, head[[0, 2]]) and torch.equal(life.router.head.bias, bias[[0, 2]])
    assert [torch.equal(a, b) for a, b in zip(life.trainer.memory.buffers, [memory[0], memory[2]])] == [True, True]
    assert set(life.profiles) == {"expert_0", "expert_2"}
    assert life.maintain({"expert_0": 1.0}, [], step=3) == []  # expert_2 is the current one: never pruned
    assert life.maintain({"expert_0": 1.0}, [], step=4) == []
    assert life.pool.names == ["expert_0", "expert_2"]


def returning_skill_recipe(root, **experts) -> dict:
    """bash, then arithmetic, then bash again (new requests): one skill comes back after another."""
    import json
    for name, skill, start, n in (("bash_a", "bash", 0, 16), ("math_a", "math", 0, 16), ("bash_b", "bash", 16, 16),
                                  ("bash_test", "bash", 100, 4), ("math_test", "math", 100, 4)):
        with (root / f"{name}.jsonl").open("w") as f:
            for text in skill_texts(skill, start, n):
                f.write(json.dumps({"text": text}) + "\n")
    evals = [{"name": s, "source": str(root / f"{s}_test.jsonl"), "metric": "perplexity"} for s in ("bash", "math")]
    e = {"chunk_size": 8, "chunk_epochs": 1,
         # as tests/test_dylora_moe.py: on the tiny random backbone only the embedding separates the skills
         "novelty": {"similarity_threshold": 0.4, "entropy_threshold": 0.5, "window": 2, "signal_examples": 8,
                     "weights": {"embedding": 1.0, "gradient": 0.0, "context": 0.0}},
         "router": {"steps_per_chunk": 60, "lr": 0.05, "mature_steps": 2},
         "seeding": {"lr": 1e-3, "steps": 3, "warmup_steps": 1}, "consolidation": {"lr": 1e-4}}
    for key, value in experts.items():
        e[key] = {**e.get(key, {}), **value} if isinstance(value, dict) else value
    return {"name": "returning", "model": "tiny", "report_to": [], "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "experts": e, "train": {"batch_size": 4, "log_every": 1},
            "data": {"max_length": 64, "eval_batch_size": 4, "eval": evals},
            "stages": [{"name": n, "data": {"max_length": 64, "eval": evals,
                                            "train": [{"source": str(root / f"{n}.jsonl")}]}}
                       for n in ("bash_a", "math_a", "bash_b")]}


def test_a_calibrated_stream_learns_from_its_outcomes_reuses_the_returning_skill_and_resumes_exactly(tmp_path):
    import json

    from skillstream.report.html import write_report
    from skillstream.run import train as train_run
    from test_dylora_moe import CrashAfter

    cfg = returning_skill_recipe(tmp_path, novelty={"decider": "calibrated"}, validation={"holdout": 2})
    whole = train_run(cfg, out=tmp_path / "whole", show_progress=False)
    decisions = [json.loads(x) for x in (whole.run_dir / "decisions.jsonl").read_text().splitlines()]
    assert [(d["decision"], d["expert"]) for d in decisions] == [
        ("create", "expert_0"), ("reuse", "expert_0"), ("wait", "expert_0"), ("create", "expert_1"),
        ("reuse", "expert_0"), ("reuse", "expert_0")]               # bash comes back: its expert is reused
    assert all("p_reuse" in d for d in decisions[1:])
    outcomes = [v["outcome"] for d in decisions for v in (d.get("validation") or {}).values() if "outcome" in v]
    assert [o["kind"] for o in outcomes] == ["reuse", "create", "reuse", "reuse"]
    cal = whole.results["novelty"]["calibration"]
    assert cal["outcomes"] == 4 and 0.0 <= cal["brier"] <= 1.0 and sum(b["n"] for b in cal["reliability"]) == 4
    rows = [json.loads(x) for x in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["novelty/brier"] for r in rows if "novelty/brier" in r][-1] == pytest.approx(cal["brier"])
    assert "reuse decider calibration" in write_report([whole.run_dir], None).read_text()

    with pytest.raises(Exception) as crash:
        train_run(cfg, out=tmp_path / "run", show_progress=False, plugins=[CrashAfter(9)])
    assert type(crash.value).__name__ == "_Crash"
    resumed = train_run(cfg, out=tmp_path / "run", resume=True, show_progress=False)
    assert resumed.results["novelty"] == whole.results["novelty"]  # decisions, outcomes and calibration alike
    assert resumed.results["matrix"] == whole.results["matrix"]


def test_a_split_skill_is_merged_back_in_the_stream_and_a_resumed_run_merges_alike(tmp_path):
    """bash, arithmetic, bash again, with a threshold above the returning bash chunks' similarity and
    window 1: each returning chunk makes a new expert (a deliberately split skill), which has converged
    with bash's expert (profiles alike, outputs within the KL bound) and is merged back into it."""
    import json

    from safetensors.torch import load_file

    from skillstream.run import train as train_run
    from test_dylora_moe import CrashAfter

    cfg = returning_skill_recipe(tmp_path, novelty={"similarity_threshold": 0.7, "window": 1},
                                 validation={"holdout": 2},
                                 merge={"method": "ties", "similarity": 0.5, "max_output_kl": 0.05})
    whole = train_run(cfg, out=tmp_path / "whole", show_progress=False)
    decisions = [json.loads(x) for x in (whole.run_dir / "decisions.jsonl").read_text().splitlines()]
    assert [d["decision"] for d in decisions] == ["create", "reuse", "create", "reuse", "create", "create"]
    merges = [(e["merge"], e["into"]) for e in whole.results["lifecycle"]]
    assert merges == [(["expert_0", "expert_2"], "expert_3"), (["expert_3", "expert_4"], "expert_5")]
    # every pair the merge check compared is in the chunk's decision: the profile similarity, and the
    # output KL where the profiles passed (the merged pair's are the merge's own)
    for d in decisions:
        for c in d.get("merge_checks", []):
            assert (c["output_kl"] is None) == (c["profile_similarity"] < 0.5)
        for e in d.get("lifecycle", []):
            assert {"pair": sorted(e["merge"], key=lambda n: n != d["trained"]), "profile_similarity": e["profile_similarity"],
                    "output_kl": e["output_kl"]} == d["merge_checks"][-1]
    assert any(c["output_kl"] is None for d in decisions for c in d.get("merge_checks", []))  # arithmetic vs bash
    assert whole.results["experts"] == ["expert_1", "expert_5"]
    assert whole.results["skill_expert"] == {"bash_a": "expert_5", "math_a": "expert_1", "bash_b": "expert_5"}
    assert sorted(p.name for p in (whole.run_dir / "experts").iterdir()) == ["expert_1", "expert_5", "pool.json"]

    with pytest.raises(Exception) as crash:
        train_run(cfg, out=tmp_path / "run", show_progress=False, plugins=[CrashAfter(9)])
    assert type(crash.value).__name__ == "_Crash"
    resumed = train_run(cfg, out=tmp_path / "run", resume=True, show_progress=False)
    assert resumed.results["lifecycle"] == whole.results["lifecycle"]
    assert resumed.results["matrix"] == whole.results["matrix"]
    for name in ("expert_1", "expert_5"):
        a = load_file(str(whole.run_dir / "experts" / name / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "run" / "experts" / name / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_held_out_losses_and_divergence_equal_the_full_logits_reference_with_the_head_on_labels_only():
    from skillstream.data.batching import collate
    from skillstream.data.render import IGNORE
    from skillstream.experts.heldout import output_divergence
    from skillstream.objectives.lm import per_example_loss
    life = lifecycle()
    life.pool.create("expert_1", fork_from="expert_0")
    with torch.no_grad():  # a second expert that computes a different function
        for p in life.pool.parameters_of("expert_1").values():
            p.add_(0.05 * torch.randn_like(p))
    # prompt tokens unlabelled, as in a tool request: only the last 3 tokens of each item are labels
    held = [Tokenized(ids, [IGNORE] * (len(ids) - 3) + ids[-3:], False) for ids in
            life.tok(skill_texts("bash", 0, 3) + skill_texts("math", 0, 2))["input_ids"]]
    life.model.eval()
    life.pool.activate("expert_0")
    with torch.no_grad():
        reference = [float(life.model(**collate([it], life.pad_id)).loss) for it in held]
    assert per_example_loss(life.model, held, life.pad_id, batch_size=2) == pytest.approx(reference, rel=1e-5)

    batch = collate(held, life.pad_id)
    keep = batch["labels"][:, 1:] != IGNORE
    logp = []
    for name in ("expert_0", "expert_1"):
        life.model.set_adapter(name)
        logp.append(life.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    .logits[:, :-1][keep].float().log_softmax(-1))
    a, b = logp
    expected = float(((a.exp() - b.exp()) * (a - b)).sum(-1).mean())
    assert expected > 1e-4
    assert output_divergence(life.model, ("expert_0", "expert_1"), held, life.pad_id, batch_size=2) \
        == pytest.approx(expected, rel=1e-4)
    assert output_divergence(life.model, ("expert_0", "expert_0"), held, life.pad_id) == pytest.approx(0.0, abs=1e-7)
