"""A recipe with `experts:` set: its stages are skills, learned as ONE unlabelled stream of chunks.

The harness knows the skills (to cut the stream, to score the accuracy matrix at the true skill
boundaries, and to measure routing); the learner does not: for each chunk, `Lifecycle.decide`
compares the chunk's signal with the expert profiles and the router's entropy, and the chunk
trains the expert it picks. Novel chunks are held back (not trained) until novelty has lasted
`novelty.window` chunks, so the first chunks of a new skill train the new expert, not the old one.

Evaluation is task-agnostic (the router picks experts per input, with the hybrid policy); at the
end every task is also scored with the oracle choice (the expert that trained most of its skill's
chunks) for comparison. The chunks are the run's units for the one driver (skillstream/driver.py):
checkpoints are written after every chunk, and a resumed run restarts the chunk that was interrupted
from that checkpoint's exact state (weights, optimizer, router, its memory and Adam state, profiles,
novelty streak, RNG).
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..continual.metrics import summarize
from ..data.batching import BatchPlan
from ..data.examples import load_examples, skipped_rows
from ..engine import StageState, train_stage
from ..errors import UserError
from ..evaluation.intervals import wilson
from ..evaluation.memo import EvalMemo, adds_nothing
from ..evaluation.runner import evaluate_examples
from ..evaluation.validation import validation_scores, validation_tasks
from ..files import write_atomic
from ..monitor.progress import Progress
from ..run_files import EXPERTS, protocol_summaries, remembered
from ..driver import RunPlan, UnitSaver
from ..run_state import DECISIONS, SKILL_STREAM, Restored, RunSetup, RunState, StreamState
from .dense import MixtureObjective, synced_router_grads
from .lifecycle import Lifecycle, chunk_steps, expert_groups
from .routed import FeatureCache, routed
from .row_memo import RowMemo

ROUTER_DIR = "router"


@dataclass
class Chunk:
    index: int
    skill: int          # the true skill: measurement only, never shown to the learner
    examples: list
    items: list


def make_chunks(stages, cfg) -> list[Chunk]:
    """Each skill's examples in a seeded order, cut into chunks of `experts.chunk_size`, skills in order.
    The examples and their tokenized items are the ones the stages were prepared with."""
    size = min(cfg.experts.chunk_size, 4) if cfg.smoke else cfg.experts.chunk_size
    chunks = []
    for si, st in enumerate(stages):
        if not st.examples:
            raise UserError(f"stage {st.name!r}: the skill has no training examples (an empty chunk of the stream)")
        order = list(range(len(st.examples)))
        random.Random(f"{cfg.seed}:stream:{st.name}").shuffle(order)
        for start in range(0, len(order), size):
            part = order[start:start + size]
            chunks.append(Chunk(len(chunks), si, [st.examples[i] for i in part], [st.items[i] for i in part]))
    return chunks


def check_stream_recipe(cfg, stages, eval_tasks) -> None:
    """Input checks before the run directory exists."""
    if cfg.lora is None:
        raise UserError("experts: needs lora settings (each expert is a LoRA adapter)")
    if cfg.lora.per_stage:
        raise UserError("experts: lora.per_stage and experts are two ways to make experts: choose one")
    possible = [f"{cfg.experts.prefix}{i}" for i in range(cfg.experts.max_experts)]
    for t in eval_tasks:
        if t.expert is not None and t.expert not in possible:
            raise UserError(f"data.eval[{t.name}].expert: unknown expert {t.expert!r} "
                            f"(experts are named {possible[0]} .. {possible[-1]})")
    for st in cfg.resolved_stages():
        if not st.data.train:
            raise UserError(f"stage {st.name!r}: data.train is empty (an empty chunk of the stream)")


def _eval_row(life: Lifecycle, tok, renderer, tasks, cfg, forced: dict[str, str] | None = None,
              memo: EvalMemo | None = None, features: FeatureCache | None = None,
              row_memo: RowMemo | None = None) -> list[dict]:
    rows = []
    names = life.pool.names
    policy = cfg.experts.router
    # before any expert trains, every one is a zero update: the backbone answers whatever the router
    # chooses, so the row is the plain model's, and the memo can hold it (bench/cl_stream's methods
    # all score that backbone)
    plain = memo is not None and adds_nothing(life.model)
    for t in tasks:
        expert = (forced or {}).get(t.name) or t.expert
        if expert is not None and expert not in names:
            rows.append({"score": None, "metric": t.metric, "error": f"expert {expert!r} was never created"})
            continue
        if plain:
            rows.append(evaluate_examples(life.model, tok, renderer, t.examples, t.metric, cfg.data.eval_batch_size,
                                          t.max_new_tokens, also=t.also, memo=memo))
            continue
        if row_memo is not None and expert is None:
            again = row_memo.lookup(t.name, life.model, life.router, names, life.maturities(), policy.maturity_threshold,
                                    policy.top_k)
            if again is not None:
                rows.append(again)
                continue
        with routed(life.model, life.router, names, life.maturities(), threshold=policy.maturity_threshold,
                    top_k=policy.top_k, expert=expert, features=features) as routing:
            # t.also: e.g. option scoring beside generative exact match, routed the same way
            row = evaluate_examples(life.model, tok, renderer, t.examples, t.metric, cfg.data.eval_batch_size,
                                    t.max_new_tokens, also=t.also)
        top = Counter(routing.top())
        row["routed_to"] = {n: top[n] / max(1, sum(top.values())) for n in names if top[n]}
        weights = {tuple(w) for w in routing.choices}
        if len(weights) == 1 and sorted(w := weights.pop()) == [0.0] * (len(w) - 1) + [1.0]:
            row["served_by"] = names[w.index(1.0)]  # every input by this one expert alone (weight exactly 1)
        if expert is not None:
            row["expert"] = expert
        elif row_memo is not None:
            row_memo.remember(t.name, life.model, routing.features, row)
        rows.append(row)
    return rows


def routing_examples(task, n: int) -> list:
    """Up to n held-out prompts of the task's split: its evaluation examples first, then more of the split."""
    if n == 0 or task.source is None:
        return task.examples
    if n <= len(task.examples):
        return task.examples[:n]
    return load_examples(task.source.model_copy(update={"limit": n}))


def _routing_accuracy(life: Lifecycle, tasks, skill_expert: dict[int, str], n_examples: int) -> dict:
    per_task, hits, total = {}, 0, 0
    for j, t in enumerate(tasks):
        if j not in skill_expert:
            continue
        with torch.no_grad():
            probs = life.router.probs(life.prompt_features(routing_examples(t, n_examples)).cpu())
        chosen = [life.pool.names[i] for i in probs.argmax(-1).tolist()]
        outcomes = [float(c == skill_expert[j]) for c in chosen]  # kept: they pair runs (report/paired.py)
        ok = int(sum(outcomes))
        per_task[t.name] = {"accuracy": ok / len(chosen), "expert": skill_expert[j], "n": len(chosen),
                            "ci95": wilson(ok, len(chosen)), "outcomes": outcomes}
        hits, total = hits + ok, total + len(chosen)
    return {"task_agnostic_accuracy": hits / max(total, 1), "n": total, "ci95": wilson(hits, total), "per_task": per_task}


class StreamPlan(RunPlan):
    """A skill stream's units are its chunks. For each, the learner decides where it goes (held back,
    or an expert, made new if novel), and the chunk trains that expert through the engine; the matrix
    row is scored at the true end of each skill. One optimizer lives through the stream (each expert's
    groups join it when the expert is made). A chunk is saved when it is done, not inside: its decision
    changes the lifecycle before it trains, and a chunk is a few steps.

    With several processes every process computes the same decision from the same chunk and the same
    (DDP-synchronised) weights, and each chunk's decision is compared across processes: a difference
    stops the run rather than letting processes train different experts."""
    kind = SKILL_STREAM

    def __init__(self, setup: RunSetup):
        super().__init__(setup)
        cfg = setup.cfg
        self.chunks = make_chunks(setup.stages, cfg)
        self.life = Lifecycle(setup.model, setup.tok, setup.renderer, cfg.experts, seed=cfg.seed,
                              max_length=cfg.data.max_length)
        self.train_cfg, self.objective = setup.stages[0].train_cfg, setup.stages[0].objective
        self.dense = cfg.experts.training == "dense_to_sparse"
        self.last_of_skill = {c.skill: c.index for c in self.chunks}
        self.optimizer: torch.optim.Optimizer | None = None  # built once the experts exist (after a restore)
        self.progress: Progress | None = None
        self.started = time.time()
        # the router's features of each evaluation batch, read once: every row scores the same batches
        self.router_features = FeatureCache() if cfg.model.freeze_backbone else None
        # a task that the same unchanged expert would answer alone again is not scored again (row_memo.py)
        self.row_memo = RowMemo() if cfg.model.freeze_backbone else None

    @property
    def n_units(self) -> int:
        return len(self.chunks)

    def unit_name(self, index: int) -> str:
        return f"chunk_{index:04d}"

    def keep_checkpoints(self, index: int) -> int:
        return self.train_cfg.keep_checkpoints

    def fresh_state(self) -> RunState:
        return RunState(SKILL_STREAM, {"initial": None, "rows": [], "details": []}, stage_index=-1, stage_done=True,
                        processes=self.setup.accelerator.num_processes, stream=StreamState())

    def restore(self, restored: Restored) -> None:
        self.life.load_state_dict(restored.run.lifecycle)
        restored.load_weights(self.saved_weights())
        restored.load_optimizer(self.expert_optimizer())

    def resume_message(self, run: RunState) -> str:
        return f"after chunk {run.stage_index + 1} of {len(self.chunks)}"

    def expert_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            t = self.train_cfg
            groups = [g for name in self.life.pool.names for g in expert_groups(self.life.pool, name, t.weight_decay)]
            self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas)
            self._sync_router_group()
        return self.optimizer

    def _sync_router_group(self) -> None:
        """dense_to_sparse: the router's parameters are the optimizer's last group (the task loss moves
        them with the experts). A new expert, a merge or a prune replaces the router's head: its group
        (and Adam state) is then rebuilt, last, as a resumed run builds it."""
        if not self.dense:
            return
        optimizer, params = self.optimizer, list(self.life.router.parameters())
        old = [g for g in optimizer.param_groups if g.get("router")]
        if len(old) == 1 and old[0] is optimizer.param_groups[-1] and len(old[0]["params"]) == len(params) \
                and all(a is b for a, b in zip(old[0]["params"], params)):
            return
        for g in old:
            for param in g["params"]:
                optimizer.state.pop(param, None)
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if not g.get("router")]
        t = self.train_cfg
        optimizer.add_param_group({"params": params, "weight_decay": 0.0, "router": True,
                                   "lr": self.setup.cfg.experts.router.mixture_lr, "betas": t.betas})

    def saved_weights(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.setup.model.named_parameters() if "lora_" in n}

    def saved_parts(self, run: RunState, index: int) -> dict[str, torch.nn.Parameter]:
        run.lifecycle = self.life.state_dict()
        return self.saved_weights()

    def score_before(self, run: RunState) -> None:
        s = self.setup
        run.results["initial"] = _eval_row(self.life, s.tok, s.renderer, s.eval_tasks, s.cfg,
                                           memo=EvalMemo(s.cfg.data.eval_cache), features=self.router_features)

    def train_unit(self, run: RunState, index: int, mid_unit: Restored | None) -> tuple[StageState, UnitSaver]:
        s = self.setup
        if self.progress is None:
            self.progress = Progress(len(self.chunks), "skill stream", index,
                                     enabled=s.show_progress and s.accelerator.is_main_process)
        record, state = self._learn_chunk(self.chunks[index], run.stream)
        if s.accelerator.is_main_process:
            with (s.run_dir / DECISIONS).open("a") as f:
                f.write(json.dumps(record) + "\n")
        s.log.decision(record, len(self.life.pool))
        # a held-back chunk trained nothing: the line shows the last expert's rate
        schedule = self.life.schedule
        last_lr = schedule.rate(schedule.current) if schedule.current else 0.0
        self.progress.update(index + 1, {"loss": schedule.last_loss, "lr": record.get("lr") or last_lr,
                                         "tokens_per_s": schedule.tokens_per_s})
        return state, UnitSaver(self, run, index, self.expert_optimizer())

    def score_unit(self, run: RunState, index: int, state: StageState) -> None:
        chunk = self.chunks[index]
        s = self.setup
        if self.last_of_skill[chunk.skill] != chunk.index:
            return  # the harness scores the matrix at the true skill boundaries only
        if s.cfg.experts.score == "end" and chunk.index != len(self.chunks) - 1:
            return
        row = _eval_row(self.life, s.tok, s.renderer, s.eval_tasks, s.cfg, features=self.router_features,
                        row_memo=self.row_memo)
        run.results["details"].append(row)
        run.results["last_row_step"] = run.stream.global_step
        run.results["rows"].append([r["score"] for r in row])

    def finish(self, run: RunState) -> dict:
        s = self.setup
        if self.progress is not None:
            self.progress.close()
        if s.cfg.data.validation_eval:  # held-out training examples, routed as the test tasks are (what sweeps select on)
            tasks = validation_tasks(s.stages, s.eval_tasks)
            # no row memo: it keys rows by task name, and a validation task has its test task's name
            run.results["validation"] = validation_scores(
                tasks, _eval_row(self.life, s.tok, s.renderer, tasks, s.cfg, features=self.router_features))
        final = _finish_stream(s.cfg, s.run_dir, self.life, s.tok, s.renderer, s.stages, s.eval_tasks, self.chunks,
                               run, time.time() - self.started, s.accelerator.is_main_process)
        s.accelerator.wait_for_everyone()
        return final

    def _learn_chunk(self, chunk: Chunk, stream: StreamState) -> tuple[dict, StageState]:
        """The learner decides where the chunk goes; it is held back, or trains its expert (with the chunks
        held back before it). Returns the decision record, also appended to `stream.decisions`, and where
        the last training ended."""
        setup, life, chunks, t = self.setup, self.life, self.chunks, self.train_cfg
        record, signal, features = life.decide(chunk.examples)
        _same_on_every_process(setup.accelerator, record, chunk.index)
        shares = life.routed_shares(features)  # before the chunk trains anything: where the router sends it
        record.update(skill=setup.stages[chunk.skill].name, examples=len(chunk.examples))  # logged, not used
        state = StageState()
        novel_wait = record["decision"] == "wait" and record["streak"] > 0
        if novel_wait and chunk.index != len(chunks) - 1:
            # held back until novelty lasts a window; its signal decides later where it goes
            sig_tensors, sig_meta = signal.state()
            stream.pending.append({"chunk": chunk.index, "signal": sig_tensors, "signal_meta": sig_meta,
                                   "features": features, "best": record["best"], "best_sim": record["similarity"]})
            record["trained"] = None
        else:
            optimizer = self.expert_optimizer()
            if life.adopt(record, stream.global_step):
                for g in expert_groups(life.pool, record["expert"], t.weight_decay):
                    optimizer.add_param_group({**g, "lr": t.lr, "betas": t.betas})
            name = record["expert"]
            plan = assign_held_chunks(life, record, signal, stream.pending)
            plan.setdefault(name, []).append((chunk.index, signal, features))
            stream.pending = []
            for target in sorted(plan, key=lambda n: n == name):  # the decided expert trains last
                batch = [chunks[i] for i, _, _ in plan[target]]
                feats = torch.cat([f for _, _, f in plan[target]])
                if self.dense:  # the router learns where the chunk goes first, then trains through the mixture
                    router_loss = life.route_chunk(target, feats)
                state = self._train_expert(target, batch, stream.global_step)
                _count_by_skill(stream, batch, target, state.step, state.seconds, state.tokens)
                loss = life.learn_chunk(target, [sg for _, sg, _ in plan[target]], feats, state.step,
                                        stream.global_step, router=not self.dense)
                router_loss = router_loss if self.dense else loss
                stream.global_step += state.step
            record.update(trained=name, chunks_trained=[i for i, _, _ in plan[name]], steps=state.step,
                          seconds=round(state.seconds, 2), router_loss=router_loss, lr=life.schedule.rate(name),
                          reassigned={str(i): other for other in plan if other != name for i, _, _ in plan[other]})
        if life.rounds:  # held-out losses and maturity of the experts that trained, the decision's outcome
            record["validation"] = life.rounds
        self._maintain(record, stream, shares)
        stream.decisions.append(record)
        # which expert the router gives how much of the stream: the monitor and the report read these
        setup.log.tagged(stage_index=chunk.index).log(
            {"stage": self.unit_name(chunk.index), "step": record.get("steps") or 0, "global_step": stream.global_step,
             **{f"router/share/{n}": v for n, v in shares.items()},
             **({"router/entropy": record["entropy"]} if record.get("entropy") is not None else {}),
             **({"novelty/brier": brier} if (brier := life.reuse_brier()) is not None else {})})
        return record, state

    def _maintain(self, record: dict, stream: StreamState, shares: dict[str, float]) -> None:
        """Merge and prune (Lifecycle.maintain), then the optimizer follows the pool: the groups of
        removed experts leave it, a merged expert's join it; the skills' assignments follow merges."""
        trained = [record["trained"]] + list(dict.fromkeys(record.get("reassigned", {}).values())) \
            if record.get("trained") else []
        events = self.life.maintain(shares, trained, stream.global_step)
        if self.life.merge_checks:
            record["merge_checks"] = self.life.merge_checks
        if not events:
            return
        record["lifecycle"] = events
        optimizer, t, names = self.expert_optimizer(), self.train_cfg, set(self.life.pool.names)
        gone = [g for g in optimizer.param_groups if "expert" in g and g["expert"] not in names]
        for group in gone:
            for param in group["params"]:
                optimizer.state.pop(param, None)
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if not any(g is x for x in gone)]
        grouped = {g["expert"] for g in optimizer.param_groups}
        for name in self.life.pool.names:
            if name not in grouped:
                for g in expert_groups(self.life.pool, name, t.weight_decay):
                    optimizer.add_param_group({**g, "lr": t.lr, "betas": t.betas})
        self._sync_router_group()  # the merge or prune replaced the router's head
        for event in events:
            if "into" in event:
                for experts in stream.assignments.values():
                    experts[:] = [event["into"] if e in event["merge"] else e for e in experts]

    def _train_expert(self, name: str, batch: list[Chunk], global_step: int) -> StageState:
        """The named expert alone trains (PEFT's own single-adapter path) on the chunks' examples, through
        the engine like a stage (with several processes, the model is wrapped for these steps).
        dense_to_sparse: every expert and the router train through the router's mixture instead, the
        named expert's steps counted (experts/dense.py)."""
        setup, life, cfg = self.setup, self.life, self.setup.cfg
        accelerator = setup.accelerator
        life.model.set_adapter(name)
        life.pool.set_trainable(life.pool.names if self.dense else [name])
        life.schedule.current = name
        objective = self.objective
        if self.dense:
            r = cfg.experts.router
            objective = MixtureObjective(self.objective, life.model, life.router, life.pool.names, life.maturities(),
                                         threshold=r.maturity_threshold, top_k=r.top_k, balance=cfg.experts.load_balance,
                                         eos_id=setup.tok.eos_token_id)
            self._sync_router_group()
        items = life.begin_round(name, [(c.index, c.items) for c in batch])  # a few held out with validation on
        world = accelerator.num_processes
        st_cfg = life_stage_cfg(cfg, self.train_cfg, len(items), world)
        # planned at the global batch and sliced per process in the engine, as a stage's plan is
        plan = BatchPlan([items], [1.0], st_cfg.batch_size * world, cfg.seed + batch[-1].index,
                         length_grouped=st_cfg.batching == "length_grouped")
        model, optimizer = setup.model, self.expert_optimizer()
        if accelerator.num_processes > 1:
            model, optimizer = accelerator.prepare(model, optimizer)
        with synced_router_grads(life.router, accelerator) if self.dense else nullcontext():
            state = train_stage(accelerator=accelerator, model=model, optimizer=optimizer, objective=objective,
                                plan=plan, cfg=st_cfg, stage=self.unit_name(batch[-1].index), stage_index=batch[-1].index,
                                state=StageState(), plugins=[life.schedule, *setup.plugins],  # its state rides in the lifecycle's
                                log=setup.log.tagged(stage_index=batch[-1].index), pad_id=setup.tok.pad_token_id,
                                checkpoint=None, show_progress=False, vocab_size=len(setup.tok), global_step=global_step)
        if accelerator.num_processes > 1:
            setup.model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        life.end_round(name)
        return state


def _same_on_every_process(accelerator, record: dict, chunk: int) -> None:
    """Every process decided the chunk alike (same inputs, same weights); a difference would train
    different experts on different processes, so it stops the run."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object
    seen = gather_object([(record["decision"], record["expert"])])
    if len(set(seen)) > 1:
        raise RuntimeError(f"chunk {chunk}: the processes decided differently ({seen}); "
                           "the skill stream needs identical hardware on every process")


def _count_by_skill(stream: StreamState, batch: list[Chunk], target: str, steps: int, seconds: float,
                    tokens: int) -> None:
    """Time and tokens by the true skill of the chunks an expert trained on (measurement only)."""
    for c in batch:
        stats = stream.skill_stats.setdefault(str(c.skill), {"steps": 0, "seconds": 0.0, "tokens": 0})
        share = len(c.items) / sum(len(b.items) for b in batch)
        stats["steps"] += steps * share
        stats["seconds"] += seconds * share
        stats["tokens"] += round(tokens * share)
        stream.assignments.setdefault(str(c.skill), []).append(target)


def assign_held_chunks(life: Lifecycle, record: dict, signal, held: list[dict]) -> dict[str, list]:
    """Where the held-back chunks go once a decision is taken: {expert: [(chunk, signal, features)]}.

    On "create", a held chunk joins the new expert if it is at least as close to the chunk that
    confirmed the novelty as it was to its best old expert (chunks of the new skill), else its best
    old expert (one odd chunk of an old skill is not a skill). When the novelty did not last, each
    held chunk goes to the expert it was closest to.
    """
    from .signals import TaskSignal, similarity

    plan: dict[str, list] = {}
    for h in held:
        sig = TaskSignal.from_state(h["signal"], h["signal_meta"])
        target = h["best"] or record["expert"]
        if record["decision"] == "create" and similarity(sig, signal, life.weights) >= (h["best_sim"] or 0.0):
            target = record["expert"]
        plan.setdefault(target, []).append((h["chunk"], sig, h["features"]))
    return plan


def life_stage_cfg(cfg, t, n_items: int, processes: int = 1):
    """A chunk's train settings: the recipe's, for the steps its examples need at the global batch
    (per-process batch x processes x accumulation); rates come from ExpertLR."""
    steps = chunk_steps(n_items, cfg.experts.chunk_epochs, t.batch_size * processes * t.grad_accum)
    return t.model_copy(update={"steps": steps, "schedule": "constant", "warmup_steps": 0,
                                "log_every": min(t.log_every, steps)})


def _oracle_row(life, tok, renderer, tasks, cfg, oracle: dict[str, str], results: dict, step: int) -> list[dict]:
    """Every task answered by the expert trained on its skill. Where the last row's routing already gave
    every input of a task to that expert alone and nothing trained since, the forced evaluation is the
    same computation (the same one-hot weights through the same mixing), so that row is used again,
    marked "memo": true."""
    if not oracle:
        return []
    last = results["details"][-1] if results["details"] and results.get("last_row_step") == step else None
    same = {j for j, t in enumerate(tasks) if last and t.name in oracle and last[j].get("served_by") == oracle[t.name]}
    rest = [t for j, t in enumerate(tasks) if j not in same]
    scored = iter(_eval_row(life, tok, renderer, rest, cfg, forced=oracle))
    return [{**last[j], "expert": oracle[t.name], "memo": True} if j in same else next(scored)
            for j, t in enumerate(tasks)]


def _oracle_intervals(results: dict, oracle_row: list[dict]) -> dict:
    """The oracle's AvgAcc interval, and the routed AvgAcc minus the oracle's with its paired interval
    (the same examples, resampled together), where every row carries per-example outcomes."""
    from ..evaluation.intervals import row_difference

    if not oracle_row or not results["details"]:
        return {}
    # oracle minus routed, negated into routed minus oracle
    diff = row_difference(results["initial"], results["details"][-1], oracle_row)
    if diff is None:
        return {}
    gap = None if diff["ci95"] is None else [-diff["ci95"][1], -diff["ci95"][0]]
    return {"avg_acc_ci95": diff["b_ci95"], "routed_minus_oracle": {"ci95": gap, "excludes_zero": diff["excludes_zero"]}}


def _finish_stream(cfg, run_dir, life, tok, renderer, stages, eval_tasks, chunks, run: RunState, seconds, main) -> dict:
    results, stream, decisions = run.results, run.stream, run.stream.decisions
    # a skill is the stages of one name (a skill that comes back after another is a second stage of its
    # name); the expert trained on it: the one that trained most of its chunks (ties: the first)
    skill_stages = {st.name: [i for i, s in enumerate(stages) if s.name == st.name] for st in stages}
    skill_expert = {name: Counter(e for i in idx for e in stream.assignments.get(str(i), [])).most_common(1)[0][0]
                    for name, idx in skill_stages.items() if any(str(i) in stream.assignments for i in idx)}
    # the task each skill is measured by: the i-th task the i-th stage when there are as many, else the task of its name
    task_skill = ({j: st.name for j, st in enumerate(stages)} if len(eval_tasks) == len(stages)
                  else {j: t.name for j, t in enumerate(eval_tasks) if t.name in skill_stages})
    oracle = {eval_tasks[j].name: skill_expert[s] for j, s in task_skill.items() if s in skill_expert} \
        if cfg.experts.oracle else {}
    oracle_row = _oracle_row(life, tok, renderer, eval_tasks, cfg, oracle, results, stream.global_step)
    names = [t.name for t in eval_tasks]
    final = summarize(names, {t.name: r["metric"] for t, r in zip(eval_tasks, results["initial"])},
                      [r["score"] for r in results["initial"]], results["rows"], results["initial"], results["details"])
    routing = _routing_accuracy(life, eval_tasks, {j: skill_expert[s] for j, s in task_skill.items() if s in skill_expert},
                                cfg.experts.router.eval_examples)
    routing["policy"] = {"maturity_threshold": cfg.experts.router.maturity_threshold, "top_k": cfg.experts.router.top_k,
                         "maturity": dict(zip(life.pool.names, [round(float(m), 4) for m in life.maturities()]))}
    boundaries = [c.index for c in chunks if c.index and chunks[c.index - 1].skill != c.skill]
    created = [d["chunk"] for d in decisions if d["decision"] == "create"]
    oracle_scores = [r["score"] for r in oracle_row]
    oracle_ci = _oracle_intervals(results, oracle_row)
    final.update({
        "routing": routing,
        "oracle": {"experts": oracle, "scores": oracle_scores,
                   "avg_acc": sum(oracle_scores) / len(oracle_scores) if oracle_scores and None not in oracle_scores else None,
                   **oracle_ci, "details": oracle_row},
        "experts": life.pool.names, "experts_created": len(life.pool), "skills": len(skill_stages),
        "skill_expert": skill_expert,
        "novelty": {"true_boundaries": boundaries, "created_at": created[1:], "first_expert_at": created[:1],
                    "chunks": len(chunks), "decisions": dict(Counter(d["decision"] for d in decisions)),
                    "thresholds": {"similarity": cfg.experts.novelty.similarity_threshold,
                                   "entropy": cfg.experts.novelty.entropy_threshold, "window": cfg.experts.novelty.window,
                                   **({"spread_z": cfg.experts.novelty.spread_z, "min_spread": cfg.experts.novelty.min_spread,
                                       "per_expert": {e: round(life.novelty.threshold(e), 4) for e in life.pool.names}}
                                      if cfg.experts.novelty.spread_z is not None else {})},
                    **({"calibration": life.calibrator.calibration()} if life.calibrator is not None else {})},
        "initial_details": results["initial"], "details": results["details"],
        **({"validation": results["validation"]} if "validation" in results else {}),
        "lifecycle": [e for d in decisions for e in d.get("lifecycle", [])],  # merges and prunes, in order
        "stages": [{"name": st.name, "chunks": sum(c.skill == i for c in chunks),
                    "examples": sum(len(c.examples) for c in chunks if c.skill == i),
                    "truncated": st.truncated,  # every item of a stage is in one of its chunks
                    "untrainable": st.untrainable,
                    **{k: 0 for k in ("steps", "seconds", "tokens")}, **stream.skill_stats.get(str(i), {})}
                   for i, st in enumerate(stages)],
        "truncated": sum(st.truncated for st in stages),
        "untrainable": sum(st.untrainable for st in stages),
        "skipped_rows": skipped_rows(cfg),  # rows dropped under data.invalid_labels=skip, per file
        **protocol_summaries(names, results),
        "evaluations_remembered": remembered(results),
        "seconds": sum(v["seconds"] for v in stream.skill_stats.values()),  # training only
        "wall_seconds": seconds, "steps": stream.global_step})
    if main:
        life.pool.save(run_dir / EXPERTS)
        life.router.save(run_dir / ROUTER_DIR)
        from .signals import save_profiles
        save_profiles(run_dir / ROUTER_DIR, life.profiles)
        write_atomic(run_dir / "results.json", json.dumps(final, indent=1))
    return final
