"""The fused CPU decode step: a whole decode token of an MLA model in one C++ op.

    why = unsupported(model, cache)                  # None where it applies
    step = FusedDecode(model, cache)
    logits, top = step(token_ids, [(block_table, start), ...], rows)   # [len(rows), V] and their argmax

nanoseek::mla_decode_step (nanoseek/model/csrc/cpu_decode.cpp) runs embedding, every layer (absorbed
MLA over the paged latent pool, DeepSeekMoE with its shared experts, or a dense MLP) and the lm_head
in one OpenMP parallel region whose threads meet at a few barriers per layer, where the eager step
forks and joins ~80 times per token with serial Python and torch ops between. It writes each layer's
new latent into the pool exactly where the eager step would, so prefill, prefix hits, preemption and
the disk cache work unchanged around it. Any batch size, no buckets, no compile.

It covers what it was written for (fp32 weights and cache on a CPU with nanoseek's kernels, MLA,
the routing of DeepSeek-V2-Lite (softmax, greedy top-K), V2 (group-limited) and V3 (sigmoid,
noaux_tc with its score-correction bias), no biases in projections); `unsupported` says why
anything else takes the model's own step. LLMEngine times it, with each of its row kernels
(ROW_KERNELS), against that step on the engine's shapes at start and keeps the fastest
(choose_decode_step), as for every other kernel.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import time

import torch

from nanoseek.engine.compile import sampled_rows
from nanoseek.engine.kv_cache import PagedKVCache
from nanoseek.model import cpu_kernels, fast
from nanoseek.model.linear import load_host_cache, save_host_cache
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import CausalLM

# a layer's weights in the order of cpu_decode.cpp's Slot enum (None: this layer has none)
SLOTS = ("input_layernorm", "q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa",
         "kv_a_layernorm", "kv_b_proj", "o_proj", "post_attention_layernorm", "gate_proj", "up_proj", "down_proj",
         "router", "router.e_score_correction_bias", "experts.gate_up_proj", "experts.down_proj")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")  # routing.h's TopK, in order


def page_aligned_buffer(numel: int) -> torch.Tensor:
    """fp32 [numel] in private anonymous memory with 2 MiB pages requested (Linux's transparent huge
    pages in "madvise" mode); plain torch memory where that cannot be had."""
    try:
        m = mmap.mmap(-1, numel * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            m.madvise(mmap.MADV_HUGEPAGE)
        return torch.frombuffer(m, dtype=torch.float32, count=numel)  # the tensor keeps m alive
    except (AttributeError, OSError, ValueError):
        return torch.empty(numel)


def unsupported(model: CausalLM, cache: PagedKVCache) -> str | None:
    """Why the fused step cannot run this model over this cache, or None."""
    if not isinstance(model, CausalLM):
        return f"{type(model).__name__} is not nanoseek's CausalLM (the step reads its modules' weights)"
    cfg = model.config
    if not cfg.is_mla:
        return "not an MLA model"
    if cfg.n_routed_experts and (cfg.scoring_func not in ("softmax", "sigmoid") or cfg.topk_method not in TOPK_METHODS):
        return (f"routing {cfg.scoring_func} + {cfg.topk_method} (the fused step has softmax or sigmoid with "
                f"{', '.join(TOPK_METHODS)})")
    if cache.dtype != torch.float32 or cache.device.type != "cpu":
        return f"a {cache.dtype} cache on {cache.device} (the fused step takes fp32 on a CPU)"
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if name == "inv_freq":
            continue
        if not isinstance(p, torch.Tensor) or p.dtype != torch.float32 or p.device.type != "cpu":
            return f"{name} is not an fp32 CPU tensor"
        if name.endswith(".bias"):
            return f"{name}: the fused step has no biases"
    for name, m in model.named_modules():  # quantised weights live in modules, not as parameters
        w = getattr(m, "weight", None)
        if w is not None and not isinstance(w, torch.Tensor):
            return f"{name}.weight is quantised ({getattr(w, 'kind', type(w).__name__)})"
    if not cpu_kernels.load():
        return f"nanoseek's CPU kernels are unavailable: {cpu_kernels.why_unavailable()}"
    return None


def layer_weights(model: CausalLM) -> list[torch.Tensor | None]:
    """Every layer's SLOTS, then embed_tokens, norm and lm_head (as they are laid out now)."""
    out: list[torch.Tensor | None] = []
    empty = None
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        moe = isinstance(mlp, MoE)
        dense = mlp.shared_experts if moe else mlp
        q_lora = attn.cfg.q_lora_rank is not None
        out += [block.input_layernorm.weight,
                empty if q_lora else attn.q_proj.weight,
                attn.q_a_proj.weight if q_lora else empty,
                attn.q_a_layernorm.weight if q_lora else empty,
                attn.q_b_proj.weight if q_lora else empty,
                attn.kv_a_proj_with_mqa.weight, attn.kv_a_layernorm.weight, attn.kv_b_proj.weight,
                attn.o_proj.weight, block.post_attention_layernorm.weight,
                *((dense.gate_proj.weight, dense.up_proj.weight, dense.down_proj.weight) if dense is not None
                  else (empty, empty, empty)),
                *((mlp.gate.weight, mlp.gate.e_score_correction_bias, mlp.experts.gate_up_proj,
                   mlp.experts.down_proj) if moe else (empty,) * 4)]
    assert len(out) == len(SLOTS) * len(model.model.layers), "layer_weights and SLOTS disagree"
    return out + [model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight]


# how the op reads weight rows against the activation rows left over from fours (all of them below
# batch 4): "stream" one row at a time front to back, "blocks" 4 rows side by side (gemv_blocks.h)
ROW_KERNELS = ("stream", "blocks")


class FusedDecode:
    def __init__(self, model: CausalLM, cache: PagedKVCache, backend=None, pack: bool = True,
                 row_kernel: str = "stream"):
        """backend: the engine's attention backend, for the model's own step where fast paths are off
        (fast.reference(), the tests' oracle). pack=False: read the weights where the model holds them
        (bench/decode_step.py's comparison; column-major ones still copied). row_kernel: one of
        ROW_KERNELS (choose_decode_step measures both)."""
        why = unsupported(model, cache)
        if why is not None:
            raise ValueError(f"the fused decode step does not apply: {why}")
        self.model, self.cache, self.backend = model, cache, backend
        cfg = model.config
        self.dims = [cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                     cfg.kv_lora_rank, cfg.num_experts_per_tok or 0, int(bool(cfg.norm_topk_prob)),
                     int(cfg.rope_is_interleaved), int(cfg.model_type == "deepseek_v3"),  # V3 scales normalised weights
                     0,  # the row kernel, set below
                     int(cfg.scoring_func == "sigmoid"),
                     TOPK_METHODS.index(cfg.topk_method) if cfg.n_routed_experts else 0, cfg.n_group or 1,
                     cfg.topk_group or 1]
        self.row_kernel = row_kernel
        self.params = [cfg.rms_norm_eps, cfg.softmax_scale, float(cfg.routed_scaling_factor or 1.0),
                       float(model.rope_attn_factor)]
        self.inv_freq = model.inv_freq.float().contiguous()
        self.pack(move=pack)

    def pack(self, move: bool = True) -> None:
        """Move the weights the step reads into one buffer, in the order it reads them, and point the
        model's parameters at it (the model's memory stays one copy). The buffer asks Linux for 2 MiB
        pages: a token streams every active weight once, and over 4 KiB pages in separate tensors the
        same step ran 6-13 % slower here (bench/RESULTS.md). Column-major weights (a layout
        linear.tune chose for F.linear) get row-major copies of their own, held by this step alone
        (`copied_bytes`), and stay as they are for the model until release_copies."""
        ws = layer_weights(self.model)
        unique = list({id(w): w for w in ws if w is not None}.values())
        rows = [w for w in unique if w.is_contiguous()]  # column-major ones get copies of their own
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, whatever mode the engine starts in
            packed = {id(w): w.detach().contiguous() for w in unique if not w.is_contiguous()}
            if not move or len({w.untyped_storage().data_ptr() for w in rows}) <= 1:
                packed.update((id(w), w.detach()) for w in rows)  # left where they are, or packed already
            else:
                sizes = [w.numel() + (-w.numel() % 16) for w in rows]  # 64-byte aligned starts
                buf, off = page_aligned_buffer(sum(sizes)), 0
                for w, n in zip(rows, sizes):
                    packed[id(w)] = buf[off:off + w.numel()].view(w.shape).copy_(w)
                    w.data = packed[id(w)]
                    off += n
        self._pending = [(w, packed[id(w)]) for w in unique if not w.is_contiguous()]
        self.copied_bytes = sum(w.numel() * 4 for w, _ in self._pending)
        none = torch.empty(0)
        self.weights = [none if w is None else packed[id(w)] for w in ws]

    @property
    def row_kernel(self) -> str:
        return ROW_KERNELS[1 - self.dims[9]]

    @row_kernel.setter
    def row_kernel(self, name: str) -> None:
        if name not in ROW_KERNELS:
            raise ValueError(f"row_kernel={name!r}: choose from {list(ROW_KERNELS)}")
        self.dims[9] = int(name == "stream")

    def release_copies(self) -> None:
        """Point the column-major parameters at their row-major copies too (F.linear takes either;
        only the model's few-row steps were faster with them), so that no weight is held twice."""
        for w, view in self._pending:
            w.data = view
        self._pending, self.copied_bytes = [], 0

    def __call__(self, token_ids: list[int], rows: list[tuple[list[int], int]],
                 sample_rows: list[int]) -> tuple[torch.Tensor, list[int] | None]:
        """(logits [len(sample_rows), V], their argmax or None) of one decode step: token_ids[i] is row
        i's new token at position rows[i][1] of the sequence whose blocks are rows[i][0]."""
        if not fast.enabled() and self.backend is not None:  # the reference: the model's own step
            meta = self.cache.metadata(self.backend, rows, num_new=1, absorb=True)
            hidden = self.model(torch.tensor(token_ids, device=self.cache.device)[:, None], attn_metadata=meta)
            return sampled_rows(self.model.compute_logits(hidden[:, 0]), sample_rows), None  # [n, V]
        logits, top = self.op(*self.inputs(token_ids, rows))
        return sampled_rows(logits, sample_rows), [top[i] for i in sample_rows]

    def inputs(self, token_ids: list[int], rows: list[tuple[list[int], int]]) -> tuple[list[int], ...]:
        """The op's ids, seq_lens and slot_mapping [B], and block_tables [B * nb] flat: what
        PagedKVCache.metadata gives a decode step, as host lists. A decode step's Python runs right
        after the op has streamed the weights through the caches (and a shared host's neighbours
        have had the core), where each tensor made and sliced cost ~50 us."""
        bs = self.cache.block_size
        nb = max(start // bs for _, start in rows) + 1  # blocks of the longest row, its new token included
        tables: list[int] = []
        for t, _ in rows:
            tables += t[:nb]
            tables += [0] * (nb - len(t[:nb]))  # past a row's own blocks: never read (seq_lens)
        return (token_ids, [start + 1 for _, start in rows], [t[start // bs] * bs + start % bs for t, start in rows],
                tables)

    def op(self, ids: list[int], seq_lens: list[int], slot_mapping: list[int], block_tables: list[int],
           pools: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[int]]:
        """The op itself: (logits [B, V], each row's argmax as torch.argmax gives it). pools: the
        latent pools it reads and writes (the cache's, unless given)."""
        return torch.ops.nanoseek.mla_decode_step(ids, seq_lens, slot_mapping, block_tables,
                                                  self.cache.pools if pools is None else pools, self.weights,
                                                  self.inv_freq, self.dims, self.params)

    def run(self, ids, seq_lens, slot_mapping, block_tables) -> torch.Tensor:
        """The op on a step's metadata tensors: ids [B], seq_lens [B], slot_mapping [B], block_tables
        [B, nb] -> logits [B, V] (timing, benches, tests)."""
        return self.op(ids.tolist(), seq_lens.tolist(), slot_mapping.tolist(), block_tables.flatten().tolist())[0]


def time_step(name: str, fn, repeats: int = 4) -> float:
    """Best seconds of fn() (the candidate `name`) over `repeats` calls after one untimed."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def decode_key_prefix(cfg) -> str:
    """Where choose_decode_step keeps its choices for this model shape in the per-host cache
    (then max_num_seqs and the attention backend)."""
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"decode-step|{digest}|"


def cached_decode_choices(cfg) -> dict[tuple[int, str], dict]:
    """{(max_num_seqs, attention backend): {"kernel": "fused" | "model", "rows": a ROW_KERNELS name,
    "us": {candidate ("model", "fused:stream", "fused:blocks"): us per step}}} measured on this host
    for this shape."""
    prefix, out = decode_key_prefix(cfg), {}
    for k, v in load_host_cache().items():
        if k.startswith(prefix):
            n, _, backend = k[len(prefix):].partition("|")
            out[(int(n), backend)] = v
    return out


def choose_decode_step(model: CausalLM, cache: PagedKVCache, backend, name: str = "auto", max_num_seqs: int = 8,
                       timer=time_step, use_cache: bool = True) -> tuple[FusedDecode | None, dict[str, float]]:
    """(the fused step, or None for the model's own step; {candidate: seconds per step, summed over
    batch 1 and max_num_seqs}). name: "auto" (measure, where the fused step applies), "fused" or
    "model". The candidates are the model's step and the fused step with each of ROW_KERNELS
    ("fused:stream", "fused:blocks"). "auto" keeps its choice per host and model shape with the
    kernel choices (linear.save_host_cache), so an engine on the same host and model does not time it
    again; "fused" takes the row kernel cached there, or "stream".
    The candidates decode rows of distinct tokens over a few keys: the weights, not the context, are
    what a decode step reads most. The model's step writes them to the pool's padding block, which no
    sequence holds; the fused step, whose rows must not share a slot, to a small pool of its own."""
    if name not in ("auto", "fused", "model"):
        raise ValueError(f"unknown decode step {name!r}; choose from ['auto', 'fused', 'model']")
    if name == "model":
        return None, {}
    why = unsupported(model, cache)
    if why is not None:
        if name == "fused":
            raise ValueError(f"the fused decode step does not apply: {why}")
        return None, {}
    key = f"{decode_key_prefix(model.config)}{max_num_seqs}|{getattr(backend, 'name', type(backend).__name__)}"
    candidates = ["model", *(f"fused:{r}" for r in ROW_KERNELS)]
    entry = load_host_cache().get(key) if use_cache else None
    if entry is not None and set(entry.get("us", {})) != set(candidates):
        entry = None  # timed before the row kernels were candidates
    if name == "fused":
        fused = FusedDecode(model, cache, backend, row_kernel=(entry or {}).get("rows", "stream"))
        fused.release_copies()
        return fused, {}
    if entry is not None and entry.get("kernel") == "model":  # measured before: nothing to build
        return None, {k: v / 1e6 for k, v in entry["us"].items()}
    fused = FusedDecode(model, cache, backend)
    if entry is None:
        timings = dict.fromkeys(candidates, 0.0)
        bs = cache.block_size
        with torch.inference_mode():
            for B in sorted({1, max_num_seqs}):
                # padding rows in the padding block (written by padding rows only), each its own slot
                rows = [([cache.num_blocks], b % bs) for b in range(B)]
                meta = cache.metadata(backend, rows, num_new=1, absorb=True)
                ids = (torch.arange(B, device=cache.device) * 7919 % model.config.vocab_size)[:, None]  # [B, 1]

                own = PagedKVCache(model.config, num_blocks=-(-B // bs), block_size=bs, dtype=cache.dtype,
                                   device=cache.device)
                # row b: one key, its own, at slot b
                lists = (ids[:, 0].tolist(), [1] * B, list(range(B)), [b // bs for b in range(B)])

                def eager():
                    return model.compute_logits(model(ids, attn_metadata=meta)[:, 0])

                def fused_with(row_kernel):
                    def one():
                        fused.row_kernel = row_kernel
                        return fused.op(*lists, pools=own.pools)
                    return one

                fns = {"model": eager, **{f"fused:{r}": fused_with(r) for r in ROW_KERNELS}}
                best = dict.fromkeys(candidates, float("inf"))
                for _ in range(2):  # interleaved rounds: a host's speed drifts
                    for k, fn in fns.items():
                        best[k] = min(best[k], timer(k, fn))
                for k, v in best.items():
                    timings[k] += v
        fastest = min(candidates, key=timings.__getitem__)
        entry = {"kernel": fastest.partition(":")[0],
                 "rows": min(ROW_KERNELS, key=lambda r: timings[f"fused:{r}"]),
                 "us": {k: v * 1e6 for k, v in timings.items()}}
        if use_cache and not fast.in_reference():  # timed with the fast paths off: not this host's choice
            save_host_cache({key: entry})
    timings = {k: v / 1e6 for k, v in entry["us"].items()}
    if entry["kernel"] != "fused":
        return None, timings
    fused.row_kernel = entry["rows"]
    fused.release_copies()
    return fused, timings
