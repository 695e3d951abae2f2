"""Predictors of quantization damage, the measured damage, and rank agreement (hawqlib.predictors)."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from hawqlib import predictors as pr
from hawqlib.blocks import quant_blocks
from hawqlib.quant import BitConfig, calibrate_activations, quantize_model, quantize_tensor, set_quant_enabled


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, bias=False), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def batch(n: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_spearman_and_kendall_against_their_definitions():
    a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert pr.spearman(a, [10, 20, 30, 40, 50, 60]) == pytest.approx(1.0)
    assert pr.kendall(a, [6, 5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    b = [3.0, 1.0, 2.0, 5.0, 4.0, 4.0]  # a tie
    # Kendall's tau-b by its definition: (concordant - discordant) / sqrt((pairs - ties_a) (pairs - ties_b))
    conc = disc = ties_b = 0
    for i, j in itertools.combinations(range(6), 2):
        s = (a[i] - a[j]) * (b[i] - b[j])
        conc += s > 0
        disc += s < 0
        ties_b += b[i] == b[j]
    assert pr.kendall(a, b) == pytest.approx((conc - disc) / math.sqrt(15 * (15 - ties_b)))
    # Spearman's: Pearson's of the average ranks
    rb = torch.tensor([2.0, 0.0, 1.0, 4.5, 3.0, 3.0]) + 1
    rb[4] = rb[5] = 4.5
    rb[3] = 6.0
    ra = torch.arange(1.0, 7.0)
    want = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    assert pr.spearman(a, b) == pytest.approx(want)
    assert math.isnan(pr.spearman(a, [1.0] * 6)) and math.isnan(pr.kendall([1.0] * 6, a))


def test_rank_agreement_of_a_perfect_predictor_and_of_noise():
    pred = [1.0, 2.0, 3.0, 4.0]
    damage = torch.tensor(pred)[:, None] * torch.ones(4, 30)  # every image agrees
    r = pr.rank_agreement(pred, damage, n_boot=50)
    assert (r.spearman, r.spearman_low, r.spearman_high, r.kendall_low) == pytest.approx((1, 1, 1, 1))
    g = torch.Generator().manual_seed(0)
    noisy = torch.tensor(pred)[:, None] + 5 * torch.randn(4, 30, generator=g)
    r = pr.rank_agreement(pred, noisy, n_boot=200, seed=1)
    assert r.spearman_low < r.spearman_high and r.spearman_low <= r.spearman + 1e-12
    assert r == pr.rank_agreement(pred, noisy, n_boot=200, seed=1)  # seeded
    with pytest.raises(ValueError, match="blocks"):
        pr.rank_agreement(pred, noisy[:3])


def test_the_empirical_fisher_trace_is_the_mean_squared_per_image_gradient():
    net = small_net()
    x, y = batch()
    blocks = quant_blocks(net)
    got = pr.empirical_fisher_traces(net, blocks, (x, y), chunk=5)
    want = [0.0] * len(blocks)
    for k in range(len(x)):
        net.zero_grad()
        nn.functional.cross_entropy(net(x[k:k + 1]), y[k:k + 1]).backward()
        for i, b in enumerate(blocks):
            want[i] += sum(float(p.grad.double().pow(2).sum()) for p in b.params) / len(x)
    assert got == pytest.approx(want, rel=1e-5)
    assert not net.training


def test_single_block_damage_is_the_loss_change_of_that_block_alone():
    net = small_net()
    x, y = batch()
    blocks = quant_blocks(net)
    got = pr.single_block_damage(net, (2, 4), (x, y), chunk=5)
    assert got.shape == (len(blocks), 2, len(x))
    ref = nn.functional.cross_entropy(net(x), y, reduction="none").double()
    for i, b in enumerate(blocks):
        for k, bits in enumerate((2, 4)):
            other = copy.deepcopy(net)
            mod = dict(other.named_modules())[b.name]
            with torch.no_grad():
                mod.weight.copy_(quantize_tensor(mod.weight, bits))
            want = nn.functional.cross_entropy(other(x), y, reduction="none").double() - ref
            assert torch.allclose(got[i, k], want, atol=1e-5)
    assert got[:, 0].mean(1).abs().sum() > got[:, 1].mean(1).abs().sum()  # 2 bits hurts more than 4


def test_single_block_damage_with_activations_has_the_quantized_activations_as_reference():
    net = small_net()
    x, y = batch()
    cal = batch(16, 7)[0]
    got = pr.single_block_damage(net, (3,), (x, y), act_bits=4, calibration=cal)
    names = [b.name for b in quant_blocks(net)]
    q = quantize_model(net, BitConfig(weights=dict.fromkeys(names, 3), act_bits=4))
    set_quant_enabled(q, None, False, activations=False)
    calibrate_activations(q, [cal])
    q.eval()
    with torch.no_grad():
        ref = nn.functional.cross_entropy(q(x), y, reduction="none").double()
        set_quant_enabled(q, [names[1]], True, activations=False)
        want = nn.functional.cross_entropy(q(x), y, reduction="none").double() - ref
    assert torch.allclose(got[1, 0], want, atol=1e-6)
    with pytest.raises(ValueError, match="calibration"):
        pr.single_block_damage(net, (3,), (x, y), act_bits=4)


def test_predictor_values_follow_their_formulas():
    net = small_net()
    blocks = quant_blocks(net)
    lam, tr, fi = [2.0, -1.0, 0.5], [30.0, 4.0, 1.0], [0.1, 0.2, 0.3]
    v = pr.predictor_values(blocks, (2, 3), lam, tr, fi)
    assert set(v) == set(pr.PREDICTORS)
    for i, b in enumerate(blocks):
        for k, bits in enumerate((2, 3)):
            err = sum(float((quantize_tensor(p.detach(), bits) - p.detach()).double().pow(2).sum()) for p in b.params)
            assert v["error"][i][k] == pytest.approx(err)
            assert v["omega"][i][k] == pytest.approx(max(lam[i], 0) * err)
            assert v["trace_error"][i][k] == pytest.approx(tr[i] / b.numel * err)
        for name in pr.BIT_FREE:
            assert v[name][i][0] == v[name][i][1]
        assert v["eigenvalue"][i][0] == pytest.approx(lam[i] / b.numel)
    with pytest.raises(ValueError, match="one value per block"):
        pr.predictor_values(blocks, (2,), lam[:2], tr, fi)


# --------------------------------------------------------------------------- the companion's step


def test_the_held_out_images_are_disjoint_from_the_hessian_sample(cifar_root):
    from hawqlib.repro import damage, pipeline

    hx, _ = pipeline.hessian_batch(16, 0, cifar_root)
    x, y = damage.heldout_batch(8, 16, 0, cifar_root)
    assert x.shape[0] == y.shape[0] == 8
    assert not any(torch.equal(a, b) for a in x for b in hx)
    # the Hessian's sample with 8 more images holds both
    bx, _ = pipeline.hessian_batch(24, 0, cifar_root)
    assert all(any(torch.equal(a, b) for b in bx) for a in torch.cat([x, hx]))
    with pytest.raises(ValueError, match="n \\+ after"):
        damage.heldout_batch(8, 50000, 0, cifar_root)


def test_an_unknown_allocation_kind_names_the_valid_ones():
    from hawqlib.repro import damage, profiles

    net = small_net()
    P = profiles.get("smoke")
    with pytest.raises(ValueError, match="valid: trace, v3, greedy"):
        damage.allocation(net, [], P, "hessian", "base")
