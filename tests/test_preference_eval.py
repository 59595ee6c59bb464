"""DPO scored on its held-out pairs while it trains (plugin preference_eval, TRL's eval_steps):
TRL-named eval_rewards/* and the preference accuracy in metrics.jsonl at every eval step, the
last one equal to the stage's 'after' score; bad settings are one line."""
import json

import pytest

from skillstream.errors import UserError
from skillstream.run import train
from skillstream.tools.bfcl import load_bfcl, to_trl_example


def _wrong(message: dict) -> dict:
    call = message["tool_calls"][0]["function"]
    args = {k: "zzz" for k in call["arguments"]}
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": call["name"], "arguments": args}}]}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = []
    for rec in load_bfcl(["simple"], "train")[:8]:
        ex = to_trl_example(rec)
        rows.append({"prompt": ex["messages"][:-1], "chosen": [ex["messages"][-1]],
                     "rejected": [_wrong(ex["messages"][-1])], "tools": ex["tools"]})
    path = tmp_path_factory.mktemp("pe") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(pairs_file, **plugin):
    return {"name": "pe", "seed": 0, "model": "tiny", "report_to": [],
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "objective": {"name": "dpo", "beta": 0.1},
            "data": {"max_length": 512, "validation_fraction": 0.25, "train": [{"source": str(pairs_file)}]},
            "train": {"steps": 4, "batch_size": 2, "lr": 5e-3, "log_every": 2, "warmup_steps": 0,
                      "checkpoint_every": 100},
            "plugins": [{"name": "preference_eval", **plugin}]}


def test_eval_steps_log_trl_rewards_on_the_held_out_pairs(pairs_file, tmp_path):
    train(_recipe(pairs_file, eval_steps=2), out=tmp_path / "run", show_progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval_rewards/accuracies" in m]
    assert [m["step"] for m in evals] == [2, 4]
    for m in evals:
        assert m["eval_pairs"] == 2  # 25% of 8 pairs, never trained on
        assert m["eval_rewards/margins"] == pytest.approx(m["eval_rewards/chosen"] - m["eval_rewards/rejected"])
        assert m["eval_rewards/accuracies"] in (0.0, 0.5, 1.0) and m["eval_preference_accuracy"] in (0.0, 0.5, 1.0)
    assert evals[0]["eval_rewards/chosen"] != evals[1]["eval_rewards/chosen"]  # the policy moved between them
    # the last eval step is the stage's end: the same pairs, model and reference as its 'after' score
    after = json.loads((tmp_path / "run" / "results.json").read_text())["stages"][0]["heldout"]["after"]
    assert evals[-1]["eval_rewards/chosen"] == pytest.approx(after["rewards"]["rewards/chosen"], abs=1e-5)
    assert evals[-1]["eval_preference_accuracy"] == after["preference_accuracy"]


def test_bad_eval_steps_and_no_held_out_pairs_are_one_line(pairs_file, tmp_path):
    with pytest.raises(UserError, match=r"eval_steps 3 is not a multiple of the train.log_every of stage 'main' \(2"):
        train(_recipe(pairs_file, eval_steps=3), out=tmp_path / "a", show_progress=False)
    recipe = _recipe(pairs_file, eval_steps=2)
    recipe["data"]["validation_fraction"] = 0.0
    with pytest.raises(UserError, match="stage 'main' holds out no preference pairs"):
        train(recipe, out=tmp_path / "b", show_progress=False)
