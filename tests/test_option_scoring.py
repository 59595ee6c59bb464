"""Option scoring runs each prompt once and must give the same numbers as one pass per option."""
import pytest
import torch

from skillstream.evaluation.option_scoring import score_options, score_options_naive
from skillstream.model_setup import bf16_enabled
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


def test_many_options_of_different_lengths_scored_in_one_row_equal_one_forward_per_option():
    # twelve options, one of a single token (scored from the prompt's last logits alone), some sharing
    # a first token, with each attention kernel that takes the options' mask (sdpa: a boolean mask,
    # eager: an additive one)
    prompts_text = ["Is this good? a lovely film", "Review: dull", "x"]
    words = ["Good", " Bad", " contradiction", " neutral", " partial entailment", " paraphrase", " unrelated",
             " opposite", " cause", " effect", " example of", " generalization"]
    for attn in ("sdpa", "eager"):
        model, tok = load_backbone("tiny", seed=3, attn_implementation=attn)
        model.eval()
        prompts = [tok(p)["input_ids"] for p in prompts_text]
        options = [tok(o, add_special_tokens=False)["input_ids"] for o in words]
        assert min(len(o) for o in options) == 1 and max(len(o) for o in options) > 2
        fast = score_options(model, prompts, options, tok.pad_token_id)
        torch.testing.assert_close(fast, score_options_naive(model, prompts, options, tok.pad_token_id),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not bf16_enabled("auto", "cpu"), reason="this CPU has no bf16 arithmetic (AVX512-BF16/AMX)")
def test_evaluation_in_a_bf16_run_computes_in_bf16_and_stays_close_to_fp32(sentiment_folder):
    # Inside a run whose Accelerator computes in bf16 (train.bf16 where the hardware has it), option
    # scores and generation run under bf16 autocast. On the tiny model the option log-likelihoods stay
    # within 0.05 nats of fp32 (bf16 keeps 8 bits of mantissa: about 0.4% per matmul, here on
    # log-likelihoods of a few nats) and the argmax of each prompt is the same.
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from skillstream.evaluation.precision import eval_dtype

    model, tok = load_backbone("tiny", seed=4)
    model.eval()
    prompts = [tok(p)["input_ids"] for p in ["Is this good? a lovely film", "Review: dull", "a much longer one"]]
    options = [tok(o, add_special_tokens=False)["input_ids"] for o in [" Good", " Bad", " contradiction", " neutral"]]
    fp32 = score_options(model, prompts, options, tok.pad_token_id)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert eval_dtype() is None
    AcceleratorState._reset_state(True)
    Accelerator(mixed_precision="bf16", cpu=True)
    try:
        assert eval_dtype() == torch.bfloat16
        calls = []
        hook = model.lm_head.register_forward_hook(lambda m, args, out: calls.append(out.dtype))
        bf16 = score_options(model, prompts, options, tok.pad_token_id)
        hook.remove()
    finally:
        AcceleratorState._reset_state(True)
    assert calls and all(d == torch.bfloat16 for d in calls)   # the matmuls ran in bf16
    # the frozen weights, held in bf16 while it evaluated, are the float32 originals again, bit for bit
    assert all(torch.equal(v, weights[k]) and v.dtype == weights[k].dtype for k, v in model.state_dict().items())
    assert (bf16 - fp32).abs().max() < 0.05
    assert torch.equal(bf16.argmax(-1), fp32.argmax(-1))
