"""Rotary position embedding as pure functions: frequency tables (plain, linear, YaRN) and apply.

    inv_freq, attn_factor = rope_inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = rope_cos_sin(inv_freq, positions, attn_factor)       # [B, T, R/2] each
    q = apply_rope(q, cos, sin, interleaved=True)                    # q: [B, T, H, R]

Two layouts of the R rotary dims exist in checkpoints: DeepSeek's *interleaved* pairs
(x0, x1), (x2, x3), ... and Llama's *half-split* pairs (x_i, x_{i+R/2}). Pair i turns by
position * inv_freq[i] in both.
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import yarn_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dim index whose wavelength fits `num_rotations` times into max_pos."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (fp32) and the factor that multiplies cos and sin.

    YaRN (Peng et al., 2023, as DeepSeek-V2 uses it): high-frequency dims keep their frequency,
    low-frequency dims are interpolated by `factor`, with a linear ramp between the dims that
    turn beta_fast and beta_slow times over the original context. cos/sin carry
    mscale(factor, mscale) / mscale(factor, mscale_all_dim).
    """
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / base
    kind = (scaling or {}).get("type", "default")
    if kind == "default":
        return inv_freq.float(), 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).float(), 1.0
    assert kind == "yarn", f"unsupported rope scaling type {kind!r}"
    orig = int(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, theta, orig)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, theta, orig)), dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if scaling.get("attention_factor") is not None:
        attn_factor = float(scaling["attention_factor"])
    elif mscale and mscale_all:
        attn_factor = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all))
    else:
        attn_factor = yarn_mscale(factor)
    return inv_freq.float(), attn_factor


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 attn_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * inv_freq, each [*positions.shape, R/2], in fp32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return angles.cos() * attn_factor, angles.sin() * attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, T, H, R] (or [B, T, R]) by cos/sin [B, T, R/2]; computed in fp32, returned in x's dtype."""
    if x.dim() == cos.dim() + 1:  # a heads axis to broadcast over
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        half = xf.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


def rope_cis(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """cos + i sin, [*, R/2] complex64: the rotation of each interleaved pair, for apply_rope_complex."""
    return torch.complex(cos.float(), sin.float())


def complex_view_ok(x: torch.Tensor) -> bool:
    """Whether x [..., R] (fp32) can be viewed as R/2 complex numbers without a copy."""
    return (x.dtype == torch.float32 and x.shape[-1] % 2 == 0 and x.stride(-1) == 1
            and x.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in x.stride()[:-1]))


def apply_rope_complex(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """apply_rope(x, cos, sin, interleaved=True) in one multiply: the pair (x0, x1) is the complex
    x0 + i x1, turned by cis [B, T, R/2]. x [B, T, H, R] or [B, T, R], fp32 (complex_view_ok)."""
    if x.dim() == cis.dim() + 1:  # a heads axis to broadcast over
        cis = cis.unsqueeze(-2)
    xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # [..., R/2] complex, no copy
    return torch.view_as_real(xc * cis).flatten(-2)
