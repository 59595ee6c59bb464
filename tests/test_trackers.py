"""report_to: one small run sends everything to TensorBoard, a real MLflow tracking server (started
here on 127.0.0.1) and W&B in offline mode; each is read back with its own reader and compared with
the run's files."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli
from skillstream.run import train

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

PROMPTS = ["list files in /tmp", "show disk usage"]
RECIPE = {"model": "tiny", "train.steps": 4, "train.batch_size": 2, "train.log_every": 1,
          "train.checkpoint_every": 100, "data.train.0.limit": 8, "data.eval.0.limit": 2,
          "data.eval.0.max_new_tokens": 4, "generation.max_new_tokens": 4,
          "train.sample_every": 2, "train.sample_prompts": PROMPTS,
          # a gradient-norm bound every step passes: a real alert at the first step
          "plugins": [{"name": "monitor", "grad_norm_max": 1e-9, "cooldown": 100}],
          "report_to": ["tensorboard", "mlflow", "wandb"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free local port with its store in a temp dir; stopped after the module."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not answer"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory, mlflow_server):
    tmp = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp))
        mp.setenv("WANDB_SILENT", "true")
        out = tmp / "run"
        train("quickstart", out=out, show_progress=False, overrides=RECIPE)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    return {"dir": out, "wandb_dir": tmp, "metrics": metrics, "results": results, "url": mlflow_server}


def _losses(run) -> dict[int, float]:
    return {r["global_step"]: r["loss"] for r in run["metrics"]}


def test_tensorboard_holds_every_metric_the_evaluations_and_the_texts(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run["dir"] / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    assert scalars["loss"] == pytest.approx(_losses(run), rel=1e-6)
    # every numeric field of metrics.jsonl, under its own name
    fields = {k for r in run["metrics"] for k, v in r.items() if isinstance(v, (int, float)) and k != "global_step"}
    assert {"lr", "grad_norm", "tokens_per_s", "weight/norm", "weight/update_ratio", "activation/std"} <= fields
    assert fields <= set(scalars)
    r = run["results"]
    task = r["tasks"][0]
    assert scalars[f"eval/{task}/score"][0] == pytest.approx(r["initial"][0])
    assert scalars[f"eval/{task}/score"][4] == pytest.approx(r["matrix"][-1][0])
    assert scalars["summary/avg_acc"][4] == pytest.approx(r["avg_acc"])
    texts = {tag.removesuffix("/text_summary"): acc.Tensors(tag) for tag in acc.Tags()["tensors"]}
    assert [e.step for e in texts["samples/0"]] == [2, 4]
    assert PROMPTS[0] in texts["samples/0"][0].tensor_proto.string_val[0].decode()
    assert "grad_explosion" in texts["alerts/0"][0].tensor_proto.string_val[0].decode()
    assert "accuracy_matrix/0" in texts and "evaluations/0" in texts


def test_mlflow_server_holds_the_metrics_params_tables_and_run_files(run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=run["url"])
    (found,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert found.info.run_name == "run"
    assert found.data.params["train.steps"] == "4"
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss")}
    assert history == pytest.approx(_losses(run), rel=1e-6)
    task = run["results"]["tasks"][0]
    assert found.data.metrics[f"eval/{task}/score"] == pytest.approx(run["results"]["matrix"][-1][0])
    assert found.data.metrics["summary/avg_acc"] == pytest.approx(run["results"]["avg_acc"])
    assert "weight/update_ratio" in found.data.metrics and "nonfinite/weights" in found.data.metrics
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"results.json", "metrics.jsonl", "config.yaml", "samples.jsonl", "alerts.jsonl", "experts",
            "tables"} <= artifacts
    tables = {a.path for a in client.list_artifacts(found.info.run_id, "tables")}
    assert {"tables/samples.json", "tables/alerts.json", "tables/accuracy_matrix.json"} <= tables
    samples = json.loads(Path(client.download_artifacts(found.info.run_id, "tables/samples.json")).read_text())
    assert samples["columns"] == ["global_step", "stage", "step", "prompt", "output"]
    assert [row[3] for row in samples["data"]] == PROMPTS * 2
    assert (run["dir"] / "trackers.json").is_file()  # the run ids a --resume logs on to


def _wandb_records(path: Path):
    """The records of a W&B transaction log (.wandb): LevelDB's log format (32 KiB blocks of chunks with
    a 7-byte header: CRC, length, type) after a 7-byte W&B header, each record a protobuf `Record`.
    wandb 0.31 ships no Python reader of it (the Go wandb-core writes it), hence these lines."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding
            continue
        pending += chunk
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_file_holds_the_metrics_tables_and_artifact(run):
    (log,) = run["wandb_dir"].glob("wandb/offline-run-*/run-*.wandb")
    history, artifacts = {}, []
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history[record.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                for i in record.history.item}
        elif kind == "artifact":
            artifacts.append(record.artifact)
    losses = {step: h["loss"] for step, h in history.items() if "loss" in h}
    assert losses == pytest.approx(_losses(run), rel=1e-6)
    task = run["results"]["tasks"][0]
    assert history[0][f"eval/{task}/score"] == pytest.approx(run["results"]["initial"][0])
    assert history[4]["summary/avg_acc"] == pytest.approx(run["results"]["avg_acc"])
    # a table is a file of the run, named in the history by its (flattened) reference
    assert history[2]["samples/_type"] == "table-file" and history[4]["accuracy_matrix/_type"] == "table-file"
    assert history[2]["samples/nrows"] == len(PROMPTS)
    (artifact,) = [a for a in artifacts if a.type == "run"]
    assert {"results.json", "metrics.jsonl", "config.yaml"} <= {e.path for e in artifact.manifest.contents}
    assert not math.isnan(history[4]["weight/norm"])


def test_a_tracker_whose_package_is_missing_is_one_line(tmp_path):
    fake = tmp_path / "site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no wandb in this environment')\n")
    env_path = f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    os.environ["PYTHONPATH"], old = env_path, os.environ.get("PYTHONPATH")
    try:
        res = run_cli("train", "quickstart", "--out", str(tmp_path / "run"), "--set", "model=tiny",
                      "--set", "report_to=[tensorboard, wandb]", cwd=tmp_path)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: report_to: wandb needs the wandb package, which does not import (no wandb in this environment); "
        "pip install 'skillstream[trackers]' or drop wandb from report_to"]
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_refused_by_name(tmp_path):
    res = run_cli("train", "quickstart", "--out", str(tmp_path / "run"), "--set", "model=tiny",
                  "--set", "report_to=[aim]", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "report_to" in res.stderr and "tensorboard" in res.stderr
