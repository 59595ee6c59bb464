"""The one run driver: restore, score before training, train unit after unit, score, save, finish.

Every recipe is a sequence of units of work. A staged recipe's units are its stages
(:class:`skillstream.stage_plan.StagePlan`); a skill stream's are the chunks of its stream
(:class:`skillstream.experts.stream_run.StreamPlan`): the learner decides where each chunk goes,
and the chunk trains that expert through the same engine. A :class:`RunPlan` says what its units
are and how each one trains and is scored; this module owns what is common to every kind of run:
the loop, the resume from the newest intact checkpoint, and the one save (:class:`UnitSaver`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .engine import StageState
from .run_state import Restored, RunSetup, RunState, restore_run, save_run
from .sharding import reshard


class RunPlan(ABC):
    """What a run trains, unit by unit. `kind` names its checkpoints (a stream's cannot resume stages)."""
    kind: str

    def __init__(self, setup: RunSetup):
        self.setup = setup

    @property
    @abstractmethod
    def n_units(self) -> int:
        """How many units the run trains (stages, or chunks of the stream)."""

    @abstractmethod
    def fresh_state(self) -> RunState:
        """A new run's state, before its first unit."""

    @abstractmethod
    def restore(self, restored: Restored) -> None:
        """Put a checkpoint's own parts back (an objective's state, the stream's experts), then its weights."""

    @abstractmethod
    def resume_message(self, run: RunState) -> str:
        """Where a resumed run goes on, for the user."""

    @abstractmethod
    def score_before(self, run: RunState) -> None:
        """The untrained model's scores into run.results["initial"] (and what they cost)."""

    @abstractmethod
    def train_unit(self, run: RunState, index: int, mid_unit: Restored | None) -> tuple[StageState, UnitSaver]:
        """Unit `index`'s training (from where `mid_unit` stopped inside it, if given): where it ended, and its saver."""

    @abstractmethod
    def score_unit(self, run: RunState, index: int, state: StageState) -> None:
        """What the run records after unit `index` trained (the accuracy row after a stage, a chunk's decision)."""

    @abstractmethod
    def saved_parts(self, run: RunState, index: int) -> dict[str, torch.nn.Parameter]:
        """Fill the run's own parts of a checkpoint (objective or lifecycle state); returns the weights it holds."""

    @abstractmethod
    def keep_checkpoints(self, index: int) -> int:
        """How many checkpoints to keep while unit `index` trains."""

    @abstractmethod
    def finish(self, run: RunState) -> dict:
        """The final scores and the run's files (the main process writes); returns results.json's content."""

    def unit_name(self, index: int) -> str:
        return f"unit_{index}"


@dataclass
class UnitSaver:
    """The one save of every kind of run: where unit `index` stands goes into the run's state, saved with
    the plan's weights and this unit's optimizer. train_stage calls it inside a stage (checkpoint_every);
    the driver calls it when a unit is done."""
    plan: RunPlan
    run: RunState
    index: int
    optimizer: torch.optim.Optimizer

    def __call__(self, stage_state: StageState, done: bool = False) -> None:
        setup, run = self.plan.setup, self.run
        run.stage_index, run.stage, run.stage_done = self.index, self.plan.unit_name(self.index), done
        run.stage_state = stage_state
        run.save_plugins(setup.plugins)
        reshard(setup.accelerator, setup.model)  # FSDP: the sharded parameters, before they are named
        weights = self.plan.saved_parts(run, self.index)
        save_run(setup.accelerator, setup.ckpt_dir, run, weights, setup.model, self.optimizer,
                 keep=self.plan.keep_checkpoints(self.index))


def restore(plan: RunPlan) -> tuple[RunState, Restored | None]:
    """The run's state: a new one, or the newest checkpoint's with everything put back. The second value
    is the checkpoint where it stopped inside a unit (whose optimizer and data position resume)."""
    setup = plan.setup
    restored = restore_run(setup.run_dir, plan.kind, setup.accelerator, setup.resume_from) if setup.resume else None
    if restored is None:
        if setup.resume:
            print(f"resuming {setup.run_dir}: no checkpoint yet, starting from the beginning", flush=True)
        return plan.fresh_state(), None
    run = restored.run
    run.restore_plugins(setup.plugins)  # e.g. a replay memory: resumed, not rebuilt from nothing
    plan.restore(restored)
    print(f"resuming {setup.run_dir} {plan.resume_message(run)}", flush=True)
    return run, None if run.stage_done else restored


def drive(plan: RunPlan) -> dict:
    """The run: every unit from where the run stands, each scored and saved once it is done."""
    run, mid_unit = restore(plan)
    log, tasks = plan.setup.log, [t.name for t in plan.setup.eval_tasks]
    if run.results["initial"] is None:
        plan.score_before(run)
        log.evaluation(tasks, run.results["initial"], "initial")
    for index in range(run.next_index, plan.n_units):
        state, save = plan.train_unit(run, index, mid_unit)
        mid_unit = None  # only the first unit resumes inside itself
        rows = len(run.results["details"])
        plan.score_unit(run, index, state)
        if len(run.results["details"]) > rows:  # a new accuracy row (a stream scores at skill boundaries only)
            log.evaluation(tasks, run.results["details"][-1], plan.unit_name(index))
        save(state, done=True)
    return plan.finish(run)
