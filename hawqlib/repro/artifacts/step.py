"""The cached step: a result loaded when a complete artifact matches, else computed, saved and sealed.

:func:`cached` is what every cached step of :mod:`hawqlib.repro.pipeline` goes through. The artifact's key,
folder, manifest and verification are :mod:`hawqlib.repro.artifacts.manifest`'s; this module adds the load-or-compute
protocol around them: one writer per artifact (:func:`hawqlib.repro.artifacts.files.folder_lock`), a second check
under the lock (another process may have finished it meanwhile), ``FORCE=1`` recomputing, and the
warnings raised inside :mod:`hawqlib` during the computation stored in the manifest and replayed on
every load, so a result warns the same whether it was just computed or read back.

Nothing here is from the paper; it is the machinery that makes each result computed once.
"""
from __future__ import annotations

import json
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

from . import ledger
from .files import folder_lock, remove_orphan_tmp
from .manifest import (MANIFEST, ArtifactError, artifact_dir, complete, force_recompute, invalidate, read_manifest,
                       write_manifest)
from .published import published_copy

__all__ = ["cached", "recording", "compute_recording", "replay", "read_json", "artifact_wall_s", "artifact_threads"]

#: Warning categories an artifact may record and replay (anything else replays as UserWarning).
_REPLAYED = {c.__name__: c for c in (UserWarning, RuntimeWarning)}
_PACKAGE_DIR = Path(__file__).resolve().parents[2]  # hawqlib/ (both floors), not this subpackage


def _ours(filename: str) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


@contextmanager
def recording():
    """Record the warnings raised inside :mod:`hawqlib` in this block as ``{category, message}`` (a list).

    Those warnings describe the result (a block that did not converge, a route that fell back), so the
    artifact stores them and every later load replays them: a stored result warns as its computation
    did. Warnings from other packages go through the usual filters and display, untouched and unstored.
    If the block raises, what was recorded is shown before the exception propagates.
    """
    recorded: list[dict] = []
    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.filterwarnings("always", module=r"hawqlib(\.|$)")  # each of ours, not once per process
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if not _ours(filename):
                return shown(message, category, filename, lineno, file, line)
            rec = {"category": category.__name__ if category.__name__ in _REPLAYED else "UserWarning",
                   "message": str(message)}
            if rec not in recorded:
                recorded.append(rec)

        warnings.showwarning = show
        try:
            yield recorded
        except BaseException:
            warnings.showwarning = shown
            replay(recorded)
            raise


def compute_recording(compute, folder) -> tuple:
    """``compute(folder)`` and the warnings it raised inside :mod:`hawqlib` (:func:`recording`)."""
    with recording() as recorded:
        value = compute(folder)
    return value, recorded


def replay(records) -> None:
    """Re-raise the warnings an artifact recorded (:func:`compute_recording`), from one fixed place."""
    for rec in records or ():
        if not (isinstance(rec, dict) and isinstance(rec.get("message"), str)):
            raise ArtifactError(f"an artifact's recorded warning {rec!r} is not a {{category, message}} "
                                "object; delete its manifest.json to recompute it")
        warnings.warn(rec["message"], _REPLAYED.get(rec.get("category"), UserWarning), stacklevel=1)


def cached(kind: str, params: dict, compute, save, load, force: bool | None, *, legacy_warnings=None):
    """Load the artifact ``kind``/``params`` when complete, else compute, save and mark it complete.

    ``compute(folder)`` returns the value; ``save(folder, value)`` writes its files and may return extra
    manifest facts (a ``wall_s`` there replaces the measured one); ``load(folder)`` reads the value back.
    ``force=None`` reads ``FORCE`` from the environment. Returns ``(value, folder)``. When the profile in use
    loads ``kind`` from the published store (:mod:`hawqlib.repro.artifacts.published`) and a complete copy is
    there, that copy is loaded (``folder`` is then the published one) and nothing is written; ``FORCE=1``
    computes into the profile's own store instead. The :mod:`~hawqlib.repro.artifacts.ledger` notes which
    happened. Warnings raised
    inside hawqlib while computing are stored in the manifest and replayed on every load, so a result
    warns the same whether it was just computed or read back; for an artifact sealed before warnings
    were recorded, ``legacy_warnings(value)`` (when given) rebuilds them from the stored value.

    Under a process group of several ranks (``torchrun``, :mod:`hawqlib.distributed`) rank 0 alone checks
    the artifact, holds its lock, loads it (the value is sent to every rank, so the nodes need no shared
    file system), runs ``save`` and writes the manifest; ``compute`` runs on every rank, as the
    distributed training and Hessian need (it writes files on rank 0 only).
    """
    from ... import distributed

    if distributed.is_distributed():
        return _cached_group(kind, params, compute, save, load, force, legacy_warnings)
    folder = artifact_dir(kind, params)
    force = force_recompute() if force is None else force

    def stored(where=folder, how=ledger.LOADED):
        value = load(where)
        _replay_stored(where, value, legacy_warnings)
        ledger.note(kind, where, how)
        return value, where

    if not force:
        published = published_copy(kind, params)  # read-only: loaded, never locked nor written
        if published is not None:
            return stored(published, ledger.PUBLISHED)
    if not force and complete(folder, params):  # verified: every file's SHA-256 (manifest.verify)
        return stored()
    with folder_lock(folder):  # one writer per artifact; a second process gets the holder's PID
        if not force and complete(folder, params):  # another process finished it meanwhile
            return stored()
        invalidate(folder)
        remove_orphan_tmp(folder)
        t0 = time.perf_counter()
        with recording() as recorded:
            value = compute(folder)
            wall = time.perf_counter() - t0
            facts = save(folder, value) or {}
            facts["warnings"] = list(recorded)  # an empty list too: the artifact says it warned of nothing
            write_manifest(folder, params, wall_s=facts.pop("wall_s", wall), **facts)
    replay(recorded)
    ledger.note(kind, folder, ledger.COMPUTED)
    return value, folder


def _replay_stored(folder, value, legacy_warnings) -> None:
    manifest = read_manifest(folder) or {}
    if "warnings" in manifest:
        replay(manifest["warnings"])
    elif legacy_warnings is not None:
        replay(legacy_warnings(value))


def _cached_group(kind, params, compute, save, load, force, legacy_warnings):
    """:func:`cached` under a process group: rank 0 decides, locks, loads, saves; every rank computes."""
    from ... import distributed as hdist

    folder = artifact_dir(kind, params)
    force = hdist.broadcast_object(force_recompute() if force is None else force)
    lock = ExitStack()

    def stored_on_main():
        if not force and complete(folder, params):
            return True
        lock.enter_context(folder_lock(folder))  # held by rank 0 until the manifest is written
        if not force and complete(folder, params):
            lock.close()
            return True
        invalidate(folder)
        remove_orphan_tmp(folder)
        return False

    def load_on_main():
        value = load(folder)
        _replay_stored(folder, value, legacy_warnings)
        return value

    if hdist.on_main(stored_on_main):
        return hdist.on_main(load_on_main), folder
    try:
        t0 = time.perf_counter()
        with recording() as recorded:
            value = compute(folder)
            wall = time.perf_counter() - t0

            def seal():
                facts = save(folder, value) or {}
                facts["warnings"] = list(recorded)
                write_manifest(folder, params, wall_s=facts.pop("wall_s", wall), **facts)

            hdist.on_main(seal)
    finally:
        lock.close()
    if hdist.is_main():
        replay(recorded)
    return value, folder


def read_json(path: Path):
    """A JSON file of an artifact (already verified against its manifest); a clear error if unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is unreadable ({type(exc).__name__}: {exc}); delete "
                            f"{Path(path).parent / MANIFEST} to recompute the artifact, or set FORCE=1")


def artifact_wall_s(folder) -> float:
    """The wall time (s) recorded in an artifact's manifest (0.0 when it has none)."""
    m = read_manifest(folder)
    return float(m["wall_s"]) if m else 0.0


def artifact_threads(folder) -> int | None:
    """The torch threads of the process that completed an artifact, from its manifest (``None`` if unrecorded).

    Wall times are only comparable between runs with the same threads on the same machine.
    """
    m = read_manifest(folder) or {}
    threads = m.get("machine", {}).get("torch_threads")
    return int(threads) if threads is not None else None
