"""PPO: GAE by hand, the KL estimators on known distributions, the ratio on the first minibatch,
the KL controller, resumable buffer state, the rewards, and a short run that games an easy reward."""
from __future__ import annotations

import math
import random

import pytest
import torch

from skillstream.config import SourceConfig, load_recipe
from skillstream.data.batching import collate
from skillstream.data.examples import Example, load_examples
from skillstream.data.render import Renderer
from skillstream.errors import UserError
from skillstream.models.backbone import load_backbone
from skillstream.objectives.lm import causal_lm_loss
from skillstream.objectives.ppo import KLController, PPOObjective, gae, kl_per_token, masked_whiten
from skillstream.objectives.rewards import Sample, parse_rewards
from skillstream.model_setup import attach_lora

pytestmark = pytest.mark.long_running  # see pyproject.toml: scheduled first



def test_gae_on_a_hand_computed_four_token_example():
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.5, 1.0, 7.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])  # the second response ended after 3 tokens
    adv, ret = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.8)
    # delta_t = r_t + 0.9 V_{t+1} - V_t;  A_t = delta_t + 0.72 A_{t+1}
    # t=3: 1 - 0.4 = 0.6;  t=2: 0.36 - 0.3 + 0.72*0.6 = 0.492;  t=1: 0.27 - 0.2 + 0.72*0.492 = 0.42424
    # t=0: 0.18 - 0.1 + 0.72*0.42424 = 0.3854528
    torch.testing.assert_close(adv[0], torch.tensor([0.3854528, 0.42424, 0.492, 0.6]))
    torch.testing.assert_close(ret[0], torch.tensor([0.4854528, 0.62424, 0.792, 1.0]))
    # gamma = lambda = 1: A_t = (sum of later rewards) - V_t; whatever sits after the end is ignored
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv[1], torch.tensor([1.4, 1.3, 0.7, 0.0]))
    torch.testing.assert_close(ret[1], torch.tensor([1.5, 1.5, 1.0, 0.0]))
    # the first row with gamma = lambda = 1: A_t = 1 - V_t (rows are responses, time is the token index)
    torch.testing.assert_close(adv[0], torch.tensor([1.0 - 0.1, 1.0 - 0.2, 1.0 - 0.3, 1.0 - 0.4]))


def test_k1_and_k3_estimate_the_kl_of_known_distributions():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    kl = float((p * (p / q).log()).sum())                       # KL(p || q) = 0.25 ln 2 ... exactly
    assert kl == pytest.approx(0.25 * math.log(2), rel=1e-6)
    k1 = kl_per_token(p.log(), q.log(), "k1")
    k3 = kl_per_token(p.log(), q.log(), "k3")
    # both are unbiased under samples from p: their p-weighted means are the KL itself
    assert float((p * k1).sum()) == pytest.approx(kl, rel=1e-6)
    assert float((p * k3).sum()) == pytest.approx(kl, rel=1e-6)
    assert (k1 < 0).any() and (k3 >= 0).all()                   # k1 can go negative per token, k3 never
    torch.testing.assert_close(k3, q / p - 1 - (q / p).log())
    assert float(kl_per_token(p.log(), p.log(), "k1").abs().max()) == 0.0
    assert float(kl_per_token(p.log(), p.log(), "k3").abs().max()) == 0.0


def test_adaptive_kl_controller_moves_toward_the_target():
    ctl = KLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)                      # KL too high: error clipped to +0.2 -> coef * 1.02
    assert ctl.value == pytest.approx(0.102)
    ctl.update(6.6, 10)                       # 10% high -> * 1.01
    assert ctl.value == pytest.approx(0.102 * 1.01)
    before = ctl.value
    ctl.update(3.0, 10)                       # too low: error clipped to -0.2 -> * 0.98
    assert ctl.value == pytest.approx(before * 0.98)
    fixed = KLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


@pytest.fixture(scope="module")
def tiny():
    cfg = load_recipe("quickstart", {"model": "tiny"})
    model, tok = load_backbone("tiny", seed=0)
    model = attach_lora(model, cfg)
    renderer = Renderer(tok, 128)
    examples = load_examples(SourceConfig(source="nl2bash", limit=16))
    return cfg, model, tok, renderer, examples


def _objective(cfg, tok, renderer, **kw):
    args = dict(rewards={"bash_structure": 1.0}, max_new_tokens=6, temperature=1.0, ppo_epochs=2, num_mini_batches=2)
    return PPOObjective(**{**args, **kw}, tokenizer=tok, renderer=renderer, recipe=cfg)


def test_kl_is_zero_when_the_policy_is_the_reference_and_ratio_is_one_on_the_first_minibatch(tiny):
    cfg, model, tok, renderer, examples = tiny
    with torch.no_grad():  # LoRA starts with B = 0: the policy is exactly the reference
        saved = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    obj = _objective(cfg, tok, renderer, kl_target=1e-3)
    items = [obj.tokenize(e, renderer) for e in examples[:8]]
    loss, m, _ = obj(model, obj.collate(items, tok.pad_token_id))
    assert m["objective/kl"] == 0.0 and m["val/ratio"] == 1.0 and m["policy/clipfrac_avg"] == 0.0
    assert m["policy/approxkl_avg"] == 0.0
    assert obj.kl.value < 0.05            # KL 0 < target: the adaptive coefficient went down

    # a policy that differs from the reference: KL > 0 (k3 >= 0 per token), yet the first
    # minibatch of the rollout still has ratio exactly 1 and clip fraction 0
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    obj = _objective(cfg, tok, renderer, kl_estimator="k3", kl_target=1e-3, reference="base")
    params = [p for p in model.parameters() if p.requires_grad] + list(obj.extra_parameters().values())
    opt = torch.optim.SGD(params, lr=0.5)
    batch = obj.collate(items, tok.pad_token_id)
    loss, m, _ = obj(model, batch)
    assert m["objective/kl"] > 0 and m["val/ratio"] == 1.0 and m["policy/clipfrac_avg"] == 0.0
    assert obj.kl.value > 0.05            # KL above target: the coefficient went up
    loss.backward()
    opt.step()
    opt.zero_grad()
    _, m2, _ = obj(model, batch)          # second minibatch: the policy has moved
    assert m2["val/ratio"] != 1.0 and m2["policy/approxkl_avg"] > 0
    for _ in range(2):                    # the rest of the buffer (2 epochs x 2 minibatches)
        obj(model, batch)[0].backward()
        opt.step()
        opt.zero_grad()
    _, m3, _ = obj(model, batch)          # a new rollout: ratio back to exactly 1
    assert m3["objective/rollouts"] == 2.0 and m3["val/ratio"] == 1.0 and m3["policy/clipfrac_avg"] == 0.0
    # PPO after SFT (a trained adapter at the stage start): by default the KL leash holds the policy
    # to that adapter, as TRL's reference model does -- not to the bare backbone
    after_sft = _objective(cfg, tok, renderer, kl_estimator="k3")
    after_sft.begin_stage(model)
    assert after_sft.reference.resolved == "adapter" and "ref.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight" in \
        after_sft.extra_parameters()
    _, m4, _ = after_sft(model, batch)
    assert m4["objective/kl"] == 0.0
    assert after_sft.state_dict()["reference"] == "adapter"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])


def test_a_rollout_under_bf16_autocast_keeps_float_buffers(tiny):
    # the engine trains under bf16 autocast where the CPU or GPU has bf16: the value head's output
    # comes back in bf16 there and must still fill the float rollout buffers
    cfg, model, tok, renderer, examples = tiny
    obj = _objective(cfg, tok, renderer)
    items = [obj.tokenize(e, renderer) for e in examples[:4]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, m, _ = obj(model, obj.collate(items, tok.pad_token_id))
    assert loss.dtype == torch.float32 and math.isfinite(m["loss/value_avg"])


def test_buffer_state_resumes_the_next_minibatch_exactly(tiny):
    cfg, model, tok, renderer, examples = tiny
    a = _objective(cfg, tok, renderer)
    batch = a.collate([a.tokenize(e, renderer) for e in examples[:4]], tok.pad_token_id)
    a(model, batch)
    state = a.state_dict()
    b = _objective(cfg, tok, renderer)
    b.load_state_dict(state)
    la, ma, _ = a(model, batch)
    lb, mb, _ = b(model, batch)
    assert float(la.detach()) == float(lb.detach()) and ma == mb and b.pos == a.pos == 2


def test_rewards_score_real_answers():
    ex = load_examples(SourceConfig(source="nl2bash", limit=1))[0]
    gold = ex.references[0]
    terms = {t.name: t for t in parse_rewards({"bash_exact": 1, "bash_structure": 1, "exact_match": 1,
                                                "repetition": 1, "length": {"weight": 1, "target": 4}})}
    good = Sample(f"```bash\n{gold}\n```", [1, 2, 3, 4], ex, 8, True)
    bad = Sample("I cannot help with that", [5, 5, 5, 5, 5, 5], ex, 8, True)
    assert terms["bash_exact"](good) == 1.0 and terms["bash_exact"](bad) == 0.0
    assert terms["bash_structure"](good) == 1.0 and terms["bash_structure"](bad) < 0.5
    assert terms["repetition"](good) == 0.0 and terms["repetition"](bad) == -0.75  # 4 trigrams, 3 repeat the first
    assert terms["length"](good) == 0.0 and terms["length"](bad) == -2 / 8
    tool = load_examples(SourceConfig(source="bfcl:simple", limit=1))[0]
    (name, args), = tool.meta["ground_truth"][0].items()
    call = name + "(" + ", ".join(f"{k}={v[0]!r}" for k, v in args.items() if v[0] != "") + ")"
    tool_ast = parse_rewards(["tool_ast"])[0]
    assert tool_ast(Sample(call, [], tool, 8, True)) == 1.0
    assert tool_ast(Sample(name + "()", [], tool, 8, True)) == 0.0
    tests = Example("prompt_completion", prompt="add", meta={"tests": "assert add(2, 3) == 5"})
    unit = parse_rewards(["unit_tests"])[0]
    assert unit(Sample("```python\ndef add(a, b):\n    return a + b\n```", [], tests, 8, True)) == 1.0
    assert unit(Sample("def add(a, b):\n    return a - b", [], tests, 8, True)) == 0.0


def test_verifiers_are_told_from_shaping_terms():
    # bench/ppo_reward scores held-out answers by the verifiers alone
    terms = parse_rewards(["exact_match", "bash_exact", "bash_structure", "tool_ast", "unit_tests",
                           "repetition", "length", "token_fraction"])
    assert [t.name for t in terms if t.is_verifier] == ["exact_match", "bash_exact", "bash_structure", "tool_ast",
                                                        "unit_tests"]


def test_bad_reward_specs_are_one_line_errors():
    with pytest.raises(UserError, match="unknown reward 'bash_magic'"):
        parse_rewards({"bash_magic": 1.0})
    with pytest.raises(UserError, match="has no parameter 'n'"):
        parse_rewards([{"name": "length", "n": 3}])
    with pytest.raises(UserError, match="needs 'tests'|'tests' column"):
        PPOObjective(rewards=["unit_tests"], hidden_size=8).tokenize(
            Example("prompt_completion", prompt="p", where="row 1"), None)


def test_ppo_games_an_easy_reward_while_kl_stays_bounded():
    """Pretrain the tiny model for a few steps to answer NL2Bash requests with 'yes'/'no' words,
    then PPO (LoRA policy, the pretrained backbone as reference) rewarded by the share of 'yes'."""
    cfg = load_recipe("quickstart", {"model": "tiny"})
    model, tok = load_backbone("tiny", seed=0, freeze=False)
    renderer = Renderer(tok, 128)
    examples = load_examples(SourceConfig(source="nl2bash", limit=128))
    rng = random.Random(0)
    sft = [renderer.tokenize(Example("prompt_completion", prompt=e.prompt, instruction=e.instruction,
                                     completion=" ".join(rng.choice(["yes", "no"]) for _ in range(6))))
           for e in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for step in range(40):
        loss = causal_lm_loss(model, collate(sft[(step * 8) % 128:(step * 8) % 128 + 8], tok.pad_token_id))[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss) < 1.5
    model = attach_lora(model, cfg)  # freezes the pretrained weights: they are the reference
    yes = tok(" yes", add_special_tokens=False)["input_ids"] + tok("yes", add_special_tokens=False)["input_ids"]
    obj = PPOObjective(rewards={"token_fraction": {"weight": 1.0, "token_ids": yes}}, max_new_tokens=12,
                       temperature=1.0, ppo_epochs=2, num_mini_batches=1, kl_coef=0.02,
                       tokenizer=tok, renderer=renderer, recipe=cfg)
    items = [obj.tokenize(e, renderer) for e in examples]
    params = [p for p in model.parameters() if p.requires_grad] + list(obj.extra_parameters().values())
    opt = torch.optim.AdamW(params, lr=3e-3)
    scores, kls = [], []
    for step in range(40):
        k = (step * 16) % 128
        loss, m, _ = obj(model, obj.collate(items[k:k + 16], tok.pad_token_id))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 0:  # one rollout per two steps (2 epochs x 1 minibatch)
            scores.append(m["objective/scores"])
            kls.append(m["objective/kl"])
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    print(f"mean reward first 5 rollouts {first:.3f}, last 5 {last:.3f}; KL per response {kls}")
    assert kls[0] == 0.0
    assert last > first + 0.08, scores
    assert max(kls) < 5.0, kls             # nats per response of up to 12 tokens: the leash holds


def _whiten_on_two_processes(rank: int, init: str, x: torch.Tensor, mask: torch.Tensor, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)

    def total(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    rows = slice(rank, None, 2)  # the engine gives process r rows r, r + 2, ... of the global batch
    out[rank] = masked_whiten(x[rows], mask[rows], total)
    dist.destroy_process_group()


def test_advantages_are_whitened_over_the_whole_rollout_when_processes_share_it(tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g) * 3 + 1
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    whole = masked_whiten(x, mask)  # one process with the whole rollout
    out = mp.Manager().dict()
    mp.spawn(_whiten_on_two_processes, args=(f"file://{tmp_path}/rendezvous", x, mask, out), nprocs=2)
    torch.testing.assert_close(out[0], whole[0::2], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], whole[1::2], rtol=0, atol=1e-5)
    alone = masked_whiten(x[0::2], mask[0::2])  # what each process would do with its slice alone
    assert not torch.allclose(alone, whole[0::2], atol=1e-3)
