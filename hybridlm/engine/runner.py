"""ModelRunner: the only place where scheduled sequences become tensors."""
from __future__ import annotations

import torch

from hybridlm.engine.cache import EngineCache, PagedContext
from hybridlm.engine.scheduler import SchedulerOutput
from hybridlm.model import HybridLM


class ModelRunner:
    def __init__(self, model: HybridLM, cache: EngineCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device

    def _prepare_states(self, output: SchedulerOutput) -> None:
        """Fresh sequences start from zero; prefix-cache hits start from their snapshot."""
        reset = [c.sequence.state_slot for c in output.chunks if c.reset_state]
        if reset:
            self.cache.zero_state(torch.tensor(reset, device=self.device))
        restores = [(self.cache.snapshot_index(c.restore_from), c.sequence.state_slot)
                    for c in output.chunks if c.restore_from is not None]
        if restores:
            source, target = (torch.tensor(x, device=self.device) for x in zip(*restores))
            self.cache.copy_state(source, target)

    def _save_snapshots(self, output: SchedulerOutput) -> None:
        saves = [(c.sequence.state_slot, self.cache.snapshot_index(c.save_to))
                 for c in output.chunks if c.save_to is not None]
        if saves:
            source, target = (torch.tensor(x, device=self.device) for x in zip(*saves))
            self.cache.copy_state(source, target)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> torch.Tensor:
        """Run one step; return fp32 logits [n, vocab] for the chunks that sample, in chunk order."""
        chunks = output.chunks
        self._prepare_states(output)
        tokens = [t for c in chunks for t in c.sequence.token_ids()[c.start : c.start + c.length]]
        context = PagedContext(
            self.cache,
            starts=[c.start for c in chunks],
            lengths=[c.length for c in chunks],
            state_slots=[c.sequence.state_slot for c in chunks],
            block_tables=[c.sequence.block_table for c in chunks],
            device=self.device,
        )
        input_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        input_ids = input_ids[:, None] if context.decode else input_ids[None]
        ends, total = [], 0
        for c in chunks:
            total += c.length
            if c.samples:
                ends.append(total - 1)
        logits = None
        indices = torch.tensor(ends, dtype=torch.long, device=self.device)
        logits = self.model.forward_with_context(input_ids, context, logits_indices=indices)
        self._save_snapshots(output)
        return logits.float()
