"""DeepSeek-V3 multi-token prediction (arXiv:2412.19437, Sec. 2.2): D extra sequential modules.

    mtp = MTPHeads(model_cfg, depth=1).init_weights(seed=0).train()
    hidden, stats = model(x, return_router_stats=True)   # [B, T, C]: the final, normed hidden state
    loss, per_depth, mtp_stats = mtp(model, hidden, y)  # mean of the D depth losses

Module k (1..D) combines the previous depth's hidden state h^{k-1}_i (k=1: the main model's final,
normed hidden state) with the embedding of token t_{i+k}:
    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]),  h^k = Block_k(h'),
and predicts t_{i+k+1} through shared_head.norm and the main model's output head. The embedding and
head are shared with the main model. Depth k therefore covers T-k positions of a length-T window.
The trainer adds lambda * mean_k CE_k to the loss (V3: lambda = 0.3, later 0.1).

Checkpoint layout, as published V3 checkpoints store it: module k lives at model.layers.{n+k-1}
(n = num_hidden_layers) with enorm, hnorm, eh_proj, the decoder block's own tensors (input_layernorm,
self_attn.*, post_attention_layernorm, mlp.*), shared_head.norm, and copies of the shared
embed_tokens and shared_head.head. nanoseek's load_model skips these layers, so inference ignores them.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import AttnInputs, RMSNorm
from nanoseek.model.checkpoint import hf_state_items
from nanoseek.model.moe import RouterStats
from nanoseek.model.rope import rope_cos_sin
from nanoseek.model.transformer import Block, init_parameters


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(Block):
    """One MTP module: a decoder block (layer index n+k-1) plus the projections that feed it."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        C = cfg.hidden_size
        self.enorm = RMSNorm(C, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(C, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * C, C, bias=False)
        self.shared_head = SharedHead(cfg)


class MTPHeads(nn.Module):
    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MTP depth={depth} must be >= 1")
        self.cfg, self.depth = cfg, depth
        n = cfg.num_hidden_layers
        self.layers = nn.ModuleList(MTPLayer(cfg, n + k) for k in range(depth))

    def init_weights(self, seed: int) -> "MTPHeads":
        """Normal(0, initializer_range) for matrices, ones for norms (like the main model)."""
        init_parameters(self, self.cfg.initializer_range, torch.Generator().manual_seed(seed + 7919))
        return self

    def forward(self, model: nn.Module, hidden: torch.Tensor, y: torch.Tensor
                ) -> tuple[torch.Tensor, list[float], list[RouterStats]]:
        """hidden [B, T, C] (main model, after its final norm), y [B, T] next-token targets ->
        (mean CE over depths, CE per depth, router stats of the MTP MoE blocks)."""
        B, T = y.shape
        if T <= self.depth:
            raise ValueError(f"MTP depth={self.depth} needs seq_len > depth, got seq_len={T}")
        embed, head = model.model.embed_tokens, model.lm_head
        h = hidden
        losses, stats = [], []
        for k, layer in enumerate(self.layers, start=1):
            Tk = T - k
            h = h[:, :Tk]  # [B, T-k, C]: positions that still have a token k+1 ahead
            e = embed(y[:, k - 1: k - 1 + Tk])  # Emb(t_{i+k}) [B, T-k, C]
            x = layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(h)], dim=-1))
            pos = torch.arange(Tk, device=y.device).expand(B, Tk)
            cos, sin = rope_cos_sin(model.inv_freq, pos, model.rope_attn_factor)
            h, s = layer(x, AttnInputs(cos=cos, sin=sin))
            if s is not None:
                stats.append(s)
            logits = head(layer.shared_head.norm(h))  # [B, T-k, V]
            target = y[:, k: k + Tk]  # t_{i+k+1}
            losses.append(F.cross_entropy(logits.float().flatten(0, 1), target.flatten()))
        total = torch.stack(losses).mean()
        return total, [float(v.detach()) for v in losses], stats


def mtp_hf_items(mtp: MTPHeads, model: nn.Module):
    """(checkpoint name, tensor) of the MTP modules in the published V3 layout."""
    for layer in mtp.layers:
        prefix = f"model.layers.{layer.layer_idx}."
        for name, t in hf_state_items(layer):
            yield prefix + name, t
        yield prefix + "embed_tokens.weight", model.model.embed_tokens.weight.detach()
        yield prefix + "shared_head.head.weight", model.lm_head.weight.detach()


_EXPERT = re.compile(r"^(mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def load_mtp_state(mtp: MTPHeads, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `mtp` from checkpoint tensors named as mtp_hf_items writes them; every tensor must be there."""
    for layer in mtp.layers:
        prefix = f"model.layers.{layer.layer_idx}."
        targets = dict(layer.named_parameters())
        targets.update(layer.named_buffers())
        seen = set()
        with torch.no_grad():
            for full, t in tensors.items():
                if not full.startswith(prefix):
                    continue
                name = full[len(prefix):]
                if name in ("embed_tokens.weight", "shared_head.head.weight"):
                    continue  # copies of the main model's shared tensors
                m = _EXPERT.match(name)
                if m:
                    e, part = int(m.group(2)), m.group(3)
                    if part == "down_proj":
                        dst, key = targets["mlp.experts.down_proj"][e], "mlp.experts.down_proj"
                    else:
                        gu = targets["mlp.experts.gate_up_proj"][e]
                        inter = gu.shape[0] // 2
                        dst = gu[:inter] if part == "gate_proj" else gu[inter:]
                        key = "mlp.experts.gate_up_proj"
                    seen.add((key, e, part))
                else:
                    if name not in targets:
                        raise ValueError(f"checkpoint tensor {full} does not belong to an MTP module")
                    dst, key = targets[name], name
                    seen.add(key)
                if tuple(dst.shape) != tuple(t.shape):
                    raise ValueError(f"checkpoint tensor {full} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(dst.shape)}")
                dst.copy_(t)
        plain = {n for n in targets if not n.startswith("mlp.experts.")}
        missing = sorted(plain - seen)
        if missing:
            raise ValueError(f"checkpoint lacks MTP tensors {[prefix + n for n in missing[:5]]}")
