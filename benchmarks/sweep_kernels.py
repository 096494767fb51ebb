"""Launch settings of the prefill kernels on the GPU: the chunked GDN forward's three kernels (prepare, the
sequential state pass h, the output o) and the causal conv, each setting checked against the wrapper's result.

    python3 benchmarks/sweep_kernels.py [--lengths 16384 65536] [--models 9B 0.8B] [--quick] [--batch B]
                                        [--kernels h,o,prepare,kkt,conv,fold,fusedo,bwd]
                                        [--bwd-groups wu,dv-local,dh,dqk,qkgrad,wy,dqkb]

For each shape (B=1, bf16; the h kernel's part at B sequences with --batch): the three kernels of `chunk_gdn_fwd`
timed one by one (prepare, h, o) with the wrapper's settings, then the h kernel alone over BV x num_warps x
num_stages, with k normalised in the kernel (as the backward's recompute runs it) or handed over normalised
(NORM_K=False, as the forward runs it). Every setting's v_new and final state are checked against the wrapper's. The
h kernel runs cdiv(dv, BV) x Hv programs at B=1, each walking all T/64 chunks in order: the column "us/chunk" is its
time per step of that walk. fla's step is ~1.6 us (its whole forward at 9B heads, 64k tokens: 1.66 ms). Both o kernels
(per V block, and the looped one that makes q k^T once per chunk: gdn_chunk.LOOPED_O) run over BV x num_warps x
num_stages, checked against the wrapper's o. The prepare step runs both ways: the fused kernel over num_warps x
num_stages ("prepare"), and KKT_PREPARE's two kernels (the Gram/inverse one and the w/u one) each over its settings
("kkt"), each checked against the wrapper's w, u and g_cumsum run the same way. "fold" (not in the default list)
times the state pass with gdn_chunk.FOLD_WU_INTO_H and the whole forward with and without it. "fusedo" (neither)
times the whole forward with gdn_chunk.FUSED_OUTPUT over its state pass's settings. "bwd" (neither)
times the backward's launch settings at the training shape (B = 4, T = 4k), each checked against the defaults'
gradients.
With $OUT set the table also goes to $OUT/sweep_kernels.md. Runs on the CPU interpreter at a tiny shape (--tiny).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402

from hybridlm.ops.delta_rule import l2norm  # noqa: E402
from hybridlm.ops.triton import gdn_chunk, gdn_prepare  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODELS = {"9B": (16, 32, 128), "0.8B": (16, 16, 128), "tiny": (1, 2, 32)}


def launch_options(values: tuple) -> tuple:
    """num_warps / num_stages to sweep: on the CPU interpreter only the first, since neither changes what it runs."""
    return values[:1] if DEVICE == "cpu" else values


def time_ms(fn) -> float:
    if DEVICE == "cpu":
        fn()
        return float("nan")
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def inputs(length, heads, batch=1):
    key_heads, value_heads, d = heads
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE).to(torch.bfloat16)

    q, k = randn(batch, length, key_heads, d), randn(batch, length, key_heads, d)
    v, a, b = randn(batch, length, value_heads, d), randn(batch, length, value_heads), randn(batch, length, value_heads)
    A_log = torch.empty(value_heads, device=DEVICE).uniform_(1, 16, generator=gen).log()
    dt_bias = torch.randn(value_heads, generator=gen, device=DEVICE) * 0.5
    return q, k, v, a, b, A_log, dt_bias


def kernel_times(args) -> dict[str, float]:
    """Per-kernel device time of one chunk_gdn_fwd call (torch.profiler), ms."""
    if DEVICE == "cpu":
        return {}
    gdn_chunk.chunk_gdn_fwd(*args)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            gdn_chunk.chunk_gdn_fwd(*args)
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        if event.key.startswith(("chunk_gdn_", "gdn_cp_")):
            name = event.key.replace("chunk_gdn_fwd_", "").replace("chunk_gdn_", "").replace("_kernel", "")
            times[name] = event.device_time_total / 5e3
    return times


def max_rel_diff(pairs) -> float:
    """Largest max|x - y| / max|y| over (ours, the wrapper's) pairs."""
    return max((x.float() - y.float()).abs().max().item() / y.float().abs().max().item() for x, y in pairs)


def timed_setting(rows, model, length, label, num_warps, num_stages, launch, pairs) -> None:
    """Time `launch`, check its outputs against the wrapper's (`pairs` of tensors, compared after the timing) and
    record a row; a setting that does not compile or launch (e.g. out of shared memory) is recorded by its error."""
    try:
        ms = time_ms(launch)
    except Exception as error:
        rows.append((model, length, label, num_warps, num_stages, None, None, type(error).__name__))
        # the message tells an illegal address from a misaligned one or a launch failure (the 0.8B phased
        # prepare died with only "AcceleratorError" recorded); after a CUDA error every later setting fails too
        message = str(error).strip().splitlines()
        print(f"  {label} warps={num_warps} stages={num_stages}: {type(error).__name__}: "
              f"{message[0] if message else ''}", flush=True)
        return
    error = max_rel_diff(pairs)
    rows.append((model, length, label, num_warps, num_stages, None, ms, f"{error:.1e}"))
    print(f"  {label} warps={num_warps} stages={num_stages}: {ms:.4f} ms  max rel diff {error:.1e}", flush=True)


def forward_case(model, length, kkt=None, batch=1):
    """Inputs at this shape, the wrapper's intermediates (final state included) to check every setting against,
    and the launch arguments the three GDN kernels share. `kkt`: run the wrapper with KKT_PREPARE set so (None: the
    module's default). The output is not fused into the state pass here, so that h and v_new exist."""
    key_heads, value_heads, d = MODELS[model]
    args = inputs(length, MODELS[model], batch)
    saved = gdn_chunk.KKT_PREPARE, gdn_chunk.FUSED_OUTPUT
    gdn_chunk.KKT_PREPARE = saved[0] if kkt is None else kkt
    gdn_chunk.FUSED_OUTPUT = False
    try:
        out = gdn_chunk._chunk_gdn_fwd(*args, scale=None, initial_state=None, output_final_state=True,
                                       cu_seqlens=None)
    finally:
        gdn_chunk.KKT_PREPARE, gdn_chunk.FUSED_OUTPUT = saved
    common = dict(H=key_heads, HV=value_heads, K=d, V=d, BT=gdn_chunk.CHUNK_SIZE,
                  BK=max(16, triton.next_power_of_2(d)), IS_VARLEN=False, DOT_PRECISION="tf32")
    return args, out, common, triton.cdiv(length, gdn_chunk.CHUNK_SIZE)


def sweep(model, length, quick, rows, batch=1):
    _, value_heads, d = MODELS[model]
    args, out, common, chunks = forward_case(model, length, batch=batch)
    k = args[1]
    split = kernel_times(args)
    if split:
        total = sum(split.values())
        print(f"{model} B={batch} T={length}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in split.items())
              + f" (sum {total:.3f} ms); the wrapper's state-pass block BV "
              + str(gdn_chunk.state_pass_block(d, d, batch * value_heads, 2, torch.device(DEVICE), False)),
              flush=True)
    k_normed = l2norm(k.float()).to(k.dtype)
    common = dict(common, USE_INITIAL_STATE=False, STORE_FINAL_STATE=True)
    grid_bv = (16, 32, 64, 128) if not quick else (32, 64) if batch == 1 else (32, 64, 128)
    warps = launch_options((2, 4, 8) if not quick else (4, 8))
    stages = launch_options((1, 2, 3, 4) if not quick else (2, 3))
    for BV, num_warps, num_stages, norm_k in itertools.product(grid_bv, warps, stages, (True, False)):
        if BV > d:
            continue
        h = torch.empty_like(out["h"])
        v_new = torch.empty_like(out["v_new"])
        final = torch.empty_like(out["final_state"])
        key = k if norm_k else k_normed

        def launch():
            gdn_chunk.chunk_gdn_fwd_h_kernel[(triton.cdiv(d, BV), batch * value_heads)](
                key, out["w"], out["u"], out["g_cumsum"], h, v_new, None, final, None, None, length, key.stride(1),
                BV=BV, NORM_K=norm_k, num_warps=num_warps, num_stages=num_stages, **common)

        try:
            ms = time_ms(launch)
        except Exception as error:  # e.g. OutOfResources for a large BV with many stages
            rows.append((model, length, f"B={batch} {BV}" if batch > 1 else BV, num_warps, num_stages, norm_k, None,
                         type(error).__name__))
            continue
        error = max_rel_diff([(v_new, out["v_new"]), (final, out["final_state"])])
        rows.append((model, length, f"B={batch} {BV}" if batch > 1 else BV, num_warps, num_stages, norm_k, ms,
                     f"{error:.1e}"))
        per_chunk = ms * 1e3 / chunks
        print(f"  BV={BV:3d} warps={num_warps} stages={num_stages} norm_k={'in' if norm_k else 'pre'}: "
              f"{ms:.4f} ms  {per_chunk:.2f} us/chunk  max rel diff {error:.1e}", flush=True)


def sweep_o(model, length, rows):
    """Both output kernels over BV x num_warps x num_stages, checked against the wrapper's output: the per-block one
    (gdn_chunk.LOOPED_O off: one program per V block, each recomputing q k^T, so wider blocks do less of that) and
    the looped one (LOOPED_O, the default: one program per chunk and value head making q k^T once and walking the V
    blocks; its k normalised beforehand, as the prepare kernel hands it over)."""
    _, value_heads, d = MODELS[model]
    (q, k, v, a, b, A_log, dt_bias), out, common, chunks = forward_case(model, length)
    k_normed = l2norm(k.float()).to(k.dtype)  # [1, T, Hk, d], what the prepare kernel stores
    for BV, num_warps, num_stages in itertools.product((32, 64, 128), launch_options((4, 8)), launch_options((2, 3))):
        if BV > d:
            continue
        o = torch.empty_like(out["o"])

        def launch():
            gdn_chunk.chunk_gdn_fwd_o_kernel[(triton.cdiv(d, BV), chunks, value_heads)](
                q, k, out["v_new"], out["h"], out["g_cumsum"], o, None, None, out["scale"], length, q.stride(1),
                k.stride(1), BV=BV, num_warps=num_warps, num_stages=num_stages, **common)

        timed_setting(rows, model, length, f"o per-block BV={BV}", num_warps, num_stages, launch, [(o, out["o"])])
    # (1 stage faulted, H200)
    for BV, num_warps, num_stages in itertools.product((32, 64, 128), launch_options((4, 8)), launch_options((2, 3))):
        if BV > d:
            continue
        o = torch.empty_like(out["o"])

        def launch_looped():
            gdn_chunk.chunk_gdn_fwd_o_looped_kernel[(chunks, value_heads)](
                q, k_normed, out["v_new"], out["h"], out["g_cumsum"], o, None, None, out["scale"], length,
                q.stride(1), BV=BV, num_warps=num_warps, num_stages=num_stages, **common)

        timed_setting(rows, model, length, f"o looped BV={BV}", num_warps, num_stages, launch_looped,
                      [(o, out["o"])])


def sweep_prepare(model, length, rows):
    """The fused prepare kernel (gates, KKT, the triangular inverse, w and u in one launch, at the register limit)
    over num_warps x num_stages, checked against the wrapper's w, u and g_cumsum with KKT_PREPARE off."""
    _, value_heads, d = MODELS[model]
    (q, k, v, a, b, A_log, dt_bias), out, common, chunks = forward_case(model, length, kkt=False)
    BK = common["BK"]
    A_log32, dt32 = A_log.float(), dt_bias.float()
    for num_warps, num_stages in itertools.product(launch_options((2, 4, 8)), launch_options((1, 2, 3))):
        g, w, u, kn = (torch.empty_like(x) for x in (out["g_cumsum"], out["w"], out["u"], k))

        def launch():
            gdn_prepare.chunk_gdn_fwd_prepare_kernel[(chunks, value_heads)](
                k, v, a, b, A_log32, dt32, g, w, u, None, kn, None, None, length, k.stride(1), v.stride(1),
                BC=gdn_chunk.SUB_CHUNK, BV=BK, STORE_X=False, STORE_KN=True, num_warps=num_warps,
                num_stages=num_stages, **common)

        timed_setting(rows, model, length, f"prepare w={num_warps}", num_warps, num_stages, launch,
                      [(w, out["w"]), (u, out["u"]), (g, out["g_cumsum"])])


def sweep_prepare_kkt(model, length, rows):
    """KKT_PREPARE's two kernels, each over its settings and timed alone (the step costs the sum of the two best):
    the Gram/inverse kernel over num_warps x BK (key columns per slice), the w/u kernel over num_warps x BV; then
    the pair at gdn_chunk's defaults, checked against the wrapper's outputs."""
    from hybridlm.ops.triton import gdn_prepare_kkt

    key_heads, value_heads, d = MODELS[model]
    (q, k, v, a, b, A_log, dt_bias), out, common, chunks = forward_case(model, length, kkt=True)
    A_log32, dt32 = A_log.float(), dt_bias.float()
    x_ref = out["w"].new_zeros(*out["w"].shape[:3], gdn_chunk.CHUNK_SIZE)  # the shape and dtype of x_inv

    def solve(g, x, num_warps, BK, interleave=gdn_chunk.KKT_INTERLEAVE, recursive=gdn_chunk.KKT_RECURSIVE):
        gdn_prepare_kkt.chunk_gdn_fwd_kkt_solve_kernel[(chunks, value_heads)](
            k, a, b, A_log32, dt32, g, x, None, None, length, k.stride(1), H=key_heads, HV=value_heads, K=d,
            BT=gdn_chunk.CHUNK_SIZE, BC=gdn_chunk.SUB_CHUNK, BK=BK, IS_VARLEN=False, DOT_PRECISION="tf32",
            INTERLEAVE=interleave, RECURSIVE=recursive, num_warps=num_warps)

    def wu(g, x, w, u, kn, num_warps, BV):
        gdn_prepare_kkt.chunk_gdn_wu_kernel[(chunks, value_heads)](
            k, v, b, g, x, w, u, kn, None, None, length, k.stride(1), v.stride(1), BV=BV, STORE_KN=True,
            num_warps=num_warps, **dict(common, V=d))

    inverses = {"rows": (False, False), "interleaved": (True, False), "recursive": (False, True)}
    for num_warps, BK, inverse in itertools.product(launch_options((1, 2, 4)), (32, 64), inverses):
        g, x = torch.empty_like(out["g_cumsum"]), torch.zeros_like(x_ref)  # (X checked below through w and u)
        label = f"prepare kkt-solve BK={BK} {inverse}"
        timed_setting(rows, model, length, label, num_warps, 1,
                      lambda: solve(g, x, num_warps, BK, *inverses[inverse]), [(g, out["g_cumsum"])])
    for num_warps, BV in itertools.product(launch_options((4, 8)), (32, 64, 128)):
        if BV > d:
            continue
        w, u, kn = torch.empty_like(out["w"]), torch.empty_like(out["u"]), torch.empty_like(k)
        g, x = torch.empty_like(out["g_cumsum"]), torch.zeros_like(x_ref)
        solve(g, x, gdn_chunk.KKT_WARPS, min(d, gdn_chunk.KKT_BK))  # X and G for the w/u kernel, not timed
        timed_setting(rows, model, length, f"prepare kkt-wu BV={BV}", num_warps, 3,
                      lambda: wu(g, x, w, u, kn, num_warps, BV), [(w, out["w"]), (u, out["u"])])
    g, w, u, kn = torch.empty_like(out["g_cumsum"]), torch.empty_like(out["w"]), torch.empty_like(out["u"]), \
        torch.empty_like(k)
    x = torch.zeros_like(x_ref)

    def both():
        solve(g, x, gdn_chunk.KKT_WARPS, min(d, gdn_chunk.KKT_BK))
        wu(g, x, w, u, kn, gdn_chunk.KKT_WU_WARPS, min(d, gdn_chunk.KKT_WU_BV))

    timed_setting(rows, model, length, "prepare kkt (defaults)", gdn_chunk.KKT_WARPS, 1, both,
                  [(w, out["w"]), (u, out["u"]), (g, out["g_cumsum"])])


def sweep_bwd(model, rows, tiny=False, only=()):
    """The backward's launch settings (gdn_chunk_bwd's BWD_* flags) at the training shape (B = 4, T = 4k; tiny: B = 2,
    T = 200), one group at a time with the rest at the defaults: each setting's whole backward timed and its
    gradients checked against the defaults' (largest relative difference over dq, dk, dv, da, db); first the
    per-kernel split of the backward at the defaults. `only`: the groups to run (all if empty)."""
    from hybridlm.ops.triton import gdn_chunk_bwd

    batch, length = (2, 200) if tiny else (4, 4096)
    q, k, v, a, b, A_log, dt_bias = inputs(length, MODELS[model], batch)
    do = torch.randn(v.shape, generator=torch.Generator(device=DEVICE).manual_seed(1), device=DEVICE).to(v.dtype)
    out = gdn_chunk._chunk_gdn_fwd(q, k, v, a, b, A_log, dt_bias, scale=None, initial_state=None,
                                   output_final_state=False, cu_seqlens=None, store_x=True)

    def backward():
        return gdn_chunk_bwd.chunk_gdn_bwd(q, k, v, a, b, A_log, dt_bias, out["g_cumsum"], out["x_inv"], do)

    names = ("dq", "dk", "dv", "da", "db")
    reference = backward()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                backward()
            torch.cuda.synchronize()
        split = {event.key.replace("_kernel", ""): event.device_time_total / 5e3 for event in prof.key_averages()
                 if event.key.startswith("chunk_gdn_")}
        print(f"{model} B={batch} T={length} backward: " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in split.items())
              + f" (sum {sum(split.values()):.3f} ms)", flush=True)
    groups = {
        "wu": ("BWD_WU_BV", "BWD_WU_WARPS"), "dv-local": ("BWD_DV_LOCAL_WARPS",),
        "dh": ("BWD_DH_BV", "BWD_DH_WARPS", "BWD_DH_STAGES"),
        "dqk": ("BWD_DQK_WARPS", "BWD_WY_WARPS", "BWD_DQK_STAGES"),
        "qkgrad": ("BWD_QK_GRAD_DTYPE",),
        "wy": ("BWD_WY_BK", "BWD_WY_KB_WARPS", "BWD_WY_KB_STAGES", "BWD_WY_KB_MAXNREG"),  # None: whole rows
        # None: the whole-row dq/dk kernel
        "dqkb": ("BWD_DQK_BK", "BWD_DQK_KB_WARPS", "BWD_DQK_KB_STAGES", "BWD_DQK_KB_MAXNREG"),
    }
    grids = {
        "wu": [(64, 4), (128, 8), (128, 4), (64, 8)], "dv-local": [(4,), (8,)],
        "dh": list(itertools.product((32, 64), launch_options((4, 8)), launch_options((2, 3)))),  # (16: chunk_gdn_bwd)
        "dqk": list(itertools.product((4, 8), (4, 8), (2, 3))),
        "qkgrad": [("input",), ("fp32",)],
        # blocks of 64 at 4 warps: 255 registers (two programs per SM); capped at 168 (three), 520-828 B spilled
        "wy": [(None, 4, 2, None), (32, 4, 2, None), (32, 4, 3, None), (32, 8, 2, None), (64, 8, 2, None),
               (64, 4, 2, None), (64, 4, 2, 168)],
        # sm_90, Triton 3.6 (compile_check, 9B heads): blocks of 32 at 4 warps 250 registers, at 8 147 (128 capped,
        # no spills: two programs per SM); of 64 at 4 warps 255 + 72 B spilled, at 8 183
        "dqkb": [(None, 4, 2, None), (32, 4, 2, None), (32, 8, 2, None), (32, 8, 2, 128), (64, 8, 2, None),
                 (64, 4, 2, None)],
    }
    groups = {name: flags for name, flags in groups.items() if name in only} if only else groups
    for group, flags in groups.items():
        home = gdn_chunk_bwd
        saved = tuple(getattr(home, flag) for flag in flags)
        for setting in grids[group]:
            if tiny and (group == "dh" and setting[0] > 32 or group == "dqk" and setting[:2] != (8, 8)):
                continue
            for flag, value in zip(flags, setting):
                setattr(home, flag, value)
            label = f"bwd {group} " + " ".join(f"{flag.removeprefix('BWD_').lower()}={value}"
                                               for flag, value in zip(flags, setting))
            warps = dict(zip(flags, setting)).get(f"BWD_{group.upper().replace('-', '_')}_WARPS", "-")
            stages = dict(zip(flags, setting)).get(f"BWD_{group.upper()}_STAGES", "-")
            warps = dict(zip(flags, setting)).get("BWD_DQK_WARPS", warps)
            try:
                try:
                    first = backward()  # checked against the defaults' gradients after the timing
                except Exception as error:  # e.g. out of shared memory
                    rows.append((model, length, label, warps, stages, None, None, type(error).__name__))
                    print(f"  {label}: {type(error).__name__}", flush=True)
                    continue
                timed_setting(rows, model, length, label, warps, stages, backward,
                              [(first[name], reference[name]) for name in names])
            finally:
                for flag, value in zip(flags, saved):
                    setattr(home, flag, value)


def sweep_fold(model, length, rows, batch=1):
    """gdn_chunk.FOLD_WU_INTO_H: the state pass taking v_new = X (beta (v - exp(G) k h)) (no w, u stored) over BV x
    num_warps x num_stages, checked against the wrapper's v_new and final state (the default path: the products
    regrouped round differently, ~1e-3); then the whole forward both ways, with the per-kernel split."""
    _, value_heads, d = MODELS[model]
    args, out, common, chunks = forward_case(model, length, batch=batch)
    q, k, v, a, b = args[:5]
    k_normed = l2norm(k.float()).to(k.dtype)
    common = dict(common, USE_INITIAL_STATE=False, STORE_FINAL_STATE=True, NORM_K=False)
    for BV, num_warps, num_stages in itertools.product((32, 64), launch_options((4, 8)), launch_options((2, 3))):
        if BV > max(32, d):
            continue
        h, v_new = torch.empty_like(out["h"]), torch.empty_like(out["v_new"])
        final = torch.empty_like(out["final_state"])

        def launch():
            gdn_chunk.chunk_gdn_fwd_h_kernel[(triton.cdiv(d, BV), batch * value_heads)](
                k_normed, None, None, out["g_cumsum"], h, v_new, None, final, None, None, length, k_normed.stride(1),
                BV=BV, FOLD_WU=True, x_inv=out["x_inv"], v=v, b=b, stride_v=v.stride(1), num_warps=num_warps,
                num_stages=num_stages, **common)

        timed_setting(rows, model, length, f"fold h B={batch} BV={BV}", num_warps, num_stages, launch,
                      [(v_new, out["v_new"]), (final, out["final_state"])])
    saved = gdn_chunk.FOLD_WU_INTO_H
    for fold in (False, True):
        gdn_chunk.FOLD_WU_INTO_H = fold
        try:
            o_once = gdn_chunk.chunk_gdn_fwd(*args, output_final_state=True)[0]  # checked after the timing
            timed_setting(rows, model, length, f"fold whole forward B={batch}{' folded' if fold else ''}", 4, 3,
                          lambda: gdn_chunk.chunk_gdn_fwd(*args, output_final_state=True), [(o_once, out["o"])])
            split = kernel_times(args)
            if split:
                print(f"{model} B={batch} T={length} FOLD_WU_INTO_H={fold}: "
                      + ", ".join(f"{name} {ms:.3f} ms" for name, ms in split.items())
                      + f" (sum {sum(split.values()):.3f} ms)", flush=True)
        finally:
            gdn_chunk.FOLD_WU_INTO_H = saved


def sweep_fused_output(model, length, rows, batch=1):
    """gdn_chunk.FUSED_OUTPUT: the whole forward with the output made inside the state pass, over that pass's V
    block x num_warps x num_stages (the fold and the context-parallel cut by their rules), each checked against the
    unfused forward's o and final state; the per-kernel split of every setting."""
    args = inputs(length, MODELS[model], batch)
    names = ("FUSED_OUTPUT", "FUSED_OUTPUT_BV", "FUSED_OUTPUT_WARPS", "FUSED_OUTPUT_STAGES", "FUSED_OUTPUT_QK_GIVEN")
    saved = {name: getattr(gdn_chunk, name) for name in names}

    def forward():
        return gdn_chunk.chunk_gdn_fwd(*args, output_final_state=True)

    def timed(label, num_warps, num_stages, reference):
        try:
            once = forward()  # checked after the timing
        except Exception as error:  # a setting that does not compile or launch is a row, not the end of the sweep
            rows.append((model, length, label, num_warps, num_stages, None, None, type(error).__name__))
            print(f"  {label}: {type(error).__name__}: {str(error).strip()[:200]}", flush=True)
            return None
        timed_setting(rows, model, length, label, num_warps, num_stages, forward, list(zip(once, reference)))
        split = kernel_times(args)
        if split:
            print(f"  {label} w{num_warps} s{num_stages} split: " + ", ".join(
                f"{name} {ms:.3f}" for name, ms in split.items()) + f" (sum {sum(split.values()):.3f} ms)", flush=True)
        return once

    try:
        gdn_chunk.FUSED_OUTPUT = False
        reference = forward()
        timed(f"fused-o B={batch}: unfused forward", 4, 3, reference)
        gdn_chunk.FUSED_OUTPUT = True
        # q k^T from the w/u kernel (the default) at every setting, then made in the pass at two of them
        settings = [(True, *setting) for setting in itertools.product((32, 64), launch_options((4, 8)),
                                                                      launch_options((2, 3)))]
        for qk_given, BV, num_warps, num_stages in settings + [(False, 32, 4, 3), (False, 64, 4, 2)]:
            gdn_chunk.FUSED_OUTPUT_BV, gdn_chunk.FUSED_OUTPUT_WARPS = BV, num_warps
            gdn_chunk.FUSED_OUTPUT_STAGES, gdn_chunk.FUSED_OUTPUT_QK_GIVEN = num_stages, qk_given
            timed(f"fused-o B={batch}: fused forward BV={BV}{'' if qk_given else ' qk in pass'}", num_warps,
                  num_stages, reference)
    finally:
        for name, value in saved.items():
            setattr(gdn_chunk, name, value)


def sweep_conv(model, length, rows):
    """The causal conv over its tile (BT tokens x BC channels) and num_warps, on the model's conv channels as one
    sequence and as 64 packed ones (a mixed engine step), checked against the wrapper's output."""
    from hybridlm.ops.triton import conv

    key_heads, value_heads, d = MODELS[model]
    channels = (2 * key_heads + value_heads) * d
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(1, length, channels, generator=gen, device=DEVICE).to(torch.bfloat16)
    weight = torch.randn(channels, 4, generator=gen, device=DEVICE).to(torch.bfloat16)
    cu = torch.linspace(0, length, 65, device=DEVICE).long()
    for packed in (False, True):
        cu_seqlens = cu if packed else None
        reference, _ = conv.causal_conv1d_fwd(x, weight, cu_seqlens=cu_seqlens)
        saved = conv.BLOCK_T, conv.BLOCK_C, conv.NUM_WARPS
        for BT, BC, num_warps in itertools.product((32, 64, 128), (64, 128, 256), launch_options((4, 8))):
            conv.BLOCK_T, conv.BLOCK_C, conv.NUM_WARPS = BT, BC, num_warps
            label = f"conv {'packed' if packed else 'one'} BT={BT} BC={BC}"
            try:
                y, _ = conv.causal_conv1d_fwd(x, weight, cu_seqlens=cu_seqlens)  # compiles outside the timing
                ms = float("nan") if DEVICE == "cpu" else time_ms(  # (the interpreter's run above is the check)
                    lambda: conv.causal_conv1d_fwd(x, weight, cu_seqlens=cu_seqlens))
            except Exception as error:
                rows.append((model, length, label, num_warps, 1, None, None, type(error).__name__))
                continue
            finally:
                conv.BLOCK_T, conv.BLOCK_C, conv.NUM_WARPS = saved
            error = (y.float() - reference.float()).abs().max().item()
            rows.append((model, length, label, num_warps, 1, None, ms, f"{error:.1e}"))
            print(f"  {label} warps={num_warps}: {ms:.4f} ms  max abs diff {error:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["9B", "0.8B"], choices=sorted(MODELS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[16384, 65536])
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape at 200 tokens (CPU check)")
    parser.add_argument("--kernels", default="h,o,prepare,kkt,conv",
                        help="comma-separated: h, o, prepare, kkt, conv, fold (FOLD_WU_INTO_H), fusedo (FUSED_OUTPUT: "
                        "the whole forward), bwd (the backward, at B=4 T=4k)")
    parser.add_argument("--batch", type=int, default=1, help="sequences of the h and fold sweeps (B x T tokens)")
    parser.add_argument("--bwd-groups", default="", help="with bwd: comma-separated subset of wu, dv-local, dh, dqk, "
                        "qkgrad (BWD_QK_GRAD_DTYPE), wy (BWD_WY_BK: the key-blocked WY kernel), dqkb (BWD_DQK_BK: "
                        "the key-blocked dq/dk kernel that also makes dw; default: all)")
    args = parser.parse_args()
    if args.tiny:
        args.models, args.lengths, args.quick = ["tiny"], [200], True
    rows = []
    for model in args.models:
        for length in args.lengths:
            if "h" in args.kernels.split(","):
                sweep(model, length, args.quick, rows, batch=args.batch)
            if "o" in args.kernels.split(","):
                sweep_o(model, length, rows)
            if "prepare" in args.kernels.split(","):
                sweep_prepare(model, length, rows)
            if "kkt" in args.kernels.split(","):
                sweep_prepare_kkt(model, length, rows)
            if "fold" in args.kernels.split(","):
                sweep_fold(model, length, rows, batch=args.batch)
            if "fusedo" in args.kernels.split(","):
                sweep_fused_output(model, length, rows, batch=args.batch)
            if "conv" in args.kernels.split(","):
                sweep_conv(model, length, rows)
        if "bwd" in args.kernels.split(","):  # its own shape: the training one
            sweep_bwd(model, rows, tiny=args.tiny, only=tuple(args.bwd_groups.split(",")) if args.bwd_groups else ())
    lines = ["| model | T | BV (h kernel unless named) | warps | stages | k norm | ms | us/chunk | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, length, BV, num_warps, num_stages, norm_k, ms, check in sorted(
            rows, key=lambda r: (r[0], r[1], str(r[2])[:1], float("inf") if r[6] is None or r[6] != r[6] else r[6])):
        per_chunk = "-" if ms is None or norm_k is None else f"{ms * 1e3 / triton.cdiv(length, 64):.2f}"
        norm = "-" if norm_k is None else "in" if norm_k else "pre"
        lines.append(f"| {model} | {length} | {BV} | {num_warps} | {num_stages} | {norm} | "
                     f"{'-' if ms is None else f'{ms:.4f}'} | {per_chunk} | {check} |")
    table = "\n".join(lines)
    print(table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sweep_kernels.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
