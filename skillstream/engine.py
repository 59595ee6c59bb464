"""The training loop: one stage of optimizer steps on Accelerate, with plugins and checkpoints.

Every decision is inline and on one screen (nanoGPT's loop): set the LR, accumulate micro-batches
under autocast, add plugin loss terms, clip, step, log, checkpoint. What differs between recipes
is the objective, the plugins and the batches, never this loop.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .checkpoint import CHECKPOINTS
from .config import TrainConfig
from .curriculum.schedules import lr_factor
from .data.batching import BatchPlan, Position, token_pieces
from .lora_dropout import uncast_lora_inputs
from .monitor.progress import Progress
from .objectives.base import Objective
from .plugins import Plugin, StepContext
from .step_health import StepCounts, StepHealth


@dataclass
class StageState:
    """Where a stage stands: saved in every checkpoint, restored on resume."""
    step: int = 0
    position: Position = None
    tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    health: StepCounts = field(default_factory=StepCounts)  # non-finite and collapsed steps (step_health)

    def __post_init__(self):
        self.position = self.position or Position()


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def decay_groups(params: list[torch.nn.Parameter], weight_decay: float, **tags) -> list[dict]:
    """Optimizer parameter groups: matrices decay, vectors (biases, norms) do not; empty groups are
    left out, and `tags` (e.g. expert=NAME) are set on each group."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **tags},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **tags}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(decay_groups(params, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


def train_stage(*, accelerator, model, optimizer, objective: Objective, plan: BatchPlan, cfg: TrainConfig,
                stage: str, stage_index: int, state: StageState, plugins: list[Plugin], log, pad_id: int,
                checkpoint: Callable[[StageState], None] | None, show_progress: bool = True, vocab_size: int,
                global_step: int = 0) -> StageState:
    """`global_step`: optimizer steps of the run before this stage's step 0 (earlier stages, earlier
    chunks), so the logged `global_step` only grows. `vocab_size`: for the uniform-guess loss."""
    rank, world = accelerator.process_index, accelerator.num_processes
    health = StepHealth(cfg.max_bad_steps, cfg.collapse_steps,
                        math.log(vocab_size) if objective.token_cross_entropy else None)
    run_dir = log.run_dir
    ctx = StepContext(model, stage, stage_index, state.step, cfg.steps,
                      alert=lambda sev, kind, msg: log.alert(state.step, sev, kind, msg),
                      plan=plan, objective=objective, pad_id=pad_id, accelerator=accelerator,
                      validation=plan.validation, grad_accum=cfg.grad_accum, run_dir=run_dir)
    for p in plugins:
        p.before_stage(ctx)
    batches = plan.iterate(state.position)
    progress = Progress(cfg.steps, stage, state.step, enabled=show_progress and accelerator.is_main_process)
    model.train()
    window_tokens, window_t0 = 0, time.time()
    while state.step < cfg.steps:
        ctx.signals.clear()  # signals live one step: a reader before its publisher fails, never reads a stale value
        lr = _set_rates(optimizer, plugins, ctx, cfg, state.step)
        loss_sum, extra_metrics, step_tokens = 0.0, {}, 0
        for micro in range(cfg.grad_accum):
            indices, state.position = next(batches)
            items = [plan.items[i] for i in indices[rank::world]]  # the plan is global; each process takes its slice
            for p in plugins:
                items = p.transform_items(ctx, items)
            pieces = [{k: v.to(accelerator.device) if torch.is_tensor(v) else v
                       for k, v in objective.collate(piece, pad_id).items()}
                      for piece in token_pieces(items, cfg.max_batch_tokens)]
            step_tokens += sum(int(b["attention_mask"].sum()) for b in pieces)  # this process's; summed below
            share, fractions = _piece_weights(accelerator, objective, pieces)
            for j, batch in enumerate(pieces):
                synced = micro == cfg.grad_accum - 1 and j == len(pieces) - 1  # DDP reduces once, at the last backward
                sync = accelerator.no_sync(model) if not synced and world > 1 else _null()
                with sync, accelerator.autocast(), uncast_lora_inputs(model):
                    loss, metrics = _micro_batch_loss(model, objective, plugins, ctx, batch, share, fractions[j])
                    accelerator.backward(loss / cfg.grad_accum)
                loss_sum += float(loss.detach()) / cfg.grad_accum
                for k, v in metrics.items():
                    extra_metrics[k] = extra_metrics.get(k, 0.0) + float(v) * fractions[j] / cfg.grad_accum
        grad_norm = _clipped_grad_norm(accelerator, optimizer, cfg.max_grad_norm)
        if world > 1:  # before the step: every process skips a bad step alike, and plugins (neuromodulation,
            # early stop) see and decide alike everywhere
            loss_sum, extra_metrics, step_tokens = _over_processes(accelerator, loss_sum, extra_metrics, step_tokens)
        verdict = health.judge(state.health, loss_sum, grad_norm)
        applied_lr = _applied_lr(optimizer, lr)
        if verdict.apply:  # (DeepSpeed steps inside accelerator.backward: there a bad step is only counted)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        grad_norm = float("nan") if grad_norm is None else grad_norm
        window_tokens += step_tokens
        state.step += 1
        ctx.step = state.step
        for severity, kind, message in verdict.alerts:
            ctx.alert(severity, kind, message)
            if accelerator.is_main_process:
                print(f"[{severity}] {kind} at step {state.step} of stage {stage!r}: {message}", file=sys.stderr,
                      flush=True)
        numbers = {"step": state.step, "global_step": global_step + state.step, "stage": stage, "loss": loss_sum,
                   "lr": applied_lr, "grad_norm": grad_norm, **extra_metrics,
                   **({"skipped_steps": state.health.skipped} if state.health.skipped else {})}
        record = None
        if state.step % cfg.log_every == 0 or state.step == cfg.steps or ctx.stop or not verdict.apply:
            elapsed = time.time() - window_t0
            state.tokens += window_tokens
            state.seconds += elapsed
            record = {**numbers, "tokens_per_s": window_tokens / max(elapsed, 1e-9), "epoch": state.position.epoch}
            if verdict.apply:  # a skipped step's NaN would poison plugin state (neuromodulation's running means)
                for p in plugins:
                    record.update(p.after_step(ctx, record) or {})
            log.log(record)
            window_tokens, window_t0 = 0, time.time()
        elif verdict.apply:  # plugins see every step's numbers; only log steps are written
            for p in plugins:
                p.after_step(ctx, numbers)
        progress.update(state.step, record)
        health.stop_if_diverged(state.health, state.step, stage, run_dir / CHECKPOINTS if run_dir else None)
        if ctx.stop:
            state.stopped_early = True
            break
        # not while steps are being skipped: the newest checkpoint stays the last good one; no callback:
        # the unit is saved only when it is done (a chunk of a skill stream)
        if checkpoint is not None and state.step % cfg.checkpoint_every == 0 and state.step < cfg.steps \
                and state.health.bad_in_row == 0:
            checkpoint(state)
    progress.close()
    for p in plugins:
        p.after_stage(ctx)
    return state


def _set_rates(optimizer, plugins: list[Plugin], ctx: StepContext, cfg: TrainConfig, step: int) -> float:
    """The schedule's rate scaled by the plugins (neuromodulation), then each group's own (per-expert
    phases); returns the scaled rate."""
    lr = cfg.lr * lr_factor(step, cfg)
    for p in plugins:
        lr *= p.lr_scale(ctx)
    for group in optimizer.param_groups:
        group_lr = lr
        for p in plugins:
            group_lr = p.group_lr(ctx, group, group_lr)
        group["lr"] = group_lr
    return lr


def _piece_weights(accelerator, objective: Objective, pieces: list[dict]) -> tuple[float, list[float]]:
    """(this process's share of the global batch's loss weight, each piece's fraction of this process's).

    Several processes: each loss is weighted by its process's share of what it averages over (tokens
    for lm/sft), so the averaged gradient is that of the global batch as one process has it. Several
    pieces (train.max_batch_tokens): each piece's mean loss is weighted by its fraction of the
    micro-batch's weight, so their sum is the micro-batch's mean loss."""
    if accelerator.num_processes == 1 and len(pieces) == 1:
        return 1.0, [1.0]
    weights = [objective.loss_weight(b) for b in pieces]
    if None in weights:  # every process's loss counts alike (such an objective is never cut: stages.check_batch_cap)
        return 1.0, [1.0]
    total = sum(weights)
    share = _share(accelerator, total) if accelerator.num_processes > 1 else 1.0
    return share, [w / total for w in weights]  # one piece: w / w, exactly 1.0


def _micro_batch_loss(model, objective: Objective, plugins: list[Plugin], ctx: StepContext, batch: dict,
                      share: float, fraction: float) -> tuple[torch.Tensor, dict]:
    """The objective's loss plus the plugins' terms (EWC...), and the metrics of both: the objective's
    loss weighted by `share` x `fraction`, the plugins' (the same on every process) by `fraction`."""
    loss, metrics, outputs = objective(model, batch)
    loss = loss * (share * fraction) if share * fraction != 1.0 else loss
    for p in plugins:
        term = p.loss_term(ctx, batch, outputs)
        if term is not None:
            metrics[f"{p.name}/loss"] = float(term.detach())
            loss = loss + (term * fraction if fraction != 1.0 else term)
    return loss, metrics


def _clipped_grad_norm(accelerator, optimizer, max_grad_norm: float | None) -> float | None:
    """The global gradient norm (before clipping to `max_grad_norm`); None where DeepSpeed reports none."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if accelerator.is_fsdp2:
        # torch's clip is DTensor-aware (the norm over every process's shards); accelerate's FSDP branch
        # compares this list with model.parameters() tensor by tensor, which raises where every parameter
        # trains in another order (lora: null), and otherwise calls this same function
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    else:
        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm) if max_grad_norm else \
            torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    return None if grad_norm is None else float(grad_norm)


def _applied_lr(optimizer, scheduled: float) -> float:
    """The rate the optimizer applies to what trains (per-expert rates differ from the schedule's)."""
    applied = [g["lr"] for g in optimizer.param_groups if any(p.grad is not None for p in g["params"])]
    return max(applied) if applied else scheduled


def _share(accelerator, n: int) -> float:
    total = accelerator.reduce(torch.tensor([float(n)], dtype=torch.float64, device=accelerator.device), reduction="sum")
    return n * accelerator.num_processes / max(float(total), 1.0)


def _over_processes(accelerator, loss: float, metrics: dict, tokens: int) -> tuple[float, dict, int]:
    """One all-reduce: loss and metrics averaged over processes (as DDP averages the gradients; with the
    share weighting the loss is the global batch's), tokens summed."""
    keys = sorted(metrics)
    local = torch.tensor([loss, *(metrics[k] for k in keys), tokens], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum").tolist()
    world = accelerator.num_processes
    return total[0] / world, {k: v / world for k, v in zip(keys, total[1:-1])}, int(total[-1])


class _null:
    def __enter__(self): return self
    def __exit__(self, *a): return False
