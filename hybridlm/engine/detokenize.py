"""Incremental text of one request: deltas as tokens arrive, stop strings cut and held back."""
from __future__ import annotations

from hybridlm.engine.params import SamplingParams


class TextStream:
    """Incremental text of one request, with stop strings held back until they can no longer match."""

    def __init__(self, tokenizer, params: SamplingParams) -> None:
        self.decoder = tokenizer.incremental_decoder(skip_special_tokens=params.skip_special_tokens)
        self.stops = params.stop_strings
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int, is_stop_token: bool) -> str:
        if not is_stop_token:
            self.text += self.decoder.push(token)
        return self._release(final=False)

    def close(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stops and not self.stopped:
            search_from = max(0, self.emitted - self.hold)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
        end = len(self.text) if final or self.stopped else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
