"""The paged prefill attention kernel at long-prompt shapes against torch's SDPA (flash) on the same K/V.

    python3 benchmarks/bench_prefill_attention.py [--models 9B 0.8B] [--cases 0:8192 253951:8192 229375:32768]
                                                  [--variant NAME:paged_prefill.BLOCK_M_WIDE=128,... ...]
    python3 benchmarks/bench_prefill_attention.py --tiny      # a CPU check of the script (TRITON_INTERPRET=1)

A case START:LENGTH is one prefill chunk of LENGTH query tokens at positions START .. START + LENGTH - 1 of one
sequence, attending causally to everything before it: 253951:8192 is the last 8192-token step of a 262,143-token
prompt, where each engine step of a long prompt spends most of its attention time. Ours reads K/V from pools of
64-token blocks in shuffled order through a block table (as the engine keeps them); the peer gets the same keys and
values contiguous, with the query heads' K/V repeated per group (outside the timing) and the causal mask aligned to
the bottom right (`torch.nn.attention.bias.causal_lower_right`), which SDPA runs as flash attention on the GPU.
Each variant (kernel tile settings, as bench_gdn.py's --variant) is timed in the same process and checked against
SDPA's output (relative error <= 1e-2). TFLOP/s count the causal work: 4 D Hq per (query, visible key) pair.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

if "--tiny" in sys.argv or not torch.cuda.is_available():  # (before any kernel is defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gdn import parse_variants, settings_applied  # noqa: E402

# query heads, kv heads, head dim; d128: a hybrid of one's own with 128-wide heads (the narrow tiles)
MODELS = {"9B": (16, 4, 256), "0.8B": (8, 2, 256), "d128": (32, 4, 128), "tiny": (4, 2, 32)}
BLOCK_SIZE = 64


def make_case(model: str, start: int, length: int, device: torch.device, seed: int = 0):
    """q [L, Hq, D]; shuffled pools [NB, 64, Hkv, D] holding the sequence's start + L tokens; its block table."""
    query_heads, kv_heads, dim = MODELS[model]
    total = start + length
    blocks = -(-total // BLOCK_SIZE)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(torch.bfloat16)

    q = randn(length, query_heads, dim)
    key_pool, value_pool = randn(blocks + 8, BLOCK_SIZE, kv_heads, dim), randn(blocks + 8, BLOCK_SIZE, kv_heads, dim)
    table = torch.randperm(blocks + 8, generator=gen, device=device)[:blocks].to(torch.int32)[None]
    return q, key_pool, value_pool, table


def ours(q, key_pool, value_pool, table, start):
    from hybridlm.ops.triton import paged_prefill_attention_fwd

    device = q.device
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=device)
    starts = torch.tensor([start], dtype=torch.int32, device=device)
    scale = q.shape[-1] ** -0.5
    return lambda: paged_prefill_attention_fwd(q, key_pool, value_pool, table, zero, cu, starts, scale,
                                               max_len=q.shape[0])


def sdpa(q, key_pool, value_pool, table, start):
    """The peer: SDPA on contiguous K/V (gathered and repeated to Hq heads once, outside the timing)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    length, query_heads, dim = q.shape
    total = start + length
    group = query_heads // key_pool.shape[2]

    def contiguous(pool):
        x = pool[table[0].long()].flatten(0, 1)[:total]  # [S, Hkv, D] in sequence order
        return x.repeat_interleave(group, dim=1).transpose(0, 1)[None].contiguous()  # [1, Hq, S, D]

    k, v = contiguous(key_pool), contiguous(value_pool)
    q4 = q.transpose(0, 1)[None].contiguous()  # [1, Hq, L, D]
    mask = causal_lower_right(length, total)
    # on the GPU only the fused backends (the math one would build an L x S score matrix): refused, not slow
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION] if q.is_cuda else [SDPBackend.MATH]

    def run():
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q4, k, v, attn_mask=mask)[0].transpose(0, 1)

    return run


def time_ms(fn, device) -> float:
    if device.type != "cuda":
        fn()
        return float("nan")
    import triton

    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["9B", "0.8B"], choices=[m for m in MODELS if m != "tiny"])
    parser.add_argument("--cases", nargs="+", default=["0:8192", "253951:8192", "229375:32768"],
                        help="START:LENGTH query chunks")
    parser.add_argument("--variant", nargs="+", default=[], metavar="NAME:MODULE.FLAG=VALUE[,...]")
    parser.add_argument("--tiny", action="store_true", help="tiny heads and lengths on the CPU (a check of the script)")
    args = parser.parse_args()
    variants = parse_variants(args.variant)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    models, cases = (["tiny"], [(0, 40), (100, 24)]) if args.tiny else (
        args.models, [tuple(int(x) for x in case.split(":")) for case in args.cases])
    if device.type == "cuda":
        print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows = []
    for model in models:
        query_heads, _, dim = MODELS[model]
        for start, length in cases:
            q, key_pool, value_pool, table = make_case(model, start, length, device)
            pairs = length * start + length * (length + 1) // 2
            tflop = 4 * dim * query_heads * pairs / 1e12
            try:
                peer = sdpa(q, key_pool, value_pool, table, start)
                expected = peer().float()
                ms_peer = time_ms(peer, device)
            except RuntimeError as error:  # no fused SDPA backend for this shape: ours are timed unchecked
                print(f"{model} {start}:{length} sdpa: {str(error).strip()[:200]}", flush=True)
                peer, expected, ms_peer = None, None, float("nan")
            rows.append((model, start, length, "sdpa (flash)", ms_peer, tflop / ms_peer * 1e3, ""))
            print(f"{model} {start}:{length} sdpa {ms_peer:.3f} ms", flush=True)
            for name, settings in [("ours", [])] + list(variants.items()):
                with settings_applied(settings):
                    run = ours(q, key_pool, value_pool, table, start)
                    try:
                        got = run().float()
                    except Exception as error:  # a setting that does not compile or fit is a row, not the end
                        rows.append((model, start, length, name, None, None, f"{type(error).__name__}"))
                        print(f"  {name}: {type(error).__name__}: {str(error).strip()[:200]}", flush=True)
                        continue
                    err = float("nan") if expected is None else ((got - expected).norm() / expected.norm()).item()
                    ms = time_ms(run, device)
                check = "unchecked" if expected is None else f"{'PASS' if err <= 1e-2 else 'FAIL'} {err:.1e}"
                rows.append((model, start, length, name, ms, tflop / ms * 1e3, check))
                print(f"{model} {start}:{length} {name} {ms:.3f} ms  {check}  x{ms_peer / ms:.2f} vs sdpa", flush=True)
            del q, key_pool, value_pool, table, peer, expected
    print("\n| model | start:length | kernel | ms | TFLOP/s | check vs sdpa |")
    print("|---|---|---|---|---|---|")
    for model, start, length, name, ms, tflops, check in rows:
        ms_text = "-" if ms is None else f"{ms:.3f}"
        tf_text = "-" if tflops is None or tflops != tflops else f"{tflops:.0f}"
        print(f"| {model} | {start}:{length} | {name} | {ms_text} | {tf_text} | {check} |")


if __name__ == "__main__":
    main()
