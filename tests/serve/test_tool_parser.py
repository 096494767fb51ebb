"""The streaming tool-call / reasoning parser over a corpus of real-world model outputs.

Every case is checked whole and split into deltas of many sizes (and at random): the parser must give
the same reasoning, content and calls however the text arrives, and the streamed argument fragments must
concatenate to the final JSON.
"""
from __future__ import annotations

import json
import random

import pytest

from hybridlm.serve.tool_parser import OutputParser, coerce_value

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "threshold": {"type": "number"}, "tags": {"type": "array"}, "options": {"type": "object"},
        "note": {"type": ["string", "null"]}}}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "run_code", "parameters": {"type": "object", "properties": {
        "code": {"type": "string"}}}}},
]


def xml(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


# (id, text, start_in_reasoning, expected content, expected reasoning, expected calls [(name, args)])
CORPUS = [
    ("xml-single", xml("get_weather", city="Paris", days="3"), False,
     "", "", [("get_weather", {"city": "Paris", "days": 3})]),
    ("xml-after-think", "<think>\nThe user asks about Paris.\n</think>\n\n" + xml("get_weather", city="Paris"), False,
     "", "The user asks about Paris.", [("get_weather", {"city": "Paris"})]),
    ("xml-think-opened-by-prompt", "Need the weather.\n</think>\n\n" + xml("get_weather", city="Oslo"), True,
     "", "Need the weather.", [("get_weather", {"city": "Oslo"})]),
    ("xml-inside-think", "<think>\nI will call it now " + xml("get_weather", city="Rome") + "\n</think>\n\nDone.",
     False, "Done.", "I will call it now ", [("get_weather", {"city": "Rome"})]),
    ("xml-unclosed-think", "Thinking about it\n" + xml("search", query="gdn"), True,
     "", "Thinking about it", [("search", {"query": "gdn"})]),
    ("text-before-call", "Let me check the weather for you.\n\n" + xml("get_weather", city="Lima"), False,
     "Let me check the weather for you.", "", [("get_weather", {"city": "Lima"})]),
    ("text-after-call", xml("search", query="x") + "\n\nI searched.", False,
     "I searched.", "", [("search", {"query": "x"})]),
    ("several-calls", xml("get_weather", city="Paris") + "\n" + xml("search", query="louvre", limit="5"), False,
     "", "", [("get_weather", {"city": "Paris"}), ("search", {"query": "louvre", "limit": 5})]),
    ("several-functions-one-block",
     "<tool_call>\n<function=search>\n<parameter=query>\na\n</parameter>\n</function>\n"
     "<function=search>\n<parameter=query>\nb\n</parameter>\n</function>\n</tool_call>", False,
     "", "", [("search", {"query": "a"}), ("search", {"query": "b"})]),
    ("coercion", xml("get_weather", city="Paris", days="7", metric="False", threshold="2.5", tags='["a", "b"]',
                     options="{'unit': 'C', 'hourly': True}", note="null"), False,
     "", "", [("get_weather", {"city": "Paris", "days": 7, "metric": False, "threshold": 2.5, "tags": ["a", "b"],
                               "options": {"unit": "C", "hourly": True}, "note": None})]),
    ("non-json-values", xml("get_weather", city="New York, NY", days="three", tags="not a list"), False,
     "", "", [("get_weather", {"city": "New York, NY", "days": "three", "tags": "not a list"})]),
    ("string-keeps-markup", xml("run_code", code="if a < b:\n    print('<b>')"), False,
     "", "", [("run_code", {"code": "if a < b:\n    print('<b>')"})]),
    ("integer-looking-string", xml("search", query="2024"), False, "", "", [("search", {"query": "2024"})]),
    ("no-parameters", "<tool_call>\n<function=search>\n</function>\n</tool_call>", False,
     "", "", [("search", {})]),
    ("json-form", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": "2"}}\n</tool_call>',
     False, "", "", [("get_weather", {"city": "Rome", "days": 2})]),
    ("json-arguments-as-string",
     '<tool_call>\n{"name": "search", "arguments": "{\\"query\\": \\"q\\", \\"limit\\": 3}"}\n</tool_call>', False,
     "", "", [("search", {"query": "q", "limit": 3})]),
    ("json-python-literals", "<tool_call>\n{'name': 'get_weather', 'arguments': {'city': 'Kyiv', 'metric': True}}\n"
     "</tool_call>", False, "", "", [("get_weather", {"city": "Kyiv", "metric": True})]),
    ("json-two-calls", '<tool_call>\n{"name": "search", "arguments": {"query": "a"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "search", "arguments": {"query": "b"}}\n</tool_call>', False,
     "", "", [("search", {"query": "a"}), ("search", {"query": "b"})]),
    ("json-stray-brace", '<tool_call>\n{"name": "search", "arguments": {"query": "a"}}}\n</tool_call>', False,
     "", "", [("search", {"query": "a"})]),
    ("json-unclosed-at-eos", '<tool_call>\n{"name": "search", "arguments": {"query": "a"}}\n', False,
     "", "", [("search", {"query": "a"})]),
    ("stray-closing-tags", "Here.</tool_call>\n" + xml("search", query="s") + "</tool_call></function>", False,
     "Here.", "", [("search", {"query": "s"})]),
    ("stray-parameter-close", "<tool_call>\n<function=search>\n</parameter>\n<parameter=query>\nq\n</parameter>\n"
     "</function>\n</tool_call>", False, "", "", [("search", {"query": "q"})]),
    ("missing-parameter-close", "<tool_call>\n<function=search>\n<parameter=query>\nq\n<parameter=limit>\n2\n"
     "</function>\n</tool_call>", False, "", "", [("search", {"query": "q", "limit": 2})]),
    ("missing-function-close", "<tool_call>\n<function=search>\n<parameter=query>\nq\n</parameter>\n</tool_call>",
     False, "", "", [("search", {"query": "q"})]),
    ("missing-tool-call-close", "<tool_call>\n<function=search>\n<parameter=query>\nq\n</parameter>\n</function>\n"
     "Anything else?", False, "Anything else?", "", [("search", {"query": "q"})]),
    ("bare-function", "<function=search>\n<parameter=query>\nq\n</parameter>\n</function>\nok", False,
     "ok", "", [("search", {"query": "q"})]),
    ("next-call-before-close", "<tool_call>\n<function=search>\n<parameter=query>\na\n</parameter>\n</function>\n"
     + xml("search", query="b"), False, "", "", [("search", {"query": "a"}), ("search", {"query": "b"})]),
    ("truncated-in-value", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
     "<parameter=days>\n1", False, "", "", [("get_weather", {"city": "Paris"})]),
    ("truncated-in-name", "Calling.\n<tool_call>\n<function=get_wea", False,
     "Calling.\n<tool_call>\n<function=get_wea", "", []),
    ("truncated-after-open", "ok <tool_call>", False, "ok <tool_call>", "", []),
    ("truncated-json", 'x\n<tool_call>\n{"name": "search", "argum', False,
     'x\n<tool_call>\n{"name": "search", "argum', "", []),
    ("malformed-json-is-text", 'A\n<tool_call>\n{"name": "search", "arguments": {"query": }\n</tool_call>\nB', False,
     'A\n<tool_call>\n{"name": "search", "arguments": {"query": }\n</tool_call>\nB', "", []),
    ("not-a-call-is-text", "Use <tool_call>tags</tool_call> like this.", False,
     "Use <tool_call>tags</tool_call> like this.", "", []),
    ("bad-function-name-is-text", "<tool_call>\n<function=>\n</function>\n</tool_call> after", False,
     "<tool_call>\n<function=>\n</function>\n</tool_call> after", "", []),
    ("unknown-tool-kept", xml("launch_rockets", count="3"), False, "", "", [("launch_rockets", {"count": "3"})]),
    ("plain-answer", "<think>\n\n</think>\n\nParis is the capital of France.", False,
     "Paris is the capital of France.", "", []),
    ("unicode", "<think>\n考虑一下 😀\n</think>\n\n" + xml("search", query="café 東京"), False,
     "", "考虑一下 😀", [("search", {"query": "café 東京"})]),
    ("angle-brackets-in-text", "a < b and c > d, <b>bold</b> <tool", False, "a < b and c > d, <b>bold</b> <tool",
     "", []),
]


def parse(text: str, pieces: list[str], start_in_reasoning: bool, **kwargs):
    parser = OutputParser(TOOLS, start_in_reasoning=start_in_reasoning, **kwargs)
    content = reasoning = ""
    arguments: dict[int, str] = {}
    names: dict[int, str] = {}
    deltas = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    for delta in deltas:
        content += delta.content
        reasoning += delta.reasoning
        for call in delta.tool_calls:
            if call.name is not None:
                assert call.index not in names and call.id
                names[call.index] = call.name
            arguments[call.index] = arguments.get(call.index, "") + call.arguments
    assert "".join(pieces) == text
    streamed = [(names[i], json.loads(arguments[i])) for i in sorted(names)]
    final = [(c.name, json.loads(c.arguments)) for c in parser.calls]
    assert streamed == final  # the deltas add up to the calls
    return content, reasoning, final, parser


def splits(text: str, seed: int) -> list[list[str]]:
    ways = [[text]] + [[text[i:i + n] for i in range(0, len(text), n)] for n in (1, 2, 3, 5, 8, 13)]
    rng = random.Random(seed)
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        ways.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return ways


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_whole_and_streamed(case):
    name, text, in_reasoning, content, reasoning, calls = case
    for seed, pieces in enumerate(splits(text, seed=hash(name) % 1000)):
        got_content, got_reasoning, got_calls, _ = parse(text, pieces, in_reasoning)
        assert (got_content, got_reasoning, got_calls) == (content, reasoning, calls), f"split {seed}: {pieces}"


def test_repairs_leave_warnings_and_clean_output_leaves_none():
    _, _, _, clean = parse(CORPUS[0][1], [CORPUS[0][1]], False)
    assert clean.warnings == []
    for case_id in ("stray-closing-tags", "truncated-in-value", "malformed-json-is-text", "non-json-values"):
        text = next(c[1] for c in CORPUS if c[0] == case_id)
        _, _, _, parser = parse(text, [text], False)
        assert parser.warnings, case_id


def test_tools_off_leaves_calls_in_content():
    text = "<think>\nr\n</think>\n\n" + xml("search", query="q")
    parser = OutputParser(TOOLS, parse_tools=False)
    delta = parser.feed(text)
    delta += parser.finish()
    assert delta.reasoning == "r" and delta.content == xml("search", query="q") and parser.calls == []


def test_parallel_tool_calls_false_keeps_the_first():
    text = xml("search", query="a") + xml("search", query="b")
    _, _, calls, parser = parse(text, [text], False, max_calls=1)
    assert calls == [("search", {"query": "a"})]
    assert any("parallel_tool_calls" in w for w in parser.warnings)


def test_streamed_call_announces_name_before_arguments():
    parser = OutputParser(TOOLS)
    first = parser.feed("<tool_call>\n<function=search>\n")
    assert [(c.name, c.arguments) for c in first.tool_calls] == [("search", "")]
    second = parser.feed("<parameter=query>\nq\n</parameter>\n")
    assert [(c.name, c.arguments) for c in second.tool_calls] == [(None, '{"query": "q"')]


@pytest.mark.parametrize("text, schema, value", [
    ("5", {"type": "integer"}, 5), ("5.0", {"type": "integer"}, 5), ("-3", {"type": "number"}, -3),
    ("1e3", {"type": "number"}, 1000.0), ("TRUE", {"type": "boolean"}, True), ("x", {"type": "integer"}, "x"),
    ("null", {"type": ["integer", "null"]}, None), ("7", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, 7),
    ("[1, 2]", {"type": "array"}, [1, 2]), ("{}", {"type": "object"}, {}), ("7", None, "7"),
    (" spaced ", {"type": "string"}, " spaced "), ("b", {"enum": ["a", "b"]}, "b"), ("2", {"enum": [1, 2]}, 2),
])
def test_coercion(text, schema, value):
    assert coerce_value(text, schema)[0] == value
