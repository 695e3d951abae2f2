"""Progress bars for long work (training epochs, fine-tuning stages, Hessian blocks, notebooks).

One place decides which tqdm bar hawqlib shows: ``tqdm.auto``'s choice (a widget in a notebook with
ipywidgets, a text bar otherwise). In a Jupyter kernel without ipywidgets, ``tqdm.auto`` warns once on
import that it falls back to the text bar; that warning would appear in whichever notebook cell first
imports it, so an executed notebook's stderr would depend on what earlier cells computed or found
cached. We import it with that warning silenced, so every run prints the same thing.
"""
from __future__ import annotations

import warnings


def tqdm_class():
    """The tqdm bar class hawqlib uses (``tqdm.auto.tqdm``, imported without its notebook warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm
    return tqdm


def bar(*args, **kwargs):
    """A progress bar: ``tqdm.auto.tqdm(*args, **kwargs)``."""
    return tqdm_class()(*args, **kwargs)


def write(message: str) -> None:
    """Print ``message`` above any open progress bar (``tqdm.write``)."""
    tqdm_class().write(message)
