"""Artifact keys, folders and manifests: what identifies a stored result and what vouches for it.

An artifact is a folder ``<root>/<kind>-<key>`` (the root: :func:`hawqlib.repro.paths.artifacts_root`) where
``key`` is a hash of its parameters: the run configuration, the code version of the module that computes
it, and the digest of the data it read. Its ``manifest.json`` (parameters, versions, wall time,
machine) is written last and atomically, so a folder without a manifest is an unfinished
run, never mistaken for a result.

What is verified on load (:func:`complete`): the manifest records the SHA-256 and size of every
file of the result and a SHA-256 of its own content; a missing, changed or truncated file, a
manifest edited by hand or one written for other parameters raises :class:`ArtifactError` naming
the file and the fix; it is never silently recomputed over. A manifest written before digests were
recorded is refused the same way until :func:`seal` records them. One process at a time computes
an artifact (:func:`hawqlib.repro.artifacts.files.folder_lock`).

Which artifacts a process used: when ``HAWQ_ARTIFACT_LOG`` names a file, every artifact verified (:func:`verify`,
hence every load) or completed (:func:`write_manifest`) appends its folder's absolute path to it, one line each
(:func:`note_use`). The book runner sets it for each notebook, so the book's provenance page lists exactly the
stored results each chapter read (:mod:`hawqlib.repro.provenance`).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from ..paths import artifacts_root  # noqa: F401  (hawqlib.repro.paths: HAWQ_ARTIFACTS, the checkout's, or ./hawq-artifacts)
from ...files import atomic_write_json, file_sha256
from .files import folder_lock

__all__ = ["config_hash", "artifacts_root", "artifact_dir", "write_manifest", "read_manifest", "is_complete",
           "force_recompute", "ArtifactError", "complete", "verify", "invalidate", "seal", "seal_all",
           "result_files", "RESUME_STATE", "MANIFEST", "USE_LOG", "note_use"]

MANIFEST = "manifest.json"
#: Environment variable naming the file :func:`note_use` appends to (unset: nothing is recorded).
USE_LOG = "HAWQ_ARTIFACT_LOG"
#: Resume state that may sit in an artifact folder but is not part of its result (not digested).
RESUME_STATE = ("checkpoint.pt", "run")


class ArtifactError(RuntimeError):
    """A stored artifact that cannot be trusted: a file missing or changed, a manifest corrupt or edited."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(params: Any, length: int = 12) -> str:
    """Short SHA-256 of the canonical JSON of ``params`` (sorted keys, tuples as lists)."""
    return hashlib.sha256(_canonical(params).encode()).hexdigest()[:length]


def artifact_dir(kind: str, params: Any) -> Path:
    """The folder of the artifact of ``kind`` computed from ``params`` (not created)."""
    if not kind or not kind.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"artifact kind must be letters, digits, '-' or '_', got {kind!r}")
    return artifacts_root() / f"{kind}-{config_hash(params)}"


def force_recompute() -> bool:
    """True when the environment asks to recompute artifacts (``FORCE=1``)."""
    return os.environ.get("FORCE", "").strip() not in ("", "0", "false", "False")


def result_files(folder: str | os.PathLike) -> list[str]:
    """Names of the files that make up an artifact's result: the plain files directly in ``folder``,
    except the manifest, hidden files (temp files) and the resume state (:data:`RESUME_STATE`)."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name != MANIFEST and p.name not in RESUME_STATE)


def _file_records(folder: Path, names) -> dict:
    return {n: {"sha256": file_sha256(folder / n), "bytes": (folder / n).stat().st_size} for n in names}


def _manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "manifest_sha256"}).encode()
                          ).hexdigest()


def _write_sealed(folder: Path, manifest: dict) -> Path:
    manifest = json.loads(json.dumps(manifest))  # the form it will be read back in
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    return atomic_write_json(folder / MANIFEST, manifest)


def _fix(folder: Path) -> str:
    return (f"restore it from git (git checkout -- {folder}) if it is committed, or recompute it: delete "
            f"{folder / MANIFEST} (this artifact alone) or set FORCE=1 (every artifact the command reaches)")


def note_use(folder: str | os.PathLike) -> None:
    """Append the absolute path of the artifact ``folder`` to the file ``HAWQ_ARTIFACT_LOG`` names, if any.

    One ``write`` of one line to a file opened for appending, so lines from processes sharing the log
    (a notebook and a command it starts) do not interleave.
    """
    log = os.environ.get(USE_LOG)
    if not log:
        return
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (str(Path(folder).resolve()) + "\n").encode())
    finally:
        os.close(fd)


def write_manifest(folder: str | os.PathLike, params: Any, *, wall_s: float, **facts: Any) -> Path:
    """Write ``manifest.json`` (parameters, versions, machine, wall time, facts, the SHA-256 of every file
    of :func:`result_files`): marks the artifact complete. Call it last, once every file is written."""
    import torch

    folder = Path(folder)
    manifest = {
        "params": json.loads(_canonical(params)),
        "key": config_hash(params),
        "wall_s": round(float(wall_s), 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    # the library computes on the GPU whenever one is visible (hawqlib.distributed.device)
                    "accelerator": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        **facts,
        "files": _file_records(folder, result_files(folder)),
    }
    path = _write_sealed(folder, manifest)
    note_use(folder)
    return path


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of an artifact folder, or None when it has none (an unfinished run).

    Raises :class:`ArtifactError` when the manifest is unreadable, or differs from the digest it records
    (edited by hand). File digests are checked by :func:`verify`, not here.
    """
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is unreadable ({type(exc).__name__}: {exc}); {_fix(path.parent)}") from None
    if not isinstance(m, dict) or not isinstance(m.get("params"), dict) or not isinstance(m.get("key"), str):
        raise ArtifactError(f"{path} is not an artifact manifest (no 'params' object or 'key' string); "
                            f"{_fix(path.parent)}")
    if "manifest_sha256" in m and m["manifest_sha256"] != _manifest_digest(m):
        raise ArtifactError(f"{path} was changed after it was written (its content no longer matches the "
                            f"SHA-256 it records); {_fix(path.parent)}")
    return m


def verify(folder: str | os.PathLike) -> dict:
    """Check a complete artifact against its manifest; return the manifest, else raise :class:`ArtifactError`.

    Checked: the manifest's own digest, its key against its parameters and the folder's name, and the
    size and SHA-256 of every file it lists.
    """
    folder = Path(folder)
    m = read_manifest(folder)
    if m is None:
        raise ArtifactError(f"{folder} holds no {MANIFEST}: it is not a complete artifact")
    if not isinstance(m.get("files"), dict) or "manifest_sha256" not in m:
        raise ArtifactError(
            f"{folder / MANIFEST} records no file digests (written before hawqlib verified artifacts): if the "
            f"folder's files are the committed ones (git status {folder} shows no change), record their digests "
            f"with `python -m hawqlib seal {folder}`; otherwise {_fix(folder)}")
    if m["key"] != config_hash(m["params"]) or not folder.name.endswith("-" + m["key"]):
        raise ArtifactError(f"{folder / MANIFEST} records key {m['key']!r}, which matches neither its parameters "
                            f"({config_hash(m['params'])!r}) nor the folder's name; {_fix(folder)}")
    for name, rec in sorted(m["files"].items()):
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing; {_fix(folder)}")
        size = path.stat().st_size
        if size != rec.get("bytes") or file_sha256(path) != rec.get("sha256"):
            raise ArtifactError(f"{path} does not match the SHA-256 its manifest records ({size} bytes, "
                                f"{rec.get('bytes')} recorded): changed or corrupted since it was written; "
                                f"{_fix(folder)}")
    note_use(folder)
    return m


def complete(folder: str | os.PathLike, params: Any) -> dict | None:
    """The verified manifest of the artifact computed from ``params`` in ``folder``; None when it has no
    manifest (not computed yet, or unfinished). Anything else that is wrong raises :class:`ArtifactError`."""
    folder = Path(folder)
    m = read_manifest(folder)
    if m is None:
        return None
    if m["key"] != config_hash(params):
        raise ArtifactError(f"{folder / MANIFEST} was written for other parameters (key {m['key']!r}, these "
                            f"give {config_hash(params)!r}); {_fix(folder)}")
    return verify(folder)


def is_complete(folder: str | os.PathLike, params: Any) -> bool:
    """True when ``folder`` holds a verified manifest written for exactly ``params`` (see :func:`complete`)."""
    return complete(folder, params) is not None


def invalidate(folder: str | os.PathLike) -> None:
    """Remove an artifact's manifest before it is recomputed (hold its lock): a crash mid-way then leaves an
    unfinished run, never the old manifest vouching for new files."""
    (Path(folder) / MANIFEST).unlink(missing_ok=True)


def _check_readable(path: Path) -> None:
    """Refuse to seal a file that does not even parse (truncated JSON, torch or packed file)."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            import torch

            torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".hawq":
            from ...export import read_header

            read_header(path)
    except Exception as exc:
        raise ArtifactError(f"{path} is unreadable ({type(exc).__name__}: {exc}); not sealing {path.parent}: "
                            f"{_fix(path.parent)}") from None


def seal(folder: str | os.PathLike) -> dict:
    """Record in a complete artifact's manifest the SHA-256 and size of each of its files (its key unchanged).

    For artifacts whose manifest was written before digests were recorded: run it only on files known to
    be the computed ones (e.g. as committed). A folder already sealed is verified and left unchanged.
    Returns the manifest. One line: ``python -m hawqlib seal <folder>...`` (or ``--all``).
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ArtifactError(f"{folder} holds no {MANIFEST}: not a complete artifact, nothing to seal")
    with folder_lock(folder):
        m = read_manifest(folder)
        if "files" in m and "manifest_sha256" in m:
            return verify(folder)
        if m["key"] != config_hash(m["params"]) or not folder.name.endswith("-" + m["key"]):
            raise ArtifactError(f"{folder / MANIFEST} records key {m['key']!r}, which matches neither its "
                                f"parameters nor the folder's name; not sealing it: {_fix(folder)}")
        names = result_files(folder)
        if not names:
            raise ArtifactError(f"{folder} holds no result files besides its manifest; nothing to seal")
        for n in names:
            _check_readable(folder / n)
        m["files"] = _file_records(folder, names)
        m["sealed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _write_sealed(folder, m)
    return verify(folder)


def seal_all(root: str | os.PathLike | None = None) -> list[Path]:
    """:func:`seal` every artifact folder under ``root`` (default :func:`artifacts_root`) whose manifest
    records no digests yet; return the folders sealed."""
    done = []
    for folder in sorted(Path(root or artifacts_root()).iterdir()):
        if folder.is_dir() and (folder / MANIFEST).is_file():
            m = read_manifest(folder)
            if "files" not in m or "manifest_sha256" not in m:
                seal(folder)
                done.append(folder)
    return done
