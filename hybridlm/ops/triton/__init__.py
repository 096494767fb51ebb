"""Triton kernels behind the plain-PyTorch references of `hybridlm.ops` (each file's docstring names its twin).

Importing this package needs triton; callers that may run without it import it inside a try block.
"""
from hybridlm.ops.triton.conv import causal_conv1d_fwd
from hybridlm.ops.triton.gdn_chunk import chunk_gdn_fwd
from hybridlm.ops.triton.gdn_chunk_bwd import (backward_verified, chunk_gdn, chunk_gdn_bwd, forward_states_kept,
                                               head_dims_fault)
from hybridlm.ops.triton.gdn_step import gdn_decode_step
from hybridlm.ops.triton.gemv import (gemv_preferred, linear_fwd, rms_norm_linear_fwd, sigmoid_gate_linear_fwd,
                                      silu_mul_linear_fwd)
from hybridlm.ops.triton.norm import gated_rms_norm_fwd, rms_norm_fwd, sigmoid_gate_fwd, silu_mul_fwd
from hybridlm.ops.triton.paged_attention import paged_decode_attention_fwd, write_kv_fwd
from hybridlm.ops.triton.paged_prefill import paged_prefill_attention_fwd
from hybridlm.ops.triton.rope import qk_rms_norm_rope_fwd, rms_norm_rope_fwd

__all__ = ["backward_verified", "causal_conv1d_fwd", "chunk_gdn", "chunk_gdn_bwd", "chunk_gdn_fwd",
           "forward_states_kept", "gated_rms_norm_fwd", "gdn_decode_step", "gemv_preferred", "head_dims_fault",
           "linear_fwd", "paged_decode_attention_fwd", "paged_prefill_attention_fwd", "qk_rms_norm_rope_fwd",
           "rms_norm_fwd", "rms_norm_linear_fwd", "rms_norm_rope_fwd", "sigmoid_gate_fwd", "sigmoid_gate_linear_fwd",
           "silu_mul_fwd", "silu_mul_linear_fwd", "write_kv_fwd"]
