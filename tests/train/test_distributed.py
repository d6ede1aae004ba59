"""Two CPU processes under the real torchrun train like one process on the same global batch.

Data parallel (DDP over gloo) and expert parallel (4 of 8 experts per rank, tokens exchanged with
all_to_all) must give the single-process per-step losses, gradient norms (global clipping acts at
every step) and final weights. The expert-gradient norm is checked on its own because AdamW would
hide a wrong expert-gradient scale in the losses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.model.moe import Experts
from nanoseek.model.transformer import build_model
from nanoseek.train.distributed import DistContext, init_distributed
from nanoseek.train.expert_parallel import expert_slice
from nanoseek.train.parallelize import parallelize, unwrap
from tests.train.dist_worker import tiny_moe, train

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUNS = [("dp", "deepseek_v2"), ("ep", "deepseek_v2"), ("ep", "deepseek_v3")]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Every 2-process run, from one torchrun launch (start-up costs seconds)."""
    out = tmp_path_factory.mktemp("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER),
           "--runs", ",".join(f"{m}:{t}" for m, t in RUNS), "--steps", str(STEPS), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = {}
    for mode, model_type in RUNS:
        r = json.loads((out / f"{mode}-{model_type}.json").read_text())
        r["state"] = torch.load(out / f"{mode}-{model_type}.pt")
        results[mode, model_type] = r
    return results


@pytest.fixture(scope="module")
def single() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {t: train("single", STEPS, t) for t in ("deepseek_v2", "deepseek_v3")}
    finally:
        torch.set_num_threads(threads)


def assert_same_training(ref: dict, got: dict) -> None:
    assert got["world_size"] == 2
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
    assert got["expert_grad_norms"] == pytest.approx(ref["expert_grad_norms"], rel=1e-4)
    assert min(ref["grad_norms"]) > 0.5  # the clip threshold: clipping changed every step
    assert got["state"].keys() == ref["state"].keys()
    # AdamW turns float-order noise in near-zero gradients into updates of up to lr, so weights get
    # a tolerance well below lr (3e-3 per step) rather than the losses' 1e-5
    for name, want in ref["state"].items():
        torch.testing.assert_close(got["state"][name], want, rtol=1e-4, atol=1e-4, msg=name)  # Adam: ~lr/30
    # training moved the weights, so equality above is not that of two untouched models
    init = build_model(tiny_moe(), seed=0).state_dict()
    moved = [n for n in init if n in ref["state"] and not torch.allclose(init[n], ref["state"][n])]
    assert any("experts.gate_up_proj" in n for n in moved) and any("q_proj" in n for n in moved)
    # the gathered full checkpoint loads back into a fresh parallel model and reproduces its loss
    assert got["reloaded_loss"] == pytest.approx(got["after_loss"], rel=1e-6)
    assert got["after_loss"] == pytest.approx(ref["after_loss"], rel=1e-5)
    # ... and so does the HF checkpoint rank 0 writes from it (experts gathered, then save_model)
    assert got["saved_loss"] == pytest.approx(got["after_loss"], rel=1e-5)


def test_data_parallel_matches_single_process(single, two_ranks):
    assert_same_training(single["deepseek_v2"], two_ranks["dp", "deepseek_v2"])


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_expert_parallel_matches_single_process(single, two_ranks, model_type):
    assert_same_training(single[model_type], two_ranks["ep", model_type])


def test_single_process_context_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    t = torch.tensor([3.0, 5.0])
    assert ctx.all_reduce_mean(t) is t and t.tolist() == [3.0, 5.0]
    ctx.barrier()
    model = build_model(tiny_moe(), seed=0)
    same = parallelize(model, ctx, expert_parallel=True)
    assert unwrap(same) is model and all(type(m) is Experts for m in model.modules()
                                         if isinstance(m, Experts))


def test_expert_slice_rejects_uneven_split():
    assert expert_slice(8, 1, 2) == slice(4, 8)
    with pytest.raises(ValueError, match="n_routed_experts=6 divisible by world_size=4"):
        expert_slice(6, 0, 4)


def test_init_rejects_bad_rank(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"RANK=2 must be in \[0, WORLD_SIZE=2\)"):
        init_distributed()
    assert isinstance(DistContext(), DistContext)
