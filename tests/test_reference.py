"""The frozen-adapter reference of DPO and PPO computes as the frozen copy, also under bf16 autocast."""
import pytest
import torch

from skillstream.config import load_recipe
from skillstream.models.backbone import load_backbone
from skillstream.objectives.reference import Reference
from skillstream.model_setup import attach_lora


@pytest.fixture
def moved_policy():
    """A LoRA model whose reference is taken after some training, then the policy moves on."""
    model, _ = load_backbone("tiny", seed=0)
    model = attach_lora(model, load_recipe("quickstart", {"lora.dropout": 0.0, "model": "tiny"}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        for p in lora_b:
            p.normal_(0, 0.5, generator=gen)
        reference = Reference("auto", "test")
        reference.begin(model)
        frozen = [p.detach().clone() for p in lora_b]
        for p in lora_b:
            p.add_(torch.randn(p.shape, generator=gen))
    return model, reference, lora_b, frozen


@pytest.mark.parametrize("autocast", [False, True])
def test_adapter_reference_computes_as_the_frozen_copy(moved_policy, autocast):
    model, reference, lora_b, frozen = moved_policy
    assert reference.resolved == "adapter"                       # the adapter was trained: auto -> adapter
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        policy = model(input_ids=ids).logits.float()             # fills autocast's cache of bf16 casts
        with reference.active(model):
            ref = model(input_ids=ids).logits.float()
        policy_again = model(input_ids=ids).logits.float()
        for p, f in zip(lora_b, frozen):                          # what the reference should compute
            p.data, f.data = f.data.clone(), p.data
        torch.clear_autocast_cache()
        expected = model(input_ids=ids).logits.float()
    # before the fix, under autocast the reference reused the policy's cached casts: difference 0
    assert (policy - ref).abs().max() > 0.1
    torch.testing.assert_close(ref, expected)
    torch.testing.assert_close(policy_again, policy)               # the policy is back after the pass
