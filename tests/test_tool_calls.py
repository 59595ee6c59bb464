"""Tool calls: the inline markup, TRL chat messages, and the parser of model output."""
import pytest

from skillstream.errors import UserError
from skillstream.tools.calls import (
    ToolCall,
    calls_to_message,
    inline_to_messages,
    message_to_calls,
    messages_to_inline,
    parse_inline,
    parse_model_output,
    render_call,
    render_inline,
    render_json,
    render_python,
)

AREA = ToolCall("triangle.area", {"base": 10, "height": 5.5, "unit": "cm"})
WEATHER = ToolCall("get_weather", {"city": "Paris", "days": [1, 2], "opts": {"metric": True, "lang": None}})


# -- model output: every accepted format gives the same calls --------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "<tool>triangle.area(base=10, height=5.5, unit='cm')</tool>",
        'triangle.area(base=10, height=5.5, unit="cm")',
        "[triangle.area(base=10, height=5.5, unit='cm')]",
        '{"name": "triangle.area", "arguments": {"base": 10, "height": 5.5, "unit": "cm"}}',
        '[{"name": "triangle.area", "arguments": {"base": 10, "height": 5.5, "unit": "cm"}}]',
        '<function_call>{"name": "triangle.area", "arguments": {"base": 10, "height": 5.5, "unit": "cm"}}</function_call>',
        '<tool_call>\n{"name": "triangle.area", "arguments": {"base": 10, "height": 5.5, "unit": "cm"}}\n</tool_call>',
        # OpenAI's wrapper, with the arguments as a JSON string
        '{"type": "function", "function": {"name": "triangle.area", "arguments": "{\\"base\\": 10, \\"height\\": 5.5, \\"unit\\": \\"cm\\"}"}}',
        "```python\ntriangle.area(base=10, height=5.5, unit='cm')\n```",
        "Sure. <tool>triangle.area(base=10, height=5.5, unit='cm')</tool> That is all.",
        "{'name': 'triangle.area', 'parameters': {'base': 10, 'height': 5.5, 'unit': 'cm'}}",
    ],
)
def test_every_format_gives_the_same_call(text):
    assert parse_model_output(text).calls == [AREA]
    assert parse_model_output(text).format_errors == []


def test_python_calls_accept_json_spellings_and_nested_literals():
    out = parse_model_output("[get_weather(city='Paris', days=[1, 2], opts={'metric': true, 'lang': null}), f(x=-3, y=(1, 2))]")
    assert out.calls == [WEATHER, ToolCall("f", {"x": -3, "y": [1, 2]})]
    assert out.format_errors == []


def test_several_tagged_blocks_are_read_in_order():
    text = "<tool>a(x=1)</tool> and <function_call>{\"name\": \"b\", \"arguments\": {}}</function_call>"
    assert parse_model_output(text).calls == [ToolCall("a", {"x": 1}), ToolCall("b", {})]


def test_prose_and_empty_answers_are_no_calls_and_no_errors():
    for text in ["", "   ", "I cannot help with that: no function fits.", "I (the assistant) decline.", "[]"]:
        out = parse_model_output(text)
        assert (out.calls, out.format_errors) == ([], [])


@pytest.mark.parametrize(
    "text, n_calls, n_errors",
    [
        ("f(a=)", 0, 1),  # syntax error
        ("[f(a=1), g(b=]", 0, 1),  # one unparseable payload is one error
        ("[f(a=1), 3, g(b=2)]", 2, 1),  # the good calls are kept
        ("f(1, 2)", 0, 1),  # positional arguments: BFCL needs names
        ("f(a=x)", 0, 1),  # a variable is not a literal
        ("f(a=os.system('rm -rf /'))", 0, 1),  # read, never run
        ("f(**kw)", 0, 1),
        ("<tool>f(a=1)", 0, 1),  # cut off before </tool>
        ("<tool>f(a=1)</tool><tool>g(", 1, 1),
        ('{"arguments": {"a": 1}}', 0, 1),  # no name
        ('{"name": "f", "arguments": "{bad json"}', 0, 1),
        ('{"name": "f", "arguments": [1, 2]}', 0, 1),
        ('[{"name": "f", "arguments": {}}, {"name": ""}]', 1, 1),
        ("<function_call>not json</function_call>", 0, 1),
        ("{[1]: 2}", 0, 1),  # unhashable key
        ("[" * 5000 + "]" * 5000, 0, 1),  # too deep to parse
        ("f(a='\x00')", 0, 1),
    ],
)
def test_malformed_calls_are_counted_not_raised(text, n_calls, n_errors):
    out = parse_model_output(text)
    assert (len(out.calls), len(out.format_errors)) == (n_calls, n_errors)


def test_no_truncation_of_an_answer_makes_the_parser_raise():
    text = render_python([AREA, WEATHER]) + render_inline(WEATHER) + render_json([AREA])
    for end in range(len(text) + 1):
        parse_model_output(text[:end])  # any exception fails the test


# -- rendering and parsing round-trips ---------------------------------------------------------
CALLS = [
    AREA,
    WEATHER,
    ToolCall("no_args", {}),
    ToolCall("quote", {"text": "it's \"quoted\"\nand multi-line", "emoji": "café ☕"}),
    ToolCall("numbers", {"tiny": 1e-12, "big": 10**30, "neg": -0.5, "flag": False}),
    ToolCall("get-weather", {"Content-Type": "json"}),  # not Python names: rendered as JSON
    ToolCall("keyword", {"class": 1}),
]


@pytest.mark.parametrize("call", CALLS)
def test_render_then_parse_gives_the_call_back(call):
    assert parse_model_output(render_python([call])).calls == [call]
    assert parse_model_output(render_json([call])).calls == [call]
    assert parse_model_output(render_inline(call)).calls == [call]
    assert parse_inline(render_inline(call, result="ok")) == ([call], [])


def test_render_call_spells_python_where_it_can():
    assert render_call(AREA) == "triangle.area(base=10, height=5.5, unit='cm')"
    assert render_call(ToolCall("get-weather", {"a": 1})) == '{"name": "get-weather", "arguments": {"a": 1}}'
    assert render_inline(AREA, "27.5") == "<tool>triangle.area(base=10, height=5.5, unit='cm')</tool><result>27.5</result>"


def test_parse_inline_counts_malformed_and_unclosed_calls():
    text = "a <tool>f(a=1)</tool><result>2</result> b <tool>g(1)</tool> c <tool>h("
    calls, errors = parse_inline(text)
    assert calls == [ToolCall("f", {"a": 1})]
    assert len(errors) == 2


# -- inline markup <-> TRL messages ------------------------------------------------------------
def test_a_toolformer_sentence_becomes_a_call_a_result_and_the_rest_of_the_answer():
    text = "The area is <tool>triangle.area(base=10, height=5.5, unit='cm')</tool><result>27.5</result> square cm."
    assert inline_to_messages(text, user="Area of a 10 by 5.5 triangle?") == [
        {"role": "user", "content": "Area of a 10 by 5.5 triangle?"},
        {
            "role": "assistant",
            "content": "The area is ",
            "tool_calls": [
                {"type": "function", "function": {"name": "triangle.area", "arguments": {"base": 10, "height": 5.5, "unit": "cm"}}}
            ],
        },
        {"role": "tool", "name": "triangle.area", "content": "27.5"},
        {"role": "assistant", "content": " square cm."},
    ]


def test_parallel_calls_share_one_assistant_message_and_results_follow_in_order():
    text = "<tool>a(x=1)</tool>\n<tool>b(y=2)</tool>\n<result>one</result>\n<result>two</result>Done."
    messages = inline_to_messages(text)
    assert [m["role"] for m in messages] == ["assistant", "tool", "tool", "assistant"]
    assert message_to_calls(messages[0]) == [ToolCall("a", {"x": 1}), ToolCall("b", {"y": 2})]
    assert [(m["name"], m["content"]) for m in messages[1:3]] == [("a", "one"), ("b", "two")]


CONVERSATIONS = [
    "The area is <tool>triangle.area(base=10, height=5.5, unit='cm')</tool><result>27.5</result> square cm.",
    "<tool>a(x=1)</tool><tool>b(y=[1, 2])</tool><result>1</result><result>2</result>Both done.",
    "First <tool>a(x=1)</tool><result>1</result>then <tool>b(y=2)</tool><result>2</result>",
    "<tool>a(x=1)</tool><tool>b(y=2)</tool>",  # calls still waiting for results
    '<tool>{"name": "get-weather", "arguments": {"Content-Type": "json"}}</tool><result>{"t": 21}</result>It is 21°C.',
    "No tool needed here.",
]


@pytest.mark.parametrize("text", CONVERSATIONS)
def test_inline_to_messages_and_back_is_the_identity(text):
    messages = inline_to_messages(text, user="hi")
    assert messages_to_inline(messages) == text
    assert inline_to_messages(messages_to_inline(messages), user="hi") == messages


def test_messages_with_openai_string_arguments_are_read():
    message = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    assert messages_to_inline([{"role": "system", "content": "s"}, message]) == "<tool>f(a=1)</tool>"
    assert calls_to_message(message_to_calls(message)) == calls_to_message([ToolCall("f", {"a": 1})])


@pytest.mark.parametrize(
    "text, problem",
    [
        ("<result>5</result>", "does not follow a <tool> call"),
        ("<tool>f(a=1)</tool><result>1</result><result>2</result>", "does not follow a <tool> call"),
        ("<tool>f(1)</tool>", "positional"),
        ("<tool>f(a=1)", "unclosed <tool>"),
    ],
)
def test_bad_inline_training_text_is_a_one_line_user_error(text, problem):
    with pytest.raises(UserError, match=problem) as info:
        inline_to_messages(text)
    assert "\n" not in str(info.value)


def test_a_user_turn_after_the_assistant_cannot_be_written_inline():
    messages = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(UserError, match="'user' message"):
        messages_to_inline(messages)
