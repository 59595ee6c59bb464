"""The model a recipe trains: LoRA adapters attached the PEFT way, and the precision it trains in."""
from __future__ import annotations

import torch

from .config import RecipeConfig
from .run_files import expert_names


def attach_lora(model, cfg: RecipeConfig):
    """PEFT LoRA adapter(s): one 'default', or with lora.per_stage one per stage (created up front:
    an untrained LoRA adds zero, and a resumed run finds every adapter its checkpoint names)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    first, *rest = expert_names(cfg)
    model = get_peft_model(model, lora, adapter_name=first)
    for name in rest:
        model.add_adapter(name, lora)
    model.set_adapter(first)
    return model


def bf16_enabled(setting, device_type: str) -> bool:
    if setting == "auto":
        # Only where the hardware has bf16 arithmetic: on a CPU without AVX512-BF16/AMX, torch
        # emulates bf16 matmuls and autocast is slower than fp32 (measured in bench/throughput).
        if device_type == "cuda":
            return torch.cuda.is_bf16_supported()
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(setting)
