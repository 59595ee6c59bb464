"""What the sharded-training tests (test_fsdp, test_deepspeed) share: the tiny quickstart run they
launch on 2 processes through an accelerate config and on 1 process, and the checks every sharding
backend must pass -- the same numbers as one process, a killed run resumed to the uninterrupted
run's bits, a sharded checkpoint refused without its sharding, and an adapter that loads into an
unsharded backbone with PEFT."""
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
CONFIGS = TESTS.parent / "examples" / "accelerate"
STEPS = 4
GLOBAL_BATCH = 4
ARGS = ["--set", "model=tiny", "--set", "report_to=[]", "--set", "train.bf16=false", "--set", "lora.dropout=0",
        "--set", f"train.steps={STEPS}", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
        "--set", "train.warmup_steps=2", "--set", "data.train.0.limit=48", "--set", "data.eval.0.limit=2",
        "--set", "data.eval.0.max_new_tokens=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, *args: str) -> list[str]:
    """`accelerate launch --config_file CONFIG -m skillstream.cli ARGS`, 2 processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "skillstream.cli", *args]


def one_process(*args: str) -> list[str]:
    return [sys.executable, "-m", "skillstream.cli", *args]


def start(command: list[str]) -> subprocess.Popen:
    """A command started from TESTS; runs started together overlap (most of a tiny run is starting
    Python and importing torch)."""
    return subprocess.Popen(command, cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CI": "true"})


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "experts" / "default" / "adapter_model.safetensors"))


def newest_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("ckpt-*"))[-1]


def assert_matches_one_process(one: Path, sharded: Path) -> None:
    """The sharded run's losses, gradient norms and (whole, gathered) adapters are the 1-process run's,
    at the tolerances tests/test_multiprocess.py holds DDP to; the main process alone logs."""
    a, b = metrics(one), metrics(sharded)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    assert max(diffs) < 1e-4, diffs
    for x, y in zip(a, b):  # the norm over every process's gradient, clipped as one process clips
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-4 * max(1.0, x["grad_norm"])
    w1, w2 = adapter(one), adapter(sharded)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert w1[k].shape == w2[k].shape
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5)


def assert_resumed_bits(uninterrupted: Path, resumed: Path) -> None:
    a, b = adapter(uninterrupted), adapter(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(uninterrupted)]


def assert_not_resumed_unsharded(run_dir: Path, message: str) -> None:
    """A plain (1-process, unsharded) restore of the sharded run's checkpoint stops with `message`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from skillstream.errors import UserError
    from skillstream.run_state import STAGES, restore_run

    try:
        with pytest.raises(UserError, match=message):
            restore_run(run_dir, STAGES, Accelerator(cpu=True))
    finally:
        AcceleratorState._reset_state(True)


def assert_adapter_loads_unsharded(run_dir: Path) -> None:
    """experts/default loads with PeftModel.from_pretrained into the plain backbone, and holds the
    weights gathered into the final checkpoint at the stage's end."""
    from peft import PeftModel

    from skillstream.models.backbone import load_backbone

    backbone, _ = load_backbone("tiny", seed=0)
    model = PeftModel.from_pretrained(backbone, str(run_dir / "experts" / "default"))
    gathered = load_file(str(newest_checkpoint(run_dir) / "weights.safetensors"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == gathered.keys()
    for name, p in loaded.items():
        torch.testing.assert_close(p.detach(), gathered[name], rtol=0, atol=0)
