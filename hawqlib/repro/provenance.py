"""Provenance of the book's stored results: which artifacts each chapter read, and what their manifests record.

The book runner (:mod:`hawqlib.repro.book`) executes each notebook with ``HAWQ_ARTIFACT_LOG`` set, so every
artifact the notebook verified on load or computed is named in ``executed/timings.json`` under that notebook
(:func:`hawqlib.repro.artifacts.manifest.note_use`). :func:`chapters` reads those lists back and each folder
through :func:`hawqlib.repro.artifacts.manifest.verify` (every file's SHA-256 checked again): a folder that is
gone or changed since the notebook ran is an :class:`~hawqlib.repro.artifacts.manifest.ArtifactError`, never a
silently stale line. For each artifact it returns what the manifest records: its kind, a description built from
its parameters (:func:`describe`), the artifact it was computed from, wall time, torch threads, machine,
Python and torch versions, the code versions in its key and when it finished. The book's "Provenance"
page tabulates them (the ``provenance-table`` directive of ``book/_ext/hawq_book.py``).

What is not recorded is not guessed: a manifest names neither the profile nor the named run (``hawq``,
``W2A4``) it belongs to; the profile is the book's (every executed notebook comes from one), the run names are
on the result pages' seed tables beside the same folder names.

Nothing here is from the paper; it is the companion's bookkeeping.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from .artifacts.manifest import ArtifactError, verify
from .paths import project_root

__all__ = ["describe", "code_text", "machine_text", "duration_text", "entry", "chapters"]


def _json(value):
    """A parameter stored as a JSON string (bit configurations, orders, settings) as its object."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _images(data) -> str | None:
    """The number of images of a ``data`` parameter (``{"cifar10_train": 512, "seed": 0}``), as text."""
    if not isinstance(data, Mapping):
        return None
    counts = [v for k, v in data.items() if k != "seed" and isinstance(v, int) and not isinstance(v, bool)]
    return f"{counts[0]} images" if counts else None


def _bits(config) -> str | None:
    config = _json(config)
    if not isinstance(config, Mapping) or not isinstance(config.get("weights"), Mapping):
        return None
    w = [int(b) for b in config["weights"].values()]
    wbits = f"W{min(w)}" if min(w) == max(w) else f"W{min(w)}-{max(w)}"
    return wbits + (f"A{config['act_bits']}" if config.get("act_bits") else "")


def _schedule(ft: Mapping) -> str:
    parts = [f"{ft['stages']} stages x {ft['epochs_per_stage']} epochs"] if "stages" in ft else []
    if ft.get("final_epochs"):
        parts.append(f"+ {ft['final_epochs']} final")
    return " ".join(parts)


def describe(kind: str, params: Mapping) -> str:
    """What an artifact of ``kind`` is, in a few words, from the parameters its manifest records."""
    p = params
    words: list[str | None] = []
    if kind.startswith("baseline"):
        t = p.get("train", {}) if isinstance(p.get("train"), Mapping) else {}
        words = [f"FP32 {p.get('model', kind.split('_', 1)[-1])} training", f"seed {t['seed']}" if "seed" in t else None,
                 f"{t['epochs']} epochs" if "epochs" in t else None,
                 f"{t['train_subset']} training images" if t.get("train_subset") else None]
    elif kind == "spectrum":
        words = [f"top Hessian eigenvalue per {p.get('granularity', '?')} block", p.get("solver"),
                 f"tol {p['tol']:g}" if isinstance(p.get("tol"), (int, float)) else None, _images(p.get("data")),
                 f"seed {p['seed']}" if "seed" in p else None]
    elif kind == "traces":
        words = [f"Hessian {p.get('kind', 'trace')} per {p.get('granularity', '?')} block", _images(p.get("data"))]
    elif kind == "landscape":
        coords = _json(p.get("coords"))
        d = p.get("directions", {})
        dirs = ", ".join(d.get("directions", [])) if isinstance(d, Mapping) else ""
        words = [f"loss of {p.get('block', '?')} along {dirs or '?'}",
                 f"{len(coords)} points" if isinstance(coords, list) else None, _images(p.get("data"))]
    elif kind == "finetune":
        ft = p.get("finetune", {}) if isinstance(p.get("finetune"), Mapping) else {}
        words = [("direct" if p.get("direct") else "staged") + " fine-tuning", _bits(p.get("bit_config")),
                 f"seed {ft['seed']}" if "seed" in ft else None, _schedule(ft) or None,
                 f"{ft['act_step']} activation step" if ft.get("act_step") not in (None, "fixed") else None,
                 "distilled" if ft.get("distill") else None]
    elif kind == "calibrated":
        words = ["calibrated quantized model", _bits(p.get("bits")), _images(p.get("calibration")),
                 f"tested on {p['test_subset']} images" if p.get("test_subset") else None]
    elif kind == "damage":
        words = [f"quantization damage per {p.get('granularity', '?')} block",
                 "bits " + ", ".join(map(str, p["bits"])) if isinstance(p.get("bits"), list) else None,
                 f"{p['n_images']} images" if p.get("n_images") else None]
    elif kind == "quantize":
        s = _json(p.get("settings"))
        s = s if isinstance(s, Mapping) else {}
        ft = s.get("finetune") if isinstance(s.get("finetune"), Mapping) else {}
        words = ["hawqlib.quantize", f"A{s['act_bits']}" if s.get("act_bits") else None, _schedule(ft) or None]
    else:
        words = [kind] + [f"{k} {v}" for k, v in sorted(p.items())
                          if k not in ("base", "code") and isinstance(v, (int, float, str)) and len(str(v)) < 30]
    return ", ".join(w for w in words if w)


def code_text(code) -> str:
    """The code versions an artifact's key holds (``params["code"]``), as ``module version`` pairs."""
    if isinstance(code, Mapping):
        return ", ".join(f"{k} {'none' if v is None else v}" for k, v in sorted(code.items()))
    return "none" if code is None else str(code)


def machine_text(manifest: Mapping) -> str:
    """The machine and software of a manifest in one line (processor, CPU cores, accelerator, OS, versions)."""
    m = manifest.get("machine", {}) or {}
    v = manifest.get("versions", {}) or {}
    acc = m.get("accelerator") if "accelerator" in m else "accelerator not recorded"
    return (f"{m.get('processor', '?')}, {m.get('cpus', '?')} CPU cores, {acc or 'no GPU'}; {m.get('platform', '?')}; "
            f"Python {v.get('python', '?')}, torch {v.get('torch', '?')}")


def duration_text(seconds: float) -> str:
    """A wall time for a reader: seconds under two minutes, minutes under two hours, else hours."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _display(folder: Path) -> str:
    """A folder as the reader would find it: relative to the checkout when inside it, else its absolute path."""
    try:
        return str(folder.relative_to(project_root()))
    except ValueError:
        return str(folder)


def entry(folder: str | os.PathLike) -> dict:
    """What the verified manifest of the artifact ``folder`` records, for the provenance page.

    Keys: ``folder`` (name), ``where`` (path as shown), ``kind``, ``what`` (:func:`describe`), ``base`` (the artifact
    it was computed from, when recorded), ``wall_s``, ``threads``, ``machine`` (:func:`machine_text`), ``code``
    (:func:`code_text`) and ``finished``. Raises :class:`ArtifactError` when the folder no longer verifies or
    records a wall time that is not a finite number of seconds, zero or more.
    """
    folder = Path(folder)
    m = verify(folder)  # every file's SHA-256, the manifest's own, the key against the folder's name
    wall = m.get("wall_s")
    if not isinstance(wall, (int, float)) or not math.isfinite(wall) or wall < 0:
        raise ArtifactError(f"{folder / 'manifest.json'} records wall time {wall!r}, not seconds >= 0")
    kind = folder.name[:-(len(m["key"]) + 1)]
    threads = (m.get("machine") or {}).get("torch_threads")
    return {"folder": folder.name, "where": _display(folder.parent), "kind": kind, "what": describe(kind, m["params"]),
            "base": m["params"].get("base") if isinstance(m["params"].get("base"), str) else None,
            "wall_s": float(wall), "threads": int(threads) if threads is not None else None,
            "machine": machine_text(m), "code": code_text(m["params"].get("code")),
            "finished": str(m.get("finished", "?"))}


def chapters(timings: Mapping, order: Sequence[str] | None = None) -> dict[str, dict]:
    """Per notebook of ``timings`` (the ``notebooks`` object of ``executed/timings.json``), in ``order`` (default
    the book's, :data:`hawqlib.repro.book.NOTEBOOKS`, then any other): ``{"recorded": bool, "new": [entry...],
    "earlier": [folder names]}``.

    ``new`` holds an :func:`entry` for each artifact the notebook used that no earlier notebook did; ``earlier``
    names those an earlier one did (listed there). ``recorded`` is False for a notebook executed before the runner
    kept its artifact list (run it again to record one).
    """
    if order is None:
        from .book import NOTEBOOKS as order
    names = [n for n in order if n in timings] + sorted(set(timings) - set(order))
    seen: set[str] = set()
    out: dict[str, dict] = {}
    for name in names:
        used = timings[name].get("artifacts")
        if not isinstance(used, list):
            out[name] = {"recorded": False, "new": [], "earlier": []}
            continue
        new, earlier = [], []
        for path in used:
            key = str(Path(path).resolve())
            if key in seen:
                earlier.append(Path(path).name)
                continue
            seen.add(key)
            new.append(entry(path))
        out[name] = {"recorded": True, "new": new, "earlier": earlier}
    return out
