"""Run our chunked GDN forward a few times on bench_gdn.py's inputs, with nothing else on the GPU: a target for
Nsight Compute (`ncu`), whose counters explain what a kernel waits on (the fused state pass's per-chunk-step latency
is the forward's remaining gap, benchmarks/NOTES.md).

    ncu --clock-control none -k regex:chunk_gdn_fwd_h_kernel --launch-skip 3 --launch-count 3 \
        --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
        python3 benchmarks/one_gdn_forward.py --model 9B --batch 1 --length 65536

The first call compiles and warms up; `--calls` more follow (the launches ncu should take: skip the first call's).
At 1 x 64k the forward launches `chunk_gdn_fwd_h_kernel` three times (the cut's two pre-passes and its main pass),
on uncut batches once. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gdn import HEADS, gdn_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="9B", choices=sorted(HEADS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--calls", type=int, default=1, help="calls after the warm-up one")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("one_gdn_forward.py needs a CUDA GPU")
    from hybridlm.ops.triton import chunk_gdn_fwd

    q, k, v, a, b, A_log, dt_bias, state = gdn_inputs(args.batch, args.length, HEADS[args.model])
    for _ in range(1 + args.calls):
        o, final_state = chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, initial_state=state, output_final_state=True)
    torch.cuda.synchronize()
    print(f"{args.model} B={args.batch} T={args.length}: {1 + args.calls} forwards, o {tuple(o.shape)}, "
          f"finite {bool(torch.isfinite(o).all() and torch.isfinite(final_state).all())}")


if __name__ == "__main__":
    main()
