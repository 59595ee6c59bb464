"""Classification by option log-likelihood, with the prompt run once per example.

The prompts of a batch are left-padded and run once with a KV cache. Every option of an example
is then scored in ONE more forward of that example's row: the options (each without its last token,
whose prediction nobody reads) are laid side by side after the prompt, with an attention mask that
lets each option see the prompt and its own earlier tokens only, and positions that restart after
the prompt for each option. Compared with one forward per (prompt + option) this saves
(options - 1) prompt passes per example; compared with repeating the prompt's cache once per option
it copies no cache (at 12 options of a 130-token prompt that copy cost more than the options' forward).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..data.batching import left_pad
from .precision import eval_autocast


def _last_logits_only(model) -> dict:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}


@torch.no_grad()
def score_options(model, prompts: list[list[int]], options: list[list[int]], pad_id: int) -> torch.Tensor:
    """Sum of log-probabilities of each option after each prompt: a (len(prompts), len(options)) tensor.

    Every prompt in the call shares the same option list (one task's labels.json).
    """
    ids, mask = (t.to(model.device) for t in left_pad(prompts, pad_id))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with eval_autocast(model):
        # only the last prompt position's logits are read: asking for just those skips the LM head
        # (a vocabulary-sized matmul) at every other position, about a fifth of a small model's prefill
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **_last_logits_only(model))
        return score_on_cache(model, out.logits[:, -1], out.past_key_values, mask, options, pad_id)


def _attn_implementation(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


@torch.no_grad()
def score_on_cache(model, last_logits: torch.Tensor, cache, mask: torch.Tensor, options: list[list[int]],
                   pad_id: int) -> torch.Tensor:
    """The options scored on top of a prompt batch's KV cache (left-padded prompts, `mask` their
    attention mask, `last_logits` the logits at their last position); the cache is consumed."""
    b, dev = mask.shape[0], model.device
    first_logp = F.log_softmax(last_logits.float(), -1)                  # predicts each option's first token
    first = first_logp[:, [o[0] for o in options]]                        # (b, n_opt)
    # the option tokens whose logits are read: all but each option's last (it predicts nothing we score)
    fed = [o[:-1] for o in options]
    total = sum(len(f) for f in fed)
    if total == 0:  # every option is one token: the prompt's last logits are the whole score
        return first.cpu()
    with eval_autocast(model):
        rest = _rest_of_options(model, cache, mask, options, fed, total, dev)   # (b, n_opt)
    return (first + rest).cpu()


def _rest_of_options(model, cache, mask, options, fed, total, dev) -> torch.Tensor:
    """log p(option tokens 2..) after each prompt, all options of a prompt in one row of one forward."""
    b, prompt_len = mask.shape
    ids = torch.tensor([t for f in fed for t in f], dtype=torch.long, device=dev)
    offset = torch.tensor([k for f in fed for k in range(len(f))], dtype=torch.long, device=dev)
    owner = torch.tensor([j for j, f in enumerate(fed) for _ in f], dtype=torch.long, device=dev)
    # option token k of option j sees the prompt (not its padding) and tokens 0..k of option j
    within = (owner[:, None] == owner[None, :]) & (offset[None, :] <= offset[:, None])       # (total, total)
    allowed = torch.cat([mask.bool()[:, None, :].expand(b, total, prompt_len),
                         within[None].expand(b, total, total)], -1)[:, None]                 # (b, 1, total, P + total)
    if _attn_implementation(model) == "eager":  # eager attention adds its mask: 0 where allowed, -inf-like elsewhere
        allowed = torch.zeros(allowed.shape, device=dev).masked_fill(~allowed, torch.finfo(torch.float32).min)
    last_pos = (mask.sum(-1) - 1).clamp(min=0)                                                # (b,)
    pos = last_pos[:, None] + 1 + offset[None, :]
    logits = model(input_ids=ids.expand(b, total), attention_mask=allowed, position_ids=pos,
                   past_key_values=cache, use_cache=True).logits
    targets = torch.tensor([t for o in options for t in o[1:]], dtype=torch.long, device=dev)  # what each fed token predicts
    logits = logits.float()
    logp = logits.gather(-1, targets.expand(b, total)[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (b, total)
    return torch.zeros(b, len(options), device=dev).index_add_(1, owner, logp)


@torch.no_grad()
def score_options_naive(model, prompts: list[list[int]], options: list[list[int]], pad_id: int) -> torch.Tensor:
    """Reference implementation: one full forward per (prompt, option). Used by tests and bench."""
    scores = torch.zeros(len(prompts), len(options))
    for i, p in enumerate(prompts):
        for j, o in enumerate(options):
            ids = torch.tensor([p + o], device=model.device)
            with eval_autocast(model):
                logits = model(input_ids=ids).logits
            logp = F.log_softmax(logits[0, :-1].float(), -1)
            scores[i, j] = logp[len(p) - 1:].gather(-1, ids[0, len(p):, None]).sum()
    return scores
