"""Per-sample weighted mixing of LoRA experts, sparse top-k, and the hybrid dense/sparse policy.

PEFT serves one adapter per sample (`model(..., adapter_names=[...])`) but not a weighted sum of
several. `mixing` adds, to every LoRA Linear of the model,

    y = base(x) + sum_k w[b, k] * scale_k * B_k A_k dropout_k(x)

with `w` a (batch, n_experts) tensor that may carry gradient (a router is trained through it).
This module is the ONE place that reaches into PEFT's LoRA layers: it empties each layer's list of
active adapters for the duration of a block (so PEFT's own forward returns the base output) and
adds the mix in a forward hook, reading `lora_A`/`lora_B`/`lora_dropout`/`scaling` by name exactly
as PEFT's forward does. `backbone_only` uses the same switch to give the frozen backbone's view
without PEFT's `disable_adapter()`, which resets every adapter's `requires_grad` on exit.
`folded_adapters` (evaluation's fast path) adds the active adapter into the base weight and uses the
switch too; the other two give a folded layer its own weight back for their block.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator, Sequence

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear

from ..errors import UserError


def lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextmanager
def _no_active_adapters(layers: list[LoraLayer]) -> Iterator[None]:
    # PEFT's forward loops over `active_adapters`; an empty list makes it return base_layer(x)
    # while leaving requires_grad (set by set_adapter / set_requires_grad) untouched.
    saved = [(layer, layer._active_adapter) for layer in layers]
    # a layer whose adapter is folded into its base weight (folded_adapters) gets its own weight back
    # for the block, or the "backbone" would still carry the adapter
    unfolded = [(layer, layer.base_layer.weight.data) for layer in layers if layer in _FOLDED]
    for layer in layers:
        layer._active_adapter = []
    for layer, _ in unfolded:
        layer.base_layer.weight.data = _FOLDED[layer]
    try:
        yield
    finally:
        for layer, active in saved:
            layer._active_adapter = active
        for layer, folded in unfolded:
            layer.base_layer.weight.data = folded


# LoRA Linear layer -> its base weight's own tensor, while folded_adapters holds the folded one in its place
_FOLDED: dict[LoraLinear, torch.Tensor] = {}


def _fold_targets(layer: LoraLayer) -> list[str]:
    """The active adapters folded into this layer's weight: all of them when the layer is a plain LoRA
    Linear over a dense float32 weight of its own shape, else none. Folding is a speed-up only, and it
    applies exactly where W + scale B A is the layer's output in full precision; every other layer keeps
    PEFT's own forward, which computes it as it always does (tests/test_experts_mixing.py: a DoRA adapter
    computes the same bits with the block as without; in a bf16 run the block leaves every layer to PEFT).
    Those are: bf16/fp16 weights (W + B A rounded to bf16 would lose a small adapter's update), weights
    stored other than as a plain tensor of the layer's shape (quantized; FSDP's DTensor and DeepSpeed
    ZeRO-3's partitioned shards, whose full weight no single process holds), adapters with a LoRA variant (PEFT's `lora_variant`, e.g. DoRA, whose output is not
    W + B A), merged or disabled adapters, and a layer already folded or inside a mixing block."""
    if not isinstance(layer, LoraLinear) or layer in _FOLDED or layer.merged or layer.disable_adapters:
        return []
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    weight = layer.base_layer.weight
    if any(n in layer.lora_variant for n in active) or type(weight.data) is not torch.Tensor \
            or weight.dtype != torch.float32 or tuple(weight.shape) != (layer.out_features, layer.in_features):
        return []
    plain = all(type(layer.lora_A[n].weight.data) is torch.Tensor and type(layer.lora_B[n].weight.data) is torch.Tensor
                for n in active)
    return active if plain else []


@contextmanager
def folded_adapters(model: torch.nn.Module) -> Iterator[None]:
    """Inference with each LoRA Linear's active adapters added into its base weight, W + scale * B A
    (PEFT's `get_delta_weight`, computed in float32), and PEFT's adapter branch switched off: one
    matmul per layer instead of three plus a scale and an add. Evaluation is where this pays: its
    decoding steps are a few rows each, so their time is the per-layer operations rather than the
    arithmetic. An adapter whose B is zero (untrained) adds nothing and leaves the weight's own
    tensor in place, bit for bit. The weights' own tensors are kept and put back on exit (not
    subtracted), so training continues from exactly the weights it left. Gradients do not flow
    through a folded weight: use it under torch.no_grad only."""
    if torch.is_grad_enabled():
        raise RuntimeError("folded_adapters: inference only (torch.no_grad)")
    targets = [(layer, names) for layer in lora_layers(model) if (names := _fold_targets(layer))]
    saved = []
    try:
        for layer, names in targets:
            weight = layer.base_layer.weight
            saved.append((layer, layer._active_adapter))
            _FOLDED[layer] = weight.data
            live = [n for n in names if bool(layer.lora_B[n].weight.data.any())]
            if live:
                delta = sum(layer.get_delta_weight(n).float() for n in live)
                weight.data = (weight.data.float() + delta).to(weight.dtype)
            layer._active_adapter = []
        yield
    finally:
        for layer, active in saved:
            layer.base_layer.weight.data = _FOLDED.pop(layer)
            layer._active_adapter = active


@contextmanager
def backbone_only(model: torch.nn.Module) -> Iterator[None]:
    """Run the frozen backbone alone (no adapter contributes), keeping every requires_grad flag."""
    with _no_active_adapters(lora_layers(model)):
        yield


class Mix:
    """What the LoRA layers read inside a `mixing` block: expert names and (batch, n) weights.

    Set `.weights` again for each batch (e.g. from a router) without leaving the block.
    """

    def __init__(self, names: Sequence[str], weights: torch.Tensor | None = None):
        self.names = list(names)
        self.weights = weights
        self.paused = False  # True: the layers add nothing (e.g. while a router reads the backbone's features)

    def check(self, batch: int) -> torch.Tensor:
        w = self.weights
        if w is None:
            raise RuntimeError("mixing: set mix.weights (batch, n_experts) before the forward pass")
        if w.ndim != 2 or w.shape[1] != len(self.names):
            raise ValueError(f"mixing: weights must be (batch, {len(self.names)}), got {tuple(w.shape)}")
        if w.shape[0] != batch:
            raise ValueError(f"mixing: weights have {w.shape[0]} rows for a batch of {batch} "
                             "(beam search and num_return_sequences > 1 need expanded weights)")
        return w


def _add_mix(layer: LoraLinear, args, kwargs, output: torch.Tensor, *, mix: Mix) -> torch.Tensor:
    if layer.disable_adapters or mix.paused:  # the backbone's view was asked for
        return output
    if kwargs.get("adapter_names") is not None:
        raise ValueError("mixing: do not pass adapter_names inside a mixing block")
    x = args[0] if args else kwargs["x"]
    w = mix.check(x.shape[0]).to(x.device)
    # When w carries gradient every entry needs its expert's output (dL/dw[b,k] = <dL/dy, delta_k>);
    # otherwise rows with w[b,k] == 0 contribute exactly nothing and are skipped (sparse delegation
    # then costs only the chosen experts' LoRA matmuls).
    every_row = torch.is_grad_enabled() and w.requires_grad
    # Without autograd (inference) the mix is accumulated in place into the layer's fresh output
    # (as PEFT's own mixed-batch forward does): no copy of the whole output per expert. A weight of
    # exactly 1 (top-1 delegation) is not multiplied in, which changes no bit (x * 1.0 == x).
    in_place = not torch.is_grad_enabled()
    shape = (-1,) + (1,) * (output.ndim - 1)
    result = output
    for k, name in enumerate(mix.names):
        if name not in layer.lora_A:  # this expert does not adapt this layer
            continue
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        dropout, scaling = layer.lora_dropout[name], layer.scaling[name]
        wk = w[:, k]
        if every_row:
            rows = None
        else:
            rows = wk.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if rows.numel() == wk.numel():
                rows = None
        xs = x if rows is None else x[rows]
        delta = lora_B(lora_A(dropout(layer._cast_input_dtype(xs, lora_A.weight.dtype)))) * scaling  # PEFT's cast: see uncast_lora_inputs
        wk = wk if rows is None else wk[rows]
        if in_place:
            term = delta if bool((wk == 1).all()) else wk.to(delta.dtype).view(shape) * delta
            term = term.to(result.dtype)
            result.add_(term) if rows is None else result.index_add_(0, rows, term)
            continue
        term = (wk.to(delta.dtype).view(shape) * delta).to(result.dtype)
        result = result + term if rows is None else result.index_add(0, rows, term)
    return result


@contextmanager
def mixing(model: torch.nn.Module, names: Sequence[str], weights: torch.Tensor | None = None) -> Iterator[Mix]:
    """`with mixing(model, ["a", "b"], w) as mix: model(...)` adds sum_k w[:, k] * expert_k to each sample."""
    layers = lora_layers(model)
    known = set().union(*(set(layer.lora_A.keys()) for layer in layers)) if layers else set()
    missing = [n for n in names if n not in known]
    if missing:
        raise UserError(f"mixing: unknown expert(s) {missing}; the model has {sorted(known)}")
    for layer in layers:
        used = [n for n in names if n in layer.lora_A]
        if not used:
            continue
        if not isinstance(layer, LoraLinear):
            raise ValueError(f"mixing: only LoRA Linear layers can be mixed, got {type(layer).__name__}")
        if layer.merged:
            raise ValueError("mixing: unmerge adapters before mixing them")
        if any(n in layer.lora_variant for n in used):
            raise ValueError(f"mixing: adapters with a LoRA variant (DoRA and the others in PEFT's lora_variant) "
                             f"cannot be mixed: {used}")
    mix = Mix(names, weights)
    handles = [layer.register_forward_hook(partial(_add_mix, mix=mix), with_kwargs=True)
               for layer in layers if isinstance(layer, LoraLinear)]
    try:
        with _no_active_adapters(layers):
            yield mix
    finally:
        for h in handles:
            h.remove()


# -- policies: which weights to mix with ---------------------------------------------------------

def one_hot(index: torch.Tensor, n_experts: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(index, n_experts).float()


def sparse_topk(weights: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Keep each row's k largest weights, renormalised to sum to 1 (gradient flows to the kept ones)."""
    k = max(1, min(k, weights.shape[-1]))
    keep = torch.zeros_like(weights).scatter(-1, weights.topk(k, dim=-1).indices, 1.0)
    kept = weights * keep
    return kept / kept.sum(-1, keepdim=True).clamp_min(1e-12)


def hybrid_weights(router_probs: torch.Tensor, maturity: torch.Tensor, threshold: float, k: int = 1) -> torch.Tensor:
    """The seed's hybrid policy, decided per sample by the maturity of its top expert.

    If the router's top expert for a sample is mature (maturity >= threshold), the sample is
    delegated sparsely to its top-k experts (renormalised); otherwise it is served densely by all
    experts with the router's probabilities as weights, so a young expert's skill is carried by the
    experts that already exist while it learns.
    """
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"router maturity threshold must be in [0, 1], got {threshold}")
    if maturity.shape != router_probs.shape[-1:]:
        raise ValueError(f"maturity has shape {tuple(maturity.shape)}, expected ({router_probs.shape[-1]},)")
    top = router_probs.argmax(-1)
    sparse_rows = maturity.to(router_probs.device)[top] >= threshold
    return torch.where(sparse_rows.unsqueeze(-1), sparse_topk(router_probs, k), router_probs)
