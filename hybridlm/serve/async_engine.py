"""The Engine behind asyncio: one worker thread owns it; requests talk to it through a command queue.

The Engine is not thread-safe, so exactly one thread calls it. That thread drains the command queue
(submit, abort, abort everything, stop), steps the engine while it has work, and hands each token to its
request's asyncio queue with one `call_soon_threadsafe` per step. Admission is bounded: at most
`max_num_seqs + max_waiting` unfinished sequences, beyond that `QueueFull` (HTTP 429). A failure that
belongs to one request (bad prompt, a sampler error) ends only that request; a failing step ends the
requests it was running and the loop goes on.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hybridlm.engine.params import SamplingParams
from hybridlm.serve.sampling import SamplingExtras, ServingSampler, TokenLogprob, install

log = logging.getLogger(__name__)



def _load_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_malloc_trim = _load_malloc_trim() if sys.platform.startswith("linux") else None


def release_free_memory() -> None:
    """Hand memory freed by finished requests back to the OS once the engine goes idle. glibc keeps freed heap
    pages in its arenas (one per thread that allocated: the event loop, the engine, torch's workers), so
    without this the server's resident memory ratchets up with each burst of traffic and never comes down."""
    if _malloc_trim is not None:
        _malloc_trim(0)

class QueueFull(Exception):
    """Too many unfinished requests: the client should retry later (HTTP 429)."""


class EngineUnavailable(Exception):
    """The server is shutting down or its engine thread has stopped (HTTP 503)."""


class RequestFailed(Exception):
    """The engine could not finish this request (HTTP 500 / an error event in a stream)."""


@dataclass
class Choice:
    """One sequence to generate: a prompt, its parameters, and what the OpenAI layer adds to sampling."""

    prompt_token_ids: list[int]
    params: SamplingParams
    extras: SamplingExtras = field(default_factory=SamplingExtras)


@dataclass
class Output:
    """One token of choice `index` (or its failure, with `error` set and `finish_reason` "error")."""

    index: int
    token_id: int | None
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    logprob: TokenLogprob | None = None
    error: Exception | None = None


class RequestStream:
    """The outputs of one submission (all its choices), in order. Iterate it on the event loop."""

    def __init__(self, request_id: str, choices: list[Choice]) -> None:
        self.request_id = request_id
        self.choices = choices
        self.sequence_ids = [f"{request_id}-{i}" for i in range(len(choices))]
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.unfinished = len(choices)
        self.closed = False
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None

    async def __aiter__(self) -> AsyncIterator[Output]:
        while self.unfinished or not self.queue.empty():
            output = await self.queue.get()
            yield output
            if output.error is not None:
                return


class AsyncEngine:
    def __init__(self, engine, max_waiting: int = 256, stop_token_id: int | None = None) -> None:
        self.engine = engine
        self.capacity = engine.config.max_num_seqs + max_waiting
        eos = sorted(engine.eos_token_ids)
        self.stop_token_id = stop_token_id if stop_token_id is not None else (eos[0] if eos else 0)
        self.supports_extras = callable(getattr(engine, "wrap_sampler", None))
        self.context_length = engine.model.config.max_position_embeddings
        self.unfinished = 0  # sequences admitted and not finished; touched on the event loop only
        self.draining = False
        self.stats: dict[str, int] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[RequestStream, int]] = {}  # sequence id -> (stream, choice); worker only
        self._samplers: dict[str, ServingSampler] = {}  # worker only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._shutdown: asyncio.Future | None = None
        self._publish_stats()

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="hybridlm-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def begin_shutdown(self, grace_seconds: float) -> None:
        """Thread-safe (a signal handler may call it): start `shutdown` on the event loop."""
        self.draining = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.shutdown(grace_seconds)))

    async def shutdown(self, grace_seconds: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to `grace_seconds`, abort the rest, stop.
        Safe to call more than once: later calls wait for the first."""
        self.draining = True
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._stop(grace_seconds))
        await asyncio.shield(self._shutdown)

    async def _stop(self, grace_seconds: float) -> None:
        deadline = time.monotonic() + grace_seconds
        while self.unfinished and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(0.05)
        if self._thread is None:
            return
        if self.unfinished:
            log.warning("shutting down: cancelling %d unfinished sequences", self.unfinished)
        self._commands.put(("abort_all", None))
        self._commands.put(("stop", None))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # ---- requests (event loop) ----------------------------------------------------------------------------
    async def submit(self, choices: list[Choice]) -> RequestStream:
        """Queue every choice (all or none). Raises QueueFull, EngineUnavailable, or the engine's
        ValueError / TypeError for a request it refuses."""
        if self.draining or not self.alive:
            raise EngineUnavailable("the server is shutting down" if self.draining else "the engine has stopped")
        if self.unfinished + len(choices) > self.capacity:
            raise QueueFull(f"{self.unfinished} sequences are queued or running (limit {self.capacity})")
        if any(c.extras.needed for c in choices) and not self.supports_extras:
            raise ValueError("penalties, logit_bias and logprobs are not supported by this engine build")
        stream = RequestStream(uuid.uuid4().hex, choices)
        accepted = self._loop.create_future()
        self.unfinished += len(choices)
        self._commands.put(("submit", (stream, accepted)))
        try:
            await accepted
        except BaseException:
            self.unfinished -= len(choices)
            stream.unfinished = 0
            stream.closed = True
            if not accepted.done():  # cancelled while waiting: the worker may still add it
                self._commands.put(("abort", stream))
            raise
        return stream

    def abort(self, stream: RequestStream) -> None:
        """Cancel what is left of `stream` (client gone, or done with it). Idempotent."""
        if stream.closed:
            return
        stream.closed = True
        self.unfinished -= stream.unfinished
        stream.unfinished = 0
        if self.alive:
            self._commands.put(("abort", stream))

    def _deliver(self, batch: list[tuple[RequestStream, Output]]) -> None:
        for stream, output in batch:
            if stream.closed:
                continue
            if output.finish_reason is not None:
                stream.unfinished -= 1
                self.unfinished -= 1
                if stream.unfinished == 0:
                    stream.closed = True
            if stream.first_token_time is None and output.token_id is not None:
                stream.first_token_time = time.monotonic()
            stream.queue.put_nowait(output)

    def _resolve(self, future: asyncio.Future, error: BaseException | None) -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    # ---- the worker thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except BaseException:
            log.exception("the engine thread stopped unexpectedly")
            raise
        finally:  # whatever ended the loop, nobody may wait forever
            for stream in {s for s, _ in self._streams.values()}:
                self._abort(stream, deliver=EngineUnavailable("the engine stopped before this request finished"))
            self._publish_stats()

    def _iterate(self) -> bool:
        """Run the queued commands, then one engine step; False once told to stop."""
        engine = self.engine
        try:  # sleep on the queue when idle; only peek while there is work
            command = self._commands.get_nowait() if engine.has_work else self._commands.get()
        except queue.Empty:
            command = None
        stop = False
        while command is not None:
            try:
                stop = self._handle(command) or stop
            except Exception:  # noqa: BLE001 — a bookkeeping bug must not end the loop for everyone
                log.exception("engine command %s failed", command[0])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                command = None
        if stop:
            return False
        if engine.has_work:
            self._step()
            if not engine.has_work:
                release_free_memory()
        self._publish_stats()
        return True

    def _handle(self, command: tuple) -> bool:
        kind, payload = command
        if kind == "submit":
            stream, accepted = payload
            self._add(stream, accepted)
        elif kind == "abort":
            self._abort(payload, deliver=None)
        elif kind == "abort_all":
            for stream in {s for s, _ in self._streams.values()}:
                self._abort(stream, deliver=EngineUnavailable("the server shut down before this request finished"))
        elif kind == "stop":
            return True
        return False

    def _add(self, stream: RequestStream, accepted: asyncio.Future) -> None:
        added = []
        try:
            for sequence_id, choice in zip(stream.sequence_ids, stream.choices):
                self.engine.add_request(choice.prompt_token_ids, choice.params, request_id=sequence_id)
                added.append(sequence_id)
                self._streams[sequence_id] = (stream, len(added) - 1)
                if choice.extras.needed:
                    self._samplers[sequence_id] = install(self.engine, sequence_id, len(choice.prompt_token_ids),
                                                          choice.extras, self.stop_token_id)
        except Exception as error:  # noqa: BLE001 — refused or failed: this request's error, not the loop's
            for sequence_id in added:
                self.engine.abort(sequence_id)
                self._forget(sequence_id)
            self._loop.call_soon_threadsafe(self._resolve, accepted, error)
            return
        self._loop.call_soon_threadsafe(self._resolve, accepted, None)

    def _abort(self, stream: RequestStream, deliver: Exception | None) -> None:
        batch = []
        for index, sequence_id in enumerate(stream.sequence_ids):
            if sequence_id in self._streams:
                self.engine.abort(sequence_id)
                self._forget(sequence_id)
                if deliver is not None:
                    batch.append((stream, Output(index, None, "", "error", error=deliver)))
        if batch:
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _forget(self, sequence_id: str) -> None:
        self._streams.pop(sequence_id, None)
        self._samplers.pop(sequence_id, None)

    def _step(self) -> None:
        try:
            records = self.engine.step()
        except Exception as error:  # noqa: BLE001 — the loop must survive; end what the step was running
            log.exception("engine step failed; ending the requests it was running")
            self._fail_running(error)
            return
        batch = []
        for sequence, record in records:
            entry = self._streams.get(sequence.request_id)
            if entry is None:
                continue
            stream, index = entry
            sampler = self._samplers.get(sequence.request_id)
            logprob = sampler.logprobs.popleft() if sampler is not None and sampler.logprobs else None
            if sampler is not None and sampler.error is not None:
                log.error("request %s failed in sampling: %r", stream.request_id, sampler.error)
                self.engine.abort(sequence.request_id)
                self._forget(sequence.request_id)
                batch.append((stream, Output(index, None, "", "error", error=RequestFailed(str(sampler.error)))))
                continue
            if record.finish_reason is not None:
                self._forget(sequence.request_id)
            batch.append((stream, Output(index, record.token_id, record.text, record.finish_reason,
                                         sequence.num_cached_prompt_tokens, logprob)))
        if batch:
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _fail_running(self, error: Exception) -> None:
        scheduler = self.engine.scheduler
        victims = list(scheduler.running) or list(scheduler.waiting)[:1]
        failed = RequestFailed(f"the engine failed while running this request: {error}")
        batch = []
        for sequence in victims:
            entry = self._streams.get(sequence.request_id)
            self.engine.abort(sequence.request_id)
            self._forget(sequence.request_id)
            if entry is not None:
                batch.append((entry[0], Output(entry[1], None, "", "error", error=failed)))
        if batch:
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _publish_stats(self) -> None:
        engine = self.engine
        blocks = engine.blocks
        # one dict swap: readers on the event loop see a consistent snapshot
        self.stats = {
            "running": len(engine.scheduler.running),
            "waiting": len(engine.scheduler.waiting),
            "free_state_slots": blocks.num_free_state_slots,
            "total_state_slots": engine.plan.num_state_slots,
            "free_blocks": blocks.num_free_blocks,
            "total_blocks": blocks.num_blocks,
            "prefix_cache_queries": blocks.queries,
            "prefix_cache_hits": blocks.hits,
        }
