"""nanoseek.train.parallelize: wrappers applied from outside leave the model's names, classes and
results alone; `unwrap` finds the CausalLM under any of them."""

from __future__ import annotations

import torch

from nanoseek.model.moe import Experts
from nanoseek.model.transformer import Block, build_model
from nanoseek.train.loop import LocalContext
from nanoseek.train.parallelize import apply_ac, apply_compile, parallelize, unwrap
from tests.conftest import tiny_v2


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    hidden, _ = model(x, return_router_stats=True)
    logits = model.compute_logits(hidden)
    logits.float().logsumexp(-1).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_changes_no_name_no_class_and_no_gradient():
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = build_model(tiny_v2(), seed=0).train()
    ac = build_model(tiny_v2(), seed=0).train()
    names = list(ac.state_dict())
    forward = Block.forward
    assert apply_ac(ac) is ac
    assert list(ac.state_dict()) == names  # checkpoints keep the published tensor names
    assert Block.forward is forward and "forward" not in vars(ac.model.layers[0])  # nothing patched
    want, got = _grads(plain, x), _grads(ac, x)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_unwrap_sees_through_compile_and_one_process_parallelize_is_identity():
    model = build_model(tiny_v2(), seed=0)
    assert unwrap(apply_compile(model)) is model
    same = parallelize(model, LocalContext(device=torch.device("cpu")), expert_parallel=True)
    assert same is model and unwrap(same) is model
    assert all(type(m) is Experts for m in model.modules() if isinstance(m, Experts))
