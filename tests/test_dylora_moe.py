"""The DyLoRA-MoE skill stream end to end on the tiny model: three real skills (bash requests,
arithmetic questions, English prose) read as one unlabelled stream of chunks."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from skillstream.config import PhaseConfig
from skillstream.experts.lifecycle import phase_lr
from skillstream.run import train
from test_experts_skills import skill_texts

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

SKILLS = ("bash", "math", "prose")


def test_phase_rates_are_the_absolute_rates_the_schedule_says():
    seed = PhaseConfig(lr=1e-3, steps=10, shape="wsd", warmup_steps=2, decay_fraction=0.3)
    low = PhaseConfig(lr=1e-4, shape="constant")
    rates = [phase_lr(s, seed, low) for s in range(13)]
    assert rates[:2] == pytest.approx([5e-4, 1e-3])              # warmup
    assert rates[2:7] == pytest.approx([1e-3] * 5)               # stable at the seeding rate
    assert rates[7:10] == pytest.approx([7e-4, 4e-4, 1e-4])      # decay lands on the consolidation rate
    assert rates[10:] == pytest.approx([1e-4] * 3)               # consolidation
    cyc = [phase_lr(s, PhaseConfig(lr=1e-3, steps=8, shape="cyclic", cycles=2), low) for s in range(8)]
    assert cyc == pytest.approx([1e-4, 5.5e-4, 1e-3, 5.5e-4] * 2)


def _write_skills(root, n_train=16, n_test=4):
    # disjoint ranges: test texts are never trained on
    for skill in SKILLS:
        for split, start, n in (("train", 0, n_train), ("test", 100, n_test)):
            with (root / f"{skill}_{split}.jsonl").open("w") as f:
                for text in skill_texts(skill, start, n):
                    f.write(json.dumps({"text": text}) + "\n")


def recipe(root, **experts) -> dict:
    _write_skills(root)
    e = {"chunk_size": 8, "chunk_epochs": 1,
         # on the tiny random backbone the embedding separates these skills (about 0.5-0.95 within a
         # skill, at most about 0.3 across); its gradient sketch and context statistics do not, so they weigh 0 here
         "novelty": {"similarity_threshold": 0.4, "entropy_threshold": 0.5, "window": 2, "signal_examples": 8,
                     "weights": {"embedding": 1.0, "gradient": 0.0, "context": 0.0}},
         # the router reads two depths at once, as dylora_moe's does, through the whole run, resume and export
         "router": {"steps_per_chunk": 60, "lr": 0.05, "mature_steps": 2, "depth": [0.25, 0.5]},
         "seeding": {"lr": 1e-3, "steps": 3, "warmup_steps": 1}, "consolidation": {"lr": 1e-4}}
    e.update(experts)
    evals = [{"name": s, "source": str(root / f"{s}_test.jsonl"), "metric": "perplexity"} for s in SKILLS]
    return {"name": "stream", "model": "tiny", "report_to": [], "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "experts": e, "train": {"batch_size": 4, "log_every": 1},
            "data": {"max_length": 64, "eval_batch_size": 4, "eval": evals},
            "stages": [{"name": s, "data": {"max_length": 64, "eval": evals,
                                            "train": [{"source": str(root / f"{s}_train.jsonl")}]}} for s in SKILLS]}


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    run = train(recipe(root), out=root / "run", show_progress=False)
    return root, run


def test_novelty_creates_one_expert_per_skill_at_the_true_boundaries(stream_run):
    _, run = stream_run
    r = run.results
    assert r["tasks"] == list(SKILLS) and len(r["matrix"]) == 3 and all(len(row) == 3 for row in r["matrix"])
    assert r["experts_created"] == r["skills"] == 3
    # each skill is two chunks: the first chunk of a new skill is held back (window 2), the second creates
    assert r["novelty"]["true_boundaries"] == [2, 4]
    assert r["novelty"]["created_at"] == [3, 5]
    decisions = [json.loads(line) for line in (run.run_dir / "decisions.jsonl").read_text().splitlines()]
    assert [d["decision"] for d in decisions] == ["create", "reuse", "wait", "create", "wait", "create"]
    assert all(d["similarity_threshold"] == 0.4 and d["window"] == 2 for d in decisions)
    # the held-back chunk trains the new expert, not the old one
    assert decisions[3]["chunks_trained"] == [2, 3] and decisions[3]["trained"] == "expert_1"
    assert r["skill_expert"] == {"bash": "expert_0", "math": "expert_1", "prose": "expert_2"}


def test_routing_and_oracle_are_measured(stream_run):
    _, run = stream_run
    r = run.results
    routing = r["routing"]
    assert set(routing["per_task"]) == set(SKILLS)
    assert routing["task_agnostic_accuracy"] == pytest.approx(
        sum(t["accuracy"] * t["n"] for t in routing["per_task"].values()) / sum(t["n"] for t in routing["per_task"].values()))
    assert routing["task_agnostic_accuracy"] >= 2 / 3  # a trained router, not chance (1/3)
    assert r["oracle"]["experts"] == r["skill_expert"] and len(r["oracle"]["scores"]) == 3
    assert all(d["routed_to"] for d in r["details"][-1])  # every task says where its inputs went


def test_an_oracle_score_the_routing_already_measured_is_used_again_and_equals_a_forced_evaluation(stream_run):
    import skillstream

    _, run = stream_run
    r = run.results
    last, oracle = r["details"][-1], r["oracle"]["details"]
    reused = [j for j, s in enumerate(SKILLS) if oracle[j].get("memo")]
    assert reused, "the mature router sends some task wholly to its expert"
    for j, skill in enumerate(SKILLS):
        expert = r["skill_expert"][skill]
        assert (last[j].get("served_by") == expert) == (j in reused)  # reused exactly where routing was the oracle's
        if j in reused:
            assert oracle[j]["score"] == last[j]["score"]
            forced = skillstream.load(run.run_dir, expert=expert).evaluate(write=False)["tasks"][skill]
            assert forced["score"] == pytest.approx(oracle[j]["score"], rel=1e-5)


def test_a_task_its_unchanged_expert_would_answer_alone_again_is_not_scored_again(stream_run, tmp_path, monkeypatch):
    """RowMemo: a task routed wholly to one expert that trained no more since it answered that task alone
    repeats its earlier row (marked memo); scoring every row afresh gives the same rows."""
    from skillstream.experts.row_memo import RowMemo

    root, run = stream_run
    rows = run.results["details"]
    remembered = [(i, j) for i, row in enumerate(rows) for j, cell in enumerate(row) if cell.get("memo")]
    assert remembered, "an expert that trained no more answers a task's prompts alone again after a later stage"
    for i, j in remembered:  # each one repeats the row before it, served by the same expert alone
        assert rows[i][j]["served_by"] == rows[i - 1][j]["served_by"]
        assert rows[i][j]["score"] == rows[i - 1][j]["score"]
    monkeypatch.setattr(RowMemo, "lookup", lambda self, *a, **k: None)  # every task scored afresh
    afresh = train(recipe(tmp_path), out=tmp_path / "run", show_progress=False)
    assert not any(cell.get("memo") for row in afresh.results["details"] for cell in row)
    strip = lambda row: [{k: v for k, v in cell.items() if k != "memo"} for cell in row]  # noqa: E731
    assert [strip(r) for r in afresh.results["details"]] == [strip(r) for r in rows]


def test_scoring_at_the_end_only_gives_the_final_row_of_scoring_after_every_skill(stream_run, tmp_path):
    """experts.score: end skips the matrix's middle rows (and oracle: false the forced-expert pass): the
    stream trains exactly as it does when scored after every skill, so its one row is that run's last."""
    root, full = stream_run
    run = train(recipe(root, score="end", oracle=False), out=tmp_path / "run", show_progress=False)
    r, f = run.results, full.results
    assert len(r["matrix"]) == 1 and len(f["matrix"]) == 3
    assert r["matrix"][0] == f["matrix"][-1] and r["avg_acc"] == f["avg_acc"]
    assert r["bwt"] is None and r["fwt"] is None
    assert r["oracle"]["experts"] == {} and r["oracle"]["scores"] == []
    assert r["skill_expert"] == f["skill_expert"]


def test_each_expert_trains_at_its_own_phase_rate(stream_run):
    _, run = stream_run
    cfg = run.config.experts
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    seen = 0
    for row in rows:
        for key, value in row.items():
            if key.startswith("lr/"):
                # expert_steps counts the steps including this one; the rate was set before it
                assert value == pytest.approx(phase_lr(row["expert_steps"] - 1, cfg.seeding, cfg.consolidation))
                seen += 1
    assert seen >= 6
    # bash's expert came back for its second chunk in consolidation... or still seeding: either way its own count
    assert {k for row in rows for k in row if k.startswith("lr/")} == {"lr/expert_0", "lr/expert_1", "lr/expert_2"}


def test_the_lr_column_is_the_rate_the_optimizer_applied_and_the_global_step_only_grows(stream_run):
    _, run = stream_run
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss" in r]
    # the expert's own phase rate, not the recipe's constant train.lr
    assert all(r["lr"] == next(v for k, v in r.items() if k.startswith("lr/")) for r in trained)
    assert len({r["lr"] for r in trained}) > 1
    steps = [r["global_step"] for r in trained]
    assert steps == sorted(set(steps)) and steps[-1] == run.results["steps"]  # every chunk continues the count


def test_every_chunk_logs_how_the_router_shares_it_among_the_experts(stream_run):
    _, run = stream_run
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    shares = [r for r in rows if any(k.startswith("router/share/") for k in r)]
    assert [r["stage"] for r in shares] == [f"chunk_{i:04d}" for i in range(6)]
    for r in shares:
        assert sum(v for k, v in r.items() if k.startswith("router/share/")) == pytest.approx(1.0)
    # shared among the experts there are when the chunk arrives (new ones are made at chunks 3 and 5)
    assert [sum(k.startswith("router/share/") for k in r) for r in shares] == [1, 1, 1, 1, 2, 2]


def test_the_python_api_loads_a_stream_run_with_its_router(stream_run):
    import skillstream

    _, run = stream_run
    model = skillstream.load(run.run_dir)  # no expert named: the router picks one per input
    model.generate("find all .log files under /var", max_new_tokens=2)
    assert model.last_routing is not None and len(model.last_routing.choices) == 1


def test_run_directory_serves_experts_and_router(stream_run, tmp_path):
    from peft import PeftModel

    from skillstream.models.backbone import load_backbone
    from skillstream.trained import load

    root, run = stream_run
    experts = run.run_dir / "experts"
    assert json.loads((experts / "pool.json").read_text())["experts"][1]["name"] == "expert_1"
    base, _ = load_backbone("tiny")
    PeftModel.from_pretrained(base, str(experts / "expert_1"))  # a standard PEFT adapter folder
    assert (run.run_dir / "router" / "router.safetensors").is_file()
    trained = load(run.run_dir)
    trained.generate("What is 12 + 30?", max_new_tokens=4)
    assert len(trained.last_routing.choices) == 1 and trained.last_routing.top()[0] in trained.pool.names
    forced = load(run.run_dir, "expert_2")
    forced.generate("What is 12 + 30?", max_new_tokens=4)
    assert forced.last_routing.describe(0) == "expert_2 1.00"
    out = subprocess.run([sys.executable, "-m", "skillstream.cli", "export", str(run.run_dir), str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "x" / "router" / "router.json").is_file() and (tmp_path / "x" / "experts" / "expert_2").is_dir()
    assert json.loads((tmp_path / "x" / "router" / "router.json").read_text())["depth"] == [0.25, 0.5]


class _Crash(Exception):
    pass


class CrashAfter:
    """A plugin that stops the run mid-chunk, as a kill would (the last checkpoint is the chunk before)."""
    name = "crash"

    def __init__(self, steps):
        self.left = steps

    def __getattr__(self, hook):
        return lambda *a, **k: (a[-1] if hook == "transform_items" else 1.0 if hook == "lr_scale" else
                                a[-1] if hook == "group_lr" else None)

    def after_step(self, ctx, metrics):
        self.left -= 1
        if self.left == 0:
            raise _Crash()


def test_resumed_stream_ends_where_an_uninterrupted_one_does(stream_run, tmp_path):
    root, run = stream_run
    cfg = recipe(tmp_path)
    with pytest.raises(_Crash):
        train(cfg, out=tmp_path / "run", show_progress=False, plugins=[CrashAfter(9)])
    resumed = train(cfg, out=tmp_path / "run", resume=True, show_progress=False)
    assert resumed.results["matrix"] == run.results["matrix"]
    assert resumed.results["novelty"] == run.results["novelty"]
    from safetensors.torch import load_file
    for name in ("expert_0", "expert_1", "expert_2"):
        a = load_file(str(run.run_dir / "experts" / name / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "run" / "experts" / name / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (tmp_path / "run" / "decisions.jsonl").read_text().splitlines()]
    assert [d["chunk"] for d in lines] == list(range(6))  # each chunk's decision once


def test_a_reused_expert_rehearses_its_own_chunks_and_the_memory_survives_a_resume(tmp_path):
    """Replay with scope adapter in the expert-pool regime: the memory is kept per expert, is part of
    the stream's checkpoints, and a resumed stream ends where an uninterrupted one does."""
    cfg = recipe(tmp_path)
    cfg["plugins"] = [{"name": "replay", "budget": 12, "alpha": 0.5, "scope": "adapter"}]
    whole = train(cfg, out=tmp_path / "whole", show_progress=False)
    with pytest.raises(_Crash):
        train(cfg, out=tmp_path / "run", show_progress=False, plugins=[CrashAfter(9)])
    resumed = train(cfg, out=tmp_path / "run", resume=True, show_progress=False)
    assert resumed.results["matrix"] == whole.results["matrix"]
    from skillstream import checkpoint
    _, _, state = checkpoint.load(checkpoint.list_checkpoints(whole.run_dir / "checkpoints")[-1])
    trained = set()  # (expert, chunk) for every chunk an expert trained on, held-back chunks included
    for d in map(json.loads, (whole.run_dir / "decisions.jsonl").read_text().splitlines()):
        if d["trained"]:
            trained |= {(d["trained"], i) for i in d["chunks_trained"]}
            trained |= {(t, int(i)) for i, t in d["reassigned"].items()}
    keys = {item["key"] for item in state["run_state"]["plugins"]["replay"]["items"]}  # "<expert>:chunk_<last of batch>/<class>"
    assert keys and all((k.split(":")[0], int(k.split(":")[1].split("/")[0][len("chunk_"):])) in trained for k in keys)
    assert len({key.split(":")[0] for key in keys}) == 3  # every expert keeps some of its own chunks
    rows = [json.loads(x) for x in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["replay/memory"] for r in rows if "loss" in r) == 12


@pytest.mark.parametrize("override, message", [
    ("experts.router.maturity_threshold=1.5", "experts.router.maturity_threshold"),
    ("experts.novelty.similarity_threshold=-0.1", "experts.novelty.similarity_threshold"),
    ("experts.novelty.weights.embeding=0.5", "unknown similarity components ['embeding']"),
    ("data.eval.0.expert=bogus", "unknown expert 'bogus'"),
    # the stages have their own data blocks, so the recipe-level share would hold nothing out
    ("data.validation_eval=true", "set stages.0.data.validation_fraction (each stage with its own data block"),
])
def test_bad_stream_recipes_stop_with_one_line(tmp_path, override, message):
    import yaml
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(tmp_path)))
    out = subprocess.run([sys.executable, "-m", "skillstream.cli", "train", str(tmp_path / "r.yaml"), "--out",
                          str(tmp_path / "run"), "--set", override], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "run").exists()


def test_a_skill_with_no_examples_is_an_empty_chunk_error(tmp_path):
    import yaml
    cfg = recipe(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    cfg["stages"][1]["data"]["train"] = [{"source": str(tmp_path / "empty.jsonl")}]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "skillstream.cli", "train", str(tmp_path / "r.yaml"), "--out",
                          str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "empty.jsonl" in out.stderr or "math" in out.stderr


def test_held_chunks_go_to_the_new_expert_only_if_they_resemble_it():
    from types import SimpleNamespace

    from skillstream.experts.signals import SimilarityWeights, TaskSignal
    from skillstream.experts.stream_run import assign_held_chunks

    def sig(direction):
        v = torch.tensor(direction, dtype=torch.float)
        return TaskSignal(v, v, v, 1.0, 10.0)

    life = SimpleNamespace(weights=SimilarityWeights(1.0, 0.0, 0.0))
    new_skill, old_skill = sig([1.0, 0.0]), sig([0.0, 1.0])

    def held(chunk, signal, best_sim):
        tensors, meta = signal.state()
        return {"chunk": chunk, "signal": tensors, "signal_meta": meta, "features": torch.zeros(1, 2),
                "best": "expert_0", "best_sim": best_sim}

    # chunk 4 was a dip of the old skill (0.8 to expert_0, 0 to the new chunk); chunk 5 is the new skill
    plan = assign_held_chunks(life, {"decision": "create", "expert": "expert_1"}, new_skill,
                              [held(4, old_skill, 0.8), held(5, new_skill, 0.1)])
    assert {k: [c for c, _, _ in v] for k, v in plan.items()} == {"expert_0": [4], "expert_1": [5]}
    # novelty that did not last: each held chunk returns to the expert it was closest to
    plan = assign_held_chunks(life, {"decision": "reuse", "expert": "expert_2"}, old_skill, [held(4, new_skill, 0.3)])
    assert list(plan) == ["expert_0"]


def test_report_shows_routing_per_task_and_the_novelty_decisions(stream_run):
    from skillstream.report.html import write_report

    _, run = stream_run
    html = write_report([run.run_dir], None).read_text()
    assert "Expert pool and novelty decisions" in html and "expert of its skill" in html
    assert "after math" in html  # which experts answered each task after each skill


def test_routing_is_measured_on_more_held_out_prompts_than_the_generation_evaluation(tmp_path):
    from skillstream.config import SourceConfig
    from skillstream.data.examples import load_examples
    from skillstream.evaluation.suite import EvalTask
    from skillstream.experts.stream_run import routing_examples

    _write_skills(tmp_path)
    src = SourceConfig(source=str(tmp_path / "bash_test.jsonl"), limit=2)
    task = EvalTask("bash", "perplexity", load_examples(src), 8, source=src)
    more = routing_examples(task, 4)  # the router alone reads these: cheap, and 4 prompts say more than 2
    assert len(task.examples) == 2 and len(more) == 4
    assert [e.text for e in more[:2]] == [e.text for e in task.examples]  # the evaluation's prompts come first
    assert routing_examples(task, 0) == task.examples  # 0: the evaluation's own prompts


def test_a_sweep_over_a_stream_selects_on_held_out_requests_the_stream_never_trained_on(tmp_path):
    """`skillstream sweep` on a skill stream whose stages have their own data: the sweep holds a share of
    every stage's training source out, the stream cuts its chunks from the rest, and the final model
    answers the held-out requests through its router (results.json `validation`, the sweep's objective)."""
    import yaml

    from skillstream.config import load_recipe
    from skillstream.data.render import Renderer
    from skillstream.experts.stream_run import make_chunks
    from skillstream.models.backbone import load_backbone
    from skillstream.stages import prepare_stages
    from skillstream.sweep import DEFAULT_VALIDATION_FRACTION, make_spec, run_sweep

    cfg = recipe(tmp_path)
    cfg["stages"][0]["data"]["train"] = [{"source": "nl2bash", "split": "train", "limit": 20}]
    evals = [{"name": "bash", "source": "nl2bash", "split": "test", "limit": 2, "metric": "bash", "max_new_tokens": 8},
             *cfg["data"]["eval"][1:]]
    cfg["data"].update(eval=evals, max_length=256)  # a chat-templated request and its command fit
    for st in cfg["stages"]:
        st["data"].update(eval=evals, max_length=256)
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(cfg))

    spec, _ = make_spec(str(tmp_path / "stream.yaml"), ["experts.consolidation.lr=1e-4"])
    assert all(spec.overrides[f"stages.{i}.data.validation_fraction"] == DEFAULT_VALIDATION_FRACTION for i in range(3))

    # what the stream trains on: 18 of the 20 bash requests, none of the 2 held out
    trial = load_recipe(str(tmp_path / "stream.yaml"), spec.overrides)
    _, tok = load_backbone("tiny")
    renderer = Renderer(tok, trial.data.max_length)
    stages, _ = prepare_stages(trial, renderer, {"tokenizer": tok, "renderer": renderer, "recipe": trial})
    held = stages[0].plan.validation_examples
    streamed = [ex for c in make_chunks(stages, trial) if c.skill == 0 for ex in c.examples]
    assert len(held) == 2 and len(streamed) == 18
    assert not any(h.prompt == ex.prompt for h in held for ex in streamed)

    sweep = run_sweep(spec, tmp_path / "sweep", show_progress=False)
    (done,) = sweep["trials"]
    results = json.loads((tmp_path / "sweep" / done["run_dir"] / "results.json").read_text())
    assert results["stages"][0]["examples"] == 18
    # only bash reads a training source; its 2 held-out requests, answered through the router
    assert list(results["validation"]["tasks"]) == ["bash"] and results["validation"]["tasks"]["bash"]["n"] == 2
    bash = results["validation"]["tasks"]["bash"]
    assert done["value"] == results["validation"]["score"] == bash["score"] == sum(bash["outcomes"]) / 2
    # each example's outcome is kept, so two trials compare paired, and every score has its interval
    assert len(bash["outcomes"]) == 2 and len(bash["score_ci95"]) == len(results["validation"]["score_ci95"]) == 2
