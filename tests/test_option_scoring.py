"""Option scoring runs each prompt once and must give the same numbers as one pass per option."""
import torch

from skillstream.evaluation.option_scoring import score_options, score_options_naive
from skillstream.models.backbone import load_backbone


def test_cached_option_scores_equal_one_forward_per_option():
    model, tok = load_backbone("tiny", seed=1)
    model.eval()
    prompts = [tok(p)["input_ids"] for p in ["Is this good? a lovely film", "Review: dull", "x"]]
    options = [tok(o, add_special_tokens=False)["input_ids"] for o in [" Good", " Bad", " contradiction"]]
    fast = score_options(model, prompts, options, tok.pad_token_id)
    slow = score_options_naive(model, prompts, options, tok.pad_token_id)
    assert fast.shape == (3, 3)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
