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


def test_option_scores_read_from_the_generation_cache_equal_a_separate_pass():
    from skillstream.evaluation.generation import generate, generate_and_score

    model, tok = load_backbone("tiny", seed=1)
    model.eval()
    prompts = ["Is this good? a lovely film", "Review: dull", "x", "A much longer review of a film that went on and on"]
    options = [tok(o, add_special_tokens=False)["input_ids"] for o in [" Good", " Bad", " contradiction"]]
    texts, scores = generate_and_score(model, tok, prompts, max_new_tokens=5, batch_size=3, options=options)
    assert texts == generate(model, tok, prompts, max_new_tokens=5, batch_size=3)   # generation is unchanged
    ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    torch.testing.assert_close(scores, score_options_naive(model, ids, options, tok.pad_token_id), atol=1e-4, rtol=1e-4)


def test_exact_match_with_option_scoring_beside_it_equals_the_two_protocols_run_apart(sentiment_folder):
    from skillstream.config import SourceConfig
    from skillstream.data.examples import load_examples
    from skillstream.data.render import Renderer
    from skillstream.evaluation.runner import evaluate_examples

    model, tok = load_backbone("tiny", seed=2)
    renderer = Renderer(tok, 64)
    examples = load_examples(SourceConfig(source=str(sentiment_folder), split="test"))
    both = evaluate_examples(model, tok, renderer, examples, "exact_match", batch_size=4, max_new_tokens=4,
                             also=["accuracy"])
    alone = evaluate_examples(model, tok, renderer, examples, "exact_match", batch_size=4, max_new_tokens=4)
    accuracy = evaluate_examples(model, tok, renderer, examples, "accuracy", batch_size=4)
    assert both["samples"] == alone["samples"] and both["exact_match"] == alone["exact_match"]
    assert both["protocols"] == {"accuracy": accuracy["accuracy"]}
