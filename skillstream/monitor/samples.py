"""Sample generations during training (`train.sample_every`, `train.sample_prompts`).

Every N optimizer steps and at each stage end the main process decodes a few prompts greedily and
appends one record per prompt to RUN_DIR/samples.jsonl ({global_step, stage, stage_index, step,
prompt, output}); the live monitor shows the latest, the report lists the latest per prompt, and the
trackers get them as a `samples` table (a text per sample in TensorBoard; monitor/trackers.py).
"""
from __future__ import annotations

import json

from ..plugins import Plugin, StepContext
from .metrics_log import SAMPLES
from .trackers import log_table

PER_TASK = 2        # default prompts: the first test prompts of each evaluation task
MAX_NEW_TOKENS = 32  # a glance at what the model says, not an evaluation


def default_prompts(eval_tasks: list) -> list[str]:
    """The user text of the first PER_TASK examples of each evaluation task."""
    from ..data.render import user_text
    out = []
    for task in eval_tasks:
        for ex in task.examples[:PER_TASK]:
            text = user_text(ex) if ex.kind != "messages" else next(
                (m["content"] for m in reversed(ex.messages or []) if m.get("role") == "user"), "")
            if text and text not in out:
                out.append(str(text))
    return out


class SamplePlugin(Plugin):
    """Added by run.py when some stage has `train.sample_every > 0`; `every` maps stage name to N
    (a stage it does not name, a skill stream's chunk say, samples every `default` steps)."""

    name = "samples"

    def __init__(self, *, tokenizer, renderer, every: dict[str, int], prompts: list[str], max_new_tokens: int,
                 default: int = 0):
        self.tok, self.renderer, self.every, self.default = tokenizer, renderer, every, default
        self.prompts, self.max_new_tokens = prompts, min(max_new_tokens, MAX_NEW_TOKENS)
        self._global_step: int | None = None
        self._last_step: int | None = None  # the step last sampled in this stage (no repeat at its end)

    def _every(self, stage: str) -> int:
        return self.every.get(stage, self.default)

    def before_stage(self, ctx: StepContext) -> None:
        self._last_step = None

    def after_step(self, ctx: StepContext, metrics: dict) -> None:
        self._global_step = metrics.get("global_step")
        n = self._every(ctx.stage)
        if n > 0 and ctx.step % n == 0:
            self.sample(ctx)

    def after_stage(self, ctx: StepContext) -> None:
        if self._every(ctx.stage) > 0 and ctx.step != self._last_step:
            self.sample(ctx)

    def sample(self, ctx: StepContext) -> list[dict]:
        self._last_step = ctx.step
        acc = ctx.accelerator
        if not self.prompts or (acc is not None and not acc.is_main_process):
            return []
        from ..data.examples import Example
        from ..evaluation.generation import generate
        from ..models.modes import eval_mode
        model = acc.unwrap_model(ctx.model) if acc is not None else ctx.model
        texts = [self.renderer.prompt_text(Example(kind="prompt_completion", prompt=p)) for p in self.prompts]
        with eval_mode(model):
            outputs = generate(model, self.tok, texts, self.max_new_tokens)
        gs = self._global_step if self._global_step is not None else ctx.step
        records = [{"global_step": gs, "stage": ctx.stage, "stage_index": ctx.stage_index, "step": ctx.step,
                    "prompt": p, "output": o} for p, o in zip(self.prompts, outputs)]
        if ctx.run_dir is not None:
            with (ctx.run_dir / SAMPLES).open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
        log_table(acc, "samples", ["stage", "step", "prompt", "output"],
                  [[r["stage"], r["step"], r["prompt"], r["output"]] for r in records], gs)
        return records
