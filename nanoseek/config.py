"""ModelConfig: one dataclass whose field names are the keys of HF config.json.

Covers `model_type` deepseek_v2, deepseek_v3 and llama. Reads the published configs
(`rope_theta` + `rope_scaling`) and those written by transformers 5 (`rope_parameters`), and
writes configs that transformers loads. Derived values are properties; impossible combinations
are rejected with a message naming the values.

    cfg = ModelConfig.from_json("configs/deepseek-v2-lite.json")
    cfg.kv_cache_dim          # 576 = kv_lora_rank + qk_rope_head_dim
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.io import atomic_write

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "llama")
ARCHITECTURES = {
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "linear", "yarn")

# What a key absent from config.json means, per family, where it differs from the dataclass defaults
# below (which are DeepSeek-V2's). These are the defaults of transformers' config classes
# (DeepseekV2Config, DeepseekV3Config, LlamaConfig; transformers 5.24), so a config.json written by
# transformers, which leaves out keys its class does not have or that equal its defaults, means the
# same model here. transformers' V3 always routes with sigmoid scores and noaux_tc, so it writes no
# topk_method or scoring_func; DeepSeek's own V3 config sets those to the same values.
ABSENT_KEY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(num_hidden_layers=32, n_routed_experts=64, n_shared_experts=2,
                        bos_token_id=1, eos_token_id=2),
    "deepseek_v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
                        num_attention_heads=128, max_position_embeddings=4096, moe_intermediate_size=2048,
                        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
                        topk_group=4, first_k_dense_replace=3, norm_topk_prob=True, routed_scaling_factor=2.5,
                        topk_method="noaux_tc", scoring_func="sigmoid", num_nextn_predict_layers=1,
                        bos_token_id=0, eos_token_id=1),
    "llama": dict(vocab_size=32000, num_hidden_layers=32, bos_token_id=1, eos_token_id=2, q_lora_rank=None),
}


class ConfigError(ValueError):
    """A config value (or combination) that no model can be built from."""


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v2"
    # shapes shared by all families
    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # llama only; default hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # rope (published layout; transformers-5 `rope_parameters` is folded into these two)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool | None = None  # None: interleaved for DeepSeek, half-split for Llama
    # mla
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # moe
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int = 1407
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    ep_size: int = 1
    # v3 multi-token prediction
    num_nextn_predict_layers: int = 0
    # keys we do not model but keep, so a config round-trips (quantization_config, auto_map, ...)
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None or self.model_type != "llama":
            # MLA has one latent shared by all heads: the key means nothing there, and transformers'
            # DeepseekV3Config defaults it to 128 whatever the head count, so it is not checked
            self.num_key_value_heads = self.num_attention_heads
        if self.model_type == "llama" and self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        elif self.model_type != "llama":
            self.head_dim = None  # transformers writes qk_rope_head_dim here; MLA derives its dims
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.pop("rope_type", None) or self.rope_scaling.pop("type", None)
            self.rope_scaling["type"] = kind or "default"
            if self.rope_scaling["type"] == "default" and len(self.rope_scaling) == 1:
                self.rope_scaling = None
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.model_type in MODEL_TYPES,
             f"model_type={self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0")
        need(self.hidden_act == "silu", f"hidden_act={self.hidden_act!r}: only 'silu' is supported")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads={self.num_attention_heads} is not divisible by "
             f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling["type"]
            need(kind in ROPE_TYPES, f"rope_scaling.type={kind!r} is not supported; expected {ROPE_TYPES}")
            if kind in ("linear", "yarn"):
                need(float(self.rope_scaling.get("factor") or 0) >= 1.0,
                     f"rope_scaling.factor={self.rope_scaling.get('factor')} must be >= 1 for {kind}")
            if kind == "yarn":
                need("original_max_position_embeddings" in self.rope_scaling,
                     "rope_scaling of type yarn needs original_max_position_embeddings")
        if self.model_type == "llama":
            need(self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
                 f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                 f"{self.num_attention_heads}; set head_dim")
            need(self.attn_head_dim % 2 == 0, f"head_dim={self.attn_head_dim} must be even for rope")
            return
        # deepseek
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        need(self.kv_lora_rank > 0, f"kv_lora_rank={self.kv_lora_rank} must be > 0")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
             f"q_lora_rank={self.q_lora_rank} must be null or > 0")
        if self.model_type == "deepseek_v2":
            need(self.rope_interleave in (None, True),
                 "deepseek_v2 checkpoints use the interleaved rope layout; rope_interleave=false "
                 "is only meaningful for deepseek_v3")
        need(self.topk_method in TOPK_METHODS,
             f"topk_method={self.topk_method!r} is not supported; expected one of {TOPK_METHODS}")
        need(self.scoring_func in SCORING_FUNCS,
             f"scoring_func={self.scoring_func!r} is not supported; expected one of {SCORING_FUNCS}")
        need(self.moe_layer_freq >= 1, f"moe_layer_freq={self.moe_layer_freq} must be >= 1")
        if not self.is_moe:
            return
        E, K = self.n_routed_experts, self.num_experts_per_tok
        need(K is not None and 0 < K <= E,
             f"num_experts_per_tok={K} must be in [1, n_routed_experts={E}]")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace={self.first_k_dense_replace} must be in "
             f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            G, TG = self.n_group, self.topk_group
            need(G is not None and G >= 1, f"topk_method={self.topk_method} needs n_group >= 1, got {G}")
            need(E % G == 0, f"n_routed_experts={E} is not divisible by n_group={G}")
            need(TG is not None and 1 <= TG <= G, f"topk_group={TG} must be in [1, n_group={G}]")
            need(K <= TG * (E // G),
                 f"num_experts_per_tok={K} exceeds the experts in topk_group={TG} groups of "
                 f"{E // G} (n_routed_experts={E} / n_group={G})")
            if self.topk_method == "noaux_tc":
                need(E // G >= 2, f"noaux_tc scores a group by its top-2 experts: n_routed_experts={E} / "
                                  f"n_group={G} leaves {E // G} per group")
        if self.topk_method == "noaux_tc":
            need(self.scoring_func == "sigmoid",
                 f"topk_method=noaux_tc is defined for scoring_func='sigmoid', got {self.scoring_func!r}")

    # ------------------------------------------------------------------ derived values
    @property
    def is_mla(self) -> bool:
        return self.model_type != "llama"

    @property
    def is_moe(self) -> bool:
        """Routed experts in the FFN: DeepSeek's, or (llama + n_routed_experts) nanoseek's GQA + MoE
        variant for comparisons, which transformers' LlamaConfig does not describe."""
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: MoE from layer first_k_dense_replace on, every moe_layer_freq-th layer."""
        return (self.is_moe and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attn_head_dim(self) -> int:
        """Llama's per-head dim."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.attn_head_dim

    @property
    def rope_is_interleaved(self) -> bool:
        if self.rope_interleave is not None:
            return self.rope_interleave
        return self.is_mla

    @property
    def kv_cache_dim(self) -> int:
        """Elements cached per token per layer: the latent (MLA) or K and V of every KV head (GQA)."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * self.attn_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d) for the query-key dot product; YaRN multiplies it by mscale(factor, mscale_all_dim)^2."""
        d = self.qk_head_dim if self.is_mla else self.attn_head_dim
        scale = d ** -0.5
        rs = self.rope_scaling
        if self.is_mla and rs is not None and rs["type"] == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ------------------------------------------------------------------ io
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if "model_type" not in d:
            raise ConfigError("config has no model_type; expected one of " + ", ".join(MODEL_TYPES))
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", rp)
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        if d.get("num_mtp_layers") is not None and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d.pop("num_mtp_layers")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        for k, v in ABSENT_KEY_DEFAULTS.get(d["model_type"], {}).items():
            known.setdefault(k, v)
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no model config at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    _DEEPSEEK_ONLY = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                      "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "moe_layer_freq", "first_k_dense_replace", "n_group", "topk_group", "topk_method",
                      "scoring_func", "norm_topk_prob", "routed_scaling_factor", "aux_loss_alpha", "seq_aux",
                      "ep_size", "num_nextn_predict_layers", "rope_interleave")

    _MOE_KEYS = ("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
                 "moe_layer_freq", "first_k_dense_replace", "n_group", "topk_group", "topk_method", "scoring_func",
                 "norm_topk_prob", "routed_scaling_factor", "aux_loss_alpha", "seq_aux")

    def to_dict(self) -> dict[str, Any]:
        """An HF config.json dict that transformers loads (published key names)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        if self.model_type == "llama":
            keep = self._MOE_KEYS if self.is_moe else ()  # GQA + MoE keeps its experts
            for k in self._DEEPSEEK_ONLY:
                if k not in keep:
                    d.pop(k, None)
            d["head_dim"] = self.attn_head_dim
        else:
            d.pop("head_dim", None)
            d.pop("mlp_bias", None)
            if self.model_type == "deepseek_v2":
                d.pop("num_nextn_predict_layers", None)
                d.pop("rope_interleave", None)
        if d.get("rope_scaling") is None:
            d.pop("rope_scaling", None)
        if d.get("rope_interleave") is None:
            d.pop("rope_interleave", None)
        out = {"architectures": [ARCHITECTURES[self.model_type]], **self.extra, **d}
        if out.get("torch_dtype") is None:
            out.pop("torch_dtype", None)
        return out

    def to_json(self, path: str | os.PathLike) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
