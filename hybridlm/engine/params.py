"""Per-request sampling parameters."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature == 0 is greedy (argmax).

    top_k == 0 (or -1) and top_p == 1 and min_p == 0 disable those filters; repetition_penalty > 1
    discourages tokens already in the prompt or the output (transformers' rule). `stop` strings end the
    output before the string; eos tokens end it unless `ignore_eos`.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def number(name: str, value: object, integer: bool = False) -> None:
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")

        number("max_tokens", self.max_tokens, integer=True)
        number("top_k", self.top_k, integer=True)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            number(name, getattr(self, name))
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:  # written so that NaN fails too
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # chained comparisons reject NaN as well
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 0 (or -1 for off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an integer or None, got {self.seed!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop_strings", tuple(stop))
        if self.stop_token_ids is not None and any(
            isinstance(t, bool) or not isinstance(t, int) for t in self.stop_token_ids
        ):
            raise TypeError(f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
