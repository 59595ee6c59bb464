"""PPO on a language model, in the engine's one-batch-one-step loop (TRL's PPO, our own code).

One **rollout** = the engine's prompt batch: the current policy samples a response to each prompt
(KV cache, temperature, top-p, max_new_tokens; a generator seeded by (seed, rollout index), so
rollouts do not depend on the global RNG); the verifier rewards score each response; per-token
log-probabilities are computed for the policy and for the reference (`reference`, see
objectives/reference.py: by default the policy the stage starts from -- the backbone with the
adapter disabled for a fresh adapter, a frozen copy of the SFT adapter after SFT / `init_from`,
as TRL's reference; never a second copy of the backbone) -- and a per-token KL
penalty `-kl_coef * kl_t` (estimator `k1`: log p - log q, or `k3`: (q/p - 1) - log(q/p)) is added to
the rewards, the verifier score landing on the last generated token. A value head (a linear map of
the backbone's last hidden state, trained with the policy and checkpointed through
`extra_parameters()`) gives V(s_t) for every generated token, and GAE runs over the generated
tokens of each response (t = token index; gamma, lambda), not over the batch.

The rollout is a buffer of `ppo_epochs` x `num_mini_batches` minibatches (a fresh permutation of
the rollout per epoch); every engine call takes the next minibatch, computes the clipped policy
loss, the clipped value loss and the entropy bonus, and returns the loss; when the buffer is spent,
the next call rolls out on the prompt batch it receives (prompt batches that arrive while a buffer
is being consumed are not used). The buffer (tokens, old log-probs, values, advantages, returns),
its position, the rollout count and the KL coefficient ride in `state_dict()`, so a run killed
mid-buffer resumes exactly.

Exactness: the old log-probs and values are computed minibatch by minibatch in the order of the
first epoch, with the same function the loss uses, and PPO runs without dropout (as TRL), so on the
first minibatch of a rollout the ratio is exactly 1 and the clip fraction 0.

The adaptive KL controller (Ziegler et al. 2019, TRL's AdaptiveKLController): after each rollout,
`kl_coef *= 1 + clip(kl / kl_target - 1, -0.2, 0.2) * batch / kl_horizon`; without `kl_target` the
coefficient is fixed.

Logged (TRL's names): objective/kl, objective/entropy, objective/non_score_reward,
objective/rlhf_reward, objective/scores, objective/kl_coef, policy/clipfrac_avg,
policy/approxkl_avg, policy/entropy_avg, loss/policy_avg, loss/value_avg, val/clipfrac_avg,
val/ratio, val/num_eos_tokens, plus reward/<term> and objective/response_length. The
objective/* and reward/* values describe the latest rollout and repeat on its minibatch steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..data.batching import left_pad
from ..errors import UserError
from ..models.modes import eval_mode
from .base import Objective
from .lm import head_logits
from .reference import Reference
from .rewards import Sample, parse_rewards

KL_ESTIMATORS = ("k1", "k3")


# -- pieces with tests of their own ---------------------------------------------------------------
def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.
    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, >= 0)."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        logr = ref_logprobs - logprobs
        return torch.expm1(logr) - logr
    raise ValueError(f"unknown KL estimator {estimator!r}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns) over the generated tokens of each response: rows are responses, columns
    token positions; `mask` is 1 on generated tokens (the response ends at its last 1). After the
    last token the value is 0 (the episode ended)."""
    rewards, values = rewards * mask, values * mask
    n = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(n)):
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * mask
    return adv, adv + values


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> torch.Tensor:
    """(x - mean) / std over the masked entries. `total` sums a tensor over every process (several
    processes: each holds a slice of the rollout, and the mean and variance are the whole rollout's,
    as one process computes them); None: this process's entries are the whole rollout."""
    if total is None:
        mean = masked_mean(x, mask)
        n = mask.sum()
        var = masked_mean((x - mean) ** 2, mask) * (n / (n - 1).clamp(min=1))  # Bessel, as TRL
        return (x - mean) * torch.rsqrt(var + 1e-8) * mask
    s, n = total(torch.stack([(x * mask).sum(), mask.sum()]))
    mean = s / n.clamp(min=1)
    squares = total(((x - mean) ** 2 * mask).sum()[None])[0]
    var = squares / n.clamp(min=1) * (n / (n - 1).clamp(min=1))
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def over_processes() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Sum over the run's processes (accelerate's all-reduce), or None in a single process."""
    from accelerate import PartialState
    from accelerate.utils import reduce

    if PartialState().num_processes == 1:
        return None
    return lambda t: reduce(t, reduction="sum")


@dataclass
class KLController:
    """Fixed coefficient, or adaptive toward `target` (the KL summed over a response, in nats)."""
    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, current: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def sample_responses(model, input_ids, attention_mask, *, max_new_tokens: int, temperature: float, top_p: float,
                     stop_ids: list[int], pad_id: int, generator: torch.Generator | None) -> torch.Tensor:
    """Sample continuations of left-padded prompts with a KV cache; rows that have emitted a stop
    token are padded from then on. Returns (batch, generated length) token ids."""
    stops = torch.tensor(stop_ids, device=input_ids.device)
    position = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position, use_cache=True,
                logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    mask, next_pos = attention_mask, position[:, -1:] + 1
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    for t in range(max_new_tokens):
        tok = _pick(logits.float(), temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done = done | torch.isin(tok, stops)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                    use_cache=True)
        cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
    return torch.stack(tokens, 1)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def backbone_hidden_size(recipe, tokenizer) -> int:
    """The width of the backbone's last hidden state, read from its config (no weights loaded)."""
    name = recipe.model.name
    if name == "tiny":
        from ..models.backbone import tiny_config
        return tiny_config(len(tokenizer)).hidden_size
    from transformers import AutoConfig
    if name == "smollm2-135m":
        from ..models.backbone import smollm2_dir
        config = AutoConfig.from_pretrained(smollm2_dir())
    else:
        config = AutoConfig.from_pretrained(name, revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code)
    return config.get_text_config().hidden_size


@dataclass
class PromptItem:
    """What the batch plan holds for PPO: a prompt and the example that the rewards check against."""
    input_ids: list[int]
    example: object
    truncated: bool = False


DEFAULT_REWARDS = {"bash_structure": 1.0}


class PPOObjective(Objective):
    """Clipped PPO with a value head, GAE over generated tokens and a KL penalty to the reference.

    Arguments (recipe `objective: {name: ppo, ...}`; defaults follow TRL's PPOConfig where it has one):
      rewards            reward terms (see objectives/rewards.py), e.g. {bash_structure: 1.0}
      max_new_tokens     response budget (53 in TRL; 32 here)
      temperature, top_p sampling of rollouts (log-probs use the same temperature)
      ppo_epochs         passes over one rollout (4)
      num_mini_batches   minibatches per pass (1); one engine step = one minibatch
      gamma, lam         GAE discount and lambda (1.0, 0.95)
      cliprange          policy ratio clip (0.2);  cliprange_value: value clip (0.2)
      vf_coef            value-loss weight (0.1);  ent_coef: entropy bonus (0.0)
      kl_coef            KL penalty coefficient (0.05); kl_estimator: k1 | k3 (k1)
      kl_target          adaptive controller target in nats per response (null = fixed coefficient)
      kl_horizon         controller horizon (10000)
      reference          auto | base | adapter: what the KL is measured against (auto)
      whiten_advantages  normalise advantages over the rollout's tokens (true)
      missing_eos_penalty subtracted from the score of a response cut at max_new_tokens (null)
    """

    name = "ppo"

    def __init__(self, rewards=None, max_new_tokens: int = 32, temperature: float = 0.7, top_p: float = 1.0,
                 ppo_epochs: int = 4, num_mini_batches: int = 1, gamma: float = 1.0, lam: float = 0.95,
                 cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1, ent_coef: float = 0.0,
                 kl_coef: float = 0.05, kl_estimator: str = "k1", kl_target: float | None = None,
                 kl_horizon: int = 10000, whiten_advantages: bool = True, missing_eos_penalty: float | None = None,
                 reference: str = "auto", hidden_size: int | None = None, seed: int | None = None, tokenizer=None,
                 renderer=None, recipe=None, **context):
        where = "objective ppo"
        self.reference = Reference(reference, where)
        self.rewards = parse_rewards(rewards if rewards is not None else DEFAULT_REWARDS)
        checks = [(name, value) for name, value in (("max_new_tokens", max_new_tokens), ("ppo_epochs", ppo_epochs),
                                                    ("num_mini_batches", num_mini_batches), ("kl_horizon", kl_horizon))]
        for name, value in checks:
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"{where}: {name} must be a positive integer (got {value!r})")
        if not temperature > 0:
            raise UserError(f"{where}: temperature must be > 0: PPO needs sampled rollouts (got {temperature!r})")
        if not 0 < top_p <= 1:
            raise UserError(f"{where}: top_p must be in (0, 1] (got {top_p!r})")
        if kl_estimator not in KL_ESTIMATORS:
            raise UserError(f"{where}: kl_estimator must be one of {', '.join(KL_ESTIMATORS)} (got {kl_estimator!r})")
        if kl_target is not None and not kl_target > 0:
            raise UserError(f"{where}: kl_target must be > 0 or null (got {kl_target!r})")
        if kl_coef < 0:
            raise UserError(f"{where}: kl_coef must be >= 0 (got {kl_coef!r})")
        if recipe is not None and (not recipe.model.freeze_backbone or getattr(recipe, "lora", True) is None):
            raise UserError(f"{where}: needs a LoRA adapter on a frozen backbone (the reference is the backbone with the adapter disabled, or a frozen copy of the adapter)")
        self.tok, self.renderer = tokenizer, renderer
        smoke = bool(recipe is not None and recipe.smoke)
        self.max_new_tokens = min(max_new_tokens, 8) if smoke else max_new_tokens
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.ppo_epochs, self.num_mini_batches = ppo_epochs, num_mini_batches
        self.gamma, self.lam, self.cliprange, self.cliprange_value = gamma, lam, cliprange, cliprange_value
        self.vf_coef, self.ent_coef, self.kl_estimator = vf_coef, ent_coef, kl_estimator
        self.whiten_advantages, self.missing_eos_penalty = whiten_advantages, missing_eos_penalty
        self.kl = KLController(float(kl_coef), kl_target, kl_horizon)
        self.seed = seed if seed is not None else (recipe.seed if recipe is not None else 0)
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
        eos = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if tokenizer is not None else None
        self.stop_ids = sorted(set(eos + ([im_end] if isinstance(im_end, int) and im_end != tokenizer.unk_token_id else [])))
        if hidden_size is None:
            if recipe is None or tokenizer is None:
                raise UserError(f"{where}: give hidden_size, or build it from a recipe")
            hidden_size = backbone_hidden_size(recipe, tokenizer)
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.rollouts, self.pos, self.buffer, self.stats = 0, 0, None, {}

    # -- the objective protocol ------------------------------------------------------------------
    def tokenize(self, example, renderer) -> PromptItem:
        for term in self.rewards:
            problem = term.check(example)
            if problem:
                raise UserError(f"reward {term.name!r}: {problem}")
        ids = renderer.tok(renderer.prompt_text(example), add_special_tokens=True)["input_ids"]
        return PromptItem(ids[-renderer.max_length:], example, len(ids) > renderer.max_length)

    def collate(self, items: list[PromptItem], pad_id: int) -> dict:
        ids, mask = left_pad([t.input_ids for t in items], pad_id)  # every prompt ends where generation starts
        return {"input_ids": ids, "attention_mask": mask, "examples": [t.example for t in items]}

    def extra_parameters(self) -> dict:
        return {**dict(self.value_head.named_parameters(prefix="value_head")), **self.reference.parameters()}

    def begin_stage(self, model) -> None:
        """Called by the run before the optimizer is built (and before a checkpoint is loaded)."""
        size = getattr(getattr(model, "config", None), "hidden_size", None)
        if size is not None and size != self.value_head.in_features:
            raise UserError(f"objective ppo: value head width {self.value_head.in_features} != backbone hidden size {size}")
        self.value_head.to(next(model.parameters()).device)  # optimizer state is created where the head lives
        self.reference.begin(self._unwrap(model))

    def state_dict(self) -> dict:
        buf = None
        if self.buffer is not None:
            buf = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in self.buffer.items()}
        return {"rollouts": self.rollouts, "pos": self.pos, "kl_coef": self.kl.value, "stats": self.stats, "buffer": buf,
                **self.reference.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.rollouts, self.pos, self.kl.value, self.stats = state["rollouts"], state["pos"], state["kl_coef"], state["stats"]
        self.reference.load_state_dict(state)
        buf = state.get("buffer")
        if buf is None:
            self.buffer = None
            return
        longs = ("ids", "attention_mask")
        self.buffer = {k: (torch.tensor(v, dtype=torch.long if k in longs else torch.float32)
                           if k not in ("order", "prompt_width") else v) for k, v in buf.items()}

    def __call__(self, model, batch: dict):
        with eval_mode(model):  # no dropout: PPO's ratio compares two evaluations of the same function
            if self.buffer is None or self.pos >= len(self.buffer["order"]):
                self._rollout(model, batch)
            device = batch["input_ids"].device
            if self.buffer["ids"].device != device:
                self.buffer = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.buffer.items()}
            if self.value_head.weight.device != device:
                self.value_head.to(device)
            index = self.buffer["order"][self.pos]
            self.pos += 1
            loss, metrics = self._minibatch_loss(model, index)
        return loss, {**self.stats, **metrics}, None

    # -- forward passes --------------------------------------------------------------------------
    def _forward(self, model, ids, mask, prompt_width: int, values: bool = True):
        """(log-probs of the generated tokens, their entropies, V(s_t) or None), each (batch, gen length)."""
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        # the positions that predict the generated tokens
        logits, hidden, _ = head_logits(model, ids, mask, lambda t: t[:, prompt_width - 1:-1], position_ids=position,
                                        hidden=values)
        logp = torch.log_softmax(logits.float() / (self.temperature + 1e-7), -1)
        logprobs = logp.gather(-1, ids[:, prompt_width:, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        # float out: under bf16 autocast the head's matmul returns bf16, and the rollout buffers are float
        v = self.value_head(hidden.float()).float().squeeze(-1) if values else None
        return logprobs, entropy, v

    @staticmethod
    def _unwrap(model):
        return getattr(model, "module", model)

    @torch.no_grad()
    def _rollout(self, model, batch: dict) -> None:
        prompt, prompt_mask, examples = batch["input_ids"], batch["attention_mask"], batch["examples"]
        device, n = prompt.device, prompt.shape[0]
        gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self.rollouts)
        responses = sample_responses(model, prompt, prompt_mask, max_new_tokens=self.max_new_tokens,
                                     temperature=self.temperature, top_p=self.top_p, stop_ids=self.stop_ids,
                                     pad_id=self.pad_id, generator=gen)
        is_stop = torch.isin(responses, torch.tensor(self.stop_ids, device=device))
        after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0      # strictly after the first stop token
        responses = responses.masked_fill(after, self.pad_id)
        rmask = (~after).float()
        ids = torch.cat([prompt, responses], 1)
        attn = torch.cat([prompt_mask, rmask.long()], 1)
        width = prompt.shape[1]

        # minibatches of every epoch; old log-probs in the first epoch's order (exact ratio 1)
        order, cpu = [], torch.Generator().manual_seed(self.seed * 7_919 + self.rollouts)
        for _ in range(self.ppo_epochs):
            perm = torch.randperm(n, generator=cpu).tolist()
            size = -(-n // self.num_mini_batches)
            order += [perm[i:i + size] for i in range(0, n, size)]
        logprobs = torch.zeros_like(rmask)
        ref_logprobs, values = torch.zeros_like(rmask), torch.zeros_like(rmask)
        for index in order[:len(order) // self.ppo_epochs]:
            i = torch.tensor(index, device=device)
            lp, _, v = self._forward(model, ids[i], attn[i], width)
            logprobs[i], values[i] = lp, v
            with self.reference.active(self._unwrap(model)):
                ref_logprobs[i] = self._forward(model, ids[i], attn[i], width, values=False)[0]

        # rewards: verifier score on the last token, KL penalty on every token
        lengths = rmask.sum(1).long()
        samples = [Sample(self.tok.decode(responses[b, :lengths[b]].tolist(), skip_special_tokens=True),
                          responses[b, :lengths[b]].tolist(), examples[b], self.max_new_tokens,
                          bool(is_stop[b].any())) for b in range(n)]
        per_term = {t.name: torch.tensor([t(s) for s in samples], dtype=torch.float32, device=device)
                    for t in self.rewards}
        scores = sum(t.weight * per_term[t.name] for t in self.rewards)
        finished = is_stop.any(1)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~finished).float()
        kl = kl_per_token(logprobs, ref_logprobs, self.kl_estimator) * rmask
        non_score = -self.kl.value * kl
        rewards = non_score.clone()
        rewards[torch.arange(n, device=device), lengths - 1] += scores
        values = values * rmask
        advantages, returns = gae(rewards, values, rmask, self.gamma, self.lam)
        total = over_processes()  # several processes: each sampled its slice of the rollout's prompts
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, rmask, total)

        mean_kl = float(kl.sum(1).mean())
        rollout_size = n
        if total is not None:  # the KL controller follows the whole rollout's KL, alike on every process
            kl_sum, rollout_size = total(torch.tensor([float(kl.sum()), float(n)], dtype=torch.float64,
                                                      device=device)).tolist()
            mean_kl, rollout_size = kl_sum / rollout_size, int(rollout_size)
        self.stats = {
            "objective/kl": mean_kl,
            "objective/entropy": float((-logprobs * rmask).sum(1).mean()),
            "objective/non_score_reward": float(non_score.sum(1).mean()),
            "objective/rlhf_reward": float((scores + non_score.sum(1)).mean()),
            "objective/scores": float(scores.mean()),
            "objective/kl_coef": self.kl.value,
            "objective/response_length": float(rmask.sum(1).mean()),
            "objective/rollouts": float(self.rollouts + 1),
            "val/num_eos_tokens": float(finished.sum()),
            **{f"reward/{k}": float(v.mean()) for k, v in per_term.items()},
        }
        self.kl.update(mean_kl, rollout_size)
        self.buffer = {"ids": ids, "attention_mask": attn, "response_mask": rmask, "logprobs": logprobs,
                       "values": values, "advantages": advantages, "returns": returns, "order": order,
                       "prompt_width": width}
        self.rollouts += 1
        self.pos = 0

    def _minibatch_loss(self, model, index: list[int]):
        b = self.buffer
        i = torch.tensor(index, device=b["ids"].device)
        mask = b["response_mask"][i]
        old_logprobs, old_values, adv, ret = b["logprobs"][i], b["values"][i], b["advantages"][i], b["returns"][i]
        logprobs, entropy, vpred = self._forward(model, b["ids"][i], b["attention_mask"][i], b["prompt_width"])

        vclipped = old_values + (vpred - old_values).clamp(-self.cliprange_value, self.cliprange_value)
        vf_losses = torch.max((vpred - ret) ** 2, (vclipped - ret) ** 2)
        vf_loss = 0.5 * masked_mean(vf_losses, mask)
        vf_clipfrac = masked_mean(((vclipped - ret) ** 2 > (vpred - ret) ** 2).float(), mask)

        logratio = (logprobs - old_logprobs) * mask
        ratio = torch.exp(logratio)
        pg_losses = -adv * ratio
        pg_losses2 = -adv * ratio.clamp(1.0 - self.cliprange, 1.0 + self.cliprange)
        pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
        entropy_mean = masked_mean(entropy, mask)
        loss = pg_loss + self.vf_coef * vf_loss - self.ent_coef * entropy_mean
        with torch.no_grad():
            metrics = {
                "policy/clipfrac_avg": float(masked_mean((pg_losses2 > pg_losses).float(), mask)),
                "policy/approxkl_avg": float(0.5 * masked_mean(logratio ** 2, mask)),
                "policy/entropy_avg": float(entropy_mean),
                "loss/policy_avg": float(pg_loss),
                "loss/value_avg": float(vf_loss),
                "val/clipfrac_avg": float(vf_clipfrac),
                "val/ratio": float(masked_mean(ratio, mask)),
            }
        return loss, metrics
