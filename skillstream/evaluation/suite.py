"""A recipe's evaluation suite: its tasks, checked before a run starts, and scored together."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config import RecipeConfig
from ..data.examples import Example, default_metric, load_examples
from ..errors import UserError
from .runner import evaluate_examples


@dataclass
class EvalTask:
    name: str
    metric: str
    examples: list[Example]
    max_new_tokens: int
    also: list[str] = field(default_factory=list)  # further protocols scored on the same examples
    expert: str | None = None  # skill streams: answer with this expert instead of the router's choice
    source: object = None  # the SourceConfig the examples came from (e.g. to read more of its split)


def prepare_eval_tasks(cfg: RecipeConfig, data_cfg) -> list[EvalTask]:
    tasks = []
    for t in data_cfg.eval:
        examples = load_examples(t)
        metric = default_metric(t, examples) if t.metric == "auto" else t.metric
        if metric == "accuracy" and examples[0].kind != "classification":
            raise UserError(f"data.eval[{t.name}]: metric 'accuracy' needs a classification task folder")
        if metric == "tool_call":
            from .tool_metrics import require_tool_examples
            require_tool_examples(t.name, examples)
        if metric == "tool_workflow":
            from .tool_workflow import require_workflow_examples
            require_workflow_examples(t.name, examples)
        if metric == "tool_use":
            from .tool_use import require_tool_use_examples
            require_tool_use_examples(t.name, examples)
        if metric == "unit_tests":
            from .code_metrics import require_test_examples
            require_test_examples(t.name, examples)
        if metric == "preference":
            from .preference import require_preference_examples
            require_preference_examples(t.name, examples)
        for extra in t.also:
            if extra == "accuracy" and examples[0].kind != "classification":
                raise UserError(f"data.eval[{t.name}].also: 'accuracy' needs a classification task folder")
        tasks.append(EvalTask(t.name, metric, examples, t.max_new_tokens, [a for a in t.also if a != metric], t.expert, t))
    return tasks


def evaluate_all(model, tok, renderer, tasks: list[EvalTask], cfg: RecipeConfig, memo=None) -> list[dict]:
    """One row of scores, a dict per task; `memo` (evaluation/memo.py) returns what the same weights
    already scored on the same inputs (an old task's expert no later task touched, in the oracle regime)."""
    rows = []
    oracle = cfg.lora is not None and cfg.lora.per_stage
    active = model.active_adapter if oracle else None
    for t in tasks:
        if oracle:  # the oracle baseline: each task answered by the expert trained on it
            model.set_adapter(t.name if t.name in model.peft_config else active)
        # t.also: e.g. option scoring beside generative exact match
        rows.append(evaluate_examples(model, tok, renderer, t.examples, t.metric, cfg.data.eval_batch_size,
                                      t.max_new_tokens, samples=getattr(t.source, "samples", 1), also=t.also,
                                      memo=memo))
    if oracle:
        model.set_adapter(active)
    return rows
