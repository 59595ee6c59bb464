"""The expert pool: named LoRA adapters on ONE frozen backbone (one PeftModel), with tags and maturity.

An expert is a PEFT adapter, so adding one costs its LoRA parameters only, saving one writes a
standard adapter folder (`PeftModel.from_pretrained` loads it), and merging uses PEFT's
`add_weighted_adapter`. The pool adds what PEFT does not know: which skill an expert serves,
which tasks it has seen, when it was created or forked, and how mature it is.

Maturity (in [0, 1]) says when an expert may be trusted alone (the hybrid policy's switch):

    progress  = min(1, steps_trained / mature_steps)
    trend     = least-squares slope of the last `trend_window` validation scores (per validation)
    stability = 1                                        with fewer than 2 scores (no evidence: trust steps)
              = clip(1 - max(0, trend) / trend_tolerance, 0, 1)   otherwise
    maturity  = progress * stability

so an expert is mature once it has trained `mature_steps` steps AND its validation score has
stopped rising by `trend_tolerance` or more per validation (a falling score is not "still learning").
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel

from ..errors import UserError
from ..files import write_atomic
from .mixing import lora_layers

POOL_FILE = "pool.json"


@dataclass
class MaturityRule:
    mature_steps: int = 100          # optimizer steps after which training progress counts as complete
    trend_window: int = 3            # validation scores the trend is fitted on
    trend_tolerance: float = 0.01    # score gain per validation still counted as "learning"


@dataclass
class ExpertRecord:
    name: str
    skill: str | None = None
    tasks: list[str] = field(default_factory=list)
    created_step: int = 0
    forked_from: str | None = None
    merged_from: list[str] | None = None
    steps_trained: int = 0
    scores: list[float] = field(default_factory=list)


def slope(values: list[float]) -> float:
    """Least-squares slope of values against their index."""
    n = len(values)
    mx, my = (n - 1) / 2, sum(values) / n
    den = sum((i - mx) ** 2 for i in range(n))
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / den if den else 0.0


def _config_to_json(cfg: LoraConfig) -> dict:
    d = cfg.to_dict()
    return {k: sorted(v) if isinstance(v, set) else (str(v) if k in ("peft_type", "task_type") and v else v)
            for k, v in d.items()}


def _config_from_json(d: dict) -> LoraConfig:
    names = {f.name for f in fields(LoraConfig) if f.init} - {"peft_type"}
    return LoraConfig(**{k: v for k, v in d.items() if k in names})


class ExpertPool:
    """Experts of one PeftModel. Adapters already in the model (e.g. run.attach_lora's "default") are adopted."""

    def __init__(self, model: PeftModel, *, rule: MaturityRule | None = None, seed: int = 0,
                 template: LoraConfig | None = None, records: list[ExpertRecord] | None = None):
        if not isinstance(model, PeftModel):
            raise TypeError("ExpertPool needs a PeftModel (see run.attach_lora)")
        self.model, self.rule, self.seed = model, rule or MaturityRule(), seed
        existing = list(model.peft_config)
        # New experts copy this config (rank, alpha, targets), so every expert has the same shape.
        self.template = copy.deepcopy(template or model.peft_config[existing[0]])
        by_name = {r.name: r for r in records or []}
        self.records: dict[str, ExpertRecord] = {n: by_name.get(n, ExpertRecord(n)) for n in existing}

    # -- membership ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.records)

    def __contains__(self, name: str) -> bool:
        return name in self.records

    def __len__(self) -> int:
        return len(self.records)

    def record(self, name: str) -> ExpertRecord:
        self._check(name)
        return self.records[name]

    def _check(self, name: str) -> None:
        if name not in self.records:
            raise UserError(f"unknown expert {name!r}; the pool has {self.names}")

    def _check_new(self, name: str) -> None:
        if name in self.records or name in self.model.peft_config:
            raise UserError(f"expert {name!r} already exists")
        if not name or not name.replace("_", "").replace("-", "").isalnum() or name == "__base__":
            raise UserError(f"expert name {name!r}: use letters, digits, '_' and '-' only")
        if name in "lora_":  # PEFT matches saved keys by substring: "a" or "lo" would be re-initialised on load
            raise UserError(f"expert name {name!r}: too short (it is part of PEFT's 'lora_' prefix)")

    # -- create / fork / merge / prune -----------------------------------------------------------
    def create(self, name: str, *, fork_from: str | None = None, skill: str | None = None, step: int = 0,
               tasks: list[str] | tuple[str, ...] = ()) -> ExpertRecord:
        """A fresh LoRA (seeded by pool seed and name), or a copy of `fork_from`'s weights (warm start)."""
        self._check_new(name)
        if fork_from is not None:
            self._check(fork_from)
        config = copy.deepcopy(self.model.peft_config[fork_from] if fork_from else self.template)
        with torch.random.fork_rng(devices=[]):  # LoRA init draws from the CPU generator, restored after
            torch.random.default_generator.manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
            self.model.add_adapter(name, config)
        if fork_from is not None:
            with torch.no_grad():
                for layer in lora_layers(self.model):
                    for attr in layer.adapter_layer_names:
                        params = getattr(layer, attr)
                        if fork_from in params:
                            for dst, src in zip(_tensors(params[name]), _tensors(params[fork_from])):
                                dst.copy_(src)
        rec = ExpertRecord(name, skill=skill, tasks=list(tasks), created_step=step, forked_from=fork_from)
        self.records[name] = rec
        return rec

    def merge(self, names: list[str], weights: list[float], method: str = "linear", new_name: str | None = None, *,
              density: float | None = None, skill: str | None = None, step: int = 0) -> ExpertRecord:
        """A new expert from PEFT's weighted merge of `names` ("linear", "cat", "ties", "dare_linear", ...).

        PEFT's "linear" scales A by sqrt(w)*scale and B by sqrt(w) and sums each, which is exact for
        one expert but only approximate for several (cross terms); "cat" is the exact sum of deltas.
        The new expert is named `new_name`, by default "merged_" + the names joined by "_".
        """
        for n in names:
            self._check(n)
        new_name = new_name or "merged_" + "_".join(names)
        self._check_new(new_name)
        if len(weights) != len(names):
            raise UserError(f"merge: {len(names)} experts but {len(weights)} weights")
        self.model.add_weighted_adapter(adapters=names, weights=weights, adapter_name=new_name,
                                        combination_type=method, density=density)
        tasks = [t for n in names for t in self.records[n].tasks]
        rec = ExpertRecord(new_name, skill=skill, tasks=list(dict.fromkeys(tasks)), created_step=step,
                           merged_from=list(names))
        self.records[new_name] = rec
        return rec

    def prune(self, name: str) -> None:
        self._check(name)
        rest = [n for n in self.names if n != name]
        if name in self.model.active_adapters and rest:
            self.model.set_adapter(rest[0])  # chosen here, not by PEFT with a warning
        self.model.delete_adapter(name)
        del self.records[name]

    # -- tags and maturity -----------------------------------------------------------------------
    def tag(self, name: str, *, task: str | None = None, skill: str | None = None) -> None:
        rec = self.record(name)
        if task is not None and task not in rec.tasks:
            rec.tasks.append(task)
        if skill is not None:
            rec.skill = skill

    def record_training(self, name: str, steps: int = 1) -> None:
        self.record(name).steps_trained += steps

    def record_validation(self, name: str, score: float) -> None:
        self.record(name).scores.append(float(score))

    def trend(self, name: str) -> float | None:
        scores = self.record(name).scores[-self.rule.trend_window:]
        return slope(scores) if len(scores) >= 2 else None

    def maturity(self, name: str) -> float:
        rec = self.record(name)
        progress = min(1.0, rec.steps_trained / max(1, self.rule.mature_steps))
        trend = self.trend(name)
        stability = 1.0 if trend is None else min(1.0, max(0.0, 1.0 - max(0.0, trend) / self.rule.trend_tolerance))
        return progress * stability

    def maturities(self, names: list[str] | None = None) -> torch.Tensor:
        return torch.tensor([self.maturity(n) for n in names or self.names])

    # -- parameters --------------------------------------------------------------------------------
    def parameters_of(self, name: str) -> dict[str, torch.nn.Parameter]:
        """An expert's own LoRA parameters (for its optimizer parameter group)."""
        self._check(name)
        out = {}
        for key, p in self.model.named_parameters():
            parts = key.split(".")
            if any(a.startswith("lora_") and b == name for a, b in zip(parts, parts[1:])):
                out[key] = p
        return out

    def set_trainable(self, names: list[str]) -> None:
        """Exactly these experts' LoRA weights require grad (e.g. the experts being mixed in training)."""
        for n in names:
            self._check(n)
        self.model.set_requires_grad(self.names, requires_grad=False)
        if names:
            self.model.set_requires_grad(list(names), requires_grad=True)

    def activate(self, name: str) -> None:
        """Serve (and train) one expert through PEFT's own single-adapter path."""
        self._check(name)
        self.model.set_adapter(name)

    # -- save / load -------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {"version": 1, "seed": self.seed, "rule": asdict(self.rule), "template": _config_to_json(self.template),
                "experts": [asdict(r) for r in self.records.values()]}

    def save(self, directory: str | Path) -> Path:
        """`directory/NAME/` per expert (a standard PEFT adapter folder) and `directory/pool.json`."""
        directory = Path(directory)
        from ..checkpoint import require_finite
        require_finite({n: p for n, p in self.model.named_parameters() if "lora_" in n}, f"{directory}")
        directory.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=directory))
            try:
                self.model.save_pretrained(str(tmp), selected_adapters=[name])
                # PEFT writes the adapter named "default" at the root and any other in a subfolder
                written = tmp if name == "default" else tmp / name
                target = directory / name
                if target.exists():
                    shutil.rmtree(target)
                os.replace(written, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        write_atomic(directory / POOL_FILE, json.dumps(self.metadata(), indent=1))
        # adapter folders of experts pruned since an earlier save would read as experts: remove them
        for stale in directory.iterdir():
            if stale.is_dir() and stale.name not in self.records and (stale / "adapter_config.json").is_file():
                shutil.rmtree(stale)
        return directory

    @classmethod
    def load(cls, directory: str | Path, base_model: torch.nn.Module, *, is_trainable: bool = True) -> "ExpertPool":
        directory = Path(directory)
        if not (directory / POOL_FILE).is_file():
            raise UserError(f"{directory}: no {POOL_FILE} (not a saved expert pool)")
        meta = json.loads((directory / POOL_FILE).read_text())
        records = [ExpertRecord(**r) for r in meta["experts"]]
        if not records:
            raise UserError(f"{directory / POOL_FILE}: the pool has no experts")
        first, *rest = [r.name for r in records]
        model = PeftModel.from_pretrained(base_model, str(directory / first), adapter_name=first,
                                          is_trainable=is_trainable)
        for name in rest:
            model.load_adapter(str(directory / name), adapter_name=name, is_trainable=is_trainable)
        return cls(model, rule=MaturityRule(**meta["rule"]), seed=meta["seed"],
                   template=_config_from_json(meta["template"]), records=records)


def _tensors(module_or_param) -> list[torch.Tensor]:
    if isinstance(module_or_param, torch.nn.Parameter):
        return [module_or_param]
    return list(module_or_param.parameters())
