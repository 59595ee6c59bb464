"""The DyLoRA-MoE skill lifecycle: novelty -> new expert -> high-rate seeding -> low-rate consolidation.

`Lifecycle` holds what the learner knows about its skills — the expert pool, the router and its
feature memory, the experts' signal profiles, the novelty detector, and each expert's own step
count — and takes the per-chunk decisions. It never sees a task label: the stream runner
(skillstream/experts/stream_run.py) hands it chunks of examples and trains the expert it names.

Per-expert learning rates: every expert is its own optimizer parameter group (tagged
`group["expert"]`), and `ExpertLR` (a plugin on the engine's `group_lr` hook) sets each group's
rate from THAT expert's step count, so an old expert consolidates at its low rate while a new one
seeds at a high rate. The rates are absolute (the public TwoPhaseLRScheduler multiplied the base
rate by an absolute rate, so its "1e-4" became 1e-4 x base).
"""
from __future__ import annotations

import math

import torch

from ..config import ExpertsConfig, PhaseConfig
from ..curriculum.schedules import warmup_stable_decay
from ..engine import decay_groups
from ..plugins import Plugin, StepContext
from .novelty import NoveltyDetector
from .pool import ExpertPool, ExpertRecord, MaturityRule
from .router import FeatureMemory, Router, RouterTrainer, depths_of
from .signals import ExpertProfile, SignalConfig, SimilarityWeights, TaskSignal, compute_signal, similarity


def phase_lr(step: int, seeding: PhaseConfig, consolidation: PhaseConfig) -> float:
    """The learning rate of an expert that has trained `step` optimizer steps.

    Seeding (steps 0 .. seeding.steps - 1):
      wsd      linear warmup to seeding.lr, stable, then a linear decay that lands on
               consolidation.lr at the last seeding step (no jump between the phases);
      cyclic   `cycles` triangles between consolidation.lr and seeding.lr;
      constant seeding.lr.
    Consolidation (afterwards): consolidation.lr.
    """
    n, hi, lo = seeding.steps, seeding.lr, consolidation.lr
    if step >= n:
        return lo
    if seeding.shape == "constant":
        return hi
    if seeding.shape == "cyclic":
        period = n / seeding.cycles
        t = (step % period) / period
        return lo + (hi - lo) * (1 - abs(2 * t - 1))
    decay = max(1, round(seeding.decay_fraction * n))  # the last `decay` seeding steps: the last one is at lo
    return warmup_stable_decay(step, warmup_steps=seeding.warmup_steps, decay_start=n - decay - 1, decay_steps=decay,
                               peak=hi, end=lo)


class ExpertLR(Plugin):
    """Sets each expert's parameter group to its own phase rate and counts the steps it trains."""
    name = "expert_lifecycle"

    def __init__(self, cfg: ExpertsConfig):
        self.cfg = cfg
        self.steps: dict[str, int] = {}
        self.current: str | None = None
        self.last_loss, self.tokens_per_s = float("nan"), 0.0  # for the progress line

    def rate(self, expert: str) -> float:
        return phase_lr(self.steps.get(expert, 0), self.cfg.seeding, self.cfg.consolidation)

    def group_lr(self, ctx: StepContext, group: dict, lr: float) -> float:
        return self.rate(group["expert"]) if "expert" in group else lr

    def after_step(self, ctx: StepContext, metrics: dict) -> dict:
        rate = self.rate(self.current)  # the rate this step used
        self.last_loss = metrics.get("loss", self.last_loss)
        self.tokens_per_s = metrics.get("tokens_per_s", self.tokens_per_s)
        self.steps[self.current] = self.steps.get(self.current, 0) + 1
        return {f"lr/{self.current}": rate, "expert_steps": self.steps[self.current]}

    def state_dict(self) -> dict:
        return {"steps": dict(self.steps), "current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.current = dict(state.get("steps", {})), state.get("current")


def expert_groups(pool: ExpertPool, name: str, weight_decay: float) -> list[dict]:
    """An expert's optimizer parameter groups (matrices decay, vectors do not), tagged with its name."""
    return decay_groups(list(pool.parameters_of(name).values()), weight_decay, expert=name)


class Lifecycle:
    """Pool + router + profiles + novelty: the reuse-or-create decision for each chunk of the stream.

    The model arrives with one adapter, PREFIX0 (the first chunk always creates it: with no expert
    there is nothing to reuse), so the PeftModel exists from the start.
    """

    def __init__(self, model, tokenizer, renderer, cfg: ExpertsConfig, *, seed: int, max_length: int):
        self.model, self.tok, self.renderer, self.cfg = model, tokenizer, renderer, cfg
        self.pool = ExpertPool(model, rule=MaturityRule(mature_steps=cfg.router.mature_steps), seed=seed)
        dim = model.get_base_model().config.hidden_size * len(depths_of(cfg.router.depth))
        self.router = Router(dim, 1, kind=cfg.router.kind, seed=seed, pooling=cfg.router.pooling, depth=cfg.router.depth)
        self.trainer = RouterTrainer(self.router, feature_alpha=cfg.router.feature_alpha, lr=cfg.router.lr,
                                     capacity_per_expert=cfg.router.capacity_per_expert, seed=seed)
        self.novelty = NoveltyDetector(cfg.novelty.entropy_threshold, cfg.novelty.similarity_threshold,
                                       cfg.novelty.window, prefix=cfg.prefix, spread_z=cfg.novelty.spread_z,
                                       min_spread=cfg.novelty.min_spread)
        self.profiles: dict[str, ExpertProfile] = {}
        self.schedule = ExpertLR(cfg)
        self.weights = SimilarityWeights(**cfg.novelty.weights)
        self.signal_cfg = SignalConfig(max_length=max_length, seed=seed)

    # -- measuring a chunk -------------------------------------------------------------------------
    def prompt_features(self, examples) -> torch.Tensor:
        """Pooled backbone features of the examples' prompts, tokenized exactly as generation sees them."""
        from ..data.batching import collate
        from ..data.render import Tokenized

        feats = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for i in range(0, len(examples), 8):
            items = []
            for ex in examples[i:i + 8]:
                # plain text has no prompt: a served request is the text itself
                text = ex.text if ex.kind == "text" else self.renderer.prompt_text(ex)
                ids = self.tok(text, add_special_tokens=True)["input_ids"]
                ids = ids[-self.signal_cfg.max_length:]  # keep the end: the request sits after the tool schemas
                items.append(Tokenized(ids, list(ids), False))
            batch = collate(items, pad)
            feats.append(self.router.read(self.model, {k: batch[k].to(self.model.device)
                                                       for k in ("input_ids", "attention_mask")}))
        return torch.cat(feats)

    def decide(self, examples) -> tuple[dict, TaskSignal, torch.Tensor]:
        """(decision record, the chunk's signal, its prompt features) for the next chunk."""
        signal = compute_signal(self.model, self.tok, examples[:self.cfg.novelty.signal_examples],
                                config=self.signal_cfg)
        features = self.prompt_features(examples)
        sims = {n: similarity(signal, p, self.weights) for n, p in self.profiles.items()}
        best = max(sims, key=sims.get) if sims else None
        with torch.no_grad():
            entropy = float(self.router.entropy(features).mean()) if self.router.n_experts >= 2 else None
        record = self.novelty.observe(entropy, sims[best] if best else None, best, sims)
        if record["decision"] == "create" and self.novelty.created > self.cfg.max_experts:
            self.novelty.created -= 1  # the pool is full: the closest expert takes the skill
            self.novelty.current = record["expert"] = best
            record["decision"] = "reuse (pool full)"
        record["similarities"] = {k: round(v, 4) for k, v in sims.items()}
        record["best"] = best
        return record, signal, features

    def adopt(self, record: dict, step: int) -> bool:
        """Make the expert the decision names exist; True when it is new (it needs an optimizer group)."""
        name = record["expert"]
        if name in self.pool:
            return False
        fork = record.get("best") if self.cfg.fork else None
        self.pool.create(name, fork_from=fork, step=step)
        self.trainer.add_expert()
        return True

    def index(self, name: str) -> int:
        return self.pool.names.index(name)

    def learn_chunk(self, name: str, signals: list[TaskSignal], features: torch.Tensor, steps: int, step: int) -> float:
        """After the expert trained on chunks: refresh its profile, count its steps, train the router."""
        for signal in signals:
            self.profiles.setdefault(name, ExpertProfile(name)).refresh(signal, step)
        self.pool.record_training(name, steps)
        return self.trainer.learn_chunk(features, self.index(name), self.cfg.router.steps_per_chunk,
                                        self.cfg.router.refit_steps)

    def routed_shares(self, features: torch.Tensor) -> dict[str, float]:
        """Each expert's share of the inputs whose top router choice it is (the chunk's, as it arrives)."""
        with torch.no_grad():
            top = self.router.probs(features.cpu()).argmax(-1).tolist()
        return {name: top.count(i) / max(len(top), 1) for i, name in enumerate(self.pool.names)}

    def maturities(self) -> torch.Tensor:
        return self.pool.maturities(self.pool.names)

    # -- state (a checkpoint's JSON + tensors; see checkpoint.split_tensors) -------------------------
    def state_dict(self) -> dict:
        mem_tensors, mem_meta = self.trainer.memory.state_dict()
        opt = self.trainer.optimizer.state_dict()
        profiles = []
        for p in self.profiles.values():
            tensors, meta = p.state()
            profiles.append({"tensors": tensors, "meta": meta})
        return {"pool": self.pool.metadata(), "novelty": self.novelty.state_dict(),
                "schedule": self.schedule.state_dict(), "profiles": profiles,
                "router": {"config": self.router.config(), "weights": dict(self.router.state_dict())},
                "memory": {"tensors": mem_tensors, "meta": mem_meta},
                "router_adam": {"state": {str(k): v for k, v in opt["state"].items()}, "param_groups": opt["param_groups"]}}

    def load_state_dict(self, state: dict) -> None:
        """Recreate the experts the state names (in creation order), then restore everything else."""
        records = [ExpertRecord(**r) for r in state["pool"]["experts"]]
        for rec in records:
            if rec.name not in self.pool:
                self.pool.create(rec.name, step=rec.created_step)
        self.pool.records = {r.name: r for r in records}
        self.novelty.load_state_dict(state["novelty"])
        self.schedule.load_state_dict(state["schedule"])
        self.profiles = {p["meta"]["name"]: ExpertProfile.from_state(p["tensors"], p["meta"]) for p in state["profiles"]}
        router = Router(**state["router"]["config"])
        router.load_state_dict(state["router"]["weights"])
        self.router.head, self.router.trunk = router.head, router.trunk
        memory = FeatureMemory()
        memory.load_state_dict(state["memory"]["tensors"], state["memory"]["meta"])
        self.trainer.memory = memory
        self.trainer.optimizer = torch.optim.Adam(self.router.parameters(), lr=self.trainer.lr)
        adam = state["router_adam"]
        self.trainer.optimizer.load_state_dict({"state": {int(k): v for k, v in adam["state"].items()},
                                                "param_groups": adam["param_groups"]})


def chunk_steps(n_examples: int, epochs: float, batch_size: int) -> int:
    return max(1, math.ceil(n_examples * epochs / batch_size))
