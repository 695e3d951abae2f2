"""The book runner: execute the notebooks with papermill, then build the Jupyter Book.

``python -m hawqlib book [--profile P] [--only NAME ...] [--no-build | --build-only] [--force]``
(also ``make book``):

1. Each notebook ``notebooks/<name>.ipynb`` that exists (in book order, :data:`NOTEBOOKS`) is
   executed by papermill with ``profile`` injected into its ``parameters`` cell, in a kernel
   that runs this very interpreter (so a fresh virtual environment works without registering
   a kernel by hand). The executed copy is written to a temporary file and renamed to
   ``book/executed/<name>.ipynb`` only when every cell ran (its ``parameters`` and injected cells
   tagged for removal from the page, :func:`hawqlib.pages.reader_copy`): a failed run names the
   notebook and the failing cell, keeps its partial copy as ``<name>.failed.ipynb`` for inspection and removes
   any older executed copy, so a stale result is never built into the book.
2. Each notebook's wall time goes to ``book/executed/timings.json`` (with the machine it ran on);
   the book's "Reproduce it" page shows them.
3. ``jupyter-book build`` renders the book with execution off and warnings as errors. Every
   executed notebook the table of contents lists must exist and come from the requested
   profile, else the build is refused with a message saying what to run.

The heavy results the notebooks show are artifacts (:mod:`hawqlib.runs`): a notebook loads a
matching artifact or computes it, and ``--force`` (or ``FORCE=1`` in the environment) recomputes.

Nothing here is from the paper; it is the machinery that turns the notebooks into the book.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

from . import pages, profiles
from .storage import atomic_write, atomic_write_json

__all__ = ["NOTEBOOKS", "NotebookError", "BuildError", "project_root", "available", "book_file", "toc_documents",
           "kernel_spec_dir", "artifacts_for", "execute", "run_notebooks", "check_executed", "package_modules",
           "api_page_text", "api_pages", "build",
           "run", "main"]

#: The notebooks, in book order. Each is ``notebooks/<name>.ipynb`` and becomes ``book/executed/<name>``.
NOTEBOOKS = ("baseline", "hessian_spectrum", "loss_landscape", "bit_allocation", "resnet20_cifar10",
             "ablation", "imagenet_models")

#: The kernel name the runner registers (in a private folder) for this interpreter.
KERNEL_NAME = "hawqlib-python"


class NotebookError(RuntimeError):
    """A notebook failed to execute; the message names the notebook and the failing cell."""


class BuildError(RuntimeError):
    """The book cannot be built (missing or stale executed notebook, or a failed Sphinx build)."""


def project_root() -> Path:
    """The repository root (the folder holding ``notebooks/`` and ``book/``)."""
    return Path(__file__).resolve().parents[1]


def available(notebooks_dir: str | os.PathLike | None = None) -> list[str]:
    """The names in :data:`NOTEBOOKS` whose source ``<notebooks_dir>/<name>.ipynb`` exists, in book order."""
    nb_dir = Path(notebooks_dir) if notebooks_dir is not None else project_root() / "notebooks"
    return [n for n in NOTEBOOKS if (nb_dir / f"{n}.ipynb").is_file()]


def book_file(book_dir: str | os.PathLike, name: str) -> Path:
    """The book's ``_config.yml`` or ``_toc.yml``: in ``book_dir`` when it has one, else beside it, else at the
    top of the repository (where the project keeps both)."""
    book = Path(book_dir)
    for folder in (book, book.parent, project_root()):
        if (folder / name).is_file():
            return (folder / name).resolve()
    raise FileNotFoundError(f"no {name} in {book}, beside it, or in {project_root()}")


def toc_documents(book_dir: str | os.PathLike) -> list[str]:
    """Every document of the book's ``_toc.yml`` (``root``, ``file`` and expanded ``glob`` entries), in toc order.

    Entries are relative to ``book_dir``; the file is found by :func:`book_file`.
    """
    import yaml

    book = Path(book_dir)
    toc = yaml.safe_load(book_file(book, "_toc.yml").read_text())
    docs: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("root", "file"):
                if key in node:
                    docs.append(str(node[key]).removesuffix(".md").removesuffix(".ipynb"))
            if "glob" in node:
                docs.extend(sorted(str(p.relative_to(book).with_suffix("")).replace(os.sep, "/")
                                   for p in book.glob(str(node["glob"]))
                                   if p.suffix in (".md", ".ipynb") and "_build" not in p.parts))
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(toc)
    return docs


def _executed_in_toc(book_dir: Path) -> list[str]:
    return [d.split("/", 1)[1] for d in toc_documents(book_dir) if d.startswith("executed/")]


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

    return IPCKernelManager


def artifacts_for(profile: str) -> str | None:
    """Where the kernel stores artifacts at ``profile``: ``HAWQ_ARTIFACTS`` when set, else, for any profile
    but the published one (:data:`hawqlib.profiles.DEFAULT_PROFILE`), ``data/scratch/<profile>``, which git
    ignores, so a smoke or paper run never leaves folders beside the committed results. None: the default."""
    if os.environ.get("HAWQ_ARTIFACTS"):
        return os.environ["HAWQ_ARTIFACTS"]
    if profile == profiles.DEFAULT_PROFILE:
        return None
    return str(project_root() / "data" / "scratch" / profile)


def _check_source(path: Path) -> None:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
        raise ValueError(f"{path} has no cell tagged 'parameters': papermill needs one (holding at least "
                         "profile = \"cpu\") to inject the profile")


def execute(name: str, profile: str, *, notebooks_dir: str | os.PathLike | None = None,
            out_dir: str | os.PathLike | None = None, force: bool = False, progress: bool = True) -> float:
    """Execute ``notebooks/<name>.ipynb`` at ``profile`` into ``<out_dir>/<name>.ipynb``; return wall seconds.

    The kernel sees ``HAWQ_PROFILE=<profile>`` and, when ``force``, ``FORCE=1``; its working
    directory is the notebooks folder. ``PYTHONHASHSEED`` is ``0`` unless already set (our choice:
    string hashing, hence set iteration order, is then the same in every run, so outputs are too). The output is renamed into place only after every cell
    ran. On failure raises :class:`NotebookError` naming the notebook and the failing cell.
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
               "HAWQ_ARTIFACTS": artifacts_for(profile),
               "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
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
    run keeps the times it measured.
    """
    from .progress import bar as progress_bar, write as progress_write

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
        wall = execute(name, profile, notebooks_dir=nb_dir, out_dir=out, force=force, progress=progress)
        times[name] = wall
        if progress:
            progress_write(f"notebook {i}/{len(names)} {name} ({profile}): {wall:.1f} s")
        record = _read_timings(timings_path)
        record["notebooks"][name] = {"profile": profile, "wall_s": round(wall, 2), "force": bool(force),
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     "machine": machine}
        atomic_write_json(timings_path, record)
    return times


def check_executed(book_dir: str | os.PathLike, profile: str | None = None) -> list[Path]:
    """The executed notebooks ``_toc.yml`` lists; raise :class:`BuildError` if one is missing or from another profile."""
    import nbformat

    book = Path(book_dir)
    paths, problems = [], []
    for name in _executed_in_toc(book):
        path = book / "executed" / f"{name}.ipynb"
        if not path.is_file():
            if not (project_root() / "notebooks" / f"{name}.ipynb").is_file():
                problems.append(f"{path} is missing, and so is its source notebooks/{name}.ipynb")
            else:
                problems.append(f"{path} is missing (run: python -m hawqlib book --only {name}"
                                + (f" --profile {profile}" if profile else "") + ")")
            continue
        if profile is not None:
            nb = nbformat.read(path, as_version=4)
            got = nb.metadata.get("papermill", {}).get("parameters", {}).get("profile")
            if got != profile:
                problems.append(f"{path} was executed at profile {got!r}, not {profile!r} "
                                f"(run: python -m hawqlib book --only {name} --profile {profile})")
        paths.append(path)
    if problems:
        raise BuildError("the table of contents lists executed notebooks that cannot be used:\n  "
                         + "\n  ".join(problems))
    return paths


def package_modules() -> list[str]:
    """Every module of the ``hawqlib`` package (except ``__main__``), sorted: what the API reference documents."""
    import pkgutil

    import hawqlib

    return sorted(m.name for m in pkgutil.walk_packages(hawqlib.__path__, "hawqlib.")
                  if not m.name.endswith("__main__"))


def api_page_text(module: str, is_package: bool = False) -> str:
    """The API page of ``module``: autodoc's reST inside MyST's ``eval-rst`` (MyST does not parse it bare)."""
    opts = "" if is_package else "   :members:\n   :show-inheritance:\n"
    return f"# `{module}`\n\n```{{eval-rst}}\n.. automodule:: {module}\n{opts}```\n"


def api_pages(book_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``<book_dir>/api/<module>.md`` for every module whose page is missing or differs; return those pages.

    A page is one ``automodule`` directive (:func:`api_page_text`): members of a plain module, the docstring
    alone for a package, whose members are documented in their own modules). The table of contents picks the
    pages up by its ``api/hawqlib.*`` glob, so a new module is never missing from the reference.
    """
    import importlib

    book = Path(book_dir) if book_dir is not None else project_root() / "book"
    new = []
    for name in package_modules():
        page = book / "api" / f"{name}.md"
        text = api_page_text(name, hasattr(importlib.import_module(name), "__path__"))
        if page.exists() and page.read_text() == text:
            continue
        atomic_write(page, lambda f: f.write(text), mode="w")
        os.chmod(page, 0o644)
        new.append(page)
    return new


def build(book_dir: str | os.PathLike | None = None, *, profile: str | None = None, quiet: bool = False) -> Path:
    """Build the book in ``book_dir`` (default ``book/``) with warnings as errors; return the built index.html.

    Modules without an API page get one first (:func:`api_pages`), when the book has an ``api/`` folder.

    Every page is rebuilt (``--all``): pasted glue values live in other pages than the notebooks
    that glue them, so an incremental build could show stale numbers.
    """
    book = Path(book_dir) if book_dir is not None else project_root() / "book"
    check_executed(book, profile)
    for page in api_pages(book) if (book / "api").is_dir() else []:
        print(f"new API page {page} (commit it)", file=sys.stderr)
    # Colours only on a terminal, as sphinx-build does (Jupyter Book would colour a log too).
    cmd = [sys.executable, "-c", "import sys; from sphinx.util.console import color_terminal, nocolor; "
           "import jupyter_book.utils as u; color_terminal() or (nocolor(), "
           "setattr(u, '_color_message', lambda msg, color: msg)); "
           "from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(book), "--config", str(book_file(book, "_config.yml")),
           "--toc", str(book_file(book, "_toc.yml")), "--path-output", str(book),
           "--all", "-W", "--keep-going"] + (["-q"] if quiet else [])
    proc = subprocess.run(cmd, capture_output=quiet, text=True)
    if proc.returncode != 0:
        detail = ("\n" + (proc.stdout or "")[-4000:] + (proc.stderr or "")[-4000:]) if quiet else ""
        raise BuildError(f"jupyter-book build {book} failed (exit {proc.returncode}); "
                         f"warnings are errors, see the messages above{detail}")
    index = book / "_build" / "html" / "index.html"
    if not index.is_file():
        raise BuildError(f"the build finished but wrote no {index}")
    return index


def run(profile: str | None = None, only: Sequence[str] | None = None, *, build_book: bool = True,
        execute_notebooks: bool = True, force: bool | None = None, book_dir: str | os.PathLike | None = None,
        notebooks_dir: str | os.PathLike | None = None, progress: bool = True,
        quiet_build: bool = False) -> Path | None:
    """Execute the notebooks at ``profile`` into ``<book_dir>/executed`` and build the book; return index.html.

    ``force=None`` reads ``FORCE`` from the environment (:func:`hawqlib.runs.force_recompute`).
    With ``build_book=False`` only the notebooks run and None is returned; with
    ``execute_notebooks=False`` the book is built from the executed copies already there.
    """
    from .runs import force_recompute

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
    """``python -m hawqlib.book``: the same as ``python -m hawqlib book``."""
    p = argparse.ArgumentParser(prog="python -m hawqlib book", description=__doc__.splitlines()[0])
    add_arguments(p)
    return cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
