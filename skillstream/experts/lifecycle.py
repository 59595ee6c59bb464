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
from ..errors import UserError
from ..objectives.lm import per_example_loss
from .calibration import ReuseCalibrator, features as calibration_features
from .heldout import HeldOut, output_divergence
from .index import ProfileIndex
from .novelty import NoveltyDetector
from .pool import ExpertPool, ExpertRecord, MaturityRule
from .router import FeatureMemory, Router, RouterTrainer, depths_of
from .signals import (ExpertProfile, SignalConfig, SimilarityWeights, TaskSignal, compute_signal, similarity,
                      similarity_components)


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

    def __init__(self, cfg: ExpertsConfig, pool: ExpertPool | None = None):
        self.cfg = cfg
        # with held-out validation an expert leaves seeding as soon as it is mature (its held-out
        # loss has flattened), even before its seeding steps are spent
        self.pool = pool if cfg.validation.holdout > 0 else None
        self.steps: dict[str, int] = {}
        self.current: str | None = None
        self.last_loss, self.tokens_per_s = float("nan"), 0.0  # for the progress line

    def mature(self, expert: str) -> bool:
        return (self.pool is not None and expert in self.pool
                and self.pool.maturity(expert) >= self.cfg.router.maturity_threshold)

    def rate(self, expert: str) -> float:
        if self.mature(expert):
            return self.cfg.consolidation.lr
        return phase_lr(self.steps.get(expert, 0), self.cfg.seeding, self.cfg.consolidation)

    def group_lr(self, ctx: StepContext, group: dict, lr: float) -> float:
        if group.get("router"):  # dense_to_sparse: the router in the experts' optimizer
            return self.cfg.router.mixture_lr
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
        v = cfg.validation
        self.pool = ExpertPool(model, rule=MaturityRule(mature_steps=cfg.router.mature_steps, trend_window=v.trend_window,
                                                        flat_tolerance=v.flat_tolerance, needs_validation=v.holdout > 0,
                                                        loss_floor=v.loss_floor),
                               seed=seed)
        if v.holdout == 0 and (cfg.novelty.decider == "calibrated" or cfg.merge.method != "none"):
            raise UserError("experts.validation.holdout: must be at least 1 for "
                            + ("experts.novelty.decider: calibrated (its outcomes are held-out losses)"
                               if cfg.novelty.decider == "calibrated" else
                               "experts.merge (two experts' outputs are compared on their held-out examples)"))
        self.heldout = HeldOut(v.holdout, v.capacity, seed)
        dim = model.get_base_model().config.hidden_size * len(depths_of(cfg.router.depth))
        self.router = Router(dim, 1, kind=cfg.router.kind, seed=seed, pooling=cfg.router.pooling, depth=cfg.router.depth)
        self.trainer = RouterTrainer(self.router, feature_alpha=cfg.router.feature_alpha, lr=cfg.router.lr,
                                     capacity_per_expert=cfg.router.capacity_per_expert, seed=seed)
        self.novelty = NoveltyDetector(cfg.novelty.entropy_threshold, cfg.novelty.similarity_threshold,
                                       cfg.novelty.window, prefix=cfg.prefix, spread_z=cfg.novelty.spread_z,
                                       min_spread=cfg.novelty.min_spread)
        self.profiles: dict[str, ExpertProfile] = {}
        self.schedule = ExpertLR(cfg, self.pool)
        self.weights = SimilarityWeights(**cfg.novelty.weights)
        self.signal_cfg = SignalConfig(max_length=max_length, seed=seed)
        ix = cfg.index
        self.index = ProfileIndex(self.weights, kind=ix.kind, exact_below=ix.exact_below, candidates=ix.candidates,
                                  ef=ix.ef, m=ix.m, seed=seed)
        cal = cfg.novelty.calibration
        self.calibrator = (ReuseCalibrator.from_threshold(cfg.novelty.similarity_threshold, cfg.novelty.weights,
                                                          cal.prior_slope, prior_precision=cal.prior_precision,
                                                          explore=cal.explore, explore_outcomes=cal.explore_outcomes)
                           if cfg.novelty.decider == "calibrated" else None)
        self.unused: dict[str, int] = {}      # chunks in a row no input was routed to the expert (pruning)
        self.merge_checks: list[dict] = []    # the pairs the last chunk's merge check compared, and how alike
        self.retired = 0                      # experts merged away or pruned (they no longer fill the pool)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # within one chunk (never checkpointed: a chunk is saved when it is done)
        self.outcome: dict | None = None      # the decision whose outcome the round measures
        self.round: dict | None = None        # the round in progress: its held-out items and losses before
        self.rounds: dict[str, dict] = {}     # what each round of this chunk measured, for the decision record

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
        w = self.weights
        components = {n: similarity_components(signal, self.profiles[n].signal)
                      for n in self.index.candidates(signal, self.profiles)}
        sims = {n: w.embedding * c["embedding"] + w.gradient * c["gradient"] + w.context * c["context"]
                for n, c in components.items()}
        best = max(sims, key=sims.get) if sims else None
        with torch.no_grad():
            entropy = float(self.router.entropy(features).mean()) if self.router.n_experts >= 2 else None
        reusable, calibrated = None, {}
        if self.calibrator is not None and sims:
            x = {n: calibration_features(c, entropy) for n, c in components.items()}
            p = {n: self.calibrator.probability(v) for n, v in x.items()}
            upper = {n: self.calibrator.upper(v) for n, v in x.items()}
            reusable = {n: p[n] for n in sims if upper[n] >= self.cfg.novelty.calibration.reuse_probability}
            calibrated = {"x": x, "p": p}
        record = self.novelty.observe(entropy, sims[best] if best else None, best, sims, reusable)
        if record["decision"] == "create" and self.novelty.created - self.retired > self.cfg.max_experts:
            self.novelty.created -= 1  # the pool is full: the closest expert takes the skill
            self.novelty.current = record["expert"] = best
            record["decision"] = "reuse (pool full)"
        record["similarities"] = {k: round(v, 4) for k, v in sims.items()}
        record["best"] = best
        if len(components) < len(self.profiles):
            record["index_candidates"] = len(components)
        self.rounds, self.outcome = {}, None
        if calibrated:
            record["p_reuse"] = {n: round(v, 4) for n, v in calibrated["p"].items()}
            record["exploring"] = self.calibrator.exploring()
            judged = record["expert"] if record["decision"].startswith("reuse") else best
            if record["decision"] != "wait" and judged in calibrated["x"]:
                self.outcome = {"kind": "reuse" if record["decision"].startswith("reuse") else "create",
                                "expert": record["expert"], "against": best,
                                "x": calibrated["x"][judged], "p": calibrated["p"][judged]}
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

    def index_of(self, name: str) -> int:
        return self.pool.names.index(name)

    # -- a training round: held-out examples, maturity, the decision's outcome ------------------------
    def begin_round(self, name: str, chunks: list[tuple[int, list]]) -> list:
        """The items of the chunks (index, items) that `name` trains on; with validation on, a few of
        each chunk are held out, and its loss on its held-out set before the round is measured."""
        if not self.heldout.enabled:
            return [it for _, items in chunks for it in items]
        train, held = self.heldout.split(chunks)
        old = self.heldout.of(name)
        before = self._losses(name, old) if old else []
        self.round = {"name": name, "held": held, "old": len(old), "before": before}
        return train

    def end_round(self, name: str) -> None:
        """After `name` trained: its held-out change (maturity), its new held-out items, and the
        outcome of the chunk's decision when this round settles it (calibrated decider)."""
        r, self.round = self.round, None
        if r is None:
            return
        old = self.heldout.of(name)
        losses = self._losses(name, old + r["held"])
        info: dict = {"held_out": len(r["held"])}
        change = None
        if r["old"]:
            before, after = _mean(r["before"]), _mean(losses[:r["old"]])
            change = self.pool.record_validation(name, before, after, loss=_mean(losses))
            info.update(val_before=round(before, 5), val_after=round(after, 5), val_change=round(change, 5))
        elif losses:
            self.pool.record(name).val_loss = _mean(losses)
        self.heldout.add(name, r["held"])
        info["maturity"] = round(self.pool.maturity(name), 4)
        o = self.outcome
        tol = self.cfg.novelty.calibration.harm_tolerance
        if self.calibrator is not None and o is not None and o["expert"] == name:
            success = None
            if o["kind"] == "reuse" and change is not None:
                success = change <= tol  # the reuse did not raise the expert's own held-out loss
                info["outcome"] = {"kind": "reuse", "success": success, "val_change": round(change, 5)}
            elif o["kind"] == "create" and r["held"] and o["against"] in self.pool:
                new = _mean(losses[len(old):])
                reuse = _mean(self._losses(o["against"], r["held"]))
                success = not new < reuse * (1 - tol)  # the new expert did not beat reusing the best old one
                info["outcome"] = {"kind": "create", "success": success, "new_loss": round(new, 5),
                                   "reuse_loss": round(reuse, 5), "against": o["against"]}
            if success is not None:
                self.calibrator.record(o["x"], success, o["p"])
                self.outcome = None
        self.rounds[name] = info

    def reuse_brier(self) -> float | None:
        """The calibrated decider's Brier score on its outcomes so far (None: threshold decider or none yet)."""
        return None if self.calibrator is None else self.calibrator.calibration()["brier"]

    def _losses(self, name: str, items: list) -> list[float]:
        self.pool.activate(name)
        return per_example_loss(self.model, items, self.pad_id)

    # -- merge and prune ---------------------------------------------------------------------------
    def maintain(self, shares: dict[str, float], trained: list[str], step: int) -> list[dict]:
        """After a chunk: prune experts no input has been routed to (nor trained) for `prune.unused_chunks`
        chunks, then merge one pair of converged experts. Returns the events, in order:
        {"prune": name} and {"merge": [a, b], "into": new}."""
        events: list[dict] = []
        for n in self.pool.names:
            self.unused[n] = 0 if shares.get(n, 0.0) > 0 or n in trained else self.unused.get(n, 0) + 1
        limit = self.cfg.prune.unused_chunks
        if limit:
            for n in list(self.pool.names):
                if self.unused[n] >= limit and n != self.novelty.current and len(self.pool) > 1:
                    self.remove(n)
                    events.append({"prune": n, "unused_chunks": limit})
        if self.cfg.merge.method != "none":
            pair = self.converged(trained)
            if pair is not None:
                events.append(self.merge(pair[0], pair[1], step, pair[2]))
        return events

    def converged(self, trained: list[str]) -> tuple[str, str, dict] | None:
        """The first pair (one of them trained this chunk) whose profiles are at least `merge.similarity`
        alike and that pass the merge criterion on their held-out examples: outputs at most
        `merge.max_output_kl` apart (output_kl), each recovering at least `merge.min_transfer` of the
        other's held-out gain (heldout_gain), or their merge keeping that share of each one's own gain
        (merged_gain). Every pair compared is logged in the chunk's decision (`merge_checks`: the profile
        similarity, and the criterion's measure where the profiles passed), so a merge that does not
        happen says by how much it missed."""
        m = self.cfg.merge
        measure = {"output_kl": "output_kl", "heldout_gain": "transfer", "merged_gain": "merged_share"}[m.criterion]
        by_kl = m.criterion == "output_kl"
        self.merge_checks = []
        for a in [n for n in trained if n in self.pool and n in self.profiles]:
            for b in self.pool.names:
                if b == a or b not in self.profiles:
                    continue
                sim = similarity(self.profiles[a].signal, self.profiles[b], self.weights)
                check = {"pair": [a, b], "profile_similarity": round(sim, 4), measure: None}
                self.merge_checks.append(check)
                held = (self.heldout.of(a), self.heldout.of(b))
                if sim < m.similarity or not (any(held) if by_kl else all(held)):  # a gain needs each one's own set
                    continue
                if by_kl:
                    kl = output_divergence(self.model, (a, b), held[0] + held[1], self.pad_id)
                    check["output_kl"] = round(kl, 6)
                    passed = kl <= m.max_output_kl
                else:
                    shares = self.transfer(a, b) if m.criterion == "heldout_gain" else self.merged_share(a, b)
                    check[measure] = [None if t is None else round(t, 4) for t in shares]
                    passed = all(t is not None and t >= m.min_transfer for t in shares)
                if passed:
                    first, second = sorted((a, b), key=self.pool.names.index)
                    return first, second, {k: v for k, v in check.items() if k != "pair"}
        return None

    def kept_share(self, own: str, by: str) -> float | None:
        """The share of expert `own`'s gain on its held-out examples that adapter `by` recovers there. A
        gain is the backbone's mean labelled-token loss less the adapter's; None where `own`'s gain is not
        positive (it has nothing another could recover)."""
        items = self.heldout.of(own)
        with self.model.disable_adapter():
            base = _mean(per_example_loss(self.model, items, self.pad_id))
        gain_own = base - _mean(self._losses(own, items))
        return (base - _mean(self._losses(by, items))) / gain_own if gain_own > 0 else None

    def transfer(self, a: str, b: str) -> tuple[float | None, float | None]:
        """(the share of a's own held-out gain that b recovers on a's held-out examples, the same for a on b's)."""
        return self.kept_share(a, by=b), self.kept_share(b, by=a)

    def merged_share(self, a: str, b: str) -> tuple[float | None, float | None]:
        """(the share of a's own held-out gain that the merge of a and b keeps on a's held-out examples, the
        same on b's). The merge is made exactly as `merge` would make it (weights, method, density and the
        name that seeds DARE's drops), measured, and removed; the global random state is left untouched, so
        a check that does not merge changes nothing in the run."""
        m = self.cfg.merge
        trial = f"{self.cfg.prefix}{self.novelty.created}"
        with torch.random.fork_rng(devices=[]):
            self.pool.merge_in_shape([a, b], self._merge_weights(a, b), m.method, trial, density=m.density)
            try:
                return self.kept_share(a, by=trial), self.kept_share(b, by=trial)
            finally:
                self.pool.prune(trial)

    def _merge_weights(self, a: str, b: str) -> list[float]:
        """The merge's weights: by the steps each trained. ties / dare_ties average the deltas that agree in
        sign (a disjoint mean), so weights around 1 keep the scale; dare_linear sums them: weights that sum to 1."""
        steps = [max(1, self.pool.record(n).steps_trained) for n in (a, b)]
        share = [s / sum(steps) for s in steps]
        return [2 * x for x in share] if self.cfg.merge.method in ("ties", "dare_ties") else share

    def merge(self, a: str, b: str, step: int, why: dict | None = None) -> dict:
        """`a` and `b` become one new expert (the next name) by the recipe's TIES/DARE merge, weighted by
        the steps each trained; the router's two classes fold into one, their profiles, held-out sets,
        novelty histories and step counts combine."""
        m = self.cfg.merge
        new = f"{self.cfg.prefix}{self.novelty.created}"
        self.novelty.created += 1
        ia, ib = self.index_of(a), self.index_of(b)
        weights = self._merge_weights(a, b)
        rec = self.pool.merge_in_shape([a, b], weights, m.method, new, density=m.density, step=step)
        older = max((a, b), key=lambda n: self.pool.record(n).steps_trained)
        rec.steps_trained = max(self.pool.record(n).steps_trained for n in (a, b))
        # the merged outputs agree with both (the merge's condition): the longer-trained one's trend carries over
        rec.val_changes, rec.val_loss = list(self.pool.record(older).val_changes), self.pool.record(older).val_loss
        self.trainer.regroup([i for i in range(len(self.pool.names) - 1) if i not in (ia, ib)], [ia, ib])
        pa, pb = self.profiles.pop(a, None), self.profiles.pop(b, None)
        signals = [p.signal for p in (pa, pb) if p is not None and p.signal is not None]
        if signals:
            merged = ExpertProfile(new, signals[0] if len(signals) == 1 else signals[0].merged(signals[1]), step,
                                   sum(p.refreshes for p in (pa, pb) if p is not None))
            self.profiles[new] = merged
        self.heldout.merge([a, b], new)
        hist = self.novelty.history
        if a in hist or b in hist:
            hist[new] = hist.pop(a, []) + hist.pop(b, [])
        if self.novelty.current in (a, b):
            self.novelty.current = new
        self.schedule.steps[new] = max(self.schedule.steps.pop(a, 0), self.schedule.steps.pop(b, 0))
        if self.schedule.current in (a, b):
            self.schedule.current = new
        self.unused[new] = min(self.unused.pop(a, 0), self.unused.pop(b, 0))
        for n in (a, b):
            self.pool.prune(n)
        self.retired += 2
        self.index.invalidate()
        loss = self.trainer.refit(max(self.cfg.router.refit_steps, self.cfg.router.steps_per_chunk))
        return {"merge": [a, b], "into": new, "method": m.method, "weights": [round(x, 4) for x in weights],
                "router_loss": loss, **(why or {})}

    def remove(self, name: str) -> None:
        """Prune an expert: its adapter, router class, profile, held-out set and counters."""
        i = self.index_of(name)
        self.trainer.regroup([j for j in range(len(self.pool.names)) if j != i])
        self.pool.prune(name)
        for table in (self.profiles, self.novelty.history, self.schedule.steps, self.unused):
            table.pop(name, None)
        self.heldout.drop(name)
        self.retired += 1
        self.index.invalidate()

    def learn_chunk(self, name: str, signals: list[TaskSignal], features: torch.Tensor, steps: int, step: int,
                    *, router: bool = True) -> float:
        """After the expert trained on chunks: refresh its profile, count its steps, train the router
        (router=False: it was taught the chunk before the experts trained, see `route_chunk`)."""
        for signal in signals:
            self.profiles.setdefault(name, ExpertProfile(name)).refresh(signal, step)
        self.index.invalidate()
        self.pool.record_training(name, steps)
        return self.route_chunk(name, features) if router else float("nan")

    def route_chunk(self, name: str, features: torch.Tensor) -> float:
        """The router learns that the chunk's inputs belong to `name` (cross-entropy with feature replay,
        then the refit on its memory). dense_to_sparse calls it before the chunk trains through the
        mixture, so the mixture already weighs the decided expert (a new expert's router class starts at
        zero: otherwise the old experts would take the new skill's gradient)."""
        return self.trainer.learn_chunk(features, self.index_of(name), self.cfg.router.steps_per_chunk,
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
                "heldout": self.heldout.state_dict(), "unused": dict(self.unused), "retired": self.retired,
                "calibrator": self.calibrator.state_dict() if self.calibrator is not None else None,
                "router": {"config": self.router.config(), "weights": dict(self.router.state_dict())},
                "memory": {"tensors": mem_tensors, "meta": mem_meta},
                "router_adam": {"state": {str(k): v for k, v in opt["state"].items()}, "param_groups": opt["param_groups"]}}

    def load_state_dict(self, state: dict) -> None:
        """Recreate the experts the state names (in creation order), then restore everything else."""
        records = [ExpertRecord.from_json(r) for r in state["pool"]["experts"]]
        for rec in records:
            if rec.name not in self.pool:
                self.pool.create(rec.name, step=rec.created_step)
        for name in self.pool.names:  # the first expert the model arrived with may have been merged or pruned
            if name not in {r.name for r in records}:
                self.pool.prune(name)
        self.pool.records = {r.name: r for r in records}
        self.heldout.load_state_dict(state.get("heldout", {}))
        self.unused = dict(state.get("unused", {}))
        self.retired = state.get("retired", 0)
        if self.calibrator is not None and state.get("calibrator") is not None:
            self.calibrator.load_state_dict(state["calibrator"])
        self.index.invalidate()
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def chunk_steps(n_examples: int, epochs: float, batch_size: int) -> int:
    return max(1, math.ceil(n_examples * epochs / batch_size))
