"""LoRA dropout that keeps a 1-byte mask for the backward pass instead of a full-precision copy.

On CPU, torch's dropout draws `noise = bernoulli(1 - p) / (1 - p)` in the input's dtype and multiplies:
autograd keeps that noise tensor, 4 bytes per element for the float32 input PEFT's LoRA path casts to.
PEFT gives every adapted projection its own dropout (q, k, v, o, gate, up, down), so those saved noise
tensors were the largest single share of a LoRA training step's activation memory (bench/RESULTS.md).
`MaskDropout` makes the same draws from the same generator (bernoulli's draws do not depend on the
dtype they fill, so it draws straight into a bool mask) and multiplies by the same float32 1 / (1 - p),
so for a float32 input its outputs and gradients are bit-identical to `nn.Dropout`'s. For a bf16 input
(PEFT's input cast switched off under bf16 autocast, see `uncast_lora_inputs`) it computes what PEFT's
cast path computed: torch multiplies bf16 by a float32 scalar in float32 and rounds once, exactly as
dropout in float32 followed by autocast's cast to bf16 did. On CUDA torch's fused dropout already saves
a bool mask (and draws differently), so there it defers to it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from peft.helpers import disable_input_dtype_casting


def _draw(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(which elements are kept, the float32 factor nn.Dropout gives them: 1 / (1 - p) computed as its noise is)."""
    kept = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)
    return kept, torch.ones((), dtype=torch.float32).div_(1 - p)


class _KeepMaskDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        kept, scale = _draw(x, p)
        ctx.save_for_backward(kept)
        ctx.scale = scale
        return (x * scale).mul_(kept)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (kept,) = ctx.saved_tensors
        return (grad * ctx.scale).mul_(kept), None


class MaskDropout(torch.nn.Dropout):
    """`nn.Dropout` that saves a bool mask for backward on CPU (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.inplace or x.device.type != "cpu":
            return super().forward(x)
        if not x.requires_grad:  # nothing to save; the same draws and products
            kept, scale = _draw(x, self.p)
            return (x * scale).mul_(kept)
        return _KeepMaskDropout.apply(x, self.p)


@contextmanager
def uncast_lora_inputs(model: torch.nn.Module) -> Iterator[None]:
    """Inside an autocast region (entered before this), PEFT's LoRA layers take their input in the dtype
    it comes in instead of casting it to the adapter's float32 first (PEFT's own switch,
    `disable_input_dtype_casting`). Under autocast that cast is undone by A's matmul, which casts back
    to bf16: skipping both computes the same bits (with `MaskDropout`, see the module doc) and saves
    two copies of every adapted layer's input per forward and of its gradient per backward. Outside
    autocast a bf16 input must still be cast to meet the float32 adapter, so there it changes nothing."""
    first = next(model.parameters(), None)
    autocast = first is not None and torch.is_autocast_enabled(first.device.type)
    with disable_input_dtype_casting(model, active=autocast):
        yield


def compact_lora_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every LoRA adapter's `nn.Dropout` for `MaskDropout` (idempotent; parameters and state dicts
    unchanged, since dropout has none). Called wherever adapters are added: a new adapter comes with
    PEFT's plain `nn.Dropout`."""
    from .experts.mixing import lora_layers  # here, not at the top: the expert pool imports this module

    for layer in lora_layers(model):
        for name, d in layer.lora_dropout.items():
            if type(d) is torch.nn.Dropout:
                layer.lora_dropout[name] = MaskDropout(d.p)
    return model
