"""LLM: a checkpoint directory's model and tokenizer behind generate / stream / chat."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

import time

from hybridlm.engine.engine import Engine, EngineConfig
from hybridlm.engine.generate import GenerationResult, StreamRecord, check_prompt, peak_memory_bytes
from hybridlm.engine.params import SamplingParams
from hybridlm.io.checkpoint import load_model
from hybridlm.io.tokenizer import Tokenizer

# generation_config.json fields that become the default SamplingParams (as vLLM's "auto" does)
_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class LLM:
    """Load once, generate many times. `LLM(path).generate("def fib(n):")[0].text`.

    Requests run on the continuous-batching Engine (paged KV, state slots, prefix cache); its limits come
    from `engine_config`.
    """

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        strict_config: bool = True,
        engine_config: EngineConfig | None = None,
    ) -> None:
        self.path = Path(path)
        self.model = load_model(self.path, device=device, dtype=dtype, strict_config=strict_config)
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.eos_token_ids = list(self.tokenizer.eos_token_ids or self.model.config.eos_token_id)
        defaults = getattr(self.tokenizer, "generation_defaults", {}) or {}
        self.default_sampling = SamplingParams(**{k: defaults[k] for k in _DEFAULT_FIELDS if defaults.get(k) is not None})
        self.engine = Engine(self.model, self.tokenizer, self.eos_token_ids, engine_config)

    @property
    def config(self):
        return self.model.config

    def _requests(
        self,
        prompts: str | Sequence[str] | None,
        sampling: SamplingParams | Sequence[SamplingParams] | None,
        prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None,
    ) -> tuple[list[list[int]], list[SamplingParams]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if not all(isinstance(p, str) for p in prompts):
                raise TypeError("prompts must be a string or a list of strings")
            token_lists = [self.tokenizer.encode(p) for p in prompts]
        else:
            if len(prompt_token_ids) and isinstance(prompt_token_ids[0], int):
                prompt_token_ids = [prompt_token_ids]
            token_lists = [list(p) for p in prompt_token_ids]
        if not token_lists:
            raise ValueError("no prompts given")
        if sampling is None:
            sampling = self.default_sampling
        if isinstance(sampling, SamplingParams):
            params = [sampling] * len(token_lists)
        else:
            params = list(sampling)
            if len(params) != len(token_lists) or not all(isinstance(p, SamplingParams) for p in params):
                raise ValueError(f"sampling must be one SamplingParams or one per prompt ({len(token_lists)})")
        return token_lists, params

    def _run(self, token_lists: list[list[int]], params: list[SamplingParams]) -> Iterator[StreamRecord]:
        """Submit every request (all validated first, so a bad one submits none), then yield records as the
        engine steps. Closing the iterator early cancels what is still running."""
        config = self.model.config
        for tokens in token_lists:
            check_prompt(tokens, config.max_position_embeddings, config.vocab_size)
        submitted = []
        try:
            for tokens, p in zip(token_lists, params):
                submitted.append(self.engine.add_request(tokens, p))
        except ValueError:
            for sequence in submitted:
                self.engine.abort(sequence.request_id)
            raise
        return self._records(submitted)

    def _records(self, submitted: list) -> Iterator[StreamRecord]:
        index = {sequence.request_id: i for i, sequence in enumerate(submitted)}
        try:
            while any(not s.is_finished for s in submitted):
                for sequence, record in self.engine.step():
                    if sequence.request_id in index:
                        record.index = index[sequence.request_id]
                        yield record
        finally:
            for sequence in submitted:
                self.engine.abort(sequence.request_id)

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
    ) -> list[GenerationResult]:
        """Complete each prompt (text, or token ids); one GenerationResult per prompt, in order."""
        token_lists, params = self._requests(prompts, sampling, prompt_token_ids)
        texts = [""] * len(token_lists)
        tokens: list[list[int]] = [[] for _ in token_lists]
        reasons: list[str | None] = [None] * len(token_lists)
        start = time.perf_counter()
        first_token_times = []
        for record in self._run(token_lists, params):
            if not tokens[record.index]:
                first_token_times.append(time.perf_counter())
            texts[record.index] += record.text
            tokens[record.index].append(record.token_id)
            reasons[record.index] = record.finish_reason or reasons[record.index]
        end = time.perf_counter()
        prefill_end = max(first_token_times)  # every prompt has been through prefill by then
        decoded = sum(len(t) for t in tokens) - len(tokens)
        peak = peak_memory_bytes(self.model.device)
        return [
            GenerationResult(
                text=texts[i], token_ids=tokens[i], finish_reason=reasons[i], prompt_token_ids=token_lists[i],
                prompt_tps=sum(map(len, token_lists)) / max(prefill_end - start, 1e-9),
                generation_tps=decoded / max(end - prefill_end, 1e-9) if decoded else 0.0,
                peak_memory_bytes=peak,
            )
            for i in range(len(token_lists))
        ]

    def stream(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
    ) -> Iterator[StreamRecord]:
        """StreamRecords as tokens are produced (record.index says which prompt). Bad input raises here;
        closing the iterator early cancels the requests."""
        token_lists, params = self._requests(prompts, sampling, prompt_token_ids)
        return self._run(token_lists, params)

    def chat_prompt(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        enable_thinking: bool | None = None,
        **template_kwargs,
    ) -> list[int]:
        """The token ids of a conversation rendered through the checkpoint's chat template."""
        return self.tokenizer.encode_chat(messages, tools=tools, add_generation_prompt=True,
                                          enable_thinking=enable_thinking, **template_kwargs)

    def chat(
        self,
        messages: list[dict],
        sampling: SamplingParams | None = None,
        tools: list[dict] | None = None,
        enable_thinking: bool | None = None,
        **template_kwargs,
    ) -> GenerationResult:
        """The assistant's next message for one conversation."""
        ids = self.chat_prompt(messages, tools=tools, enable_thinking=enable_thinking, **template_kwargs)
        return self.generate(prompt_token_ids=[ids], sampling=sampling)[0]

    def chat_stream(
        self,
        messages: list[dict],
        sampling: SamplingParams | None = None,
        tools: list[dict] | None = None,
        enable_thinking: bool | None = None,
        **template_kwargs,
    ) -> Iterator[StreamRecord]:
        ids = self.chat_prompt(messages, tools=tools, enable_thinking=enable_thinking, **template_kwargs)
        return self.stream(prompt_token_ids=[ids], sampling=sampling)
