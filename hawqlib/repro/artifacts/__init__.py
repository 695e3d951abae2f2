"""The artifact cache: each expensive result is computed once, stored, and trusted only after it is verified.

An **artifact** is a folder ``<root>/<kind>-<key>`` (the root: :func:`hawqlib.repro.paths.artifacts_root`, the
checkout's ``data/artifacts`` where the committed results live). How it is kept:

- **Keys.** ``key`` is :func:`~hawqlib.repro.artifacts.manifest.config_hash` of the step's parameters: its run
  configuration, the code version of the modules that compute it and the digest of the data it reads
  (canonical JSON, SHA-256, 12 hex digits). Same parameters, same folder; changed code or data, a new
  folder. Facts that do not determine the result (wall time, machine, provenance) go in the manifest,
  outside the key.
- **Manifests.** ``manifest.json`` records the parameters, the versions, the machine, the wall time, the
  SHA-256 and size of every result file, a SHA-256 of its own content and, for a
  :func:`~hawqlib.repro.artifacts.step.cached` step, the warnings its computation raised (replayed on every load).
  It is written last: a folder without one is an unfinished run, never a result.
- **Digests checked on load.** :func:`~hawqlib.repro.artifacts.manifest.complete` verifies the manifest and every
  file before a step uses the artifact; a file missing, changed or truncated, a manifest edited or written
  for other parameters raises :class:`~hawqlib.repro.artifacts.manifest.ArtifactError` naming the file and the
  fix. Nothing is silently recomputed over. A manifest from before digests were recorded is refused until
  :func:`~hawqlib.repro.artifacts.manifest.seal` (``python -m hawqlib seal``) records them.
- **One writer per folder.** A step computes under :func:`~hawqlib.repro.artifacts.files.folder_lock` (an OS lock
  on the folder, released however the process ends) and checks again once it holds it; a second process
  asking for the same artifact gets :class:`~hawqlib.repro.artifacts.files.FolderBusyError` naming the holder's
  PID. ``FORCE=1`` recomputes.
- **Atomic writes.** Every file goes to a temporary file beside it, is flushed, then renamed into place
  (:func:`hawqlib.files.atomic_write`, the method's own helper), so a kill never leaves a half-written file that looks
  whole; the next writer removes the orphaned temporary files
  (:func:`~hawqlib.repro.artifacts.files.remove_orphan_tmp`).

The modules, one concept each, each importing only those above it:

- :mod:`~hawqlib.repro.artifacts.files`: folder locks and the temp files an interrupted writer left (the atomic
  writes and file digests are the method's, :mod:`hawqlib.files`);
- :mod:`~hawqlib.repro.artifacts.manifest`: keys, artifact folders, manifests, verification, sealing, and the log
  of the artifacts a process used (``HAWQ_ARTIFACT_LOG``, read by the book's provenance page);
- :mod:`~hawqlib.repro.artifacts.published`: the committed results a profile loads read-only (its ``loads``)
  instead of recomputing them;
- :mod:`~hawqlib.repro.artifacts.ledger`: which artifacts this process computed and which it loaded (in memory,
  for the page's own note; the provenance log above is the record across processes);
- :mod:`~hawqlib.repro.artifacts.step`: :func:`~hawqlib.repro.artifacts.step.cached`, the load-or-compute step behind
  every cached step of :mod:`hawqlib.repro.pipeline`, and the recording and replay of its warnings.

Nothing here is from the paper; it is this project's machinery for computing each result once. The names of
``__all__`` below are importable from ``hawqlib.repro.artifacts`` itself.
"""
from __future__ import annotations

from .files import FolderBusyError, folder_lock, remove_orphan_tmp
from .manifest import (MANIFEST, RESUME_STATE, USE_LOG, ArtifactError, artifact_dir, artifacts_root, complete,
                       config_hash, force_recompute, invalidate, is_complete, note_use, read_manifest, result_files,
                       seal, seal_all, verify, write_manifest)
from .ledger import entries as ledger_entries
from .published import find, loaded_kinds, loads, published_copy
from .step import artifact_threads, artifact_wall_s, cached, compute_recording, read_json, recording, replay

__all__ = [
    # files
    "folder_lock", "FolderBusyError", "remove_orphan_tmp",
    # manifest
    "config_hash", "artifacts_root", "artifact_dir", "write_manifest", "read_manifest", "is_complete",
    "force_recompute", "ArtifactError", "complete", "verify", "invalidate", "seal", "seal_all",
    "result_files", "RESUME_STATE", "MANIFEST", "USE_LOG", "note_use",
    # published, ledger
    "loaded_kinds", "loads", "published_copy", "find", "ledger_entries",
    # step
    "cached", "recording", "compute_recording", "replay", "read_json", "artifact_wall_s", "artifact_threads",
]
