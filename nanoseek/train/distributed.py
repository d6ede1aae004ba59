"""Training on many processes with `torchrun`: the process group, and what needs it after the wrappers.

    ctx = init_distributed()                          # reads torchrun's env; single process without it
    model = build_model(cfg, device=ctx.device, seed=0)
    model = parallelize(model, ctx, expert_parallel=True)   # nanoseek.train.parallelize
    loss = F.cross_entropy(model(x)...)               # x: this rank's share of the global batch
    loss.backward()                                   # grads now equal single-process grads of the global batch
    clip_grad_norm(model, 1.0, ctx)                   # the global norm over replicated params and expert slices
    ctx.all_reduce_mean(loss.detach())                # the global batch's loss, for logging

    full = full_state_dict(model, ctx)                # every rank calls; rank 0 gets the whole model
    load_full_state_dict(model, full_or_loaded)       # each rank keeps its own expert slice

    torchrun --nproc_per_node 2 -m nanoseek ...       # gloo on CPU, NCCL on GPU

Data parallel: `DistributedDataParallel` averages gradients over ranks, which equals the gradient
of the mean loss over the global batch when every rank holds the same number of tokens.
Expert parallel: nanoseek.train.expert_parallel.

Balance losses computed from RouterStats on one rank see that rank's tokens only; losses that are
means over sequences (V3's sequence-wise loss) still match single-process training, losses built
from batch-wide statistics (V2's expert-level f_i * P_i) are then per-rank approximations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.train.expert_parallel import EPExperts, expert_modules, load_expert_slice
from nanoseek.train.parallelize import unwrap


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


# ---------------------------------------------------------------------- gradients
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
