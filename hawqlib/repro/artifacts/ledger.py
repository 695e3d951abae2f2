"""The ledger: which artifacts this process computed and which it loaded, and from which store.

Every cached step (:func:`hawqlib.repro.artifacts.step.cached`) notes here, once per artifact, whether it computed
the result in this process or loaded a stored one, and whether that stored one is a published copy
(:mod:`hawqlib.repro.artifacts.published`). A notebook's kernel is one process, so at the end of a notebook the
ledger says which of its page's results were computed live and which were read back
(:func:`hawqlib.repro.pages.live_note` writes that sentence).

Nothing here is from the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Entry", "COMPUTED", "LOADED", "PUBLISHED", "note", "entries", "clear"]

#: How an artifact came to this process: computed here, loaded from the profile's own store, or loaded from the
#: published store (read-only).
COMPUTED, LOADED, PUBLISHED = "computed", "loaded", "published"


@dataclass(frozen=True)
class Entry:
    """One artifact this process used: its ``kind``, its ``folder`` and ``how`` it came (:data:`COMPUTED`,
    :data:`LOADED` or :data:`PUBLISHED`)."""

    kind: str
    folder: Path
    how: str


_ENTRIES: dict[Path, Entry] = {}


def note(kind: str, folder: Path, how: str) -> None:
    """Record that this process used artifact ``folder`` of ``kind``, ``how`` (the first time counts: a result
    computed here and read back later in the same process stays computed)."""
    if how not in (COMPUTED, LOADED, PUBLISHED):
        raise ValueError(f"how must be {COMPUTED!r}, {LOADED!r} or {PUBLISHED!r}, got {how!r}")
    _ENTRIES.setdefault(Path(folder), Entry(kind, Path(folder), how))


def entries() -> list[Entry]:
    """The artifacts this process used, in the order it first used them."""
    return list(_ENTRIES.values())


def clear() -> None:
    """Forget every entry (tests; a notebook's kernel starts empty)."""
    _ENTRIES.clear()
