"""`load(run_dir)`: the trained model of a run, ready to generate and evaluate."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .config import load_recipe
from .data.builtin import BUILTINS
from .data.examples import Example
from .data.render import Renderer
from .errors import UserError
from .files import write_atomic
from .run_files import DEFAULT_EXPERT, EXPERTS, FULL_MODEL

# torch, transformers and PEFT are imported where a model is built, after the run directory is checked:
# `skillstream eval/generate` on a wrong directory answers in a fraction of a second


class TrainedModel:
    """Backbone + the run's LoRA expert(s). `generate(prompt)` and `evaluate()` use the recipe's format."""

    def __init__(self, run_dir: Path, cfg, model, tokenizer, router=None, expert: str | None = None,
                 checkpoint: str | None = None):
        self.run_dir, self.config, self.model, self.tokenizer = run_dir, cfg, model, tokenizer
        self.checkpoint = checkpoint  # None: the model the run saved when it finished
        # a skill-stream run: the router picks experts per input unless `expert` names one
        self.router, self.expert, self.last_routing = router, expert, None
        self.renderer = Renderer(tokenizer, cfg.data.max_length, cfg.data.system_prompt)
        first = (cfg.resolved_stages()[0].data.train or [None])[0]
        builtin = BUILTINS.get(first.source) if first else None
        self.instruction = (first.instruction if first else None) or (builtin[1] if builtin else None)

    def generate(self, prompt: str, max_new_tokens: int | None = None, temperature: float | None = None) -> str:
        from .evaluation.generation import generate
        ex = Example("prompt_completion", prompt=prompt, instruction=self.instruction)
        gen = self.config.generation
        with self._routing() as routing:
            out = generate(self.model, self.tokenizer, [self.renderer.prompt_text(ex)],
                           max_new_tokens or gen.max_new_tokens, temperature=gen.temperature if temperature is None
                           else temperature, top_p=gen.top_p)[0]
        self.last_routing = routing
        return out

    def _routing(self):
        """Inside: the router's (or the named expert's) mixing; a no-op for single-adapter runs."""
        from contextlib import nullcontext
        if self.config.experts is None:
            return nullcontext()
        from .experts.routed import routed
        pool = self.pool
        e = self.config.experts.router
        return routed(self.model, self.router, pool.names, pool.maturities(pool.names), threshold=e.maturity_threshold,
                      top_k=e.top_k, expert=self.expert)

    @property
    def eval_file(self) -> Path:
        """Where evaluate() writes: RUN_DIR/eval.json, or eval-<checkpoint>.json for a picked checkpoint."""
        return self.run_dir / ("eval.json" if self.checkpoint is None else f"eval-{self.checkpoint}.json")

    def evaluate(self, write: bool = True) -> dict:
        """Scores on the recipe's evaluation tasks, in the precision the run trained (and was scored) in;
        written to `eval_file`."""
        from .evaluation.precision import precision_of_run
        from .model_setup import bf16_enabled

        with precision_of_run(bf16_enabled(self.config.train.bf16, next(self.model.parameters()).device.type)):
            return self._evaluate(write)

    def _evaluate(self, write: bool) -> dict:
        from .evaluation.suite import evaluate_all, prepare_eval_tasks
        tasks = prepare_eval_tasks(self.config, self.config.resolved_stages()[0].data)
        if self.config.experts is not None:
            from collections import Counter
            from .evaluation.runner import evaluate_examples
            rows = []
            for t in tasks:
                with self._routing() as routing:
                    row = evaluate_examples(self.model, self.tokenizer, self.renderer, t.examples, t.metric,
                                            self.config.data.eval_batch_size, t.max_new_tokens, also=t.also)
                top = Counter(routing.top())
                rows.append({**row, "routed_to": {n: c / len(routing.choices) for n, c in top.items()}})
        else:
            rows = evaluate_all(self.model, self.tokenizer, self.renderer, tasks, self.config)
        out = {"tasks": {t.name: r for t, r in zip(tasks, rows)},
               **({"checkpoint": self.checkpoint} if self.checkpoint is not None else {})}
        if write:
            from .run_lock import run_lock
            with run_lock(self.run_dir):  # not into a run that a train or --resume is writing
                write_atomic(self.eval_file, json.dumps(out, indent=1))
        return out


def load(run_dir: str | Path, expert: str | None = None, checkpoint: str | None = None) -> TrainedModel:
    """The run's model. Skill-stream runs route each input with the trained router unless `expert` names
    one; other runs answer with `expert` (default: their only adapter).

    `checkpoint`: None or "final", the model the run saved when it finished; "best", the best_final
    plugin's lowest-validation-loss weights (checkpoints/best/); "ckpt-N", the weights of a resumable
    checkpoint (checkpoints/ckpt-00000N/)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_recipe(yaml.safe_load((run_dir / "config.yaml").read_text()))
    from peft import PeftModel

    from .model_setup import backbone_options
    from .models.backbone import load_backbone

    if checkpoint not in (None, "final"):
        return _load_checkpoint(run_dir, cfg, checkpoint, expert)
    if cfg.lora is None:  # the whole model was trained: no adapters, one weights file
        from safetensors.torch import load_model
        weights = run_dir / FULL_MODEL / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"{run_dir}: no {FULL_MODEL}/model.safetensors (has the run finished?)")
        model, tok = load_backbone(cfg.model.name, seed=cfg.seed, revision=cfg.model.revision, args=cfg.model.args,
                                   trust_remote_code=cfg.model.trust_remote_code, **backbone_options(cfg, training=False))
        load_model(model, str(weights))
        model.eval()
        return TrainedModel(run_dir, cfg, model, tok)
    if cfg.experts is not None:
        return _load_pool(run_dir, cfg, expert)
    expert = expert or DEFAULT_EXPERT
    adapter = run_dir / EXPERTS / expert
    if not (adapter / "adapter_config.json").is_file():
        have = sorted(p.name for p in (run_dir / EXPERTS).iterdir()) if (run_dir / EXPERTS).is_dir() else []
        raise UserError(f"{run_dir}: no expert {expert!r} (experts: {have or 'none — has the run finished?'})")
    model, tok = load_backbone(cfg.model.name, seed=cfg.seed, revision=cfg.model.revision, args=cfg.model.args,
                               trust_remote_code=cfg.model.trust_remote_code, **backbone_options(cfg, training=False))
    model = PeftModel.from_pretrained(model, str(adapter), adapter_name=expert)
    model.eval()
    return TrainedModel(run_dir, cfg, model, tok)


def _load_pool(run_dir: Path, cfg, expert: str | None) -> TrainedModel:
    from .experts.pool import POOL_FILE, ExpertPool
    from .experts.router import Router
    from .experts.stream_run import ROUTER_DIR
    from .model_setup import backbone_options
    from .models.backbone import load_backbone

    if not (run_dir / EXPERTS / POOL_FILE).is_file() or not (run_dir / ROUTER_DIR).is_dir():
        raise UserError(f"{run_dir}: no {EXPERTS}/{POOL_FILE} or {ROUTER_DIR}/ (has the run finished?)")
    model, tok = load_backbone(cfg.model.name, seed=cfg.seed, revision=cfg.model.revision, args=cfg.model.args,
                               trust_remote_code=cfg.model.trust_remote_code, **backbone_options(cfg, training=False))
    pool = ExpertPool.load(run_dir / EXPERTS, model, is_trainable=False)
    if expert is not None and expert not in pool:
        raise UserError(f"{run_dir}: no expert {expert!r} (experts: {pool.names})")
    if expert is not None:
        pool.activate(expert)  # e.g. export --merge: PEFT merges the active adapter
    pool.model.eval()
    trained = TrainedModel(run_dir, cfg, pool.model, tok, Router.load(run_dir / ROUTER_DIR), expert)
    trained.pool = pool
    return trained


def _load_checkpoint(run_dir: Path, cfg, checkpoint: str, expert: str | None) -> TrainedModel:
    """The backbone with the run's adapters as training built them, their weights from `checkpoint`:
    best (the whole model's state, safetensors.torch.save_model) or ckpt-N (the trained tensors, by name)."""
    import torch
    from safetensors.torch import load_file, load_model

    from . import checkpoint as ckpt
    from .checkpoint_plugin import BEST
    from .model_setup import attach_lora, backbone_options
    from .models.backbone import load_backbone

    if cfg.experts is not None:  # a stream's experts and router are made as it runs; only its end is saved whole
        raise UserError(f"{run_dir}: --checkpoint {checkpoint} is for staged recipes; a skill-stream run loads "
                        "the experts and router it saved when it finished (drop --checkpoint)")
    root = run_dir / ckpt.CHECKPOINTS
    if checkpoint == "best":
        weights = root / BEST / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"{run_dir}: no {ckpt.CHECKPOINTS}/{BEST}/model.safetensors (the best_final plugin "
                            "writes it: add {name: best_final} to the recipe's plugins)")
    else:
        weights = ckpt.pick(root, checkpoint) / "weights.safetensors"
    model, tok = load_backbone(cfg.model.name, seed=cfg.seed, revision=cfg.model.revision, args=cfg.model.args,
                               trust_remote_code=cfg.model.trust_remote_code, **backbone_options(cfg, training=False))
    if cfg.lora is not None:
        model = attach_lora(model, cfg)
        expert = expert or (DEFAULT_EXPERT if not cfg.lora.per_stage else None)
        if expert not in model.peft_config:
            raise UserError(f"{run_dir}: name the expert to answer with (experts: {sorted(model.peft_config)})")
        model.set_adapter(expert)
    if checkpoint == "best":
        load_model(model, str(weights))
    else:
        saved = load_file(str(weights))
        params = dict(model.named_parameters())
        wanted = [n for n in params if "lora_" in n] if cfg.lora is not None else list(params)
        missing = [n for n in wanted if n not in saved]
        if missing:
            raise UserError(f"{weights}: does not match the run's model ({len(missing)} tensors missing, e.g. "
                            f"{missing[0]})")
        with torch.no_grad():
            for n in wanted:
                params[n].copy_(saved[n])
    model.eval()
    return TrainedModel(run_dir, cfg, model, tok, expert=expert, checkpoint=checkpoint)
