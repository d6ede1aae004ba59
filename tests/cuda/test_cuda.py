"""nanoseek on a CUDA device: deselected by default (`-m cuda` selects them; bench/gpu.sh runs them on a
GPU), and failing, not skipping, when selected without one.

- the model's forward on the GPU equals the CPU's (fp32), bf16 stays close to fp32;
- the grouped experts (torch._grouped_mm) equal the loop, forward and backward, and bf16 autocast
  takes them;
- the engine's CUDA backend equals the reference through prefix hits, chunked prefill, preemption and a
  restart from the disk cache (the CPU backends' scenario, tests/engine/test_backends.py);
- the compiled decode step (Inductor, replayed as CUDA graphs) equals eager, padding included, and
  really is replayed as graphs;
- a few training steps on the GPU (bf16 autocast) lower the loss.
"""

import pytest
import torch

from nanoseek.engine.backends import choose_backend
from nanoseek.engine.compile import CompiledDecode
from nanoseek.engine.llm import LLMEngine
from nanoseek.model.moe import expert_ffn
from nanoseek.model.transformer import build_model
from tests.conftest import TINY, tiny_v2, tiny_v3
from tests.engine.test_backends import scenario
from tests.engine.test_compile import run

pytestmark = pytest.mark.cuda
DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("tests marked cuda need a CUDA device (deselected by default; bench/gpu.sh runs them)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ids_for(cfg, seed=0):
    return torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_on_cuda_equals_the_cpu(name):
    cfg = TINY[name]()
    model = build_model(cfg, seed=11).eval()
    ids = ids_for(cfg)
    with torch.no_grad():
        want = model.compute_logits(model(ids))
        got = model.to(DEV).compute_logits(model(ids.to(DEV))).cpu()
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |cuda - cpu| = {diff:.2e}"


@pytest.mark.parametrize("name", sorted(TINY))
def test_bf16_forward_stays_close_to_fp32(name):
    cfg = TINY[name]()
    model = build_model(cfg, seed=11, device=DEV).eval()
    ids = ids_for(cfg).to(DEV)
    with torch.no_grad():
        want = model.compute_logits(model(ids))
        got = model.to(torch.bfloat16).compute_logits(model(ids))
    assert model.inv_freq.dtype == torch.float32
    assert got.dtype == torch.bfloat16 and rel(got, want) < 3e-2, f"{name}: relative error {rel(got, want):.2e}"


def test_grouped_experts_equal_the_loop_and_bf16_autocast_takes_them(monkeypatch):
    g = torch.Generator().manual_seed(7)
    E, C, inter = 8, 128, 64
    gate_up = (torch.randn(E, 2 * inter, C, generator=g) * 0.1).to(DEV).requires_grad_()
    down = (torch.randn(E, C, inter, generator=g) * 0.1).to(DEV).requires_grad_()
    counts = torch.tensor([5, 0, 9, 2, 0, 7, 1, 8], device=DEV)  # two experts with no rows
    xs, dy = (torch.randn(32, C, generator=g).to(DEV) for _ in range(2))
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    outs = {}
    for impl in ("loop", "grouped", "auto"):
        x = xs.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = expert_ffn(x, gate_up, down, counts, impl)
        (y.float() * dy).sum().backward()
        outs[impl] = (y.float(), x.grad, gate_up.grad.clone(), down.grad.clone())
        gate_up.grad = down.grad = None
    assert len(calls) == 4  # grouped and auto, two products each
    for a, b in zip(outs["loop"], outs["grouped"]):
        assert rel(a, b) < 2e-2
    for a, b in zip(outs["grouped"], outs["auto"]):
        assert torch.equal(a, b)
    with torch.no_grad():  # bf16 weights without autocast: grouped too
        y = expert_ffn(xs.bfloat16(), gate_up.bfloat16(), down.bfloat16(), counts)
    assert len(calls) == 6 and rel(y, outs["loop"][0]) < 2e-2


@pytest.mark.parametrize("make_cfg", [tiny_v2, tiny_v3])
def test_cuda_backend_equals_reference_through_hits_chunks_preemption_and_restart(make_cfg, tmp_path):
    model = build_model(make_cfg(eos_token_id=None), seed=3, device=DEV).eval()
    want = scenario(model, "reference", tmp_path)
    got = scenario(model, "cuda", tmp_path)
    for (tokens, lps), (ref_tokens, ref_lps) in zip(got, want):
        assert tokens == ref_tokens
        worst = max(abs(a[k] - b[k]) for a, b in zip(lps, ref_lps) for k in a)
        assert worst < 1e-4, f"logprobs differ by {worst:.2e}"


def test_auto_backend_times_both_cuda_candidates():
    model = build_model(tiny_v2(), seed=3, device=DEV).eval()
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_seqs=4)
    assert set(engine.backend_timings) == {"reference", "cuda"}
    assert engine.backend.name == min(engine.backend_timings, key=engine.backend_timings.get)
    backend, _ = choose_backend(engine.cache, model.config, "cuda")
    assert backend.name == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_replays_cuda_graphs_and_equals_eager(dtype):
    """B = 3 padded to the bucket of 4; fp32 logprobs to 1e-5, bf16 the same greedy tokens for the
    first steps (ties aside, rounding cannot move them far) and logprobs to 5e-2."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    model = build_model(tiny_v2(eos_token_id=None), seed=3, device=DEV, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 96, (n,), generator=g).tolist() for n in (5, 9, 13)]
    kw = dict(block_size=4, num_blocks=64, max_num_seqs=4, attention_backend="cuda")
    want = run(LLMEngine(model, **kw), prompts)
    engine = LLMEngine(model, **kw)
    step = CompiledDecode(model, engine.cache, engine.backend, max_num_seqs=4)
    engine.runner.decode_step = step
    counters.clear()
    got = run(engine, prompts)
    assert (4, 4) in step.graphs and step.eager_steps == 0
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and sum(map(len, manager.roots.values())) > 0  # graphs were recorded
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for (tokens, lps), (ref_tokens, ref_lps) in zip(got, want):
        if dtype == torch.float32:
            assert tokens == ref_tokens
        else:
            assert tokens[:2] == ref_tokens[:2]
        agree = next((i for i, (t, r) in enumerate(zip(tokens, ref_tokens)) if t != r), len(tokens))
        # up to the first token that differs (after it the two runs see different contexts)
        pairs = list(zip(lps, ref_lps))[: agree + 1]
        worst = max(abs(a[k] - b[k]) for a, b in pairs for k in a if k in b)
        assert worst < tol, f"{dtype}: logprobs differ by {worst:.2e}"


def test_training_steps_on_cuda_lower_the_loss(tmp_path):
    """The trainer's GPU mode: fp32 weights, bf16 autocast (the experts through _grouped_mm)."""
    from nanoseek.train.config import TrainConfig
    from nanoseek.train.step import make_optimizer, train_step

    cfg = tiny_v3()
    tcfg = TrainConfig(model_config="-", data="-", out=str(tmp_path), lr=3e-3, warmup_steps=0,
                       schedule="constant", max_steps=20)
    model = build_model(cfg, seed=0, device=DEV).train()
    opt = make_optimizer(model, tcfg)
    ids = torch.randint(2, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0)).to(DEV)
    losses = [train_step(model, [(ids[:, :-1], ids[:, 1:])], opt, tcfg, step=i,
                         autocast_dtype=torch.bfloat16)["loss"] for i in range(20)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5, losses
