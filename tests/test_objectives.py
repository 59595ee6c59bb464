"""The LM objective's selective head gives the same loss and gradients as transformers' own loss."""
import torch

from skillstream.config import SourceConfig
from skillstream.data.batching import collate
from skillstream.data.examples import load_examples
from skillstream.data.render import Renderer
from skillstream.models.backbone import load_backbone
from skillstream.objectives.lm import causal_lm_loss
from skillstream.model_setup import attach_lora
from skillstream.config import load_recipe


def test_selective_head_loss_equals_full_logits_loss():
    model, tok = load_backbone("tiny", seed=0)
    model = attach_lora(model, load_recipe("quickstart")).eval()  # eval: no LoRA dropout, same randomness
    r = Renderer(tok, 128)
    batch = collate([r.tokenize(e) for e in load_examples(SourceConfig(source="nl2bash", limit=4))], tok.pad_token_id)
    ours, _, _ = causal_lm_loss(model, batch)
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    theirs = model(**batch).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    for a, p in zip(ours_grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_models_without_decoder_accessors_take_the_full_logits_path(monkeypatch):
    # the loss on labelled positions only (decoder + head) and the model's own full-logits loss agree;
    # a model whose get_decoder is not implemented gets the second, with the same numbers
    model, tok = load_backbone("tiny", seed=0)
    model.eval()
    items = [Renderer(tok, 64).tokenize(e) for e in load_examples(SourceConfig(source="nl2bash", limit=3))]
    batch = collate(items, tok.pad_token_id)
    with torch.no_grad():
        fast_loss, fast_logits, fast_targets = causal_lm_loss(model, batch)

    def not_implemented():
        raise NotImplementedError

    monkeypatch.setattr(model, "get_decoder", not_implemented)
    with torch.no_grad():
        full_loss, full_logits, full_targets = causal_lm_loss(model, batch)
    assert torch.allclose(fast_loss, full_loss, atol=1e-5)
    assert torch.equal(fast_targets, full_targets) and torch.allclose(fast_logits, full_logits, atol=1e-4)
