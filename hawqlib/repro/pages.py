"""How an executed notebook reads as a page of the book: cell tags, and tables a reader can scan.

Cell tags, as myst-nb renders them:

- ``parameters`` (the profile papermill replaces) and papermill's ``injected-parameters``: the runner
  (:mod:`hawqlib.repro.book`) adds ``remove-cell`` to both in the executed copy (:func:`reader_copy`); they
  only carry the profile, which the page states in prose.
- ``hide-input``: the code is folded behind a toggle, its output shown. For cells that only
  ``glue`` values or lay out a figure.
- ``remove-input``: the output alone, for a cell whose code says nothing a reader needs.
- ``remove-stderr``: drop a cell's stderr (library warnings the page explains in prose, or not at all).
- ``remove-stdout``: drop a cell's printed lines (a setup cell's summary of what it loaded; the page says
  it in prose, its last cell names the profile, and the provenance page the artifacts).

Code that computes a result stays visible.

Tables: :func:`table` returns a pandas ``Styler`` with one number format per column and text columns
left-aligned; the book's stylesheet (``book/_static/hawq.css``) gives it the theme's table look,
keeps numbers on one line and lets headers wrap between words. Headers are typeset: a column named in the
paper's notation in code (``"lambda_i"``, ``"Omega_i"``, :data:`MATH_HEADERS`) is shown as the formula, and
any ``$...$`` in a header is typeset by MathJax, as inline math in the text is.

A page computed at the ``smoke`` profile opens its verdicts with :func:`smoke_note`, so that a test build is
never read as results.

Every page ends with :func:`live_note`: which of its stored results this execution computed and which it loaded
(and from which store), from the artifact ledger (:mod:`hawqlib.repro.artifacts.ledger`). At the published profile it
is one line; at the ``lab`` profile it names the steps recomputed live and those loaded from the published results.

Result pages list every fine-tuning seed of their runs the same way: :func:`seeds_table` (one line per seed,
stored or not) and :func:`missing_runs` (what is not stored yet, and the command that computes it).
"""
from __future__ import annotations

import html
from typing import Iterable, Mapping

__all__ = ["READER_TAGS", "reader_copy", "smoke_note", "live_note", "table", "seeds_table", "missing_runs",
           "run_minutes", "MATH_HEADERS", "header_html"]

#: Tag on a cell of the source notebook -> tag the runner adds in the executed copy.
READER_TAGS = {"parameters": "remove-cell", "injected-parameters": "remove-cell"}


def reader_copy(nb) -> int:
    """Add the :data:`READER_TAGS` to the cells of the executed notebook ``nb`` (in place); return how many changed."""
    n = 0
    for cell in nb.cells:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        add = [READER_TAGS[t] for t in tags if t in READER_TAGS and READER_TAGS[t] not in tags]
        if add:
            tags.extend(dict.fromkeys(add))
            n += 1
    return n


def smoke_note(profile: Mapping) -> str:
    """The italic sentence a verdict starts with at the ``smoke`` profile (``profile``: a profile's dict,
    :func:`hawqlib.repro.profiles.get`), saying its numbers are not results; ``""`` at any other profile."""
    if profile["name"] != "smoke":
        return ""
    return ("*Smoke profile: a schedule of minutes on a small subset of the data, run to check that the "
            "pipeline works; its numbers are not results.* ")


#: What an artifact kind holds, in a page's words (:func:`live_note`); a kind not listed reads as its name.
KIND_WORDS = {"baseline_resnet20": "the FP32 ResNet20 baseline", "baseline_vit_cifar": "the FP32 ViT baseline",
              "spectrum": "Hessian spectra", "traces": "Hessian traces", "landscape": "loss landscapes",
              "finetune": "fine-tuned runs", "quantize": "the front door's quantized ViT",
              "damage": "the measured quantization damage", "calibrated": "calibrated-only accuracies"}


def _kinds(entries) -> str:
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    return ", ".join(f"{KIND_WORDS.get(k, k)} ({n})" for k, n in counts.items())


def live_note(profile: Mapping) -> str:
    """Markdown saying which stored results of this page were computed when it was executed and which were
    loaded, from the artifact ledger of this process (:mod:`hawqlib.repro.artifacts.ledger`); call it last.

    At the published profile it is one italic line with the two counts. At any other profile it names the kinds
    computed live, those loaded from the published results (read-only, the profile's ``loads``) and those loaded
    from the profile's own store (computed by an earlier run of it), each with its count.
    """
    from .artifacts import ledger
    from .paths import PUBLISHED_PROFILE

    entries = ledger.entries()
    live = [e for e in entries if e.how == ledger.COMPUTED]
    published = [e for e in entries if e.how == ledger.PUBLISHED]
    own = [e for e in entries if e.how == ledger.LOADED]
    name = profile["name"]
    if name == PUBLISHED_PROFILE:
        return (f"*The `{name}` profile's stored results on this page: {len(own)} loaded, {len(live)} computed when "
                "the page was executed; allocations, orders, tables and figures are computed from them each time.*")
    parts = [f"**Computed live and loaded ({name} profile).** Computed when this page was executed: "
             + (_kinds(live) if live else "no stored result") + "."]
    if published:
        parts.append(f"Loaded read-only from the published results (the `{PUBLISHED_PROFILE}` profile's committed "
                     f"artifacts, steps too long to run live): {_kinds(published)}.")
    if own:
        parts.append(f"Loaded from this profile's own store, computed earlier at this profile (by an earlier page "
                     f"of this run, or an earlier run): {_kinds(own)}.")
    parts.append("Allocations, orders, tables and figures are computed from these each time the page runs.")
    return " ".join(parts)


#: Column names the notebooks use in code (plain text, easy to index) -> the header a reader sees, with
#: ``$...$`` typeset (the mapping's values are LaTeX source, not shown here).
#:
#: :meta hide-value:
MATH_HEADERS = {
    "n_i": "$n_i$",
    "lambda_i": r"$\lambda_i$",
    "S_i": "$S_i$",
    "Omega_i": r"$\Omega_i$",
    "Omega rank": r"$\Omega$ rank",
    "||Q(W)-W||^2": r"$\lVert Q(W_i) - W_i \rVert^2$",
    "||Q_2(W)-W||": r"$\lVert Q_2(W_i) - W_i \rVert$",
    "lambda_i / n_i": r"$\lambda_i / n_i$",
    "tr(H_i)": r"$\mathrm{tr}(H_i)$",
    "tr(H_i) / n_i": r"$\mathrm{tr}(H_i) / n_i$",
    "tr(F_i)": r"$\mathrm{tr}(F_i)$",
    "max relative std of lambda_i": r"max relative std of $\lambda_i$",
    "loss rise at +alpha_max (measured)": r"loss rise at $+\alpha_{\max}$ (measured)",
    "loss rise at +alpha_max (0.5 lambda alpha^2)":
        r"loss rise at $+\alpha_{\max}$ ($\frac{1}{2} \lambda_i \alpha_{\max}^2$)",
}


def header_html(label) -> str:
    """The HTML of a table header: :data:`MATH_HEADERS`' formula for a name in the paper's notation; every
    ``$...$`` part as inline math (the markup Sphinx gives ``$...$`` in text, which MathJax typesets); the rest
    escaped."""
    text = MATH_HEADERS.get(str(label), str(label))
    parts = text.split("$")
    if len(parts) % 2 == 0:
        raise ValueError(f"table header {text!r} has an unpaired '$'; write math as $...$")
    return "".join(html.escape(p) if k % 2 == 0 else
                   f'<span class="math notranslate nohighlight">\\({html.escape(p)}\\)</span>'
                   for k, p in enumerate(parts))


def table(df, formats: Mapping[str, str] | None = None, *, text: Iterable[str] = (), index: bool = True,
          caption: str | None = None, na_rep: str = "-"):
    """``df`` as a Styler for a page: ``formats`` maps a column to a format (``"{:.2f}"``, ``"{:+.2f}"``).

    Columns in ``text`` (and any column of strings) are left-aligned and may wrap; every other cell is
    a number on one line. ``index=False`` hides the index. Put units in the column names
    (``"top-1 (%)"``, ``"size (KiB)"``), not in the cells. Headers go through :func:`header_html`; a named
    (single-level) index is shown as the first column. ``caption``: one sentence saying what the table shows
    (``$...$`` for math); the book numbers a captioned table shown under its cell as a table ("Table 4.2").
    """
    if index and df.index.nlevels == 1 and df.index.name is not None:
        # a named index becomes the first column: its name heads it in the header row, not on a row of its own
        df, index = df.reset_index(), False
    formats = dict(formats or {})
    unknown = set(formats) - set(df.columns)
    if unknown:
        raise KeyError(f"formats for columns the table does not have: {sorted(map(str, unknown))}")
    from pandas.api.types import is_numeric_dtype

    text_cols = [c for c in df.columns if c in set(text) or not is_numeric_dtype(df[c]) and c not in formats]
    sty = df.style.format(formats, na_rep=na_rep) if formats else df.style.format(na_rep=na_rep)
    sty = sty.set_table_attributes('class="dataframe hawq-table"')
    sty = sty.format_index(header_html, axis="columns")
    if text_cols:
        sty = sty.set_properties(subset=text_cols, **{"text-align": "left", "white-space": "normal"})
        # and their headers with them
        sty = sty.set_table_styles({c: [{"selector": "th", "props": "text-align: left;"}] for c in text_cols},
                                   overwrite=False)
    if not index:
        sty = sty.hide(axis="index")
    if caption:
        sty = sty.set_caption(html.escape(caption))
    return sty


#: The columns of :func:`seeds_table`, after its two index levels.
SEED_COLUMNS = ("top-1 (%)", "from packed file (%)", "wall time (min)", "artifact")


def seeds_table(runs: Mapping, *, level: str = "run", caption: str | None = None):
    """One line per seed of ``runs`` (``{row label: {seed: result, or None when not stored}}``, results as
    :meth:`hawqlib.repro.study.Study.run_seeds` returns them): its accuracy, the accuracy of its packed file, the
    wall time its fine-tuning took (a stage it took from another run counts as that run spent it,
    :mod:`hawqlib.finetune`) and its artifact folder, which ties the run's name to the provenance page
    (:mod:`hawqlib.repro.provenance`: the machine, threads and code versions); a seed not stored reads
    ``"not stored yet"``. A :func:`table` indexed by (``level``, seed), with ``caption``.
    """
    import pandas as pd

    rows = []
    for label, by_seed in runs.items():
        for seed, r in by_seed.items():
            row = {level: label, "seed": seed}
            if r is None:
                row["artifact"] = "not stored yet"
            else:
                row.update({"top-1 (%)": r.top1, "from packed file (%)": r.packed_top1,
                            "wall time (min)": r.wall_s / 60, "artifact": r.folder.name})
            rows.append(row)
    frame = pd.DataFrame(rows, columns=[level, "seed", *SEED_COLUMNS]).set_index([level, "seed"])
    sty = table(frame, {"top-1 (%)": "{:.2f}", "from packed file (%)": "{:.2f}", "wall time (min)": "{:.1f}"},
                text=["artifact"], caption=caption)
    sty = sty.set_properties(subset=["artifact"], **{"white-space": "nowrap"})  # a folder name is one word
    # A run's label wraps beside its seeds, so that the folder names fit the text column.
    return sty.set_table_styles([{"selector": "tbody th.level0", "props": "white-space: normal; min-width: 8em;"}],
                                overwrite=False)


def run_minutes(result) -> float:
    """Minutes ``result`` (a :meth:`hawqlib.repro.study.Study.run_seeds` result) takes on this machine: its median epoch
    (training plus evaluation, from its history) times its number of epochs. Unlike the summed wall time of its
    manifest, a pause that stretched fewer than half of its epochs does not move it; without a per-epoch
    history it is the summed wall time.
    """
    import statistics

    epochs = (getattr(result, "history", None) or {}).get("epochs") or []
    if not epochs:
        return result.wall_s / 60
    return statistics.median(e.get("wall_s", 0.0) + e.get("eval_s", 0.0) for e in epochs) * len(epochs) / 60


def missing_runs(runs: Mapping, profile: str, *, what: str = "them") -> str:
    """Markdown naming the seeds of ``runs`` (as for :func:`seeds_table`, keyed by run name) not stored yet,
    with the ``python -m hawqlib finetune`` command that computes them (at the published profile when ``profile``
    loads its fine-tuned runs from there, as the ``lab`` profile does) and how long the stored runs take here
    (:func:`run_minutes`, measured from their histories); ``""`` when every seed is stored. ``what`` names the
    runs in the sentence (``"them"``, or e.g. ``"them (each longer than a row of the table)"``).
    """
    missing = [f"{name} (seed {seed})" for name, by_seed in runs.items() for seed, r in by_seed.items() if r is None]
    if not missing:
        return ""
    minutes = [run_minutes(r) for by_seed in runs.values() for r in by_seed.values() if r is not None]
    names = " ".join(dict.fromkeys(name for name, by_seed in runs.items() if None in by_seed.values()))
    from .artifacts.published import loaded_kinds
    from .paths import PUBLISHED_PROFILE

    if "finetune" in loaded_kinds(profile):  # a profile that loads its runs from the published ones (lab)
        profile = PUBLISHED_PROFILE
    took = (f"; at their median epoch times here, the stored runs take {min(minutes):.0f} to {max(minutes):.0f} "
            f"minutes each" if len(minutes) > 1 else
            f"; at its median epoch time here, the stored run takes {minutes[0]:.0f} minutes" if minutes else "")
    paused = (" (the wall times in the table also count any time a run was paused)" if minutes else "")
    return (f"**Not stored yet, so not in the tables:** {', '.join(missing)}. `python -m hawqlib finetune "
            f"--profile {profile} {names}` computes {what} and this page then loads them{took}{paused}.")
