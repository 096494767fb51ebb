"""History rendering: each turn's prompt starts with the previous prompt and answer, token for token."""
from __future__ import annotations

import copy
import random

from hybridlm.io.tokenizer import Tokenizer
from hybridlm.serve.chat import ChatRenderer, answer_key

import pytest


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


def random_answer(tokenizer, n: int, seed: int) -> list[int]:
    """Token ids a model might emit: not what BPE would give for their text, and without special tokens."""
    rng = random.Random(seed)
    return [rng.randrange(0, 300) for _ in range(n)]


def test_second_turn_starts_with_first_prompt_and_answer(tokenizer):
    renderer = ChatRenderer(tokenizer)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    for turn, thinking in enumerate([True, False, None]):
        kwargs = {} if thinking is None else {"enable_thinking": thinking}
        first = renderer.render(conversation, template_kwargs=kwargs)
        answer = random_answer(tokenizer, 23, seed=turn)
        text = tokenizer.decode(answer)
        renderer.remember(first.token_ids, answer, text, [], None)
        conversation = conversation + [{"role": "assistant", "content": text},
                                       {"role": "user", "content": f"and then {turn}?"}]
        second = renderer.render(conversation, template_kwargs=kwargs)
        assert second.token_ids[: len(first.token_ids) + len(answer)] == first.token_ids + answer
        assert second.num_spliced == turn + 1  # every earlier answer of the conversation


def test_tool_call_turn_is_spliced(tokenizer):
    renderer = ChatRenderer(tokenizer)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "call f"}]
    first = renderer.render(messages, tools)
    answer = tokenizer.encode("<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>")
    renderer.remember(first.token_ids, answer, None, [("f", '{"a": 1}')], None)
    messages += [{"role": "assistant", "content": None,
                  "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    second = renderer.render(messages, tools)
    assert second.num_spliced == 1
    assert second.token_ids[: len(first.token_ids) + len(answer)] == first.token_ids + answer


def test_unknown_or_changed_answers_fall_back_to_the_template(tokenizer):
    renderer = ChatRenderer(tokenizer)
    messages = [{"role": "user", "content": "Hi"}]
    first = renderer.render(messages)
    renderer.remember(first.token_ids, tokenizer.encode("Hello!"), "Hello!", [], "thought")
    plain = tokenizer.encode_chat(messages + [{"role": "assistant", "content": "Other"}, {"role": "user", "content": "x"}])
    edited = renderer.render(messages + [{"role": "assistant", "content": "Other"}, {"role": "user", "content": "x"}])
    assert edited.num_spliced == 0 and edited.token_ids == plain
    # same answer after a different prompt, or with different reasoning: not spliced
    other = renderer.render([{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Hello!"},
                             {"role": "user", "content": "x"}])
    assert other.num_spliced == 0
    wrong = renderer.render(messages + [{"role": "assistant", "content": "Hello!", "reasoning_content": "no"},
                                        {"role": "user", "content": "x"}])
    assert wrong.num_spliced == 0
    right = renderer.render(messages + [{"role": "assistant", "content": "Hello!", "reasoning_content": "thought"},
                                        {"role": "user", "content": "x"}])
    assert right.num_spliced == 1


def test_memory_is_bounded(tokenizer):
    renderer = ChatRenderer(tokenizer, max_turns=10, max_tokens=10_000)
    prompt = renderer.render([{"role": "user", "content": "Hi"}]).token_ids
    for i in range(50):
        renderer.remember(prompt, [1] * 100, f"answer {i}", [], None)
    assert renderer._num_turns <= 10 and renderer._num_tokens <= 10_000
    assert len(renderer._turns) <= 10


def test_answer_key_ignores_argument_formatting():
    assert answer_key("", [("f", '{"b": 1, "a": 2}')]) == answer_key(None, [("f", {"a": 2, "b": 1})])
    assert answer_key("x", []) != answer_key("y", [])


# Written for this test (not Qwen's text), with the behaviours of Qwen3 / Qwen3.5 templates that break
# prefix reuse: reasoning of assistant turns before the last user message is dropped, reasoning may come
# inside the content (split at </think>), and the generation prompt opens the think block itself.
REUSE_BREAKING_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m.role == 'assistant' %}
{%- set content = m.content or '' %}
{%- set reasoning = m.reasoning_content or '' %}
{%- if '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip() %}
{%- set content = content.split('</think>')[-1].lstrip() %}
{%- endif %}
{%- if loop.index0 > ns.last_user %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
{%- endif %}
{%- else %}
{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{% else %}{{- '<think>\\n' }}{% endif %}
{%- endif %}
"""


def test_splicing_repairs_a_template_that_breaks_reuse(tokenizer):
    qwen_like = copy.copy(tokenizer)
    qwen_like.chat_templates = {"default": REUSE_BREAKING_TEMPLATE}
    renderer = ChatRenderer(qwen_like)
    conversation = [{"role": "user", "content": "What is 2 + 2?"}]
    first = renderer.render(conversation)
    assert first.starts_in_reasoning  # the prompt ends inside <think>: the parser starts in reasoning
    generated = "Simple arithmetic.\n</think>\n\nIt is 4."
    answer = qwen_like.encode(generated)
    renderer.remember(first.token_ids, answer, "It is 4.", [], "Simple arithmetic.")
    conversation += [{"role": "assistant", "content": "It is 4.", "reasoning_content": "Simple arithmetic."},
                     {"role": "user", "content": "And 3 + 3?"}]
    plain = qwen_like.encode_chat(conversation)
    assert plain[: len(first.token_ids) + len(answer)] != first.token_ids + answer  # the template's own render
    second = renderer.render(conversation)
    assert second.num_spliced == 1
    assert second.token_ids[: len(first.token_ids) + len(answer)] == first.token_ids + answer
    assert qwen_like.decode(second.token_ids).endswith("<|im_start|>user\nAnd 3 + 3?<|im_end|>\n<|im_start|>assistant\n<think>\n")
