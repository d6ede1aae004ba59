"""A few training steps of a tiny MoE model on fixed global batches, on one process or under torchrun.

    python tests/train/dist_worker.py --runs single:deepseek_v2 --out DIR
    python -m torch.distributed.run --nproc_per_node 2 tests/train/dist_worker.py \
        --runs dp:deepseek_v2,ep:deepseek_v2,ep:deepseek_v3 --out DIR

Every step draws the same global batch [B, T] whatever the world size; rank r trains on rows
[r*B/W, (r+1)*B/W). Rank 0 writes the per-step global losses and the final full weights (experts
gathered from all ranks) to DIR/MODE-MODEL_TYPE.json and .pt. test_distributed.py compares runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.model.checkpoint import load_model, save_model
from nanoseek.model.transformer import build_model
from nanoseek.train.distributed import (clip_grad_norm, full_state_dict, init_distributed, load_full_state_dict,
                                        to_single_process)
from nanoseek.train.expert_parallel import EPExperts
from nanoseek.train.parallelize import parallelize, unwrap

GLOBAL_BATCH, SEQ_LEN, LR = 4, 16, 3e-3
CLIP = 0.5  # below the first steps' gradient norm, so clipping acts


def tiny_moe(model_type: str = "deepseek_v2") -> ModelConfig:
    extra = {}
    if model_type == "deepseek_v3":
        extra = dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=2, topk_group=1,
                     norm_topk_prob=True, routed_scaling_factor=2.5)
    return ModelConfig(model_type=model_type, vocab_size=96, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                       n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                       first_k_dense_replace=1, max_position_embeddings=64, **extra)


def global_batch(step: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ_LEN + 1), generator=g)  # [B, T+1]
    return ids[:, :-1], ids[:, 1:]


def lm_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = unwrap(model).compute_logits(model(x))  # [b, T, V]
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def routed_expert_grad_norm(model, ctx) -> float:
    """Norm of the routed experts' gradients alone: Adam hides a wrong gradient scale, this does not."""
    sq = sum(p.grad.pow(2).sum() for n, p in unwrap(model).named_parameters()
             if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    if ctx.distributed and any(isinstance(m, EPExperts) for m in unwrap(model).modules()):
        ctx.all_reduce_sum(sq)  # each rank holds a disjoint slice
    return sq.sqrt().item()


def train(mode: str, steps: int, model_type: str = "deepseek_v2") -> dict:
    ctx = init_distributed()
    torch.manual_seed(0)
    cfg = tiny_moe(model_type)
    model = build_model(cfg, seed=0)
    # the optimizer is made before parallelize, as nanoseek.train.loop does
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    model = parallelize(model, ctx, expert_parallel=(mode == "ep"))
    if GLOBAL_BATCH % ctx.world_size:
        raise ValueError(f"global batch {GLOBAL_BATCH} is not divisible by world_size={ctx.world_size}")
    b = GLOBAL_BATCH // ctx.world_size
    mine = slice(ctx.rank * b, (ctx.rank + 1) * b)
    losses, norms, expert_norms = [], [], []
    for step in range(steps):
        x, y = global_batch(step, cfg.vocab_size)
        loss = lm_loss(model, x[mine], y[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        expert_norms.append(routed_expert_grad_norm(model, ctx))
        norms.append(clip_grad_norm(model, CLIP, ctx).item())
        opt.step()
        losses.append(ctx.all_reduce_mean(loss.detach().clone()).item())
    state = full_state_dict(model, ctx) if ctx.distributed else unwrap(model).state_dict()
    result = {"mode": mode, "world_size": ctx.world_size, "losses": losses, "grad_norms": norms,
              "expert_grad_norms": expert_norms}
    # a full checkpoint loads back into a freshly built (differently seeded) parallel model
    x, y = global_batch(steps, cfg.vocab_size)
    with torch.no_grad():
        result["after_loss"] = ctx.all_reduce_mean(lm_loss(model, x[mine], y[mine])).item()
    shared = [state]
    if ctx.distributed:
        torch.distributed.broadcast_object_list(shared, src=0)
    fresh = parallelize(build_model(cfg, seed=1), ctx, expert_parallel=(mode == "ep"))
    load_full_state_dict(fresh, shared[0])
    with torch.no_grad():
        result["reloaded_loss"] = ctx.all_reduce_mean(lm_loss(fresh, x[mine], y[mine])).item()
    # rank 0 saves a whole-model HF checkpoint (save_model) that loads back as a plain model
    whole = to_single_process(model, ctx) if ctx.distributed else unwrap(model)
    if whole is not None:
        with tempfile.TemporaryDirectory() as tmp:
            loaded = load_model(save_model(whole, Path(tmp) / "ckpt"), dtype=torch.float32)
            with torch.no_grad():
                result["saved_loss"] = lm_loss(loaded, x, y).item()  # the whole global batch
    result["state"] = state
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True,
                   help="comma-separated MODE:MODEL_TYPE, e.g. dp:deepseek_v2,ep:deepseek_v3 (MODE: single, dp, ep)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", required=True, help="folder for MODE-MODEL_TYPE.json and .pt")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    for run in args.runs.split(","):  # one launch, several runs: torchrun start-up costs seconds
        mode, model_type = run.split(":")
        result = train(mode, args.steps, model_type)
        if result["state"] is not None:
            torch.save(result.pop("state"), out / f"{mode}-{model_type}.pt")
            (out / f"{mode}-{model_type}.json").write_text(json.dumps(result))
    init_distributed().destroy()


if __name__ == "__main__":
    main()
