"""ModelRunner: one scheduler step on the model — build the batch, run it over the paged cache, sample.

    runner = ModelRunner(model, cache, disk=None)
    sampled = runner.execute(sched_out, params_of, generators_of)   # {seq_id: SampleResult}

Two batch layouts, chosen per step:
- every sequence decodes one token: one model row per sequence, keys padded to the longest (absorbed
  MLA over the latent, so only the L+R-wide cache is read);
- otherwise (prefill chunks, possibly with decodes): all new tokens packed into one row, the keys
  of each sequence side by side, a block-diagonal causal mask; a lone prompt from position 0 uses
  plain causal attention.
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
        items = out.scheduled
        packed = any(s.num_new_tokens > 1 for s in items)
        view = self.cache.batch([(s.seq.block_table, s.start, s.num_new_tokens) for s in items], packed)
        ids = [t for s in items for t in s.token_ids]
        if packed:
            input_ids = torch.tensor([ids], device=self.device)  # [1, T_total]
            ends = torch.tensor([s.num_new_tokens for s in items]).cumsum(0) - 1
        else:
            input_ids = torch.tensor(ids, device=self.device)[:, None]  # [B, 1]
            ends = torch.arange(len(items))
        rows = [i for i, s in enumerate(items) if s.needs_sample and not s.seq.is_finished]
        if not rows:
            self.model(input_ids, positions=view.positions, mask=view.mask, cache=view,
                       logits_index=ends[:1].to(self.device))
            return {}
        cfg = self.model.config
        absorb = cfg.is_mla and prefer_absorbed(cfg, max(s.num_new_tokens for s in items))
        logits = self.model(input_ids, positions=view.positions, mask=view.mask, cache=view, absorb=absorb,
                            logits_index=ends[rows].to(self.device))  # [n, V]
        seqs = [items[i].seq for i in rows]
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
