"""The muse recipe end to end on the tiny model: SFT on BFCL conversations, verifier-built pairs
made from the SFT model (stage pairs), DPO with held-out pairs scored by the preference metric,
tool-call evaluation, full run directory; one stage at a time (`stage`, `init_from`)."""
import json
import math

import pytest
import yaml

from conftest import run_cli
from skillstream.config import SourceConfig, load_recipe
from skillstream.data.examples import load_examples
from skillstream.plugins import Plugin

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first


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
    assert [s.name for s in cfg.stages] == ["sft", "pairs", "dpo"] and cfg.stages[2].objective.name == "dpo"
    assert cfg.stage == "all" and cfg.init_from is None

    # pairs: conversational prompt/chosen/rejected with tools, built from the SFT model's samples
    pairs = load_examples(SourceConfig(source=str(run / "pairs.jsonl")))
    assert pairs and all(p.kind == "preference" and p.tools and p.chosen != p.rejected for p in pairs)
    rows = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
    assert all(row["chosen_source"] in ("sample", "gold") for row in rows)

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sft = [m for m in metrics if m["stage"] == "sft"]
    dpo = [m for m in metrics if m["stage"] == "dpo"]
    assert len(sft) == 3 and len(dpo) == 3 and len(sft) + len(dpo) == len(metrics)  # stage pairs trains nothing
    for m in dpo:
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(m)
        assert m["logps/chosen"] != m["logps/rejected"]
    # the reference is the SFT policy: the first DPO loss is log 2 up to LoRA dropout, plus the
    # recipe's sft_weight (1.0) times the chosen answers' NLL
    assert abs(dpo[0]["loss"] - dpo[0]["nll/chosen"] - math.log(2)) < 0.05 and dpo[0]["nll/chosen"] > 0

    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == ["bfcl", "tool_workflows", "arithmetic_tools"]
    assert results["metric"] == {"bfcl": "ast_accuracy", "tool_workflows": "workflow_success",
                                 "arithmetic_tools": "answer_accuracy"}
    assert len(results["matrix"]) == 3 and [s["name"] for s in results["stages"]] == ["sft", "pairs", "dpo"]
    # stage sft trained on BFCL mixed with the Toolformer conversations the builder made at its start
    toolformer = results["stages"][0]["built"]["toolformer.jsonl"]
    assert toolformer["texts"] == 4 and toolformer["rows"] == 4 and toolformer["kept"] >= 4
    tf_rows = load_examples(SourceConfig(source=str(run / "toolformer.jsonl")))
    assert all(any(m.get("tool_calls") for m in ex.messages) for ex in tf_rows)
    assert results["stages"][0]["examples"] == 8 + 4
    built = results["stages"][1]["built"]["pairs.jsonl"]
    assert built["prompts"] == 4 and built["pairs"] == len(rows) and built["samples"] == 8
    for details in [results["initial_details"][0]] + [row[0] for row in results["details"]]:
        assert {"format_validity", "tool_selection", "argument_accuracy", "ci95", "n"} <= set(details)
        assert details["n"] == 3

    # held-out pairs (data.validation_fraction of the dpo stage): never trained on, scored by the
    # preference metric when the stage begins (the SFT policy) and after it
    dpo_stage = results["stages"][2]
    heldout = dpo_stage["heldout"]
    n = heldout["after"]["n"]
    assert n >= 1 and dpo_stage["examples"] + n == len(rows)
    for when in ("before", "after"):
        h = heldout[when]
        assert h["metric"] == "preference_accuracy" and h["n"] == n and 0 <= h["score"] <= 1
        assert h["score"] == h["preference_accuracy"] and len(h["ci95"]["preference_accuracy"]) == 2
    # ... and by DPO's implicit reward against the stage's reference (TRL's eval rewards/*): the stage
    # starts with the policy equal to its reference, so every margin is 0 and none counts as right
    before, after = heldout["before"]["rewards"], heldout["after"]["rewards"]
    assert before["n"] == after["n"] == n
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and before["rewards/accuracies"] == 0.0
    assert after["rewards/margins"] != before["rewards/margins"] and 0 <= after["rewards/accuracies"] <= 1
    assert "heldout" not in results["stages"][0] and "heldout" not in results["stages"][1]
    # ... and while it trains (plugin preference_eval; every step under --smoke): the last is the 'after' score
    evals = [m for m in dpo if "eval_rewards/accuracies" in m]
    assert [m["step"] for m in evals] == [1, 2, 3] and all(m["eval_pairs"] == n for m in evals)
    assert evals[-1]["eval_rewards/margins"] == pytest.approx(after["rewards/margins"], abs=1e-5)
    assert evals[-1]["eval_preference_accuracy"] == heldout["after"]["preference_accuracy"]

    ev = run_cli("eval", str(run), cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((run / "eval.json").read_text())["tasks"]["bfcl"]["metric"] == "ast_accuracy"


class _Interrupt(Exception):
    pass


class _StopAtDPOStep3(Plugin):
    """Dies during DPO step 3, after the checkpoint of step 2 (what a SIGKILL there leaves behind)."""
    name = "stop"

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


def test_one_stage_at_a_time_hands_over_adapter_and_pairs(smoke_run, tmp_path, capsys):
    """sft -> pairs (init_from the sft run) -> dpo (init_from the pairs run): the same SFT adapter
    and pairs as the run of all stages; dpo from an sft run builds its pairs itself."""
    import torch
    from safetensors.torch import load_file

    import skillstream

    def stage(name, out, init=None):
        over = {**OVERRIDES, "report_to": [], "stage": name, **({"init_from": str(init)} if init else {})}
        return skillstream.train("muse", out=tmp_path / out, smoke=True, overrides=over, show_progress=False)

    sft = stage("sft", "sft")
    assert [s["name"] for s in sft.results["stages"]] == ["sft"] and not (sft.run_dir / "pairs.jsonl").exists()
    pairs = stage("pairs", "pairs", sft.run_dir)
    dpo = stage("dpo", "dpo", pairs.run_dir)
    out = capsys.readouterr().out
    assert f"copied {pairs.run_dir / 'pairs.jsonl'}" in out

    adapter = lambda run: load_file(str(run / "experts/default/adapter_model.safetensors"))
    a, b = adapter(sft.run_dir), adapter(pairs.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # loaded, not retrained
    # the SFT stage alone trains as it does in the full run, so it samples the same pairs
    assert (pairs.run_dir / "pairs.jsonl").read_text() == (smoke_run / "pairs.jsonl").read_text()
    assert (dpo.run_dir / "pairs.jsonl").read_text() == (smoke_run / "pairs.jsonl").read_text()
    assert pairs.results["stages"][0]["built"]["pairs.jsonl"]["pairs"] == len(
        (pairs.run_dir / "pairs.jsonl").read_text().splitlines())

    # dpo starts from the SFT adapter: it is the reference (a frozen copy), the first loss is log 2
    assert dpo.config.init_from == str(pairs.run_dir.resolve())
    state = json.loads(sorted((dpo.run_dir / "checkpoints").glob("ckpt-*/state.json"))[-1].read_text())
    assert state["run_state"]["objective"] == {"reference": "adapter"}
    logged = [json.loads(line) for line in (dpo.run_dir / "metrics.jsonl").read_text().splitlines()]
    # the DPO part of the loss (the loss less sft_weight 1.0 x NLL of the chosen answers) starts at log 2
    assert len(logged) == 3 and abs(logged[0]["loss"] - logged[0]["nll/chosen"] - math.log(2)) < 0.05
    r = dpo.results
    assert r["tasks"] == ["bfcl", "tool_workflows", "arithmetic_tools"] and len(r["matrix"]) == 1 and r["initial_details"][0]["n"] == 3  # the full run's suite
    assert {"before", "after"} <= set(r["stages"][0]["heldout"])

    # no pairs in the run it starts from: the dpo stage builds them from the SFT adapter it loaded
    dpo2 = stage("dpo", "dpo2", sft.run_dir)
    assert dpo2.results["stages"][0]["built"]["pairs.jsonl"]["pairs"] >= 1
    assert (dpo2.run_dir / "pairs.jsonl").read_text() == (smoke_run / "pairs.jsonl").read_text()


@pytest.mark.parametrize("sets, message", [
    (["stage=rl"], "error: stage 'rl': recipe 'muse' has no such stage (stages: sft, pairs, dpo; or all)"),
    (["stage=dpo", "init_from=nowhere"], "error: init_from nowhere: not a run directory (no config.yaml)"),
])
def test_bad_stage_or_init_from_is_one_line_and_status_2(tmp_path, sets, message):
    args = [a for kv in ["model=tiny", *sets] for a in ("--set", kv)]
    r = run_cli("train", "muse", "--smoke", *args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == message and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_init_from_must_match_model_and_lora(smoke_run, tmp_path):
    from skillstream.errors import UserError

    import skillstream

    with pytest.raises(UserError, match=r"init_from .*: trained with lora.r 16, this recipe has 8"):
        skillstream.train("muse", out=tmp_path / "r", smoke=True,
                          overrides={**OVERRIDES, "lora.r": 8, "stage": "dpo", "init_from": str(smoke_run)})
    with pytest.raises(UserError, match=r"trained with model.name 'tiny', this recipe has 'smollm2-135m'"):
        skillstream.train("muse", out=tmp_path / "r", smoke=True,
                          overrides={"stage": "dpo", "init_from": str(smoke_run)})
    assert not (tmp_path / "r").exists()
