"""Engine: continuous batching over the paged hybrid cache. add_request, step, abort.

One step = schedule (plain Python) -> run the model on every scheduled chunk at once -> sample a token for
each sequence whose chunk reached its end -> detokenise, check stop conditions, finish sequences. Between decode
steps whose tokens are sampled on the device (greedy or by the engine's samplers, no repetition penalty) the engine
runs one step ahead: the next step is launched on the device's tokens (a placeholder stands in on the host)
before the current step's tokens are read back (`overlap_decode`).
"""
from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from hybridlm.engine.block_manager import BlockManager
from hybridlm.engine.cache import EngineCache, device_tensor, plan_cache
from hybridlm.engine.detokenize import TextStream
from hybridlm.engine.generate import StreamRecord, check_prompt
from hybridlm.engine.packed_prefill import ALIGN
from hybridlm.engine.params import SamplingParams
from hybridlm.engine.runner import ModelRunner
from hybridlm.engine.sampler import Sampler
from hybridlm.engine.scheduler import Scheduler, SchedulerOutput
from hybridlm.engine.sequence import PLACEHOLDER, Sequence
from hybridlm.model import HybridLM


@dataclass(frozen=True)
class EngineConfig:
    """Cache and batching limits. `cache_memory_bytes` None: a fraction of free GPU memory on CUDA
    (`gpu_memory_utilization` of the total, minus what is in use), 1 GiB on CPU."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    block_size: int = 64
    cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    snapshot_fraction: float = 0.1
    cuda_graphs: bool = True  # capture the decode step per batch-size bucket (CUDA, dense models); False: no graphs
    paged_prefill_kernel: bool = True  # CUDA: a mixed step's attention in one paged-prefill launch
    # CUDA, dense models, with cuda_graphs: a step that prefills one sequence's chunk of up to this many tokens replays
    # a CUDA graph captured for its length bucket (64, 128, ... 2048) instead of running eagerly (H100: time to first
    # token 6x lower at 512 tokens on 0.8B, 2.8x on 9B; benchmarks/RESULTS.md); 0 turns them off
    prefill_graphs: int = 2048
    # with prefill graphs: a step of several chunks (requests joining a running batch, several prompts prefilled at
    # once) replays each prefill chunk's graph, then the decode rows' step, instead of one eager mixed step, wherever
    # the replays' device times (measured at capture) sum to less than the eager step should take (the weights are
    # read once per replay, the host's ~30 ms for an eager step is saved; H100, 0.8B, 256 requests, one prefill
    # chunk a step: 12,803 / 12,908 tok/s against 12,550 / 12,012 unsplit; benchmarks/RESULTS.md)
    split_mixed_steps: bool = True
    # with split_mixed_steps: a step of several prefill chunks replays a graph over them packed into one row
    # (`engine/packed_prefill.py`: buckets of 256 ... max_num_batched_tokens tokens, at most 8192; 8 to 16 chunks a
    # replay, more take several), instead of one replay per chunk or an eager step, wherever that should cost less;
    # the scheduler then charges each prefill chunk its length aligned to 64 tokens, so that a full step fits its
    # bucket
    packed_prefill: bool = True
    # decode sampled on the device (greedy, or the engine's samplers without a repetition penalty): launch the next
    # step on this step's tokens still on the device, then read them back, so the host's scheduling and
    # detokenising overlap the GPU instead of stalling it
    overlap_decode: bool = True

    def __post_init__(self) -> None:
        if self.block_size % 64 and 64 % self.block_size:
            raise ValueError(f"block_size must divide or be a multiple of 64, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.prefill_graphs < 0:
            raise ValueError(f"prefill_graphs must be >= 0 (0 turns them off), got {self.prefill_graphs}")


def cache_budget(model: HybridLM, config: EngineConfig) -> int:
    if config.cache_memory_bytes is not None:
        return config.cache_memory_bytes
    if model.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(model.device)
        used = total - free
        # keep room for activations: a prefill step of max_num_batched_tokens
        activations = 64 * config.max_num_batched_tokens * model.config.hidden_size * 4
        return max(int(total * config.gpu_memory_utilization) - used - activations, 0)
    # CPU: at most 1 GiB, and no more than every sequence at full context needs
    layout, dtype = model.cache_layout, model.dtype
    full = config.max_num_seqs * (layout.state_bytes_per_sequence(dtype)
                                  + model.config.max_position_embeddings * layout.kv_bytes_per_token(dtype))
    return min(1 << 30, int(full / (1 - config.snapshot_fraction)) + (1 << 20))


class Engine:
    def __init__(self, model: HybridLM, tokenizer, eos_token_ids: Seq[int] = (), config: EngineConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.config = config or EngineConfig()
        self.plan = plan_cache(model.cache_layout, model.dtype, cache_budget(model, self.config), self.config.max_num_seqs,
                               self.config.block_size, self.config.snapshot_fraction)
        self.blocks = BlockManager(self.plan.num_blocks, self.plan.block_size, self.plan.num_state_slots,
                                   self.plan.num_snapshot_slots)
        self.scheduler = Scheduler(self.blocks, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.runner = ModelRunner(model, EngineCache(model, self.plan), self.config.max_num_seqs,
                                  cuda_graphs=self.config.cuda_graphs,
                                  paged_prefill_kernel=self.config.paged_prefill_kernel,
                                  prefill_graphs=min(self.config.prefill_graphs, self.config.max_num_batched_tokens),
                                  split_mixed_steps=self.config.split_mixed_steps,
                                  packed_prefill=self.config.max_num_batched_tokens if self.config.packed_prefill
                                  else 0)
        if self.runner.packed_graphs is not None:  # each prefill chunk charged its aligned length: a step fits a bucket
            self.scheduler.prefill_align = ALIGN
        self.requests: dict[str, Sequence] = {}
        self._samplers: dict[str, Callable] = {}
        self._texts: dict[str, TextStream] = {}
        self._history: dict[str, TokenHistory] = {}  # only for samplers that look at earlier tokens
        self._inflight: _InFlight | None = None  # a decode step launched, its tokens not read back yet
        pinned = model.device.type == "cuda"
        self._token_buffers = [torch.empty(self.config.max_num_seqs, dtype=torch.long, pin_memory=pinned)
                               for _ in range(2)]  # host copies of two steps' tokens in flight at once

    # ---- requests --------------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: Seq[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        config = self.model.config
        check_prompt(prompt_token_ids, config.max_position_embeddings, config.vocab_size)
        sequence = Sequence(list(prompt_token_ids), params)
        if request_id is not None:
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            sequence.request_id = request_id
        self.scheduler.add(sequence)
        self.requests[sequence.request_id] = sequence
        self._samplers[sequence.request_id] = Sampler(params, self.model.device)
        self._texts[sequence.request_id] = TextStream(self.tokenizer, params)
        return sequence

    def wrap_sampler(self, request_id: str, wrap: Callable[[Sampler], Callable]) -> None:
        """Replace a request's sampler by `wrap(sampler)`: a callable (logits [V], seen ids) -> token id. The
        hook for what a serving layer adds on top of SamplingParams (penalties, logit bias, logprobs)."""
        self._samplers[request_id] = wrap(self._samplers[request_id])

    def abort(self, request_id: str) -> None:
        """Cancel a request; its cache is released at once. Unknown or finished ids are ignored."""
        sequence = self.requests.get(request_id)
        if sequence is not None and not sequence.is_finished:
            self.scheduler.finish(sequence, "abort")
            self._forget(sequence)

    def _forget(self, sequence: Sequence) -> None:
        for table in (self.requests, self._samplers, self._texts, self._history):
            table.pop(sequence.request_id, None)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- one step --------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, StreamRecord]]:
        """Advance every scheduled sequence; return a record for each one that produced a token.

        With `overlap_decode`, a decode step sampled on the device is read back one call later: this call launches
        the next step first (when nothing but the same sequences' next tokens can be scheduled), then reads this
        one, so the GPU does not wait for the host between such steps. Every call still returns one step's
        tokens."""
        if self._inflight is None:
            output = self.scheduler.schedule()
            if not output.chunks:
                if self.scheduler.waiting and not self.scheduler.running:
                    raise RuntimeError("no request can be scheduled: the cache is too small for the oldest waiting one")
                return []
            logits = self.runner.execute(output)
            self.scheduler.commit(output)
            sampling = [c.sequence for c in output.chunks if c.samples]
            if not self._overlaps(output):
                return self._emit(sampling, self._sample(sampling, logits))
            self._inflight = self._launch_tokens(output, logits)
        current, self._inflight = self._inflight, None
        if self._can_run_ahead(current):
            for sequence in current.sequences:  # its next token, still on the device: a placeholder until read
                sequence.output_token_ids.append(PLACEHOLDER)
            output = self.scheduler.schedule()
            if [(c.sequence, c.length) for c in output.chunks] != [(s, 1) for s in current.sequences]:
                raise RuntimeError("internal error: a decode step scheduled ahead does not match the one in flight")
            self._inflight = self._launch_tokens(output, self.runner.execute(output, input_ids=current.tokens))
        tokens = self._read_tokens(current)
        if self._inflight is not None:
            for sequence, token in zip(current.sequences, tokens):
                sequence.output_token_ids[-1] = token
            self.scheduler.commit(self._inflight.output)  # its inputs are real tokens now: blocks can be hashed
        records = self._emit(current.sequences, tokens, appended=self._inflight is not None)
        if self._inflight is not None and all(s.is_finished for s in self._inflight.sequences):
            self._inflight = None  # nothing left to read from it (its work on the GPU is simply wasted)
        return records

    def _samples_on_device(self, sequence: Sequence) -> bool:
        """The engine's own sampler without a repetition penalty: its token is made on the device from the logits
        alone (greedy or seeded/unseeded sampling), so a next step can take it from there."""
        sampler = self._samplers[sequence.request_id]
        return type(sampler) is Sampler and not sampler.needs_history

    def _overlaps(self, output: SchedulerOutput) -> bool:
        """Whether this step's tokens may be read back one call later: a pure decode step whose every row samples
        on the device."""
        if not self.config.overlap_decode:
            return False
        return all(c.length == 1 and c.start > 0 and c.samples and self._samples_on_device(c.sequence)
                   for c in output.chunks)

    def _can_run_ahead(self, current: _InFlight) -> bool:
        """Whether the next step can be scheduled before `current`'s tokens are known: it would feed exactly those
        tokens to the same sequences (nothing waiting, no sequence gone, none at its token limit, and blocks to
        spare). A step that completes a block still runs ahead: the scheduler keys its state snapshot by the
        block's hash only at commit, once the token is real."""
        running = self.scheduler.running
        if (self.scheduler.waiting or len(running) != len(current.sequences)
                or any(a is not b for a, b in zip(running, current.sequences))):
            return False
        context, needed = self.model.config.max_position_embeddings, 0
        for sequence in running:
            if not self._samples_on_device(sequence):
                return False
            if len(sequence.output_token_ids) + 1 >= sequence.params.max_tokens or sequence.num_tokens + 1 >= context:
                return False
            needed += self.blocks.blocks_needed(len(sequence.block_table), sequence.num_computed + 1)
        return needed <= self.blocks.num_free_blocks

    def _launch_tokens(self, output: SchedulerOutput, logits: torch.Tensor) -> _InFlight:
        """The step's tokens made on the device (one batched argmax for the plain-greedy rows, each other row by its
        own sampler and generator) and their copy to the host, started but not waited for."""
        sequences = [c.sequence for c in output.chunks]
        tokens = logits.argmax(-1)
        sampled = [(row, self._samplers[s.request_id]) for row, s in enumerate(sequences)
                   if not self._samplers[s.request_id].plain_greedy]
        if sampled:
            rows = list(tokens.unbind(0))
            for row, sampler in sampled:
                rows[row] = sampler.sample(logits[row], None)
            tokens = torch.stack(rows)
        self._token_buffers.reverse()  # the other buffer may still be awaiting the step before
        host = self._token_buffers[0][: len(sequences)]
        host.copy_(tokens, non_blocking=True)
        ready = None
        if tokens.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        return _InFlight(output, sequences, tokens, host, ready)

    @staticmethod
    def _read_tokens(step: _InFlight) -> list[int]:
        if step.ready is not None:
            step.ready.synchronize()
        return step.host.tolist()

    def _emit(self, sampling: list[Sequence], tokens: list[int], appended: bool = False
              ) -> list[tuple[Sequence, StreamRecord]]:
        """Hand each sequence its token (already in place when `appended`): history, detokenising, stop checks;
        finished sequences release their cache. Sequences that ended meanwhile (aborted) are skipped."""
        records = []
        context = self.model.config.max_position_embeddings
        for sequence, token in zip(sampling, tokens):
            if sequence.is_finished:
                continue
            rid = sequence.request_id
            if not appended:
                sequence.output_token_ids.append(token)
            if rid in self._history:
                self._history[rid].append(token)
            params = sequence.params
            is_stop_token = token in (params.stop_token_ids or ()) or (not params.ignore_eos and token in self.eos_token_ids)
            text = self._texts[rid]
            delta = text.push(token, is_stop_token)
            reason = None
            if text.stopped or is_stop_token:
                reason = "stop"
            elif len(sequence.output_token_ids) >= params.max_tokens or sequence.num_tokens >= context:
                reason = "length"
            if reason is not None:
                delta += text.close()
                self.scheduler.finish(sequence, reason)
                self._forget(sequence)
            records.append((sequence, StreamRecord(index=-1, token_id=token, text=delta, finish_reason=reason)))
        return records

    def _seen(self, sequence: Sequence) -> torch.Tensor:
        history = self._history.get(sequence.request_id)
        if history is None:
            history = self._history[sequence.request_id] = TokenHistory(sequence.token_ids(), self.model.device)
        return history.tokens

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token per row of logits [n, V], read back to the host in one transfer: plain greedy rows by one
        batched argmax, other engine samplers on the GPU without syncs; wrapped samplers (a serving layer's)
        are called row by row and return ints."""
        greedy, sampled, tokens = [], [], [None] * len(sequences)
        for row, sequence in enumerate(sequences):
            sampler = self._samplers[sequence.request_id]
            if type(sampler) is Sampler and sampler.plain_greedy:
                greedy.append(row)
            elif type(sampler) is Sampler:
                seen = self._seen(sequence) if sampler.needs_history else None
                sampled.append((row, sampler.sample(logits[row], seen)))
            else:
                tokens[row] = int(sampler(logits[row], self._seen(sequence)))
        parts = []
        if greedy:
            rows = logits if len(greedy) == len(sequences) else logits[device_tensor(greedy, logits.device, torch.long)]
            parts.append(rows.argmax(-1))
        parts += [token.view(1) for _, token in sampled]
        if parts:
            values = torch.cat(parts).tolist()
            for row, value in zip(greedy + [row for row, _ in sampled], values):
                tokens[row] = value
        return tokens


@dataclass
class _InFlight:
    """A decode step launched and committed whose tokens have not been read back: its chunks, its sequences (one
    token each, in row order), the tokens on the device and their host copy (valid once `ready` has passed)."""

    output: SchedulerOutput
    sequences: list[Sequence]
    tokens: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None


class TokenHistory:
    """A request's prompt + output ids on the device, grown by doubling (appending never copies the past)."""

    def __init__(self, token_ids: list[int], device: torch.device) -> None:
        self.length = len(token_ids)
        self.buffer = torch.zeros(max(16, 2 * self.length), dtype=torch.long, device=device)
        self.buffer[: self.length] = torch.tensor(token_ids, dtype=torch.long)

    @property
    def tokens(self) -> torch.Tensor:
        return self.buffer[: self.length]

    def append(self, token: int) -> None:
        if self.length == len(self.buffer):
            grown = torch.zeros(2 * self.length, dtype=torch.long, device=self.buffer.device)
            grown[: self.length] = self.buffer
            self.buffer = grown
        self.buffer[self.length] = token
        self.length += 1
