"""The causal LM: embeddings, decoder blocks (MLA or GQA attention; dense or MoE feed-forward), head.

    model = build_model(cfg)                      # random init, module names = HF tensor names
    hidden = model(input_ids)                     # [B, T, C], after the final norm
    logits = model.compute_logits(hidden)         # [B, T, vocab]
    hidden, stats = model(input_ids, return_router_stats=True)

    cache = DenseCache(cfg, batch_size=B, max_len=1024)           # nanoseek.model.backend
    hidden = model(prompt_ids, attn_metadata=cache.step(T))        # prefill; the cache now holds it
    hidden = model(next_ids, attn_metadata=cache.step(1, absorb=True))  # decode over the latent

Module names mirror the published checkpoints (model.layers.N.self_attn.kv_a_proj_with_mqa, ...),
except the routed experts, which are stacked per layer (see checkpoint.py).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import GQA, MLA, AttnInputs, RMSNorm
from nanoseek.model.backend import AttentionMetadata, DenseCache, prefer_absorbed  # noqa: F401 (re-exported)
from nanoseek.model.linear import Linear
from nanoseek.model.moe import MLP, MoE, RouterStats
from nanoseek.model.rope import rope_cos_sin, rope_inv_freq


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

    def _apply(self, fn, recurse=True):
        """Module.to and friends, except that inv_freq stays fp32 whatever dtype the weights take: in
        bf16 (8 bits of mantissa) the angle of a pair at position 4,096 would be off by radians."""
        out = super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:  # recomputed: the cast already lost the digits
            cfg = self.config
            self.inv_freq = rope_inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)[0].to(self.inv_freq.device)
        return out

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                attn_metadata: AttentionMetadata | None = None, *, return_router_stats: bool = False):
        """input_ids [B, T] -> the final (normed) hidden states [B, T, C]; logits via compute_logits.

        positions [B, T]: absolute positions (default: from the metadata, or 0..T-1 without one).
        attn_metadata: where keys are stored and read this step (None: no cache, causal over the
        tokens given, as in training). Ids are not checked here: the scheduler validates them.
        return_router_stats: also the MoE layers' routing (for the balance losses).
        """
        B, T = input_ids.shape
        if positions is None:
            positions = (attn_metadata.positions() if attn_metadata is not None
                         else torch.arange(T, device=input_ids.device).expand(B, T))
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.rope_attn_factor)
        a = AttnInputs(cos=cos, sin=sin, meta=attn_metadata)
        x = self.model.embed_tokens(input_ids)
        stats: list[RouterStats] = []
        for block in self.model.layers:
            x, s = block(x, a)
            if s is not None:
                stats.append(s)
        x = self.model.norm(x)
        return (x, stats) if return_router_stats else x

    def compute_logits(self, hidden: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., C] -> logits [..., vocab]; with indices [n], only those rows of hidden
        flattened to [N, C] -> [n, vocab] (the engine's rows that sample)."""
        if indices is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])[indices]
        return self.lm_head(hidden)


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
