"""DeepSeekMoE: shared experts plus fine-grained routed experts, with vectorised dispatch.

    moe = MoE(cfg)
    y, stats = moe(x)        # x [B, T, C]; stats.scores [N, E], stats.topk_idx [N, K] for the balance losses

Routing follows the published models:
- V2: softmax scores; `greedy` top-K, or `group_limited_greedy` (experts in n_group groups, a group
  scored by its best expert, only the topk_group best groups eligible). Weights are the top-K
  scores, normalised if norm_topk_prob (then not scaled), else times routed_scaling_factor.
- V3: sigmoid scores; `noaux_tc` picks experts by score + e_score_correction_bias (a group scored by
  the sum of its best two), weights come from the unbiased scores, normalised if norm_topk_prob,
  always times routed_scaling_factor.
Dispatch sorts the N*K (token, expert) pairs by expert and runs one matmul per active expert
(torch._grouped_mm on CUDA in bf16), never a loop over tokens: `expert_ffn`, the one dispatch that
expert parallelism (nanoseek.train.distributed) calls too.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model import cpu_kernels
from nanoseek.model.linear import (MAX_ROWS, ROUNDS, ROW_CLASSES, Linear, linear, load_host_cache, row_class,
                                   save_host_cache)


@dataclass
class RouterStats:
    """What the balance losses and load logging need from one MoE layer's routing."""

    scores: torch.Tensor  # [N, E] fp32 routing probabilities (softmax or sigmoid), differentiable
    topk_idx: torch.Tensor  # [N, K] chosen experts

    def tokens_per_expert(self) -> torch.Tensor:
        """[E] count of (token, expert) assignments."""
        return torch.bincount(self.topk_idx.flatten(), minlength=self.scores.shape[-1])


def _group_mask(scores: torch.Tensor, n_group: int, topk_group: int, top2: bool) -> torch.Tensor:
    """[N, E] bool: experts in the topk_group best groups. A group's score is its best expert's
    (V2) or the sum of its best two (V3)."""
    N, E = scores.shape
    grouped = scores.view(N, n_group, E // n_group)
    group_score = grouped.topk(2, dim=-1).values.sum(-1) if top2 else grouped.max(dim=-1).values
    keep = group_score.topk(topk_group, dim=-1, sorted=False).indices  # [N, topk_group]
    mask = torch.zeros(N, n_group, dtype=torch.bool, device=scores.device).scatter_(1, keep, True)
    return mask[:, :, None].expand(N, n_group, E // n_group).reshape(N, E)


def route(logits: torch.Tensor, cfg: ModelConfig,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [N, E] (fp32) -> (weights [N, K], expert ids [N, K], scores [N, E])."""
    K = cfg.num_experts_per_tok
    scores = logits.softmax(dim=-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
    if cfg.topk_method == "noaux_tc":
        choice = scores.detach() + bias
        allowed = _group_mask(choice, cfg.n_group, cfg.topk_group, top2=True)
        idx = choice.masked_fill(~allowed, float("-inf")).topk(K, dim=-1, sorted=False).indices
        weights = scores.gather(1, idx)
    elif cfg.topk_method == "group_limited_greedy":
        allowed = _group_mask(scores, cfg.n_group, cfg.topk_group, top2=False)
        weights, idx = scores.masked_fill(~allowed, 0.0).topk(K, dim=-1, sorted=False)
    else:
        weights, idx = scores.topk(K, dim=-1, sorted=False)
    normalise = K > 1 and cfg.norm_topk_prob
    if normalise:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if (not normalise or cfg.model_type == "deepseek_v3") and cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights, idx, scores


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":  # V3: moved by the trainer from observed load, not by gradients
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def dispatch_weights(self) -> list:
        """The router's [E, C] projection: linear.tune times its kernels too (MKL's mm for one row was
        11-22 us here, the gemv kernel a few)."""
        return [self.weight]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = linear(x.float(), self.weight.float())  # [N, E], fp32 as in the published models
        bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias.float()
        return route(logits, self.cfg, bias)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=bias)
        self.up_proj = Linear(hidden, inter, bias=bias)
        self.down_proj = Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def expert_ffn(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor,
               impl: str = "auto") -> torch.Tensor:
    """The one experts dispatch: xs [M, C] grouped by expert (counts [E] rows each, in expert order)
    -> [M, C], each row through its own expert's SwiGLU. gate_up [E, 2I, C], down [E, C, I].

    impl: "grouped" (torch._grouped_mm, CUDA bf16), "loop" (one matmul per expert that has rows), or
    "auto": grouped on CUDA in bf16, i.e. rows and weights both bf16, or bf16 autocast (the trainer's
    mode on GPUs: fp32 weights, cast here as autocast casts a matmul's operands). Experts.forward
    calls it with every expert; expert parallel (nanoseek.train.distributed) with this rank's slice and
    the rows it received. With no rows the result is still computed from xs, so that it stays in the
    autograd graph (an expert-parallel rank that received nothing must still join the backward exchange)."""
    if impl == "auto":  # quantised experts (not a tensor) take the loop, one expert's kernel at a time
        dense = isinstance(gate_up, torch.Tensor)
        impl = "grouped" if dense and _grouped_mm_ok(xs) and _matmul_dtype(xs, gate_up) == torch.bfloat16 else "loop"
    if impl == "grouped":
        dtype = _matmul_dtype(xs, gate_up)  # _grouped_mm takes one dtype and has no autocast rule
        xs, gate_up, down = xs.to(dtype), gate_up.to(dtype), down.to(dtype)
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs)  # [M, 2I]
        g, u = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(g) * u, down.transpose(-2, -1), offs=offs)  # [M, C]
    chunks = []
    # unbind once: indexing [e] per expert would make backward build E full-size gradients
    gate_ups, downs = gate_up.unbind(0), down.unbind(0)
    for e, xe in enumerate(xs.split(counts.tolist())):
        if xe.shape[0] == 0:
            continue
        g, u = linear(xe, gate_ups[e]).chunk(2, dim=-1)  # [n_e, I] each
        chunks.append(linear(F.silu(g) * u, downs[e]))  # [n_e, C]
    return torch.cat(chunks) if chunks else xs * 0.0


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    """Whether "auto" may take torch._grouped_mm for rows on x's device: CUDA, a torch that has it
    (2.8+), and a Hopper or newer GPU (where 2.8 runs it; other GPUs take the loop)."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    return _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) >= (9, 0)


def _matmul_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x and w computes in: autocast's where it is on for x's device."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) in (torch.bfloat16, torch.float16):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(x.dtype, w.dtype)


def dense_experts(x, idx, weights, gate_up, down) -> torch.Tensor:
    """Every expert on every token, weighted by a dense [N, E] matrix that is zero off the top-K: fixed
    shapes, no host read, each weight read once; pays when most experts are active anyway (batches)."""
    h = torch.matmul(x[None], gate_up.transpose(1, 2))  # [E, N, 2I]
    g, u = h.chunk(2, dim=-1)
    ys = torch.bmm(F.silu(g) * u, down.transpose(1, 2))  # [E, N, C]
    w = torch.zeros(x.shape[0], gate_up.shape[0], dtype=ys.dtype, device=x.device)
    w = w.scatter(1, idx, weights.to(ys.dtype))  # [N, E]
    return torch.einsum("enc,ne->nc", ys, w).to(x.dtype)


def gather_experts(x, idx, weights, gate_up, down) -> torch.Tensor:
    """Each (token, expert) pair with its expert's weights gathered: fixed shapes, no host read, one
    batched matmul pair; copies K weight sets per token, so it pays only where a copy is cheap."""
    N, K = idx.shape
    flat = idx.flatten()  # [P = N*K]
    xs = x[:, None].expand(N, K, x.shape[1]).reshape(N * K, 1, x.shape[1])  # [P, 1, C]
    g, u = torch.bmm(xs, gate_up[flat].transpose(1, 2)).chunk(2, dim=-1)  # [P, 1, I] each
    ys = torch.bmm(F.silu(g) * u, down[flat].transpose(1, 2)).view(N, K, -1)  # [N, K, C]
    return (ys * weights[..., None].to(ys.dtype)).sum(1).to(x.dtype)


def indexed_experts(x, idx, weights, gate_up, down, out: torch.Tensor | None = None) -> torch.Tensor:
    """A Python loop over the chosen experts with int indices into the stacked weights: reads idx and
    weights on the host (on a CPU that is no sync), then per active expert one gate_up matmul, SwiGLU,
    one down matmul, accumulated in place. The fewest ops for a few tokens; a GPU never takes it.
    out [N, C]: accumulate into it (e.g. the shared experts' output) instead of into zeros."""
    ids, ws = idx.tolist(), weights.tolist()
    y = torch.zeros_like(x) if out is None else out
    groups: dict[int, tuple[list[int], list[float]]] = {}
    for n, (row_ids, row_ws) in enumerate(zip(ids, ws)):
        for e, w in zip(row_ids, row_ws):
            rows, rws = groups.setdefault(e, ([], []))
            rows.append(n)
            rws.append(w)
    one = x.shape[0] == 1
    for e, (rows, rws) in groups.items():
        xe = x if one else x[rows[0]:rows[0] + 1] if len(rows) == 1 else x[rows]  # [n_e, C]
        g, u = linear(xe, gate_up[e]).chunk(2, dim=-1)  # [n_e, I] each
        ye = linear(F.silu(g) * u, down[e])  # [n_e, C]
        if len(rows) == 1:
            (y if one else y[rows[0]:rows[0] + 1]).add_(ye, alpha=rws[0])
        else:
            ye = ye * torch.tensor(rws, dtype=ye.dtype, device=ye.device)[:, None]
            y.index_add_(0, torch.tensor(rows, device=y.device), ye.to(y.dtype))
    return y


def fused_experts(x, idx, weights, gate_up, down, shared: MLP | None = None) -> torch.Tensor:
    """nanoseek::moe_experts, the C++ op (nanoseek/model/csrc/cpu_moe.cpp): every chosen expert's
    SwiGLU on its tokens, weighted and summed, in one call; each active expert's weights read once.
    No host read in the caller, so it also runs inside compiled graphs. Where it does not apply
    (fused_ok), the same result through dense_experts. shared: the layer's shared MLP (fused_shared_ok),
    added to the result inside the same op."""
    if not (gate_up.is_contiguous() and down.is_contiguous()):  # a layout tune() chose for F.linear
        y = dense_experts(x, idx, weights, gate_up, down)
        return y if shared is None else y + shared(x)
    s = () if shared is None else (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
    return torch.ops.nanoseek.moe_experts(x, idx, weights, gate_up, down, *s).to(x.dtype)


def fused_ok(*weights) -> bool:
    """Whether fused_experts applies to these weights on this host (builds the op on first use): fp32
    CPU tensors, all row-major (tune() may lay any out column-major for F.linear)."""
    return all(isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.device.type == "cpu"
               and w.is_contiguous() for w in weights) and cpu_kernels.load()


def fused_shared_ok(mlp: MLP) -> bool:
    """Whether the fused op can take the shared MLP too: fused_ok weights and no biases."""
    ws = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return all(m.bias is None for m in ws) and fused_ok(*(m.weight for m in ws))


# Inference dispatch of Experts.forward: "sorted" (pairs sorted by expert, then expert_ffn; reads the
# per-expert counts on the host), "indexed" (indexed_experts; CPU only) or one of the fixed-shape
# variants above ("fused" where fused_ok). Which is fastest depends on the host and the number of
# tokens N, so tune_dispatch measures it at engine start: choice_key (rows class of N, the experts'
# shape, device and dtype) -> impl.
# Training (grad enabled) always takes "sorted".
FIXED = {"dense": dense_experts, "gather": gather_experts, "fused": fused_experts}
_DISPATCH_CHOICE: dict[tuple, str] = {}  # choice_key -> impl
_FIXED_CHOICE: dict[tuple, str] = {}  # the same among FIXED (compiled graphs)


def choice_key(n_tokens: int, gate_up: torch.Tensor) -> tuple:
    """What a dispatch choice is kept under: the rows class of n_tokens and the experts' shape, device
    and dtype (a CPU's "fused" must never reach a GPU model of the same shape in the same process)."""
    return (row_class(n_tokens), *gate_up.shape, gate_up.device.type, gate_up.dtype)


def dispatch_impl(n_tokens: int, gate_up) -> str:
    """The Experts.forward variant for n_tokens rows: "sorted" or a FIXED name."""
    if not isinstance(gate_up, torch.Tensor):  # quantised experts: "sorted", one expert's kernel at a time
        return "sorted"
    key = choice_key(n_tokens, gate_up)
    if torch.compiler.is_compiling():  # no host reads inside a compiled graph
        return _FIXED_CHOICE.get(key, "dense")
    if torch.is_grad_enabled() or n_tokens > MAX_ROWS:
        return "sorted"
    impl = _DISPATCH_CHOICE.get(key, "sorted")
    return "sorted" if impl == "indexed" and gate_up.device.type != "cpu" else impl


def clear_dispatch_choices() -> None:
    _DISPATCH_CHOICE.clear()
    _FIXED_CHOICE.clear()


class Experts(nn.Module):
    """E routed SwiGLU experts stored stacked: gate_up_proj [E, 2I, C], down_proj [E, C, I].

    Checkpoints keep them per expert (experts.{e}.gate_proj.weight, ...); checkpoint.py maps."""

    def __init__(self, n_experts: int, hidden: int, inter: int):
        super().__init__()
        self.n_experts, self.inter = n_experts, inter
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))
        self.impl = "auto"  # "loop" | "grouped" | "auto" (grouped on CUDA bf16)

    stacked_weight_names = ("gate_up_proj", "down_proj")  # [E, out, in]: laid out by linear.tune

    def dispatch_weights(self) -> list:
        """One expert's weights, for the projection kernels' timing (nanoseek.model.linear.tune)."""
        return [self.gate_up_proj.unbind(0)[0], self.down_proj.unbind(0)[0]]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                impl: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C], idx/weights [N, K] -> sum_k weights[n, k] * expert_{idx[n, k]}(x[n]), [N, C].
        impl: "sorted", "indexed" or a FIXED name; None: dispatch_impl's choice. out [N, C]: the
        result is added to it (in place, and returned) instead."""
        impl = impl or dispatch_impl(x.shape[0], self.gate_up_proj)
        if impl == "indexed":
            return indexed_experts(x, idx, weights, self.gate_up_proj, self.down_proj, out)
        if out is not None:
            return out.add_(self.forward(x, idx, weights, impl))
        if impl in FIXED:
            return FIXED[impl](x, idx, weights, self.gate_up_proj, self.down_proj)
        N, K = idx.shape
        flat = idx.flatten()  # [N*K]
        order = flat.argsort(stable=True)
        token = order // K  # the token of each sorted (token, expert) pair
        xs = x[token]  # [N*K, C], grouped by expert
        counts = torch.bincount(flat, minlength=self.n_experts)  # [E]
        ys = self.grouped_ffn(xs, counts)  # [N*K, C]
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))

    def grouped_ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [M, C] grouped by expert, counts [E] -> [M, C]; expert parallel overrides this step alone."""
        return expert_ffn(xs, self.gate_up_proj, self.down_proj, counts, self.impl)


def _dispatch_timer(impl, experts, x, idx, weights, repeats: int = 5) -> float:
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.is_cuda else lambda: None  # a GPU runs ahead
    with torch.inference_mode():
        experts(x, idx, weights, impl)
        best = float("inf")
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            experts(x, idx, weights, impl)
            sync()
            best = min(best, time.perf_counter() - t)
    return best


def tune_dispatch(model: nn.Module, max_rows: int, timer=None, use_cache: bool = True) -> list[dict]:
    """Time Experts.forward's inference variants on the model's expert shapes for each rows class up
    to max_rows (N tokens, each with K distinct experts), keep the fastest per class, cache it per
    host with the projection kernels. timer(impl, experts, x, idx, weights) -> seconds."""
    timer = timer or _dispatch_timer
    experts = next((m for m in model.modules() if isinstance(m, Experts)), None)
    if experts is None or not isinstance(experts.gate_up_proj, torch.Tensor):  # quantised: always "sorted"
        return []
    gate_up = experts.gate_up_proj
    E, I2, C = gate_up.shape
    K = next(m for m in model.modules() if isinstance(m, Router)).cfg.num_experts_per_tok
    impls = ["sorted", *(i for i in FIXED if i != "fused" or fused_ok(gate_up, experts.down_proj))]
    impls += ["indexed"] if gate_up.device.type == "cpu" else []
    cached = load_host_cache() if use_cache else {}
    report, fresh = [], False
    gen = torch.Generator().manual_seed(0)
    dev = gate_up.device  # a GPU's choice is kept under its model's name (the host key covers the CPU)
    device_name = f"cuda {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else dev.type
    for rc in ROW_CLASSES[: ROW_CLASSES.index(row_class(max(1, min(max_rows, MAX_ROWS)))) + 1]:
        key = f"experts|{rc}|{E}|{I2}|{C}|{K}|{gate_up.dtype}|{device_name}"
        entry = cached.get(key)
        if entry is None or set(entry.get("us", {})) != set(impls):  # new or changed candidates: measure
            x = torch.randn(rc, C, generator=gen).to(gate_up)
            idx = torch.rand(rc, E, generator=gen).argsort(dim=-1)[:, :K].to(gate_up.device)
            w = torch.rand(rc, K, generator=gen).to(gate_up)
            timings = {i: float("inf") for i in impls}
            for _ in range(ROUNDS):  # interleaved, as for the projection kernels
                for i in impls:
                    timings[i] = min(timings[i], timer(i, experts, x, idx, w))
            best = min(impls, key=lambda i: (timings[i], impls.index(i)))
            entry = {"kernel": best, "us": {i: t * 1e6 for i, t in timings.items()}}
            cached[key], fresh = entry, True
        _DISPATCH_CHOICE[choice_key(rc, gate_up)] = entry["kernel"]
        _FIXED_CHOICE[choice_key(rc, gate_up)] = min(FIXED, key=lambda i: entry["us"].get(i, float("inf")))
        report.append({"kind": "experts", "rows": rc, "out": I2, "in": C, **entry})
    if fresh:  # re-measured choices replace the cached ones
        save_host_cache(cached)
    return report


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = None
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, C]
        weights, idx, scores = self.gate(flat)
        impl = dispatch_impl(flat.shape[0], self.experts.gate_up_proj)
        shared = self.shared_experts
        if impl == "fused" and shared is not None and fused_shared_ok(shared):  # routed + shared: one op
            ex = self.experts
            y = FIXED[impl](flat, idx, weights, ex.gate_up_proj, ex.down_proj, shared=shared)
            return y.view(shape), RouterStats(scores=scores, topk_idx=idx)
        if impl == "indexed" and shared is not None:  # routed experts added onto the shared
            y = self.experts(flat, idx, weights, impl, out=shared(flat)).view(shape)
        else:
            y = self.experts(flat, idx, weights, impl).view(shape)
            if shared is not None:
                y = y + shared(x)
        return y, RouterStats(scores=scores, topk_idx=idx)
