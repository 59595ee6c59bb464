"""Decoding for evaluation, metrics and rewards: batched generation with a KV cache, and option
log-likelihoods read from the cache generation computed (see option_scoring.py)."""
from __future__ import annotations

import torch

from .option_scoring import score_on_cache
from .precision import eval_autocast


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
             temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
    """Batched decoding with a KV cache (greedy unless temperature > 0); returns the new text only,
    in the order of `prompts`. Prompts are batched by length (longest first), so a batch pads little:
    tool-call prompts differ by hundreds of tokens of schemas, and padding is computed like tokens."""
    return generate_and_score(model, tok, prompts, max_new_tokens, batch_size, temperature, top_p)[0]


@torch.no_grad()
def generate_and_score(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                       temperature: float = 0.0, top_p: float = 1.0,
                       options: list[list[int]] | None = None) -> tuple[list[str], torch.Tensor | None]:
    """`generate`, and with `options` (token ids of each answer option, shared by every prompt) also
    each option's log-likelihood after each prompt, a (len(prompts), len(options)) tensor, read from
    the KV cache generation computed for the prompts (cropped back to them) and the logits at their
    last position: option scoring beside exact match without a second prefill of every prompt."""
    old_side, tok.padding_side = tok.padding_side, "left"
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=True)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outs: list[str | None] = [None] * len(prompts)
    scores = torch.zeros(len(prompts), len(options)) if options is not None else None
    try:
        with eval_autocast(model):  # the run's precision, weights cast once for all batches (precision.py)
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                enc = tok([prompts[j] for j in idx], return_tensors="pt", padding=True, add_special_tokens=True).to(model.device)
                kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
                if options is not None:
                    kw.update(return_dict_in_generate=True, output_logits=True)
                # stops as soon as every row has written its end-of-sequence token (generation_config.eos_token_id)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
                sequences = gen.sequences if options is not None else gen
                width = enc["input_ids"].shape[1]
                for j, text in zip(idx, tok.batch_decode(sequences[:, width:], skip_special_tokens=True)):
                    outs[j] = text
                if options is not None:
                    cache = gen.past_key_values
                    extra = cache.get_seq_length() - width  # back to the prompts: drop the generated tokens
                    if extra > 0:
                        cache.crop(-extra)  # a negative crop removes that many tokens (transformers 4.x and 5.x)
                    scores[idx] = score_on_cache(model, gen.logits[0], cache, enc["attention_mask"], options,
                                                 tok.pad_token_id).cpu()
    finally:
        tok.padding_side = old_side
    return outs, scores
