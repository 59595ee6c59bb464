"""`preference_eval` plugin: score the stage's held-out preference pairs while it trains (TRL's
``eval_steps``).

    data: {validation_fraction: 0.1, ...}          # the held-out pairs (never trained on)
    plugins:
      - {name: preference_eval, eval_steps: 20, stages: [dpo]}

Every ``eval_steps`` optimizer steps the pairs the stage holds out (``data.validation_fraction``)
are scored in eval mode and logged to metrics.jsonl under TRL's evaluation names: with the DPO
objective ``eval_rewards/chosen``, ``eval_rewards/rejected``, ``eval_rewards/accuracies``,
``eval_rewards/margins`` (implicit rewards against the stage's reference, as
``DPOObjective.implicit_rewards`` computes them), and for every objective
``eval_preference_accuracy`` / ``eval_margin`` (the `preference` metric: the policy's own ranking
of chosen over rejected). The stage's scores before and after it trains stay where they were
(results.json ``stages[i].heldout``); this adds the curve between them, kept in the plugin state
(``history``) of every checkpoint as well.

Why a plugin: the engine runs plugins after every step with the stage's plan, objective and
model; an evaluation is a hook, not part of any objective's loss. ``eval_steps`` must be a multiple
of the stage's ``train.log_every`` (only log steps are written to metrics.jsonl), which is checked
when the recipe is read. Under ``--smoke`` every step is evaluated.
"""
from __future__ import annotations

from ..errors import UserError
from ..plugins import Plugin, StepContext


class PreferenceEval(Plugin):
    name = "preference_eval"

    def __init__(self, eval_steps: int = 50, stages: list[str] | None = None, batch_size: int | None = None,
                 tokenizer=None, renderer=None, recipe=None, **context):
        where = "plugins[preference_eval]"
        if not isinstance(eval_steps, int) or isinstance(eval_steps, bool) or eval_steps < 1:
            raise UserError(f"{where}: eval_steps must be a positive integer (got {eval_steps!r})")
        if recipe is not None and recipe.smoke:  # a wiring check's stages are 3 steps long: evaluate each
            eval_steps = 1
        self.eval_steps, self.stages, self.tok, self.renderer = eval_steps, stages, tokenizer, renderer
        self.batch_size = batch_size or (recipe.data.eval_batch_size if recipe is not None else 16)
        if recipe is not None:
            resolved = {st.name: st for st in recipe.resolved_stages()}
            for s in stages or []:
                if s not in resolved and recipe.stage == "all":
                    raise UserError(f"{where}: stage {s!r} is not a stage of the recipe ({', '.join(resolved)})")
            for name, st in resolved.items():
                if (stages is None or name in stages) and eval_steps % st.train.log_every:
                    raise UserError(f"{where}: eval_steps {eval_steps} is not a multiple of the train.log_every of stage {name!r} "
                                    f"({st.train.log_every}; only log steps reach metrics.jsonl)")
        self.active, self.examples = False, []
        self.history: list[dict] = []

    def before_stage(self, ctx: StepContext) -> None:
        self.active = self.stages is None or ctx.stage in self.stages
        if not self.active:
            return
        held = ctx.plan.validation_examples if ctx.plan is not None else []
        self.examples = [e for e in held if e.kind == "preference"]
        if not self.examples:
            raise UserError(f"plugins[preference_eval]: stage {ctx.stage!r} holds out no preference pairs "
                            "(set its data.validation_fraction, e.g. 0.1, on a prompt/chosen/rejected source)")

    def after_step(self, ctx: StepContext, metrics: dict) -> dict | None:
        if not self.active or ctx.step % self.eval_steps:
            return None
        out = self.evaluate(ctx)
        self.history.append({"stage": ctx.stage, "step": ctx.step, **out})
        return out

    def evaluate(self, ctx: StepContext) -> dict:
        model = ctx.accelerator.unwrap_model(ctx.model) if ctx.accelerator is not None else ctx.model
        rewards = ctx.objective.implicit_rewards(model, self.examples, self.renderer, ctx.pad_id, self.batch_size)
        if rewards is not None:
            ranking = rewards.pop("ranking")
            out = {f"eval_{k}": v for k, v in rewards.items() if k.startswith("rewards/")}
        else:
            from ..evaluation.preference import evaluate_preferences
            from ..models.modes import eval_mode
            with eval_mode(model):
                ranking = evaluate_preferences(model, self.tok, self.renderer, self.examples, self.batch_size)
            out = {}
        return {"eval_preference_accuracy": ranking["preference_accuracy"], "eval_margin": ranking["margin"],
                "eval_pairs": float(ranking["n"]), **out}

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = list((state or {}).get("history", []))
