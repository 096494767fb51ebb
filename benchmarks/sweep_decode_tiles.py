"""Batch-1 decode tokens/s under several GEMV tile rules, in one process on one model (GPU only).

`bench_e2e.py --parts decode` measures one rule per process (~40 s each, most of it the build); this builds the
model once and, for each rule, sets `gemv.TILES` (the same 5-tuple as HYBRIDLM_GEMV_TILES: block_n for N < 4096,
block_n above, largest block_k, stages, warps; "default" is `gemv_config`'s own rule), builds a fresh engine (its
CUDA graphs capture the rule's launches) and times decode as bench_e2e does. Rounds repeat the rules in turn, so
drift over the run shows up as a difference between rounds rather than between rules.

    python benchmarks/sweep_decode_tiles.py --model 0.8B --rules default 4,8,2048,2,8 4,16,2048,2,8 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_e2e  # noqa: E402
import bench_serving as serving  # noqa: E402
from hybridlm.io.tokenizer import Tokenizer  # noqa: E402
from hybridlm.ops.triton import gemv  # noqa: E402


def parse_rule(text: str) -> tuple[str, tuple[int, ...] | None]:
    """(the rule as typed, its 5-tuple; None for "default")."""
    if text == "default":
        return text, None
    try:
        rule = tuple(int(v) for v in text.split(","))
    except ValueError:
        rule = ()
    if len(rule) != 5 or min(rule) <= 0:
        raise argparse.ArgumentTypeError(
            f"rule {text!r}: expected 'default' or five positive integers bn_small,bn_large,bk_max,stages,warps")
    return text, rule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="0.8B", choices=sorted(bench_e2e.SHAPES) + ["tiny"],
                        help="tiny: a CPU smoke run of this script (no GEMV kernels there)")
    parser.add_argument("--rules", nargs="+", type=parse_rule, default=[parse_rule("default")])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    rules = args.rules
    if not torch.cuda.is_available() and args.model != "tiny":
        raise SystemExit("sweep_decode_tiles.py times the GPU's decode: it needs a GPU (or --model tiny)")
    import tempfile
    from pathlib import Path

    from tests.tiny_tokenizer import write_tiny_tokenizer

    tokenizer_dir = tempfile.mkdtemp()
    write_tiny_tokenizer(Path(tokenizer_dir))
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    model = bench_e2e.build_ours(args.model)
    results: dict[str, list[float]] = {text: [] for text, _ in rules}
    for round_ in range(args.rounds):
        for text, rule in rules:
            gemv.TILES = rule
            start = time.perf_counter()
            try:
                speed = bench_e2e.ours_decode(model, tokenizer, args.prompt, args.new_tokens)
            except Exception as error:  # a rule whose tiles do not compile or fit: report it, time the others
                print(f"round {round_} rule {text}: failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
                speed = float("nan")
            results[text].append(speed)
            serving.free_memory()
            print(f"round {round_} rule {text}: {speed:,.1f} tok/s ({time.perf_counter() - start:.0f} s)", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}, {args.model}, batch 1 after a {args.prompt}-token prompt, "
          f"{args.new_tokens} new tokens")
    print("| rule | " + " | ".join(f"round {i}" for i in range(args.rounds)) + " | best |")
    print("|---|" + "---|" * (args.rounds + 1))
    for text, speeds in results.items():
        best = max(speeds, key=lambda s: -1 if s != s else s)  # a failed rule's NaN ranks last
        print(f"| {text} | " + " | ".join(f"{s:,.1f}" for s in speeds) + f" | {best:,.1f} |")


if __name__ == "__main__":
    main()
