"""hawqlib.size (the accounting) and hawqlib.export (the real bit-packed file)."""
import math

import numpy as np
import pytest
import torch

from hawqlib.blocks import quant_blocks
from hawqlib.export import load_packed, pack_bits, read_header, save_packed, unpack_bits
from hawqlib.models import resnet20
from hawqlib.quant import BitConfig, QuantAct, quant_modules, quantize_model
from hawqlib.size import (activation_compression, compression_ratio, fp32_size_bytes, model_size_bytes,
                          size_table, weight_compression)

RESNET20_PARAMS = 269_722


def _mixed(model, act_bits=4):
    """Every bit width 1..8 across ResNet20's 20 layers."""
    names = [b.name for b in quant_blocks(model)]
    return BitConfig({n: (1, 2, 3, 4, 5, 6, 7, 8)[i % 8] for i, n in enumerate(names)}, act_bits)


@pytest.fixture(scope="module")
def trained_qmodel():
    """A mixed-precision ResNet20 with non-trivial BatchNorm (affine and running statistics) and activation ranges."""
    torch.manual_seed(0)
    m = resnet20()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
            bn.weight.copy_(1 + 0.3 * torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(0.2 * torch.randn(bn.num_features, generator=g))
        q = quantize_model(m, _mixed(m))
        q.train()(torch.randn(8, 3, 32, 32, generator=g))   # BN statistics and activation ranges
    assert all(float(bn.running_var.sub(1).abs().max()) > 0 for bn in q.modules() if isinstance(bn, torch.nn.BatchNorm2d))
    return m, q.eval()


# -------------------------------------------------------------------------------------------- size

def test_fp32_size_is_four_bytes_per_parameter():
    m = resnet20()
    assert sum(p.numel() for p in m.parameters()) == RESNET20_PARAMS
    assert model_size_bytes(m) == fp32_size_bytes(m) == 4 * RESNET20_PARAMS == 1_078_888
    assert compression_ratio(m) == 1.0


def test_quantized_size_by_hand():
    m = resnet20()
    cfg = BitConfig.uniform(m, 4, act_bits=4)
    blocks = quant_blocks(m)
    weights = sum(math.ceil(b.numel * 4 / 8) for b in blocks)
    scales = 4 * sum(b.modules[0].weight.shape[0] for b in blocks)
    bn = 4 * 2 * sum(x.num_features for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d))
    bias = 4 * m.fc.bias.numel()
    acts = 8 * (len(blocks) - 1)                     # every quantized layer's input but the image
    expect = weights + scales + bn + bias + acts
    assert model_size_bytes(m, cfg) == expect
    q = quantize_model(m, cfg)
    assert model_size_bytes(q) == expect            # the same figure, read off the quantized model
    assert sum(isinstance(x, QuantAct) for x in q.modules()) == len(blocks) - 1
    assert compression_ratio(m, cfg) == pytest.approx(1_078_888 / expect)
    assert model_size_bytes(m, BitConfig.uniform(m, 4)) == expect - acts
    assert weight_compression(m, cfg) == 8.0
    assert weight_compression(m, BitConfig.uniform(m, 2)) == 16.0
    mixed = _mixed(m)
    mean_bits = mixed.mean_bits(m)
    assert weight_compression(m, mixed) == pytest.approx(32 / mean_bits)


def test_activation_compression():
    m = resnet20()
    assert activation_compression(BitConfig.uniform(m, 2, act_bits=4)) == 8.0
    assert activation_compression(BitConfig.uniform(m, 2)) == 1.0
    assert activation_compression(8) == 4.0
    with pytest.raises(ValueError, match=r"activation bits other than None must be an integer in 1\.\.8"):
        activation_compression(0)


def test_size_table_adds_up():
    m = resnet20()
    cfg = _mixed(m)
    table = size_table(m, cfg)
    assert [r["block"] for r in table[:-2]] == list(cfg.weights)
    assert [r["bits"] for r in table[:-2]] == list(cfg.weights.values())
    assert table[-1]["block"] == "total" and table[-1]["bytes"] == model_size_bytes(m, cfg)
    assert sum(r["bytes"] for r in table[:-1]) == table[-1]["bytes"]
    fc = table[-3]
    assert fc["block"] == "fc" and fc["weight_bytes"] == 640 * cfg.weights["fc"] // 8 and fc["scale_bytes"] == 40
    res = size_table(m, BitConfig.uniform(m, 3, granularity="residual"))
    assert len(res) == 11 + 2 and res[-1]["bytes"] == model_size_bytes(m, BitConfig.uniform(m, 3, granularity="residual"))


def test_size_rejects_a_mismatched_config():
    m = resnet20()
    with pytest.raises(ValueError, match=r"missing block\(s\)"):
        model_size_bytes(m, BitConfig({"conv1": 4}))


# ------------------------------------------------------------------------------------------ export

@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_roundtrip(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 7, 8, 1001):
        v = rng.integers(0, 2 ** bits, n).astype(np.uint8)
        data = pack_bits(v, bits)
        assert len(data) == math.ceil(n * bits / 8)
        assert np.array_equal(unpack_bits(data, bits, n), v)
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(np.array([3, 2 ** bits]), bits)
    with pytest.raises(ValueError, match=r"bits must be an integer in 1\.\.8"):
        pack_bits(v, 9)


def test_pack_load_roundtrip_identical_outputs(trained_qmodel, tmp_path):
    m, q = trained_qmodel
    path = tmp_path / "r20.hpk"
    n = save_packed(q, path, arch="resnet20")
    assert path.stat().st_size == n
    header = read_header(path)
    assert header["bit_config"]["weights"] == q.bit_config.weights and header["arch"] == "resnet20"
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = q(x)
        loaded = load_packed(path, resnet20)
        assert not loaded.training
        assert torch.equal(loaded(x), ref)                  # bit for bit
        for (name, a), (_, b) in zip(quant_modules(loaded), quant_modules(q)):
            assert a.weight_bits == b.weight_bits
            assert torch.equal(a.quantized_weight(), b.quantized_weight()), name
        # from an instance, or from the recorded arch: the same tensors, hence the same outputs
        sd = loaded.state_dict()
        for other in (load_packed(path, m), load_packed(path)):
            osd = other.state_dict()
            assert osd.keys() == sd.keys() and all(torch.equal(osd[k], sd[k]) for k in sd)
            assert all(x.eps == 0.0 for x in other.modules() if isinstance(x, torch.nn.BatchNorm2d))
        # channels_last inference too
        lc = loaded.to(memory_format=torch.channels_last)
        assert torch.equal(lc(x.contiguous(memory_format=torch.channels_last)), ref)
    # the template model is untouched
    assert not any(isinstance(x, QuantAct) for x in m.modules())


def test_packed_file_size_matches_the_accounting(trained_qmodel, tmp_path):
    _, q = trained_qmodel
    n = save_packed(q, tmp_path / "a.hpk")
    expect = model_size_bytes(q)
    assert expect < n <= 1.02 * expect
    m = resnet20()
    for bits in (2, 8):
        qq = quantize_model(m, BitConfig.uniform(m, bits))   # no activation quantizers: none to calibrate
        n = save_packed(qq, tmp_path / f"u{bits}.hpk")
        assert model_size_bytes(qq) < n <= 1.02 * model_size_bytes(qq)


def test_export_errors(trained_qmodel, tmp_path):
    m, q = trained_qmodel
    with pytest.raises(ValueError, match="quantized model"):
        save_packed(m, tmp_path / "x.hpk")
    with pytest.raises(ValueError, match="unknown arch 'resnet21'"):
        save_packed(q, tmp_path / "x.hpk", arch="resnet21")
    fresh = quantize_model(m, _mixed(m))
    with pytest.raises(ValueError, match="has no range yet"):
        save_packed(fresh, tmp_path / "x.hpk")
    path = tmp_path / "ok.hpk"
    save_packed(q, path)
    with pytest.raises(ValueError, match="records no architecture"):
        load_packed(path)
    data = path.read_bytes()
    (tmp_path / "trunc.hpk").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_packed(tmp_path / "trunc.hpk", resnet20)
    (tmp_path / "bad.hpk").write_bytes(b"NOTAPACK" + data[8:])
    with pytest.raises(ValueError, match="bad magic"):
        load_packed(tmp_path / "bad.hpk", resnet20)
    from hawqlib.models import resnet20 as r20
    with pytest.raises(ValueError, match="does not match"):
        load_packed(path, lambda: r20(num_classes=100))


# ------------------------------------------------------------------- every tensor of the model, on any device

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


class _Shift(torch.nn.Module):
    """A module whose persistent float buffer changes its output (dropped, the restored model would differ)."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("shift", torch.zeros(1, c, 1, 1))

    def forward(self, x):
        return x + self.shift


def _net_with_every_kind():
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4, affine=False), _Shift(4),
                              torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 5))
    with torch.no_grad():
        net[2].shift.normal_()
    return net


@pytest.mark.parametrize("device", DEVICES)
def test_every_parameter_and_buffer_round_trips_on_any_device(device, tmp_path):
    net = _net_with_every_kind()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, 6, 6, generator=g)
    q = quantize_model(net, BitConfig.uniform(net, 4, act_bits=8)).to(device)
    with torch.no_grad():
        q.train()(x.to(device))                       # BN statistics (the non-affine one's too), activation ranges
    q.eval()
    save_packed(q, tmp_path / "m.hawq")               # where the model lives: no CPU copy needed
    assert {e[0] for e in read_header(tmp_path / "m.hawq")["entries"]} == {"q", "bn", "bn0", "b", "f", "act"}
    restored = load_packed(tmp_path / "m.hawq", _net_with_every_kind)
    with torch.no_grad():
        if device == "cpu":
            assert torch.equal(restored(x), q(x))     # bit for bit
        else:                                         # another device's kernels: rounding apart
            assert torch.allclose(restored(x), q(x.to(device)).cpu(), atol=1e-5)
        assert torch.equal(restored[2].shift, q[2].shift.cpu())


def test_a_tensor_the_format_cannot_hold_is_refused_at_save_time_naming_its_module(tmp_path):
    net = _net_with_every_kind()
    net[2].register_buffer("steps", torch.zeros(3, dtype=torch.int64))
    q = quantize_model(net, BitConfig.uniform(net, 4))
    with pytest.raises(ValueError, match="int64 buffer '2.steps' of module '2'"):
        save_packed(q, tmp_path / "m.hawq")
    assert not (tmp_path / "m.hawq").exists()
    net = _net_with_every_kind()
    net[2].register_buffer("steps", torch.zeros(3, dtype=torch.int64), persistent=False)  # rebuilt: not part of it
    save_packed(quantize_model(net, BitConfig.uniform(net, 4)), tmp_path / "m.hawq")


def test_a_batchnorm_without_affine_parameters_is_not_confused_with_one_that_has_them(tmp_path):
    net = _net_with_every_kind()
    q = quantize_model(net, BitConfig.uniform(net, 4))
    save_packed(q.eval(), tmp_path / "m.hawq")

    def affine_everywhere():
        n = _net_with_every_kind()
        n[1] = torch.nn.BatchNorm2d(4)
        return n
    with pytest.raises(ValueError, match=r"missing records \['bn 1'\], records the model lacks \['bn0 1'\]"):
        load_packed(tmp_path / "m.hawq", affine_everywhere)
