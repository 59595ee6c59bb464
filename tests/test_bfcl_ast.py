"""BFCL data and the AST checker, tested on the package's own answer keys.

Every answer key, turned into calls, passes the checker; systematically broken versions fail.
"""
import copy
from collections import Counter

import pytest

from skillstream.errors import UserError
from skillstream.evaluation.tool_ast import (
    CheckResult,
    answer_to_calls,
    argument_accuracy,
    check,
    check_param,
    normalize_string,
    tool_selection_correct,
)
from skillstream.tools.bfcl import CATEGORIES, load_bfcl, load_category, split_of, to_trl_example, tool_schemas
from skillstream.tools.calls import ToolCall, messages_to_inline, parse_model_output, render_json, render_python

# Answer keys that no call can satisfy, by BFCL's rules as by ours: a required parameter with an
# empty list of possible values, or a parameter the function's schema does not have.
UNSATISFIABLE = {
    "live_simple_106-63-0": "missing_required",  # auto_loan_payment_start: []
    "live_simple_112-68-0": "missing_required",  # acc_routing_start: []
    "live_multiple_862-181-3": "unexpected_param",  # journey_start_time: not in Trains_1_FindTrains
    "live_multiple_964-207-0": "missing_required",  # key says 'question', schema requires 'statement'
}
# category: (examples, train, test)
SIZES = {
    "simple": (400, 312, 88),
    "live_simple": (258, 202, 56),
    "multiple": (200, 161, 39),
    "live_multiple": (1053, 831, 222),
    "parallel": (200, 170, 30),
    "irrelevance": (240, 185, 55),
}


@pytest.fixture(scope="module")
def data():
    return {category: load_category(category) for category in CATEGORIES}


def _answers(record, omit_optional=False):
    return answer_to_calls(record["ground_truth"], record["functions"], omit_optional)


def _check(record, calls):
    return check(calls, record["functions"], record["ground_truth"], record["category"])


# -- data and split ----------------------------------------------------------------------------
def test_categories_have_their_sizes_and_a_fixed_80_20_split(data):
    for category, (total, train, test) in SIZES.items():
        records = data[category]
        assert len(records) == total
        assert Counter(split_of(r["id"]) for r in records) == {"train": train, "test": test}
    assert split_of("simple_python_0") == split_of("simple_python_0")
    train, test = load_bfcl(["simple", "parallel"], "train"), load_bfcl(["simple", "parallel"], "test")
    assert (len(train), len(test)) == (312 + 170, 88 + 30)
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    # categories take turns, so a source's `limit: 4` samples both of them; parallel runs out first
    assert [r["category"] for r in test[:4]] == ["simple", "parallel", "simple", "parallel"]
    assert [r["category"] for r in test[-3:]] == ["simple"] * 3
    assert len(load_bfcl(split="all")) == sum(total for total, _, _ in SIZES.values())


def test_records_hold_chat_messages_schemas_and_answer_keys(data):
    record = data["simple"][0]
    assert record["id"] == "simple_python_0" and record["category"] == "simple"
    assert record["question"] == [
        {"role": "user", "content": "Find the area of a triangle with a base of 10 units and height of 5 units."}
    ]
    assert record["functions"][0]["name"] == "calculate_triangle_area"
    assert record["ground_truth"] == [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}]
    assert all(r["ground_truth"] == [] for r in data["irrelevance"])
    assert sum(m["role"] == "system" for r in data["live_multiple"] for m in r["question"]) == 37


# -- every answer key passes -------------------------------------------------------------------
@pytest.mark.parametrize("omit_optional", [False, True], ids=["first-values", "optional-omitted"])
def test_every_answer_key_passes_the_checker(data, omit_optional):
    passed, failed = Counter(), {}
    for category, records in data.items():
        for record in records:
            result = _check(record, _answers(record, omit_optional))
            if result.valid:
                passed[category] += 1
            else:
                failed[record["id"]] = result.error_kind
    assert passed == {"simple": 400, "live_simple": 256, "multiple": 200, "live_multiple": 1051, "parallel": 200, "irrelevance": 240}
    assert failed == UNSATISFIABLE


def test_parallel_calls_pass_in_any_order(data):
    # parallel_178 reversed is one BFCL's greedy matching rejects: its first expected call accepts
    # Microsoft or Apple on 2022-01-01 and takes the Apple call that a later one needs.
    assert sum(_check(r, _answers(r)[::-1]).valid for r in data["parallel"]) == 200


# -- every perturbation fails ------------------------------------------------------------------
def _schema(record, name):
    return next(f for f in record["functions"] if f["name"] == name)


def _rename(record, calls):
    calls[0].name += "_v2"
    return calls


def _drop_required(record, calls):
    required = _schema(record, calls[0].name)["parameters"].get("required", [])
    present = [p for p in required if p in calls[0].arguments]
    if not present:
        return None
    del calls[0].arguments[present[0]]
    return calls


def _add_unknown(record, calls):
    calls[0].arguments["not_a_parameter"] = 1
    return calls


_PY = {"integer": int, "float": (int, float), "boolean": bool}


def _wrong_type(record, calls):
    """A string where a number or a boolean is expected."""
    properties = _schema(record, calls[0].name)["parameters"]["properties"]
    for name, value in calls[0].arguments.items():
        expected = _PY.get(properties.get(name, {}).get("type"))
        if expected and isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
            calls[0].arguments[name] = str(value)
            return calls
    return None


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1000
    if isinstance(value, str):
        return value + " (changed)"
    if isinstance(value, list):
        return value + value[:1] if value else [0]
    return None


def _outside_answers(record, calls):
    """A value of the right type that is not among the possible values."""
    properties = _schema(record, calls[0].name)["parameters"]["properties"]
    answer = next(a for entry in record["ground_truth"] for n, a in entry.items() if n == calls[0].name)
    for name, value in calls[0].arguments.items():
        new = _changed(value)
        if new is not None and not check_param(name, new, properties.get(name, {}), answer.get(name, [])).valid:
            calls[0].arguments[name] = new
            return calls
    return None


def _other_function(record, calls):
    others = [f["name"] for f in record["functions"] if f["name"] != calls[0].name]
    return [ToolCall(others[0], dict(calls[0].arguments))] if others else None


def _drop_a_call(record, calls):
    return calls[:-1]


def _no_call(record, calls):
    return []


PERTURBATIONS = {
    "wrong function name": _rename,
    "missing required parameter": _drop_required,
    "unknown parameter": _add_unknown,
    "string for a number or bool": _wrong_type,
    "value outside the answers": _outside_answers,
    "another available function": _other_function,
    "no call": _no_call,
}
# category: {perturbation: examples it applies to -- and fails on, every one}
_EVERY = ("wrong function name", "unknown parameter", "no call")
PERTURBED = {
    "simple": {**dict.fromkeys(_EVERY, 400), "missing required parameter": 400,
               "string for a number or bool": 263, "value outside the answers": 400},
    "live_simple": {**dict.fromkeys(_EVERY, 256), "missing required parameter": 233,
                    "string for a number or bool": 73, "value outside the answers": 247},
    "multiple": {**dict.fromkeys(_EVERY, 200), "missing required parameter": 200, "another available function": 200,
                 "string for a number or bool": 134, "value outside the answers": 199},
    "live_multiple": {**dict.fromkeys(_EVERY, 1051), "missing required parameter": 841, "another available function": 1051,
                      "string for a number or bool": 460, "value outside the answers": 1026},
    "parallel": {**dict.fromkeys(_EVERY, 200), "missing required parameter": 200, "a call missing": 200,
                 "string for a number or bool": 152, "value outside the answers": 200},
}


def _apply_all(data, category, perturbations):
    applied, still_valid = Counter(), []
    for record in data[category]:
        if record["id"] in UNSATISFIABLE:
            continue
        for name, perturb in perturbations.items():
            calls = perturb(record, copy.deepcopy(_answers(record)))
            if calls is None:
                continue
            applied[name] += 1
            if _check(record, calls).valid:
                still_valid.append((record["id"], name))
    return applied, still_valid


@pytest.mark.parametrize("category", list(PERTURBED))
def test_every_perturbed_answer_fails(data, category):
    perturbations = dict(PERTURBATIONS)
    if category == "parallel":
        perturbations["a call missing"] = _drop_a_call
    applied, still_valid = _apply_all(data, category, perturbations)
    assert still_valid == []
    assert dict(applied) == PERTURBED[category]


def test_irrelevance_passes_only_without_a_call(data):
    records = data["irrelevance"]
    assert sum(_check(r, []).valid for r in records) == 240
    assert sum(_check(r, [ToolCall(r["functions"][0]["name"], {})]).valid for r in records) == 0
    prose = parse_model_output("None of these functions can compute that.")
    assert sum(_check(r, prose.calls).valid for r in records) == 240


# -- the rules, one at a time ------------------------------------------------------------------
AREA = {
    "name": "area",
    "parameters": {
        "type": "dict",
        "properties": {
            "base": {"type": "float"},
            "sides": {"type": "integer"},
            "unit": {"type": "string"},
            "exact": {"type": "boolean"},
            "point": {"type": "tuple", "items": {"type": "float"}},
            "tags": {"type": "array", "items": {"type": "string"}},
            "shape": {"type": "dict", "properties": {"kind": {"type": "string"}, "n": {"type": "integer"}}},
            "parts": {"type": "array", "items": {"type": "dict"}},
            "data": {"type": "any"},
        },
        "required": ["base"],
    },
}
ANSWER = {
    "base": [10.0],
    "sides": ["", 3],
    "unit": ["square meters", "m2"],
    "exact": ["", True],
    "point": [[1.0, 2.0]],
    "tags": ["", ["New York", "LA"]],
    "shape": ["", {"kind": ["triangle"], "n": ["", 3]}],
    "parts": ["", [{"name": ["a"]}, {"name": ["b"]}]],
    "data": ["", "my_data"],
}
GOOD = {"base": 10.0, "unit": "square meters", "point": [1.0, 2.0]}


def _area(**changes):
    args = {**GOOD, **changes}
    args = {k: v for k, v in args.items() if v is not ...}
    return check([ToolCall("area", args)], [AREA], [{"area": ANSWER}], "simple")


def test_a_correct_call_passes_and_optional_parameters_may_be_given_or_omitted():
    assert _area() == CheckResult(True)
    assert _area(sides=3, exact=True, tags=["new york", "la"], data="my_data").valid


@pytest.mark.parametrize(
    "changes, kind",
    [
        ({"base": 10}, None),  # int accepted where a float is expected
        ({"point": (1, 2)}, None),  # a tuple of ints for a tuple of floats
        ({"unit": "Square-Meters"}, None),  # BFCL's string normalisation
        ({"unit": "square_meters."}, None),
        ({"unit": "square metres"}, "value_error"),
        ({"base": "10"}, "type_error"),
        ({"sides": True}, "type_error"),  # a bool is not an int
        ({"sides": 3.0}, "type_error"),  # nor is a float
        ({"exact": 1}, "type_error"),
        ({"tags": ["New York", 5]}, "type_error"),  # element-wise
        ({"tags": ["LA", "New York"]}, "value_error"),  # lists keep their order
        ({"point": ...}, "missing_optional"),  # the answer gives no "" for it
        ({"base": ...}, "missing_required"),
        ({"colour": "red"}, "unexpected_param"),
        ({"shape": {"kind": "Triangle"}}, None),  # a dict key marked "" may be omitted
        ({"shape": {"kind": "triangle", "n": 3}}, None),
        ({"shape": {"kind": "triangle", "n": "3"}}, "type_error"),  # checked against properties
        ({"shape": {"n": 3}}, "value_error"),  # 'kind' may not be omitted
        ({"shape": {"kind": "triangle", "colour": "red"}}, "value_error"),
        ({"parts": [{"name": "a"}, {"name": "b"}]}, None),
        ({"parts": [{"name": "b"}, {"name": "a"}]}, "value_error"),
        ({"parts": [{"name": "a"}]}, "value_error"),
        ({"data": "MY DATA"}, None),  # 'any': no type, still a possible value
        ({"data": 5}, "value_error"),
    ],
)
def test_each_rule(changes, kind):
    result = _area(**changes)
    assert (result.valid, result.error_kind) == (kind is None, kind)


def test_answer_keys_may_write_a_value_in_another_type_than_the_schema():
    # live_multiple_338-133-2: year is an integer, yet the key allows "dontcare"
    year = {"type": "integer"}
    assert check_param("year", "dontcare", year, ["", "dontcare"]).valid
    assert not check_param("year", "DontCare", year, ["", "dontcare"]).valid  # compared exactly
    assert check_param("name", None, {"type": "string"}, ["", None]).valid


def test_normalize_string_is_bfcls():
    assert normalize_string("April 1, 2024") == normalize_string("april 1 2024") == "april12024"
    assert normalize_string("It's") == 'it"s'
    assert normalize_string("a\tb") == "a\tb"  # BFCL removes spaces only, not tabs


PLAY = {"name": "play", "parameters": {"type": "dict", "properties": {"artist": {"type": "string"}}, "required": ["artist"]}}


def test_parallel_matching_finds_an_order_that_greedy_matching_misses():
    # The first call fits both expected calls; greedy matching would give it to the first.
    truth = [{"play": {"artist": ["Adele", "Queen"]}}, {"play": {"artist": ["Adele"]}}]
    calls = [ToolCall("play", {"artist": "Adele"}), ToolCall("play", {"artist": "Queen"})]
    assert check(calls, [PLAY], truth, "parallel").valid
    assert not check(calls[1:] * 2, [PLAY], truth, "parallel").valid  # Queen twice: one fits nothing


def test_simple_and_multiple_need_exactly_the_expected_calls():
    truth = [{"play": {"artist": ["Adele"]}}]
    one = ToolCall("play", {"artist": "adele"})
    assert check([one], [PLAY], truth, "multiple").valid
    assert check([one, one], [PLAY], truth, "simple").error_kind == "wrong_count"
    assert check([], [PLAY], truth, "simple").error_kind == "wrong_count"
    assert check([one], [PLAY], [], "irrelevance").error_kind == "irrelevance_call"
    with pytest.raises(UserError, match="'stop'"):
        check([one], [PLAY], [{"stop": {}}], "simple")


def test_tool_selection_and_argument_accuracy():
    truth = [{"area": ANSWER}]
    assert tool_selection_correct([ToolCall("area", {})], truth)
    assert not tool_selection_correct([ToolCall("play", {})], truth)
    assert tool_selection_correct([], []) and not tool_selection_correct([ToolCall("area", {})], [])
    assert argument_accuracy([ToolCall("area", GOOD)], [AREA], truth) == 1.0
    # 9 parameters in the answer: base wrong, the 6 optional ones rightly omitted, unit and point right
    assert argument_accuracy([ToolCall("area", {**GOOD, "base": 11.0})], [AREA], truth) == pytest.approx(8 / 9)
    # an unknown parameter joins the count as a wrong one
    assert argument_accuracy([ToolCall("area", {**GOOD, "x": 1})], [AREA], truth) == pytest.approx(9 / 10)
    assert argument_accuracy([ToolCall("play", {"artist": "Adele"})], [AREA, PLAY], truth) == 0.0
    assert argument_accuracy([], [AREA], []) == 1.0 and argument_accuracy([ToolCall("area", {})], [AREA], []) == 0.0


def test_argument_accuracy_of_the_answer_keys_is_one(data):
    for category in ("simple", "multiple", "parallel"):
        for record in data[category]:
            assert argument_accuracy(_answers(record), record["functions"], record["ground_truth"]) == 1.0


# -- formats on the real data ------------------------------------------------------------------
def test_every_answer_survives_each_text_format(data):
    for records in data.values():
        for record in records:
            calls = _answers(record)
            assert parse_model_output(render_python(calls)).calls == calls, record["id"]
            assert parse_model_output(render_json(calls)).calls == calls, record["id"]


def test_records_become_trl_examples_with_json_schema_tools(data):
    example = to_trl_example(data["parallel"][0])
    assert example["messages"][-1]["tool_calls"][1] == {
        "type": "function",
        "function": {"name": "spotify.play", "arguments": {"artist": "Maroon 5", "duration": 15}},
    }
    assert parse_model_output(messages_to_inline(example["messages"])).calls == _answers(data["parallel"][0])
    tools = tool_schemas([AREA])
    properties = tools[0]["function"]["parameters"]["properties"]
    assert tools[0]["function"]["parameters"]["type"] == "object"
    assert (properties["base"]["type"], properties["point"]["type"], properties["point"]["items"]["type"]) == ("number", "array", "number")
    assert "type" not in properties["data"]  # 'any'
    assert to_trl_example(data["irrelevance"][0])["messages"][-1]["role"] == "assistant"


# -- bad input ---------------------------------------------------------------------------------
def _write(folder, stem, lines, answers=None):
    (folder / "possible_answer").mkdir(exist_ok=True)
    (folder / f"BFCL_v4_{stem}.json").write_text("\n".join(lines) + "\n")
    if answers is not None:
        (folder / "possible_answer" / f"BFCL_v4_{stem}.json").write_text("\n".join(answers) + "\n")


GOOD_LINE = '{"id": "simple_python_0", "question": [[{"role": "user", "content": "hi"}]], "function": []}'


@pytest.mark.parametrize(
    "lines, answers, message",
    [
        ([GOOD_LINE, '{"id": "x", "question": [[]],'], [], r"BFCL_v4_simple_python.json line 2: not valid JSON"),
        ([GOOD_LINE, '{"id": "x", "question": []}'], [], r"BFCL_v4_simple_python.json line 2: missing key 'function'"),
        ([GOOD_LINE], ["[1]"], r"possible_answer/BFCL_v4_simple_python.json line 1: expected a JSON object"),
        ([GOOD_LINE], [], r"no answer for example 'simple_python_0'"),
    ],
)
def test_a_bad_data_file_is_one_line_naming_file_and_line(tmp_path, lines, answers, message):
    _write(tmp_path, "simple_python", lines, answers)
    with pytest.raises(UserError, match=message) as info:
        load_category("simple", tmp_path)
    assert "\n" not in str(info.value)


def test_the_newest_file_version_is_read(tmp_path):
    _write(tmp_path, "simple_python", [GOOD_LINE], ['{"id": "simple_python_0", "ground_truth": []}'])
    (tmp_path / "BFCL_v3_simple_python.json").write_text("not json\n")
    assert [r["id"] for r in load_category("simple", tmp_path)] == ["simple_python_0"]


def test_unknown_category_split_or_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown BFCL category 'java'"):
        load_bfcl(["java"])
    with pytest.raises(UserError, match="unknown BFCL split 'dev'"):
        load_bfcl(["simple"], "dev")
    with pytest.raises(UserError, match="no BFCL_v\\*_parallel.json"):
        load_category("parallel", tmp_path)
