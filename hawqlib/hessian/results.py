"""Result types of :mod:`hawqlib.hessian` (paper section 3.1: one top eigenvalue, or trace, per block)
and their JSON storage. The stored format is unchanged since ``hawqlib.spectra/1``."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..files import atomic_write_json

_SPECTRA_FORMAT = "hawqlib.spectra/1"


class HessianError(ValueError):
    """A Hessian computation that cannot give a trustworthy result: bad input, non-finite values, an
    operator that is not a fixed function of the weights, or a route whose proof failed."""


@dataclass
class BlockSpectrum:
    """The top Hessian eigenvalue of one block, with the evidence of its convergence.

    ``residual`` is the *verified* residual ||H v - lambda v|| / |lambda|: after the solver stops,
    one fresh exact product H v with the returned vector on the whole data (float64 on the
    Gauss-Newton route proved exact; an autograd product on the autograd route, or on request), so it
    includes the rounding of that product. ``converged`` means
    ``residual <= tol``. ``history`` holds the solver's own Ritz residual of every iteration
    (Lanczos: from its recurrence; power: explicit) on the route it used (``method``).
    ``vector`` (on request) is the unit eigenvector, one tensor per block parameter.
    """

    name: str
    numel: int
    eigenvalue: float
    iterations: int
    converged: bool
    residual: float
    method: str
    solver: str
    tol: float
    history: list[float] = field(default_factory=list)
    vector: list[torch.Tensor] | None = field(default=None, repr=False)
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready dict of every field except ``vector`` (tensors are not stored in JSON)."""
        d = {k: v for k, v in asdict(self).items() if k != "vector"}
        d["kind"] = "spectrum"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BlockSpectrum":
        """Inverse of :meth:`to_dict` (``vector`` comes back as None)."""
        return cls(**{k: v for k, v in d.items() if k != "kind"})


@dataclass
class BlockTrace:
    """The trace of one block's Hessian: exact (``stderr == 0``) or Hutchinson with its standard error."""

    name: str
    numel: int
    trace: float
    stderr: float
    method: str
    samples: int  #: probe vectors used (Hutchinson), basis vectors (exact autograd), or 0 (Gauss-Newton)
    exact: bool
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready dict of every field."""
        d = asdict(self)
        d["kind"] = "trace"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BlockTrace":
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: v for k, v in d.items() if k != "kind"})


def save_spectra(path, results: Sequence[BlockSpectrum | BlockTrace], meta: dict | None = None):
    """Write results (spectra and/or traces) to ``path`` as JSON, atomically; ``meta`` is stored beside them."""
    items = []
    for r in results:
        if not isinstance(r, (BlockSpectrum, BlockTrace)):
            raise TypeError(f"save_spectra takes BlockSpectrum/BlockTrace results, got {type(r).__name__}")
        items.append(r.to_dict())
    return atomic_write_json(path, {"format": _SPECTRA_FORMAT, "meta": meta or {}, "results": items})


def load_spectra(path) -> list[BlockSpectrum | BlockTrace]:
    """Read results written by :func:`save_spectra` (vectors are not stored, so ``.vector`` is None)."""
    obj = json.loads(Path(path).read_text())
    if not isinstance(obj, dict) or obj.get("format") != _SPECTRA_FORMAT:
        raise ValueError(f"{path} is not a {_SPECTRA_FORMAT} file")
    kinds = {"spectrum": BlockSpectrum, "trace": BlockTrace}
    return [kinds[d["kind"]].from_dict(d) for d in obj["results"]]
