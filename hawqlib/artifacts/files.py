"""Files of the artifact cache: atomic writes, one writer per folder, orphan temp files, file digests.

Every file the project writes (artifacts, checkpoints, logs, the decode cache, spectra) goes through
these helpers: the bytes go to a temporary file in the same folder, are flushed to
disk, and only then renamed over the destination. An interrupted run therefore never
leaves a half-written file that looks whole; the temp files a kill leaves behind are removed
(:func:`remove_orphan_tmp`) by the next writer, which holds the folder's lock (:func:`folder_lock`).
:func:`file_sha256` is the digest :mod:`hawqlib.artifacts.manifest` records and checks.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_torch_save", "folder_lock",
           "FolderBusyError", "remove_orphan_tmp", "file_sha256"]


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


# --------------------------------------------------------------------------- one writer per folder

class FolderBusyError(RuntimeError):
    """Another process holds the lock of a folder (it is computing the same result)."""


def _holder_pid(folder: Path) -> int | None:
    """The PID holding an flock on ``folder``, from ``/proc/locks`` (Linux); None where unknown."""
    try:
        st = os.stat(folder)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK" or parts[0].endswith("->"):
            continue
        try:
            major, minor, ino = parts[5].split(":")
            if (int(ino), int(major, 16), int(minor, 16)) == (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)):
                return int(parts[4])
        except ValueError:
            continue
    return None


@contextmanager
def folder_lock(folder: str | os.PathLike, *, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive OS lock (``flock``) on ``folder`` (created if absent) for the ``with`` block.

    The lock is on the folder itself, so no lock file is left behind, and the OS releases it when
    the process ends, however it ends. ``wait=False`` raises :class:`FolderBusyError` naming the
    holder's PID when another process holds it; ``wait=True`` blocks until it is free.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            pid = _holder_pid(folder)
            who = f"process {pid}" if pid else "another process"
            raise FolderBusyError(f"{folder} is being written by {who}: wait for it to finish (its result is "
                                  f"then loaded), or stop it{f' (kill {pid})' if pid else ''}, and run again")
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def remove_orphan_tmp(folder: str | os.PathLike, prefix: str = ".") -> list[Path]:
    """Delete the temp files that writes interrupted by a kill left in ``folder`` and its subfolders.

    Only call it while holding :func:`folder_lock` on ``folder`` (no write can be in flight then).
    ``prefix`` limits it to temp files of one destination (``"." + name``). Returns what was deleted.
    """
    gone = []
    root = Path(folder)
    if root.is_dir():
        for p in sorted(root.rglob(f"{prefix}*.tmp")):
            if p.is_file() and p.name.startswith("."):
                p.unlink()
                gone.append(p)
    return gone


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
