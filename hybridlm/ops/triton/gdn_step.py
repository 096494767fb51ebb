"""Fused Gated DeltaNet decode step, one launch; the reference twin is `hybridlm.ops.conv.causal_conv1d` with T = 1
followed by `hybridlm.ops.delta_rule.recurrent_gated_delta_rule` (and optionally `hybridlm.ops.norm.gated_rms_norm`).

One program per (batch row, key head) owns every channel that head touches: its q and k conv channels and the
conv channels and recurrent states of its Hv/Hk value heads. That ownership is what lets the conv-state shift
happen in place in the same launch: a channel's state is read and written by exactly one program, so no other
program can read a half-shifted window. States live in pools indexed by slot ids; nothing here syncs with the
host or allocates by data, so the step can be captured in a CUDA graph. A negative slot id marks a padding row
(a graph captured for a larger batch): it touches no state and writes zeros.

Small batches take the split kernel instead: several programs per key head, so a batch of one still fills the
GPU, still one launch; the last of a key head's programs to finish does the shared work (see there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridlm.ops.triton.launch import launch
from hybridlm.ops.triton.utils import cdiv, next_power_of_2, pdl_enabled, pdl_wait


@triton.jit
def _conv_step(x, conv_weight, p_state, o_c, m_c, W: tl.constexpr, BW: tl.constexpr, SHIFT: tl.constexpr):
    """One causal-conv step + SiLU for channels o_c, shifting their conv state [C, W-1] in place (SHIFT).

    Matches causal_conv1d: computed in the weight's dtype (rounded there), returned in x's dtype, as fp32."""
    W_DTYPE = conv_weight.dtype.element_ty
    o_w = tl.arange(0, BW)
    m_w = o_w < W - 1
    b_x = tl.load(x + o_c, mask=m_c, other=0.)  # [BC], the new pre-conv input
    p_win = p_state + o_c[:, None] * (W - 1) + o_w[None, :]
    b_win = tl.load(p_win, mask=m_c[:, None] & m_w[None, :], other=0.).to(tl.float32)  # [BC, BW] oldest first
    b_next = tl.load(p_win + 1, mask=m_c[:, None] & (o_w[None, :] + 1 < W - 1), other=0.)
    b_w = tl.load(conv_weight + o_c[:, None] * W + o_w[None, :], mask=m_c[:, None] & m_w[None, :], other=0.)
    b_y = tl.sum(b_w.to(tl.float32) * b_win, axis=1)
    b_y += tl.load(conv_weight + o_c * W + (W - 1), mask=m_c, other=0.).to(tl.float32) * b_x.to(tl.float32)
    b_y = b_y.to(W_DTYPE).to(tl.float32)
    b_y = (b_y * tl.sigmoid(b_y)).to(W_DTYPE).to(x.dtype.element_ty).to(tl.float32)
    # the window shifts left by one and takes the new input last; every load above happens before any store
    if SHIFT:
        b_next = tl.where(o_w[None, :] == W - 2, b_x[:, None], b_next)
        tl.debug_barrier()
        tl.store(p_win, b_next.to(p_state.dtype.element_ty), mask=m_c[:, None] & m_w[None, :])
    return b_y


@triton.jit
def _qk_step(p_x, conv_weight, p_conv, i_hk, scale, H: tl.constexpr, K: tl.constexpr, W: tl.constexpr,
             BK: tl.constexpr, BW: tl.constexpr, SHIFT: tl.constexpr):
    """Key head i_hk's q and k after the conv step, SiLU and L2 norm (q also scaled)."""
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_q = _conv_step(p_x, conv_weight, p_conv, i_hk * K + o_k, m_k, W, BW, SHIFT)
    b_k = _conv_step(p_x, conv_weight, p_conv, H * K + i_hk * K + o_k, m_k, W, BW, SHIFT)
    return b_q * tl.rsqrt(tl.sum(b_q * b_q) + 1e-6) * scale, b_k * tl.rsqrt(tl.sum(b_k * b_k) + 1e-6)


@triton.jit
def _gates(a, b, A_log, dt_bias, i_b, i_h, HV: tl.constexpr):
    """Decay exp(g) = exp(-exp(A_log) softplus(a + dt_bias)) and beta = sigmoid(b) of one row and value head."""
    b_x = tl.load(a + i_b * HV + i_h).to(tl.float32) + tl.load(dt_bias + i_h).to(tl.float32)
    b_softplus = tl.where(b_x > 20., b_x, tl.maximum(b_x, 0.) + tl.log(1. + tl.exp(-tl.abs(b_x))))
    b_decay = tl.exp(-tl.exp(tl.load(A_log + i_h).to(tl.float32)) * b_softplus)
    return b_decay, tl.sigmoid(tl.load(b + i_b * HV + i_h).to(tl.float32))


@triton.jit
def _conv_shift(x, p_state, o_c, m_c, W: tl.constexpr, BW: tl.constexpr):
    """Shift the conv state of channels o_c left by one and append the new input x[o_c]."""
    o_w = tl.arange(0, BW)
    m_w = o_w < W - 1
    b_x = tl.load(x + o_c, mask=m_c, other=0.)
    p_win = p_state + o_c[:, None] * (W - 1) + o_w[None, :]
    b_next = tl.load(p_win + 1, mask=m_c[:, None] & (o_w[None, :] + 1 < W - 1), other=0.)
    b_next = tl.where(o_w[None, :] == W - 2, b_x[:, None], b_next)
    tl.debug_barrier()
    tl.store(p_win, b_next.to(p_state.dtype.element_ty), mask=m_c[:, None] & m_w[None, :])


@triton.jit
def _delta_rule_step(b_s, b_q, b_k, b_v, b_decay, b_beta):
    """One token on a state tile [BK, BV]: decay, write beta * (v - S^T k) along k, then read with q; (S, o [BV])."""
    b_s *= b_decay
    b_delta = b_beta * (b_v - tl.sum(b_s * b_k[:, None], axis=0))
    b_s += b_k[:, None] * b_delta[None, :]
    return b_s, tl.sum(b_s * b_q[:, None], axis=0)


@triton.jit
def gdn_decode_step_kernel(
    qkv,  # [B, C] raw projections, row stride stride_x; C = 2*H*K + HV*V
    z,  # [B, HV, V] output gate (FUSE_NORM only), row stride stride_z
    a,  # [B, HV]
    b,  # [B, HV]
    conv_weight,  # [C, W]
    A_log,  # [HV]
    dt_bias,  # [HV]
    norm_weight,  # [V] (FUSE_NORM only)
    conv_state_pool,  # [P, C, W-1], updated in place
    state_pool,  # [P, HV, K, V] fp32, updated in place
    slot_ids,  # [B] int32
    o,  # out [B, HV, V]
    scale,
    norm_eps,
    stride_x,
    stride_z,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    W: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BW: tl.constexpr,
    PROD_IN_X_DTYPE: tl.constexpr,
    FUSE_NORM: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr,  # requires BV >= V
):
    pdl_wait(USE_PDL)
    i_b, i_hk = tl.program_id(0), tl.program_id(1)
    G = HV // H  # value heads per key head (constexpr arithmetic)
    C = 2 * H * K + HV * V
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_bv = tl.arange(0, BV)
    i_slot = tl.load(slot_ids + i_b).to(tl.int64)
    if i_slot < 0:  # padding row: no state is touched
        for i_g in range(G):
            for i_v in range(tl.cdiv(V, BV)):
                o_v = i_v * BV + o_bv
                tl.store(o + (i_b * HV + i_hk * G + i_g) * V + o_v, tl.zeros([BV], tl.float32).to(
                    o.dtype.element_ty), mask=o_v < V)
        return

    p_x = qkv + i_b.to(tl.int64) * stride_x
    p_conv = conv_state_pool + i_slot * C * (W - 1)
    b_q, b_k = _qk_step(p_x, conv_weight, p_conv, i_hk, scale, H, K, W, BK, BW, True)

    if PREFETCH:  # one V block (BV >= V): the next value head's state is loaded before this one's is stored
        m_v = o_bv < V
        m_kv = m_k[:, None] & m_v[None, :]
        p_s = state_pool + (i_slot * HV + i_hk * G) * K * V + o_k[:, None] * V + o_bv[None, :]
        b_s_next = tl.load(p_s, mask=m_kv, other=0.)
        for i_g in tl.static_range(HV // H):
            i_h = i_hk * G + i_g
            b_s = b_s_next
            if i_g + 1 < HV // H:
                b_s_next = tl.load(p_s + (i_g + 1) * K * V, mask=m_kv, other=0.)
            b_decay, b_beta = _gates(a, b, A_log, dt_bias, i_b, i_h, HV)
            b_v = _conv_step(p_x, conv_weight, p_conv, 2 * H * K + i_h * V + o_bv, m_v, W, BW, True)
            b_s, b_o = _delta_rule_step(b_s, b_q, b_k, b_v, b_decay, b_beta)
            tl.store(p_s + i_g * K * V, b_s, mask=m_kv)
            if FUSE_NORM:
                b_o = _gated_norm(b_o, m_v, o_bv, z + i_b.to(tl.int64) * stride_z + i_h * V, norm_weight, norm_eps,
                                  V, o.dtype.element_ty, PROD_IN_X_DTYPE)
            tl.store(o + (i_b * HV + i_h) * V + o_bv, b_o.to(o.dtype.element_ty), mask=m_v)
    else:
        for i_g in range(G):
            i_h = i_hk * G + i_g
            b_decay, b_beta = _gates(a, b, A_log, dt_bias, i_b, i_h, HV)
            p_s = state_pool + (i_slot * HV + i_h) * K * V
            p_o = o + (i_b * HV + i_h) * V
            for i_v in range(tl.cdiv(V, BV)):
                o_v = i_v * BV + o_bv
                m_v = o_v < V
                b_v = _conv_step(p_x, conv_weight, p_conv, 2 * H * K + i_h * V + o_v, m_v, W, BW, True)
                m_kv = m_k[:, None] & m_v[None, :]
                b_s = tl.load(p_s + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.)  # [BK, BV]
                b_s, b_o = _delta_rule_step(b_s, b_q, b_k, b_v, b_decay, b_beta)
                tl.store(p_s + o_k[:, None] * V + o_v[None, :], b_s, mask=m_kv)
                if FUSE_NORM:  # gated RMSNorm in gated_rms_norm's cast order (needs the whole row: BV >= V)
                    b_o = _gated_norm(b_o, m_v, o_v, z + i_b.to(tl.int64) * stride_z + i_h * V, norm_weight, norm_eps,
                                      V, o.dtype.element_ty, PROD_IN_X_DTYPE)
                tl.store(p_o + o_v, b_o.to(o.dtype.element_ty), mask=m_v)



@triton.jit
def _gated_norm(b_o, m_v, o_v, z_row, norm_weight, norm_eps, V: tl.constexpr, O_DTYPE: tl.constexpr,
                PROD_IN_X_DTYPE: tl.constexpr):
    """gated_rms_norm of one head's row in its cast order: o rounded to the output dtype, normed, weighted,
    times silu(z)."""
    b_o = b_o.to(O_DTYPE).to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(tl.where(m_v, b_o * b_o, 0.)) / V + norm_eps)
    b_n = (b_o * b_rstd).to(O_DTYPE).to(tl.float32)
    b_n = tl.load(norm_weight + o_v, mask=m_v, other=0.).to(tl.float32) * b_n
    if PROD_IN_X_DTYPE:  # weight * normed rounds to torch's promoted dtype: x's, or else fp32
        b_n = b_n.to(O_DTYPE)
    b_z = tl.load(z_row + o_v, mask=m_v, other=0.).to(tl.float32)
    return b_n.to(tl.float32) * (b_z * tl.sigmoid(b_z))


@triton.jit
def gdn_decode_split_kernel(
    qkv, z, a, b, conv_weight, A_log, dt_bias, norm_weight, conv_state_pool, state_pool, slot_ids,
    o_raw,  # [B, HV, V] scratch for the delta rule's output before the norm (o itself without FUSE_NORM)
    o,  # out [B, HV, V]
    arrivals,  # [>= B * H] int32, zero between launches: how many programs of each (row, key head) are done
    scale, norm_eps, stride_x, stride_z,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BVF: tl.constexpr, BW: tl.constexpr, NV: tl.constexpr,
    PROD_IN_X_DTYPE: tl.constexpr, FUSE_NORM: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Small batches: one program per (row, value head, slice of BV value channels), so that a batch of one
    still spreads over the GPU. Every program recomputes its key head's q and k conv (a few hundred MACs), so
    none may shift their conv state while the others still read it, and the output norm needs the whole row.
    The last program of a (row, key head) to arrive does both: each program counts itself in `arrivals` after
    its reads and its output store (release), the one that sees the count complete (acquire) shifts the q/k
    conv windows, norms the rows of the key head's G value heads and resets the count for the next launch."""
    pdl_wait(USE_PDL)
    i_b, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G = HV // H
    C = 2 * H * K + HV * V
    i_hk = i_h // G
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    i_slot = tl.load(slot_ids + i_b).to(tl.int64)
    if i_slot < 0:  # padding row: no state is touched, no program counts itself
        tl.store(o + (i_b * HV + i_h) * V + o_v, tl.zeros([BV], tl.float32).to(o.dtype.element_ty), mask=m_v)
        return
    p_x = qkv + i_b.to(tl.int64) * stride_x
    p_conv = conv_state_pool + i_slot * C * (W - 1)
    b_q, b_k = _qk_step(p_x, conv_weight, p_conv, i_hk, scale, H, K, W, BK, BW, False)
    b_decay, b_beta = _gates(a, b, A_log, dt_bias, i_b, i_h, HV)
    b_v = _conv_step(p_x, conv_weight, p_conv, 2 * H * K + i_h * V + o_v, m_v, W, BW, True)  # owned: shifted
    p_s = state_pool + (i_slot * HV + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
    m_kv = m_k[:, None] & m_v[None, :]
    b_s = tl.load(p_s, mask=m_kv, other=0.) * b_decay  # [BK, BV]
    b_delta = b_beta * (b_v - tl.sum(b_s * b_k[:, None], axis=0))
    b_s += b_k[:, None] * b_delta[None, :]
    tl.store(p_s, b_s, mask=m_kv)
    tl.store(o_raw + (i_b * HV + i_h) * V + o_v, tl.sum(b_s * b_q[:, None], axis=0).to(o_raw.dtype.element_ty),
             mask=m_v)

    tl.debug_barrier()  # every thread's reads and stores come before the count (the release is cumulative)
    p_count = arrivals + i_b * H + i_hk
    if tl.atomic_add(p_count, 1, sem="acq_rel", scope="gpu") == G * NV - 1:
        tl.atomic_xchg(p_count, 0, sem="relaxed", scope="gpu")
        _conv_shift(p_x, p_conv, i_hk * K + o_k, m_k, W, BW)
        _conv_shift(p_x, p_conv, H * K + i_hk * K + o_k, m_k, W, BW)
        if FUSE_NORM:
            o_f = tl.arange(0, BVF)
            m_f = o_f < V
            for i_g in range(G):
                i_r = i_b * HV + i_hk * G + i_g
                # .cg: read the other programs' stores from L2, never from a stale L1 line
                b_o = tl.load(o_raw + i_r * V + o_f, mask=m_f, other=0., cache_modifier=".cg").to(tl.float32)
                b_o = _gated_norm(b_o, m_f, o_f, z + i_b.to(tl.int64) * stride_z + (i_hk * G + i_g) * V,
                                  norm_weight, norm_eps, V, o.dtype.element_ty, PROD_IN_X_DTYPE)
                tl.store(o + i_r * V + o_f, b_o.to(o.dtype.element_ty), mask=m_f)


# Launch settings, as module flags so that `bench_gdn.py --variant` can time others (untimed ones are marked):
# - the split kernel runs while B x Hk < SPLIT_PROGRAMS_PER_SM x SMs (at 9B heads on an H200 the main kernel takes
#   over from B = 17); more programs in flight is one lever on the B = 256 step (70% of the copy rate, sixth
#   session), at the cost of recomputing q, k per value head and slice and of the arrival counters (untimed there);
# - SPLIT_BV value channels per split program (32);
# - STEP_WARPS for the main kernel (4; it was 4 up to a 64 x 64 state tile, else 8). On an H100 (2026-12-05,
#   `gpu_plan.sh 24`, output checked against the 8-warp run: 7e-6 at B = 256) 4 warps at 128 x 128 tiles took the
#   B = 256 step from 81.6% to 87.9% of the copy rate at 9B heads (0.454 -> 0.421 ms) and from 78.0% to 87.8% at 0.8B
#   (0.241 -> 0.214 ms), B = 32 from 71.9% to 74.4% and 63.0% to 67.4%; B = 1 (the split kernel) unchanged. An H200
#   had shown the same (70 -> 86%, 64 -> 82%; 16 warps lost everywhere);
# - STEP_PREFETCH: the main kernel loads a key head's next value-head state before it stores the current one (where
#   one block covers a head's values). At 9B heads the kernel holds one program of 8 warps per SM (168 registers),
#   which loads 64 KB, computes, stores, and only then loads the next head's 64 KB: the SM's loads stall in between.
#   Untimed.
SPLIT_PROGRAMS_PER_SM = 2
SPLIT_BV = 32
STEP_WARPS = 4
STEP_PREFETCH = False

_ARRIVALS: dict[torch.device, torch.Tensor] = {}


def _arrivals(device: torch.device, count: int) -> torch.Tensor:
    """The split kernel's per-(row, key head) counters: zeros, kept per device (each launch leaves them at zero).
    Launches on one device must not run concurrently on two streams; the engine's steps never do. The first call
    allocates (outside any CUDA-graph capture: the engine warms every batch size up eagerly before capturing)."""
    buffer = _ARRIVALS.get(device)
    if buffer is None or buffer.numel() < count:
        buffer = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
        _ARRIVALS[device] = buffer
    return buffer


def gdn_decode_step(
    qkv_raw: torch.Tensor,
    z: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    conv_weight: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    conv_state_pool: torch.Tensor,
    recurrent_state_pool: torch.Tensor,
    slot_ids: torch.Tensor,
    *,
    num_key_heads: int,
    key_head_dim: int,
    value_head_dim: int,
    scale: float | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
    split: bool | None = None,
) -> torch.Tensor:
    """One decode token for each of B sequences; returns o [B, Hv, dv] in qkv_raw's dtype.

    qkv_raw [B, C] = [q (Hk dk) | k (Hk dk) | v (Hv dv)] before the conv; a, b [B, Hv] raw gate inputs;
    conv_weight [C, W]; A_log, dt_bias [Hv]; conv_state_pool [P, C, W-1] (dtype of qkv_raw) and
    recurrent_state_pool [P, Hv, dk, dv] fp32 are updated in place at rows slot_ids [B] (int32, distinct;
    negative = padding row). With z [B, Hv, dv] (or [B, Hv*dv]) and norm_weight [dv], the GDN output norm
    gated_rms_norm(o, z, norm_weight, norm_eps) is fused and its result returned instead.
    `split` (default: when B x Hk programs would leave most SMs idle) spreads each head's value channels over
    several programs, still in one launch (the last program of each key head finishes it; see the kernel).
    """
    batch, channels = qkv_raw.shape
    key_dim = num_key_heads * key_head_dim
    num_value_heads = a.shape[-1]
    if channels != 2 * key_dim + num_value_heads * value_head_dim:
        raise ValueError(f"qkv_raw has {channels} channels, expected 2*{key_dim} + {num_value_heads}*{value_head_dim}")
    if num_value_heads % num_key_heads:
        raise ValueError(f"value heads ({num_value_heads}) must be a multiple of key heads ({num_key_heads})")
    if a.shape != (batch, num_value_heads) or b.shape != (batch, num_value_heads):
        raise ValueError(f"a and b must be [B, Hv] = {(batch, num_value_heads)}, got {tuple(a.shape)}, {tuple(b.shape)}")
    width = conv_weight.shape[-1]
    if conv_weight.shape != (channels, width) or width < 2:
        raise ValueError(f"conv_weight must be [C, W] with C = {channels}, W >= 2, got {tuple(conv_weight.shape)}")
    pool_size = conv_state_pool.shape[0]
    if conv_state_pool.shape != (pool_size, channels, width - 1) or not conv_state_pool.is_contiguous():
        raise ValueError(f"conv_state_pool must be a contiguous [P, {channels}, {width - 1}], got "
                         f"{tuple(conv_state_pool.shape)}")
    expected = (recurrent_state_pool.shape[0], num_value_heads, key_head_dim, value_head_dim)
    if tuple(recurrent_state_pool.shape) != expected or not recurrent_state_pool.is_contiguous():
        raise ValueError(f"recurrent_state_pool must be a contiguous {expected}, got {tuple(recurrent_state_pool.shape)}")
    if recurrent_state_pool.dtype != torch.float32:
        raise TypeError(f"recurrent_state_pool must be fp32, got {recurrent_state_pool.dtype}")
    if slot_ids.shape != (batch,) or slot_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_ids must be an int32 [B] = [{batch}], got {slot_ids.dtype} {tuple(slot_ids.shape)}")
    fuse_norm = z is not None
    if fuse_norm:
        if norm_weight is None or norm_weight.shape != (value_head_dim,):
            raise ValueError(f"fusing the output norm needs norm_weight [{value_head_dim}]")
        z = z.reshape(batch, num_value_heads * value_head_dim)
        if z.stride(-1) != 1:
            z = z.contiguous()

    if qkv_raw.stride(-1) != 1:
        qkv_raw = qkv_raw.contiguous()
    a, b = a.contiguous(), b.contiguous()
    conv_weight = conv_weight.contiguous()
    A_log, dt_bias = A_log.float().contiguous(), dt_bias.float().contiguous()
    scale = key_head_dim ** -0.5 if scale is None else float(scale)
    BV_full = next_power_of_2(value_head_dim)
    BV = BV_full if fuse_norm else min(BV_full, 64)
    o = torch.empty(batch, num_value_heads, value_head_dim, dtype=qkv_raw.dtype, device=qkv_raw.device)
    prod_in_x_dtype = not fuse_norm or torch.promote_types(norm_weight.dtype, qkv_raw.dtype) == qkv_raw.dtype
    BK, BW = next_power_of_2(key_head_dim), next_power_of_2(width - 1)
    pdl = pdl_enabled(o.device)
    if split is None:
        sms = torch.cuda.get_device_properties(qkv_raw.device).multi_processor_count if qkv_raw.is_cuda else 8
        split = batch * num_key_heads < SPLIT_PROGRAMS_PER_SM * sms
    if split:
        BV_split = min(BV_full, SPLIT_BV)
        num_slices = cdiv(value_head_dim, BV_split)
        o_raw = o if not fuse_norm else torch.empty_like(o)
        launch(gdn_decode_split_kernel, (batch, num_value_heads, num_slices),
            qkv_raw, z, a, b, conv_weight, A_log, dt_bias, norm_weight, conv_state_pool, recurrent_state_pool,
            slot_ids, o_raw, o, _arrivals(o.device, batch * num_key_heads), scale, norm_eps, qkv_raw.stride(0),
            z.stride(0) if fuse_norm else 0, H=num_key_heads, HV=num_value_heads, K=key_head_dim, V=value_head_dim,
            W=width, BK=BK, BV=BV_split, BVF=BV_full, BW=BW, NV=num_slices, PROD_IN_X_DTYPE=prod_in_x_dtype,
            FUSE_NORM=fuse_norm, USE_PDL=pdl, num_warps=4, launch_pdl=pdl)
        return o
    launch(gdn_decode_step_kernel, (batch, num_key_heads),
        qkv_raw, z, a, b, conv_weight, A_log, dt_bias, norm_weight, conv_state_pool, recurrent_state_pool, slot_ids,
        o, scale, norm_eps, qkv_raw.stride(0), z.stride(0) if fuse_norm else 0,
        H=num_key_heads, HV=num_value_heads, K=key_head_dim, V=value_head_dim, W=width,
        BK=BK, BV=BV, BW=BW, PROD_IN_X_DTYPE=prod_in_x_dtype, FUSE_NORM=fuse_norm, USE_PDL=pdl,
        PREFETCH=STEP_PREFETCH and BV >= value_head_dim,
        num_warps=STEP_WARPS, launch_pdl=pdl,
    )
    return o
