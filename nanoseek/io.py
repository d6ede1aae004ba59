"""The one way nanoseek writes a file or a folder: build it under a temporary name beside the target,
then rename it into place, so a reader (or a crash) never sees half of it.

    atomic_write(run / "train_config.json", text)           # str or bytes; mode= for secrets (0o600)
    with atomic_path(out / "plot.png") as tmp:              # anything that writes to a path
        fig.savefig(tmp)
    with atomic_dir(run / "checkpoints" / "step_0000100") as tmp:   # a whole folder
        (tmp / "config.json").write_text(...)
    replace_dir(src, dst)                                   # put a finished folder at dst

The temporary name is ".NAME.<random>.tmp" in the target's folder (a rename is atomic only within one
file system; the leading dot and the .tmp ending keep it out of globs such as "*.safetensors" and let
a cleanup find a crashed writer's leftovers). On any error the temporary is removed and the target is
untouched.
This module imports nothing from nanoseek: every layer may use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, rename it to `path`.

    The temporary does not end in `path`'s suffix: a writer that picks its format from the name
    needs it spelled out (savefig(tmp, format="png")).
    mode: permission bits, set before anything is written (0o600 for a secret); None gives what a
    plain open() would (0o666 less the umask).
    fsync: flush the file to disk before the rename (for files that must survive a power cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK if mode is None else mode)
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: str | bytes, mode: int | None = None,
                 fsync: bool = False) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path, mode=mode, fsync=fsync) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return path


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put the finished folder src at dst, replacing an older dst: a reader sees the old folder or
    the new one, never a mix (dst is absent only between two renames)."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends without error it replaces
    `path` (replace_dir). On error the temporary folder is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
