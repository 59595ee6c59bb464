"""`init_from: RUN_DIR`: start a run from a finished run -- what a single `stage:` needs.

LLaMA-Factory's way (`stage: dpo` plus `adapter_name_or_path: saves/sft`), with a run directory
as the hand-over::

    skillstream train muse --set stage=sft   --out runs/muse-sft
    skillstream train muse --set stage=pairs --set init_from=runs/muse-sft   --out runs/muse-pairs
    skillstream train muse --set stage=dpo   --set init_from=runs/muse-pairs --out runs/muse-dpo

* weights: the run's final experts (`experts/NAME/`, standard PEFT adapters) are loaded into this
  run's adapters of the same names, or its `model/model.safetensors` when `lora: null`. The model
  and the LoRA shape (r, alpha, target modules) must match; checked before the run directory is
  made.
* files: a source that a stage's builder writes (`data.train[].build`, e.g. `pairs.jsonl`) is
  copied from RUN_DIR when the stage that builds it first is not part of this run and RUN_DIR has
  it. So `stage: dpo` from a `pairs` run trains on those pairs; from an `sft` run (no pairs.jsonl)
  the dpo stage builds its pairs itself from the SFT adapter it starts from. A stage that does run
  always builds its own files.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .errors import UserError
from .files import write_atomic


def _run_config(run_dir: Path):
    from .config import load_recipe

    return load_recipe(yaml.safe_load((run_dir / "config.yaml").read_text()))


def check_init_from(cfg):
    """Validate `init_from` against the recipe; returns cfg with the path made absolute (so a resumed
    run finds it from any directory). Raises UserError (one line) on a mismatch."""
    if not cfg.init_from:
        return cfg
    from .run_files import EXPERTS, FULL_MODEL, expert_names

    src = Path(cfg.init_from).expanduser().resolve()
    where = f"init_from {cfg.init_from}"
    if not (src / "config.yaml").is_file():
        raise UserError(f"{where}: not a run directory (no config.yaml)")
    theirs = _run_config(src)
    for key in ("name", "revision", "args"):
        a, b = getattr(theirs.model, key), getattr(cfg.model, key)
        if a != b:
            raise UserError(f"{where}: trained with model.{key} {a!r}, this recipe has {b!r}")
    if (theirs.lora is None) != (cfg.lora is None):
        raise UserError(f"{where}: {'no ' if theirs.lora is None else ''}LoRA there, "
                        f"{'no ' if cfg.lora is None else ''}LoRA here (lora: null must match)")
    if cfg.lora is None:
        if not (src / FULL_MODEL / "model.safetensors").is_file():
            raise UserError(f"{where}: no {FULL_MODEL}/model.safetensors (has that run finished?)")
    else:
        for key in ("r", "alpha", "target_modules"):
            a, b = getattr(theirs.lora, key), getattr(cfg.lora, key)
            if a != b:
                raise UserError(f"{where}: trained with lora.{key} {a!r}, this recipe has {b!r}")
        for name in expert_names(cfg):
            if not (src / EXPERTS / name / "adapter_model.safetensors").is_file():
                have = sorted(p.name for p in (src / EXPERTS).iterdir()) if (src / EXPERTS).is_dir() else []
                raise UserError(f"{where}: no expert {name!r} (experts: {', '.join(have) or 'none -- has that run finished?'})")
    return cfg.model_copy(update={"init_from": str(src)})


def load_init_from(model, cfg):
    """Load the init_from run's final weights into `model` (with its LoRA adapters attached)."""
    if not cfg.init_from:
        return model
    from safetensors.torch import load_file, load_model

    from .run_files import EXPERTS, FULL_MODEL, expert_names

    src = Path(cfg.init_from)
    if cfg.lora is None:
        load_model(model, str(src / FULL_MODEL / "model.safetensors"))
        return model
    from peft import set_peft_model_state_dict

    for name in expert_names(cfg):
        weights = load_file(str(src / EXPERTS / name / "adapter_model.safetensors"))
        try:
            result = set_peft_model_state_dict(model, weights, adapter_name=name)
        except RuntimeError as e:  # shapes differ
            raise UserError(f"init_from {src}: expert {name!r} does not fit this model ({str(e).splitlines()[0]})") from None
        missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
        if missing or result.unexpected_keys:
            raise UserError(f"init_from {src}: expert {name!r} does not fit this model "
                            f"(e.g. {(missing or result.unexpected_keys)[0]})")
    return model


def inherited_files(cfg) -> list[str]:
    """Files (relative to the run directory) the selected stage reads that a stage this run skips
    builds first."""
    if cfg.stage == "all":
        return []
    first_builder = {}
    for st in cfg.model_copy(update={"stage": "all"}).resolved_stages():
        for src in st.data.train:
            if src.build:
                first_builder.setdefault(src.source, st.name)
    (selected,) = cfg.resolved_stages()
    return [src.source for src in selected.data.train if src.build and first_builder[src.source] != cfg.stage]


def copy_inherited_files(cfg, run_dir: Path) -> None:
    """Copy the inherited files that init_from has (and run_dir lacks) into run_dir."""
    if not cfg.init_from:
        return
    for rel in inherited_files(cfg):
        src, dst = Path(cfg.init_from) / rel, run_dir / rel
        if src.is_file() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(dst, src.read_bytes())
            print(f"copied {src} to {dst} (init_from: built by a stage this run skips)", flush=True)
