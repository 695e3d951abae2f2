"""Artifacts: expensive results stored under ``data/artifacts`` keyed by what determines them.

An artifact is a folder ``data/artifacts/<kind>-<key>`` where ``key`` is a hash of its
parameters: the run configuration, the code version of the module that computes it, and
the digest of the data it read. Its ``manifest.json`` (parameters, versions, wall time,
machine) is written last and atomically, so a folder without a manifest is an unfinished
run, never mistaken for a result.
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

from .storage import atomic_write_json

__all__ = ["config_hash", "artifacts_root", "artifact_dir", "write_manifest", "read_manifest", "is_complete",
           "force_recompute"]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(params: Any, length: int = 12) -> str:
    """Short SHA-256 of the canonical JSON of ``params`` (sorted keys, tuples as lists)."""
    return hashlib.sha256(_canonical(params).encode()).hexdigest()[:length]


def artifacts_root() -> Path:
    """``HAWQ_ARTIFACTS`` if set, else ``data/artifacts`` in the project."""
    from .data import project_root

    return Path(os.environ.get("HAWQ_ARTIFACTS") or project_root() / "data" / "artifacts")


def artifact_dir(kind: str, params: Any) -> Path:
    """The folder of the artifact of ``kind`` computed from ``params`` (not created)."""
    if not kind or not kind.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"artifact kind must be letters, digits, '-' or '_', got {kind!r}")
    return artifacts_root() / f"{kind}-{config_hash(params)}"


def force_recompute() -> bool:
    """True when the environment asks to recompute artifacts (``FORCE=1``)."""
    return os.environ.get("FORCE", "").strip() not in ("", "0", "false", "False")


def write_manifest(folder: str | os.PathLike, params: Any, *, wall_s: float, **facts: Any) -> Path:
    """Write ``manifest.json`` (parameters, versions, machine, wall time, facts): marks the artifact complete."""
    import torch

    manifest = {
        "params": json.loads(_canonical(params)),
        "key": config_hash(params),
        "wall_s": round(float(wall_s), 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        **facts,
    }
    return atomic_write_json(Path(folder) / "manifest.json", manifest)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of a complete artifact, or None when the folder holds no (valid) manifest."""
    try:
        return json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def is_complete(folder: str | os.PathLike, params: Any) -> bool:
    """True when ``folder`` holds a manifest written for exactly ``params``."""
    m = read_manifest(folder)
    return m is not None and m.get("key") == config_hash(params)
