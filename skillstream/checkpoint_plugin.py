"""`best_final` plugin: validation loss during training, the best weights so far, and the final ones.

    plugins:
      - name: best_final
        every: 50                        # validate every N optimizer steps (and at every stage end)
        sources:                         # held-out data; default: the recipe's eval tasks (see below)
          - {source: pydoc_text, split: validation, limit: 32}
          - {source: arithmetic, split: validation, limit: 32}

Each validation measures the mean token loss on each source (``val/<name>/loss``, the stage
objective's token cross-entropy, or for objectives that have none -- DPO, PPO -- the plain LM loss
of the sources' completions, so every stage of a recipe is measured alike;
``val/<name>/bits`` = loss / ln 2, bits per byte for the byte tokenizer) and their mean
``val/loss``. The records go to ``validation.jsonl`` in the run directory (and, on log steps, to
metrics.jsonl). Where they land, all safetensors of the whole model (as ``safetensors.torch.save_model``
writes it: tied weights once; gathered whole first where FSDP shards the model):

* ``checkpoints/best/model.safetensors`` + ``best.json`` (step, stage, global step, val losses) --
  rewritten whenever ``val/loss`` is lower than every earlier validation of the run;
* ``checkpoints/final/model.safetensors`` + ``final.json`` -- after the last stage;
* the resumable step checkpoints stay where the engine writes them (``checkpoints/ckpt-NNNNNN/``,
  every ``train.checkpoint_every`` steps and at each stage end), and ``model/model.safetensors`` is
  the run's model as every recipe with ``lora: null`` saves it.

Without ``sources`` the recipe's evaluation tasks are used, which selects ``best`` on the test data
and makes it optimistic: give held-out sources for an honest selection. All writes are atomic
(a temporary folder renamed), and the best value rides in the resumable checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from .checkpoint import CHECKPOINTS
from .config import SourceConfig
from .errors import UserError
from .plugins import Plugin, StepContext

VALIDATION = "validation.jsonl"
BEST, FINAL = "best", "final"  # checkpoints/best/ and checkpoints/final/


class BestFinalCheckpoints(Plugin):
    name = "best_final"

    def __init__(self, sources: list[dict] | None = None, every: int = 50, limit: int = 64, batch_size: int = 16,
                 tokenizer=None, renderer=None, recipe=None, **context):
        if every < 1:
            raise UserError(f"best_final.every {every}: expected at least 1")
        if recipe is not None and recipe.experts is not None:
            raise UserError("best_final: a skill-stream recipe (experts:) saves its experts and router when it "
                            "finishes; best_final is for staged recipes")
        self.every, self.batch_size, self.renderer, self.recipe = every, batch_size, renderer, recipe
        if sources is None:
            specs = [{"name": t.name, "source": t.source, "split": t.split, "limit": min(t.limit or limit, limit)}
                     for t in (recipe.data.eval if recipe is not None else [])]
        else:
            specs = [dict(s) for s in sources]
        self.sources = []
        for s in specs:
            name = s.pop("name", None) or s["source"].split(":")[0] + ("" if s.get("split", "train") == "train"
                                                                     else f"_{s.get('split')}")
            s.setdefault("limit", limit)
            try:
                self.sources.append((name, SourceConfig(**s)))
            except Exception as e:  # pydantic: one line naming the source
                raise UserError(f"best_final.sources: bad source {s} ({str(e).splitlines()[0]})") from None
        self._items = None
        self.best: float | None = None
        self.best_step: int | None = None
        self.global_step = 0
        self.n_stages = len(recipe.resolved_stages()) if recipe is not None else None

    def _prepare(self):
        if self._items is None:
            from .data.examples import load_examples
            self._items = [(name, [self.renderer.tokenize(ex) for ex in load_examples(src)])
                           for name, src in self.sources]
        return self._items

    # -- hooks ----------------------------------------------------------------------------------
    def before_stage(self, ctx: StepContext) -> None:
        self._prepare()  # a bad source fails at the start, not after the first stage

    def after_step(self, ctx: StepContext, metrics: dict) -> dict | None:
        self.global_step += 1
        if ctx.step % self.every:
            return None
        return self._validate(ctx)

    def after_stage(self, ctx: StepContext) -> None:
        if ctx.step % self.every or ctx.step == 0:
            self._validate(ctx)
        if self.n_stages is not None and ctx.stage_index == self.n_stages - 1:
            self._save(ctx, FINAL, {"step": ctx.step, "stage": ctx.stage, "global_step": self.global_step})

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "global_step": self.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.global_step = state.get("global_step", 0)

    # -- work -----------------------------------------------------------------------------------
    def _validate(self, ctx: StepContext) -> dict:
        from .continual.early_stop import validation_loss
        from .objectives.lm import LMObjective
        items = self._prepare()
        if not items:
            return {}
        out = {}
        objective = ctx.objective if ctx.objective is not None and ctx.objective.token_cross_entropy \
            else LMObjective()  # preference and reward objectives have no token loss of a completion
        for name, its in items:
            loss = validation_loss(ctx.model, objective, its, ctx.pad_id, self.batch_size)
            out[f"val/{name}/loss"] = loss
            out[f"val/{name}/bits"] = loss / math.log(2)
        val = sum(out[f"val/{n}/loss"] for n, _ in items) / len(items)
        out["val/loss"] = val
        record = {"step": ctx.step, "stage": ctx.stage, "global_step": self.global_step, **out}
        if math.isfinite(val) and (self.best is None or val < self.best):
            self.best, self.best_step = val, self.global_step
            self._save(ctx, BEST, record)
            record["best"] = True
        self._append(ctx, record)
        return out

    def _main(self, ctx) -> bool:
        return ctx.accelerator is None or ctx.accelerator.is_main_process

    def _run_dir(self, ctx) -> Path | None:
        return Path(ctx.run_dir) if ctx.run_dir is not None else None

    def _append(self, ctx, record: dict) -> None:
        run_dir = self._run_dir(ctx)
        if run_dir is not None and self._main(ctx):
            with (run_dir / VALIDATION).open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _save(self, ctx, which: str, info: dict) -> None:
        run_dir = self._run_dir(ctx)
        if run_dir is None:
            return
        from safetensors.torch import save_file
        from .checkpoint import require_finite
        from .sharding import model_state
        # every process takes part in gathering the whole model (FSDP shards it); the main process writes
        acc = ctx.accelerator
        state = model_state(acc, acc.unwrap_model(ctx.model) if acc is not None else ctx.model)
        if not self._main(ctx):
            return
        root = run_dir / CHECKPOINTS
        require_finite(state, f"{root / which}")
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{which}-", dir=root))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / f"{which}.json").write_text(json.dumps(info, indent=1))
        final = root / which
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
