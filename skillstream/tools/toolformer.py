"""Toolformer-style augmentation (Schick et al., 2023): the model annotates text with tool calls
that help it predict what follows, and only calls that help are kept.

For each text and each tool:

1. **Positions.** The text is rewritten after a few-shot prompt that shows the tool used inline
   (``Tool.prompt()`` + ``Input: TEXT\nOutput: ``; the conversation of a chat row is not shown here). One forward pass gives, at every word boundary of the text, the probability
   that the model opens a call there (the token `` <`` that starts `` <tool>``); the ``positions``
   most likely boundaries with probability >= ``threshold`` are candidates.
2. **Calls.** At each candidate the model continues ``... <tool>`` ``samples`` times (sampling,
   seeded) until ``</tool>``; what it wrote is parsed as a call (ast, literals only: nothing the
   model writes is evaluated) and must name this tool.
3. **Execution.** The call runs on a real executor: ``calculator`` (a safe arithmetic evaluator:
   numbers, + - * / // % **, a few math functions, bounded sizes), ``python`` (the sandbox of
   :mod:`skillstream.sandbox`: separate process, time/memory/process limits, no network),
   ``search`` (BM25 over the paragraphs of Python's own documentation, ``pydoc_data.topics``,
   or over a document list you give). Failing calls are dropped (and counted).
4. **Filter.** With ``L(prefix)`` the weighted loss of the next tokens of the text after
   ``prefix`` (weights ``max(0, 1 - 0.2 t)`` over the next tokens, normalised, as in the paper),
   the call's utility is ``min(L(x[:i]), L(x[:i] + call without result)) - L(x[:i] + call +
   result)``; the call is kept when utility >= ``tau``. (The paper puts the call before the whole
   text for speed; here it is inline, where it will be at training time.) Losses are computed
   without the few-shot prompt.
5. Kept calls (the best per position, at most ``max_calls`` per text) are inserted as
   `` <tool>NAME(ARG=VALUE)</tool><result>RESULT</result>`` before the word they help predict.

Output rows (JSONL): ``original_text``, ``augmented_text`` (the original is the augmented text with
the markup removed), ``tool_calls``: ``[{name, arguments, position (character offset in the
original text), result, utility}]``, and ``stats`` (candidates proposed, parsed, executed, kept).
Input rows have ``text`` (or ``original_text``), or ``messages``: then each assistant turn's
content is augmented with the conversation before it as context, and the row also gets the
augmented ``messages``; ``tool_calls`` entries carry the ``turn`` index.
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..files import write_jsonl
from .calls import ToolCall, parse_payload, render_call


class ToolError(Exception):
    """A call that cannot be executed (bad arguments, failed run): the candidate is dropped."""


# -- calculator ----------------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_FUNCS = {"sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp, "sin": math.sin,
          "cos": math.cos, "tan": math.tan, "abs": abs, "round": round, "min": min, "max": max}
_CONSTS = {"pi": math.pi, "e": math.e}
MAX_EXPRESSION = 200
MAX_MAGNITUDE = 1e100


def _num(node: ast.AST, depth: int = 0):
    if depth > 50:
        raise ToolError("expression nested too deeply")
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _num(node.operand, depth + 1)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _num(node.left, depth + 1), _num(node.right, depth + 1)
        if isinstance(node.op, ast.Pow) and (abs(b) > 1000 or (abs(a) > 1 and abs(b) * math.log10(abs(a)) > 100)):
            raise ToolError("power too large")
        try:
            v = _BINOPS[type(node.op)](a, b)
        except (ZeroDivisionError, OverflowError, ValueError) as e:
            raise ToolError(str(e)) from None
        if isinstance(v, complex) or abs(v) > MAX_MAGNITUDE:
            raise ToolError("result out of range")
        return v
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
        args = [_num(a, depth + 1) for a in node.args]
        try:
            return _FUNCS[node.func.id](*args)
        except (TypeError, ValueError, OverflowError) as e:
            raise ToolError(str(e)) from None
    raise ToolError(f"not arithmetic: {ast.unparse(node)[:40]}")


def calculate(expression: str) -> str:
    """Evaluate arithmetic safely (ast, numbers and a few functions only); the result as text."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION:
        raise ToolError("expression must be a string of at most 200 characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*").replace("x", "*")
                         if re.fullmatch(r"[\d\s.x×^()+\-*/%]+", expression) else expression, mode="eval")
    except SyntaxError as e:
        raise ToolError(f"cannot parse: {e.msg}") from None
    value = _num(tree.body)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.6g}"
    return str(value)


# -- search (BM25) -------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9_]+")


class BM25:
    """Okapi BM25 (k1=1.5, b=0.75) over a list of documents."""

    def __init__(self, docs: list[str], k1: float = 1.5, b: float = 0.75):
        self.docs, self.k1, self.b = docs, k1, b
        self.terms = [_WORD.findall(d.lower()) for d in docs]
        self.avgdl = sum(len(t) for t in self.terms) / max(len(docs), 1)
        df: dict[str, int] = {}
        self.tf = []
        for terms in self.terms:
            counts: dict[str, int] = {}
            for t in terms:
                counts[t] = counts.get(t, 0) + 1
            self.tf.append(counts)
            for t in counts:
                df[t] = df.get(t, 0) + 1
        n = len(docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: str) -> list[float]:
        q = _WORD.findall(query.lower())
        out = []
        for counts, terms in zip(self.tf, self.terms):
            s, norm = 0.0, self.k1 * (1 - self.b + self.b * len(terms) / self.avgdl)
            for t in q:
                f = counts.get(t)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + norm)
            out.append(s)
        return out

    def search(self, query: str, k: int = 1) -> list[tuple[float, str]]:
        ranked = sorted(zip(self.scores(query), self.docs), key=lambda p: -p[0])
        return [(s, d) for s, d in ranked[:k] if s > 0]


_PYDOC_INDEX: BM25 | None = None


def pydoc_paragraphs() -> list[str]:
    """Paragraphs (8+ words) of the Python documentation topics shipped with CPython."""
    from pydoc_data.topics import topics

    paragraphs = []
    for text in topics.values():
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para.split()) >= 8:
                paragraphs.append(para)
    return paragraphs


def pydoc_index() -> BM25:
    global _PYDOC_INDEX
    if _PYDOC_INDEX is None:
        _PYDOC_INDEX = BM25(pydoc_paragraphs())
    return _PYDOC_INDEX


# -- tools ----------------------------------------------------------------------------------------
@dataclass
class Tool:
    name: str
    description: str
    run: Callable[[dict], str]
    examples: list[tuple[str, str]] = field(default_factory=list)  # (input, output with inline calls)

    def prompt(self) -> str:
        shots = "\n\n".join(f"Input: {i}\nOutput: {o}" for i, o in self.examples)
        return (f"Your task is to add calls to a {self.name} API to a piece of text. {self.description} "
                f"Write a call as <tool>{self.name}(...)</tool>. Here are some examples of API calls:\n\n"
                f"{shots}\n\nInput: ")


def _arg(args: dict, name: str) -> str:
    if set(args) != {name} or not isinstance(args[name], str):
        raise ToolError(f"expected exactly one string argument {name!r}")
    return args[name]


def calculator_tool() -> Tool:
    return Tool("calculator", "The calls should help you get information required to complete the text: "
                "the expression is arithmetic on the numbers in the text.",
                lambda a: calculate(_arg(a, "expression")),
                [("Out of 1400 participants, 400 passed the test.",
                  "Out of 1400 participants, 400 <tool>calculator(expression='400 / 1400')</tool><result>0.285714</result> "
                  "or 29% passed the test."),
                 ("The number in the next term is 18 + 12 x 3 = 54.",
                  "The number in the next term is 18 + 12 x 3 = <tool>calculator(expression='18 + 12 * 3')</tool>"
                  "<result>54</result> 54.")])


def python_tool(timeout_s: float = 5, memory_mb: int = 256) -> Tool:
    from ..sandbox import SandboxUnavailable, run_python

    def run(args: dict) -> str:
        code = _arg(args, "code")
        try:
            res = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb)
        except SandboxUnavailable as e:
            raise ToolError(f"sandbox unavailable: {e}") from None
        if not res.ok:
            if res.leftover_processes and res.returncode == 0 and not res.timed_out:
                raise ToolError(f"python left {res.leftover_processes} process(es) running (killed)")
            last = (res.stderr.strip().splitlines() or ["failed"])[-1]
            raise ToolError(f"python failed: {last[:100]}")
        return res.stdout.strip()[:200]

    return Tool("python", "The code runs in a sandbox and what it prints is the result.", run,
                [("The 10th Fibonacci number is 55.",
                  "The 10th Fibonacci number is <tool>python(code='a, b = 0, 1\\nfor _ in range(10): a, b = b, a + b\\nprint(a)')"
                  "</tool><result>55</result> 55.")])


def search_tool(documents: list[str] | None = None) -> Tool:
    def run(args: dict) -> str:
        index = BM25(documents) if documents is not None else pydoc_index()
        hits = index.search(_arg(args, "query"))
        if not hits:
            raise ToolError("no document matches")
        return hits[0][1][:200]

    return Tool("search", "The query finds the most relevant paragraph of a local document collection.", run,
                [("A list comprehension consists of brackets containing an expression followed by a for clause.",
                  "A list comprehension <tool>search(query='list comprehension')</tool><result>A list display is a "
                  "possibly empty series of expressions enclosed in square brackets</result> consists of brackets "
                  "containing an expression followed by a for clause.")])


def default_tools(names: list[str] | None = None) -> dict[str, Tool]:
    makers = {"calculator": calculator_tool, "python": python_tool, "search": search_tool}
    names = names or list(makers)
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise UserError(f"toolformer: unknown tool {unknown[0]!r} (tools: {', '.join(makers)})")
    return {n: makers[n]() for n in names}


def execute(call: ToolCall, tools: dict[str, Tool]) -> str:
    tool = tools.get(call.name)
    if tool is None:
        raise ToolError(f"unknown tool {call.name!r}")
    return tool.run(call.arguments)


# -- the filter -----------------------------------------------------------------------------------
def loss_weights(n: int, span: int = 5) -> list[float]:
    """Toolformer's weights over the next tokens: max(0, 1 - t/span), normalised."""
    raw = [max(0.0, 1 - t / span) for t in range(n)]
    total = sum(raw) or 1.0
    return [w / total for w in raw]


def call_text(call: ToolCall, result: str | None) -> str:
    return f" <tool>{render_call(call)}</tool>" + ("" if result is None else f"<result>{result}</result>")


@torch.no_grad()
def weighted_losses(model, tok, prefixes: list[str], following: list[int], span: int = 5) -> list[float]:
    """Weighted loss of the ``following`` token ids after each prefix text (one batch)."""
    following = following[:span]
    w = torch.tensor(loss_weights(len(following), span))
    rows = [tok(p, add_special_tokens=True)["input_ids"] + following for p in prefixes]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
    out = []
    for i, r in enumerate(rows):
        start = len(r) - len(following)  # logits at start-1 predict the first following token
        lp = F.log_softmax(logits[i, start - 1: len(r) - 1], -1)
        nll = -lp.gather(1, torch.tensor(following)[:, None])[:, 0]
        out.append(float((nll * w).sum()))
    return out


def utility(model, tok, context: str, text: str, position: int, call: ToolCall, result: str, span: int = 5) -> dict:
    """Toolformer's filter quantities for one executed call inserted at character ``position``."""
    following = tok(text[position:], add_special_tokens=False)["input_ids"]
    if not following:
        return {"with_result": 0.0, "no_call": 0.0, "no_result": 0.0, "utility": float("-inf")}
    before = context + text[:position]
    plus, none, empty = weighted_losses(model, tok, [before + call_text(call, result), before,
                                                     before + call_text(call, "")], following, span)
    return {"with_result": plus, "no_call": none, "no_result": empty, "utility": min(none, empty) - plus}


# -- proposals ------------------------------------------------------------------------------------
def boundaries(tok, text: str) -> list[int]:
    """Character offsets where a word starts (a space follows), inside the text."""
    return [m.start() for m in re.finditer(r" (?=\S)", text) if m.start() > 0]


@torch.no_grad()
def position_probs(model, tok, prompt: str, text: str) -> list[tuple[int, float]]:
    """(offset, P(' <' opens a call there | prompt + ' ' + text[:offset])) at each word boundary.

    One forward pass: the text is tokenised so that each boundary is a token boundary."""
    opener = tok(" <", add_special_tokens=False)["input_ids"][0]
    offsets = boundaries(tok, text)
    pieces, starts, pos = [], [], 0
    for off in offsets + [len(text)]:
        if off > pos:
            pieces.append(tok((" " if pos == 0 else "") + text[pos:off], add_special_tokens=False)["input_ids"])
            starts.append(pos)
        pos = off
    prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    ids, at = list(prompt_ids), {}
    for start, piece in zip(starts, pieces):
        at[start] = len(ids)  # the logits of position len(ids)-1 predict what comes at `start`
        ids += piece
    logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float()
    probs = logits.softmax(-1)[:, opener].cpu()
    return [(off, float(probs[at[off] - 1])) for off in offsets if off in at]


@torch.no_grad()
def sample_calls(model, tok, prompt: str, samples: int, max_new_tokens: int = 48, temperature: float = 1.0) -> list[str]:
    """``samples`` continuations of ``prompt`` (ending in ' <tool>'), each cut at '</tool>'."""
    enc = tok([prompt], return_tensors="pt", add_special_tokens=True).to(model.device)
    gen = model.generate(**enc, do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens,
                         num_return_sequences=samples, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.split("</tool>")[0] for t in texts if "</tool>" in t]


@dataclass
class Candidate:
    position: int
    call: ToolCall


def propose(model, tok, tool: Tool, context: str, text: str, positions: int, threshold: float, samples: int,
            stats: dict) -> list[Candidate]:
    prompt = tool.prompt() + " ".join(text.split()) + "\nOutput:"  # the model rewrites the text with calls
    probs = position_probs(model, tok, prompt, text)
    best = sorted((p for p in probs if p[1] >= threshold), key=lambda p: -p[1])[:positions]
    out = []
    for off, _ in sorted(best):
        for payload in sample_calls(model, tok, prompt + " " + text[:off] + " <tool>", samples):
            stats["proposed"] += 1
            calls, errors = parse_payload(payload)
            if len(calls) == 1 and not errors and calls[0].name == tool.name:
                stats["parsed"] += 1
                out.append(Candidate(off, calls[0]))
    return out


def augment_text(model, tok, text: str, tools: dict[str, Tool], *, tau: float = 0.0, context: str = "",
                 positions: int = 3, threshold: float = 0.0, samples: int = 2, max_calls: int = 3,
                 candidates: list[Candidate] | None = None, span: int = 5) -> dict:
    """Annotate one text (see the module doc). ``candidates`` replaces the model's proposals
    (the execution and the filter stay the same)."""
    stats = {"proposed": 0, "parsed": 0, "executed": 0, "failed": 0, "kept": 0}
    if candidates is None:
        candidates = [c for tool in tools.values()
                      for c in propose(model, tok, tool, context, text, positions, threshold, samples, stats)]
    else:
        stats["proposed"] = stats["parsed"] = len(candidates)
    best: dict[int, dict] = {}
    seen = set()
    for cand in candidates:
        key = (cand.position, json.dumps([cand.call.name, cand.call.arguments], sort_keys=True, default=str))
        if key in seen:
            continue
        seen.add(key)
        try:
            result = execute(cand.call, tools)
        except ToolError:
            stats["failed"] += 1
            continue
        stats["executed"] += 1
        u = utility(model, tok, context, text, cand.position, cand.call, result, span)
        if u["utility"] >= tau and (cand.position not in best or u["utility"] > best[cand.position]["utility"]):
            best[cand.position] = {"name": cand.call.name, "arguments": cand.call.arguments,
                                   "position": cand.position, "result": result, "utility": u["utility"],
                                   "losses": {k: u[k] for k in ("with_result", "no_call", "no_result")}}
    kept = sorted(sorted(best.values(), key=lambda c: -c["utility"])[:max_calls], key=lambda c: c["position"])
    stats["kept"] = len(kept)
    pieces, pos = [], 0
    for c in kept:
        pieces += [text[pos:c["position"]], call_text(ToolCall(c["name"], c["arguments"]), c["result"])]
        pos = c["position"]
    pieces.append(text[pos:])
    return {"original_text": text, "augmented_text": "".join(pieces), "tool_calls": kept, "stats": stats}


def strip_markup(text: str) -> str:
    """The original text of an augmented one."""
    return re.sub(r" <tool>.*?</tool>(<result>.*?</result>)?", "", text, flags=re.S)


def augment_rows(model, tok, rows: list[dict], tools: dict[str, Tool], *, renderer=None, seed: int = 0,
                 **kwargs) -> list[dict]:
    """Augment JSONL rows (``text``/``original_text``, or ``messages``); see the module doc."""
    out = []
    model.eval()
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for n, row in enumerate(rows):
            if "messages" in row:
                messages = [dict(m) for m in row["messages"]]
                calls, stats, last = [], {}, None
                for i, m in enumerate(messages):
                    if m.get("role") != "assistant" or not isinstance(m.get("content"), str) or not m["content"]:
                        continue
                    context = renderer.chat(messages[:i], add_generation_prompt=True) if renderer else ""
                    res = augment_text(model, tok, m["content"], tools, context=context, **kwargs)
                    calls += [{**c, "turn": i} for c in res["tool_calls"]]
                    stats = {k: stats.get(k, 0) + v for k, v in res["stats"].items()}
                    m["content"], last = res["augmented_text"], res
                if last is None:
                    raise UserError(f"row {n + 1}: 'messages' has no assistant text to augment")
                out.append({"original_text": last["original_text"], "augmented_text": last["augmented_text"],
                            "tool_calls": calls, "messages": messages, "stats": stats})
            else:
                text = row.get("text", row.get("original_text"))
                if not isinstance(text, str):
                    raise UserError(f"row {n + 1}: expected a 'text' (or 'original_text') string or 'messages'")
                out.append(augment_text(model, tok, text, tools, **kwargs))
    return out


def run_file(inp: Path, out: Path, model_name: str, tau: float, tool_names: list[str] | None = None,
             seed: int = 0, **kwargs) -> dict:
    """The ``skillstream toolformer`` command: read JSONL, augment, write JSONL; returns totals."""
    from ..data.readers import read_file
    from ..data.render import Renderer
    from ..models.backbone import load_backbone

    rows = [r.data for r in read_file(Path(inp))]
    tools = default_tools(tool_names)
    model, tok = load_backbone(model_name, seed=seed)
    result = augment_rows(model, tok, rows, tools, renderer=Renderer(tok, 4096), seed=seed, tau=tau, **kwargs)
    write_jsonl(out, result)
    totals: dict[str, int] = {}
    for r in result:
        for k, v in r["stats"].items():
            totals[k] = totals.get(k, 0) + v
    return {"rows": len(result), **totals}
