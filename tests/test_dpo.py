"""DPO objective: pairs tokenised on the final assistant turn, losses by hand and against TRL,
log 2 only while policy == reference, learning below log 2, and a frozen reference."""
import json
import math

import pytest
import torch

from skillstream.config import SourceConfig, load_recipe
from skillstream.data.examples import default_metric, load_examples
from skillstream.data.render import IGNORE, Renderer
from skillstream.models.backbone import load_backbone
from skillstream.objectives.dpo import DPOObjective
from skillstream.model_setup import attach_lora
from skillstream.tools.bfcl import load_bfcl, to_trl_example


def _wrong(message: dict) -> dict:
    """The same call with every argument value changed."""
    call = message["tool_calls"][0]["function"]
    args = {k: (v + 7 if isinstance(v, (int, float)) and not isinstance(v, bool) else "zzz") for k, v in call["arguments"].items()}
    return {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": call["name"], "arguments": args}}]}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = []
    for rec in load_bfcl(["simple"], "train")[:4]:
        ex = to_trl_example(rec)
        rows.append({"prompt": ex["messages"][:-1], "chosen": [ex["messages"][-1]], "rejected": [_wrong(ex["messages"][-1])],
                     "tools": ex["tools"]})
    first = rows[0]
    call = first["chosen"][0]
    # a multi-turn dialogue: the earlier assistant turn and the tool result are prompt, only the last turn is scored
    rows.append({"prompt": first["prompt"] + [call, {"role": "tool", "name": call["tool_calls"][0]["function"]["name"],
                                                     "content": "25.0"},
                                              {"role": "user", "content": "And in words?"}],
                 "chosen": [{"role": "assistant", "content": "The area is twenty-five square units."}],
                 "rejected": [{"role": "assistant", "content": "I cannot tell."}], "tools": first["tools"]})
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(pairs_file):
    model, tok = load_backbone("tiny", seed=0)
    model = attach_lora(model, load_recipe("quickstart", {"lora.dropout": 0.0}))
    renderer = Renderer(tok, 512)
    examples = load_examples(SourceConfig(source=str(pairs_file)))
    return model, tok, renderer, examples


def _perturb(model, seed: int, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and ".default." in n:  # never TRL's "ref" copy
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_lora(model, state):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def _hand_logps(model, batch):
    """Full logits, log-softmax, gather: summed log-probs of the labelled tokens per row."""
    labels = batch["labels"][:, 1:]
    out = []
    for i in range(labels.shape[0]):  # one row at a time: full logits are vocabulary-sized
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1]).logits
        lp = logits[0, :-1].float().log_softmax(-1)
        keep = labels[i] != IGNORE
        out.append(float(lp[keep].gather(1, labels[i][keep][:, None]).sum()))
    return out, [int((labels[i] != IGNORE).sum()) for i in range(labels.shape[0])]


def test_pairs_score_only_the_final_assistant_turn(setup):
    model, tok, renderer, examples = setup
    assert [e.kind for e in examples] == ["preference"] * 5
    obj = DPOObjective()
    item = obj.tokenize(examples[-1], renderer)
    assert item.chosen_ids != item.rejected_ids
    chosen_text = tok.decode([t for t in item.chosen_labels if t != IGNORE])
    assert chosen_text == "The area is twenty-five square units.<|im_end|>\n"
    assert tok.decode([t for t in item.rejected_labels if t != IGNORE]) == "I cannot tell.<|im_end|>\n"
    n_prompt = item.chosen_labels.index(next(t for t in item.chosen_labels if t != IGNORE))
    prompt_text = tok.decode(item.chosen_ids[:n_prompt])
    assert "<tool>calculate_triangle_area(" in prompt_text and "25.0" in prompt_text  # earlier turns: context only
    assert item.chosen_ids[:n_prompt] == item.rejected_ids[:n_prompt]
    batch = obj.collate([obj.tokenize(e, renderer) for e in examples[:2]], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # 2 chosen rows then 2 rejected rows: different sequences
    assert not torch.equal(batch["labels"][0], batch["labels"][2])


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_loss_and_rewards_match_a_hand_computation(setup, loss):
    model, tok, renderer, examples = setup
    beta = 0.5
    _perturb(model, 1)
    ref_state = _lora_state(model)
    obj = DPOObjective(beta=beta, loss=loss, reference="adapter")
    obj.begin_stage(model)
    _perturb(model, 2)  # the policy moves away from the frozen reference
    batch = obj.collate([obj.tokenize(e, renderer) for e in examples[:3]], tok.pad_token_id)
    got, metrics, _ = obj(model, batch)

    policy, tokens = _hand_logps(model, batch)
    policy_state = _lora_state(model)
    _load_lora(model, ref_state)
    ref, _ = _hand_logps(model, batch)
    _load_lora(model, policy_state)
    B = 3
    losses, chosen_r, rejected_r = [], [], []
    for i in range(B):
        lc, lr = policy[i] - ref[i], policy[B + i] - ref[B + i]
        chosen_r.append(beta * lc)
        rejected_r.append(beta * lr)
        d = lc - lr
        if loss == "sigmoid":
            losses.append(math.log1p(math.exp(-beta * d)))
        elif loss == "hinge":
            losses.append(max(0.0, 1 - beta * d))
        else:
            losses.append((lc / tokens[i] - lr / tokens[B + i] - 1 / (2 * beta)) ** 2)
    # sums of a few hundred float32 log-probs: differences are good to about 1e-4
    assert got.item() == pytest.approx(sum(losses) / B, abs=2e-4)
    assert metrics["rewards/chosen"] == pytest.approx(sum(chosen_r) / B, abs=2e-4)
    assert metrics["rewards/rejected"] == pytest.approx(sum(rejected_r) / B, abs=2e-4)
    assert metrics["rewards/margins"] == pytest.approx((sum(chosen_r) - sum(rejected_r)) / B, abs=2e-4)
    assert metrics["rewards/accuracies"] == sum(c > r for c, r in zip(chosen_r, rejected_r)) / B
    assert metrics["logps/chosen"] == pytest.approx(sum(policy[:B]) / B, rel=1e-4)
    assert metrics["logps/rejected"] == pytest.approx(sum(policy[B:]) / B, rel=1e-4)
    assert abs(metrics["rewards/margins"]) > 1e-2  # a real difference, not identical passes


def test_loss_and_rewards_match_trl(setup, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model, tok, renderer, examples = setup
    _perturb(model, 3)
    ours = {loss: DPOObjective(beta=0.2, loss=loss, reference="adapter") for loss in ("sigmoid", "hinge", "ipo")}
    rpo = DPOObjective(beta=0.2, loss="sigmoid", reference="adapter", sft_weight=0.5)
    for obj in (*ours.values(), rpo):
        obj.begin_stage(model)
    # TRL, given a PEFT model whose adapter is already trained, keeps a copy of it as the "ref" adapter
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.2, report_to="none", use_cpu=True, bf16=False)
    trainer = trl.DPOTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=Dataset.from_list([{"prompt": "a b", "chosen": " c", "rejected": " d"}]))
    try:
        _perturb(model, 4)
        obj = ours["sigmoid"]
        batch = obj.collate([obj.tokenize(e, renderer) for e in examples[:2]], tok.pad_token_id)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "completion_mask": (batch["labels"] != IGNORE).long()}
        model.train()
        for loss, obj in ours.items():
            trainer.loss_types, trainer.loss_weights = [loss], [1.0]
            trainer._metrics["train"].clear()
            theirs = trainer._compute_loss(trainer.model, inputs, False)
            got, metrics, _ = obj(model, batch)
            assert got.item() == pytest.approx(theirs.item(), rel=1e-4, abs=2e-4), loss
            for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                        "logps/chosen", "logps/rejected"):
                assert metrics[key] == pytest.approx(trainer._metrics["train"][key][-1], rel=1e-4, abs=2e-4), (loss, key)
        # DPO + w * NLL of the chosen completions = TRL's loss_type [sigmoid, sft] with weights [1, w] (RPO)
        trainer.loss_types, trainer.loss_weights = ["sigmoid", "sft"], [1.0, 0.5]
        got, metrics, _ = rpo(model, batch)
        assert got.item() == pytest.approx(trainer._compute_loss(trainer.model, inputs, False).item(), rel=1e-4, abs=2e-4)
        assert got.item() > ours["sigmoid"](model, batch)[0].item() and metrics["nll/chosen"] > 0
    finally:
        if "ref" in model.peft_config:
            model.delete_adapter("ref")
        model.set_adapter("default")


def test_loss_starts_at_log2_only_because_policy_equals_reference_and_then_falls(setup):
    model, tok, renderer, examples = setup
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()  # a fresh adapter: policy == base model
    obj = DPOObjective(beta=0.1)  # reference auto -> base (adapter disabled)
    obj.begin_stage(model)
    assert obj.resolved == "base" and obj.extra_parameters() == {}
    batch = obj.collate([obj.tokenize(e, renderer) for e in examples[2:]], tok.pad_token_id)
    loss, metrics, _ = obj(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"] == 0.0
    assert metrics["logps/chosen"] != metrics["logps/rejected"]  # the sequences differ all the same

    # the same batch against a reference that is not the policy: no longer log 2
    other = DPOObjective(beta=0.1, reference="adapter")
    _perturb(model, 5)
    other.begin_stage(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    assert abs(other(model, batch)[0].item() - math.log(2)) > 1e-3

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(10):
        loss, metrics, _ = obj(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss, metrics, _ = obj(model, batch)
    assert loss.item() < math.log(2) - 0.1
    assert metrics["rewards/accuracies"] == 1.0 and metrics["rewards/margins"] > 0
    # the held-out scoring of a dpo stage: the same rewards, computed in eval mode without gradients
    model.eval()
    _, metrics, _ = obj(model, batch)
    held = obj.implicit_rewards(model, examples[2:], renderer, tok.pad_token_id, batch_size=len(examples))
    assert held["rewards/margins"] == pytest.approx(metrics["rewards/margins"], rel=1e-4)
    assert held["rewards/accuracies"] == metrics["rewards/accuracies"] == 1.0 and held["n"] == len(examples[2:])
    # ... and, from the same policy pass, the preference metric an evaluation computes on its own
    from skillstream.evaluation.preference import evaluate_preferences
    own = evaluate_preferences(model, tok, renderer, examples[2:], batch_size=len(examples))
    assert held["ranking"]["preference_accuracy"] == own["preference_accuracy"]
    assert held["ranking"]["margin"] == pytest.approx(own["margin"], rel=1e-5)


def test_adapter_reference_is_a_frozen_copy_that_training_does_not_move(setup):
    model, tok, renderer, examples = setup
    _perturb(model, 6)  # as if an SFT stage had trained the adapter
    obj = DPOObjective(beta=0.1)
    obj.begin_stage(model)
    assert obj.resolved == "adapter"
    frozen = obj.extra_parameters()
    assert frozen and all(k.startswith("ref.") and not v.requires_grad for k, v in frozen.items())
    batch = obj.collate([obj.tokenize(e, renderer) for e in examples[3:]], tok.pad_token_id)
    ref0 = obj.reference_logps(model, batch).clone()
    start = _lora_state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss, _, _ = obj(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(start[n], p) for n, p in model.named_parameters() if n in start)
    torch.testing.assert_close(obj.reference_logps(model, batch), ref0)
    # the reference logps are those of the adapter as it was when the stage began
    now = _lora_state(model)
    _load_lora(model, start)
    hand, _ = _hand_logps(model, batch)
    _load_lora(model, now)
    assert ref0.tolist() == pytest.approx(hand, rel=1e-4)
    # what a checkpoint stores restores the same reference in a new objective
    resumed = DPOObjective(beta=0.1)
    resumed.load_state_dict(obj.state_dict())
    resumed.begin_stage(model)
    with torch.no_grad():
        for k, v in resumed.extra_parameters().items():
            v.copy_(frozen[k])
    torch.testing.assert_close(resumed.reference_logps(model, batch), ref0)


def test_preference_metric_ranks_chosen_by_log_probability(setup, pairs_file):
    from skillstream.evaluation.runner import evaluate_examples

    model, tok, renderer, examples = setup
    out = evaluate_examples(model, tok, renderer, examples, "preference", batch_size=2)
    obj = DPOObjective()
    batch = obj.collate([obj.tokenize(e, renderer) for e in examples], tok.pad_token_id)
    logps, _ = _hand_logps(model, batch)
    n = len(examples)
    diffs = [logps[i] - logps[n + i] for i in range(n)]
    assert out["metric"] == "preference_accuracy" and out["n"] == n
    assert out["score"] == sum(d > 0 for d in diffs) / n
    assert out["margin"] == pytest.approx(sum(diffs) / n, abs=1e-3)
    assert default_metric(SourceConfig(source=str(pairs_file)), examples) == "preference"


def test_a_batch_cap_is_refused_for_dpo_whose_loss_is_a_mean_over_pairs_not_tokens(setup):
    """train.max_batch_tokens weights each piece of a batch by its share of the loss weight (lm: labelled
    tokens); DPO declares none (Objective.loss_weight is None), so cutting its batches is refused."""
    from skillstream.config import TrainConfig
    from skillstream.stages import check_batch_cap
    from skillstream.errors import UserError

    _, tok, renderer, examples = setup
    obj = DPOObjective()
    items = [obj.tokenize(e, renderer) for e in examples]
    check_batch_cap(TrainConfig(), obj, items, tok.pad_token_id, "dpo")  # no cap: nothing to refuse
    with pytest.raises(UserError, match=r"stage 'dpo': train.max_batch_tokens: objective 'dpo'"):
        check_batch_cap(TrainConfig(max_batch_tokens=256), obj, items, tok.pad_token_id, "dpo")
