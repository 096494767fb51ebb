"""The OpenAI-compatible HTTP server: `create_app(llm)` builds the FastAPI app, `run(...)` serves it.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with SSE streaming), GET /v1/models,
GET /health, GET /metrics (Prometheus text). With an API key, /v1/* needs `Authorization: Bearer KEY`.
"""
from __future__ import annotations

import contextlib
import hmac
import signal
import typing
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from hybridlm.serve.async_engine import AsyncEngine
from hybridlm.serve.chat import ChatRenderer
from hybridlm.serve.handlers import ServerState, chat_completion, completion
from hybridlm.serve.metrics import Metrics
from hybridlm.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from hybridlm.serve.sampling import TokenText

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def create_app(
    llm,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_waiting: int = 256,
    default_template_kwargs: dict[str, Any] | None = None,
    shutdown_grace_seconds: float = 30.0,
    engine=None,
    scripted_output: Callable[[str], str | None] | None = None,
) -> FastAPI:
    """An app serving `llm` (an `hybridlm.LLM`). `engine` replaces `llm.engine` (another EngineConfig);
    `scripted_output` is a test hook: given the prompt text, the text the model is made to produce."""
    async_engine = AsyncEngine(engine or llm.engine, max_waiting=max_waiting)
    tokenizer = llm.tokenizer
    template = tokenizer.chat_templates.get("tool_use") or tokenizer.chat_template or ""
    state = ServerState(
        engine=async_engine, tokenizer=tokenizer, renderer=ChatRenderer(tokenizer), metrics=Metrics(),
        model_name=model_name or llm.path.name, default_sampling=llm.default_sampling,
        stop_ids=set(llm.eos_token_ids), default_template_kwargs=dict(default_template_kwargs or {}),
        tool_format="xml" if "<function=" in template or not template else "json",
        scripted_output=scripted_output, token_text=TokenText(tokenizer),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        yield
        await async_engine.shutdown(shutdown_grace_seconds)

    app = FastAPI(title="hybridlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(ServerMiddleware, api_key=api_key, metrics=state.metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path)
        body = ApiError(500, f"internal server error: {type(error).__name__}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await chat_completion(state, await parse(request, ChatCompletionRequest), request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completion(state, await parse(request, CompletionRequest), request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "hybridlm", "max_model_len": state.context_length}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if async_engine.draining or not async_engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = state.metrics.render(async_engine.stats, async_engine.unfinished, async_engine.capacity,
                                    state.model_name)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app


async def parse(request: Request, model: type[BaseModel]) -> BaseModel:
    """The body as `model`, or a 400 naming the first bad field the way OpenAI does."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        param = _field_path(model, first["loc"]) or ".".join(str(part) for part in first["loc"]) or None
        if first["type"] == "json_invalid":
            message = f"We could not parse the JSON body of your request: {first['msg']}"
        elif first["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif first["type"] == "missing":
            message = f"Missing required parameter: '{param}'"
        else:
            message = f"Invalid value for '{param}': {first['msg']}"
        raise ApiError(400, message, param=param) from None


def _field_path(model: type[BaseModel], location: tuple) -> str:
    """The field names (and list indices) of an error location, without pydantic's union-branch tags."""
    parts, current = [], model
    for item in location:
        if isinstance(item, int):
            parts.append(str(item))
        elif current is not None and item in current.model_fields:
            parts.append(item)
            current = _nested_model(current.model_fields[item].annotation)
        else:
            break
    return ".".join(parts)


def _nested_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _nested_model(argument)
        if found is not None:
            return found
    return None


class ServerMiddleware:
    """Pure ASGI (so streaming and disconnect detection pass through untouched): the API key on /v1/*,
    and a request count per endpoint and status."""

    def __init__(self, app, api_key: str | None, metrics: Metrics) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        if self.api_key is not None and path.startswith("/v1/") and not self._authorized(scope):
            self.metrics.count_request(endpoint, 401)
            error = ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
            response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        status = [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.count_request(endpoint, status[0])

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False


def run(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    strict_config: bool = True,
    engine_config=None,
    max_waiting: int = 256,
    enable_thinking: bool | None = None,
    shutdown_grace_seconds: float = 30.0,
    log_level: str = "info",
) -> None:
    """Load `model` and serve it until SIGINT / SIGTERM; then stop accepting, let in-flight requests finish
    for up to `shutdown_grace_seconds`, cancel what is left (those streams end with an error event), exit."""
    import uvicorn

    from hybridlm.engine.llm import LLM

    llm = LLM(model, device=device, dtype=dtype, strict_config=strict_config, engine_config=engine_config)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    app = create_app(llm, model_name=model_name, api_key=api_key, max_waiting=max_waiting,
                     default_template_kwargs=kwargs, shutdown_grace_seconds=shutdown_grace_seconds)
    # uvicorn's own graceful timeout is a backstop: the engine ends every stream cleanly within the grace
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(shutdown_grace_seconds) + 5)
    engine = app.state.server.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # on the first signal start draining at once, so the grace period runs while uvicorn waits
            engine.begin_shutdown(shutdown_grace_seconds)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal once it has shut down, so a clean drain would exit as "killed by
            # SIGTERM"; here a completed graceful shutdown exits with status 0
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    Server(config).run()
    log.info("hybridlm serve: shut down")
