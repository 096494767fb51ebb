"""The server on a loopback port, driven by the official openai client (and raw httpx where the client
cannot misbehave on purpose)."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from hybridlm.serve import create_app
from tests.serve.helpers import (API_KEY, FINAL_ANSWER, MODEL, NO_THINK_ANSWER, WEATHER_TOOL, ServerThread,
                                 make_engine, metric, scripted_output)

GREEDY = {"temperature": 0, "max_tokens": 12}


def chat(client, content: str, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          **{**GREEDY, **kwargs})


def collect_stream(events):
    """Concatenate a chat stream: (content, reasoning, {index: (id, name, arguments)}, finish, usage)."""
    content = reasoning = ""
    calls: dict[int, list] = {}
    finish, usage = None, None
    for event in events:
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, [None, None, ""])
                if call.id:
                    entry[0], entry[1] = call.id, call.function.name
                entry[2] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, reasoning, calls, finish, usage


def test_models_health_metrics(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server.base_url}/metrics").text
    assert metric(text, "hybridlm_num_requests_running") == 0
    assert metric(text, "process_resident_memory_bytes") > 0


def test_chat_non_streaming_and_streaming_agree(server):
    client = server.client()
    reply = chat(client, "Tell me about the weather.", seed=3)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    assert reply.id.startswith("chatcmpl-") and reply.model == MODEL
    events = list(chat(client, "Tell me about the weather.", seed=3, stream=True, stream_options={"include_usage": True}))
    content, reasoning, calls, finish, usage = collect_stream(events)
    assert (content, finish) == (choice.message.content, "length") and not calls
    assert usage.completion_tokens == 12 and usage.prompt_tokens == reply.usage.prompt_tokens
    assert events[0].choices[0].delta.role == "assistant"


def test_sampling_fields(server):
    client = server.client()
    fields = dict(temperature=0.9, top_p=0.8, seed=7, n=2, presence_penalty=0.5, frequency_penalty=0.5,
                  extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True})
    a, b = chat(client, "Pick.", **fields), chat(client, "Pick.", **fields)
    assert [c.index for c in a.choices] == [0, 1] and a.usage.completion_tokens == 24
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    # logit_bias +100 on one token makes greedy choose it every time
    tokenizer = server.app.state.server.tokenizer
    token = tokenizer.encode(" the")[0]
    piece = tokenizer.decode([token])
    biased = client.completions.create(model=MODEL, prompt="x", max_tokens=5, temperature=0, logit_bias={str(token): 100})
    assert biased.choices[0].text == piece * 5
    # a strong frequency penalty stops the same bias from repeating the token
    damped = client.completions.create(model=MODEL, prompt="x", max_tokens=5, temperature=0,
                                       logit_bias={str(token): 5}, frequency_penalty=2.0)
    assert damped.choices[0].text != piece * 5
    stopped = chat(client, "Hi", max_tokens=30, stop=["e"])
    assert "e" not in stopped.choices[0].message.content


def test_logprobs(server):
    client = server.client()
    reply = chat(client, "Hi", logprobs=True, top_logprobs=3, max_tokens=4)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 4
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-5  # greedy picks the top token
        assert isinstance(entry.bytes, list)
    completion = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, logprobs=2, temperature=0)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3 and lp.text_offset[0] == 0


def test_completions(server):
    client = server.client()
    one = client.completions.create(model=MODEL, prompt="The model reads", max_tokens=6, temperature=0)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 6
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The model reads", max_tokens=6, temperature=0, stream=True))
    assert text == one.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="The model reads", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "The model reads" + one.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=3, n=2, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3] and batch.usage.prompt_tokens == 5
    assert batch.choices[0].text == batch.choices[1].text  # n=2, greedy
    texts = client.completions.create(model=MODEL, prompt=["a b", "c"], max_tokens=2, temperature=0)
    assert len(texts.choices) == 2


def test_tool_call_round_trip(server):
    client = server.client()
    messages = [{"role": "user", "content": "[[script:weather_xml]] What is the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0)
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert message.reasoning_content == "The user wants the weather. I should call the tool."
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3, "metric": True}  # typed by schema
    # the same through a stream: argument deltas add up to the same JSON
    content, reasoning, calls, finish, _ = collect_stream(client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0, stream=True))
    assert (content, finish) == ("", "tool_calls") and reasoning == message.reasoning_content
    assert [(name, json.loads(args)) for _, name, args in calls.values()] == [
        ("get_weather", {"city": "Paris", "days": 3, "metric": True})]
    # the tool's result goes back; the final answer comes from the model, and the history hit the cache
    messages += [message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "temp_c": 21}'}]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0)
    assert final.choices[0].message.content == FINAL_ANSWER and final.choices[0].finish_reason == "stop"
    assert final.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 16 * 16
    assert metric(httpx.get(f"{server.base_url}/metrics").text, "hybridlm_chat_turns_spliced_total") >= 1


def test_json_form_and_forced_tool_choice(server):
    client = server.client()
    reply = chat(client, "[[script:weather_json]] Rome?", tools=[WEATHER_TOOL], max_tokens=200)
    (call,) = reply.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Rome", "days": 2}
    # tool_choice naming a function starts the answer with the call: the parser sees it as output
    named = chat(client, "anything", tools=[WEATHER_TOOL], max_tokens=5,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    none = chat(client, "[[script:weather_xml]] x", tools=[WEATHER_TOOL], tool_choice="none", max_tokens=200)
    assert none.choices[0].message.tool_calls is None and "<tool_call>" in none.choices[0].message.content


def test_malformed_call_is_text_not_500(server):
    client = server.client()
    reply = chat(client, "[[script:broken_call]] go", tools=[WEATHER_TOOL], max_tokens=200)
    message = reply.choices[0].message
    assert message.tool_calls is None and reply.choices[0].finish_reason == "stop"
    assert message.content.startswith("Sure.") and "<tool_call>" in message.content and message.content.endswith("Done.")
    assert metric(httpx.get(f"{server.base_url}/metrics").text, "hybridlm_tool_parser_warnings_total") >= 1


def test_thinking_on_off(server):
    client = server.client()
    on = chat(client, "[[script:think]] question", max_tokens=100)
    assert on.choices[0].message.reasoning_content == "Let me think about it."
    assert on.choices[0].message.content == "The answer is 42."
    content, reasoning, _, _, _ = collect_stream(chat(client, "[[script:think]] question", max_tokens=100, stream=True))
    assert (content, reasoning) == ("The answer is 42.", "Let me think about it.")
    off = chat(client, "[[script:nothink]] q", max_tokens=100, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content == NO_THINK_ANSWER and off.choices[0].message.reasoning_content is None
    effort = chat(client, "[[script:nothink]] q", max_tokens=100, reasoning_effort="none")
    assert effort.choices[0].message.content == NO_THINK_ANSWER


def test_server_default_thinking_flag(tiny_llm):
    app = create_app(tiny_llm, model_name=MODEL, engine=make_engine(tiny_llm, max_num_seqs=4),
                     scripted_output=scripted_output, default_template_kwargs={"enable_thinking": False})
    with ServerThread(app) as running:
        client = running.client()
        assert chat(client, "[[script:nothink]] q", max_tokens=50).choices[0].message.content == NO_THINK_ANSWER
        on = chat(client, "[[script:nothink]] q", max_tokens=50, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        assert on.choices[0].message.reasoning_content == "thinking"


def test_cached_tokens_on_second_turn(server):
    client = server.client()
    messages = [{"role": "system", "content": "You are a helpful assistant for gated delta rule questions."},
                {"role": "user", "content": "What does the recurrent state hold?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the attention layers?"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=5)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the first prompt and the answer (all but its last token, never fed back) are a prefix of the second
    reusable = first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert cached == reusable // 16 * 16 > 0


def rpc(server, body: dict, path: str = "/v1/chat/completions", key: str | None = API_KEY, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(f"{server.base_url}{path}", content=raw, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=30)


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, status, param, code", [
    ({"model": "gpt-4o", "messages": MESSAGES}, 400, "model", "model_not_found"),
    ({"model": MODEL, "messages": MESSAGES, "temperature": "hot"}, 400, "temperature", None),
    ({"model": MODEL, "messages": MESSAGES, "temperature": 3}, 400, "temperature", None),
    ({"model": MODEL, "messages": MESSAGES, "max_tokens": 1.5}, 400, "max_tokens", None),
    ({"model": MODEL, "messages": MESSAGES, "n": 0}, 400, "n", None),
    ({"model": MODEL, "messages": MESSAGES, "stop": 5}, 400, "stop", None),
    ({"model": MODEL, "messages": []}, 400, "messages", None),
    ({"model": MODEL}, 400, "messages", None),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", None),
    ({"model": MODEL, "messages": MESSAGES, "bogus": 1}, 400, "bogus", None),
    ({"model": MODEL, "messages": MESSAGES, "max_tokens": 5000}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages",
     "context_length_exceeded"),
    ({"model": MODEL, "messages": MESSAGES, "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
    ({"model": MODEL, "messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", "unsupported_parameter"),
    ({"model": MODEL, "messages": MESSAGES, "functions": [{"name": "f"}]}, 400, "functions", "unsupported_parameter"),
    ({"model": MODEL, "messages": MESSAGES, "tool_choice": "required"}, 400, "tool_choice", None),
    ({"model": MODEL, "messages": MESSAGES, "tools": [WEATHER_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice", None),
    ({"model": MODEL, "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, 400, "messages", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages", None),
    ({"model": MODEL, "messages": MESSAGES, "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
])
def test_validation_errors(server, body, status, param, code):
    response = rpc(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == code and error["message"]
    assert error["type"] == "invalid_request_error"


def test_validation_errors_reach_the_openai_client(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="context length"):
        chat(client, "x", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[1, 2, 10_000_000])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", suffix="y")
    response = rpc(server, {}, raw=b"{not json")
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_api_key(server):
    with pytest.raises(openai.AuthenticationError):
        chat(server.client(api_key="wrong"), "hi")
    assert rpc(server, {"model": MODEL, "messages": MESSAGES}, key=None).status_code == 401
    assert httpx.get(f"{server.base_url}/v1/models").status_code == 401
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # probes need no key
    assert chat(server.client(), "hi", max_tokens=1).choices


def wait_idle(server, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{server.base_url}/metrics").text
        idle = (metric(text, "hybridlm_num_requests_running") == 0 and metric(text, "hybridlm_num_requests_waiting") == 0
                and metric(text, "hybridlm_free_state_slots") == metric(text, "hybridlm_state_slots"))
        if idle or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_client_disconnect_frees_its_slot(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3000, "temperature": 0, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, headers=headers) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in received)
            assert server.engine.stats["running"] == 1
    # the stream was dropped: its sequence leaves the batch and its state slot is free again
    text = wait_idle(server)
    assert metric(text, "hybridlm_num_requests_running") == 0
    assert metric(text, "hybridlm_free_state_slots") == metric(text, "hybridlm_state_slots")
    assert server.engine.unfinished == 0
    # the same for a non-streaming request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", headers=headers, timeout=0.5,
                   json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3000, "temperature": 0, "ignore_eos": True})
    text = wait_idle(server)
    assert metric(text, "hybridlm_num_requests_running") == 0 and server.engine.unfinished == 0


def test_queue_full_gives_429_with_retry_after(tiny_llm):
    app = create_app(tiny_llm, model_name=MODEL, engine=make_engine(tiny_llm, max_num_seqs=1), max_waiting=0)
    with ServerThread(app) as running:
        client = running.client()
        long = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3000, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
        next(iter(long))  # admitted and running
        with pytest.raises(openai.RateLimitError) as caught:
            chat(client, "hi", max_tokens=1)
        assert caught.value.response.headers["Retry-After"] == "1"
        assert caught.value.response.json()["error"]["code"] == "queue_full"
        long.close()
        wait_idle(running)
        assert chat(client, "hi", max_tokens=1).choices  # room again


def test_shutdown_cancels_in_flight_streams_cleanly(tiny_llm):
    app = create_app(tiny_llm, model_name=MODEL, engine=make_engine(tiny_llm, max_num_seqs=2), shutdown_grace_seconds=0.5)
    running = ServerThread(app).__enter__()
    client = running.client()
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3000, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    events = iter(stream)
    next(events)
    # what SIGTERM does in `hybridlm serve`: drain the engine (grace 0.5 s for a 3000-token answer), stop uvicorn
    running.engine.begin_shutdown(0.5)
    running.server.should_exit = True
    with pytest.raises(openai.APIError, match="shut down"):
        for _ in events:
            pass
    running.thread.join(20)
    assert not running.thread.is_alive() and not running.engine.alive
    running.socket.close()
