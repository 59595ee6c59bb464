"""Checkpoints to pick from: --resume-from ckpt-N, eval --checkpoint best|final|ckpt-N,
skillstream.load(run, checkpoint=...), and `monitor --csv`; a checkpoint that is not there is one line."""
from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from skillstream.errors import UserError
from skillstream.run import train
from skillstream.trained import load

RECIPE = {"model": "tiny", "report_to": [], "train.steps": 6, "train.batch_size": 2, "train.log_every": 1,
          "train.checkpoint_every": 2, "train.keep_checkpoints": 10, "data.train.0.limit": 12,
          "data.eval.0.limit": 2, "data.eval.0.max_new_tokens": 4, "generation.max_new_tokens": 4,
          "plugins": [{"name": "best_final", "every": 2, "limit": 4}, {"name": "monitor"}]}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pick") / "run"
    train("quickstart", out=out, show_progress=False, overrides=RECIPE)
    return out


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_a_run_keeps_step_checkpoints_and_best_and_final(run_dir):
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # steps 2, 4 and 6 (the stage's end), by sequence number; best_final's best and final
    assert names == ["best", "ckpt-000001", "ckpt-000002", "ckpt-000003", "final"]


def test_load_a_step_checkpoint_gives_its_weights(run_dir):
    trained = load(run_dir, checkpoint="ckpt-1")
    saved = load_file(str(run_dir / "checkpoints" / "ckpt-000001" / "weights.safetensors"))
    lora = _lora(trained.model)
    assert lora and all(torch.equal(v, saved[n]) for n, v in lora.items())
    final = _lora(load(run_dir).model)
    assert any(not torch.equal(final[n], v) for n, v in lora.items())  # two steps in, not the end
    assert trained.evaluate()["checkpoint"] == "ckpt-1"
    assert (run_dir / "eval-ckpt-1.json").is_file() and not (run_dir / "eval.json").exists()


def test_load_best_gives_the_best_final_plugins_weights(run_dir):
    best = json.loads((run_dir / "checkpoints" / "best" / "best.json").read_text())
    validations = [json.loads(line) for line in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert best["val/loss"] == min(v["val/loss"] for v in validations)
    saved = load_file(str(run_dir / "checkpoints" / "best" / "model.safetensors"))
    lora = _lora(load(run_dir, checkpoint="best").model)
    assert all(torch.equal(v, saved[n]) for n, v in lora.items())
    # final is the model the run saved when it finished
    final = _lora(load(run_dir, checkpoint="final").model)
    assert all(torch.equal(v, f) for v, f in zip(_lora(load(run_dir).model).values(), final.values()))


def test_eval_cli_with_a_checkpoint_writes_its_own_file(run_dir, tmp_path):
    res = run_cli("eval", str(run_dir), "--checkpoint", "best", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"wrote {run_dir / 'eval-best.json'}" in res.stdout
    assert json.loads((run_dir / "eval-best.json").read_text())["checkpoint"] == "best"


def test_a_checkpoint_that_is_not_there_is_one_line(run_dir, tmp_path):
    with pytest.raises(UserError, match=r"checkpoint 'ckpt-99': not in .*there: ckpt-000001, ckpt-000002"):
        load(run_dir, checkpoint="ckpt-99")
    with pytest.raises(UserError, match="expected ckpt-N"):
        load(run_dir, checkpoint="latest")
    res = run_cli("eval", str(run_dir), "--checkpoint", "ckpt-99", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "ckpt-99" in res.stderr
    before = sorted(p.name for p in run_dir.rglob("*"))
    res = run_cli("train", "quickstart", "--out", str(run_dir), "--resume-from", "ckpt-99", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "ckpt-99" in res.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_best_without_the_plugin_is_one_line(tmp_path):
    out = tmp_path / "run"
    train("quickstart", out=out, show_progress=False,
          overrides={**RECIPE, "plugins": [], "train.steps": 2, "train.checkpoint_every": 100})
    with pytest.raises(UserError, match="best_final plugin writes it"):
        load(out, checkpoint="best")


def test_resume_from_an_earlier_checkpoint_retrains_to_the_same_weights(run_dir, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(run_dir, again)
    train("quickstart", out=again, show_progress=False, resume_from="ckpt-2")
    # the checkpoints after ckpt-000002 were set aside, and the run wrote its own after it
    assert sorted(p.name for p in (again / "checkpoints" / "superseded").iterdir()) == ["ckpt-000003"]
    original, resumed = load_file(str(run_dir / "experts" / "default" / "adapter_model.safetensors")), \
        load_file(str(again / "experts" / "default" / "adapter_model.safetensors"))
    assert all(torch.equal(original[k], resumed[k]) for k in original)  # resume is bit-exact
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (run_dir, again)]
    assert losses[0] == losses[1]


def test_monitor_logs_training_statistics_and_exports_csv(run_dir, tmp_path):
    res = run_cli("monitor", str(run_dir), "--csv", str(tmp_path / "m.csv"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(records) == 6 and f"{len(rows)} rows" in res.stdout
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in records])
    for r in rows:
        assert 0 < float(r["weight/update_ratio"]) < 1 and float(r["weight/norm"]) > 0
        assert float(r["activation/std"]) > 0 and int(r["nonfinite/weights"]) == 0
        assert int(r["nonfinite/activations"]) == 0
    assert run_cli("monitor", str(tmp_path), "--csv", str(tmp_path / "x.csv"), cwd=tmp_path).returncode == 2
