"""hybridlm.io.tokenizer against transformers' AutoTokenizer (the oracle) on a tiny Qwen-style tokenizer."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from hybridlm.io.tokenizer import ChatTemplateError, IncrementalDecoder, Tokenizer
from tests.tiny_tokenizer import QWEN_ADDED_TOKENS, TINY_CHAT_TEMPLATE, write_tiny_tokenizer

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

TEXTS = [
    "Hello, world! The model reads a token.",
    "def add(a: int, b: int) -> int:\n    return a + b\n\n\tprint('x')  ",
    "你好，世界。日本語のテキスト 😀🚀 👍🏽 naïve café Ελληνικά",
    "caf\u0065\u0301 (decomposed é, NFC-normalised)",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nhmm\n</think>\n\n<tool_call>x</tool_call><|endoftext|>",
    "   leading spaces, trailing newlines\n\n\n",
    "",
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo actuelle d'une ville — <html> & \"quotes\"",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]

TOOL_CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Zürich for 3 days?"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 3}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bern", "extra": [1, 2]}}},
        ],
    },
    {"role": "tool", "content": '{"temp": 21, "sky": "☀"}'},
    {"role": "tool", "content": '{"temp": 19}'},
    {"role": "assistant", "content": "21°C and sunny."},
    {"role": "user", "content": "Thanks"},
]

# (messages, tools, add_generation_prompt, enable_thinking, extra template kwargs)
CHAT_CASES = {
    "plain": ([{"role": "user", "content": "Hi there"}], None, True, None, {}),
    "system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None, True, None, {}),
    "no_generation_prompt": (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], None, False, None, {},
    ),
    "thinking_off": ([{"role": "user", "content": "2+2?"}], None, True, False, {}),
    "thinking_on": ([{"role": "user", "content": "2+2?"}], None, True, True, {}),
    "tools": (TOOL_CONVERSATION, TOOLS, True, None, {}),
    "tools_without_system": (TOOL_CONVERSATION[1:], TOOLS, True, False, {}),
    "reasoning_content": (
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Add them: 4."},
            {"role": "user", "content": "3+3?"},
        ],
        None, True, None, {},
    ),
    # transformers drops keys whose value is None and aliases `reasoning` to `reasoning_content`.
    "none_values_and_reasoning_alias": (
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "reasoning": "Use the tool.",
             "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": "cold", "name": None},
        ],
        TOOLS, True, None, {},
    ),
    "extra_kwargs": ([{"role": "user", "content": "Hi"}], None, True, None, {"custom_flag": True}),
    # Template kwargs override same-named special tokens; `documents` is passed through.
    "override_special_token": ([{"role": "user", "content": "Hi"}], None, True, None, {"eos_token": "<|x|>"}),
    "documents": ([{"role": "user", "content": "Hi"}], None, True, None, {"documents": [{"title": "t", "text": "x"}]}),
}


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tok(checkpoint_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(checkpoint_dir)


@pytest.fixture(scope="session")
def hf(checkpoint_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(checkpoint_dir))


def hf_render(hf_tokenizer, messages, tools, add_generation_prompt, enable_thinking, kwargs) -> str:
    if enable_thinking is not None:
        kwargs = {**kwargs, "enable_thinking": enable_thinking}
    return hf_tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
    )


# ------------------------------------------------------------------------ text <-> ids
def test_tiny_tokenizer_is_deterministic(tmp_path: Path, checkpoint_dir: Path) -> None:
    size = write_tiny_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (checkpoint_dir / "tokenizer.json").read_bytes()
    assert size == 320 + len(QWEN_ADDED_TOKENS)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf.encode(text, add_special_tokens=True)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_vocab_and_special_tokens(tok: Tokenizer, hf, checkpoint_dir: Path) -> None:
    assert tok.vocab_size == len(hf) == 329
    assert tok.has_chat_template and tok.chat_template == TINY_CHAT_TEMPLATE == hf.chat_template
    for content, special in QWEN_ADDED_TOKENS:
        token_id = tok.token_to_id(content)
        assert token_id == hf.convert_tokens_to_ids(content)
        assert tok.id_to_token(token_id) == content
        assert tok.encode(f"a{content}b")[1:-1] == [token_id]
        # Only the special ones vanish with skip_special_tokens.
        assert tok.decode([token_id], skip_special_tokens=True) == ("" if special else content)
    assert tok.token_to_id("<|not_a_token|>") is None
    assert tok.id_to_token(10**6) is None


def test_stop_and_pad_ids(tok: Tokenizer, hf, tmp_path: Path) -> None:
    im_end, endoftext = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert tok.eos_token_ids == [im_end, endoftext]
    assert tok.pad_token_id == hf.pad_token_id == endoftext
    assert tok.bos_token_id is None and hf.bos_token_id is None
    assert tok.generation_defaults == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}

    write_tiny_tokenizer(tmp_path, eos_in_generation_config=False)
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == [hf.eos_token_id] == [im_end]


def test_decode_rejects_ids_outside_vocab(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="329"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.decode([1.5])


# ------------------------------------------------------------------------ chat template
@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_template_matches_transformers(tok: Tokenizer, hf, case: str) -> None:
    messages, tools, add_generation_prompt, enable_thinking, kwargs = CHAT_CASES[case]
    expected = hf_render(hf, messages, tools, add_generation_prompt, enable_thinking, kwargs)
    got = tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking, **kwargs
    )
    assert got == expected
    assert tok.encode_chat(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking, **kwargs
    ) == hf.encode(expected, add_special_tokens=False)


def test_chat_template_renders_what_the_tests_expect(tok: Tokenizer) -> None:
    # Guards the oracle comparison against both sides rendering the same wrong thing.
    text = tok.apply_chat_template(*CHAT_CASES["tools"][:2], enable_thinking=False)
    assert text.startswith("<|im_start|>system\nYou are terse.\n\nYou may call these tools:\n<tools>\n")
    assert '"description": "Météo actuelle d\'une ville — <html> & \\"quotes\\""' in text
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nZürich\n</parameter>\n" in text
    assert "<parameter=extra>\n[1, 2]\n</parameter>" in text
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 19}\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    reasoning = tok.apply_chat_template(CHAT_CASES["reasoning_content"][0])
    assert "<|im_start|>assistant\n<think>\nAdd them: 4.\n</think>\n\n4<|im_end|>\n" in reasoning


def test_chat_messages_are_not_mutated(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "reasoning": "r"}]
    snapshot = json.dumps(messages)
    tok.apply_chat_template(messages)
    assert json.dumps(messages) == snapshot


def test_raise_exception_becomes_chat_template_error(tok: Tokenizer, hf) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ]
    with pytest.raises(ChatTemplateError, match="tool call arguments must be a mapping, not {}"):
        tok.apply_chat_template(messages)
    assert issubclass(ChatTemplateError, ValueError)
    with pytest.raises(jinja2.TemplateError, match="tool call arguments must be a mapping"):
        hf.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("kwargs", [{}, {"eos_token": "<|x|>", "documents": [{"title": "t"}]}])
def test_template_globals_and_filters(tok: Tokenizer, hf, kwargs: dict) -> None:
    template = (
        "{{ strftime_now('%Y') }}|{{ {'b': 1, 'a': 'é'} | tojson(sort_keys=True) }}|"
        "{{ [1, 2] | tojson(indent=2) }}|{{ '<&>' | tojson }}|{{ dict(a=1) | tojson(separators=(',', ':')) }}|"
        "{{ bos_token is defined }}|{{ eos_token }}|{{ pad_token }}|{{ documents }}|{{ tools }}|"
        "{% for x in [1, 2, 3] %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}|"
        "{% generation %}kept{% endgeneration %}|{{ messages[0] | tojson }}"
    )
    custom = Tokenizer(tok.backend, special_tokens=tok.special_tokens, chat_templates={"default": template})
    messages = [{"role": "user", "content": "x", "reasoning": "r"}]
    got = custom.apply_chat_template(messages, **kwargs)
    assert got == hf.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False, **kwargs
    )
    if not kwargs:
        assert got == (
            f'{datetime.now().year}|{{"a": "é", "b": 1}}|[\n  1,\n  2\n]|"<&>"|{{"a":1}}|False|<|im_end|>|'
            '<|endoftext|>|None|None|1|kept|'
            '{"thinking": "r", "role": "user", "content": "x", "reasoning": "r", "reasoning_content": "r"}'
        )
    sneaky = Tokenizer(tok.backend, chat_templates={"default": "{% set ns = namespace(_x=1) %}"})
    with pytest.raises(ChatTemplateError):
        sneaky.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_file_overrides_config(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    messages = [{"role": "user", "content": "hé"}]
    got = Tokenizer.from_dir(tmp_path).apply_chat_template(messages)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert got == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == "[user] hé\n>"


def test_named_chat_templates(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "default:{{ messages[0].content }}"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}:{{ messages[0].content }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "q"}]
    for tools in (None, TOOLS):
        expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(messages, tools=tools) == expected
    assert tok.apply_chat_template(messages, tools=TOOLS) == "tools:1:q"


# ------------------------------------------------------------------------ errors
def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*" + str(tmp_path.name)):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_malformed_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json could not be loaded"):
        Tokenizer.from_dir(tmp_path)
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "<|im_end|>"}')
    with pytest.raises(ValueError, match="generation_config.json: token ids"):
        Tokenizer.from_dir(tmp_path)


def test_no_chat_template(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.has_chat_template and tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.encode("hi") == Tokenizer.from_dir(tmp_path).encode("hi")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty conversation"),
        ("hello", "must be a list"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], r"messages\[1\] needs a string 'role'"),
        ([{"role": 3, "content": "a"}], r"messages\[0\] needs a string 'role'"),
    ],
)
def test_bad_messages(tok: Tokenizer, messages, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_bad_tools(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"tools\[0\] must be a dict"):
        tok.apply_chat_template([{"role": "user", "content": "a"}], tools=["get_weather"])


# ------------------------------------------------------------------------ streaming
def stream(decoder: IncrementalDecoder, ids: list[int]) -> tuple[list[str], str]:
    deltas = [decoder.push(token_id) for token_id in ids]
    return deltas, decoder.flush()


@pytest.mark.parametrize("text", TEXTS + ["ü" * 7 + "中文字符" * 5 + "😀👍🏽" * 4 + "é"])
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_incremental_decoder_matches_decode(tok: Tokenizer, text: str, skip_special_tokens: bool) -> None:
    ids = tok.encode(text)
    decoder = tok.incremental_decoder(skip_special_tokens=skip_special_tokens)
    deltas, tail = stream(decoder, ids)
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in delta for delta in deltas), deltas
    assert tail == ""  # every text ends on a whole character, so nothing is left to flush


def test_incremental_decoder_splits_multibyte_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])  # the case this decoder exists for
    decoder = tok.incremental_decoder()
    assert [decoder.push(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    # A stream cut mid-character flushes what it has, exactly like decode().
    decoder = tok.incremental_decoder()
    assert decoder.push(ids[0]) == ""
    assert decoder.flush() == tok.decode(ids[:1])


def test_incremental_decoder_window_stays_short_on_replacement_chars(tok: Tokenizer) -> None:
    # Real U+FFFD characters make every prefix end in U+FFFD; the decoder must still release text.
    ids = tok.encode("x" + "\ufffd" * 40 + "y")
    decoder = tok.incremental_decoder()
    deltas = []
    for token_id in ids:
        deltas.append(decoder.push(token_id))
        assert len(decoder._ids) <= 2 * IncrementalDecoder.MAX_HELD_TOKENS
    assert "".join(deltas) + decoder.flush() == tok.decode(ids)
    assert "\ufffd" * 20 in "".join(deltas)
