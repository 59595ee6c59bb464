"""An evaluation is remembered by the weights that serve it: the same function on the same inputs is
scored once, and any change to what answers is scored again."""
import torch
from peft import LoraConfig, get_peft_model

from skillstream.config import SourceConfig
from skillstream.data.examples import load_examples
from skillstream.data.render import Renderer
from skillstream.evaluation.memo import EvalMemo, adds_nothing
from skillstream.evaluation.runner import evaluate_examples
from skillstream.models.backbone import load_backbone


def _lora(model, name="default"):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name=name)


def _train_a_little(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_a_fresh_lora_is_the_backbone_and_a_trained_one_is_not():
    memo = EvalMemo()
    bare, _ = load_backbone("tiny", seed=0)
    bare_print = memo.fingerprint(bare)
    model, _ = load_backbone("tiny", seed=0)
    model = _lora(model)
    assert adds_nothing(model) and memo.fingerprint(model) == bare_print  # B is zero: the same function
    _train_a_little(model)
    assert not adds_nothing(model) and memo.fingerprint(model) != bare_print
    with model.disable_adapter():
        assert memo.fingerprint(model) == bare_print  # a disabled adapter is not in the forward pass


def test_a_frozen_weight_changed_in_place_changes_the_fingerprint():
    memo = EvalMemo()
    model, _ = load_backbone("tiny", seed=0, freeze=True)
    before = memo.fingerprint(model)
    assert memo.fingerprint(model) == before            # the backbone is hashed once, then read back
    weight = next(p for p in model.parameters() if p.ndim == 2)
    with torch.no_grad():
        weight[0, 0] += 1.0                              # e.g. a merge into the base weights
    assert memo.fingerprint(model) != before


def test_training_one_expert_leaves_the_fingerprint_of_another_unchanged():
    memo = EvalMemo()
    model, _ = load_backbone("tiny", seed=0)
    model = _lora(model, "a")
    _train_a_little(model)
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.set_adapter("a")
    served_by_a = memo.fingerprint(model)
    model.set_adapter("b")
    _train_a_little(model)  # only b trains
    assert memo.fingerprint(model) != served_by_a
    model.set_adapter("a")
    assert memo.fingerprint(model) == served_by_a


def test_a_repeated_evaluation_comes_from_the_memo_and_a_changed_model_is_scored_again(sentiment_folder, tmp_path):
    model, tok = load_backbone("tiny", seed=2)
    model = _lora(model)
    renderer = Renderer(tok, 64)
    examples = load_examples(SourceConfig(source=str(sentiment_folder), split="test"))
    memo = EvalMemo(tmp_path / "cache")
    first = evaluate_examples(model, tok, renderer, examples, "exact_match", 4, 4, also=["accuracy"], memo=memo)
    again = evaluate_examples(model, tok, renderer, examples, "exact_match", 4, 4, also=["accuracy"], memo=memo)
    assert "memo" not in first and again.pop("memo") is True and again == first
    # another process naming the same folder (a fresh memo, a fresh copy of the model) reads it
    other, _ = load_backbone("tiny", seed=2)
    shared = evaluate_examples(other, tok, renderer, examples, "exact_match", 4, 4, also=["accuracy"],
                               memo=EvalMemo(tmp_path / "cache"))
    assert shared.pop("memo") is True and shared["protocols"] == first["protocols"]
    # other inputs, or other weights: measured again
    fewer = evaluate_examples(model, tok, renderer, examples[:3], "exact_match", 4, 4, also=["accuracy"], memo=memo)
    _train_a_little(model)
    changed = evaluate_examples(model, tok, renderer, examples, "exact_match", 4, 4, also=["accuracy"], memo=memo)
    assert "memo" not in fewer and "memo" not in changed
    assert (memo.hits, memo.misses) == (1, 3)


def test_in_the_oracle_regime_an_old_tasks_untouched_expert_is_not_scored_twice(sentiment_folder, tmp_path):
    import skillstream
    from tests.conftest import write_task_folder

    topic = write_task_folder(tmp_path / "topic", [{"sentence": "goal scored", "label": "Sport"},
                                                   {"sentence": "rates rise", "label": "Money"}] * 2,
                              [{"sentence": "a late goal", "label": "Sport"}, {"sentence": "stocks fall", "label": "Money"}],
                              ["Sport", "Money"])
    stream = tmp_path / "stream"
    stream.mkdir()
    for f in (sentiment_folder, topic):
        (stream / f.name).symlink_to(f)
    run = skillstream.train("adaptive_learner", out=tmp_path / "run", show_progress=False, overrides={
        "model": "tiny", "report_to": [], "data.stream": str(stream), "plugins": [], "lora.per_stage": True,
        "train.steps": 2, "train.batch_size": 2})
    r = run.results
    # rows: initial, after sentiment, after topic. Before topic trains, its expert is still a zero
    # update (the backbone's initial answer); after it, sentiment's expert is the one topic left alone
    initial, after_sentiment, after_topic = r["initial_details"], *r["details"]
    assert r["evaluations_remembered"] == 2
    assert after_sentiment[1].get("memo") is True and after_sentiment[1]["samples"] == initial[1]["samples"]
    assert after_topic[0].get("memo") is True and after_topic[0]["samples"] == after_sentiment[0]["samples"]
    assert not any(d.get("memo") for d in initial + [after_sentiment[0], after_topic[1]])
