"""Bit allocations beyond the paper: other sensitivity measures, the least summed perturbation, measured damage.

HAWQ (Dong et al., ICCV 2019, section 3.1) sorts the blocks by ``S_i = lambda_i / n_i`` and gives more sensitive
blocks more bits; :func:`hawqlib.allocate.allocate_bits` solves that rule exactly. Its successors and the
toolkits allocate differently; this module gives each of those rules as one function on the same inputs (a
model, its blocks at a granularity, a weight budget in the paper's measure, the weights' bits alone), so that
they can be compared at one budget:

- :func:`sorted_allocation`: HAWQ's rule with any sensitivity in place of ``S_i`` (e.g. the average Hessian
  trace ``tr(H_i) / n_i`` of HAWQ-V2, Dong et al., NeurIPS 2020): among the allocations monotone in that
  order (a more sensitive block never gets fewer bits) and within budget, the least summed perturbation;
- :func:`least_perturbation_allocation`: HAWQ-V3's rule (Yao et al., ICML 2021): the least summed
  perturbation ``sum_i cost_i(b_i)`` under the budget, no order imposed (HAWQ-V3 uses
  ``tr(H_i)/n_i ||Q_b(W_i) - W_i||^2`` and an integer linear program); solved exactly here by dynamic
  programming over the blocks (a Pareto frontier of (size, cost) prefixes, pruned by the budget), not a
  heuristic;
- :func:`greedy_allocation`: the measured-damage greedy of the toolkits (e.g. the per-layer loss sensitivity
  of AIMET's automatic mixed precision): every block starts at the most bits, and while the model is over
  budget the block whose next step down costs the least measured loss increase per bit saved steps down. A
  heuristic by design (that is the toolkits' rule), labelled so.

The array solvers underneath (:func:`monotone_levels`, :func:`min_sum_levels`, :func:`greedy_levels`) take
``size[i][j]`` (whole bits of block ``i`` at level ``j``, levels ascending) and ``cost[i][j]``, so that they
can be checked against brute force. Ties go to the smaller size, then to the first in block order (our
choice, as :mod:`hawqlib.allocate`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import nn

from .bitconfig import BitConfig, check_bits
from .blocks import quant_blocks

__all__ = ["monotone_levels", "min_sum_levels", "greedy_levels", "weight_budget_bits", "sorted_allocation",
           "least_perturbation_allocation", "greedy_allocation"]


# --------------------------------------------------------------------------- the array solvers

def _check_tables(size, cost) -> tuple[int, int]:
    n = len(size)
    if n == 0 or len(cost) != n:
        raise ValueError(f"size and cost must hold one row per block (got {len(size)} and {len(cost)} rows)")
    m = len(size[0])
    for i in range(n):
        if len(size[i]) != m or len(cost[i]) != m:
            raise ValueError(f"block {i}: size and cost rows must have {m} levels each")
        if any(not math.isfinite(float(c)) for c in cost[i]):
            raise ValueError(f"block {i}: cost holds a non-finite value {list(cost[i])}")
        if any(int(s) != s or s < 0 for s in size[i]) or list(size[i]) != sorted(size[i]):
            raise ValueError(f"block {i}: sizes must be non-negative whole bits, ascending by level; got "
                             f"{list(size[i])}")
    return n, m


def _pareto(points):
    """Non-dominated (size, cost, node) by size ascending; of equal points the first stays."""
    out, best = [], math.inf
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if p[1] < best:
            out.append(p)
            best = p[1]
    return out


def _unwind(node, n, order) -> list[int]:
    levels = [0] * n
    k = n - 1
    while node is not None:
        levels[order[k]] = node[0]
        node, k = node[1], k - 1
    return levels


def _best(final, budget: int, what: str, size):
    feasible = [p for p in final if p[0] <= budget]
    if not feasible:
        smallest = sum(row[0] for row in size)
        raise ValueError(f"no {what} allocation fits the budget of {budget} bits; the smallest reachable is "
                         f"{smallest} bits")
    return min(feasible, key=lambda p: (p[1], p[0]))


def monotone_levels(order: Sequence[int], size, cost, budget: int) -> list[int]:
    """Levels (``levels[i]`` of block ``i``) non-increasing along ``order`` with ``sum size <= budget`` and the
    least ``sum cost``: exact (dynamic programming over ``order``, the last level as state, each state's Pareto
    frontier of (size, cost) prefixes). Raises ValueError when nothing fits."""
    n, m = _check_tables(size, cost)
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of the {n} block indices, got {list(order)}")
    floor_rest = [0] * (n + 1)  # the least size of the blocks after position k
    for k in range(n - 1, -1, -1):
        floor_rest[k] = floor_rest[k + 1] + size[order[k]][0]
    first = order[0]
    frontier = [[(size[first][j], float(cost[first][j]), (j, None))]
                if size[first][j] + floor_rest[1] <= budget else [] for j in range(m)]
    for k, i in enumerate(order[1:], start=1):
        new, suffix = [None] * m, []
        for j in range(m - 1, -1, -1):  # a prefix whose last level is >= j may continue at j
            suffix = _pareto(suffix + frontier[j])
            new[j] = [(s + size[i][j], c + cost[i][j], (j, node)) for s, c, node in suffix
                      if s + size[i][j] + floor_rest[k + 1] <= budget]
        frontier = new
    s, c, node = _best([p for f in frontier for p in f], budget, "monotone", size)
    return _unwind(node, n, list(order))


def min_sum_levels(size, cost, budget: int) -> list[int]:
    """Levels with ``sum size <= budget`` and the least ``sum cost``, no order imposed (the multiple-choice
    knapsack of HAWQ-V3's integer program): exact, by the Pareto frontier of (size, cost) prefixes over the blocks
    in index order, pruned by the budget. Raises ValueError when nothing fits."""
    n, m = _check_tables(size, cost)
    floor_rest = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        floor_rest[i] = floor_rest[i + 1] + size[i][0]
    frontier = [(0, 0.0, None)]
    for i in range(n):
        frontier = _pareto([(s + size[i][j], c + cost[i][j], (j, node)) for s, c, node in frontier
                            for j in range(m) if s + size[i][j] + floor_rest[i + 1] <= budget])
    s, c, node = _best(frontier, budget, "least-perturbation", size)
    return _unwind(node, n, list(range(n)))


def greedy_levels(size, cost, budget: int) -> list[int]:
    """Every block at its top level, then, while over ``budget``, one block a level down: the one whose step costs
    the least ``cost`` increase per bit saved (ties: the first block). A heuristic (the toolkits' rule); raises
    ValueError when even every block at level 0 is over budget."""
    n, m = _check_tables(size, cost)
    if sum(size[i][0] for i in range(n)) > budget:
        raise ValueError(f"no greedy allocation fits the budget of {budget} bits; the smallest reachable is "
                         f"{sum(size[i][0] for i in range(n))} bits")
    levels = [m - 1] * n
    total = sum(size[i][m - 1] for i in range(n))
    while total > budget:
        best, pick = math.inf, None
        for i in range(n):
            j = levels[i]
            if j == 0:
                continue
            saved = size[i][j] - size[i][j - 1]
            rate = (cost[i][j - 1] - cost[i][j]) / saved if saved > 0 else math.inf
            if rate < best:
                best, pick = rate, i
        if pick is None:  # only steps that save nothing remain: take the first
            pick = next(i for i in range(n) if levels[i] > 0)
        total -= size[pick][levels[pick]] - size[pick][levels[pick] - 1]
        levels[pick] -= 1
    return levels


# --------------------------------------------------------------------------- on a model

def weight_budget_bits(numel: Sequence[int], target_compression: float) -> int:
    """The weights' bit budget at ``target_compression`` (FP32 bits over quantized bits, the paper's "weight size
    reduction"), as :func:`hawqlib.allocate.allocate_bits` counts it with ``measure="weights"``."""
    if not (isinstance(target_compression, (int, float)) and target_compression > 0
            and math.isfinite(target_compression)):
        raise ValueError(f"target_compression must be a positive number (FP32 size / quantized size), "
                         f"got {target_compression!r}")
    return math.floor(32 * sum(numel) / target_compression)


def _setup(model: nn.Module, tables: Mapping, choices, granularity, what: str):
    choices = tuple(sorted({check_bits(b, "each bit width in choices") for b in choices}))
    if not choices:
        raise ValueError("choices is empty; give bit widths among 1..8, e.g. (2, 3, 4, 8)")
    blocks = quant_blocks(model, granularity)
    names = [b.name for b in blocks]
    missing = [n for n in names if n not in tables]
    if missing or len(tables) != len(names):
        raise ValueError(f"{what} must name every block at granularity {granularity!r} and nothing else: missing "
                         f"{missing[:5]}, unknown {[k for k in tables if k not in set(names)][:5]}")
    cost = []
    for n in names:
        row = tables[n]
        if isinstance(row, Mapping):
            if any(b not in row for b in choices):
                raise ValueError(f"{what}[{n!r}] must give a value for every bit width in {choices}; got "
                                 f"{sorted(row)}")
            row = [row[b] for b in choices]
        if len(row) != len(choices):
            raise ValueError(f"{what}[{n!r}] must give one value per bit width in {choices}; got {len(row)}")
        cost.append([float(v) for v in row])
    size = [[b.numel * c for c in choices] for b in blocks]
    return blocks, names, choices, size, cost


def _config(names, choices, levels, act_bits, granularity) -> BitConfig:
    return BitConfig(weights={n: choices[j] for n, j in zip(names, levels)}, act_bits=act_bits,
                     granularity=granularity)


def sorted_allocation(model: nn.Module, sensitivity: Mapping[str, float], perturbation: Mapping, *,
                      target_compression: float, choices=(2, 3, 4, 8), act_bits: int | None = None,
                      granularity="layer") -> BitConfig:
    """HAWQ's rule (section 3.1) with the sensitivity ``sensitivity`` (block name -> score, larger needs more bits;
    ties by module order): the allocation monotone in that order, within the weights' budget at
    ``target_compression``, with the least ``sum_i perturbation[name_i][b_i]`` (``perturbation``: block name ->
    one value per bit width of ``choices``, or a ``{bits: value}`` mapping). With ``S_i`` and
    ``lambda_i ||Q_b(W_i) - W_i||^2`` it is :func:`hawqlib.allocate.allocate_bits`'s ``hawq`` policy."""
    blocks, names, choices, size, cost = _setup(model, perturbation, choices, granularity, "perturbation")
    if set(sensitivity) != set(names):
        raise ValueError(f"sensitivity must name every block at granularity {granularity!r} and nothing else")
    order = sorted(range(len(names)), key=lambda i: (-float(sensitivity[names[i]]), i))
    budget = weight_budget_bits([b.numel for b in blocks], target_compression)
    return _config(names, choices, monotone_levels(order, size, cost, budget), act_bits, granularity)


def least_perturbation_allocation(model: nn.Module, perturbation: Mapping, *, target_compression: float,
                                  choices=(2, 3, 4, 8), act_bits: int | None = None,
                                  granularity="layer") -> BitConfig:
    """HAWQ-V3's rule: the allocation within the weights' budget at ``target_compression`` with the least
    ``sum_i perturbation[name_i][b_i]``, exact (see :func:`min_sum_levels`); ``perturbation`` as in
    :func:`sorted_allocation`."""
    blocks, names, choices, size, cost = _setup(model, perturbation, choices, granularity, "perturbation")
    budget = weight_budget_bits([b.numel for b in blocks], target_compression)
    return _config(names, choices, min_sum_levels(size, cost, budget), act_bits, granularity)


def greedy_allocation(model: nn.Module, damage: Mapping, *, target_compression: float, choices=(2, 3, 4, 8),
                      act_bits: int | None = None, granularity="layer") -> BitConfig:
    """The measured-damage greedy (see :func:`greedy_levels`) within the weights' budget at ``target_compression``;
    ``damage``: block name -> the measured loss increase when that block alone is quantized, one value per bit
    width of ``choices`` (or a ``{bits: value}`` mapping)."""
    blocks, names, choices, size, cost = _setup(model, damage, choices, granularity, "damage")
    budget = weight_budget_bits([b.numel for b in blocks], target_compression)
    return _config(names, choices, greedy_levels(size, cost, budget), act_bits, granularity)
