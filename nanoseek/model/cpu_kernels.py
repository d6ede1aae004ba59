"""nanoseek's C++ CPU kernels (nanoseek/model/csrc), compiled on first use and skipped where they cannot be.

    if cpu_kernels.load():            # True once torch.ops.nanoseek.* exist in this process
        y = torch.ops.nanoseek.gemv(x, w)

They are built with torch.utils.cpp_extension (the host's C++ compiler, -O3 -mavx2 -mfma -fopenmp)
into torch's extensions directory ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), about
40 s on 2 cores the first time and a load afterwards. Nothing depends on them: `load` returns False
(and says why once, in the log) on a host without AVX2 + FMA, without a compiler, where the build
fails, or with NANOSEEK_CPU_KERNELS=0, and every caller then keeps its torch path. Where they load,
they are candidates like any other kernel: nanoseek.model.linear.tune measures them against F.linear
on this host's shapes and uses them only where they win.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
from pathlib import Path

import torch

log = logging.getLogger("nanoseek.model")

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("cpu_gemv.cpp", "cpu_moe.cpp", "cpu_attention.cpp", "cpu_decode.cpp")]
_STATE: dict[str, object] = {}  # "ok": bool, "why": str


def unsupported() -> str | None:
    """Why the kernels cannot be built on this host, or None."""
    if os.environ.get("NANOSEEK_CPU_KERNELS", "1") == "0":
        return "NANOSEEK_CPU_KERNELS=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{platform.machine()} is not x86-64"
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    if not {"avx2", "fma"} <= set(flags):
        return "the CPU lacks AVX2 or FMA"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return "no C++ compiler on PATH"
    if not shutil.which("ninja"):
        try:  # the `ninja` wheel (a dependency) ships the binary; .venv/bin need not be on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            return "no ninja (pip install ninja)"
    return None


def load() -> bool:
    """Build (first time) and load the kernels into this process; False if they are unavailable."""
    if "ok" in _STATE:
        return bool(_STATE["ok"])
    why = unsupported()
    if why is None:
        try:
            from torch.utils.cpp_extension import load as build

            # the name carries a digest of every source and header: torch's rebuild check sees sources only
            digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()))).hexdigest()[:10]
            log.info("loading nanoseek's CPU kernels (compiled the first time on a host: ~20-40 s)")
            build(name=f"nanoseek_cpu_kernels_{digest}", sources=[str(s) for s in SOURCES], is_python_module=False,
                  extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as e:  # a broken toolchain must not stop the engine: torch's kernels remain
            why = f"the build failed ({type(e).__name__}: {str(e).strip()[:300]})"
    _STATE["ok"], _STATE["why"] = why is None, why
    if why is not None:
        log.info("nanoseek CPU kernels unavailable (%s); using torch's", why)
    return why is None


def why_unavailable() -> str | None:
    return None if load() else str(_STATE["why"])


def gemv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A `linear` kernel: x2 [rows, in] @ weight[out, in]^T (+ bias) through nanoseek::gemv where it
    applies (fp32, CPU, weight rows contiguous), else F.linear."""
    if (x2.dtype != torch.float32 or weight.dtype != torch.float32 or weight.device.type != "cpu"
            or weight.stride(-1) != 1 or weight.stride(0) != weight.shape[1] or not load()):
        return torch.nn.functional.linear(x2, weight, bias)
    y = torch.ops.nanoseek.gemv(x2 if x2.stride(-1) == 1 else x2.contiguous(), weight)  # [rows, out]
    return y if bias is None else y + bias
