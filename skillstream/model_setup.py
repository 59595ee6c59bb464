"""The model a recipe trains: LoRA adapters attached the PEFT way, and the precision it trains in."""
from __future__ import annotations

import torch

from .config import RecipeConfig
from .errors import UserError
from .lora_dropout import compact_lora_dropout
from .models.backbone import gpu_computes_bf16
from .run_files import expert_names


def attach_lora(model, cfg: RecipeConfig):
    """PEFT LoRA adapter(s): one 'default', or with lora.per_stage one per stage (created up front:
    an untrained LoRA adds zero, and a resumed run finds every adapter its checkpoint names)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    first, *rest = expert_names(cfg)
    # PEFT creates the adapters in float32 over a bf16/fp16 (or 4-bit) backbone (autocast_adapter_dtype,
    # on by default here and in add_adapter / PeftModel.from_pretrained): their small updates keep
    # their precision (tests/test_backbone_options.py)
    model = get_peft_model(model, lora, adapter_name=first)
    for name in rest:
        model.add_adapter(name, lora)
    model.set_adapter(first)
    return compact_lora_dropout(model)  # the same dropout, a quarter of its memory (lora_dropout.py)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def backbone_options(cfg: RecipeConfig, *, training: bool = True) -> dict:
    """`load_backbone`'s keyword arguments for the recipe's model.dtype, model.attn_implementation,
    model.quantization and (when `training`) train.gradient_checkpointing. A run and `trained.load`
    both call this, so a run loads back in the dtype and quantization it trained with."""
    from .components import MODELS

    m = cfg.model
    weights_train = not m.freeze_backbone  # lora: null, or LoRA beside trained base weights
    if any(st.train.get("gradient_checkpointing", cfg.train.gradient_checkpointing) != cfg.train.gradient_checkpointing
           for st in cfg.stages):  # the backbone is set up once, before the first stage
        raise UserError("stages[].train.gradient_checkpointing: set once per run, in train.gradient_checkpointing")
    if m.quantization is not None and weights_train:
        raise UserError("model.quantization: quantized weights cannot train; keep model.freeze_backbone: true "
                        "and a lora (QLoRA)")
    if m.dtype not in ("auto", "float32") and weights_train:
        # the optimizer would update bf16/fp16 weights in place, where small updates round away
        raise UserError(f"model.dtype: {m.dtype} with model.freeze_backbone: false would train the weights in "
                        f"{m.dtype}; use float32 (train.bf16 still computes in bf16)")
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.train.bf16 is True and device_type == "cuda" and not gpu_computes_bf16():  # (a CPU computes bf16)
        raise UserError(f"train.bf16: true needs a GPU with bf16 arithmetic (compute capability 8.0 or newer; "
                        f"{torch.cuda.get_device_name()} has none); use auto or false")
    # auto: the weights go to bf16 exactly where the run autocasts to it (train.bf16, whose auto is the
    # hardware check), for a frozen Hugging Face backbone only (trained weights and registered models
    # such as BDH stay float32): train.bf16: false keeps a run float32 throughout
    auto_bf16 = not weights_train and m.name not in MODELS and bf16_enabled(cfg.train.bf16, device_type)
    dtype = (torch.bfloat16 if auto_bf16 else torch.float32) if m.dtype == "auto" else DTYPES[m.dtype]
    return {"dtype": dtype, "attn_implementation": m.attn_implementation,
            "quantization_bits": m.quantization.bits if m.quantization else None,
            "gradient_checkpointing": training and cfg.train.gradient_checkpointing}


def bf16_enabled(setting, device_type: str) -> bool:
    if setting == "auto":
        # Only where the hardware has bf16 arithmetic: on a CPU without AVX512-BF16/AMX, torch
        # emulates bf16 matmuls and autocast is slower than fp32 (measured in bench/throughput).
        if device_type == "cuda":
            return gpu_computes_bf16()
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(setting)
