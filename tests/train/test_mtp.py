"""V3 multi-token prediction: target alignment against a hand-indexed reference, checkpoint layout."""

import json

import torch
import torch.nn.functional as F
from safetensors import safe_open

from nanoseek.model.attention import AttnInputs
from nanoseek.model.checkpoint import load_model
from nanoseek.model.rope import rope_cos_sin
from nanoseek.model.transformer import build_model
from nanoseek.train import checkpoint as ckpt
from nanoseek.train.mtp import MTPHeads, load_mtp_state, mtp_hf_items
from tests.conftest import tiny_v3


def setup(depth=2):
    cfg = tiny_v3(num_nextn_predict_layers=depth)
    model = build_model(cfg, seed=0)
    mtp = MTPHeads(cfg, depth).init_weights(0)
    g = torch.Generator().manual_seed(1)
    stream = torch.randint(0, cfg.vocab_size, (2, 13), generator=g)
    return cfg, model, mtp, stream[:, :-1], stream[:, 1:]


def test_depth_k_predicts_the_token_k_plus_one_ahead():
    cfg, model, mtp, x, y = setup(depth=2)
    hidden = model(x)  # [B, T, C], the final normed hidden state
    loss, per_depth, stats = mtp(model, hidden, y)
    # reference for depth 1, written from the paper: position i sees h_i and Emb(t_{i+1}), predicts t_{i+2}
    stream = torch.cat([x, y[:, -1:]], dim=1)  # t_0 .. t_T
    B, T = x.shape
    layer = mtp.layers[0]
    h = hidden[:, :T - 1]
    e = model.model.embed_tokens(stream[:, 1:T])
    inp = layer.eh_proj(torch.cat([layer.enorm(e), layer.hnorm(h)], -1))
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(T - 1).expand(B, T - 1), model.rope_attn_factor)
    out, _ = layer(inp, AttnInputs(cos=cos, sin=sin))
    logits = model.lm_head(layer.shared_head.norm(out))
    ref = F.cross_entropy(logits.flatten(0, 1), stream[:, 2:T + 1].flatten())
    assert abs(per_depth[0] - ref.item()) < 1e-5
    assert len(per_depth) == 2 and abs(loss.item() - sum(per_depth) / 2) < 1e-5
    assert len(stats) == 2 and stats[1].scores.shape[0] == B * (T - 2)
    loss.backward()
    assert mtp.layers[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0  # shared embedding gets MTP gradient


def test_checkpoint_layout_is_the_published_v3_one_and_inference_ignores_it(tmp_path):
    cfg, model, mtp, x, _ = setup(depth=1)
    n = cfg.num_hidden_layers
    path = ckpt.save_checkpoint(tmp_path, 5, model, {"step": 5, "optimizer": {}, "loader": {}, "rng": {}},
                                mtp_items=list(mtp_hf_items(mtp, model)))
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    p = f"model.layers.{n}."
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "input_layernorm.weight",
                 "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
                 "mlp.experts.0.gate_proj.weight", "mlp.shared_experts.down_proj.weight"):
        assert index[p + name] == ckpt.MTP_FILE, name
    assert index["lm_head.weight"] == "model.safetensors"
    with safe_open(str(path / ckpt.MTP_FILE), "pt") as sf:
        assert sf.get_tensor(p + "eh_proj.weight").shape == (cfg.hidden_size, 2 * cfg.hidden_size)
    loaded = load_model(path)  # skips layer n with a warning
    assert torch.equal(loaded(x), model.eval()(x))
    again = MTPHeads(cfg, 1).init_weights(99)
    load_mtp_state(again, ckpt.read_mtp_tensors(path))
    for (name, a), (_, b) in zip(mtp.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
