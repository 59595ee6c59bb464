"""A sequence-level router over what the frozen backbone sees, trained without forgetting old experts.

The router reads `pooled_features` of the frozen backbone (adapters off), so its input does not
drift as experts train: the hidden states at a relative `depth` of the layer stack (1.0 = the final,
normed output), pooled over real tokens (`mean`) or read at the last real token (`last`, the state
from which the model is about to answer). Mean-pooling the final layer is the classic choice; on
SmolLM2-135M it could not tell "a question this function answers" from "one it does not" (BFCL
simple vs irrelevance), the last token at 0.4 depth did much better (bench/RESULTS.md, 2026-11-23).
`depth` may also list several depths: their features are concatenated and the router normalises
each depth's block on its own (0.4 and 0.6 together route dylora_moe's skills 0.01-0.02 better than
either alone; bench/RESULTS.md, 2026-12-02 16:00). It is trained by cross-entropy on
which expert a chunk belongs to. Trained on the current expert's chunks only, a softmax head
quickly sends everything to the newest expert; `FeatureMemory` prevents that: it keeps, per
expert, a running-mean prototype and a reservoir of past features, and `RouterTrainer` draws a
`feature_alpha` share of every router batch from that reservoir (plus one prototype per expert).
Features are a few hundred floats, so this replay costs almost nothing, unlike replaying text.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..config import relative_depths
from ..errors import UserError
from ..evaluation.precision import eval_autocast
from ..models.modes import eval_mode
from .mixing import backbone_only

ROUTER_WEIGHTS, ROUTER_CONFIG = "router.safetensors", "router.json"
TRAINER_WEIGHTS, TRAINER_CONFIG = "router_trainer.safetensors", "router_trainer.json"


def transformer_body(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer without its LM head (the head's vocabulary-sized matmul is not needed)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, getattr(hf, "base_model_prefix", ""), hf)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


POOLINGS = ("mean", "last")


class _Reached(Exception):
    """Raised by the hook on the deepest chosen layer: the layers above it are not computed."""


def decoder_layers(body: torch.nn.Module) -> torch.nn.ModuleList:
    n = getattr(getattr(body, "config", None), "num_hidden_layers", None)
    layers = getattr(body, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    for module in body.modules():  # GPT-2 style: `h`; others: the ModuleList as long as the model is deep
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise UserError(f"router depth < 1: cannot find the decoder layers of {type(body).__name__}")


def depths_of(depth: float | Sequence[float]) -> tuple[float, ...]:
    """A router depth (one relative depth, or several whose features are concatenated) as a checked tuple."""
    try:
        return relative_depths(depth)
    except ValueError as err:
        raise UserError(f"router depth {err}, got {depth}") from None


def _hidden_at(body: torch.nn.Module, depths: tuple[float, ...], **inputs) -> list[torch.Tensor]:
    """Hidden states after round(d * n_layers) decoder layers for each d (1.0: the final normed output);
    the layers above the deepest one asked for are not computed."""
    if all(d >= 1.0 for d in depths):
        out = body(**inputs).last_hidden_state
        return [out for _ in depths]
    layers = decoder_layers(body)
    index = {d: min(len(layers), max(1, round(d * len(layers)))) - 1 for d in depths if d < 1.0}
    seen: dict[int, torch.Tensor] = {}
    stop_at = None if any(d >= 1.0 for d in depths) else max(index.values())

    def hook_for(i: int):
        def record(module, args, output):
            seen[i] = output[0] if isinstance(output, tuple) else output
            if i == stop_at:
                raise _Reached
        return record

    handles = [layers[i].register_forward_hook(hook_for(i)) for i in sorted(set(index.values()))]
    final = None
    try:
        final = body(**inputs).last_hidden_state
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if any(i not in seen for i in index.values()):
        raise RuntimeError("router features: a chosen decoder layer never ran")
    return [final if d >= 1.0 else seen[index[d]] for d in depths]


def last_real(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's hidden state at its last real token (left or right padding alike)."""
    index = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    return hidden[torch.arange(hidden.shape[0]), index]


@torch.no_grad()
def pooled_features(model: torch.nn.Module, batch: dict, pooling: str = "mean",
                    depth: float | Sequence[float] = 1.0) -> torch.Tensor:
    """(batch, hidden x len(depths)) features of the frozen backbone: its hidden states at `depth`
    (or at each of several depths, concatenated shallow to deep), averaged over non-pad tokens
    (`mean`) or taken at the last real token (`last`)."""
    if pooling not in POOLINGS:
        raise UserError(f"router pooling must be one of {POOLINGS}, got {pooling!r}")
    depths = depths_of(depth)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])
    # positions counted over real tokens, so a left-padded prompt (generation) and a right-padded one
    # (training) give the same features
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with backbone_only(model), eval_mode(model), eval_autocast(model):  # the run's precision (evaluation/precision.py)
        hidden = _hidden_at(transformer_body(model), depths, input_ids=batch["input_ids"], attention_mask=mask,
                            position_ids=positions, use_cache=False)
    pool = masked_mean if pooling == "mean" else last_real
    return torch.cat([pool(h.float(), mask) for h in hidden], dim=-1)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row divided by log(n): 0 = certain, 1 = uniform (0 when n < 2)."""
    n = probs.shape[-1]
    if n < 2:
        return torch.zeros(probs.shape[:-1])
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(n)


class Router(torch.nn.Module):
    """Logits over experts from pooled features; kind "linear" or "mlp" (one hidden GELU layer)."""

    def __init__(self, dim: int, n_experts: int = 1, kind: str = "linear", hidden: int = 128, seed: int = 0,
                 pooling: str = "mean", depth: float | Sequence[float] = 1.0):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise UserError(f"router kind must be 'linear' or 'mlp', got {kind!r}")
        if n_experts < 1:
            raise UserError(f"router needs at least one expert, got {n_experts}")
        if pooling not in POOLINGS:
            raise UserError(f"router pooling must be one of {POOLINGS}, got {pooling!r}")
        depths = depths_of(depth)
        if dim % len(depths):
            raise UserError(f"router features of width {dim} cannot be {len(depths)} equal blocks (depth {depth})")
        self.dim, self.kind, self.hidden, self.seed = dim, kind, hidden, seed
        # one depth is stored as a number, as routers saved before several depths existed
        self.pooling, self.depth = pooling, depths[0] if len(depths) == 1 else list(depths)
        self.blocks = len(depths)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.random.default_generator.manual_seed(seed)
            self.trunk = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU()) if kind == "mlp" \
                else torch.nn.Identity()
            self.head = torch.nn.Linear(hidden if kind == "mlp" else dim, n_experts)

    @property
    def n_experts(self) -> int:
        return self.head.out_features

    def read(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The features this router was trained on, for a batch of token ids."""
        return pooled_features(model, batch, self.pooling, self.depth)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # Per-sample standardisation: backbone features have large shared offsets and outlier
        # dimensions; this keeps the head's scale sane without running statistics that would drift.
        # Each depth's block is normalised on its own: deeper layers have larger norms and would
        # otherwise drown the shallower ones.
        x = features.float()
        x = F.layer_norm(x.unflatten(-1, (self.blocks, self.dim // self.blocks)), (self.dim // self.blocks,)).flatten(-2)
        return self.head(self.trunk(x))

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        return self.forward(features).softmax(-1)

    def entropy(self, features: torch.Tensor) -> torch.Tensor:
        return normalized_entropy(self.probs(features))

    def add_expert(self) -> int:
        """Grow the output layer by one row; old rows are kept, the new one starts at zero."""
        old = self.head
        # built on the meta device and filled by hand: nn.Linear's own init would consume the global RNG
        new = torch.nn.Linear(old.in_features, old.out_features + 1, device="meta", dtype=old.weight.dtype)
        new = new.to_empty(device=old.weight.device)
        with torch.no_grad():
            new.weight.zero_()
            new.bias.zero_()
            new.weight[: old.out_features] = old.weight
            new.bias[: old.out_features] = old.bias
        self.head = new
        return self.n_experts - 1

    def regroup(self, keep: list[int], fold: list[int] | None = None) -> None:
        """The head's rows `keep` in that order, then (when `fold` is given) one row for the folded
        classes: their mean weight and the log-sum-exp of their biases, so that where their logits
        agree the new class takes their summed probability. Expert removal and merging use it."""
        old = self.head
        rows = len(keep) + (1 if fold else 0)
        new = torch.nn.Linear(old.in_features, rows, device="meta", dtype=old.weight.dtype).to_empty(device=old.weight.device)
        with torch.no_grad():
            new.weight[:len(keep)] = old.weight[keep]
            new.bias[:len(keep)] = old.bias[keep]
            if fold:
                new.weight[-1] = old.weight[fold].mean(0)
                new.bias[-1] = old.bias[fold].logsumexp(0)
        self.head = new

    def config(self) -> dict:
        return {"dim": self.dim, "n_experts": self.n_experts, "kind": self.kind, "hidden": self.hidden, "seed": self.seed,
                "pooling": self.pooling, "depth": self.depth}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        from ..checkpoint import require_finite
        require_finite(self.state_dict(), f"{directory / ROUTER_WEIGHTS}")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(directory / ROUTER_WEIGHTS))
        (directory / ROUTER_CONFIG).write_text(json.dumps(self.config(), indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "Router":
        directory = Path(directory)
        router = cls(**json.loads((directory / ROUTER_CONFIG).read_text()))
        router.load_state_dict(load_file(str(directory / ROUTER_WEIGHTS)))
        return router


class FeatureMemory:
    """Per-expert prototypes (running means) and reservoirs of past features, reproducible by seed.

    Every random choice is drawn from a generator seeded by (seed, expert, count), so the memory
    has no RNG state to checkpoint: its tensors and counters are the whole state.
    """

    def __init__(self, capacity_per_expert: int = 64, seed: int = 0):
        self.capacity, self.seed = capacity_per_expert, seed
        self.buffers: list[torch.Tensor] = []     # per expert: (<= capacity, dim)
        self.prototypes: list[torch.Tensor] = []  # per expert: (dim,)
        self.seen: list[int] = []                 # features offered per expert
        self.draws = 0                            # samples drawn so far (seeds the next draw)

    def _grow(self, expert: int, dim: int) -> None:
        while len(self.buffers) <= expert:
            self.buffers.append(torch.zeros(0, dim))
            self.prototypes.append(torch.zeros(dim))
            self.seen.append(0)

    def add(self, features: torch.Tensor, expert: int) -> None:
        features = features.detach().float().cpu()
        self._grow(expert, features.shape[-1])
        for f in features:
            n = self.seen[expert] = self.seen[expert] + 1
            self.prototypes[expert] += (f - self.prototypes[expert]) / n
            buf = self.buffers[expert]
            if len(buf) < self.capacity:
                self.buffers[expert] = torch.cat([buf, f[None]])
            else:  # reservoir sampling: every feature seen so far is kept with equal probability
                j = random.Random(f"{self.seed}:{expert}:{n}").randrange(n)
                if j < self.capacity:
                    buf[j] = f

    def experts(self) -> list[int]:
        return [e for e, b in enumerate(self.buffers) if len(b)]

    def regroup(self, keep: list[int], fold: list[int] | None = None) -> None:
        """Experts `keep` in that order, then (when `fold` is given) one expert holding the folded
        experts' features (all of them: the reservoir keeps replacing within its capacity) and their
        count-weighted prototype. Mirrors Router.regroup."""
        dim = next((b.shape[-1] for b in self.buffers), 0)
        for e in keep + (fold or []):
            self._grow(e, dim)
        buffers = [self.buffers[e] for e in keep]
        prototypes = [self.prototypes[e] for e in keep]
        seen = [self.seen[e] for e in keep]
        if fold:
            n = sum(self.seen[e] for e in fold)
            buffers.append(torch.cat([self.buffers[e] for e in fold]))
            prototypes.append(sum(self.prototypes[e] * self.seen[e] for e in fold) / max(n, 1))
            seen.append(n)
        self.buffers, self.prototypes, self.seen = buffers, prototypes, seen

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n stored features, experts chosen uniformly (old and new skills weigh the same)."""
        experts = self.experts()
        if n <= 0 or not experts:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        rng = random.Random(f"{self.seed}:draw:{self.draws}")
        self.draws += 1
        labels = [rng.choice(experts) for _ in range(n)]
        feats = torch.stack([self.buffers[e][rng.randrange(len(self.buffers[e]))] for e in labels])
        return feats, torch.tensor(labels)

    def everything(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored feature with its expert label."""
        experts = self.experts()
        return (torch.cat([self.buffers[e] for e in experts]),
                torch.cat([torch.full((len(self.buffers[e]),), e, dtype=torch.long) for e in experts]))

    def prototype_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        experts = self.experts()
        return torch.stack([self.prototypes[e] for e in experts]), torch.tensor(experts)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"buffer.{e}": b.contiguous() for e, b in enumerate(self.buffers)}
        tensors.update({f"prototype.{e}": p.contiguous() for e, p in enumerate(self.prototypes)})
        return tensors, {"capacity": self.capacity, "seed": self.seed, "seen": self.seen, "draws": self.draws}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.capacity, self.seed, self.seen, self.draws = meta["capacity"], meta["seed"], list(meta["seen"]), meta["draws"]
        self.buffers = [tensors[f"buffer.{e}"] for e in range(len(self.seen))]
        self.prototypes = [tensors[f"prototype.{e}"] for e in range(len(self.seen))]


class RouterTrainer:
    """Trains a Router by cross-entropy on which expert each chunk belongs to, with feature replay.

    A batch of B current features gets round(B * feature_alpha / (1 - feature_alpha)) replayed
    ones, so `feature_alpha` is the replayed share of the router batch, plus each known expert's
    prototype. feature_alpha = 0 turns both off (the forgetting baseline).
    """

    def __init__(self, router: Router, *, feature_alpha: float = 0.5, lr: float = 1e-2,
                 memory: FeatureMemory | None = None, capacity_per_expert: int = 64, seed: int = 0,
                 balanced: bool = True):
        if not 0.0 <= feature_alpha < 1.0:
            raise UserError(f"router feature_alpha must be in [0, 1), got {feature_alpha}")
        self.router, self.feature_alpha, self.balanced = router, feature_alpha, balanced
        self.memory = memory or FeatureMemory(capacity_per_expert, seed)
        self.lr = lr
        self.optimizer = torch.optim.Adam(router.parameters(), lr=lr)

    def add_expert(self) -> int:
        index = self.router.add_expert()
        # the head's parameters were replaced: a fresh optimizer (Adam moments of old rows restart)
        self.optimizer = torch.optim.Adam(self.router.parameters(), lr=self.lr)
        return index

    def regroup(self, keep: list[int], fold: list[int] | None = None) -> None:
        """Remove experts (those not in `keep`) or fold some into one new last class, in the router and
        its memory alike; the head's parameters are replaced, so Adam restarts as in add_expert."""
        self.router.regroup(keep, fold)
        self.memory.regroup(keep, fold)
        self.optimizer = torch.optim.Adam(self.router.parameters(), lr=self.lr)

    def loss(self, features: torch.Tensor, expert: int, remember: bool = True) -> torch.Tensor:
        """Router loss for current chunk features labelled `expert`; the features then enter memory
        (remember=False for further updates on the same features: stored once, not once per update)."""
        feats = [features.float()]
        labels = [torch.full((len(features),), expert, dtype=torch.long)]
        if self.feature_alpha > 0 and self.memory.experts():
            n_replay = round(len(features) * self.feature_alpha / (1 - self.feature_alpha))
            if n_replay > 0:
                f, y = self.memory.sample(n_replay)
                feats.append(f.to(features.device))
                labels.append(y)
            p, py = self.memory.prototype_batch()
            feats.append(p.to(features.device))
            labels.append(py)
        logits = self.router(torch.cat(feats))
        loss = self._cross_entropy(logits, torch.cat(labels).to(logits.device))
        if remember:
            self.memory.add(features, expert)
        return loss

    def _cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.balanced:
            return F.cross_entropy(logits, y)
        # every expert in the batch weighs the same, however many samples it has in it
        counts = torch.bincount(y, minlength=logits.shape[-1]).float()
        w = (1.0 / counts.clamp_min(1))[y]
        return (F.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()

    def refit(self, steps: int) -> float:
        """`steps` full-batch updates on every stored feature of every expert (balanced). The
        chunk-by-chunk updates see the newest skill in every batch and the others through a sample;
        refitting on the whole memory moves the router to what a jointly trained one reaches on
        the same stored features (bench/RESULTS.md, 2026-12-02: dylora_moe's stream router 0.805-0.899
        over three seeds, 0.906-0.912 with 100 refit steps per chunk, joint fit 0.899-0.918). The memory
        is bounded (`capacity_per_expert` per expert), so a step costs the same however long the
        stream. Returns the last loss (nan when nothing was stored or steps is 0)."""
        if steps <= 0 or not self.memory.experts():
            return float("nan")
        device = next(self.router.parameters()).device
        x, y = (t.to(device) for t in self.memory.everything())
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._cross_entropy(self.router(x), y)
            loss.backward()
            self.optimizer.step()
        return loss.item()

    def learn_chunk(self, features: torch.Tensor, expert: int, steps: int, refit_steps: int = 0) -> float:
        """One chunk of the skill stream: `steps` updates on its features with replay (the features
        stored once), then `refit_steps` on the whole memory. Returns the last loss (nan if none)."""
        loss = float("nan")
        for i in range(steps):
            loss = self.step(features, expert, remember=i == 0)
        if refit_steps:
            if steps == 0:  # the chunk's features still join the memory the refit reads
                self.memory.add(features, expert)
            loss = self.refit(refit_steps)
        return loss

    def step(self, features: torch.Tensor, expert: int, remember: bool = True) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(features, expert, remember)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def save(self, directory: str | Path) -> None:
        """Router weights + config (what serving needs), and the trainer's memory and Adam state."""
        directory = Path(directory)
        self.router.save(directory)
        tensors, meta = self.memory.state_dict()
        tensors = {f"memory.{k}": v for k, v in tensors.items()}
        opt = self.optimizer.state_dict()
        for index, state in opt["state"].items():
            tensors.update({f"adam.{index}.{k}": v.contiguous() for k, v in state.items()})
        save_file(tensors, str(directory / TRAINER_WEIGHTS))
        (directory / TRAINER_CONFIG).write_text(json.dumps({
            "memory": meta, "feature_alpha": self.feature_alpha, "lr": self.lr, "balanced": self.balanced,
            "adam_groups": opt["param_groups"], "adam_params": sorted(opt["state"])}, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "RouterTrainer":
        directory = Path(directory)
        meta = json.loads((directory / TRAINER_CONFIG).read_text())
        tensors = load_file(str(directory / TRAINER_WEIGHTS))
        memory = FeatureMemory()
        memory.load_state_dict({k.removeprefix("memory."): v for k, v in tensors.items() if k.startswith("memory.")},
                               meta["memory"])
        trainer = cls(Router.load(directory), feature_alpha=meta["feature_alpha"], lr=meta["lr"], memory=memory,
                      balanced=meta["balanced"])
        state = {i: {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"adam.{i}.")}
                 for i in meta["adam_params"]}
        trainer.optimizer.load_state_dict({"state": state, "param_groups": meta["adam_groups"]})
        return trainer
