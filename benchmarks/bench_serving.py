"""Serving measurements on the continuous-batching Engine, called by bench_e2e.py (which builds the models,
runs the correctness gate and prints the table; see its docstring for the commands and GPU minutes).

    throughput_part   N requests at t=0, seeded prompt lengths, greedy, ignore_eos: output tokens/s of the
                      Engine vs transformers' batched `generate` (left-padded batches), plus TTFT, TPOT and
                      inter-token latency percentiles from the same Engine run
    long_part         one prompt filling the model's whole context, prefilled in chunks through the Engine, 1
                      generated token: wall time and peak GPU memory
    prefix_part       requests sharing a long prefix, prefix caching on vs off: wall time, cached tokens

Only the public Engine API is used (add_request / step / has_work, Sequence fields). Each part returns
table rows (model, measure, hybridlm, transformers, ratio, note) as strings.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hybridlm.engine.engine import Engine, EngineConfig
from hybridlm.engine.params import SamplingParams

Row = tuple[str, str, str, str, str, str]
Log = Callable[[str], None]
ENGINE_OPTIONS: dict = {}  # EngineConfig fields the caller forces on every engine here (bench_e2e's --engine-option)


def engine_config(**settings) -> EngineConfig:
    return EngineConfig(**{**settings, **ENGINE_OPTIONS})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def random_prompts(count: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` prompts with lengths uniform in [low, high] and uniform random token ids, all from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=generator).tolist()
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def cache_bytes(model, num_seqs: int, tokens: int) -> int:
    """A cache budget that holds `num_seqs` running sequences of `tokens` tokens in all without preemption
    (plan_cache gives a `snapshot_fraction` of what is left after the state slots to snapshots)."""
    layout, dtype, config = model.cache_layout, model.dtype, engine_config()
    state = layout.state_bytes_per_sequence(dtype)
    kv = layout.kv_bytes_per_token(dtype) * (tokens + num_seqs * config.block_size)
    return num_seqs * state + int(kv / (1 - config.snapshot_fraction)) + 2 * state + (1 << 20)


def gigabytes(value: float) -> str:
    return "n/a (CPU)" if value != value else f"{value:.2f} GB"


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)


@dataclass
class EngineRun:
    """One batch of requests submitted at t=0 and stepped to the end."""

    wall_s: float
    sequences: list
    token_times: dict[str, list[float]]  # request id -> seconds since submission at which each token arrived

    @property
    def output_tokens(self) -> int:
        return sum(len(times) for times in self.token_times.values())

    @property
    def ttft(self) -> list[float]:
        return [times[0] for times in self.token_times.values() if times]

    @property
    def inter_token(self) -> list[float]:
        return [b - a for times in self.token_times.values() for a, b in zip(times, times[1:])]

    @property
    def time_per_output_token(self) -> list[float]:
        """Per request: (last token - first token) / (tokens - 1), vLLM's TPOT."""
        return [(t[-1] - t[0]) / (len(t) - 1) for t in self.token_times.values() if len(t) > 1]


def run_engine(engine: Engine, prompts: list[list[int]], params: SamplingParams,
               progress: Callable[[float, list], None] | None = None, every: int = 64) -> EngineRun:
    """Submit every prompt at once, step until done, time each token as the step that made it returns;
    `progress(seconds, sequences)` every `every` steps."""
    device = engine.model.device
    sync(device)
    start = time.perf_counter()
    sequences = [engine.add_request(prompt, params) for prompt in prompts]
    token_times: dict[str, list[float]] = {s.request_id: [] for s in sequences}
    steps = 0
    while engine.has_work:
        records = engine.step()
        now = time.perf_counter() - start  # step() hands out token ids as ints, so the step is done here
        for sequence, _ in records:
            token_times[sequence.request_id].append(now)
        steps += 1
        if progress is not None and steps % every == 0:
            progress(now, sequences)
    sync(device)
    return EngineRun(time.perf_counter() - start, sequences, token_times)


def warm_up(engine: Engine, vocab: int, lengths: list[int], new_tokens: int) -> None:
    """Compile and autotune on throw-away prompts (seed apart from every measured workload)."""
    generator = torch.Generator().manual_seed(12345)
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]
    run_engine(engine, prompts, greedy(new_tokens))


def hf_generate(model, prompts: list[list[int]], new_tokens: int, batch_size: int, log: Log) -> tuple[float, int]:
    """transformers' `generate` over left-padded batches, greedy, exactly `new_tokens` each.
    Returns (seconds in generate, batch size that fitted); an out-of-memory batch is retried at half size."""
    device = model.device
    seconds, index = 0.0, 0
    while index < len(prompts):
        batch = prompts[index : index + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, width], left-padded with 0
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        sync(device)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=0)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            log(f"  transformers: out of memory, batch size now {batch_size}")
            free_memory()
            continue
        sync(device)
        seconds += time.perf_counter() - start
        assert out.shape == (len(batch), width + new_tokens), out.shape
        del out
        index += len(batch)
    return seconds, batch_size


def throughput_part(name: str, ours, hf_model, tokenizer, gate_passed: bool | None, *, requests: int, low: int,
                    high: int, new_tokens: int, hf_requests: int, hf_batch: int, max_num_seqs: int, chunk: int,
                    seed: int, log: Log) -> list[Row]:
    vocab = ours.config.vocab_size
    prompts = random_prompts(requests, low, high, vocab, seed)
    total_prompt = sum(map(len, prompts))
    config = engine_config(max_num_seqs=max_num_seqs, max_num_batched_tokens=chunk,
                          cache_memory_bytes=cache_bytes(ours, max_num_seqs, total_prompt + requests * new_tokens))
    engine = Engine(ours, tokenizer, config=config)
    # the workload's own prompt lengths (other tokens: no prefix hits), so every Triton specialisation its mixed
    # steps need is compiled here: on a fresh machine (empty Triton cache) a short warm-up left ~15 s of compiling
    # inside the measurement (H100, 2026-11-23: 2,960 tok/s cold vs 11,118 with a warm cache, same steady state)
    warm_up(engine, vocab, [len(p) for p in prompts], 2)
    engine.runner.step_counts.clear()
    log(f"  throughput: {requests} requests, prompts {low}-{high} tokens ({total_prompt:,} in all), "
        f"{new_tokens} new tokens each, max_num_seqs {max_num_seqs}, {chunk} tokens per step")
    run = run_engine(engine, prompts, greedy(new_tokens),
                     lambda now, seqs: log(f"    {now:6.1f} s: {sum(len(s.output_token_ids) for s in seqs):,} tokens out"))
    assert all(len(s.output_token_ids) == new_tokens and s.finish_reason == "length" for s in run.sequences)
    mine = run.output_tokens / run.wall_s
    log(f"  throughput: hybridlm {run.output_tokens:,} tokens in {run.wall_s:.1f} s = {mine:,.0f} tok/s")
    log("  steps: " + ", ".join(f"{path} {count}" for path, count in sorted(engine.runner.step_counts.items())))
    for graphs in (engine.runner.prefill_graphs, engine.runner.packed_graphs):
        if graphs is not None and graphs.replay_ms:
            log(f"  {graphs.kind} replay ms: " + ", ".join(f"{b} {ms:.2f}" for b, ms in graphs.replay_ms.items())
                + "; eager forwards " + ", ".join(f"{b} {ms:.1f}" for b, ms in graphs.eager_ms.items())
                + f" ms; captured in {graphs.capture_s:.1f} s")
    del engine
    free_memory()
    theirs, note = float("nan"), "transformers not run"
    if hf_model is not None:
        subset = [prompts[i] for i in torch.randperm(requests, generator=torch.Generator().manual_seed(seed + 1))[:hf_requests].tolist()]
        hf_generate(hf_model, [p[:low] for p in subset[:2]], 2, 2, log)  # warm-up
        seconds, fitted = hf_generate(hf_model, subset, new_tokens, hf_batch, log)
        theirs = len(subset) * new_tokens / seconds
        scope = "all" if len(subset) == requests else f"a seeded subset of {len(subset)} (rate extrapolates: {seconds * requests / len(subset):.0f} s for all)"
        note = f"transformers: {scope} of {requests} requests, left-padded batches of {fitted}"
        log(f"  throughput: transformers {len(subset) * new_tokens:,} tokens in {seconds:.1f} s = {theirs:,.0f} tok/s ({note})")
    ratio = "-" if theirs != theirs else f"x{mine / theirs:.1f}" if gate_passed else "gate failed"
    ms = lambda values, q: f"{1e3 * percentile(values, q):,.1f}"  # noqa: E731
    label = f"{requests} req x {new_tokens} tok"
    rows = [
        (name, f"throughput {label}", f"{mine:,.0f} tok/s", "-" if theirs != theirs else f"{theirs:,.0f} tok/s", ratio, f"goal >= x20; {note}"),
        (name, "TTFT p50 / p99 ms", f"{ms(run.ttft, 50)} / {ms(run.ttft, 99)}", "-", "-", "all submitted at t=0"),
        (name, "TPOT p50 / p99 ms", f"{ms(run.time_per_output_token, 50)} / {ms(run.time_per_output_token, 99)}",
         "-", "-", "per request: (last - first token) / (n - 1)"),
        (name, "ITL p50 / p99 ms", f"{ms(run.inter_token, 50)} / {ms(run.inter_token, 99)}", "-", "-",
         "every gap between a request's tokens"),
    ]
    for row in rows[1:]:
        log(f"  {row[1]}: {row[2]}")
    return rows


def long_part(name: str, ours, tokenizer, *, tokens: int, chunk: int, seed: int, log: Log) -> list[Row]:
    """One prompt of `tokens` tokens (capped to leave room in the context for the generated token)."""
    device = ours.device
    context = ours.config.max_position_embeddings
    prompt_len = min(tokens, context - 1)  # the Engine refuses a prompt that fills the context: 1 token must fit
    vocab = ours.config.vocab_size
    allocated = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    config = engine_config(max_num_seqs=1, max_num_batched_tokens=chunk,
                          cache_memory_bytes=cache_bytes(ours, 1, prompt_len + 1))
    engine = Engine(ours, tokenizer, config=config)
    cache_gb = (torch.cuda.memory_allocated() - allocated) / 1e9 if device.type == "cuda" else float("nan")
    # the same chunk lengths as the measured prompt: full chunks, then the tail past the last block boundary
    # (Triton specialises kernels on length divisibility, so an unseen tail length compiles, seconds on 9B)
    warm_up(engine, vocab, [min(2 * chunk + prompt_len % config.block_size, prompt_len)], 1)
    free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    log(f"  long: {prompt_len:,}-token prompt + 1 generated token = {prompt_len + 1:,} of the model's {context:,} "
        f"context, {chunk} tokens per step; cache {gigabytes(cache_gb)}")
    start, done = time.perf_counter(), [0]

    def progress(now: float, sequences: list) -> None:
        done[0] = sequences[0].num_computed
        log(f"    {now:6.1f} s: {done[0]:,} tokens")

    failure = None
    try:
        run = run_engine(engine, [prompt], greedy(1), progress, every=8)
    except torch.OutOfMemoryError as error:
        failure = f"{time.perf_counter() - start:.1f} s: {str(error)[:200]}"  # the traceback pins the step's tensors
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    del engine
    free_memory()
    if failure is not None:
        log(f"  long: OUT OF MEMORY near token {done[0]:,} (peak {gigabytes(peak)}) after {failure}")
        return [(name, f"long prompt {prompt_len:,}, {chunk}/step", f"OOM near token {done[0]:,}", "-", "-",
                 f"peak {gigabytes(peak)} before failing")]
    assert len(run.sequences[0].output_token_ids) == 1
    weights = sum(p.numel() * p.element_size() for p in ours.parameters()) / 1e9
    rate = prompt_len / run.wall_s
    log(f"  long: {run.wall_s:.2f} s ({rate:,.0f} tok/s), peak {gigabytes(peak)} (weights {gigabytes(weights)}, "
        f"cache {gigabytes(cache_gb)})")
    return [(name, f"long prompt {prompt_len:,}, {chunk}/step", f"{run.wall_s:.2f} s, peak {gigabytes(peak)}", "-",
             "-", f"{rate:,.0f} tok/s; weights {weights:.1f} GB + cache {gigabytes(cache_gb)}; goal <= 16 s, <= 32 GB")]


def prefix_caching_config(enabled: bool, **kwargs) -> tuple[EngineConfig, str]:
    """EngineConfig with prefix caching on or off, and how it was switched off. Without an explicit switch
    the Engine caches a prefix only where it holds a recurrent-state snapshot, so no snapshots = no hits."""
    settings = {**kwargs, **ENGINE_OPTIONS}
    if "enable_prefix_caching" in {f.name for f in dataclasses.fields(EngineConfig)}:
        return EngineConfig(**{**settings, "enable_prefix_caching": enabled}), "enable_prefix_caching=False"
    if enabled:
        return EngineConfig(**settings), ""
    return EngineConfig(**{**settings, "snapshot_fraction": 0.0}), "snapshot_fraction=0 (no state snapshots, so no hits)"


def prefix_part(name: str, ours, tokenizer, *, requests: int, prefix: int, suffix: int, new_tokens: int, chunk: int,
                seed: int, log: Log) -> list[Row]:
    vocab = ours.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, vocab, (prefix,), generator=generator).tolist()
    prompts = [shared + torch.randint(0, vocab, (suffix,), generator=generator).tolist() for _ in range(requests)]
    total_prompt = requests * (prefix + suffix)
    budget = cache_bytes(ours, requests, total_prompt + requests * new_tokens)
    results, how_off = {}, ""
    for enabled in (False, True, False, True):  # interleaved, best of two each
        config, how = prefix_caching_config(enabled, max_num_seqs=requests, max_num_batched_tokens=chunk,
                                            cache_memory_bytes=budget)
        how_off = how or how_off
        engine = Engine(ours, tokenizer, config=config)
        warm_up(engine, vocab, [prefix + suffix, prefix + suffix], 2)  # other tokens: no hits on the workload
        run = run_engine(engine, prompts, greedy(new_tokens))
        cached = sum(s.num_cached_prompt_tokens for s in run.sequences)
        if enabled not in results or run.wall_s < results[enabled][0]:
            results[enabled] = (run.wall_s, cached)
        del engine
        free_memory()
    (on, cached_on), (off, cached_off) = results[True], results[False]
    log(f"  prefix: {requests} requests of {prefix} shared + {suffix} own tokens, {new_tokens} new tokens: "
        f"caching on {on:.2f} s ({cached_on:,} of {total_prompt:,} prompt tokens cached), off {off:.2f} s "
        f"({cached_off:,} cached; off = {how_off})")
    return [(name, f"prefix cache {requests} x ({prefix}+{suffix})", f"on {on:.2f} s / off {off:.2f} s", "-",
             f"x{off / on:.1f} on vs off", f"{cached_on:,} of {total_prompt:,} prompt tokens cached; {new_tokens} new tokens each")]
