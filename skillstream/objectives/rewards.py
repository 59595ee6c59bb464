"""Rewards for RL on generated answers: verifiers (did the answer do the task?) and shaping terms.

A reward is `fn(sample, **params) -> float` on one generated response; the PPO objective sums
`weight * fn(...)` over the terms a recipe lists:

    rewards: {bash_structure: 1.0, bash_exact: 1.0, repetition: 0.2}
    rewards: [{name: token_fraction, weight: 1.0, token_ids: [42]}]

Verifiers (0..1, higher is better):
  exact_match      the answer equals a reference (whitespace, case and a final '.' ignored)
  bash_exact       the command (first of the answer) equals a gold command after normalisation
  bash_structure   similarity of the command's utilities and flags to the closest gold command
  tool_ast         the answer's tool calls pass BFCL's AST rules (examples with functions/ground truth)
  unit_tests       the answer's Python code passes the example's tests (`meta.tests`) in the sandbox
Shaping terms (signed so that a positive weight encourages what the name says is good):
  repetition       minus the share of token n-grams that repeat an earlier one (n=3)
  length           minus |tokens - target| / max_new_tokens (minus tokens / max_new_tokens without a target)
  token_fraction   share of generated tokens among `token_ids` (a reward that is easy to game: tests)

`check(example)` of a verifier says, before any training, why an example cannot be scored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UserError


@dataclass
class Sample:
    text: str                 # the decoded response (special tokens dropped)
    token_ids: list[int]      # the response tokens, up to and including the stop token
    example: Any              # the data.examples.Example it answers
    max_new_tokens: int
    finished: bool            # ended with a stop token (not cut at max_new_tokens)


# -- verifiers ------------------------------------------------------------------------------------
def _needs_references(ex) -> str | None:
    return None if ex.references else f"{ex.where}: no reference answer to compare with"


def exact_match(s: Sample) -> float:
    from ..evaluation.runner import normalize_text
    return float(any(normalize_text(s.text) == normalize_text(r) for r in s.example.references))


def bash_exact(s: Sample) -> float:
    from ..evaluation.bash import bash_exact_match, extract_command
    return float(bash_exact_match(extract_command(s.text), s.example.references))


def bash_structure(s: Sample) -> float:
    from ..evaluation.bash import bash_structure_score, extract_command
    return float(bash_structure_score(extract_command(s.text), s.example.references))


def _needs_answer_key(ex) -> str | None:
    from ..evaluation.tool_metrics import answer_key
    try:
        answer_key(ex)
    except UserError as e:
        return str(e)
    return None


def tool_ast(s: Sample) -> float:
    from ..evaluation.tool_ast import check
    from ..evaluation.tool_metrics import answer_key
    from ..tools.calls import parse_model_output

    functions, ground_truth, category = answer_key(s.example)
    parsed = parse_model_output(s.text)
    return float(not parsed.format_errors and check(parsed.calls, functions, ground_truth, category).valid)




def _needs_tests(ex) -> str | None:
    return None if (ex.meta or {}).get("tests") else f"{ex.where}: unit_tests needs a 'tests' column (Python asserts)"


def unit_tests(s: Sample, timeout_s: float = 5.0, memory_mb: int = 512) -> float:
    from ..evaluation.code_metrics import passes

    return float(passes(s.text, s.example, timeout_s, memory_mb))


# -- shaping ----------------------------------------------------------------------------------------
def repetition(s: Sample, n: int = 3) -> float:
    grams = [tuple(s.token_ids[i:i + n]) for i in range(len(s.token_ids) - n + 1)]
    if not grams:
        return 0.0
    return -(len(grams) - len(set(grams))) / len(grams)


def length(s: Sample, target: int | None = None) -> float:
    n = len(s.token_ids)
    return -(abs(n - target) if target is not None else n) / max(s.max_new_tokens, 1)


def token_fraction(s: Sample, token_ids: list[int] = ()) -> float:
    wanted = set(token_ids)
    return sum(t in wanted for t in s.token_ids) / max(len(s.token_ids), 1)


# name -> (function, check(example) -> error or None)
REWARDS: dict[str, tuple[Callable[..., float], Callable | None]] = {
    "exact_match": (exact_match, _needs_references),
    "bash_exact": (bash_exact, _needs_references),
    "bash_structure": (bash_structure, _needs_references),
    "tool_ast": (tool_ast, _needs_answer_key),
    "unit_tests": (unit_tests, _needs_tests),
    "repetition": (repetition, None),
    "length": (length, None),
    "token_fraction": (token_fraction, None),
}


@dataclass
class RewardTerm:
    name: str
    weight: float
    params: dict

    def __call__(self, sample: Sample) -> float:
        return REWARDS[self.name][0](sample, **self.params)

    @property
    def is_verifier(self) -> bool:
        """Scores the task (it checks examples against a reference, answer key or tests); shaping terms do not."""
        return REWARDS[self.name][1] is not None

    def check(self, example) -> str | None:
        check = REWARDS[self.name][1]
        return check(example) if check else None


def parse_rewards(spec, where: str = "objective ppo: rewards") -> list[RewardTerm]:
    """A mapping {name: weight | {weight, **params}} or a list of {name, weight, **params}."""
    if isinstance(spec, dict):
        items = [{"name": k, **(v if isinstance(v, dict) else {"weight": v})} for k, v in spec.items()]
    elif isinstance(spec, list):
        items = [{"name": x} if isinstance(x, str) else x for x in spec]
    else:
        raise UserError(f"{where}: expected a mapping of reward name to weight, or a list (got {spec!r})")
    terms = []
    for item in items:
        if not isinstance(item, dict) or "name" not in item:
            raise UserError(f"{where}: each reward needs a name (got {item!r})")
        item = dict(item)
        name = item.pop("name")
        if name not in REWARDS:
            raise UserError(f"{where}: unknown reward {name!r} (known: {', '.join(sorted(REWARDS))})")
        weight = item.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise UserError(f"{where}: weight of {name!r} must be a number (got {weight!r})")
        import inspect
        allowed = set(inspect.signature(REWARDS[name][0]).parameters) - {"s"}
        unknown = set(item) - allowed
        if unknown:
            raise UserError(f"{where}: reward {name!r} has no parameter {sorted(unknown)[0]!r} (has: {sorted(allowed) or 'none'})")
        terms.append(RewardTerm(name, float(weight), item))
    if not terms:
        raise UserError(f"{where}: no reward given")
    return terms
