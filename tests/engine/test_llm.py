"""The engine against full recompute: batching, prefix and disk hits, preemption, sampling, bad input."""

import pytest
import torch

from nanoseek.engine.llm import LLM, LLMEngine
from nanoseek.engine.sampling import SamplingParams, SamplingParamsError
from nanoseek.engine.scheduler import RequestRejected
from nanoseek.model.transformer import build_model
from tests.conftest import tiny_llama, tiny_v2, tiny_v3

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def make_model(make_cfg=tiny_v2, seed=3, **kw):
    return build_model(make_cfg(eos_token_id=None, **kw), seed=seed).eval()


def recompute_greedy(model, ids, n):
    """The reference: the whole sequence through the model for every new token, no cache."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model.compute_logits(model(torch.tensor([ids])))[0, -1].argmax()))
    return ids[-n:]


def prompts_of(lengths, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def run(engine, prompts, params=GREEDY):
    reqs = [engine.add_request(f"r{i}", {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    while engine.has_unfinished_requests():
        engine.step()
    return reqs


@pytest.mark.parametrize("make_cfg", [tiny_v2, tiny_v3, tiny_llama])
def test_batched_greedy_equals_full_recompute(make_cfg):
    model = make_model(make_cfg)
    prompts = prompts_of([3, 9, 17, 30, 1])
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=16)
    for p, r in zip(prompts, run(engine, prompts)):
        assert r.outputs[0].token_ids == recompute_greedy(model, p, 8)
        assert r.outputs[0].finish_reason == "length" and r.finished


def test_prefix_hits_are_reported_and_change_nothing():
    model = make_model()
    shared = prompts_of([20])[0]
    engine = LLMEngine(model, block_size=4, num_blocks=64)
    first = run(engine, [shared + [5, 6]])[0]
    second = run(engine, [shared + [7, 8, 9]])[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 20  # five full blocks of the shared prefix
    assert second.outputs[0].token_ids == recompute_greedy(model, shared + [7, 8, 9], 8)


def test_preemption_under_a_tiny_cache_keeps_outputs_exact():
    model = make_model()
    prompts = prompts_of([10, 11, 12, 13], seed=1)
    engine = LLMEngine(model, block_size=4, num_blocks=9, max_num_seqs=4, max_num_batched_tokens=64)
    reqs = run(engine, prompts, SamplingParams(temperature=0, max_tokens=12))
    for p, r in zip(prompts, reqs):
        assert r.outputs[0].token_ids == recompute_greedy(model, p, 12)


def test_preemption_actually_happens():
    model = make_model()
    engine = LLMEngine(model, block_size=4, num_blocks=9, max_num_seqs=4, max_num_batched_tokens=64)
    preempted = []
    for i, p in enumerate(prompts_of([10, 11, 12, 13], seed=1)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=12))
    while engine.has_unfinished_requests():
        out = engine.scheduler.schedule()
        preempted += out.preempted
        sampled = engine.runner.execute(out, lambda s: engine._children[s][1].seq.params, lambda s: None)
        engine.scheduler.update(out, {k: v.token_id for k, v in sampled.items()})
        for s in [s for s in engine._children if engine._children[s][1].seq.is_finished]:
            rid, _ = engine._children.pop(s)
            engine._requests.pop(rid, None)
    assert preempted, "a 9-block cache for 4 sequences of up to 25 tokens must preempt"


def test_disk_cache_serves_a_restarted_engine_and_rejects_bad_files(tmp_path):
    model = make_model()
    prompt = prompts_of([26], seed=2)[0]
    e1 = LLMEngine(model, block_size=4, num_blocks=64, cache_dir=tmp_path / "kv")
    cold = run(e1, [prompt])[0]
    files = sorted((tmp_path / "kv").glob("*.safetensors"))
    assert len(files) >= 6  # the prompt's full blocks were written
    e2 = LLMEngine(model, block_size=4, num_blocks=64, cache_dir=tmp_path / "kv")  # a restart
    warm = run(e2, [prompt])[0]
    assert warm.num_cached_tokens == 24 and e2.disk.hits >= 6
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids

    for f in files:  # truncate every block: each must be ignored and removed, never trusted
        f.write_bytes(f.read_bytes()[:50])
    e3 = LLMEngine(model, block_size=4, num_blocks=64, cache_dir=tmp_path / "kv")
    again = run(e3, [prompt])[0]
    assert again.outputs[0].token_ids == cold.outputs[0].token_ids
    assert again.num_cached_tokens == 0 and e3.disk.rejected == 1  # the first block of the chain
    assert all(f.stat().st_size > 50 for f in files)  # the recomputed blocks were written whole again
    e5 = LLMEngine(model, block_size=4, num_blocks=64, cache_dir=tmp_path / "kv")
    assert run(e5, [prompt])[0].num_cached_tokens == 24

    other = make_model(seed=9)  # other weights, other fingerprint: no hits
    e4 = LLMEngine(other, block_size=4, num_blocks=64, cache_dir=tmp_path / "kv")
    assert run(e4, [prompt])[0].num_cached_tokens == 0


def test_kv_bytes_per_token_is_the_latent():
    cfg = tiny_v2()
    engine = LLMEngine(build_model(cfg), block_size=4, num_blocks=8)
    assert engine.kv_bytes_per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = make_model()
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234)
    target = prompts_of([7], seed=3)[0]
    alone = run(LLMEngine(model, block_size=4, num_blocks=64), [target], params)[0]
    crowd = run(LLMEngine(model, block_size=4, num_blocks=64),
                prompts_of([5, 12, 3], seed=4) + [target], params)[-1]
    assert alone.outputs[0].token_ids == crowd.outputs[0].token_ids
    other = run(LLMEngine(model, block_size=4, num_blocks=64), [target],
                SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=99))[0]
    assert other.outputs[0].token_ids != alone.outputs[0].token_ids


def test_n_samples_share_the_prompt_and_logprobs_are_reported():
    model = make_model()
    engine = LLMEngine(model, block_size=4, num_blocks=64)
    req = run(engine, prompts_of([16], seed=5), SamplingParams(n=3, temperature=1.0, max_tokens=5, seed=7,
                                                                   logprobs=2))[0]
    assert [o.index for o in req.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 5 and len(o.logprobs) == 5 for o in req.outputs)
    first = req.outputs[0]
    assert all(first.token_ids[i] in first.logprobs[i] for i in range(5))
    assert all(len(d) >= 2 and all(v <= 0 for v in d.values()) for d in first.logprobs)


def test_bad_requests_fail_alone_and_the_engine_carries_on():
    model = make_model()
    engine = LLMEngine(model, block_size=4, num_blocks=64, max_model_len=64)
    good = engine.add_request("good", {"prompt_token_ids": [3, 4, 5]}, GREEDY)
    with pytest.raises(RequestRejected, match="64 tokens"):
        engine.add_request("long", {"prompt_token_ids": [3] * 60}, GREEDY)
    with pytest.raises(RequestRejected, match="empty prompt"):
        engine.add_request("empty", {"prompt_token_ids": []}, GREEDY)
    with pytest.raises(RequestRejected, match=r"outside the vocabulary \[0, 96\)"):
        engine.add_request("oov", {"prompt_token_ids": [3, 500]}, GREEDY)
    with pytest.raises(SamplingParamsError, match="temperature"):
        engine.add_request("temp", {"prompt_token_ids": [3]}, SamplingParams(temperature=-1))
    with pytest.raises(SamplingParamsError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(SamplingParamsError, match="n="):
        SamplingParams(n=0)
    while engine.has_unfinished_requests():
        engine.step()
    assert good.outputs[0].token_ids == recompute_greedy(model, [3, 4, 5], 8)


def test_abort_frees_blocks():
    model = make_model()
    engine = LLMEngine(model, block_size=4, num_blocks=16)
    engine.add_request("a", {"prompt_token_ids": list(range(2, 30))}, SamplingParams(max_tokens=30))
    engine.step()
    assert engine.block_manager.num_free_blocks < 16
    assert engine.abort("a")
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == 16


def test_llm_generate_from_a_folder_with_text_and_stop_strings(model_dir):
    folder, tok = model_dir
    llm = LLM(str(folder), block_size=4, num_blocks=64)
    full = llm.generate("def add(", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    assert len(full.text) > 3
    stop = full.text[2:4]  # a string the greedy continuation contains
    cut = llm.generate(["def add("], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text)


def test_generate_cli_streams_text(model_dir):
    import subprocess
    import sys

    folder, _ = model_dir
    r = subprocess.run([sys.executable, "-m", "nanoseek", "generate", "--model", str(folder), "--prompt", "def add(",
                        "--max-tokens", "6"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def add(")
    assert "finish_reason=" in r.stderr


def test_generate_with_one_bad_prompt_queues_nothing():
    model = make_model()
    llm = LLM(model, block_size=4, num_blocks=32)
    with pytest.raises(RequestRejected, match="empty prompt"):
        llm.generate([{"prompt_token_ids": [3, 4]}, {"prompt_token_ids": []}], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == 32
    out = llm.generate([{"prompt_token_ids": [3, 4]}], GREEDY, use_tqdm=False)
    assert out[0].outputs[0].token_ids == recompute_greedy(model, [3, 4], 8)
