"""LLM: a checkpoint directory's model and tokenizer behind generate / stream / chat."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from hybridlm.engine.generate import GenerationResult, StreamRecord, generate_batch, stream_batch
from hybridlm.engine.params import SamplingParams
from hybridlm.io.checkpoint import load_model
from hybridlm.io.tokenizer import Tokenizer

# generation_config.json fields that become the default SamplingParams (as vLLM's "auto" does)
_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class LLM:
    """Load once, generate many times. `LLM(path).generate("def fib(n):")[0].text`."""

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        strict_config: bool = True,
    ) -> None:
        self.path = Path(path)
        self.model = load_model(self.path, device=device, dtype=dtype, strict_config=strict_config)
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.eos_token_ids = list(self.tokenizer.eos_token_ids or self.model.config.eos_token_id)
        defaults = getattr(self.tokenizer, "generation_defaults", {}) or {}
        self.default_sampling = SamplingParams(**{k: defaults[k] for k in _DEFAULT_FIELDS if defaults.get(k) is not None})

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

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
    ) -> list[GenerationResult]:
        """Complete each prompt (text, or token ids); one GenerationResult per prompt, in order."""
        token_lists, params = self._requests(prompts, sampling, prompt_token_ids)
        return generate_batch(self.model, self.tokenizer, token_lists, params, self.eos_token_ids)

    def stream(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
    ) -> Iterator[StreamRecord]:
        """StreamRecords as tokens are produced (record.index says which prompt)."""
        token_lists, params = self._requests(prompts, sampling, prompt_token_ids)
        return stream_batch(self.model, self.tokenizer, token_lists, params, self.eos_token_ids)

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
