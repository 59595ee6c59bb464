"""BDH (and spiking BDH) as a causal LM the engine, objectives and evaluation can use as they use a
Hugging Face model: ``forward(input_ids, attention_mask=None, labels=None)`` returning an object
with ``.loss`` and ``.logits`` (labels aligned with the inputs and shifted inside, -100 ignored),
``generate(input_ids, attention_mask, max_new_tokens, ...)`` on the recurrent state, ``.device``.

Registered in ``skillstream.components.MODELS`` as ``bdh`` and ``bdh-spiking``; a recipe sizes
them with ``model.args`` (any field of :class:`BDHConfig` / :class:`SpikingBDHConfig`, plus
``calibrate``: set the spiking thresholds on a fixed English sample so the initial firing rate
is ``target_rate``). The tokenizer is :class:`~skillstream.models.byte_tokenizer.ByteTokenizer`.

Batched generation with padding. BDH's attention has no softmax and no mask other than
causality, so left padding would leak into every later position (and into the spiking
membranes). Each prompt is therefore read on its own, without its padding, starting at the
position offset ``longest - length``: the attention scores depend only on position differences
(RoPE), so the offset changes nothing, and afterwards all rows sit at the same position and
advance together, one byte per step on the carried state.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from .bdh import BDH, BDHConfig, BDHState, masked_lm_loss
from .byte_tokenizer import EOS_ID, PAD_ID, ByteTokenizer
from .spiking import SpikingBDH, SpikingBDHConfig

# A fixed English sample for threshold calibration (the Python docs' own prose, stdlib only).
CALIBRATION_TOPICS = ("assignment", "if", "while", "for", "try", "function", "class")


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


def calibration_text(n_bytes: int = 4096) -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[t] for t in CALIBRATION_TOPICS)[:n_bytes]


class BDHForCausalLM(nn.Module):
    """Wraps a :class:`BDH` (``self.bdh``) in the causal-LM interface."""

    def __init__(self, bdh: BDH):
        super().__init__()
        self.bdh = bdh
        self.config = bdh.config
        self.generation_config = SimpleNamespace(pad_token_id=PAD_ID, eos_token_id=EOS_ID, max_new_tokens=64)

    @property
    def device(self) -> torch.device:
        return self.bdh.encoder.device

    @property
    def spiking(self) -> bool:
        return isinstance(self.bdh, SpikingBDH)

    @property
    def last_firing_rates(self) -> list[float] | None:
        """Per-layer firing rates of the last forward (spiking models), else None."""
        return self.bdh.last_firing_rates if self.spiking else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_) -> CausalLMOutput:
        logits, _ = self.bdh._run(input_ids)
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            mask = None if attention_mask is None else attention_mask[:, 1:]
            loss = masked_lm_loss(logits[:, :-1], targets, mask)  # padding is never a target
        return CausalLMOutput(loss, logits)

    # -- generation -------------------------------------------------------------------------
    @staticmethod
    def _cat_states(states: list[BDHState]) -> BDHState:
        layers = [{k: torch.cat([s.layers[i][k] for s in states], 0) for k in states[0].layers[i]}
                  for i in range(len(states[0].layers))]
        return BDHState(pos=states[0].pos, layers=layers)

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int | None):
        if not do_sample or temperature <= 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, pad_token_id: int | None = None, eos_token_id: int | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                 use_state: bool = True, **_) -> torch.Tensor:
        """Prompt ids (left- or right-padded, with their mask) followed by up to ``max_new_tokens``
        new bytes per row; a row stops at EOS and is padded after it. ``use_state=False`` re-reads
        the whole sequence for every byte (the reference's way; for comparison only)."""
        max_new = self.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
        pad = PAD_ID if pad_token_id is None else pad_token_id
        eos = EOS_ID if eos_token_id is None else eos_token_id
        B, width = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = [input_ids[b][mask[b].bool()] for b in range(B)]
        rows = [r if r.numel() else input_ids.new_tensor([eos]) for r in rows]
        longest = max(r.numel() for r in rows)
        pick = lambda lg: self._pick(lg, do_sample, temperature, top_p, top_k)  # noqa: E731
        if use_state:
            last, states = [], []
            for r in rows:  # each prompt on its own, shifted so all end at position `longest`
                state = self.bdh.init_state(1, device=input_ids.device)
                state.pos = longest - r.numel()
                logits, state = self.bdh._run(r.view(1, -1), state, keep_state=True)
                last.append(logits[:, -1])
                states.append(state)
            logits, state = torch.cat(last, 0), self._cat_states(states)
        else:
            logits = torch.cat([self.bdh._run(r.view(1, -1))[0][:, -1] for r in rows], 0)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        new = []
        for i in range(max_new):
            nxt = pick(logits)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new.append(nxt)
            done |= nxt == eos
            if bool(done.all()) or i == max_new - 1:
                break
            if use_state:
                logits, state = self.bdh.step(nxt, state)
            else:
                seqs = [torch.cat([r, torch.stack([n[b] for n in new])]) for b, r in enumerate(rows)]
                logits = torch.cat([self.bdh._run(s.view(1, -1))[0][:, -1] for s in seqs], 0)
        out = torch.stack(new, 1) if new else input_ids.new_zeros(B, 0)
        return torch.cat([input_ids, out], 1)


def _config(cls, args: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - known)
    if unknown:
        from ..errors import UserError
        raise UserError(f"model.args: unknown BDH setting(s) {unknown} (known: {', '.join(sorted(known))})")
    if "threshold_sigma" in args:
        args = {**args, "threshold_sigma": tuple(args["threshold_sigma"])}
    return cls(**args)


def build_bdh(seed: int = 0, **args):
    """(BDHForCausalLM, ByteTokenizer) for plain BDH; ``args`` are :class:`BDHConfig` fields."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BDHForCausalLM(BDH(_config(BDHConfig, args)))
    return model, ByteTokenizer()


def build_spiking_bdh(seed: int = 0, calibrate: bool = False, **args):
    """(BDHForCausalLM, ByteTokenizer) for :class:`SpikingBDH`; with ``calibrate`` the per-layer
    thresholds are set on a fixed English sample so the initial firing rate is ``target_rate``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        bdh = SpikingBDH(_config(SpikingBDHConfig, args))
        if calibrate:
            text = calibration_text(2048).encode("utf-8")
            idx = torch.tensor(list(text), dtype=torch.long).view(4, -1)
            bdh.calibrate_thresholds(idx)
    return BDHForCausalLM(bdh), ByteTokenizer()


def bits_per_byte(nll_nats: float) -> float:
    return nll_nats / math.log(2)
