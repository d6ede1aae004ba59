"""A compiled decode step: torch.compile (Inductor: C++ on CPU; Triton replayed as CUDA graphs on
CUDA) over persistent buffers, one per (batch bucket, context bucket).

    step = CompiledDecode(model, cache, backend, max_num_seqs=16)
    logits, _ = step(token_ids, [(block_table, start), ...], rows)   # [len(rows), V], None

A decode batch of B rows is padded to the next batch bucket (1, 2, 4, 8, 16, ... up to max_num_seqs)
and its longest row to the next context bucket (a power of two number of blocks); the step's inputs
are copied into that bucket's persistent buffers and the bucket's compiled function runs on them.
Padding rows attend only to the cache's reserved padding block and their logits are never returned;
padding keys of real rows are masked by their sequence lengths, so padding never reaches a result.

Compilation happens once per bucket, at most `max_buckets` of them (then the step runs eagerly), when a
step first needs the bucket or ahead of that with `warmup(context_tokens)` (LLMEngine.warmup_decode);
Inductor keeps its generated code in its on-disk cache (TORCHINDUCTOR_CACHE_DIR), so a restart on
the same host reuses it. enforce_eager (LLMEngine / --enforce-eager) turns all of this off.
Each bucket's step has a code object of its own: Dynamo keeps compiled entries per code object and
stops compiling one after 8 entries (then runs it eagerly, silently), so buckets sharing one code
object fell back to eager from the ninth (bucket x context x thread count) on. Compiled code is also
guarded on the thread count, so LLMEngine keeps the thread count fixed when it compiles.
"""

from __future__ import annotations

import logging
import time
import types

import torch

from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.model.backend import AttentionMetadata

log = logging.getLogger("nanoseek.engine")


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, ... and max_num_seqs itself."""
    out, b = [], 1
    while b < max_num_seqs:
        out.append(b)
        b *= 2
    return out + [max_num_seqs]


def bucket_of(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} rows exceed the largest batch bucket {buckets[-1]}")


def context_bucket(num_blocks: int) -> int:
    """Blocks per row, rounded up to a power of two (so a context bucket is compiled once)."""
    return 1 << max(0, (num_blocks - 1).bit_length())


def sampled_rows(logits: torch.Tensor, sample_rows: list[int]) -> torch.Tensor:
    """The rows of a decode step's logits [B, V] that sample, [len(sample_rows), V]."""
    if sample_rows == list(range(len(sample_rows))):  # the usual case: every real row samples
        if len(sample_rows) == logits.shape[0]:  # (not len(logits): Tensor.__len__ is Python, ~40 us cold)
            return logits
        return logits[: len(sample_rows)]  # a view, not a gather (190 us for 8 rows of 8,192 here)
    return logits[torch.tensor(sample_rows, device=logits.device)]


def own_code(fn, name: str):
    """fn (a closure) with a code object of its own named `name`: Dynamo's cache of compiled entries,
    and its limit on them, are per code object."""
    return types.FunctionType(fn.__code__.replace(co_name=name, co_qualname=name), fn.__globals__, name,
                              fn.__defaults__, fn.__closure__)


def step_guards(entries) -> list[bool]:
    """Which of Dynamo's guards a bucket's step keeps (torch.compile's guard_filter_fn): the global
    context (grad mode, thread count, default device, ...; these guards have no source name) and the
    tensors that are not parameters (the bucket's buffers, the KV pool). A bucket is always called with
    its own buffers on a model whose weights and kernel choices are fixed once the engine starts, so
    the guards on the model's modules, parameters and globals (hundreds of checks, ~0.5 ms of a B=1
    step here) are dropped."""
    return [not e.name or (e.guard_type == "TENSOR_MATCH" and not isinstance(e.value, torch.nn.Parameter))
            for e in entries]


class CompiledDecode:
    def __init__(self, model, cache: PagedKVCache, backend, max_num_seqs: int, max_buckets: int = 16,
                 compile_backend: str = "inductor", max_blocks_per_row: int | None = None):
        """max_blocks_per_row: the most blocks a row can hold (the engine's context). Given, and where
        the backend's decode reads only each row's own keys (its cost follows the sequence lengths,
        not the width of the block tables), every step uses that one context bucket: a growing
        context never compiles a new bucket, and warmup() covers every step."""
        self.model, self.cache, self.backend = model, cache, backend
        reads_own = backend.reads_only_valid_keys(next(model.parameters()).dtype)
        self.fixed_blocks = max_blocks_per_row if max_blocks_per_row and reads_own else None
        self.batch_buckets = batch_buckets(max_num_seqs)
        self.max_buckets, self.compile_backend = max_buckets, compile_backend
        self.device = cache.device
        self.graphs: dict[tuple[int, int], tuple[dict, object]] = {}  # (B, blocks) -> (buffers, fn)
        self.compile_seconds: dict[tuple[int, int], float] = {}
        self.eager_steps = 0

    def _build(self, B: int, nb: int):
        dev = self.device
        bufs = {"input_ids": torch.zeros(B, 1, dtype=torch.long, device=dev),
                "seq_lens": torch.ones(B, dtype=torch.long, device=dev),
                "block_tables": torch.full((B, nb), self.cache.num_blocks, dtype=torch.long, device=dev),
                "slot_mapping": torch.full((B,), self.cache.pad_slot, dtype=torch.long, device=dev)}
        model, backend, S = self.model, self.backend, nb * self.cache.block_size

        def step(input_ids, seq_lens, block_tables, slot_mapping):
            meta = AttentionMetadata(backend, seq_lens, S, 1, slot_mapping=slot_mapping,
                                     block_tables=block_tables, absorb=True)
            hidden = model(input_ids, attn_metadata=meta)  # [B, 1, C]
            return model.compute_logits(hidden[:, 0])  # [B, V]

        options = {"guard_filter_fn": step_guards}
        if self.compile_backend == "inductor" and dev.type == "cuda":
            # mode "reduce-overhead": replay the step as a CUDA graph (torch.compile takes a mode or
            # options, not both). The graph writes the KV pools, which cudagraph trees allow only for
            # static inputs, and the buffers stay put: both are marked static, so nothing is copied
            # in and the step is not skipped for "mutated inputs".
            options["triton.cudagraphs"] = True
            for t in [*bufs.values(), *self.cache.pools]:
                torch._dynamo.mark_static_address(t)
        elif self.compile_backend == "inductor" and dev.type == "cpu":
            # a C++ wrapper calls the generated kernels (the Python one cost ~1.5 ms per B=1 token)
            options["cpp_wrapper"] = True
        step = own_code(step, f"decode_step_b{B}_n{nb}")
        fn = torch.compile(step, backend=self.compile_backend, dynamic=False, fullgraph=False, options=options)
        return bufs, fn

    def blocks_bucket(self, num_blocks: int) -> int:
        """The context bucket (blocks per row) of a step whose longest row has num_blocks blocks."""
        if self.fixed_blocks is not None and num_blocks <= self.fixed_blocks:
            return self.fixed_blocks
        return context_bucket(num_blocks)

    def warmup(self, context_tokens: int, batches: list[int] | None = None) -> dict[tuple[int, int], float]:
        """Compile the step for each batch bucket (default: all) at the context bucket of
        `context_tokens` keys per row, before any request waits for it: {(B, blocks): seconds}. Each
        runs twice on padding rows alone (the second call records the CUDA graph), which write only
        the pool's padding block."""
        nb = self.blocks_bucket(-(-max(1, context_tokens) // self.cache.block_size))
        done = {}
        with torch.inference_mode():  # the engine's steps run under it, and Dynamo guards on it
            for B in batches or self.batch_buckets:
                key = (bucket_of(B, self.batch_buckets), nb)
                if key in self.compile_seconds or len(self.graphs) >= self.max_buckets:
                    continue
                t = time.perf_counter()
                self.graphs[key] = bufs, fn = self._build(*key)
                for _ in range(2):
                    self._run(fn, bufs)
                done[key] = self.compile_seconds[key] = time.perf_counter() - t
                log.info("warmed up the decode step for batch %d, %d blocks per row in %.1f s", *key, done[key])
        return done

    def _run(self, fn, bufs) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed
        return fn(**bufs)  # [B, V]

    def __call__(self, token_ids: list[int], rows: list[tuple[list[int], int]],
                 sample_rows: list[int]) -> tuple[torch.Tensor, None]:
        """(logits [len(sample_rows), V], None) of one decode step: token_ids[i] is row i's new token
        at position rows[i][1] of the sequence whose blocks are rows[i][0] (None: no argmax comes with
        them, as it does from fused_decode.FusedDecode)."""
        n = len(rows)
        meta = self.cache.metadata(self.backend, rows, num_new=1, absorb=True)
        B = bucket_of(n, self.batch_buckets)
        nb = self.blocks_bucket(meta.block_tables.shape[1])
        key = (B, nb)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_buckets:
                return self._eager(token_ids, meta, sample_rows), None
            self.graphs[key] = self._build(B, nb)
        bufs, fn = self.graphs[key]
        bufs["input_ids"][:n, 0].copy_(torch.tensor(token_ids, dtype=torch.long), non_blocking=True)
        bufs["input_ids"][n:] = 0
        bufs["seq_lens"][:n].copy_(meta.seq_lens)
        bufs["seq_lens"][n:] = 1
        bufs["block_tables"].fill_(0)
        bufs["block_tables"][:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        bufs["block_tables"][n:] = self.cache.num_blocks
        bufs["slot_mapping"][:n].copy_(meta.slot_mapping)
        bufs["slot_mapping"][n:] = self.cache.pad_slot
        first = key not in self.compile_seconds
        t = time.perf_counter()
        logits = self._run(fn, bufs)
        if first:
            self.compile_seconds[key] = time.perf_counter() - t
            log.info("compiled the decode step for batch %d, %d blocks per row in %.1f s", B, nb,
                     self.compile_seconds[key])
        return sampled_rows(logits, sample_rows), None

    def _eager(self, token_ids, meta, sample_rows):
        self.eager_steps += 1
        hidden = self.model(torch.tensor(token_ids, device=self.device)[:, None], attn_metadata=meta)
        return self.model.compute_logits(hidden, torch.tensor(sample_rows, device=self.device))
