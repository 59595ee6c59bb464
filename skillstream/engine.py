"""The training loop: one stage of optimizer steps on Accelerate, with plugins and checkpoints.

Every decision is inline and on one screen (nanoGPT's loop): set the LR, accumulate micro-batches
under autocast, add plugin loss terms, clip, step, log, checkpoint. What differs between recipes
is the objective, the plugins and the batches, never this loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .config import TrainConfig
from .curriculum.schedules import lr_factor
from .data.batching import BatchPlan, Position
from .monitor.progress import Progress
from .plugins import Plugin, StepContext


@dataclass
class StageState:
    """Where a stage stands: saved in every checkpoint, restored on resume."""
    step: int = 0
    position: Position = None
    tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False

    def __post_init__(self):
        self.position = self.position or Position()


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def train_stage(*, accelerator, model, optimizer, objective, plan: BatchPlan, cfg: TrainConfig, stage: str,
                stage_index: int, state: StageState, plugins: list[Plugin], log, pad_id: int,
                checkpoint: Callable[[StageState], None], show_progress: bool = True) -> StageState:
    rank, world = accelerator.process_index, accelerator.num_processes
    ctx = StepContext(model, stage, stage_index, state.step, cfg.steps,
                      alert=lambda sev, kind, msg: log.alert(state.step, sev, kind, msg),
                      extras={"plan": plan, "objective": objective, "pad_id": pad_id, "accelerator": accelerator})
    for p in plugins:
        p.before_stage(ctx)
    batches = plan.iterate(state.position)
    progress = Progress(cfg.steps, stage, state.step, enabled=show_progress and accelerator.is_main_process)
    model.train()
    window_tokens, window_t0 = 0, time.time()
    while state.step < cfg.steps:
        lr = cfg.lr * lr_factor(state.step, cfg)
        for p in plugins:
            lr *= p.lr_scale(ctx)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, extra_metrics = 0.0, {}
        for micro in range(cfg.grad_accum):
            indices, state.position = next(batches)
            items = [plan.items[i] for i in indices[rank::world]]  # the plan is global; each process takes its slice
            for p in plugins:
                items = p.transform_items(ctx, items)
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v
                     for k, v in objective.collate(items, pad_id).items()}
            window_tokens += int(batch["attention_mask"].sum()) * world
            sync = accelerator.no_sync(model) if micro < cfg.grad_accum - 1 and world > 1 else _null()
            with sync, accelerator.autocast():
                loss, metrics, outputs = objective(model, batch)
                for p in plugins:
                    term = p.loss_term(ctx, batch, outputs)
                    if term is not None:
                        metrics[f"{p.name}/loss"] = float(term.detach())
                        loss = loss + term
                accelerator.backward(loss / cfg.grad_accum)
            loss_sum += float(loss.detach()) / cfg.grad_accum
            for k, v in metrics.items():
                extra_metrics[k] = extra_metrics.get(k, 0.0) + float(v) / cfg.grad_accum
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else \
            torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        ctx.step = state.step
        record = None
        if state.step % cfg.log_every == 0 or state.step == cfg.steps or ctx.stop:
            elapsed = time.time() - window_t0
            loss_avg = accelerator.reduce(torch.tensor(loss_sum), reduction="mean").item() if world > 1 else loss_sum
            state.tokens += window_tokens
            state.seconds += elapsed
            record = {"step": state.step, "stage": stage, "loss": loss_avg, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens_per_s": window_tokens / max(elapsed, 1e-9), "epoch": state.position.epoch, **extra_metrics}
            for p in plugins:
                record.update(p.after_step(ctx, record) or {})
            log.log(record)
            window_tokens, window_t0 = 0, time.time()
        else:  # plugins see every step's numbers; only log steps are written
            for p in plugins:
                p.after_step(ctx, {"step": state.step, "stage": stage, "loss": loss_sum, "lr": lr,
                                   "grad_norm": float(grad_norm), **extra_metrics})
        progress.update(state.step, record)
        if ctx.stop:
            state.stopped_early = True
            break
        if state.step % cfg.checkpoint_every == 0 and state.step < cfg.steps:
            checkpoint(state)
    progress.close()
    for p in plugins:
        p.after_stage(ctx)
    return state


class _null:
    def __enter__(self): return self
    def __exit__(self, *a): return False
