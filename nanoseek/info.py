"""`nanoseek info CONFIG_OR_DIR...`: parameters, FLOPs and KV-cache bytes per token, from a config alone.

    nanoseek info configs/deepseek-v2.json --context 4096

Counts are analytic (no model is built), so the 671B V3 prints instantly. The KV-cache comparison
reproduces DeepSeek-V2's Table 1 (DeepSeek-AI, 2024, arXiv:2405.04434): per token and layer MHA
caches 2*n_h*d_h elements, GQA 2*n_g*d_h, MLA d_c + d_h^R.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.config import ModelConfig

GQA_GROUPS = 8  # the baseline GQA of the comparison (Llama-style 8 KV heads)


@dataclass
class Counts:
    total: int  # every parameter
    active: int  # parameters used per token (routed experts: only K of E)
    embedding: int  # input embedding (a lookup, no FLOPs)
    attn_flops_per_ctx: int  # attention FLOPs per token per token of context (scores + values)

    def flops_per_token(self, context: int) -> int:
        """Forward FLOPs per token: 2 per active weight (except the lookup) + attention over context."""
        return 2 * (self.active - self.embedding) + self.attn_flops_per_ctx * context


def count_params(cfg: ModelConfig) -> Counts:
    C, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    if cfg.is_mla:
        L, R, Dn, Dv, Q = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim, \
            cfg.q_lora_rank
        q = C * H * (Dn + R) if Q is None else C * Q + Q + Q * H * (Dn + R)
        attn = q + C * (L + R) + L + L * H * (Dn + Dv) + H * Dv * C
        if cfg.attention_bias:
            attn += (Q or 0) + L + R + C
        attn_flops = 2 * H * (Dn + R) + 2 * H * Dv
    else:
        D, G = cfg.attn_head_dim, cfg.num_key_value_heads
        attn = C * H * D + 2 * C * G * D + H * D * C
        if cfg.attention_bias:
            attn += H * D + 2 * G * D + C
        attn_flops = 2 * H * D * 2
    dense = 3 * C * cfg.intermediate_size + (2 * cfg.intermediate_size + C if cfg.mlp_bias and not cfg.is_mla else 0)
    total = active = 0
    for i in range(cfg.num_hidden_layers):
        layer = attn + 2 * C  # two norms
        if cfg.is_moe_layer(i):
            expert = 3 * C * cfg.moe_intermediate_size
            shared = expert * (cfg.n_shared_experts or 0) + cfg.n_routed_experts * C  # + router
            total += layer + shared + cfg.n_routed_experts * expert
            active += layer + shared + cfg.num_experts_per_tok * expert
        else:
            total += layer + dense
            active += layer + dense
    embed = V * C
    head = 0 if cfg.tie_word_embeddings else V * C
    rest = embed + head + C  # + final norm
    return Counts(total=total + rest, active=active + rest, embedding=embed,
                  attn_flops_per_ctx=attn_flops * cfg.num_hidden_layers)


def kv_cache_elements(cfg: ModelConfig) -> dict[str, float]:
    """Elements cached per token (all layers): this model, and the same model with MHA and with GQA."""
    n_l, H = cfg.num_hidden_layers, cfg.num_attention_heads
    d_h = cfg.qk_nope_head_dim if cfg.is_mla else cfg.attn_head_dim
    return {
        "this": cfg.kv_cache_dim * n_l,
        "mha": 2 * H * d_h * n_l,
        "gqa": 2 * min(GQA_GROUPS, H) * d_h * n_l,
        "equivalent_gqa_groups": cfg.kv_cache_dim / (2 * d_h),
    }


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def describe(cfg: ModelConfig, name: str, context: int = 4096, dtype_bytes: int = 2) -> str:
    c = count_params(cfg)
    kv = kv_cache_elements(cfg)
    attn = "MLA" if cfg.is_mla else f"GQA ({cfg.num_key_value_heads} KV heads)"
    ffn = (f"MoE {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, {cfg.topk_method}, "
           f"{cfg.scoring_func}) + {cfg.n_shared_experts or 0} shared" if cfg.is_moe else "dense SwiGLU")
    d_h = cfg.qk_nope_head_dim if cfg.is_mla else cfg.attn_head_dim
    this_label = (f"MLA: (d_c + d_h^R) * l = ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}) * {cfg.num_hidden_layers}"
                  if cfg.is_mla else
                  f"GQA: 2 * n_g * d_h * l = 2 * {cfg.num_key_value_heads} * {d_h} * {cfg.num_hidden_layers}")
    lines = [
        f"{name}  [{cfg.model_type}: {attn}, {ffn}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}]",
        f"  parameters        total {_fmt(c.total)}   active per token {_fmt(c.active)} "
        f"({100 * c.active / c.total:.1f}%; {_fmt(c.active - c.embedding)} without the input embedding)",
        f"  FLOPs per token   {_fmt(c.flops_per_token(context))} forward at context {context} "
        f"({_fmt(2 * (c.active - c.embedding))} weights + {_fmt(c.attn_flops_per_ctx * context)} attention); "
        f"training ~3x",
        f"  KV cache / token  ({dtype_bytes} bytes per element)",
        f"    {this_label:<58} {kv['this']:>12,.0f} elements {_fmt(kv['this'] * dtype_bytes):>8}B",
        f"    {'MHA: 2 * n_h * d_h * l = 2 * %d * %d * %d' % (cfg.num_attention_heads, d_h, cfg.num_hidden_layers):<58}"
        f" {kv['mha']:>12,.0f} elements {_fmt(kv['mha'] * dtype_bytes):>8}B  "
        f"({kv['mha'] / kv['this']:.1f}x this)",
        f"    {'GQA: 2 * n_g * d_h * l = 2 * %d * %d * %d' % (min(GQA_GROUPS, cfg.num_attention_heads), d_h, cfg.num_hidden_layers):<58}"
        f" {kv['gqa']:>12,.0f} elements {_fmt(kv['gqa'] * dtype_bytes):>8}B  "
        f"({kv['gqa'] / kv['this']:.1f}x this)",
    ]
    if cfg.is_mla:
        lines.append(f"    MLA caches as much as GQA with {kv['equivalent_gqa_groups']:.2f} groups "
                     f"(V2 paper, Table 1: 2.25 for d_c = 4 d_h, d_h^R = d_h / 2)")
    return "\n".join(lines)


def weight_bytes(cfg: ModelConfig, group_size: int = 128) -> dict[str, int | str]:
    """Bytes of the weights in bf16 and weight-only int8 / int4 (scales in bf16), from a model built
    on the meta device (nothing allocated); a scheme that cannot apply maps to the reason."""
    import torch

    from nanoseek.model.checkpoint import quantize_modules
    from nanoseek.model.quant import QuantError, QuantScheme
    from nanoseek.model.transformer import CausalLM

    out: dict[str, int | str] = {}
    for name in ("bf16", "int8", "int4"):
        with torch.device("meta"):
            model = CausalLM(cfg)
        try:
            if name != "bf16":
                quantize_modules(model, QuantScheme.parse(name, group_size))
        except QuantError as e:
            out[name] = str(e)
            continue
        model = model.to(torch.bfloat16)
        seen = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if t is not model.inv_freq}
        out[name] = sum(t.numel() * t.element_size() for t in seen.values())
    return out


def describe_weights(cfg: ModelConfig, group_size: int = 128) -> str:
    total = count_params(cfg).total
    lines = [f"  weights           bytes per parameter and total (int4: groups of {group_size}; "
             f"router, norms, embedding stay bf16)"]
    for name, b in weight_bytes(cfg, group_size).items():
        lines.append(f"    {name:<6} {b}" if isinstance(b, str) else
                     f"    {name:<6} {b / total:6.3f} B/param  {b / 1e9:9.3f} GB")
    return "\n".join(lines)


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate in FLOP/s (n x n by n x n, best of `repeats`): the ceiling
    that MFU and the benchmarks' "fraction of matmul rate" are measured against."""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def _resolve(path: str) -> tuple[ModelConfig, str]:
    return ModelConfig.from_json(path), path


def kernels_report(cfg: ModelConfig, max_rows: int, remeasure: bool = False) -> str:
    """Time the projection kernels on this config's shapes (nanoseek.model.linear.tune) and format
    the choice this host makes; the model is built on the meta device, so only shapes are used."""
    import torch

    from nanoseek.engine.fused_decode import cached_decode_choices
    from nanoseek.model.linear import format_report, tune
    from nanoseek.model.transformer import build_model

    with torch.device("meta"):
        model = build_model(cfg, seed=None)
    report = format_report(tune(model, max_rows=max_rows, use_cache=not remeasure))
    lines = [f"decode step, batch 1 + {n}, {backend} attention: {c['kernel']}"
             + (f" with {c['rows']} rows" if c["kernel"] == "fused" and "rows" in c else "") + " ("
             + ", ".join(f"{k} {v:.0f} us" for k, v in c["us"].items()) + ")"
             for (n, backend), c in sorted(cached_decode_choices(cfg).items())]  # timed by engines, on real weights
    return report + "\n" + ("\n".join(lines) if lines else
                            "decode step: not timed on this host yet (an engine times the fused step, with "
                            "each row kernel, against the model's at start)")


def run(args) -> int:
    for i, path in enumerate(args.configs):
        cfg, name = _resolve(path)
        if i:
            print()
        print(describe(cfg, name, context=args.context, dtype_bytes=args.dtype_bytes))
        if args.kernels:
            print(kernels_report(cfg, args.max_rows, args.remeasure))
        print(describe_weights(cfg, args.group_size))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs and KV-cache bytes per token of a model config",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", metavar="CONFIG_OR_DIR", help="config.json or a model folder")
    p.add_argument("--context", type=int, default=4096, help="context length for attention FLOPs")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per cached element (2: bf16)")
    p.add_argument("--kernels", action="store_true",
                   help="also time the projection kernels on this config's shapes and show this host's choice")
    p.add_argument("--max-rows", type=int, default=16, help="largest row count (batch) to time with --kernels")
    p.add_argument("--remeasure", action="store_true", help="with --kernels: ignore the per-host cache")
    p.add_argument("--group-size", type=int, default=128, help="int4 input channels per scale (default 128)")
    p.set_defaults(func=run)
