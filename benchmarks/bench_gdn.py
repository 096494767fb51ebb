"""Gated DeltaNet kernels: hybridlm's Triton kernels vs fla 0.6.0 and FlashQLA 0.1.3, in one process on one GPU.

    python benchmarks/bench_gdn.py [--quick] [--no-peers] [--kinds forward,train,decode]
                                   [--set gdn_chunk.FOLD_WU_INTO_H=True ...]
                                   [--variant fold:gdn_chunk.FOLD_WU_INTO_H=True cp:gdn_chunk.STATE_PASS_CP=True ...]
                                   [--shapes 1x32768 2x16384 ...]  (forward and train shapes, BxT)

Correctness gate first, in the same run: ours vs the float64 reference at a small shape, then ours vs each peer
at every timed shape; a speed-up is printed only for a pair whose check passed. Timing: triton.testing.do_bench
medians after warm-up (it flushes L2 between repetitions), each variant timed twice, the better median kept.
Prints ms, tokens/s, the speed-up over each peer and the fraction of the memory floor (bytes that must move /
the device copy rate, measured in the same process by benchmarks/bandwidth.py); the table comes last. With $OUT set, the log goes there too.

What each side does (so the ratios are read right):
- ours: raw a, b in (gates, q/k L2 norm and scale in-kernel), o and final state out.
- fla chunk_gated_delta_rule: g, beta precomputed (not timed), use_qk_l2norm_in_kernel=True, in fla's own
  kernels: FLA_FLASH_QLA=0 is set before fla loads (unless already set), since fla 0.6.0 otherwise dispatches such
  calls to FlashQLA when it is installed (before the twenty-first session the forward rows' "fla" was FlashQLA).
- FlashQLA chunk_gated_delta_rule: g, beta precomputed (not timed); "FlashQLA" takes q, k pre-normalised (not
  timed, as the anchor in ../shared/BENCHMARKS.md), "FlashQLA+norm" raw q, k with use_qk_l2norm_in_kernel=True (its
  own torch-compiled norm): the work our call does, bar the gates (fla's gate kernels: ~0.01 ms at 16k tokens).
- train (forward + backward, torch.autograd.grad of o against a fixed do, no states): ours = chunk_gdn from raw
  a, b with gradients for q, k, v, a, b, A_log, dt_bias, recomputing the forward's states in the backward as fla
  does; "ours[kept]" the same keeping them (`BWD_REUSE_FORWARD_STATES`, as `hybridlm train` does under activation
  checkpointing; its peak memory is logged); "fla" = fla's chunk_gated_delta_rule doing the same
  work in its Triton kernels (use_gate_in_kernel, use_beta_sigmoid_in_kernel, use_qk_l2norm_in_kernel: those
  flags also keep fla's dispatcher off its FlashQLA backend); "fla g,beta" = fla given g, beta precomputed (not
  timed, gradients stop at g, beta) in its own kernels, and "FlashQLA" the same call to FlashQLA (what fla's
  dispatcher picks when FLA_FLASH_QLA is not 0).
- decode: ours = conv-state shift + conv + SiLU + norms + gates + delta rule on slot pools, one launch, eager and
  inside a CUDA graph; fla fused_recurrent_gated_delta_rule = the delta rule alone (no conv), eager.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bandwidth import copy_bandwidth  # noqa: E402
from hybridlm.ops.conv import causal_conv1d  # noqa: E402
from hybridlm.ops.delta_rule import chunk_gated_delta_rule, gdn_gates, l2norm, recurrent_gated_delta_rule  # noqa: E402

DEVICE = "cuda"
# (key heads, value heads, head dim): Qwen3.5-9B's and 0.8B's GDN layers, and wider value-head layouts (48, 64 value
# heads) to check the rules that count value heads per SM (gdn_cp.segment_chunks_for) on them
HEADS = {"9B": (16, 32, 128), "0.8B": (16, 16, 128), "Hv48": (16, 48, 128), "Hv64": (16, 64, 128)}
REF_TOLERANCE = 1e-2  # bf16 kernel vs float64 reference, relative (norm) error
PEER_TOLERANCE = 2e-2  # bf16 vs bf16 implementation: both carry bf16 round-off
VARIANTS: dict[str, list] = {}  # --variant: ours timed again under each set of kernel options
LINES: list[str] = []


def log(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


class Results(dict):
    """One shape's timings, name -> (ms, check), each logged the moment it is measured: the table comes only after a
    shape's last implementation, so a run cut off by its timeout (a peer compiling, twenty-second session) still
    leaves the finished ones in the log."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def __setitem__(self, name: str, value: tuple[float, str]) -> None:
        super().__setitem__(name, value)
        log(f"  {self.label} {name}: {value[0]:.4f} ms, check {value[1]}")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def graphed(fn):
    """fn captured in a CUDA graph (what the engine replays every token), after three warm-up calls on a side stream;
    returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_ms(fn) -> float:
    import triton.testing

    fn()  # warm-up / compile outside the timed region
    torch.cuda.synchronize()
    return min(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") for _ in range(2))


@dataclass
class Row:
    kind: str
    model: str
    batch: int
    length: int
    impl: str
    ms: float
    tokens_per_s: float
    floor_fraction: float
    check: str
    speedups: dict[str, float] = field(default_factory=dict)


def load_peers(enabled: bool) -> dict[str, object]:
    peers: dict[str, object] = {}
    if not enabled:
        log("peers: skipped (--no-peers)")
        return peers
    # fla 0.6.0 hands chunk_gated_delta_rule to its FlashQLA backend when flash_qla is installed (bf16, K = V = 128,
    # gates given: the forward rows and train's g, beta row), so "fla" would time FlashQLA's kernels (the twenty-first
    # session's profile showed it). FLA_FLASH_QLA=0, read when fla first dispatches, keeps fla on its own kernels;
    # FlashQLA is timed by its own rows.
    os.environ.setdefault("FLA_FLASH_QLA", "0")
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

        from fla.modules.norm.l2norm import l2norm_fwd as fla_l2norm

        peers["fla"], peers["fla_recurrent"], peers["fla_l2norm"] = fla_chunk, fla_recurrent, fla_l2norm
        import fla

        log(f"peer fla {getattr(fla, '__version__', '?')}: loaded (FLA_FLASH_QLA={os.environ['FLA_FLASH_QLA']}: "
            f"{'its own kernels' if os.environ['FLA_FLASH_QLA'] == '0' else 'FlashQLA where it dispatches there'})")
    except Exception as error:  # ImportError, or its tilelang import failing
        log(f"peer fla: skipped ({type(error).__name__}: {error})")
    try:
        try:
            from flash_qla import chunk_gated_delta_rule as qla_chunk
        except ImportError:
            from flash_qla.ops.gated_delta_rule import chunk_gated_delta_rule as qla_chunk
        peers["flashqla"] = qla_chunk
        import flash_qla

        log(f"peer FlashQLA {getattr(flash_qla, '__version__', '?')}: loaded")
    except Exception as error:
        log(f"peer FlashQLA: skipped ({type(error).__name__}: {error})")
    return peers


def gdn_inputs(batch, length, heads, seed=0, dtype=torch.bfloat16):
    key_heads, value_heads, d = heads
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)

    q, k = randn(batch, length, key_heads, d), randn(batch, length, key_heads, d)
    v = randn(batch, length, value_heads, d)
    a, b = randn(batch, length, value_heads), randn(batch, length, value_heads)
    A_log = torch.empty(value_heads, device=DEVICE).uniform_(1, 16, generator=gen).log()  # the usual A init
    dt_bias = torch.randn(value_heads, generator=gen, device=DEVICE) * 0.5
    state = torch.randn(batch, value_heads, d, d, generator=gen, device=DEVICE) * 0.1
    return q, k, v, a, b, A_log, dt_bias, state


def forward_floor_bytes(batch, length, heads) -> int:
    key_heads, value_heads, d = heads
    tokens = batch * length
    return tokens * 2 * (2 * key_heads * d + 2 * value_heads * d + 2 * value_heads)  # q, k, v, o, a, b in bf16


def train_floor_bytes(batch, length, heads) -> int:
    """Forward reads q, k, v, a, b and writes o; backward reads them and do again and writes dq, dk, dv, da, db."""
    key_heads, value_heads, d = heads
    tokens = batch * length
    forward = 2 * key_heads * d + 2 * value_heads * d + 2 * value_heads
    backward = 2 * (2 * key_heads * d + value_heads * d + 2 * value_heads) + value_heads * d
    return tokens * 2 * (forward + backward)


def gate_reference(chunk_gdn_fwd) -> bool:
    """Ours vs the float64 reference at a small shape (Hv > Hk, T not a multiple of 64, initial state)."""
    q, k, v, a, b, A_log, dt_bias, state = gdn_inputs(2, 300, (2, 4, 128), seed=1)
    o, final = chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, initial_state=state, output_final_state=True)
    g, beta = gdn_gates(a.double(), b.double(), A_log.double(), dt_bias.double())
    o_ref, final_ref = chunk_gated_delta_rule(q.double(), k.double(), v.double(), g, beta,
                                              initial_state=state.double(), output_final_state=True)
    err_o, err_s = rel_err(o, o_ref), rel_err(final, final_ref)
    ok = err_o <= REF_TOLERANCE and err_s <= REF_TOLERANCE
    log(f"gate chunk forward vs float64 reference (B=2 T=300 Hk=2 Hv=4 d=128 bf16): rel err o {err_o:.2e}, "
        f"state {err_s:.2e} -> {'PASS' if ok else 'FAIL'}")
    return ok


def bench_forward(model, batch, length, peers, ours_ok, rows):
    from hybridlm.ops.triton import chunk_gdn_fwd

    heads = HEADS[model]
    q, k, v, a, b, A_log, dt_bias, state = gdn_inputs(batch, length, heads)
    g, beta = gdn_gates(a, b, A_log, dt_bias)  # fp32, for the peers
    tokens = batch * length
    floor_ms = forward_floor_bytes(batch, length, heads) / copy_bandwidth() * 1e3

    def ours():
        return chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, initial_state=state, output_final_state=True)

    o_ours, s_ours = ours()
    results = Results(f"forward {model} B={batch} T={length}")
    results["ours"] = (time_ms(ours), "PASS" if ours_ok else "FAIL (reference gate)")
    for name, settings in VARIANTS.items():
        with settings_applied(settings):
            try:
                o_var, s_var = ours()
                err = max(rel_err(o_var, o_ours), rel_err(s_var, s_ours))
                results[f"ours[{name}]"] = (time_ms(ours), variant_check(ours_ok, err))
            except Exception as error:
                log(f"  ours[{name}] failed at {model} B={batch} T={length}: {type(error).__name__}: {error}")
    for name, call in forward_peer_calls(peers, q, k, v, g, beta, state).items():
        try:
            o_peer, s_peer = call()
            err = max(rel_err(o_ours, o_peer), rel_err(s_ours, s_peer))
            results[name] = (time_ms(call), f"{'PASS' if err <= PEER_TOLERANCE else 'FAIL'} {err:.1e}")
        except Exception as error:
            log(f"  {name} failed at {model} B={batch} T={length}: {type(error).__name__}: {error}")
    report("forward", model, batch, length, tokens, floor_ms, results, rows)


def gate_backward(chunk_gdn) -> bool:
    """Every gradient of ours (q, k, v, a, b, A_log, dt_bias, initial state; do and a final-state gradient flowing
    in) vs float64 autograd through the reference, at a small shape (Hv > Hk, T not a multiple of 64). dA_log and
    ddt_bias sum per-token terms that cancel: their error is taken relative to the summed magnitudes of the terms."""
    q, k, v, a, b, A_log, dt_bias, state = gdn_inputs(2, 300, (2, 4, 128), seed=4)
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    do = torch.randn(v.shape, generator=gen, device=DEVICE).to(v.dtype)
    dht = torch.randn(state.shape, generator=gen, device=DEVICE)
    inputs = (q, k, v, a, b, A_log, dt_bias, state)
    try:
        ours = [x.clone().requires_grad_() for x in inputs]
        o, final = chunk_gdn(*ours[:7], initial_state=ours[7], output_final_state=True)
        grads = torch.autograd.grad([o, final], ours, [do, dht])
    except Exception as error:  # a compile failure must not hide the other results
        log(f"gate chunk forward+backward: FAIL ({type(error).__name__}: {error})")
        return False
    ref = [x.detach().double().requires_grad_() for x in inputs]
    g, beta = gdn_gates(*ref[3:7])
    o_ref, final_ref = chunk_gated_delta_rule(*ref[:3], g, beta, initial_state=ref[7], output_final_state=True)
    grads_ref = torch.autograd.grad([o_ref, final_ref], ref, [do.double(), dht.double()])
    x = ref[3] + ref[6]
    summed = {5: (grads_ref[3] * torch.nn.functional.softplus(x) / torch.sigmoid(x)).abs().sum((0, 1)),
              6: grads_ref[3].abs().sum((0, 1))}
    errors = {}
    for i, name in enumerate(("q", "k", "v", "a", "b", "A_log", "dt_bias", "h0")):
        scale = summed[i].norm() if i in summed else grads_ref[i].norm()
        finite = bool(torch.isfinite(grads[i]).all())
        errors[name] = ((grads[i].double() - grads_ref[i]).norm() / scale).item() if finite else math.inf
    ok = max(errors.values()) <= REF_TOLERANCE and rel_err(o, o_ref) <= REF_TOLERANCE
    log("gate chunk forward+backward vs float64 autograd (B=2 T=300 Hk=2 Hv=4 d=128 bf16, h0 and dht): rel err "
        + " ".join(f"d{n} {e:.1e}" for n, e in errors.items()) + f" -> {'PASS' if ok else 'FAIL'}")
    return ok


def forward_peer_calls(peers: dict, q, k, v, g, beta, state) -> dict:
    """The peers' forward calls, by name, each returning (o, final state): "fla" given g, beta in its own kernels
    (its in-kernel q/k norm); "FlashQLA" with q, k normalised beforehand (not timed: how the anchor in
    ../shared/BENCHMARKS.md was taken); "FlashQLA+norm" with raw q, k and its own torch-compiled norm, the work our
    call does bar the gates; "FlashQLA+fla norm" the same work with fla's Triton norm kernel (l2norm_fwd on q, k)
    in front, the fastest public norm to pair it with."""
    calls = {}
    if "fla" in peers:
        calls["fla"] = lambda: peers["fla"](q=q, k=k, v=v, g=g, beta=beta, initial_state=state,
                                            output_final_state=True, use_qk_l2norm_in_kernel=True)
    if "flashqla" in peers:
        q_n, k_n = l2norm(q.float()).to(q.dtype), l2norm(k.float()).to(k.dtype)
        beta_q = beta.to(q.dtype)
        calls["FlashQLA"] = lambda: peers["flashqla"](q_n, k_n, v, g, beta_q, initial_state=state,
                                                      output_final_state=True)
        calls["FlashQLA+norm"] = lambda: peers["flashqla"](q, k, v, g, beta_q, initial_state=state,
                                                           output_final_state=True, use_qk_l2norm_in_kernel=True)
        if "fla_l2norm" in peers:
            norm = peers["fla_l2norm"]
            calls["FlashQLA+fla norm"] = lambda: peers["flashqla"](norm(q)[0], norm(k)[0], v, g, beta_q,
                                                                   initial_state=state, output_final_state=True)
    return calls


def train_peer_calls(peers: dict, q, k, v, a, b, A_log, dt_bias) -> dict:
    """The peers' training calls, by name: (forward returning o, the leaves its gradients are taken for, how many of
    o and those gradients compare with ours, in our order q, k, v, a, b). "fla" does our work in its own kernels
    from raw a, b (its in-kernel gate and beta flags); "fla g,beta" and "FlashQLA" are given g, beta (made here, not
    timed; gradients stop there). dA_log and ddt_bias are sums whose terms cancel: the reference gate checks them."""
    calls = {}
    if "fla" in peers:
        calls["fla"] = (lambda: peers["fla"](q=q, k=k, v=v, g=a, beta=b, use_qk_l2norm_in_kernel=True,
                                             use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                                             use_beta_sigmoid_in_kernel=True)[0],
                        [q, k, v, a, b, A_log, dt_bias], 6)
    with torch.no_grad():
        g, beta = gdn_gates(a, b, A_log, dt_bias)
    gate_leaves = [q, k, v, g.requires_grad_(), beta.requires_grad_()]
    for name, key in (("fla g,beta", "fla"), ("FlashQLA", "flashqla")):
        if key in peers:  # (FlashQLA: what fla dispatches these calls to where FLA_FLASH_QLA is not 0)
            calls[name] = (lambda peer=peers[key]: peer(q=q, k=k, v=v, g=g, beta=beta,
                                                         use_qk_l2norm_in_kernel=True)[0], gate_leaves, 4)
    return calls


def bench_train(model, batch, length, peers, ours_ok, rows):
    """Forward + backward from raw a, b: ours vs fla with the gates in its kernels, and fla given g, beta."""
    from hybridlm.ops.triton import chunk_gdn

    heads = HEADS[model]
    q, k, v, a, b, A_log, dt_bias, _ = gdn_inputs(batch, length, heads)
    do = torch.randn(v.shape, generator=torch.Generator(device=DEVICE).manual_seed(6), device=DEVICE).to(v.dtype)
    leaves = [x.requires_grad_() for x in (q, k, v, a, b, A_log, dt_bias)]
    tokens = batch * length
    floor_ms = train_floor_bytes(batch, length, heads) / copy_bandwidth() * 1e3

    def ours():
        o, _ = chunk_gdn(*leaves)
        return (o, *torch.autograd.grad(o, leaves, do))

    def peak_mib(fn):
        """The peak memory one call adds above what is allocated before it (saved activations, workspaces)."""
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - before) / 2**20

    try:
        out_ours, peak = peak_mib(ours)
        results = Results(f"train {model} B={batch} T={length}")
        results["ours"] = (time_ms(ours), "PASS" if ours_ok else "FAIL (reference gate)")
        log(f"  train {model} B={batch} T={length} ours: peak {peak:.0f} MiB above the inputs")
    except Exception as error:
        log(f"  ours failed at train {model} B={batch} T={length}: {type(error).__name__}: {error}")
        return
    from hybridlm.ops.triton import gdn_chunk_bwd

    # "kept": the forward's w, h, v_new kept for the backward (more memory, two launches fewer), as `hybridlm train`
    # runs under activation checkpointing; the default row recomputes them, as fla does
    kept = {"kept": [(gdn_chunk_bwd, "BWD_REUSE_FORWARD_STATES", True)]}
    for name, settings in {**kept, **VARIANTS}.items():
        with settings_applied(settings):
            try:
                out_var, peak = peak_mib(ours)
                log(f"  train {model} B={batch} T={length} ours[{name}]: peak {peak:.0f} MiB above the inputs")
                err = max(rel_err(x, y) for x, y in zip(out_var[:6], out_ours[:6]))
                results[f"ours[{name}]"] = (time_ms(ours), variant_check(ours_ok, err))
            except Exception as error:
                log(f"  ours[{name}] failed at train {model} B={batch} T={length}: {type(error).__name__}: {error}")
    for name, (forward, peer_leaves, compared) in train_peer_calls(peers, *leaves).items():
        def peer_train(forward=forward, peer_leaves=peer_leaves):
            o = forward()
            return (o, *torch.autograd.grad(o, peer_leaves, do))
        try:
            out_peer = peer_train()
            err = max(rel_err(x, y) for x, y in zip(out_ours[:compared], out_peer[:compared]))
            results[name] = (time_ms(peer_train), f"{'PASS' if err <= PEER_TOLERANCE else 'FAIL'} {err:.1e}")
        except Exception as error:
            log(f"  {name} failed at train {model} B={batch} T={length}: {type(error).__name__}: {error}")
    report("train", model, batch, length, tokens, floor_ms, results, rows)


def variant_check(ours_ok: bool, err: float) -> str:
    """A --variant's check: the reference gate (run at the defaults) and its output against the default's."""
    return f"{'PASS' if ours_ok and err <= PEER_TOLERANCE else 'FAIL'} {err:.1e} vs ours"


def report(kind, model, batch, length, tokens, floor_ms, results, rows):
    ours_ms = results["ours"][0]
    for impl, (ms, check) in results.items():
        row = Row(kind, model, batch, length, impl, ms, tokens / ms * 1e3, floor_ms / ms, check)
        if impl.startswith("ours") and check.startswith("PASS"):  # ours and each --variant of it
            for peer, (peer_ms, peer_check) in results.items():
                if not peer.startswith("ours") and peer_check.startswith("PASS"):
                    row.speedups[peer] = peer_ms / ms
            if impl != "ours":
                row.speedups["ours"] = ours_ms / ms
        rows.append(row)
        speedups = " ".join(f"x{s:.2f} vs {p}" for p, s in row.speedups.items())
        log(f"{kind:8s} {model:5s} B={batch:<4d} T={length:<6d} {impl:14s} {ms:9.4f} ms {row.tokens_per_s / 1e6:9.2f} "
            f"Mtok/s  floor {row.floor_fraction:6.1%}  check {check}  {speedups}")


def gate_decode(gdn_decode_step) -> bool:
    """Ours vs causal_conv1d (T = 1) + recurrent_gated_delta_rule in float64 at a small shape, two steps, through
    the split kernel (what 3 rows take) and the main kernel (what B x Hk >= 2 x SMs takes) at head dim 128."""
    key_heads, value_heads, d, width, pool = 2, 4, 128, 4, 6
    channels = 2 * key_heads * d + value_heads * d
    ok = True
    for split in (True, False):
        gen = torch.Generator(device=DEVICE).manual_seed(2)
        weight = torch.randn(channels, width, generator=gen, device=DEVICE).to(torch.bfloat16)
        A_log = torch.empty(value_heads, device=DEVICE).uniform_(1, 16, generator=gen).log()
        dt_bias = torch.randn(value_heads, generator=gen, device=DEVICE)
        conv_pool = torch.randn(pool, channels, width - 1, generator=gen, device=DEVICE).to(torch.bfloat16)
        state_pool = torch.randn(pool, value_heads, d, d, generator=gen, device=DEVICE) * 0.1
        slots = torch.tensor([4, 1, 2], dtype=torch.int32, device=DEVICE)
        conv_ref, state_ref = conv_pool.clone(), state_pool.double()
        rows = slots.long()
        worst = 0.0
        for _ in range(2):
            x = torch.randn(3, channels, generator=gen, device=DEVICE).to(torch.bfloat16)
            a = torch.randn(3, value_heads, generator=gen, device=DEVICE).to(torch.bfloat16)
            b = torch.randn(3, value_heads, generator=gen, device=DEVICE).to(torch.bfloat16)
            o = gdn_decode_step(x, None, a, b, weight, A_log, dt_bias, conv_pool, state_pool, slots,
                                num_key_heads=key_heads, key_head_dim=d, value_head_dim=d, split=split)
            y, conv_ref[rows] = causal_conv1d(x[:, None], weight, initial_state=conv_ref[rows],
                                              output_final_state=True)
            y = y.double()
            q = y[..., :key_heads * d].reshape(3, 1, key_heads, d)
            k = y[..., key_heads * d:2 * key_heads * d].reshape(3, 1, key_heads, d)
            v = y[..., 2 * key_heads * d:].reshape(3, 1, value_heads, d)
            g, beta = gdn_gates(a[:, None].double(), b[:, None].double(), A_log.double(), dt_bias.double())
            o_ref, state_ref[rows] = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state_ref[rows],
                                                                output_final_state=True)
            worst = max(worst, rel_err(o, o_ref[:, 0]), rel_err(state_pool[rows], state_ref[rows]))
        passed = worst <= REF_TOLERANCE and torch.equal(conv_pool[rows], conv_ref[rows])
        log(f"gate decode step ({'split' if split else 'main'} kernel) vs float64 reference (B=3 of a pool of 6, "
            f"Hk=2 Hv=4 d=128 bf16): rel err {worst:.2e} -> {'PASS' if passed else 'FAIL'}")
        ok = ok and passed
    return ok


def bench_decode(model, batch, peers, ours_ok, rows):
    from hybridlm.ops.triton import gdn_decode_step

    key_heads, value_heads, d = HEADS[model]
    width, pool = 4, 2 * batch
    channels = 2 * key_heads * d + value_heads * d
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randn(batch, channels, generator=gen, device=DEVICE).to(torch.bfloat16)
    a = torch.randn(batch, value_heads, generator=gen, device=DEVICE).to(torch.bfloat16)
    b = torch.randn(batch, value_heads, generator=gen, device=DEVICE).to(torch.bfloat16)
    weight = torch.randn(channels, width, generator=gen, device=DEVICE).to(torch.bfloat16)
    A_log = torch.empty(value_heads, device=DEVICE).uniform_(1, 16, generator=gen).log()
    dt_bias = torch.randn(value_heads, generator=gen, device=DEVICE)
    conv_pool = torch.randn(pool, channels, width - 1, generator=gen, device=DEVICE).to(torch.bfloat16)
    state_pool = torch.randn(pool, value_heads, d, d, generator=gen, device=DEVICE) * 0.1
    slots = torch.randperm(pool, generator=gen, device=DEVICE)[:batch].to(torch.int32)
    # floor: every touched recurrent state read and written once (fp32), plus the conv states and the activations
    state_bytes = batch * value_heads * d * d * 4 * 2 + batch * channels * (width - 1) * 2 * 2
    floor_ms = (state_bytes + batch * (channels + value_heads * d) * 2) / copy_bandwidth() * 1e3

    def step(conv, state):
        return gdn_decode_step(x, None, a, b, weight, A_log, dt_bias, conv, state, slots,
                               num_key_heads=key_heads, key_head_dim=d, value_head_dim=d)

    def ours():
        return step(conv_pool, state_pool)

    check = "PASS" if ours_ok else "FAIL (reference gate)"
    # each variant's output and pools against the default's, from copies of the same starting pools (the timed runs
    # below step conv_pool and state_pool in place, so the copies come from this snapshot)
    start = conv_pool.clone(), state_pool.clone()
    copies = start[0].clone(), start[1].clone()
    o_default, pools_default = step(*copies), copies
    results = Results(f"decode {model} B={batch}")
    results["ours"] = (time_ms(ours), check)
    results["ours+graph"] = (time_ms(graphed(ours)), check)
    for name, settings in VARIANTS.items():
        with settings_applied(settings):
            try:
                copies = start[0].clone(), start[1].clone()
                err = max(rel_err(step(*copies), o_default), rel_err(copies[1], pools_default[1]),
                          rel_err(copies[0].float(), pools_default[0].float()))
                results[f"ours[{name}]"] = (time_ms(ours), variant_check(ours_ok, err))
                results[f"ours[{name}]+graph"] = (time_ms(graphed(ours)), variant_check(ours_ok, err))
            except Exception as error:
                log(f"  ours[{name}] failed at decode {model} B={batch}: {type(error).__name__}: {error}")

    if "fla_recurrent" in peers:
        # the check runs both from the same copies of the pools; fla is then timed on its own copy
        conv_copy, state_copy = conv_pool.clone(), state_pool.clone()
        rows_ = slots.long()
        y, _ = causal_conv1d(x[:, None], weight, initial_state=conv_copy[rows_], output_final_state=True)
        q = y[..., :key_heads * d].reshape(batch, 1, key_heads, d)
        k = y[..., key_heads * d:2 * key_heads * d].reshape(batch, 1, key_heads, d)
        v = y[..., 2 * key_heads * d:].reshape(batch, 1, value_heads, d)
        g, beta = gdn_gates(a[:, None], b[:, None], A_log, dt_bias)
        states = state_copy[rows_].clone()  # [B, Hv, d, d]

        def fla():
            return peers["fla_recurrent"](q=q, k=k, v=v, g=g, beta=beta, initial_state=states,
                                          output_final_state=True, use_qk_l2norm_in_kernel=True)
        try:
            o_peer, _ = fla()
            o_ours = gdn_decode_step(x, None, a, b, weight, A_log, dt_bias, conv_copy, state_copy, slots,
                                     num_key_heads=key_heads, key_head_dim=d, value_head_dim=d)
            err = rel_err(o_ours, o_peer[:, 0])
            results["fla recurrent"] = (time_ms(fla), f"{'PASS' if err <= PEER_TOLERANCE else 'FAIL'} {err:.1e}")
        except Exception as error:
            log(f"  fla fused_recurrent failed at {model} B={batch}: {type(error).__name__}: {error}")
    report("decode", model, batch, 1, batch, floor_ms, results, rows)


def print_table(rows: list[Row]) -> None:
    log()
    log("| kind | model | B | T | impl | ms | Mtok/s | floor | check | speed-up |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedups = ", ".join(f"x{s:.2f} vs {p}" for p, s in r.speedups.items()) or "-"
        log(f"| {r.kind} | {r.model} | {r.batch} | {r.length} | {r.impl} | {r.ms:.4f} | {r.tokens_per_s / 1e6:.2f} | "
            f"{r.floor_fraction:.1%} | {r.check} | {speedups} |")


def parse_settings(settings: list[str], option: str = "--set") -> list[tuple[object, str, object]]:
    """`MODULE.FLAG=VALUE` for modules of hybridlm.ops.triton (an upper-case flag that exists, a Python literal of
    the flag's type, or anything for a flag that may be None) -> (module, flag, value); refused by name otherwise."""
    import ast
    import importlib

    parsed = []
    for setting in settings:
        name, sep, text = setting.partition("=")
        module_name, _, flag = name.rpartition(".")
        if not sep or not module_name or not flag.isupper():
            raise SystemExit(f"{option} takes MODULE.FLAG=VALUE (e.g. gdn_chunk.FOLD_WU_INTO_H=True); got {setting!r}")
        try:
            module = importlib.import_module(f"hybridlm.ops.triton.{module_name}")
        except ModuleNotFoundError:
            raise SystemExit(f"{option}: no module hybridlm.ops.triton.{module_name}") from None
        if not hasattr(module, flag):
            raise SystemExit(f"{option}: hybridlm.ops.triton.{module_name} has no flag {flag}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise SystemExit(f"{option}: {text!r} is not a Python literal (True, 64, 'input', (16, 32))") from None
        old = getattr(module, flag)
        if old is not None and value is not None and type(value) is not type(old):
            raise SystemExit(f"{option}: {module_name}.{flag} is a {type(old).__name__}; got {value!r}")
        parsed.append((module, flag, value))
    return parsed


def apply_settings(settings: list[str]) -> list[str]:
    """--set: kernel options changed before anything runs, so one process times an option end to end."""
    applied = []
    for module, flag, value in parse_settings(settings):
        setattr(module, flag, value)
        applied.append(f"{module.__name__.rsplit('.', 1)[-1]}.{flag}={value!r}")
    return applied


def parse_variants(variants: list[str]) -> dict[str, list[tuple[object, str, object]]]:
    """--variant NAME:MODULE.FLAG=VALUE[,MODULE.FLAG=VALUE...] -> {NAME: settings}: ours timed again under each, in
    the same process as the default and the peers. Commas split settings only where a MODULE.FLAG= follows, so a
    value may be a tuple: bv:gdn_chunk.STATE_PASS_BVS=(32, 64)."""
    import re

    parsed = {}
    for variant in variants:
        name, sep, settings = variant.partition(":")
        if not sep or not name or not settings or name in parsed:
            raise SystemExit(f"--variant takes NAME:MODULE.FLAG=VALUE[,...] with a new NAME; got {variant!r}")
        parsed[name] = parse_settings(re.split(r",(?=\s*\w+\.\w+=)", settings), "--variant")
    return parsed


@contextlib.contextmanager
def settings_applied(settings: list[tuple[object, str, object]]):
    saved = [(module, flag, getattr(module, flag)) for module, flag, _ in settings]
    try:
        for module, flag, value in settings:
            setattr(module, flag, value)
        yield
    finally:
        for module, flag, value in saved:
            setattr(module, flag, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--no-peers", action="store_true", help="time hybridlm's kernels only")
    parser.add_argument("--kinds", default="forward,train,decode", help="comma-separated subset to run")
    parser.add_argument("--models", nargs="+", choices=sorted(HEADS), default=None,
                        help="head layouts to time (default: both; 9B only with --quick, except train)")
    parser.add_argument("--set", nargs="+", default=[], metavar="MODULE.FLAG=VALUE",
                        help="kernel options of hybridlm.ops.triton to change first, "
                        "e.g. gdn_chunk.FOLD_WU_INTO_H=True")
    parser.add_argument("--variant", nargs="+", default=[], metavar="NAME:MODULE.FLAG=VALUE[,...]",
                        help="also time ours under these options, each in a row ours[NAME] beside the default and the "
                        "peers (forward and train), e.g. fold:gdn_chunk.FOLD_WU_INTO_H=True")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="BxT",
                        help="the forward's and train's (batch, tokens) shapes instead of the usual, e.g. 1x32768")
    args = parser.parse_args()
    custom_shapes = None
    if args.shapes:
        try:
            custom_shapes = [tuple(int(n) for n in shape.lower().split("x")) for shape in args.shapes]
        except ValueError:
            custom_shapes = []
        if not custom_shapes or any(len(shape) != 2 or min(shape) < 1 for shape in custom_shapes):
            raise SystemExit(f"--shapes takes BxT pairs of positive integers, e.g. 1x32768; got {args.shapes}")
    kinds = set(args.kinds.split(","))
    if not kinds <= {"forward", "train", "decode"}:
        raise SystemExit(f"--kinds takes forward, train, decode; got {args.kinds}")
    applied = apply_settings(args.set)
    VARIANTS.update(parse_variants(args.variant))
    if not torch.cuda.is_available():
        raise SystemExit("bench_gdn.py needs a CUDA GPU")
    import triton

    from hybridlm.ops.triton import chunk_gdn, chunk_gdn_fwd, gdn_decode_step

    torch.manual_seed(0)
    log(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
        f"floor at {copy_bandwidth() / 1e12:.2f} TB/s" + (f"  settings {', '.join(applied)}" if applied else ""))
    peers = load_peers(not args.no_peers)

    rows: list[Row] = []
    models = args.models or (["9B"] if args.quick else ["9B", "0.8B"])
    if "forward" in kinds:
        forward_ok = gate_reference(chunk_gdn_fwd)
        shapes = custom_shapes or ([(1, 4096), (1, 16384)] if args.quick
                                   else [(1, 4096), (1, 16384), (1, 65536), (8, 4096)])
        for model in models:
            for batch, length in shapes:
                bench_forward(model, batch, length, peers, forward_ok, rows)
    if "train" in kinds:
        train_ok = gate_backward(chunk_gdn)
        # both head layouts even with --quick: the training comparison is one shape each
        for model in args.models or ["9B", "0.8B"]:
            for batch, length in custom_shapes or ([(4, 4096)] if args.quick else [(4, 4096), (1, 16384)]):
                bench_train(model, batch, length, peers, train_ok, rows)
    if "decode" in kinds:
        decode_ok = gate_decode(gdn_decode_step)
        for model in models:
            for batch in ([1, 256] if args.quick else [1, 32, 256]):
                bench_decode(model, batch, peers, decode_ok, rows)
    print_table(rows)

    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "bench_gdn.log")
        with open(path, "w") as f:
            f.write("\n".join(LINES) + "\n")
        print(f"log written to {path}")


if __name__ == "__main__":
    main()
