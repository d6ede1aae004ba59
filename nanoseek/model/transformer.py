"""The causal LM: embeddings, decoder blocks (MLA or GQA attention; dense or MoE feed-forward), head.

    model = build_model(cfg)                      # random init, module names = HF tensor names
    logits = model(input_ids)                     # [B, T, vocab]
    logits, stats = model(input_ids, return_router_stats=True)

    cache = DenseCache(cfg, batch_size=B, max_len=1024)
    logits = model(prompt_ids, cache=cache)       # prefill; the cache now holds the prompt
    logits = model(next_ids, cache=cache)         # decode; absorbed MLA by default with a cache

Module names mirror the published checkpoints (model.layers.N.self_attn.kv_a_proj_with_mqa, ...),
except the routed experts, which are stacked per layer (see checkpoint.py).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.linear import Linear
from nanoseek.model.attention import GQA, MLA, AttnInputs, RMSNorm
from nanoseek.model.moe import MLP, MoE, RouterStats
from nanoseek.model.rope import rope_cos_sin, rope_inv_freq


def prefer_absorbed(cfg: ModelConfig, num_new: int) -> bool:
    """Absorbed MLA wins when few queries attend: per (query, key, head) it costs 2L+R multiply-adds
    against naive's Dn+R+Dv, but naive first decodes K and V for every key (L*(Dn+Dv) per key, head)."""
    extra_per_query = 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim - cfg.qk_head_dim - cfg.v_head_dim
    return num_new * extra_per_query < cfg.kv_lora_rank * (cfg.qk_nope_head_dim + cfg.v_head_dim)


class DenseCache:
    """A contiguous KV cache for B sequences that advance together: [B, max_len, kv_cache_dim] per layer."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_len = max_len
        self.length = 0  # tokens cached so far
        self.buffers = [torch.zeros(batch_size, max_len, cfg.kv_cache_dim, dtype=dtype, device=device)
                        for _ in range(cfg.num_hidden_layers)]

    def update(self, layer_idx: int, new: torch.Tensor) -> torch.Tensor:
        end = self.length + new.shape[1]
        if end > self.max_len:
            raise ValueError(f"DenseCache is full: {self.length} cached + {new.shape[1]} new tokens "
                             f"> max_len={self.max_len}")
        buf = self.buffers[layer_idx]
        buf[:, self.length:end] = new
        return buf[:, :end]

    def mask(self, num_new: int, device) -> torch.Tensor | None:
        """[1, T, S]: new token t (at position length + t) sees keys 0..length+t. None when T == 1."""
        if num_new == 1:
            return None
        S = self.length + num_new
        return torch.ones(num_new, S, dtype=torch.bool, device=device).tril(self.length)[None]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg) if cfg.is_mla else GQA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias and not cfg.is_mla)

    def forward(self, x: torch.Tensor, a: AttnInputs) -> tuple[torch.Tensor, RouterStats | None]:
        x = x + self.self_attn(self.input_layernorm(x), a, self.layer_idx)
        h = self.mlp(self.post_attention_layernorm(x))
        if isinstance(h, tuple):
            h, stats = h
            return x + h, stats
        return x + h, None


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_attn_factor = rope_inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                cache=None, mask: torch.Tensor | None = None, absorb: bool | None = None,
                return_router_stats: bool = False, last_only: bool = False,
                logits_index: torch.Tensor | None = None):
        """input_ids [B, T] -> logits [B, T, vocab] (fp32 head in the weights' dtype).

        positions [B, T]: absolute positions (default: after what the cache holds).
        cache: a KVCache (DenseCache, or the engine's paged cache), updated in place.
        mask [B, T, S] bool: which keys each new token sees (default: causal, after the cache).
        absorb: MLA over the latent (default: when it is cheaper, see prefer_absorbed).
        last_only: logits of the last position only, [B, 1, vocab].
        logits_index [n]: logits only at these flat indices into B*T, [n, vocab] (the engine's rows).
        """
        cfg = self.config
        B, T = input_ids.shape
        if (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size) if input_ids.numel() else False:
            bad = input_ids[(input_ids < 0) | (input_ids >= cfg.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
        offset = getattr(cache, "length", 0) if cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        if mask is None and isinstance(cache, DenseCache):
            mask = cache.mask(T, input_ids.device)
        if absorb is None:
            absorb = cfg.is_mla and cache is not None and prefer_absorbed(cfg, T)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.rope_attn_factor)
        a = AttnInputs(cos=cos, sin=sin, mask=mask, cache=cache, absorb=absorb)
        x = self.model.embed_tokens(input_ids)
        stats: list[RouterStats] = []
        for block in self.model.layers:
            x, s = block(x, a)
            if s is not None:
                stats.append(s)
        if isinstance(cache, DenseCache):
            cache.length += T
        if logits_index is not None:
            x = x.reshape(B * T, -1)[logits_index]  # [n, C]
        elif last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        logits = self.lm_head(x)
        return (logits, stats) if return_router_stats else logits


def init_parameters(module: nn.Module, std: float, gen: torch.Generator | None = None) -> None:
    """Normal(0, std) for matrices and embeddings, ones for norms, zeros for biases, in
    named_parameters order (so a seed gives the same weights every time)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def init_weights(model: CausalLM, seed: int | None = None) -> CausalLM:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    init_parameters(model, model.config.initializer_range, gen)
    return model


def build_model(cfg: ModelConfig, dtype: torch.dtype | None = None, device=None,
                seed: int | None = 0) -> CausalLM:
    """A freshly initialised model (seeded; seed=None leaves the weights uninitialised)."""
    model = CausalLM(cfg)
    if seed is not None:
        init_weights(model, seed)
    return model.to(device=device, dtype=dtype)
