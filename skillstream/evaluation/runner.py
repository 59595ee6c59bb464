"""Score a model on one evaluation task: option accuracy, exact match, bash, or perplexity."""
from __future__ import annotations

import math
import re

import torch

from ..data.batching import collate
from ..data.examples import Example
from ..data.render import Renderer
from ..models.modes import eval_mode
from .generation import generate, generate_and_score
from .intervals import with_interval
from .option_scoring import score_options
from .precision import eval_autocast


def normalize_text(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().strip(".").lower()


def _option_groups(tok, renderer: Renderer, examples: list[Example]):
    """(options, the indices of the examples that share them, each option's answer tokens), per option list."""
    by_options: dict[tuple, list[int]] = {}
    for i, ex in enumerate(examples):
        by_options.setdefault(tuple(ex.options), []).append(i)
    for options, indices in by_options.items():
        first = examples[indices[0]]
        yield options, indices, [tok(renderer.answer_text(first, o), add_special_tokens=False)["input_ids"] for o in options]


def _accuracy(model, tok, renderer: Renderer, examples: list[Example], batch_size: int) -> dict:
    outcomes, samples = [0] * len(examples), []
    for options, indices, opt_ids in _option_groups(tok, renderer, examples):
        prompts = {k: tok(renderer.prompt_text(examples[k]), add_special_tokens=True)["input_ids"] for k in indices}
        by_length = sorted(indices, key=lambda k: -len(prompts[k]))  # batches of like lengths pad little
        predicted = {}
        for i in range(0, len(by_length), batch_size):
            chunk = by_length[i:i + batch_size]
            best = score_options(model, [prompts[k] for k in chunk], opt_ids, tok.pad_token_id).argmax(-1)
            predicted.update(zip(chunk, best.tolist()))
        for k in indices:  # in the examples' order, as the samples were always listed
            ex, b = examples[k], predicted[k]
            outcomes[k] = int(options[b] == ex.completion)
            if len(samples) < 5:
                samples.append({"prompt": ex.prompt[:300], "predicted": options[b], "label": ex.completion})
    return {"accuracy": sum(outcomes) / len(examples), "outcomes": outcomes, "samples": samples}


def _exact_match_and_accuracy(model, tok, renderer, examples, batch_size, max_new_tokens) -> tuple[dict, float]:
    """Generative exact match and option-scoring accuracy from one prefill per batch (see generate_and_score)."""
    outputs, correct = [None] * len(examples), 0
    for options, group, opt_ids in _option_groups(tok, renderer, examples):
        texts, scores = generate_and_score(model, tok, [renderer.prompt_text(examples[i]) for i in group], max_new_tokens,
                                           batch_size, options=opt_ids)
        for i, text, best in zip(group, texts, scores.argmax(-1).tolist()):
            outputs[i] = text
            correct += options[best] == examples[i].completion
    return _score_generated(examples, outputs, bash=False), correct / len(examples)


def _generative(model, tok, renderer, examples, batch_size, max_new_tokens, bash: bool) -> dict:
    outputs = generate(model, tok, [renderer.prompt_text(ex) for ex in examples], max_new_tokens, batch_size)
    return _score_generated(examples, outputs, bash)


def _score_generated(examples, outputs: list[str], bash: bool) -> dict:
    if bash:
        from .bash import bash_exact_match, bash_structure_score, extract_command
        preds = [extract_command(o) for o in outputs]
        em = [bash_exact_match(p, ex.references) for p, ex in zip(preds, examples)]
        structure = [bash_structure_score(p, ex.references) for p, ex in zip(preds, examples)]
        from .task_metrics import bash_extras
        extra = {"structure": sum(structure) / len(structure), **bash_extras(outputs, preds)}
    else:
        preds = [o.strip() for o in outputs]
        em = [any(normalize_text(p) == normalize_text(r) for r in ex.references) for p, ex in zip(preds, examples)]
        extra = {}
    samples = [{"prompt": ex.prompt[:300], "output": o[:300], "references": ex.references[:2]}
               for ex, o in zip(examples[:5], outputs[:5])]
    return {"exact_match": sum(em) / len(em), **extra, "outcomes": [int(e) for e in em], "samples": samples}


def _perplexity(model, renderer: Renderer, examples, batch_size, pad_id) -> dict:
    nll, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in
                 collate([renderer.tokenize(ex) for ex in examples[i:i + batch_size]], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="sum", ignore_index=-100)
        nll += lp.item()
        count += (labels != -100).sum().item()
    return {"perplexity": math.exp(nll / max(count, 1)), "nll": nll / max(count, 1)}


MAIN_METRIC = {"accuracy": "accuracy", "exact_match": "exact_match", "bash": "exact_match", "perplexity": "perplexity",
               "tool_call": "ast_accuracy", "function_call": "ast_accuracy", "final_answer": "exact_match",
               "preference": "preference_accuracy", "unit_tests": "pass@1", "tool_workflow": "workflow_success",
               "tool_use": "answer_accuracy"}


def evaluate_examples(model, tok, renderer: Renderer, examples: list[Example], metric: str,
                      batch_size: int = 8, max_new_tokens: int = 64, samples: int = 1,
                      also: tuple[str, ...] | list[str] = (), memo=None) -> dict:
    """Returns {'score': main number, 'metric': name, ...details}; the model is put in eval mode.

    `also`: further protocols scored on the same examples, in 'protocols' ({metric name: score}).
    Exact match with option scoring beside it (the continual-learning pair) shares each prompt's
    prefill between the two. `memo` (evaluation/memo.py: EvalMemo): an evaluation the same weights
    already made on the same inputs is returned from it, marked "memo": true."""
    if memo is not None:
        return memo.evaluate(lambda: evaluate_examples(model, tok, renderer, examples, metric, batch_size,
                                                       max_new_tokens, samples, also),
                             model, tok, renderer, examples, metric, batch_size, max_new_tokens, samples, also)
    extra = [m for m in also if m != metric]
    if metric == "exact_match" and "accuracy" in extra and examples and all(ex.options for ex in examples):
        with torch.no_grad(), eval_mode(model), eval_autocast(model):  # the run's precision (precision.py)
            out, accuracy = _exact_match_and_accuracy(model, tok, renderer, examples, batch_size, max_new_tokens)
        row = {"score": out["exact_match"], "metric": "exact_match", **out, "protocols": {"accuracy": accuracy}}
        extra.remove("accuracy")
    else:
        row = _evaluate_one(model, tok, renderer, examples, metric, batch_size, max_new_tokens, samples)
    for m in extra:
        other = _evaluate_one(model, tok, renderer, examples, m, batch_size, max_new_tokens, 1)
        row.setdefault("protocols", {})[other["metric"]] = other["score"]
    return with_interval(row)


def _evaluate_one(model, tok, renderer: Renderer, examples: list[Example], metric: str,
                  batch_size: int, max_new_tokens: int, samples: int) -> dict:
    with torch.no_grad(), eval_mode(model), eval_autocast(model):  # the run's precision (precision.py)
        if metric == "accuracy":
            out = _accuracy(model, tok, renderer, examples, batch_size)
        elif metric in ("exact_match", "bash"):
            out = _generative(model, tok, renderer, examples, batch_size, max_new_tokens, bash=metric == "bash")
        elif metric in ("function_call", "final_answer"):  # see evaluation/task_metrics.py
            from .task_metrics import evaluate_generated
            out = evaluate_generated(metric, model, tok, renderer, examples, batch_size, max_new_tokens)
        elif metric == "tool_call":  # format, tool selection, AST argument and irrelevance accuracy
            from .tool_metrics import evaluate_tool_calls
            out = evaluate_tool_calls(model, tok, renderer, examples, batch_size, max_new_tokens)
        elif metric == "unit_tests":  # pass@k of the model's Python in the sandbox (HumanEval)
            from .code_metrics import evaluate_unit_tests
            out = evaluate_unit_tests(model, tok, renderer, examples, batch_size, max_new_tokens, samples)
        elif metric == "tool_workflow":  # multi-step tool dialogues, step by step (evaluation/tool_workflow.py)
            from .tool_workflow import evaluate_workflows
            out = evaluate_workflows(model, tok, renderer, examples, batch_size, max_new_tokens)
        elif metric == "tool_use":  # arithmetic with the calculator run between turns (evaluation/tool_use.py)
            from .tool_use import evaluate_tool_use
            out = evaluate_tool_use(model, tok, renderer, examples, batch_size, max_new_tokens)
        elif metric == "preference":  # held-out pairs: does the model rank chosen above rejected
            from .preference import evaluate_preferences
            out = evaluate_preferences(model, tok, renderer, examples, batch_size)
        else:
            out = _perplexity(model, renderer, examples, batch_size, tok.pad_token_id)
    main = MAIN_METRIC[metric]
    return {"score": out[main], "metric": main, **out}
