"""Expert parallelism: each rank holds E/W of every MoE layer's routed experts; tokens travel to the
rank that owns their expert and back with `all_to_all_single` (differentiable, supported by gloo).

    names = shard_experts(model, rank, world_size, group)   # in place: Experts -> EPExperts
    (nanoseek.train.parallelize.apply_ep does this for a DistContext)

`EPExperts` is an `Experts` whose one dispatch step (`grouped_ffn`, which runs expert_ffn from
nanoseek.model.moe) sends the rows grouped by expert to their owners, runs this rank's experts on
the rows it received, and sends the results back; routing, sorting and combining are Experts'
own. An expert's gradient arrives as the sum over ranks of each rank's own mean loss, so it is
divided by W: the same scale DDP gives the rest, and exactly the single-process gradient of the
global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.model.moe import Experts, expert_ffn


def expert_slice(n_experts: int, rank: int, world_size: int) -> slice:
    """The experts rank `rank` owns: a contiguous block of n_experts / world_size."""
    if n_experts % world_size:
        raise ValueError(f"expert parallel needs n_routed_experts={n_experts} divisible by "
                         f"world_size={world_size}")
    n = n_experts // world_size
    return slice(rank * n, (rank + 1) * n)


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
        # parallelize (and not stepped yet) then updates exactly what the model uses
        self.gate_up_proj, self.down_proj = full.gate_up_proj, full.down_proj
        with torch.no_grad():
            for p in (self.gate_up_proj, self.down_proj):
                p.data = p.data[self.owned].clone()
        self.impl = full.impl
        for p in (self.gate_up_proj, self.down_proj):
            # each rank's loss is its own mean; the global-batch gradient is their average
            p.register_hook(lambda g, w=world_size: g / w)

    def grouped_ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [M, C] grouped by global expert (counts [E] rows each) -> [M, C], computed by the ranks
        that own the experts: rows go out with all_to_all, through expert_ffn there, and back."""
        W, El = self.world_size, self.n_local
        recv_counts = torch.empty_like(counts)  # [W*El]: rows rank s sends to my expert j at s*El + j
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(W, El)
        send_split = counts.view(W, El).sum(1).tolist()
        recv_split = recv_counts.sum(1).tolist()
        xr = _AllToAll.apply(xs, send_split, recv_split, self.group)  # [R, C] by (source rank, local expert)
        local_e = torch.arange(El, device=xs.device).repeat(W).repeat_interleave(recv_counts.flatten())
        perm = local_e.argsort(stable=True)  # regroup the received rows by local expert
        yr = expert_ffn(xr[perm], self.gate_up_proj, self.down_proj, recv_counts.sum(0), self.impl)
        yr = yr[perm.argsort()]  # back to arrival order
        return _AllToAll.apply(yr, recv_split, send_split, self.group)  # [M, C] in the order of xs


def expert_modules(model: nn.Module) -> dict[str, Experts]:
    """{qualified name: Experts (or EPExperts)} of every MoE layer of `model` (a CausalLM, not a wrapper)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Experts)}


def shard_experts(model: nn.Module, rank: int, world_size: int, group=None) -> list[str]:
    """Replace every Experts by this rank's EPExperts slice, in place; the expert parameter names."""
    names = []
    for name, full in expert_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, EPExperts(full, rank, world_size, group))
        names += [f"{name}.gate_up_proj", f"{name}.down_proj"]
    return names


def load_expert_slice(experts: EPExperts, gate_up_full: torch.Tensor, down_full: torch.Tensor) -> None:
    """Copy this rank's slice of a layer's full expert tensors ([E, 2I, C], [E, C, I]) into `experts`."""
    want = (experts.n_experts, *experts.gate_up_proj.shape[1:])
    if tuple(gate_up_full.shape) != want:
        raise ValueError(f"full gate_up_proj has shape {tuple(gate_up_full.shape)}, expected {want}")
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up_full[experts.owned])
        experts.down_proj.copy_(down_full[experts.owned])
