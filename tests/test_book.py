"""The book: the runner's contract, and a full smoke-profile build checked page by page.

The build test runs ``python -m hawqlib book --profile smoke`` once (shared with
test_notebooks.py, see _book_smoke.py) on a copy of book/, then checks the HTML: every page of
_toc.yml rendered, every image present and non-empty, every internal link and anchor resolving,
and the values pasted into the prose equal to those the notebooks glued. Unresolved glue keys and
missing figures are build warnings, and the runner builds with warnings as errors.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

import hawqlib
from hawqlib.repro import artifacts, book, bookbuild, pages, profiles, provenance

from _book_smoke import ROOT, smoke_book

BOOK = ROOT / "book"
sys.path.insert(0, str(BOOK / "_ext"))
import hawq_book  # noqa: E402  (the book's Sphinx extension)


# ----------------------------------------------------------------------------- structure, no build

def test_toc_lists_every_notebook_in_book_order():
    docs = bookbuild.toc_documents(BOOK)
    executed = [d.split("/", 1)[1] for d in docs if d.startswith("executed/")]
    assert executed == list(book.NOTEBOOKS)
    for d in docs:
        if not d.startswith("executed/"):
            assert (BOOK / f"{d}.md").is_file(), f"_toc.yml lists {d} but book/{d}.md does not exist"


def test_api_reference_covers_every_module_on_its_floor():
    pages = {p.stem: p for p in [*(BOOK / "api").glob("hawqlib.*.md"), *(BOOK / "api" / "companion").glob("hawqlib.*.md")]}
    modules = set(bookbuild.package_modules())
    assert not modules - set(pages), (f"modules without an API page: {sorted(modules - set(pages))} "
                                      "(python -c 'from hawqlib.repro import bookbuild; bookbuild.api_pages()' writes them)")
    assert not set(pages) - modules, f"API pages of modules that do not exist: {sorted(set(pages) - modules)}"
    for name, page in pages.items():
        # the method's pages in api/, the companion's (hawqlib.repro) in api/companion/
        assert page == bookbuild.api_page(BOOK, name), f"{page} is on the wrong floor"
        assert (page.parent.name == "companion") == name.startswith("hawqlib.repro"), name
        text = page.read_text()
        # autodoc's reST only renders inside eval-rst: a bare {automodule} block shows as literal text.
        assert text == bookbuild.api_page_text(name, hasattr(importlib.import_module(name), "__path__")), name
        assert "```{eval-rst}\n.. automodule:: " + name + "\n" in text


#: The method's modules whose docstrings state the paper's formulas (issue 38: typeset on the API pages).
FORMULA_MODULES = ("hawqlib.sensitivity", "hawqlib.order", "hawqlib.allocate", "hawqlib.quant.grids",
                   "hawqlib.quant.observer", "hawqlib.quant.ste", "hawqlib.hessian", "hawqlib.hessian.solvers",
                   "hawqlib.hessian.gauss_newton", "hawqlib.hessian.losses", "hawqlib.size")
#: The paper's notation written as plain text: a block's symbol with its index, or a norm's double bars.
_PLAIN_MATH = re.compile(r"\b(?:lambda_i|Omega_i|S_i|H_i|W_i|B_i|n_i)\b|\|\|")


def _public_docstrings(module):
    yield module.__name__, module.__doc__ or ""
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield f"{module.__name__}.{name}", obj.__doc__ or ""
            for mname, meth in (vars(obj).items() if inspect.isclass(obj) else ()):
                if not mname.startswith("_") and (inspect.isfunction(meth) or isinstance(meth, property)):
                    yield f"{module.__name__}.{name}.{mname}", meth.__doc__ or ""


def test_the_method_docstrings_write_their_formulas_as_math():
    """S_i, lambda_i, Omega_i and norms go through :math: or ``.. math::`` (MathJax typesets them on the API
    pages), never as plain text; literals (``...``) are code and may name them."""
    plain = []
    for name in FORMULA_MODULES:
        for where, doc in _public_docstrings(importlib.import_module(name)):
            text = re.sub(r"\.\. math::\n(?:\n|[ \t]+.*\n)*", "", inspect.cleandoc(doc) + "\n")
            text = re.sub(r"``.*?``", "", re.sub(r":math:`[^`]*`", "", text), flags=re.S)
            plain += [f"{where}: ...{text[max(0, m.start() - 40):m.end() + 20]!r}" for m in _PLAIN_MATH.finditer(text)]
    assert not plain, "formulas written as plain text:\n" + "\n".join(plain)
    sens = importlib.import_module("hawqlib.sensitivity").__doc__
    assert r":math:`S_i = \lambda_i / n_i`" in sens and r"\Omega_i(b) = \lambda_i \lVert Q_b(W_i) - W_i \rVert_2^2" in sens


def test_config_and_toc_sit_at_the_top_of_the_repository():
    assert bookbuild.book_file(BOOK, "_config.yml") == ROOT / "_config.yml"
    assert bookbuild.book_file(BOOK, "_toc.yml") == ROOT / "_toc.yml"
    assert not (BOOK / "_config.yml").exists() and not (BOOK / "_toc.yml").exists()


def test_executed_copy_removes_the_parameter_cells():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('profile = "cpu"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell('profile = "smoke"', metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_code_cell("glue('x', 1)", metadata={"tags": ["hide-input"]}),
        nbformat.v4.new_code_cell("y = 2")])
    assert pages.reader_copy(nb) == 2
    assert [c.metadata["tags"] for c in nb.cells] == [["parameters", "remove-cell"],
                                                     ["injected-parameters", "remove-cell"], ["hide-input"], []]
    assert pages.reader_copy(nb) == 0  # idempotent


def test_table_helper_formats_columns_and_rejects_unknown_ones():
    import pandas as pd

    df = pd.DataFrame({"block": ["layer1.0.conv1", "fc"], "n_i": [2304, 640], "top-1 (%)": [92.6412, 91.0]})
    html = pages.table(df, {"top-1 (%)": "{:.2f}", "n_i": "{:,d}"}, index=False).to_html()
    assert 'class="dataframe hawq-table"' in html and ">92.64<" in html and ">2,304<" in html
    assert "text-align: left" in html  # the string column
    assert re.search(r"th\.col0 \{\s*text-align: left;", html)  # and its header
    with pytest.raises(KeyError, match="top1"):
        pages.table(df, {"top1": "{:.2f}"})
    # headers in the paper's notation are typeset: n_i as inline math, text escaped, $...$ as math
    assert '<span class="math notranslate nohighlight">\\(n_i\\)</span></th>' in html and ">n_i<" not in html
    assert pages.header_html("a < $b_i$") == 'a &lt; <span class="math notranslate nohighlight">\\(b_i\\)</span>'
    assert all(not _PLAIN_MATH.search(pages.header_html(k).split("<span")[0]) for k in pages.MATH_HEADERS)
    with pytest.raises(ValueError, match="unpaired"):
        pages.header_html("cost in $")
    # a named index heads its column in the one header row (no row of its own)
    named = pages.table(df.set_index("block"), {"top-1 (%)": "{:.2f}"}).to_html()
    assert named.count("<tr>") == 3 and ">block</th>" in named and "blank" not in named


def test_artifacts_of_other_profiles_go_where_git_ignores_them(monkeypatch):
    monkeypatch.delenv("HAWQ_ARTIFACTS", raising=False)
    assert book.artifacts_for(hawqlib.repro.profiles.DEFAULT_PROFILE) is None  # the published results
    scratch = Path(book.artifacts_for("smoke"))
    assert scratch == ROOT / "data" / "scratch" / "smoke"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(scratch / "x" / "manifest.json")], cwd=ROOT)
    assert ignored.returncode == 0, "data/scratch/ must be ignored by git"
    monkeypatch.setenv("HAWQ_ARTIFACTS", "/elsewhere")
    assert book.artifacts_for("smoke") == "/elsewhere"


#: The longest line of shown code that fits the book's text column without wrapping (measured in headless
#: Chromium at a 1280-pixel window: longer lines wrap, which hides their indentation).
SHOWN_CODE_WIDTH = 76
#: The same for folded code (hide-input, hide-cell), which a reader sees once unfolded: it sits in an admonition
#: box whose padding takes about two characters of the column (measured the same way).
FOLDED_CODE_WIDTH = 74
_FOLDED = {"hide-input", "hide-cell"}
#: Tags whose code never reaches the reader.
_NOT_SHOWN = {"remove-input", "remove-cell", "parameters"}


def test_shown_code_fits_the_text_column():
    long = []
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for c in nbformat.read(nb, as_version=4).cells:
            tags = set(c.metadata.get("tags", []))
            if c.cell_type != "code" or tags & _NOT_SHOWN:
                continue
            width = FOLDED_CODE_WIDTH if tags & _FOLDED else SHOWN_CODE_WIDTH
            long += [f"{nb.name} cell {c.get('id')}: {len(line)} characters (at most {width}): {line.strip()[:40]}..."
                     for line in c.source.splitlines() if len(line) > width]
    assert not long, ("shown code wraps in the book, folded code too once unfolded; break these lines:\n"
                      + "\n".join(long))


def test_every_module_docstring_exists():
    for name in bookbuild.package_modules():
        mod = importlib.import_module(name)
        assert mod.__doc__ and mod.__doc__.strip(), f"{name} has no module docstring for the API reference"


def test_our_choices_collects_docstrings_and_comments():
    found = hawq_book.collect_choices()
    # The option-A shortcut is a docstring choice; the baseline schedule is a comment in profiles.py.
    assert any("option A" in it["text"] for it in found["hawqlib.models.resnet_cifar"])
    comments = [it for it in found["hawqlib.repro.profiles"] if it["kind"] == "comment"]
    assert any("cosine" in it["text"] for it in comments)
    assert all(hawq_book.CHOICE.search(it["text"]) for items in found.values() for it in items)


def test_profile_lookup_pastes_values_and_rejects_unknown_keys():
    assert hawq_book._lookup("cpu:baseline.epochs") == hawqlib.repro.profiles.get("cpu")["baseline"]["epochs"]
    assert hawq_book._fmt(5e-4) == "0.0005" and hawq_book._fmt([2, 3]) == "2, 3" and hawq_book._fmt(None) == "all"
    with pytest.raises(KeyError, match="no 'epoch'"):
        hawq_book._lookup("cpu:baseline.epoch")
    with pytest.raises(ValueError, match="unknown profile"):
        hawq_book._lookup("gpu:baseline.epochs")
    with pytest.raises(ValueError, match="profile:section.key"):
        hawq_book._lookup("baseline.epochs")


_PASTE = re.compile(r"\{glue(?::(?:text|any|figure|math|md))?\}`([^`]+)`"
                    r"|[`:]{3}\{glue(?::(?:any|figure|math|md))?\}\s+(\S+)")
_GLUE = re.compile(r"\bglue\(\s*(f?)([\"'])(.+?)\2")


def _glued_keys(path: Path) -> tuple[list[re.Pattern], bool]:
    """Patterns of the keys a source notebook glues, and whether every glue call names its key literally."""
    nb = nbformat.read(path, as_version=4)
    pats, literal = [], True
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for fflag, _, key in _GLUE.findall(cell.source):
            rx = re.escape(key)
            if fflag:  # an f-string key: any text for each {...}
                rx = re.sub(r"\\\{[^}]*\\\}", ".+", rx)
            pats.append(re.compile(rx))
        if re.search(r"\bglue\(\s*(?![fFrR]?[\"'])", cell.source):
            literal = False
    return pats, literal


def test_every_pasted_key_is_glued_by_its_notebook():
    """Static check, before any execution: a typo in a glue key is caught in seconds, not after a build."""
    nb_dir = ROOT / "notebooks"
    sources = {n: nb_dir / f"{n}.ipynb" for n in book.available(nb_dir)}
    if not sources:
        pytest.skip("no notebooks yet")
    glued = {n: _glued_keys(p) for n, p in sources.items()}
    texts = [(f"notebooks/{n}.ipynb", n, c.source) for n, p in sources.items()
             for c in nbformat.read(p, as_version=4).cells if c.cell_type == "markdown"]
    texts += [(str(p.relative_to(ROOT)), None, p.read_text()) for p in BOOK.rglob("*.md")
              if "_build" not in p.parts]
    problems, checked = [], 0
    for where, owner, text in texts:
        for m in _PASTE.finditer(text):
            ref = next(g for g in m.groups() if g)
            doc, _, key = ref.rpartition("::")
            if m.group(1):  # the role form may end in :format
                key = key.rsplit(":", 1)[0]
            name = Path(doc).stem if doc else owner
            if name not in glued:
                if name is None or name in book.NOTEBOOKS:
                    continue  # that notebook is not written yet (the build would say so)
                problems.append(f"{where}: {ref!r} names no notebook")
                continue
            pats, literal = glued[name]
            checked += 1
            if literal and not any(p.fullmatch(key) for p in pats):
                problems.append(f"{where}: key {key!r} is not glued by notebooks/{name}.ipynb")
    assert not problems, "\n".join(problems)
    assert checked > 0


# ----------------------------------------------------------------------------- exercises, citations, front matter

#: The experiment chapters that end with exercises (besides every method chapter).
EXERCISE_NOTEBOOKS = ("hessian_spectrum", "bit_allocation", "resnet20_cifar10")
_EXERCISE = re.compile(r"^[`:]{3,}\{exercise\}[^\n]*\n:label: (\S+)", re.M)
_SOLUTION = re.compile(r"^[`:]{3,}\{solution(?:-start)?\} (\S+)\n((?::[a-z]+:[^\n]*\n)*)", re.M)
_CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")


def _method_pages() -> list[Path]:
    return [BOOK / f"{d}.md" for d in bookbuild.toc_documents(BOOK) if d.startswith("method/")]


def _notebook_markdown(name: str) -> str:
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def _exercise_problems(where: str, text: str) -> list[str]:
    """Each exercise labelled and followed, before the next exercise, by its folded solution."""
    exercises = [(m.start(), m.group(1)) for m in _EXERCISE.finditer(text)]
    solutions = [(m.start(), m.group(1), m.group(2)) for m in _SOLUTION.finditer(text)]
    problems = [] if len(exercises) >= 3 else [f"{where}: {len(exercises)} exercises (at least 3)"]
    for k, (at, label) in enumerate(exercises):
        end = exercises[k + 1][0] if k + 1 < len(exercises) else len(text)
        mine = [opts for pos, target, opts in solutions if target == label and at < pos < end]
        if not mine:
            problems.append(f"{where}: exercise {label} has no solution right after it")
        elif not all(":class: dropdown" in opts for opts in mine):
            problems.append(f"{where}: the solution of {label} is not folded (:class: dropdown)")
    return problems


def test_every_method_chapter_and_the_key_experiments_end_with_exercises():
    pages = _method_pages()
    assert len(pages) >= 6
    problems = []
    for page in pages:
        text = page.read_text()
        problems += _exercise_problems(str(page.relative_to(ROOT)), text)
        if "{code-cell}" in text:  # a solution that computes is executed at build time: the page is a notebook
            head = text.split("\n---\n", 1)[0]
            if not (text.startswith("---\n") and "file_format: mystnb" in head and "kernelspec:" in head):
                problems.append(f"{page.relative_to(ROOT)} has code cells but no MyST-NB header (file_format, "
                                "kernelspec): they would show as code and never run")
    for name in EXERCISE_NOTEBOOKS:
        problems += _exercise_problems(f"notebooks/{name}.ipynb", _notebook_markdown(name))
    assert not problems, "\n".join(problems)


def test_the_build_executes_the_method_pages_and_only_them():
    import yaml

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] in ("force", "cache", "auto")
    assert "executed/*" in config["execute"]["exclude_patterns"]  # papermill's copies are never run again
    assert "sphinx_exercise" in config["sphinx"]["extra_extensions"]
    assert config["sphinx"]["config"]["exercise_style"] == "solution_follow_exercise"


def _bib_entries() -> dict[str, str]:
    text = (BOOK / "references.bib").read_text()
    return {m.group(1): m.group(0) for m in re.finditer(r"@\w+\{([^,\s]+),(?:.|\n)*?\n\}", text)}


def _all_prose() -> list[tuple[str, str]]:
    texts = [(str(p.relative_to(ROOT)), p.read_text()) for p in BOOK.rglob("*.md") if "_build" not in p.parts]
    texts += [(f"notebooks/{n}.ipynb", _notebook_markdown(n)) for n in book.available(ROOT / "notebooks")]
    return texts


#: Works the book names, with the words that name them: where a page names one it cites it there.
NAMED_WORKS = {
    "dong2020hawqv2": r"HAWQ-V2", "yao2021hawqv3": r"HAWQ-V3", "yao2020pyhessian": r"PyHessian",
    "esser2020lsq": r"\bLSQ\b", "hinton2015distilling": r"\bHinton\b", "lanczos1950": r"\bLanczos\b",
    "pearlmutter1994": r"Pearlmutter", "hutchinson1990": r"Hutchinson", "gholami2018squeezenext": r"SqueezeNext",
    "szegedy2016inception": r"Inception", "dosovitskiy2021vit": r"Dosovitskiy",
}


def test_every_citation_resolves_and_every_named_work_is_cited():
    import yaml

    entries = _bib_entries()
    assert "1905.03696" in entries["dong2019hawq"]  # the paper, with its arXiv number
    for key in ("dong2020hawqv2", "yao2021hawqv3", "yao2020pyhessian", "he2016resnet", "krizhevsky2009cifar"):
        assert key in entries, key
    cited, problems = set(), []
    for where, text in _all_prose():
        keys = {k.strip() for m in _CITE.finditer(text) for k in m.group(1).split(",")}
        cited |= keys
        problems += [f"{where}: cites {k!r}, which book/references.bib does not hold" for k in keys - set(entries)]
        # the experiment chapters name the models in many places; the first page that names a work cites it
        for key, words in NAMED_WORKS.items():
            if re.search(words, text) and key not in keys and not where.startswith("book/references"):
                problems.append(f"{where} names {words!r} without citing {key}")
    assert not problems, "\n".join(problems)
    assert not set(entries) - cited, f"entries of references.bib cited nowhere: {sorted(set(entries) - cited)}"
    assert "references" in bookbuild.toc_documents(BOOK)
    assert yaml.safe_load((ROOT / "_config.yml").read_text())["bibtex_bibfiles"] == ["references.bib"]


def test_license_citation_file_and_readme_front_matter():
    import yaml

    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) 2026 ")
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["title"] and cff["authors"]
    assert "1905.03696" in cff["preferred-citation"]["url"]
    readme = (ROOT / "README.md").read_text()
    top = "\n".join(readme.splitlines()[:8])
    assert "HAWQ_DATA" in top and "make book" in top and "CIFAR-10" in top, "the README's first lines say where the data is"
    assert "\n## For instructors\n" in readme and "\n## How to cite\n" in readme
    extra = (ROOT / "pyproject.toml").read_text()
    assert '"sphinx-exercise==1.2.1"' in extra and '"sphinxcontrib-bibtex==2.7.0"' in extra


# ----------------------------------------------------------------------------- the runner's contract

def _notebook(path: Path, *code: str, parameters: bool = True) -> None:
    cells = [nbformat.v4.new_markdown_cell("# A test notebook")]
    if parameters:
        cells.append(nbformat.v4.new_code_cell('profile = "cpu"', metadata={"tags": ["parameters"]}))
    cells += [nbformat.v4.new_code_cell(c) for c in code]
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def test_runner_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown profile"):
        book.run_notebooks("fast", notebooks_dir=tmp_path, out_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="unknown notebook"):
        book.run_notebooks("smoke", ["baseline", "nonsense"], notebooks_dir=tmp_path, out_dir=tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no notebooks to run"):
        book.run_notebooks("smoke", notebooks_dir=tmp_path, out_dir=tmp_path / "out")
    _notebook(tmp_path / "nb" / "baseline.ipynb", "x = 1", parameters=False)
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        book.execute("baseline", "smoke", notebooks_dir=tmp_path / "nb", out_dir=tmp_path / "out")


def test_runner_executes_with_profile_and_records_time(tmp_path, monkeypatch):
    nb_dir, out = tmp_path / "nb", tmp_path / "out"
    monkeypatch.setenv("HAWQ_ARTIFACTS", str(tmp_path / "store"))
    monkeypatch.delenv("FORCE", raising=False)
    _notebook(nb_dir / "ablation.ipynb",
              "import os, sys\nfrom myst_nb import glue\n"
              "glue('ablation_profile', profile, display=False)\n"
              "glue('ablation_env', os.environ['HAWQ_PROFILE'], display=False)\n"
              "glue('ablation_python', sys.executable, display=False)\n"
              "glue('ablation_cwd', os.getcwd(), display=False)",
              # an artifact the notebook computes: the runner records it for the Provenance page
              "from hawqlib.repro import artifacts\n"
              "_, folder = artifacts.cached('probe', {'n': 1}, lambda f: 1, "
              "lambda f, v: (f / 'v.json').write_text('1') and None, lambda f: 1, None)")
    times = book.run_notebooks("smoke", notebooks_dir=nb_dir, out_dir=out, progress=False)
    assert list(times) == ["ablation"] and times["ablation"] > 0
    nb = nbformat.read(out / "ablation.ipynb", as_version=4)
    glued = {o["metadata"]["scrapbook"]["name"]: o["data"]["application/papermill.record/text/plain"]
             for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "scrapbook" in o.get("metadata", {})}
    assert glued["ablation_profile"] == "'smoke'" and glued["ablation_env"] == "'smoke'"
    assert glued["ablation_python"] == repr(sys.executable)  # the kernel is this interpreter
    assert glued["ablation_cwd"] == repr(str(nb_dir))
    assert nb.metadata["papermill"]["parameters"] == {"profile": "smoke"}
    timings = json.loads((out / "timings.json").read_text())["notebooks"]
    assert timings["ablation"]["profile"] == "smoke" and timings["ablation"]["wall_s"] == round(times["ablation"], 2)
    probe = (tmp_path / "store").resolve() / f"probe-{artifacts.config_hash({'n': 1})}"
    assert timings["ablation"]["artifacts"] == [str(probe)] and (probe / "manifest.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_runner_failure_names_notebook_and_cell_and_leaves_no_executed_copy(tmp_path):
    nb_dir, out = tmp_path / "nb", tmp_path / "out"
    _notebook(nb_dir / "loss_landscape.ipynb", "a = 1", "raise RuntimeError('the landscape broke')", "b = 2")
    out.mkdir()
    stale = out / "loss_landscape.ipynb"
    stale.write_text("{}")  # an older executed copy must not survive a failed run
    with pytest.raises(book.NotebookError) as err:
        book.run_notebooks("smoke", notebooks_dir=nb_dir, out_dir=out, progress=False)
    msg = str(err.value)
    assert "'loss_landscape'" in msg and "the landscape broke" in msg and "RuntimeError" in msg
    assert "raise RuntimeError" in msg  # the failing cell's first line
    assert not stale.exists()
    assert (out / "loss_landscape.failed.ipynb").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"
    # The failed notebook's time is not recorded as if it had finished.
    assert not (out / "timings.json").exists()


def test_runner_reports_a_dead_kernel(tmp_path):
    nb_dir, out = tmp_path / "nb", tmp_path / "out"
    _notebook(nb_dir / "imagenet_models.ipynb", "import os\nos._exit(3)")
    with pytest.raises(book.NotebookError, match="'imagenet_models' could not be executed"):
        book.execute("imagenet_models", "smoke", notebooks_dir=nb_dir, out_dir=out, progress=False)
    assert not (out / "imagenet_models.ipynb").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_build_refuses_missing_or_other_profile_notebooks(tmp_path):
    dst = tmp_path / "book"
    dst.mkdir()
    (dst / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n- file: executed/baseline\n"
                                  "- file: executed/ablation\n")
    with pytest.raises(bookbuild.BuildError, match=r"baseline.ipynb is missing(.|\n)*ablation.ipynb is missing"):
        bookbuild.build(dst, profile="smoke")
    (dst / "executed").mkdir()
    for name, profile in (("baseline", "smoke"), ("ablation", "cpu")):
        nb = nbformat.v4.new_notebook()
        nb.metadata["papermill"] = {"parameters": {"profile": profile}}
        nbformat.write(nb, dst / "executed" / f"{name}.ipynb")
    with pytest.raises(bookbuild.BuildError, match=r"ablation.ipynb was executed at profile 'cpu', not 'smoke'"):
        bookbuild.build(dst, profile="smoke")
    with pytest.raises(bookbuild.BuildError, match=r"baseline.ipynb was executed at profile 'smoke', not 'cpu'"):
        bookbuild.check_executed(dst, "cpu")


def _glued_notebook(path: Path, key: str, value: str) -> None:
    out = nbformat.v4.new_output("display_data", data={"application/papermill.record/text/plain": value},
                                 metadata={"scrapbook": {"name": key, "mime_prefix": "application/papermill.record/"}})
    cell = nbformat.v4.new_code_cell("glue(...)", outputs=[out], execution_count=1)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# A chapter"), cell])
    nb.metadata["papermill"] = {"parameters": {"profile": "smoke"}}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def test_build_fails_on_unknown_glue_key_and_missing_figure(tmp_path):
    """Warnings are errors: a pasted key no notebook glued, or a missing image, stops the build."""
    dst = tmp_path / "book"
    dst.mkdir()
    (dst / "_config.yml").write_text("title: t\nauthor: a\nonly_build_toc_files: true\n"
                                     "execute:\n  execute_notebooks: 'off'\n")
    (dst / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n- file: executed/ablation\n")
    _glued_notebook(dst / "executed" / "ablation.ipynb", "ablation_gain", "1.5")
    good = "# Intro\n\nGain {glue:text}`executed/ablation.ipynb::ablation_gain:.2f`.\n"
    (dst / "intro.md").write_text(good)
    assert bookbuild.build(dst, profile="smoke", quiet=True).is_file()
    assert "Gain 1.50" in (dst / "_build" / "html" / "intro.html").read_text().replace("</span>", "") \
        .replace('<span class="pasted-text">', "")
    (dst / "intro.md").write_text(good.replace("ablation_gain", "ablation_gian") + "\n![a figure](missing.png)\n")
    with pytest.raises(bookbuild.BuildError) as err:
        bookbuild.build(dst, profile="smoke", quiet=True)
    assert "ablation_gian" in str(err.value) and "missing.png" in str(err.value)


def test_cli_reports_errors_without_traceback(capsys):
    from hawqlib.repro.cli import main

    with pytest.raises(SystemExit):
        main(["book", "--only", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the smoke build

class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.imgs, self.ids, self.id_list = [], [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
            self.id_list.append(a["id"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "img" and a.get("src"):
            self.imgs.append(a["src"])


def _parse(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(encoding="utf-8"))
    return p


@pytest.fixture(scope="module")
def built(tmp_path_factory, cifar_root):
    run = smoke_book(tmp_path_factory.mktemp("smoke_book"), cifar_root)
    missing = [n for n in book.NOTEBOOKS if n not in book.available(ROOT / "notebooks")]
    assert run.returncode == 0, ("the smoke book failed" + (f" (notebooks missing: {missing})" if missing else "")
                                 + f":\n{run.output[-6000:]}")
    return run


def test_every_toc_page_rendered(built):
    for doc in bookbuild.toc_documents(built.book_dir):
        page = built.html / f"{doc}.html"
        assert page.is_file(), f"{doc} (in _toc.yml) was not rendered"
        assert _parse(page).ids, f"{page} has no content"
    assert (built.html / "index.html").is_file()
    assert "book: " in built.output and "index.html" in built.output


def test_the_log_is_clean(built):
    """In a log (no terminal): one line per notebook, no progress-bar redraws or colour codes, no kernel warning."""
    out = built.output
    assert "\r" not in out and "\x1b[" not in out, "terminal control characters in the runner's log"
    assert "without encryption" not in out  # kernels are reached over IPC, not TCP
    assert "BuildBackendWarning" not in out and "license" not in out.lower()
    lines = [ln for ln in out.splitlines() if ln.startswith("notebook ")]
    assert len(lines) == len(book.NOTEBOOKS), lines
    for i, (ln, name) in enumerate(zip(lines, book.NOTEBOOKS), 1):
        assert ln.startswith(f"notebook {i}/{len(book.NOTEBOOKS)} {name} (smoke): "), ln


def test_images_exist_and_are_not_empty(built):
    n = 0
    for page in built.html.rglob("*.html"):
        for src in _parse(page).imgs:
            if src.startswith(("data:", "http:", "https:")):
                continue
            target = (page.parent / unquote(urlsplit(src).path)).resolve()
            assert target.is_file() and target.stat().st_size > 0, f"{page.name}: image {src} missing or empty"
            n += 1
    assert n > 0, "no image in the whole book"


def test_no_result_is_shown_twice(built):
    """A glued table or figure appears once, where the prose places it: a ``glue`` call without ``display=False``
    also shows it under its (folded) code cell, so the reader meets it twice."""
    twice = {}
    for page in sorted((built.html / "executed").glob("*.html")):
        p = _parse(page)
        tables = [i for i in p.id_list if re.fullmatch(r"T_[0-9a-f]+", i)]  # a pandas Styler table's own id
        dup = sorted({i for i in tables if tables.count(i) > 1} | {s for s in p.imgs if p.imgs.count(s) > 1})
        if dup:
            twice[page.name] = dup
    assert not twice, f"tables or figures shown twice on a page: {twice}"


def test_no_broken_internal_link(built):
    ids: dict[Path, set] = {}
    broken = []
    for page in sorted(built.html.rglob("*.html")):
        for href in _parse(page).hrefs:
            parts = urlsplit(href)
            if parts.scheme or href.startswith(("//", "mailto:", "javascript:")):
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page.resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(built.html)} -> {href}")
                continue
            if parts.fragment and target.suffix == ".html":
                if target not in ids:
                    ids[target] = _parse(target).ids
                if parts.fragment not in ids[target]:
                    broken.append(f"{page.relative_to(built.html)} -> {href} (no such anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(broken[:30])


def test_glued_tables_are_numbered_as_tables(built):
    """A table a notebook glues into a named figure (``tab-...``), or shows under its cell with a caption
    (``pages.table(..., caption=...)``), is captioned "Table N"; a figure "Fig. N". Every table the pages
    helper made is one of them."""
    seen = {"tab": 0, "fig": 0}
    for page in sorted((built.html / "executed").glob("*.html")):
        html = page.read_text(encoding="utf-8")
        spans = [m.span() for m in re.finditer(r'<figure[^>]*id="tab-[^"]*"[^>]*>.*?</figure>', html, re.S)]
        loose = [m.start() for m in re.finditer(r'<table[^>]*hawq-table', html)
                 if not any(a < m.start() < b for a, b in spans)]
        assert not loose, f"{page.name}: {len(loose)} table(s) without a table number (give pages.table a caption)"
        for m in re.finditer(r'<figure[^>]*id="(tab|fig)-([^"]+)"[^>]*>(.*?)</figure>', html, re.S):
            kind, body = m.group(1), m.group(3)
            number = re.search(r'<span class="caption-number">([^<]*)</span>', body)
            assert number, f"{page.name}: {kind}-{m.group(2)} has no caption number"
            expected = "Table" if kind == "tab" else "Fig."
            assert number.group(1).startswith(expected), (page.name, m.group(2), number.group(1))
            seen[kind] += 1
    assert seen["tab"] > 0 and seen["fig"] > 0, seen


def test_pasted_values_match_the_notebooks(built):
    nb = nbformat.read(built.executed / "baseline.ipynb", as_version=4)
    glued = {o["metadata"]["scrapbook"]["name"]: o["data"] for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []) if "scrapbook" in o.get("metadata", {})}
    top1 = float(glued["baseline_top1"]["application/papermill.record/text/plain"])
    intro = (built.html / "intro.html").read_text(encoding="utf-8")
    assert f"{top1:.2f}%" in intro.replace("</span>", "")
    # a profile's value reads as a value in the prose, not as code
    smoke = profiles.get("smoke")["description"]
    assert re.search(rf'<strong class="profile-value">{re.escape(smoke)}</strong>', intro)
    reproduce = (built.html / "reproduce.html").read_text(encoding="utf-8")
    timings = json.loads((built.executed / "timings.json").read_text())["notebooks"]
    assert set(timings) == set(book.NOTEBOOKS)
    for name, entry in timings.items():
        assert f"{entry['wall_s']:.1f}" in reproduce, f"{name}'s wall time is not on the Reproduce page"


_FOLDER = re.compile(r"\b(?:baseline_[a-z0-9_]+|spectrum|traces|landscape|finetune|calibrated|damage|quantize)"
                     r"-[0-9a-f]{12}\b")  # the kinds of artifact the notebooks store


def test_the_provenance_page_lists_every_artifact_the_chapters_read(built):
    """Issue 38: every artifact a notebook used, and every artifact folder a chapter names, is on the Provenance
    page with its manifest's wall time; with a fresh store (CI), so is every complete artifact in it."""
    html = (built.html / "provenance.html").read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", "", html)
    timings = json.loads((built.executed / "timings.json").read_text())["notebooks"]
    used = {Path(p) for e in timings.values() for p in e["artifacts"]}
    assert used, "the smoke book used no artifact at all"
    for folder in used:
        assert folder.name in text, f"{folder.name} (used) is not on the Provenance page"
        wall = provenance.entry(folder)["wall_s"]
        assert wall >= 0 and provenance.duration_text(wall) in text
    named = set()
    for path in built.executed.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        named |= {m for c in nb.cells for o in c.get("outputs", []) for m in _FOLDER.findall(json.dumps(o))}
    assert named <= {f.name for f in used}, f"folders a chapter names but no notebook used: {named - {f.name for f in used}}"
    if not os.environ.get("HAWQ_BOOK_TEST_ARTIFACTS"):  # a fresh store holds only what the book computed
        stored = {f.name for f in built.artifacts.iterdir() if (f / "manifest.json").is_file()}
        assert stored <= {f.name for f in used}, f"stored but not on the page: {stored - {f.name for f in used}}"


def test_executed_copies_are_from_the_smoke_profile(built):
    for path in bookbuild.check_executed(built.book_dir, "smoke"):
        nb = nbformat.read(path, as_version=4)
        assert not [c for c in nb.cells if c.cell_type == "code"
                    and any(o.get("output_type") == "error" for o in c.get("outputs", []))]


def test_exercises_render_with_their_solutions_folded_after_them(built):
    pages = [built.html / f"{d}.html" for d in bookbuild.toc_documents(built.book_dir) if d.startswith("method/")]
    pages += [built.html / "executed" / f"{n}.html" for n in EXERCISE_NOTEBOOKS]
    for page in pages:
        html = page.read_text(encoding="utf-8")
        boxes = re.findall(r'<div class="([^"]*\b(?:exercise|solution)\b[^"]*)"', html)
        kinds = "".join("S" if "solution" in c.split() else "E" for c in boxes)
        assert kinds.count("E") >= 3 and re.fullmatch(r"(ES+)+", kinds), f"{page.name}: exercises/solutions {kinds}"
        assert all("dropdown" in c.split() for c in boxes if "solution" in c.split()), f"{page.name}: an open solution"
        # a solution that computes shows what it printed when the book was built, never an error
        assert "Traceback" not in html and "output error" not in html, f"{page.name}: a solution's code failed"
    computed = [p for p in pages if p.parent.name == "method" and 'class="cell_output' in p.read_text(encoding="utf-8")]
    assert len(computed) >= 5, f"method pages whose solutions were executed at build time: {[p.name for p in computed]}"


def test_citations_link_to_the_references_page(built):
    refs = _parse(built.html / "references.html").ids
    assert len(_bib_entries()) <= sum(1 for i in refs if re.fullmatch(r"id\d+", i))  # every entry listed
    n = 0
    for page in sorted(built.html.rglob("*.html")):
        html = page.read_text(encoding="utf-8")
        for span in re.findall(r'<span class="bibtex-citation"[^>]*>(.*?)</span>', html, re.S):
            for href in re.findall(r'href="([^"]+)"', span):
                path, _, anchor = href.partition("#")
                target = (page.parent / path).resolve() if path else page.resolve()
                assert target == (built.html / "references.html").resolve(), (page.name, href)
                assert anchor in refs, f"{page.name}: citation {href} has no entry on the references page"
                n += 1
    assert n >= 20, f"only {n} citations in the whole book"
