"""How an executed notebook reads as a page of the book: cell tags, and tables a reader can scan.

Cell tags, as myst-nb renders them:

- ``parameters`` (the profile papermill replaces) and papermill's ``injected-parameters``: the runner
  (:mod:`hawqlib.book`) adds ``remove-cell`` to both in the executed copy (:func:`reader_copy`); they
  only carry the profile, which the page states in prose.
- ``hide-input``: the code is folded behind a toggle, its output shown. For cells that only
  ``glue`` values or lay out a figure.
- ``remove-input``: the output alone, for a cell whose code says nothing a reader needs.
- ``remove-stderr``: drop a cell's stderr (library warnings the page explains in prose, or not at all).

Code that computes a result stays visible.

Tables: :func:`table` returns a pandas ``Styler`` with one number format per column and text columns
left-aligned; the book's stylesheet (``book/_static/hawq.css``) gives it the theme's table look,
keeps numbers on one line and lets headers wrap between words.
"""
from __future__ import annotations

from typing import Iterable, Mapping

__all__ = ["READER_TAGS", "reader_copy", "table"]

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


def table(df, formats: Mapping[str, str] | None = None, *, text: Iterable[str] = (), index: bool = True,
          caption: str | None = None, na_rep: str = "-"):
    """``df`` as a Styler for a page: ``formats`` maps a column to a format (``"{:.2f}"``, ``"{:+.2f}"``).

    Columns in ``text`` (and any column of strings) are left-aligned and may wrap; every other cell is
    a number on one line. ``index=False`` hides the index. Put units in the column names
    (``"top-1 (%)"``, ``"size (KiB)"``), not in the cells.
    """
    formats = dict(formats or {})
    unknown = set(formats) - set(df.columns)
    if unknown:
        raise KeyError(f"formats for columns the table does not have: {sorted(map(str, unknown))}")
    from pandas.api.types import is_numeric_dtype

    text_cols = [c for c in df.columns if c in set(text) or not is_numeric_dtype(df[c]) and c not in formats]
    sty = df.style.format(formats, na_rep=na_rep) if formats else df.style.format(na_rep=na_rep)
    sty = sty.set_table_attributes('class="dataframe hawq-table"')
    if text_cols:
        sty = sty.set_properties(subset=text_cols, **{"text-align": "left", "white-space": "normal"})
    if not index:
        sty = sty.hide(axis="index")
    if caption:
        sty = sty.set_caption(caption)
    return sty
