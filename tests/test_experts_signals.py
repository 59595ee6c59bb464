"""The triple signal (embedding, gradient sketch, context statistics) tells skills apart on real text."""
from __future__ import annotations

import itertools

import pytest
import torch

from skillstream.config import LoraConfig, RecipeConfig, SourceConfig
from skillstream.data.examples import load_examples
from skillstream.data.render import Renderer
from skillstream.experts.signals import (ExpertProfile, TaskSignal, compute_signal, load_profiles, save_profiles,
                                         similarity, similarity_components)
from skillstream.models.backbone import load_backbone
from skillstream.model_setup import attach_lora
from test_experts_skills import SKILLS, one_thread, skill_texts  # noqa: F401

N, BATCHES = 12, 3


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny", seed=0)


@pytest.fixture(scope="module")
def signals(tiny):
    model, tok = tiny
    return {(s, i): compute_signal(model, tok, skill_texts(s, N * i, N)) for s in SKILLS for i in range(BATCHES)}


def same_and_cross(signals, skill, measure):
    same = [measure(signals[(skill, i)], signals[(skill, j)]) for i, j in itertools.combinations(range(BATCHES), 2)]
    cross = [measure(signals[(skill, i)], signals[(other, j)])
             for other in SKILLS if other != skill for i in range(BATCHES) for j in range(BATCHES)]
    return same, cross


@pytest.mark.parametrize("component", ["embedding", "gradient", "context"])
def test_batches_of_one_skill_are_more_similar_than_batches_of_different_skills(signals, component):
    margins = {}
    for skill in SKILLS:
        same, cross = same_and_cross(signals, skill, lambda a, b: similarity_components(a, b)[component])
        margins[skill] = round(sum(same) / len(same) - sum(cross) / len(cross), 3)
    print(f"\n{component}: mean same-skill minus mean cross-skill similarity {margins}")
    # measured: embedding {bash 0.58, math 1.16, prose 0.59}; gradient {0.19, 0.59, 0.16};
    # context {0.08, 0.21, 0.18} (entropy is log(vocab) for every text on the random backbone,
    # so context is carried by length here)
    assert all(m >= 0.05 for m in margins.values()), margins


def test_combined_similarity_separates_every_pair_of_batches(signals):
    for skill in SKILLS:
        same, cross = same_and_cross(signals, skill, similarity)
        print(f"\n{skill}: same-skill similarity >= {min(same):.2f}, cross-skill <= {max(cross):.2f}")
        # measured: bash 0.59 vs 0.57, math 0.92 vs 0.31, prose 0.60 vs 0.57
        assert min(same) > max(cross), skill


def test_entropy_and_length_are_what_the_backbone_sees(signals, tiny):
    _, tok = tiny
    s = signals[("math", 0)]
    assert s.length == pytest.approx(sum(len(tok(t)["input_ids"]) for t in skill_texts("math", 0, N)) / N)
    # the random tiny backbone predicts almost uniformly: measured 10.790 nats, log(49152) = 10.803
    uniform = torch.log(torch.tensor(float(len(tok)))).item()
    assert uniform - 0.02 < s.entropy < uniform


def test_the_signal_does_not_depend_on_how_its_examples_are_batched(tiny):
    # SignalConfig.batch_size only bounds the peak memory (vocabulary-sized logits per example): texts of
    # different lengths, padded differently in each batching, give the same signal
    from skillstream.experts.signals import SignalConfig

    model, tok = tiny
    texts = skill_texts("bash", 0, 5) + skill_texts("prose", 0, 3)
    one, all_at_once = (compute_signal(model, tok, texts, config=SignalConfig(batch_size=b)) for b in (1, 8))
    for part in ("embedding", "gradient", "fisher"):
        torch.testing.assert_close(getattr(one, part), getattr(all_at_once, part), rtol=1e-4, atol=1e-5)
    assert one.entropy == pytest.approx(all_at_once.entropy, rel=1e-5) and one.length == all_at_once.length


def test_signal_ignores_adapters_and_leaves_them_untouched(tiny):
    model, tok = tiny
    texts = skill_texts("bash", 0, 4)
    plain = compute_signal(model, tok, texts)
    fresh, _ = load_backbone("tiny", seed=0)
    peft_model = attach_lora(fresh, RecipeConfig(name="t", lora=LoraConfig(r=4)))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    wrapped = compute_signal(peft_model, tok, texts)
    for field in ("embedding", "gradient", "fisher"):
        assert torch.allclose(getattr(wrapped, field), getattr(plain, field), rtol=1e-4, atol=1e-6), field
    assert flags == {n: p.requires_grad for n, p in peft_model.named_parameters()}
    assert all(p.grad is None for p in peft_model.parameters())
    again = compute_signal(model, tok, texts)  # seeded projections: the same examples, the same signal
    assert torch.equal(again.gradient, plain.gradient) and torch.equal(again.fisher, plain.fisher)


def test_examples_are_rendered_as_in_training(tiny):
    model, tok = tiny
    examples = load_examples(SourceConfig(source="nl2bash", limit=4))
    sig = compute_signal(model, tok, examples, description="Write bash commands.")
    rendered = [Renderer(tok, 128).tokenize(ex) for ex in examples]
    assert sig.length == pytest.approx(sum(len(t.input_ids) for t in rendered) / 4)
    assert sig.count == 4 and sig.gradient.shape == sig.fisher.shape == (64,)


def test_profile_refresh_and_save_load(signals, tmp_path):
    profile = ExpertProfile("bash")
    profile.refresh(signals[("bash", 0)], step=10)
    profile.refresh(signals[("bash", 1)], step=20)
    assert profile.signal.count == 2 * N and profile.refreshes == 2 and profile.refreshed_step == 20
    expected = (signals[("bash", 0)].embedding + signals[("bash", 1)].embedding) / 2
    assert torch.allclose(profile.signal.embedding, expected)
    # a profile over two batches is closer to a third batch of its skill than to any other skill's
    third = {s: similarity(signals[(s, 2)], profile) for s in SKILLS}
    print(f"\nsimilarity of third batches to the bash profile: {third}")
    assert third["bash"] > max(third["math"], third["prose"])

    empty = ExpertProfile("new")  # created, not yet trained: no signal
    save_profiles(tmp_path / "profiles", {"bash": profile, "new": empty})
    assert sorted(p.name for p in (tmp_path / "profiles").iterdir()) == ["profiles.json", "profiles.safetensors"]
    back = load_profiles(tmp_path / "profiles")
    assert back["bash"].refreshes == 2 and back["new"].signal is None
    assert isinstance(back["bash"].signal, TaskSignal)
    assert similarity(signals[("bash", 2)], back["bash"]) == pytest.approx(third["bash"])
