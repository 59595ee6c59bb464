import math

import pydoc_data.topics
import pytest
import torch
import torch.nn.functional as F

from skillstream.models.bdh import BDH, BDHConfig, encode_bytes

SMALL = dict(n_layer=3, n_embd=64, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)
TEXT = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
DATA = encode_bytes(TEXT)



def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return BDH(BDHConfig(**{**SMALL, **overrides}))


def text_batch(batch, seq, start=1000):
    chunk = DATA[start : start + batch * seq + 1]
    return chunk[:-1].view(batch, seq), chunk[1:].view(batch, seq)


def test_reference_defaults_have_exactly_25_296_896_parameters():
    model = BDH(BDHConfig())
    names = {n for n, _ in model.named_parameters()}
    assert names == {"encoder", "encoder_v", "decoder", "embed.weight", "lm_head"}
    assert model.config.n_neurons == 8192
    assert model.num_parameters() == 25_296_896


def test_depth_reuses_one_set_of_matrices():
    assert small_model(n_layer=1).num_parameters() == small_model(n_layer=6).num_parameters()


def test_initial_loss_is_close_to_uniform_over_256_bytes():
    idx, targets = text_batch(2, 64)
    logits, loss = small_model()(idx, targets)
    assert logits.shape == (2, 64, 256)
    assert abs(loss.item() - math.log(256)) < 0.1


def test_padding_bytes_never_enter_the_loss():
    model = small_model()
    idx, targets = text_batch(2, 64)
    idx[1, 40:] = 0  # row 1 is padded after 40 real bytes
    padded = targets.clone()
    padded[1, 39:] = -100  # the target of the last real byte is padding too
    logits, loss = model(idx, padded)
    keep = padded != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    assert abs(loss.item() - model(idx, targets)[1].item()) > 1e-4  # the pads would have counted

    _, loss_with_mask = model(idx, targets, loss_mask=keep)
    torch.testing.assert_close(loss_with_mask, expected)

    _, nothing = model(idx, torch.full_like(targets, -100))
    nothing.backward()
    assert nothing.item() == 0.0 and torch.isfinite(model.encoder.grad).all()


def test_attention_is_strictly_causal():
    model = small_model().eval()
    idx, _ = text_batch(1, 48)
    changed = idx.clone()
    changed[0, 30] = (changed[0, 30] + 7) % 256
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :30], b[:, :30])
    assert (a[:, 30:] - b[:, 30:]).abs().amax(-1).min() > 0


def test_recurrent_state_logits_equal_full_forward_at_every_position():
    model = small_model().eval()
    idx, _ = text_batch(2, 160)
    with torch.no_grad():
        full, _ = model(idx)
        state = model.init_state(2)
        stepped = []
        for t in range(idx.size(1)):
            logits, state = model.step(idx[:, t], state)
            stepped.append(logits)
        stepped = torch.stack(stepped, dim=1)
        prefix, state = model.prefill(idx[:, :100])  # prompt read once, then one byte at a time
        resumed = [prefix]
        for t in range(100, idx.size(1)):
            logits, state = model.step(idx[:, t], state)
            resumed.append(logits[:, None])
        resumed = torch.cat(resumed, dim=1)
    scale = full.abs().max()
    assert (stepped - full).abs().max() / scale < 1e-4
    assert (resumed - full).abs().max() / scale < 1e-4


def test_state_size_does_not_grow_with_the_sequence():
    model = small_model().eval()
    with torch.no_grad():
        _, short = model.prefill(text_batch(1, 8)[0])
        _, long = model.prefill(text_batch(1, 256)[0])
    shapes = lambda s: [tuple(t.shape) for layer in s.layers for t in layer.values()]  # noqa: E731
    assert shapes(short) == shapes(long) and (short.pos, long.pos) == (8, 256)


def test_greedy_generation_is_identical_with_and_without_state():
    model = small_model().eval()
    prompt, _ = text_batch(2, 24)
    with_state = model.generate(prompt, 40, temperature=0, use_state=True)
    without = model.generate(prompt, 40, temperature=0, use_state=False)
    assert with_state.shape == (2, 64)
    assert torch.equal(with_state, without)
    assert torch.equal(with_state[:, :24], prompt)


def test_sampled_generation_respects_top_k():
    model = small_model().eval()
    prompt, _ = text_batch(1, 16)
    torch.manual_seed(1)
    out = model.generate(prompt, 20, temperature=1.0, top_k=1)
    assert torch.equal(out, model.generate(prompt, 20, temperature=0))


def test_a_few_dozen_adamw_steps_beat_the_unigram_entropy_on_held_out_text():
    split = int(0.9 * len(DATA))
    train, val = DATA[:split], DATA[split:]
    counts = torch.bincount(train, minlength=256).double() + 1
    unigram_ce = -(counts / counts.sum())[val].log().mean().item()  # ~3.25 nats
    model = small_model()
    gen = torch.Generator().manual_seed(0)

    def batch(data, n):
        ix = torch.randint(0, len(data) - 65, (n,), generator=gen)
        return torch.stack([data[i : i + 64] for i in ix]), torch.stack([data[i + 1 : i + 65] for i in ix])

    val_x, val_y = batch(val, 32)
    with torch.no_grad():
        before = model(val_x, val_y)[1].item()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    for _ in range(40):
        x, y = batch(train, 16)
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(val_x, val_y)[1].item()
    assert before == pytest.approx(math.log(256), abs=0.1)
    assert after < unigram_ce - 0.2, (before, after, unigram_ce)
