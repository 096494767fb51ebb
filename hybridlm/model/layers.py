"""The blocks of a Qwen3.5 / Qwen3-Next hybrid. Parameter names match the checkpoints' keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.model.context import ForwardContext
from hybridlm.ops import dispatch
from hybridlm.ops.dispatch import (causal_conv1d, gated_delta_rule, gated_rms_norm, norm_linear, qk_rms_norm_rope,
                                   rms_norm, sigmoid_gate, silu_mul, silu_mul_linear)
from hybridlm.ops.rope import RopeInputs


def project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) for an output projection; a plain bias-free nn.Linear goes through `dispatch.linear` (a GEMV
    kernel at decode sizes where enabled)."""
    if type(layer) is nn.Linear and layer.bias is None:
        return dispatch.linear(x, layer.weight)
    return layer(x)


def project_gated(layer: nn.Module, o: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """layer(o * sigmoid(gate)) for the attention's output o and gate [B, T, H, D]; a plain bias-free nn.Linear goes
    through `dispatch.sigmoid_gate_linear` (at decode sizes, where enabled, the gate in the GEMV's prologue)."""
    if type(layer) is nn.Linear and layer.bias is None:
        return dispatch.sigmoid_gate_linear(o, gate, layer.weight)
    return layer(sigmoid_gate(o, gate))


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: the weight is stored as w and applied as (1 + w)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(x + residual), x + residual) in one fused launch on CUDA."""
        return rms_norm(x, self.weight, self.eps, residual=residual)


class GatedRMSNorm(nn.Module):
    """The GDN output norm: plain weight (init 1), gated by silu(z)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)


class FusedLinears:
    """Bias-free nn.Linear layers of one input computed by one GEMM at inference.

    `fuse()` makes their weights row slices of one new tensor: parameter names, loading and saving are unchanged and
    no memory is duplicated. Call it once the model sits on its device in its dtype (a later `.to()` gives every
    weight its own storage again; `__call__` notices and goes back to one GEMM each). Gradients flow only through
    the separate GEMMs, which are taken whenever they are needed. Fewer launches matter at decode, where each small
    GEMM costs its launch more than its bytes.
    """

    def __init__(self, *linears: nn.Linear) -> None:
        self.linears = linears
        self.weight: torch.Tensor | None = None
        self._pointers: list[int] = []  # where each weight must start for the fused GEMM to be theirs

    def fuse(self) -> bool:
        """Returns False (nothing changed) when a projection is not a plain bias-free nn.Linear."""
        if self.weight is not None:
            return True
        if any(type(p) is not nn.Linear or p.bias is not None for p in self.linears):
            return False
        with torch.no_grad():
            fused = torch.cat([p.weight for p in self.linears])
            offset = 0
            for p in self.linears:
                rows = p.weight.shape[0]
                p.weight.data = fused[offset : offset + rows]
                offset += rows
        self.weight = fused
        self._pointers = [p.weight.data_ptr() for p in self.linears]
        return True

    def inference_weight(self) -> torch.Tensor | None:
        """The fused weight [sum of N, H] if one GEMM may serve every projection now: fused, still shared, and no
        gradient wanted; else None."""
        weights = [p.weight for p in self.linears]
        if (self.weight is None or any(w.data_ptr() != at or w.dtype != self.weight.dtype
                                       for w, at in zip(weights, self._pointers))
                or (torch.is_grad_enabled() and any(w.requires_grad for w in weights))):
            return None
        return self.weight

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The fused GEMM's output [..., sum of N] as each projection's (strided views)."""
        return y.split([p.weight.shape[0] for p in self.linears], dim=-1)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each projection of x [..., H]: strided slices of one GEMM's output once fused."""
        fused = self.inference_weight()
        if fused is None:
            return tuple(p(x) for p in self.linears)
        return self.split(F.linear(x, fused))


class GatedDeltaNet(nn.Module):
    """Linear attention with a delta-rule memory: projections -> short causal conv -> gated delta rule ->
    gated RMSNorm -> out_proj."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_key_heads = config.linear_num_key_heads
        self.num_value_heads = config.linear_num_value_heads
        self.key_head_dim = config.linear_key_head_dim
        self.value_head_dim = config.linear_value_head_dim
        hidden, key_dim, value_dim = config.hidden_size, config.linear_key_dim, config.linear_value_dim
        self.in_proj_qkv = nn.Linear(hidden, 2 * key_dim + value_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, self.num_value_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, self.num_value_heads, bias=False)
        self.conv1d = nn.Conv1d(config.conv_dim, config.conv_dim, config.linear_conv_kernel_dim,
                                groups=config.conv_dim, bias=False)
        # Decay parameters stay fp32 whatever the model dtype (see ops.delta_rule.gdn_gates).
        self.A_log = nn.Parameter(torch.empty(self.num_value_heads).uniform_(0.01, 16).log_())
        self.dt_bias = nn.Parameter(torch.ones(self.num_value_heads))
        self.norm = GatedRMSNorm(self.value_head_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(value_dim, hidden, bias=False)
        self._inputs = FusedLinears(self.in_proj_qkv, self.in_proj_z, self.in_proj_a, self.in_proj_b)

    def forward(self, x: torch.Tensor, context: ForwardContext,
                projected: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """x [B, T, H] (normalised); or, when the caller made the input projections (qkv, z, a, b) itself,
        `projected`, and x only gives the shape."""
        batch, length, _ = x.shape
        pools = context.decode_pools(self.layer_idx)
        if pools is not None and dispatch.use_kernels(x):
            return self._fused_decode(x, *pools, projected)
        conv_state, recurrent_state = context.gdn_states(self.layer_idx)
        keep, cu_seqlens, padding = context.keeps_state, context.cu_seqlens, context.padding
        qkv, z, a, b = self._inputs(x) if projected is None else projected
        conv_input = qkv
        if padding is not None:  # right padding of a fixed-length prefill: gates of -inf pass the state unchanged
            a, b = (t.masked_fill(padding, float("-inf")) for t in (a, b))
        qkv, final_conv = causal_conv1d(qkv, self.conv1d.weight[:, 0], initial_state=conv_state,
                                        output_final_state=keep and padding is None, cu_seqlens=cu_seqlens)
        if keep:  # the last K-1 real inputs, which a padded row must not displace
            conv_state = final_conv if padding is None else context.last_conv_inputs(conv_input, conv_state)
        key_dim = self.num_key_heads * self.key_head_dim
        q, k, v = qkv.split([key_dim, key_dim, self.num_value_heads * self.value_head_dim], dim=-1)
        q = q.reshape(batch, length, self.num_key_heads, self.key_head_dim)
        k = k.reshape(batch, length, self.num_key_heads, self.key_head_dim)
        v = v.reshape(batch, length, self.num_value_heads, self.value_head_dim)
        # The step form for single-token decode, the chunked form for everything else (as transformers does).
        o, recurrent_state = gated_delta_rule(q, k, v, a, b, self.A_log,
                                              self.dt_bias, initial_state=recurrent_state, output_final_state=keep,
                                              cu_seqlens=cu_seqlens, single_step=context.single_token_decode)
        if keep:
            context.store_gdn_states(self.layer_idx, conv_state, recurrent_state)
        z = z.reshape(batch, length, self.num_value_heads, self.value_head_dim)
        o = self.norm(o, z)  # [B, T, Hv, dv]
        return project(self.out_proj, o.reshape(batch, length, -1))

    def _fused_decode(self, x: torch.Tensor, conv_pool: torch.Tensor, state_pool: torch.Tensor,
                      slots: torch.Tensor, projected: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """One token per row [B, 1, H], states in pools at `slots`: conv shift, conv, SiLU, norms, gates,
        delta rule, gated norm in one kernel launch; the pools are updated in place."""
        batch = x.shape[0]
        if projected is None:
            qkv, z, a, b = self._inputs(x[:, 0])
        else:
            qkv, z, a, b = (t.reshape(batch, t.shape[-1]) for t in projected)
        o = dispatch.kernels().gdn_decode_step(
            qkv, z.view(batch, self.num_value_heads, self.value_head_dim), a, b, self.conv1d.weight[:, 0],
            self.A_log, self.dt_bias,
            conv_pool, state_pool, slots, num_key_heads=self.num_key_heads, key_head_dim=self.key_head_dim,
            value_head_dim=self.value_head_dim, norm_weight=self.norm.weight, norm_eps=self.norm.eps,
        )  # [B, Hv, dv]
        return project(self.out_proj, o.reshape(batch, 1, -1))


class GatedAttention(nn.Module):
    """GQA softmax attention with per-head q/k RMSNorm, partial RoPE and a sigmoid output gate."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        # q_proj output is per head [query_h | gate_h], not all queries then all gates.
        self.q_proj = nn.Linear(hidden, 2 * self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self._inputs = FusedLinears(self.q_proj, self.k_proj, self.v_proj)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeInputs,
        context: ForwardContext,
        projected: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """x [B, T, H] (normalised), or only its shape when `projected` holds the q, k, v projections."""
        batch, length, _ = x.shape
        query, k, v = self._inputs(x) if projected is None else projected
        query, gate = query.view(batch, length, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)
        # per-head norms and partial RoPE of q and k: one launch on CUDA (both norms use config.rms_norm_eps)
        q, k = qk_rms_norm_rope(query, self.q_norm.weight, k, self.k_norm.weight, rope, self.q_norm.eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, Hq, T, D], [B, Hkv, T, D]
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        o = context.attend(self.layer_idx, q, k, v, scale=self.head_dim**-0.5)  # [B, Hq, T, D]
        # o * sigmoid(gate), then o_proj: on CUDA the gate's launch, or at decode sizes the GEMV's prologue
        return project_gated(self.o_proj, o.transpose(1, 2), gate)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self._inputs = FusedLinears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(*self._inputs(x)))


class Experts(nn.Module):
    """All routed experts as fused tensors: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden).normal_(std=0.02))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate).normal_(std=0.02))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; expert_ids, weights [N, k] -> sum_k weight * expert(x), [N, H]."""
        out = torch.zeros_like(x)
        for expert in expert_ids.unique().tolist():
            token, slot = torch.where(expert_ids == expert)
            gate, up = F.linear(x[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[expert]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class SparseMoE(nn.Module):
    """Softmax router over E experts, top-k (renormalised when norm_topk_prob), plus a sigmoid-gated
    shared expert."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(hidden, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, hidden, config.moe_intermediate_size)
        self.shared_expert = MLP(hidden, config.shared_expert_intermediate_size) if config.shared_expert_intermediate_size else None
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if self.shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, H]
        router_logits = self.gate(x)
        probs = router_logits.float().softmax(dim=-1)
        weights, expert_ids = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, expert_ids, weights.to(x.dtype))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)) (that last add is left to the next norm)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_linear = config.layer_types[layer_idx] == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = GatedAttention(config, layer_idx)
        if config.mlp_types[layer_idx] == "moe":
            self.mlp = SparseMoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeInputs,
        context: ForwardContext,
        pending: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream; `pending`: the previous layer's MLP output, not yet added to it. Returns the
        stream and this layer's MLP output: each residual add happens inside the next norm (one launch on CUDA).

        With fused input projections (`FusedLinears`), each norm feeds its GEMM through `norm_linear`: at decode
        sizes on CUDA the norm runs in the GEMV's prologue and SwiGLU in the down projection's, one launch each."""
        mixer = self.linear_attn if self.is_linear else self.self_attn
        fused = mixer._inputs.inference_weight() if context.pad_mask is None else None
        projected = None
        if fused is not None:
            norm = self.input_layernorm
            if pending is None:
                y = norm_linear(x, norm.weight, norm.eps, fused)
            else:
                y, x = norm_linear(pending, norm.weight, norm.eps, fused, residual=x)
            h, projected = x, mixer._inputs.split(y)  # the mixer takes only the shape from h
        elif pending is None:
            h = self.input_layernorm(x)
        else:
            h, x = self.input_layernorm(pending, residual=x)
        if self.is_linear:
            if context.pad_mask is not None:
                # Padding must not touch the recurrent state: zero inputs keep a zero state at zero and
                # look like the conv's own zero padding (left padding only).
                h = torch.where(context.pad_mask[..., None], h, torch.zeros((), dtype=h.dtype, device=h.device))
            h = self.linear_attn(h, context, projected)
        else:
            h = self.self_attn(h, rope, context, projected)
        fused = self.mlp._inputs.inference_weight() if isinstance(self.mlp, MLP) else None
        if fused is not None:
            norm = self.post_attention_layernorm
            gate_up, x = norm_linear(h, norm.weight, norm.eps, fused, residual=x)
            return x, silu_mul_linear(gate_up, self.mlp.down_proj.weight)
        h, x = self.post_attention_layernorm(h, residual=x)  # x + h and its norm in one pass
        return x, self.mlp(h)
