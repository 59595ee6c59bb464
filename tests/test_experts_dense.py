"""experts.training: dense_to_sparse on the tiny model: the router and the experts train through the
router's weighted mixture (dense while an input's top expert is immature, top-k with a load-balancing
term once it is mature), the router learning from the LM loss's gradient; a stream resumes bit-exactly."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from skillstream.data.batching import collate
from skillstream.experts.dense import MixtureObjective, load_balance, prompt_mask
from skillstream.experts.mixing import mixing
from skillstream.objectives.lm import LMObjective
from test_experts_lifecycle import items, lifecycle, returning_skill_recipe
from test_experts_skills import one_thread  # noqa: F401  (autouse fixture)


def test_the_load_balancing_term_on_a_hand_checked_example():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
    # top-1 choices 0, 0, 2, 1: shares f = (1/2, 1/4, 1/4); mean probabilities P = (0.4, 0.3, 0.3)
    # 3 * (0.5 * 0.4 + 0.25 * 0.3 + 0.25 * 0.3) = 3 * 0.35
    assert float(load_balance(probs)) == pytest.approx(1.05)
    assert float(load_balance(torch.full((4, 3), 1 / 3))) == pytest.approx(1.0)  # balanced: its minimum
    assert float(load_balance(torch.tensor([[1.0, 0.0, 0.0]] * 4))) == pytest.approx(3.0)  # all on one expert: n
    # top-2: rows choose {0, 1}, {0, 1}, {1, 2}, {1, 2}, each choice half a row: f = (2/8, 4/8, 2/8)
    assert float(load_balance(probs, k=2)) == pytest.approx(3 * (2 / 8 * 0.4 + 4 / 8 * 0.3 + 2 / 8 * 0.3))


def two_experts():
    """A lifecycle with two experts whose LoRA B is non-zero (PEFT starts B at 0: an expert that adds
    nothing gives the router no gradient) and a router head that is not all zeros."""
    life = lifecycle()
    life.pool.create("expert_1")
    life.trainer.add_expert()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in life.model.named_parameters():
            if ".lora_B." in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        life.router.head.weight.normal_(0, 0.3, generator=g)
    life.pool.set_trainable(life.pool.names)
    batch = collate(items(life, "bash", 0, 3) + items(life, "math", 0, 3), life.pad_id)
    return life, batch


def objective(life, maturity, balance=0.01) -> MixtureObjective:
    return MixtureObjective(LMObjective(), life.model, life.router, life.pool.names, torch.tensor(maturity),
                            threshold=0.5, top_k=1, balance=balance, eos_id=life.tok.eos_token_id)


def test_dense_training_moves_the_router_by_the_lm_losss_gradient_through_the_mixture():
    life, batch = two_experts()
    loss, metrics, _ = objective(life, [0.0, 0.0])(life.model, batch)  # both immature: every input dense
    loss.backward()
    assert metrics["router/dense_share"] == 1.0 and "router/load_balance" not in metrics

    # the same gradient by hand: dL/dw of the LM loss with the mixing weights as a leaf, then the
    # softmax's Jacobian and the linear head (over the per-block layer-normed features)
    feats = life.router.read(life.model, {"input_ids": batch["input_ids"],
                                          "attention_mask": prompt_mask(batch, life.tok.eos_token_id)})
    with torch.no_grad():
        p = life.router.probs(feats)
    w = p.clone().requires_grad_(True)
    with mixing(life.model, life.pool.names, w):
        hand_loss = LMObjective()(life.model, batch)[0]
    assert float(hand_loss.detach()) == pytest.approx(float(loss.detach()), abs=1e-6)
    (g_w,) = torch.autograd.grad(hand_loss, w)
    g_logits = p * (g_w - (p * g_w).sum(-1, keepdim=True))
    x = F.layer_norm(feats, feats.shape[-1:])
    head = life.router.head
    assert head.weight.grad.abs().max() > 0
    assert torch.allclose(head.weight.grad, g_logits.T @ x, atol=1e-6, rtol=1e-4)
    assert torch.allclose(head.bias.grad, g_logits.sum(0), atol=1e-6, rtol=1e-4)
    # and every expert learns from every input, in proportion to its weight
    for name in life.pool.names:
        grads = [q.grad for q in life.pool.parameters_of(name).values()]
        assert all(g is not None for g in grads) and max(float(g.abs().max()) for g in grads) > 0


def test_once_the_top_expert_is_mature_inputs_are_delegated_to_it_with_the_load_balancing_term():
    life, batch = two_experts()
    with torch.no_grad():
        life.router.head.bias.copy_(torch.tensor([4.0, 0.0]))  # expert_0 is every input's top choice
    mixture = objective(life, [1.0, 0.0])                       # ... and it is mature: sparse top-1
    probs, w, sparse = mixture.weights(batch)
    assert bool(sparse.all())
    assert torch.equal(w.detach(), torch.tensor([[1.0, 0.0]] * 6))
    loss, metrics, _ = mixture(life.model, batch)
    term = float(load_balance(probs.detach()))
    assert metrics["router/dense_share"] == 0.0 and metrics["router/load_balance"] == pytest.approx(term)
    life.pool.activate("expert_0")  # expert_0 alone (PEFT's single-adapter path) + the term
    alone = LMObjective()(life.model, batch)[0]
    assert float(loss) == pytest.approx(float(alone) + 0.01 * term, abs=1e-5)
    loss.backward()
    assert all(q.grad is None or not q.grad.any() for q in life.pool.parameters_of("expert_1").values())
    assert life.router.head.weight.grad.abs().max() > 0  # the term (and the renormalised top-1) reach the router

    dense, w_dense, sparse_dense = objective(life, [0.4, 1.0]).weights(batch)  # top expert immature again
    assert not sparse_dense.any() and torch.equal(w_dense, dense)          # the dense mix of both


def stream(tmp_path, name, **kw):
    from skillstream.run import train as train_run
    cfg = returning_skill_recipe(tmp_path, training="dense_to_sparse")
    return train_run(cfg, out=tmp_path / name, show_progress=False, **kw)


def test_a_dense_to_sparse_stream_trains_through_the_mixture_and_resumes_bit_exactly(tmp_path):
    from safetensors.torch import load_file

    from test_dylora_moe import CrashAfter

    whole = stream(tmp_path, "whole")
    rows = [json.loads(x) for x in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    shares = [(r["stage"], r["router/dense_share"], "router/load_balance" in r) for r in rows if "router/dense_share" in r]
    # bash's first chunk: its new expert is immature (dense); bash again once mature (steps): top-1 + the term;
    # the math chunks train their new, immature expert densely; bash's return: delegated to its mature expert
    assert shares[0][1:] == (1.0, False) and shares[2][1:] == (0.0, True)
    assert [s[1:] for s in shares if s[0] == "chunk_0003"] == [(1.0, False)] * 4
    assert [s[1:] for s in shares if s[0] == "chunk_0005"] == [(0.0, True)] * 2

    with pytest.raises(Exception) as crash:
        stream(tmp_path, "run", plugins=[CrashAfter(9)])  # killed inside the chunk where bash returns
    assert type(crash.value).__name__ == "_Crash"
    resumed = stream(tmp_path, "run", resume=True)
    assert resumed.results["matrix"] == whole.results["matrix"]
    for name in whole.results["experts"]:
        a = load_file(str(whole.run_dir / "experts" / name / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "run" / "experts" / name / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(str(d / "router" / "router.safetensors")) for d in (whole.run_dir, tmp_path / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
