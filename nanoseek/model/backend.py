"""What an attention layer needs for one step: AttentionMetadata, and the backend that stores and reads keys.

    meta = AttentionMetadata.no_cache(B, T)              # training / a plain forward: causal, nothing kept
    cache = DenseCache(cfg, batch_size=B, max_len=1024)  # contiguous cache for B rows that advance together
    hidden = model(ids, attn_metadata=cache.step(T))     # step(T) describes T new tokens per row, then advances

The engine builds its metadata once per step over the paged pool (slot mapping, block tables, sequence
lengths) and hands in its own backends (nanoseek.engine.backends); the model never imports the engine.

A step has B rows with T new tokens each. Row b's keys after the step are seq_lens[b] tokens, the last
T of them new, so new token t of row b sits at position seq_lens[b] - T + t and sees keys 0..that.
Rows laid out to max_seq_len keys (a host int, >= every seq_len) are masked past their own length:
padding of a row or of a batch bucket never reaches a result.

Notation: B rows, T new tokens per row, S keys per row, H heads, D cached width per token
(L + R for MLA's latent), L kv_lora_rank, R rope dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig


class AttentionBackend(Protocol):
    """Where the per-token cached vectors [D] live, and how attention reads them."""

    def store(self, layer_idx: int, new: torch.Tensor, meta: "AttentionMetadata") -> None:
        """Keep new [B, T, D] (the new tokens' latents, or K|V for GQA)."""

    def keys(self, layer_idx: int, new: torch.Tensor,
             meta: "AttentionMetadata") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every key each row sees, [B, S, D], and the mask [B, T, S] (None: plain causal over T == S)."""

    def latent_attention(self, layer_idx: int, q: torch.Tensor, new: torch.Tensor, meta: "AttentionMetadata",
                         scale: float, value_dim: int) -> torch.Tensor:
        """Absorbed MLA: q [B, T, H, D] against the one shared key head (the cached [B, S, D]) whose first
        value_dim dims are the value; returns [B, T, H, value_dim]."""


@dataclass
class AttentionMetadata:
    """One step's attention inputs, built once by whoever drives the model and shared by every layer."""

    backend: AttentionBackend
    seq_lens: torch.Tensor  # [B] long: keys each row sees after this step (cached + its T new)
    max_seq_len: int  # S: keys laid out per row (host int; >= every seq_len; a bucket when compiled)
    num_new: int  # T: new tokens per row
    slot_mapping: torch.Tensor | None = None  # [B*T] long: where each new token is stored (flat slot)
    block_tables: torch.Tensor | None = None  # [B, max_blocks] long: each row's blocks (paged caches)
    keys_are_new: bool = False  # nothing cached before: each row attends causally over its T new tokens
    absorb: bool = False  # MLA: attend over the latent (few queries) instead of decoding K/V per head
    # what a backend derives from the fields above once per step and every layer reuses (e.g. the
    # padding bias of the CPU decode backend); keyed by the backend, never read by the model
    per_step: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def kind(self) -> str:
        return "prefill" if self.keys_are_new or self.num_new > 1 else "decode"

    def positions(self) -> torch.Tensor:
        """[B, T] absolute position of each new token."""
        T = self.num_new
        return self.seq_lens[:, None] - T + torch.arange(T, device=self.seq_lens.device)

    @staticmethod
    def no_cache(batch_size: int, num_new: int, device=None) -> "AttentionMetadata":
        """Training and one-off forwards: keys are the new tokens, causal, nothing stored."""
        lens = torch.full((batch_size,), num_new, dtype=torch.long, device=device)
        return AttentionMetadata(NO_CACHE, lens, num_new, num_new, keys_are_new=True)


def prefer_absorbed(cfg: ModelConfig, num_new: int) -> bool:
    """Absorbed MLA wins when few queries attend: per (query, key, head) it costs 2L+R multiply-adds
    against naive's Dn+R+Dv, but naive first decodes K and V for every key (L*(Dn+Dv) per key, head)."""
    extra_per_query = 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim - cfg.qk_head_dim - cfg.v_head_dim
    return num_new * extra_per_query < cfg.kv_lora_rank * (cfg.qk_nope_head_dim + cfg.v_head_dim)


# ---------------------------------------------------------------------- pure functions
def causal_mask(seq_lens: torch.Tensor, num_new: int, max_seq_len: int) -> torch.Tensor:
    """[B, T, S] bool: new token t of row b (position seq_lens[b] - T + t) sees keys 0..its position."""
    dev = seq_lens.device
    last = seq_lens[:, None] - num_new + torch.arange(num_new, device=dev)  # [B, T]
    return torch.arange(max_seq_len, device=dev)[None, None, :] <= last[:, :, None]


def sdpa_latent(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None, scale: float,
                value_dim: int) -> torch.Tensor:
    """The reference absorbed attention: q [B, T, H, D] over kv [B, S, D] (one key head; its first
    value_dim dims are the value) with mask [B, T, S] (None: causal, T == S) -> [B, T, H, value_dim]."""
    B, T, H, D = q.shape
    S = kv.shape[1]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None].expand(B, T, S)
    mask = mask[:, :, None, :].expand(B, T, H, S).reshape(B, 1, T * H, S)
    o = F.scaled_dot_product_attention(q.reshape(B, 1, T * H, D), kv[:, None], kv[:, None], attn_mask=mask,
                                       scale=scale)  # [B, 1, T*H, D]
    return o[..., :value_dim].reshape(B, T, H, value_dim)


class NoCache:
    """Keys are the step's own new tokens; nothing is kept (training, full-sequence forwards)."""

    def store(self, layer_idx, new, meta) -> None:
        pass

    def keys(self, layer_idx, new, meta):
        return new, None

    def latent_attention(self, layer_idx, q, new, meta, scale, value_dim):
        return sdpa_latent(q, new, None, scale, value_dim)


NO_CACHE = NoCache()


class DenseCache:
    """A contiguous cache for B rows that advance together: [B, max_len, D] per layer.

    The same metadata as the paged engine (contiguous slots: row b, position p -> b * max_len + p)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.batch_size, self.max_len = batch_size, max_len
        self.length = 0  # tokens cached so far (per row)
        self.buffers = [torch.zeros(batch_size, max_len, cfg.kv_cache_dim, dtype=dtype, device=device)
                        for _ in range(cfg.num_hidden_layers)]

    def step(self, num_new: int, absorb: bool = False) -> AttentionMetadata:
        """Metadata for num_new tokens per row after what is cached; the cache then counts them."""
        end = self.length + num_new
        if end > self.max_len:
            raise ValueError(f"DenseCache is full: {self.length} cached + {num_new} new tokens "
                             f"> max_len={self.max_len}")
        dev = self.buffers[0].device
        B = self.batch_size
        slots = (torch.arange(B, device=dev)[:, None] * self.max_len
                 + torch.arange(self.length, end, device=dev)).reshape(-1)  # [B*T]
        meta = AttentionMetadata(self, torch.full((B,), end, dtype=torch.long, device=dev), end, num_new,
                                 slot_mapping=slots, keys_are_new=self.length == 0, absorb=absorb)
        self.length = end
        return meta

    def store(self, layer_idx, new, meta) -> None:
        buf = self.buffers[layer_idx]
        buf.view(-1, buf.shape[-1]).index_copy_(0, meta.slot_mapping, new.reshape(-1, new.shape[-1]).to(buf.dtype))

    def keys(self, layer_idx, new, meta):
        if meta.keys_are_new:
            return new, None
        kv = self.buffers[layer_idx][:, : meta.max_seq_len].to(new.dtype)
        return kv, causal_mask(meta.seq_lens, meta.num_new, meta.max_seq_len)

    def latent_attention(self, layer_idx, q, new, meta, scale, value_dim):
        kv, mask = self.keys(layer_idx, new, meta)
        return sdpa_latent(q, kv, mask, scale, value_dim)
