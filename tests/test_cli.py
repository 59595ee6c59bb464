"""The command line as a user meets it: a smoke run end to end, then eval / generate / export,
and bad input answered with exit status 2 and one line, leaving no run directory behind."""
from __future__ import annotations

import json

import pytest
from peft import PeftModel

from conftest import run_cli, write_task_folder
from skillstream.models.backbone import load_backbone

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

TINY = ["--set", "model=tiny", "--set", "report_to=[]"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("smoke")
    res = run_cli("train", "quickstart", "--smoke", "--set", "model=tiny", cwd=cwd)
    assert res.returncode == 0, res.stderr
    return cwd, cwd / "runs" / "quickstart", res


def test_smoke_run_writes_a_complete_run_directory(smoke_run):
    _, run, res = smoke_run
    assert "before" in res.stdout and "nl2bash" in res.stdout          # the summary table
    for name in ("config.yaml", "metrics.jsonl", "results.json", "experts/default/adapter_config.json"):
        assert (run / name).exists(), name
    assert list((run / "checkpoints").glob("ckpt-*/weights.safetensors"))
    assert list((run / "tb").rglob("events.out.tfevents.*"))          # TensorBoard by default
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "stage", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(record)
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == ["nl2bash"] and len(results["matrix"]) == 1 and len(results["initial"]) == 1


def test_expert_is_a_standard_peft_adapter(smoke_run):
    _, run, _ = smoke_run
    base, _ = load_backbone("tiny")
    model = PeftModel.from_pretrained(base, str(run / "experts" / "default"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_eval_generate_export_and_recipes(smoke_run, tmp_path):
    cwd, run, _ = smoke_run
    ev = run_cli("eval", str(run), cwd=cwd)
    assert ev.returncode == 0, ev.stderr
    scores = json.loads((run / "eval.json").read_text())["tasks"]["nl2bash"]
    assert scores["metric"] == "exact_match" and 0 <= scores["structure"] <= 1
    gen = run_cli("generate", str(run), "find all .log files under /var", "--max-new-tokens", "5", cwd=cwd)
    assert gen.returncode == 0, gen.stderr
    exp = run_cli("export", str(run), str(tmp_path / "served"), "--merge", "default", cwd=cwd)
    assert exp.returncode == 0, exp.stderr
    assert (tmp_path / "served" / "experts" / "default" / "adapter_model.safetensors").exists()
    assert (tmp_path / "served" / "merged-default" / "model.safetensors").exists()
    listing = run_cli("recipes", cwd=cwd)
    assert "quickstart" in listing.stdout


def _bad(tmp_path, *args):
    res = run_cli("train", "quickstart", "--out", str(tmp_path / "run"), *TINY, *args, cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists(), "bad input must leave no run directory"
    return lines[0]


def test_bad_recipe_value(tmp_path):
    assert "train.lr" in _bad(tmp_path, "--set", "train.lr=fast")


def test_missing_column(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    assert "d.jsonl line 2: missing column 'completion'" in _bad(tmp_path, "--set", f"data.train.0.source={tmp_path}/d.jsonl")


def test_empty_split(tmp_path):
    folder = write_task_folder(tmp_path / "task", [], [{"sentence": "s", "label": "Good"}], ["Good", "Bad"])
    assert "split 'train' is empty" in _bad(tmp_path, "--set", f"data.train.0.source={folder}")


def test_label_outside_options(tmp_path):
    folder = write_task_folder(tmp_path / "task", [{"sentence": "s", "label": "Meh"}], [], ["Good", "Bad"])
    assert "label 'Meh' is not one of the options" in _bad(tmp_path, "--set", f"data.train.0.source={folder}")


def test_unknown_model(tmp_path):
    assert "model" in _bad(tmp_path, "--set", f"model={tmp_path}/no-such-model")


def test_existing_run_is_never_overwritten(smoke_run):
    cwd, run, _ = smoke_run
    res = run_cli("train", "quickstart", "--smoke", *TINY, cwd=cwd)
    assert res.returncode == 2 and "already exists" in res.stderr


def test_resume_of_something_that_is_not_a_run(tmp_path):
    res = run_cli("train", "quickstart", "--out", str(tmp_path), "--resume", cwd=tmp_path)
    assert res.returncode == 2 and "not a run directory" in res.stderr


def test_resume_accepts_the_command_that_made_the_run(smoke_run):
    cwd, _, _ = smoke_run
    # what made it (--smoke, model=tiny) plus the lr it was saved with, spelled another way (0.0005)
    res = run_cli("train", "quickstart", "--smoke", "--set", "model=tiny", "--set", "train.lr=5e-4", "--resume",
                  cwd=cwd)
    assert res.returncode == 0, res.stderr
    assert "resuming runs/quickstart" in res.stdout


@pytest.mark.parametrize("change, saved", [("train.lr=0.001", "train.lr is 0.0005"),
                                           ("model=smollm2-135m", "model.name is tiny")])
def test_resume_refuses_a_setting_that_changes_the_run(smoke_run, change, saved):
    cwd, _, _ = smoke_run
    res = run_cli("train", "quickstart", "--smoke", "--set", "model=tiny", "--set", change, "--resume", cwd=cwd)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.strip() == (f"error: --resume: --set {change} changes the saved run ({saved} in "
                                  f"runs/quickstart/config.yaml); drop it or start a new --out")


def test_resume_refuses_smoke_on_a_full_run(smoke_run, tmp_path):
    _, run, _ = smoke_run
    (tmp_path / "full").mkdir()  # the smoke run's config as a full run would have saved it
    (tmp_path / "full" / "config.yaml").write_text((run / "config.yaml").read_text().replace("smoke: true", "smoke: false"))
    res = run_cli("train", "quickstart", "--out", str(tmp_path / "full"), "--smoke", "--resume", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "--smoke changes the saved run (smoke is false in" in res.stderr


@pytest.mark.parametrize("args, message", [(["train", "quickstart", "--bogus"], "No such option: --bogus"),
                                           (["generate"], "Missing")])
def test_usage_errors_are_one_line_with_status_2(tmp_path, args, message):
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
