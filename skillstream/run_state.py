"""What a run checkpoints, for every kind of run, and the one save and the one restore of it.

A staged recipe (run.py) and a skill stream (experts/stream_run.py) both keep their progress in a
:class:`RunState`; `save_run` writes it with the weights, the optimizer and every process's RNG, and
`restore_run` reads the newest intact checkpoint back, refuses one from another kind of run, another
process count or an older skillstream, and drops the log records the resumed run will write again.
The drivers put the weights and the optimizer state in place (:class:`Restored`) once they have
rebuilt what those belong to (an objective's extra parameters, the stream's experts).

In state.json the run's state is under "run_state"; the sequence number stays at the top, where
checkpoint.list_checkpoints orders checkpoints of every layout by it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import sharding
from .data.batching import Position
from .engine import StageState
from .errors import UserError
from .monitor.metrics_log import ALERTS, METRICS, SAMPLES, rewrite_jsonl
from .step_health import StepCounts

RUN_STATE = "run_state"  # state.json's key; a checkpoint without it predates this layout
DECISIONS = "decisions.jsonl"  # a skill stream's decision per chunk (experts/stream_run.py)
STAGES, SKILL_STREAM = "stages", "skill_stream"  # RunState.kind


@dataclass
class StreamState:
    """A skill stream's own progress beside the run's (experts/stream_run.py)."""
    decisions: list[dict] = field(default_factory=list)     # each chunk's decision record, in order
    pending: list[dict] = field(default_factory=list)       # held-back chunks: signal, features, best expert
    assignments: dict[str, list[str]] = field(default_factory=dict)  # true skill -> expert of each chunk
    skill_stats: dict[str, dict] = field(default_factory=dict)  # true skill -> steps, seconds, tokens
    global_step: int = 0                                    # optimizer steps of every chunk so far


@dataclass
class RunState:
    """Where a run stands. For a skill stream a "stage" is a chunk: its index and its name (chunk_0007),
    as the engine logs it."""
    kind: str                                                 # STAGES or SKILL_STREAM
    results: dict                                             # scores and per-stage numbers so far
    seq: int = 0                                              # checkpoints written, this one included
    stage_index: int = 0                                      # the stage or chunk saved last
    stage: str = ""                                           # its name (for people reading state.json)
    stage_done: bool = False                                  # that stage or chunk finished
    stage_state: StageState = field(default_factory=StageState)  # within it: step, data position, health
    plugins: dict[str, dict] = field(default_factory=dict)    # each plugin's state_dict, by name
    objective: dict = field(default_factory=dict)             # the stage objective's state_dict
    lifecycle: dict = field(default_factory=dict)             # a stream's experts, router and profiles
    processes: int = 1                                        # the global batch is split over these
    fsdp: bool = False                                        # optimizer state saved whole by FSDP, by parameter name
    deepspeed_zero: int = 0                                   # ZeRO stage that cut its optimizer partitions (0: none)
    stream: StreamState | None = None                         # a skill stream's own progress

    @property
    def next_index(self) -> int:
        """The stage or chunk a resumed run trains first."""
        return self.stage_index + 1 if self.stage_done else self.stage_index

    def precedes(self, index: int, step: int) -> bool:
        """Whether step `step` of stage or chunk `index` was done when this state was saved."""
        return index < self.stage_index or (index == self.stage_index
                                            and (self.stage_done or step <= self.stage_state.step))

    def save_plugins(self, plugins) -> None:
        self.plugins = {p.name: p.state_dict() for p in plugins}

    def restore_plugins(self, plugins) -> None:
        for p in plugins:
            p.load_state_dict(self.plugins.get(p.name, {}))

    def to_checkpoint(self) -> dict:
        """state.json's content (tensors in it go to state.safetensors)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("seq", "stage_state", "stream")}
        own["stage_state"] = asdict(self.stage_state)
        own["stream"] = None if self.stream is None else {f.name: getattr(self.stream, f.name) for f in fields(self.stream)}
        return {"seq": self.seq, RUN_STATE: own}

    @classmethod
    def from_checkpoint(cls, path: Path, saved: dict) -> RunState:
        if RUN_STATE not in saved:
            raise UserError(f"--resume: {path} was written by an older skillstream (no {RUN_STATE}); "
                            "start a new run with --out")
        own = dict(saved[RUN_STATE])
        s = own.pop("stage_state")
        stage_state = StageState(s["step"], Position(**s["position"]), s["tokens"], s["seconds"], s["stopped_early"],
                                 StepCounts(**s["health"]))
        stream = own.pop("stream")
        return cls(**own, seq=saved["seq"], stage_state=stage_state,
                   stream=None if stream is None else StreamState(**stream))


def save_run(accelerator, ckpt_dir: Path, run: RunState, weights: dict[str, torch.Tensor], model, optimizer,
             keep: int) -> None:
    """Every process calls it: each one's RNG goes in (LoRA dropout draws differ per process, and a
    resume is exact), and each takes part in gathering the weights and optimizer state that FSDP and
    DeepSpeed shard (sharding.whole, sharding.optimizer_state; `weights` taken after sharding.reshard);
    the main process writes."""
    run.seq += 1
    rngs = None
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        rngs = gather_object([ckpt.rng_state()])
    weights = sharding.whole(accelerator, weights)
    run.fsdp = sharding.is_fsdp(accelerator)
    run.deepspeed_zero = sharding.zero_stage(accelerator)
    optimizer_state = sharding.optimizer_state(accelerator, model, optimizer)
    if accelerator.is_main_process:
        ckpt.save(ckpt_dir, f"{run.seq:06d}", weights, optimizer_state, run.to_checkpoint(), keep=keep,
                  rank_rng=rngs)
    accelerator.wait_for_everyone()


@dataclass
class Restored:
    """A checkpoint read back. Its weights and optimizer state are put in place by the driver once it
    has rebuilt the parameters they belong to."""
    path: Path
    run: RunState
    weights: dict[str, torch.Tensor]
    optimizer_state: dict
    accelerator: Any = None

    def load_weights(self, params: dict[str, torch.nn.Parameter]) -> None:
        missing = set(params) - set(self.weights)
        if missing:
            raise UserError(f"checkpoint does not match the model: {len(missing)} trainable tensors missing "
                            f"(e.g. {sorted(missing)[0]})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.weights[name])

    def load_optimizer(self, optimizer, model=None) -> None:
        """`model`: the prepared model the optimizer trains (needed where FSDP shards the state)."""
        sharding.load_optimizer_state(self.accelerator, model, optimizer, self.optimizer_state)


def restore_run(run_dir: Path, kind: str, accelerator, name: str | None = None) -> Restored | None:
    """The newest intact checkpoint of the run (damaged newer ones skipped and named), or the one `name`
    picks (--resume-from ckpt-N: the newer ones are set aside in checkpoints/superseded/); None when none
    was written yet. Restores this process's RNG as a side effect (checkpoint.load)."""
    root = run_dir / ckpt.CHECKPOINTS
    path = ckpt.pick(root, name) if name is not None else ckpt.newest_intact(root)
    if path is None:
        return None
    zero = json.loads((path / "state.json").read_text()).get(RUN_STATE, {}).get("deepspeed_zero", 0)
    if zero != sharding.zero_stage(accelerator):  # each process's partition, as that stage cut it (checked before
        # optimizer.pt is read: only DeepSpeed's own classes in it are allowed to load, and only for that stage)
        trained = f"with DeepSpeed ZeRO-{zero}" if zero else "without DeepSpeed"
        raise UserError(f"--resume: {run_dir} was trained {trained}: resume it with the same accelerate config")
    with torch.serialization.safe_globals(sharding.checkpoint_classes(zero)):
        weights, optimizer_state, saved = ckpt.load(path, rank=accelerator.process_index)
    run = RunState.from_checkpoint(path, saved)
    if run.kind != kind:
        raise UserError(f"--resume: {path} is a {run.kind} checkpoint, not {kind}: start a new run with --out")
    if run.fsdp != sharding.is_fsdp(accelerator):  # the optimizer state's layout differs
        raise UserError(f"--resume: {run_dir} was trained {'with' if run.fsdp else 'without'} FSDP: resume it "
                        f"{'with' if run.fsdp else 'without'} the same accelerate config")
    if run.processes != accelerator.num_processes:  # the global batch is part of the run
        raise UserError(f"--resume: {run_dir} was trained with {run.processes} process(es), "
                        f"not {accelerator.num_processes}: resume it with as many")
    if accelerator.is_main_process:
        drop_redone_records(run_dir, run)
        if name is not None:
            for moved in ckpt.set_aside_newer(root, path):
                print(f"--resume-from {path.name}: the later {moved.name} is set aside in {moved.parent}", flush=True)
    accelerator.wait_for_everyone()  # no process reads the checkpoints while they move
    return Restored(path, run, weights, optimizer_state, accelerator)


def drop_redone_records(run_dir: Path, run: RunState) -> None:
    """Log records of steps after the checkpoint go: the resumed run writes them again. Records are
    matched by the stage or chunk index they carry (metrics: stage_index; decisions: chunk)."""
    rewrite_jsonl(run_dir / METRICS, lambda r: run.precedes(r.get("stage_index", -1), r.get("step", 0)))
    rewrite_jsonl(run_dir / ALERTS, lambda r: True)  # only a torn last line goes
    rewrite_jsonl(run_dir / DECISIONS, lambda r: run.precedes(r["chunk"], 0))
    rewrite_jsonl(run_dir / SAMPLES, lambda r: run.precedes(r.get("stage_index", -1), r.get("step", 0)))


@dataclass
class RunSetup:
    """What a run driver is given: the recipe, its prepared stages and tasks, the model, and how to run."""
    cfg: Any                   # RecipeConfig
    run_dir: Path
    model: Any                 # the backbone with its adapters; replaced by the unwrapped one after DDP
    tok: Any
    renderer: Any              # data.render.Renderer
    stages: list               # stages.PreparedStage, in order
    eval_tasks: list
    accelerator: Any
    resume: bool
    plugins: list
    show_progress: bool
    log: Any                   # monitor.metrics_log.MetricsLog
    resume_from: str | None = None  # --resume-from: the checkpoint to resume from (default: the newest intact)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / ckpt.CHECKPOINTS
