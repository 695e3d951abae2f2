"""Folders of the artifact cache: one writer per folder, and the temp files an interrupted writer left.

Every file is written atomically by the method's helpers (:mod:`hawqlib.files`): the bytes go to a temporary
file in the same folder, are flushed to disk, and only then renamed over the destination. The temp files a
kill leaves behind are removed (:func:`remove_orphan_tmp`) by the next writer, which holds the folder's lock
(:func:`folder_lock`).
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["folder_lock", "FolderBusyError", "remove_orphan_tmp"]


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
