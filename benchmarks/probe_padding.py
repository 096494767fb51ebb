"""The padded prefill (what a prefill graph replays) against the eager paged step, at a real model shape on the GPU.

    python3 benchmarks/probe_padding.py --shape 9B --cases 1100:1536 700:768 1100:1100 [--baseline 1100]

For each case n:L: one prompt of n tokens prefilled from empty state by the eager PagedContext step and by the
padded forward at length L (uncaptured, the same forward the graph holds), each into its own fresh cache. It prints
the last token's logits difference (max abs over max abs) and the states' difference (GDN recurrent and conv pools,
the slot's KV blocks). An n:n case runs the padding path with no padded rows; `--baseline n` compares the eager step's
logits of token n - 1 over n tokens with the same row over n + 64 tokens (causal: equal in exact arithmetic), i.e.
the difference rounding alone makes when only the matrix shapes change. `--shape tiny` runs on the CPU.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from profile_engine import shaped_model, tiny_model  # noqa: E402

from hybridlm.bundled import bundled_model_dir  # noqa: E402
from hybridlm.engine.cache import EngineCache, PagedContext, plan_cache  # noqa: E402
from hybridlm.engine.prefill_graphs import IDS, PaddedPrefillContext, padded_inputs  # noqa: E402
from hybridlm.io.tokenizer import Tokenizer  # noqa: E402

SLOT = 1
BLOCK = 64


def fresh_cache(model, tokens: int) -> tuple[EngineCache, list[int]]:
    blocks = -(-tokens // BLOCK) + 1
    plan = plan_cache(model.cache_layout, model.dtype, (blocks + 8) * BLOCK * model.cache_layout.kv_bytes_per_token(
        model.dtype) + 4 * model.cache_layout.state_bytes_per_sequence(model.dtype) + (64 << 20), max_num_seqs=2,
        block_size=BLOCK, snapshot_fraction=0.0)
    cache = EngineCache(model, plan)
    table = list(range(blocks))
    cache.block_tables[SLOT, :blocks] = torch.tensor(table, dtype=torch.int32)
    return cache, table


@torch.inference_mode()
def eager(model, tokens: list[int], row: int | None = None):
    """The eager step's logits at `row` (the last token by default) and its cache."""
    cache, table = fresh_cache(model, len(tokens))
    context = PagedContext(cache, [0], [len(tokens)], [SLOT], [table], model.device)
    row = len(tokens) - 1 if row is None else row
    logits = model.forward_with_context(torch.tensor(tokens, device=model.device)[None], context,
                                        logits_indices=torch.tensor([row], device=model.device))
    return logits.float(), cache


@torch.inference_mode()
def padded(model, tokens: list[int], length: int):
    cache, table = fresh_cache(model, length)
    inputs = torch.from_numpy(padded_inputs(cache, tokens, 0, SLOT, table, length)).to(model.device)
    context = PaddedPrefillContext(cache, inputs, length)
    logits = model.forward_with_context(inputs[IDS, :length][None], context, logits_indices=context.logits_indices())
    return logits.float(), cache


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def compare(name: str, a, b, n: int, states: bool = True) -> None:
    (logits_a, cache_a), (logits_b, cache_b) = a, b
    recurrent = conv = "-"
    if states:
        recurrent = f"{max(rel(cache_a.recurrent[k][SLOT], cache_b.recurrent[k][SLOT]) for k in cache_a.recurrent):.2e}"
        conv = f"{max(rel(cache_a.conv[k][SLOT], cache_b.conv[k][SLOT]) for k in cache_a.conv):.2e}"
    rows = -(-n // BLOCK)
    kv = max(rel(cache_a.keys[k][:rows].flatten(0, 1)[:n], cache_b.keys[k][:rows].flatten(0, 1)[:n])
             for k in cache_a.keys)
    same = logits_a.argmax(-1).item() == logits_b.argmax(-1).item()
    print(f"| {name} | {rel(logits_a, logits_b):.2e} | {same} | {recurrent} | {conv} | {kv:.2e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=["tiny", "0.8B", "9B"])
    parser.add_argument("--cases", nargs="+", default=["40:64", "64:64"])
    parser.add_argument("--baseline", type=int, nargs="*", default=[])
    args = parser.parse_args()
    if args.shape == "tiny":
        model = tiny_model(Tokenizer.from_dir(bundled_model_dir()).vocab_size, "cpu")
    else:
        model = shaped_model(args.shape, "cuda")
    generator = torch.Generator().manual_seed(0)
    print("| case | logits rel. diff | same argmax | GDN states | conv states | KV |")
    print("|---|---|---|---|---|---|")
    for case in args.cases:
        n, length = map(int, case.split(":"))
        tokens = torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist()
        compare(f"{args.shape} padded {n} -> {length}", padded(model, tokens, length), eager(model, tokens), n)
    for n in args.baseline:  # the same logits row from a forward over 64 more tokens: other GEMM shapes
        tokens = torch.randint(0, model.config.vocab_size, (n + 64,), generator=generator).tolist()
        compare(f"{args.shape} eager {n} against row {n - 1} of {n + 64}", eager(model, tokens, n - 1),
                eager(model, tokens[:n]), n, states=False)


if __name__ == "__main__":
    main()
