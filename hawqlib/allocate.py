r"""Bit allocation: HAWQ section 3.1's rule (more bits for more sensitive blocks), solved exactly.

The paper sorts the blocks by their sensitivity :math:`S_i = \lambda_i / n_i` (section 3.1) and gives more
sensitive blocks more bits; the quantities and their notation are in :mod:`hawqlib.sensitivity`, the
fine-tuning order of section 3.2 in :mod:`hawqlib.order`.

Allocation (beyond the paper; the paper picks the exact bit numbers by hand within the :math:`S` order).
Our choice: among all assignments of bits :math:`b_i` from ``choices`` that are *monotone* in the :math:`S` order
(a more sensitive block never gets fewer bits than a less sensitive one) and whose model size
(by :func:`hawqlib.size.model_size_bytes`) fits the budget, :func:`allocate_bits` returns the one
that minimizes the total predicted perturbation (section 3.2's :math:`\Omega_i`)

.. math::

   \sum_i \Omega_i(b_i) , \qquad \Omega_i(b) = \lambda_i \, \lVert Q_b(W_i) - W_i \rVert_2^2 .

This is solved exactly by dynamic programming over the blocks in :math:`S` order, with the bit level of the last
block as state and, in each state, the Pareto frontier of (size, perturbation) pairs of all monotone prefixes ending at
that level (a dominated prefix can be swapped for the one dominating it in any completion, so
pruning it loses nothing). Sizes are counted in whole bits (integers), so the budget test is exact.
The budget measures the weights' bits alone (``measure="weights"``, the default, the paper's "weight size
reduction") or the whole model as :mod:`hawqlib.size` counts it (``measure="model"``).
Pruning keeps the frontiers small, so the exact search is quick for the models of the paper.

Policies (``policy=``):

- ``"hawq"``: the S order, most sensitive first (ties broken by module order: our choice);
- ``"reverse"``: the exact reverse of that order (the paper's ablation);
- ``"random"``: a seeded random permutation of the blocks takes the place of the S order
  (``random.Random(seed)``), with the same optimizer;
- ``"uniform"``: one bit width for every block, the largest in ``choices`` that fits the budget.

The quantizer behind ``Q_b`` is :func:`hawqlib.quant.grids.quantize_tensor` with the same settings that
:func:`hawqlib.quant.swap.quantize_model` uses, so the predicted perturbation is of the weights the
fine-tuned model starts from.
"""
from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .bitconfig import BitConfig, check_bits
from .blocks import quant_blocks
from .sensitivity import block_errors, lambda_of, match_blocks
from .size import fp32_size_bytes, model_size_bytes, size_table

__all__ = ["POLICIES", "MEASURES", "DEFAULT_CHOICES", "MB", "allocate_bits", "check_budget", "pareto_front",
           "ParetoPoint", "block_order"]

POLICIES = ("hawq", "reverse", "random", "uniform")
#: What a budget measures: the whole model (hawqlib.size.model_size_bytes, compression_ratio) or the
#: quantized weights' bits alone (hawqlib.size.weight_compression, the paper's "weight size reduction").
MEASURES = ("model", "weights")
DEFAULT_CHOICES = (2, 3, 4, 8)
#: Bytes in one megabyte for ``target_size_mb`` and the tables. Our choice: 2**20 (MiB), the unit
#: in which the paper's model sizes (e.g. ResNet20 FP32 = 1.05 MB = 0.27 M weights x 4 bytes) agree.
MB = 2 ** 20


# --------------------------------------------------------------------------- inputs

def _check_choices(choices) -> tuple[int, ...]:
    if isinstance(choices, int) and not isinstance(choices, bool):
        choices = (choices,)
    try:
        vals = list(choices)
    except TypeError:
        raise TypeError(f"choices must be a sequence of integer bit widths in 1..8, got {choices!r}") from None
    if not vals:
        raise ValueError("choices is empty; give bit widths among 1..8, e.g. (2, 3, 4, 8)")
    return tuple(sorted({check_bits(b, "each bit width in choices") for b in vals}))


def _check_policy(policy) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(POLICIES)}")
    return policy


@dataclass
class _Problem:
    """Everything the optimizer needs, per block in module order."""

    names: list[str]
    numel: list[int]
    lam: list[float]
    S: list[float]
    choices: tuple[int, ...]
    err: list[list[float]]      #: :math:`\lVert Q_{b_j}(W_i) - W_i \rVert_2^2`, :math:`b_j` = ``choices[j]``
    size_bits: list[list[int]]  #: size_bits[i][j] = bits block i adds at choices[j]
    base_bits: int              #: bits of everything not in a block (BN, biases, ...)
    fp32_bytes: float           #: size of the unquantized model
    granularity: Any
    act_bits: int | None

    def cost(self, i: int, j: int) -> float:
        r""":math:`\Omega_i` at ``choices[j]``; a negative :math:`\lambda_i` counts as 0 (see :func:`allocate_bits`)."""
        return max(self.lam[i], 0.0) * self.err[i][j]


def _block_sizes(model: nn.Module, blocks, choices, granularity, act_bits):
    """Per-block size in bits at each choice, the bits outside blocks, and the FP32 size in bytes.

    Read from :func:`hawqlib.size.size_table` (one uniform configuration per choice), so this module
    follows hawqlib.size's accounting (codes packed per tensor, one FP32 scale per output channel, ...)
    without restating it. The total is additive over blocks there; :func:`allocate_bits` checks the final
    answer against :func:`hawqlib.size.model_size_bytes`.
    """
    names = [b.name for b in blocks]
    sizes = [[0] * len(choices) for _ in names]
    other = None
    for j, c in enumerate(choices):
        cfg = BitConfig(weights={n: c for n in names}, act_bits=act_bits, granularity=granularity)
        rows = {r["block"]: r for r in size_table(model, cfg)}
        for i, n in enumerate(names):
            sizes[i][j] = _to_bits(rows[n]["bytes"])
        o = _to_bits(rows["other (FP32)"]["bytes"])
        if other is not None and o != other:
            raise RuntimeError("hawqlib.size counts bytes outside the blocks that depend on the weight bits; "
                               "the allocator assumes they do not")
        other = o
    return sizes, other, float(fp32_size_bytes(model))


def _to_bits(nbytes) -> int:
    bits = float(nbytes) * 8
    r = round(bits)
    if abs(bits - r) > 1e-6 * max(1.0, abs(bits)):
        raise RuntimeError(f"hawqlib.size returned {nbytes} bytes, not a whole number of bits")
    return int(r)


def _check_measure(measure) -> str:
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; valid: {', '.join(MEASURES)} (whole model as "
                         "hawqlib.size.model_size_bytes counts it, or the weights' bits alone)")
    return measure


def _sizes(model, blocks, choices, granularity, act_bits, measure):
    """``(size_bits, base_bits, fp32_bytes)`` of the blocks at each choice, in ``measure``."""
    if measure == "model":
        return _block_sizes(model, blocks, choices, granularity, act_bits)
    # the weights' bits alone: n_i * b per block, FP32 = 32 bits per weight (hawqlib.size.weight_compression)
    numel = [b.numel for b in blocks]
    return [[n * c for c in choices] for n in numel], 0, 4.0 * sum(numel)


def _problem(model, spectra, choices, granularity, act_bits, measure="model", errors=None) -> tuple[_Problem, list]:
    choices = _check_choices(choices)
    _check_measure(measure)
    blocks, specs = match_blocks(model, spectra, granularity)
    lam = [lambda_of(s) for s in specs]
    neg = [b.name for b, l in zip(blocks, lam) if l < 0]
    if neg:
        warnings.warn(f"negative top eigenvalue for blocks {neg[:5]}: their predicted perturbation counts as 0 "
                      "(the quadratic model predicts no damage there)", RuntimeWarning, stacklevel=3)
    numel = [b.numel for b in blocks]
    S = [l / n for l, n in zip(lam, numel)]
    err = block_errors(blocks, choices, errors)
    sizes, base, fp32 = _sizes(model, blocks, choices, granularity, act_bits, measure)
    return _Problem([b.name for b in blocks], numel, lam, S, choices, err, sizes, base, fp32,
                    granularity, act_bits), blocks


# --------------------------------------------------------------------------- the exact optimizer

def block_order(S: Sequence[float], policy: str, seed: int = 0) -> list[int]:
    """Indices of the blocks, from the one that must get the most bits to the one that may get the fewest.

    ``hawq``: S descending (ties by index); ``reverse``: that list reversed; ``random``: a
    ``random.Random(seed)`` shuffle of the indices; ``uniform``: the ``hawq`` order (irrelevant there).
    """
    _check_policy(policy)
    idx = sorted(range(len(S)), key=lambda i: (-S[i], i))
    if policy == "reverse":
        idx.reverse()
    elif policy == "random":
        idx = list(range(len(S)))
        random.Random(seed).shuffle(idx)
    return idx


def _pareto(points):
    """Non-dominated (size, cost, node) triples, by size ascending; equal points keep the first."""
    points = sorted(points, key=lambda p: (p[0], p[1]))
    out, best = [], math.inf
    for p in points:
        if p[1] < best:
            out.append(p)
            best = p[1]
    return out


def _monotone_frontier(order: Sequence[int], size: Sequence[Sequence[int]], cost: Sequence[Sequence[float]],
                       nlev: int, uniform: bool = False):
    """Pareto frontier of (total size, total cost, assignment) over assignments non-increasing along ``order``.

    ``size[i][j]``, ``cost[i][j]``: block i at level j (levels ascending in bits). The result is a list of
    ``(size, cost, levels)`` with ``levels[i]`` the level of block i, by size ascending. With ``uniform``,
    only the assignments giving every block the same level.
    """
    n = len(order)
    if uniform:  # every uniform assignment, by size (not pruned: uniform picks by bits, not by cost)
        pts = [(sum(size[i][j] for i in range(n)), sum(cost[i][j] for i in range(n)), [j] * n) for j in range(nlev)]
        return sorted(pts, key=lambda p: (p[0], p[2][0]))
    # node = (level, parent node); frontier[j] = Pareto list of (size, cost, node) for prefixes ending at level j
    first = order[0]
    frontier = [[(size[first][j], cost[first][j], (j, None))] for j in range(nlev)]
    for i in order[1:]:
        new = [None] * nlev
        suffix = []
        for j in range(nlev - 1, -1, -1):  # prefixes whose last level is >= j may continue at level j
            suffix = _pareto(suffix + frontier[j])
            new[j] = [(s + size[i][j], c + cost[i][j], (j, node)) for s, c, node in suffix]
        frontier = new
    final = _pareto([p for f in frontier for p in f])
    out = []
    for s, c, node in final:
        levels = [0] * n
        k = n - 1
        while node is not None:
            levels[order[k]] = node[0]
            node, k = node[1], k - 1
        out.append((s, c, levels))
    return out


def _budget_bits(problem: _Problem, target_size_mb, target_compression) -> int:
    if target_size_mb is not None and target_compression is not None:
        raise ValueError("give exactly one of target_size_mb and target_compression, not both")
    if target_size_mb is not None:
        if not (isinstance(target_size_mb, (int, float)) and target_size_mb > 0 and math.isfinite(target_size_mb)):
            raise ValueError(f"target_size_mb must be a positive number, got {target_size_mb!r}")
        return math.floor(target_size_mb * MB * 8 + 1e-6)
    if not (isinstance(target_compression, (int, float)) and target_compression > 0
            and math.isfinite(target_compression)):
        raise ValueError(f"target_compression must be a positive number (FP32 size / quantized size), "
                         f"got {target_compression!r}")
    return math.floor(problem.fp32_bytes * 8 / target_compression)


def _solve(problem: _Problem, policy: str, seed: int):
    n, m = len(problem.names), len(problem.choices)
    cost = [[problem.cost(i, j) for j in range(m)] for i in range(n)]
    order = block_order(problem.S, policy, seed)
    front = _monotone_frontier(order, problem.size_bits, cost, m, uniform=(policy == "uniform"))
    return [(problem.base_bits + s, c, lv) for s, c, lv in front]


def _to_config(problem: _Problem, levels):
    return BitConfig(weights={n: problem.choices[j] for n, j in zip(problem.names, levels)},
                     act_bits=problem.act_bits, granularity=problem.granularity)


def allocate_bits(model: nn.Module, spectra, *, target_size_mb: float | None = None,
                  target_compression: float | None = None, choices=DEFAULT_CHOICES, policy: str = "hawq",
                  act_bits: int | None = None, granularity="layer", seed: int = 0, measure: str = "weights",
                  errors=None):
    r"""The exact best monotone bit allocation under a size budget (see the module docstring); a ``BitConfig``.

    Give exactly one budget: ``target_size_mb`` (model size in MB of :data:`MB` bytes, by
    :func:`hawqlib.size.model_size_bytes`) or ``target_compression`` (FP32 size / quantized size, at least).
    ``measure="weights"`` (default, as everywhere in hawqlib) counts the weights' bits alone
    (``weight_compression``, 32 / mean bits, the paper's "weight size reduction"); ``measure="model"`` counts
    the whole model as :mod:`hawqlib.size` does (packed weights, per-channel scales, BatchNorm, biases,
    activation quantizer parameters: ``compression_ratio``).
    Our choice: with ``policy="uniform"`` and a single bit width in ``choices``, the budget may be
    omitted (the answer is that width everywhere; a given budget is still checked).

    Among the allocations monotone in the policy's block order and within budget, the result minimizes
    :math:`\sum_i \lambda_i \lVert Q_{b_i}(W_i) - W_i \rVert_2^2`; ties go to the smaller model. A negative
    top eigenvalue counts as zero in that sum (with a warning). ``granularity`` selects the blocks
    (:func:`hawqlib.blocks.quant_blocks`) and must be the one the spectra were computed at; ``act_bits``
    is stored in the config. Raises ValueError when no allocation fits, stating the smallest size reachable.
    ``errors``: the blocks' quantization errors (:func:`hawqlib.sensitivity.error_table`) where the caller
    has them already (computed here otherwise).
    """
    _check_policy(policy)
    choices = _check_choices(choices)
    if act_bits is not None:
        act_bits = check_bits(act_bits, "act_bits other than None")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    no_budget = target_size_mb is None and target_compression is None
    if no_budget and not (policy == "uniform" and len(choices) == 1):
        raise ValueError("give exactly one of target_size_mb and target_compression (only policy='uniform' "
                         "with a single bit width in choices needs no budget)")
    problem, _ = _problem(model, spectra, choices, granularity, act_bits, measure, errors)
    front = _solve(problem, policy, seed)
    if no_budget:
        size, cost, levels = front[0]
        return _to_config(problem, levels)
    budget = _budget_bits(problem, target_size_mb, target_compression)
    feasible = [p for p in front if p[0] <= budget]
    if not feasible:
        _infeasible(policy, problem.choices, budget, front[0][0], problem.fp32_bytes)
    if policy == "uniform":  # the largest single bit width that fits
        size, cost, levels = max(feasible, key=lambda p: p[2][0])
    else:
        size, cost, levels = min(feasible, key=lambda p: (p[1], p[0]))
    cfg = _to_config(problem, levels)
    if measure == "model":
        _check_additive(model, cfg, size)
    return cfg


def _infeasible(policy, choices, budget, smallest, fp32_bytes):
    raise ValueError(
        f"no {policy} allocation with bits {choices} fits the budget of "
        f"{budget / 8 / MB:.6f} MB (compression {fp32_bytes * 8 / budget:.2f}x): the smallest "
        f"achievable size is {smallest / 8 / MB:.6f} MB (compression {fp32_bytes * 8 / smallest:.2f}x, "
        f"every block at {choices[0]} bits)")


def check_budget(model: nn.Module, *, target_size_mb: float | None = None, target_compression: float | None = None,
                 choices=DEFAULT_CHOICES, act_bits: int | None = None, granularity="layer",
                 measure: str = "weights") -> None:
    """Raise the ValueError :func:`allocate_bits` would raise when no allocation fits the budget, from the sizes
    alone (feasibility does not depend on the eigenvalues: the smallest model, every block at the fewest bits,
    is monotone in every order), without quantizing any weight; for a check before the Hessian."""
    choices = _check_choices(choices)
    _check_measure(measure)
    if (target_size_mb is None) == (target_compression is None):
        raise ValueError("give exactly one of target_size_mb and target_compression")
    blocks = quant_blocks(model, granularity)
    sizes, base, fp32 = _sizes(model, blocks, choices, granularity, act_bits, measure)
    problem = _Problem([], [], [], [], choices, [], [], base, fp32, granularity, act_bits)
    budget = _budget_bits(problem, target_size_mb, target_compression)
    smallest = base + sum(min(row) for row in sizes)
    if smallest > budget:
        _infeasible("hawq", choices, budget, smallest, fp32)


def _check_additive(model, cfg, predicted_bits: int) -> None:
    got = _to_bits(model_size_bytes(model, cfg))
    if got != predicted_bits:
        raise RuntimeError(f"hawqlib.size accounting is not additive over blocks: predicted {predicted_bits} bits, "
                           f"measured {got}; the allocator's exactness assumes a per-block sum")


@dataclass(frozen=True)
class ParetoPoint:
    """One point of a policy's (size, predicted perturbation) trade-off curve."""

    size_bytes: float
    size_mb: float
    compression: float          #: FP32 size / this size
    perturbation: float         #: :math:`\sum_i \lambda_i \lVert Q_{b_i}(W_i) - W_i \rVert_2^2`
    bits: dict                  #: block name -> bits
    mean_bits: float            #: weight-count-weighted mean bit width


def pareto_front(model: nn.Module, spectra, policy: str = "hawq", choices=DEFAULT_CHOICES, *,
                 granularity="layer", seed: int = 0, act_bits: int | None = None,
                 measure: str = "weights") -> list[ParetoPoint]:
    """Every size/perturbation trade-off the policy can reach, non-dominated, by size ascending.

    Point k is the best allocation (least predicted perturbation) of all monotone allocations no larger
    than its size, so ``allocate_bits`` at any budget returns the largest point that fits. For
    ``"uniform"``: one point per bit width in ``choices``. ``act_bits`` and ``measure`` as in
    :func:`allocate_bits` (sizes and compressions are in that measure).
    """
    _check_policy(policy)
    problem, _ = _problem(model, spectra, choices, granularity, act_bits, measure)
    front = _solve(problem, policy, seed)
    total = sum(problem.numel)
    out = []
    for s, c, levels in front:
        bits = {n: problem.choices[j] for n, j in zip(problem.names, levels)}
        mean = sum(problem.choices[j] * k for j, k in zip(levels, problem.numel)) / total
        out.append(ParetoPoint(s / 8, s / 8 / MB, problem.fp32_bytes * 8 / s, c, bits, mean))
    return out
