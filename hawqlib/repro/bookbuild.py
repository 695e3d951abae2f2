"""Building the Jupyter Book from executed notebooks: the table of contents, the API pages, ``jupyter-book build``.

:mod:`hawqlib.repro.book` executes the notebooks and then calls :func:`build`, which

1. checks that every executed notebook the table of contents (``_toc.yml``) lists exists and comes from the
   requested profile (:func:`check_executed`), else refuses with a message saying what to run;
2. writes the API reference: one page per module of the package (:func:`api_pages`), each a single
   ``automodule`` directive, so that a new module is never missing from the reference;
3. runs ``jupyter-book build`` with warnings as errors. The experiment notebooks are not executed again; the
   method pages (MyST notebooks whose exercise solutions compute) are, in a kernel that imports this checkout.

Nothing here is from the paper; it is the machinery that turns the executed notebooks into the book.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .paths import project_root
from ..files import atomic_write

__all__ = ["BuildError", "book_file", "toc_documents", "check_executed", "package_modules",
           "api_page_text", "api_page", "api_pages", "build"]


class BuildError(RuntimeError):
    """The book cannot be built (missing or stale executed notebook, or a failed Sphinx build)."""


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


def api_page(book_dir: str | os.PathLike, module: str) -> Path:
    """Where the API page of ``module`` goes: ``api/<module>.md`` for the method, ``api/companion/<module>.md`` for
    the companion floor (:mod:`hawqlib.repro`), so the reference lists the two floors apart."""
    floor = "companion" if module == "hawqlib.repro" or module.startswith("hawqlib.repro.") else ""
    return Path(book_dir) / "api" / floor / f"{module}.md"


def api_pages(book_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write the API page (:func:`api_page`) of every module whose page is missing or differs, delete the pages of
    modules that no longer exist; return the pages written.

    A page is one ``automodule`` directive (:func:`api_page_text`): members of a plain module, the docstring
    alone for a package, whose members are documented in their own modules). The table of contents picks the
    pages up by its ``api/hawqlib.*`` and ``api/companion/hawqlib.*`` globs, so a new module is never missing
    from the reference.
    """
    import importlib

    book = Path(book_dir) if book_dir is not None else project_root() / "book"
    modules = package_modules()
    new = []
    for name in modules:
        page = api_page(book, name)
        text = api_page_text(name, hasattr(importlib.import_module(name), "__path__"))
        if page.exists() and page.read_text() == text:
            continue
        atomic_write(page, lambda f: f.write(text), mode="w")
        os.chmod(page, 0o644)
        new.append(page)
    wanted = {api_page(book, name) for name in modules}
    for page in [*(book / "api").glob("hawqlib.*.md"), *(book / "api" / "companion").glob("hawqlib.*.md")]:
        if page not in wanted:
            page.unlink()
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
           # the method pages' kernels (MyST-NB, through nbclient's default manager) over local sockets too, their
           # socket files under an absolute path (a relative one resolves in the kernel's folder, not ours)
           "import os, jupyter_client; from hawqlib.repro.book import _kernel_manager_class; "
           "K = _kernel_manager_class(); jupyter_client.AsyncKernelManager = type('K', (K,), {'__init__': "
           "lambda self, **kw: K.__init__(self, **{'ip': os.path.join(os.environ['HAWQ_KERNEL_DIR'], 'kernel'), "
           "**kw})}); "
           "from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(book), "--config", str(book_file(book, "_config.yml")),
           "--toc", str(book_file(book, "_toc.yml")), "--path-output", str(book),
           "--all", "-W", "--keep-going"] + (["-q"] if quiet else [])
    # The method pages' exercise solutions are executed at build time (MyST notebooks, _config.yml's execute
    # section) in a kernel running this interpreter: it must import this checkout's hawqlib, whatever is installed.
    path = os.pathsep.join([str(project_root())] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    with tempfile.TemporaryDirectory(prefix="hawqlib-kernels-") as kernels:
        proc = subprocess.run(cmd, capture_output=quiet, text=True,
                              env=dict(os.environ, PYTHONPATH=path, HAWQ_KERNEL_DIR=kernels))
    if proc.returncode != 0:
        detail = ("\n" + (proc.stdout or "")[-4000:] + (proc.stderr or "")[-4000:]) if quiet else ""
        raise BuildError(f"jupyter-book build {book} failed (exit {proc.returncode}); "
                         f"warnings are errors, see the messages above{detail}")
    index = book / "_build" / "html" / "index.html"
    if not index.is_file():
        raise BuildError(f"the build finished but wrote no {index}")
    return index
