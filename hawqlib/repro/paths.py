"""Where the project's files go: the checkout, the artifact store and the decode cache.

None of these is taken from where the package is installed: a non-editable install lives in
``site-packages``, and results written there would be lost on the next upgrade (or refused for lack of
permission). The rules:

- the **artifact store** (:func:`artifacts_root`): ``HAWQ_ARTIFACTS`` if set; else, when the working
  directory is inside a checkout of this project (:func:`find_checkout`: the first folder, walking up from
  ``Path.cwd()``, that holds both ``hawqlib/`` and ``pyproject.toml``; the notebooks run with their working
  directory in ``notebooks/`` or ``book/executed/``), that checkout's ``data/artifacts``; else
  ``./hawq-artifacts`` in the working directory;
  a process computing at a profile other than the published one (:func:`use_profile`, or
  ``HAWQ_PROFILE``) uses ``data/scratch/<profile>`` there instead (``./hawq-artifacts/scratch/<profile>``
  outside a checkout), which git ignores: smoke and paper runs never land beside the committed results;
- the **published store** (:func:`published_root`): the checkout's ``data/artifacts``, whatever the profile; a
  profile that loads some steps from it (the ``lab`` profile's ``loads``, :mod:`hawqlib.repro.artifacts.published`)
  reads it and never writes there;
- the **decode cache** (:func:`cache_dir`): the same with ``HAWQ_CACHE``, ``data/cache`` and ``./hawq-cache``;
- the **checkout** (:func:`project_root`: notebooks, the book, ``data/`` for CIFAR-10): the one the package
  is imported from when it is imported from a checkout (a development install), else the one around the
  working directory, else the working directory itself.

Nothing here is from the paper.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["is_checkout", "find_checkout", "project_root", "use_profile", "profile_in_use", "artifacts_root",
           "published_root", "cache_dir"]

#: The profile whose results are published (committed under ``data/artifacts``); :mod:`hawqlib.repro.profiles`'s default.
PUBLISHED_PROFILE = "cpu"
#: The profile this process computes at, declared by :func:`use_profile` (None: ``HAWQ_PROFILE``, else the default).
_PROFILE_IN_USE: str | None = None


def is_checkout(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is the top of a checkout of this project (holds ``hawqlib/`` and ``pyproject.toml``)."""
    folder = Path(folder)
    return (folder / "hawqlib").is_dir() and (folder / "pyproject.toml").is_file()


def find_checkout(start: str | os.PathLike | None = None) -> Path | None:
    """The first checkout (:func:`is_checkout`) at or above ``start`` (default: the working directory), else None."""
    here = Path.cwd() if start is None else Path(start)
    here = here.resolve()
    for folder in (here, *here.parents):
        if is_checkout(folder):
            return folder
    return None


def project_root() -> Path:
    """The project checkout: the package's own when it is imported from one, else :func:`find_checkout`, else
    the working directory."""
    package_parent = Path(__file__).resolve().parents[2]
    if is_checkout(package_parent):
        return package_parent
    return find_checkout() or Path.cwd()


def _store(env: str, in_checkout: str, elsewhere: str) -> Path:
    given = os.environ.get(env)
    if given:
        path = Path(given).expanduser()
        for above in (path, *path.parents):  # a file where a folder must be (created if absent) is one line
            if above.exists() and not above.is_dir():
                raise ValueError(f"{env}={given} names a path through the file {above}; it must name a folder "
                                 "(created if absent): unset it or point it at a folder")
            if above.exists():
                break
        return path
    checkout = find_checkout()
    return checkout / "data" / in_checkout if checkout is not None else Path.cwd() / elsewhere


def use_profile(name: str | None) -> None:
    """Declare the profile this process computes at (:class:`hawqlib.repro.study.Study` and the command line do).

    It only decides the default artifact store (:func:`artifacts_root`); ``None`` falls back to
    ``HAWQ_PROFILE``.
    """
    global _PROFILE_IN_USE
    _PROFILE_IN_USE = name


def profile_in_use() -> str:
    """The profile this process computes at: :func:`use_profile`'s, else ``HAWQ_PROFILE``, else the published one."""
    return _PROFILE_IN_USE or os.environ.get("HAWQ_PROFILE") or PUBLISHED_PROFILE


def artifacts_root() -> Path:
    """``HAWQ_ARTIFACTS``, else the working directory's checkout's ``data/artifacts``, else ``./hawq-artifacts``;
    for a profile other than the published one, ``scratch/<profile>`` beside (see the module docstring)."""
    root = _store("HAWQ_ARTIFACTS", "artifacts", "hawq-artifacts")
    if os.environ.get("HAWQ_ARTIFACTS"):
        return root
    profile = _PROFILE_IN_USE or os.environ.get("HAWQ_PROFILE")
    if not profile or profile == PUBLISHED_PROFILE:
        return root
    return (root.parent / "scratch" if root.name == "artifacts" else root / "scratch") / profile


def published_root() -> Path:
    """Where the published profile's results are committed: the ``data/artifacts`` of the working directory's
    checkout, else of the package's (:func:`project_root`). ``HAWQ_ARTIFACTS`` does not move it: the book runner
    sets that variable to a scratch folder for the other profiles, and this is the store they may read."""
    return (find_checkout() or project_root()) / "data" / "artifacts"


def cache_dir() -> Path:
    """``HAWQ_CACHE``, else the working directory's checkout's ``data/cache``, else ``./hawq-cache``."""
    return _store("HAWQ_CACHE", "cache", "hawq-cache")
