"""The compiled decode step equals eager decoding; bucket padding never reaches a result."""

import pytest
import torch

from nanoseek.engine.compile import CompiledDecode, batch_buckets, bucket_of, context_bucket, step_guards
from nanoseek.engine.llm import LLMEngine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model import cpu_kernels
from nanoseek.model.transformer import build_model
from tests.conftest import tiny_v2


def test_buckets():
    assert batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(6) == [1, 2, 4, 6]
    assert bucket_of(3, [1, 2, 4]) == 4 and [context_bucket(n) for n in (1, 2, 3, 5, 9)] == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError, match="exceed the largest batch bucket 4"):
        bucket_of(5, [1, 2, 4])


def test_step_guards_keep_the_inputs_and_global_context_and_drop_the_model():
    lin = torch.nn.Linear(4, 4)
    kept = {}

    def record(entries):
        keep = step_guards(entries)
        kept.update({(e.guard_type, e.name): k for e, k in zip(entries, keep)})
        return keep

    fn = torch.compile(lambda x: lin(x).relu(), backend="eager", options={"guard_filter_fn": record})
    y = torch.randn(2, 4)
    torch.testing.assert_close(fn(y), lin(y).relu())
    assert kept[("TENSOR_MATCH", "x")] and kept[("GRAD_MODE", "")] and kept[("GLOBAL_STATE", "")]
    params = {k: v for k, v in kept.items() if k[0] == "TENSOR_MATCH" and k[1] != "x"}
    assert len(params) == 2 and not any(params.values())  # weight and bias: fixed once the engine starts
    assert not any(v for k, v in kept.items() if "lin" in k[1])
    x = torch.randn(3, 4)  # a new input shape still fails the kept guard: recompiled, right answer
    torch.testing.assert_close(fn(x), lin(x).relu())


def run(engine, prompts, max_tokens: int = 6):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=2)
    reqs = [engine.add_request(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    while engine.has_unfinished_requests():
        engine.step()
    assert [r.error for r in reqs] == [None] * len(reqs)  # the engine fails a request rather than raise
    return [(r.outputs[0].token_ids, r.outputs[0].logprobs) for r in reqs]


def compare(compile_backend: str, tol: float, lengths=(5, 9, 13), bucket=(4, 4), attention_backend="cpu"):
    model = build_model(tiny_v2(eos_token_id=None), seed=3).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 96, (n,), generator=g).tolist() for n in lengths]  # B = 3
    kw = dict(block_size=4, num_blocks=64, max_num_seqs=4, attention_backend="cpu")
    want = run(LLMEngine(model, **kw), prompts)
    kw["attention_backend"] = attention_backend
    engine = LLMEngine(model, **kw)
    step = CompiledDecode(model, engine.cache, engine.backend, max_num_seqs=4, compile_backend=compile_backend)
    engine.runner.decode_step = step
    got = run(engine, prompts)
    assert bucket in step.graphs and step.eager_steps == 0  # e.g. B = 3 ran in the batch bucket of 4
    assert set(step.compile_seconds) == set(step.graphs)  # every built bucket was called
    for (tokens, lps), (ref_tokens, ref_lps) in zip(got, want):
        assert tokens == ref_tokens
        for a, b in zip(lps, ref_lps):
            assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < tol


@pytest.mark.parametrize("attention_backend", ["cpu"] + (["cpu-kernel"] if cpu_kernels.unsupported() is None else []))
def test_padded_bucket_traced_by_dynamo_equals_eager(attention_backend):
    """torch.compile's graph capture (Dynamo, no code generation): B = 3 padded to 4 gives B = 3's tokens
    (also through the C++ attention op, traced by its shape-only kernel)."""
    compare("eager", 1e-6 if attention_backend == "cpu" else 1e-5, attention_backend=attention_backend)


def test_each_bucket_compiles_under_its_own_recompile_limit():
    """Buckets used to share one code object, and so Dynamo's limit of 8 compiled entries: the ninth
    (bucket, context, thread count) ran eagerly without a word. With a limit of 1 that fails loudly,
    two buckets still compile; and a compiling engine does not switch thread counts."""
    model = build_model(tiny_v2(eos_token_id=None), seed=3).eval()
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_seqs=4, attention_backend="cpu",
                       enforce_eager=False)
    assert engine.decode_threads is None
    engine.decode_step.compile_backend = "eager"
    g = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        run(engine, [torch.randint(2, 96, (n,), generator=g).tolist() for n in (5, 9, 13)])  # batch bucket 4
        run(engine, [torch.randint(2, 96, (9,), generator=g).tolist()])  # batch bucket 1
    assert {(4, 4), (1, 4)} <= set(engine.decode_step.graphs) and engine.decode_step.eager_steps == 0


def test_one_sequence_decodes_through_the_compiled_step():
    """B = 1 is a decode step too (it once took the eager path as a one-sequence 'packed' group)."""
    compare("eager", 1e-6, lengths=(9,), bucket=(1, 4))


@pytest.mark.slow
def test_inductor_compiled_decode_equals_eager():
    """Inductor's generated C++ (minutes to compile on 2 cores): same tokens, logprobs to 1e-5."""
    compare("inductor", 1e-5)


@pytest.mark.skipif(cpu_kernels.unsupported() is not None,
                    reason=f"nanoseek's CPU kernels do not apply here: {cpu_kernels.unsupported()}")
def test_warmup_compiles_every_batch_bucket_and_the_cpp_attention_needs_one_context_bucket():
    """LLMEngine.warmup_decode compiles each batch bucket before any request (padding rows only: no
    real block is written). With the C++ attention, whose cost follows the sequence lengths, one
    context bucket (the whole context) serves every step: contexts that grow past several powers of two
    blocks compile nothing new, and the tokens equal eager decode. The torch attention keeps
    power-of-two context buckets (its cost follows their width)."""
    model = build_model(tiny_v2(eos_token_id=None), seed=3).eval()
    kw = dict(block_size=4, num_blocks=64, max_num_seqs=4, max_model_len=128)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 96, (n,), generator=g).tolist() for n in (3, 6, 9)]  # 1-3 blocks ...
    want = run(LLMEngine(model, attention_backend="cpu-kernel", **kw), prompts, max_tokens=20)  # to 6-8 blocks
    engine = LLMEngine(model, attention_backend="cpu-kernel", enforce_eager=False, **kw)
    step = engine.decode_step
    step.compile_backend = "eager"  # Dynamo's capture, no code generation (fast)
    assert step.fixed_blocks == 32  # 128 tokens / 4
    warmed = engine.warmup_decode()
    assert set(warmed) == {(1, 32), (2, 32), (4, 32)}
    assert all(p[:64].abs().sum() == 0 for p in engine.cache.pools)  # only the padding block written
    got = run(engine, prompts, max_tokens=20)
    assert set(step.graphs) == set(warmed) and step.eager_steps == 0  # nothing compiled while serving
    for (tokens, lps), (ref_tokens, ref_lps) in zip(got, want):
        assert tokens == ref_tokens
        assert max(abs(a[k] - b[k]) for a, b in zip(lps, ref_lps) for k in a) < 1e-5

    torch_attention = LLMEngine(model, attention_backend="cpu", enforce_eager=False, **kw)
    torch_attention.decode_step.compile_backend = "eager"
    assert torch_attention.decode_step.fixed_blocks is None
    assert set(torch_attention.warmup_decode(context_tokens=10)) == {(1, 4), (2, 4), (4, 4)}
    assert torch_attention.decode_step.blocks_bucket(5) == 8
