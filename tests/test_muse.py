"""The muse recipe end to end on the tiny model: SFT on BFCL conversations, verifier-built pairs
made from the SFT model when the DPO stage begins, DPO, tool-call evaluation, full run directory."""
import json
import math

import pytest
import yaml

from conftest import run_cli
from skillstream.config import SourceConfig, load_recipe
from skillstream.data.examples import load_examples


OVERRIDES = {"model": "tiny", "data.eval.0.limit": 3, "data.eval.0.max_new_tokens": 8}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("muse")
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={v}")]
    r = run_cli("train", "muse", "--smoke", *sets, "--out", str(tmp / "run"), cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run"


def test_muse_smoke_writes_a_complete_run(smoke_run, tmp_path):
    run = smoke_run
    for name in ("config.yaml", "metrics.jsonl", "results.json", "pairs.jsonl", "experts/default/adapter_config.json"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "experts").iterdir()) == ["default"]  # the DPO reference is no expert
    assert list((run / "checkpoints").iterdir())

    cfg = load_recipe(yaml.safe_load((run / "config.yaml").read_text()))
    assert [s.name for s in cfg.stages] == ["sft", "dpo"] and cfg.stages[1].objective.name == "dpo"

    # pairs: conversational prompt/chosen/rejected with tools, built from the SFT model's samples
    pairs = load_examples(SourceConfig(source=str(run / "pairs.jsonl")))
    assert pairs and all(p.kind == "preference" and p.tools and p.chosen != p.rejected for p in pairs)
    rows = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
    assert all(row["chosen_source"] in ("sample", "gold") for row in rows)

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sft = [m for m in metrics if m["stage"] == "sft"]
    dpo = [m for m in metrics if m["stage"] == "dpo"]
    assert len(sft) == 3 and len(dpo) == 3
    for m in dpo:
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(m)
        assert m["logps/chosen"] != m["logps/rejected"]
    # the reference is the SFT policy: the first DPO loss is log 2 up to LoRA dropout
    assert abs(dpo[0]["loss"] - math.log(2)) < 0.05

    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == ["bfcl"] and results["metric"] == {"bfcl": "ast_accuracy"}
    assert len(results["matrix"]) == 2
    built = results["stages"][1]["built"]["pairs.jsonl"]
    assert built["prompts"] == 4 and built["pairs"] == len(rows) and built["samples"] == 8
    for details in [results["initial_details"][0]] + [row[0] for row in results["details"]]:
        assert {"format_validity", "tool_selection", "argument_accuracy", "ci95", "n"} <= set(details)
        assert details["n"] == 3

    ev = run_cli("eval", str(run), cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((run / "eval.json").read_text())["tasks"]["bfcl"]["metric"] == "ast_accuracy"


class _Interrupt(Exception):
    pass


class _StopAtDPOStep3:
    """Dies during DPO step 3, after the checkpoint of step 2 (what a SIGKILL there leaves behind)."""
    name = "stop"

    def before_stage(self, ctx): ...
    def transform_items(self, ctx, items): return items
    def lr_scale(self, ctx): return 1.0
    def loss_term(self, ctx, batch, outputs): return None
    def after_stage(self, ctx): ...
    def state_dict(self): return {}
    def load_state_dict(self, state): ...

    def after_step(self, ctx, metrics):
        if ctx.stage == "dpo" and ctx.step == 3:
            raise _Interrupt()


def test_resume_mid_dpo_keeps_the_pairs_and_the_sft_reference(smoke_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    import skillstream

    full = smoke_run  # the same recipe and overrides, uninterrupted
    broken = tmp_path / "broken"
    with pytest.raises(_Interrupt):
        skillstream.train("muse", out=broken, smoke=True, overrides=OVERRIDES, show_progress=False,
                          plugins=[_StopAtDPOStep3()])
    pairs = (broken / "pairs.jsonl").read_text()
    skillstream.train("muse", out=broken, resume=True, show_progress=False)
    assert (broken / "pairs.jsonl").read_text() == pairs == (full / "pairs.jsonl").read_text()
    a = load_file(str(full / "experts/default/adapter_model.safetensors"))
    b = load_file(str(broken / "experts/default/adapter_model.safetensors"))
    for k in a:  # the reference (a frozen copy of the SFT adapter) came back from the checkpoint
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"], r["loss"]) for r in rows(broken)] == \
        [(r["stage"], r["step"], r["loss"]) for r in rows(full)]
