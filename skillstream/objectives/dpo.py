"""Direct Preference Optimisation on prompt/chosen/rejected pairs (Rafailov et al., 2023).

    objective: {name: dpo, beta: 0.1, loss: sigmoid, reference: auto}

Per pair, with log-probabilities summed over the completion tokens (the final assistant turn of a
conversation, or the completion of a plain prompt; the prompt, earlier turns included, is never
scored), and ``delta = (log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))``:

* ``sigmoid``: ``-log σ(β·delta)`` -- the DPO loss;
* ``hinge``:   ``max(0, 1 - β·delta)`` (SLiC);
* ``ipo``:     ``(delta' - 1/(2β))²`` where ``delta'`` uses log-ratios averaged per completion token
  (Azar et al., 2023, in the length-normalised form TRL uses).

``sft_weight`` w > 0 adds w times the negative log-likelihood of the chosen completions (averaged
over all their tokens in the batch): TRL's ``loss_type=[loss, "sft"], loss_weights=[1, w]``, the
RPO recipe (Pang et al., 2024). DPO alone can lower the likelihood of the chosen answers along with
the rejected ones; the SFT term keeps the chosen ones likely, so what SFT taught is not unlearned.

These are TRL's formulas (``DPOTrainer._compute_loss``, TRL 1.16) and its metric names:
``rewards/chosen`` = β·(log π(c) - log π_ref(c)), ``rewards/rejected``, ``rewards/margins`` (their
difference), ``rewards/accuracies`` (share with chosen reward > rejected reward), ``logps/chosen``,
``logps/rejected`` (policy log-probabilities, summed), averaged over the batch.

Chosen and rejected are different sequences run in one forward pass: the batch holds the B chosen
sequences followed by the B rejected ones. (MUSE's public code ran the same input twice, so
delta was 0 and the loss stayed at log 2 whatever the model did.) The loss starts at exactly
log 2 only when the policy equals the reference.

The reference is never a second copy of the backbone (``reference``: auto | base | adapter, see
objectives/reference.py): by default the policy the stage starts from (the SFT adapter after SFT).
The reference pass runs in eval mode (no dropout) under ``torch.no_grad()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.batching import pad_batch
from ..data.examples import Example
from ..data.render import IGNORE, Renderer
from ..errors import UserError
from ..evaluation.intervals import wilson
from ..models.modes import eval_mode
from .base import Objective
from .lm import labelled_nll
from .reference import Reference

LOSSES = ("sigmoid", "hinge", "ipo")


@dataclass
class PairItem:
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    truncated: bool

    @property
    def length(self) -> int:  # what length grouping sorts by (see data/batching.item_length)
        return len(self.chosen_ids) + len(self.rejected_ids)


def preference_texts(ex: Example, renderer: Renderer) -> tuple[str, str, str]:
    """(prompt text, chosen continuation, rejected continuation) with the chat template.

    Conversational pairs render prompt + chosen (and prompt + rejected) as one conversation and
    take what follows the prompt with its generation header; plain pairs are a user turn and an
    assistant answer, as prompt/completion examples are rendered."""
    if ex.kind != "preference":
        raise UserError(f"{ex.where}: the dpo objective needs preference rows (prompt/chosen/rejected), got {ex.kind}")
    if ex.messages is None:
        prompt = renderer.prompt_text(Example("prompt_completion", prompt=ex.prompt))
        probe = Example("prompt_completion", prompt=ex.prompt)
        return prompt, renderer.answer_text(probe, ex.chosen), renderer.answer_text(probe, ex.rejected)
    prompt = renderer.chat(ex.messages, add_generation_prompt=True, tools=ex.tools)
    out = []
    for side in (ex.chosen, ex.rejected):
        full = renderer.chat(ex.messages + side, tools=ex.tools)
        if not full.startswith(prompt):
            raise UserError(f"{ex.where}: the chat template does not render the prompt as the start of prompt + answer")
        out.append(full[len(prompt):])
    return prompt, out[0], out[1]


def _fit(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut to max_length keeping the completion's start and the prompt's end (nearest the answer)."""
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion, False
    completion = completion[: max(max_length - min(len(prompt), max_length // 2), 1)]
    keep = max_length - len(completion)
    return (prompt[-keep:] if keep > 0 else []), completion, True


def sequence_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Sum of log p(label token) per row, the LM head applied only where a label follows."""
    return -labelled_nll(model, input_ids, attention_mask, labels)[0]


def preference_ranking(margins: list[float]) -> dict:
    """The `preference` metric (evaluation/preference.py) from each pair's summed log-probability
    difference, chosen minus rejected: the share of pairs ranked right, the mean margin, n, and a
    Wilson interval on the share."""
    n, right = len(margins), sum(d > 0 for d in margins)
    return {"preference_accuracy": right / n, "margin": sum(margins) / n, "n": n,
            "outcomes": [int(d > 0) for d in margins], "ci95": {"preference_accuracy": wilson(right, n)}}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, loss: str = "sigmoid",
             chosen_tokens=None, rejected_tokens=None) -> torch.Tensor:
    """Per-pair losses (see the module doc); token counts are needed for ``ipo``."""
    chosen_lr, rejected_lr = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss == "sigmoid":
        return -F.logsigmoid(beta * (chosen_lr - rejected_lr))
    if loss == "hinge":
        return torch.relu(1 - beta * (chosen_lr - rejected_lr))
    if loss == "ipo":
        delta = chosen_lr / chosen_tokens.clamp(min=1) - rejected_lr / rejected_tokens.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(loss)


def _unwrap(model):
    return getattr(model, "module", model)  # DDP


class DPOObjective(Objective):
    """DPO / IPO / hinge on preference pairs; see the module doc."""

    name = "dpo"

    def __init__(self, beta: float = 0.1, loss: str = "sigmoid", reference: str = "auto", sft_weight: float = 0.0,
                 **context):
        if loss not in LOSSES:
            raise UserError(f"objective dpo: loss {loss!r} unknown (expected one of {', '.join(LOSSES)})")
        self.reference = Reference(reference, "objective dpo")
        if not beta > 0:
            raise UserError(f"objective dpo: beta must be > 0 (got {beta})")
        if not (isinstance(sft_weight, (int, float)) and math.isfinite(sft_weight) and sft_weight >= 0):
            raise UserError(f"objective dpo: sft_weight must be a number >= 0 (got {sft_weight!r})")
        self.beta, self.loss, self.sft_weight = float(beta), loss, float(sft_weight)

    # -- protocol ------------------------------------------------------------------------------
    def tokenize(self, example: Example, renderer: Renderer) -> PairItem:
        prompt, chosen, rejected = preference_texts(example, renderer)
        tok = renderer.tok
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        sides, truncated = [], False
        for text in (chosen, rejected):
            c = tok(text, add_special_tokens=False)["input_ids"]
            pp, cc, cut = _fit(p, c, renderer.max_length)
            truncated |= cut
            sides.append((pp + cc, [IGNORE] * len(pp) + cc))
        if sides[0][0] == sides[1][0]:
            raise UserError(f"{example.where}: chosen and rejected render to the same tokens")
        return PairItem(sides[0][0], sides[0][1], sides[1][0], sides[1][1], truncated)

    def collate(self, items: list[PairItem], pad_id: int) -> dict[str, torch.Tensor]:
        return pad_batch([it.chosen_ids for it in items] + [it.rejected_ids for it in items],
                         [it.chosen_labels for it in items] + [it.rejected_labels for it in items], pad_id)

    def extra_parameters(self) -> dict:
        return self.reference.parameters()

    def state_dict(self) -> dict:
        return self.reference.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reference.load_state_dict(state)

    @property
    def resolved(self) -> str | None:
        return self.reference.resolved

    # -- reference -------------------------------------------------------------------------------
    def begin_stage(self, model) -> None:
        """Fix the reference: the policy as it stands when the stage begins (see objectives/reference.py)."""
        self.reference.begin(_unwrap(model))

    @torch.no_grad()
    def reference_logps(self, model, batch) -> torch.Tensor:
        inner = _unwrap(model)
        with eval_mode(inner), self.reference.active(inner):
            return sequence_logps(inner, batch["input_ids"], batch["attention_mask"], batch["labels"])

    @torch.no_grad()
    def implicit_rewards(self, model, examples, renderer: Renderer, pad_id: int, batch_size: int) -> dict:
        """TRL's evaluation metrics on held-out pairs, against this stage's reference, in eval mode:
        ``rewards/accuracies`` (share with chosen reward > rejected reward; 0 while the policy is the
        reference), ``rewards/margins``, ``rewards/chosen``, ``rewards/rejected``, ``n``, ``ci95``; and
        under ``ranking`` the `preference` metric from the same policy pass (evaluation/preference.py)."""
        inner = _unwrap(model)
        chosen, rejected, margins = [], [], []
        with eval_mode(inner):
            for i in range(0, len(examples), batch_size):
                batch = self.collate([self.tokenize(e, renderer) for e in examples[i:i + batch_size]], pad_id)
                batch = {k: v.to(inner.device) for k, v in batch.items()}
                pc, pr, rc, rr = self._logps(inner, batch)
                chosen += (self.beta * (pc - rc)).tolist()
                rejected += (self.beta * (pr - rr)).tolist()
                margins += (pc - pr).tolist()
        n = len(chosen)
        right = sum(c > r for c, r in zip(chosen, rejected))
        return {"rewards/accuracies": right / n, "rewards/margins": sum(c - r for c, r in zip(chosen, rejected)) / n,
                "rewards/chosen": sum(chosen) / n, "rewards/rejected": sum(rejected) / n, "n": n,
                "ci95": {"rewards/accuracies": wilson(right, n)}, "ranking": preference_ranking(margins)}

    def _logps(self, model, batch) -> tuple[torch.Tensor, ...]:
        """Summed completion log-probabilities: policy chosen, policy rejected, reference chosen, reference rejected."""
        ref = self.reference_logps(model, batch)
        logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return (*logps.chunk(2), *ref.chunk(2))

    # -- loss --------------------------------------------------------------------------------------
    def __call__(self, model, batch: dict[str, torch.Tensor]):
        pc, pr, rc, rr = self._logps(model, batch)
        tokens = (batch["labels"][:, 1:] != IGNORE).sum(-1).float()
        tc, tr = tokens.chunk(2)
        loss = dpo_loss(pc, pr, rc, rr, self.beta, self.loss, tc, tr).mean()
        extra = {}
        if self.sft_weight:
            nll = -pc.sum() / tc.sum().clamp(min=1)  # per chosen token, over the batch (TRL's "sft" loss)
            loss = loss + self.sft_weight * nll
            extra["nll/chosen"] = nll.item()
        chosen_r, rejected_r = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
        metrics = {**extra, "rewards/chosen": chosen_r.mean().item(), "rewards/rejected": rejected_r.mean().item(),
                   "rewards/margins": (chosen_r - rejected_r).mean().item(),
                   "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
                   "logps/chosen": pc.detach().mean().item(), "logps/rejected": pr.detach().mean().item()}
        return loss, metrics, None


LOG2 = math.log(2)
