"""Chat prompts: OpenAI messages -> the checkpoint's chat template -> token ids, with history rendered so
that each turn's prompt starts with the previous turn's prompt and answer, token for token.

Why: Qwen's templates re-render earlier assistant turns differently from how they were generated (the
think block dropped or emptied, tool calls re-serialised), and BPE re-tokenises generated text its own
way, so a plain re-render of the history is not a prefix of what the engine cached and the prefix cache
misses turn after turn (USERS.md item 2). The renderer remembers, per answer it served, the exact tokens
of the assistant turn (the generation prompt it ended with plus the generated ids), keyed by what the
client gets back (content and tool calls) and by a digest of the prompt before it. When a conversation
comes back with that answer in its history, after that same prompt, the answer's tokens are spliced in
verbatim; anything else is rendered by the template as usual. ChatML templates only (`<|im_start|>`).
"""
from __future__ import annotations

import hashlib
import json
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from hybridlm.serve.protocol import ChatMessage

ASSISTANT_HEADER = "<|im_start|>assistant"
_PLACEHOLDER = "\ue000hybridlm-turn-{}\ue001"  # private-use characters: no template or text makes them


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as chat-template messages. Raises ValueError for what the templates cannot take."""
    result = []
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": _text(message.content, index)}
        if message.name is not None:
            entry["name"] = message.name
        if role == "assistant":
            reasoning = message.reasoning_content if message.reasoning_content is not None else message.reasoning
            if reasoning:
                entry["reasoning_content"] = reasoning
            if message.tool_calls:
                entry["tool_calls"] = [_template_call(call, index) for call in message.tool_calls]
        elif message.tool_calls:
            raise ValueError(f"messages[{index}]: only assistant messages carry tool_calls")
        if role == "tool":
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
        if entry["content"] is None and role != "assistant":
            raise ValueError(f"messages[{index}]: a {role} message needs content")
        result.append(entry)
    return result


def _text(content: str | list[dict[str, Any]] | None, index: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"messages[{index}]: content part of type {part.get('type')!r} is not supported "
                             "(text only)")
        parts.append(part["text"])
    return "\n".join(parts)


def _template_call(call, index: int) -> dict[str, Any]:
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:  # templates iterate the arguments, so they must be a mapping
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"messages[{index}].tool_calls: arguments are not valid JSON: {error}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"messages[{index}].tool_calls: arguments must be a JSON object")
    entry = {"type": "function", "function": {"name": call.function.name, "arguments": arguments}}
    if call.id is not None:
        entry["id"] = call.id
    return entry


def answer_key(content: str | None, tool_calls: list[tuple[str, Any]]) -> bytes:
    """What identifies an assistant answer as the client echoes it: its content and its calls."""
    calls = []
    for name, arguments in tool_calls:
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        calls.append([name, json.dumps(arguments, sort_keys=True, ensure_ascii=False)])
    data = json.dumps([content or "", calls], ensure_ascii=False).encode()
    return hashlib.blake2b(data, digest_size=16).digest()


def _message_key(message: dict[str, Any]) -> bytes:
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    return answer_key(message.get("content"), calls)


def _ids_bytes(ids) -> bytes:
    return array("q", ids).tobytes()


@dataclass(frozen=True)
class _Turn:
    prefix_length: int  # prompt tokens before the assistant header
    prefix_digest: bytes
    answer_ids: array  # header + generation prompt + generated tokens (without the stop token)
    reasoning: str


@dataclass
class RenderedChat:
    token_ids: list[int]
    text: str  # the template's text (spliced turns appear as placeholders)
    num_spliced: int  # assistant turns taken verbatim from earlier answers

    @property
    def starts_in_reasoning(self) -> bool:
        """The generation prompt opened a think block (Qwen3.5 with thinking on ends it with <think>)."""
        tail = self.text[self.text.rfind(ASSISTANT_HEADER):] if ASSISTANT_HEADER in self.text else self.text
        return tail.rfind("<think>") > tail.rfind("</think>")


class ChatRenderer:
    """Renders conversations; remembers answers (bounded: `max_turns` and `max_tokens` in all)."""

    def __init__(self, tokenizer, max_turns: int = 4096, max_tokens: int = 1 << 22) -> None:
        self.tokenizer = tokenizer
        self.max_turns, self.max_tokens = max_turns, max_tokens
        self._turns: OrderedDict[bytes, list[_Turn]] = OrderedDict()
        self._num_turns = self._num_tokens = 0
        self._header_id = tokenizer.token_to_id("<|im_start|>")

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
               template_kwargs: dict[str, Any] | None = None) -> RenderedChat:
        kwargs = dict(template_kwargs or {})
        candidates = {}
        if self._header_id is not None:
            for i, message in enumerate(messages):
                if message["role"] == "assistant" and (turns := self._turns.get(_message_key(message))):
                    candidates[i] = turns
        while True:
            shown = [{"role": "assistant", "content": _PLACEHOLDER.format(i)} if i in candidates else m
                     for i, m in enumerate(messages)]
            text = self.tokenizer.apply_chat_template(shown, tools=tools, add_generation_prompt=True, **kwargs)
            ids, cursor, failed = self._splice(text, messages, candidates)
            if failed is None:
                break
            del candidates[failed]  # render that turn through the template instead
        ids += self.tokenizer.encode(text[cursor:])
        return RenderedChat(ids, text, len(candidates))

    def _splice(self, text: str, messages: list[dict], candidates: dict[int, list[_Turn]]):
        ids: list[int] = []
        digest = hashlib.blake2b(digest_size=16)
        cursor = 0
        for i in sorted(candidates):
            placeholder = _PLACEHOLDER.format(i)
            position = text.find(placeholder, cursor)
            start = text.rfind(ASSISTANT_HEADER, cursor, position) if position >= 0 else -1
            if start < 0:
                return ids, cursor, i
            # text split at <|im_start|> (a special token) encodes exactly as the whole would
            segment = self.tokenizer.encode(text[cursor:start])
            ids += segment
            digest.update(_ids_bytes(segment))
            reasoning = messages[i].get("reasoning_content")
            turn = next((t for t in candidates[i] if t.prefix_length == len(ids) and
                         t.prefix_digest == digest.copy().digest() and reasoning in (None, t.reasoning)), None)
            if turn is None:
                return ids, cursor, i
            ids += turn.answer_ids
            digest.update(_ids_bytes(turn.answer_ids))
            cursor = position + len(placeholder)
        return ids, cursor, None

    def remember(self, prompt_ids: list[int], output_ids: list[int], content: str | None,
                 tool_calls: list[tuple[str, str]], reasoning: str | None) -> None:
        """Keep one served answer (the generated ids up to, not including, its stop token)."""
        if self._header_id is None:
            return
        start = len(prompt_ids) - 1
        while start >= 0 and prompt_ids[start] != self._header_id:
            start -= 1
        if start < 0 or not self.tokenizer.decode(prompt_ids[start:]).startswith(ASSISTANT_HEADER):
            return
        answer = array("q", prompt_ids[start:])
        answer.extend(output_ids)
        turn = _Turn(start, hashlib.blake2b(_ids_bytes(prompt_ids[:start]), digest_size=16).digest(), answer,
                     reasoning or "")
        key = answer_key(content, tool_calls)
        turns = self._turns.pop(key, [])
        turns.insert(0, turn)
        for dropped in turns[4:]:  # the same answer after many different prompts: keep the newest few
            self._num_turns -= 1
            self._num_tokens -= len(dropped.answer_ids)
        self._turns[key] = turns[:4]
        self._num_turns += 1
        self._num_tokens += len(answer)
        while self._turns and (self._num_turns > self.max_turns or self._num_tokens > self.max_tokens):
            _, evicted = self._turns.popitem(last=False)
            self._num_turns -= len(evicted)
            self._num_tokens -= sum(len(t.answer_ids) for t in evicted)
