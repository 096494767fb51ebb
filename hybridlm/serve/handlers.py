"""/v1/chat/completions and /v1/completions: request -> engine choices -> OpenAI responses or SSE chunks."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from hybridlm.engine.params import SamplingParams
from hybridlm.serve.async_engine import AsyncEngine, Choice, EngineUnavailable, Output, QueueFull, RequestStream
from hybridlm.serve.chat import ChatRenderer, template_messages
from hybridlm.serve.metrics import Metrics
from hybridlm.serve.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, NamedToolChoice,
                                     unsupported_fields)
from hybridlm.serve.sampling import SamplingExtras, TokenLogprob, TokenText
from hybridlm.serve.tool_parser import CALL_OPEN, FUNCTION_OPEN, OutputParser, ParsedDelta

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What every request needs; built once by create_app."""

    engine: AsyncEngine
    tokenizer: Any
    renderer: ChatRenderer
    metrics: Metrics
    model_name: str
    default_sampling: SamplingParams
    stop_ids: set[int]
    default_template_kwargs: dict[str, Any] = field(default_factory=dict)
    tool_format: str = "xml"  # how the template writes calls: "xml" (Qwen3.5) or "json" (Qwen3 / 2.5)
    scripted_output: Callable[[str], str | None] | None = None  # test hook: prompt text -> forced output
    token_text: TokenText | None = None
    retry_after_seconds: int = 1

    @property
    def context_length(self) -> int:
        return self.engine.context_length


# ------------------------------------------------------------------------------------------------ common
def check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise ApiError(400, f"The model `{model}` does not exist; this server serves `{state.model_name}`",
                       param="model", code="model_not_found")


def check_supported(request: ChatCompletionRequest | CompletionRequest) -> None:
    problems = unsupported_fields(request)
    if problems:
        name, why = problems[0]
        raise ApiError(400, why, param=name, code="unsupported_parameter")


def resolve_max_tokens(state: ServerState, prompt_length: int, requested: int | None, default: int | None) -> int:
    context = state.context_length
    if prompt_length >= context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, your prompt has "
                            f"{prompt_length} tokens. Please shorten it.", param="messages",
                       code="context_length_exceeded")
    room = context - prompt_length
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_length + requested} tokens ({prompt_length} in the prompt, {requested} for the "
                            "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                       code="context_length_exceeded")
    return requested


def sampling_params(state: ServerState, request, max_tokens: int, seed_offset: int) -> SamplingParams:
    defaults = state.default_sampling

    def pick(name: str):
        value = getattr(request, name)
        return getattr(defaults, name) if value is None else value

    stop_ids = list(request.stop_token_ids or [])
    bad = [t for t in stop_ids if not 0 <= t < state.tokenizer.vocab_size]
    if bad:
        raise ApiError(400, f"stop_token_ids outside the vocabulary: {bad[:5]}", param="stop_token_ids")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"),
            min_p=pick("min_p"), repetition_penalty=pick("repetition_penalty"), stop=request.stop or None,
            seed=None if request.seed is None else request.seed + seed_offset, stop_token_ids=stop_ids or None,
            ignore_eos=bool(request.ignore_eos))
    except (ValueError, TypeError) as error:
        raise ApiError(400, str(error)) from None


def sampling_extras(state: ServerState, request, prompt_ids: list[int], num_logprobs: int | None) -> SamplingExtras:
    bias = {}
    for key, value in (request.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < state.tokenizer.vocab_size:
            raise ApiError(400, f"logit_bias key {key!r} is not a token id of this model", param="logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
        bias[int(key)] = float(value)
    script = None
    if state.scripted_output is not None:
        text = state.scripted_output(state.tokenizer.decode(prompt_ids))
        script = None if text is None else tuple(state.tokenizer.encode(text))
    return SamplingExtras(presence_penalty=request.presence_penalty or 0.0,
                          frequency_penalty=request.frequency_penalty or 0.0, logit_bias=bias,
                          num_logprobs=num_logprobs, script=script)


async def submit(state: ServerState, choices: list[Choice]) -> RequestStream:
    try:
        return await state.engine.submit(choices)
    except QueueFull as error:
        raise ApiError(429, f"The server is busy: {error}. Retry shortly.", type="rate_limit_exceeded",
                       code="queue_full", headers={"Retry-After": str(state.retry_after_seconds)}) from None
    except EngineUnavailable as error:
        raise ApiError(503, f"Service unavailable: {error}", type="server_error", code="unavailable",
                       headers={"Retry-After": str(state.retry_after_seconds)}) from None
    except (ValueError, TypeError) as error:
        raise ApiError(400, str(error)) from None


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def consume(state: ServerState, stream: RequestStream, request: Request,
                  handle: Callable[[Output], None]) -> bool:
    """Feed every output to `handle`; False (and the request cancelled) if the client went away first."""

    async def run() -> None:
        async for output in stream:
            handle(output)

    work, watch = asyncio.create_task(run()), asyncio.create_task(_until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
        state.engine.abort(stream)
    if not work.done() or work.cancelled():
        return False
    work.result()
    return True


def raise_failure(states: list) -> None:
    error = next((s.error for s in states if s.error is not None), None)
    if isinstance(error, EngineUnavailable):
        raise ApiError(503, str(error), type="server_error", code="unavailable")
    if error is not None:
        raise ApiError(500, str(error), type="server_error")


def error_event(error: Exception) -> str:
    status = 503 if isinstance(error, EngineUnavailable) else 500
    body = ApiError(status, str(error), type="server_error", code="unavailable" if status == 503 else None).body()
    return f"data: {json.dumps(body)}\n\n"


class EventStream(StreamingResponse):
    """SSE that always watches for the client leaving and always closes its generator (so the request's
    `finally` cancels generation at once, whatever the ASGI server's spec version)."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client is gone
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


def chunk(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# ------------------------------------------------------------------------------------------------ choices
class ChoiceState:
    """Everything one choice has produced so far."""

    def __init__(self, index: int, prompt_length: int, parser: OutputParser | None = None) -> None:
        self.index = index
        self.prompt_length = prompt_length
        self.parser = parser
        self.text = ""
        self.content = ""
        self.reasoning = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.num_cached_tokens = 0
        self.error: Exception | None = None

    def push(self, output: Output) -> ParsedDelta:
        if output.error is not None:
            self.error, self.finish_reason = output.error, "error"
            return ParsedDelta()
        if output.token_id is not None:
            self.token_ids.append(output.token_id)
        if output.logprob is not None:
            self.logprobs.append(output.logprob)
        self.num_cached_tokens = output.num_cached_tokens
        self.text += output.text
        delta = ParsedDelta(content=output.text)
        if self.parser is not None:
            delta = self.parser.feed(output.text)
            if output.finish_reason is not None:
                delta += self.parser.finish()
        self.content += delta.content
        self.reasoning += delta.reasoning
        if output.finish_reason is not None:
            self.finish_reason = output.finish_reason
            if self.parser is not None and self.parser.calls and output.finish_reason == "stop":
                self.finish_reason = "tool_calls"
        return delta


def tool_call_json(delta) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": delta.index}
    if delta.id is not None:
        entry["id"], entry["type"] = delta.id, "function"
        entry["function"] = {"name": delta.name, "arguments": delta.arguments}
    else:
        entry["function"] = {"arguments": delta.arguments}
    return entry


def chat_logprobs(state: ServerState, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, data = state.token_text(token_id)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": data}

    return {"content": [{**entry(p.token_id, p.logprob), "top_logprobs": [entry(t, lp) for t, lp in p.top]}
                        for p in logprobs]}


def completion_logprobs(state: ServerState, logprobs: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens, offsets = [], []
    for p in logprobs:
        offsets.append(offset)
        text = state.token_text(p.token_id)[0]
        tokens.append(text)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [max(p.logprob, -9999.0) for p in logprobs],
            "top_logprobs": [{state.token_text(t)[0]: lp for t, lp in p.top} for p in logprobs],
            "text_offset": offsets}


def record_metrics(state: ServerState, stream: RequestStream, choices: list[ChoiceState],
                   prompt_lengths: list[int], cached: int) -> None:
    ttft = None if stream.first_token_time is None else stream.first_token_time - stream.arrival
    state.metrics.observe(sum(prompt_lengths), sum(len(c.token_ids) for c in choices), cached,
                          [c.finish_reason or "abort" for c in choices], ttft, time.monotonic() - stream.arrival)
    for c in choices:
        if c.parser is not None:
            state.metrics.tool_calls += len(c.parser.calls)
            state.metrics.tool_parse_warnings += len(c.parser.warnings)
            for warning in c.parser.warnings:
                log.warning("tool-call output of %s: %s", stream.request_id, warning)


# ------------------------------------------------------------------------------------------------ chat
def tool_choice_prefill(choice, tool_format: str, in_reasoning: bool) -> str:
    """Text put at the start of the answer to force a call (there is no constrained decoding)."""
    if choice in ("none", "auto"):
        return ""
    prefill = "</think>\n\n" if in_reasoning else ""
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        call = f"{FUNCTION_OPEN}{name}>\n" if tool_format == "xml" else f'{{"name": "{name}", "arguments": '
        return f"{prefill}{CALL_OPEN}\n{call}"
    return f"{prefill}{CALL_OPEN}\n"  # required


async def chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    check_model(state, body.model)
    check_supported(body)
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    tool_choice = body.tool_choice or ("auto" if tools else "none")
    if tool_choice != "none" and not tools:
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in {
            t["function"]["name"] for t in tools}:
        raise ApiError(400, f"tool_choice names {tool_choice.function.name!r}, which is not in tools",
                       param="tool_choice")
    use_tools = tool_choice != "none"
    kwargs = dict(state.default_template_kwargs)
    if body.reasoning_effort is not None:
        kwargs["enable_thinking"] = body.reasoning_effort not in ("none", "minimal")
    kwargs.update(body.chat_template_kwargs or {})
    try:
        rendered = state.renderer.render(template_messages(body.messages), tools if use_tools else None, kwargs)
    except (ValueError, TypeError) as error:
        raise ApiError(400, f"Could not render the conversation: {error}", param="messages") from None
    prefill = tool_choice_prefill(tool_choice, state.tool_format, rendered.starts_in_reasoning)
    prompt_ids = rendered.token_ids + (state.tokenizer.encode(prefill) if prefill else [])
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(state, len(prompt_ids), requested, None)
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    n = body.n or 1
    extras = sampling_extras(state, body, prompt_ids, num_logprobs)
    choices = [Choice(prompt_ids, sampling_params(state, body, max_tokens, i), extras) for i in range(n)]
    stream = await submit(state, choices)
    state.metrics.spliced_turns += rendered.num_spliced
    states = [ChoiceState(i, len(prompt_ids), OutputParser(
        tools, parse_tools=use_tools, start_in_reasoning=rendered.starts_in_reasoning,
        max_calls=1 if body.parallel_tool_calls is False else None)) for i in range(n)]
    prefill_deltas = [s.parser.feed(prefill) if prefill else ParsedDelta() for s in states]
    for s, d in zip(states, prefill_deltas):
        s.content += d.content
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}

    def finished() -> None:
        record_metrics(state, stream, states, [len(prompt_ids)], states[0].num_cached_tokens)
        for s in states:
            remember_answer(state, prompt_ids, s)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(chat_events(state, stream, states, prefill_deltas, meta, include_usage,
                                       num_logprobs is not None, finished))
    if not await consume(state, stream, request, lambda o: states[o.index].push(o)):
        return Response(status_code=499)
    raise_failure(states)
    finished()
    response_choices = []
    for s in states:
        calls = s.parser.calls
        message: dict[str, Any] = {"role": "assistant", "content": s.content if s.content or not calls else None,
                                   "reasoning_content": s.reasoning or None}
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        response_choices.append({"index": s.index, "message": message,
                                 "logprobs": chat_logprobs(state, s.logprobs) if num_logprobs is not None else None,
                                 "finish_reason": s.finish_reason})
    total = sum(len(s.token_ids) for s in states)
    return JSONResponse({**meta, "object": "chat.completion", "choices": response_choices,
                         "usage": usage(len(prompt_ids), total, states[0].num_cached_tokens)})


def remember_answer(state: ServerState, prompt_ids: list[int], s: ChoiceState) -> None:
    """Keep the answer's exact tokens for the next turn's prompt (ChatRenderer), unless a stop string cut it
    (then its tokens say more than its text)."""
    ids = s.token_ids
    if s.finish_reason in ("stop", "tool_calls") and ids and ids[-1] in state.stop_ids:
        ids = ids[:-1]
    elif s.finish_reason != "length":
        return
    calls = [(c.name, c.arguments) for c in s.parser.calls]
    content = s.content if s.content or not calls else None
    state.renderer.remember(prompt_ids, ids, content, calls, s.reasoning or None)


async def chat_events(state: ServerState, stream: RequestStream, states: list[ChoiceState],
                      prefill_deltas: list[ParsedDelta], meta: dict, include_usage: bool, with_logprobs: bool,
                      finished: Callable[[], None]) -> AsyncIterator[str]:
    base = {**meta, "object": "chat.completion.chunk"}

    def event(index: int, delta: dict, finish_reason: str | None = None, logprobs=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return chunk({**base, "choices": [choice]})

    def delta_json(delta: ParsedDelta) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if delta.reasoning:
            out["reasoning_content"] = delta.reasoning
        if delta.content:
            out["content"] = delta.content
        if delta.tool_calls:
            out["tool_calls"] = [tool_call_json(t) for t in delta.tool_calls]
        return out

    complete = False
    try:
        for s, prefill in zip(states, prefill_deltas):
            yield event(s.index, {"role": "assistant", "content": ""})
            if prefill:
                yield event(s.index, delta_json(prefill))
        sent_logprobs = [0] * len(states)
        async for output in stream:
            if output.error is not None:
                yield error_event(output.error)
                return
            s = states[output.index]
            delta = s.push(output)
            logprobs = None
            if with_logprobs and len(s.logprobs) > sent_logprobs[s.index] and (delta or output.finish_reason):
                logprobs = chat_logprobs(state, s.logprobs[sent_logprobs[s.index]:])
                sent_logprobs[s.index] = len(s.logprobs)
            if delta or logprobs:
                yield event(s.index, delta_json(delta), logprobs=logprobs)
            if output.finish_reason is not None:
                yield event(s.index, {}, s.finish_reason)
        if include_usage:
            total = sum(len(s.token_ids) for s in states)
            yield chunk({**base, "choices": [], "usage": usage(states[0].prompt_length, total,
                                                               states[0].num_cached_tokens)})
        yield "data: [DONE]\n\n"
        complete = True
    finally:
        state.engine.abort(stream)
        if complete:
            finished()


# ------------------------------------------------------------------------------------------------ completions
def completion_prompts(state: ServerState, prompt) -> list[tuple[list[int], str | None]]:
    """(token ids, text if given as text) per prompt."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise ApiError(400, "prompt is empty", param="prompt")
    result = []
    vocab = state.engine.engine.model.config.vocab_size
    for item in items:
        if isinstance(item, str):
            ids, text = state.tokenizer.encode(item), item
        else:
            ids, text = list(item), None
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"prompt token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
        if not ids:
            raise ApiError(400, "prompt is empty (0 tokens)", param="prompt")
        result.append((ids, text))
    return result


async def completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    check_model(state, body.model)
    check_supported(body)
    prompts = completion_prompts(state, body.prompt)
    n = body.n or 1
    choices, prompt_of = [], []
    for p, (ids, _) in enumerate(prompts):
        max_tokens = resolve_max_tokens(state, len(ids), body.max_tokens, 16)
        extras = sampling_extras(state, body, ids, body.logprobs)
        for j in range(n):
            choices.append(Choice(ids, sampling_params(state, body, max_tokens, j), extras))
            prompt_of.append(p)
    stream = await submit(state, choices)
    states = [ChoiceState(i, len(prompts[prompt_of[i]][0])) for i in range(len(choices))]
    echoes = [(text if text is not None else state.tokenizer.decode(ids)) if body.echo else ""
              for ids, text in (prompts[p] for p in prompt_of)]
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    prompt_lengths = [len(ids) for ids, _ in prompts]

    def cached() -> int:
        return sum(states[p * n].num_cached_tokens for p in range(len(prompts)))

    def finished() -> None:
        record_metrics(state, stream, states, prompt_lengths, cached())

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(completion_events(state, stream, states, echoes, meta, include_usage,
                                             body.logprobs is not None, prompt_lengths, cached, finished))
    if not await consume(state, stream, request, lambda o: states[o.index].push(o)):
        return Response(status_code=499)
    raise_failure(states)
    finished()
    response_choices = [{"index": s.index, "text": echoes[s.index] + s.text, "finish_reason": s.finish_reason,
                         "logprobs": completion_logprobs(state, s.logprobs, len(echoes[s.index]))
                         if body.logprobs is not None else None} for s in states]
    total = sum(len(s.token_ids) for s in states)
    return JSONResponse({**meta, "object": "text_completion", "choices": response_choices,
                         "usage": usage(sum(prompt_lengths), total, cached())})


async def completion_events(state: ServerState, stream: RequestStream, states: list[ChoiceState], echoes: list[str],
                            meta: dict, include_usage: bool, with_logprobs: bool, prompt_lengths: list[int],
                            cached: Callable[[], int], finished: Callable[[], None]) -> AsyncIterator[str]:
    base = {**meta, "object": "text_completion"}

    def event(index: int, text: str, finish_reason: str | None, logprobs=None) -> str:
        return chunk({**base, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                           "finish_reason": finish_reason}]})

    complete = False
    try:
        for s in states:
            if echoes[s.index]:
                yield event(s.index, echoes[s.index], None)
        async for output in stream:
            if output.error is not None:
                yield error_event(output.error)
                return
            s = states[output.index]
            sent = len(s.logprobs)
            offset = len(echoes[s.index]) + len(s.text)
            s.push(output)
            logprobs = completion_logprobs(state, s.logprobs[sent:], offset) if with_logprobs else None
            yield event(s.index, output.text, s.finish_reason, logprobs)
        if include_usage:
            total = sum(len(s.token_ids) for s in states)
            yield chunk({**base, "choices": [], "usage": usage(sum(prompt_lengths), total, cached())})
        yield "data: [DONE]\n\n"
        complete = True
    finally:
        state.engine.abort(stream)
        if complete:
            finished()
