"""One request's state as the scheduler sees it: plain Python, no tensors."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from hybridlm.engine.params import SamplingParams

_ids = itertools.count()

PLACEHOLDER = -1  # an output token still on the device (overlapped decode); replaced before the engine's step returns


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens in, tokens out, and where this request's cache lives.

    `num_computed` tokens have their K/V in `block_table` and are folded into the recurrent state in
    `state_slot`; the next forward feeds tokens [num_computed, num_tokens).
    """

    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache (usage's cached_tokens)
    block_table: list[int] = field(default_factory=list)
    state_slot: int | None = None
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks, grown as needed
    num_registered_blocks: int = 0  # blocks of block_table already indexed for prefix sharing

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids()[start:end] without building the whole list."""
        prompt = len(self.prompt_token_ids)
        if end <= prompt:
            return self.prompt_token_ids[start:end]
        if start >= prompt:
            return self.output_token_ids[start - prompt : end - prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt]

    def token_at(self, index: int) -> int:
        prompt = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < prompt else self.output_token_ids[index - prompt]

    @property
    def remaining(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
