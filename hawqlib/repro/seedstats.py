"""Results over fine-tuning seeds: mean and spread of a row, and the paired test of an ablation claim.

The paper reports one number per row (section 4). Rows here are fine-tuned with several seeds (the seed
changes data order and augmentation only), and an ablation claim compares two rows that share their seeds:
the paired difference per seed (same seed, HAWQ's choice minus the reversed choice) cancels what the seed
does to both. Our choice of verdict: a mean paired difference at least two standard errors from zero
"holds" (positive) or is "reversed" (negative); nearer zero it is "within noise"; one seed decides nothing.
A row's mean against a target of its own (:func:`against`) is decided the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["Summary", "Paired", "summarize", "paired", "against", "against_text", "VERDICTS", "TARGET_VERDICTS"]

#: The words a paired comparison can end in.
VERDICTS = ("holds", "reversed", "within noise", "undecided (one seed)", "not computed")
#: The words a mean against a target can end in (:func:`against`).
TARGET_VERDICTS = ("met", "missed", "within noise", "undecided (one seed)", "not computed")


@dataclass(frozen=True)
class Summary:
    """``n`` values, their ``mean`` and sample standard deviation ``std`` (NaN when ``n < 2``)."""

    n: int
    mean: float
    std: float

    def text(self, digits: int = 2) -> str:
        """``"91.93 ± 0.12 (3 seeds)"``; one seed has no spread, none reads ``"not computed"``."""
        if self.n == 0:
            return "not computed"
        if self.n == 1:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} ({self.n} seeds)"

    @property
    def se(self) -> float:
        """Standard error of the mean, ``std / sqrt(n)`` (NaN when ``n < 2``)."""
        return self.std / math.sqrt(self.n) if self.n > 1 else math.nan


@dataclass(frozen=True)
class Paired:
    """The paired difference over the ``seeds`` two rows share: ``mean``, its standard error ``se``, ``verdict``."""

    seeds: tuple
    mean: float
    se: float
    verdict: str

    @property
    def n(self) -> int:
        return len(self.seeds)


def _finite(values: Sequence[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    if any(not math.isfinite(v) for v in out):
        raise ValueError(f"{what} must be finite numbers, got {out}")
    return out


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample standard deviation (n - 1 in the denominator) of ``values``."""
    v = _finite(values, "values")
    n = len(v)
    if n == 0:
        return Summary(0, math.nan, math.nan)
    mean = math.fsum(v) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else math.nan
    return Summary(n, mean, std)


def paired(a: Mapping[int, float], b: Mapping[int, float], *, z: float = 2.0) -> Paired:
    """``a - b`` seed by seed over the seeds both hold, its mean, standard error and verdict.

    ``a`` and ``b`` map seed -> value (e.g. top-1 of HAWQ's choice and of the reversed choice). The verdict is
    ``"holds"`` when ``mean >= z * se`` and ``mean > 0``, ``"reversed"`` when ``mean <= -z * se`` and ``mean < 0``,
    ``"within noise"`` otherwise; ``"undecided (one seed)"`` with one shared seed, ``"not computed"`` with none.
    """
    if not (isinstance(z, (int, float)) and z > 0):
        raise ValueError(f"z must be a positive number, got {z!r}")
    seeds = tuple(sorted(set(a) & set(b)))
    d = _finite([a[s] - b[s] for s in seeds], "paired differences")
    if not d:
        return Paired(seeds, math.nan, math.nan, "not computed")
    s = summarize(d)
    if s.n == 1:
        return Paired(seeds, s.mean, math.nan, "undecided (one seed)")
    se = s.std / math.sqrt(s.n)
    verdict = ("holds" if s.mean > 0 and s.mean >= z * se else
               "reversed" if s.mean < 0 and s.mean <= -z * se else "within noise")
    return Paired(seeds, s.mean, se, verdict)


def against(s: Summary, target: float, *, z: float = 2.0) -> str:
    """Whether the mean of ``s`` reaches ``target`` (a row's own goal, e.g. a floor on its accuracy change).

    Our choice, as for :func:`paired`: ``"met"`` when the mean is at or above ``target`` and at least ``z``
    standard errors from it, ``"missed"`` when below by as much, ``"within noise"`` nearer; one value decides
    nothing (``"undecided (one seed)"``) and none reads ``"not computed"``. One of :data:`TARGET_VERDICTS`.
    """
    if not (isinstance(z, (int, float)) and math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a positive number, got {z!r}")
    if s.n == 0:
        return "not computed"
    if s.n == 1:
        return "undecided (one seed)"
    gap = s.mean - float(target)
    if abs(gap) < z * s.se:
        return "within noise"
    return "met" if gap >= 0 else "missed"


def against_text(s: Summary, target: float, *, stretch: float | None = None, z: float = 2.0) -> str:
    """:func:`against` in words for a page, the numbers computed: ``"met"`` (``"met, and the stretch too"``
    when the mean also reaches ``stretch``) or ``"missed by 0.43 points"``, then how firmly, e.g.
    ``" (2.8 standard errors of the mean, over 2 seeds)"``, ``" (one seed: undecided)"`` or ``" on the
    mean, within 2 standard errors (0.30 points) over 3 seeds: undecided"``; ``"not computed yet"``
    without a value.
    """
    verdict = against(s, target, z=z)
    if verdict == "not computed":
        return "not computed yet"
    gap = s.mean - float(target)
    word = ("met, and the stretch too" if gap >= 0 and stretch is not None and s.mean >= stretch else
            "met" if gap >= 0 else f"missed by {-gap:.2f} points")
    if verdict == "undecided (one seed)":
        return word + " (one seed: undecided)"
    if verdict == "within noise":
        return word + f" on the mean, within {z:g} standard errors ({z * s.se:.2f} points) over {s.n} seeds: undecided"
    if s.se == 0:
        return word + f" (no spread over {s.n} seeds)"
    return word + f" ({abs(gap) / s.se:.1f} standard errors of the mean, over {s.n} seeds)"
