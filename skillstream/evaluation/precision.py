"""The precision evaluation computes in: the run's own (train.bf16), so that scoring, generation and
the experts' signals and router features get bf16 arithmetic exactly where training does.

A run declares its precision once, to accelerate (`Accelerator(mixed_precision="bf16")` where
`train.bf16` is on, which `auto` turns on only where the hardware computes bf16: a CUDA GPU with it,
or a CPU with AVX512-BF16/AMX). Evaluation is called from many places (the stage loop, the skill
stream, plugins, benches), so instead of threading a flag through each, it reads that declaration
from accelerate's process state: inside a bf16 run every forward that evaluates runs under bf16
autocast; outside a run, or in an fp32 run, nothing changes and evaluation computes in the weights'
own dtype.

Autocast alone is slow on frozen float32 weights: it caches its bf16 copy of a weight only for
tensors that require grad, so a frozen backbone's weights were cast again in every forward (a third
of evaluation's time, measured in bench/RESULTS.md). Evaluation therefore casts the frozen float32
weights to bf16 once for its duration and puts the originals back after (bit for bit: the float32
tensors are kept, not re-cast): it computes as a backbone loaded with `model.dtype: bfloat16` does,
with trained weights (LoRA, heads, the router) still float32 and cast by autocast.
"""
from __future__ import annotations

import contextlib

import torch

from ..lora_dropout import uncast_lora_inputs

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


_declared: list[torch.dtype | None] = []  # precision_of_run's stack: evaluation of a finished run


@contextlib.contextmanager
def precision_of_run(bf16: bool):
    """Evaluate as the run that trained the model did (`skillstream eval`, `load(run).evaluate()`): outside
    that run there is no Accelerator to read the precision from, and a run trained in bf16 is scored in
    bf16, so that its evaluation afterwards gives the numbers its results.json holds."""
    _declared.append(torch.bfloat16 if bf16 else None)
    try:
        yield
    finally:
        _declared.pop()


def eval_dtype() -> torch.dtype | None:
    """The autocast dtype of the running Accelerator, or of the finished run being evaluated
    (None: no run, or a run in full precision)."""
    from accelerate.state import AcceleratorState, is_initialized

    if _declared:
        return _declared[-1]
    if not is_initialized():
        return None
    return _AUTOCAST.get(str(AcceleratorState().mixed_precision))


@contextlib.contextmanager
def eval_autocast(model: torch.nn.Module):
    """Evaluate `model` in the run's precision: frozen float32 weights held in it, and autocast to it on
    the model's device; nothing outside a mixed-precision run. Nested uses find the weights already cast.
    In full precision and without autograd (evaluation, generation) the active LoRA adapters are also
    folded into their float32 base weights for the block (experts/mixing.py: folded_adapters). Not in
    bf16: W + scale B A rounded to bf16 loses most of a small adapter's update to W's rounding (the
    unfolded path keeps B A x at bf16's relative precision), and it measured no faster there
    (bench/RESULTS.md, bench/throughput --phases eval)."""
    from ..experts.mixing import folded_adapters  # experts import this module

    dtype = eval_dtype()
    with contextlib.ExitStack() as stack:
        if dtype is None and not torch.is_grad_enabled():
            stack.enter_context(folded_adapters(model))
        stack.enter_context(_run_precision(model, dtype))
        yield


@contextlib.contextmanager
def _run_precision(model: torch.nn.Module, dtype: torch.dtype | None):
    device_type = _device(model).type
    if dtype is None or device_type not in ("cpu", "cuda"):
        yield
        return
    frozen = [p for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32]
    originals = [p.data for p in frozen]
    try:
        for p in frozen:
            p.data = p.data.to(dtype)
        with torch.autocast(device_type, dtype=dtype), uncast_lora_inputs(model):
            yield
    finally:
        for p, data in zip(frozen, originals):
            p.data = data


def _device(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
