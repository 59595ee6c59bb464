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

import pytest
import torch
from safetensors.torch import load_file

from sharded_runs import (ARGS, CONFIGS, GLOBAL_BATCH, assert_adapter_loads_unsharded, assert_matches_one_process,
                          assert_not_resumed_unsharded, assert_resumed_bits, finish, launch, newest_checkpoint,
                          one_process, start)

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first

FSDP_CONFIG = CONFIGS / "fsdp.yaml"
BEST_FINAL = {"name": "best_final", "every": 2}  # checkpoints/best and final: the whole model, gathered


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x batch 4; 2 FSDP processes x batch 2; the same FSDP run killed after step 3 (its
    checkpoint is step 2's) and resumed."""
    root = tmp_path_factory.mktemp("fsdp")
    half = [*ARGS, "--set", f"train.batch_size={GLOBAL_BATCH // 2}"]
    plugins = ["--set", f"plugins={json.dumps([BEST_FINAL])}"]
    kill = json.dumps([BEST_FINAL, {"name": "kill_plugin:KillOnce", "steps": 3, "marker": str(root / "killed")}])
    started = [start(one_process("train", "quickstart", "--out", str(root / "one"), *ARGS, *plugins,
                                 "--set", f"train.batch_size={GLOBAL_BATCH}")),
               start(launch(FSDP_CONFIG, "train", "quickstart", "--out", str(root / "fsdp"), *half, *plugins)),
               start(launch(FSDP_CONFIG, "train", "quickstart", "--out", str(root / "broken"), *half,
                            "--set", f"plugins={kill}"))]
    one, two, broken = map(finish, started)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "note: FSDP2 on CPU" in two.stdout  # sharded for real, not DDP
    assert broken.returncode != 0 and (root / "killed").exists(), broken.stderr[-3000:]
    assert not (root / "broken" / "results.json").exists()
    resumed = finish(start(launch(FSDP_CONFIG, "train", "quickstart", "--out", str(root / "broken"), "--resume")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    return root


def test_fsdp_two_processes_match_one_at_the_same_global_batch(runs):
    assert_matches_one_process(runs / "one", runs / "fsdp")
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
    assert_resumed_bits(runs / "fsdp", runs / "broken")


def test_fsdp_checkpoint_is_not_resumed_without_fsdp(runs):
    """A sharded run's optimizer state (whole, by parameter name) does not fit an unsharded run's."""
    assert_not_resumed_unsharded(runs / "broken", "trained with FSDP: resume it with the same accelerate config")


def test_fsdp_adapter_loads_into_an_unsharded_backbone(runs):
    assert_adapter_loads_unsharded(runs / "fsdp")


@pytest.mark.parametrize("override, key", [
    ({"objective": "dpo"}, "objective dpo"),
    ({"lora.per_stage": True}, "lora.per_stage"),
    ({"plugins": [{"name": "ewc"}]}, "plugin ewc"),
    ({"train.max_batch_tokens": 512}, "train.max_batch_tokens"),
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
