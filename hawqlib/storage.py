"""Atomic file writes: a result is either whole on disk or absent.

Every artifact the project writes (checkpoints, logs, caches, spectra) goes through
these helpers: the bytes go to a temporary file in the same folder, are flushed to
disk, and only then renamed over the destination. An interrupted run therefore never
leaves a half-written file that looks whole.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_torch_save"]


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))
