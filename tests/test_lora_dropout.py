"""LoRA dropout keeps a bool mask for backward instead of a float copy, with the same draws: outputs,
gradients and the generator's state afterwards are bit-identical to `nn.Dropout`'s."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from peft.tuners.lora import LoraLayer

from skillstream.config import LoraConfig, RecipeConfig
from skillstream.experts.pool import ExpertPool
from skillstream.lora_dropout import MaskDropout, compact_lora_dropout, uncast_lora_inputs
from skillstream.model_setup import attach_lora
from skillstream.models.backbone import load_backbone


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward of what `fn` computes."""
    storages = {}
    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_mask_dropout_is_peft_s_float32_dropout_bit_for_bit_and_keeps_a_quarter_of_the_memory(dtype, requires_grad):
    """PEFT casts a LoRA layer's input to float32 before its dropout (and autocast casts the result back
    to bf16 for A's matmul): MaskDropout on the input as it comes gives those bits, in float32 exactly
    nn.Dropout's."""
    x = torch.randn(32, 256, dtype=dtype, requires_grad=requires_grad)
    upstream = torch.randn(32, 256, dtype=dtype)
    seen = []
    for dropout in (lambda t: torch.nn.Dropout(0.1)(t.float()).to(dtype), MaskDropout(0.1)):
        torch.manual_seed(0)
        x.grad = None
        y = dropout(x * 1)
        if requires_grad:
            y.backward(upstream)
        seen.append((y.detach(), x.grad, torch.rand(3)))   # the generator continues from the same state
    (y0, g0, r0), (y1, g1, r1) = seen
    assert y1.dtype == dtype and torch.equal(y0, y1) and torch.equal(r0, r1)
    assert (g0 is None and g1 is None) if not requires_grad else torch.equal(g0, g1)
    if requires_grad:
        plain = saved_bytes(lambda: torch.nn.Dropout(0.1)(x * 1))
        compact = saved_bytes(lambda: MaskDropout(0.1)(x * 1))
        assert compact == x.numel() and plain == x.numel() * x.element_size()  # 1 byte per element, not 2 or 4


def test_under_bf16_autocast_lora_inputs_uncast_train_the_same_bits_as_peft_s_cast():
    """A bf16 backbone under bf16 autocast: PEFT casts each LoRA input to float32 and A's matmul casts it
    back; uncast_lora_inputs skips both. Loss and every LoRA gradient are the same bits."""
    cfg = RecipeConfig(name="t", lora=LoraConfig(r=4, alpha=8, dropout=0.2))
    backbone, _ = load_backbone("tiny", seed=0, dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = attach_lora(backbone, cfg).train()
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    ids = torch.randint(5, 200, (2, 16))
    seen = []
    for uncast in (False, True):
        model.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16), (uncast_lora_inputs(model) if uncast else contextlib.nullcontext()):
            assert layer.cast_input_dtype_enabled is not uncast
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        seen.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, g0), (loss1, g1) = seen
    assert g0 and torch.equal(loss0, loss1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    assert layer.cast_input_dtype_enabled      # PEFT's switch is back on after the block
    with uncast_lora_inputs(model):            # and outside autocast it is never turned off
        assert layer.cast_input_dtype_enabled


def test_every_lora_layer_and_every_expert_added_later_gets_it_and_training_is_unchanged():
    cfg = RecipeConfig(name="t", lora=LoraConfig(r=4, alpha=8, dropout=0.2))
    backbone, _ = load_backbone("tiny", seed=0)
    torch.manual_seed(0)                                          # LoRA's initial weights: the same in both
    plain = attach_lora(copy.deepcopy(backbone), cfg)
    for layer in plain.modules():   # undo the swap: PEFT's own dropout, as PEFT builds it
        if isinstance(layer, LoraLayer):
            for name in layer.lora_dropout:
                layer.lora_dropout[name] = torch.nn.Dropout(0.2)
    torch.manual_seed(0)
    compact = attach_lora(backbone, cfg)
    dropouts = [d for m in compact.modules() if isinstance(m, LoraLayer) for d in m.lora_dropout.values()]
    assert dropouts and all(type(d) is MaskDropout for d in dropouts)

    ids = torch.randint(5, 200, (2, 16))
    grads = []
    for model in (plain, compact):
        model.train()
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])

    pool = ExpertPool(compact)
    pool.create("expert_1")                                      # PEFT's add_adapter: a plain Dropout ...
    added = [m.lora_dropout["expert_1"] for m in compact.modules() if isinstance(m, LoraLayer)]
    assert added and all(type(d) is MaskDropout for d in added)  # ... swapped
    assert compact_lora_dropout(compact) is compact              # idempotent
