"""Score a model on one evaluation task: option accuracy, exact match, bash, or perplexity."""
from __future__ import annotations

import math
import re

import torch

from ..data.batching import collate
from ..data.examples import Example
from ..data.render import Renderer
from .option_scoring import score_options


def normalize_text(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().strip(".").lower()


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
             temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
    """Batched decoding with a KV cache (greedy unless temperature > 0); returns the new text only,
    in the order of `prompts`. Prompts are batched by length (longest first), so a batch pads little:
    tool-call prompts differ by hundreds of tokens of schemas, and padding is computed like tokens."""
    old_side, tok.padding_side = tok.padding_side, "left"
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=True)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outs: list[str | None] = [None] * len(prompts)
    try:
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            enc = tok([prompts[j] for j in idx], return_tensors="pt", padding=True, add_special_tokens=True).to(model.device)
            kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
            for j, text in zip(idx, tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
                outs[j] = text
    finally:
        tok.padding_side = old_side
    return outs


def _accuracy(model, tok, renderer: Renderer, examples: list[Example], batch_size: int) -> dict:
    correct, samples = 0, []
    by_options: dict[tuple, list[Example]] = {}
    for ex in examples:
        by_options.setdefault(tuple(ex.options), []).append(ex)
    for options, group in by_options.items():
        opt_ids = [tok(renderer.answer_text(group[0], o), add_special_tokens=False)["input_ids"] for o in options]
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            prompts = [tok(renderer.prompt_text(ex), add_special_tokens=True)["input_ids"] for ex in chunk]
            best = score_options(model, prompts, opt_ids, tok.pad_token_id).argmax(-1)
            for ex, b in zip(chunk, best.tolist()):
                correct += options[b] == ex.completion
                if len(samples) < 5:
                    samples.append({"prompt": ex.prompt[:300], "predicted": options[b], "label": ex.completion})
    return {"accuracy": correct / len(examples), "samples": samples}


def _generative(model, tok, renderer, examples, batch_size, max_new_tokens, bash: bool) -> dict:
    outputs = generate(model, tok, [renderer.prompt_text(ex) for ex in examples], max_new_tokens, batch_size)
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
    return {"exact_match": sum(em) / len(em), **extra, "samples": samples}


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
               "preference": "preference_accuracy", "unit_tests": "pass@1"}


def evaluate_examples(model, tok, renderer: Renderer, examples: list[Example], metric: str,
                      batch_size: int = 8, max_new_tokens: int = 64, samples: int = 1) -> dict:
    """Returns {'score': main number, 'metric': name, ...details}; the model is put in eval mode."""
    was_training = model.training
    model.eval()
    try:
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
        elif metric == "preference":  # held-out pairs: does the model rank chosen above rejected
            from .preference import evaluate_preferences
            out = evaluate_preferences(model, tok, renderer, examples, batch_size)
        else:
            out = _perplexity(model, renderer, examples, batch_size, tok.pad_token_id)
    finally:
        model.train(was_training)
    main = MAIN_METRIC[metric]
    return {"score": out[main], "metric": main, **out}
