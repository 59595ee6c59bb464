"""LoRA dropout that keeps a 1-byte mask for the backward pass instead of a full-precision copy.

On CPU, torch's dropout draws `noise = bernoulli(1 - p) / (1 - p)` in the input's dtype and multiplies:
autograd keeps that noise tensor, 4 bytes per element for the float32 input PEFT's LoRA path casts to.
PEFT gives every adapted projection its own dropout (q, k, v, o, gate, up, down), so those saved noise
tensors were the largest single share of a LoRA training step's activation memory (bench/RESULTS.md).
`MaskDropout` makes the same draws from the same generator and the same products, so its outputs and
gradients are bit-identical to `nn.Dropout`'s, but saves only which elements were kept (bool). On CUDA
torch's fused dropout already saves a bool mask (and draws differently), so there it defers to it.
"""
from __future__ import annotations

import torch


class _KeepMaskDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        noise = torch.empty_like(x).bernoulli_(1 - p)  # the draws of torch's own CPU dropout, in its order
        ctx.save_for_backward(noise.bool())
        ctx.p = p
        return x * noise.div_(1 - p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (kept,) = ctx.saved_tensors
        return grad * kept.to(grad.dtype).div_(1 - ctx.p), None  # the noise rebuilt: 0 or exactly 1 / (1 - p)


class MaskDropout(torch.nn.Dropout):
    """`nn.Dropout` that saves a bool mask for backward on CPU (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self.inplace or x.device.type != "cpu" or not x.requires_grad:
            return super().forward(x)
        return _KeepMaskDropout.apply(x, self.p)


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
