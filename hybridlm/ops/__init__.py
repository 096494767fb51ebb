"""The math of the hybrid, as plain PyTorch references; fast kernels plug in behind the same signatures."""
from hybridlm.ops.attention import attention, attention_mask, attention_reference
from hybridlm.ops.conv import causal_conv1d
from hybridlm.ops.delta_rule import chunk_gated_delta_rule, gdn_gates, l2norm, recurrent_gated_delta_rule
from hybridlm.ops.norm import gated_rms_norm, rms_norm
from hybridlm.ops.rope import apply_partial_rope, rms_norm_rope, rope_cos_sin, rope_inv_freq

__all__ = [
    "attention", "attention_mask", "attention_reference", "causal_conv1d", "chunk_gated_delta_rule", "gdn_gates",
    "l2norm", "recurrent_gated_delta_rule", "gated_rms_norm", "rms_norm", "apply_partial_rope", "rope_cos_sin",
    "rope_inv_freq",
]
