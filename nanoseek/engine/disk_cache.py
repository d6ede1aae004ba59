"""DeepSeek-style context caching on disk: full prefix blocks of the latent cache, kept across restarts.

    disk = DiskCache("runs/kv-cache", fingerprint=model_fingerprint(model), max_bytes=2**30)
    bm = BlockManager(..., external_lookup=disk.stage)   # a prefix block missing in memory is read here
    disk.take(h)        # the staged [layers, block_size, D] tensor, copied into the paged pool
    disk.save(h, data)  # a block that became full

One file per block, named by its chained hash (which already covers the model fingerprint and every
token before it), written to a temporary name and renamed, so a crash never leaves a file that looks
whole. Each file records the fingerprint, shape and dtype; a file that fails any check (another
model, truncated, corrupt) is deleted and treated as a miss, never trusted. Files are evicted
least-recently-used first (by modification time, refreshed on every hit) above `max_bytes`.
A folder it creates is private (0700), and so is each block file (0600): they hold what tenants sent.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.io import atomic_path


def model_fingerprint(model: torch.nn.Module, cache_dtype: torch.dtype | None = None) -> str:
    """A stable id of the weights (and the cache dtype): config, every tensor's name, shape, dtype
    and a strided sample of its values, the buffers that are not saved too (the rope frequencies,
    which decide every cached key). Different weights -> different prefix hashes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(sorted(model.config.to_dict().items())).encode())
    h.update(str(cache_dtype).encode())
    tensors = dict(model.state_dict())
    tensors.update((name, b) for name, b in model.named_buffers() if name not in tensors)
    for name, t in tensors.items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].float().cpu().numpy().tobytes()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample)
    return h.hexdigest()


class DiskCache:
    def __init__(self, root: str | os.PathLike, fingerprint: str, max_bytes: int = 2 ** 30,
                 block_shape: tuple[int, int, int] | None = None, dtype: torch.dtype | None = None):
        self.root = Path(root)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.fingerprint, self.max_bytes = fingerprint, max_bytes
        self.block_shape, self.dtype = block_shape, dtype
        self._staged: dict[str, torch.Tensor] = {}
        self.hits = self.misses = self.rejected = 0
        self._sizes = {p.stem: p.stat().st_size for p in self.root.glob("*.safetensors")}
        for stale in self.root.glob(".*.tmp"):  # temporaries of a crashed writer
            stale.unlink(missing_ok=True)

    def _path(self, h: str) -> Path:
        return self.root / f"{h}.safetensors"

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def stage(self, h: str) -> bool:
        """Read and check block h; keep it for `take`. False (and the file removed if bad) on a miss."""
        if h in self._staged:
            return True
        path = self._path(h)
        if not path.exists():
            self.misses += 1
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                data = f.get_tensor("kv")
            ok = (meta.get("fingerprint") == self.fingerprint and meta.get("hash") == h
                  and (self.block_shape is None or tuple(data.shape) == tuple(self.block_shape))
                  and (self.dtype is None or data.dtype == self.dtype))
        except Exception:  # truncated or corrupt: any failure to read is a miss
            ok = False
        if not ok:
            self.rejected += 1
            path.unlink(missing_ok=True)
            self._sizes.pop(h, None)
            return False
        os.utime(path)  # most recently used
        self._staged[h] = data
        self.hits += 1
        return True

    def take(self, h: str) -> torch.Tensor:
        if h not in self._staged and not self.stage(h):
            raise KeyError(f"block {h} is not in the disk cache")
        return self._staged.pop(h)

    def save(self, h: str, data: torch.Tensor) -> None:
        path = self._path(h)  # rewritten even if present: a block is saved only when it was not readable
        with atomic_path(path, mode=0o600) as tmp:
            save_file({"kv": data.detach().contiguous().cpu()}, str(tmp),
                      metadata={"fingerprint": self.fingerprint, "hash": h})
        self._sizes[h] = path.stat().st_size
        self._evict()

    def _evict(self) -> None:
        if self.nbytes <= self.max_bytes:
            return
        by_age = sorted(self._sizes, key=lambda k: self._path(k).stat().st_mtime
                        if self._path(k).exists() else 0.0)
        for h in by_age:
            if self.nbytes <= self.max_bytes:
                break
            self._path(h).unlink(missing_ok=True)
            del self._sizes[h]
