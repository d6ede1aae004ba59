"""Weight-only int8 / int4: the math, kernels against the dequantised reference, the stream loader,
the compressed-tensors layout (checked with that package), the engine, and bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanoseek.model.checkpoint import load_model, save_model
from nanoseek.model.linear import KERNELS, linear
from nanoseek.model.compressed import from_compressed, to_compressed
from nanoseek.model.quant import QuantError, QuantScheme, QuantWeight, dequantize, \
    pack_int4, quantize, unpack_int4
from nanoseek.model.transformer import DenseCache, build_model
from tests.conftest import tiny_v2, tiny_v2_grouped, tiny_v3

SCHEMES = [("int8", {}), ("int4", {}), ("int4", {"symmetric": False})]
IDS = ["int8", "int4", "int4-asym"]


def logits(model, ids, meta=None):
    return model.compute_logits(model(ids, attn_metadata=meta))


def ids_of(vocab, T=13, B=2, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def saved(tmp_path, make_cfg=tiny_v2, seed=3, **kw):
    path = tmp_path / "dense"
    save_model(build_model(make_cfg(**kw), seed=seed), path)
    return path


def dequantised_twin(qmodel, dense_dir, dtype):
    """The reference model: full precision, every quantised weight replaced by its dequantised value."""
    ref = load_model(dense_dir, dtype=dtype)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if isinstance(m, QuantWeight):
                params[name].copy_(m.dequantize(torch.float32))
    return ref


# ---------------------------------------------------------------------- math
@pytest.mark.parametrize("scheme,kw", SCHEMES, ids=IDS)
def test_quantize_error_is_at_most_half_a_step(scheme, kw):
    s = QuantScheme.parse(scheme, group_size=32, **kw)
    w = torch.randn(3, 40, 64) * torch.linspace(0.1, 3, 64)
    q, scale, zero = quantize(w, s)
    assert q.dtype == torch.int8 and scale.shape == (3, 40, 64 // s.group(64))
    lo, hi = s.qrange()
    assert q.min() >= lo and q.max() <= hi
    err = (dequantize(q, scale, zero, s) - w).abs().reshape(3, 40, scale.shape[-1], -1)
    wg = w.reshape(err.shape)
    clipping = s.bits == 4 and s.symmetric  # may clip a group's largest weights
    inside = wg.abs() <= scale[..., None] * (hi + 0.5) if clipping else torch.ones_like(wg, dtype=torch.bool)
    assert (err[inside] <= scale[..., None].expand_as(err)[inside] * 0.5 + 1e-6).all()
    if clipping:  # ... only where that lowers the group's squared error
        amax = wg.abs().amax(-1, keepdim=True) / (hi + 0.5)
        plain = ((wg / amax).round().clamp(lo, hi) * amax - wg) ** 2
        assert ((err ** 2).sum(-1) <= plain.sum(-1) + 1e-6).all()
        assert (scale < wg.abs().amax(-1) / (hi + 0.5) - 1e-9).any()  # and it does clip somewhere


def test_int4_packing_round_trips():
    q = torch.randint(-8, 8, (5, 6, 10), dtype=torch.int8)
    p = pack_int4(q)
    assert p.shape == (5, 6, 5) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p), q)


@pytest.mark.parametrize("scheme,kw", SCHEMES, ids=IDS)
def test_big_weights_are_quantised_and_tiled_in_row_chunks_without_changing_them(monkeypatch, scheme, kw):
    """A weight with more rows than _ROW_CHUNK is quantised and switched to the kernel layout a block of
    rows at a time (bounded temporaries); the result is the whole-weight computation's, bit for bit."""
    from nanoseek.model import quant

    N, K = 512, 64
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    s = QuantScheme.parse(scheme, group_size=32, **kw)
    whole = QuantWeight((N, K), s, torch.bfloat16)
    whole.quantize_into((), w)  # N <= _ROW_CHUNK: one piece
    monkeypatch.setattr(quant, "_ROW_CHUNK", 96)  # not a multiple of the kernel's row block
    chunked = QuantWeight((N, K), s, torch.bfloat16)
    chunked.quantize_into((), w)
    assert torch.equal(chunked.qdata, whole.qdata) and torch.equal(chunked.scale, whole.scale)
    if s.bits == 4 and quant.has_cpu_int4_kernel(torch.device("cpu"), torch.bfloat16, (N, K), 32):
        expected = quant._to_cpu_int4(unpack_int4(whole.qdata))  # the whole weight in one call
        chunked.to_kernel_layout()
        assert chunked.layout == "cpu_int4" and torch.equal(chunked.qdata, expected)
        monkeypatch.setattr(quant, "_ROW_CHUNK", 4096)
        assert torch.equal(chunked.dequantize(torch.float32), whole.dequantize(torch.float32))


@pytest.mark.parametrize("scheme,kw", SCHEMES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_the_dequantised_reference(scheme, kw, dtype):
    s = QuantScheme.parse(scheme, group_size=32, **kw)
    qw = QuantWeight((2, 64, 128), s, dtype)
    qw.quantize_into((), torch.randn(2, 64, 128))
    ref_w = qw.dequantize(torch.float32)
    qw.to_kernel_layout()  # int4 bf16 on CPU: torch's tiled layout
    assert torch.equal(qw.dequantize(torch.float32), ref_w)  # layouts hold the same values
    for rows in (1, 3, 40):
        x = torch.randn(rows, 128, dtype=dtype)
        for e, w in enumerate(qw.unbind()):
            ref = x.float() @ ref_w[e].t()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            for name, kernel in KERNELS[scheme].items():  # every kernel the dispatch may choose
                y = kernel(x, w, None)
                assert torch.allclose(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item()), (name, rows, e)
            assert torch.equal(linear(x, w), KERNELS[scheme]["auto"](x, w, None))


# ---------------------------------------------------------------------- model
@pytest.mark.parametrize("scheme,kw", SCHEMES, ids=IDS)
@pytest.mark.parametrize("make_cfg", [tiny_v2, tiny_v3, tiny_v2_grouped])
def test_quantised_forward_equals_dequantised_reference_naive_and_absorbed(tmp_path, scheme, kw, make_cfg):
    dense = saved(tmp_path, make_cfg)
    qmodel = load_model(dense, quantization=scheme, group_size=8, **kw)
    assert isinstance(qmodel.model.layers[1].mlp.experts.gate_up_proj, QuantWeight)
    assert isinstance(qmodel.model.layers[0].self_attn.kv_b_proj.weight, QuantWeight)
    assert isinstance(qmodel.lm_head.weight, QuantWeight)
    assert isinstance(qmodel.model.layers[1].mlp.gate.weight, torch.nn.Parameter)  # router: full precision
    ref = dequantised_twin(qmodel, dense, torch.float32)
    ids = ids_of(qmodel.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(logits(qmodel, ids), logits(ref, ids), atol=1e-5, rtol=1e-4)
        for absorb in (False, True):  # prefill 9 tokens, then decode 4 more over the cache
            outs = []
            for model in (qmodel, ref):
                cache = DenseCache(model.config, 2, 32)
                outs.append(torch.cat([logits(model, ids[:, :9], cache.step(9, absorb))] +
                                      [logits(model, ids[:, t:t + 1], cache.step(1, absorb)) for t in range(9, 13)], 1))
            assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-4), absorb


def test_bf16_int4_uses_the_cpu_kernel_and_stays_close(tmp_path):
    dense = saved(tmp_path, hidden_size=64, moe_intermediate_size=32)
    qmodel = load_model(dense, dtype=torch.bfloat16, quantization="int4", group_size=32)
    from nanoseek.model.quant import _cpu_int4_block
    B = _cpu_int4_block()
    assert B is not None  # torch's CPU int4 kernel exists in the builds we pin
    for m in qmodel.modules():  # tiled wherever N is a multiple of the kernel's block, else plain
        if isinstance(m, QuantWeight):
            assert m.layout == ("cpu_int4" if m.shape[-2] % B == 0 else "plain"), m  # group 32: supported
    ref = dequantised_twin(qmodel, dense, torch.float32)
    ids = ids_of(qmodel.config.vocab_size)
    with torch.no_grad():
        a, b = logits(qmodel, ids).float(), logits(ref, ids)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    # absorbed decode multiplies by kv_b_proj's per-head blocks in fp32 on CPU (bf16 bmm is 10x+ slower
    # without native bf16) and agrees with the naive path over the same bf16 cache
    assert qmodel.model.layers[0].self_attn.kv_b_proj.weight.dense_cache.dtype == torch.float32
    outs = []
    with torch.no_grad():
        for absorb in (False, True):
            cache = DenseCache(qmodel.config, 2, 32, dtype=torch.bfloat16)
            outs.append(torch.cat([logits(qmodel, ids[:, :9], cache.step(9, absorb))] +
                                  [logits(qmodel, ids[:, t:t + 1], cache.step(1, absorb)) for t in range(9, 13)],
                                  1).float())
    assert (outs[0] - outs[1]).abs().max() < 0.05 * outs[0].abs().max()
    assert (outs[0].argmax(-1) == outs[1].argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("scheme,kw", SCHEMES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_through_the_compressed_tensors_layout(tmp_path, scheme, kw, dtype):
    dense = saved(tmp_path, tiny_v3)
    qmodel = load_model(dense, dtype=dtype, quantization=scheme, group_size=8, **kw)
    save_model(qmodel, tmp_path / "q", max_shard_size="20KB")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    again = load_model(tmp_path / "q", dtype=dtype)  # no quantization argument: read as saved
    again_named = load_model(tmp_path / "q", dtype=dtype, quantization=scheme)
    ids = ids_of(qmodel.config.vocab_size)
    with torch.no_grad():
        want = logits(qmodel, ids)
        assert torch.equal(logits(again, ids), want) and torch.equal(logits(again_named, ids), want)
    # quantising again saves the same bytes (nothing drifts through a second round)
    save_model(again, tmp_path / "q2", max_shard_size="20KB")
    from safetensors.torch import load_file
    files = sorted(f for f in os.listdir(tmp_path / "q") if f.endswith(".safetensors"))
    for f in files:
        a, b = load_file(tmp_path / "q" / f), load_file(tmp_path / "q2" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_checkpoint_goes_through_the_same_quantising_path(tmp_path):
    """A V3-style FP8 tensor (128x128 block scales) is dequantised, then quantised as it is read."""
    from safetensors.torch import load_file, save_file
    dense = saved(tmp_path, tiny_v3)
    state = load_file(dense / "model.safetensors")
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    w = state.pop(name)
    state[name] = w.to(torch.float8_e4m3fn)
    state[name + "_scale_inv"] = torch.ones(1, 1)
    save_file(state, dense / "model.safetensors")
    qmodel = load_model(dense, quantization="int8")
    got = qmodel.model.layers[0].self_attn.kv_b_proj.weight.dequantize(torch.float32)
    assert (got - w.to(torch.float8_e4m3fn).float()).abs().max() < 1e-2


# ---------------------------------------------------------------------- compressed-tensors, checked by it
@pytest.mark.parametrize("scheme,kw", SCHEMES, ids=IDS)
def test_layout_and_config_agree_with_the_compressed_tensors_package(tmp_path, scheme, kw):
    ct = pytest.importorskip("compressed_tensors")  # in the [test] extra; skips only outside it
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    dense = saved(tmp_path, tiny_v2)
    qmodel = load_model(dense, quantization=scheme, group_size=8, **kw)
    save_model(qmodel, tmp_path / "q")
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "q" / "config.json").read_text())
                                           ["quantization_config"])
    assert qc.format == "pack-quantized" and qc.quant_method == "compressed-tensors"
    group = qc.config_groups["group_0"]
    assert group.weights.num_bits == QuantScheme.parse(scheme).bits
    state = load_file(tmp_path / "q" / "model.safetensors")
    for name in ("model.layers.0.self_attn.kv_b_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
                 "lm_head.weight"):
        base = name.removesuffix("weight")
        parts = {k.removeprefix(base): v for k, v in state.items() if k.startswith(base + "weight_")}
        theirs = PackedQuantizationCompressor.decompress(dict(parts), group)["weight"]
        ours = dequantize(*from_compressed(name, parts, qmodel.model.layers[0].self_attn.kv_b_proj.weight.scheme,
                                           tuple(parts["weight_shape"].tolist()), torch.float32),
                          qmodel.lm_head.weight.scheme)
        assert torch.allclose(theirs.float(), ours, atol=1e-6), name
        # and their compressor, given our scales, writes our bytes
        back = PackedQuantizationCompressor.compress({"weight": ours, **{k: v for k, v in parts.items()
                                                     if k in ("weight_scale", "weight_zero_point")}}, group) \
            if kw.get("symmetric", True) else None
        if back is not None:
            assert torch.equal(back["weight_packed"], parts["weight_packed"]), name
    assert ct.__version__


# ---------------------------------------------------------------------- engine
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_engine_runs_quantised_models_with_prefix_hits(tmp_path, scheme):
    from nanoseek.engine.llm import LLM
    from nanoseek.engine.sampling import SamplingParams
    from tests.engine.test_llm import prompts_of, recompute_greedy

    dense = saved(tmp_path, tiny_v2, eos_token_id=None)
    llm = LLM(str(dense), quantization=scheme, group_size=32, dtype=torch.bfloat16, block_size=4, num_blocks=64)
    model = llm.engine.model
    assert isinstance(model.lm_head.weight, QuantWeight)
    shared = prompts_of([20])[0]
    params = SamplingParams(temperature=0, max_tokens=6)
    first = llm.generate([{"prompt_token_ids": shared + [5, 6]}], params, use_tqdm=False)[0]
    second = llm.generate([{"prompt_token_ids": shared + [7, 8, 9]}], params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 20
    for out, prompt in ((first, shared + [5, 6]), (second, shared + [7, 8, 9])):
        assert out.outputs[0].token_ids == recompute_greedy(model, prompt, 6)


# ---------------------------------------------------------------------- memory
_PEAK = """
import sys, threading, time, torch
from nanoseek.model.checkpoint import load_model
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
q = sys.argv[2] if sys.argv[2] != 'none' else None
load_model(sys.argv[3], quantization=q, group_size=32)  # torch's one-time allocations happen here
base, peak, done = anon(), [0], []
def watch():
    while not done:
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
th = threading.Thread(target=watch); th.start()
m = load_model(sys.argv[1], quantization=q)
done.append(1); th.join()
print(max(peak[0], anon()) - base)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc")
def test_stream_loader_peak_stays_below_the_full_precision_size(tmp_path):
    """~45M parameters (180 MB in fp32): loading int4 must never hold the fp32 model."""
    dense = saved(tmp_path, tiny_v2, hidden_size=512, moe_intermediate_size=512, n_routed_experts=16,
                  intermediate_size=1024, num_hidden_layers=4, vocab_size=4096, kv_lora_rank=128,
                  qk_nope_head_dim=64, v_head_dim=64, qk_rope_head_dim=32)
    fp32_bytes = os.path.getsize(dense / "model.safetensors")
    save_model(build_model(tiny_v2()), tmp_path / "warmup")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def peak(scheme):
        out = subprocess.run([sys.executable, "-c", _PEAK, str(dense), scheme, str(tmp_path / "warmup")], capture_output=True, text=True,
                             env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    full, int4 = peak("none"), peak("int4")
    assert full > 0.9 * fp32_bytes  # the measurement sees a whole model when there is one
    assert int4 < 0.4 * fp32_bytes, (full, int4, fp32_bytes)  # int4 weights + fp32 scales: ~1/6


# ---------------------------------------------------------------------- bad input
def test_bad_requests_name_the_value(tmp_path):
    dense = saved(tmp_path, tiny_v2)
    with pytest.raises(QuantError, match="'int3'"):
        load_model(dense, quantization="int3")
    with pytest.raises(QuantError, match=r"model\.layers\.0\.self_attn\.\w+\.weight: group_size=48 does not divide its input dimension 64"):
        load_model(dense, quantization="int4", group_size=48)
    with pytest.raises(QuantError, match="device 'meta'"):
        load_model(dense, quantization="int8", device="meta")
    with pytest.raises(QuantError, match="torch.float64"):
        load_model(dense, quantization="int8", dtype=torch.float64)
    save_model(load_model(dense, quantization="int8"), tmp_path / "q")
    with pytest.raises(QuantError, match="saved quantised as int8"):
        load_model(tmp_path / "q", quantization="int4")


@pytest.mark.parametrize("damage,match", [
    (lambda s: s.pop("model.layers.0.self_attn.o_proj.weight_scale"), "o_proj.weight_scale is missing"),
    (lambda s: s.__setitem__("model.layers.0.self_attn.o_proj.weight_scale", torch.ones(64, 3)),
     r"o_proj.weight_scale has shape \(64, 3\), expected \(64, 8\)"),
    (lambda s: s.__setitem__("model.layers.0.self_attn.o_proj.weight_shape", torch.tensor([64, 32])),
     r"o_proj.weight_shape is \[64, 32\]"),
])
def test_damaged_quantised_checkpoint_names_the_tensor(tmp_path, damage, match):
    from safetensors.torch import load_file, save_file
    dense = saved(tmp_path, tiny_v2)
    save_model(load_model(dense, quantization="int4", group_size=8), tmp_path / "q")
    f = tmp_path / "q" / "model.safetensors"
    state = load_file(f)
    damage(state)
    save_file(state, f)
    with pytest.raises(QuantError, match=match):
        load_model(tmp_path / "q")


def test_compressed_tensors_of_one_weight_round_trip():
    s = QuantScheme.parse("int4", 8, symmetric=False)
    q, scale, zero = quantize(torch.randn(24, 48), s)
    parts = {k.removeprefix("x."): v for k, v in to_compressed("x.weight", q, scale, zero, s)}
    assert parts["weight_packed"].shape == (24, 6) and parts["weight_zero_point"].shape == (3, 6)
    q2, scale2, zero2 = from_compressed("x.weight", parts, s, (24, 48), torch.float32)
    assert torch.equal(q2, q) and torch.equal(scale2, scale) and torch.equal(zero2, zero)


def test_quantize_cli_writes_a_loadable_folder_and_refuses_bad_input(tmp_path, capsys):
    from nanoseek.cli import main
    from nanoseek.info import weight_bytes
    dense = saved(tmp_path, tiny_v2)
    assert main(["quantize", "--model", str(dense), "--out", str(tmp_path / "q4"), "--bits", "4",
                 "--group-size", "32"]) == 0
    q = load_model(tmp_path / "q4")
    assert q.lm_head.weight.kind == "int4" and q.lm_head.weight.group_size == 32
    for argv, msg in [(["--model", str(dense), "--bits", "3"], "3"),
                      (["--model", str(dense), "--bits", "4", "--group-size", "48"], "group_size=48"),
                      (["--model", str(tmp_path / "q4"), "--bits", "8"], "already quantised (int4)")]:
        assert main(["quantize", "--out", str(tmp_path / "bad")] + argv) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    assert sorted(os.listdir(tmp_path)) == ["dense", "q4"]  # no temporary folders left either
    sizes = weight_bytes(tiny_v2(), group_size=32)
    assert sizes["int8"] < 0.6 * sizes["bf16"] and sizes["int4"] < sizes["int8"]


def test_whole_weight_dequantising_kernels_are_not_timed_on_huge_weights(tmp_path, monkeypatch):
    """tune never times (or picks) a kernel that dequantises the whole weight per call on a weight over
    DEQUANT_MAX_NUMEL (a real lm_head would cost GBs of fp32 per call); elsewhere it may win."""
    from nanoseek.model import linear as lin
    from nanoseek.model import quant

    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path / "cache"))
    qmodel = load_model(saved(tmp_path), quantization="int8")
    shapes = {(o, i) for kind, o, i in lin.model_weights(qmodel) if kind == "int8"}
    head = max(shapes, key=lambda s: s[0] * s[1])  # the biggest is "huge", like a real lm_head
    monkeypatch.setattr(lin, "DEQUANT_MAX_NUMEL", max(o * i for o, i in shapes if o * i < head[0] * head[1]))
    dequantising = (quant.dequant_linear, quant.dequant_f32_linear)
    timed = []

    def timer(fn, x2, w):  # injected: the dequantising kernels would win everywhere
        timed.append((fn, tuple(w.shape)))
        return 0.1 if fn in dequantising else 1.0

    lin.clear_choices()
    try:
        report = lin.tune(qmodel, max_rows=2, timer=timer, use_cache=False)
    finally:
        lin.clear_choices()
    on_head = [r for r in report if (r["out"], r["in"]) == head]
    others = [r for r in report if r["kind"] == "int8" and r["out"] * r["in"] < head[0] * head[1]]
    assert {r["rows"] for r in on_head} == {1, 2, *lin.MANY_CLASSES}
    assert all(not r["kernel"].startswith("dequant") for r in on_head)
    assert not any(fn in dequantising and shape == head for fn, shape in timed)
    assert others and all(r["kernel"].startswith("dequant") for r in others)
