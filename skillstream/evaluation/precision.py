"""The precision evaluation computes in: the run's own (train.bf16), so that scoring, generation and
the experts' signals and router features get bf16 arithmetic exactly where training does.

A run declares its precision once, to accelerate (`Accelerator(mixed_precision="bf16")` where
`train.bf16` is on, which `auto` turns on only where the hardware computes bf16: a CUDA GPU with it,
or a CPU with AVX512-BF16/AMX). Evaluation is called from many places (the stage loop, the skill
stream, plugins, benches), so instead of threading a flag through each, it reads that declaration
from accelerate's process state: inside a bf16 run every forward that evaluates runs under bf16
autocast (matmuls in bf16, softmaxes and norms as autocast keeps them, in fp32); outside a run, or in
an fp32 run, nothing changes and evaluation computes in the weights' own dtype.
"""
from __future__ import annotations

import contextlib

import torch

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def eval_dtype() -> torch.dtype | None:
    """The autocast dtype of the running Accelerator (None: no run, or a run in full precision)."""
    from accelerate.state import AcceleratorState, is_initialized

    if not is_initialized():
        return None
    return _AUTOCAST.get(str(AcceleratorState().mixed_precision))


def eval_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast to the run's precision on `device` (the model's), or nothing outside a mixed-precision run."""
    dtype = eval_dtype()
    device_type = torch.device(device).type
    if dtype is None or device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)
