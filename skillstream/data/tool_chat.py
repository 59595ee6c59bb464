"""Tool-calling conversations: checking them, and rendering them with any chat template.

A tool conversation is TRL's conversational format: ``messages`` whose assistant turns may carry
``tool_calls: [{"type": "function", "function": {"name", "arguments"}}]``, ``{"role": "tool",
"name", "content"}`` results, and a ``tools`` column of JSON-Schema function descriptions
(``[{"type": "function", "function": {"name", "description", "parameters"}}]``).

Rendering. When the tokenizer's chat template renders ``tools=`` and ``tool_calls`` itself (found
by rendering a probe and looking for its names), the conversation goes to the template unchanged.
Otherwise (SmolLM2's template ignores both) the conversation is rewritten into plain messages the
template can render, and this rewriting is the documented format the model learns:

* the tool schemas go into the system prompt (appended to the conversation's system message,
  the recipe's system prompt, or on their own) as ``TOOLS_HEADER`` + one JSON object per line
  + ``TOOLS_FOOTER``;
* an assistant turn's calls are written in the inline markup of :mod:`skillstream.tools.calls`
  after its text: ``<tool>name(arg=value, ...)</tool>`` per call (JSON inside the tags where
  Python cannot spell a name) -- what :func:`~skillstream.tools.calls.parse_model_output` reads;
* a tool result stays a ``tool`` message whose content is the result text.

Checks (one line naming the file and row): ``tools`` must be a list of function schemas whose
``parameters`` are a JSON Schema of type object (types among JSON Schema's names, ``properties``
an object of schemas, ``required`` a list of property names); a tool call must name a function of
``tools`` (when the row has them) with an object of arguments.
"""
from __future__ import annotations

import json

from ..errors import UserError
from ..tools.calls import ToolCall, render_inline

TOOLS_HEADER = ("You can call these functions. To call one, answer with <tool>name(arg=value, ...)</tool> "
                "(one tag per call); if none of them fits the request, say so in words.\nFunctions:\n")
TOOLS_FOOTER = ""
JSON_SCHEMA_TYPES = {"string", "number", "integer", "boolean", "array", "object", "null"}
_PROBE_TOOL = "zq_probe_tool_7f3"
_PROBE_CALL = "zq_probe_call_7f3"


# -- checks --------------------------------------------------------------------------------------
def _check_schema(schema, where: str, path: str) -> None:
    if not isinstance(schema, dict):
        raise UserError(f"{where}: tools: {path} must be a JSON Schema object, got {type(schema).__name__}")
    t = schema.get("type")
    if t is not None:
        names = t if isinstance(t, list) else [t]
        bad = [n for n in names if not isinstance(n, str) or n not in JSON_SCHEMA_TYPES]
        if bad:
            raise UserError(f"{where}: tools: {path}.type {bad[0]!r} is not a JSON Schema type "
                            f"(one of {', '.join(sorted(JSON_SCHEMA_TYPES))})")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise UserError(f"{where}: tools: {path}.properties must be an object")
        for name, sub in props.items():
            _check_schema(sub, where, f"{path}.properties.{name}")
    req = schema.get("required")
    if req is not None:
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            raise UserError(f"{where}: tools: {path}.required must be a list of property names")
    items = schema.get("items")
    if items is not None:
        for i, sub in enumerate(items if isinstance(items, list) else [items]):
            _check_schema(sub, where, f"{path}.items" + (f"[{i}]" if isinstance(items, list) else ""))
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise UserError(f"{where}: tools: {path}.enum must be a list")


def check_tools(tools, where: str) -> list[dict]:
    """The ``tools`` column, checked; also accepts a JSON string (CSV/Parquet cells)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: tools: not valid JSON ({e.msg})") from None
    if not isinstance(tools, list):
        raise UserError(f"{where}: tools must be a list of function schemas, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise UserError(f"{where}: tools[{i}] needs a function 'name' "
                            "({'type': 'function', 'function': {'name', 'description', 'parameters'}})")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        _check_schema(params, where, f"{fn['name']}.parameters")
        if params.get("type", "object") != "object":
            raise UserError(f"{where}: tools: {fn['name']}.parameters must have type 'object'")
        missing = [r for r in params.get("required", []) if r not in (params.get("properties") or {})]
        if missing:
            raise UserError(f"{where}: tools: {fn['name']}.parameters.required names {missing[0]!r}, "
                            "which is not among its properties")
    return tools


def tool_names(tools: list[dict]) -> set[str]:
    return {t.get("function", t)["name"] for t in tools}


def check_tool_calls(messages: list[dict], tools: list[dict] | None, where: str) -> None:
    """Every tool call names a function (one of ``tools`` when given) and has object arguments."""
    known = tool_names(tools) if tools is not None else None
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls is None:
            continue
        if m["role"] != "assistant" or not isinstance(calls, list):
            raise UserError(f"{where}: messages[{i}]: tool_calls must be a list on an assistant message")
        for call in calls:
            fn = call.get("function", call) if isinstance(call, dict) else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(name, str) or not name:
                raise UserError(f"{where}: messages[{i}]: a tool call without a function name")
            args = fn.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: messages[{i}]: {name}: arguments are not valid JSON ({e.msg})") from None
            if not isinstance(args, dict):
                raise UserError(f"{where}: messages[{i}]: {name}: arguments must be an object")
            if known is not None and name not in known:
                raise UserError(f"{where}: messages[{i}]: call to unknown tool {name!r} "
                                f"(tools: {', '.join(sorted(known)) or 'none'})")


# -- rendering -----------------------------------------------------------------------------------
def _calls_of(message: dict) -> list[ToolCall]:
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        out.append(ToolCall(fn["name"], json.loads(args) if isinstance(args, str) else dict(args)))
    return out


def tools_text(tools: list[dict]) -> str:
    return TOOLS_HEADER + "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools) + TOOLS_FOOTER


def to_plain_messages(messages: list[dict], tools: list[dict] | None, system_prompt: str | None = None) -> list[dict]:
    """The fallback rewriting (module doc): schemas into the system prompt, calls as inline markup."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = (m.get("content") or "") + "".join(render_inline(c) for c in _calls_of(m))
            out.append({"role": "assistant", "content": text})
        else:
            content = m.get("content")
            out.append({"role": m["role"], "content": content if isinstance(content, str) else
                        ("" if content is None else json.dumps(content, ensure_ascii=False))})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tools_text(tools)}
        else:
            head = (system_prompt + "\n\n") if system_prompt else ""
            out.insert(0, {"role": "system", "content": head + tools_text(tools)})
    return out


def template_supports_tools(tok) -> bool:
    """Whether the chat template renders both ``tools=`` and assistant ``tool_calls`` (probed)."""
    cached = getattr(tok, "_skillstream_native_tools", None)
    if cached is not None:
        return cached
    native = False
    if getattr(tok, "chat_template", None):
        tool = {"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}
        msgs = [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"type": "function",
                                                      "function": {"name": _PROBE_CALL, "arguments": {}}}]}]
        try:
            text = tok.apply_chat_template(msgs, tools=[tool], tokenize=False)
            native = _PROBE_TOOL in text and _PROBE_CALL in text
        except Exception:  # templates raise many kinds of errors on what they do not support
            native = False
    try:
        tok._skillstream_native_tools = native
    except AttributeError:
        pass
    return native
