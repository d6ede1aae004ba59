"""Training on many processes with `torchrun`: data parallel, expert parallel, FSDP2 on GPU.

    ctx = init_distributed()                          # reads torchrun's env; single process without it
    model = build_model(cfg, device=ctx.device, seed=0)
    model = prepare_model(model, ctx, expert_parallel=True)
    loss = F.cross_entropy(model(x)...)               # x: this rank's share of the global batch
    loss.backward()                                   # grads now equal single-process grads of the global batch
    ctx.all_reduce_mean(loss.detach())                # the global batch's loss, for logging

    full = full_state_dict(model, ctx)                # every rank calls; rank 0 gets the whole model
    load_full_state_dict(model, full_or_loaded, ctx)  # each rank keeps its own expert slice

    torchrun --nproc_per_node 2 -m nanoseek ...       # gloo on CPU, NCCL on GPU

Data parallel: `DistributedDataParallel` averages gradients over ranks, which equals the gradient
of the mean loss over the global batch when every rank holds the same number of tokens.

Expert parallel: every MoE layer's `Experts` is replaced by `EPExperts`, which holds only experts
[rank * E/W, (rank + 1) * E/W). Tokens travel to the rank owning their expert and back with
`all_to_all_single` (differentiable, supported by gloo). The other parameters stay data parallel;
the expert parameters are hidden from DDP. An expert's gradient arrives as the sum over ranks of
each rank's own mean loss, so it is divided by W: the same scale DDP gives the rest, and exactly
the single-process gradient of the global batch.

Balance losses computed from RouterStats on one rank see that rank's tokens only; losses that are
means over sequences (V3's sequence-wise loss) still match single-process training, losses built
from batch-wide statistics (V2's expert-level f_i * P_i) are then per-rank approximations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanoseek.model.moe import Experts


@dataclass
class DistContext:
    """Where this process sits in the job. A single process (world_size 1) needs no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group was initialised

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over ranks, in place (and returned); identity on one process."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (and returned), e.g. expert token counts for the V3 bias update."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def destroy(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
            self.backend = None


def init_distributed(backend: str | None = None) -> DistContext:
    """A DistContext from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (gloo on CPU, NCCL on GPU).

    Without those variables (a plain `python` run) it returns a single-process context and
    initialises nothing."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistContext(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = backend or "nccl"
    else:
        device = torch.device("cpu")
        backend = backend or "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                device_id=device if device.type == "cuda" else None)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


# ---------------------------------------------------------------------- expert parallel
def expert_slice(n_experts: int, rank: int, world_size: int) -> slice:
    """The experts rank `rank` owns: a contiguous block of n_experts / world_size."""
    if n_experts % world_size:
        raise ValueError(f"expert parallel needs n_routed_experts={n_experts} divisible by "
                         f"world_size={world_size}")
    n = n_experts // world_size
    return slice(rank * n, (rank + 1) * n)


def _run_experts(gate_up: torch.Tensor, down: torch.Tensor, xs: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
    """xs [M, C] grouped by expert (counts [El] rows each) -> [M, C] through each row's expert."""
    if xs.is_cuda and xs.dtype == torch.bfloat16:
        offs = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs)  # [M, 2I]
        g, u = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(g) * u, down.transpose(-2, -1), offs=offs)
    chunks = []
    for e, xe in enumerate(xs.split(counts.tolist())):
        if xe.shape[0] == 0:
            continue
        g, u = F.linear(xe, gate_up[e]).chunk(2, dim=-1)  # [n_e, I] each
        chunks.append(F.linear(F.silu(g) * u, down[e]))  # [n_e, C]
    # no rows: still an output of xs, so the all_to_all after it stays in the autograd graph and
    # this rank joins the backward exchange the other ranks start
    return torch.cat(chunks) if chunks else xs * 0.0


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits whose backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                               group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.recv, ctx.send, ctx.group), None, None, None


class EPExperts(Experts):
    """This rank's slice of a layer's routed experts; tokens are exchanged with all_to_all.

    gate_up_proj [E/W, 2I, C], down_proj [E/W, C, I]; `n_experts` stays the global E."""

    def __init__(self, full: Experts, rank: int, world_size: int, group=None):
        nn.Module.__init__(self)
        self.n_experts, self.inter = full.n_experts, full.inter
        self.rank, self.world_size, self.group = rank, world_size, group
        self.owned = expert_slice(full.n_experts, rank, world_size)
        self.n_local = full.n_experts // world_size
        # the same Parameter objects, cut to this rank's slice: an optimizer made before
        # prepare_model (and not stepped yet) then updates exactly what the model uses
        self.gate_up_proj, self.down_proj = full.gate_up_proj, full.down_proj
        with torch.no_grad():
            for p in (self.gate_up_proj, self.down_proj):
                p.data = p.data[self.owned].clone()
        self.impl = full.impl
        for p in (self.gate_up_proj, self.down_proj):
            # each rank's loss is its own mean; the global-batch gradient is their average
            p.register_hook(lambda g, w=world_size: g / w)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, C], idx/weights [N, K] -> [N, C], as Experts.forward but over all ranks' experts."""
        N, K = idx.shape
        W, El = self.world_size, self.n_local
        flat = idx.flatten()  # [N*K]
        order = flat.argsort(stable=True)
        token = order // K
        xs = x[token]  # [N*K, C], grouped by expert, hence by the rank that owns it
        counts = torch.bincount(flat, minlength=self.n_experts)  # [E]
        recv_counts = torch.empty_like(counts)  # [W*El]: rows rank s sends to my expert j at s*El + j
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(W, El)
        send_split = counts.view(W, El).sum(1).tolist()
        recv_split = recv_counts.sum(1).tolist()
        xr = _AllToAll.apply(xs, send_split, recv_split, self.group)  # [M, C] by (source rank, local expert)
        local_e = torch.arange(El, device=x.device).repeat(W).repeat_interleave(recv_counts.flatten())
        perm = local_e.argsort(stable=True)  # regroup the received rows by local expert
        yr = _run_experts(self.gate_up_proj, self.down_proj, xr[perm], recv_counts.sum(0))
        yr = yr[perm.argsort()]  # back to arrival order
        ys = _AllToAll.apply(yr, recv_split, send_split, self.group)  # [N*K, C] in the order of xs
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)


def unwrap(model: nn.Module) -> nn.Module:
    """The CausalLM inside a DDP wrapper (FSDP2 shards in place and wraps nothing)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def expert_modules(model: nn.Module) -> dict[str, Experts]:
    """{qualified name: Experts (or EPExperts)} of every MoE layer."""
    return {name: m for name, m in unwrap(model).named_modules() if isinstance(m, Experts)}


def shard_experts(model: nn.Module, rank: int, world_size: int, group=None) -> list[str]:
    """Replace every Experts by this rank's EPExperts slice, in place; the expert parameter names."""
    names = []
    for name, full in expert_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, EPExperts(full, rank, world_size, group))
        names += [f"{name}.gate_up_proj", f"{name}.down_proj"]
    return names


def prepare_model(model: nn.Module, ctx: DistContext, expert_parallel: bool = False,
                  fsdp: bool = False) -> nn.Module:
    """Wrap a freshly built (identically seeded) CausalLM for `ctx`: DDP, or EP + DDP, or FSDP2 (GPU).

    Returns the model to call; `unwrap(result)` is the CausalLM (config, save_model)."""
    model = model.to(ctx.device)
    if not ctx.distributed or ctx.world_size == 1:
        return model
    ignore: list[str] = []
    if expert_parallel:
        if not expert_modules(model):
            raise ValueError("expert_parallel=True but the model has no MoE layers "
                             f"(model_type={model.config.model_type}, n_routed_experts="
                             f"{model.config.n_routed_experts})")
        group = dist.new_group(list(range(ctx.world_size)))  # own group: never interleaves with DDP's
        ignore = shard_experts(model, ctx.rank, ctx.world_size, group)
    if fsdp:
        return _fully_shard(model, ctx, ignore)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _fully_shard(model: nn.Module, ctx: DistContext, ignore: list[str]) -> nn.Module:
    """FSDP2 over every decoder block and the root, expert slices left out. GPU only.

    UNTESTED HERE: the project's CI has no GPU; this follows torch's fully_shard API (torch >= 2.6)."""
    if ctx.device.type != "cuda":
        raise ValueError(f"fsdp=True needs CUDA devices; this rank runs on {ctx.device}")
    from torch.distributed.fsdp import fully_shard

    params = dict(model.named_parameters())
    ignored = {params[n] for n in ignore}
    for block in model.model.layers:
        fully_shard(block, ignored_params=ignored & set(block.parameters()))
    fully_shard(model, ignored_params=ignored)
    return model


def clip_grad_norm(model: nn.Module, max_norm: float, ctx: DistContext) -> torch.Tensor:
    """Clip by the global gradient norm, as one process holding the whole model would; returns it.

    Replicated gradients are identical on every rank after DDP's all-reduce and count once; each
    rank's expert slice counts once, summed over ranks."""
    inner = unwrap(model)
    ep = {id(p) for m in expert_modules(inner).values() if isinstance(m, EPExperts)
          for p in (m.gate_up_proj, m.down_proj)}
    grads = [p.grad for p in inner.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sq = lambda gs: sum((g.detach().float().pow(2).sum() for g in gs), torch.zeros((), device=grads[0].device))
    replicated = sq(p.grad for p in inner.parameters() if p.grad is not None and id(p) not in ep)
    sharded = sq(p.grad for p in inner.parameters() if p.grad is not None and id(p) in ep)
    if ep:
        ctx.all_reduce_sum(sharded)
    total = (replicated + sharded).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total


# ---------------------------------------------------------------------- full checkpoints
def load_expert_slice(experts: EPExperts, gate_up_full: torch.Tensor, down_full: torch.Tensor) -> None:
    """Copy this rank's slice of a layer's full expert tensors ([E, 2I, C], [E, C, I]) into `experts`."""
    want = (experts.n_experts, *experts.gate_up_proj.shape[1:])
    if tuple(gate_up_full.shape) != want:
        raise ValueError(f"full gate_up_proj has shape {tuple(gate_up_full.shape)}, expected {want}")
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up_full[experts.owned])
        experts.down_proj.copy_(down_full[experts.owned])


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """The state dict of the whole (unsharded-expert) model on rank 0, None on the others.

    Every rank must call it: expert slices are gathered to rank 0. With DDP the rest is
    identical on every rank, so rank 0's copy is taken."""
    inner = unwrap(model)
    state = {k: v.detach().cpu() for k, v in inner.state_dict().items()} if ctx.is_main else None
    for name, m in expert_modules(inner).items():
        if not isinstance(m, EPExperts):
            continue
        for attr in ("gate_up_proj", "down_proj"):
            local = getattr(m, attr).detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(ctx.world_size)] if ctx.is_main else None
            dist.gather(local, parts, dst=0, group=m.group)
            if ctx.is_main:
                state[f"{name}.{attr}"] = torch.cat(parts).cpu()  # [E, ...]
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole-model state dict (e.g. a saved checkpoint) into a plain or expert-parallel model."""
    inner = unwrap(model)
    state = dict(state)
    for name, m in expert_modules(inner).items():
        if isinstance(m, EPExperts):
            load_expert_slice(m, state.pop(f"{name}.gate_up_proj"), state.pop(f"{name}.down_proj"))
    missing, unexpected = inner.load_state_dict(state, strict=False)
    ep_names = {f"{n}.{a}" for n, m in expert_modules(inner).items() if isinstance(m, EPExperts)
                for a in ("gate_up_proj", "down_proj")}
    missing = [k for k in missing if k not in ep_names]
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def to_single_process(model: nn.Module, ctx: DistContext):
    """On rank 0, a plain CausalLM holding every expert (ready for save_model); None elsewhere."""
    from nanoseek.model.transformer import CausalLM

    state = full_state_dict(model, ctx)
    if not ctx.is_main:
        return None
    inner = unwrap(model)
    dtype = next(inner.parameters()).dtype
    full = CausalLM(inner.config).to(dtype=dtype)
    full.load_state_dict(state)
    return full
