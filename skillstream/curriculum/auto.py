"""Auto-curriculum: re-weight several training sources while a stage runs (Destruct's idea, done
with learning progress over time, plus an EXP3 bandit as in Online Data Mixing).

    plugins:
      - {name: auto_curriculum, mixing: bandit, freeze_interval: 20, sample_size: 16, stages: [mixture]}

Every `freeze_interval` optimizer steps the current trainable weights become the new **frozen
snapshot**, and the snapshot scores a small fixed sample of every source (`sample_size` examples
drawn once per stage with a seeded RNG): per source, difficulty = the mean per-example loss, with
its variance. The snapshot's only use is to score that fixed sample, so its scores are computed
once, when it is taken, and kept in the plugin state -- the same numbers as holding a frozen copy
of the weights and asking it later, and a checkpoint restores them exactly. Learning progress of a
source is how its combined signal `c = difficulty + var_coef * variance` fell between two
snapshots (a paired difference: the same examples, two snapshots).

Mixing rules (weights always sum to 1; `floor` mixes in a uniform share so no source starves):
  uniform     equal weights, never changed
  fixed       the sources' `weight`s from the recipe, never changed
  difficulty  the seed's update with the gradient over time:
              w += eta * (c_prev - c_now) * g; clip at 0; renormalise (unchanged if all clip to 0)
              g = (1/K) / w with `progress: per_share` (default: progress per unit of sampling
              share, so a source's own share does not feed its growth), g = 1 with `progress: raw`
              (the seed's rule as written)
  bandit      EXP3 over sources, rewarded by relative loss reduction r = (d_prev - d_now) / d_prev,
              importance-weighted by the share p the source had while it was earned:
              s += bandit_lr * r / p;  p = (1 - bandit_gamma) * softmax(s) + bandit_gamma / K
  alignment   predicted, not measured, progress (DoGE, Fan et al. 2023): at every refresh the gradient
              of each source's probe loss is taken on two halves of its sample, and source i's
              usefulness u_i = mean_j <g_i, g_j> (halves crossed, so noise does not score its own
              squared norm) is the first-order drop of the mean probe loss per step on i; the weights
              move toward max(u, 0) normalised, with `smoothing` as the weight of the past
  hardest     naive "sample the hardest": w proportional to c_now (over-samples unlearnable noise;
              kept as the baseline that shows why progress matters)

Options of the difficulty rule: `max_scale` caps the per-share factor (a source with a small share
moves mostly by transfer and jitter, which 1/w would multiply; null: uncapped); `smoothing` in
[0, 1) averages progress over refreshes (the weight of the past); `absolute: true` reads |progress|
(absolute learning progress: a source being forgotten gains weight); `probe: held_out` keeps the
probe sample out of training (progress without memorisation), `probe: train` scores training
examples. Defaults: held_out, max_scale 1, smoothing 0.5, absolute -- measured in bench/curriculum
(bench/RESULTS.md, 2026-12-01) on two kinds of noise source: 0.90x uniform's steps on both and the
final loss of an oracle that drops the noise, where the uncapped rule on training examples (the
earlier default) reached 0.93x on one and blew up on the other (one source at a time took 0.86-0.99
of the mixture; final loss 4.96 vs uniform's 3.93).

Validation (`validation_size: N`, default 0 = none): N more examples of every source, drawn once per
stage with a seeded RNG from what the probe left, are taken out of training and scored by the model
at every refresh -- a validation loss per source that the mixing rules never read (the probe
decides; this only watches, as the seed's validation loop does). Logged as
curriculum/validation/<source> and curriculum/validation/mean, and kept in each history entry
(`validation`). A source with fewer than 2 x N examples left is refused in one line (its
validation would take most of its training data).

The batches follow the weights through `BatchPlan.set_weights` (per-batch mixture sampling, a pure
function of seed, position and weights). Logged on every logged step: curriculum/weight/<source>,
curriculum/difficulty/<source>, curriculum/variance/<source>, curriculum/progress/<source> (of the
last refresh), curriculum/validation/<source> (with validation_size) and curriculum/refreshes; the whole history (one entry per refresh) is in the plugin
state of every checkpoint.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from ..data.batching import device_batches
from ..data.render import IGNORE
from ..errors import UserError
from ..models.modes import eval_mode
from ..objectives.lm import example_losses, per_example_loss
from ..plugins import Plugin, StepContext

MIXINGS = ("uniform", "fixed", "difficulty", "bandit", "alignment", "hardest")


# -- update rules (pure functions; tested on hand-made sequences) ----------------------------------
def normalise(weights: list[float], floor: float = 0.0) -> list[float]:
    total = sum(weights)
    k = len(weights)
    return [(1 - floor) * w / total + floor / k for w in weights]


def difficulty_update(weights: list[float], prev_signal: list[float], signal: list[float], eta: float,
                      floor: float = 0.0, per_share: bool = False, max_scale: float | None = None) -> list[float]:
    """w += eta * (c_prev - c_now), clipped at 0 and renormalised; unchanged if everything clips.

    per_share: the progress of source i is first scaled by (1/k) / w_i -- the progress it would have
    made with a uniform share. Raw progress grows with the share a source already has (more of its
    batches, more of its loss falls), a positive feedback that let one source take most of the
    mixture in bench/curriculum; per share, a source gains weight only while each of its examples
    still teaches more than the others' do. max_scale caps that factor: a source with a small share
    moves mostly by what the other sources teach (transfer) and by measurement jitter, which an
    uncapped 1/w_i would multiply (bench/curriculum: the noise source kept climbing back from 0.03).
    """
    return progress_update(weights, [p - c for p, c in zip(prev_signal, signal)], eta, floor, per_share, max_scale)


def progress_update(weights: list[float], progress: list[float], eta: float, floor: float = 0.0,
                    per_share: bool = False, max_scale: float | None = None) -> list[float]:
    """The difficulty rule on given progress values: w += eta * scale * progress, clip, renormalise."""
    k = len(weights)
    scale = [1 / (k * w) if per_share and w > 0 else 1.0 for w in weights]
    if max_scale is not None:
        scale = [min(f, max_scale) for f in scale]
    moved = [max(0.0, w + eta * f * p) for w, f, p in zip(weights, scale, progress)]
    if sum(moved) <= 0:
        return list(weights)
    return normalise(moved, floor)


def exp3_update(log_weights: list[float], probs: list[float], rewards: list[float], lr: float,
                gamma: float) -> tuple[list[float], list[float]]:
    """One EXP3 round with importance-weighted rewards r_i / p_i; returns (log weights, probabilities)."""
    k = len(log_weights)
    log_weights = [s + lr * r / p if p > 0 else s for s, r, p in zip(log_weights, rewards, probs)]
    top = max(log_weights)
    e = [math.exp(s - top) for s in log_weights]
    z = sum(e)
    return log_weights, [(1 - gamma) * x / z + gamma / k for x in e]


def hardest_weights(signal: list[float], floor: float = 0.0) -> list[float]:
    return normalise([max(c, 0.0) for c in signal], floor) if sum(max(c, 0.0) for c in signal) > 0 \
        else [1 / len(signal)] * len(signal)


def source_names(sources) -> list[str]:
    """Short, unique names for a stage's sources: the builtin name or the file/folder stem."""
    names = []
    for src in sources:
        if src.source.startswith("hf:"):
            base = src.source[3:].split(":")[0].replace("/", "_")
        elif Path(src.source).exists():
            base = Path(src.source).stem
        else:
            base = src.source.split(":")[0]  # a builtin, e.g. bfcl:simple -> bfcl
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def sample_gradient(model, items, pad_id: int, batch_size: int = 8, losses: list | None = None) -> torch.Tensor:
    """The gradient of the mean per-example loss of `items` w.r.t. the trainable parameters, flattened
    (eval mode; torch.autograd.grad, so the parameters' .grad -- the optimizer's -- is not touched).
    `losses`, when given, receives the per-example losses of the same forward passes."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("sample_gradient: the model has no trainable parameters")
    device = params[0].device
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    with eval_mode(model):
        for batch in device_batches(items, pad_id, batch_size, device):
            per_example = example_losses(model, batch)
            if losses is not None:
                losses += per_example.tolist()
            loss = per_example.sum() / len(items)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t += g.float()
    return torch.cat([t.flatten() for t in total])


def alignment_matrix(grads_a: list[torch.Tensor], grads_b: list[torch.Tensor]) -> list[list[float]]:
    """M[i][j] = (<a_i, b_j> + <b_i, a_j>) / 2 from two independent halves a, b of every source's probe
    sample. M[i][j] estimates <E g_i, E g_j> without the sampling noise a single sample's <g, g> adds
    to the diagonal: a source whose expected gradient is zero (noise at its floor) scores ~0 on its
    own diagonal instead of the squared norm of its noise."""
    a, b = torch.stack(grads_a), torch.stack(grads_b)
    cross = a @ b.T
    return ((cross + cross.T) / 2).tolist()


def alignment_update(weights: list[float], matrix: list[list[float]], smoothing: float,
                     floor: float = 0.0) -> list[float]:
    """Weights toward each source's predicted usefulness u_i = mean_j M[i][j]: to first order, one
    gradient step on source i lowers the mean loss of all sources' probes by lr * u_i (DoGE's
    criterion, Fan et al. 2023, with every source as the target). Target shares are max(u_i, 0)
    normalised; the weights move there with `smoothing` as the weight of the past. Unchanged when
    no source is predicted to help."""
    k = len(weights)
    useful = [max(0.0, sum(row) / k) for row in matrix]
    if sum(useful) <= 0:
        return list(weights)
    target = [u / sum(useful) for u in useful]
    return normalise([smoothing * w + (1 - smoothing) * t for w, t in zip(weights, target)], floor)


def _scored(items) -> list[int]:
    """Indices of the items with a labelled token (truncation can cut a conversation before its answer)."""
    return [j for j, t in enumerate(items) if any(label != IGNORE for label in t.labels[1:])]


class AutoCurriculum(Plugin):
    name = "curriculum"

    def __init__(self, mixing: str = "difficulty", freeze_interval: int = 50, sample_size: int = 16,
                 eta: float = 0.5, var_coef: float = 0.0, floor: float = 0.02, progress: str = "per_share",
                 max_scale: float | None = 1.0, smoothing: float = 0.5, absolute: bool = True,
                 probe: str = "held_out",
                 bandit_lr: float = 1.0,
                 bandit_gamma: float = 0.1, eval_batch_size: int = 8, stages: list[str] | None = None,
                 validation_size: int = 0,
                 tokenizer=None, renderer=None, recipe=None, **context):
        where = "plugins[auto_curriculum]"
        if mixing not in MIXINGS:
            raise UserError(f"{where}: mixing {mixing!r} is not one of {', '.join(MIXINGS)}")
        for key, value in (("freeze_interval", freeze_interval), ("sample_size", sample_size),
                           ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{where}: {key} must be a positive integer (got {value!r})")
        if not isinstance(validation_size, int) or isinstance(validation_size, bool) or validation_size < 0:
            raise UserError(f"{where}: validation_size must be an integer >= 0 (got {validation_size!r})")
        if progress not in ("per_share", "raw"):
            raise UserError(f"{where}: progress must be per_share or raw (got {progress!r})")
        if probe not in ("held_out", "train"):
            raise UserError(f"{where}: probe must be held_out or train (got {probe!r})")
        if max_scale is not None and not max_scale > 0:
            raise UserError(f"{where}: max_scale must be > 0 (got {max_scale!r})")
        if not 0 <= smoothing < 1:
            raise UserError(f"{where}: smoothing must be in [0, 1) (got {smoothing!r})")
        if not 0 <= floor < 1:
            raise UserError(f"{where}: floor must be in [0, 1) (got {floor!r})")
        if not 0 <= bandit_gamma <= 1:
            raise UserError(f"{where}: bandit_gamma must be in [0, 1] (got {bandit_gamma!r})")
        if eta < 0 or bandit_lr < 0:
            raise UserError(f"{where}: eta and bandit_lr must be >= 0 (got {eta!r}, {bandit_lr!r})")
        if stages is not None and recipe is not None:
            known = [s.name for s in recipe.stages] or ["main"]
            for s in stages:
                if s not in known:
                    raise UserError(f"{where}: stage {s!r} is not a stage of the recipe ({', '.join(known)})")
        smoke = bool(recipe is not None and recipe.smoke)
        self.mixing, self.eta, self.var_coef, self.floor, self.progress = mixing, eta, var_coef, floor, progress
        self.max_scale, self.smoothing, self.absolute, self.probe = max_scale, smoothing, bool(absolute), probe
        self.freeze_interval = 1 if smoke else freeze_interval
        self.sample_size = min(sample_size, 4) if smoke else sample_size
        self.validation_size = min(validation_size, 2) if smoke else validation_size
        self.bandit_lr, self.bandit_gamma, self.eval_batch_size = bandit_lr, bandit_gamma, eval_batch_size
        self.stages, self.recipe = stages, recipe
        self.seed = recipe.seed if recipe is not None else 0
        self.active, self.plan = False, None
        self.state: dict = {}

    # -- hooks ----------------------------------------------------------------------------------
    def before_stage(self, ctx: StepContext) -> None:
        plan = ctx.plan
        self.active = plan is not None and len(plan.sources) >= 2 and (self.stages is None or ctx.stage in self.stages)
        if not self.active:
            return
        self.plan, self.pad_id = plan, ctx.pad_id
        self.samples = [self._take_sample(i, ctx.stage) for i in range(len(plan.sources))]  # seeded: same on resume
        self.validation = [self._take_validation(i, ctx.stage) for i in range(len(plan.sources))] \
            if self.validation_size else []
        if self.state.get("stage") == ctx.stage and self.state.get("history"):  # resumed mid-stage
            plan.set_weights(self.state["weights"])
            return
        k = len(plan.sources)
        configured = normalise(list(plan.weights))
        weights = [1 / k] * k if self.mixing == "uniform" else configured
        self.state = {"stage": ctx.stage, "names": self._names(ctx.stage, k), "weights": weights,
                      "history": [], "log_weights": [0.0] * k}
        self._refresh(ctx)

    def after_step(self, ctx: StepContext, metrics: dict) -> dict | None:
        if not self.active:
            return None
        if ctx.step % self.freeze_interval == 0 and self.state["history"][-1]["step"] < ctx.step:
            self._refresh(ctx)
        return self.metrics()

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state or {})

    # -- internals ------------------------------------------------------------------------------
    def _names(self, stage: str, k: int) -> list[str]:
        if self.recipe is not None:
            for st in self.recipe.resolved_stages():
                if st.name == stage and len(st.data.train) == k:
                    return source_names(st.data.train)
        return [f"source{i}" for i in range(k)]

    def _take_sample(self, i: int, stage: str) -> list:
        """Source i's fixed probe sample, drawn from its training examples that keep a labelled token
        after truncation (at destruct's max_length 256 about half of BFCL's conversations do not, and
        their loss would count as 0 in the difficulty). With `probe: held_out`
        it is also taken out of the training batches: scored on examples the model trains on, a
        source's progress is partly memorisation (bench/curriculum: nl2bash's 240 requests repeated
        4x in 300 steps, its probe loss fell to 3.0 while its validation loss stayed at 4.3). Held-out
        probes swing more from refresh to refresh, so pair them with `max_scale` and `smoothing`
        (uncapped per-share progress on held-out probes oscillated in bench/curriculum; RESULTS.md).
        A source with fewer than 2 x sample_size examples keeps its sample in training."""
        src = self.plan.sources[i]
        rng = random.Random(f"{self.seed}:curriculum:{stage}:{i}")
        scored = _scored(src)  # an example cut before its answer has no loss: it would count as 0
        if not scored:
            name = self._names(stage, len(self.plan.sources))[i]
            raise UserError(f"plugins[auto_curriculum]: no example of source {name!r} keeps a labelled token after "
                            "truncation: nothing to score (raise data.max_length)")
        picked = sorted(rng.sample(scored, min(self.sample_size, len(scored))))
        if self.probe == "held_out" and len(src) >= 2 * self.sample_size:
            return self.plan.hold_out(i, picked)
        return [src[j] for j in picked]

    def _take_validation(self, i: int, stage: str) -> list:
        """Source i's validation sample (module doc): taken out of training, disjoint from the probe,
        drawn among examples with a labelled token left after truncation (one cut before its answer
        has no loss to measure, and would count as 0)."""
        src = self.plan.sources[i]  # what the probe left
        if len(src) < 2 * self.validation_size:
            name = self._names(stage, len(self.plan.sources))[i]
            raise UserError(f"plugins[auto_curriculum]: source {name!r} has {len(src)} training examples left after "
                            f"the probe, fewer than 2 x validation_size {self.validation_size}")
        scored = _scored(src)
        if len(scored) < self.validation_size:
            name = self._names(stage, len(self.plan.sources))[i]
            raise UserError(f"plugins[auto_curriculum]: source {name!r} has {len(scored)} examples with a labelled "
                            f"token after truncation, fewer than validation_size {self.validation_size} "
                            "(raise data.max_length)")
        rng = random.Random(f"{self.seed}:curriculum-validation:{stage}:{i}")
        return self.plan.hold_out(i, sorted(rng.sample(scored, self.validation_size)))

    def measure(self, model, losses: list[list[float]] | None = None) -> tuple[list[float], list[float]]:
        """(mean, variance) of the per-example loss of the model as it is now, per source (from
        `losses`, one list per source, when they were already computed)."""
        means, variances = [], []
        for i, sample in enumerate(self.samples):
            losses_i = losses[i] if losses is not None else per_example_loss(model, sample, self.pad_id,
                                                                             self.eval_batch_size)
            m = sum(losses_i) / len(losses_i)
            means.append(m)
            variances.append(sum((x - m) ** 2 for x in losses_i) / max(len(losses_i) - 1, 1))
        return means, variances

    def alignment(self, model) -> tuple[list[list[float]], list[list[float]]]:
        """(alignment matrix of the sources' probe gradients on two halves of each probe sample, the
        per-example probe losses of the same forward passes, per source)."""
        losses = [[] for _ in self.samples]
        grads_a = [sample_gradient(model, s[0::2], self.pad_id, self.eval_batch_size, losses[i])
                   for i, s in enumerate(self.samples)]
        grads_b = [sample_gradient(model, s[1::2], self.pad_id, self.eval_batch_size, losses[i])
                   for i, s in enumerate(self.samples)]
        return alignment_matrix(grads_a, grads_b), losses

    def _refresh(self, ctx: StepContext) -> None:
        alignment, losses = self.alignment(ctx.model) if self.mixing == "alignment" else (None, None)
        means, variances = self.measure(ctx.model, losses)  # the new frozen snapshot's scores
        signal = [m + self.var_coef * v for m, v in zip(means, variances)]
        hist, weights = self.state["history"], self.state["weights"]
        progress = [0.0] * len(means)
        if hist:
            prev = hist[-1]
            progress = [p - c for p, c in zip(prev["signal"], signal)]
            if self.mixing == "difficulty":
                weights = progress_update(weights, self._progress_used(progress), self.eta, self.floor,
                                          per_share=self.progress == "per_share", max_scale=self.max_scale)
            elif self.mixing == "bandit":
                rewards = [max(-1.0, min(1.0, (p - m) / p)) if p > 0 else 0.0 for p, m in zip(prev["mean"], means)]
                self.state["log_weights"], weights = exp3_update(self.state["log_weights"], weights, rewards,
                                                                 self.bandit_lr, self.bandit_gamma)
        if self.mixing == "hardest":
            weights = hardest_weights(signal, self.floor)
        if alignment is not None:  # predicted from gradients now: needs no previous refresh
            weights = alignment_update(weights, alignment, self.smoothing, self.floor)
        self.state["weights"] = weights
        validation = [sum(v) / len(v) for v in (per_example_loss(ctx.model, sample, self.pad_id, self.eval_batch_size)
                                                for sample in self.validation)]
        hist.append({"step": ctx.step, "mean": means, "variance": variances, "signal": signal,
                     "progress": progress, "weights": weights, **({"alignment": alignment} if alignment else {}),
                     **({"validation": validation} if validation else {})})
        self.plan.set_weights(weights)

    def _progress_used(self, progress: list[float]) -> list[float]:
        """Progress as the difficulty rule reads it: an exponential average over refreshes
        (`smoothing` = the weight of the past), and with `absolute` its magnitude -- absolute learning
        progress (Portelas et al. 2019): a source whose loss climbs back is being forgotten, and is
        given weight as one that learns is, instead of less and less as its loss rises."""
        if self.smoothing > 0:
            ema = self.state.get("progress_ema")
            if ema is not None:
                progress = [self.smoothing * e + (1 - self.smoothing) * x for e, x in zip(ema, progress)]
            self.state["progress_ema"] = progress
        return [abs(x) for x in progress] if self.absolute else progress

    def metrics(self) -> dict:
        last = self.state["history"][-1]
        out = {"curriculum/refreshes": float(len(self.state["history"]))}
        for i, n in enumerate(self.state["names"]):
            out[f"curriculum/weight/{n}"] = self.state["weights"][i]
            out[f"curriculum/difficulty/{n}"] = last["mean"][i]
            out[f"curriculum/variance/{n}"] = last["variance"][i]
            out[f"curriculum/progress/{n}"] = last["progress"][i]
            if "validation" in last:
                out[f"curriculum/validation/{n}"] = last["validation"][i]
        if "validation" in last:
            out["curriculum/validation/mean"] = sum(last["validation"]) / len(last["validation"])
        return out
