"""nanoseek: DeepSeek-V2/V3 (MLA + DeepSeekMoE) and a Llama baseline, from data to a cost-plus API.

    from nanoseek import ModelConfig, load_model, save_model, LLM, SamplingParams
"""

from __future__ import annotations

import importlib

from nanoseek.config import ModelConfig

__version__ = "0.1.0"

_LAZY = {
    "load_model": "nanoseek.model.checkpoint",
    "save_model": "nanoseek.model.checkpoint",
    "build_model": "nanoseek.model.transformer",
    "LLM": "nanoseek.engine.llm",
    "SamplingParams": "nanoseek.engine.sampling",
}

__all__ = ["ModelConfig", *_LAZY]


def __getattr__(name: str):  # torch is imported only when a model is asked for
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
