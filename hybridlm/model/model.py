"""HybridLM: embeddings, a stack of Gated DeltaNet / gated attention decoder layers, final norm, LM head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.model.cache import HybridCache
from hybridlm.model.layers import DecoderLayer, FusedLinears, RMSNorm
from hybridlm.model.context import ForwardContext
from hybridlm.ops import rope_inv_freq
from hybridlm.ops.dispatch import norm_linear
from hybridlm.ops.rope import RopeInputs


@dataclass(frozen=True)
class CacheLayout:
    """What the model asks the cache to hold; engines size their pools from this alone.

    Per sequence: conv + recurrent state in every GDN layer (fixed size); per token: K and V in every
    attention layer.
    """

    recurrent_layers: tuple[int, ...]
    attention_layers: tuple[int, ...]
    conv_state_shape: tuple[int, int]  # [C, K-1]
    recurrent_state_shape: tuple[int, int, int]  # [Hv, dk, dv], always fp32
    kv_shape_per_token: tuple[int, int]  # [Hkv, D] for each of K and V

    def state_bytes_per_sequence(self, dtype: torch.dtype) -> int:
        conv = self.conv_state_shape[0] * self.conv_state_shape[1] * _itemsize(dtype)
        recurrent = 4 * self.recurrent_state_shape[0] * self.recurrent_state_shape[1] * self.recurrent_state_shape[2]
        return len(self.recurrent_layers) * (conv + recurrent)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return len(self.attention_layers) * 2 * self.kv_shape_per_token[0] * self.kv_shape_per_token[1] * _itemsize(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Plain CPU attribute, not a buffer: models are built on the meta device and filled from checkpoints.
        self._inv_freq, self._rope_scaling = rope_inv_freq(
            config.rotary_dim, config.rope_theta, config.rope_type, config.rope_parameters
        )

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """The RoPE frequencies on `device`, copied once (a copy per forward would also break CUDA-graph capture)."""
        if self._inv_freq.device != device:
            cached = getattr(self, "_inv_freq_device", None)
            if cached is None or cached.device != device:
                self._inv_freq_device = self._inv_freq.to(device)
            return self._inv_freq_device
        return self._inv_freq

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def cache_layout(self) -> CacheLayout:
        c = self.config
        return CacheLayout(
            recurrent_layers=tuple(i for i, t in enumerate(c.layer_types) if t == "linear_attention"),
            attention_layers=tuple(i for i, t in enumerate(c.layer_types) if t == "full_attention"),
            conv_state_shape=(c.conv_dim, c.linear_conv_kernel_dim - 1),
            recurrent_state_shape=(c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim),
            kv_shape_per_token=(c.num_key_value_heads, c.head_dim),
        )

    def new_cache(self, batch_size: int) -> HybridCache:
        return HybridCache(batch_size=batch_size, device=self.device)

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.LongTensor,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        cu_seqlens: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (the last `logits_to_keep` positions when > 0).

        `attention_mask` [B, T] marks real tokens (1) and left padding (0) of this chunk. With a cache, the
        chunk continues where the cache ends; positions count real tokens only. `cu_seqlens` [N+1] packs N
        documents into one row (B = 1, no cache): positions restart, attention and recurrent state never
        cross a document boundary (training on packed rows).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        if length == 0:
            raise ValueError("input_ids is empty (0 tokens)")
        device = self.embed_tokens.weight.device  # inputs built on the CPU follow the model (as a user expects)
        input_ids = input_ids.to(device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        vocab = self.config.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}), got min {int(input_ids.min())}, max {int(input_ids.max())}")
        context = ForwardContext(input_ids, cache=cache, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
        return self.forward_with_context(input_ids, context, logits_to_keep)

    def forward_with_context(
        self,
        input_ids: torch.LongTensor,
        context: ForwardContext,
        logits_to_keep: int = 0,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The forward pass proper; `context` says where positions, states and earlier keys come from.

        `logits_indices` [N] (flat token indices into [B * T]) returns logits [N, vocab] for those tokens only.
        """
        x = self.embed_tokens(input_ids)  # [B, T, H]
        # the attention layers' q/k kernel computes cos and sin from these; the reference builds them once
        rope = RopeInputs(context.positions, self._inv_freq_on(x.device), self._rope_scaling, x.dtype)
        pending = None  # the last MLP output, added to x inside the next norm
        for layer in self.layers:
            x, pending = layer(x, rope, context, pending)
        context.finish()

        def kept(t: torch.Tensor) -> torch.Tensor:  # the tokens whose logits are wanted
            if logits_indices is not None:
                return t.reshape(-1, t.shape[-1]).index_select(0, logits_indices)
            return t[:, -logits_to_keep:] if logits_to_keep else t

        x = kept(x)
        if pending is None:
            return torch.nn.functional.linear(self.norm(x), self.output_weight())
        # the last residual add, the final norm and the LM head: one launch at decode sizes on CUDA
        return norm_linear(kept(pending), self.norm.weight, self.norm.eps, self.output_weight(), residual=x)[0]

    def fuse_input_projections(self) -> int:
        """Inference: one GEMM for each block's input projections (`FusedLinears`): a GDN layer's in_proj_qkv, z,
        a and b, an attention layer's q, k and v, an MLP's gate and up. Returns how many groups were fused."""
        groups = [m._inputs for m in self.modules() if isinstance(getattr(m, "_inputs", None), FusedLinears)]
        return sum(group.fuse() for group in groups)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Fresh random weights as the reference initialises them (for training from scratch)."""
        generator = torch.Generator(device="cpu")
        if seed is not None:
            generator.manual_seed(seed)
        for name, param in self.named_parameters():
            leaf = name.rsplit(".", 2)
            if name.endswith("A_log"):
                values = torch.empty(param.shape).uniform_(0.01, 16, generator=generator).log_()
            elif name.endswith("dt_bias") or name.endswith("linear_attn.norm.weight"):
                values = torch.ones(param.shape)
            elif leaf[-2:] and (leaf[-2].endswith("norm") or leaf[-2] in ("q_norm", "k_norm")) and param.ndim == 1:
                values = torch.zeros(param.shape)  # zero-centred norms: 1 + w starts at 1
            else:
                values = torch.empty(param.shape).normal_(0.0, std, generator=generator)
            param.copy_(values.to(param.dtype))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


