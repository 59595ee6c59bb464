"""Validation scores (`data.validation_eval`): each evaluation task scored, after the last stage, on the
training examples its own source held out (`data.validation_fraction`), with the task's metric.

Selecting hyperparameters on the test split would report a test score that was also the selection
criterion, so `skillstream sweep` selects on these instead. The held-out examples are never trained on
(stages.py cuts them off each training source with a seeded shuffle) and come from the train split, so
the test split stays untouched. A task is matched to the training sources that read its `source` (the
quickstart's nl2bash task to the nl2bash training source); a task without one has no validation score.
A skill stream (experts:) scores them as it answers its test tasks, task-agnostically through the
router (experts/stream_run.py); its chunks are cut from the examples left after the hold-out.
"""
from __future__ import annotations

from dataclasses import replace

from ..config import RecipeConfig
from ..errors import UserError
from .intervals import bootstrap_matrix, with_interval
from .suite import EvalTask, evaluate_all


def check_validation(cfg: RecipeConfig) -> None:
    """Before the run: validation_eval needs a held-out share and an evaluation task fed by a training source."""
    stages = cfg.resolved_stages()
    if not any(st.data.validation_fraction > 0 for st in stages):
        own = cfg.stages_with_own_data()
        where = (f"stages.{own[0]}.data.validation_fraction (each stage with its own data block: "
                 f"it does not read the recipe's data)" if own else "data.validation_fraction")
        raise UserError(f"data.validation_eval: no stage holds anything out; set {where} (e.g. 0.1) to hold out a "
                        f"share of each training source")
    trained = {src.source for st in stages if st.data.validation_fraction > 0 for src in st.data.train}
    tasks = stages[0].data.eval  # the recipe's evaluation suite (prepare_stages reads the same)
    if not any(t.source in trained for t in tasks):
        raise UserError(f"data.validation_eval: no evaluation task reads a training source with a held-out share "
                        f"(tasks read {sorted({t.source for t in tasks})}, training reads {sorted(trained)})")


def validation_tasks(stages: list, eval_tasks: list[EvalTask]) -> list[EvalTask]:
    """The evaluation tasks that have held-out training examples of their source, with those as examples.
    A source held out by several stages counts once (its first stage's share)."""
    by_source: dict[str, list] = {}
    for st in stages:
        if st.plan is None:
            continue
        own: dict[str, list] = {}
        for source, example in zip(st.plan.validation_sources, st.plan.validation_examples):
            own.setdefault(source, []).append(example)
        for source, examples in own.items():
            by_source.setdefault(source, examples)
    return [replace(t, examples=by_source[t.source.source]) for t in eval_tasks if t.source.source in by_source]


def validation_scores(tasks: list[EvalTask], rows: list[dict]) -> dict:
    """{'score': mean of the tasks' scores, 'score_ci95', 'tasks': {name: {'score', 'metric', 'n', 'score_ci95',
    'outcomes', ...numbers}}}: with the per-example outcomes two trials' validation scores compare paired
    (intervals.row_difference)."""
    per_task = {}
    for t, r in zip(tasks, rows):
        r = with_interval(r)
        per_task[t.name] = {"metric": r["metric"], "n": len(t.examples),
                            **{k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                            **{k: r[k] for k in ("score_ci95", "outcomes") if k in r}}
    outcomes = [r.get("outcomes") for r in rows]
    # the tasks' examples resampled together: the interval of the mean of the task scores
    ci = None if None in outcomes else bootstrap_matrix(outcomes, [outcomes], lambda _, m: sum(m[0]) / len(m[0]))
    return {"score": sum(r["score"] for r in rows) / len(rows), "score_ci95": ci, "tasks": per_task}


def score_validation(model, tok, renderer, stages: list, eval_tasks: list[EvalTask], cfg: RecipeConfig) -> dict:
    """The final model (one for every task) on the validation tasks: validation_scores' dict."""
    tasks = validation_tasks(stages, eval_tasks)
    return validation_scores(tasks, evaluate_all(model, tok, renderer, tasks, cfg))
