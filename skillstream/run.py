"""`train()`: a recipe end to end — validate, load data and model, score before training, run
every stage, score after each, checkpoint, save the adapters and results.json; or resume.

Everything that can be wrong with the user's input is checked before the run directory is
created, so a bad recipe or data file leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .config import RecipeConfig, load_recipe, recipe_to_yaml
from .errors import UserError
from .files import write_atomic

if TYPE_CHECKING:
    from .run_state import RunSetup

# torch, accelerate, transformers and PEFT are imported inside train(), after the checks of the
# recipe and the run directory: loading them takes seconds, and a typo should be refused at once.


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
          plugins: list | None = None, resume_from: str | None = None) -> Run:
    """Train a recipe and return the Run. `overrides` use dotted keys: {"train.lr": 1e-4, "model": "tiny"}.
    `resume_from`: resume from this checkpoint of the run directory (ckpt-N) instead of the newest."""
    cfg = load_recipe(recipe, overrides, smoke)
    run_dir = resolve_run_dir(cfg.name, out)
    resume = resume or resume_from is not None
    # One process at a time in a run directory, taken before the checks below so that of two runs
    # started together on one --out exactly one passes them. Rank 0 holds it for every rank (or the
    # `--processes` launcher does, see run_lock.HELD_BY_LAUNCHER); the kernel frees it if we die.
    # Rank as the launchers (accelerate launch, torchrun) set it: the process group joins further down.
    from contextlib import nullcontext
    from .run_lock import run_lock
    with run_lock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
        saved = check_run_dir(run_dir, resume, overrides, smoke)
        if saved is not None:  # --resume: the run goes on with the recipe it was started with
            cfg = saved
        from .init_from import check_init_from, copy_inherited_files, load_init_from
        cfg = check_init_from(cfg)  # a run to start from (stage: dpo after an sft run): same model, same LoRA
        from . import checkpoint as ckpt
        if resume_from is not None:  # the checkpoint exists and is intact, before anything is written
            ckpt.pick(run_dir / ckpt.CHECKPOINTS, resume_from)
        from .monitor.trackers import build_trackers, check_trackers
        check_trackers(cfg.report_to)

        import torch
        from accelerate import Accelerator, PartialState
        from accelerate.utils import set_seed

        from .components import PLUGINS, build
        from .data.render import Renderer
        from .model_setup import attach_lora, backbone_options, bf16_enabled
        from .models.backbone import load_backbone
        from .monitor.metrics_log import MetricsLog
        from .plugins import Plugin
        from .run_state import RunSetup
        from .stages import prepare_stages

        # Launched with several processes (accelerate launch / torchrun / --processes) this joins the
        # process group: gloo on a machine without CUDA (accelerate needs cpu=True to pick it there).
        cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        dist = PartialState(cpu=cpu)
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
            check_stream_recipe(cfg, stages, eval_tasks)
        from .sharding import check_recipe, enable_deepspeed_on_cpu, enable_fsdp_on_cpu
        check_recipe(cfg)  # what FSDP / DeepSpeed cannot shard

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
        accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", project_dir=str(run_dir), cpu=cpu,
                                  log_with=build_trackers(cfg.report_to, run_dir, cfg.name) or None)
        if cpu and enable_fsdp_on_cpu(accelerator):
            if accelerator.is_main_process:
                print("note: FSDP2 on CPU (gloo): accelerate enables FSDP only on GPUs, skillstream turns it on here",
                      flush=True)
        elif cpu and enable_deepspeed_on_cpu(accelerator):
            if accelerator.is_main_process:
                print(f"note: DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage} on CPU (gloo): accelerate "
                      "enables DeepSpeed only on GPUs, skillstream turns it on here", flush=True)
        try:
            log = MetricsLog(run_dir, accelerator, enabled=accelerator.is_main_process)
            run = _run(RunSetup(cfg, run_dir, model, tok, renderer, stages, eval_tasks, accelerator, resume,
                                plugins, show_progress, log, resume_from=resume_from))
            # every process is done with its collectives before any tears the process group down: a gloo
            # process that destroys its group while another still talks to it can abort (seen in CI)
            accelerator.wait_for_everyone()
            return run
        finally:
            accelerator.end_training()
            AcceleratorState._reset_state(True)  # the next train() in this process may pick other settings


def _run(setup: RunSetup) -> Run:
    import torch

    from .driver import drive
    from .stage_plan import StagePlan

    cfg, accelerator = setup.cfg, setup.accelerator
    setup.model.to(accelerator.device)
    if accelerator.process_index > 0:  # its own dropout stream (the same seed would draw the same masks)
        torch.manual_seed(cfg.seed + accelerator.process_index)
    if cfg.report_to and accelerator.is_main_process:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
                for k, v in _flatten(cfg.model_dump(mode="json")).items()}
        from .monitor.trackers import start_trackers
        start_trackers(accelerator, setup.run_dir, flat)
    if cfg.experts is not None:  # DyLoRA-MoE: the stages are skills of one unlabelled stream, cut into chunks
        from .experts.stream_run import StreamPlan
        plan = StreamPlan(setup)
    else:
        plan = StagePlan(setup)
    results = drive(plan)
    setup.log.finish(results)  # the summary and the run's files to the trackers
    return Run(setup.run_dir, cfg, results)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


