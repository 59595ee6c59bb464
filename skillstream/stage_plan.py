"""A staged recipe's units: its stages, in order, each scored after it trains (the driver runs them).

A stage may stop and resume inside itself (train_stage checkpoints every `checkpoint_every` steps);
its optimizer is built for it (an objective's own parameters, a value head, join the model's), and
with several processes the model goes through `accelerator.prepare` for the stage.
"""
from __future__ import annotations

import time

import torch

from .driver import RunPlan, UnitSaver
from .engine import StageState, build_optimizer, train_stage, trainable_parameters
from .evaluation.memo import EvalMemo
from .evaluation.runner import evaluate_examples
from .evaluation.suite import evaluate_all
from .run_files import finish_run
from .run_state import STAGES, Restored, RunSetup, RunState
from .sharding import adapter_state, check_stage, model_state, register_generate
from .stages import PreparedStage, build_sources


class StagePlan(RunPlan):
    kind = STAGES

    def __init__(self, setup: RunSetup):
        super().__init__(setup)
        self.memo = EvalMemo(setup.cfg.data.eval_cache)  # e.g. an old task's untouched expert is not scored twice

    @property
    def n_units(self) -> int:
        return len(self.setup.stages)

    def unit_name(self, index: int) -> str:
        return self.setup.stages[index].name

    def keep_checkpoints(self, index: int) -> int:
        return self.setup.stages[index].train_cfg.keep_checkpoints

    def fresh_state(self) -> RunState:
        return RunState(STAGES, {"initial": None, "rows": [], "details": [], "stages": []},
                        processes=self.setup.accelerator.num_processes)

    def restore(self, restored: Restored) -> None:
        run, setup = restored.run, self.setup
        objective = setup.stages[run.stage_index].objective
        objective.load_state_dict(run.objective)
        objective.begin_stage(setup.model)  # an objective's own parameters (a value head) exist before the copy
        restored.load_weights(checkpoint_params(setup.model, objective))

    def resume_message(self, run: RunState) -> str:
        stage = self.setup.stages[min(run.next_index, len(self.setup.stages) - 1)].name
        return f"at stage {stage!r} step {0 if run.stage_done else run.stage_state.step}"

    def score_before(self, run: RunState) -> None:
        s = self.setup
        t0 = time.time()
        run.results["initial"] = evaluate_all(s.model, s.tok, s.renderer, s.eval_tasks, s.cfg, self.memo)
        run.results["eval_seconds"] = time.time() - t0

    def saved_parts(self, run: RunState, index: int) -> dict[str, torch.nn.Parameter]:
        objective = self.setup.stages[index].objective
        run.objective = objective.state_dict()
        return checkpoint_params(self.setup.model, objective)

    def train_unit(self, run: RunState, index: int, mid_unit: Restored | None) -> tuple[StageState, UnitSaver]:
        setup = self.setup
        cfg, model, accelerator, st = setup.cfg, setup.model, setup.accelerator, setup.stages[index]
        if cfg.lora is not None and cfg.lora.per_stage:
            model.set_adapter(st.name)  # only this stage's expert trains
        state = mid_unit.run.stage_state if mid_unit else StageState()
        if st.data is not None and st.plan is None:
            build_sources(st, cfg, setup.run_dir, model, setup.tok, setup.renderer, accelerator)
        if mid_unit is None:  # a resumed stage began when it was restored
            st.objective.begin_stage(model)
        optimizer = build_optimizer(list(all_trainables(model, st.objective).values()), st.train_cfg)
        check_stage(accelerator, st.train_cfg)
        train_model, optimizer = accelerator.prepare(model, optimizer) if accelerator.num_processes > 1 \
            else (model, optimizer)
        register_generate(accelerator, train_model)
        if mid_unit:  # after prepare: under FSDP each process takes its shard of the saved state
            mid_unit.load_optimizer(optimizer, train_model)
        save = UnitSaver(self, run, index, optimizer)
        if st.plan is not None and state.step < st.train_cfg.steps:
            if state.step == 0:
                score_heldout(run.results, st, "before", model, setup.tok, setup.renderer, cfg)
            state = train_stage(accelerator=accelerator, model=train_model, optimizer=optimizer, objective=st.objective,
                                plan=st.plan, cfg=st.train_cfg, stage=st.name, stage_index=index, state=state,
                                plugins=setup.plugins, log=setup.log.tagged(stage_index=index),
                                pad_id=setup.tok.pad_token_id, checkpoint=save, show_progress=setup.show_progress,
                                vocab_size=len(setup.tok), global_step=sum(done["steps"] for done in run.results["stages"]))
        if accelerator.num_processes > 1:
            setup.model = accelerator.unwrap_model(train_model, keep_fp32_wrapper=False)
        return state, save

    def score_unit(self, run: RunState, index: int, state: StageState) -> None:
        """The accuracy row after a stage, its held-out pairs' scores, and its numbers, into the results."""
        s, results, st = self.setup, run.results, self.setup.stages[index]
        row = evaluate_all(s.model, s.tok, s.renderer, s.eval_tasks, s.cfg, self.memo)
        results["details"].append(row)
        results["rows"].append([r["score"] for r in row])
        heldout = score_heldout(results, st, "after", s.model, s.tok, s.renderer, s.cfg)
        results["stages"].append({"name": st.name, "steps": state.step, "seconds": state.seconds,
                                  "tokens": state.tokens, "tokens_per_s": state.tokens / max(state.seconds, 1e-9),
                                  "examples": st.n_examples, "truncated": st.truncated,
                                  "untrainable": st.untrainable,
                                  "stopped_early": state.stopped_early,
                                  **({"built": st.built} if st.built else {}),
                                  **({"heldout": heldout} if heldout else {})})

    def finish(self, run: RunState) -> dict:
        s = self.setup
        if s.cfg.data.validation_eval:  # the final model on held-out training examples (what sweeps select on)
            from .evaluation.validation import score_validation
            run.results["validation"] = score_validation(s.model, s.tok, s.renderer, s.stages, s.eval_tasks, s.cfg)
        # every process takes part in gathering what the main process writes (FSDP shards it)
        weights = adapter_state(s.accelerator, s.model) if s.cfg.lora is not None else model_state(s.accelerator, s.model)
        final = finish_run(s.cfg, s.run_dir, s.model, weights, s.eval_tasks, run.results) \
            if s.accelerator.is_main_process else {}
        s.accelerator.wait_for_everyone()
        return final


def score_heldout(results: dict, st: PreparedStage, when: str, model, tok, renderer, cfg) -> dict | None:
    """Preference pairs a training stage holds out (data.validation_fraction), scored by the
    `preference` metric before and after it trains; kept in `results` (so in checkpoints: a resumed
    stage keeps its 'before'). Returns the stage's {'before': ..., 'after': ...} or None."""
    examples = [e for e in getattr(st.plan, "validation_examples", None) or [] if e.kind == "preference"]
    if not examples or (when == "after" and st.name not in results.get("heldout", {})):
        return None
    scores = results.setdefault("heldout", {}).setdefault(st.name, {})
    if when not in scores:
        # DPO: TRL's eval rewards/* against the stage's reference, and the preference metric from the
        # same policy pass over the pairs; other objectives: the preference metric alone
        rewards = st.objective.implicit_rewards(model, examples, renderer, tok.pad_token_id, cfg.data.eval_batch_size)
        if rewards is not None:
            own = rewards.pop("ranking")
            scores[when] = {"score": own["preference_accuracy"], "metric": "preference_accuracy", **own, "rewards": rewards}
        else:
            scores[when] = evaluate_examples(model, tok, renderer, examples, "preference", cfg.data.eval_batch_size)
    if when == "after":
        implicit = ""
        if "rewards" in scores["before"] and "rewards" in scores["after"]:
            implicit = (f"; implicit-reward accuracy {scores['before']['rewards']['rewards/accuracies']:.3f} before, "
                        f"{scores['after']['rewards']['rewards/accuracies']:.3f} after")
        print(f"stage {st.name!r}: held-out pairs (n={len(examples)}): preference accuracy "
              f"{scores['before']['score']:.3f} before, {scores['after']['score']:.3f} after{implicit}", flush=True)
    return scores


def all_trainables(model, objective) -> dict[str, torch.nn.Parameter]:
    """The model's trainable parameters plus the objective's own (e.g. a PPO value head)."""
    extra = {f"objective.{k}": v for k, v in objective.extra_parameters().items()}
    return {**trainable_parameters(model), **extra}


def checkpoint_params(model, objective) -> dict[str, torch.nn.Parameter]:
    """What a checkpoint holds: the trainables plus every adapter's weights (frozen experts too)."""
    return {**{n: p for n, p in model.named_parameters() if "lora_" in n}, **all_trainables(model, objective)}
