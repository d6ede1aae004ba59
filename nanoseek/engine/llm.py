"""LLM / SamplingParams / RequestOutput, following vLLM's offline interface, over nanoseek's engine.

    from nanoseek import LLM, SamplingParams
    llm = LLM(model="runs/default/model", max_num_seqs=16, cache_dir="runs/kv-cache")
    outs = llm.generate(["def fib(n):", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text, outs[0].num_cached_tokens

The step-wise interface, for servers: `engine.add_request(id, prompt, params)`, `engine.step()` (the
requests that progressed, with `delta_text` per output), `engine.abort(id)`. The engine works in
token ids; text only enters through the tokenizer at the edges (prompts in, detokenized deltas out).
`engine.check_request(ids, params)` is the one validation of a request against the engine (the same
`add_request` runs), for a server to refuse a request before it queues it.

A prompt dict may carry a `cache_salt` (vLLM's name): its blocks' prefix hashes start from it, so
only requests with the same salt share cached prefixes, in memory and on disk (a server passes
the tenant, so one tenant cannot probe another's prompts through cache hits).

Failures stay with the requests they hit. A step that raises (the model, a disk load) fails the
requests it scheduled and leaves the engine ready for the next step; an error while one request's
output is processed fails that request alone. Either way `step()` returns the failed requests
finished, with `error` set (a string naming the exception), and raises nothing.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable

import torch

from nanoseek.engine.backends import choose_backend
from nanoseek.engine.block_manager import BlockManager
from nanoseek.engine.compile import CompiledDecode
from nanoseek.engine.detokenize import IncrementalDetokenizer
from nanoseek.engine.disk_cache import DiskCache, model_fingerprint
from nanoseek.engine.fused_decode import FusedDecode, choose_decode_step
from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.engine.runner import ModelRunner
from nanoseek.engine.sampling import SamplingParams, make_generator
from nanoseek.engine.scheduler import RequestRejected, Scheduler
from nanoseek.engine.sequence import Sequence
from nanoseek.engine.structured import GrammarState, Grammars
from nanoseek.engine.threads import DecodeThreads
from nanoseek.model.linear import MAX_ROWS, format_report, tune
from nanoseek.model.moe import tune_dispatch

log = logging.getLogger("nanoseek.engine")

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestRejected",
           "RequestFailed"]


class RequestFailed(RuntimeError):
    """The engine failed while running this request (not the request's fault): a server error."""

    def __init__(self, request_id: str, error: str):
        super().__init__(f"request {request_id!r} failed in the engine: {error}")
        self.request_id, self.error = request_id, error


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {chosen and top ids: logprob}
    cumulative_logprob: float | None = None
    delta_text: str = ""  # text released by the latest step (streaming)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = False
    arrival_time: float = 0.0
    first_token_time: float | None = None
    error: str | None = None  # set (with finished) when the engine failed this request


@dataclass
class _Child:
    seq: Sequence
    out: CompletionOutput
    detok: IncrementalDetokenizer | None
    generator: torch.Generator | None
    grammar: GrammarState | None = None   # where the output stands in its structured_outputs grammar


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 * 2 ** 30


class LLMEngine:
    def __init__(self, model, tokenizer=None, *, block_size: int = 64, num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, kv_cache_fraction: float = 0.2,
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 cache_dir: str | os.PathLike | None = None, disk_cache_bytes: int = 2 ** 30,
                 cache_dtype: torch.dtype | None = None, tune_kernels: bool = True,
                 attention_backend: str = "auto", enforce_eager: bool = True,
                 decode_threads: int | str | None = "auto", decode_kernel: str = "auto"):
        """decode_kernel: the uncompiled decode step: "fused" (one C++ op per token, fused_decode.py),
        "model" (the model's forward), or "auto": the faster of the two on this engine's shapes, timed
        at start, where the fused step applies (fp32 MLA on a CPU with nanoseek's kernels). Compiled
        decode (enforce_eager=False) replaces either.
        decode_threads: intra-op threads of decode steps: "auto" measures the process's count
        against 1 on the live steps and keeps the faster (nanoseek.engine.threads; not with
        enforce_eager=False, since compiled code is guarded on the thread count and each switch would
        recompile), an int fixes it, None leaves torch's setting alone."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = self.config = model.config
        device = next(model.parameters()).device
        dtype = cache_dtype or next(model.parameters()).dtype
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if not 0 < kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction={kv_cache_fraction} must be in (0, 1]")
        if num_blocks is None:
            budget = kv_cache_bytes or int(kv_cache_fraction * _available_memory(device))
            want = -(-max_num_seqs * self.max_model_len // block_size)  # enough for every slot in use
            num_blocks = min(want, PagedKVCache.blocks_for_bytes(cfg, budget, block_size, dtype))
            if num_blocks < 1:
                raise ValueError(f"a KV cache of {budget} bytes holds no block of {block_size} tokens "
                                 f"({PagedKVCache.bytes_per_token(cfg, dtype)} bytes per token)")
        self.fingerprint = model_fingerprint(model, dtype)
        self.cache = PagedKVCache(cfg, num_blocks, block_size, dtype=dtype, device=device)
        self.disk = None
        if cache_dir is not None:
            self.disk = DiskCache(cache_dir, self.fingerprint, disk_cache_bytes,
                                  block_shape=(cfg.num_hidden_layers, block_size, cfg.kv_cache_dim), dtype=dtype)
        self.block_manager = BlockManager(num_blocks, block_size, self.fingerprint,
                                          external_lookup=self.disk.stage if self.disk else None)
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, self.block_manager,
                                   self.max_model_len, eos_token_ids=cfg.eos_token_ids, vocab_size=cfg.vocab_size)
        self.kernel_report: list[dict] = []
        if tune_kernels:  # pick this host's faster kernels (the projections' choice exists on CPUs only)
            rows = min(MAX_ROWS, max_num_seqs)
            self.kernel_report = (tune(model, max_rows=rows) if device.type == "cpu" else []) \
                + tune_dispatch(model, max_rows=rows)
            log.info("%s", format_report(self.kernel_report))
        self.backend, self.backend_timings = choose_backend(self.cache, cfg, attention_backend, max_num_seqs)
        log.info("attention backend: %s (decode timings: %s)", self.backend.name,
                 {k: f"{v * 1e6:.0f} us" for k, v in self.backend_timings.items()})
        self.decode_step: CompiledDecode | FusedDecode | None = None
        self.decode_timings: dict[str, float] = {}
        if decode_kernel not in ("auto", "fused", "model"):
            raise ValueError(f"decode_kernel={decode_kernel!r}: choose from ['auto', 'fused', 'model']")
        if not enforce_eager:
            self.decode_step = CompiledDecode(model, self.cache, self.backend, max_num_seqs,
                                              max_blocks_per_row=min(num_blocks, -(-self.max_model_len // block_size)))
        else:
            self.decode_step, self.decode_timings = choose_decode_step(model, self.cache, self.backend, decode_kernel,
                                                                       max_num_seqs)
            log.info("decode step: %s (timings per step at batch 1 + %d: %s)",
                     f"fused ({self.decode_step.row_kernel} rows)" if self.decode_step is not None else "model",
                     max_num_seqs,
                     {k: f"{v * 1e6:.0f} us" for k, v in self.decode_timings.items()})
        compiled = isinstance(self.decode_step, CompiledDecode)
        if not (decode_threads in ("auto", None) or type(decode_threads) is int and decode_threads >= 1):
            raise ValueError(f"decode_threads={decode_threads!r} must be 'auto', an integer >= 1 or None")
        self.decode_threads = None  # also when compiled: compiled code is guarded on the thread count
        if isinstance(decode_threads, int):
            self.decode_threads = DecodeThreads([decode_threads])
        elif decode_threads == "auto" and not compiled and device.type == "cpu" \
                and torch.get_num_threads() > 1:
            self.decode_threads = DecodeThreads([torch.get_num_threads(), 1])
        self.runner = ModelRunner(model, self.cache, self.backend, self.disk, decode_step=self.decode_step,
                                  threads=self.decode_threads)
        self._requests: dict[str, RequestOutput] = {}
        self._children: dict[Hashable, tuple[str, _Child]] = {}
        self._params: dict[str, SamplingParams] = {}
        self._grammars: Grammars | None = None

    def warmup_decode(self, context_tokens: int | None = None) -> dict[tuple[int, int], float]:
        """Compile the decode step of every batch bucket now, instead of when a step first needs one
        (a compile takes seconds to a minute, and the requests of that step wait for it):
        {(batch, blocks per row): seconds}. With the C++ attention one context bucket serves every
        context, so this covers every decode step; otherwise it covers the context bucket of
        context_tokens (default: 1,024 tokens or the whole context if shorter). Nothing when eager."""
        if not isinstance(self.decode_step, CompiledDecode):
            return {}
        if context_tokens is None:
            wide = self.decode_step.fixed_blocks is not None
            context_tokens = self.max_model_len if wide else min(self.max_model_len, 1024)
        return self.decode_step.warmup(context_tokens)

    @property
    def grammars(self) -> Grammars:
        """The structured-output compiler over this engine's tokenizer (built at first use)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs needs the engine to have a tokenizer")
            self._grammars = Grammars(self.tokenizer, self.config.vocab_size, self.config.eos_token_ids)
        return self._grammars

    @property
    def kv_bytes_per_token(self) -> int:
        return PagedKVCache.bytes_per_token(self.config, self.cache.dtype)

    # ------------------------------------------------------------------ requests
    def _prompt_ids(self, prompt: Any) -> tuple[str | None, list[int], str | None]:
        """(text, token ids, cache salt) of a prompt."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError(f"a prompt dict needs 'prompt_token_ids', got keys {sorted(prompt)}")
            salt = prompt.get("cache_salt")
            if salt is not None and not isinstance(salt, str):
                raise TypeError(f"cache_salt must be a str, got {type(salt).__name__}")
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]], salt
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass {'prompt_token_ids': [...]} instead")
            return prompt, self.tokenizer.encode(prompt, add_bos=self.tokenizer.bos_id is not None), None
        if isinstance(prompt, (list, tuple)):
            return None, [int(t) for t in prompt], None
        raise TypeError(f"a prompt is a str, a list of token ids or {{'prompt_token_ids': ...}}, "
                        f"got {type(prompt).__name__}")

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None) -> int:
        """The request's effective max_tokens, or RequestRejected naming the parameter at fault
        (prompt, max_tokens, top_k, ...). Thread-safe: it reads only the engine's fixed sizes."""
        return self.scheduler.check(prompt_token_ids, params or SamplingParams())

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None) -> RequestOutput:
        """Queue a request (n sequences sharing the prompt's cached blocks). Raises a ValueError naming
        the problem (too long, empty, bad ids, bad params) and changes nothing else."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise RequestRejected(f"request id {request_id!r} is already in the engine")
        text, ids, salt = self._prompt_ids(prompt)
        self.check_request(ids, params)  # before anything reads the ids (the detokenizer does)
        spec = params.structured_outputs
        if spec is not None:
            self.grammars.check(spec)  # compiled once per spec; a bad one is refused before anything queues
        req = RequestOutput(request_id, text, ids, [], arrival_time=time.monotonic())
        children = []
        for i in range(params.n):
            seq = Sequence(f"{request_id}#{i}", ids, params, cache_salt=salt)
            detok = None
            if self.tokenizer is not None:
                skip = params.skip_special_tokens
                detok = IncrementalDetokenizer(lambda t, s=skip: self.tokenizer.decode(t, skip_special_tokens=s),
                                               ids, stop=params.stop)
            seed = None if params.seed is None else (params.seed + i) % 2 ** 64  # the generator's range
            children.append(_Child(seq, CompletionOutput(i, logprobs=[] if params.logprobs is not None else None),
                                   detok, make_generator(seed), spec and self.grammars.start(spec)))
        added = []
        try:
            for c in children:
                self.scheduler.add(c.seq)
                added.append(c)
        except Exception:
            for c in added:
                self.scheduler.abort(c.seq.seq_id)
            raise
        req.outputs = [c.out for c in children]
        self._requests[request_id] = req
        self._params[request_id] = params
        for c in children:
            self._children[c.seq.seq_id] = (request_id, c)
        return req

    def abort(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        for sid in [s for s, (r, _) in self._children.items() if r == request_id]:
            _, c = self._children.pop(sid)
            self.scheduler.abort(sid)
            c.out.finish_reason = c.out.finish_reason or "abort"
        self._params.pop(request_id, None)
        req.finished = True
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the requests that progressed (finished ones for the last
        time, failed ones with `error` set)."""
        out = self.scheduler.schedule()
        for req in self._requests.values():  # outputs finished earlier too: they must not repeat
            for o in req.outputs:
                o.delta_text = ""
        try:
            sampled = self.runner.execute(out, lambda sid: self._children[sid][1].seq.params,
                                          lambda sid: self._children[sid][1].generator,
                                          lambda sid: self._children[sid][1].grammar)
            finished = {s.seq_id for s in self.scheduler.update(out, {k: v.token_id for k, v in sampled.items()})}
        except Exception as e:  # the step did not run: fail its requests, keep the engine going
            seqs = self.scheduler.recover(out)
            failed = {self._children[s.seq_id][0] for s in seqs if s.seq_id in self._children}
            return [self._fail(rid, e) for rid in sorted(failed)]
        touched: dict[str, RequestOutput] = {}
        failed: dict[str, Exception] = {}
        now = time.monotonic()
        for sid, r in sampled.items():
            rid, c = self._children[sid]
            req = touched[rid] = self._requests[rid]
            try:
                self._absorb(sid, c, req, r, finished, now)
            except Exception as e:
                failed.setdefault(rid, e)
        for sid in finished:
            rid, c = self._children.pop(sid)
            touched[rid] = self._requests[rid]
            try:
                if c.detok is not None and c.detok.stop_reason is None:
                    c.out.delta_text += c.detok.flush()
                c.out.finish_reason = c.seq.finish_reason
                c.out.stop_reason = c.detok.stop_reason if c.detok and c.detok.stop_reason else c.seq.stop_reason
            except Exception as e:
                failed.setdefault(rid, e)
        for rid, e in failed.items():
            touched[rid] = self._fail(rid, e)
        for rid, req in touched.items():
            if rid in failed:
                continue
            for o in req.outputs:
                o.text += o.delta_text
            if all(o.finished for o in req.outputs):
                req.finished = True
                del self._requests[rid]
                self._params.pop(rid, None)
        return list(touched.values())

    def _absorb(self, sid, c: _Child, req: RequestOutput, r, finished: set, now: float) -> None:
        """Add one sampled token to a child's output (text, logprobs, stop strings)."""
        req.first_token_time = req.first_token_time or now
        req.num_cached_tokens = max(req.num_cached_tokens, c.seq.num_cached_tokens)
        c.out.token_ids.append(r.token_id)
        if c.out.logprobs is not None:
            c.out.logprobs.append({r.token_id: r.logprob, **dict(r.top or [])})
            c.out.cumulative_logprob = (c.out.cumulative_logprob or 0.0) + r.logprob
        if c.detok is not None:
            c.out.delta_text += c.detok.add(r.token_id)
            if c.detok.stop_reason is not None and sid not in finished:
                self.scheduler.finish(sid, "stop", c.detok.stop_reason)
                finished.add(sid)
                c.seq.finish_reason, c.seq.stop_reason = "stop", c.detok.stop_reason
        if c.grammar is not None and sid not in finished:
            # the token was allowed, so this only fails if a row had no allowed token at all
            if not c.grammar.advance(r.token_id) or c.grammar.is_done:
                self.scheduler.finish(sid, "stop", r.token_id)
                finished.add(sid)
                c.seq.finish_reason, c.seq.stop_reason = "stop", r.token_id

    def _fail(self, request_id: str, error: BaseException) -> RequestOutput:
        """End a request because the engine failed on it: its sequences are freed, and its output
        is returned finished with `error` set."""
        req = self._requests[request_id]
        self.abort(request_id)
        req.error = f"{type(error).__name__}: {error}"
        return req

    def fail_all(self, error: BaseException) -> list[RequestOutput]:
        """Last resort after an error `step` could not attribute: fail every request and start
        over with an empty scheduler state (the prefix cache keeps only committed blocks)."""
        self.scheduler.recover(None)
        return [self._fail(rid, error) for rid in list(self._requests)]


class LLM:
    """vLLM-style offline generation: `LLM(model=DIR).generate(prompts, sampling_params)`."""

    _ids = itertools.count()

    def __init__(self, model: str | os.PathLike | Any, tokenizer: str | os.PathLike | Any | None = None,
                 dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                 quantization: str | None = None, group_size: int = 128, **engine_options):
        """quantization: "int8" | "int4" weight-only (int4: one scale per group_size input channels),
        quantised while loading a folder (a folder saved quantised loads quantised without it)."""
        from nanoseek.model.checkpoint import load_model

        if isinstance(model, (str, os.PathLike)):
            folder = model
            model = load_model(folder, dtype=dtype, device=device, quantization=quantization,
                               group_size=group_size)
            if tokenizer is None and os.path.exists(os.path.join(folder, "tokenizer.json")):
                tokenizer = folder
        elif quantization is not None:
            raise ValueError(f"quantization={quantization!r} applies to a model folder; this model is "
                             f"already built (load it with load_model(..., quantization=...))")
        if isinstance(tokenizer, (str, os.PathLike)):
            from nanoseek.data.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(tokenizer)
        self.engine = LLMEngine(model, tokenizer, **engine_options)

    def generate(self, prompts: Any, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is a str, a token-id list or
        {"prompt_token_ids": [...]}; sampling_params is one for all or one per prompt."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(sampling_params)} sampling params for {len(prompts)} prompts")
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        results: dict[str, RequestOutput] = {}
        try:
            for rid, prompt, params in zip(ids, prompts, sampling_params):
                results[rid] = self.engine.add_request(rid, prompt, params)
        except Exception:  # one bad prompt: nothing of this call stays queued
            for rid in results:
                self.engine.abort(rid)
            raise
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts), desc="generate", unit="req", dynamic_ncols=True)
        generated, t0 = 0, time.perf_counter()
        try:
            while self.engine.has_unfinished_requests():
                for req in self.engine.step():
                    generated += sum(1 for o in req.outputs if o.token_ids)
                    if req.finished and bar is not None:
                        bar.update(1)
                if bar is not None:
                    bar.set_postfix_str(f"{generated / max(time.perf_counter() - t0, 1e-9):.0f} tok/s")
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]

    def generate_iter(self, prompts: Iterable[Any], sampling_params: SamplingParams | None = None):
        """Yield (request_id, RequestOutput) as requests progress (for streaming)."""
        for i, prompt in enumerate(prompts):
            self.engine.add_request(f"stream-{next(self._ids)}", prompt, sampling_params)
        while self.engine.has_unfinished_requests():
            for req in self.engine.step():
                yield req.request_id, req
