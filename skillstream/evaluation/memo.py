"""Evaluation results remembered by the function the model computes and the inputs it is scored on.

A continual-learning run scores every task after every task, and many of those evaluations repeat
one already made: the initial row (an untrained LoRA's B is zero, so the model computes the
backbone's function, and every method of bench/cl_stream scores that same backbone on the same
examples), and, in the expert-per-task regime, an old task answered by its own expert, which no
later task touched. The memo keys an evaluation on

- a fingerprint of the weights that serve it: every parameter and buffer, except LoRA adapters that
  contribute nothing (inactive, disabled, merged into the base, or a plain LoRA whose B is zero;
  adapter names are left out, so "default" and "sst2" at initialisation are the same function), and
- the inputs: each example, how it is rendered (template, system prompt, length limit), the metric and its extra protocols, the batch
  size and generation budget, the tokenizer, the generation config, and the source of the code
  that evaluates (so a cache directory kept across code changes is not read by a changed evaluator),

and returns the earlier result for the same key, marked `"memo": true` in the returned row so a
reader knows which numbers were measured once and used twice. Only deterministic evaluations are
remembered (greedy decoding, one sample; not `unit_tests`, whose sandbox runs under wall-clock
limits). A directory (`data.eval_cache`) shares the memo between processes: bench/cl_stream scores
the backbone once for all its methods.
"""
from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict
from pathlib import Path

import torch

from ..files import write_atomic
from .precision import eval_dtype

_UNREMEMBERED = {"unit_tests"}  # sandboxed code under time limits: not a pure function of the weights
_CODE: str | None = None


def _code_digest() -> str:
    """The evaluator's own source (this package and the prompt renderer) and the library versions."""
    global _CODE
    if _CODE is None:
        import peft
        import transformers

        h = hashlib.sha256(f"{torch.__version__} {transformers.__version__} {peft.__version__}".encode())
        here = Path(__file__).resolve().parent
        for path in sorted(here.glob("*.py")) + [here.parent / "data" / "render.py"]:
            h.update(path.name.encode() + path.read_bytes())
        _CODE = h.hexdigest()
    return _CODE


def _root(model):
    return model.get_base_model() if getattr(model, "peft_config", None) and hasattr(model, "get_base_model") else model


def _lora_layers(model):
    if not getattr(model, "peft_config", None):
        return []
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in _root(model).named_modules() if isinstance(m, LoraLayer)]


def _is_zero(module, adapter: str) -> bool:
    """A plain LoRA update B @ A with B zero adds nothing (DoRA and other variants rescale the base)."""
    if getattr(module, "lora_variant", {}).get(adapter) or getattr(module, "use_dora", {}).get(adapter):
        return False
    b = module.lora_B[adapter] if adapter in module.lora_B else None
    from torch.distributed.tensor import DTensor

    tensors = list(b.parameters()) if b is not None else [module.lora_embedding_B[adapter]]
    # FSDP: bool(DTensor.any()) reads this process's shard only; every process must see the same zeros
    return all(not (t.full_tensor() if isinstance(t, DTensor) else t).any() for t in tensors)


def _lora_state(model) -> tuple[set[str], set[tuple[str, str]], dict]:
    """(adapter names, {(module name, adapter)} of LoRA adapters that add nothing to the output, and
    the scale (alpha / r, changed by set_scale) of every one that does, by module)."""
    adapters = set(getattr(model, "peft_config", {}) or {})
    silent, scales = set(), {}
    for name, module in _lora_layers(model):
        active = set(module.active_adapters) if not module.disable_adapters else set()
        for a in set(module.lora_A) | set(module.lora_embedding_A):
            # not in the forward pass (a merged one is in the base weight), or a zero update
            if a not in active or a in module.merged_adapters or _is_zero(module, a):
                silent.add((name, a))
            else:
                scales.setdefault(name, []).append(float(module.scaling[a]))
    return adapters, silent, {name: sorted(v) for name, v in scales.items()}


def adds_nothing(model) -> bool:
    """Every LoRA adapter of the model is a zero update: whichever serves, the backbone answers (an
    expert pool before its first expert trains, whatever the router would choose)."""
    return all(_is_zero(m, a) for _, m in _lora_layers(model) for a in set(m.lora_A) | set(m.lora_embedding_A))


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes. FSDP: every process hashes the whole tensor (a gather
    that every process makes alike), so all processes reach the same decisions from it."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        data = t.full_tensor().detach().cpu().contiguous()
    else:
        data = t.detach().cpu().contiguous()
        if data.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            # .numpy() marks a storage non-resizable for good, and FSDP frees a whole weight it has
            # gathered for a forward pass by resizing its storage to 0: hash a copy of the model's own
            data = data.clone()
    raw = data.view(torch.uint8) if data.dim() else data.reshape(1).view(torch.uint8)
    return hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode() + raw.numpy().tobytes()).hexdigest()


class EvalMemo:
    """In-process memo, and with `directory` one shared by every process that names it."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else None
        self.results: dict[str, dict] = {}
        self.hits = self.misses = 0
        # id -> (weak reference, data_ptr, version, digest); the reference tells a tensor from a later
        # one that happens to get the same id and address after the first was freed
        self._frozen: dict[int, tuple] = {}

    def _tensor_digest(self, t: torch.Tensor) -> str:
        from torch.distributed.tensor import DTensor

        # frozen tensors (the backbone) are hashed once: an in-place change bumps their version counter
        local = t.to_local() if isinstance(t, DTensor) else t  # FSDP: this process's shard
        if not t.requires_grad:
            seen = self._frozen.get(id(t))
            if seen and seen[0]() is t and seen[1:3] == (local.data_ptr(), local._version):
                return seen[3]
        digest = tensor_digest(t)
        if not t.requires_grad:
            self._frozen[id(t)] = (weakref.ref(t), local.data_ptr(), local._version, digest)
        return digest

    def fingerprint(self, model) -> str:
        """The weights that serve an evaluation, LoRA adapters that add nothing left out."""
        adapters, silent, scales = _lora_state(model)
        active = _active_names(model)
        h = hashlib.sha256()
        root = _root(model)  # names below the PEFT wrapper: a bare backbone and one with a zero LoRA match
        for kind, items in (("p", root.named_parameters()), ("b", root.named_buffers())):
            for name, t in items:
                parts = name.split(".")
                owner = next((p for p in parts if p in adapters), None)
                if owner is not None:
                    module = ".".join(parts[:parts.index(owner) - 1])  # e.g. ...q_proj (before lora_A.<a>)
                    if (module, owner) in silent:
                        continue
                    if owner not in active:
                        continue  # e.g. modules_to_save of an inactive adapter
                    name = ".".join("*" if p == owner else p for p in parts)
                name = name.replace(".base_layer.", ".")  # a LoRA-wrapped layer's own weight
                h.update(f"{kind}:{name}:{self._tensor_digest(t)};".encode())
        h.update(json.dumps(scales, sort_keys=True).encode())
        return h.hexdigest()

    def key(self, model, tok, renderer, examples, metric: str, batch_size: int, max_new_tokens: int,
            also) -> str:
        gen = getattr(model, "generation_config", None)
        inputs = {
            "metric": metric, "also": sorted(also), "batch_size": batch_size, "max_new_tokens": max_new_tokens,
            "tokenizer": [getattr(tok, "name_or_path", ""), len(tok), getattr(tok, "chat_template", None)],
            "renderer": [renderer.max_length, renderer.system_prompt],
            "generation": _generation_settings(gen),
            "autocast": [torch.is_autocast_enabled("cpu"), str(torch.get_autocast_dtype("cpu")), str(eval_dtype())],
            "examples": [asdict(ex) for ex in examples],
        }
        h = hashlib.sha256(_code_digest().encode() + self.fingerprint(model).encode())
        h.update(json.dumps(inputs, sort_keys=True, default=str).encode())
        return h.hexdigest()

    def evaluate(self, compute, model, tok, renderer, examples, metric: str, batch_size: int,
                 max_new_tokens: int, samples: int, also) -> dict:
        if metric in _UNREMEMBERED or samples != 1:
            return compute()
        k = self.key(model, tok, renderer, examples, metric, batch_size, max_new_tokens, also)
        found = self.results.get(k)
        path = self.directory / f"{k}.json" if self.directory else None
        if found is None and path is not None and path.is_file():
            found = json.loads(path.read_text())
        if found is not None:
            self.hits += 1
            self.results[k] = found
            return {**json.loads(json.dumps(found)), "memo": True}
        self.misses += 1
        row = compute()
        self.results[k] = json.loads(json.dumps(row, default=float))
        if path is not None:  # written whole, then renamed: a concurrent reader sees all or nothing
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(self.results[k]))
        return row


def _generation_settings(gen) -> str | None:
    """A transformers GenerationConfig, or a plain model's own settings object (BDH: a namespace)."""
    if gen is None:
        return None
    if hasattr(gen, "to_json_string"):
        return gen.to_json_string()
    return json.dumps(vars(gen), sort_keys=True, default=str)


def _active_names(model) -> set[str]:
    if not getattr(model, "peft_config", None):
        return set()  # (a transformers model's own active_adapters() raises without an adapter)
    active = getattr(model, "active_adapters", None)
    if callable(active):
        active = active()
    if active is None:
        active = getattr(model, "active_adapter", None)
    return {active} if isinstance(active, str) else set(active or [])
