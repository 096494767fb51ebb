"""What the OpenAI API asks of sampling beyond SamplingParams: presence/frequency penalties, logit_bias,
logprobs, and (for tests) a scripted output. Applied by wrapping one request's engine Sampler, on the
engine thread, so engine files stay untouched.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache

import torch


@dataclass(frozen=True)
class SamplingExtras:
    """Per-request additions; `needed` says whether the engine's sampler must be wrapped at all."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    num_logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the top k
    script: tuple[int, ...] | None = None  # forced output token ids (test hook); eos after them

    @property
    def needed(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.num_logprobs is not None or self.script is not None)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


class ServingSampler:
    """Wraps the engine's per-request Sampler. Called as `sampler(logits [V], seen [prompt + output])`.

    Logprobs are those of the model's own distribution (log-softmax of the raw logits, before penalties
    and temperature), as vLLM reports them. A failure is kept in `error` and the request is ended by the
    worker, so one bad request never breaks the engine's step for the others.
    """

    def __init__(self, base, num_prompt_tokens: int, extras: SamplingExtras, stop_token_id: int) -> None:
        self.base = base
        self.num_prompt_tokens = num_prompt_tokens
        self.extras = extras
        self.stop_token_id = stop_token_id
        self.logprobs: deque[TokenLogprob] = deque()
        self.error: Exception | None = None

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> int:
        try:
            return self._sample(logits, seen)
        except Exception as error:  # noqa: BLE001 — delivered to this request; the step must finish for the rest
            self.error = error
            return self.stop_token_id

    def _sample(self, logits: torch.Tensor, seen: torch.Tensor) -> int:
        extras = self.extras
        logits = logits.float()
        position = seen.numel() - self.num_prompt_tokens  # index of the token about to be sampled
        if extras.script is not None:
            token = extras.script[position] if position < len(extras.script) else self.stop_token_id
        else:
            adjusted = logits
            if extras.logit_bias:
                ids = torch.tensor(list(extras.logit_bias), device=logits.device)
                bias = torch.tensor(list(extras.logit_bias.values()), device=logits.device, dtype=logits.dtype)
                adjusted = adjusted.index_add(0, ids, bias)
            if (extras.presence_penalty or extras.frequency_penalty) and position > 0:
                # OpenAI's rule, over the output only: logit -= presence * [count > 0] + frequency * count
                counts = torch.bincount(seen[self.num_prompt_tokens:], minlength=logits.numel())[: logits.numel()]
                counts = counts.to(logits.dtype)
                adjusted = adjusted - extras.presence_penalty * (counts > 0) - extras.frequency_penalty * counts
            token = self.base(adjusted, seen)
        if extras.num_logprobs is not None:
            logprobs = logits.log_softmax(-1)
            top = []
            if extras.num_logprobs > 0:
                values, ids = logprobs.topk(extras.num_logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
            self.logprobs.append(TokenLogprob(token, float(logprobs[token]), top))
        return token


def install(engine, request_id: str, num_prompt_tokens: int, extras: SamplingExtras, stop_token_id: int) -> ServingSampler:
    """Wrap the sampler the engine made for `request_id` (call right after add_request, on the engine thread)."""
    wrapped: list[ServingSampler] = []

    def wrap(sampler):
        wrapped.append(ServingSampler(sampler, num_prompt_tokens, extras, stop_token_id))
        return wrapped[0]

    engine.wrap_sampler(request_id, wrap)
    return wrapped[0]


# ------------------------------------------------------------------------------------------------ token text
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character each byte is stored as -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenText:
    """A token's bytes and text for logprobs (OpenAI's `token` and `bytes` fields), cached per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            piece = self.tokenizer.id_to_token(token_id) if token_id < self.tokenizer.vocab_size else None
            if piece is None:
                data = b""
            else:
                decoder = _byte_decoder()
                data = bytes(decoder[c] for c in piece) if all(c in decoder for c in piece) else piece.encode()
            cached = (data.decode("utf-8", errors="replace"), list(data))
            if len(self._cache) < 1 << 18:
                self._cache[token_id] = cached
        return cached
