"""hawqlib.quant: the quantizer, the fake-quant modules, BitConfig and quantize_model."""
import io
import json

import pytest
import torch
from torch import nn

from hawqlib.blocks import quant_blocks
from hawqlib.models import resnet20

from conftest import DEVICES
from hawqlib.quant import (ACT_MSE_STEPS, BitConfig, QuantAct, QuantConv2d, QuantLinear, act_mse_range,
                           calibrate_activations, quant_modules,
                           quant_params, quant_scale, quantize_model, quantize_tensor, quantize_to_int,
                           set_quant_enabled, weight_code_limit)


def _weight(seed=0, shape=(16, 8, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    # channels with very different magnitudes, so per-channel scales must differ
    return torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[0]).view(-1, *([1] * (len(shape) - 1)))


@pytest.mark.parametrize("bits", range(1, 9))
def test_levels_idempotence_and_odd_int_codes(bits):
    w = _weight(bits)
    q = quantize_tensor(w, bits)
    assert q.shape == w.shape and q.dtype == w.dtype
    for c in range(w.shape[0]):
        assert q[c].unique().numel() <= 2 ** bits
        assert (q[c] != 0).all()             # the mid-rise grid has no zero level
    # idempotent up to float32 rounding of the refitted half-step; the codes are exactly the same
    assert torch.allclose(quantize_tensor(q, bits), q, rtol=1e-6, atol=0)
    k, s = quantize_to_int(w, bits)
    assert torch.equal(quantize_to_int(q, bits)[0], k)
    assert k.dtype == (torch.int8 if bits <= 7 else torch.int16)
    assert int(k.abs().max()) == weight_code_limit(bits) == 2 ** bits - 1
    assert (k.remainder(2) == 1).all()      # odd codes: 2**bits levels symmetric about zero
    assert torch.equal(k.float() * s.view(-1, 1, 1, 1), q)


def test_two_bits_use_four_levels_and_beat_the_ternary_grid():
    w = _weight(7, (64, 32, 3, 3))
    q = quantize_tensor(w, 2)
    assert all(q[c].unique().numel() == 4 for c in range(64))
    # the best ternary grid {-s, 0, s} per channel (searched densely) has a larger squared error
    x = w.flatten(1).double()
    s = x.abs().amax(1, keepdim=True) * torch.linspace(0.05, 1.0, 400, dtype=torch.float64)
    t = (torch.round(x[:, None, :] / s[..., None]).clamp(-1, 1) * s[..., None] - x[:, None, :]).square().sum(-1)
    assert float((q.double() - w.double()).square().sum()) < 0.8 * float(t.min(dim=1).values.sum())


@pytest.mark.parametrize("bits", range(2, 9))
def test_max_rule_error_within_half_a_step_and_per_channel_scale(bits):
    w = _weight(10 + bits)
    h = quant_scale(w, bits, rule="max")
    top = 2 ** bits - 1
    assert h.shape == (w.shape[0],)
    assert torch.allclose(h, w.abs().amax(dim=(1, 2, 3)) / top, rtol=0, atol=0)
    assert len(set(h.tolist())) == w.shape[0]
    err = (quantize_tensor(w, bits, rule="max") - w).abs()
    assert (err <= h.view(-1, 1, 1, 1) * (1 + 1e-5)).all()   # the step is 2h
    # per tensor: one scale, set by the largest channel
    ht = quant_scale(w, bits, per_channel=False, rule="max")
    assert ht.dim() == 0 and ht == h.max()


@pytest.mark.parametrize("bits", range(2, 9))
def test_mse_rule_lowers_the_error_per_channel_and_is_a_least_squares_fixed_point(bits):
    w = _weight(10 + bits)
    top = 2 ** bits - 1
    h = quant_scale(w, bits)  # the default rule
    assert h.shape == (w.shape[0],) and len(set(h.tolist())) == w.shape[0]
    q, qm = quantize_tensor(w, bits), quantize_tensor(w, bits, rule="max")
    e, em = (q - w).pow(2).sum(dim=(1, 2, 3)), (qm - w).pow(2).sum(dim=(1, 2, 3))
    assert (e <= em * (1 + 1e-5)).all()
    if bits <= 3:  # where the max |w| grid is coarse, the least-squares scale is much better
        assert e.sum() < 0.8 * em.sum()
    # inside the range the error is at most half a step (h); beyond it, weights are clipped to +-top*h
    hv = h.view(-1, 1, 1, 1)
    inside = w.abs() <= top * hv
    assert ((q - w).abs()[inside] <= hv.expand_as(w)[inside] * (1 + 1e-5)).all()
    assert torch.allclose(q.abs()[~inside], (top * hv).expand_as(w)[~inside], rtol=1e-6, atol=0)
    # the half-step is (up to float32 rounding) the least-squares scale of its own codes
    k = torch.round(q / hv).double().flatten(1)
    ls = (w.double().flatten(1) * k).sum(1) / (k * k).sum(1)
    assert torch.allclose(h.double(), ls, rtol=1e-5, atol=0)
    # per tensor: one scale
    assert quant_scale(w, bits, per_channel=False).dim() == 0


def _plain_mse_search(w, per_channel, top):
    """The least-squares scale search as the module docstring of hawqlib.quant.grids states it, one whole
    tensor per operation, every channel to the last round: the float64 half-steps the fast search must give
    bit for bit."""
    from hawqlib.quant import grids
    x = w.detach().double().reshape(w.shape[0] if per_channel and w.dim() > 0 else 1, -1)
    s = x.abs().amax(dim=1, keepdim=True).clamp_min(grids._MIN_RANGE) / top
    for _ in range(grids.MSE_ITERATIONS):
        k = torch.floor(x / s * 0.5).clamp(-(top + 1) // 2, (top - 1) // 2) * 2 + 1
        new = (x * k).sum(dim=1, keepdim=True) / (k * k).sum(dim=1, keepdim=True)
        new = torch.where(new > 0, new, s)
        if torch.equal(new, s):
            break
        s = new
    return s


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("slab", ["default", 300])
def test_mse_scale_search_equals_the_plain_loop_to_the_bit(threads, slab, monkeypatch):
    """The slab-by-slab search that carries on only the moving channels gives the plain loop's float64 scales
    exactly (so a change of the order of any sum would show):
    several shapes (one row, rows of one weight, a lone last row, heavy tails, an all-zero channel), dtypes and
    widths, whole slabs and slabs of a few rows (``slab`` = 300 values), one and two threads."""
    from hawqlib.quant import grids
    if slab != "default":
        monkeypatch.setattr(grids, "_SLAB_ELEMENTS", slab)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        shapes = [(64, 32, 3, 3), (7, 100), (33, 50), (5, 1), (1, 40), (3, 2, 5, 5), (9,)]
        checked = 0
        for i, shape in enumerate(shapes):
            w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0]).view(-1, *([1] * (len(shape) - 1)))
            if i % 2:
                w = w * torch.rand(shape, generator=g).pow(8) * 10  # heavy tails: many clipped weights
            if shape[0] > 3:
                w[2] = 0.0
            for dtype in (torch.float32, torch.float64, torch.float16):
                wd = w.to(dtype)
                for bits in (2, 3, 4, 5, 8):
                    top = 2 ** bits - 1
                    for pc in (True, False):
                        want = _plain_mse_search(wd, pc, top)
                        got = grids._mse_search(wd.reshape(want.shape[0], -1), top)
                        assert got.dtype == torch.float64 and torch.equal(got, want), (shape, dtype, bits, pc)
                        h = grids._mse_scale(wd, pc, top)   # the float32 scales quantize_tensor uses
                        assert torch.equal(h, want.float().clamp_min(grids._MIN_RANGE).reshape(h.shape))
                        checked += 1
        assert checked == len(shapes) * 3 * 5 * 2
    finally:
        torch.set_num_threads(old)


def test_unknown_scale_rule_is_named():
    with pytest.raises(ValueError, match=r"unknown scale rule 'minmax'; valid rules: 'mse', 'max'"):
        quantize_tensor(_weight(), 4, rule="minmax")


def test_one_bit_is_sign_times_mean_abs():
    w = _weight(3)
    q = quantize_tensor(w, 1)
    alpha = w.abs().mean(dim=(1, 2, 3), dtype=torch.float64).float()
    expect = torch.where(w >= 0, 1.0, -1.0) * alpha.view(-1, 1, 1, 1)
    assert torch.equal(q, expect)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_rounds_to_the_nearest_level_and_asymmetric_matches_torch(bits):
    w = _weight(20 + bits, (32, 16, 3, 3))
    h = quant_scale(w, bits).view(-1, 1, 1, 1)
    q = quantize_tensor(w, bits)
    # no other level of the grid {h j: j odd, |j| <= 2**b - 1} is closer to w than Q(w)
    levels = torch.arange(-(2 ** bits - 1), 2 ** bits, 2, dtype=torch.float64)
    d = (w.double()[..., None] - h.double()[..., None] * levels).abs()
    # (up to float32 rounding of x / 2h near a decision boundary: ~1e-5 h at 8 bits)
    assert ((q.double() - w.double()).abs() <= d.min(dim=-1).values + 1e-4 * h.double()).all()
    # asymmetric, per tensor: bit for bit torch's fused fake quantization
    x = torch.randn(64, 50, generator=torch.Generator().manual_seed(bits)) * 3 + 1
    sc, zp, qmin, qm = quant_params(x, bits, per_channel=False, symmetric=False)
    ref = torch.fake_quantize_per_tensor_affine(x, sc.reshape(1), zp.reshape(1), qmin, qm)
    assert torch.equal(quantize_tensor(x, bits, per_channel=False, symmetric=False), ref)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_ste_gradient_is_identity(bits):
    w = _weight(5).requires_grad_()
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    (quantize_tensor(w, bits) * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("bad", [0, 9, 2.5, True, "4", None])
def test_bad_bits_are_named(bad):
    with pytest.raises(ValueError, match=r"1\.\.8 \(valid: 1, 2, 3, 4, 5, 6, 7, 8\), got"):
        quantize_tensor(_weight(), bad)


def test_bad_tensor_input():
    with pytest.raises(TypeError, match="floating-point"):
        quantize_tensor(torch.ones(3, 3, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_tensor([1.0, 2.0], 4)


# ---------------------------------------------------------------------------------------- QuantAct

def test_quant_act_range_rule_and_freeze():
    a = QuantAct(4, rule="minmax")
    assert not a.has_range()
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, 3, 5, 5, generator=g).relu()        # a ReLU output
    a.train()
    y1 = a(x1)
    assert a.running_min == x1.min() and a.running_max == x1.max()   # first batch initializes
    assert a.zero_point.item() == 0                                   # unsigned after ReLU
    assert (y1 >= 0).all() and y1.unique().numel() <= 16
    assert torch.allclose(a.scale, x1.max().reshape(1) / 15)
    x2 = torch.rand(4, 3, 5, 5, generator=g) * 6.0 + 1.0
    rmin, rmax = a.running_min.clone(), a.running_max.clone()
    a(x2)
    assert torch.allclose(a.running_max, rmax + 0.01 * (x2.max() - rmax))   # EMA with c = 0.01
    assert torch.allclose(a.running_min, rmin + 0.01 * (x2.min() - rmin))
    assert a.running_min > 0 and a.zero_point.item() == 0                    # the grid still contains 0
    assert torch.allclose(a.scale, a.running_max.reshape(1) / 15)
    # eval: frozen
    a.eval()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    ya = a(x2 * 3)
    assert all(torch.equal(state[k], v) for k, v in a.state_dict().items())
    # saturates at the top of the frozen grid
    assert ya.max() == a.scale * 15


def test_quant_act_signed_input_and_gradient_matches_torch():
    a = QuantAct(3).train()
    g = torch.Generator().manual_seed(1)
    a(torch.randn(64, 8, generator=g))           # range [-~2.5, ~2.5]
    x = (torch.randn(64, 8, generator=g) * 2).requires_grad_()   # some elements outside the range
    a.eval()
    y = a(x)
    assert 0 < a.zero_point.item() < 7                  # signed input: asymmetric grid
    w = torch.randn(64, 8, generator=g)
    (y * w).sum().backward()
    xr = x.detach().clone().requires_grad_()
    yr = torch.fake_quantize_per_tensor_affine(xr, a.scale, a.zero_point, 0, 7)
    (yr * w).sum().backward()
    assert torch.equal(y, yr)
    assert torch.equal(x.grad, xr.grad)
    assert (x.grad == 0).any() and (x.grad == w).any()   # clipped outside, identity inside


def test_quant_act_needs_a_range_in_eval_and_disable():
    a = QuantAct(4).eval()
    with pytest.raises(RuntimeError, match="calibrate_activations"):
        a(torch.ones(2, 2))
    a.enabled = False
    x = torch.randn(3, 3)
    assert a(x) is x
    with pytest.raises(ValueError, match="activation bits"):
        QuantAct(0)


# -------------------------------------------------------------------------------------- BitConfig

def _mixed(model, act_bits=4):
    names = [b.name for b in quant_blocks(model)]
    return BitConfig({n: (2, 3, 4, 8)[i % 4] for i, n in enumerate(names)}, act_bits)


def test_bitconfig_json_roundtrip(tmp_path):
    m = resnet20()
    cfg = _mixed(m)
    back = BitConfig.from_json(cfg.to_json())
    assert back == cfg and list(back.weights) == list(cfg.weights)
    cfg.save(tmp_path / "cfg.json")
    assert BitConfig.load(tmp_path / "cfg.json") == cfg
    assert json.loads((tmp_path / "cfg.json").read_text())["act_bits"] == 4
    u = BitConfig.uniform(m, 3, act_bits=4, granularity="residual")
    assert set(u.weights.values()) == {3} and len(u.weights) == 11
    assert BitConfig.from_json(u.to_json()).validate(m) == u
    assert _mixed(m).mean_bits(m) == pytest.approx(
        sum(cfg.weights[b.name] * b.numel for b in quant_blocks(m)) / sum(b.numel for b in quant_blocks(m)))


def test_bitconfig_errors_name_the_offender():
    m = resnet20()
    cfg = BitConfig.uniform(m, 4)
    bad = BitConfig({**cfg.weights, "layer9.conv": 4})
    with pytest.raises(ValueError, match=r"unknown block\(s\) \['layer9.conv'\].*valid block names: \['conv1'"):
        bad.validate(m)
    w = dict(cfg.weights)
    del w["fc"]
    with pytest.raises(ValueError, match=r"missing block\(s\) \['fc'\].*valid block names"):
        BitConfig(w).validate(m)
    for b in (0, 9, 2.5):
        with pytest.raises(ValueError, match=rf"bits of block 'fc' must be an integer in 1\.\.8 .*got {b}"):
            BitConfig({**cfg.weights, "fc": b})
    with pytest.raises(ValueError, match="act_bits"):
        BitConfig(cfg.weights, act_bits=16)
    with pytest.raises(ValueError, match="unknown BitConfig field"):
        BitConfig.from_dict({"weights": {}, "wbits": 3})
    with pytest.raises(ValueError, match="does not parse"):
        BitConfig.from_json("{oops")


# --------------------------------------------------------------------------------- quantize_model

def test_quantize_model_swaps_exactly_the_configured_modules():
    torch.manual_seed(0)
    m = resnet20()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = _mixed(m)
    q = quantize_model(m, cfg)
    # input untouched
    assert not any(isinstance(x, (QuantConv2d, QuantLinear, QuantAct)) for x in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    qm = dict(quant_modules(q))
    assert list(qm) == list(cfg.weights)
    for name, mod in qm.items():
        assert mod.weight_bits == cfg.weights[name]
        assert isinstance(mod, QuantLinear if name == "fc" else QuantConv2d)
        assert torch.equal(mod.weight, before[name + ".weight"])
        assert mod.weight is not m.get_submodule(name).weight
        if name == "conv1":
            assert mod.act_quant is None            # the image input stays FP32
        else:
            assert mod.act_quant.bits == 4
    # no other module changed type
    types_m = {n: type(x) for n, x in m.named_modules() if n not in qm}
    types_q = {n: type(x) for n, x in q.named_modules() if n not in qm and ".act_quant" not in n}
    assert types_m == types_q
    assert q.bit_config == cfg


def test_quantize_model_act_bits_and_granularity():
    m = resnet20()
    q = quantize_model(m, BitConfig.uniform(m, 4), act_bits=None)
    assert not any(isinstance(x, QuantAct) for x in q.modules())
    q = quantize_model(m, BitConfig.uniform(m, 4, act_bits=8), act_bits=2)
    assert {x.bits for x in q.modules() if isinstance(x, QuantAct)} == {2} and q.bit_config.act_bits == 2
    cfg = BitConfig.uniform(m, 4, granularity="residual")
    cfg.weights["layer2.0"] = 2
    q = quantize_model(m, cfg)
    assert q.layer2[0].conv1.weight_bits == 2 and q.layer2[0].conv2.weight_bits == 2
    assert q.layer2[1].conv1.weight_bits == 4
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, cfg)
    with pytest.raises(ValueError, match="missing block"):
        quantize_model(m, BitConfig({"conv1": 4}))


def test_quantized_forward_backward_and_set_quant_enabled():
    torch.manual_seed(0)
    m = resnet20()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = quantize_model(m, _mixed(m))
    calibrate_activations(q, [x])
    q.eval()
    m.eval()
    assert not torch.equal(q(x), m(x))
    set_quant_enabled(q, None, False)
    assert torch.equal(q(x), m(x))           # everything disabled: the FP32 network exactly
    set_quant_enabled(q, ["layer1.0.conv1"], True)
    assert q.layer1[0].conv1.quant_enabled and q.layer1[0].conv1.act_quant.enabled
    assert not q.layer1[0].conv2.quant_enabled
    assert not torch.equal(q(x), m(x))
    set_quant_enabled(q, None, True)
    q.train()
    q(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in q.named_parameters() if n.endswith("weight"))
    with pytest.raises(ValueError, match=r"unknown block\(s\) \['nope'\]; valid block names"):
        set_quant_enabled(q, ["nope"], True)


def test_calibrate_activations_leaves_batchnorm_alone():
    m = resnet20()
    q = quantize_model(m, BitConfig.uniform(m, 4, act_bits=4))
    bn = {k: v.clone() for k, v in q.state_dict().items() if "bn" in k}
    xs = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert calibrate_activations(q, xs, num_batches=2) == 2
    assert all(a.has_range() for a in q.modules() if isinstance(a, QuantAct))
    assert all(torch.equal(bn[k], v) for k, v in q.state_dict().items() if "bn" in k)
    assert q.training                                    # mode restored
    q.eval()(xs[2])    # evaluates without complaint


def test_quant_act_training_path_matches_torch_with_and_without_saturation():
    """In training the clamp and mask are skipped when nothing saturates: outputs and gradients stay torch's."""
    a = QuantAct(4, rule="minmax").train()
    g = torch.Generator().manual_seed(3)
    paths = set()
    for i in range(12):
        x = (torch.randn(8, 4, 6, 6, generator=g) * (1 + 0.2 * (i % 5))).relu()
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(x.shape, generator=g)
        y = a(x)
        (y * w).sum().backward()
        xr = x.detach().clone().requires_grad_()
        yr = torch.fake_quantize_per_tensor_affine(xr, a.scale, a.zero_point, 0, 15)
        (yr * w).sum().backward()
        assert torch.equal(y, yr) and torch.equal(x.grad, xr.grad)
        paths.add(bool((xr.grad == 0).any()))
    assert paths == {True, False}          # both the saturating and the non-saturating path ran


def test_fixed_scale_clips_and_masks_the_gradient():
    conv = QuantConv2d(2, 3, 1, weight_bits=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.1, 0.9, 1.7, -3.0, 0.0, -0.2]).view(3, 2, 1, 1))
    conv.fixed_scale = torch.tensor([0.2, 0.5, 1.0])   # half-steps: levels +-h, +-3h
    codes = torch.tensor([1, 3, 3, -3, 1, -1])
    qw = conv.quantized_weight()
    assert torch.equal(qw.detach(), (codes.float().view(3, 2) * conv.fixed_scale.view(3, 1)).view(3, 2, 1, 1))
    qw.sum().backward()
    # 0.9 (h = 0.2) and -3.0 (h = 0.5) lie beyond 4h, where the code saturates: no gradient there
    assert conv.weight.grad.view(-1).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    k, s = conv.int_weight()
    assert k.view(-1).tolist() == codes.tolist() and torch.equal(s, conv.fixed_scale)


def test_quantize_model_weight_rule_reaches_every_module_and_the_packed_codes():
    model = resnet20().eval()
    bc = BitConfig.uniform(model, 3)
    for rule in ("mse", "max"):
        q = quantize_model(model, bc, weight_rule=rule)
        mods = quant_modules(q)
        assert mods and all(m.weight_rule == rule for _, m in mods)
        for _, m in mods:
            expect = quantize_tensor(m.weight.detach(), 3, rule=rule)
            assert torch.equal(m.quantized_weight().detach(), expect)
            k, s = m.int_weight()
            assert torch.equal(k.float() * s.view(-1, *([1] * (k.dim() - 1))), expect)
    with pytest.raises(ValueError, match="unknown scale rule 'l1'"):
        quantize_model(model, bc, weight_rule="l1")


# ------------------------------------------------------------------------- activation range rule "mse"

def _grid_error(x, lo, hi, bits):
    qmax = 2 ** bits - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    s = (hi - lo) / qmax
    zp = min(max(-round(lo / s), 0), qmax)
    return float(((torch.clamp(torch.round(x / s) + zp, 0, qmax) - zp) * s - x).square().sum())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_act_mse_range_is_the_best_shrink_and_clips_a_long_tail(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4000, generator=g).relu() ** 2          # long right tail, like activations after ReLU
    lo, hi = act_mse_range(x, bits)
    errs = [_grid_error(x, 0.0, x.max() * k / ACT_MSE_STEPS, bits) for k in range(1, ACT_MSE_STEPS + 1)]
    best = min(range(ACT_MSE_STEPS), key=lambda k: errs[k])
    assert float(lo) == 0.0
    assert abs(float(hi) - float(x.max()) * (best + 1) / ACT_MSE_STEPS) < 1e-5 * float(x.max())
    if bits <= 4:   # few levels: clipping the tail pays; the max |x| grid is worse
        assert float(hi) < float(x.max()) and errs[best] < errs[-1]


def test_act_mse_range_signed_input_shrinks_both_ends():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * 1.5 + 0.5
    lo, hi = act_mse_range(x, 4)
    f = float(hi / x.max())
    assert 0 < f < 1 and abs(float(lo / x.min()) - f) < 1e-6


def test_act_mse_sample_visits_every_channel_of_a_channels_last_tensor():
    # value = channel index; the batch is larger than the sample, so it is strided
    x = torch.arange(16.0).view(1, 16, 1, 1).expand(64, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    from hawqlib.quant.observer import _strided_sample
    sample = _strided_sample(x.permute(0, 2, 3, 1), 8192)
    assert 7000 < sample.numel() <= 8192 and set(sample.unique().tolist()) == set(range(16))


def test_quant_act_mse_rule_moves_the_range_by_the_moving_average():
    a = QuantAct(4).train()
    assert a.rule == "mse"
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(8, 4, 6, 6, generator=g).relu() ** 2, torch.randn(8, 4, 6, 6, generator=g).relu() * 3
    a(x1)
    lo1, hi1 = act_mse_range(x1, 4)
    assert torch.equal(a.running_max, hi1) and a.running_max < x1.max() and a.zero_point.item() == 0
    _, hi2 = act_mse_range(x2, 4)
    a(x2)
    assert torch.allclose(a.running_max, hi1 + 0.01 * (hi2 - hi1))
    # the output and gradient are still torch's fake quantization on the grid it chose
    x = x2.clone().requires_grad_()
    a.eval()
    y = a(x)
    y.sum().backward()
    xr = x2.clone().requires_grad_()
    yr = torch.fake_quantize_per_tensor_affine(xr, a.scale, a.zero_point, 0, 15)
    yr.sum().backward()
    assert torch.equal(y, yr) and torch.equal(x.grad, xr.grad)


def test_act_rule_reaches_every_quant_act_and_bad_rules_are_named():
    model = resnet20().eval()
    bc = BitConfig.uniform(model, 4, act_bits=4)
    for rule in ("mse", "minmax"):
        acts = [m for m in quantize_model(model, bc, act_rule=rule).modules() if isinstance(m, QuantAct)]
        assert acts and all(a.rule == rule for a in acts)
    with pytest.raises(ValueError, match="unknown activation range rule 'max'.*'minmax'"):
        quantize_model(model, bc, act_rule="max")
    with pytest.raises(ValueError, match="unknown activation range rule"):
        QuantAct(4, rule="p99")


# ------------------------------------------------------------------------- quantized state in the state dict

def _config(q):
    """Everything a quantized model's modules are configured and switched to, by module name."""
    out = {}
    for n, m in quant_modules(q):
        a = m.act_quant
        out[n] = (m.weight_bits, m.weight_rule, m.quant_enabled,
                  None if m.fixed_scale is None else m.fixed_scale.tolist(),
                  None if a is None else (a.bits, a.rule, a.averaging_constant, a.enabled, a.observe,
                                          a.quant_min, a.quant_max, a.grad_inplace, a.training))
    return out


def _roundtrip(sd):
    """``sd`` through torch.save and a weights-only torch.load, as stored artifacts are read."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _step(q, x):
    """Output and parameter gradients of one training-mode step (observing, BatchNorm in batch mode)."""
    q.train()
    q.zero_grad(set_to_none=True)
    y = q(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in q.named_parameters()}


@pytest.mark.parametrize("saved_act_bits, fresh_act_bits", [(3, None), (None, 4)])
def test_state_dict_restores_bits_rules_flags_and_scales(saved_act_bits, fresh_act_bits):
    """A saved state dict restores the quantized model into one quantized with other defaults: same config, outputs."""
    torch.manual_seed(0)
    m = resnet20()
    xs = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    saved = quantize_model(m, _mixed(m, saved_act_bits), weight_rule="max", act_rule="minmax")
    calibrate_activations(saved, xs[:2])
    names = list(saved.bit_config.weights)
    set_quant_enabled(saved, names[1::3], False)                     # mid staged fine-tuning
    conv = saved.layer2[0].conv2
    conv.fixed_scale = conv.weight_qparams()[0] * 1.25                # as hawqlib.export.load_packed sets it
    if saved_act_bits is not None:
        saved.layer3[1].conv1.act_quant.observe = False               # forced off: frozen even in training
        saved.layer1[2].conv2.act_quant.averaging_constant = 0.25
    sd = _roundtrip(saved.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in sd.values())

    fresh = quantize_model(m, BitConfig.uniform(m, 8, fresh_act_bits))   # other bits, rules, flags, structure
    assert _config(fresh) != _config(saved)
    fresh.load_state_dict(sd)                                         # strict
    assert _config(fresh) == _config(saved)
    assert fresh.bit_config == saved.bit_config
    assert fresh.state_dict().keys() == saved.state_dict().keys()
    saved.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(xs[2]), saved(xs[2]))
    for (ya, ga), (yb, gb) in [(_step(saved, x), _step(fresh, x)) for x in xs]:
        assert torch.equal(ya, yb) and ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in saved.state_dict().items())


def test_state_dict_written_before_the_quantized_state_loads_as_before():
    """An old state dict (no switches, no extra state) loads strictly and leaves the module's own flags and config."""
    torch.manual_seed(0)
    m = resnet20()
    xs = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    saved = quantize_model(m, _mixed(m))
    calibrate_activations(saved, xs[:1])
    set_quant_enabled(saved, None, False)
    optional = {f"{n}.{k}" for n, mod in saved.named_modules() for k in getattr(mod, "optional_state_keys", ())}
    old = {k: v for k, v in saved.state_dict().items() if k not in optional}
    assert len(old) < len(saved.state_dict()) and not any(k.endswith(("_extra_state", "enabled")) for k in old)

    fresh = quantize_model(m, _mixed(m), weight_rule="max")
    fresh.layer1[0].conv1.act_quant.observe = True
    before = _config(fresh)
    result = fresh.load_state_dict(_roundtrip(old))
    assert not result.missing_keys and not result.unexpected_keys
    assert _config(fresh) == before                                   # flags and rules as the module had them
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in old.items())
    with pytest.raises(RuntimeError, match="Missing key"):            # a weight is still required
        fresh.load_state_dict({k: v for k, v in old.items() if k != "fc.weight"})


def test_bad_extra_state_is_named():
    conv = QuantConv2d(2, 3, 1, weight_bits=2)
    sd = conv.state_dict()
    with pytest.raises(ValueError, match="hawqlib.QuantWeight/1"):
        conv.load_state_dict({**sd, "_extra_state": QuantAct(4).get_extra_state()})
    with pytest.raises(ValueError, match="weight_bits must be an integer in 1..8"):
        conv.set_extra_state({"format": "hawqlib.QuantWeight/1", "weight_bits": 9, "weight_rule": "mse"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['x'\]"):
        QuantAct(4).set_extra_state({"format": "hawqlib.QuantAct/1", "bits": 4, "rule": "mse",
                                     "averaging_constant": 0.01, "x": 1})
    assert conv.weight_bits == 2


@pytest.mark.parametrize("device", DEVICES)
def test_union_calibration_on_the_model_device(device):
    """Default calibration (all batches at once): batches scaled x1, x10, x10, x10 give the range of the x10 ones,
    where the moving average stays near the first batch's; the buffers stay on the model's device."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 3)).to(device)
    g = torch.Generator().manual_seed(1)
    xs = [(torch.rand(8, 3, 8, 8, generator=g) * f).to(device) for f in (1.0, 10.0, 10.0, 10.0)]
    his = {}
    for rule in ("union", "moving_average"):
        q = quantize_model(net, BitConfig.uniform(net, 8, act_bits=8), act_rule="minmax")
        assert calibrate_activations(q, xs, calibration=rule) == 4
        act = q[2].act_quant
        his[rule] = float(act.running_max)
        assert act.scale.device.type == device and act.running_max.device.type == device
        if rule == "union":  # the largest input over the four batches (8-bit weights: within 2% of FP32's)
            with torch.no_grad():
                top = max(float(net[1](net[0](x)).max()) for x in xs)
            assert float(act.running_max) == pytest.approx(top, rel=0.02)
    assert his["moving_average"] < 0.5 * his["union"]
    with pytest.raises(ValueError, match="unknown calibration 'ema'"):
        calibrate_activations(q, xs, calibration="ema")
