"""Attention: Multi-head Latent Attention (DeepSeek-V2/V3) and grouped-query attention (Llama).

MLA caches one vector per token per layer, the *latent* [c_kv (L) | k_pe (R)]: c_kv is the
normalised low-rank projection that every head's key and value are decoded from (kv_b_proj), k_pe
the rope key shared by all heads. Two ways to attend over it, which give the same result:

- naive: decode per-head K [S, H, Dn+R] and V [S, H, Dv] from the latent, then ordinary attention.
  Cheapest when many new tokens attend (training, prefill).
- absorbed: fold kv_b_proj's key half W_UK into the query (q_nope @ W_UK: [T, H, L]) and its value
  half W_UV into the output. Every head then attends the same latent, so attention is one head with
  T*H queries over S keys of width L+R; no per-head K or V is ever built. Cheapest for decode.

Notation: B batch, T new tokens, S keys (cached + new), H heads, G kv heads, Dn/Dv/D head dims,
L kv_lora_rank, R rope dim, C hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model import fast
from nanoseek.model.backend import NO_CACHE, AttentionMetadata, NoCache
from nanoseek.model.linear import Linear
from nanoseek.model.rope import apply_rope, apply_rope_complex, complex_view_ok, rope_cis


@dataclass
class AttnInputs:
    """What every attention layer of one forward shares."""

    cos: torch.Tensor  # [B, T, R/2]
    sin: torch.Tensor  # [B, T, R/2]
    meta: AttentionMetadata | None = None  # where keys are stored and read; None: no cache (training)
    _cis: torch.Tensor | None = None  # cos + i sin, built at the first fast rope of the forward

    @property
    def step(self) -> AttentionMetadata | _NoCacheStep:
        return self.meta if self.meta is not None else _NO_CACHE_STEP

    def rope(self, x: torch.Tensor, interleaved: bool) -> torch.Tensor:
        """apply_rope(x, cos, sin, interleaved); interleaved fp32 inference takes one complex multiply
        (apply_rope_complex) instead of a dozen ops."""
        if interleaved and fast.enabled() and complex_view_ok(x):
            if self._cis is None:
                self._cis = rope_cis(self.cos, self.sin)
            return apply_rope_complex(x, self._cis)
        return apply_rope(x, self.cos, self.sin, interleaved)


@dataclass
class _NoCacheStep:
    """The metadata fields attention reads, for a forward without a cache (keys = the new tokens)."""

    backend: NoCache = NO_CACHE
    absorb: bool = False


_NO_CACHE_STEP = _NoCacheStep()


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 as the published checkpoints were trained."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and fast.enabled():
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused op
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float, enable_gqa: bool = False) -> torch.Tensor:
    """SDPA over q [B, H, T, D], k [B, G, S, D], v [B, G, S, Dv] with mask [B, T, S] (None: causal)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale,
                                              enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale,
                                          enable_gqa=enable_gqa)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.L, self.R = H, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.Dn, self.Dv = cfg.qk_nope_head_dim, cfg.v_head_dim
        self.scale = cfg.softmax_scale
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(C, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(C, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(C, self.L + self.R, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.L, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(self.L, H * (self.Dn + self.Dv), bias=False)
        self.o_proj = Linear(H * self.Dv, C, bias=cfg.attention_bias)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def latent(self, x: torch.Tensor, a: AttnInputs) -> torch.Tensor:
        """The cached vector of each new token: [c_kv | roped k_pe], [B, T, L+R]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.L, self.R], dim=-1)
        k_pe = a.rope(k_pe, self.cfg.rope_is_interleaved)
        return torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1)

    def forward(self, x: torch.Tensor, a: AttnInputs, layer_idx: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.query(x).view(B, T, self.n_heads, self.Dn + self.R)
        q_nope, q_pe = q.split([self.Dn, self.R], dim=-1)
        q_pe = a.rope(q_pe, self.cfg.rope_is_interleaved)
        latent = self.latent(x, a)  # [B, T, L+R]
        meta = a.step
        backend = meta.backend
        backend.store(layer_idx, latent, meta)
        if meta.absorb:
            w_uk, w_uv = self.absorbed_weights()
            if fast.enabled():  # the einsums below as two bmm over heads, without einsum's permutes
                N, H, L = B * T, self.n_heads, self.L
                q_lat = torch.bmm(q_nope.reshape(N, H, self.Dn).transpose(0, 1).to(w_uk.dtype), w_uk)  # [H, N, L]
                q = torch.cat([q_lat.transpose(0, 1).to(q_pe.dtype), q_pe.reshape(N, H, self.R)], dim=-1)
                o_lat = backend.latent_attention(layer_idx, q.view(B, T, H, -1), latent, meta, self.scale, L)
                out = torch.bmm(o_lat.reshape(N, H, L).transpose(0, 1).to(w_uv.dtype), w_uv.transpose(1, 2))
                return self.o_proj(out.transpose(0, 1).reshape(B, T, H * self.Dv).to(x.dtype))  # out: [H, N, Dv]
            q_lat = torch.einsum("bthd,hdl->bthl", q_nope.to(w_uk.dtype), w_uk).to(q_pe.dtype)  # [B, T, H, L]
            o_lat = backend.latent_attention(layer_idx, torch.cat([q_lat, q_pe], dim=-1), latent, meta,
                                             self.scale, self.L)  # [B, T, H, L]
            out = torch.einsum("bthl,hvl->bthv", o_lat.to(w_uv.dtype), w_uv).to(x.dtype)  # [B, T, H, Dv]
        else:
            kv, mask = backend.keys(layer_idx, latent, meta)  # [B, S, L+R]
            out = self._naive(q_nope, q_pe, kv, mask)  # [B, T, H, Dv]
        return self.o_proj(out.reshape(B, T, self.n_heads * self.Dv))

    def _naive(self, q_nope, q_pe, latent, mask) -> torch.Tensor:
        B, S, _ = latent.shape
        H, Dn, Dv, R = self.n_heads, self.Dn, self.Dv, self.R
        c_kv, k_pe = latent.split([self.L, R], dim=-1)
        k_nope, v = self.kv_b_proj(c_kv).view(B, S, H, Dn + Dv).split([Dn, Dv], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, R)], dim=-1)  # [B, S, H, Dn+R]
        q = torch.cat([q_nope, q_pe], dim=-1)  # [B, T, H, Dn+R]
        # SDPA's fused CPU/GPU kernels want one head dim for q, k and v: pad V, slice after
        v = F.pad(v, (0, Dn + R - Dv))
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)
        return out.transpose(1, 2)[..., :Dv]  # [B, T, H, Dv]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_UK [H, Dn, L] and W_UV [H, Dv, L] (views, no copy). A quantised
        kv_b_proj is dequantised (QuantWeight.dense caches it once, in fp32 on CPU: see load_model);
        the absorbed products run in these weights' dtype and cast back."""
        w = self.kv_b_proj.weight
        w = (w if isinstance(w, torch.Tensor) else w.dense()).view(self.n_heads, self.Dn + self.Dv, self.L)
        return w[:, : self.Dn], w[:, self.Dn:]


class GQA(nn.Module):
    """Llama attention: H query heads share G key/value heads; rope in the half-split layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, self.H, self.G, self.D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, \
            cfg.attn_head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(C, self.H * self.D, bias=bias)
        self.k_proj = Linear(C, self.G * self.D, bias=bias)
        self.v_proj = Linear(C, self.G * self.D, bias=bias)
        self.o_proj = Linear(self.H * self.D, C, bias=bias)
        self.scale = cfg.softmax_scale

    def forward(self, x: torch.Tensor, a: AttnInputs, layer_idx: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, G, D = self.H, self.G, self.D
        inter = self.cfg.rope_is_interleaved
        q = a.rope(self.q_proj(x).view(B, T, H, D), inter)
        k = a.rope(self.k_proj(x).view(B, T, G, D), inter)
        v = self.v_proj(x).view(B, T, G, D)
        new = torch.cat([k.flatten(2), v.flatten(2)], dim=-1)  # [B, T, 2GD]
        meta = a.step
        meta.backend.store(layer_idx, new, meta)
        kv, mask = meta.backend.keys(layer_idx, new, meta)  # [B, S, 2GD]
        S = kv.shape[1]
        k, v = kv.view(B, S, 2, G, D).unbind(2)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale,
                     enable_gqa=G != H)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))
