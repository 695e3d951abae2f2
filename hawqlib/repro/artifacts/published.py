"""Published copies: the committed results a profile may load, read-only, instead of recomputing them.

A profile may name, in its ``loads`` list (:mod:`hawqlib.repro.profiles`), kinds of artifact that take hours
(the FP32 baseline, the fine-tuned runs), and in its ``loads_matching`` list single artifacts of other kinds by
the settings they were computed with (a mapping of ``kind`` and some of its fields, e.g. the spectrum at the
residual granularity): for those, a step first looks for a complete artifact with the very
same key in the published store (:func:`hawqlib.repro.paths.published_root`, the checkout's ``data/artifacts``)
and loads it from there, verified like any other (:func:`hawqlib.repro.artifacts.manifest.complete`). Nothing is
ever written there: what is not found is computed into the profile's own store (``data/scratch/<profile>``),
and every other kind is computed there too. The published profile itself writes the published store, so it has
no published copies to look up.

Nothing here is from the paper; it lets a short run of the notebooks show the long results next to what it
recomputes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import paths
from .manifest import artifacts_root, complete, config_hash

__all__ = ["loaded_kinds", "loads", "published_dir", "published_copy", "find"]


def loaded_kinds(profile: str | None = None) -> tuple[str, ...]:
    """The kinds of artifact ``profile`` (default: the one in use, :func:`hawqlib.repro.paths.profile_in_use`)
    loads from the published store: its ``loads`` list; none for a profile that has none, or is not named in
    :data:`hawqlib.repro.profiles.PROFILES`."""
    from ..profiles import PROFILES

    name = profile or paths.profile_in_use()
    if name == paths.PUBLISHED_PROFILE:
        return ()
    return tuple(PROFILES.get(name, {}).get("loads", ()))


def loads(kind: str, params: Any, profile: str | None = None) -> bool:
    """Whether ``profile`` (default: the one in use) loads artifact ``kind``/``params`` from the published store:
    ``kind`` is in its ``loads``, or an entry of its ``loads_matching`` names ``kind`` and fields ``params`` has
    with the same values."""
    from ..profiles import PROFILES

    if kind in loaded_kinds(profile):
        return True
    name = profile or paths.profile_in_use()
    if name == paths.PUBLISHED_PROFILE or not isinstance(params, dict):
        return False
    return any(m.get("kind") == kind and all(k in params and params[k] == v for k, v in m.items() if k != "kind")
               for m in PROFILES.get(name, {}).get("loads_matching", ()))


def published_dir(kind: str, params: Any) -> Path | None:
    """The folder artifact ``kind``/``params`` has in the published store when the profile in use loads it from
    there (:func:`loads`) and writes elsewhere; None otherwise. Not checked for completeness
    (:func:`published_copy` is)."""
    if not loads(kind, params):
        return None
    root = paths.published_root()
    if root.resolve() == artifacts_root().resolve():
        return None
    return root / f"{kind}-{config_hash(params)}"


def published_copy(kind: str, params: Any) -> Path | None:
    """:func:`published_dir` when a complete, verified artifact is there; None when there is none to load.

    A published copy that is there but fails verification (a file changed) raises
    :class:`~hawqlib.repro.artifacts.manifest.ArtifactError`, as for any store: it is never silently passed over.
    """
    folder = published_dir(kind, params)
    return folder if folder is not None and complete(folder, params) is not None else None


def find(kind: str, params: Any) -> Path | None:
    """The folder of the complete artifact ``kind``/``params`` a step would load: its published copy when the
    profile in use loads ``kind`` from there, else its folder in the profile's own store; None when neither has
    it (the step would compute it)."""
    from .manifest import artifact_dir

    copy = published_copy(kind, params)
    if copy is not None:
        return copy
    own = artifact_dir(kind, params)
    return own if complete(own, params) is not None else None
