"""One smoke-profile run of the book runner per test session, shared by test_book.py and test_notebooks.py.

Executing the notebooks is the expensive part of both tests, so it happens once: the first
caller runs ``python -m hawqlib book --profile smoke`` on a copy of ``book/`` in a temporary folder
(artifacts in a temporary ``HAWQ_ARTIFACTS``, never in ``data/artifacts``), and later callers get
the same result. The result is cached in this module, so it is shared whichever test file asks
first.

``HAWQ_BOOK_TEST_ARTIFACTS=<folder>`` keeps the smoke artifacts in that folder across sessions
instead (a developer's cache: the notebooks then load rather than compute; CI leaves it unset so
every run computes from scratch). Never point it at ``data/artifacts``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hawqlib.repro import book

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SmokeBook:
    """Where the smoke run put things, and what it took."""

    book_dir: Path
    artifacts: Path
    env: dict
    returncode: int
    output: str
    wall_s: float
    build_s: float | None

    @property
    def executed(self) -> Path:
        """The folder of the executed notebooks."""
        return self.book_dir / "executed"

    @property
    def html(self) -> Path:
        """The built HTML folder."""
        return self.book_dir / "_build" / "html"


_RESULT: SmokeBook | None = None


def smoke_book(tmp_root: Path, data_root: Path) -> SmokeBook:
    """Run (once per session) the runner at the smoke profile in ``tmp_root``; skip when there are no notebooks."""
    global _RESULT
    if _RESULT is not None:
        return _RESULT
    if not book.available(ROOT / "notebooks"):
        pytest.skip("notebooks/ holds none of the book's notebooks yet")
    dst = tmp_root / "book"
    shutil.copytree(ROOT / "book", dst, ignore=shutil.ignore_patterns("_build", "executed", "__pycache__"))
    artifacts = Path(os.environ.get("HAWQ_BOOK_TEST_ARTIFACTS") or tmp_root / "artifacts")
    if artifacts.resolve() == (ROOT / "data" / "artifacts").resolve():
        pytest.fail("HAWQ_BOOK_TEST_ARTIFACTS must not be the project's data/artifacts (the published results)")
    env = dict(os.environ, HAWQ_ARTIFACTS=str(artifacts), HAWQ_DATA=str(data_root), HAWQ_PROFILE="smoke")
    env.pop("FORCE", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hawqlib", "book", "--profile", "smoke", "--book-dir", str(dst)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"book build ([0-9.]+) s", proc.stdout)
    _RESULT = SmokeBook(dst, artifacts, env, proc.returncode, proc.stdout + proc.stderr, wall,
                        float(m.group(1)) if m else None)
    print(f"\nsmoke book: runner {wall:.1f} s" + (f", of which book build {_RESULT.build_s:.1f} s" if m else ""))
    return _RESULT
