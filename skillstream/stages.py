"""Stages prepared before a run: objective, batch plan (with a held-out share) and data builders."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .components import BUILDERS, OBJECTIVES, build, resolve
from .config import RecipeConfig
from .data.batching import BatchPlan
from .data.examples import load_examples
from .data.render import Renderer
from .errors import UserError
from .evaluation.suite import EvalTask, prepare_eval_tasks
from .models.modes import eval_mode
from .objectives.base import Objective


@dataclass
class PreparedStage:
    name: str
    train_cfg: Any
    objective: Objective
    plan: BatchPlan | None
    truncated: int
    n_examples: int
    data: Any = None          # the stage's DataConfig: sources with `build` are made when the stage begins
    built: dict | None = None  # what the builders reported
    # every example the stage trains on (after the validation hold-out) and its tokenized item, in source
    # order: a skill stream cuts its chunks from these (nothing is read or tokenized twice)
    examples: list = field(default_factory=list)
    items: list = field(default_factory=list)
    untrainable: int = 0  # of the truncated, examples with no trainable token left: not trained on


def prepare_stages(cfg: RecipeConfig, renderer: Renderer, context: dict) -> tuple[list[PreparedStage], list[EvalTask]]:
    stages, eval_tasks = [], None
    for name, data_cfg, train_cfg, objective_cfg in cfg.resolved_stages():
        if train_cfg.steps and not data_cfg.train:
            raise UserError(f"stage {name!r}: data.train is empty but train.steps is {train_cfg.steps}")
        objective = build(objective_cfg, OBJECTIVES, "objective", Objective, **context)
        if any(src.build for src in data_cfg.train):  # made on the model as it is when the stage begins
            for src in data_cfg.train:
                if src.build:
                    resolve(src.build.name, BUILDERS, "builder")
                else:  # check the others now, before the run directory exists
                    [objective.tokenize(ex, renderer) for ex in load_examples(src)]
            stages.append(PreparedStage(name, train_cfg, objective, None, 0, 0, data_cfg))
        else:
            st = PreparedStage(name, train_cfg, objective, None, 0, 0)
            _plan(st, cfg, data_cfg, renderer)
            stages.append(st)
        if eval_tasks is None:
            eval_tasks = prepare_eval_tasks(cfg, data_cfg)  # the recipe's evaluation suite
    if cfg.data.validation_eval:
        from .evaluation.validation import check_validation
        check_validation(cfg)
    return stages, eval_tasks or []


def _plan(st: PreparedStage, cfg, data_cfg, renderer, root: Path | None = None) -> None:
    """The stage's training sources read, tokenized, stripped of untrainable items and planned, into `st`
    (its batch plan with the held-out validation share, truncated and untrainable counts, the examples it trains on
    and their items)."""
    objective = st.objective
    srcs = [src.model_copy(update={"source": str(root / src.source), "build": None}) if src.build and root else src
            for src in data_cfg.train]
    examples = [load_examples(src) for src in srcs]
    tokenized = [[objective.tokenize(ex, renderer) for ex in exs] for exs in examples]
    from accelerate import PartialState
    truncated = sum(t.truncated for src in tokenized for t in src)
    untrainable = 0
    for i, (src, exs, items) in enumerate(zip(data_cfg.train, examples, tokenized)):
        keep = [j for j, it in enumerate(items) if objective.trainable(it)]
        if len(keep) == len(items):
            continue
        if not keep:
            raise UserError(f"stage {st.name!r}: data.train source {src.source!r}: none of its {len(items)} examples has a "
                            f"trainable token within data.max_length {data_cfg.max_length}; raise data.max_length")
        dropped = len(items) - len(keep)
        untrainable += dropped
        if PartialState().is_main_process:
            print(f"stage {st.name!r}: data.train source {src.source!r}: {dropped} of {len(items)} examples have no "
                  f"trainable token within data.max_length {data_cfg.max_length} (the prompt fills it) and are not "
                  f"trained on; raise data.max_length to keep them", flush=True)
        examples[i], tokenized[i] = [exs[j] for j in keep], [items[j] for j in keep]
    # every stage's plan is made here, before the run (or, for built data, before the stage) trains
    check_batch_cap(st.train_cfg, objective, next((items for items in tokenized if items), []), renderer.tok.pad_token_id,
                    st.name)
    # the held-out share is cut from (source, example, item) triples, so the examples a skill stream cuts
    # its chunks from are the ones trained on, and the validation examples keep the source they came from
    triples = [[(src.source, ex, it) for ex, it in zip(exs, items)]
               for src, exs, items in zip(data_cfg.train, examples, tokenized)]
    kept, held = _hold_out(triples, data_cfg.validation_fraction, cfg.seed)
    sources = [[it for _, _, it in src] for src in kept]
    # Planned at the global batch (per-process batch x processes) and sliced per process in the
    # engine, so 1 process with batch 2B and 2 processes with batch B see the same batches.
    plan = BatchPlan(sources, [s.weight for s in data_cfg.train], st.train_cfg.batch_size * PartialState().num_processes,
                     cfg.seed,
                     length_grouped=st.train_cfg.batching == "length_grouped") if sources else None
    if plan is not None:
        plan.validation = [it for _, _, it in held]
        plan.validation_examples = [ex for _, ex, _ in held]  # validation_eval scores a task on its own source's
        plan.validation_sources = [source for source, _, _ in held]
    st.plan, st.truncated, st.untrainable, st.n_examples = plan, truncated, untrainable, sum(len(s) for s in sources)
    st.examples, st.items = [ex for src in kept for _, ex, _ in src], [it for src in kept for _, _, it in src]


def check_batch_cap(cfg, objective: Objective, items: list, pad_id: int, stage: str) -> None:
    """train.max_batch_tokens weights each piece of a batch by its share of the batch's loss weight (engine.py):
    refused for an objective that has none (None: its loss is not a mean over something countable, as DPO's pairs)."""
    if cfg.max_batch_tokens is not None and items and objective.loss_weight(objective.collate(items[:1], pad_id)) is None:
        raise UserError(f"stage {stage!r}: train.max_batch_tokens: objective {objective.name!r} does not say what its "
                        f"loss is a mean over (Objective.loss_weight), so its batches cannot be cut into pieces; "
                        f"leave it null")


def _hold_out(sources: list[list], fraction: float, seed: int) -> tuple[list[list], list]:
    """Split a seeded `fraction` of every source off as validation items."""
    if not fraction:
        return sources, []
    kept, held = [], []
    for i, items in enumerate(sources):
        order = list(range(len(items)))
        random.Random(f"{seed}:validation:{i}").shuffle(order)
        n = max(1, round(fraction * len(items))) if len(items) > 1 else 0
        cut = set(order[:n])
        held += [items[j] for j in sorted(cut)]
        kept.append([items[j] for j in range(len(items)) if j not in cut])
    return kept, held


def build_sources(st: PreparedStage, cfg, run_dir: Path, model, tok, renderer, accelerator) -> None:
    """Run the stage's data builders (once: a file already written is reused on resume), then plan."""
    built = {}
    for src in st.data.train:
        if not src.build:
            continue
        out = run_dir / src.source
        if out.is_file():
            print(f"stage {st.name!r}: using {out} (built earlier)", flush=True)
        elif accelerator.is_main_process:
            fn = resolve(src.build.name, BUILDERS, "builder")
            with eval_mode(model):
                built[src.source] = fn(out, model=model, tokenizer=tok, renderer=renderer, recipe=cfg,
                                       **dict(src.build.model_extra or {}))
            print(f"stage {st.name!r}: built {out}: {built[src.source]}", flush=True)
        accelerator.wait_for_everyone()
    _plan(st, cfg, st.data, renderer, run_dir)
    st.built = built or None
