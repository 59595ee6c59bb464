"""`train()`: a recipe end to end — validate, load data and model, score before training, run
every stage, score after each, checkpoint, save the adapters and results.json; or resume.

Everything that can be wrong with the user's input is checked before the run directory is
created, so a bad recipe or data file leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from . import checkpoint as ckpt
from .components import PLUGINS, build
from .config import RecipeConfig, load_recipe, recipe_to_yaml
from .data.batching import Position
from .data.render import Renderer
from .engine import StageState, build_optimizer, train_stage, trainable_parameters
from .step_health import StepCounts
from .errors import UserError
from .evaluation.runner import evaluate_examples
from .evaluation.memo import EvalMemo
from .evaluation.suite import evaluate_all
from .files import write_atomic
from .model_setup import attach_lora, backbone_options, bf16_enabled  # attach_lora is also imported from here by tests and benches
from .monitor.metrics_log import ALERTS, METRICS, MetricsLog, rewrite_jsonl
from .plugins import Plugin
from .run_files import finish_run
from .stages import PreparedStage, build_sources, prepare_stages


@dataclass
class Run:
    """A finished (or resumed-to-completion) run: its directory, config and results."""
    run_dir: Path
    config: RecipeConfig
    results: dict = field(default_factory=dict)

    def load(self):
        from .trained import load
        return load(self.run_dir)


# -- the run ---------------------------------------------------------------------------------------

def resolve_run_dir(cfg_name: str, out: str | Path | None) -> Path:
    return Path(out) if out else Path("runs") / cfg_name


def _shown(value: Any) -> str:
    """A config value as it would be typed after --set."""
    return value if isinstance(value, str) else json.dumps(value)


def _first_difference(saved: Any, new: Any, key: str = "") -> tuple[str, Any] | None:
    """(dotted key, saved value) of the first leaf where two config dumps differ."""
    if isinstance(saved, dict) and isinstance(new, dict):
        for k in [*saved, *(k for k in new if k not in saved)]:
            d = _first_difference(saved.get(k, "not set"), new.get(k, "not set"), f"{key}.{k}" if key else k)
            if d is not None:
                return d
        return None
    if isinstance(saved, list) and isinstance(new, list) and len(saved) == len(new):
        for i, (a, b) in enumerate(zip(saved, new)):
            d = _first_difference(a, b, f"{key}.{i}")
            if d is not None:
                return d
        return None
    return None if saved == new else (key, saved)


def check_run_dir(run_dir: Path, resume: bool, overrides: dict | None, smoke: bool = False) -> None:
    """--resume needs a run directory, and takes --set / --smoke only where they repeat its saved
    config (re-running the same command resumes); a new run needs an empty or new one."""
    from .run_lock import LOCK_FILE

    if resume:
        saved_file = run_dir / "config.yaml"
        if not saved_file.is_file():
            raise UserError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
        saved_raw = yaml.safe_load(saved_file.read_text())
        saved = load_recipe(saved_raw).model_dump(mode="json")
        # each one alone on the saved config, validated as load_recipe would (train.lr=5e-4 is a saved
        # 0.0005; model=tiny is a saved model.name tiny), so that a refusal names the key it is about
        changes = [(f"--set {k}={_shown(v)}", {k: v}, False) for k, v in (overrides or {}).items()]
        changes += [("--smoke", {}, True)] if smoke else []
        for flag, override, smoke_flag in changes:
            differs = _first_difference(saved, load_recipe(saved_raw, override, smoke_flag).model_dump(mode="json"))
            if differs is not None:
                raise UserError(f"--resume: {flag} changes the saved run ({differs[0]} is {_shown(differs[1])} "
                                f"in {saved_file}); drop it or start a new --out")
    elif run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):  # the lock is not the run's
        raise UserError(f"run directory {run_dir} already exists: pass --resume to continue it or --out for a new one")


def train(recipe: str | Path | dict = "quickstart", *, out: str | Path | None = None, resume: bool = False,
          smoke: bool = False, overrides: dict[str, Any] | None = None, show_progress: bool = True,
          plugins: list | None = None) -> Run:
    """Train a recipe and return the Run. `overrides` use dotted keys: {"train.lr": 1e-4, "model": "tiny"}."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed

    # Launched with several processes (accelerate launch / torchrun / --processes) this joins the
    # process group: gloo on a machine without CUDA (accelerate needs cpu=True to pick it there).
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    dist = PartialState(cpu=cpu)
    cfg = load_recipe(recipe, overrides, smoke)
    run_dir = resolve_run_dir(cfg.name, out)
    # One process at a time in a run directory, taken before the checks below so that of two runs
    # started together on one --out exactly one passes them. Rank 0 holds it for every rank (or the
    # `--processes` launcher does, see run_lock.HELD_BY_LAUNCHER); the kernel frees it if we die.
    from contextlib import nullcontext
    from .run_lock import run_lock
    with run_lock(run_dir) if dist.is_main_process else nullcontext():
        check_run_dir(run_dir, resume, overrides, smoke)
        if resume:
            cfg = load_recipe(yaml.safe_load((run_dir / "config.yaml").read_text()))
        from .init_from import check_init_from, copy_inherited_files, load_init_from
        cfg = check_init_from(cfg)  # a run to start from (stage: dpo after an sft run): same model, same LoRA

        from .models.backbone import load_backbone
        set_seed(cfg.seed)
        if cfg.lora is None and cfg.model.freeze_backbone:
            raise UserError("lora: null trains the model's own weights; set model.freeze_backbone: false too")
        model, tok = load_backbone(cfg.model.name, seed=cfg.seed, revision=cfg.model.revision, args=cfg.model.args,
                                   trust_remote_code=cfg.model.trust_remote_code, freeze=cfg.model.freeze_backbone,
                                   **backbone_options(cfg))
        renderer = Renderer(tok, cfg.data.max_length, cfg.data.system_prompt)
        context = {"tokenizer": tok, "renderer": renderer, "recipe": cfg}
        stages, eval_tasks = prepare_stages(cfg, renderer, context)
        plugins = [build(p, PLUGINS, "plugin", Plugin, **context) for p in cfg.plugins] + list(plugins or [])
        if cfg.experts is not None:
            from .experts.stream_run import check_stream_recipe
            check_stream_recipe(cfg, stages, eval_tasks, dist.num_processes)

        # Input is valid: from here on we write the run directory (the main process; every process has
        # checked it above before any of them writes).
        dist.wait_for_everyone()
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir = run_dir / ckpt.CHECKPOINTS
        if dist.is_main_process:
            ckpt.clean_temporaries(ckpt_dir)
            if not resume:
                write_atomic(run_dir / "config.yaml", recipe_to_yaml(cfg))
            copy_inherited_files(cfg, run_dir)  # init_from's files built by stages this run skips (pairs.jsonl)

        if cfg.lora is not None:
            model = attach_lora(model, cfg)
        model = load_init_from(model, cfg)
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        use_bf16 = bf16_enabled(cfg.train.bf16, device_type)
        from accelerate.state import AcceleratorState
        if AcceleratorState._shared_state and dist.num_processes == 1:
            # an Accelerator made earlier in this process (a TRL or transformers Trainer, say) left its
            # settings in accelerate's process-wide state, and a new one with another precision would
            # refuse to start; a single process owns no distributed setup that a reset could break
            AcceleratorState._reset_state(True)
        accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", log_with=cfg.report_to or None,
                                  project_dir=str(run_dir), cpu=cpu)
        if cpu and accelerator.is_main_process and any(os.environ.get(f"ACCELERATE_USE_{k}", "").lower() == "true"
                                                       for k in ("FSDP", "DEEPSPEED")):
            print("note: accelerate enables neither FSDP nor DeepSpeed on CPU: this runs as plain DDP (gloo)", flush=True)
        try:
            return _run(cfg, run_dir, ckpt_dir, model, tok, renderer, stages, eval_tasks, accelerator, resume,
                        plugins, show_progress)
        finally:
            accelerator.end_training()
            AcceleratorState._reset_state(True)  # the next train() in this process may pick other settings


def _run(cfg, run_dir, ckpt_dir, model, tok, renderer, stages, eval_tasks, accelerator, resume, plugins,
         show_progress) -> Run:
    model.to(accelerator.device)
    main = accelerator.is_main_process
    if accelerator.process_index > 0:  # its own dropout stream (the same seed would draw the same masks)
        torch.manual_seed(cfg.seed + accelerator.process_index)
    log = MetricsLog(run_dir, accelerator, enabled=main)
    if cfg.report_to and main:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
                for k, v in _flatten(cfg.model_dump(mode="json")).items()}
        accelerator.init_trackers("tb", config=flat)

    if cfg.experts is not None:  # DyLoRA-MoE: the stages are skills of one unlabelled stream
        from .experts.stream_run import run_skill_stream
        final = run_skill_stream(cfg, run_dir, ckpt_dir, model, tok, renderer, stages, eval_tasks, accelerator,
                                 resume, plugins, show_progress, log)
        return Run(run_dir, cfg, final)

    results = {"initial": None, "rows": [], "details": [], "stages": []}
    memo = EvalMemo(cfg.data.eval_cache)  # e.g. an old task's untouched expert is not scored twice
    start_stage, stage_state, seq, begun = 0, None, 0, set()
    latest = [c for c in [ckpt.newest_intact(ckpt_dir)] if c] if resume else []  # damaged ones skipped, named
    optimizer_state = None
    if latest:
        weights, optimizer_state, state = ckpt.load(latest[0], rank=accelerator.process_index)
        if state.get("processes", 1) != accelerator.num_processes:  # the global batch is part of the run
            raise UserError(f"--resume: {run_dir} was trained with {state.get('processes', 1)} process(es), "
                            f"not {accelerator.num_processes}: resume it with as many")
        results, seq = state["results"], state["seq"]
        for p in plugins:
            p.load_state_dict(state.get("plugins", {}).get(p.name, {}))
        start_stage = state["stage_index"] + (1 if state["stage_done"] else 0)
        objective = stages[state["stage_index"]].objective
        objective.load_state_dict(state.get("objective", {}))
        objective.begin_stage(model)
        begun.add(state["stage_index"])
        _load_trainables(_checkpoint_params(model, objective), weights)
        if not state["stage_done"]:
            s = state["stage_state"]
            stage_state = StageState(s["step"], Position(**s["position"]), s["tokens"], s["seconds"],
                                     health=StepCounts(**s.get("health", {})))
        done_stage, done_step = state["stage_index"], state["stage_state"]["step"]
        if main:  # drop log lines of steps the resumed run will redo
            rewrite_jsonl(run_dir / METRICS, lambda r: _before(r, stages, done_stage, done_step))
            rewrite_jsonl(run_dir / ALERTS, lambda r: True)
        print(f"resuming {run_dir} at stage {stages[min(start_stage, len(stages) - 1)].name!r} "
              f"step {stage_state.step if stage_state else 0}", flush=True)
    elif resume:
        print(f"resuming {run_dir}: no checkpoint yet, starting from the beginning", flush=True)

    if results["initial"] is None:
        t0 = time.time()
        results["initial"] = evaluate_all(model, tok, renderer, eval_tasks, cfg, memo)
        results["eval_seconds"] = time.time() - t0

    for si in range(start_stage, len(stages)):
        st = stages[si]
        if cfg.lora is not None and cfg.lora.per_stage:
            model.set_adapter(st.name)  # only this stage's expert trains
        state = stage_state if (si == start_stage and stage_state) else StageState()
        if st.data is not None and st.plan is None:
            build_sources(st, cfg, run_dir, model, tok, renderer, accelerator)
        if si not in begun:
            st.objective.begin_stage(model)
        optimizer = build_optimizer(list(_all_trainables(model, st.objective).values()), st.train_cfg)
        if optimizer_state is not None and si == start_stage and stage_state:
            optimizer.load_state_dict(optimizer_state)
        _check_sharding(accelerator, st.train_cfg)
        train_model, optimizer = accelerator.prepare(model, optimizer) if accelerator.num_processes > 1 \
            else (model, optimizer)

        def save(s: StageState, done: bool = False):
            nonlocal seq
            seq += 1
            # every process's RNG (LoRA dropout draws differ per process), so a resume is exact
            from accelerate.utils import gather_object
            rngs = gather_object([ckpt.rng_state()]) if accelerator.num_processes > 1 else None
            if main:
                ckpt.save(ckpt_dir, f"{seq:06d}", _checkpoint_params(model, st.objective), optimizer.state_dict(),
                          {"seq": seq, "stage_index": si, "stage": st.name, "stage_done": done,
                           "stage_state": {"step": s.step, "position": asdict(s.position), "tokens": s.tokens,
                                           "seconds": s.seconds, "health": asdict(s.health)},
                           "results": results, "plugins": {p.name: p.state_dict() for p in plugins},
                           "objective": st.objective.state_dict(), "processes": accelerator.num_processes},
                          keep=st.train_cfg.keep_checkpoints, rank_rng=rngs)
            accelerator.wait_for_everyone()

        if st.plan is not None and state.step < st.train_cfg.steps:
            if state.step == 0:
                _score_heldout(results, st, "before", model, tok, renderer, cfg)
            state = train_stage(accelerator=accelerator, model=train_model, optimizer=optimizer, objective=st.objective,
                                plan=st.plan, cfg=st.train_cfg, stage=st.name, stage_index=si, state=state,
                                plugins=plugins, log=log, pad_id=tok.pad_token_id, checkpoint=save,
                                show_progress=show_progress, vocab_size=len(tok),
                                global_step=sum(done["steps"] for done in results["stages"]))
        if accelerator.num_processes > 1:
            model = accelerator.unwrap_model(train_model, keep_fp32_wrapper=False)
        row = evaluate_all(model, tok, renderer, eval_tasks, cfg, memo)
        results["details"].append(row)
        results["rows"].append([r["score"] for r in row])
        heldout = _score_heldout(results, st, "after", model, tok, renderer, cfg)
        results["stages"].append({"name": st.name, "steps": state.step, "seconds": state.seconds,
                                  "tokens": state.tokens, "tokens_per_s": state.tokens / max(state.seconds, 1e-9),
                                  "examples": st.n_examples, "truncated": st.truncated,
                                  "stopped_early": state.stopped_early,
                                  **({"built": st.built} if st.built else {}),
                                  **({"heldout": heldout} if heldout else {})})
        save(state, done=True)

    final = finish_run(cfg, run_dir, model, eval_tasks, results) if main else {}
    accelerator.wait_for_everyone()
    return Run(run_dir, cfg, final)


def _score_heldout(results: dict, st: PreparedStage, when: str, model, tok, renderer, cfg) -> dict | None:
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


def _check_sharding(accelerator, train_cfg) -> None:
    """DeepSpeed / FSDP chosen by an `accelerate launch --config_file`. Neither was run here (no GPU;
    accelerate enables neither on CPU): see the README's "Multi-process and GPUs"."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("FSDP is not supported yet: checkpoints and experts/ are written from the main process's "
                        "parameters, which FSDP shards (use DDP, or DeepSpeed ZeRO-2)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if train_cfg.grad_accum != 1:  # accelerator.backward steps the DeepSpeed engine on every micro-batch
            raise UserError("DeepSpeed: set train.grad_accum to 1 (raise train.batch_size or processes instead)")
        # no dataloader goes through prepare(), so DeepSpeed is told the batch here (accelerate's own advice)
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=train_cfg.batch_size, gradient_accumulation_steps=1,
            gradient_clipping=train_cfg.max_grad_norm or 0.0)


def _before(record: dict, stages, done_stage: int, done_step: int) -> bool:
    names = [s.name for s in stages]
    idx = names.index(record["stage"]) if record.get("stage") in names else -1
    return idx < done_stage or (idx == done_stage and record.get("step", 0) <= done_step)


def _all_trainables(model, objective) -> dict[str, torch.nn.Parameter]:
    """The model's trainable parameters plus the objective's own (e.g. a PPO value head)."""
    extra = {f"objective.{k}": v for k, v in objective.extra_parameters().items()}
    return {**trainable_parameters(model), **extra}


def _checkpoint_params(model, objective) -> dict[str, torch.nn.Parameter]:
    """What a checkpoint holds: the trainables plus every adapter's weights (frozen experts too)."""
    return {**{n: p for n, p in model.named_parameters() if "lora_" in n}, **_all_trainables(model, objective)}


def _load_trainables(params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
    missing = set(params) - set(weights)
    if missing:
        raise UserError(f"checkpoint does not match the model: {len(missing)} trainable tensors missing (e.g. {sorted(missing)[0]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


