import copy
import math

import pydoc_data.topics
import pytest
import torch

from skillstream.models.bdh import encode_bytes
from skillstream.models.spiking import SpikingBDH, SpikingBDHConfig, lif_scan, spike_fast_sigmoid

SMALL = dict(n_layer=3, n_embd=64, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)
TEXT = "".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
DATA = encode_bytes(TEXT)



def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return SpikingBDH(SpikingBDHConfig(**{**SMALL, **overrides}))


def text_batch(batch, seq, start=1000):
    chunk = DATA[start : start + batch * seq + 1]
    return chunk[:-1].view(batch, seq), chunk[1:].view(batch, seq)


@pytest.mark.parametrize("seed", [0, 1])
def test_firing_rate_at_init_is_between_5_and_20_percent_on_english_text(seed):
    model = small_model(seed).eval()
    with torch.no_grad():
        model(text_batch(8, 64, start=5000 + 7919 * seed)[0])
    assert len(model.last_firing_rates) == 3
    for x_rate, y_rate in model.last_firing_rates_xy:
        assert 0.05 <= x_rate <= 0.2 and 0.05 <= y_rate <= 0.2, model.last_firing_rates_xy


def test_lif_hand_written_bptt_matches_autograd_through_each_step():
    torch.manual_seed(0)
    current = torch.randn(2, 3, 12, 5, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    threshold, beta, slope = torch.tensor(0.8, dtype=torch.float64), 0.7, 4.0
    w_s, w_v = torch.randn(2, 3, 12, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)

    def unrolled():
        v, spikes = v0, []
        for t in range(current.size(2)):
            v = beta * v + current[:, :, t]
            s = spike_fast_sigmoid(v, threshold, slope)
            v = v - threshold * s.detach()  # soft reset
            spikes.append(s)
        return torch.stack(spikes, 2), v

    results = []
    for fn in (unrolled, lambda: lif_scan(current, v0, threshold, beta, slope)):
        spikes, v = fn()
        grads = torch.autograd.grad((spikes * w_s).sum() + (v * w_v).sum(), [current, v0])
        results.append((spikes, v, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    assert results[0][2].abs().sum() > 0


def test_membrane_carries_over_positions_and_across_calls():
    model = small_model().double().eval()
    idx, _ = text_batch(2, 64)
    with torch.no_grad():
        full, _ = model(idx)
        _, state = model.prefill(idx[:, :32])
        second_half, _ = model(idx[:, 32:], state=state)
        torch.testing.assert_close(second_half, full[:, 32:], rtol=1e-9, atol=1e-9)
        assert all(layer["vx"].abs().sum() > 0 and layer["vy"].abs().sum() > 0 for layer in state.layers)
        for layer in state.layers:  # forgetting the membrane (only) changes what comes next
            layer["vx"] = torch.zeros_like(layer["vx"])
            layer["vy"] = torch.zeros_like(layer["vy"])
        reset, _ = model(idx[:, 32:], state=state)
    assert (reset - full[:, 32:]).abs().max() > 1e-3


def test_step_by_step_state_path_equals_full_forward():
    model = small_model().double().eval()
    idx, _ = text_batch(2, 64)
    with torch.no_grad():
        full, _ = model(idx)
        state = model.init_state(2)
        stepped = []
        for t in range(64):
            logits, state = model.step(idx[:, t], state)
            stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, 1), full, rtol=1e-9, atol=1e-9)
    prompt = idx[:, :16]
    assert torch.equal(
        model.generate(prompt, 24, temperature=0), model.generate(prompt, 24, temperature=0, use_state=False)
    )


def test_every_layer_and_every_matrix_receives_gradient():
    model = small_model()
    idx, targets = text_batch(4, 64)
    _, loss = model(idx, targets)
    per_layer = torch.autograd.grad(loss, [s for pair in model.last_spikes for s in pair], retain_graph=True)
    assert all(g.abs().sum() > 0 for g in per_layer)  # x and y spikes of all 3 layers
    loss.backward()
    for name in ("encoder", "encoder_v", "decoder", "embed.weight", "lm_head"):
        grad = model.get_parameter(name).grad
        assert grad.norm() > 1e-6, name


def test_rate_regulariser_moves_the_firing_rate_toward_its_target():
    idx, _ = text_batch(4, 64)
    for target in (0.3, 0.02):
        model = small_model()
        model(idx)
        start = sum(model.last_firing_rates) / 3
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        for _ in range(15):
            model(idx)
            loss = model.firing_rate_loss(target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model(idx)
        end = sum(model.last_firing_rates) / 3
        assert abs(end - target) < 0.5 * abs(start - target), (target, start, end)


def test_calibration_sets_each_layer_to_the_requested_rate():
    model = small_model()
    rates = model.calibrate_thresholds(text_batch(4, 64)[0], target_rate=0.05)
    assert all(abs(r - 0.05) < 0.01 for r in rates), rates


def test_stdp_changes_the_computation_and_zero_amplitudes_are_a_no_op():
    model = small_model().eval()
    idx, _ = text_batch(4, 64)
    with torch.no_grad():
        with_stdp, _ = model(idx)
        off = copy.deepcopy(model)
        off.config.stdp = False
        without, _ = off(idx)
        only_depression = copy.deepcopy(model)
        only_depression.config.A_plus = 0.0
        depressed, _ = only_depression(idx)
        silent = copy.deepcopy(model)
        silent.config.A_plus = silent.config.A_minus = 0.0
        zero, _ = silent(idx)
    relative = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert relative(with_stdp, without) > 0.05
    assert relative(depressed, without) > 0.05  # the depression term is not removed by the causal mask
    assert torch.equal(zero, without)


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
    assert all(0.0 < r < 0.6 for r in model.last_firing_rates)
