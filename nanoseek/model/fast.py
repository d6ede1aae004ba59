"""The switch for inference fast paths: fewer, fused ops where a reference path exists beside them.

    if fast.enabled():        # inference, not inside torch.compile, not switched off
        ...fast path...
    with fast.reference():    # tests: the same computation through the reference paths only
        ...

Each fast path sits next to its reference and a test shows they agree (tests/model/test_fast.py).
Training (grad enabled) and compiled graphs (Inductor fuses the reference ops itself) always take the
reference.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_ENABLED = True


def enabled() -> bool:
    return _ENABLED and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def in_reference() -> bool:
    """Whether a `reference()` block is running (whatever the grad mode)."""
    return not _ENABLED


@contextmanager
def reference():
    """Run the block with every fast path off (the oracle the fast paths are tested against)."""
    global _ENABLED
    old, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = old
