"""The gated delta rule: plain PyTorch references (the documentation of the math).

Per value head the state S is a [dk, dv] matrix (fp32). For each token t:
    S <- exp(g_t) * S                                  (gated forgetting, g_t <= 0)
    S <- S + k_t (beta_t * (v_t - S^T k_t))^T          (delta-rule write: correct what S predicts for k_t)
    o_t = S^T q_t                                      (read after the write)
q and k are L2-normalised, q is scaled by 1/sqrt(dk). Each key head serves Hv/Hk consecutive value heads.

`recurrent_gated_delta_rule` runs this token by token (decode). `chunk_gated_delta_rule` computes the same in
chunks of 64 with the WY representation (prefill, training); both must agree to float64 round-off.
Layout: q, k [B, T, Hk, dk]; v [B, T, Hv, dv]; g, beta [B, T, Hv]; states [N, Hv, dk, dv] with N = B, or the
number of sequences when `cu_seqlens` packs several into B = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridlm.ops.varlen import host_bounds


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last axis (the form fla and transformers use)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _decay_exp(x: torch.Tensor) -> torch.Tensor:
    """exp of a log decay, exactly 0 below e^-80 instead of an fp32 denormal (< 1.2e-38 from e^-87 down): x86
    computes on denormals in microcode, ~100x slower, and strong gates put most of a chunk's decay matrix there.
    The dropped terms are < 2e-35 relative, far below any dtype's rounding."""
    return x.masked_fill(x < -80.0, float("-inf")).exp()


def gdn_gates(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log decay g = -exp(A_log) * softplus(a + dt_bias) and write strength beta = sigmoid(b), in fp32.

    fp32 matters: decays near 1 (g near 0) round to exactly 1.0 in bf16 and the state never forgets.
    """
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())  # [B, T, Hv]
    beta = torch.sigmoid(b.float())  # [B, T, Hv]
    return g, beta


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    """Head-major fp32 (or fp64) copies with q/k normalised, scaled and repeated to the value heads."""
    compute_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    num_key_heads, num_value_heads = q.shape[2], v.shape[2]
    if num_value_heads % num_key_heads:
        raise ValueError(f"value heads ({num_value_heads}) must be a multiple of key heads ({num_key_heads})")
    q, k = q.to(compute_dtype), k.to(compute_dtype)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q * scale
    group = num_value_heads // num_key_heads
    if group > 1:
        q = q.repeat_interleave(group, dim=2)
        k = k.repeat_interleave(group, dim=2)
    # -> [B, H, T, d]
    q, k, v = (x.transpose(1, 2).to(compute_dtype) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).to(compute_dtype) for x in (g, beta))  # [B, H, T]
    return q, k, v, g, beta


def _check_shapes(q, k, v, g, beta, initial_state, cu_seqlens):
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"expected q, k [B, T, Hk, dk] and v [B, T, Hv, dv], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if g.shape != v.shape[:3] or beta.shape != v.shape[:3]:
        raise ValueError(f"g and beta must be [B, T, Hv] = {tuple(v.shape[:3])}, got {tuple(g.shape)}, {tuple(beta.shape)}")
    num_states = v.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
    if cu_seqlens is not None:
        if v.shape[0] != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {v.shape[0]}")
        bounds = host_bounds(cu_seqlens)
        if bounds[0] != 0 or bounds[-1] != v.shape[1]:
            raise ValueError(f"cu_seqlens must run from 0 to T={v.shape[1]}, got {bounds}")
    expected = (num_states, v.shape[2], q.shape[3], v.shape[3])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(f"initial_state must be {expected}, got {tuple(initial_state.shape)}")


def packed_to_padded(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(row, column) of every packed token in a right-padded [N, T_max] batch, and T_max."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)
    cols = torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - cu_seqlens[rows]
    return rows, cols, int(lengths.max())


def _split_packed(fn, q, k, v, g, beta, initial_state, cu_seqlens, **kwargs):
    """Run `fn` on the packed sequences laid out as right-padded batches [n, T_max].

    Sequences go in groups of similar length (1, 2, 3-4, 5-8, ... tokens): one-token decode rows packed beside
    a long prompt would otherwise each be padded to its length. Padding has k = v = 0, beta = 0 and g = 0: it
    neither writes to nor decays the state, so every real token's output and every final state equal those of
    the sequence run alone.
    """
    cu_seqlens = cu_seqlens.to(v.device)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    groups: dict[int, list[int]] = {}
    empty = []  # sequences of no tokens (a fixed-size table's unused rows): their state passes unchanged
    for index, length in enumerate(lengths.tolist()):
        (empty if length == 0 else groups.setdefault((length - 1).bit_length(), [])).append(index)
    o, final = torch.empty_like(v), None
    for members in groups.values():
        members = torch.tensor(members, device=v.device)
        member_lengths = lengths[members]
        member_cu = F.pad(member_lengths.cumsum(0), (1, 0))
        rows, cols, longest = packed_to_padded(member_cu)
        tokens = cu_seqlens[members][rows] + cols  # packed index of each of the group's tokens

        def pad(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(len(members), longest, *x.shape[2:])
            out[rows, cols] = x[0, tokens]
            return out

        state = None if initial_state is None else initial_state[members]
        o_group, s_group = fn(pad(q), pad(k), pad(v), pad(g), pad(beta), initial_state=state,
                              output_final_state=True, **kwargs)
        o[0, tokens] = o_group[rows, cols]
        if final is None:
            final = s_group.new_empty(len(lengths), *s_group.shape[1:])
        final[members] = s_group
    if empty:
        shape = (len(lengths), v.shape[2], q.shape[3], v.shape[3])
        if final is None:
            final = (initial_state.new_empty(shape) if initial_state is not None
                     else v.new_empty(shape, dtype=torch.promote_types(v.dtype, torch.float32)))
        members = torch.tensor(empty, device=v.device)
        final[members] = (initial_state[members].to(final.dtype) if initial_state is not None
                          else final.new_zeros(len(empty), *shape[1:]))
    return o, final


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule. Returns o [B, T, Hv, dv] (dtype of v) and the final state (fp32)."""
    _check_shapes(q, k, v, g, beta, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        o, s = _split_packed(recurrent_gated_delta_rule, q, k, v, g, beta, initial_state, cu_seqlens,
                             scale=scale, use_qk_l2norm=use_qk_l2norm)
        return o, s if output_final_state else None
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    batch, heads, length, dk = k.shape
    dv = v.shape[-1]
    state = torch.zeros(batch, heads, dk, dv, dtype=q.dtype, device=q.device)  # [B, H, dk, dv]
    if initial_state is not None:
        state = initial_state.to(q.dtype).clone()
    o = torch.empty(batch, heads, length, dv, dtype=q.dtype, device=q.device)
    for t in range(length):
        state = state * _decay_exp(g[:, :, t])[..., None, None]
        prediction = torch.einsum("bhkv,bhk->bhv", state, k[:, :, t])
        delta = beta[:, :, t, None] * (v[:, :, t] - prediction)  # [B, H, dv]
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        o[:, :, t] = torch.einsum("bhkv,bhk->bhv", state, q[:, :, t])
    final = state.float() if state.dtype != torch.float64 else state
    return o.transpose(1, 2).to(out_dtype), final if output_final_state else None


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (WY) gated delta rule, same contract as `recurrent_gated_delta_rule`.

    Inside a chunk with cumulative log decay G_i (so token j's contribution reaches token i scaled by
    D_ij = exp(G_i - G_j)), the T sequential rank-1 updates collapse into one triangular solve:
        (I + L) U = beta*v,   (I + L) W = beta*k*exp(G),   L = strictly-lower(beta*k k^T * D)
    with S0 the state entering the chunk, the corrected values are V' = U - W S0, and
        o = (q*exp(G)) S0 + tril(q k^T * D) V',     S_next = exp(G_C) S0 + (k*exp(G_C - G))^T V'.
    """
    _check_shapes(q, k, v, g, beta, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        o, s = _split_packed(chunk_gated_delta_rule, q, k, v, g, beta, initial_state, cu_seqlens,
                             scale=scale, use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size)
        return o, s if output_final_state else None
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    batch, heads, length, dk = k.shape
    dv = v.shape[-1]
    pad = (-length) % chunk_size
    if pad:  # zero k, v, g on padding leave the state untouched; their outputs are cut below
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    num_chunks = (length + pad) // chunk_size
    # [B, H, N, C, d] and [B, H, N, C]
    q, k, v = (x.reshape(batch, heads, num_chunks, chunk_size, -1) for x in (q, k, v))
    g, beta = (x.reshape(batch, heads, num_chunks, chunk_size) for x in (g, beta))

    G = g.cumsum(dim=-1)  # [B, H, N, C]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # D_ij = exp(G_i - G_j) for j <= i; masked before exp so no inf*0 appears
    decay = _decay_exp((G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")))  # [B, H, N, C, C]
    k_beta = k * beta[..., None]
    lower = (k_beta @ k.transpose(-1, -2) * decay).tril(-1)
    eye = torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    system = eye + lower
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * _decay_exp(G)[..., None], upper=False, unitriangular=True)
    attn = q @ k.transpose(-1, -2) * decay  # [B, H, N, C, C], lower triangle incl. diagonal
    q_decayed = q * _decay_exp(G)[..., None]
    k_to_end = k * _decay_exp(G[..., -1:] - G)[..., None]
    chunk_decay = _decay_exp(G[..., -1])  # [B, H, N]

    state = torch.zeros(batch, heads, dk, dv, dtype=q.dtype, device=q.device)
    if initial_state is not None:
        state = initial_state.to(q.dtype).clone()
    o = torch.empty_like(v)
    for n in range(num_chunks):
        v_new = u[:, :, n] - w[:, :, n] @ state  # [B, H, C, dv]
        o[:, :, n] = q_decayed[:, :, n] @ state + attn[:, :, n] @ v_new
        state = state * chunk_decay[:, :, n, None, None] + k_to_end[:, :, n].transpose(-1, -2) @ v_new
    o = o.reshape(batch, heads, num_chunks * chunk_size, dv)[:, :, :length]
    final = state.float() if state.dtype != torch.float64 else state
    return o.transpose(1, 2).to(out_dtype), final if output_final_state else None
