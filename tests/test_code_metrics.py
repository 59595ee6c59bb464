"""HumanEval through the sandbox: the builtin split, programs built from answers, the unbiased
pass@k estimator, and the unit_tests metric end to end on the tiny model."""
from __future__ import annotations

import json

import pytest

from skillstream.config import SourceConfig, load_recipe
from skillstream.data.examples import default_metric, load_examples
from skillstream.evaluation.code_metrics import pass_at_k, passes
from skillstream.evaluation.runner import evaluate_examples
from skillstream.data.render import Renderer
from skillstream.models.backbone import load_backbone
from skillstream.objectives.rewards import Sample, parse_rewards


@pytest.fixture(scope="module")
def humaneval_test():
    return load_examples(SourceConfig(source="humaneval", split="test"))


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)      # 1 - C(3,2) / C(5,2)
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(5, 3, 3) == 1.0  # n - c < k: some sample passes
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_humaneval_split_is_fixed_and_every_canonical_solution_passes(humaneval_test):
    train = load_examples(SourceConfig(source="humaneval", split="train"))
    assert (len(train), len(humaneval_test)) == (132, 32)
    assert not {e.meta["id"] for e in train} & {e.meta["id"] for e in humaneval_test}
    assert default_metric(SourceConfig(source="humaneval"), train) == "unit_tests"
    assert all(passes(ex.completion, ex) for ex in humaneval_test)


def test_wrong_body_only_and_hostile_answers(humaneval_test):
    ex = humaneval_test[0]
    wrong = f"```python\n{ex.prompt}    return None\n```"
    body_only = ex.completion.removeprefix("```python\n").removesuffix("```").removeprefix(ex.prompt)
    assert not passes(wrong, ex)
    assert passes(body_only, ex)                       # the signature is put in front of a bare body
    # a whole function that leaves out the prompt's imports (as instruct models do) still has them
    assert "from typing import List" in ex.prompt
    assert passes(ex.completion.replace("from typing import List\n", ""), ex)
    assert not passes(f"```python\n{ex.prompt}    while True: pass\n```", ex, timeout_s=1)


def test_unit_tests_reward_reads_the_tests_column(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"prompt": "Write double(x).", "completion": "def double(x): return 2 * x",
                                "tests": "assert double(3) == 6"}) + "\n")
    ex = load_examples(SourceConfig(source=str(path)))[0]
    reward = parse_rewards(["unit_tests"])[0]
    assert reward.check(ex) is None
    assert reward(Sample("```python\ndef double(x):\n    return x + x\n```", [], ex, 8, True)) == 1.0
    assert reward(Sample("def double(x): return x", [], ex, 8, True)) == 0.0


def test_unit_tests_metric_runs_through_the_evaluation_runner(humaneval_test):
    model, tok = load_backbone("tiny", seed=0)
    out = evaluate_examples(model, tok, Renderer(tok, 512), humaneval_test[:2], "unit_tests", batch_size=2,
                            max_new_tokens=8, samples=2)
    assert out["metric"] == "pass@1" and out["pass@1"] == 0.0   # an untrained tiny model writes no solution
    assert out["n"] == 2 and out["samples_per_problem"] == 2 and len(out["samples"]) == 2
    cfg = load_recipe("quickstart", {"model": "tiny", "data.eval": [
        {"name": "code", "source": "humaneval", "limit": 2, "samples": 3}]})
    assert cfg.data.eval[0].samples == 3
