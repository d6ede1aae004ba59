"""ModelRunner: one scheduler step on the model — build the batch, run it over the paged cache, sample.

    runner = ModelRunner(model, cache, disk=None)
    sampled = runner.execute(sched_out, params_of, generators_of)   # {seq_id: SampleResult}

Each step runs in at most a few forwards:
- all sequences that decode one token together, one model row each, keys padded to the longest
  (absorbed MLA over the latent, so only the L+R-wide cache is read);
- each prompt chunk on its own row: a whole prompt from position 0 is plain causal attention (the
  fused SDPA kernels), a chunk after cached tokens has an explicit [T, S] mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from nanoseek.engine.disk_cache import DiskCache
from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.engine.sampling import SamplingParams, sample
from nanoseek.engine.scheduler import SchedulerOutput
from nanoseek.model.transformer import CausalLM, prefer_absorbed


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob), best first


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, disk: DiskCache | None = None):
        self.model, self.cache, self.disk = model, cache, disk
        self.device = next(model.parameters()).device
        self.eos_token_ids = model.config.eos_token_ids

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, params_of: Callable[[Hashable], SamplingParams],
                generator_of: Callable[[Hashable], torch.Generator | None]) -> dict[Hashable, SampleResult]:
        for block_id, h in out.blocks_to_load:
            self.cache.write_block(block_id, self.disk.take(h))
        sampled: dict[Hashable, SampleResult] = {}
        if out.scheduled:
            sampled = self._run(out, params_of, generator_of)
        if self.disk is not None:
            for block_id, h in out.blocks_to_save:
                self.disk.save(h, self.cache.read_block(block_id))
        return sampled

    def _run(self, out, params_of, generator_of) -> dict[Hashable, SampleResult]:
        """Decoding sequences go through the model together; each prompt chunk on its own (its
        attention stays causal over its own keys, and the weights are read once per chunk anyway)."""
        decodes = [s for s in out.scheduled if s.num_new_tokens == 1 and s.start > 0]
        groups = [[s] for s in out.scheduled if not (s.num_new_tokens == 1 and s.start > 0)]
        if decodes:
            groups.append(decodes)
        results: dict[Hashable, SampleResult] = {}
        for items in groups:
            logits, seqs = self._forward(items)
            if seqs:
                results.update(self._sample(logits, seqs, params_of, generator_of))
        return results

    def _forward(self, items) -> tuple[torch.Tensor | None, list]:
        packed = len(items) == 1  # one sequence, any number of new tokens; else one token per row
        view = self.cache.batch([(s.seq.block_table, s.start, s.num_new_tokens) for s in items], packed)
        ids = torch.tensor([t for s in items for t in s.token_ids], device=self.device)
        input_ids = ids[None] if packed else ids[:, None]  # [1, T] or [B, 1]
        ends = torch.tensor([items[0].num_new_tokens - 1]) if packed else torch.arange(len(items))
        rows = [i for i, s in enumerate(items) if s.needs_sample and not s.seq.is_finished]
        cfg = self.model.config
        absorb = cfg.is_mla and prefer_absorbed(cfg, input_ids.shape[1])
        logits = self.model(input_ids, positions=view.positions, mask=view.mask, cache=view, absorb=absorb,
                            logits_index=ends[rows or [0]].to(self.device))  # [n, V]
        return logits, [items[i].seq for i in rows]

    def _sample(self, logits, seqs, params_of, generator_of) -> dict[Hashable, SampleResult]:
        params = [params_of(s.seq_id) for s in seqs]
        res = sample(logits.float().cpu(), params, [s.prompt_token_ids for s in seqs],
                     [s.output_token_ids for s in seqs], [generator_of(s.seq_id) for s in seqs],
                     eos_token_ids=self.eos_token_ids)
        results = {}
        for j, (seq, p) in enumerate(zip(seqs, params)):
            r = SampleResult(int(res.token_ids[j]))
            if p.logprobs is not None:
                r.logprob = float(res.logprobs[j])
                if p.logprobs > 0:
                    r.top = [(int(t), float(lp)) for t, lp in
                             zip(res.top_token_ids[j, :p.logprobs], res.top_logprobs[j, :p.logprobs])]
            results[seq.seq_id] = r
        return results
