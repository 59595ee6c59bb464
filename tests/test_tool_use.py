"""The tool_use metric (Toolformer-style): held-out arithmetic answered with a real calculator run
between turns; answer accuracy, calls made and calls made where they help, on hand-made
transcripts; the conversation protocol; the metric on the tiny model."""
import pytest

from skillstream.config import SourceConfig
from skillstream.data.examples import load_examples
from skillstream.data.render import Renderer
from skillstream.errors import UserError
from skillstream.evaluation.tool_use import converse, evaluate_tool_use, require_tool_use_examples, score_tool_use
from skillstream.models.backbone import load_backbone


@pytest.fixture(scope="module")
def problem():
    ex = load_examples(SourceConfig(source="arithmetic", split="test", limit=1))[0]
    assert ex.completion == "2 * 10 = 20. 20 - 20 = 0. Answer: 0"
    return ex


def test_scores_answers_and_calls_that_help(problem):
    texts = [["2 * 10 = <tool>calculator(expression='2 * 10')</tool>", "<tool>calculator(expression='20 - 20')</tool>",
              "Answer: 0"],
             ["Answer: 0"],                                                  # right without a call
             ["<tool>calculator(expression='2 + 10')</tool>", "Answer: 12"],  # a call that does not help
             ["<tool>calculator(expression='eggs')</tool>", "Answer: 5"]]     # a call the calculator refuses
    results = [["20", "0"], [], ["12"], [None]]
    out = score_tool_use(texts, results, [problem] * 4)
    assert out["answer_accuracy"] == 0.5 and out["call_rate"] == 0.75 and out["helpful_call_rate"] == 0.25
    assert out["calls"] == 4 and out["call_validity"] == 0.75 and out["n"] == 4


def test_the_calculator_runs_between_turns(problem):
    renderer = Renderer(load_backbone("tiny", seed=0)[1], 1024)
    seen = []

    def respond(prompts):  # answers like a tool-using model: a call, then the answer from the result
        seen.append(prompts)
        return ["Answer: 20" if "<|im_start|>tool" in p or "tool: 20" in p else
                "Let me compute. <tool>calculator(expression='2 * 10')</tool>" for p in prompts]
    texts, results = converse(respond, renderer, [problem])
    assert results == [["20"]] and texts == [["Let me compute. <tool>calculator(expression='2 * 10')</tool>", "Answer: 20"]]
    assert len(seen) == 2 and "calculator" in seen[0][0]  # the tool's schema is in the prompt
    assert score_tool_use(texts, results, [problem])["helpful_call_rate"] == 1.0


def test_the_metric_runs_on_a_model_and_refuses_other_data(problem):
    model, tok = load_backbone("tiny", seed=0)
    out = evaluate_tool_use(model, tok, Renderer(tok, 1024), [problem, problem], batch_size=2, max_new_tokens=4)
    assert out["n"] == 2 and out["answer_accuracy"] == 0.0 and len(out["samples"]) == 2
    nl2bash = load_examples(SourceConfig(source="nl2bash", split="test", limit=1))
    with pytest.raises(UserError, match=r"data.eval\[t\]: metric 'tool_use' needs prompt/completion rows whose completion"):
        require_tool_use_examples("t", nl2bash)
