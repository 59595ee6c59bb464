"""Auto-curriculum: each mixing rule on a hand-made sequence, run-time weights in the batch plan
(deterministic and resumable), and a real run where an easy source gains weight over noise."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from skillstream.curriculum.auto import (AutoCurriculum, alignment_matrix, alignment_update, difficulty_update,
                                         example_losses, exp3_update, hardest_weights, normalise, per_example_loss,
                                         progress_update, sample_gradient)
from skillstream.data.batching import BatchPlan, Position, collate
from skillstream.data.render import Tokenized
from skillstream.errors import UserError
from skillstream.plugins import Plugin
from skillstream.run import train



def test_difficulty_rule_follows_learning_progress_over_time():
    w = [0.5, 0.5]
    # refresh 1: source A's loss fell by 1.0, B's rose by 0.2 -> w += 0.5 * [1.0, -0.2] = [1.0, 0.4]
    w = difficulty_update(w, [3.0, 5.0], [2.0, 5.2], eta=0.5)
    assert w == pytest.approx([1.0 / 1.4, 0.4 / 1.4])
    # refresh 2: B improves by 0.9, A by 0.1 -> [0.714 + 0.05, 0.286 + 0.45] renormalised
    w2 = difficulty_update(w, [2.0, 5.2], [1.9, 4.3], eta=0.5)
    raw = [1.0 / 1.4 + 0.05, 0.4 / 1.4 + 0.45]
    assert w2 == pytest.approx([raw[0] / sum(raw), raw[1] / sum(raw)])
    # a source whose loss goes up by more than its weight allows is clipped to 0 (then the floor)
    w3 = difficulty_update([0.5, 0.5], [2.0, 2.0], [1.0, 4.0], eta=1.0, floor=0.1)
    assert w3 == pytest.approx([0.9 * 1.0 + 0.05, 0.05])
    # the levels themselves do not matter, only their change: a hard source that does not move
    # gets nothing (Destruct's public code took np.gradient across the list of datasets instead)
    assert difficulty_update([0.5, 0.5], [9.0, 1.0], [9.0, 1.0], eta=1.0) == [0.5, 0.5]
    # everything clipped: the weights stay
    assert difficulty_update([0.3, 0.7], [1.0, 1.0], [3.0, 3.0], eta=1.0) == [0.3, 0.7]


def test_per_share_progress_does_not_reward_a_source_for_its_own_share():
    # both sources' losses fell by 0.5, but B had three times A's batches: per example, A taught more
    w = difficulty_update([0.25, 0.75], [3.0, 3.0], [2.5, 2.5], eta=0.5, per_share=True)
    raw = [0.25 + 0.5 * 0.5 * (0.5 / 0.25), 0.75 + 0.5 * 0.5 * (0.5 / 0.75)]   # scale (1/K) / w
    assert w == pytest.approx([raw[0] / sum(raw), raw[1] / sum(raw)])
    # the raw rule adds the same 0.25 to both: [0.5, 1.0] -> A gets 1/3; per share A gets 0.45
    assert difficulty_update([0.25, 0.75], [3.0, 3.0], [2.5, 2.5], eta=0.5) == pytest.approx([1 / 3, 2 / 3])
    assert w[0] == pytest.approx(0.75 / (0.75 + 0.75 + 0.5 * 0.5 * 0.5 / 0.75))
    # at uniform shares both rules agree
    assert difficulty_update([0.5, 0.5], [3.0, 5.0], [2.0, 5.2], eta=0.5, per_share=True) == \
        pytest.approx(difficulty_update([0.5, 0.5], [3.0, 5.0], [2.0, 5.2], eta=0.5))


def test_max_scale_caps_the_per_share_factor_of_a_small_source():
    # A holds 5% of the batches: per share its 0.2 fall would count 1/(2 * 0.05) = 10x; capped at 2x
    capped = progress_update([0.05, 0.95], [0.2, 0.2], eta=1.0, per_share=True, max_scale=2.0)
    raw = [0.05 + 1.0 * 2.0 * 0.2, 0.95 + 1.0 * (1 / (2 * 0.95)) * 0.2]
    assert capped == pytest.approx([raw[0] / sum(raw), raw[1] / sum(raw)])
    uncapped = progress_update([0.05, 0.95], [0.2, 0.2], eta=1.0, per_share=True)
    assert uncapped[0] > capped[0]
    # difficulty_update is the same rule on c_prev - c_now
    assert difficulty_update([0.05, 0.95], [3.0, 3.0], [2.8, 2.8], eta=1.0, per_share=True, max_scale=2.0) == \
        pytest.approx(capped)


def test_smoothed_and_absolute_progress():
    plugin = AutoCurriculum(mixing="difficulty", smoothing=0.5, absolute=True)
    plugin.state = {}
    assert plugin._progress_used([0.4, -0.2]) == [0.4, 0.2]       # first refresh: nothing to average with
    # an exponential average with weight 0.5 on the past: 0.5*0.4 + 0.5*0.0, 0.5*(-0.2) + 0.5*(-0.6)
    assert plugin._progress_used([0.0, -0.6]) == pytest.approx([0.2, 0.4])   # |-0.4|: being forgotten
    assert plugin.state["progress_ema"] == pytest.approx([0.2, -0.4])         # the sign is kept in the state
    plain = AutoCurriculum(mixing="difficulty", smoothing=0.0, absolute=False)
    plain.state = {}
    assert plain._progress_used([0.4, -0.2]) == [0.4, -0.2]


class _SeenItems(Plugin):
    """Records the token ids of every training example the engine draws."""
    name = "seen"

    def __init__(self):
        self.seen = set()

    def transform_items(self, ctx, items):
        self.seen |= {tuple(t.input_ids) for t in items}
        return items


def _two_word_sources(tmp_path, steps: int) -> dict:
    """A full-model tiny recipe over two sources of 24 random-word texts each."""
    rng = random.Random(1)
    words = "red green blue cat dog sun moon tree river stone".split()
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": " ".join(rng.choice(words) for _ in range(12))}) + "\n" for _ in range(24)))
    return {"name": "cur", "model": {"name": "tiny", "freeze_backbone": False}, "lora": None, "report_to": [],
            "data": {"max_length": 32, "train": [{"source": str(tmp_path / "a.jsonl")},
                                                 {"source": str(tmp_path / "b.jsonl")}]},
            "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "log_every": 10,
                      "checkpoint_every": 100, "schedule": "constant", "bf16": False}}


@pytest.mark.parametrize("probe", ["held_out", "train"])
def test_the_probe_sample_is_held_out_of_training(tmp_path, probe):
    """With probe: held_out no example the curriculum scores is ever in a training batch."""
    recipe = _two_word_sources(tmp_path, steps=30)
    curriculum = AutoCurriculum(mixing="difficulty", freeze_interval=10, sample_size=6, probe=probe)
    seen = _SeenItems()
    train(recipe, out=tmp_path / "run", show_progress=False, plugins=[curriculum, seen])
    probes = {tuple(t.input_ids) for sample in curriculum.samples for t in sample}
    assert len(probes) == 12                                      # 6 per source
    assert len(curriculum.plan.items) == (48 - 12 if probe == "held_out" else 48)
    assert len(seen.seen) > 24                                    # most training examples were drawn
    assert bool(probes & seen.seen) == (probe == "train")
    assert len(curriculum.state["history"]) == 4                  # steps 0, 10, 20, 30


def test_validation_per_source_is_held_out_and_scored_at_every_refresh(tmp_path):
    """validation_size: a second held-out sample per source, disjoint from the probe and from training,
    whose loss per source is logged at each refresh (hand-checked against per_example_loss)."""
    recipe = _two_word_sources(tmp_path, steps=20)
    curriculum = AutoCurriculum(mixing="difficulty", freeze_interval=10, sample_size=6, validation_size=4)
    seen = _SeenItems()

    class ScoreValidation(Plugin):  # the same items scored by hand on the model after each refresh step
        name = "score_validation"
        scores = {}

        def after_step(self, ctx, metrics):
            if ctx.step % 10 == 0:
                self.scores[ctx.step] = [sum(x) / len(x) for x in
                                         (per_example_loss(ctx.model, v, ctx.pad_id) for v in curriculum.validation)]
    by_hand = ScoreValidation()
    train(recipe, out=tmp_path / "run", show_progress=False, plugins=[curriculum, seen, by_hand])
    probes = {tuple(t.input_ids) for sample in curriculum.samples for t in sample}
    held = {tuple(t.input_ids) for sample in curriculum.validation for t in sample}
    assert len(held) == 8 and not held & probes and not held & seen.seen
    assert len(curriculum.plan.items) == 48 - 12 - 8
    history = curriculum.state["history"]
    assert [h["step"] for h in history] == [0, 10, 20] and all(len(h["validation"]) == 2 for h in history)
    for h in history[1:]:
        assert h["validation"] == pytest.approx(by_hand.scores[h["step"]], abs=1e-5)
    final = by_hand.scores[20]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["curriculum/validation/source0"] for m in logged] == pytest.approx([h["validation"][0] for h in history[1:]])
    assert logged[-1]["curriculum/validation/mean"] == pytest.approx(sum(final) / 2, abs=1e-4)
    with pytest.raises(UserError, match=r"source 'source0' has 18 training examples left after the probe, fewer than "
                                        r"2 x validation_size 10"):
        train(recipe, out=tmp_path / "run2", show_progress=False,
              plugins=[AutoCurriculum(mixing="difficulty", freeze_interval=10, sample_size=6, validation_size=10)])


def test_probe_and_validation_skip_examples_cut_before_their_answer():
    """An item whose labels truncation removed has no loss: it is never drawn to be scored."""
    answered = [Tokenized([1, 2, 3, k], [-100, -100, 3, k], False) for k in range(10, 30)]
    cut = [Tokenized([1, 2, 3, k], [-100] * 4, True) for k in range(30, 50)]
    plan = BatchPlan([answered + cut, answered], [1.0, 1.0], 4, seed=0)
    curriculum = AutoCurriculum(sample_size=6, validation_size=4)
    curriculum.plan = plan
    probe, held = curriculum._take_sample(0, "main"), curriculum._take_validation(0, "main")
    assert len(probe) == 6 and len(held) == 4 and all(t in answered for t in probe + held)
    curriculum.plan = BatchPlan([cut, answered], [1.0, 1.0], 4, seed=0)
    with pytest.raises(UserError, match="no example of source 'source0' keeps a labelled token after truncation"):
        curriculum._take_sample(0, "main")


def test_bandit_follows_exp3_on_a_scripted_reward_sequence():
    lr, gamma, k = 0.5, 0.1, 3
    s, p = [0.0, 0.0, 0.0], [1 / 3] * 3
    script = [[0.10, 0.02, 0.0], [0.05, 0.04, -0.01], [0.0, 0.08, 0.0]]
    for rewards in script:
        expect_s = [si + lr * r / pi for si, r, pi in zip(s, rewards, p)]   # importance-weighted
        z = sum(math.exp(x) for x in expect_s)
        expect_p = [(1 - gamma) * math.exp(x) / z + gamma / k for x in expect_s]
        s, p = exp3_update(s, p, rewards, lr, gamma)
        assert s == pytest.approx(expect_s) and p == pytest.approx(expect_p)
        assert sum(p) == pytest.approx(1.0) and min(p) >= gamma / k
    # by hand for the first round: s = [0.15, 0.03, 0]
    s1, _ = exp3_update([0.0] * 3, [1 / 3] * 3, script[0], lr, gamma)
    assert s1 == pytest.approx([0.15, 0.03, 0.0])
    assert p[0] > p[2] and p[1] > p[2]     # the source that never improved loses share


def test_hardest_and_static_rules():
    assert hardest_weights([2.0, 6.0]) == pytest.approx([0.25, 0.75])
    assert hardest_weights([2.0, 6.0], floor=0.2) == pytest.approx([0.8 * 0.25 + 0.1, 0.8 * 0.75 + 0.1])
    assert normalise([1.0, 3.0]) == [0.25, 0.75]


def test_alignment_crosses_the_halves_so_noise_does_not_score_its_own_norm():
    # source 0: the same direction in both halves (learnable); source 1: opposite directions (a zero
    # expected gradient: pure sampling noise). Its own <g, g> would be 4; crossed, it is -4.
    a = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])]
    b = [torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, -2.0, 0.0])]
    m = alignment_matrix(a, b)
    assert m == [[1.0, 0.0], [0.0, -4.0]]
    # usefulness = row means (0.5, -2) -> target shares (1, 0); smoothing 0.5 moves half way there
    assert alignment_update([0.5, 0.5], m, smoothing=0.5) == pytest.approx([0.75, 0.25])
    assert alignment_update([0.5, 0.5], m, smoothing=0.0, floor=0.1) == pytest.approx([0.95, 0.05])
    assert alignment_update([0.3, 0.7], [[-1.0, 0.0], [0.0, -1.0]], 0.5) == [0.3, 0.7]  # nothing helps: unchanged


def test_sample_gradient_is_the_gradient_of_the_mean_loss_and_leaves_grad_alone():
    from skillstream.models.backbone import load_backbone

    model, tok = load_backbone("tiny", seed=0)
    model.requires_grad_(True)                                          # trained from scratch, as in bench/curriculum
    items = [Tokenized([1, 5 + i, 9, 3 + i], [1, 5 + i, 9, 3 + i], False) for i in range(3)]
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is None for p in params)
    g = sample_gradient(model, items, tok.pad_token_id, batch_size=2)   # two batches, summed
    assert all(p.grad is None for p in params)                          # the optimizer's .grad untouched
    model.eval()
    example_losses(model, collate(items, tok.pad_token_id)).mean().backward()
    expected = torch.cat([p.grad.flatten() for p in params])
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
    assert per_example_loss(model, items, tok.pad_token_id) == pytest.approx(
        example_losses(model, collate(items, tok.pad_token_id)).tolist(), rel=1e-5)


def _train_easy_and_noise(tmp_path, mixing: str, steps: int) -> None:
    """The tiny model trained from scratch (full weights) on the two sources, refreshed every 4 steps."""
    recipe = {"name": "cur", "model": {"name": "tiny", "freeze_backbone": False}, "lora": None, "report_to": [],
              "data": {"max_length": 48, "train": [{"source": str(tmp_path / "easy.jsonl")},
                                                   {"source": str(tmp_path / "noise.jsonl")}]},
              "train": {"steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 4,
                        "checkpoint_every": 100, "schedule": "constant", "bf16": False},
              "plugins": [{"name": "auto_curriculum", "mixing": mixing, "freeze_interval": 4, "sample_size": 6}]}
    train(recipe, out=tmp_path / "run", show_progress=False)


def test_alignment_mixing_in_a_real_run_gives_the_noise_less_weight(tmp_path):
    """The tiny model from scratch on a repetitive source and random characters: the noise source's
    gradient halves disagree, so alignment moves its weight down from the first refresh on."""
    _write_sources(tmp_path)
    _train_easy_and_noise(tmp_path, "alignment", steps=16)
    from skillstream.checkpoint import list_checkpoints

    state = json.loads((list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "state.json").read_text())["run_state"]
    history = state["plugins"]["curriculum"]["history"]
    assert [h["step"] for h in history] == [0, 4, 8, 12, 16]
    assert all(len(h["alignment"]) == 2 for h in history)           # the matrix of every refresh is kept
    noise = [h["weights"][1] for h in history]
    print("noise weight", [round(w, 3) for w in noise], "alignment", history[-1]["alignment"])
    assert noise[-1] < 0.25 and noise[-1] < noise[0] <= 0.5


def _plan(weights=(1.0, 1.0, 1.0)):
    sources = [[Tokenized([s, i], [s, i], False) for i in range(n)] for s, n in ((0, 10), (1, 20), (2, 30))]
    return BatchPlan(sources, list(weights), 4, seed=7)


def test_run_time_weights_are_deterministic_resumable_and_respected():
    a, b = _plan(), _plan()
    a.set_weights([0.0, 1.0, 3.0])
    b.set_weights([0.0, 1.0, 3.0])
    it = a.iterate(Position())
    seen = [next(it) for _ in range(40)]
    assert seen == [x for x, _ in zip(b.iterate(Position()), range(40))]
    picks = [a.items[i].input_ids[0] for batch, _ in seen for i in batch]
    assert 0 not in picks                                       # weight 0: never drawn
    assert 0.65 < picks.count(2) / len(picks) < 0.85            # about 3/4
    resumed = b.iterate(seen[24][1])                            # resume after batch 25
    assert [next(resumed) for _ in range(15)] == seen[25:]
    a.set_weights([1.0, 0.0, 0.0])                               # read as each batch is drawn
    assert {a.items[i].input_ids[0] for i in next(it)[0]} == {0}
    with pytest.raises(ValueError):
        a.set_weights([1.0, -1.0, 0.0])


def test_bad_settings_are_one_line_errors():
    with pytest.raises(UserError, match="freeze_interval must be a positive integer"):
        AutoCurriculum(freeze_interval=0)
    with pytest.raises(UserError, match="mixing 'hardest_first' is not one of"):
        AutoCurriculum(mixing="hardest_first")
    with pytest.raises(UserError, match="probe must be held_out or train"):
        AutoCurriculum(probe="test")
    with pytest.raises(UserError, match="smoothing must be in"):
        AutoCurriculum(smoothing=1.0)


def _write_sources(tmp_path):
    rng = random.Random(0)
    easy = " ".join("the cat sat on the mat".split() * 6)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    (tmp_path / "easy.jsonl").write_text("".join(json.dumps({"text": easy}) + "\n" for _ in range(32)))
    (tmp_path / "noise.jsonl").write_text("".join(
        json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(100))}) + "\n" for _ in range(32)))


def test_a_real_run_moves_weight_from_noise_to_the_learnable_source(tmp_path):
    """Full-weight training of the tiny model on a repetitive source and a random-character
    source; the bandit rewards loss reduction, so the repetitive source gains weight."""
    _write_sources(tmp_path)
    _train_easy_and_noise(tmp_path, "bandit", steps=24)
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    w_easy = [r["curriculum/weight/easy"] for r in records]
    w_noise = [r["curriculum/weight/noise"] for r in records]
    d_easy = [r["curriculum/difficulty/easy"] for r in records]
    print("weights easy", [round(x, 3) for x in w_easy], "difficulty easy", [round(x, 2) for x in d_easy])
    assert records[-1]["curriculum/refreshes"] == 7.0          # step 0 and every 4 steps
    assert d_easy[-1] < d_easy[0] - 2.0                         # the easy source is being learned
    assert w_easy[-1] > 0.6 and w_noise[-1] < 0.4               # from 0.5 / 0.5: the larger share
    assert w_easy[-1] > w_easy[0]                               # ... growing as it keeps improving most


def test_resume_from_a_mid_stage_checkpoint_restores_weights_and_curriculum(tmp_path):
    """Cut a finished run back to its step-8 checkpoint (as a kill right after it would leave it),
    resume, and get the same weights, mixture weights and refresh history."""
    import shutil

    from safetensors.torch import load_file

    from skillstream.checkpoint import list_checkpoints

    _write_sources(tmp_path)
    recipe = {"name": "cur", "model": {"name": "tiny", "freeze_backbone": False}, "lora": None, "report_to": [],
              "data": {"max_length": 32, "train": [{"source": str(tmp_path / "easy.jsonl")},
                                                   {"source": str(tmp_path / "noise.jsonl")}]},
              "train": {"steps": 14, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
                        "checkpoint_every": 4, "keep_checkpoints": 10, "schedule": "constant", "bf16": False},
              "plugins": [{"name": "auto_curriculum", "mixing": "difficulty", "freeze_interval": 3, "sample_size": 4}]}
    full = tmp_path / "full"
    train(recipe, out=full, show_progress=False)
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for ckpt in list_checkpoints(cut / "checkpoints"):
        state = json.loads((ckpt / "state.json").read_text())["run_state"]
        if state["stage_done"] or state["stage_state"]["step"] > 8:
            shutil.rmtree(ckpt)
    for name in ("results.json", "model", "experts"):
        shutil.rmtree(cut / name, ignore_errors=True) if (cut / name).is_dir() else (cut / name).unlink(missing_ok=True)
    train(recipe, out=cut, resume=True, show_progress=False)

    def last(run):
        ckpt = list_checkpoints(run / "checkpoints")[-1]
        return load_file(str(ckpt / "weights.safetensors")), json.loads((ckpt / "state.json").read_text())["run_state"]

    (wa, sa), (wb, sb) = last(full), last(cut)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    assert sa["plugins"]["curriculum"] == sb["plugins"]["curriculum"]
    assert [h["step"] for h in sb["plugins"]["curriculum"]["history"]] == [0, 3, 6, 9, 12]
    logged = [[(r["step"], r["loss"], r["curriculum/weight/easy"]) for r in map(json.loads, (run / "metrics.jsonl").open())]
              for run in (full, cut)]
    assert logged[0] == logged[1] and len(logged[0]) == 14
