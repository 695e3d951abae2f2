"""Sphinx extension for the HAWQ companion book: values pulled from the code, never typed into prose.

- role ``{profile}`` ```cpu:baseline.epochs``` pastes one profile parameter (:mod:`hawqlib.repro.profiles`);
  an unknown profile or key is a build error.
- role ``{book-profile}`` pastes the profile the executed notebooks ran at (from
  ``executed/timings.json``); notebooks from mixed profiles are a build error.
- directive ``{profile-table}`` ``section`` tabulates one profile section for every profile.
- directive ``{timings-table}`` tabulates ``executed/timings.json`` (notebook wall times written by
  :mod:`hawqlib.repro.book`) and the machine they ran on; a missing file is a build error.
- directive ``{provenance-table}`` ``notebook`` tabulates the stored results (artifacts) that notebook read or
  computed, from their verified manifests (:mod:`hawqlib.repro.provenance`, fed by ``executed/timings.json``);
  ``{provenance-summary}`` counts them and lists the machines they ran on. An artifact that no longer
  verifies is a build error.
- docstrings' norm bars (``|w|``) stay text on the API pages (:class:`NormBars`).
- MathJax is served from the build itself (``_static/mathjax``, copied from the
  ``sphinx-mathjax-offline`` package), so formulas are typeset without network access.
- a glued table (a ``glue:figure`` whose name starts with ``tab-``) is numbered with the tables, "Table 5.1",
  not with the figures (:class:`GluedTablesAreTables`).
- directive ``{our-choices}`` collects every "our choice" statement of the package: docstring
  paragraphs and ``# Our choice`` comment blocks, grouped by module, so the "Our choices" page
  stays complete as the code changes.
"""
from __future__ import annotations

import html
import importlib
import inspect
import io
import json
import pkgutil
import re
import textwrap
import tokenize
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Parser as RSTParser
from docutils.parsers.rst import directives
from docutils.transforms import Transform
from docutils.utils import new_document
from sphinx.errors import ExtensionError
from sphinx.transforms import SphinxTransform
from sphinx.util.docutils import SphinxDirective, SphinxRole

CHOICE = re.compile(r"our choice(?!s)|choice \(ours|\(ours[,:)]", re.IGNORECASE)


def _fmt(value) -> str:
    if value is None:
        return "all"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def _lookup(spec: str):
    from hawqlib.repro import profiles

    if ":" not in spec:
        raise ValueError(f"expected 'profile:section.key', got {spec!r}")
    name, path = spec.split(":", 1)
    value = profiles.get(name)
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            have = ", ".join(value) if isinstance(value, dict) else type(value).__name__
            raise KeyError(f"profile {name!r} has no {path!r} (no {part!r}; there: {have})")
        value = value[part]
    return value


class ProfileRole(SphinxRole):
    """``{profile}`cpu:baseline.lr``` -> the value, formatted for prose (bold text, like a glued number)."""

    def run(self):
        try:
            text = _fmt(_lookup(self.text.strip()))
        except (ValueError, KeyError) as exc:
            msg = self.inliner.reporter.error(f"profile role: {exc}", line=self.lineno)
            return [nodes.problematic(self.rawtext, self.rawtext)], [msg]
        return [nodes.strong(text, text, classes=["profile-value"])], []


class BookProfileRole(SphinxRole):
    """``{book-profile}`executed/timings.json``` -> the profile every executed notebook ran at.

    An empty target reads ``executed/timings.json``; notebooks from different profiles are an error.
    """

    def run(self):
        rel = self.text.strip() or "executed/timings.json"
        path = Path(self.env.srcdir) / rel
        self.env.note_dependency(str(path))
        try:
            entries = json.loads(path.read_text())["notebooks"]
            found = sorted({e["profile"] for e in entries.values()})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            msg = self.inliner.reporter.error(f"book-profile role: cannot read {path} ({exc})", line=self.lineno)
            return [nodes.problematic(self.rawtext, self.rawtext)], [msg]
        if len(found) != 1:
            msg = self.inliner.reporter.error(f"book-profile role: executed notebooks come from profiles {found}",
                                              line=self.lineno)
            return [nodes.problematic(self.rawtext, self.rawtext)], [msg]
        return [nodes.literal(found[0], found[0])], []  # a profile's name, as the prose writes names


def _table(header: list[str], rows: list[list[str]], widths=None) -> nodes.table:
    table = nodes.table(classes=["colwidths-auto"])
    group = nodes.tgroup(cols=len(header))
    table += group
    for _ in header:
        group += nodes.colspec(colwidth=1)
    thead, tbody = nodes.thead(), nodes.tbody()
    group += thead
    group += tbody
    for cells, parent in [(header, thead)] + [(r, tbody) for r in rows]:
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += nodes.paragraph(text=str(cell))
            row += entry
        parent += row
    return table


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, (dict, int, float, str, bool, list, type(None)))
                                             for x in v.values()) and not all(
                isinstance(x, (int, float)) for x in v.values()):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class ProfileTable(SphinxDirective):
    """A table of one profile section (argument) with a column per profile."""

    required_arguments = 1
    has_content = False

    def run(self):
        from hawqlib.repro import profiles

        section = self.arguments[0]
        flat = {}
        for name in profiles.PROFILES:
            p = profiles.get(name)
            if section not in p or not isinstance(p[section], dict):
                return [self.state.document.reporter.error(
                    f"profile-table: profile {name!r} has no section {section!r}", line=self.lineno)]
            flat[name] = _flatten(p[section])
        keys = list(dict.fromkeys(k for f in flat.values() for k in f))
        rows = [[k] + [_fmt(flat[n][k]) if k in flat[n] else "-" for n in profiles.PROFILES] for k in keys]
        box = nodes.container(classes=["profile-table"])  # fixed layout: long values wrap in the column (hawq.css)
        box += _table(["parameter"] + list(profiles.PROFILES), rows)
        return [box]


class TimingsTable(SphinxDirective):
    """The per-notebook wall times the runner measured (``executed/timings.json``) and the machine."""

    has_content = False
    option_spec = {"path": directives.unchanged}

    def run(self):
        rel = self.options.get("path", "executed/timings.json")
        path = Path(self.env.srcdir) / rel
        self.env.note_dependency(str(path))
        try:
            data = json.loads(path.read_text())
            entries = data["notebooks"]
        except (OSError, ValueError, KeyError) as exc:
            return [self.state.document.reporter.error(
                f"timings-table: cannot read {path} ({exc}); run `python -m hawqlib book` first",
                line=self.lineno)]
        from hawqlib.repro.book import NOTEBOOKS

        order = [n for n in NOTEBOOKS if n in entries] + sorted(set(entries) - set(NOTEBOOKS))
        rows, total, machines = [], 0.0, {}
        for name in order:
            e = entries[name]
            total += float(e["wall_s"])
            m = e.get("machine", {})
            mkey = json.dumps(m, sort_keys=True)
            machines.setdefault(mkey, m)
            rows.append([name, e.get("profile", "?"), f"{float(e['wall_s']):.1f}",
                         "recomputed" if e.get("force") else "artifacts reused when stored",
                         e.get("finished", "")])
        rows.append(["total", "", f"{total:.1f}", "", ""])
        out = [_table(["notebook", "profile", "wall time (s)", "artifacts", "finished (UTC)"], rows)]
        for m in machines.values():
            desc = (f"Machine: {m.get('processor', '?')}, {m.get('cpus', '?')} CPU cores"
                    + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
                    + f"; {m.get('platform', '?')}; Python {m.get('python', '?')}, torch {m.get('torch', '?')} "
                      f"({m.get('torch_threads', '?')} threads).")
            out.append(nodes.paragraph(text=desc))
        return out


_PROVENANCE: dict = {}


def _provenance(env, rel: str = "executed/timings.json"):
    """Per notebook, the artifacts it used (:func:`hawqlib.repro.provenance.chapters`), and the machine labels.

    Read once per version of ``timings.json`` in a build: every directive of the page shares the verification."""
    from hawqlib.repro import provenance

    path = Path(env.srcdir) / rel
    env.note_dependency(str(path))
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _PROVENANCE:
        entries = json.loads(path.read_text())["notebooks"]
        chapters = provenance.chapters(entries)
        machines: dict[str, str] = {}
        for ch in chapters.values():
            for e in ch["new"]:
                machines.setdefault(e["machine"], f"M{len(machines) + 1}")
        _PROVENANCE.clear()
        _PROVENANCE[key] = chapters, machines
    return _PROVENANCE[key]


class ProvenanceSummary(SphinxDirective):
    """How many stored results the book read, their total wall time, where they are, and the machines (M1, ...)."""

    has_content = False

    def run(self):
        from hawqlib.repro import provenance

        try:
            chapters, machines = _provenance(self.env)
        except Exception as exc:  # unreadable timings, an artifact that no longer verifies
            return [self.state.document.reporter.error(f"provenance-summary: {exc}", line=self.lineno)]
        rows = [e for ch in chapters.values() for e in ch["new"]]
        stores = sorted({e["where"] for e in rows})
        missing = [n for n, ch in chapters.items() if not ch["recorded"]]
        text = (f"{len(rows)} stored results, {provenance.duration_text(sum(e['wall_s'] for e in rows))} of wall "
                f"time in all, stored under {', '.join(stores) or '(none)'}.")
        out = [nodes.paragraph(text=text)]
        if missing:
            cmd = "python -m hawqlib book --only " + " ".join(missing)
            out.append(nodes.paragraph("", "Not recorded for " + ", ".join(missing) + ": executed before the runner "
                                       "kept the artifacts a notebook uses; ", nodes.literal(cmd, cmd),
                                       nodes.Text(" records them.")))
        out.append(_table(["machine", "processor, cores, accelerator; system; software"],
                          [[label, desc] for desc, label in machines.items()]))
        return out


class ProvenanceTable(SphinxDirective):
    """The stored results one notebook (argument) read or computed, one line each, from their manifests."""

    required_arguments = 1
    has_content = False

    def run(self):
        from hawqlib.repro import provenance

        name = self.arguments[0]
        try:
            chapters, machines = _provenance(self.env)
        except Exception as exc:
            return [self.state.document.reporter.error(f"provenance-table: {exc}", line=self.lineno)]
        if name not in chapters:
            return [self.state.document.reporter.error(
                f"provenance-table: executed/timings.json has no notebook {name!r} (it has: "
                f"{', '.join(chapters) or 'none'}); run python -m hawqlib book --only {name}", line=self.lineno)]
        ch = chapters[name]
        if not ch["recorded"]:
            cmd = f"python -m hawqlib book --only {name}"
            return [nodes.paragraph("", f"Not recorded: {name} was executed before the runner kept the artifacts a "
                                    "notebook uses (", nodes.literal(cmd, cmd), nodes.Text(" records them)."))]
        out = []
        if ch["new"]:
            rows = [[e["folder"], e["what"], e["base"] or "-", provenance.duration_text(e["wall_s"]),
                     "?" if e["threads"] is None else str(e["threads"]), machines[e["machine"]],
                     e["finished"].replace("T", " ").rstrip("Z"), e["code"]] for e in ch["new"]]
            box = nodes.container(classes=["provenance-table"])
            box += _table(["artifact", "what (from its parameters)", "computed from", "wall time", "threads",
                           "machine", "finished (UTC)", "code versions"], rows)
            out.append(box)
        if ch["earlier"]:
            out.append(nodes.paragraph(text="Also reads, listed above: " + ", ".join(ch["earlier"]) + "."))
        if not out:
            out.append(nodes.paragraph(text="This chapter reads no stored result."))
        return out


def _paragraphs(doc: str) -> list[str]:
    doc = inspect.cleandoc(doc)
    return [p.rstrip() for p in re.split(r"\n\s*\n", doc) if p.strip()]


def _comment_blocks(source: str) -> list[tuple[int, str, str]]:
    """(line, comment text, the next code line) for each block of consecutive ``#`` comments."""
    blocks, cur, start, last = [], [], 0, -2
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            if line != last + 1 and cur:
                blocks.append((start, cur))
                cur = []
            if not cur:
                start = line
            cur.append(tok.string.lstrip("#").lstrip(":").strip())
            last = line
    if cur:
        blocks.append((start, cur))
    out = []
    for start, texts in blocks:
        end = start + len(texts)
        nxt = next((ln.strip() for ln in lines[end - 1:] if ln.strip() and not ln.strip().startswith("#")), "")
        out.append((start, " ".join(texts), nxt))
    return out


def collect_choices(package: str = "hawqlib") -> dict[str, list[dict]]:
    """``{module: [{"where", "text", "kind", "code"}]}`` for every "our choice" statement in ``package``."""
    pkg = importlib.import_module(package)
    names = [package] + sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, package + "."))
    found: dict[str, list[dict]] = {}
    for modname in names:
        if modname.endswith("__main__"):
            continue
        mod = importlib.import_module(modname)
        items, seen = [], set()

        def add(where, doc):
            paras = _paragraphs(doc or "")
            spans: dict[int, int] = {}
            for i, para in enumerate(paras):
                if not CHOICE.search(para):
                    continue
                # A paragraph that continues a sentence (after a formula, inside a list) brings its
                # context: back to the paragraph that starts it; hits sharing that start merge.
                j = i
                while j > 0 and (paras[j][:1].islower() or paras[j][:1].isspace()):
                    j -= 1
                spans[j] = i
            for j, i in spans.items():
                text = textwrap.dedent("\n\n".join(paras[j:i + 1]))
                if text not in seen:
                    seen.add(text)
                    items.append({"where": where, "text": text, "kind": "doc"})

        add(modname, mod.__doc__)
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != modname:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                add(f"{modname}.{name}", obj.__doc__)
                if inspect.isclass(obj):
                    for mname, meth in vars(obj).items():
                        if not mname.startswith("_") and (inspect.isfunction(meth) or isinstance(meth, property)):
                            add(f"{modname}.{name}.{mname}", meth.__doc__)
        try:
            source = inspect.getsource(mod)
        except (OSError, TypeError):
            source = ""
        for line, text, code in _comment_blocks(source):
            if CHOICE.search(text):
                items.append({"where": f"{modname}, line {line}", "text": text, "kind": "comment", "code": code})
        if items:
            found[modname] = items
    return found


def _rst_nodes(text: str, settings) -> list[nodes.Node]:
    doc = new_document("<docstring>", settings)
    RSTParser().parse(text, doc)
    # Docstrings write norms as |w| and ||x||: plain text there, as in autodoc's rendering, not
    # reStructuredText substitutions.
    for ref in list(doc.findall(nodes.substitution_reference)):
        ref.replace_self(nodes.Text(ref.rawsource or f"|{ref.astext()}|"))
    return [n for n in doc.children if not isinstance(n, nodes.system_message)]


class OurChoices(SphinxDirective):
    """Every "our choice" statement of the package, grouped by module, as admonitions."""

    has_content = False
    option_spec = {"package": directives.unchanged}

    def run(self):
        found = collect_choices(self.options.get("package", "hawqlib"))
        out = []
        for modname, items in found.items():
            section = nodes.rubric(text=modname)
            out.append(section)
            for item in items:
                adm = nodes.admonition(classes=["tip", "our-choice"])
                adm += nodes.title(text=f"Our choice: {item['where']}")
                if item["kind"] == "doc":
                    adm += _rst_nodes(item["text"], self.state.document.settings)
                else:
                    adm += _rst_nodes(item["text"], self.state.document.settings)
                    if item.get("code"):
                        adm += nodes.literal_block(item["code"], item["code"], language="python")
                out.append(adm)
        if not out:
            out.append(self.state.document.reporter.error("our-choices: no 'our choice' statement found",
                                                          line=self.lineno))
        return out


class NormBars(Transform):
    """Docstrings write norms as ``|w|`` and ``|lambda|``: on an API page, an undefined reST substitution
    reference is that text, as in the docstring, not an error. Runs just before docutils resolves
    substitutions (priority 220), after Sphinx fills in its own (``|version|``, 210)."""

    default_priority = 215

    def apply(self):
        doc = self.document
        for ref in list(doc.findall(nodes.substitution_reference)):
            name = ref["refname"]
            if name in doc.substitution_defs or nodes.fully_normalize_name(name) in doc.substitution_names:
                continue
            ref.replace_self(nodes.Text(ref.rawsource or f"|{ref.astext()}|"))


#: The MathJax files the book needs: the TeX-to-HTML component, its fonts and the TeX extensions it autoloads.
MATHJAX_FILES = ("tex-chtml.js", "output/chtml/fonts", "input/tex/extensions")


def mathjax_source() -> Path:
    """The MathJax 3 distribution shipped by the ``sphinx-mathjax-offline`` package (a book dependency)."""
    import importlib.util

    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or not spec.submodule_search_locations:
        raise ExtensionError("MathJax for offline reading is missing: pip install sphinx-mathjax-offline "
                             "(it is in hawqlib's 'book' extra)")
    return Path(list(spec.submodule_search_locations)[0]) / "static" / "mathjax"


def _check_mathjax(app):
    if not str(app.config.mathjax_path).startswith("mathjax/"):
        raise ExtensionError(f"mathjax_path is {app.config.mathjax_path!r}: the book serves MathJax itself, "
                             "set it to 'mathjax/tex-chtml.js' in _config.yml")
    mathjax_source()


def _copy_mathjax(app, exc):
    if exc is not None or app.builder.format != "html":
        return
    import shutil

    src, dst = mathjax_source(), Path(app.outdir) / "_static" / "mathjax"
    for rel in MATHJAX_FILES:
        if (src / rel).is_dir():
            shutil.copytree(src / rel, dst / rel, dirs_exist_ok=True)
        else:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)


def _drop_thebe(app, pagename, templatename, context, doctree):
    """The book runs nothing live (``launch_buttons.thebe: false``), yet sphinx-thebe declares its script
    twice on every page, a JavaScript error; its scripts are dropped from the pages."""
    scripts = context.get("script_files")
    if scripts:
        context["script_files"] = [js for js in scripts if "thebe" not in str(getattr(js, "filename", js) or "")
                                   and "THEBE_JS_URL" not in str(getattr(js, "attributes", {}).get("body", ""))]


class glued_table(nodes.figure):
    """A table glued from a notebook: myst-nb's ``glue:figure`` wraps it in a figure, numbered as a table."""


def _visit_glued_table(self, node):
    node["classes"].append("glued-table")
    self.visit_figure(node)


def _depart_glued_table(self, node):
    self.depart_figure(node)


class GluedTablesAreTables(SphinxTransform):
    """Turn every figure named ``tab-...`` (the notebooks name their glued tables so) into a
    :class:`glued_table`, which Sphinx numbers with the tables. Runs before the labels are collected, and
    points the document's ids at the new node so that references resolve to it."""

    default_priority = 400

    def apply(self, **kwargs):
        for fig in list(self.document.findall(nodes.figure)):
            if type(fig) is not nodes.figure or not any(i.startswith("tab-") for i in fig["ids"]):
                continue
            table = glued_table(fig.rawsource, *fig.children, **fig.attributes)
            fig.replace_self(table)
            for i in table["ids"]:
                self.document.ids[i] = table


_CAPTION = re.compile(r"<caption[^>]*>(.*?)</caption>", re.S)


def _caption_children(text: str) -> list[nodes.Node]:
    """Caption text as nodes, its ``$...$`` parts as inline math (typeset like the text's)."""
    return [nodes.Text(p) if k % 2 == 0 else nodes.math(p, p) for k, p in enumerate(text.split("$")) if p]


class CaptionedTablesAreTables(SphinxTransform):
    """Number the captioned tables a notebook shows under its cells (:func:`hawqlib.repro.pages.table` with
    ``caption=``) as tables: the HTML caption becomes the caption of a :class:`glued_table` ("Table N.M ..."),
    whose id is ``tab-<page>-<n>``. Tables already in a figure (``glue:figure``) are left to
    :class:`GluedTablesAreTables`."""

    default_priority = 400

    def apply(self, **kwargs):
        page = re.sub(r"[^a-z0-9]+", "-", self.env.docname.lower()).strip("-")
        n = 0
        for raw in list(self.document.findall(nodes.raw)):
            text = raw.astext()
            if raw.get("format") != "html" or "hawq-table" not in text:
                continue
            m = _CAPTION.search(text)
            parent, in_figure = raw.parent, False
            while parent is not None:
                in_figure = in_figure or isinstance(parent, nodes.figure)
                parent = parent.parent
            if m is None or in_figure:
                continue
            n += 1
            caption = html.unescape(re.sub(r"<[^>]+>", "", m.group(1))).strip()
            table = glued_table("", nodes.raw("", text.replace(m.group(0), "", 1), format="html"),
                                nodes.caption(caption, "", *_caption_children(caption)), ids=[f"tab-{page}-{n}"])
            raw.replace_self(table)
            self.document.ids[table["ids"][0]] = table


def setup(app):
    """Register the roles and directives, and serve MathJax from the build."""
    app.connect("builder-inited", _check_mathjax)
    app.connect("build-finished", _copy_mathjax)
    app.add_transform(NormBars)
    app.add_enumerable_node(glued_table, "table", html=(_visit_glued_table, _depart_glued_table))
    app.add_transform(GluedTablesAreTables)
    app.add_transform(CaptionedTablesAreTables)
    app.connect("html-page-context", _drop_thebe)
    app.add_role("profile", ProfileRole())
    app.add_role("book-profile", BookProfileRole())
    app.add_directive("profile-table", ProfileTable)
    app.add_directive("timings-table", TimingsTable)
    app.add_directive("our-choices", OurChoices)
    app.add_directive("provenance-summary", ProvenanceSummary)
    app.add_directive("provenance-table", ProvenanceTable)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
