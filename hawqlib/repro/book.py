"""The book runner: execute the notebooks with papermill, then build the Jupyter Book.

``python -m hawqlib book [--profile P] [--only NAME ...] [--no-build | --build-only] [--force]``
(also ``make book``):

1. Each notebook ``notebooks/<name>.ipynb`` that exists (in book order, :data:`NOTEBOOKS`) is
   executed by papermill with ``profile`` injected into its ``parameters`` cell, in a kernel
   that runs this very interpreter (so a fresh virtual environment works without registering
   a kernel by hand). The executed copy is written to a temporary file and renamed to
   ``book/executed/<name>.ipynb`` only when every cell ran (its ``parameters`` and injected cells
   tagged for removal from the page, :func:`hawqlib.repro.pages.reader_copy`): a failed run names the
   notebook and the failing cell, keeps its partial copy as ``<name>.failed.ipynb`` for inspection and removes
   any older executed copy, so a stale result is never built into the book.
2. Each notebook's wall time goes to ``book/executed/timings.json`` (with the machine it ran on);
   the book's "Reproduce it" page shows them. So do the artifact folders the notebook loaded or computed
   (recorded through ``HAWQ_ARTIFACT_LOG``, :func:`hawqlib.repro.artifacts.manifest.note_use`); the
   "Provenance" page lists them from their manifests (:mod:`hawqlib.repro.provenance`).
3. ``jupyter-book build`` renders the book with warnings as errors, without executing these notebooks again
   (only the method pages' exercise solutions run at build time). Every
   executed notebook the table of contents lists must exist and come from the requested
   profile, else the build is refused with a message saying what to run (:mod:`hawqlib.repro.bookbuild`,
   which also writes the API pages).

The heavy results the notebooks show are artifacts (:mod:`hawqlib.repro.artifacts`): a notebook loads a
matching artifact or computes it, and ``--force`` (or ``FORCE=1`` in the environment) recomputes.

Nothing here is from the paper; it is the machinery that turns the notebooks into the book.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from . import pages, profiles
from .bookbuild import BuildError, build
from .paths import find_checkout, project_root
from ..files import atomic_write_json

__all__ = ["NOTEBOOKS", "NotebookError", "available", "kernel_spec_dir", "artifacts_for", "execute",
           "artifacts_used", "run_notebooks", "run", "main"]

#: The notebooks, in book order. Each is ``notebooks/<name>.ipynb`` and becomes ``book/executed/<name>``.
NOTEBOOKS = ("baseline", "hessian_spectrum", "loss_landscape", "bit_allocation", "resnet20_cifar10",
             "ablation", "sensitivity_predictors", "imagenet_models", "own_network")

#: The kernel name the runner registers (in a private folder) for this interpreter.
KERNEL_NAME = "hawqlib-python"


class NotebookError(RuntimeError):
    """A notebook failed to execute; the message names the notebook and the failing cell."""


def available(notebooks_dir: str | os.PathLike | None = None) -> list[str]:
    """The names in :data:`NOTEBOOKS` whose source ``<notebooks_dir>/<name>.ipynb`` exists, in book order."""
    nb_dir = Path(notebooks_dir) if notebooks_dir is not None else project_root() / "notebooks"
    return [n for n in NOTEBOOKS if (nb_dir / f"{n}.ipynb").is_file()]


def kernel_spec_dir(folder: str | os.PathLike) -> Path:
    """Write a kernelspec :data:`KERNEL_NAME` running ``sys.executable`` under ``<folder>/kernels``.

    Our choice: a private kernelspec, put first on ``JUPYTER_PATH`` while the runner executes,
    rather than the user's ``python3`` kernel, which may belong to another interpreter.
    Returns ``folder`` (the entry to prepend to ``JUPYTER_PATH``).
    """
    folder = Path(folder)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python {platform.python_version()} (hawqlib)", "language": "python",
            "metadata": {"debugger": False}}
    atomic_write_json(folder / "kernels" / KERNEL_NAME / "kernel.json", spec)
    return folder


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kernel_manager_class():
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        """A kernel reached over local sockets (IPC), not TCP: nothing listens on the network."""

        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            super().__init__(**kwargs)

        async def _async_interrupt_kernel(self):
            # jupyter_client interrupts (SIGINT) every kernel it shuts down; ours is idle by then (its
            # notebook has finished), and the signal only made ipykernel log "KeyboardInterrupt caught
            # in kernel" as an ERROR. The shutdown request that follows stops it; a cell that runs too
            # long is still interrupted (nbclient calls interrupt_kernel before any shutdown).
            if self.shutting_down:
                return
            await super()._async_interrupt_kernel()

    return IPCKernelManager


def artifacts_for(profile: str) -> str | None:
    """Where the kernel stores artifacts at ``profile``: ``HAWQ_ARTIFACTS`` when set, else, for any profile
    but the published one (:data:`hawqlib.repro.profiles.DEFAULT_PROFILE`), ``data/scratch/<profile>``, which git
    ignores, so a smoke or paper run never leaves folders beside the committed results. None: the default."""
    if os.environ.get("HAWQ_ARTIFACTS"):
        return os.environ["HAWQ_ARTIFACTS"]
    if profile == profiles.DEFAULT_PROFILE:
        return None
    return str(project_root() / "data" / "scratch" / profile)


def _default_store(kernel_cwd: Path) -> str | None:
    """The published results' store for a kernel whose working directory is ``kernel_cwd``: None (the kernel
    finds the checkout's ``data/artifacts`` itself, :func:`hawqlib.repro.paths.artifacts_root`) when that directory
    is in a checkout, else this checkout's ``data/artifacts``, given explicitly (notebooks run from elsewhere)."""
    return None if find_checkout(kernel_cwd) else str(project_root() / "data" / "artifacts")


def _check_source(path: Path) -> None:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
        raise ValueError(f"{path} has no cell tagged 'parameters': papermill needs one (holding at least "
                         "profile = \"cpu\") to inject the profile")


def execute(name: str, profile: str, *, notebooks_dir: str | os.PathLike | None = None,
            out_dir: str | os.PathLike | None = None, force: bool = False, progress: bool = True,
            artifact_log: str | os.PathLike | None = None) -> float:
    """Execute ``notebooks/<name>.ipynb`` at ``profile`` into ``<out_dir>/<name>.ipynb``; return wall seconds.

    The kernel sees ``HAWQ_PROFILE=<profile>`` and, when ``force``, ``FORCE=1``; with ``artifact_log``,
    ``HAWQ_ARTIFACT_LOG=<artifact_log>``, so that every artifact it uses is appended there
    (:func:`artifacts_used` reads it back). Its working directory is the notebooks folder. ``PYTHONHASHSEED``
    is ``0`` unless already set (our choice: string hashing, hence set iteration order, is then the same in
    every run, so outputs are too). The output is renamed into place only after every cell ran. On failure
    raises :class:`NotebookError` naming the notebook and the failing cell.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    profiles.get(profile)  # validates the name
    nb_dir = Path(notebooks_dir) if notebooks_dir is not None else project_root() / "notebooks"
    out = Path(out_dir) if out_dir is not None else project_root() / "book" / "executed"
    src = nb_dir / f"{name}.ipynb"
    if not src.is_file():
        raise FileNotFoundError(f"no notebook {src}; available: {', '.join(available(nb_dir)) or 'none'}")
    _check_source(src)
    out.mkdir(parents=True, exist_ok=True)
    dest, failed = out / f"{name}.ipynb", out / f"{name}.failed.ipynb"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp.ipynb", dir=out)
    os.close(fd)
    tmp = Path(tmp)
    with tempfile.TemporaryDirectory(prefix="hawqlib-kernel-") as kdir:
        kernel_spec_dir(kdir)
        jpath = os.pathsep.join([kdir] + ([os.environ["JUPYTER_PATH"]] if os.environ.get("JUPYTER_PATH") else []))
        env = {"JUPYTER_PATH": jpath, "HAWQ_PROFILE": profile, "FORCE": "1" if force else None,
               "HAWQ_ARTIFACTS": artifacts_for(profile) or _default_store(nb_dir),
               "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
        if artifact_log is not None:
            env["HAWQ_ARTIFACT_LOG"] = str(Path(artifact_log).resolve())
        t0 = time.perf_counter()
        try:
            with _environ(**env):
                pm.execute_notebook(str(src), str(tmp), parameters={"profile": profile}, kernel_name=KERNEL_NAME,
                                    progress_bar={"desc": name, "leave": False} if progress and _tty() else False,
                                    cwd=str(nb_dir), start_timeout=180, kernel_manager_class=_kernel_manager_class())
        except PapermillExecutionError as exc:
            os.replace(tmp, failed)
            dest.unlink(missing_ok=True)
            first = next((ln for ln in str(exc.source).splitlines() if ln.strip()), "")
            raise NotebookError(
                f"notebook {name!r} failed at cell {exc.cell_index} of the executed copy (In [{exc.exec_count}], "
                f"starting {first!r}): {exc.ename}: {exc.evalue}\n"
                f"partial executed copy kept at {failed}") from exc
        except Exception as exc:  # kernel died (memory), could not start, bad notebook file, ...
            tmp.unlink(missing_ok=True)
            dest.unlink(missing_ok=True)
            raise NotebookError(f"notebook {name!r} could not be executed: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # interrupted: leave the previous executed copy as it was
            tmp.unlink(missing_ok=True)
            raise
        wall = time.perf_counter() - t0
    import nbformat

    nb = nbformat.read(tmp, as_version=4)
    pages.reader_copy(nb)
    nbformat.write(nb, tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; an executed notebook is not
    os.replace(tmp, dest)
    failed.unlink(missing_ok=True)
    return wall


def _tty() -> bool:
    return sys.stderr.isatty()


def _machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def artifacts_used(log: str | os.PathLike) -> list[str]:
    """The artifact folders named in a ``HAWQ_ARTIFACT_LOG`` file, each once, in the order first used."""
    path = Path(log)
    if not path.is_file():
        return []
    return list(dict.fromkeys(ln.strip() for ln in path.read_text().splitlines() if ln.strip()))


def _read_timings(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) and isinstance(data.get("notebooks"), dict) else {"notebooks": {}}
    except (OSError, ValueError):
        return {"notebooks": {}}


def run_notebooks(profile: str, only: Sequence[str] | None = None, *, force: bool = False,
                  notebooks_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, float]:
    """Execute the available notebooks (or ``only`` those) at ``profile``; return ``{name: wall seconds}``.

    Wall times are merged into ``<out_dir>/timings.json`` after each notebook, so an interrupted
    run keeps the times it measured, with the absolute paths of the artifact folders the notebook used
    (``artifacts``, in the order first used; :func:`artifacts_used`).
    """
    from ..progress import bar as progress_bar, write as progress_write

    profiles.get(profile)
    nb_dir = Path(notebooks_dir) if notebooks_dir is not None else project_root() / "notebooks"
    out = Path(out_dir) if out_dir is not None else project_root() / "book" / "executed"
    names = available(nb_dir)
    if only:
        unknown = [n for n in only if n not in NOTEBOOKS]
        if unknown:
            raise ValueError(f"unknown notebook(s) {unknown}; valid names: {', '.join(NOTEBOOKS)}")
        missing = [n for n in only if n not in names]
        if missing:
            raise FileNotFoundError(f"notebook(s) {missing} not found in {nb_dir}")
        names = [n for n in NOTEBOOKS if n in only]
    if not names:
        raise FileNotFoundError(f"no notebooks to run in {nb_dir} (expected some of: {', '.join(NOTEBOOKS)})")
    timings_path = out / "timings.json"
    machine = _machine()
    times: dict[str, float] = {}
    # A bar on a terminal; in a log (no terminal) one line per notebook, written when it finishes.
    bar = progress_bar(names, desc=f"notebooks ({profile})", unit="nb", disable=not (progress and _tty()))
    for i, name in enumerate(bar, 1):
        bar.set_postfix_str(name)
        with tempfile.TemporaryDirectory(prefix="hawqlib-used-") as logdir:
            log = Path(logdir) / "artifacts.log"
            wall = execute(name, profile, notebooks_dir=nb_dir, out_dir=out, force=force, progress=progress,
                           artifact_log=log)
            used = artifacts_used(log)
        times[name] = wall
        if progress:
            progress_write(f"notebook {i}/{len(names)} {name} ({profile}): {wall:.1f} s")
        record = _read_timings(timings_path)
        record["notebooks"][name] = {"profile": profile, "wall_s": round(wall, 2), "force": bool(force),
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     "machine": machine, "artifacts": used}
        atomic_write_json(timings_path, record)
    return times


def run(profile: str | None = None, only: Sequence[str] | None = None, *, build_book: bool = True,
        execute_notebooks: bool = True, force: bool | None = None, book_dir: str | os.PathLike | None = None,
        notebooks_dir: str | os.PathLike | None = None, progress: bool = True,
        quiet_build: bool = False) -> Path | None:
    """Execute the notebooks at ``profile`` into ``<book_dir>/executed`` and build the book; return index.html.

    ``force=None`` reads ``FORCE`` from the environment (:func:`hawqlib.repro.artifacts.manifest.force_recompute`).
    With ``build_book=False`` only the notebooks run and None is returned; with
    ``execute_notebooks=False`` the book is built from the executed copies already there.
    """
    from .artifacts import force_recompute

    profile = profile or profiles.current()
    profiles.get(profile)
    force = force_recompute() if force is None else force
    book = Path(book_dir) if book_dir is not None else project_root() / "book"
    if not (execute_notebooks or build_book):
        raise ValueError("nothing to do: neither executing the notebooks nor building the book")
    t0 = time.perf_counter()
    if execute_notebooks:
        run_notebooks(profile, only, force=force, notebooks_dir=notebooks_dir, out_dir=book / "executed",
                      progress=progress)
    if not build_book:
        return None
    t1 = time.perf_counter()
    index = build(book, profile=profile, quiet=quiet_build)
    if progress:
        print(f"notebooks {t1 - t0:.1f} s, book build {time.perf_counter() - t1:.1f} s")
    return index


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``book`` command's options to ``p``."""
    p.add_argument("--profile", default=profiles.current(), choices=sorted(profiles.PROFILES),
                   help="profile the notebooks run (default: HAWQ_PROFILE, else cpu)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=NOTEBOOKS,
                   help="execute only these notebooks (the build uses the others' executed copies)")
    p.add_argument("--no-build", action="store_true", help="execute the notebooks, do not build the book")
    p.add_argument("--build-only", action="store_true",
                   help="build the book from the executed notebooks already in book/executed")
    p.add_argument("--force", action="store_true", help="recompute artifacts (same as FORCE=1)")
    p.add_argument("--book-dir", default=None, help="book source folder (default: book/)")


def cli(args: argparse.Namespace) -> int:
    """Run the ``book`` command from parsed ``args``; print the path of the built index.html."""
    try:
        index = run(args.profile, args.only, build_book=not args.no_build, execute_notebooks=not args.build_only,
                    force=True if args.force else None, book_dir=args.book_dir)
    except (NotebookError, BuildError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if index is not None:
        print(f"book: {index}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hawqlib.repro.book``: the same as ``python -m hawqlib book``."""
    p = argparse.ArgumentParser(prog="python -m hawqlib book", description=__doc__.splitlines()[0])
    add_arguments(p)
    return cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
