"""Helpers for the server tests: a real uvicorn server on a free loopback port in a thread, scripted outputs."""
from __future__ import annotations

import re
import socket
import threading
import time

import openai
import uvicorn

from hybridlm.engine.engine import Engine, EngineConfig

API_KEY = "test-key"
MODEL = "tiny"

# Scripted outputs (the test hook): a prompt whose last user turn says [[script:NAME]] makes the model
# produce SCRIPTS[NAME]; after a tool response it produces FINAL_ANSWER. Tokens still flow through the
# engine, the detokenizer, the parser and the SSE writer like any others.
SCRIPTS = {
    "weather_xml": ("<think>\nThe user wants the weather. I should call the tool.\n</think>\n\n"
                    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n"
                    "</tool_call>"),
    "weather_json": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": "2"}}\n</tool_call>',
    "think": "<think>\nLet me think about it.\n</think>\n\nThe answer is 42.",
    "broken_call": "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \n</tool_call>\nDone.",
}
FINAL_ANSWER = "It will be sunny in Paris."
NO_THINK_ANSWER = "Answer without thinking."


def scripted_output(prompt: str) -> str | None:
    last_turn = prompt[prompt.rfind("<|im_start|>", 0, max(prompt.rfind("<|im_start|>assistant"), 0)):]
    if "<tool_response>" in last_turn:
        return FINAL_ANSWER
    match = re.search(r"\[\[script:(\w+)\]\]", last_turn)
    if match is None:
        return None
    if match.group(1) == "nothink":
        return NO_THINK_ANSWER if prompt.endswith("<think>\n\n</think>\n\n") else "<think>\nthinking\n</think>\n\nx"
    return SCRIPTS[match.group(1)]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}},
            "required": ["city"]},
    },
}


class ServerThread:
    """uvicorn in a thread on a socket bound to 127.0.0.1:0 (no port race); stops on exit."""

    def __init__(self, app) -> None:
        self.app = app
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()

    def client(self, api_key: str = API_KEY, timeout: float = 30.0):
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=timeout)

    @property
    def engine(self):
        return self.app.state.server.engine


def make_engine(llm, **config) -> Engine:
    """A fresh Engine over the session's model (each server owns its engine's thread)."""
    return Engine(llm.model, llm.tokenizer, llm.eos_token_ids, EngineConfig(**{"block_size": 16, **config}))


def metric(text: str, name: str) -> float:
    """The value of the first sample of `name` in Prometheus text."""
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))
