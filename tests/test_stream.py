"""Stream folders: order and instructions from stream.yaml, one stage per task, both evaluation
protocols in results.json, and one-line errors for a bad stream."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import skillstream
from conftest import SHARED_DATA, run_cli, write_task_folder
from skillstream.config import SourceConfig, load_recipe
from skillstream.data.examples import load_examples, skipped_rows
from skillstream.data.stream import read_stream
from skillstream.errors import UserError


def test_the_development_stream_is_read_in_its_order_with_its_instructions():
    tasks = read_stream(SHARED_DATA / "glue_stream")
    assert [t.name for t in tasks] == ["sst2", "rte", "mnli", "cb"]
    assert tasks[1].instruction == "Does sentence 1 entail sentence 2?"


def _stream(tmp_path: Path) -> Path:
    root = tmp_path / "stream"
    good = [{"sentence": s, "label": "Good"} for s in ("lovely", "great fun", "a joy")]
    bad = [{"sentence": s, "label": "Bad"} for s in ("awful", "boring", "a mess")]
    write_task_folder(root / "b_sentiment", good + bad, good + bad, ["Good", "Bad"])
    sport = [{"sentence": s, "label": "Sports"} for s in ("a late goal", "the final whistle")]
    money = [{"sentence": s, "label": "Finance"} for s in ("rates rose", "stocks fell")]
    write_task_folder(root / "a_topic", sport + money, sport + money, ["Sports", "Finance"])
    return root


def test_without_stream_yaml_tasks_come_in_alphabetical_order(tmp_path):
    assert [t.name for t in read_stream(_stream(tmp_path))] == ["a_topic", "b_sentiment"]


def test_any_recipe_runs_on_a_stream_with_both_protocols(tmp_path):
    run = skillstream.train("quickstart", out=tmp_path / "run", show_progress=False, overrides={
        "model": "tiny", "report_to": [], "data.stream": str(_stream(tmp_path)), "train.steps": 2,
        "train.batch_size": 2, "train.bf16": False})
    r = run.results
    assert r["tasks"] == ["a_topic", "b_sentiment"] and [s["name"] for s in r["stages"]] == r["tasks"]
    assert len(r["matrix"]) == 2 and len(r["matrix"][0]) == 2
    assert r["metric"] == {"a_topic": "exact_match", "b_sentiment": "exact_match"}
    options = r["protocols"]["accuracy"]
    assert len(options["matrix"]) == 2 and all(0 <= v <= 1 for row in options["matrix"] for v in row)
    assert options["bwt"] is not None


def test_early_stopping_ends_a_task_whose_validation_loss_stops_improving(tmp_path):
    run = skillstream.train("quickstart", out=tmp_path / "run", show_progress=False, overrides={
        "model": "tiny", "report_to": [], "data.stream": str(_stream(tmp_path)), "train.steps": 40,
        "train.batch_size": 2, "train.bf16": False, "train.lr": 1e-9, "data.validation_fraction": 0.34,
        "data.stream_protocols": ["accuracy"],
        "plugins": [{"name": "early_stop", "patience": 2, "min_epochs": 1, "eval_every": 1, "min_delta": 1e-3}]})
    stages = run.results["stages"]
    assert all(s["stopped_early"] for s in stages) and all(s["steps"] < 40 for s in stages)


@pytest.mark.parametrize("make, message", [
    (lambda root: root.mkdir(), "no task folders"),
    (lambda root: write_task_folder(root / "t", [], [], ["A"]).joinpath("labels.json").unlink(), "has no labels.json"),
    (lambda root: (write_task_folder(root / "t", [], [], ["A"]), (root / "stream.yaml").write_text("tasks: [t, t]")),
     "'t' is listed twice"),
    (lambda root: (write_task_folder(root / "t", [], [], ["A"]), (root / "stream.yaml").write_text("tasks: t")),
     "tasks: expected a list of task folder names"),
    (lambda root: (write_task_folder(root / "t", [], [], ["A"]),
                   (root / "stream.yaml").write_text("instructions: [Answer.]")),
     "instructions: expected a mapping of task name to instruction"),
])
def test_bad_streams_are_named(tmp_path, make, message):
    make(tmp_path / "s")
    with pytest.raises(UserError, match=message):
        read_stream(tmp_path / "s")
    res = run_cli("train", "quickstart", "--out", str(tmp_path / "run"), "--set", "model=tiny",
                  "--set", f"data.stream={tmp_path / 's'}", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and message in res.stderr


# -- the packaged stream: adaptive_learner runs as installed ------------------------------------

PACKAGED_TASKS = ["request_language", "function_relevance", "call_count"]


@pytest.fixture
def user_dir(tmp_path, monkeypatch) -> Path:
    """A user's working folder far from this repository (no ../shared beside it), with its own cache."""
    monkeypatch.setenv("SKILLSTREAM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "work"


def test_adaptive_learner_defaults_to_a_stream_the_package_builds_offline(user_dir):
    cfg = load_recipe("adaptive_learner")
    assert cfg.data.stream == "offline_skills"
    stages = cfg.resolved_stages()
    assert [st.name for st in stages] == PACKAGED_TASKS
    folder = Path(stages[0].data.train[0].source).parent
    assert folder.parent == user_dir.parent / "cache" / "streams" and folder.name.startswith("offline_skills-")
    assert [t.instruction for t in read_stream(folder)][:2] == ["Which language fits this request?",
                                                                "Can this function answer the request?"]
    for task in stages[0].data.eval:  # every row's label is one of its options, in both splits
        for split in ("train", "test"):
            examples = load_examples(SourceConfig(source=task.source, split=split))
            assert len(examples) > 80 and all(ex.completion in ex.options for ex in examples)
            assert {ex.completion for ex in examples[:2]} == set(examples[0].options)  # the classes alternate
    assert read_stream("offline_skills")[0].folder == Path(stages[0].data.train[0].source)  # built once, reused


def test_adaptive_learner_trains_from_its_default_as_installed(user_dir):
    run = skillstream.train("adaptive_learner", out=user_dir / "run", smoke=True, show_progress=False,
                            overrides={"model": "tiny", "report_to": []})
    assert run.results["tasks"] == PACKAGED_TASKS and len(run.results["matrix"]) == 3


def test_a_missing_stream_folder_is_named_with_its_key(user_dir):
    res = run_cli("train", "adaptive_learner", "--out", str(user_dir / "run"), "--set", "model=tiny",
                  "--set", "data.stream=my_stream", cwd=user_dir)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert lines[0].startswith("error: data.stream 'my_stream': no such folder (expected a stream folder")
    assert "offline_skills" in lines[0] and not (user_dir / "run").exists()


def test_a_label_missing_from_labels_json_is_named(tmp_path):
    root = _stream(tmp_path)
    (root / "a_topic" / "test.json").write_text(json.dumps([{"sentence": "x", "label": "Weather"}]))
    res = run_cli("train", "quickstart", "--out", str(tmp_path / "run"), "--set", "model=tiny",
                  "--set", f"data.stream={root}", cwd=tmp_path)
    assert res.returncode == 2 and "test.json item 0: label 'Weather'" in res.stderr
    assert not (tmp_path / "run").exists()


def test_one_expert_per_task_with_the_oracle_never_forgets(tmp_path):
    """lora.per_stage: each task trains its own adapter; evaluation uses the task's own expert, so
    a task's score cannot change after its stage (BWT exactly 0) and each expert is a PEFT folder."""
    run = skillstream.train("quickstart", out=tmp_path / "run", show_progress=False, overrides={
        "model": "tiny", "report_to": [], "data.stream": str(_stream(tmp_path)), "train.steps": 3,
        "train.batch_size": 2, "train.bf16": False, "train.lr": 5e-3, "lora.per_stage": True,
        "data.stream_protocols": ["accuracy"]})
    r = run.results
    assert r["experts"] == ["a_topic", "b_sentiment"]
    assert r["bwt"] == 0.0 and r["matrix"][1][0] == r["matrix"][0][0]
    for name in r["experts"]:
        assert (run.run_dir / "experts" / name / "adapter_model.safetensors").exists()
    a = skillstream.load(run.run_dir, expert="a_topic")
    assert a.model.active_adapter == "a_topic"


# -- rows whose label is not among the options (MNLI's '-' rows): error by default, skip on request --

def _stream_with_unlabelled_rows(tmp_path: Path) -> tuple[Path, Path]:
    """The small stream, with two rows of a_topic/test.json labelled '-' (items 1 and 3)."""
    root = _stream(tmp_path)
    test = root / "a_topic" / "test.json"
    rows = json.loads(test.read_text())
    rows[1]["label"] = rows[3]["label"] = "-"
    test.write_text(json.dumps(rows))
    return root, test


def test_an_invalid_label_stops_the_run_by_default_and_names_the_way_out(tmp_path):
    root, test = _stream_with_unlabelled_rows(tmp_path)
    res = run_cli("train", "quickstart", "--out", str(tmp_path / "run"), "--set", "model=tiny", "--set", "report_to=[]",
                  "--smoke", "--set", f"data.stream={root}", cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"{test} item 1: label '-' is not one of the options ['Sports', 'Finance'] in labels.json" in lines[0]
    assert "data.invalid_labels=skip" in lines[0]
    assert not (tmp_path / "run").exists()


def test_invalid_labels_skip_drops_counts_and_reports_the_rows(tmp_path, capsys):
    root, test = _stream_with_unlabelled_rows(tmp_path)
    src = SourceConfig(source=str(test.parent), split="test", invalid_labels="skip")
    examples = load_examples(src)
    assert [e.where.rsplit(" ", 1)[1] for e in examples] == ["0", "2"]  # items 1 and 3 skipped, the others kept
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"warning: {test}: skipped 2 of 4 rows")
    assert "item 1, item 3" in warning[0] and "data.invalid_labels=skip" in warning[0]
    cfg = load_recipe("quickstart", overrides={"model": "tiny", "data.stream": str(root), "data.invalid_labels": "skip"})
    assert skipped_rows(cfg) == {str(test): {"file": str(test), "skipped": 2, "rows": 4,
                                             "items": ["item 1", "item 3"], "labels": ["-"]}}
    # the data-level key reaches every source, including those written out in data.train / data.eval
    cfg = load_recipe("quickstart", overrides={"data.invalid_labels": "skip", "data.train.0.source": str(test.parent)})
    assert all(s.invalid_labels == "skip" for s in [*cfg.data.train, *cfg.data.eval])
    assert load_recipe("quickstart").data.train[0].invalid_labels == "error"
    with pytest.raises(UserError, match="invalid_labels"):
        load_recipe("quickstart", overrides={"data.invalid_labels": "drop"})


def test_a_stream_runs_with_invalid_labels_skip_and_warns_once_per_file(tmp_path):
    root, test = _stream_with_unlabelled_rows(tmp_path)
    res = run_cli("train", "quickstart", "--out", str(tmp_path / "run"), "--set", "model=tiny", "--set", "report_to=[]",
                  "--smoke", "--set", f"data.stream={root}", "--set", "data.invalid_labels=skip", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    warnings = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("warning:") and "skipped" in ln]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {test}: skipped 2 of 4 rows"), warnings
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["skipped_rows"] == {str(test): {"file": str(test), "skipped": 2, "rows": 4,
                                                   "items": ["item 1", "item 3"], "labels": ["-"]}}
