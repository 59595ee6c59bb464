"""The ``preference`` metric on held-out preference pairs (prompt/chosen/rejected).

``preference_accuracy``: share of pairs whose chosen continuation the model gives a higher
log-probability (summed over the continuation's tokens, rendered as the DPO objective renders
them) than the rejected one; ``margin``: the mean difference of those log-probabilities. This is
the model's own ranking, with no reference model: DPO's implicit-reward accuracy
(``rewards/accuracies``) needs the reference of the stage that trained it, which an evaluation
after the run does not have. The numbers come from `objectives.dpo.preference_ranking`, which the DPO
objective also reports beside its implicit rewards.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from ..objectives.dpo import DPOObjective, preference_ranking, sequence_logps


def require_preference_examples(task: str, examples) -> None:
    bad = next((e for e in examples if e.kind != "preference"), None)
    if bad is not None:
        raise UserError(f"data.eval[{task}]: metric 'preference' needs prompt/chosen/rejected rows ({bad.where} is {bad.kind})")


@torch.no_grad()
def evaluate_preferences(model, tok, renderer, examples, batch_size: int) -> dict:
    obj = DPOObjective()
    margins = []
    for i in range(0, len(examples), batch_size):
        items = [obj.tokenize(e, renderer) for e in examples[i:i + batch_size]]
        batch = {k: v.to(model.device) for k, v in obj.collate(items, tok.pad_token_id).items()}
        chosen, rejected = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).chunk(2)
        margins += (chosen - rejected).tolist()
    return preference_ranking(margins)
