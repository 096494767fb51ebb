"""Turn next-token logits into tokens, row by row, each row with its own SamplingParams and generator."""
from __future__ import annotations

import torch

from hybridlm.engine.params import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: a seen token's logit is divided by the penalty if positive, multiplied if not."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    scores = logits.gather(-1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, seen, scores)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, each masking tokens to -inf. logits [V] fp32."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    """One generator per request: a request with a seed gives the same tokens whatever its batch mates."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    @property
    def needs_history(self) -> bool:
        return self.params.repetition_penalty != 1.0

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: the engine takes these rows' tokens in one batched argmax."""
        return self.params.greedy and not self.needs_history

    def sample(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """The token as a 0-d tensor on the logits' device (no host sync). seen: token ids of the prompt and
        output so far, needed only for the repetition penalty."""
        logits = apply_repetition_penalty(logits.float(), seen, self.params.repetition_penalty)
        if self.params.greedy:
            return logits.argmax()
        probs = filter_logits(logits, self.params).softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None) -> int:
        """logits [V] -> the token id."""
        return int(self.sample(logits, seen))
