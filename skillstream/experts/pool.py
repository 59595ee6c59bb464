"""The expert pool: named LoRA adapters on ONE frozen backbone (one PeftModel), with tags and maturity.

An expert is a PEFT adapter, so adding one costs its LoRA parameters only, saving one writes a
standard adapter folder (`PeftModel.from_pretrained` loads it), and merging uses PEFT's
`add_weighted_adapter`. The pool adds what PEFT does not know: which skill an expert serves,
which tasks it has seen, when it was created or forked, and how mature it is.

Maturity (in [0, 1]) says when an expert may be trusted alone (the hybrid policy's switch) and
when it leaves its seeding phase for consolidation:

    progress  = min(1, steps_trained / mature_steps)
    change    = (after - before) / max(before, loss_floor): the change of the expert's loss on its
                own held-out examples across one training round, measured on the same examples
                before and after the round, relative to the loss before it (negative: still
                learning); `record_validation(name, before, after)` adds one
    trend     = mean of the last `trend_window` changes
    stability = 1                              when validation is off (`needs_validation` False)
                                               and fewer than trend_window changes exist
              = 0                              when validation is on and fewer exist (no evidence
                                               that it has flattened yet)
              = clip(1 - max(0, -trend) / flat_tolerance, 0, 1)   otherwise
    maturity  = progress * stability

so with validation an expert matures only once it has trained `mature_steps` steps AND its
held-out loss has stopped falling by `flat_tolerance` (relative) per round (a rising loss is not
"still learning"). The changes are compared on one fixed set per round, not across a growing set:
a trend over losses of different examples would measure the examples, not the expert.
`loss_floor` (nats per token) is where relative change stops meaning learning: a held-out loss of
1e-4 that drops by a third has nothing left to learn, so below the floor a change is read relative
to the floor, i.e. as the absolute drop it is.
"""
from __future__ import annotations

import copy
import json
import math
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
from ..lora_dropout import compact_lora_dropout
from .mixing import lora_layers

POOL_FILE = "pool.json"


@dataclass
class MaturityRule:
    mature_steps: int = 100          # optimizer steps after which training progress counts as complete
    trend_window: int = 1            # held-out loss changes averaged into the trend
    flat_tolerance: float = 0.02     # relative held-out loss drop per round still counted as "learning"
    needs_validation: bool = False   # True: immature until trend_window changes were measured
    loss_floor: float = 0.0          # changes of held-out losses below it count relative to it

    @classmethod
    def from_json(cls, d: dict) -> "MaturityRule":
        """A saved rule; pools saved before validation losses (a score trend, never fed) read as step-only."""
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


@dataclass
class ExpertRecord:
    name: str
    skill: str | None = None
    tasks: list[str] = field(default_factory=list)
    created_step: int = 0
    forked_from: str | None = None
    merged_from: list[str] | None = None
    steps_trained: int = 0
    val_changes: list[float] = field(default_factory=list)  # relative held-out loss change per training round
    val_loss: float | None = None                            # held-out loss after its last round

    @classmethod
    def from_json(cls, d: dict) -> "ExpertRecord":
        """A saved record; `scores` (validation scores no code ever recorded) of older pools is dropped."""
        return cls(**{k: v for k, v in d.items() if k != "scores"})


def _config_to_json(cfg: LoraConfig) -> dict:
    d = cfg.to_dict()
    return {k: sorted(v) if isinstance(v, set) else (str(v) if k in ("peft_type", "task_type") and v else v)
            for k, v in d.items()}


def _config_from_json(d: dict) -> LoraConfig:
    names = {f.name for f in fields(LoraConfig) if f.init} - {"peft_type"}
    return LoraConfig(**{k: v for k, v in d.items() if k in names})


class ExpertPool:
    """Experts of one PeftModel. Adapters already in the model (e.g. model_setup.attach_lora's "default") are adopted."""

    def __init__(self, model: PeftModel, *, rule: MaturityRule | None = None, seed: int = 0,
                 template: LoraConfig | None = None, records: list[ExpertRecord] | None = None):
        if not isinstance(model, PeftModel):
            raise TypeError("ExpertPool needs a PeftModel (see model_setup.attach_lora)")
        self.model, self.rule, self.seed = compact_lora_dropout(model), rule or MaturityRule(), seed
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
        compact_lora_dropout(self.model)
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
        compact_lora_dropout(self.model)
        tasks = [t for n in names for t in self.records[n].tasks]
        rec = ExpertRecord(new_name, skill=skill, tasks=list(dict.fromkeys(tasks)), created_step=step,
                           merged_from=list(names))
        self.records[new_name] = rec
        return rec

    def merge_in_shape(self, names: list[str], weights: list[float], method: str, new_name: str, *,
                       density: float | None = None, step: int = 0) -> ExpertRecord:
        """A TIES or DARE merge of the experts' weight deltas (s * B @ A), returned as an expert of the
        pool's template shape and scaling, so it trains, saves and restores as any expert.

        PEFT's "ties"/"dare_*" without "_svd" merge A and B separately with sqrt(weight) factors, which
        is not a merge of the deltas (two equal experts with weights 1/2 each give twice the delta);
        the "_svd" variants merge the deltas, then factor the result back to the template's rank
        (exact when the merged delta has at most that rank, e.g. equal experts). PEFT gives the merged
        adapter lora_alpha = r (scaling 1); its B is rescaled into a template adapter. DARE's random
        drops are seeded by the pool seed and the new name.
        """
        if method not in ("ties", "dare_ties", "dare_linear"):
            raise UserError(f"merge method must be ties, dare_ties or dare_linear, got {method!r}")
        scratch = f"{new_name}-merging"
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(zlib.crc32(f"{self.seed}:merge:{new_name}".encode()))
            merged = self.merge(names, weights, f"{method}_svd", scratch, density=density, step=step)
        rec = self.create(new_name, step=step, tasks=merged.tasks)
        rec.merged_from = list(names)
        with torch.no_grad():
            for layer in lora_layers(self.model):
                if scratch not in layer.lora_A:
                    continue
                layer.lora_A[new_name].weight.copy_(layer.lora_A[scratch].weight)
                layer.lora_B[new_name].weight.copy_(layer.lora_B[scratch].weight
                                                    * (layer.scaling[scratch] / layer.scaling[new_name]))
        self.prune(scratch)
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

    def record_validation(self, name: str, before: float, after: float, loss: float | None = None) -> float:
        """One training round of `name`: its held-out loss on the same examples before and after it
        (and, as `loss`, on its whole held-out set after it). Returns the change relative to
        max(before, loss_floor)."""
        scale = max(before, self.rule.loss_floor)
        if not (scale > 0 and math.isfinite(before) and math.isfinite(after)):
            raise ValueError(f"expert {name!r}: held-out losses must be finite and positive, got {before}, {after}")
        rec = self.record(name)
        change = (after - before) / scale
        rec.val_changes.append(change)
        rec.val_loss = after if loss is None else float(loss)
        return change

    def trend(self, name: str) -> float | None:
        """Mean relative held-out loss change of the last trend_window rounds (None: too few rounds)."""
        changes = self.record(name).val_changes[-self.rule.trend_window:]
        return sum(changes) / len(changes) if len(changes) >= self.rule.trend_window else None

    def maturity(self, name: str) -> float:
        rec = self.record(name)
        progress = min(1.0, rec.steps_trained / max(1, self.rule.mature_steps))
        trend = self.trend(name)
        if trend is None:
            stability = 0.0 if self.rule.needs_validation else 1.0
        else:
            stability = min(1.0, max(0.0, 1.0 - max(0.0, -trend) / self.rule.flat_tolerance))
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
        records = [ExpertRecord.from_json(r) for r in meta["experts"]]
        if not records:
            raise UserError(f"{directory / POOL_FILE}: the pool has no experts")
        first, *rest = [r.name for r in records]
        model = PeftModel.from_pretrained(base_model, str(directory / first), adapter_name=first,
                                          is_trainable=is_trainable)
        for name in rest:
            model.load_adapter(str(directory / name), adapter_name=name, is_trainable=is_trainable)
        return cls(model, rule=MaturityRule.from_json(meta["rule"]), seed=meta["seed"],
                   template=_config_from_json(meta["template"]), records=records)


def _tensors(module_or_param) -> list[torch.Tensor]:
    if isinstance(module_or_param, torch.nn.Parameter):
        return [module_or_param]
    return list(module_or_param.parameters())
