"""HybridLM: embeddings, a stack of Gated DeltaNet / gated attention decoder layers, final norm, LM head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.model.cache import HybridCache
from hybridlm.model.layers import DecoderLayer, RMSNorm
from hybridlm.ops import attention_mask as build_attention_mask
from hybridlm.ops import rope_cos_sin, rope_inv_freq


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
        if cache is not None and cache.batch_size != batch:
            raise ValueError(f"cache holds {cache.batch_size} sequences but input_ids has {batch}")
        vocab = self.config.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}), got min {int(input_ids.min())}, max {int(input_ids.max())}")
        device = input_ids.device
        valid = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
        if valid is not None and valid.shape != input_ids.shape:
            raise ValueError(f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(valid.shape)}")
        chunk_valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
        past_slots = 0 if cache is None else cache.seq_len
        past_tokens = 0 if cache is None else cache.lengths[:, None]
        positions = (past_tokens + chunk_valid.cumsum(dim=1) - 1).clamp(min=0)  # RoPE positions [B, T]
        if cu_seqlens is not None:
            cu_seqlens, document = _check_packing(cu_seqlens, batch, length, cache, attention_mask, device)
            positions = torch.arange(length, device=device) - cu_seqlens[document]  # [T], restarts per document
            positions = positions[None]
        x = self.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = rope_cos_sin(positions, self._inv_freq, self._rope_scaling, x.dtype)
        mask = None
        if self.cache_layout.attention_layers:
            key_valid = chunk_valid if cache is None else torch.cat([cache.key_valid, chunk_valid], dim=1)
            query_slots = torch.arange(past_slots, past_slots + length, device=device)
            mask = build_attention_mask(query_slots, torch.arange(past_slots + length, device=device), key_valid)
            if cu_seqlens is not None:
                mask = mask & (document[:, None] == document[None, :])
        for layer in self.layers:
            x = layer(x, cos, sin, mask, valid, cache, cu_seqlens)
        if cache is not None:
            cache.advance(chunk_valid)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.norm(x)
        return torch.nn.functional.linear(x, self.output_weight())

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



def _check_packing(cu_seqlens, batch, length, cache, attention_mask, device):
    """Validate `cu_seqlens`; return it on `device` and the document index of every token [T]."""
    if batch != 1 or cache is not None or attention_mask is not None:
        raise ValueError("cu_seqlens packs documents into one row: it needs batch size 1, no cache and no attention_mask")
    cu_seqlens = torch.as_tensor(cu_seqlens, dtype=torch.long, device=device)
    if cu_seqlens.ndim != 1 or len(cu_seqlens) < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != length:
        raise ValueError(f"cu_seqlens must run from 0 to the row length {length}, got {cu_seqlens.tolist()}")
    if bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu_seqlens.tolist()}")
    document = torch.searchsorted(cu_seqlens, torch.arange(length, device=device), right=True) - 1
    return cu_seqlens, document
