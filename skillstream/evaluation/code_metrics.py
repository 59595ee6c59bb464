"""`unit_tests`: does the model's Python pass the example's tests, run in the sandbox -- pass@k.

Each problem is answered `samples` times (greedy when 1, else sampled at temperature 0.8, as the
HumanEval paper does for pass@k with k > 1); every answer becomes a program (its ```python block,
or the whole answer; for HumanEval-style problems, those with an `entry_point`, after the problem's
own prompt, which is code) followed by the example's `tests`, and runs in
`skillstream.sandbox` with a wall-clock and memory limit. pass@k is the unbiased estimator of
Chen et al. (2021): 1 - C(n-c, k) / C(n, k) per problem, averaged.
"""
from __future__ import annotations

import re

import numpy as np

from ..data.examples import Example
from ..errors import UserError
from .generation import generate

CODE_BLOCK = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|\Z)", re.S)
SAMPLE_TEMPERATURE = 0.8


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n answers of which c passed (the numerically stable product form)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1 (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def program_for(answer: str, example: Example) -> str:
    """The program the sandbox runs for one answer: its code, then the example's tests."""
    m = CODE_BLOCK.search(answer)
    code = m.group(1) if m else answer
    if (example.meta or {}).get("entry_point") and example.prompt:
        # HumanEval-style problems: the prompt is code (imports, helpers, the signature and its
        # docstring). Put in front, it completes a body-only answer, and an answer that writes the
        # whole function simply redefines it -- with the prompt's imports (`List`, ...) in scope.
        code = example.prompt + code
    return f"{code}\n\n{example.meta['tests']}\n"


def passes(answer: str, example: Example, timeout_s: float = 5.0, memory_mb: int = 512) -> bool:
    from ..sandbox import run_python

    return run_python(program_for(answer, example), timeout_s=timeout_s, memory_mb=memory_mb).ok


def require_test_examples(task: str, examples: list[Example]) -> None:
    for ex in examples:
        if not (ex.meta or {}).get("tests"):
            raise UserError(f"data.eval[{task}]: {ex.where} has no 'tests' (Python asserts) for metric unit_tests")


def evaluate_unit_tests(model, tok, renderer, examples: list[Example], batch_size: int, max_new_tokens: int,
                        samples: int = 1) -> dict:
    prompts = [renderer.prompt_text(ex) for ex in examples]
    temperature = 0.0 if samples == 1 else SAMPLE_TEMPERATURE
    answers = [generate(model, tok, prompts, max_new_tokens, batch_size, temperature=temperature)
               for _ in range(samples)]
    passed = [sum(passes(answers[s][i], ex) for s in range(samples)) for i, ex in enumerate(examples)]
    out = {f"pass@{k}": sum(pass_at_k(samples, c, k) for c in passed) / len(examples)
           for k in (1, 10, 100) if k <= samples}
    out.update({"n": len(examples), "samples_per_problem": samples, "problems_solved": sum(c > 0 for c in passed),
                "outcomes": [pass_at_k(samples, c, 1) for c in passed],  # each problem's pass@1 (the score is their mean)
                "samples": [{"prompt": ex.prompt[:300], "output": answers[0][i][:300], "passed": passed[i]}
                            for i, ex in enumerate(examples[:5])]})
    return out
