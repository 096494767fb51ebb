"""Count the GPU kernel launches of one decode step, on the CPU: the operator count that a CUDA graph replays.

    python benchmarks/count_launches.py [--shape 0.8B|9B|tiny] [--batch 1] [--unfused]

At batch 1 a decode step moves little data, and each launch inside a CUDA graph costs ~2-3 us on an H100 however
small its kernel. Launches x that cost is then a floor on the step's overhead. This script builds a random-weight
Qwen3.5 shape on the CPU (bf16), runs one decode step through the engine's DecodeContext with dispatch forced
onto the CUDA code path, and counts:
- ATen operators that launch a kernel on CUDA: views and allocations do not, everything else is counted once.
  A cuBLAS GEMM can launch 1-2 kernels and is counted as one.
- Triton launches. Their kernels are not executed here, so the logits are meaningless: only the count matters.
`--unfused` keeps the plain-PyTorch RMSNorm, q/k norm + RoPE (cos and sin built once per step) and SwiGLU product,
the output gate's own launch and the four separate GDN input projections (the code before the fusions) for
comparison. The count is per step and does not depend on the batch size.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hybridlm.config import ModelConfig  # noqa: E402
from hybridlm.engine.cache import DecodeContext, EngineCache, plan_cache  # noqa: E402
from hybridlm.io.checkpoint import build_empty_model  # noqa: E402
from hybridlm.ops import dispatch  # noqa: E402
from hybridlm.ops.norm import rms_norm as rms_norm_reference  # noqa: E402
from hybridlm.ops.rope import qk_rms_norm_rope as qk_rms_norm_rope_reference  # noqa: E402

NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "detach",
             "alias", "set_", "resize_", "_local_scalar_dense", "promote_types", "result_type"}


class LaunchCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_triton(counter: collections.Counter[str]):
    """Replace every Triton kernel launch by a count (the kernels are not run)."""
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        counter["triton:" + self.fn.__name__] += 1

    JITFunction.run = run


def build(shape: str) -> torch.nn.Module:
    import bench_e2e

    config = ModelConfig.from_dict({"model_type": "qwen3_5_text", **bench_e2e.config_dict(shape)})
    model = build_empty_model(config, torch.device("cpu"), torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="0.8B", choices=["tiny", "0.8B", "9B"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--unfused", action="store_true", help="the plain-PyTorch norms, RoPE and SwiGLU product")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    model = build(args.shape)
    from hybridlm.ops import triton as kernel_module

    dispatch.use_kernels = lambda *tensors, differentiable=False: True
    dispatch.kernels = lambda: kernel_module
    if args.unfused:
        def rms_norm(x, weight, eps=1e-6, residual=None):
            if residual is None:
                return rms_norm_reference(x, weight, eps)
            return rms_norm_reference(x + residual, weight, eps), x + residual

        dispatch.rms_norm = rms_norm
        dispatch.qk_rms_norm_rope = qk_rms_norm_rope_reference
        dispatch.silu_mul = lambda gate, up: torch.nn.functional.silu(gate) * up
        dispatch.sigmoid_gate_linear = lambda o, gate, weight: dispatch.linear(dispatch.sigmoid_gate(o, gate), weight)
        import hybridlm.model.layers as layers
        layers.rms_norm, layers.qk_rms_norm_rope, layers.silu_mul = (dispatch.rms_norm, dispatch.qk_rms_norm_rope,
                                                                     dispatch.silu_mul)
    if not args.unfused:
        model.fuse_input_projections()  # as the engine's runner does
    layout = model.cache_layout
    plan = plan_cache(layout, torch.bfloat16, 1 << 30, max_num_seqs=max(args.batch, 1), block_size=64)
    cache = EngineCache(model, plan)
    batch = args.batch
    positions = torch.full((batch,), 512, dtype=torch.long)
    context = DecodeContext(cache, positions, torch.arange(batch, dtype=torch.int32), torch.arange(batch) + 512,
                            torch.full((batch,), 513, dtype=torch.int32))
    ids = torch.zeros(batch, 1, dtype=torch.long)
    counter = LaunchCounter()
    count_triton(counter.ops)
    with torch.inference_mode(), counter:
        model.forward_with_context(ids, context)
    aten = sum(n for k, n in counter.ops.items() if not k.startswith("triton:"))
    triton_launches = sum(n for k, n in counter.ops.items() if k.startswith("triton:"))
    config = model.config
    print(f"{args.shape} ({config.num_hidden_layers} layers, {config.layer_pattern.count('A')} attention), batch "
          f"{batch}, {'unfused' if args.unfused else 'fused'}: {aten + triton_launches} launches per decode step "
          f"({aten} ATen, {triton_launches} Triton)")
    for name, n in counter.ops.most_common(args.top):
        print(f"  {n:5d}  {name}")


if __name__ == "__main__":
    main()
