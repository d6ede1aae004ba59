"""Measure this machine's serving throughput for a model, the input of cost-plus pricing.

    from nanoseek.serve.calibrate import measure_throughput
    t = measure_throughput(llm_engine, prompt_len=256, decode_tokens=32)
    sheet = derive_price_sheet(t, hardware_cost_per_hour="0.05", margin="0.10", model="default")

Three runs at the engine's own batch sizes (max_num_seqs sequences, max_num_batched_tokens per
step), each over fresh random prompts so nothing is cached unless meant to be:
  prefill  max_num_seqs distinct prompts, 1 output token each: prompt tokens / seconds
  cached   the same prompts again, now prefix-cache hits: prompt tokens / seconds (the hit tokens
           get the whole run's time, so a hit is never priced below what it costs)
  decode   max_num_seqs short prompts; only the steps after every sequence has its first token
           are timed: output tokens / seconds, aggregate over the batch
A warm-up run first keeps one-off costs (allocations, lazy init) out of the numbers.
"""

from __future__ import annotations

import time

import torch

from nanoseek.engine.llm import LLMEngine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.serve.pricing import Throughput

FIRST_ID = 10  # random prompts avoid the special tokens (BOS, EOS, roles, FIM) at the low ids


def _prompts(engine: LLMEngine, count: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    return torch.randint(FIRST_ID, vocab, (count, length), generator=g).tolist()


def _run(engine: LLMEngine, tag: str, prompts: list[list[int]], max_tokens: int,
         decode_only: bool = False) -> tuple[float, int, int]:
    """(seconds, prompt tokens, output tokens); with decode_only the clock starts once every
    sequence has its first token and only later tokens count."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [engine.add_request(f"calibrate-{tag}-{i}", {"prompt_token_ids": p}, params)
            for i, p in enumerate(prompts)]
    start, counted = time.perf_counter(), 0
    if decode_only:
        while not all(r.outputs[0].token_ids for r in reqs):
            engine.step()
        start, counted = time.perf_counter(), sum(len(r.outputs[0].token_ids) for r in reqs)
    while engine.has_unfinished_requests():
        engine.step()
    seconds = time.perf_counter() - start
    produced = sum(len(r.outputs[0].token_ids) for r in reqs) - counted
    return seconds, sum(len(p) for p in prompts), produced


def measure_throughput(engine: LLMEngine, prompt_len: int | None = None, decode_tokens: int = 32,
                       seed: int = 0, progress: bool = True) -> Throughput:
    batch = engine.scheduler.max_num_seqs
    block = engine.block_manager.block_size
    room = engine.max_model_len - decode_tokens - 1
    if prompt_len is None:
        prompt_len = min(512, room)
    if not 1 <= prompt_len <= room:
        raise ValueError(f"prompt_len={prompt_len} must be in [1, {room}] (context {engine.max_model_len} "
                         f"minus decode_tokens={decode_tokens} and one token)")
    # one more token than whole blocks, so the cached run can hit every full block
    prompt_len = max(block + 1, prompt_len - prompt_len % block + 1) if prompt_len > block else prompt_len
    from tqdm import tqdm

    bar = tqdm(total=4, desc="calibrate", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        _run(engine, "warmup", _prompts(engine, min(batch, 2), min(prompt_len, 32), seed + 1), 4)
        bar.update(1)
        prompts = _prompts(engine, batch, prompt_len, seed + 2)
        t_prefill, n_prefill, _ = _run(engine, "prefill", prompts, 1)
        bar.set_postfix_str(f"prefill {n_prefill / t_prefill:.0f} tok/s")
        bar.update(1)
        t_cached, n_cached, _ = _run(engine, "cached", prompts, 1)
        bar.set_postfix_str(f"cached {n_cached / t_cached:.0f} tok/s")
        bar.update(1)
        t_decode, _, n_decode = _run(engine, "decode", _prompts(engine, batch, min(16, prompt_len), seed + 3),
                                     decode_tokens, decode_only=True)
        bar.set_postfix_str(f"decode {n_decode / t_decode:.0f} tok/s")
        bar.update(1)
    finally:
        bar.close()
    if n_decode < 1:
        raise ValueError(f"decode_tokens={decode_tokens} left no decode step to time; use at least 2")

    def rate(tokens: int, seconds: float) -> str:
        return f"{tokens / max(seconds, 1e-9):.1f}"

    return Throughput(rate(n_prefill, t_prefill), rate(n_cached, t_cached), rate(n_decode, t_decode), batch)
