"""Tool-call correctness by BFCL's AST rules (our implementation of them).

An answer key (``ground_truth``) is a list of ``{function_name: {param: [possible values]}}``,
one entry per expected call. A call is correct when:

* its function name is the expected one;
* every parameter the schema requires is present, and no parameter is given that the schema or
  the answer key does not know;
* every value has the schema's type -- an int is accepted where a float is expected, a bool is
  never an int, ``array``/``tuple`` elements are checked against ``items`` and ``dict`` values
  against ``properties`` (recursively; BFCL goes one level deep), ``any`` accepts anything;
* every value is among the possible values. Strings are compared as BFCL normalises them:
  spaces and ``,./-_*^`` removed, lower case, ``'`` read as ``"`` -- inside lists and dicts too.
  A ``dict`` parameter's possible values are patterns ``{key: [possible values]}`` and a list
  of dicts is a list of such patterns, matched in order;
* a parameter of the answer key is omitted only where its possible values contain ``""``.

Two quirks of BFCL's answer keys are honoured: a key sometimes writes a value in another type
than the schema's (``None`` for an unset string, ``"dontcare"`` for an integer, ``True`` for a
string); such a value is accepted when it equals a possible value exactly. And ``""`` counts as a
possible string value, as in BFCL.

Categories: ``irrelevance`` passes only when no call is made (``relevance``: at least one call);
``parallel`` needs one call per expected call in any order -- a full matching is searched, where
BFCL matches greedily and can reject a correct set in which one call fits two expected ones;
everything else (simple, multiple, live_*) needs the expected calls in order.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from ..errors import UserError
from ..tools.calls import ToolCall

# BFCL type names and their JSON Schema spellings; "any" and unknown names are not checked.
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "float": (int, float),  # ints are accepted where floats are expected
    "number": (int, float),
    "boolean": (bool,),
    "array": (list, tuple),
    "tuple": (list, tuple),
    "dict": (dict,),
    "object": (dict,),
    "null": (type(None),),
}
DICT_TYPES = ("dict", "object")
ARRAY_TYPES = ("array", "tuple")


@dataclass(frozen=True)
class CheckResult:
    valid: bool
    error: str | None = None
    # wrong_count, wrong_func_name, missing_required, unexpected_param, type_error, value_error,
    # missing_optional, irrelevance_call, no_call
    error_kind: str | None = None


OK = CheckResult(True)


def _fail(kind: str, error: str) -> CheckResult:
    return CheckResult(False, error, kind)


# -- values ------------------------------------------------------------------------------------
def normalize_string(s: str) -> str:
    """BFCL's normalisation: "April 1, 2024" and "april 1 2024" compare equal."""
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def _norm(value):
    if isinstance(value, bool):  # tagged, so that True never equals 1
        return ("bool", value)
    if isinstance(value, str):
        return normalize_string(value)
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def _as_list(possible) -> list:
    return possible if isinstance(possible, list) else [possible]


def _among(value, possible) -> bool:
    normalized = _norm(value)
    return any(normalized == _norm(p) for p in _as_list(possible))


def _matches_pattern(value: dict, pattern: dict) -> bool:
    """A dict against ``{key: [possible values]}``: known keys, allowed values, omissions allowed."""
    if any(k not in pattern or not _among(v, pattern[k]) for k, v in value.items()):
        return False
    return all(k in value or "" in _as_list(pv) for k, pv in pattern.items())


def _type_names(spec: dict) -> list[str]:
    t = spec.get("type")
    return t if isinstance(t, list) else [t] if isinstance(t, str) else []


def _allowed(spec: dict) -> tuple[type, ...] | None:
    names = _type_names(spec)
    if not names or any(n not in _TYPES for n in names):
        return None
    return tuple(t for n in names for t in _TYPES[n])


def _type_error(value, spec: dict, where: str) -> str | None:
    allowed = _allowed(spec)
    if allowed is not None and type(value) not in allowed:  # exact types: a bool is not an int
        return f"{where}: expected {spec.get('type')}, got {type(value).__name__} {value!r}"
    items = spec.get("items")
    if isinstance(value, (list, tuple)) and isinstance(items, dict):
        for i, element in enumerate(value):
            error = _type_error(element, items, f"{where}[{i}]")
            if error:
                return error
    props = spec.get("properties")
    if isinstance(value, dict) and isinstance(props, dict):
        for key, element in value.items():
            if isinstance(props.get(key), dict):
                error = _type_error(element, props[key], f"{where}.{key}")
                if error:
                    return error
    return None


def _value_ok(value, spec: dict, possible: list) -> bool:
    names = _type_names(spec)
    if isinstance(value, dict) and any(n in DICT_TYPES for n in names):
        return any(isinstance(p, dict) and _matches_pattern(value, p) for p in possible)
    items = spec.get("items") if isinstance(spec.get("items"), dict) else {}
    if isinstance(value, (list, tuple)) and any(n in DICT_TYPES for n in _type_names(items)):
        return any(
            isinstance(p, list)
            and len(p) == len(value)
            and all(isinstance(v, dict) and isinstance(q, dict) and _matches_pattern(v, q) for v, q in zip(value, p))
            for p in possible
        )
    return _among(value, possible)


def _answer_type(possible: list) -> type | None:
    """The type the answer key writes this parameter in (its first non-optional value)."""
    return next((type(p) for p in possible if p != ""), None)


def check_param(name: str, value, spec: dict, possible) -> CheckResult:
    """One given parameter against its schema and its possible values."""
    possible = _as_list(possible)
    type_error = _type_error(value, spec, name)
    if type_error:
        spelled = _answer_type(possible)
        if type(value) is spelled and spelled not in (_allowed(spec) or ()):  # the key's own spelling
            if any(type(p) is spelled and p == value for p in possible):  # compared exactly, as BFCL does
                return OK
            return _fail("value_error", f"{name}: {value!r} is not one of {possible!r}")
        return _fail("type_error", type_error)
    if not _value_ok(value, spec, possible):
        return _fail("value_error", f"{name}: {value!r} is not one of {possible!r}")
    return OK


def _parameters(function: dict) -> tuple[dict, list]:
    params = function.get("parameters") or {}
    return params.get("properties") or {}, params.get("required") or []


def check_call(call: ToolCall, function: dict, answer: dict) -> CheckResult:
    """One call against one function schema and one answer ``{param: [possible values]}``."""
    if call.name != function["name"]:
        return _fail("wrong_func_name", f"expected a call of {function['name']!r}, got {call.name!r}")
    properties, required = _parameters(function)
    for param in required:
        if param not in call.arguments:
            return _fail("missing_required", f"{call.name}: missing required parameter {param!r}")
    for param, value in call.arguments.items():
        if param not in properties or param not in answer:
            return _fail("unexpected_param", f"{call.name}: unexpected parameter {param!r}")
        result = check_param(param, value, properties[param], answer[param])
        if not result.valid:
            return CheckResult(False, f"{call.name}: {result.error}", result.error_kind)
    for param, possible in answer.items():
        if param not in call.arguments and "" not in _as_list(possible):
            return _fail("missing_optional", f"{call.name}: parameter {param!r} is needed here")
    return OK


# -- whole answers -----------------------------------------------------------------------------
def _expected(ground_truth: list[dict], functions: list[dict]) -> list[tuple[dict, dict]]:
    """(function schema, answer) per expected call."""
    by_name = {f["name"]: f for f in functions}
    pairs = []
    for entry in ground_truth:
        ((name, answer),) = entry.items()
        if name not in by_name:
            raise UserError(f"answer key names function {name!r}, which is not among the functions given")
        pairs.append((by_name[name], answer))
    return pairs


def _perfect_matching(fits: list[list[bool]]) -> list[int | None]:
    """For each expected call, the index of the call it is matched to (augmenting paths)."""
    owner: dict[int, int] = {}  # call index -> expected index

    def place(i: int, seen: set[int]) -> bool:
        for j, fit in enumerate(fits[i]):
            if fit and j not in seen:
                seen.add(j)
                if j not in owner or place(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    for i in range(len(fits)):
        place(i, set())
    matched: list[int | None] = [None] * len(fits)
    for j, i in owner.items():
        matched[i] = j
    return matched


def check(calls: list[ToolCall], functions: list[dict], ground_truth: list[dict], category: str) -> CheckResult:
    """Whether ``calls`` answer the example, by BFCL's rules for its category."""
    if "irrelevance" in category:
        if calls:
            return _fail("irrelevance_call", f"no function fits, yet {len(calls)} call(s) were made")
        return OK
    if category.endswith("relevance"):
        return OK if calls else _fail("no_call", "a function fits, yet no call was made")
    expected = _expected(ground_truth, functions)
    if len(calls) != len(expected):
        return _fail("wrong_count", f"expected {len(expected)} call(s), got {len(calls)}")
    if "parallel" not in category:
        for call, (function, answer) in zip(calls, expected):
            result = check_call(call, function, answer)
            if not result.valid:
                return result
        return OK
    results = [[check_call(call, f, a) for call in calls] for f, a in expected]
    matched = _perfect_matching([[r.valid for r in row] for row in results])
    for i, j in enumerate(matched):
        if j is None:  # explain with the closest candidate: a call of the same function, if any
            name = expected[i][0]["name"]
            row = results[i]
            reason = next((r for r, c in zip(row, calls) if c.name == name), row[0])
            return CheckResult(False, f"expected call #{i} ({name}) matches no call: {reason.error}", reason.error_kind)
    return OK


# -- metrics -----------------------------------------------------------------------------------
def tool_selection_correct(calls: list[ToolCall], ground_truth: list[dict]) -> bool:
    """The right functions were called, as many times each as expected, arguments aside."""
    return Counter(c.name for c in calls) == Counter(name for entry in ground_truth for name in entry)


def _argument_score(call: ToolCall, function: dict, answer: dict) -> float:
    properties, _ = _parameters(function)
    keys = set(answer) | set(call.arguments)
    if not keys:
        return 1.0
    right = 0
    for key in keys:
        if key not in call.arguments:
            right += "" in _as_list(answer[key])
        elif key in answer and key in properties:
            right += check_param(key, call.arguments[key], properties[key], answer[key]).valid
    return right / len(keys)


def argument_accuracy(calls: list[ToolCall], functions: list[dict], ground_truth: list[dict]) -> float:
    """Partial credit in [0, 1]: the share of right parameters (given and correct, or rightly
    omitted) over the parameters of the answer and of the call, per expected call. Calls are paired
    with expected calls of the same function, best pairs first; unpaired expected calls and extra
    calls score 0. With nothing expected: 1 if no call was made, else 0."""
    if not ground_truth:
        return 0.0 if calls else 1.0
    expected = _expected(ground_truth, functions)
    scored = sorted(
        (
            (_argument_score(call, f, a), i, j)
            for i, (f, a) in enumerate(expected)
            for j, call in enumerate(calls)
            if call.name == f["name"]
        ),
        reverse=True,
    )
    used_expected, used_calls, total = set(), set(), 0.0
    for score, i, j in scored:
        if i not in used_expected and j not in used_calls:
            used_expected.add(i)
            used_calls.add(j)
            total += score
    return total / max(len(expected), len(calls))


def answer_to_calls(ground_truth: list[dict], functions: list[dict], omit_optional: bool = False) -> list[ToolCall]:
    """The calls an answer key describes, taking the first possible value of each parameter.

    ``""`` marks a parameter that may be omitted: it is skipped when choosing, and with
    ``omit_optional`` every such parameter is left out -- except those the schema requires, which
    keep a value (``""`` itself when that is all the key allows). Dict patterns are resolved the
    same way, key by key. Used for training targets and to test the checker on the answer keys.
    """
    calls = []
    for function, answer in _expected(ground_truth, functions):
        properties, required = _parameters(function)
        args = {}
        for param, possible in answer.items():
            choice = _first_choice(possible, omit_optional and param not in required)
            if choice is _NOTHING and param in required and "" in _as_list(possible):
                choice = ""
            if choice is not _NOTHING:
                args[param] = _resolve(choice, properties.get(param) or {}, omit_optional)
        calls.append(ToolCall(function["name"], args))
    return calls


_NOTHING = object()


def _first_choice(possible, omit: bool):
    possible = _as_list(possible)
    if omit and "" in possible:
        return _NOTHING
    return next((p for p in possible if p != ""), _NOTHING)


def _resolve_pattern(pattern: dict, omit_optional: bool) -> dict:
    chosen = {k: _first_choice(pv, omit_optional) for k, pv in pattern.items()}
    return {k: v for k, v in chosen.items() if v is not _NOTHING}


def _resolve(choice, spec: dict, omit_optional: bool):
    """A possible value as the model would write it: dict patterns become plain dicts."""
    names = _type_names(spec)
    if isinstance(choice, dict) and any(n in DICT_TYPES for n in names):
        return _resolve_pattern(choice, omit_optional)
    items = spec.get("items") if isinstance(spec.get("items"), dict) else {}
    if isinstance(choice, list) and any(n in DICT_TYPES for n in _type_names(items)):
        return [_resolve_pattern(p, omit_optional) if isinstance(p, dict) else p for p in choice]
    return choice
