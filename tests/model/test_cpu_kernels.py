"""nanoseek's C++ CPU kernels against torch: the few-rows projection and the fused routed experts,
eager and inside torch.compile, and the engine's greedy tokens with them chosen."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.engine.llm import LLMEngine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model import cpu_kernels, fast
from nanoseek.model import linear as lin
from nanoseek.model import moe as moe_mod
from nanoseek.model.transformer import build_model
from tests.conftest import tiny_v2

WHY = cpu_kernels.unsupported()
# where the host can build them, the build must succeed: only a host without AVX2/FMA or a compiler skips
needs_kernels = pytest.mark.skipif(WHY is not None, reason=f"nanoseek's CPU kernels do not apply here: {WHY}")


@needs_kernels
def test_kernels_build_where_the_host_supports_them():
    assert cpu_kernels.load(), cpu_kernels.why_unavailable()
    assert lin.register_cpu_kernels() and "gemv" in lin.KERNELS["dense"]


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,out_f,in_f", [(1, 512, 512), (2, 771, 100), (3, 8, 8), (7, 1030, 256),
                                             (16, 64, 1408), (5, 3, 13)])
def test_gemv_equals_f_linear(rows, out_f, in_f, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(rows * out_f + in_f)
        x = torch.randn(rows, in_f, generator=g)
        w, b = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
        torch.testing.assert_close(cpu_kernels.gemv(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(cpu_kernels.gemv(x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-4)
        wide = torch.randn(rows, in_f + 5, generator=g)[:, 2:2 + in_f]  # rows with a stride: no copy needed
        torch.testing.assert_close(cpu_kernels.gemv(wide, w, None), F.linear(wide, w), rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(old)


@needs_kernels
def test_gemv_falls_back_where_it_does_not_apply_and_the_op_names_what_is_wrong():
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    col = w.t().contiguous().t()  # column-major: the op needs contiguous rows
    torch.testing.assert_close(cpu_kernels.gemv(x, col, None), F.linear(x, col))
    torch.testing.assert_close(cpu_kernels.gemv(x.double(), w.double(), None), F.linear(x.double(), w.double()))
    with pytest.raises(RuntimeError, match="fp32 only"):
        torch.ops.nanoseek.gemv(x.double(), w.double())
    with pytest.raises(RuntimeError, match=r"x \[N, I\] and w \[O, I\]"):
        torch.ops.nanoseek.gemv(x, torch.randn(8, 15))


def test_disabled_kernels_say_why_and_linear_keeps_torch(monkeypatch):
    monkeypatch.setenv("NANOSEEK_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_STATE", {})
    assert cpu_kernels.load() is False
    assert cpu_kernels.why_unavailable() == "NANOSEEK_CPU_KERNELS=0"
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    torch.testing.assert_close(cpu_kernels.gemv(x, w, None), F.linear(x, w))
    assert not moe_mod.fused_ok(torch.randn(4, 8, 16), torch.randn(4, 16, 4))


@needs_kernels
@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 16])
def test_fused_experts_equal_the_indexed_loop(tokens):
    g = torch.Generator().manual_seed(tokens)
    E, I, C, K = 8, 24, 40, 3
    gate_up, down = torch.randn(E, 2 * I, C, generator=g) * 0.2, torch.randn(E, C, I, generator=g) * 0.2
    x = torch.randn(tokens, C, generator=g)
    idx = torch.rand(tokens, E, generator=g).argsort(-1)[:, :K]
    idx[0] = torch.tensor([5, 1, 6])  # and every token on the same experts in some rows
    w = torch.rand(tokens, K, generator=g)
    want = moe_mod.indexed_experts(x, idx, w, gate_up, down)
    torch.testing.assert_close(moe_mod.fused_experts(x, idx, w, gate_up, down), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="expert id 8 outside"):
        moe_mod.fused_experts(x, torch.full_like(idx, 8), w, gate_up, down)
    col = down.transpose(-1, -2).contiguous().transpose(-1, -2)  # a column-major layout from tune()
    assert moe_mod.fused_ok(gate_up, down) and not moe_mod.fused_ok(gate_up, col)
    torch.testing.assert_close(moe_mod.fused_experts(x, idx, w, gate_up, col), want, rtol=1e-5, atol=1e-5)
    shared = moe_mod.MLP(C, 2 * I + 4)  # an intermediate size that is no multiple of the row blocks
    with torch.no_grad():
        for p in shared.parameters():
            p.normal_(0, 0.2, generator=g)
        want_shared = want + shared(x)
        for down_w in (down, col):  # the op, and the fallback
            torch.testing.assert_close(moe_mod.fused_experts(x, idx, w, gate_up, down_w, shared=shared), want_shared,
                                       rtol=1e-5, atol=1e-5)
    assert moe_mod.fused_shared_ok(shared) and not moe_mod.fused_shared_ok(moe_mod.MLP(C, I, bias=True))
    with pytest.raises(RuntimeError, match=r"shared_gate and shared_up \[Is, C\], shared_down \[C, Is\]"):
        torch.ops.nanoseek.moe_experts(x, idx, w, gate_up, down, shared.gate_proj.weight, shared.up_proj.weight,
                                       shared.gate_proj.weight)


@needs_kernels
def test_the_ops_compile_into_a_graph_and_agree_with_eager():
    g = torch.Generator().manual_seed(0)
    E, I, C, K = 4, 16, 32, 2
    gate_up, down = torch.randn(E, 2 * I, C, generator=g), torch.randn(E, C, I, generator=g)
    proj = torch.randn(C, C, generator=g)

    def step(x, idx, w):
        h = torch.ops.nanoseek.gemv(torch.relu(x), proj)
        return moe_mod.fused_experts(h, idx, w, gate_up, down) * 2

    x, idx, w = torch.randn(3, C, generator=g), torch.randint(0, E, (3, K), generator=g), torch.rand(3, K, generator=g)
    with torch.inference_mode():
        want = step(x, idx, w)
        got = torch.compile(step, backend="inductor", fullgraph=True, dynamic=False)(x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_engine_with_the_cpu_kernels_chosen_gives_the_reference_greedy_tokens():
    cfg = tiny_v2(num_hidden_layers=3)
    model = build_model(cfg, seed=3).eval()
    prompts = [[5, 9, 2, 33, 7, 12], [40, 41, 3], [8] * 11]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def generate(engine):
        reqs = [engine.add_request(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
        while engine.has_unfinished_requests():
            engine.step()
        assert all(r.error is None for r in reqs), [r.error for r in reqs]
        return [r.outputs[0].token_ids for r in reqs]

    lin.clear_choices()  # the reference: F.linear and torch's dispatch everywhere
    moe_mod.clear_dispatch_choices()
    with fast.reference():
        want = generate(LLMEngine(model, num_blocks=32, block_size=4, tune_kernels=False))
    lin.register_cpu_kernels()
    shapes = {(o, i) for (kind, o, i) in lin.model_weights(model) if kind == "dense"}
    lin.set_choices({("dense", rc, o, i): "gemv" for rc in lin.ROW_CLASSES for o, i in shapes})
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj
    moe_mod._DISPATCH_CHOICE.update({moe_mod.choice_key(rc, gate_up): "fused" for rc in lin.ROW_CLASSES})
    calls = []

    def spy(x, *a, **kw):  # the fused op, counting the rows it gets
        calls.append((x.shape[0], kw.get("shared") is not None))
        return moe_mod.fused_experts(x, *a, **kw)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(moe_mod.FIXED, "fused", spy)
            got = generate(LLMEngine(model, num_blocks=32, block_size=4, tune_kernels=False))
    finally:
        lin.clear_choices()
        moe_mod.clear_dispatch_choices()
    assert got == want
    assert (3, True) in calls  # the three sequences decoded together, shared experts in the same op
