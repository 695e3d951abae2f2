"""Bit allocation (exact, monotone in S), Pareto fronts and the Omega fine-tuning order (paper 3.1-3.2)."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from hawqlib import allocate as al
from hawqlib.blocks import quant_blocks
from hawqlib.order import finetune_order
from hawqlib.sensitivity import allocation_table, sensitivities
from hawqlib.quant import BitConfig, quantize_tensor
from hawqlib.size import compression_ratio, fp32_size_bytes, model_size_bytes, weight_compression

from conftest import DEVICES

CHOICES = (2, 3, 4, 8)


@dataclass
class Spec:
    """A stand-in for hawqlib.hessian.BlockSpectrum: just what allocate reads."""

    name: str
    numel: int
    eigenvalue: float


def tiny_model(n_blocks: int = 6, seed: int = 0) -> nn.Module:
    """Conv and linear layers of different sizes and weight scales (n_blocks weight layers)."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1, bias=False),
              nn.Conv2d(8, 12, 3, bias=False), nn.Flatten(), nn.Linear(12, 16), nn.Linear(16, 10),
              nn.Linear(10, 6)]
    keep, count = [], 0
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if count == n_blocks:
                continue
            count += 1
        keep.append(m)
    model = nn.Sequential(*keep)
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
            m.weight.mul_(0.5 + i)          # different scales: errors differ block to block
            m.weight[0].mul_(3.0)           # an outlier channel: per-channel scales matter
    return model


def spectra_for(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [Spec(b.name, b.numel, float(torch.rand((), generator=g)) * 10 ** float(torch.randint(-2, 2, (), generator=g)))
            for b in quant_blocks(model)]


def errors(model, choices=CHOICES):
    """||Q_b(W) - W||^2 per block and bit width, computed directly."""
    return {b.name: {c: float(sum(((quantize_tensor(w.detach(), c) - w.detach()) ** 2).double().sum()
                                  for w in b.params)) for c in choices}
            for b in quant_blocks(model)}


def brute_force(model, spectra, budget_bytes, order_names, choices=CHOICES):
    """All assignments; keep those non-increasing along order_names and within budget; return the best."""
    names = [b.name for b in quant_blocks(model)]
    lam = {s.name: s.eigenvalue for s in spectra}
    err = errors(model, choices)
    pos = {n: i for i, n in enumerate(names)}
    best, feasible = None, 0
    for bits in itertools.product(choices, repeat=len(names)):
        along = [bits[pos[n]] for n in order_names]
        if any(a < b for a, b in zip(along, along[1:])):
            continue
        cfg = BitConfig(dict(zip(names, bits)))
        size = model_size_bytes(model, cfg)
        if size > budget_bytes:
            continue
        feasible += 1
        cost = sum(lam[n] * err[n][b] for n, b in zip(names, bits))
        if best is None or (cost, size) < (best[0], best[1]):
            best = (cost, size, dict(zip(names, bits)))
    return best, feasible


def cost_of(model, spectra, cfg):
    lam = {s.name: s.eigenvalue for s in spectra}
    err = errors(model)
    return sum(lam[n] * err[n][b] for n, b in cfg.weights.items())


def s_order(spectra):
    return [s.name for s in sorted(spectra, key=lambda s: -s.eigenvalue / s.numel)]


@pytest.mark.parametrize("n_blocks,seed", [(5, 0), (6, 1), (7, 2)])
def test_hawq_equals_brute_force_and_fits(n_blocks, seed):
    model = tiny_model(n_blocks, seed)
    spectra = spectra_for(model, seed)
    lo = model_size_bytes(model, BitConfig.uniform(model, 2))
    hi = model_size_bytes(model, BitConfig.uniform(model, 8))
    for frac in (0.0, 0.15, 0.4, 0.7, 1.0):
        budget = lo + frac * (hi - lo)
        cfg = al.allocate_bits(model, spectra, target_size_mb=budget / al.MB, choices=CHOICES, measure="model")
        best, feasible = brute_force(model, spectra, math.floor(budget * 8) / 8, s_order(spectra))
        assert feasible > 0
        assert model_size_bytes(model, cfg) <= budget
        assert cost_of(model, spectra, cfg) == pytest.approx(best[0], rel=1e-9, abs=1e-12)
        assert cfg.weights == best[2]


def test_compression_budget_and_monotone_policies():
    model = tiny_model(7, 3)
    spectra = spectra_for(model, 3)
    S = sensitivities(spectra)
    assert S == {s.name: s.eigenvalue / s.numel for s in spectra}
    order = s_order(spectra)
    for target in (3.0, 5.0, 7.0):
        hawq = al.allocate_bits(model, spectra, target_compression=target, choices=CHOICES, measure="model")
        assert compression_ratio(model, hawq) >= target
        bits = [hawq.weights[n] for n in order]
        assert bits == sorted(bits, reverse=True), "more sensitive blocks must not get fewer bits"
        rev = al.allocate_bits(model, spectra, target_compression=target, policy="reverse", measure="model")
        assert compression_ratio(model, rev) >= target
        rbits = [rev.weights[n] for n in order]
        assert rbits == sorted(rbits), "reverse: more sensitive blocks must not get more bits"
        # reverse is the exact optimum of its own (reversed) constraint set
        fp32 = fp32_size_bytes(model)
        best, _ = brute_force(model, spectra, fp32 / target, order[::-1])
        assert cost_of(model, spectra, rev) == pytest.approx(best[0], rel=1e-9)


def test_random_policy_seeded_and_exact_in_its_order():
    model = tiny_model(6, 4)
    spectra = spectra_for(model, 4)
    a = al.allocate_bits(model, spectra, target_compression=6.0, policy="random", seed=7, measure="model")
    b = al.allocate_bits(model, spectra, target_compression=6.0, policy="random", seed=7, measure="model")
    assert a.weights == b.weights
    names = [s.name for s in spectra]
    orders = {tuple(al.block_order([1.0] * 6, "random", seed)) for seed in range(6)}
    assert len(orders) > 1, "different seeds must give different orders"
    idx = al.block_order([s.eigenvalue / s.numel for s in spectra], "random", 7)
    order = [names[i] for i in idx]
    bits = [a.weights[n] for n in order]
    assert bits == sorted(bits, reverse=True)
    best, _ = brute_force(model, spectra, fp32_size_bytes(model) / 6.0, order)
    assert cost_of(model, spectra, a) == pytest.approx(best[0], rel=1e-9)


def test_uniform_policy_and_no_budget_case():
    model = tiny_model(5, 5)
    spectra = spectra_for(model, 5)
    s4 = model_size_bytes(model, BitConfig.uniform(model, 4))
    s8 = model_size_bytes(model, BitConfig.uniform(model, 8))
    cfg = al.allocate_bits(model, spectra, target_size_mb=(s4 + s8) / 2 / al.MB, policy="uniform", measure="model")
    assert set(cfg.weights.values()) == {4}
    flat = [Spec(s.name, s.numel, 0.0) for s in spectra]  # no predicted damage anywhere: still by bits
    cfg = al.allocate_bits(model, flat, target_size_mb=(s4 + s8) / 2 / al.MB, policy="uniform", measure="model")
    assert set(cfg.weights.values()) == {4}
    assert [p.bits[spectra[0].name] for p in al.pareto_front(model, spectra, "uniform", measure="model")] == list(CHOICES)
    cfg = al.allocate_bits(model, spectra, choices=(3,), policy="uniform", act_bits=4, measure="model")
    assert set(cfg.weights.values()) == {3} and cfg.act_bits == 4
    with pytest.raises(ValueError, match="exactly one of target_size_mb and target_compression"):
        al.allocate_bits(model, spectra, policy="uniform", measure="model")
    with pytest.raises(ValueError, match="exactly one"):
        al.allocate_bits(model, spectra, target_size_mb=1.0, target_compression=4.0, measure="model")


def test_infeasible_budget_states_smallest_size():
    model = tiny_model(5, 6)
    spectra = spectra_for(model, 6)
    smallest = model_size_bytes(model, BitConfig.uniform(model, 2))
    with pytest.raises(ValueError) as exc:
        al.allocate_bits(model, spectra, target_size_mb=smallest * 0.9 / al.MB, measure="model")
    msg = str(exc.value)
    assert f"{smallest / al.MB:.6f} MB" in msg
    comp = fp32_size_bytes(model) / smallest
    assert f"{comp:.2f}x" in msg
    # exactly the smallest size is feasible: every block at 2 bits
    cfg = al.allocate_bits(model, spectra, target_size_mb=smallest / al.MB, measure="model")
    assert set(cfg.weights.values()) == {2}


def test_bad_inputs_name_valid_values():
    model = tiny_model(5, 0)
    spectra = spectra_for(model, 0)
    with pytest.raises(ValueError, match="valid policies: hawq, reverse, random, uniform"):
        al.allocate_bits(model, spectra, target_compression=4.0, policy="greedy", measure="model")
    for bad in [(2, 9), (0, 4), (2.5,), ("4",), ()]:
        with pytest.raises(ValueError, match="1..8"):
            al.allocate_bits(model, spectra, target_compression=4.0, choices=bad, measure="model")
    with pytest.raises(ValueError, match="missing .*unknown"):
        al.allocate_bits(model, spectra[:-1] + [Spec("nope", 3, 1.0)], target_compression=4.0, measure="model")
    with pytest.raises(ValueError, match="numel"):
        al.allocate_bits(model, [Spec(s.name, s.numel + 1, 1.0) for s in spectra], target_compression=4.0, measure="model")
    with pytest.raises(ValueError, match="positive"):
        al.allocate_bits(model, spectra, target_compression=-2, measure="model")
    with pytest.raises(TypeError, match="eigenvalue"):
        sensitivities([object()])
    with pytest.raises(ValueError, match="non-finite"):
        sensitivities([Spec("a", 3, float("nan"))])


def test_pareto_front_matches_allocations():
    model = tiny_model(6, 8)
    spectra = spectra_for(model, 8)
    front = al.pareto_front(model, spectra, "hawq", CHOICES, measure="model")
    sizes = [p.size_bytes for p in front]
    costs = [p.perturbation for p in front]
    assert sizes == sorted(sizes) and all(a > b for a, b in zip(costs, costs[1:])), "non-dominated, by size"
    assert front[0].bits == {n: 2 for n in front[0].bits} and front[-1].bits == {n: 8 for n in front[-1].bits}
    order = s_order(spectra)
    for p in front:
        bits = [p.bits[n] for n in order]
        assert bits == sorted(bits, reverse=True)
        cfg = BitConfig(p.bits)
        assert model_size_bytes(model, cfg) == pytest.approx(p.size_bytes)
        assert cost_of(model, spectra, cfg) == pytest.approx(p.perturbation, rel=1e-6)
        assert p.compression == pytest.approx(fp32_size_bytes(model) / p.size_bytes)
        # allocate_bits at exactly this size returns this point
        got = al.allocate_bits(model, spectra, target_size_mb=p.size_mb, measure="model")
        assert got.weights == p.bits


def test_allocation_table_rows():
    model = tiny_model(5, 9)
    spectra = spectra_for(model, 9)
    cfg = al.allocate_bits(model, spectra, target_compression=6.0, act_bits=4, measure="model")
    rows = allocation_table(model, spectra, cfg)
    err = errors(model)
    assert [r["name"] for r in rows] == [b.name for b in quant_blocks(model)]
    for r, s in zip(rows, spectra):
        assert r["numel"] == s.numel and r["lambda"] == s.eigenvalue and r["S"] == s.eigenvalue / s.numel
        assert r["bits"] == cfg.weights[r["name"]]
        assert r["quant_error"] == pytest.approx(err[r["name"]][r["bits"]], rel=1e-6)
        assert r["omega"] == pytest.approx(s.eigenvalue * r["quant_error"], rel=1e-12)
        assert r["size_bytes"] > 0
    # block sizes plus what lies outside the blocks add up to the model size, at any allocation
    rows8 = allocation_table(model, spectra, BitConfig.uniform(model, 8, act_bits=4))
    rest = model_size_bytes(model, cfg) - sum(r["size_bytes"] for r in rows)
    assert rest > 0
    assert model_size_bytes(model, BitConfig.uniform(model, 8, act_bits=4)) - sum(r["size_bytes"] for r in rows8) == rest
    assert all(r8["size_bytes"] >= r["size_bytes"] for r, r8 in zip(rows, rows8))


def test_finetune_order_sorted_and_correct():
    model = tiny_model(7, 10)
    spectra = spectra_for(model, 10)
    cfg = al.allocate_bits(model, spectra, target_compression=7.0, measure="model")
    order = finetune_order(model, spectra, cfg)
    assert sorted(e.name for e in order) == sorted(cfg.weights)
    omegas = [e.omega for e in order]
    assert omegas == sorted(omegas, reverse=True)
    blocks = {b.name: b for b in quant_blocks(model)}
    lam = {s.name: s.eigenvalue for s in spectra}
    for e in order:
        direct = lam[e.name] * sum(float(((quantize_tensor(w.detach(), e.bits) - w.detach()) ** 2).sum())
                                   for w in blocks[e.name].params)
        assert e.omega == pytest.approx(direct, rel=1e-6)
        assert e.bits == cfg.weights[e.name] and e.lam == lam[e.name]
    rev = finetune_order(model, spectra, cfg, policy="reverse")
    assert rev == order[::-1]
    rnd = finetune_order(model, spectra, cfg, policy="random", seed=5)
    assert rnd == finetune_order(model, spectra, cfg, policy="random", seed=5)
    assert sorted(rnd, key=lambda e: e.name) == sorted(order, key=lambda e: e.name)
    assert any(finetune_order(model, spectra, cfg, policy="random", seed=k) != order for k in range(3))
    with pytest.raises(ValueError, match="valid: omega, reverse, random"):
        finetune_order(model, spectra, cfg, policy="largest")
    with pytest.raises(ValueError, match="missing"):
        finetune_order(model, spectra, BitConfig({order[0].name: 4}))


def test_dp_pareto_small_exhaustive():
    """The frontier DP against enumeration on random abstract problems (sizes, costs), all orders."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, m = 5 + trial % 3, 4
        size = [[int(x) for x in torch.randint(0, 50, (m,), generator=g).sort().values] for _ in range(n)]
        cost = [[float(x) for x in torch.rand(m, generator=g).sort(descending=True).values] for _ in range(n)]
        order = [int(i) for i in torch.randperm(n, generator=g)]
        front = al._monotone_frontier(order, size, cost, m)
        pts = []
        for lv in itertools.product(range(m), repeat=n):
            along = [lv[i] for i in order]
            if all(a >= b for a, b in zip(along, along[1:])):
                pts.append((sum(size[i][lv[i]] for i in range(n)), sum(cost[i][lv[i]] for i in range(n))))
        for budget in range(0, 50 * n, 7):
            want = min((c for s, c in pts if s <= budget), default=None)
            got = min((c for s, c, _ in front if s <= budget), default=None)
            assert (want is None) == (got is None)
            if want is not None:
                assert got == pytest.approx(want, abs=1e-12)
        for s, c, lv in front:
            assert s == sum(size[i][lv[i]] for i in range(n)) and c == pytest.approx(sum(cost[i][lv[i]] for i in range(n)))


def test_the_default_measure_is_the_papers_everywhere():
    import inspect

    from hawqlib import workflow
    defaults = {f.__name__: inspect.signature(f).parameters["measure"].default
                for f in (al.allocate_bits, al.pareto_front, workflow.quantize)}
    assert set(defaults.values()) == {"weights"}, defaults


def test_weight_measure_budget_is_the_papers_weight_compression():
    model = tiny_model(6, 11)
    spectra = spectra_for(model, 11)
    names = [b.name for b in quant_blocks(model)]
    numel = {b.name: b.numel for b in quant_blocks(model)}
    lam = {s.name: s.eigenvalue for s in spectra}
    err = errors(model)
    order = s_order(spectra)
    for target in (6.0, 10.0, 14.0):
        cfg = al.allocate_bits(model, spectra, target_compression=target, measure="weights")
        assert weight_compression(model, cfg) >= target
        best = None
        for bits in itertools.product(CHOICES, repeat=len(names)):
            b = dict(zip(names, bits))
            along = [b[n] for n in order]
            if any(x < y for x, y in zip(along, along[1:])) or sum(b[n] * numel[n] for n in names) * target > 32 * sum(numel.values()):
                continue
            cost = sum(lam[n] * err[n][b[n]] for n in names)
            best = cost if best is None else min(best, cost)
        assert cost_of(model, spectra, cfg) == pytest.approx(best, rel=1e-6)
    # the whole-model measure is stricter (scales, BatchNorm, biases count too)
    assert compression_ratio(model, cfg) < weight_compression(model, cfg)
    front = al.pareto_front(model, spectra, "hawq", measure="weights")
    assert front[0].compression == pytest.approx(16.0) and front[-1].compression == pytest.approx(4.0)
    with pytest.raises(ValueError, match="valid: model, weights"):
        al.allocate_bits(model, spectra, target_compression=4.0, measure="bytes")


@pytest.mark.parametrize("device", DEVICES)
def test_shared_errors_and_the_size_only_budget_check(device):
    """The errors computed once (error_table) give the same bits, order and table as computing them in each step,
    on the model's device; the size-only budget check refuses exactly what allocate_bits refuses, same message."""
    from hawqlib.sensitivity import error_table

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4, 10))
    model = model.to(device)
    spectra = [Spec(b.name, b.numel, float(v)) for b, v in zip(quant_blocks(model, "layer"), (3.0, 0.5, 9.0))]
    choices = (2, 3, 4, 8)
    errors = error_table(quant_blocks(model, "layer"), choices)
    for measure in ("weights", "model"):
        cfg = al.allocate_bits(model, spectra, target_compression=7, choices=choices, measure=measure)
        assert al.allocate_bits(model, spectra, target_compression=7, choices=choices, measure=measure,
                                errors=errors) == cfg
        assert finetune_order(model, spectra, cfg, errors=errors) == finetune_order(model, spectra, cfg)
        assert allocation_table(model, spectra, cfg, errors=errors) == allocation_table(model, spectra, cfg)
        al.check_budget(model, target_compression=7, choices=choices, measure=measure)
        with pytest.raises(ValueError) as full:
            al.allocate_bits(model, spectra, target_compression=17, choices=choices, measure=measure)
        with pytest.raises(ValueError) as sizes_only:
            al.check_budget(model, target_compression=17, choices=choices, measure=measure)
        assert str(sizes_only.value) == str(full.value)
