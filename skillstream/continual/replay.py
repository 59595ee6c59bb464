"""Experience replay: a memory of past examples within a budget, mixed into new batches.

After each task its examples are offered to the memory — `reservoir` keeps a uniform sample of
everything seen; `class_balanced` keeps an equal quota per (task, class) so a frequent class or
a long task cannot crowd the others out (a group smaller than its quota leaves the rest to others). During later tasks, a share `alpha` of every
micro-batch is replaced by memory items (replacing rather than adding keeps the cost per step
that of plain training). The memory and its counters are plugin state, saved in checkpoints;
which items are drawn depends only on (seed, stage, draw count), so a resumed run draws the same.

`scope: adapter` keeps the memory per LoRA adapter: items are stored under the adapter that
trained on them and drawn only while that adapter trains. In the expert-pool regime this is the
protection of a REUSED expert (it rehearses its own earlier skill while it learns a similar new
one) without teaching an expert another expert's skill; with one shared LoRA it is the same as
`scope: all` (the default), and with one expert per task it replays nothing.
"""
from __future__ import annotations

import random
from dataclasses import asdict

from ..data.render import Tokenized
from ..errors import UserError
from ..plugins import Plugin, StepContext


class ReplayMemory:
    def __init__(self, budget: int, policy: str = "class_balanced"):
        if policy not in ("reservoir", "class_balanced"):
            raise UserError(f"replay.policy {policy!r}: expected 'reservoir' or 'class_balanced'")
        self.budget, self.policy = budget, policy
        self.items: list[tuple[str, Tokenized]] = []   # (group key, item)
        self.seen = 0

    def add(self, items: list[Tokenized], task: str, rng: random.Random) -> None:
        if self.policy == "reservoir":
            for item in items:
                self.seen += 1
                if len(self.items) < self.budget:
                    self.items.append((task, item))
                else:
                    j = rng.randrange(self.seen)
                    if j < self.budget:
                        self.items[j] = (task, item)
            return
        groups: dict[str, list] = {}
        for key, item in self.items:
            groups.setdefault(key, []).append(item)
        for item in items:
            groups.setdefault(f"{task}/{item.group}", []).append(item)
        # water-filling: equal quotas, and what a small group cannot use goes to the others
        kept, left = [], self.budget
        order = sorted(groups, key=lambda k: (len(groups[k]), k))
        for i, key in enumerate(order):
            members = groups[key]
            take = min(len(members), left // (len(order) - i))
            kept += [(key, m) for m in (rng.sample(members, take) if take < len(members) else members)]
            left -= take
        kept.sort(key=lambda km: km[0])
        self.items = kept
        self.seen += len(items)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, _ in self.items:
            out[key] = out.get(key, 0) + 1
        return out


class Replay(Plugin):
    name = "replay"

    def __init__(self, budget: int = 200, alpha: float = 0.2, policy: str = "class_balanced", seed: int = 0,
                 scope: str = "all", **context):
        if not 0 <= alpha < 1:
            raise UserError(f"replay.alpha {alpha}: expected a share in [0, 1)")
        if scope not in ("all", "adapter"):
            raise UserError(f"replay.scope {scope!r}: expected 'all' or 'adapter'")
        self.alpha, self.memory, self.scope = alpha, ReplayMemory(budget, policy), scope
        self.seed = context["recipe"].seed if "recipe" in context else seed
        self.draws = 0

    def _prefix(self, ctx: StepContext) -> str:
        """The memory keys this step may store and draw: '<adapter>:' with scope adapter, else all."""
        if self.scope == "all" or ctx is None:
            return ""
        model = getattr(ctx.model, "module", ctx.model)  # under a DDP wrapper
        return f"{getattr(model, 'active_adapter', None)}:"

    def transform_items(self, ctx: StepContext, items: list) -> list:
        k = round(self.alpha * len(items))
        prefix = self._prefix(ctx)
        pool = [item for key, item in self.memory.items if key.startswith(prefix)]
        if not pool or k == 0:
            return items
        rng = random.Random(f"{self.seed}:replay:{self.draws}")
        self.draws += 1
        return items[: len(items) - k] + rng.sample(pool, min(k, len(pool)))

    def after_step(self, ctx, metrics):
        return {"replay/memory": len(self.memory.items)}

    def after_stage(self, ctx: StepContext) -> None:
        rng = random.Random(f"{self.seed}:replay-fill:{ctx.stage_index}")
        self.memory.add(list(ctx.plan.items), self._prefix(ctx) + ctx.stage, rng)

    def state_dict(self) -> dict:
        return {"draws": self.draws, "seen": self.memory.seen,
                "items": [{"key": k, **asdict(t)} for k, t in self.memory.items]}

    def load_state_dict(self, state: dict) -> None:
        self.draws, self.memory.seen = state.get("draws", 0), state.get("seen", 0)
        self.memory.items = [(d.pop("key"), Tokenized(**d)) for d in (dict(x) for x in state.get("items", []))]
