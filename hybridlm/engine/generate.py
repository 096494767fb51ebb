"""Generation records and the plain generator on the model's own HybridCache.

    StreamRecord / GenerationResult   what LLM.stream / LLM.generate hand out
    BatchGenerator                    left-padded batch prefill, then decode, with model.forward alone:
                                      the simple reference the continuous-batching Engine is tested against
"""
from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hybridlm.engine.params import SamplingParams
from hybridlm.engine.sampler import Sampler
from hybridlm.model import HybridLM


@dataclass
class StreamRecord:
    """One new token of request `index`: its id, the text it completed (may be ''), and the finish reason
    ('stop' or 'length') on the request's last record."""

    index: int
    token_id: int | None
    text: str
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_token_ids: list[int] = field(repr=False)
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_bytes: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def generation_tokens(self) -> int:
        return len(self.token_ids)


def check_prompt(prompt: Sequence[int], context_length: int, vocab_size: int) -> None:
    if len(prompt) == 0:
        raise ValueError("prompt is empty (0 tokens)")
    if len(prompt) >= context_length:
        raise ValueError(
            f"prompt has {len(prompt)} tokens but the model's context is {context_length} tokens "
            "(max_position_embeddings); shorten the prompt"
        )
    bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}), got {bad[:5]}")


class BatchGenerator:
    """Prefill a left-padded batch, then decode one token per live row per `step()`."""

    def __init__(
        self,
        model: HybridLM,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        eos_token_ids: Sequence[int] = (),
        prefill_chunk: int = 2048,
    ) -> None:
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        config = model.config
        for prompt in prompts:
            check_prompt(prompt, config.max_position_embeddings, config.vocab_size)
        self.model = model
        self.device = model.device
        self.params = list(params)
        self.samplers = [Sampler(p, self.device) for p in params]
        self.stop_ids = [set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(eos_token_ids)) for p in params]
        self.history = [torch.tensor(p, dtype=torch.long, device=self.device) for p in prompts]
        self.prompt_lengths = [len(p) for p in prompts]
        self.outputs: list[list[int]] = [[] for _ in prompts]
        self.finish_reasons: list[str | None] = [None] * len(prompts)
        self.live = list(range(len(prompts)))  # request index of each cache row
        self.prefill_chunk = prefill_chunk
        self.cache = None
        self.next_tokens: dict[int, int] = {}
        self.prefill_seconds = 0.0

    @property
    def done(self) -> bool:
        return not self.live

    def finish(self, index: int, reason: str) -> None:
        """End request `index`. The first reason stays, except that a matched stop string always reports
        "stop" (even when it came with the last allowed token)."""
        if self.finish_reasons[index] is None or (reason == "stop" and self.finish_reasons[index] == "length"):
            self.finish_reasons[index] = reason

    @torch.inference_mode()
    def _prefill(self) -> torch.Tensor:
        longest = max(self.prompt_lengths)
        batch = len(self.live)
        ids = torch.zeros(batch, longest, dtype=torch.long, device=self.device)
        valid = torch.zeros(batch, longest, dtype=torch.bool, device=self.device)
        for row, index in enumerate(self.live):
            length = self.prompt_lengths[index]
            ids[row, longest - length:] = self.history[index]
            valid[row, longest - length:] = True
        self.cache = self.model.new_cache(batch)
        mask = None if bool(valid.all()) else valid
        logits = None
        for start in range(0, longest, self.prefill_chunk):
            end = min(start + self.prefill_chunk, longest)
            chunk_mask = None if mask is None else mask[:, start:end]
            logits = self.model(ids[:, start:end], cache=self.cache, attention_mask=chunk_mask, logits_to_keep=1)
        return logits[:, -1]

    @torch.inference_mode()
    def step(self) -> dict[int, int]:
        """One token for every live request: {request index: token id}. Finished requests leave the batch."""
        if self.done:
            return {}
        if self.cache is None:
            start = time.perf_counter()
            logits = self._prefill()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.prefill_seconds = time.perf_counter() - start
        else:
            last = torch.tensor([[self.outputs[i][-1]] for i in self.live], device=self.device)
            logits = self.model(last, cache=self.cache)[:, -1]
        logits = logits.float()
        new_tokens = {}
        context = self.model.config.max_position_embeddings
        for row, index in enumerate(self.live):
            token = self.samplers[index](logits[row], self.history[index])
            self.outputs[index].append(token)
            self.history[index] = torch.cat([self.history[index], torch.tensor([token], device=self.device)])
            new_tokens[index] = token
            if token in self.stop_ids[index]:
                self.finish(index, "stop")
            elif len(self.outputs[index]) >= self.params[index].max_tokens:
                self.finish(index, "length")
            elif len(self.history[index]) >= context:
                self.finish(index, "length")  # the context is full: no position left for another token
        return new_tokens

    def drop_finished(self) -> None:
        keep = [row for row, index in enumerate(self.live) if self.finish_reasons[index] is None]
        if len(keep) != len(self.live):
            if keep:
                self.cache.select(keep)
            self.live = [self.live[row] for row in keep]


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
