"""Decode GEMVs with fused neighbours (hybridlm/ops/triton/gemv.py) vs the unfused kernels + cuBLAS, on one GPU.

    python benchmarks/bench_gemv.py [--quick] [--models 0.8B 9B] [--rows 1 8] [--no-sweep]

For every projection of a decode step (shapes read off the model built on the meta device from bench_e2e's
configs, nothing typed in by hand), at M = 1 and 8 rows, bf16:
  (a) rms_norm_fwd(x, w, residual) + F.linear  vs  rms_norm_linear_fwd   (GDN in-proj, attention q/k/v, MLP gate/up,
      lm_head after the final norm: each with the deferred residual add, as the decoder calls them)
  (b) silu_mul_fwd(gate, up) + F.linear        vs  silu_mul_linear_fwd   (MLP down)
  (c) F.linear                                  vs  linear_fwd            (GDN out_proj, attention o_proj)
then a sweep of block_n / block_k / num_warps / num_stages (and tl.dot vs CUDA cores at 8 rows) for the fused
kernels on the 0.8B shapes.

Correctness gate: every fused result (each swept setting too) is checked in the same run against the unfused path
(relative error of y, and s = x + residual bit for bit); a time is only compared where its check passed.

Timing, both in microseconds per op, medians:
- graph: what a decode step sees. One CUDA graph runs the op on enough copies of the weight to be 4x the L2 (each
  layer's weights are cold in a real step), launch gaps included; replayed after warm-up.
- eager: triton.testing.do_bench (L2 flushed between repetitions), for comparison with the other bench scripts.
GB/s counts the bytes that must move (weight + activations in and out) over the graph time; the floor is the
device copy rate measured in the same process (benchmarks/bandwidth.py). --quick (0.8B, no lm_head, a smaller
sweep) stays under a minute once compiled. With $OUT set the log goes there too.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bandwidth import copy_bandwidth  # noqa: E402
from hybridlm.config import FULL, LINEAR, ModelConfig  # noqa: E402
from hybridlm.model.model import HybridLM  # noqa: E402

DEVICE = "cuda"
L2_BYTES = 50 * 2**20
TOLERANCE = 1e-2  # relative (norm) error of bf16 y against the unfused bf16 path: both carry bf16 round-off
LINES: list[str] = []


def log(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


@dataclass(frozen=True)
class Projection:
    model: str
    name: str
    kind: str  # "rms" (residual add + RMSNorm prologue), "silu" (SwiGLU prologue) or "linear"
    n: int
    k: int


def projections(model: str, lm_head: bool = True) -> list[Projection]:
    """The decode step's projections, their sizes taken from the modules themselves (built on the meta device)."""
    import bench_e2e

    config = ModelConfig.from_dict({"model_type": "qwen3_5_text", **bench_e2e.config_dict(model)})
    with torch.device("meta"):
        net = HybridLM(config)
    gdn = net.layers[config.layer_types.index(LINEAR)].linear_attn
    attn = net.layers[config.layer_types.index(FULL)].self_attn
    mlp = net.layers[0].mlp
    head = net.embed_tokens.weight if net.lm_head is None else net.lm_head.weight

    def rows(*linears):  # the fused projections (FusedLinears) stack their weights' rows
        return sum(p.weight.shape[0] for p in linears)

    hidden = config.hidden_size
    found = [
        Projection(model, "gdn in_proj", "rms", rows(*gdn._inputs.linears), hidden),
        Projection(model, "attn q/k/v", "rms", rows(*attn._inputs.linears), hidden),
        Projection(model, "mlp gate/up", "rms", rows(*mlp._inputs.linears), hidden),
        Projection(model, "mlp down", "silu", *mlp.down_proj.weight.shape),
        Projection(model, "gdn out_proj", "linear", *gdn.out_proj.weight.shape),
        Projection(model, "attn o_proj", "linear", *attn.o_proj.weight.shape),
    ]
    if lm_head:
        found.append(Projection(model, "lm_head", "rms", *head.shape))
    return found


class Inputs:
    """Activations for `rows` rows and `copies` copies of the weight (so that they do not fit in L2 together)."""

    def __init__(self, p: Projection, rows: int, seed: int = 0) -> None:
        gen = torch.Generator(device=DEVICE).manual_seed(seed)

        def randn(*shape, scale=1.0):
            return (scale * torch.randn(*shape, generator=gen, device=DEVICE)).to(torch.bfloat16)

        self.weight_bytes = p.n * p.k * 2
        self.copies = max(2, min(64, math.ceil(4 * L2_BYTES / self.weight_bytes)))
        weight = randn(p.n, p.k, scale=p.k ** -0.5)
        self.weights = [weight] + [weight.clone() for _ in range(self.copies - 1)]
        width = 2 * p.k if p.kind == "silu" else p.k
        self.x = randn(rows, width, scale=2.0 if p.kind == "silu" else 1.0)  # gate_up [M, 2I], or x [M, K]
        self.residual = randn(rows, p.k)
        self.norm_weight = randn(p.k, scale=0.1)
        # bytes that must move: the weight, the activations read, the outputs written
        activations = {"rms": 3 * rows * p.k, "silu": 2 * rows * p.k, "linear": rows * p.k}[p.kind]
        self.bytes = self.weight_bytes + 2 * (activations + rows * p.n)


def unfused(p: Projection, inp: Inputs, i: int = 0):
    """What the model runs today: the norm / SwiGLU kernel, then cuBLAS."""
    from hybridlm.ops.triton.norm import rms_norm_fwd, silu_mul_fwd

    if p.kind == "rms":
        h, summed = rms_norm_fwd(inp.x, inp.norm_weight, 1e-6, residual=inp.residual)
        return F.linear(h, inp.weights[i]), summed
    if p.kind == "silu":
        return F.linear(silu_mul_fwd(*inp.x.chunk(2, dim=-1)), inp.weights[i]), None
    return F.linear(inp.x, inp.weights[i]), None


def fused(p: Projection, inp: Inputs, i: int = 0, config=None):
    from hybridlm.ops.triton.gemv import linear_fwd, rms_norm_linear_fwd, silu_mul_linear_fwd

    if p.kind == "rms":
        return rms_norm_linear_fwd(inp.x, inp.norm_weight, 1e-6, inp.weights[i], inp.residual, config=config)
    if p.kind == "silu":
        return silu_mul_linear_fwd(inp.x, inp.weights[i], config=config), None
    return linear_fwd(inp.x, inp.weights[i], config=config), None


def check(p: Projection, inp: Inputs, config=None) -> tuple[bool, str]:
    """The fused result against the unfused one: y to bf16 round-off, x + residual bit for bit."""
    try:
        y, summed = fused(p, inp, config=config)
    except Exception as error:  # noqa: BLE001 - a setting the compiler or the wrapper refuses: reported, not fatal
        return False, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    y_ref, summed_ref = unfused(p, inp)
    err = ((y.double() - y_ref.double()).norm() / y_ref.double().norm()).item()
    ok = math.isfinite(err) and err < TOLERANCE and (summed is None or torch.equal(summed, summed_ref))
    return ok, f"rel err {err:.1e}" + ("" if summed is None or torch.equal(summed, summed_ref) else ", s differs")


def graph_us(step, copies: int, replays: int = 20) -> float:
    """Median microseconds per op of a CUDA graph running step(i) for every weight copy i (a few rounds)."""
    rounds = max(1, 64 // copies)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (and compile) outside the capture
        for i in range(copies):
            step(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _, i in itertools.product(range(rounds), range(copies)):
            step(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (rounds * copies))
    del graph
    return statistics.median(times)


def eager_us(fn, quick: bool) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                         return_mode="median")


def rate(inp: Inputs, us: float) -> str:
    gbs = inp.bytes / (us * 1e-6) / 1e9
    return f"{gbs:6.0f} GB/s {100 * gbs * 1e9 / copy_bandwidth():3.0f}%"


def bench(p: Projection, rows: int, quick: bool, table: list) -> None:
    from hybridlm.ops.triton.gemv import gemv_config

    inp = Inputs(p, rows)
    ok, note = check(p, inp)
    base_graph = graph_us(lambda i: unfused(p, inp, i), inp.copies)
    base_eager = eager_us(lambda: unfused(p, inp), quick)
    ours_graph = graph_us(lambda i: fused(p, inp, i), inp.copies) if ok else math.nan
    ours_eager = eager_us(lambda: fused(p, inp), quick) if ok else math.nan
    peer = {"rms": "rms_norm_fwd + F.linear", "silu": "silu_mul_fwd + F.linear", "linear": "F.linear"}[p.kind]
    config = gemv_config(rows, p.n, p.k, torch.cuda.get_device_properties(0).multi_processor_count)
    log(f"{p.model:4s} {p.name:12s} N={p.n:6d} K={p.k:5d} M={rows:2d} | {peer}: graph {base_graph:7.1f} us "
        f"({rate(inp, base_graph)}), eager {base_eager:7.1f} us | fused: graph {ours_graph:7.1f} us "
        f"({rate(inp, ours_graph) if ok else 'n/a'}), eager {ours_eager:7.1f} us | "
        f"{'x%.2f' % (base_graph / ours_graph) if ok else 'no speed-up: check failed'} | {note} | "
        f"bn={config.block_n} bk={config.block_k} dot={int(config.use_dot)}")
    table.append((p, rows, base_graph, ours_graph, ok, inp.bytes, note))


def sweep(p: Projection, rows: int, quick: bool, table: list, wide: bool = False) -> None:
    """block_n x block_k x num_warps at the rule's stages and path; then, around the best, the other stage count
    and the other path (tl.dot / CUDA cores). `wide`: WIDE_GRID instead, stages included (CUDA-core path)."""
    from hybridlm.ops.triton.gemv import GemvConfig, gemv_config

    inp = Inputs(p, rows)
    default = gemv_config(rows, p.n, p.k, torch.cuda.get_device_properties(0).multi_processor_count)
    results = {}

    def measure(config):
        if config in results or (config.use_dot and config.block_n < 16):
            return
        ok, note = check(p, inp, config)
        us = graph_us(lambda i: fused(p, inp, i, config), inp.copies, replays=10) if ok else math.nan
        results[config] = (us, ok, note)

    measure(default)
    if wide:
        for block_n, block_k, warps, stages in WIDE_GRID:
            measure(GemvConfig(block_n, block_k, warps, stages, default.use_dot))
    for block_n, block_k, warps in () if wide else sweep_grid(quick):
        measure(GemvConfig(block_n, block_k, warps, default.num_stages, default.use_dot))
    ranked = sorted((c for c, r in results.items() if r[1]), key=lambda c: results[c][0])
    if ranked:
        best = ranked[0]
        measure(GemvConfig(best.block_n, best.block_k, best.num_warps, 1 if best.num_stages > 1 else 3,
                               best.use_dot))
        if rows > 1:
            measure(GemvConfig(max(best.block_n, 16), best.block_k, best.num_warps, best.num_stages, not best.use_dot))
        ranked = sorted((c for c, r in results.items() if r[1]), key=lambda c: results[c][0])
    log(f"sweep {p.model} {p.name} N={p.n} K={p.k} M={rows}: {len(ranked)}/{len(results)} settings passed; "
        f"rule: {describe(default)} {results.get(default, (math.nan,))[0]:.1f} us")
    for config in ranked[:6]:
        log(f"    {results[config][0]:7.1f} us ({rate(inp, results[config][0])})  {describe(config)}")
    for config, (_, ok, note) in results.items():
        if not ok:
            log(f"    FAIL {describe(config)}: {note}")
    if ranked:
        table.append((p, rows, results[ranked[0]][0], ranked[0]))


# Bigger tiles and deeper pipelines for the small-N products at one row (out_proj, o_proj, mlp down reached only
# ~0.9 TB/s with the rule's 4 x 256 tiles, 3 stages: too few bytes in flight per SM)
WIDE_GRID = list(itertools.product((2, 4, 8), (512, 1024, 2048), (4, 8), (3, 4)))


def sweep_grid(quick: bool):
    """(block_n, block_k, num_warps) settings the sweep tries (benchmarks/compile_check.py compiles the quick ones)."""
    if quick:
        return itertools.product((4, 16, 32), (256, 512), (4, 8))
    return itertools.product((4, 8, 16, 32, 64), (128, 256, 512), (4, 8))


def describe(config) -> str:
    return (f"bn={config.block_n} bk={config.block_k} w={config.num_warps} s={config.num_stages} "
            f"dot={int(bool(config.use_dot))}")


def print_tables(rows: list, sweeps: list) -> None:
    log()
    log("| model | projection | N | K | M | unfused (us, graph) | fused (us, graph) | speed-up | fused % of copy rate"
        " |")
    log("|---|---|---|---|---|---|---|---|---|")
    for p, m, base, ours, ok, moved, note in rows:
        pct = 100 * moved / (ours * 1e-6) / copy_bandwidth() if ok else math.nan
        speedup = f"{base / ours:.2f}x" if ok else f"check failed ({note})"
        log(f"| {p.model} | {p.name} ({p.kind}) | {p.n} | {p.k} | {m} | {base:.1f} | {ours:.1f} | {speedup} | "
            f"{pct:.0f}% |")
    if sweeps:
        log()
        log("| sweep | M | best (us, graph) | bn | bk | warps | stages | dot |")
        log("|---|---|---|---|---|---|---|---|")
        for p, m, us, c in sweeps:
            log(f"| {p.model} {p.name} | {m} | {us:.1f} | {c.block_n} | {c.block_k} | {c.num_warps} | "
                f"{c.num_stages} | {int(c.use_dot)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.8B only, no lm_head, a smaller sweep")
    parser.add_argument("--models", nargs="+", default=None, choices=["0.8B", "9B"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--wide-sweep", action="store_true",
                        help="sweep the 0.8B products with N <= 2048 (out_proj / o_proj, mlp down) and gdn in_proj over WIDE_GRID, "
                             "stages included; no table of fused vs unfused")
    args = parser.parse_args(argv)
    models = args.models or (["0.8B"] if args.quick else ["0.8B", "9B"])
    torch.manual_seed(0)
    log(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16, rows {args.rows}")
    table, sweeps = [], []
    if args.wide_sweep:  # the small-N products (once per shape and prologue) and the largest per-layer one
        seen = set()
        for p in projections("0.8B", lm_head=False):
            if (p.n <= 2048 or p.name == "gdn in_proj") and (p.kind, p.n, p.k) not in seen:
                seen.add((p.kind, p.n, p.k))
                for rows in args.rows:
                    sweep(p, rows, args.quick, sweeps, wide=True)
    for model in () if args.wide_sweep else models:
        for p in projections(model, lm_head=not args.quick):
            for rows in args.rows:
                bench(p, rows, args.quick, table)
    if not args.no_sweep and not args.wide_sweep:
        for p in projections("0.8B", lm_head=False):
            if p.name in ("gdn in_proj", "mlp down"):
                for rows in args.rows:
                    sweep(p, rows, args.quick, sweeps)
    print_tables(table, sweeps)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench_gemv.log"), "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
