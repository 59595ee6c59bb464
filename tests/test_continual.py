"""Continual-learning pieces: Fisher, EWC penalty, replay memory, gamma gating, neuromodulation,
early stopping, and the accuracy-matrix summaries."""
from __future__ import annotations

import json
import random

import pytest
import torch

import skillstream
from conftest import write_task_folder
from skillstream.config import SourceConfig, load_recipe
from skillstream.continual.ewc import EWC, diagonal_fisher, ewc_penalty
from skillstream.continual.metrics import bwt, fwt, summarize
from skillstream.continual.neuromod import Neuromodulation
from skillstream.continual.replay import Replay, ReplayMemory
from skillstream.data.render import Tokenized
from skillstream.errors import UserError
from skillstream.plugins import Plugin, StepContext


def test_fisher_of_a_quadratic_is_the_mean_squared_per_sample_gradient():
    # nll_i(theta) = (theta - a_i)^2 / 2  ->  grad_i = theta - a_i,  F = mean_i (theta - a_i)^2
    theta = torch.nn.Parameter(torch.tensor([0.5]))
    a = torch.tensor([0.0, 1.0, 2.0, -1.0])
    fisher = diagonal_fisher({"theta": theta}, list(a), lambda ai: 0.5 * (theta - ai).pow(2).sum())
    analytic = ((0.5 - a) ** 2).mean()
    assert fisher["theta"].item() == pytest.approx(analytic.item())           # 1.75
    batch_grad_squared = ((0.5 - a).mean()) ** 2                              # what a batch gradient gives
    assert fisher["theta"].item() != pytest.approx(batch_grad_squared.item())  # 0.0625: far too small


def test_ewc_penalty_is_zero_at_the_anchor_and_its_gradient_is_2_lambda_f_delta():
    anchor = {"w": torch.tensor([1.0, -2.0])}
    fisher = {"w": torch.tensor([0.5, 3.0])}
    w = torch.nn.Parameter(anchor["w"].clone())
    assert ewc_penalty({"w": w}, fisher, anchor, lam=250.0).item() == 0.0
    with torch.no_grad():
        w += torch.tensor([0.1, -0.2])
    ewc_penalty({"w": w}, fisher, anchor, lam=250.0).backward()
    torch.testing.assert_close(w.grad, 2 * 250.0 * fisher["w"] * (w.detach() - anchor["w"]))


def _item(group, n=3):
    return Tokenized(list(range(n)), list(range(n)), False, group)


def test_replay_memory_keeps_its_budget_and_balances_classes():
    mem, rng = ReplayMemory(budget=12, policy="class_balanced"), random.Random(0)
    mem.add([_item("pos") for _ in range(100)] + [_item("neg") for _ in range(5)], "sst2", rng)
    assert mem.counts() == {"sst2/neg": 5, "sst2/pos": 7}  # the rare class keeps all it has, the rest fills up
    mem.add([_item("yes") for _ in range(50)] + [_item("no") for _ in range(50)], "rte", rng)
    counts = mem.counts()
    assert sum(counts.values()) <= 12
    assert counts == {"rte/no": 3, "rte/yes": 3, "sst2/neg": 3, "sst2/pos": 3}
    res = ReplayMemory(budget=7, policy="reservoir")
    res.add([_item(None) for _ in range(1000)], "t", rng)
    assert len(res.items) == 7 and res.seen == 1000


def test_replay_replaces_a_share_of_each_batch_deterministically():
    plugin = Replay(budget=8, alpha=0.25, seed=1)
    plugin.memory.add([_item("old", n=9) for _ in range(8)], "t0", random.Random(0))
    batch = [_item("new") for _ in range(8)]
    out = plugin.transform_items(None, batch)
    assert len(out) == 8 and sum(len(t.input_ids) == 9 for t in out) == 2
    again = Replay(budget=8, alpha=0.25, seed=1)
    again.load_state_dict({**plugin.state_dict(), "draws": 0})
    assert [t.input_ids for t in again.transform_items(None, batch)] == [t.input_ids for t in out]


def test_replay_scoped_to_the_adapter_draws_only_what_that_adapter_trained_on():
    from types import SimpleNamespace

    def ctx(adapter, stage, items=()):
        return StepContext(SimpleNamespace(active_adapter=adapter), stage, 0, 0, 1, alert=print,
                           plan=SimpleNamespace(items=list(items)))

    plugin = Replay(budget=8, alpha=0.5, seed=0, scope="adapter")
    plugin.after_stage(ctx("expert_0", "chunk_0000", [_item("a", n=5) for _ in range(4)]))
    plugin.after_stage(ctx("expert_1", "chunk_0001", [_item("b", n=7) for _ in range(4)]))
    assert set(plugin.memory.counts()) == {"expert_0:chunk_0000/a", "expert_1:chunk_0001/b"}
    new = [_item("new") for _ in range(4)]
    for _ in range(5):  # expert_0 rehearses its own items only, expert_1 its own, a fresh expert none
        assert {len(t.input_ids) for t in plugin.transform_items(ctx("expert_0", "c"), new)[2:]} == {5}
        assert {len(t.input_ids) for t in plugin.transform_items(ctx("expert_1", "c"), new)[2:]} == {7}
    assert plugin.transform_items(ctx("expert_2", "c"), new) == new
    shared = Replay(budget=8, alpha=0.5, seed=0)  # scope all: any stored item may come back
    shared.memory.items = list(plugin.memory.items)
    drawn = {len(t.input_ids) for _ in range(10) for t in shared.transform_items(ctx("expert_2", "c"), new)[2:]}
    assert drawn == {5, 7}
    with pytest.raises(Exception, match="replay.scope"):
        Replay(scope="expert")


def test_neuromodulation_gain_is_one_when_nothing_changes_and_rises_on_a_loss_spike():
    nm = Neuromodulation(scale=3.0)
    ctx = StepContext(None, "s", 0, 0, 10, alert=print)
    steady = [nm.after_step(ctx, {"loss": 2.0 + 0.01 * (i % 2), "grad_norm": 1.0})["neuromod/gain"] for i in range(20)]
    assert abs(steady[-1] - 1.0) < 0.6
    spike = nm.after_step(ctx, {"loss": 6.0, "grad_norm": 1.0})["neuromod/gain"]
    assert spike > 2.5 and spike <= 3.0 and ctx.signals.read("neuromod/gain", "test") == spike


def test_bwt_and_fwt_follow_their_formulas_on_a_hand_made_matrix():
    matrix = [[0.9, 0.2, 0.1], [0.7, 0.8, 0.3], [0.6, 0.75, 0.85]]
    initial = [0.5, 0.1, 0.2]
    assert bwt(matrix) == pytest.approx(((0.6 - 0.9) + (0.75 - 0.8)) / 2)
    assert fwt(matrix, initial) == pytest.approx(((0.2 - 0.1) + (0.3 - 0.2)) / 2)
    s = summarize(["a", "b", "c"], {"a": "accuracy"}, initial, matrix)
    assert s["avg_acc"] == pytest.approx((0.6 + 0.75 + 0.85) / 3)
    assert s["forgetting"] == [pytest.approx(0.3), pytest.approx(0.05), None]


def _two_task_recipe(sentiment_folder, tmp_path, plugins):
    other = tmp_path / "topic"
    other.mkdir()
    import json
    rows = [{"sentence": s, "label": l} for s, l in [("the striker scored twice", "Sports"), ("rates rose again", "Finance"),
                                                     ("the goalie saved it", "Sports"), ("stocks fell sharply", "Finance")]]
    for split in ("train", "test"):
        (other / f"{split}.json").write_text(json.dumps(rows))
    (other / "labels.json").write_text(json.dumps(["Sports", "Finance"]))
    tasks = {"sentiment": sentiment_folder, "topic": other}
    return {
        "name": "two-tasks", "model": "tiny", "report_to": [], "seed": 0, "plugins": plugins,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"steps": 4, "batch_size": 2, "log_every": 1, "bf16": False, "lr": 1e-3},
        "data": {"max_length": 96, "eval": [{"name": n, "source": str(f), "metric": "accuracy"} for n, f in tasks.items()]},
        "stages": [{"name": n, "data": {"max_length": 96, "train": [{"source": str(f)}],
                                        "eval": [{"name": m, "source": str(g), "metric": "accuracy"} for m, g in tasks.items()]}}
                   for n, f in tasks.items()],
    }


class _FisherAfterEachStage(Plugin):
    """Copies the Fisher of the EWC plugins that run before it, once they have folded in a stage's."""

    name = "fisher_record"

    def __init__(self, *ewcs):
        self.ewcs, self.seen = ewcs, []

    def after_stage(self, ctx):
        self.seen.append([{n: f.clone() for n, f in e.fisher.items()} for e in self.ewcs])


def test_gamma_gated_ewc_scales_each_tasks_fisher_by_the_mean_gain(sentiment_folder, tmp_path):
    # One run, two EWCs on the same model: `per_task` (lam 0: adds no gradient, so it changes nothing;
    # decay 0: its Fisher is exactly the last task's alone) and the gated one under test. The formula
    # (continual/ewc.py): F <- decay * F + g_t * F_t, with g_t the mean neuromodulation gain of task t.
    per_task = EWC(lam=0.0, fisher_samples=4, decay=0.0)
    per_task.name = "ewc_per_task"  # its own slot in checkpoints
    gated = EWC(lam=10.0, fisher_samples=4, decay=0.5, gamma_gated=True)
    record = _FisherAfterEachStage(per_task, gated)
    recipe = _two_task_recipe(sentiment_folder, tmp_path, [])  # log_every 1: every step's gain is logged
    run = skillstream.train(recipe, out=tmp_path / "run", show_progress=False,
                            plugins=[Neuromodulation(), per_task, gated, record])
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    gain = {stage: [r["neuromod/gain"] for r in records if r["stage"] == stage] for stage in ("sentiment", "topic")}
    g1, g2 = (sum(v) / len(v) for v in gain.values())
    assert all(len(v) == 4 for v in gain.values())
    # gains that a wrong formula could not match by chance: neither 1 (no gating) nor equal to each other
    assert abs(g1 - 1) > 0.01 and abs(g2 - 1) > 0.01 and abs(g1 - g2) > 0.01
    (f1, after_1), (f2, after_2) = record.seen
    assert sum(float(f.abs().sum()) for f in f2.values()) > 0
    for n in f1:
        torch.testing.assert_close(after_1[n], g1 * f1[n], rtol=1e-6, atol=0)
        torch.testing.assert_close(after_2[n], 0.5 * (g1 * f1[n]) + g2 * f2[n], rtol=1e-6, atol=0)
    assert gated.fisher.keys() == f1.keys()


def test_gamma_gated_ewc_listed_before_neuromod_is_refused_at_its_first_step(sentiment_folder, tmp_path):
    # a step's gain exists once neuromod's after_step has run; ewc listed before it would silently
    # average the previous steps' gains, so the order is an error naming both plugins
    recipe = _two_task_recipe(sentiment_folder, tmp_path, [{"name": "ewc", "gamma_gated": True}, {"name": "neuromod"}])
    with pytest.raises(UserError) as refused:
        skillstream.train(recipe, out=tmp_path / "run", show_progress=False)
    assert str(refused.value) == ("plugin 'ewc' reads the signal 'neuromod/gain', which no plugin has published "
                                  "this step: list 'neuromod' before 'ewc' in plugins:")


def test_ewc_and_replay_run_in_a_recipe_and_survive_checkpoints(sentiment_folder, tmp_path):
    recipe = _two_task_recipe(sentiment_folder, tmp_path, [{"name": "ewc", "lam": 100.0, "fisher_samples": 4},
                                                            {"name": "replay", "budget": 4, "alpha": 0.5}])
    run = skillstream.train(recipe, out=tmp_path / "run", show_progress=False)
    import json
    records = [json.loads(l) for l in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    second = [r for r in records if r["stage"] == "topic"]
    penalties = [r["ewc/loss"] for r in second]
    assert penalties[0] == 0.0 and all(b > a for a, b in zip(penalties, penalties[1:]))  # zero at theta*, then grows
    assert all(r["replay/memory"] == 4 for r in second)
    assert len(run.results["matrix"]) == 2 and run.results["bwt"] is not None
    from skillstream import checkpoint
    _, _, state = checkpoint.load(checkpoint.list_checkpoints(run.run_dir / "checkpoints")[-1])
    assert torch.is_tensor(next(iter(state["run_state"]["plugins"]["ewc"]["fisher"].values())))
    assert len(state["run_state"]["plugins"]["replay"]["items"]) == 4


def test_early_stopping_stops_a_stage_of_the_adaptive_learner_recipes_own_length(tmp_path):
    """The recipe's own stage (150 steps of 8) and early_stop line (patience 3, min_epochs 1) on a task
    of the recipe's stream_train_limit (500 examples: 450 to train on after the 10% validation
    hold-out, 56 steps an epoch). Validated once per epoch, the stage would be checked twice; patience
    3 needs four checks, so it could never stop."""
    recipe = load_recipe("adaptive_learner")
    steps, batch = recipe.train.steps, recipe.train.batch_size
    assert (steps, batch) == (150, 8) and recipe.data.stream_train_limit == 500
    rng = random.Random(0)
    words = "red blue green small large quick slow bright dark warm cold soft".split()
    rows = [{"sentence": " ".join(rng.choice(words) for _ in range(4))} for _ in range(500)]
    rows = [{**r, "label": "Yes" if "red" in r["sentence"] else "No"} for r in rows]
    write_task_folder(tmp_path / "stream" / "colours", rows, rows[:20], ["Yes", "No"])
    # 100x the recipe's learning rate: within a third of the stage the adapter fits what the tiny
    # backbone (random, frozen embeddings) lets it, and the validation loss stays flat from then on
    run = skillstream.train("adaptive_learner", out=tmp_path / "run", show_progress=False, overrides={
        "model": "tiny", "report_to": [], "data.stream": str(tmp_path / "stream"), "train.bf16": False,
        "train.lr": 3e-2})
    stage = run.results["stages"][0]
    assert stage["stopped_early"] and stage["steps"] < steps
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    checks = [(r["step"], r["early_stop/val_loss"]) for r in records if "early_stop/val_loss" in r]
    # the default cadence: 10 validations a stage, every 150 // 10 = 15 steps
    assert [s for s, _ in checks] == list(range(15, stage["steps"] + 1, 15))
    losses, bests = [v for _, v in checks], [r["early_stop/best"] for r in records if "early_stop/best" in r]
    assert losses[-4] < 0.99 * losses[0]              # it learned first ...
    assert bests[-1] == bests[-4] == losses[-4]       # ... then three checks in a row without a new best
    assert stage["steps"] >= 450 // batch             # and not before one epoch (min_epochs 1)
