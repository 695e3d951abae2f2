"""Atomic file writes and file digests: the method's own small helpers for every file it writes.

A file is written to a temporary file beside its destination, flushed to disk, then renamed over it, so an
interrupted run never leaves a half-written file that looks whole (checkpoints, resume state, packed models,
spectra). :func:`file_sha256` is the digest that checkpoints and, on the companion floor, artifact manifests
record and check. :func:`load_weights_only` is the one way a torch file is read (tensors, numbers, strings and
their containers; no code runs), and its error never repeats torch's advice to load the file unsafely.
Written files get the permissions of any file the user creates (``0o666`` less the umask), not the
owner-only mode of the temporary file they are written through. Nothing here is from the paper.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_torch_save", "file_sha256",
           "load_weights_only"]


def _umask() -> int:
    mask = os.umask(0o022)  # read by setting it; put back at once
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's file is owner-only; the result is an ordinary file
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


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_weights_only(path: str | os.PathLike):
    """``torch.load(path, weights_only=True)`` onto the CPU; a file that is not a weights-only file (or not a torch
    file) is a ValueError naming it and what the loader refused, without torch's advice to load it unsafely."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        keep = [ln for ln in lines if not any(w in ln.lower() for w in (
            "weights_only", "weights only", "trusted source", "documentation", "file an issue"))]
        why = " ".join(keep)[:300] or type(exc).__name__
        raise ValueError(f"{os.fspath(path)} is not a weights-only torch file ({why}); only tensors, numbers, "
                         "strings and their containers are read, and nothing else is unpickled") from None
