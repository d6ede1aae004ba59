"""Weight-only int8 / int4 quantisation: the math, the quantised weight, and its kernels.

    scheme = QuantScheme.parse("int4", group_size=128)
    q, scale, zero = quantize(w, scheme)           # w [..., N, K] float
    w_hat = dequantize(q, scale, zero, scheme)     # [..., N, K] fp32
    qw = QuantWeight((N, K), scheme, torch.bfloat16)   # a module: buffers, no parameters
    y = linear(x, qw)                              # nanoseek.model.linear: kernels["int8" | "int4"]

Schemes (activations stay in the model's dtype):
- int8: symmetric, one scale per output channel: w ~ q * scale[n], q in [-128, 127].
- int4: one scale per group of `group_size` input channels; symmetric (q in [-8, 7]) or
  asymmetric (w ~ (q - zero) * scale, zero in [-8, 7]), as the compressed-tensors format defines.
Scales always have shape [..., N, K // group] (int8: group = K, so [..., N, 1]).

In memory a QuantWeight keeps one of two layouts:
- "plain": int8 q [..., N, K]; int4 two per byte [..., N, K/2] (element 2j in the low nibble,
  stored as q + 8), which is byte for byte compressed-tensors' int32 packing on little-endian hosts.
- "cpu_int4": torch's tiled layout for `aten._weight_int4pack_mm_for_cpu` plus its
  scales_and_zeros [..., K/group, N, 2]. Picked by `to_kernel_layout` when that kernel exists for
  the device and dtype (bf16 on CPU: measured 50-100x faster than its fp32 path on our host).
The tiling of that layout is learnt once per process by packing probe values (`_cpu_int4_block`),
not assumed, so dequantising (for the reference kernel and for saving) stays exact on any build.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = {"int8": 8, "int4": 4}
_ROW_CHUNK = 4096  # quantise this many output rows at a time: bounded fp32 temporaries


class QuantError(ValueError):
    """A quantisation request that cannot be met; the message names the value."""


@dataclass(frozen=True)
class QuantScheme:
    bits: int
    group_size: int | None = None  # None: one group per row (int8's per-channel scales)
    symmetric: bool = True

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @classmethod
    def parse(cls, scheme: str | int, group_size: int | None = 128, symmetric: bool = True) -> "QuantScheme":
        bits = SCHEMES.get(scheme) if isinstance(scheme, str) else scheme
        if bits not in (4, 8):
            raise QuantError(f"quantization={scheme!r}: expected 'int8' or 'int4' (bits 8 or 4)")
        if bits == 8:
            return cls(8, None, True)
        if not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
            raise QuantError(f"group_size={group_size!r}: expected a positive even number of input channels")
        return cls(4, group_size, symmetric)

    def group(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def check(self, shape: tuple[int, ...], name: str = "weight") -> None:
        """Raise QuantError when a weight of this shape cannot be quantised with this scheme."""
        K = shape[-1]
        if self.group_size is not None and K % self.group_size:
            raise QuantError(f"{name}: group_size={self.group_size} does not divide its input dimension {K}")
        if self.bits == 4 and K % 2:
            raise QuantError(f"{name}: int4 needs an even input dimension, got {K}")

    def qrange(self) -> tuple[int, int]:
        return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1


# ---------------------------------------------------------------------- math (pure functions)
def _quantize_rows(w: torch.Tensor, s: QuantScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    N, K = w.shape[-2:]
    g = s.group(K)
    lo, hi = s.qrange()
    wg = w.float().reshape(*w.shape[:-1], K // g, g)  # [..., N, G, g]
    if s.symmetric:
        scale = wg.abs().amax(-1) / (hi + 0.5)  # as compressed-tensors: amax / ((qmax - qmin) / 2)
        scale = scale.clamp(min=torch.finfo(torch.float32).tiny)
        q = (wg / scale[..., None]).round().clamp(lo, hi)
        if s.bits == 4:  # 16 levels: clipping the largest weights often lowers the group's error
            q, scale = _clip_search(wg, q, scale, lo, hi)
        zero = None
    else:
        mn, mx = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((mx - mn) / (hi - lo)).clamp(min=torch.finfo(torch.float32).tiny)
        zero = (lo - (mn / scale).round()).clamp(lo, hi)
        q = ((wg / scale[..., None]).round() + zero[..., None]).clamp(lo, hi)
        zero = zero.to(torch.int8)
    return q.to(torch.int8).reshape(w.shape), scale, zero


CLIP_RATIOS = (0.95, 0.9, 0.85, 0.8, 0.75)  # scales tried below absmax for symmetric int4


def _clip_search(wg: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, lo: int, hi: int):
    """Per group, the scale among absmax's and CLIP_RATIOS of it with the least squared error (the
    weights beyond the clipped range saturate): wg [..., G, g], q and scale for absmax -> (q, scale)."""
    best = ((q * scale[..., None] - wg) ** 2).sum(-1)  # [..., G]
    for r in CLIP_RATIOS:
        sc = scale * r
        qc = (wg / sc[..., None]).round().clamp(lo, hi)
        err = ((qc * sc[..., None] - wg) ** 2).sum(-1)
        better = err < best
        q = torch.where(better[..., None], qc, q)
        scale = torch.where(better, sc, scale)
        best = torch.minimum(err, best)
    return q, scale


def quantize(w: torch.Tensor, s: QuantScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w [..., N, K] -> (q int8 [..., N, K], scale fp32 [..., N, G], zero int8 [..., N, G] or None)."""
    s.check(tuple(w.shape))
    flat = w.reshape(-1, w.shape[-1])  # [rows, K]
    rows = _ROW_CHUNK // 8 if s.bits == 4 and s.symmetric else _ROW_CHUNK  # the clip search's temporaries
    parts = [_quantize_rows(flat[i:i + rows], s) for i in range(0, max(flat.shape[0], 1), rows)]
    q = torch.cat([p[0] for p in parts]).reshape(w.shape)
    scale = torch.cat([p[1] for p in parts]).reshape(*w.shape[:-1], -1)
    zero = None if s.symmetric else torch.cat([p[2] for p in parts]).reshape(*w.shape[:-1], -1)
    return q, scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, s: QuantScheme,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [..., N, K], scale [..., N, G], zero) -> w [..., N, K] in dtype (computed in fp32)."""
    K, G = q.shape[-1], scale.shape[-1]
    qg = q.float().reshape(*q.shape[:-1], G, K // G)
    if zero is not None:
        qg = qg - zero.float()[..., None]
    return (qg * scale.float()[..., None]).reshape(q.shape).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [..., K] -> uint8 [..., K/2]: (q[2j] + 8) | (q[2j+1] + 8) << 4."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int8 [..., K] in [-8, 7]."""
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], -1).to(torch.int8) - 8


# ---------------------------------------------------------------------- torch's CPU int4 layout
@functools.cache
def _cpu_int4_block() -> int | None:
    """The N-block of `_convert_weight_to_int4pack_for_cpu` on this build ([N/B, K, B/2] bytes,
    n and n + B/2 sharing a byte), found by packing probes; None when the op is missing or the
    layout is another one (then int4 stays in the plain layout)."""
    op = getattr(torch, "_convert_weight_to_int4pack_for_cpu", None)
    if op is None:
        return None
    N, K = 128, 64
    n = torch.arange(N)[:, None].expand(N, K)
    k = torch.arange(K)[None].expand(N, K)
    try:
        digits = [op(((v // 16 ** d) % 16).to(torch.int32).contiguous(), 2) for v in (n, k) for d in (0, 1)]
    except RuntimeError:
        return None
    lo = [d & 0xF for d in digits]
    hi = [d >> 4 for d in digits]
    n_lo, k_lo = (lo[0] + 16 * lo[1]).long().reshape(-1), (lo[2] + 16 * lo[3]).long().reshape(-1)
    n_hi = (hi[0] + 16 * hi[1]).long().reshape(-1)
    for B in (16, 32, 64):
        i = torch.arange(N * K // 2)
        nb, rem = i // (K * B // 2), i % (K * B // 2)
        kk, j = rem // (B // 2), rem % (B // 2)
        if torch.equal(n_lo, nb * B + j) and torch.equal(n_hi, nb * B + j + B // 2) and torch.equal(k_lo, kk):
            return B
    return None


def _to_cpu_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> torch's tiled uint8 [N, K/2]."""
    return torch._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 2)


def _from_cpu_int4(t: torch.Tensor, K: int) -> torch.Tensor:
    """The inverse of _to_cpu_int4: tiled uint8 [N, K/2] -> int8 [N, K] in [-8, 7]."""
    B = _cpu_int4_block()
    N = t.shape[0]
    b = t.reshape(N // B, K, B // 2)
    u = torch.stack([b & 0xF, b >> 4], dim=2)  # [N/B, K, 2, B/2]: n = nb*B + half*B/2 + j
    return (u.permute(0, 2, 3, 1).reshape(N, K).to(torch.int8) - 8)


# ---------------------------------------------------------------------- the quantised weight
class QuantWeight(nn.Module):
    """A weight-only quantised [..., N, K] weight, held in buffers (moved by .to(), counted by
    model_fingerprint). `kind`, `shape` and `compute_dtype` are what the linear dispatch reads."""

    def __init__(self, shape: tuple[int, ...], scheme: QuantScheme, compute_dtype: torch.dtype,
                 device=None, layout: str = "plain"):
        super().__init__()
        scheme.check(shape)
        self.scheme, self.shape, self.layout = scheme, tuple(shape), layout
        self.kind = scheme.name
        *lead, N, K = shape
        G = K // scheme.group(K)
        qshape = (*lead, N, K) if scheme.bits == 8 else (*lead, N, K // 2)
        self.register_buffer("qdata", torch.empty(qshape, dtype=torch.int8 if scheme.bits == 8 else torch.uint8,
                                                  device=device))
        if layout == "plain":
            self.register_buffer("scale", torch.empty(*lead, N, G, dtype=compute_dtype, device=device))
            self.register_buffer("zero", None if scheme.symmetric else
                                 torch.empty(*lead, N, G, dtype=torch.int8, device=device))
        else:  # cpu_int4
            self.register_buffer("scales_and_zeros", torch.empty(*lead, G, N, 2, dtype=compute_dtype, device=device))

    @property
    def compute_dtype(self) -> torch.dtype:
        return (self.scale if self.layout == "plain" else self.scales_and_zeros).dtype

    @property
    def group_size(self) -> int:
        return self.scheme.group(self.shape[-1])

    def extra_repr(self) -> str:
        return f"{self.kind}, shape={self.shape}, group={self.group_size}, layout={self.layout}"

    # -------------------------------------------------------------- filling (one slice at a time)
    def store(self, index: tuple, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """Write quantised rows (plain layout): self[index] = (q [.., n, K] int8, scale [.., n, G], zero)."""
        assert self.layout == "plain", f"store needs the plain layout, not {self.layout}"
        self.qdata[index] = q if self.scheme.bits == 8 else pack_int4(q)
        self.scale[index] = scale.to(self.scale.dtype)
        if self.zero is not None:
            self.zero[index] = zero

    def quantize_into(self, index: tuple, w: torch.Tensor) -> None:
        """Quantise float rows w and store them at index; a whole 2-D weight goes _ROW_CHUNK rows at a
        time, so a [102400, 2048] lm_head never has its int8 values (or their int16 packing) whole."""
        if index == () and w.dim() == 2 and w.shape[0] > _ROW_CHUNK:
            for i in range(0, w.shape[0], _ROW_CHUNK):
                self.store((slice(i, i + _ROW_CHUNK),), *quantize(w[i:i + _ROW_CHUNK], self.scheme))
            return
        self.store(index, *quantize(w, self.scheme))

    # -------------------------------------------------------------- views
    def plain(self, e: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q int8 [N, K] or [..., N, K], scale, zero) whatever the layout (a copy for cpu_int4)."""
        K = self.shape[-1]
        if self.layout == "plain":
            sl = (lambda t: t if e is None or t is None else t[e])
            qd = sl(self.qdata)
            q = qd if self.scheme.bits == 8 else unpack_int4(qd)
            return q, sl(self.scale), sl(self.zero)
        stacked = self.qdata if e is None else self.qdata[e][None]
        sz = self.scales_and_zeros if e is None else self.scales_and_zeros[e][None]
        q = torch.stack([_from_cpu_int4(t, K) for t in stacked.reshape(-1, *stacked.shape[-2:])])
        scale = sz[..., 0].transpose(-1, -2)  # [.., N, G]
        zero = None
        if not self.scheme.symmetric:  # kernel zero = -zero * scale
            zero = (-sz[..., 1].transpose(-1, -2).float() / scale.float()).round().to(torch.int8)
        q = q.reshape(*stacked.shape[:-1], K)
        if e is not None:
            q, scale, zero = q[0], scale[0], None if zero is None else zero[0]
        return q, scale, zero

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        q, scale, zero = self.plain()
        return dequantize(q, scale, zero, self.scheme, dtype or self.compute_dtype)

    def dense(self) -> torch.Tensor:
        """The dequantised weight in the compute dtype: the copy kept by `cache_dense`, else made now."""
        cached = getattr(self, "dense_cache", None)
        return cached if cached is not None else self.dequantize()

    def cache_dense(self, dtype: torch.dtype | None = None) -> None:
        """Keep a dequantised copy (not saved, in dtype; default the compute dtype) for callers that need
        the weight itself, like absorbed MLA's per-head W_UK / W_UV; the quantised form still serves
        the linear kernels."""
        self.register_buffer("dense_cache", self.dequantize(dtype), persistent=False)

    def unbind(self, dim: int = 0) -> list["QuantSlice"]:
        """One 2-D view per leading index (the experts), sharing storage."""
        assert dim == 0 and len(self.shape) == 3, f"unbind(0) of a stacked [E, N, K] weight, not {self.shape}"
        return [QuantSlice(self, e) for e in range(self.shape[0])]

    # -------------------------------------------------------------- layout
    def to_kernel_layout(self) -> "QuantWeight":
        """Switch int4 to torch's CPU tiled layout when that kernel exists for this device and dtype;
        returns self (the layout changes in place, one expert at a time)."""
        if self.layout != "plain" or self.scheme.bits != 4 or not has_cpu_int4_kernel(self.qdata.device, self.compute_dtype, self.shape,
                                                                            self.group_size):
            return self
        K, G = self.shape[-1], self.scale.shape[-1]
        lead = self.shape[:-2]
        q_all, sc, zr = self.qdata.reshape(-1, *self.qdata.shape[-2:]), self.scale, self.zero
        # in place, a block-aligned run of rows at a time: tiled rows [r, r + n) depend only on plain
        # rows [r, r + n) (the layout is [N/B, K, B/2]), and the int32 input the op wants is 8 bytes
        # per weight, so whole-weight temporaries would be 16x the weight (1.7 GB for V2-Lite's lm_head)
        rows = max(_cpu_int4_block(), _ROW_CHUNK // _cpu_int4_block() * _cpu_int4_block())
        for i in range(q_all.shape[0]):
            for r in range(0, q_all.shape[1], rows):
                q_all[i, r:r + rows] = _to_cpu_int4(unpack_int4(q_all[i, r:r + rows]))
        sz = torch.stack([sc, torch.zeros_like(sc) if zr is None else -zr.to(sc.dtype) * sc], dim=-1)  # [.., N, G, 2]
        del self.scale, self.zero
        self.register_buffer("scales_and_zeros", sz.transpose(-2, -3).contiguous())  # [.., G, N, 2]
        self.layout = "cpu_int4"
        assert self.scales_and_zeros.shape == (*lead, G, self.shape[-2], 2)
        return self


class QuantSlice:
    """Expert e of a stacked QuantWeight: the same interface as a 2-D QuantWeight, no copy."""

    __slots__ = ("parent", "e", "kind", "shape", "scheme", "layout")

    def __init__(self, parent: QuantWeight, e: int):
        self.parent, self.e = parent, e
        self.kind, self.scheme, self.layout, self.shape = parent.kind, parent.scheme, parent.layout, parent.shape[1:]

    compute_dtype = property(lambda self: self.parent.compute_dtype)
    group_size = property(lambda self: self.parent.group_size)
    qdata = property(lambda self: self.parent.qdata[self.e])
    scale = property(lambda self: self.parent.scale[self.e])
    scales_and_zeros = property(lambda self: self.parent.scales_and_zeros[self.e])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        q, scale, zero = self.parent.plain(self.e)
        return dequantize(q, scale, zero, self.scheme, dtype or self.compute_dtype)


CPU_INT4_GROUPS = (32, 64, 128, 256)  # the group sizes aten._weight_int4pack_mm_for_cpu accepts


def has_cpu_int4_kernel(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...], group: int) -> bool:
    B = _cpu_int4_block()
    return (device.type == "cpu" and dtype == torch.bfloat16 and B is not None
            and shape[-2] % B == 0 and group in CPU_INT4_GROUPS)


def check_kernel(scheme: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise QuantError for a device or dtype that no quantised kernel here runs on."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise QuantError(f"quantization={scheme!r} has no kernel for device {device.type!r} (cpu or cuda)")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise QuantError(f"quantization={scheme!r} has no kernel for dtype {dtype} "
                         f"(float32, bfloat16 or float16 activations)")


# ---------------------------------------------------------------------- kernels: x2 [rows, K] -> [rows, N]
def dequant_linear(x2: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: dequantise the whole weight, then F.linear (any device, any layout)."""
    return F.linear(x2, w.dequantize(x2.dtype), bias)


def dequant_f32_linear(x2: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise to fp32, multiply in fp32, cast back: for many rows on CPUs without a native bf16
    GEMM (AVX2), where this runs at the fp32 BLAS rate and the fused bf16 ops do not."""
    y = F.linear(x2.float(), w.dequantize(torch.float32), None if bias is None else bias.float())
    return y.to(x2.dtype)


def int8pack_linear(x2: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch._weight_int8pack_mm: int8 weights and per-channel scales, activations in their dtype
    (CPU; elsewhere the reference)."""
    if x2.device.type != "cpu":
        return dequant_linear(x2, w, bias)
    y = torch._weight_int8pack_mm(x2.contiguous(), w.qdata, w.scale[:, 0].to(x2.dtype))
    return y if bias is None else y + bias


def int4pack_linear(x2: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """aten._weight_int4pack_mm_for_cpu on the tiled layout, activations in the weight's compute
    dtype (a weight left in the plain layout: the reference)."""
    if w.layout != "cpu_int4":
        return dequant_linear(x2, w, bias)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(w.compute_dtype).contiguous(), w.qdata, w.group_size,
                                                   w.scales_and_zeros)
    y = y.to(x2.dtype)
    return y if bias is None else y + bias


def auto_linear(x2: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel used without a per-shape measurement: the fused torch op where it exists for the
    device, dtype and layout (bf16 on CPU: 3-5x faster than dequantise + F.linear from 1 to 512 rows
    on our host, bench/RESULTS.md), else the reference."""
    if w.layout == "cpu_int4":
        return int4pack_linear(x2, w, bias)
    if w.kind == "int8" and x2.device.type == "cpu" and x2.dtype == torch.bfloat16:
        return int8pack_linear(x2, w, bias)
    return dequant_linear(x2, w, bias)
