"""Weighted per-sample mixing of LoRA experts, checked against PEFT's own outputs, and the hybrid policy."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig, get_peft_model

from skillstream.config import LoraConfig, RecipeConfig
from skillstream.errors import UserError
from skillstream.experts.mixing import hybrid_weights, mixing, one_hot, sparse_topk
from skillstream.experts.pool import ExpertPool, MaturityRule
from skillstream.experts.router import Router, pooled_features
from skillstream.models.backbone import load_backbone
from skillstream.model_setup import attach_lora
from test_experts_skills import one_thread, skill_texts  # noqa: F401

NAMES = ["e1", "e2", "e3"]


def randomize(model, name: str, seed: int, scale: float = 0.05) -> None:
    """Give an expert nonzero B (a fresh LoRA has B = 0 and would add nothing), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".lora_B.{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def setup():
    backbone, tok = load_backbone("tiny", seed=0)
    model = attach_lora(backbone, RecipeConfig(name="t", lora=LoraConfig(r=4, alpha=8, dropout=0.0)))
    pool = ExpertPool(model, rule=MaturityRule(mature_steps=10))
    for i, name in enumerate(NAMES):
        pool.create(name)
        randomize(model, name, seed=i)
    model.eval()
    batch = tok(skill_texts("bash", 0, 2) + skill_texts("math", 0, 2), return_tensors="pt", padding=True)
    return pool, batch


def run(model, batch, **kw) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits


@torch.no_grad()
def test_one_hot_mix_equals_peft_single_adapter(setup):
    pool, batch = setup
    for k, name in enumerate(NAMES):
        pool.model.set_adapter(name)
        expected = run(pool.model, batch)
        with mixing(pool.model, NAMES, one_hot(torch.full((4,), k), 3)):
            got = run(pool.model, batch)
        assert (got - expected).abs().max().item() == 0.0, name  # same ops in the same order
    # the block leaves PEFT's state as it was
    pool.model.set_adapter("e1")
    assert pool.model.base_model.model.model.layers[0].self_attn.q_proj.active_adapters == ["e1"]


@torch.no_grad()
def test_per_sample_top1_equals_peft_mixed_batch(setup):
    pool, batch = setup
    choice = ["e3", "e1", "e2", "__base__"]
    expected = run(pool.model, batch, adapter_names=choice)
    w = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.float)  # all-zero row = base
    with mixing(pool.model, NAMES, w):
        got = run(pool.model, batch)
    assert (got - expected).abs().max().item() < 1e-6


@torch.no_grad()
def test_mixing_generates_like_peft_with_kv_cache(setup):
    pool, batch = setup
    pool.model.set_adapter("e2")
    kw = dict(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1], max_new_tokens=6,
              do_sample=False)
    expected = pool.model.generate(**kw)
    with mixing(pool.model, NAMES, torch.tensor([[0.0, 1.0, 0.0]])):
        got = pool.model.generate(**kw)
    assert torch.equal(got, expected)


@torch.no_grad()
def test_half_and_half_mix_of_one_linear_layer():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 6))
    model = get_peft_model(layer, PeftLoraConfig(r=2, lora_alpha=4, target_modules=["0"]), adapter_name="x")
    model.add_adapter("y", PeftLoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    randomize(model, "x", 1, scale=0.5)
    randomize(model, "y", 2, scale=0.5)
    x = torch.randn(3, 8)
    with model.disable_adapter():
        base = model(x)
    model.set_adapter("x")
    out_a = model(x)
    model.set_adapter("y")
    out_b = model(x)
    with mixing(model, ["x", "y"], torch.full((3, 2), 0.5)):
        got = model(x)
    expected = 0.5 * (out_a - base) + 0.5 * (out_b - base) + base
    assert (got - expected).abs().max().item() < 1e-6
    assert (out_a - out_b).abs().max().item() > 0.1  # the two experts really differ


@torch.no_grad()
def test_dense_mix_equals_peft_cat_merge(setup):
    """Mixing is linear in each layer's LoRA delta, so a fixed 0.3/0.7 mix is PEFT's exact "cat" merge."""
    pool, batch = setup
    pool.merge(["e1", "e2"], [0.3, 0.7], "cat", "e12_cat")
    pool.model.set_adapter("e12_cat")
    expected = run(pool.model, batch)
    with mixing(pool.model, ["e1", "e2"], torch.tensor([[0.3, 0.7]]).expand(4, 2)):
        got = run(pool.model, batch)
    pool.prune("e12_cat")
    assert (got - expected).abs().max().item() < 1e-5


def test_gradients_reach_the_mixed_experts_and_the_router(setup):
    pool, batch = setup
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    router = Router(64, 3, seed=0)
    feats = pooled_features(pool.model, batch)
    pool.set_trainable(["e1", "e2"])  # e3 stays frozen
    pool.model.zero_grad(set_to_none=True)
    w = sparse_topk(router.probs(feats), k=2)
    with mixing(pool.model, NAMES, w):
        pool.model(**batch, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in pool.model.named_parameters() if ".lora_" in n}
    for name in ("e1", "e2"):
        g = [v for n, v in grads.items() if f".{name}." in n]
        assert all(v is not None for v in g) and sum(v.abs().sum().item() for v in g) > 0, name
    assert all(v is None for n, v in grads.items() if ".e3." in n)
    assert router.head.weight.grad.abs().sum().item() > 0
    assert all(p.grad is None for n, p in pool.model.named_parameters() if ".lora_" not in n)  # frozen backbone
    pool.model.zero_grad(set_to_none=True)
    pool.set_trainable([])


def test_weight_gradient_matches_finite_difference(setup):
    """dL/dw[b, k] through the mix equals (L(w + e) - L(w - e)) / 2e (float64; RMSNorm still rounds to float32)."""
    pool, batch = setup
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    w = torch.tensor([[0.2, 0.5, 0.3]] * 4, dtype=torch.float64).requires_grad_()

    def loss(weights):  # our own cross-entropy: transformers computes its loss in float32
        with mixing(pool.model, NAMES, weights):
            logits = run(pool.model, batch)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    pool.model.double()  # float32 losses are too coarse for a finite difference; float64 -> float32 is exact
    try:
        loss(w).backward()
        eps = 1e-3
        for b, k in ((0, 0), (3, 2)):
            e = torch.zeros_like(w)
            e[b, k] = eps
            with torch.no_grad():
                fd = (loss(w + e) - loss(w - e)).item() / (2 * eps)
            assert w.grad[b, k].item() == pytest.approx(fd, rel=1e-3), (b, k)
    finally:
        pool.model.float()


def test_sparse_topk_keeps_k_and_renormalises():
    w = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert torch.allclose(sparse_topk(w, 1), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(sparse_topk(w, 2), torch.tensor([[0.0, 2 / 3, 1 / 3], [0.625, 0.0, 0.375]]))


def test_hybrid_policy_switches_from_dense_to_sparse_when_maturity_passes_threshold(setup):
    pool, _ = setup
    probs = torch.tensor([[0.7, 0.2, 0.1],    # top expert: e1
                          [0.1, 0.6, 0.3]])   # top expert: e2
    pool.record_training("e1", 10)            # e1 is mature (10 of 10 steps), e2 has trained 4 of 10
    pool.record_training("e2", 4)
    w = hybrid_weights(probs, pool.maturities(NAMES), threshold=0.8)
    assert (w > 0).sum(-1).tolist() == [1, 3]  # e1's input delegated, e2's served densely
    assert torch.allclose(w[1], probs[1])
    pool.record_training("e2", 4)             # 8 of 10 steps: maturity 0.8 reaches the threshold
    w = hybrid_weights(probs, pool.maturities(NAMES), threshold=0.8)
    assert (w > 0).sum(-1).tolist() == [1, 1]
    assert w.argmax(-1).tolist() == [0, 1]
    # top-2 delegation once mature
    w2 = hybrid_weights(probs, pool.maturities(NAMES), threshold=0.8, k=2)
    assert torch.allclose(w2[1], torch.tensor([0.0, 2 / 3, 1 / 3]))
    with pytest.raises(UserError, match=r"in \[0, 1\]"):
        hybrid_weights(probs, pool.maturities(NAMES), threshold=1.5)


def test_unknown_expert_in_a_mix_is_a_user_error(setup):
    pool, _ = setup
    with pytest.raises(UserError, match="unknown expert"):
        with mixing(pool.model, ["e1", "nope"]):
            pass


def test_routed_exact_match_with_option_scoring_beside_it_equals_the_protocols_apart(setup, sentiment_folder):
    """Under the router, the option pass that reads generation's cache is served by the experts the
    generation's prefill chose (the weights repeat once per option), as when option scoring runs alone."""
    from skillstream.config import SourceConfig
    from skillstream.data.examples import load_examples
    from skillstream.data.render import Renderer
    from skillstream.evaluation.runner import evaluate_examples
    from skillstream.experts.routed import routed
    from skillstream.models.backbone import load_tokenizer

    pool, _ = setup
    tok = load_tokenizer("tiny")
    renderer = Renderer(tok, 64)
    examples = load_examples(SourceConfig(source=str(sentiment_folder), split="test"))
    router = Router(pooled_features(pool.model, tok(["x"], return_tensors="pt")).shape[-1], len(NAMES), seed=3)
    maturity = torch.ones(len(NAMES))  # mature: top-1 delegation, so the experts differ per sample
    with routed(pool.model, router, NAMES, maturity) as together:
        both = evaluate_examples(pool.model, tok, renderer, examples, "exact_match", 4, 4, also=["accuracy"])
    with routed(pool.model, router, NAMES, maturity) as apart:
        em = evaluate_examples(pool.model, tok, renderer, examples, "exact_match", 4, 4)
        acc = evaluate_examples(pool.model, tok, renderer, examples, "accuracy", 4)
    assert both["samples"] == em["samples"] and both["protocols"]["accuracy"] == acc["accuracy"]
    assert len(set(together.top())) > 1                        # more than one expert answered
    assert together.choices == apart.choices[:len(examples)]   # one routing per prompt, the same ones


def test_a_feature_cache_reads_each_batch_once_and_routes_it_the_same(setup, sentiment_folder, monkeypatch):
    """A stream scores every task after every stage on the same batches: with a FeatureCache the router's
    pass through the frozen backbone happens once per batch, and the second evaluation is the first again."""
    from skillstream.config import SourceConfig
    from skillstream.data.examples import load_examples
    from skillstream.data.render import Renderer
    from skillstream.evaluation.runner import evaluate_examples
    from skillstream.experts.routed import FeatureCache, routed
    from skillstream.models.backbone import load_tokenizer

    pool, _ = setup
    tok = load_tokenizer("tiny")
    renderer = Renderer(tok, 64)
    examples = load_examples(SourceConfig(source=str(sentiment_folder), split="test"))[:8]
    router = Router(pooled_features(pool.model, tok(["x"], return_tensors="pt")).shape[-1], len(NAMES), seed=3)
    maturity = torch.ones(len(NAMES))
    reads = []
    read = Router.read
    monkeypatch.setattr(Router, "read", lambda self, model, batch: reads.append(1) or read(self, model, batch))

    def evaluate(features):
        with routed(pool.model, router, NAMES, maturity, features=features) as routing:
            row = evaluate_examples(pool.model, tok, renderer, examples, "exact_match", 4, 4)
        return row, routing.choices

    plain, plain_choices = evaluate(None)
    assert len(reads) == 2                                   # two batches of 4, each read by the router
    cache = FeatureCache()
    first, first_choices = evaluate(cache)
    second, second_choices = evaluate(cache)
    assert len(reads) == 4 and len(cache) == 2                # the cache read each batch once, for both passes
    assert plain["samples"] == first["samples"] == second["samples"]
    assert plain_choices == first_choices == second_choices


def test_the_peft_internals_mixing_relies_on_are_still_there():
    """experts/mixing.py reaches into PEFT's LoRA layers (see its module doc): a PEFT upgrade that
    changes what it reads fails here, naming the piece, instead of as wrong numbers elsewhere."""
    import inspect

    import peft
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    from skillstream.experts.mixing import backbone_only, lora_layers

    where = f"peft {peft.__version__} changed what skillstream/experts/mixing.py relies on: "

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(6, 4)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = get_peft_model(Net(), PeftLoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["proj"]))
    model.add_adapter("b", PeftLoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["proj"]))
    model.eval()
    layers = lora_layers(model)
    assert len(layers) == 1, where + "LoRA layers are no longer LoraLayer modules"
    layer = layers[0]
    assert isinstance(layer, LoraLinear), where + "a LoRA Linear is not peft.tuners.lora.layer.Linear"
    assert issubclass(LoraLinear, LoraLayer)

    # the forward the hook reads: x first (args[0] or kwargs["x"]), adapter_names as a keyword
    params = list(inspect.signature(LoraLinear.forward).parameters.values())
    assert params[1].name == "x" and any(p.kind is p.VAR_KEYWORD for p in params), \
        where + f"LoRA Linear.forward{inspect.signature(LoraLinear.forward)} no longer takes x first and **kwargs"
    assert "adapter_names" in inspect.getsource(LoraLinear.forward), \
        where + "LoRA Linear.forward no longer reads the adapter_names keyword (mixing refuses it inside a block)"

    # what _add_mix and mixing() read, by name
    for name in ("lora_A", "lora_B", "lora_dropout"):
        d = getattr(layer, name, None)
        assert isinstance(d, torch.nn.ModuleDict) and set(d) == {"default", "b"}, \
            where + f"layer.{name} is not a ModuleDict keyed by adapter name"
    assert isinstance(layer.scaling, dict) and layer.scaling["b"] == pytest.approx(2.0), \
        where + "layer.scaling is not {adapter: lora_alpha / r}"
    assert isinstance(layer.lora_variant, dict) and "b" not in layer.lora_variant, \
        where + "layer.lora_variant is not a dict holding only the adapters with a variant (DoRA, ...)"
    assert layer.merged is False and layer.disable_adapters is False, where + "layer.merged / layer.disable_adapters"
    with model.disable_adapter():
        assert layer.disable_adapters is True, where + "disable_adapter() no longer sets layer.disable_adapters"

    # the switch: _active_adapter holds the active adapter(s); [] makes PEFT's forward the base layer's
    model.set_adapter("b")
    assert getattr(layer, "_active_adapter", None) in ("b", ["b"]) and layer.active_adapters == ["b"], \
        where + "LoraLayer._active_adapter no longer holds the active adapter(s)"
    with torch.no_grad():
        layer.lora_B["b"].weight.normal_()  # a fresh B is 0: make the adapter change the output
    x = torch.randn(3, 6)
    with torch.no_grad():
        base = layer.base_layer(x)
        delta = layer.lora_B["b"](layer.lora_A["b"](layer.lora_dropout["b"](x))) * layer.scaling["b"]
        assert torch.allclose(model(x), base + delta, atol=1e-6), \
            where + "PEFT's LoRA output is no longer base + lora_B(lora_A(dropout(x))) * scaling"
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        with backbone_only(model):
            assert layer.active_adapters == [], where + "an empty _active_adapter is not an empty active_adapters"
            assert torch.equal(model(x), base), where + "with _active_adapter = [] the LoRA layer adds something"
        assert layer._active_adapter in ("b", ["b"]) and torch.allclose(model(x), base + delta, atol=1e-6)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == grads, \
            where + "switching _active_adapter changed requires_grad"


@torch.no_grad()
def test_folded_adapter_computes_what_peft_computes_and_puts_the_weights_back(setup):
    """Evaluation folds the active adapter into its base weights (W + scale B A): the same logits to
    float rounding, and on exit the very same weight tensors, so training continues unchanged."""
    from skillstream.experts.mixing import folded_adapters, lora_layers

    pool, batch = setup
    pool.model.set_adapter("e2")
    expected = run(pool.model, batch)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in pool.model.named_parameters()}
    q_proj = lora_layers(pool.model)[0]
    with folded_adapters(pool.model):
        got = run(pool.model, batch)
        assert q_proj.active_adapters == [] and q_proj.base_layer.weight.data_ptr() != before[
            next(n for n in before if n.endswith("q_proj.base_layer.weight") and ".layers.0." in n)][0]
    assert (got - expected).abs().max().item() < 1e-5
    assert (got - expected).abs().max().item() > 0  # it really ran folded (different rounding)
    assert all(p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]) for n, p in pool.model.named_parameters())
    assert lora_layers(pool.model)[0].active_adapters == ["e2"]
    assert (run(pool.model, batch) - expected).abs().max().item() == 0.0


@torch.no_grad()
def test_folding_an_untrained_adapter_changes_no_bit(setup):
    from skillstream.experts.mixing import folded_adapters

    pool, batch = setup
    pool.create("fresh")  # B = 0: adds nothing
    try:
        pool.model.set_adapter("fresh")
        expected = run(pool.model, batch)
        with pool.model.disable_adapter():
            backbone = run(pool.model, batch)
        with folded_adapters(pool.model):
            got = run(pool.model, batch)
        assert torch.equal(got, expected) and torch.equal(got, backbone)
    finally:
        pool.model.set_adapter("e1")
        pool.model.delete_adapter("fresh")


@torch.no_grad()
def test_mixing_and_the_backbone_inside_a_folded_block_see_the_unfolded_weights(setup):
    """A router reading the backbone, or a mix of experts, inside a folded block must not carry the
    folded adapter along (mixing.py gives folded layers their own weights back for the block)."""
    from skillstream.experts.mixing import backbone_only, folded_adapters

    pool, batch = setup
    pool.model.set_adapter("e1")
    with backbone_only(pool.model):
        backbone = run(pool.model, batch)
    with mixing(pool.model, NAMES, one_hot(torch.full((4,), 2), 3)):
        e3 = run(pool.model, batch)
    with folded_adapters(pool.model):
        with backbone_only(pool.model):
            assert torch.equal(run(pool.model, batch), backbone)
        with mixing(pool.model, NAMES, one_hot(torch.full((4,), 2), 3)):
            assert torch.equal(run(pool.model, batch), e3)


def test_folding_refuses_to_run_under_autograd(setup):
    from skillstream.experts.mixing import folded_adapters

    pool, _ = setup
    with pytest.raises(RuntimeError, match="inference only"):
        with folded_adapters(pool.model):
            pass


@torch.no_grad()
def test_evaluation_folds_in_float32_only(setup):
    """In a bf16 run W + B A rounded to bf16 would lose a small adapter's update: not folded there."""
    from skillstream.evaluation.precision import eval_autocast, precision_of_run
    from skillstream.experts.mixing import lora_layers

    pool, _ = setup
    pool.model.set_adapter("e1")
    layer = lora_layers(pool.model)[0]
    with eval_autocast(pool.model):
        assert layer.active_adapters == []  # folded
    with precision_of_run(bf16=True), eval_autocast(pool.model):
        assert layer.active_adapters == ["e1"]  # PEFT's own branch, in bf16 autocast
    assert layer.active_adapters == ["e1"]


@torch.no_grad()
def test_a_dora_adapter_is_left_to_peft_and_computes_as_unfolded():
    """LoRA variants are not folded (their forward is not W + B A): the block leaves the layer to PEFT."""
    from skillstream.experts.mixing import folded_adapters, lora_layers

    backbone, tok = load_backbone("tiny", seed=0)
    model = get_peft_model(backbone, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                                                    target_modules=["q_proj"]))
    randomize(model, "default", seed=0)
    model.eval()
    batch = tok(skill_texts("bash", 0, 2), return_tensors="pt", padding=True)
    expected = run(model, batch)
    with folded_adapters(model):
        assert all(layer.active_adapters == ["default"] for layer in lora_layers(model))
        assert torch.equal(run(model, batch), expected)
