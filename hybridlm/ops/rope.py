"""Partial rotary position embedding (rotate-half convention) with default, linear and YaRN frequencies."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hybridlm.ops.norm import rms_norm


def rope_inv_freq(
    rotary_dim: int, theta: float, rope_type: str = "default", params: dict | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rotary_dim / 2] (fp32) and the scale applied to cos/sin (YaRN's attention factor)."""
    params = params or {}
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim
    inv_freq = 1.0 / (theta ** exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(params["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type != "yarn":
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    # YaRN (arXiv 2309.00071): keep high frequencies (many rotations within the original context) as they
    # are, interpolate low ones by `factor`, blend linearly in between; scale attention by 0.1 ln(s) + 1.
    original = params["original_max_position_embeddings"]
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / factor) * ramp + inv_freq * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, rotary_dim] for integer positions [B, T], computed in fp32."""
    freqs = positions.float()[..., None] * inv_freq.float().to(positions.device)  # [B, T, rotary_dim/2]
    angles = torch.cat([freqs, freqs], dim=-1)
    return (angles.cos() * attention_scaling).to(dtype), (angles.sin() * attention_scaling).to(dtype)


@dataclass(eq=False)
class RopeInputs:
    """One forward's RoPE, shared by every attention layer: integer positions [B, T] and inv_freq [rotary_dim / 2]
    (fp32) on the model's device, the attention scaling and the dtype that cos and sin are rounded to.

    The Triton q/k kernel computes the angles from these itself, so the kernel path builds no cos/sin tensors (six
    launches per step); the reference builds them once (`cos_sin`) and every layer reuses them."""

    positions: torch.Tensor
    inv_freq: torch.Tensor
    attention_scaling: float
    dtype: torch.dtype
    _cos_sin: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, rotary_dim] (`rope_cos_sin`), built on the first call."""
        if self._cos_sin is None:
            self._cos_sin = rope_cos_sin(self.positions, self.inv_freq, self.attention_scaling, self.dtype)
        return self._cos_sin


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x [B, H, T, D]; the rest pass through."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    half = rotary_dim // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float = 1e-6) -> torch.Tensor:
    """The attention's q/k path: zero-centred RMSNorm per head of x [B, T, H, D], then partial RoPE with cos, sin
    [B, T, rotary_dim]; returns [B, T, H, D] (the Triton twin fuses both into one launch)."""
    return apply_partial_rope(rms_norm(x, weight, eps).transpose(1, 2), cos, sin).transpose(1, 2)


def qk_rms_norm_rope(q: torch.Tensor, q_weight: torch.Tensor, k: torch.Tensor, k_weight: torch.Tensor,
                     rope: RopeInputs, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention's q [B, T, Hq, D] and k [B, T, Hk, D], each through `rms_norm_rope` with its own norm weight and
    the cos, sin of `rope`; returns (q, k) (the Triton twin does both in one launch, the angles computed in it)."""
    cos, sin = rope.cos_sin()
    return rms_norm_rope(q, q_weight, cos, sin, eps), rms_norm_rope(k, k_weight, cos, sin, eps)
