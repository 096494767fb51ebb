"""Time to first token of one prompt through the Engine, prefill eager against prefill replayed from CUDA graphs.

    python3 benchmarks/bench_ttft.py --shape 0.8B --lengths 64 512 2048 [--repeats 7] [--new-tokens 16]

Two engines over the same random-weight model in one process: `prefill_graphs=0` (eager) and `prefill_graphs=2048`
(one-sequence prefill chunks up to 2048 tokens replay the graph of their length bucket, `engine/prefill_graphs.py`).
For each length: the median wall time from `add_request` to the first token read back (`Engine.step` until the
request has a token; a fresh random prompt each time, so that the prefix cache never hits), then the greedy tokens
of both engines on the same prompts (`--new-tokens`, decode in the decode graphs): how many prompts agree in all.
Random bf16 weights have near ties, so a different GEMM tiling at the padded length may flip a token now and then;
the CPU tests check the padded forward itself against the eager one (`tests/engine/test_prefill_graphs.py`).
`--cprofile N` also prints cProfile's N functions with the most own time, then the most time inside them, over 5 eager
first tokens at the first length (where an eager prefill step's host time goes), then by own time over 5 plain
`model.forward` calls; and torch.profiler's table of device time for one eager first token and one plain forward
(whether the GPU or the host bounds the eager step). `--shape tiny` runs on the CPU, where no graph is captured (a
check of the script, not a measurement).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_engine import shaped_model, tiny_model  # noqa: E402

from hybridlm.bundled import bundled_model_dir  # noqa: E402
from hybridlm.engine.engine import Engine, EngineConfig  # noqa: E402
from hybridlm.engine.params import SamplingParams  # noqa: E402
from hybridlm.io.tokenizer import Tokenizer  # noqa: E402


def first_token_ms(engine: Engine, prompt: list[int]) -> float:
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize(engine.model.device)
    start = time.perf_counter()
    sequence = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while not sequence.output_token_ids:
        engine.step()
    elapsed = (time.perf_counter() - start) * 1e3
    while engine.has_work:
        engine.step()
    return elapsed


def plain_forward_ms(model, prompt: list[int]) -> float:
    """`model.forward` of the prompt with the last token's logits read back: the engine's work without its paged
    context, scheduling and sampling."""
    ids = torch.tensor([prompt], device=model.device)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        model(ids, logits_to_keep=1).argmax(-1).item()
    return (time.perf_counter() - start) * 1e3


def device_profile(model, engine: Engine, engine_prompt: list[int], plain_prompt: list[int], rows: int) -> None:
    """torch.profiler over one eager first token, then one plain forward: the kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    order = "cuda_time_total" if model.device.type == "cuda" else "cpu_time_total"
    for name, run in (("eager first token", lambda: first_token_ms(engine, engine_prompt)),
                      ("plain model.forward", lambda: plain_forward_ms(model, plain_prompt))):
        cuda = model.device.type == "cuda"
        before = torch.cuda.memory_stats(model.device) if cuda else {}
        with profile(activities=activities) as prof:
            run()
        print(f"device profile, one {name} of {len(engine_prompt)} tokens:")
        print(prof.key_averages().table(sort_by=order, row_limit=rows, max_name_column_width=60))
        # host-side waits (synchronising copies, allocator segments) show up by own CPU time
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
        if cuda:
            after = torch.cuda.memory_stats(model.device)
            print("allocator: " + ", ".join(f"{key} +{after.get(key, 0) - before.get(key, 0)}" for key in
                                            ("segment.all.allocated", "segment.all.freed", "num_alloc_retries",
                                             "num_sync_all_streams", "num_device_alloc", "num_device_free")))


def greedy(engine: Engine, prompt: list[int], new_tokens: int) -> list[int]:
    sequence = engine.add_request(prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    while engine.has_work:
        engine.step()
    return sequence.output_token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "0.8B", "9B"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--largest", type=int, default=2048, help="the graphs' largest bucket (prefill_graphs)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also print cProfile's N functions with the most own time in eager prefill steps")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_dir(bundled_model_dir())
    if args.shape == "tiny":
        model = tiny_model(tokenizer.vocab_size, "cpu")
    else:
        model = shaped_model(args.shape, "cuda")
    vocab = model.config.vocab_size
    engines = {}
    for name, graphs in (("eager", 0), ("graphs", args.largest)):
        start = time.perf_counter()
        engines[name] = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=4, cache_memory_bytes=2 << 30,
                                                                      prefill_graphs=graphs))
        captured = engines[name].runner.prefill_graphs
        print(f"{name}: engine built in {time.perf_counter() - start:.1f} s; prefill graphs "
              f"{captured.buckets if captured is not None else 'none'}", flush=True)
        if captured is not None and captured.replay_ms:  # the calibration behind PrefillGraphs.worth_replaying
            print("  replay ms per bucket: " + ", ".join(f"{b}: {ms:.2f}" for b, ms in captured.replay_ms.items())
                  + f"; eager forward of {captured.buckets[0]} tokens {captured.eager_host_ms:.2f} ms", flush=True)
    generator = torch.Generator().manual_seed(0)

    def prompt(length: int) -> list[int]:
        return torch.randint(0, vocab, (length,), generator=generator).tolist()

    rows = []
    for length in args.lengths:
        times = {}
        for name, engine in engines.items():
            first_token_ms(engine, prompt(length))  # warm-up (kernel variants of this length compile here)
            times[name] = statistics.median(first_token_ms(engine, prompt(length)) for _ in range(args.repeats))
        plain_forward_ms(model, prompt(length))
        times["plain"] = statistics.median(plain_forward_ms(model, prompt(length)) for _ in range(args.repeats))
        prompts = [prompt(length) for _ in range(3)]
        agree = sum(greedy(engines["eager"], p, args.new_tokens) == greedy(engines["graphs"], p, args.new_tokens)
                    for p in prompts)
        rows.append((length, times["plain"], times["eager"], times["graphs"], agree, len(prompts)))
        print(f"{length} tokens: model.forward {times['plain']:.2f} ms, eager {times['eager']:.2f} ms, "
              f"graphs {times['graphs']:.2f} ms, "
              f"greedy agree {agree}/{len(prompts)}", flush=True)
    if args.cprofile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            first_token_ms(engines["eager"], prompt(args.lengths[0]))
        profiler.disable()
        print(f"host profile, 5 eager first tokens of {args.lengths[0]}-token prompts:")
        for order in ("tottime", "cumulative"):
            pstats.Stats(profiler).sort_stats(order).print_stats(args.cprofile)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            plain_forward_ms(model, prompt(args.lengths[0]))
        profiler.disable()
        print(f"host profile, 5 plain model.forward calls of {args.lengths[0]}-token prompts:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
        device_profile(model, engines["eager"], prompt(args.lengths[0]), prompt(args.lengths[0]), args.cprofile)
    print(f"\n| shape | prompt tokens | model.forward ms | TTFT eager ms | TTFT graphs ms | speed-up | greedy "
          f"{args.new_tokens} tokens agree |")
    print("|---|---|---|---|---|---|---|")
    for length, plain, eager, graphs, agree, count in rows:
        print(f"| {args.shape} | {length} | {plain:.2f} | {eager:.2f} | {graphs:.2f} | {eager / graphs:.2f}x | "
              f"{agree}/{count} |")


if __name__ == "__main__":
    main()
