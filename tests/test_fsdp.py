"""FSDP2 through Accelerate, on CPU with gloo: the documented config (examples/accelerate/fsdp.yaml)
launched with 2 processes shards the model for real (each parameter a DTensor holding half of it;
accelerate enables FSDP only on GPUs, skillstream turns it on for CPU, see skillstream/sharding.py).

Tolerances. 2 FSDP processes x batch 2 compute the gradient of the same 4 examples as 1 process x
batch 4 (each process's loss weighted by its share of the labelled tokens, and FSDP's reduce-scatter
averaging as DDP's all-reduce does); what remains is float32 summation order. Measured on the tiny
model (this module's runs): loss within 1.4e-6 per step, grad norm within 1.2e-7, adapters and the
whole best/final model within 1.1e-7; asserted at 1e-4 and 1e-5 (the tolerances
tests/test_multiprocess.py holds DDP to). A killed FSDP run resumed with FSDP restores the
whole optimizer state (gathered by torch.distributed.checkpoint, resharded on load) and every
process's RNG, so it ends with the uninterrupted run's bits (asserted exactly).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).parent  # the workers import kill_plugin from here (python -m puts the cwd on the path)
FSDP_CONFIG = TESTS.parent / "examples" / "accelerate" / "fsdp.yaml"
STEPS = 4
ARGS = ["--set", "model=tiny", "--set", "report_to=[]", "--set", "train.bf16=false", "--set", "lora.dropout=0",
        "--set", f"train.steps={STEPS}", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
        "--set", "train.warmup_steps=2", "--set", "data.train.0.limit=48", "--set", "data.eval.0.limit=2",
        "--set", "data.eval.0.max_new_tokens=4"]
GLOBAL_BATCH = 4
BEST_FINAL = {"name": "best_final", "every": 2}  # checkpoints/best and final: the whole model, gathered


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_launch(*args: str) -> list[str]:
    """`accelerate launch --config_file examples/accelerate/fsdp.yaml -m skillstream.cli ARGS`, 2 processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
            "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "skillstream.cli", *args]


def run_together(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """The commands at once (most of a tiny run is starting Python and importing torch), from TESTS."""
    started = [subprocess.Popen(c, cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "CI": "true"}) for c in commands]
    done = []
    for c, p in zip(commands, started):
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    return done


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "experts" / "default" / "adapter_model.safetensors"))


def newest_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x batch 4; 2 FSDP processes x batch 2; the same FSDP run killed after step 3 (its
    checkpoint is step 2's) and resumed."""
    root = tmp_path_factory.mktemp("fsdp")
    half = [*ARGS, "--set", f"train.batch_size={GLOBAL_BATCH // 2}"]
    plugins = ["--set", f"plugins={json.dumps([BEST_FINAL])}"]
    kill = json.dumps([BEST_FINAL, {"name": "kill_plugin:KillOnce", "steps": 3, "marker": str(root / "killed")}])
    one, two, broken = run_together(
        [sys.executable, "-m", "skillstream.cli", "train", "quickstart", "--out", str(root / "one"), *ARGS,
         *plugins, "--set", f"train.batch_size={GLOBAL_BATCH}"],
        fsdp_launch("train", "quickstart", "--out", str(root / "fsdp"), *half, *plugins),
        fsdp_launch("train", "quickstart", "--out", str(root / "broken"), *half, "--set", f"plugins={kill}"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "note: FSDP2 on CPU" in two.stdout  # sharded for real, not DDP
    assert broken.returncode != 0 and (root / "killed").exists(), broken.stderr[-3000:]
    assert not (root / "broken" / "results.json").exists()
    resumed, = run_together(fsdp_launch("train", "quickstart", "--out", str(root / "broken"), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    return root


def test_fsdp_two_processes_match_one_at_the_same_global_batch(runs):
    one, two = metrics(runs / "one"), metrics(runs / "fsdp")
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))  # the main process alone logs
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    assert max(diffs) < 1e-4, diffs
    for a, b in zip(one, two):  # the norm over both processes' gradient shards, clipped as one process clips
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, a["grad_norm"])
    a, b = adapter(runs / "one"), adapter(runs / "fsdp")
    assert a.keys() == b.keys()
    for k in a:  # whole tensors (gathered from both processes' shards), the 1-process values
        assert a[k].shape == b[k].shape
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    # the checkpoint holds whole weights and the whole optimizer state, by parameter name
    single, sharded = newest_checkpoint(runs / "one"), newest_checkpoint(runs / "fsdp")
    w1, w2 = (load_file(str(c / "weights.safetensors")) for c in (single, sharded))
    assert {k: v.shape for k, v in w1.items()} == {k: v.shape for k, v in w2.items()}
    optimizer = torch.load(sharded / "optimizer.pt", weights_only=True)
    assert set(optimizer["state"]) == set(w2)  # every trainable, by name
    assert all(optimizer["state"][k]["exp_avg"].shape == w2[k].shape for k in w2)
    assert json.loads((sharded / "state.json").read_text())["run_state"]["fsdp"] is True
    for which in ("best", "final"):  # the whole model (backbone and adapters), as one process writes it
        w1, w2 = (load_file(str(runs / run / "checkpoints" / which / "model.safetensors")) for run in ("one", "fsdp"))
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5)


def test_fsdp_run_killed_then_resumed_gives_the_uninterrupted_bits(runs):
    a, b = adapter(runs / "fsdp"), adapter(runs / "broken")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [r["loss"] for r in metrics(runs / "broken")] == [r["loss"] for r in metrics(runs / "fsdp")]


def test_fsdp_checkpoint_is_not_resumed_without_fsdp(runs):
    """A sharded run's optimizer state (whole, by parameter name) does not fit an unsharded run's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from skillstream.errors import UserError
    from skillstream.run_state import STAGES, restore_run

    try:
        with pytest.raises(UserError, match="trained with FSDP: resume it with the same accelerate config"):
            restore_run(runs / "broken", STAGES, Accelerator(cpu=True))
    finally:
        AcceleratorState._reset_state(True)


def test_fsdp_adapter_loads_into_an_unsharded_backbone(runs):
    from peft import PeftModel

    from skillstream.models.backbone import load_backbone

    backbone, _ = load_backbone("tiny", seed=0)
    model = PeftModel.from_pretrained(backbone, str(runs / "fsdp" / "experts" / "default"))
    # the final checkpoint's weights are the ones gathered at the stage's end
    gathered = load_file(str(newest_checkpoint(runs / "fsdp") / "weights.safetensors"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == gathered.keys()
    for name, p in loaded.items():
        torch.testing.assert_close(p.detach(), gathered[name], rtol=0, atol=0)


@pytest.mark.parametrize("override, key", [
    ({"objective": "dpo"}, "objective dpo"),
    ({"lora.per_stage": True}, "lora.per_stage"),
    ({"plugins": [{"name": "ewc"}]}, "plugin ewc"),
])
def test_fsdp_refuses_what_it_cannot_shard(monkeypatch, override, key):
    from skillstream.config import load_recipe
    from skillstream.errors import UserError
    from skillstream.sharding import check_recipe

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets from an FSDP config
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match=key):
        check_recipe(load_recipe("quickstart", {"model": "tiny", **override}))
    check_recipe(load_recipe("quickstart", {"model": "tiny"}))  # LoRA on an LM objective shards
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="fsdp_version must be 2"):
        check_recipe(load_recipe("quickstart", {"model": "tiny"}))


def test_fsdp_refuses_the_skill_stream(monkeypatch):
    from skillstream.config import load_recipe
    from skillstream.errors import UserError
    from skillstream.sharding import check_recipe

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match="experts:"):
        check_recipe(load_recipe("dylora_moe", {"model": "tiny"}))
