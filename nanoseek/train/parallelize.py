"""Make a built model ready to train, from outside, one wrapper at a time (torchtitan's `parallelize`).

    model = build_model(cfg, seed=0)
    opt = make_optimizer(model, tcfg)                 # before expert parallel: it cuts the same Parameters
    wrapped = parallelize(model, ctx, expert_parallel=True, activation_checkpointing=True)
    unwrap(wrapped) is model                          # the CausalLM, for config, checkpoints and hooks

or piece by piece, in this order:

    ignore = apply_ep(model, ctx)        # every MoE layer keeps its rank's E/W experts (torchrun)
    wrapped = apply_ddp(model, ctx, ignore)   # or apply_fsdp (GPU): the other parameters
    apply_ac(model)                      # recompute each decoder block in the backward pass
    wrapped = apply_compile(wrapped)     # torch.compile

None of these replaces a module's `forward` or patches a class: expert parallel swaps each `Experts`
for an `EPExperts` (a subclass that exchanges tokens with all_to_all, nanoseek.train.expert_parallel),
activation checkpointing is torch's composable `checkpoint` (forward hooks; names and structure
unchanged, so checkpoints keep the published tensor names), and DDP / compile wrap the model in a
module of their own, which `unwrap` sees through. `ctx` is a DistContext (nanoseek.train.distributed)
or anything with rank, world_size, local_rank and device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.train.expert_parallel import expert_modules, shard_experts


def unwrap(model: nn.Module) -> nn.Module:
    """The CausalLM inside any DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def apply_ep(model: nn.Module, ctx) -> list[str]:
    """Expert parallel, in place: each rank keeps experts [rank*E/W, (rank+1)*E/W) of every MoE layer.

    Returns the expert parameters' names, which data parallel must leave alone."""
    if not expert_modules(model):
        raise ValueError("expert parallel needs MoE layers, but the model has none "
                         f"(model_type={model.config.model_type}, n_routed_experts={model.config.n_routed_experts})")
    group = dist.new_group(list(range(ctx.world_size)))  # its own group: never interleaves with DDP's
    return shard_experts(model, ctx.rank, ctx.world_size, group)


def apply_ddp(model: nn.Module, ctx, ignore: list[str] = ()) -> nn.Module:
    """DistributedDataParallel over every parameter but `ignore` (the expert slices)."""
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def apply_fsdp(model: nn.Module, ctx, ignore: list[str] = ()) -> nn.Module:
    """FSDP2 over every decoder block and the root, `ignore` (expert slices) left out. GPU only.

    UNTESTED HERE: the project's CI has no GPU; this follows torch's fully_shard API (torch >= 2.6)."""
    if ctx.device.type != "cuda":
        raise ValueError(f"fsdp needs CUDA devices; this rank runs on {ctx.device}")
    from torch.distributed.fsdp import fully_shard

    params = dict(model.named_parameters())
    ignored = {params[n] for n in ignore}
    for block in model.model.layers:
        fully_shard(block, ignored_params=ignored & set(block.parameters()))
    fully_shard(model, ignored_params=ignored)
    return model


def apply_ac(model: nn.Module) -> nn.Module:
    """Activation checkpointing of every decoder block, in place: a block keeps only its input and
    recomputes the rest in the backward pass. Results are bit-identical to training without it."""
    from torch.distributed._composable import checkpoint

    for block in unwrap(model).model.layers:
        checkpoint(block)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile the whole (possibly wrapped) model; `unwrap` returns the CausalLM inside."""
    return torch.compile(model)


def parallelize(model: nn.Module, ctx, *, expert_parallel: bool = False, fsdp: bool = False,
                activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Apply what the flags ask for, in the one order that works; returns the model to call.

    One process (world_size 1): expert parallel, DDP and FSDP do not apply."""
    model = model.to(ctx.device)
    wrapped = model
    if ctx.world_size > 1:
        ignore = apply_ep(model, ctx) if expert_parallel else []
        wrapped = apply_fsdp(model, ctx, ignore) if fsdp else apply_ddp(model, ctx, ignore)
    if activation_checkpointing:
        apply_ac(model)
    if compile:
        wrapped = apply_compile(wrapped)
    return wrapped
