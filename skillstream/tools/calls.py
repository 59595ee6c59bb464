"""Tool calls: one representation, three text forms, and a forgiving parser of model output.

Forms
-----
* Inline (Toolformer) markup, used inside running text::

      The area is <tool>triangle.area(base=10, height=5)</tool><result>25.0</result> square units.

  A call is ``<tool>NAME(KEY=VALUE, ...)</tool>``; values are Python or JSON literals (strings,
  numbers, booleans, None/null, lists, dicts). A name or key that Python cannot spell is written
  as JSON instead: ``<tool>{"name": "...", "arguments": {...}}</tool>``. The result of a call
  is ``<result>...</result>`` right after it. Calls made together (parallel calls) are adjacent
  and their results follow in the same order::

      <tool>a(x=1)</tool><tool>b(y=2)</tool><result>1</result><result>2</result>

  ``<result>`` is used rather than an arrow because it says where the result ends.
* Chat messages in TRL's conversational format: an assistant message with
  ``tool_calls: [{"type": "function", "function": {"name", "arguments": {...}}}]`` and one
  ``{"role": "tool", "name", "content"}`` message per result.
* Model output: see :func:`parse_model_output` for the formats accepted.

Nothing here evaluates model text: Python-style calls are read with ``ast`` and only literals are
accepted, so a call like ``f(x=os.system('...'))`` is a format error, not an execution.
"""
from __future__ import annotations

import ast
import json
import keyword
import re
from dataclasses import dataclass, field

from ..errors import UserError


@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)


@dataclass
class ParsedOutput:
    calls: list[ToolCall]
    format_errors: list[str]


class _FormatError(ValueError):
    """A call the model tried to write but wrote wrongly; reported, never raised to callers."""


# -- literals ----------------------------------------------------------------------------------
# JSON spellings are accepted too, since models mix the two styles freely.
_NAMED_CONSTANTS = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}


def _literal(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _literal(node.operand)
        if isinstance(operand, (int, float)) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, (ast.List, ast.Tuple)):  # tuples become lists: JSON has no tuples
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _FormatError("'**' unpacking is not a literal")
        keys = [_literal(k) for k in node.keys]
        if any(isinstance(k, (list, dict)) for k in keys):
            raise _FormatError("dict keys must be strings or numbers")
        return dict(zip(keys, (_literal(v) for v in node.values)))
    raise _FormatError(f"not a literal value: {ast.unparse(node)[:60]}")


def _dotted_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    raise _FormatError(f"not a function name: {ast.unparse(node)[:60]}")


def _call_from_ast(node: ast.AST) -> ToolCall:
    if not isinstance(node, ast.Call):
        raise _FormatError(f"not a function call: {ast.unparse(node)[:60]}")
    name = _dotted_name(node.func)
    if node.args:
        raise _FormatError(f"{name}: positional arguments are not allowed, name every argument")
    if any(kw.arg is None for kw in node.keywords):
        raise _FormatError(f"{name}: '**' unpacking is not allowed")
    return ToolCall(name, {kw.arg: _literal(kw.value) for kw in node.keywords})


def _call_from_object(obj) -> ToolCall:
    """``{"name", "arguments"}``; also OpenAI's ``{"function": {...}}`` wrapper, ``parameters``
    for ``arguments``, and arguments given as a JSON string (as the OpenAI API sends them)."""
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    if not isinstance(obj, dict):
        raise _FormatError(f"expected an object with 'name' and 'arguments', got {str(obj)[:60]}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise _FormatError(f"call without a name: {str(obj)[:60]}")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise _FormatError(f"{name}: arguments are not valid JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise _FormatError(f"{name}: arguments must be an object, got {type(args).__name__}")
    return ToolCall(name, args)


def _payload_items(text: str) -> list:
    """The parts of one payload: JSON values, or ``ast`` nodes when it is not JSON."""
    try:
        value = json.loads(text)
        return value if isinstance(value, list) else [value]
    except json.JSONDecodeError:
        pass
    except RecursionError:
        raise _FormatError("nested too deeply") from None
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise _FormatError(f"cannot parse {text[:60]!r}: {getattr(e, 'msg', None) or e}") from None
    return tree.elts if isinstance(tree, (ast.List, ast.Tuple)) else [tree]


def _to_call(item) -> ToolCall:
    if isinstance(item, ast.Call):
        return _call_from_ast(item)
    if isinstance(item, ast.AST):  # a Python dict literal such as {'name': 'f', 'arguments': {...}}
        return _call_from_object(_literal(item))
    return _call_from_object(item)


def parse_payload(text: str) -> tuple[list[ToolCall], list[str]]:
    """One call or a list of calls, as JSON or as Python; each bad call is one error."""
    try:
        items = _payload_items(text.strip())
    except _FormatError as e:
        return [], [str(e)]
    calls, errors = [], []
    for item in items:
        try:
            calls.append(_to_call(item))
        except _FormatError as e:
            errors.append(str(e))
        except RecursionError:
            errors.append("call nested too deeply")
    return calls, errors


# -- rendering ---------------------------------------------------------------------------------
def _is_identifier(s: str) -> bool:
    return s.isidentifier() and not keyword.iskeyword(s)


def _pythonic(call: ToolCall) -> bool:
    return all(_is_identifier(p) for p in call.name.split(".")) and all(
        isinstance(k, str) and _is_identifier(k) for k in call.arguments
    )


def render_call(call: ToolCall) -> str:
    """``name(a=1, b='x')`` (values as Python literals), or JSON where Python cannot spell it."""
    if not _pythonic(call):
        return json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"{call.name}({', '.join(f'{k}={v!r}' for k, v in call.arguments.items())})"


def render_python(calls: list[ToolCall]) -> str:
    """BFCL's Python answer format: ``[f(a=1), g(b=2)]``."""
    return "[" + ", ".join(render_call(c) for c in calls) + "]"


def render_json(calls: list[ToolCall]) -> str:
    return json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls], ensure_ascii=False)


def render_inline(call: ToolCall, result: str | None = None) -> str:
    text = f"<tool>{render_call(call)}</tool>"
    return text if result is None else f"{text}<result>{result}</result>"


# -- inline markup -----------------------------------------------------------------------------
_INLINE = re.compile(r"<tool>(.*?)</tool>|<result>(.*?)</result>", re.S)


def _inline_segments(text: str) -> list[tuple[str, object]]:
    """The text as ("text", str), ("call", ToolCall | error str), ("result", str) in order."""
    segments: list[tuple[str, object]] = []
    pos = 0
    for m in _INLINE.finditer(text):
        if m.start() > pos:
            segments.append(("text", text[pos : m.start()]))
        if m.group(1) is not None:
            calls, errors = parse_payload(m.group(1))
            if len(calls) == 1 and not errors:
                segments.append(("call", calls[0]))
            else:
                segments.append(("call", "; ".join(errors) or f"expected one call in <tool>{m.group(1)[:60]}</tool>"))
        else:
            segments.append(("result", m.group(2)))
        pos = m.end()
    if pos < len(text):
        segments.append(("text", text[pos:]))
    return segments


def _unclosed(text: str, tags: tuple[str, ...]) -> list[str]:
    """Opening tags left over once the closed blocks are removed: calls cut off mid-way."""
    rest = re.sub("|".join(rf"<{t}>.*?</{t}>" for t in tags), "", text, flags=re.S)
    return [f"unclosed <{m.group(1)}> block" for m in re.finditer("|".join(rf"<({t})>" for t in tags), rest)]


def parse_inline(text: str) -> tuple[list[ToolCall], list[str]]:
    """The calls in inline markup, and one error message per malformed or unclosed call."""
    calls, errors = [], []
    for kind, value in _inline_segments(text):
        if kind == "call":
            (calls if isinstance(value, ToolCall) else errors).append(value)
    return calls, errors + _unclosed(text, ("tool",))


# -- chat messages (TRL conversational format) -------------------------------------------------
def calls_to_message(calls: list[ToolCall], content: str = "") -> dict:
    message = {"role": "assistant"}
    if content:
        message["content"] = content
    message["tool_calls"] = [
        {"type": "function", "function": {"name": c.name, "arguments": dict(c.arguments)}} for c in calls
    ]
    return message


def message_to_calls(message: dict) -> list[ToolCall]:
    """The calls of an assistant message; arguments may be a dict or a JSON string (OpenAI)."""
    calls = []
    for entry in message.get("tool_calls") or []:
        try:
            calls.append(_call_from_object(entry))
        except _FormatError as e:
            raise UserError(f"assistant message: bad tool call: {e}") from None
    return calls


def inline_to_messages(text: str, user: str | None = None) -> list[dict]:
    """Inline markup -> TRL messages; ``user``, if given, is prepended as the user's turn.

    Text before a call becomes the ``content`` of the assistant message carrying the call;
    whitespace between the tags of one group of calls and results is dropped.
    """
    messages: list[dict] = [{"role": "user", "content": user}] if user is not None else []
    segments = _inline_segments(text)
    pending, group, answered = "", None, 0
    for i, (kind, value) in enumerate(segments):
        if kind == "text":
            upcoming = segments[i + 1][0] if i + 1 < len(segments) else None
            joins_group = group is not None and (upcoming == "result" or (upcoming == "call" and answered == 0))
            if not (joins_group and not value.strip()):
                pending, group = pending + value, None
        elif kind == "call":
            if not isinstance(value, ToolCall):
                raise UserError(f"inline tool call: {value}")
            if group is not None and answered == 0:
                group["tool_calls"].extend(calls_to_message([value])["tool_calls"])
            else:
                group, answered, pending = calls_to_message([value], pending), 0, ""
                messages.append(group)
        else:
            if group is None or answered >= len(group["tool_calls"]):
                raise UserError(f"inline markup: the result {value[:40]!r} does not follow a <tool> call")
            name = group["tool_calls"][answered]["function"]["name"]
            messages.append({"role": "tool", "name": name, "content": value})
            answered += 1
    unclosed = _unclosed(text, ("tool", "result"))
    if unclosed:
        raise UserError(f"inline markup: {unclosed[0]}")
    if pending:
        messages.append({"role": "assistant", "content": pending})
    return messages


def messages_to_inline(messages: list[dict]) -> str:
    """TRL messages -> inline markup of the assistant's side. System and user messages before the
    first assistant turn are left out; a user turn after it cannot be written inline."""
    parts: list[str] = []
    started = False
    for m in messages:
        role = m.get("role")
        if role == "assistant":
            started = True
            parts.append(m.get("content") or "")
            parts.extend(f"<tool>{render_call(c)}</tool>" for c in message_to_calls(m))
        elif role == "tool":
            content = m.get("content")
            parts.append(f"<result>{content if isinstance(content, str) else json.dumps(content)}</result>")
        elif started:
            raise UserError(f"messages: a {role!r} message after the assistant's turn cannot be written inline")
    return "".join(parts)


# -- model output ------------------------------------------------------------------------------
_TAGS = ("tool", "function_call", "tool_call")
_TAGGED = re.compile(r"<(tool|function_call|tool_call)>(.*?)</\1>", re.S)
_FENCE = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?```$", re.S)
_LOOKS_LIKE_CALL = re.compile(r"^(\[|\{|[A-Za-z_][\w.]*\()")  # no space before "(": "I (too) think" is prose


def parse_model_output(text: str) -> ParsedOutput:
    """Every tool call in a model's answer, in order; never raises.

    Accepted: ``<tool>f(a=1)</tool>`` markup, ``<function_call>{json}</function_call>`` and
    ``<tool_call>{json}</tool_call>`` blocks, or -- when there are no such tags -- the whole answer
    (optionally in a code fence) as a JSON object/list of ``{"name", "arguments"}`` or as Python
    ``f(a=1)`` / ``[f(a=1), g(b=2)]``. An answer that does not start like a call is prose: no calls
    and no errors (the right answer when no tool fits). Each malformed call is one format error.
    """
    blocks = list(_TAGGED.finditer(text))
    if blocks:
        calls, errors = [], []
        for m in blocks:
            found, bad = parse_payload(m.group(2))
            calls.extend(found)
            errors.extend(bad)
        return ParsedOutput(calls, errors + _unclosed(text, _TAGS))
    unclosed = _unclosed(text, _TAGS)
    if unclosed:
        return ParsedOutput([], unclosed)
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not _LOOKS_LIKE_CALL.match(body):
        return ParsedOutput([], [])
    calls, errors = parse_payload(body)
    return ParsedOutput(calls, errors)
