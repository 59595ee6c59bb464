"""`train()`: a recipe end to end — validate, load data and model, score before training, run
every stage, score after each, checkpoint, save the adapters and results.json; or resume.

Everything that can be wrong with the user's input is checked before the run directory is
created, so a bad recipe or data file leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from . import checkpoint as ckpt
from .components import PLUGINS, build
from .config import RecipeConfig, load_recipe, recipe_to_yaml
from .data.render import Renderer
from .engine import StageState, build_optimizer, train_stage, trainable_parameters
from .errors import UserError
from .evaluation.runner import evaluate_examples
from .evaluation.memo import EvalMemo
from .evaluation.suite import evaluate_all
from .files import write_atomic
from .model_setup import attach_lora, backbone_options, bf16_enabled  # attach_lora is also imported from here by tests and benches
from .monitor.metrics_log import MetricsLog
from .plugins import Plugin
from .run_files import finish_run
from .run_state import STAGES, Restored, RunSetup, RunState, restore_run, save_run
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


def check_run_dir(run_dir: Path, resume: bool, overrides: dict | None, smoke: bool = False) -> RecipeConfig | None:
    """--resume needs a run directory, and takes --set / --smoke only where they repeat its saved
    config (re-running the same command resumes); returns that saved recipe. A new run needs an
    empty or new one (returns None)."""
    from .run_lock import LOCK_FILE

    if resume:
        saved_file = run_dir / "config.yaml"
        if not saved_file.is_file():
            raise UserError(f"--resume: {run_dir} is not a run directory (no config.yaml)")
        saved_raw = yaml.safe_load(saved_file.read_text())
        saved = load_recipe(saved_raw)
        # validated as load_recipe would (train.lr=5e-4 is a saved 0.0005; model=tiny is a saved model.name
        # tiny); the usual case, the same command again, costs one load
        if (overrides or smoke) and _first_difference(saved.model_dump(mode="json"), load_recipe(
                saved_raw, overrides, smoke).model_dump(mode="json")) is not None:
            _name_the_change(saved.model_dump(mode="json"), saved_raw, saved_file, overrides or {}, smoke)
        return saved
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):  # the lock is not the run's
        raise UserError(f"run directory {run_dir} already exists: pass --resume to continue it or --out for a new one")
    return None


def _name_the_change(saved: dict, saved_raw: dict, saved_file: Path, overrides: dict, smoke: bool) -> None:
    """Each --set (and --smoke) alone on the saved config: the first that changes it is refused by key."""
    changes = [(f"--set {k}={_shown(v)}", {k: v}, False) for k, v in overrides.items()]
    changes += [("--smoke", {}, True)] if smoke else []
    for flag, override, smoke_flag in changes:
        differs = _first_difference(saved, load_recipe(saved_raw, override, smoke_flag).model_dump(mode="json"))
        if differs is not None:
            raise UserError(f"--resume: {flag} changes the saved run ({differs[0]} is {_shown(differs[1])} "
                            f"in {saved_file}); drop it or start a new --out")


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
        saved = check_run_dir(run_dir, resume, overrides, smoke)
        if saved is not None:  # --resume: the run goes on with the recipe it was started with
            cfg = saved
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
        every = {st.name: st.train_cfg.sample_every for st in stages}
        if cfg.train.sample_every > 0 or any(every.values()):
            from .monitor.samples import SamplePlugin, default_prompts
            plugins.append(SamplePlugin(tokenizer=tok, renderer=renderer, every=every, default=cfg.train.sample_every,
                                        prompts=cfg.train.sample_prompts or default_prompts(eval_tasks),
                                        max_new_tokens=cfg.generation.max_new_tokens))
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
            log = MetricsLog(run_dir, accelerator, enabled=accelerator.is_main_process)
            return _run(RunSetup(cfg, run_dir, model, tok, renderer, stages, eval_tasks, accelerator, resume,
                                 plugins, show_progress, log))
        finally:
            accelerator.end_training()
            AcceleratorState._reset_state(True)  # the next train() in this process may pick other settings


def _run(setup: RunSetup) -> Run:
    cfg, accelerator = setup.cfg, setup.accelerator
    setup.model.to(accelerator.device)
    if accelerator.process_index > 0:  # its own dropout stream (the same seed would draw the same masks)
        torch.manual_seed(cfg.seed + accelerator.process_index)
    if cfg.report_to and accelerator.is_main_process:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
                for k, v in _flatten(cfg.model_dump(mode="json")).items()}
        accelerator.init_trackers("tb", config=flat)
    if cfg.experts is not None:  # DyLoRA-MoE: the stages are skills of one unlabelled stream
        from .experts.stream_run import run_skill_stream
        return Run(setup.run_dir, cfg, run_skill_stream(setup))
    return Run(setup.run_dir, cfg, _run_stages(setup))


def _run_stages(setup: RunSetup) -> dict:
    """Every stage in order, each scored after it trains; a resumed run starts where its checkpoint stood."""
    memo = EvalMemo(setup.cfg.data.eval_cache)  # e.g. an old task's untouched expert is not scored twice
    run, mid_stage = _restore_stages(setup)
    if run.results["initial"] is None:
        t0 = time.time()
        run.results["initial"] = evaluate_all(setup.model, setup.tok, setup.renderer, setup.eval_tasks, setup.cfg, memo)
        run.results["eval_seconds"] = time.time() - t0
    for si in range(run.next_index, len(setup.stages)):
        state, save = _train_one_stage(setup, run, si, mid_stage)
        mid_stage = None  # only the first stage resumes
        _evaluate_after_stage(setup, run.results, setup.stages[si], state, memo)
        save(state, done=True)
    final = finish_run(setup.cfg, setup.run_dir, setup.model, setup.eval_tasks, run.results) \
        if setup.accelerator.is_main_process else {}
    setup.accelerator.wait_for_everyone()
    return final


def _restore_stages(setup: RunSetup) -> tuple[RunState, Restored | None]:
    """The run's state: a new one, or the newest checkpoint's with its weights in the model. The second
    value is the checkpoint where it stopped inside a stage (whose optimizer and position resume)."""
    fresh = RunState(STAGES, {"initial": None, "rows": [], "details": [], "stages": []},
                     processes=setup.accelerator.num_processes)
    restored = restore_run(setup.run_dir, STAGES, setup.accelerator) if setup.resume else None
    if restored is None:
        if setup.resume:
            print(f"resuming {setup.run_dir}: no checkpoint yet, starting from the beginning", flush=True)
        return fresh, None
    run = restored.run
    run.restore_plugins(setup.plugins)
    objective = setup.stages[run.stage_index].objective
    objective.load_state_dict(run.objective)
    objective.begin_stage(setup.model)  # an objective's own parameters (a value head) exist before the copy
    restored.load_weights(_checkpoint_params(setup.model, objective))
    print(f"resuming {setup.run_dir} at stage {setup.stages[min(run.next_index, len(setup.stages) - 1)].name!r} "
          f"step {0 if run.stage_done else run.stage_state.step}", flush=True)
    return run, None if run.stage_done else restored


@dataclass
class StageSaver:
    """train_stage's checkpoint callback for one stage: where the stage stands goes into the run's
    state, saved with the weights and this stage's optimizer."""
    setup: RunSetup
    run: RunState
    index: int
    optimizer: torch.optim.Optimizer

    def __call__(self, stage_state: StageState, done: bool = False) -> None:
        st = self.setup.stages[self.index]
        self.run.stage_index, self.run.stage, self.run.stage_done = self.index, st.name, done
        self.run.stage_state = stage_state
        self.run.save_plugins(self.setup.plugins)
        self.run.objective = st.objective.state_dict()
        save_run(self.setup.accelerator, self.setup.ckpt_dir, self.run, _checkpoint_params(self.setup.model, st.objective),
                 self.optimizer, keep=st.train_cfg.keep_checkpoints)


def _train_one_stage(setup: RunSetup, run: RunState, si: int, mid_stage: Restored | None
                     ) -> tuple[StageState, StageSaver]:
    """Stage `si`'s optimizer steps (from where `mid_stage` stopped, if given); returns where it ended
    and its saver."""
    cfg, model, accelerator, st = setup.cfg, setup.model, setup.accelerator, setup.stages[si]
    if cfg.lora is not None and cfg.lora.per_stage:
        model.set_adapter(st.name)  # only this stage's expert trains
    state = mid_stage.run.stage_state if mid_stage else StageState()
    if st.data is not None and st.plan is None:
        build_sources(st, cfg, setup.run_dir, model, setup.tok, setup.renderer, accelerator)
    if mid_stage is None:  # a resumed stage began when it was restored
        st.objective.begin_stage(model)
    optimizer = build_optimizer(list(_all_trainables(model, st.objective).values()), st.train_cfg)
    if mid_stage:
        mid_stage.load_optimizer(optimizer)
    _check_sharding(accelerator, st.train_cfg)
    train_model, optimizer = accelerator.prepare(model, optimizer) if accelerator.num_processes > 1 \
        else (model, optimizer)
    save = StageSaver(setup, run, si, optimizer)
    if st.plan is not None and state.step < st.train_cfg.steps:
        if state.step == 0:
            _score_heldout(run.results, st, "before", model, setup.tok, setup.renderer, cfg)
        state = train_stage(accelerator=accelerator, model=train_model, optimizer=optimizer, objective=st.objective,
                            plan=st.plan, cfg=st.train_cfg, stage=st.name, stage_index=si, state=state,
                            plugins=setup.plugins, log=setup.log.tagged(stage_index=si), pad_id=setup.tok.pad_token_id,
                            checkpoint=save, show_progress=setup.show_progress, vocab_size=len(setup.tok),
                            global_step=sum(done["steps"] for done in run.results["stages"]))
    if accelerator.num_processes > 1:
        setup.model = accelerator.unwrap_model(train_model, keep_fp32_wrapper=False)
    return state, save


def _evaluate_after_stage(setup: RunSetup, results: dict, st: PreparedStage, state: StageState, memo: EvalMemo) -> None:
    """The accuracy row after a stage, its held-out pairs' scores, and its numbers, into `results`."""
    row = evaluate_all(setup.model, setup.tok, setup.renderer, setup.eval_tasks, setup.cfg, memo)
    results["details"].append(row)
    results["rows"].append([r["score"] for r in row])
    heldout = _score_heldout(results, st, "after", setup.model, setup.tok, setup.renderer, setup.cfg)
    results["stages"].append({"name": st.name, "steps": state.step, "seconds": state.seconds,
                              "tokens": state.tokens, "tokens_per_s": state.tokens / max(state.seconds, 1e-9),
                              "examples": st.n_examples, "truncated": st.truncated,
                              "stopped_early": state.stopped_early,
                              **({"built": st.built} if st.built else {}),
                              **({"heldout": heldout} if heldout else {})})


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


def _all_trainables(model, objective) -> dict[str, torch.nn.Parameter]:
    """The model's trainable parameters plus the objective's own (e.g. a PPO value head)."""
    extra = {f"objective.{k}": v for k, v in objective.extra_parameters().items()}
    return {**trainable_parameters(model), **extra}


def _checkpoint_params(model, objective) -> dict[str, torch.nn.Parameter]:
    """What a checkpoint holds: the trainables plus every adapter's weights (frozen experts too)."""
    return {**{n: p for n, p in model.named_parameters() if "lora_" in n}, **_all_trainables(model, objective)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


