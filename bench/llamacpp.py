"""llama.cpp as the CPU speed anchor: write a nanoseek DeepSeek-V2 checkpoint as an f32 GGUF and
time llama.cpp on it in this process, through llama-cpp-python's C API bindings.

Not part of `make test`: llama-cpp-python compiles llama.cpp from source (15-20 min on 2 cores).

    .venv/bin/pip install llama-cpp-python gguf
    .venv/bin/python bench/llamacpp.py                  # parity + decode B=1/B=8 + prefill
    .venv/bin/python bench/engine.py --only decode      # adds a llama.cpp column when importable

The GGUF follows llama.cpp's `deepseek2` layout (the one its converter writes for DeepSeek-V2):
experts stacked into [E, out, in] tensors, `kv_b_proj` split into per-head `attn_k_b` (transposed)
and `attn_v_b` so llama.cpp runs its absorbed-MLA path, and a vocabulary of type "none" (ids only;
no tokenizer is needed to time token ids). Random-weight models are fine: the parity check below
compares llama.cpp's logits with nanoseek's on the same prompt before any number is taken.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from nanoseek.model.checkpoint import checkpoint_files

# nanoseek / HF name (after "model.layers.N.") -> llama.cpp deepseek2 name (after "blk.N.")
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def _load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(model_dir):
        out.update(load_file(f))
    return out


def gguf_tensors(cfg: dict, sd: dict[str, torch.Tensor]):
    """Yield (gguf name, fp32 numpy array) for a DeepSeek-V2/V3 state dict, in llama.cpp's layout.
    numpy shapes are ggml's `ne` reversed, so a torch [out, in] weight is written as is."""
    H, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in sd.items():
        t = t.float()
        if name in TOP_NAMES:
            yield TOP_NAMES[name], t.numpy()
            continue
        parts = name.split(".")
        if parts[:2] != ["model", "layers"]:
            raise ValueError(f"{name}: no llama.cpp deepseek2 tensor for it")
        i, rest = int(parts[2]), ".".join(parts[3:])
        if i >= cfg["num_hidden_layers"]:
            continue  # MTP layers: llama.cpp's deepseek2 graph does not run them
        if rest == "self_attn.kv_b_proj.weight":  # [H*(nope+v), L] -> k_b [H, L, nope], v_b [H, v, L]
            kv_b = t.view(H, nope + v, -1)
            yield f"blk.{i}.attn_k_b.weight", kv_b[:, :nope].transpose(1, 2).contiguous().numpy()
            yield f"blk.{i}.attn_v_b.weight", kv_b[:, nope:].contiguous().numpy()
        elif rest.startswith("mlp.experts."):
            e, proj = int(parts[5]), parts[6]
            experts.setdefault((i, proj), {})[e] = t
        elif rest in LAYER_NAMES:
            yield f"blk.{i}.{LAYER_NAMES[rest]}", t.numpy()
        else:
            raise ValueError(f"{name}: no llama.cpp deepseek2 tensor for it")
    for (i, proj), by_e in sorted(experts.items()):
        if sorted(by_e) != list(range(cfg["n_routed_experts"])):
            raise ValueError(f"layer {i} {proj}: experts {sorted(by_e)} of {cfg['n_routed_experts']}")
        stacked = torch.stack([by_e[e] for e in range(len(by_e))])  # [E, out, in]
        yield f"blk.{i}.ffn_{proj.removesuffix('_proj')}_exps.weight", stacked.numpy()


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write `model_dir` (a nanoseek / HF DeepSeek-V2 or V3 checkpoint) as an f32 GGUF at `out`,
    atomically (temp file + rename)."""
    import gguf

    model_dir, out = Path(model_dir), Path(out)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") not in ("deepseek_v2", "deepseek_v3"):
        raise ValueError(f"{model_dir}/config.json: model_type {cfg.get('model_type')!r}; "
                         "only deepseek_v2/deepseek_v3 export to llama.cpp's deepseek2")
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "deepseek2")
    L, R = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_leading_dense_block_count(cfg.get("first_k_dense_replace", 0))
    w.add_q_lora_rank(cfg.get("q_lora_rank") or 0)
    w.add_kv_lora_rank(L)
    w.add_key_length(L + R)
    w.add_value_length(L)
    w.add_key_length_mla(cfg["qk_nope_head_dim"] + R)
    w.add_value_length_mla(cfg["v_head_dim"])
    w.add_rope_dimension_count(R)
    w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    w.add_expert_count(cfg["n_routed_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_expert_shared_count(cfg.get("n_shared_experts") or 0)
    w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
    w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", False)))
    sigmoid = cfg.get("scoring_func", "softmax") == "sigmoid"
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    if cfg.get("n_group"):
        w.add_expert_group_count(cfg["n_group"])
        w.add_expert_group_used_count(cfg["topk_group"])
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        if "mscale_all_dim" in scaling:  # llama.cpp's deepseek2 loader divides this by 0.1 again
            w.add_rope_scaling_yarn_log_mul(0.1 * scaling["mscale_all_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("none")
    for name, arr in gguf_tensors(cfg, _load_tensors(model_dir)):
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


def _quiet(level, text, user_data) -> None:
    pass


_QUIET = None  # the ctypes callback, made on first use (llama_cpp may not be installed) and kept alive


class LlamaCpp:
    """One llama.cpp model + context, driven by token ids through llama.cpp's batch API."""

    def __init__(self, gguf_path: str | os.PathLike, n_ctx: int = 4096, n_seq: int = 8, threads: int = 2,
                 n_batch: int = 2048, flash_attn: bool = False):
        """flash_attn=False with an f32 KV cache computes what nanoseek computes, in fp32 (logits agree
        to ~2e-6); llama.cpp's default (flash attention on, f16 KV cache) rounds through f16."""
        import llama_cpp as lc

        global _QUIET
        _QUIET = _QUIET or lc.llama_log_callback(_quiet)
        self.lc, self.version = lc, lc.__version__
        lc.llama_log_set(_QUIET, None)  # llama.cpp logs every tensor it loads
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.use_extra_bufts = False  # repacked CPU buffers abort on deepseek2 on some hosts (MEASUREMENTS.md)
        self.model = lc.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx * n_seq, n_batch, n_batch, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        if not flash_attn:  # llama.cpp's CPU flash attention works in f16
            cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cp.type_k = cp.type_v = lc.GGML_TYPE_F32
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(n_batch, 0, n_seq)
        self.n_batch = n_batch

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, want logits) items."""
        b = self.batch
        for j, (tok, pos, seq, want) in enumerate(items):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, want
            b.seq_id[j][0] = seq
        b.n_tokens = len(items)
        if rc := self.lc.llama_decode(self.ctx, b):
            raise RuntimeError(f"llama_decode returned {rc}")

    def logits(self, j: int) -> np.ndarray:
        ptr = self.lc.llama_get_logits_ith(self.ctx, j)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)).copy()

    def prefill(self, prompt: list[int], seq: int = 0) -> np.ndarray:
        """Prefill one sequence in n_batch chunks; returns the last position's logits."""
        for s in range(0, len(prompt), self.n_batch):
            chunk = prompt[s:s + self.n_batch]
            self.decode([(t, s + k, seq, s + k == len(prompt) - 1) for k, t in enumerate(chunk)])
        return self.logits(len(prompt) - 1 - (len(prompt) - 1) // self.n_batch * self.n_batch)

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        """Greedy: prefill each prompt, then decode all sequences together, one token each per
        llama_decode. Returns (seconds of the max_tokens - 1 batched decode steps, tokens)."""
        self.clear()
        outs = [[int(self.prefill(p, seq=i).argmax())] for i, p in enumerate(prompts)]
        t = time.perf_counter()
        for step in range(max_tokens - 1):
            self.decode([(o[-1], len(p) + step, i, True) for i, (p, o) in enumerate(zip(prompts, outs))])
            for i, o in enumerate(outs):
                o.append(int(self.logits(i).argmax()))
        return time.perf_counter() - t, outs

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def available() -> bool:
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def parity(lcpp: LlamaCpp, model, prompt: list[int]) -> tuple[float, bool]:
    """(max |logit difference|, same argmax) at the last position of `prompt`, llama.cpp vs nanoseek."""
    with torch.inference_mode():
        ref = model.compute_logits(model(torch.tensor([prompt]))[0, -1:])[0].float().numpy()
    lcpp.clear()
    got = lcpp.prefill(prompt)
    return float(np.abs(got - ref).max()), bool(got.argmax() == ref.argmax())


def decode_tps(lcpp: LlamaCpp, prompts: list[list[int]]) -> float:
    """Batched greedy decode tok/s over 64 tokens per prompt, after a short warm-up."""
    lcpp.generate([p[:16] for p in prompts], 4)
    secs, _ = lcpp.generate(prompts, 65)
    return len(prompts) * 64 / secs


def main() -> None:
    import argparse
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine import PROMPT_LEN, load, random_prompts  # the same prompts as bench/engine.py

    from nanoseek.config import ModelConfig
    from nanoseek.model.checkpoint import load_model, save_model
    from nanoseek.model.linear import host_key
    from nanoseek.model.transformer import build_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/bench-v2-small.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_json(args.config)
    print(f"# llama.cpp anchor — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {host_key()}, "
          f"{Path(args.config).name}, {args.threads} threads, {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(cfg, seed=0), Path(tmp) / "m")
        t = time.perf_counter()
        path = export_gguf(Path(tmp) / "m", Path(tmp) / "m.gguf")
        print(f"GGUF {path.stat().st_size / 2 ** 20:.0f} MiB written in {time.perf_counter() - t:.1f} s")
        ours = load_model(Path(tmp) / "m", dtype=torch.float32).eval()
        prompt = random_prompts(1, 64, cfg.vocab_size, 1)[0]
        print("\n| llama.cpp setting | max logit diff vs nanoseek | same argmax | decode B=1 tok/s "
              "| decode B=8 tok/s | prefill 512 tok/s | prefill 2048 tok/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for fa in (False, True):
            lcpp = LlamaCpp(path, threads=args.threads, flash_attn=fa)
            diff, same = parity(lcpp, ours, prompt)
            if not fa and diff > 1e-4:  # the same fp32 computation must agree: else the export is wrong
                raise SystemExit(f"llama.cpp's logits differ from nanoseek's by {diff:.1e}: the GGUF is not this model")
            tps = [decode_tps(lcpp, random_prompts(B, PROMPT_LEN, cfg.vocab_size, 2)) for B in (1, 8)]
            pre = []
            for n in (512, 2048):
                lcpp.clear()
                t = time.perf_counter()
                lcpp.prefill(random_prompts(1, n, cfg.vocab_size, 4)[0])
                pre.append(n / (time.perf_counter() - t))
            name = "flash attention, f16 KV (llama.cpp's default)" if fa else "no flash attention, f32 KV (exact fp32)"
            print(f"| {name} | {diff:.1e} | {same} | {tps[0]:.1f} | {tps[1]:.1f} | {pre[0]:.0f} | {pre[1]:.0f} |")
            lcpp.close()
    print(f"\n# done — {load()}")


if __name__ == "__main__":
    main()
