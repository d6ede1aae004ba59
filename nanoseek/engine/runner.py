"""ModelRunner: one scheduler step on the model — build the metadata, run the model, sample on its device.

    runner = ModelRunner(model, cache, backend, disk=None)
    sampled = runner.execute(sched_out, params_of, generators_of, grammar_of)   # {seq_id: SampleResult}

Each step runs in at most a few forwards:
- all sequences that decode one token together, one model row each (absorbed MLA over the latent,
  through the attention backend, optionally a compiled step per batch bucket: compile.py);
- each prompt chunk on its own row: a whole prompt from position 0 is plain causal attention over its
  own keys (the fused SDPA kernels), a chunk after cached tokens attends through the backend.
The metadata (slot mapping, block tables, sequence lengths) is built once per forward on the host and
moved to the device; nothing on the model's side reads a value back until the sampled ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from nanoseek.engine.disk_cache import DiskCache
from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.engine.sampling import SamplingParams, sample
from nanoseek.engine.structured import GrammarState, fill_bitmask, unpack_bitmask
from nanoseek.engine.scheduler import SchedulerOutput
from nanoseek.engine.threads import DecodeThreads
from nanoseek.model.backend import prefer_absorbed
from nanoseek.model.linear import row_class
from nanoseek.model.transformer import CausalLM


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob), best first


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, backend, disk: DiskCache | None = None,
                 decode_step=None, threads: DecodeThreads | None = None):
        self.model, self.cache, self.backend, self.disk = model, cache, backend, disk
        self.decode_step = decode_step  # compile.CompiledDecode, fused_decode.FusedDecode, or None: the model
        self.threads = threads  # intra-op threads of decode steps, chosen by measurement (threads.py)
        self.device = next(model.parameters()).device
        self.eos_token_ids = model.config.eos_token_ids

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, params_of: Callable[[Hashable], SamplingParams],
                generator_of: Callable[[Hashable], torch.Generator | None],
                grammar_of: Callable[[Hashable], GrammarState | None] = lambda sid: None
                ) -> dict[Hashable, SampleResult]:
        for block_id, h in out.blocks_to_load:
            self.cache.write_block(block_id, self.disk.take(h))
        sampled: dict[Hashable, SampleResult] = {}
        if out.scheduled:
            sampled = self._run(out, params_of, generator_of, grammar_of)
        if self.disk is not None:
            for block_id, h in out.blocks_to_save:
                self.disk.save(h, self.cache.read_block(block_id))
        return sampled

    def _run(self, out, params_of, generator_of, grammar_of) -> dict[Hashable, SampleResult]:
        """Decoding sequences go through the model together; each prompt chunk on its own (its
        attention stays causal over its own keys, and the weights are read once per chunk anyway)."""
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1 and s.start > 0]
        groups = [[s] for s in out.scheduled if not (s.num_new_tokens == 1 and s.start > 0)]
        if decodes:
            groups.append(decodes)
        results: dict[Hashable, SampleResult] = {}
        default = torch.get_num_threads()
        try:
            for items in groups:
                key = row_class(len(items)) if items is decodes and self.threads is not None else None
                threads = self.threads.pick(key) if key is not None else default
                if threads != torch.get_num_threads():
                    torch.set_num_threads(threads)
                t = time.perf_counter()
                logits, seqs, top = self._forward(items)
                if seqs:
                    results.update(self._sample(logits, seqs, params_of, generator_of, grammar_of, top))
                if key is not None:
                    self.threads.record(key, threads, time.perf_counter() - t)
        finally:
            if torch.get_num_threads() != default:
                torch.set_num_threads(default)
        return results

    def _forward(self, items) -> tuple[torch.Tensor | None, list, list[int] | None]:
        """(logits [n, V] of the n rows that sample, their sequences, their argmax where the step
        gave it (the fused decode step) or None)."""
        packed = len(items) == 1  # one sequence, any number of new tokens; else one token per row
        T = items[0].num_new_tokens if packed else 1
        rows = [i for i, s in enumerate(items) if s.needs_sample and not s.seq.is_finished]
        ids = [t for s in items for t in s.token_ids]
        cfg = self.model.config
        absorb = cfg.is_mla and prefer_absorbed(cfg, T)
        tables = [(s.seq.block_table, s.start) for s in items]
        if self.decode_step is not None and T == 1 and absorb:  # a decode step, B = 1 included
            logits, top = self.decode_step(ids, tables, rows or [0])  # [n, V]
            return logits, [items[i].seq for i in rows], top
        meta = self.cache.metadata(self.backend, tables, num_new=T, absorb=absorb)
        input_ids = torch.tensor(ids, device=self.device).view(len(items), T)  # [B, T]
        ends = [T - 1] if packed else rows or [0]
        hidden = self.model(input_ids, attn_metadata=meta)  # [B, T, C]
        if T == 1 and len(rows) == len(items):  # every row samples (a plain decode step)
            return self.model.compute_logits(hidden[:, 0]), [s.seq for s in items], None  # [B, V]
        logits = self.model.compute_logits(hidden, torch.tensor(ends, device=self.device))  # [n, V]
        return logits, [items[i].seq for i in rows], None

    def allowed_tokens(self, seqs, grammar_of, vocab_size: int) -> torch.Tensor | None:
        """[n, V] bool of the tokens each sampling row may take (structured output); None: all."""
        bitmask = fill_bitmask([grammar_of(s.seq_id) for s in seqs], vocab_size)  # [n, W] on the host
        return None if bitmask is None else unpack_bitmask(bitmask, vocab_size).to(self.device)

    def _sample(self, logits, seqs, params_of, generator_of, grammar_of,
                top: list[int] | None = None) -> dict[Hashable, SampleResult]:
        """top: each row's argmax, where the step gave it."""
        params = [params_of(s.seq_id) for s in seqs]
        if all(p.is_plain_greedy and s.num_output_tokens >= p.min_tokens for p, s in zip(params, seqs)):
            # the usual greedy step: the argmax is all sample() would do (nothing masked, nothing asked)
            top = logits.argmax(dim=-1).tolist() if top is None else top
            return {s.seq_id: SampleResult(t) for s, t in zip(seqs, top)}
        res = sample(logits, params, [s.prompt_token_ids for s in seqs],
                     [s.output_token_ids for s in seqs], [generator_of(s.seq_id) for s in seqs],
                     eos_token_ids=self.eos_token_ids,
                     allowed=self.allowed_tokens(seqs, grammar_of, logits.shape[-1]))
        token_ids = res.token_ids.tolist()  # the one read back per step
        want_logprobs = any(p.logprobs is not None for p in params)
        logprobs = res.logprobs.tolist() if want_logprobs else None
        top_ids = res.top_token_ids.tolist() if res.top_token_ids is not None else None
        top_lps = res.top_logprobs.tolist() if res.top_logprobs is not None else None
        results = {}
        for j, (seq, p) in enumerate(zip(seqs, params)):
            r = SampleResult(int(token_ids[j]))
            if p.logprobs is not None:
                r.logprob = float(logprobs[j])
                if p.logprobs > 0:
                    r.top = list(zip(top_ids[j][:p.logprobs], top_lps[j][:p.logprobs]))
            results[seq.seq_id] = r
        return results
