"""What a finished run leaves in its directory: the model files (experts/NAME/ PEFT adapter folders,
or model/model.safetensors) and results.json (the accuracy-matrix summary of DESIGN.md)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .config import RecipeConfig
from .continual.metrics import summarize
from .data.examples import skipped_rows
from .files import write_atomic

EXPERTS = "experts"
DEFAULT_EXPERT = "default"
FULL_MODEL = "model"  # recipes with lora: null save the whole model here (safetensors)

if TYPE_CHECKING:
    import torch

    from .evaluation.suite import EvalTask


def expert_names(cfg: RecipeConfig) -> list[str]:
    if cfg.lora is None:
        return []
    if cfg.experts is not None:  # a skill stream starts with its first expert; the rest are made as skills appear
        return [f"{cfg.experts.prefix}0"]
    return [st.name for st in cfg.resolved_stages()] if cfg.lora.per_stage else [DEFAULT_EXPERT]


def save_model_files(model, run_dir: Path, weights: dict[str, torch.Tensor], lora: bool) -> None:
    """experts/NAME/ (PEFT adapter folders) or, without LoRA, model/model.safetensors; atomically.
    `weights`: the adapters (or the whole model's state) whole, as sharding.whole / model_state
    gather them on every process (under FSDP the model's own parameters are this process's shards)."""
    final = run_dir / (EXPERTS if lora else FULL_MODEL)
    tmp = run_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    from .checkpoint import require_finite
    require_finite(weights, f"{run_dir}/{final.name}")
    if lora:
        for name in model.peft_config:  # each expert as its own standard PEFT adapter folder
            model.save_pretrained(str(tmp if name != DEFAULT_EXPERT else tmp / DEFAULT_EXPERT), selected_adapters=[name],
                                  state_dict=weights)
    else:
        from safetensors.torch import save_file
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def finish_run(cfg: RecipeConfig, run_dir: Path, model, weights: dict[str, torch.Tensor], eval_tasks: list[EvalTask],
               results: dict) -> dict:
    """What a finished run leaves: its model files (from `weights`, see save_model_files) and
    results.json (the accuracy-matrix summary), returned."""
    save_model_files(model, run_dir, weights, lora=cfg.lora is not None)

    names = [t.name for t in eval_tasks]
    final = summarize(names, {t.name: r["metric"] for t, r in zip(eval_tasks, results["initial"])},
                      [r["score"] for r in results["initial"]], results["rows"], results["initial"], results["details"])
    final.update({"initial_details": results["initial"], "details": results["details"],
                  "stages": results["stages"], "experts": expert_names(cfg),
                  "seconds": sum(s["seconds"] for s in results["stages"]),
                  "truncated": sum(s["truncated"] for s in results["stages"]),
                  "untrainable": sum(s.get("untrainable", 0) for s in results["stages"]),
                  "skipped_rows": skipped_rows(cfg),  # rows dropped under data.invalid_labels=skip, per file
                  "evaluations_remembered": remembered(results),
                  # data.validation_eval: the tasks scored on held-out training examples (what sweeps select on)
                  **({"validation": results["validation"]} if "validation" in results else {})})
    final.update(protocol_summaries(names, results))
    write_atomic(run_dir / "results.json", json.dumps(final, indent=1))
    return final


def remembered(results: dict) -> int:
    """Task evaluations of the matrix taken from the memo (the same weights scored the same inputs before)."""
    return sum(1 for row in [results["initial"], *results["details"]] for r in row if r.get("memo"))


def protocol_summaries(names: list[str], results: dict) -> dict:
    """{'protocols': {name: accuracy-matrix summary}} for each further protocol the rows carry (or {})."""
    rows = [results["initial"], *results["details"]]
    protocols = sorted({p for row in rows for r in row for p in r.get("protocols", {})})
    if not protocols:
        return {}
    return {"protocols": {p: summarize(names, {n: p for n in names},
                                       [r.get("protocols", {}).get(p) for r in results["initial"]],
                                       [[r.get("protocols", {}).get(p) for r in row] for row in results["details"]])
                          for p in protocols}}
