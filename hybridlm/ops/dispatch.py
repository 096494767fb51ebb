"""Pick the fast kernel or the plain-PyTorch reference, behind the references' own signatures.

The Triton kernels run on CUDA tensors; the references run everywhere else. The chunked gated delta rule has a
Triton backward (`chunk_gdn`), so it takes the kernels in training too; the other ops have no backward yet and
fall back to the (differentiable) references when a gradient is needed. HYBRIDLM_KERNELS=0 forces the
references. The path taken is logged once, loudly, so a slow fallback never goes unnoticed (other runtimes'
users suffer silent ones).
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from hybridlm.ops.conv import causal_conv1d as causal_conv1d_reference
from hybridlm.ops.delta_rule import chunk_gated_delta_rule, gdn_gates, recurrent_gated_delta_rule
from hybridlm.ops.norm import gated_rms_norm as gated_rms_norm_reference
from hybridlm.ops.norm import rms_norm as rms_norm_reference
from hybridlm.ops.paged_attention import paged_decode_attention_reference, write_kv_reference
from hybridlm.ops.rope import RopeInputs
from hybridlm.ops.rope import qk_rms_norm_rope as qk_rms_norm_rope_reference

logger = logging.getLogger(__name__)


@functools.cache
def kernels():
    """The Triton kernel module, or None (no triton, or disabled). Imported only once CUDA is in use, so a
    CPU process never loads Triton."""
    if os.environ.get("HYBRIDLM_KERNELS", "1") == "0":
        logger.warning("HYBRIDLM_KERNELS=0: Gated DeltaNet runs on the plain-PyTorch reference ops (slow)")
        return None
    try:
        from hybridlm.ops import triton as module
    except ImportError as error:
        logger.warning("Triton kernels unavailable (%s): CUDA runs the plain-PyTorch reference ops (slow)", error)
        return None
    logger.info("Gated DeltaNet layers run on hybridlm's Triton kernels")
    return module


def use_kernels(*tensors: torch.Tensor, differentiable: bool = False) -> bool:
    """Whether to run the Triton kernel; `differentiable` says the kernel has a backward of its own."""
    if not tensors[0].is_cuda:
        return False
    if not differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # training: the references are differentiable, these kernels not yet
    return kernels() is not None


@functools.cache
def _warn_untrusted_backward(reason: str) -> None:
    logger.warning("training runs the Gated DeltaNet on the plain-PyTorch reference (slow): the Triton backward "
                   "is not yet verified on a GPU for %s", reason)


def _backward_trusted(q: torch.Tensor, v: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Inference always takes the kernels; a backward only where it has been checked on a GPU."""
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, v, *others))):
        return True
    reason = kernels().backward_verified(q.dtype, q.shape[-1], v.shape[-1])
    if reason is not None:
        _warn_untrusted_backward(reason)
    return reason is None


@functools.cache
def _warn_head_dims_fault(reason: str) -> None:
    logger.warning("Gated DeltaNet runs on the plain-PyTorch reference (slow): the Triton kernels are not safe for %s",
                   reason)


def _head_dims_safe(q: torch.Tensor, v: torch.Tensor) -> bool:
    """False (and a warning, once per reason) where the GPU's Triton is known to miscompile these head dims."""
    reason = kernels().head_dims_fault(q.device, q.shape[-1], v.shape[-1])
    if reason is not None:
        _warn_head_dims_fault(reason)
    return reason is None


def causal_conv1d(x, weight, *, initial_state=None, output_final_state=False, cu_seqlens=None, activation="silu"):
    if use_kernels(x, weight):
        return kernels().causal_conv1d_fwd(x, weight, initial_state=initial_state, output_final_state=output_final_state,
                                           cu_seqlens=cu_seqlens, activation=activation)
    return causal_conv1d_reference(x, weight, initial_state=initial_state, output_final_state=output_final_state,
                                   cu_seqlens=cu_seqlens, activation=activation)


def gated_delta_rule(q, k, v, a, b, A_log, dt_bias, *, initial_state=None, output_final_state=False,
                     cu_seqlens=None, single_step=False):
    """The GDN core from raw gate inputs: q, k [B, T, Hk, dk], v [B, T, Hv, dv], a, b [B, T, Hv]. On CUDA the
    chunked kernels run with or without gradients (chunk_gdn is differentiable in every input and state)."""
    if not single_step and use_kernels(q, k, v, a, b, differentiable=True) and _head_dims_safe(q, v) and (
            _backward_trusted(q, v, k, a, b, A_log, dt_bias, initial_state)):
        return kernels().chunk_gdn(q, k, v, a, b, A_log, dt_bias, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    rule = recurrent_gated_delta_rule if single_step else chunk_gated_delta_rule
    return rule(q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens)


def rms_norm(x, weight, eps=1e-6, residual=None):
    """Zero-centred RMSNorm; with `residual`, of s = x + residual, returning (rms_norm(s), s)."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if use_kernels(*tensors):
        return kernels().rms_norm_fwd(x, weight, eps, residual=residual)
    if residual is None:
        return rms_norm_reference(x, weight, eps)
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed


# The decode GEMVs (`ops.triton.gemv`) take products of a few rows where they were measured to win
# (`gemv_preferred`); HYBRIDLM_GEMV=0 turns them off (the neighbour's own launch, then cuBLAS), for A/B runs.
FUSED_GEMV = os.environ.get("HYBRIDLM_GEMV", "1") != "0"
GEMV_MAX_ROWS = 2  # no GEMV wins above this (gemv_preferred)


def _fused_gemv(x, weight, kind: str, width: int | None = None) -> bool:
    """Whether a GEMV kernel takes x [..., K] @ weight.T: few rows (decode), kernels on, no gradient needed, and
    the kernel measured faster than the unfused path at this shape. `width`: the elements of one row of x, if not
    its last axis."""
    width = x.shape[-1] if width is None else width
    if not FUSED_GEMV or x.dtype != weight.dtype or x.numel() > GEMV_MAX_ROWS * width:
        return False
    return use_kernels(x, weight) and kernels().gemv_preferred(kind, x.numel() // width, *weight.shape)


def linear(x, weight):
    """x @ weight.T (a bias-free projection): the GEMV kernel at decode sizes where it wins, else F.linear."""
    if _fused_gemv(x, weight, "linear"):
        return kernels().linear_fwd(x, weight)
    return F.linear(x, weight)


def norm_linear(x, norm_weight, eps, weight, residual=None):
    """rms_norm(x) @ weight.T; with `residual`, of s = x + residual, returning (y, s). On CUDA at decode sizes one
    launch (the norm in the GEMV's prologue); otherwise the norm, then the GEMM."""
    if _fused_gemv(x, weight, "norm"):
        return kernels().rms_norm_linear_fwd(x, norm_weight, eps, weight, residual)
    if residual is None:
        return F.linear(rms_norm(x, norm_weight, eps), weight)
    normed, summed = rms_norm(x, norm_weight, eps, residual=residual)
    return F.linear(normed, weight), summed


def silu_mul_linear(gate_up, weight):
    """(silu(gate) * up) @ weight.T for gate_up [..., 2I] (the gate columns, then the up columns)."""
    if _fused_gemv(gate_up, weight, "silu"):
        return kernels().silu_mul_linear_fwd(gate_up, weight)
    return F.linear(silu_mul(*gate_up.chunk(2, dim=-1)), weight)


def qk_rms_norm_rope(q, q_weight, k, k_weight, rope: RopeInputs, eps=1e-6):
    """q [B, T, Hq, D] and k [B, T, Hk, D]: RMSNorm per head, each with its weight, then partial RoPE at
    `rope.positions`; returns (q, k). On CUDA one launch that computes the angles itself; the reference builds cos
    and sin once per forward (`rope.cos_sin()`)."""
    if use_kernels(q, q_weight, k, k_weight):
        return kernels().qk_rms_norm_rope_fwd(q, q_weight, k, k_weight, rope, eps)
    return qk_rms_norm_rope_reference(q, q_weight, k, k_weight, rope, eps)


def silu_mul(gate, up):
    """SwiGLU's silu(gate) * up."""
    if use_kernels(gate, up):
        return kernels().silu_mul_fwd(gate, up)
    return F.silu(gate) * up


def sigmoid_gate(o, gate):
    """The attention's output gate: o [B, T, H, D] * sigmoid(gate [B, T, H, D]) -> [B, T, H * D]."""
    if use_kernels(o, gate):
        return kernels().sigmoid_gate_fwd(o, gate)
    batch, length = o.shape[:2]
    return o.reshape(batch, length, -1) * torch.sigmoid(gate.reshape(batch, length, -1))


def sigmoid_gate_linear(o, gate, weight):
    """The attention's output gate and o_proj: (o * sigmoid(gate)) @ weight.T for o, gate [B, T, H, D]. At decode sizes
    where the GEMV wins, one launch (the gate in its prologue); otherwise the gate's launch, then `linear`."""
    if gate.dtype == o.dtype and _fused_gemv(o, weight, "gate", width=weight.shape[-1]):
        return kernels().sigmoid_gate_linear_fwd(o, gate, weight)
    return linear(sigmoid_gate(o, gate), weight)


def gated_rms_norm(x, gate, weight, eps=1e-6):
    if use_kernels(x, gate, weight):
        return kernels().gated_rms_norm_fwd(x, gate, weight, eps)
    return gated_rms_norm_reference(x, gate, weight, eps)


def write_kv(key_pool, value_pool, k, v, slot_mapping):
    """k, v [N, Hkv, D] into the paged pools at flat token slots (see `hybridlm.ops.paged_attention`)."""
    if use_kernels(k, key_pool) and key_pool.is_contiguous() and value_pool.is_contiguous():
        return kernels().write_kv_fwd(key_pool, value_pool, k, v, slot_mapping)
    return write_kv_reference(key_pool, value_pool, k, v, slot_mapping)


def paged_decode_attention(q, key_pool, value_pool, block_tables, rows, context_lens, scale):
    """One query token per sequence over the paged KV pools (see `hybridlm.ops.paged_attention`)."""
    if use_kernels(q, key_pool) and key_pool.shape[1] >= 16 and key_pool.shape[1] & (key_pool.shape[1] - 1) == 0:
        return kernels().paged_decode_attention_fwd(q, key_pool, value_pool, block_tables, rows, context_lens, scale)
    return paged_decode_attention_reference(q, key_pool, value_pool, block_tables, rows, context_lens, scale)
