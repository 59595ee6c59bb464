"""Preference pairs from a verifier: sample answers, check them, pair a pass with a fail.

For each prompt (a tool-calling conversation with an answer key, e.g. the builtin ``bfcl``
source) the current model samples ``k`` answers (temperature > 0, seeded, so the same model and
seed give the same pairs); each answer is checked by the BFCL AST checker
(:func:`skillstream.evaluation.tool_metrics.score_outputs`). A passing answer becomes ``chosen``
and a failing one ``rejected`` (up to ``pairs_per_prompt`` pairs, distinct answers only). When no
sample passes and ``gold_fallback`` is on, the reference answer of the data is ``chosen`` (marked
``chosen_source: gold``); prompts with no failing sample give no pair.

``min_margin`` keeps only pairs whose preference is strong enough (MUSE's
``preference_strength_threshold``): each answer gets a verifier score in [0, 1] -- 1 when it passes
the AST check, else half its BFCL-AST argument credit (``argument_accuracy``; 0 for a malformed
answer and for a call where no function fits) -- and a pair is kept when chosen's score minus
rejected's is at least ``min_margin``. A pair whose rejected answer called the right function with
most arguments right is a weak preference; one whose rejected answer is malformed is a strong one.
The gap is stored in the row (``score_margin``); the pairs dropped are counted (``dropped_margin``)
and printed, and a threshold that drops every pair stops the run in one line.

Rows are TRL's conversational preference format plus the ``tools`` column::

    {"prompt": [messages], "chosen": [{"role": "assistant", "tool_calls": [...]}],
     "rejected": [{"role": "assistant", "content": "..."}], "tools": [...], "id": ..., "category": ...,
     "chosen_source": "sample" | "gold", "rejected_error": "value_error" | "format" | ...,
     "score_margin": 0.75}

An answer is stored as ``tool_calls`` when it parses cleanly and names only known tools, else as
its raw text (a call to an unknown tool is counted in the summary, not raised: generated data is
counted and reported). Rows of ``merge`` files (user-provided preference data) are checked like
any data source -- errors name their file and row -- and appended.

Used as a stage data builder (``data.train[].build: {name: verifier_pairs, ...}``) or directly.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import SourceConfig
from ..data.examples import load_examples
from ..data.readers import read_split
from ..data.tool_chat import tool_names
from ..errors import UserError
from ..evaluation.tool_ast import argument_accuracy
from ..evaluation.tool_metrics import answer_key, score_outputs
from ..files import write_jsonl
from ..tools.calls import calls_to_message, parse_model_output


def verifier_score(text: str, passed: bool, ex) -> float:
    """An answer's verifier score in [0, 1] (see the module doc): 1 if it passes, else half its
    BFCL-AST argument credit (0 when malformed or when no function fits the request)."""
    if passed:
        return 1.0
    parsed = parse_model_output(text)
    functions, ground_truth, category = answer_key(ex)
    if parsed.format_errors or "irrelevance" in category or not ground_truth:
        return 0.0
    return 0.5 * argument_accuracy(parsed.calls, functions, ground_truth)


def _answer_message(text: str, known: set[str]) -> tuple[dict, bool]:
    """(assistant message, whether it named an unknown tool)."""
    parsed = parse_model_output(text)
    if parsed.calls and not parsed.format_errors:
        if all(c.name in known for c in parsed.calls):
            return calls_to_message(parsed.calls), False
        return {"role": "assistant", "content": text.strip()}, True
    return {"role": "assistant", "content": text.strip()}, False


def sample_answers(model, tok, renderer, examples, k: int, temperature: float, top_p: float,
                   max_new_tokens: int, seed: int, batch_size: int) -> list[list[str]]:
    """k sampled answers per example, reproducible for a given seed (the global RNG is left alone)."""
    from ..evaluation.generation import generate

    prompts = [renderer.prompt_text(ex) for ex in examples for _ in range(k)]
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        outs = generate(model, tok, prompts, max_new_tokens, batch_size, temperature=temperature, top_p=top_p)
    return [outs[i * k:(i + 1) * k] for i in range(len(examples))]


def build_pairs(examples, samples: list[list[str]], pairs_per_prompt: int = 1, gold_fallback: bool = True,
                min_margin: float = 0.0):
    """Pair rows from sampled answers (see the module doc) and counts for the summary."""
    rows, counts = [], {"prompts": len(examples), "samples": 0, "passed": 0, "pairs": 0, "gold_chosen": 0,
                        "no_failing": 0, "no_passing": 0, "unknown_tool": 0, "identical": 0,
                        "dropped_margin": 0}
    for ex, outs in zip(examples, samples):
        scored = score_outputs(outs, [ex] * len(outs))["per_example"]
        counts["samples"] += len(outs)
        counts["passed"] += sum(r["passed"] for r in scored)
        known = tool_names(ex.tools or [])
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        passes, fails, seen = [], [], set()
        for text, r in zip(outs, scored):
            key = text.strip()
            if key in seen:
                continue
            seen.add(key)
            message, unknown = _answer_message(text, known)
            counts["unknown_tool"] += unknown
            score = verifier_score(text, r["passed"], ex)
            (passes if r["passed"] else fails).append((message, r["error_kind"], score))
        source = "sample"
        if not passes and gold_fallback:
            passes, source = [(ex.messages[last], None, 1.0)], "gold"
        if not passes:
            counts["no_passing"] += 1
            continue
        if not fails:
            counts["no_failing"] += 1
            continue
        made = 0
        for i, (rejected, error, rejected_score) in enumerate(fails[:pairs_per_prompt]):
            chosen, _, chosen_score = passes[i % len(passes)]
            if chosen == rejected:
                counts["identical"] += 1
                continue
            margin = chosen_score - rejected_score
            if margin < min_margin:
                counts["dropped_margin"] += 1
                continue
            rows.append({"prompt": ex.messages[:last], "chosen": [chosen], "rejected": [rejected],
                         "tools": ex.tools, "id": ex.meta.get("id"), "category": ex.meta.get("category"),
                         "chosen_source": source, "rejected_error": error, "score_margin": round(margin, 6)})
            made += 1
        counts["pairs"] += made
        counts["gold_chosen"] += made if source == "gold" else 0
    counts["pass_rate"] = counts["passed"] / max(counts["samples"], 1)
    if counts["dropped_margin"] and not counts["pairs"]:
        raise UserError(f"builder verifier_pairs: min_margin {min_margin} dropped every pair ({counts['dropped_margin']}): "
                        "no pair's verifier score gap reaches it; lower min_margin (gaps are in [0, 1]; see "
                        "objectives/preference_pairs.py)")
    return rows, counts


def verifier_pairs(out: str | Path, *, model, tokenizer, renderer, recipe=None, prompts: str = "bfcl",
                   split: str = "train", limit: int | None = None, k: int = 4, temperature: float = 1.0,
                   top_p: float = 1.0, max_new_tokens: int = 128, seed: int | None = None, pairs_per_prompt: int = 1,
                   gold_fallback: bool = True, merge: list[str] | None = None, batch_size: int = 16,
                   min_margin: float = 0.0) -> dict:
    """Write verifier-built preference pairs to ``out`` (JSONL); returns the counts.

    ``prompts``/``split``/``limit``: the tool-calling source sampled from (any source whose
    examples the ``tool_call`` metric can check). ``min_margin``: the least verifier score gap a
    kept pair has (see the module doc). Under ``--smoke`` at most 4 prompts, 2 samples each, 16
    new tokens."""
    if temperature <= 0:
        raise UserError("builder verifier_pairs: temperature must be > 0 (the k samples must differ)")
    if not 0 <= min_margin <= 1:
        raise UserError(f"builder verifier_pairs: min_margin must be in [0, 1] (a verifier score gap; got {min_margin!r})")
    if recipe is not None and recipe.smoke:
        limit, k, max_new_tokens = min(limit or 4, 4), min(k, 2), min(max_new_tokens, 16)
    examples = load_examples(SourceConfig(source=prompts, split=split, limit=limit))
    seed = seed if seed is not None else (recipe.seed if recipe is not None else 0)
    samples = sample_answers(model, tokenizer, renderer, examples, k, temperature, top_p, max_new_tokens, seed, batch_size)
    rows, counts = build_pairs(examples, samples, pairs_per_prompt, gold_fallback, min_margin)
    if min_margin > 0:
        made = counts["pairs"] + counts["dropped_margin"]
        print(f"builder verifier_pairs: min_margin {min_margin} dropped {counts['dropped_margin']} of {made} pairs "
              "(verifier score gap below it)", flush=True)
    merged = 0
    for path in merge or []:
        load_examples(SourceConfig(source=str(path), format="preference"))  # check: errors name their file/row
        extra = [r.data for r in read_split(str(path), "train")]
        rows += extra
        merged += len(extra)
    counts["merged"] = merged
    write_jsonl(Path(out), rows)
    return counts
