"""DeepSpeed ZeRO-3 through Accelerate, on CPU with gloo: the documented config
(examples/accelerate/deepspeed_zero3.yaml) launched with 2 processes runs DeepSpeed's engine for real
(its CPU accelerator partitions every parameter between the processes; accelerate enables DeepSpeed
only on GPUs, skillstream turns it on for CPU, see skillstream/sharding.py).

Tolerances. 2 processes x batch 2 compute the gradient of the same 4 examples as 1 process x batch 4
(each process's loss weighted by its share of the labelled tokens, DeepSpeed averaging the gradients
over processes); what remains is float32 summation order. Measured on the tiny model (these runs):
loss within 9.5e-7 per step, grad norm within 1e-7, adapters within 2.4e-6; asserted at 1e-4 (loss)
and 1e-5 (weights), the tolerances tests/test_multiprocess.py holds DDP to. A killed ZeRO-3 run
resumed with the same config gives every process its own partition of the optimizer state back (fp32
master weights, Adam's moments and step) and its RNG, so it ends with the uninterrupted run's bits
(asserted exactly; without the optimizer state the adapters end 1.3e-3 away). ZeRO-2 (the same
save and restore, examples/accelerate/deepspeed_zero2.yaml) was checked by hand the same way, not
here: docs/scaling.md#deepspeed.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from sharded_runs import (ARGS, CONFIGS, GLOBAL_BATCH, assert_adapter_loads_unsharded, assert_matches_one_process,
                          assert_not_resumed_unsharded, assert_resumed_bits, finish, launch, newest_checkpoint,
                          one_process, start)

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'skillstream[deepspeed]')")

ZERO3 = CONFIGS / "deepspeed_zero3.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x batch 4; 2 ZeRO-3 processes x batch 2; the same ZeRO-3 run killed after step 3 (its
    checkpoint is step 2's) and resumed while the other two still run (most of a tiny run is starting
    Python and importing torch and DeepSpeed)."""
    root = tmp_path_factory.mktemp("deepspeed")
    half = [*ARGS, "--set", f"train.batch_size={GLOBAL_BATCH // 2}"]
    kill = json.dumps([{"name": "kill_plugin:KillOnce", "steps": 3, "marker": str(root / "killed")}])
    one = start(one_process("train", "quickstart", "--out", str(root / "one"), *ARGS,
                            "--set", f"train.batch_size={GLOBAL_BATCH}"))
    zero3 = start(launch(ZERO3, "train", "quickstart", "--out", str(root / "zero3"), *half))
    broken = finish(start(launch(ZERO3, "train", "quickstart", "--out", str(root / "broken"), *half,
                                 "--set", f"plugins={kill}")))
    assert broken.returncode != 0 and (root / "killed").exists(), broken.stderr[-3000:]
    resumed = start(launch(ZERO3, "train", "quickstart", "--out", str(root / "broken"), "--resume"))
    one, zero3, resumed = finish(one), finish(zero3), finish(resumed)
    assert one.returncode == 0, one.stderr[-3000:]
    assert zero3.returncode == 0, zero3.stderr[-3000:]
    assert "note: DeepSpeed ZeRO-3 on CPU" in zero3.stdout  # DeepSpeed's engine for real, not DDP
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    return root


def test_zero3_two_processes_match_one_at_the_same_global_batch(runs):
    assert_matches_one_process(runs / "one", runs / "zero3")  # ZeRO-3: adapters gathered from both partitions


def test_zero3_checkpoint_holds_whole_weights_and_every_process_partition(runs):
    single, sharded = newest_checkpoint(runs / "one"), newest_checkpoint(runs / "zero3")
    w1, w2 = (load_file(str(c / "weights.safetensors")) for c in (single, sharded))
    assert {k: v.shape for k, v in w1.items()} == {k: v.shape for k, v in w2.items()}
    from skillstream.sharding import ZERO_PARTITIONS, checkpoint_classes
    with torch.serialization.safe_globals(checkpoint_classes(3)):  # no pickled code: tensors and DeepSpeed's classes
        partitions = torch.load(sharded / "optimizer.pt", weights_only=True)[ZERO_PARTITIONS]
    assert len(partitions) == 2  # one per process, each its half of the fp32 master weights
    halves = [p["fp32_flat_groups"][0] for p in partitions]
    assert sum(h.numel() for h in halves) >= sum(v.numel() for v in w2.values()) and not torch.equal(*halves)
    assert json.loads((sharded / "state.json").read_text())["run_state"]["deepspeed_zero"] == 3


def test_zero3_run_killed_then_resumed_gives_the_uninterrupted_bits(runs):
    assert_resumed_bits(runs / "zero3", runs / "broken")


def test_zero_checkpoint_is_not_resumed_without_deepspeed(runs):
    """Each process's ZeRO partition fits only the ZeRO stage and process count that cut it."""
    assert_not_resumed_unsharded(runs / "zero3", "trained with DeepSpeed ZeRO-3: resume it with the same accelerate config")


def test_zero3_adapter_loads_into_an_unsharded_backbone(runs):
    assert_adapter_loads_unsharded(runs / "zero3")


@pytest.mark.parametrize("recipe, override, key", [
    ("quickstart", {"objective": "dpo"}, "objective dpo"),
    ("quickstart", {"plugins": [{"name": "ewc"}]}, "plugin ewc"),
    ("adaptive_learner", {}, r"trains \d+ stages"),  # a DeepSpeed engine per stage: measured to crash at stage 2
    ("dylora_moe", {}, "experts:"),
])
def test_deepspeed_refuses_what_it_cannot_partition(monkeypatch, recipe, override, key):
    from skillstream.config import load_recipe
    from skillstream.errors import UserError
    from skillstream.sharding import check_recipe

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets from a DeepSpeed config
    with pytest.raises(UserError, match=f"DeepSpeed: .*{key}"):
        check_recipe(load_recipe(recipe, {"model": "tiny", **override}))
    check_recipe(load_recipe("quickstart", {"model": "tiny"}))  # one stage, LoRA on an LM objective


def test_deepspeed_config_without_deepspeed_installed_is_one_line(monkeypatch):
    from skillstream.config import load_recipe
    from skillstream.errors import UserError
    from skillstream.sharding import check_recipe

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # how Python marks a module as not importable
    with pytest.raises(UserError, match=r"not installed: pip install 'skillstream\[deepspeed\]'"):
        check_recipe(load_recipe("quickstart", {"model": "tiny"}))
