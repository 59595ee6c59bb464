"""Spiking BDH: leaky integrate-and-fire neurons with STDP fast weights.

:class:`SpikingBDH` keeps the BDH block (one shared encoder / value-encoder / decoder used at
every layer) and replaces the two ReLU neuron populations of each layer (``x_sparse`` and
``y_sparse``) by leaky integrate-and-fire (LIF) neurons:

* membrane ``v_t = beta * v_{t-1} + I_t`` with ``beta = exp(-1/tau_mem)``; the input current
  ``I_t`` is the pre-activation (``x @ encoder`` or ``LN(attn) @ encoder_v``) at position t.
  The membrane integrates across sequence positions, per layer, and is part of the recurrent
  state, so :meth:`step` continues it exactly where the previous call left it.
* a spike when ``v_t >= threshold``, soft reset ``v_t -= threshold`` (the charge above the
  threshold is kept).  A spike carries the charge ``threshold``, so the activations keep the
  scale of the ReLU model.
* gradients through the spike with a fast-sigmoid surrogate
  ``d spike / d v = 1 / (threshold * (1 + slope * |v - threshold| / threshold)^2)``.
* the default threshold is ``threshold_sigma * init_std * sqrt(n_embd)``: ``init_std *
  sqrt(n_embd)`` is the standard deviation of the input current at initialisation (LayerNorm
  makes ``|x|^2 = D``), and ``threshold_sigma`` (one value for x, one for y) was chosen so that ~10 % fire
  on English text at init.  :meth:`SpikingBDH.calibrate_thresholds` sets the per-layer
  thresholds from data instead.

Firing rates of the last forward are in :attr:`SpikingBDH.last_firing_rates` (one float per
layer, the mean of the x and y populations) and the regulariser
``mean_l (rate_l - target_rate)^2`` is :meth:`SpikingBDH.firing_rate_loss` (it back-propagates
through the surrogate; with ``rate_reg_weight > 0`` it is added to the loss returned by
``forward``).

STDP.  Each layer has a plastic fast-weight matrix ``F`` (heads, N, D) next to the BDH
attention state ``S``: synapses from the spiking x-neurons (pre-synaptic, N per head) to the
residual-stream values the attention writes (post-synaptic, the layer input ``x``, D wide).
With pre-synaptic trace ``P_t = exp(-1/tau_plus) P_{t-1} + pre_t`` and post-synaptic trace
``Q_t = exp(-1/tau_minus) Q_{t-1} + post_t`` the update after position t is::

    dF_t = A_plus * P_{t-1}^T post_t      (pre fired before post: potentiation)
         - A_minus * pre_t^T  Q_{t-1}     (post was active before pre fires: depression)

and the fast weights read out ``pre_t @ F_{t-1}`` (updates up to t-1 only, strictly causal)
which is added to the attention output before its LayerNorm.  Both terms survive the causal
mask because each uses only earlier positions.  The training forward computes the same sums
in parallel (T x T kernels); :meth:`step` carries ``F``, ``P`` and ``Q`` in the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .bdh import BDH, BDHConfig, BDHState, masked_lm_loss
from .modes import eval_mode

__all__ = ["SpikingBDHConfig", "SpikingBDH", "spike_fast_sigmoid", "lif_scan"]


@dataclass
class SpikingBDHConfig(BDHConfig):
    tau_mem: float = 4.0  # membrane time constant in positions; leak factor beta = exp(-1/tau_mem)
    threshold: float | None = None  # absolute firing threshold; None -> threshold_sigma * init_std * sqrt(n_embd)
    threshold_sigma: tuple[float, float] = (1.45, 2.2)  # default (x, y) thresholds in std of the init input current (~10 % firing)
    surrogate_slope: float = 4.0  # fast-sigmoid steepness, in units of 1/threshold
    target_rate: float = 0.1  # target firing rate of the rate regulariser
    rate_reg_weight: float = 0.0  # weight of the firing-rate regulariser added to forward()'s loss
    stdp: bool = True  # enable the STDP fast weights
    tau_plus: float = 4.0  # time constant (positions) of the pre-synaptic trace (potentiation window)
    tau_minus: float = 4.0  # time constant (positions) of the post-synaptic trace (depression window)
    A_plus: float = 0.05  # potentiation amplitude
    A_minus: float = 0.0525  # depression amplitude (slightly larger than A_plus, as usual for STDP)


def _surrogate(v: torch.Tensor, threshold: torch.Tensor, slope: float) -> torch.Tensor:
    """Fast-sigmoid surrogate of d Heaviside(v - threshold) / dv."""
    return 1.0 / (threshold * (1.0 + slope * ((v - threshold) / threshold).abs()) ** 2)


class _FastSigmoidSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, threshold, slope):
        ctx.save_for_backward(v, threshold)
        ctx.slope = slope
        return (v >= threshold).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        v, threshold = ctx.saved_tensors
        return grad * _surrogate(v, threshold, ctx.slope), None, None


def spike_fast_sigmoid(v: torch.Tensor, threshold: torch.Tensor, slope: float) -> torch.Tensor:
    """Heaviside(v - threshold) forward, fast-sigmoid surrogate gradient backward."""
    return _FastSigmoidSpike.apply(v, threshold, slope)


class _LIFScan(torch.autograd.Function):
    """LIF over time with a hand-written BPTT (one loop, no per-step autograd nodes)."""

    @staticmethod
    def forward(ctx, current, v0, threshold, beta, slope):
        T = current.size(2)
        v = v0
        vs, spikes = [], []
        for t in range(T):
            v = beta * v + current[:, :, t]
            s = (v >= threshold).to(v.dtype)
            vs.append(v)
            spikes.append(s)
            v = v - threshold * s
        vs = torch.stack(vs, dim=2)
        ctx.save_for_backward(vs, threshold)
        ctx.beta, ctx.slope = beta, slope
        return torch.stack(spikes, dim=2), v

    @staticmethod
    def backward(ctx, grad_spikes, grad_v_last):
        vs, threshold = ctx.saved_tensors
        beta = ctx.beta
        surr = _surrogate(vs, threshold, ctx.slope)
        if grad_spikes is None:
            grad_spikes = torch.zeros_like(vs)
        g_next = grad_v_last if grad_v_last is not None else torch.zeros_like(vs[:, :, 0])
        grad_current = torch.empty_like(vs)
        # dL/dv_t = dL/ds_t * h'(v_t) + beta * dL/dv_{t+1}   (soft reset detached)
        for t in range(vs.size(2) - 1, -1, -1):
            g = grad_spikes[:, :, t] * surr[:, :, t] + g_next
            grad_current[:, :, t] = g
            g_next = beta * g
        return grad_current, g_next, None, None, None


def lif_scan(
    current: torch.Tensor, v0: torch.Tensor, threshold: torch.Tensor, beta: float, slope: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leaky integrate-and-fire over the time axis (dim 2) of ``current`` (B, nh, T, N).

    ``v0`` (B, nh, N) is the membrane before the first position.  Returns the spikes
    (B, nh, T, N) in {0, 1} (fast-sigmoid surrogate gradient) and the membrane after the
    last position.  The soft reset is detached from the gradient (the usual choice);
    gradients flow through the leak across positions."""
    return _LIFScan.apply(current, v0, threshold, beta, slope)


def _decay_kernel(T: int, beta: float, device, dtype) -> torch.Tensor:
    """K[t, s] = beta^(t-1-s) for s < t, else 0: trace *before* position t from inputs at s."""
    t = torch.arange(T, device=device, dtype=dtype)
    diff = t.view(-1, 1) - 1 - t.view(1, -1)
    return torch.where(diff >= 0, beta ** diff.clamp(min=0), torch.zeros((), device=device, dtype=dtype))


class SpikingBDH(BDH):
    """BDH with LIF neurons, a firing-rate regulariser and STDP fast weights."""

    config: SpikingBDHConfig

    def __init__(self, config: SpikingBDHConfig | None = None):
        config = config or SpikingBDHConfig()
        super().__init__(config)
        if config.threshold is not None:
            theta = torch.full((2,), float(config.threshold))
        else:
            theta = torch.tensor(config.threshold_sigma, dtype=torch.float32) * (config.init_std * math.sqrt(config.n_embd))
        # per layer, per population (0 = x neurons, 1 = y neurons)
        self.register_buffer("thresholds", theta.repeat(config.n_layer, 1))
        self._rates: list[torch.Tensor] = []
        self.last_spikes: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (x, y) spikes, in the graph

    # --------------------------------------------------------- statistics
    @property
    def last_firing_rates(self) -> list[float]:
        """Per-layer firing rate (mean of the x and y populations) of the last forward."""
        return [float(r.detach().mean()) for r in self._rates]

    @property
    def last_firing_rates_xy(self) -> list[tuple[float, float]]:
        """Per-layer (x-population, y-population) firing rates of the last forward."""
        return [(float(r[0]), float(r[1])) for r in self._rates]

    def firing_rate_loss(self, target_rate: float | None = None) -> torch.Tensor:
        """mean over layers and populations of (rate - target)^2 for the last forward;
        differentiable through the surrogate gradient."""
        target = self.config.target_rate if target_rate is None else target_rate
        rates = torch.stack(self._rates)
        return ((rates - target) ** 2).mean()

    @torch.no_grad()
    def calibrate_thresholds(self, idx: torch.Tensor, target_rate: float | None = None, iters: int = 12) -> list[float]:
        """Set each layer's x/y thresholds (layer by layer) so that the firing rate on ``idx``
        is ``target_rate``; returns the measured rates after calibration."""
        target = self.config.target_rate if target_rate is None else target_rate
        with eval_mode(self):
            for level in range(self.config.n_layer):
                for pop in range(2):
                    lo, hi = self.thresholds[level, pop].item() / 8, self.thresholds[level, pop].item() * 8
                    for _ in range(iters):  # geometric bisection: rate decreases with the threshold
                        mid = math.sqrt(lo * hi)
                        self.thresholds[level, pop] = mid
                        self._run(idx)
                        if float(self._rates[level][pop]) > target:
                            lo = mid
                        else:
                            hi = mid
                    self.thresholds[level, pop] = math.sqrt(lo * hi)
            self._run(idx)
        return self.last_firing_rates

    # --------------------------------------------------------------- core
    def _begin(self, idx: torch.Tensor) -> None:
        self._rates = []
        self.last_spikes = []

    def _stdp_on(self) -> bool:
        return bool(self.config.stdp)

    def _layer(self, level, x, pos0, lstate, keep_state):
        c = self.config
        B, _, T, D = x.shape
        nh, N = c.n_head, c.n_neurons
        beta = math.exp(-1.0 / c.tau_mem)
        th_x, th_y = self.thresholds[level, 0], self.thresholds[level, 1]
        zeros_v = x.new_zeros(B, nh, N)

        # x neurons: LIF on the encoder current, membrane carried across positions
        vx0 = zeros_v if lstate is None else lstate["vx"]
        sx, vx = lif_scan(x @ self.encoder, vx0, th_x, beta, c.surrogate_slope)
        x_sparse = th_x * sx  # B, nh, T, N

        yKV, S = self._attention(x_sparse, x, pos0, None if lstate is None else lstate["S"], keep_state)
        new_state = {"S": S, "vx": vx} if keep_state else None
        if self._stdp_on():
            fast, stdp_state = self._stdp(x_sparse, x, lstate, keep_state)
            yKV = yKV + fast
            if keep_state:
                new_state.update(stdp_state)
        yKV = self.ln(yKV)

        # y neurons
        vy0 = zeros_v if lstate is None else lstate["vy"]
        sy, vy = lif_scan(yKV @ self.encoder_v, vy0, th_y, beta, c.surrogate_slope)
        y_sparse = th_y * sy
        if keep_state:
            new_state["vy"] = vy
        self._rates.append(torch.stack((sx.mean(), sy.mean())))
        self.last_spikes.append((sx, sy))

        xy = self.drop(x_sparse * y_sparse)
        y_mlp = xy.transpose(1, 2).reshape(B, 1, T, nh * N) @ self.decoder
        x = self.ln(x + self.ln(y_mlp))
        return x, new_state

    def _stdp(self, pre: torch.Tensor, post: torch.Tensor, lstate: dict | None, keep_state: bool):
        """STDP fast-weight readout for a chunk.  pre: (B,nh,T,N) spikes*threshold,
        post: (B,1,T,D).  Returns the (B,nh,T,D) readout and the updated F/P/Q state."""
        c = self.config
        T = pre.size(2)
        bp, bm = math.exp(-1.0 / c.tau_plus), math.exp(-1.0 / c.tau_minus)
        Kp = _decay_kernel(T, bp, pre.device, pre.dtype)
        Km = _decay_kernel(T, bm, pre.device, pre.dtype)
        P_prev = Kp @ pre  # P_{t-1} from spikes inside the chunk
        Q_prev = Km @ post
        if lstate is not None and "F" in lstate:
            steps = torch.arange(T, device=pre.device, dtype=pre.dtype).view(-1, 1)
            P_prev = P_prev + (bp**steps) * lstate["P"].unsqueeze(2)
            Q_prev = Q_prev + (bm**steps) * lstate["Q"].unsqueeze(2)
        # readout_t = pre_t @ (F_in + sum_{s<t} dF_s)
        ltp = (pre @ P_prev.mT).tril(-1) @ post  # potentiation: pre-trace at s-1 x post at s
        ltd = (pre @ pre.mT).tril(-1) @ Q_prev  # depression: pre at s x post-trace at s-1
        out = c.A_plus * ltp - c.A_minus * ltd
        if lstate is not None and "F" in lstate:
            out = out + pre @ lstate["F"]
        new = {}
        if keep_state:
            dF = c.A_plus * (P_prev.mT @ post) - c.A_minus * (pre.mT @ Q_prev)
            new["F"] = dF if lstate is None or "F" not in lstate else lstate["F"] + dF
            last = torch.arange(T - 1, -1, -1, device=pre.device, dtype=pre.dtype).view(-1, 1)
            P_out = ((bp**last) * pre).sum(2)  # sum_s bp^(T-1-s) pre_s
            Q_out = ((bm**last) * post).sum(2)
            if lstate is not None and "F" in lstate:
                P_out = P_out + bp**T * lstate["P"]
                Q_out = Q_out + bm**T * lstate["Q"]
            new["P"], new["Q"] = P_out, Q_out
        return out, new

    # ------------------------------------------------------------- public
    def init_state(self, batch: int, device=None, dtype=None) -> BDHState:
        state = super().init_state(batch, device, dtype)
        c = self.config
        for ls in state.layers:
            S = ls["S"]
            ls["vx"] = S.new_zeros(batch, c.n_head, c.n_neurons)
            ls["vy"] = S.new_zeros(batch, c.n_head, c.n_neurons)
            if self._stdp_on():
                ls["F"] = torch.zeros_like(S)
                ls["P"] = S.new_zeros(batch, c.n_head, c.n_neurons)
                ls["Q"] = S.new_zeros(batch, 1, c.n_embd)
        return state

    def forward(self, idx, targets=None, loss_mask=None, state: BDHState | None = None):
        """As :meth:`BDH.forward`; ``state`` (optional) continues membranes, attention and STDP
        state from an earlier chunk instead of starting from rest.  The loss includes
        ``rate_reg_weight * firing_rate_loss()`` when that weight is positive."""
        logits, _ = self._run(idx, state, keep_state=False)
        loss = None
        if targets is not None:
            loss = masked_lm_loss(logits, targets, loss_mask)
            if self.config.rate_reg_weight > 0:
                loss = loss + self.config.rate_reg_weight * self.firing_rate_loss()
        return logits, loss
