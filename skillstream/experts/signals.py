"""The Adaptive Learner's "triple signal" of a task, for reuse-or-create decisions.

A `TaskSignal` describes a handful of a task's examples as the frozen backbone sees them:

(a) embedding — mean of `pooled_features` (last hidden states, mean over real tokens) over the
    examples, averaged half-and-half with the task description's when one is given.
(b) gradient sketch — the gradients the examples' LM loss induces on the `lora_B` of a *fresh*
    LoRA (B = 0, A = a seeded Gaussian of rank `sketch_rank`) on every Linear whose name ends with
    one of `grad_modules` (default: each decoder layer's MLP output projection, `down_proj` in Llama,
    Qwen, Gemma, Mistral and Phi-3, `fc2` in Phi). At B = 0 that gradient
    is scale * (dL/dW) A^T, so it is read from the frozen layer's input and output gradient through
    hooks, without adding an adapter to the model. Two fixed seeded Gaussian projections to
    `sketch_dim` numbers each keep:
      - `gradient`: the mean per-example gradient (where the examples would push a new expert),
      - `fisher`:   the mean squared per-example gradient (which parameters they move: a diagonal
                    Fisher, the Task2Vec task embedding). On a few diverse examples the mean
                    gradient can average out (measured on the tiny backbone: cos ~ 0 between two
                    batches of documentation prose) while the Fisher part stays stable (cos ~ 0.8).
(c) context statistics — mean next-token entropy of the backbone's predictions over real tokens
    (nats) and mean length in tokens.

All three are computed with adapters off, so the signal of a new task and the profiles of every
expert live in one space that does not move while experts train; an expert's profile is refreshed
after it trains by folding in (count-weighted) the signal of the examples it trained on.

    similarity = 0.4 * cos(a) + 0.4 * (cos(gradient) + cos(fisher)) / 2 + 0.2 * context
    context    = 1 - (|H1 - H2| / max(H1, H2) + |L1 - L2| / max(L1, L2)) / 2      (in [0, 1])
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..data.batching import collate
from ..data.examples import Example
from ..data.render import IGNORE, Renderer, Tokenized
from ..models.modes import eval_mode
from .mixing import backbone_only
from .router import masked_mean


@dataclass
class SignalConfig:
    # Linear layers whose (sketched) gradient is read: the MLP output projection under its names in the
    # families tests/test_families.py trains (a model has one of them)
    grad_modules: tuple[str, ...] = ("down_proj", "fc2")
    sketch_rank: int = 4                            # rank of the virtual fresh LoRA's A
    sketch_dim: int = 64                            # length of each gradient sketch (mean and Fisher)
    max_length: int = 128                           # tokens per example
    # examples per forward/backward: the vocabulary-sized logits and their gradient cost about 1.5 GB
    # per 640-token example on SmolLM2 (peak RSS of the dylora_moe stream: 12 GB with 4 examples in one
    # batch, 19 GB with 8), and examples do not interact, so small batches change nothing but the peak
    batch_size: int = 2
    seed: int = 0


@dataclass
class SimilarityWeights:
    embedding: float = 0.4
    gradient: float = 0.4
    context: float = 0.2


@dataclass
class TaskSignal:
    embedding: torch.Tensor     # (hidden,)
    gradient: torch.Tensor      # (sketch_dim,) projected mean per-example gradient
    fisher: torch.Tensor        # (sketch_dim,) projected mean squared per-example gradient
    entropy: float              # mean next-token entropy, nats
    length: float               # mean tokens per example
    count: int = 1              # examples it summarises (weights running means)

    def merged(self, other: "TaskSignal") -> "TaskSignal":
        """Count-weighted mean of two signals (a profile covering both sets of examples)."""
        a, b = self.count, other.count
        mix = lambda x, y: (x * a + y * b) / (a + b)
        return TaskSignal(mix(self.embedding, other.embedding), mix(self.gradient, other.gradient),
                          mix(self.fisher, other.fisher), mix(self.entropy, other.entropy),
                          mix(self.length, other.length), a + b)

    def state(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"{prefix}{k}": getattr(self, k).contiguous() for k in ("embedding", "gradient", "fisher")}
        return tensors, {"entropy": self.entropy, "length": self.length, "count": self.count}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "") -> "TaskSignal":
        return cls(tensors[f"{prefix}embedding"], tensors[f"{prefix}gradient"], tensors[f"{prefix}fisher"],
                   meta["entropy"], meta["length"], meta["count"])


@dataclass
class ExpertProfile:
    """An expert's signal, refreshed (count-weighted) with each new set of its examples."""
    name: str
    signal: TaskSignal | None = None
    refreshed_step: int = 0
    refreshes: int = 0

    def refresh(self, signal: TaskSignal, step: int = 0) -> None:
        self.signal = signal if self.signal is None else self.signal.merged(signal)
        self.refreshed_step, self.refreshes = step, self.refreshes + 1

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        meta = {"name": self.name, "refreshed_step": self.refreshed_step, "refreshes": self.refreshes}
        if self.signal is None:
            return {}, meta
        tensors, sig = self.signal.state(prefix=f"{self.name}.")
        return tensors, {**meta, "signal": sig}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "ExpertProfile":
        sig = TaskSignal.from_state(tensors, meta["signal"], prefix=f"{meta['name']}.") if "signal" in meta else None
        return cls(meta["name"], sig, meta["refreshed_step"], meta["refreshes"])


def save_profiles(directory: str | Path, profiles: dict[str, ExpertProfile]) -> None:
    """`profiles.safetensors` (the signals' tensors) and `profiles.json` (the rest), no pickle."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, metas = {}, []
    for profile in profiles.values():
        t, meta = profile.state()
        tensors.update(t)
        metas.append(meta)
    save_file(tensors, str(directory / "profiles.safetensors"))
    (directory / "profiles.json").write_text(json.dumps(metas, indent=1))


def load_profiles(directory: str | Path) -> dict[str, ExpertProfile]:
    directory = Path(directory)
    tensors = load_file(str(directory / "profiles.safetensors"))
    metas = json.loads((directory / "profiles.json").read_text())
    return {m["name"]: ExpertProfile.from_state(tensors, m) for m in metas}


# -- computing a signal --------------------------------------------------------------------------

def _gaussian(shape: tuple[int, ...], key: str, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(shape, generator=g) * scale


def _chosen_linears(model: torch.nn.Module, suffixes: Sequence[str]) -> dict[str, torch.nn.Linear]:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name, mod in hf.named_modules():
        if not isinstance(mod, torch.nn.Linear) or "lora_" in name:
            continue
        # the same name with or without PEFT's wrapper, so sketches of both are comparable
        key = name.removesuffix(".base_layer")
        if key.split(".")[-1] in suffixes:
            out[key] = mod
    if not out:
        raise ValueError(f"gradient sketch: no Linear layer named {list(suffixes)} in the model")
    return out


def _tokenize(tokenizer, examples: Sequence[Example | str], max_length: int) -> list[Tokenized]:
    renderer = Renderer(tokenizer, max_length)
    items = []
    for ex in examples:
        if isinstance(ex, str):  # plain text: the loss is on every token
            ids = tokenizer(ex, truncation=True, max_length=max_length)["input_ids"]
            items.append(Tokenized(ids, list(ids), False))
        else:
            items.append(renderer.tokenize(ex))
    return items


def compute_signal(model: torch.nn.Module, tokenizer, examples: Sequence[Example | str], *,
                   description: str | None = None, config: SignalConfig | None = None) -> TaskSignal:
    """The triple signal of a few examples (Examples are rendered as in training; strings as plain text)."""
    cfg = config or SignalConfig()
    if not examples:
        raise ValueError("compute_signal: no examples")
    linears = _chosen_linears(model, cfg.grad_modules)
    A = {k: _gaussian((cfg.sketch_rank, m.in_features), f"{cfg.seed}:A:{k}", m.in_features ** -0.5)
         for k, m in linears.items()}
    P = {(k, part): _gaussian((cfg.sketch_dim, m.out_features * cfg.sketch_rank), f"{cfg.seed}:{part}:{k}",
                              cfg.sketch_dim ** -0.5)
         for k, m in linears.items() for part in ("gradient", "fisher")}
    items = _tokenize(tokenizer, examples, cfg.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    emb_sum, ent_sum, ent_tokens = 0.0, 0.0, 0
    sums = {"gradient": torch.zeros(cfg.sketch_dim), "fisher": torch.zeros(cfg.sketch_dim)}
    for start in range(0, len(items), cfg.batch_size):
        batch = collate(items[start:start + cfg.batch_size], pad)
        emb, grads, ent, n_tok = _one_batch(model, batch, linears, A)
        emb_sum = emb_sum + emb.sum(0)
        for k, g in grads.items():  # g: (examples, out * rank) per-example gradients
            sums["gradient"] += P[(k, "gradient")] @ g.sum(0)
            sums["fisher"] += P[(k, "fisher")] @ (g ** 2).sum(0)
        ent_sum, ent_tokens = ent_sum + ent, ent_tokens + n_tok
    n = len(items)
    embedding = emb_sum / n
    if description:
        d_emb, _, _, _ = _one_batch(model, collate(_tokenize(tokenizer, [description], cfg.max_length), pad), linears, A)
        embedding = 0.5 * embedding + 0.5 * d_emb[0]
    length = sum(len(t.input_ids) for t in items) / n
    return TaskSignal(embedding, sums["gradient"] / n, sums["fisher"] / n, ent_sum / max(1, ent_tokens), float(length), n)


def _one_batch(model, batch, linears, A):
    """Pooled embeddings (B, hidden), per-example lora_B gradients per layer (B, out * rank), entropy sum, tokens."""
    inputs, zeros = {}, {}

    def hook(key, module, args, output):
        inputs[key] = args[0].detach().float()
        zeros[key] = torch.zeros_like(output, requires_grad=True)
        return output + zeros[key]  # dL/d(zero) = dL/d(output), and the graph starts here

    handles = [m.register_forward_hook(lambda mod, a, o, k=k: hook(k, mod, a, o)) for k, m in linears.items()]
    try:
        with backbone_only(model), eval_mode(model), torch.enable_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
            with torch.no_grad():
                # The loss is the sum over examples of each one's mean next-token NLL, so one backward
                # gives every example's own gradient (examples in a batch do not interact). Its gradient
                # on the logits is w * (softmax - onehot): written out, it reuses the softmax that the
                # entropy needs (the vocabulary-sized passes dominate the cost).
                logp = out.logits.float().log_softmax(-1)
                probs = logp.exp()
                ent = -(probs * logp).sum(-1)
                labels = batch["labels"][:, 1:]
                keep = (labels != IGNORE).float()
                w = F.pad(keep / keep.sum(1, keepdim=True).clamp_min(1), (0, 1)).unsqueeze(-1)  # 0 at the last position
                d_logits = probs.mul_(w)  # in place: the softmax is not needed after the entropy
                d_logits.scatter_add_(-1, F.pad(labels.clamp_min(0), (0, 1)).unsqueeze(-1), -w)
            keys = list(zeros)
            grads = torch.autograd.grad(out.logits, [zeros[k] for k in keys], grad_outputs=d_logits.to(out.logits.dtype),
                                        allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    mask = batch["attention_mask"]
    emb = masked_mean(out.hidden_states[-1].detach().float(), mask)
    sketched = {}
    for k, g in zip(keys, grads):
        if g is None:
            continue
        # dL/dB of a fresh LoRA (B = 0) per example: sum over its tokens of g_t (A x_t)^T, (out, rank)
        sketched[k] = torch.einsum("bto,btr->bor", g.float(), inputs[k] @ A[k].T).flatten(1)
    ent_sum = float((ent * mask).sum())
    return emb, sketched, ent_sum, int(mask.sum())


# -- comparing ---------------------------------------------------------------------------------

def similarity_components(a: TaskSignal, b: TaskSignal) -> dict[str, float]:
    ctx = 1 - 0.5 * (abs(a.entropy - b.entropy) / max(a.entropy, b.entropy, 1e-12)
                     + abs(a.length - b.length) / max(a.length, b.length, 1e-12))
    cos = lambda x, y: F.cosine_similarity(x, y, dim=0).item()
    return {"embedding": cos(a.embedding, b.embedding),
            "gradient": 0.5 * cos(a.gradient, b.gradient) + 0.5 * cos(a.fisher, b.fisher),
            "context": ctx}


def similarity(signal: TaskSignal, profile: ExpertProfile | TaskSignal,
               weights: SimilarityWeights = SimilarityWeights()) -> float:
    """Weighted sum of the three components (see the module docstring); in [-0.8, 1] with the defaults."""
    other = profile.signal if isinstance(profile, ExpertProfile) else profile
    if other is None:
        raise ValueError(f"expert profile {profile.name!r} has no signal yet")
    c = similarity_components(signal, other)
    return weights.embedding * c["embedding"] + weights.gradient * c["gradient"] + weights.context * c["context"]
