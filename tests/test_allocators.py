"""The allocations beyond the paper (hawqlib.allocators): exact solvers against brute force, and HAWQ's rule again."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from hawqlib import allocate, allocators as al
from hawqlib.blocks import quant_blocks
from hawqlib.sensitivity import quant_errors, sensitivities

from test_allocate import CHOICES, spectra_for, tiny_model


def random_problem(rng: random.Random, n: int, m: int):
    numel = [rng.randint(1, 40) for _ in range(n)]
    bits = sorted(rng.sample(range(1, 9), m))
    size = [[k * b for b in bits] for k in numel]
    cost = [sorted((rng.random() * 10 ** rng.randint(-2, 2) for _ in range(m)), reverse=True) for _ in range(n)]
    return size, cost


def brute(size, cost, budget, order=None):
    """The least (cost, size) of all level vectors within budget (monotone along ``order`` when given)."""
    n, m = len(size), len(size[0])
    best = None
    for lv in itertools.product(range(m), repeat=n):
        if order is not None and any(lv[order[k]] < lv[order[k + 1]] for k in range(n - 1)):
            continue
        s = sum(size[i][lv[i]] for i in range(n))
        if s > budget:
            continue
        c = sum(cost[i][lv[i]] for i in range(n))
        if best is None or (c, s) < best[:2]:
            best = (c, s, lv)
    return best


def totals(size, cost, levels):
    return sum(cost[i][j] for i, j in enumerate(levels)), sum(size[i][j] for i, j in enumerate(levels))


@pytest.mark.parametrize("seed", range(12))
def test_the_exact_solvers_match_brute_force(seed):
    rng = random.Random(seed)
    n, m = rng.randint(2, 5), rng.randint(2, 4)
    size, cost = random_problem(rng, n, m)
    lo, hi = sum(r[0] for r in size), sum(r[-1] for r in size)
    order = list(range(n))
    rng.shuffle(order)
    for budget in sorted({lo, hi, rng.randint(lo, hi), rng.randint(lo, hi)}):
        want = brute(size, cost, budget)
        got = totals(size, cost, al.min_sum_levels(size, cost, budget))
        assert got[1] <= budget and math.isclose(got[0], want[0], rel_tol=1e-12, abs_tol=1e-12)
        want = brute(size, cost, budget, order)
        lv = al.monotone_levels(order, size, cost, budget)
        assert all(lv[order[k]] >= lv[order[k + 1]] for k in range(n - 1))
        got = totals(size, cost, lv)
        assert got[1] <= budget and math.isclose(got[0], want[0], rel_tol=1e-12, abs_tol=1e-12)


def test_nothing_fits_is_one_clear_error():
    size, cost = [[2, 4], [3, 6]], [[1.0, 0.5], [2.0, 1.0]]
    for solve in (lambda: al.min_sum_levels(size, cost, 4), lambda: al.monotone_levels([0, 1], size, cost, 4),
                  lambda: al.greedy_levels(size, cost, 4)):
        with pytest.raises(ValueError, match="smallest reachable is 5 bits"):
            solve()
    with pytest.raises(ValueError, match="permutation"):
        al.monotone_levels([0, 0], size, cost, 10)
    with pytest.raises(ValueError, match="ascending"):
        al.min_sum_levels([[4, 2], [3, 6]], cost, 10)
    with pytest.raises(ValueError, match="non-finite"):
        al.min_sum_levels(size, [[1.0, math.nan], [2.0, 1.0]], 10)


def test_the_greedy_steps_down_the_cheapest_bit_first_and_is_a_heuristic():
    # block 0: 10 weights, dropping 4 -> 2 bits costs 1.0 (0.05 per bit saved); block 1: 1 weight, costs 0.2
    # (0.1 per bit saved). Over a budget of 35 bits the greedy drops block 0 first (cheaper per bit) and stops.
    size, cost = [[20, 40], [2, 4]], [[1.0, 0.0], [0.2, 0.0]]
    assert al.greedy_levels(size, cost, 44) == [1, 1]
    assert al.greedy_levels(size, cost, 35) == [0, 1]
    # a case where the greedy is not optimal: saving 3 bits, it drops the cheapest per bit (block 0, saves 20)
    # where block 1 alone (saves 3, costs more per bit but less in all) would do
    size, cost = [[20, 40], [1, 4]], [[1.0, 0.0], [0.5, 0.0]]
    assert al.greedy_levels(size, cost, 41) == [0, 1]
    assert al.min_sum_levels(size, cost, 41) == [1, 0]
    rng = random.Random(3)
    for _ in range(10):
        size, cost = random_problem(rng, 4, 3)
        budget = rng.randint(sum(r[0] for r in size), sum(r[-1] for r in size))
        lv = al.greedy_levels(size, cost, budget)
        c, s = totals(size, cost, lv)
        assert s <= budget and c >= brute(size, cost, budget)[0] - 1e-12


def _omega(model, spectra):
    lam = {s.name: s.eigenvalue for s in spectra}
    return {b.name: [max(lam[b.name], 0.0) * e for e in quant_errors(b, CHOICES)] for b in quant_blocks(model)}


@pytest.mark.parametrize("target", [5.0, 9.0, 12.0])
def test_hawqs_rule_through_sorted_allocation_is_allocate_bits(target):
    model = tiny_model()
    spectra = spectra_for(model)
    got = al.sorted_allocation(model, sensitivities(spectra), _omega(model, spectra), target_compression=target,
                               act_bits=4)
    want = allocate.allocate_bits(model, spectra, target_compression=target, act_bits=4)
    assert got.weights == want.weights and got.act_bits == 4


@pytest.mark.parametrize("target", [6.0, 11.0])
def test_least_perturbation_is_exact_on_a_model(target):
    model = tiny_model(5)
    spectra = spectra_for(model, 1)
    pert = _omega(model, spectra)
    cfg = al.least_perturbation_allocation(model, pert, target_compression=target)
    blocks = quant_blocks(model)
    size = [[b.numel * c for c in CHOICES] for b in blocks]
    cost = [pert[b.name] for b in blocks]
    budget = al.weight_budget_bits([b.numel for b in blocks], target)
    best = brute(size, cost, budget)
    got = [CHOICES.index(cfg.weights[b.name]) for b in blocks]
    assert math.isclose(totals(size, cost, got)[0], best[0], rel_tol=1e-12) and totals(size, cost, got)[1] <= budget
    # never worse than HAWQ's monotone answer at the same budget (it searches a superset)
    hawq = allocate.allocate_bits(model, spectra, target_compression=target)
    assert totals(size, cost, got)[0] <= sum(pert[n][CHOICES.index(b)] for n, b in hawq.weights.items()) + 1e-12


def test_greedy_allocation_reads_a_mapping_per_bit_and_names_what_is_missing():
    model = tiny_model(4)
    names = [b.name for b in quant_blocks(model)]
    damage = {n: {2: 1.0 + i, 3: 0.5, 4: 0.1, 8: 0.0} for i, n in enumerate(names)}
    cfg = al.greedy_allocation(model, damage, target_compression=8.0)
    assert set(cfg.weights) == set(names) and cfg.mean_bits(model) <= 32 / 8.0 + 1e-12
    with pytest.raises(ValueError, match="every bit width"):
        al.greedy_allocation(model, {n: {2: 1.0} for n in names}, target_compression=8.0)
    with pytest.raises(ValueError, match="missing"):
        al.greedy_allocation(model, {names[0]: [1, 1, 1, 1]}, target_compression=8.0)
    with pytest.raises(ValueError, match="target_compression"):
        al.greedy_allocation(model, damage, target_compression=-1)
