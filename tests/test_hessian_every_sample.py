"""Issue 36: the identity H_i = G_i established on every sample, eigenpairs verified by the exact route's own
operator, the two loss cases that were wrong, the model's state on every path, and the device the model lives on.

Every case is compared with the dense float64 Hessian (tests/_dense_hessian.py) within 1e-6 (relative), or must
give one clear error.
"""
from __future__ import annotations

import pytest
import torch
from _dense_hessian import exact_hessian
from torch import nn

from hawqlib import hessian as H
from hawqlib.blocks import quant_blocks
from hawqlib.hessian.inputs import spread_indices

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-6
TIGHT = dict(tol=1e-10, max_iter=400, progress=False)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device here"))]


def dense_top(model, loss_fn, data, block) -> float:
    ev = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, data, block))
    return float(ev[ev.abs().argmax()])


def dense_trace(model, loss_fn, data, block) -> float:
    return float(exact_hessian(model, loss_fn, data, block).diagonal().sum())


def close(value, exact, rtol=RTOL):
    return abs(value - exact) <= rtol * abs(exact)


def mlp(seed=0, act=None):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), act or nn.ReLU(), nn.Linear(8, 4)).double()


def small_cnn(seed=0, bn=None):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3, padding=1)] + ([bn] if bn is not None else [])
    layers += [nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 4)]
    return nn.Sequential(*layers).double()


def vectors(n=100, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def images(n=40, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


# --------------------------------------------------------------------------- 1: the identity on every sample

class RareSquare(nn.Module):
    """ReLU, except on bright samples (mean |input| > 5), which are squared: a smooth branch only they take."""

    def forward(self, x):
        bright = x.abs().mean(1) > 5.0
        out = torch.relu(x)
        if bool(bright.any()):
            out = torch.where(bright[:, None], x * x, out)
        return out


def rare_case():
    """100 samples, two bright ones outside the proof's spread sample (so the proof alone cannot see them)."""
    x, y = vectors()
    proof = set(spread_indices(len(x), 8, 0))
    rare = [i for i in range(len(x)) if i not in proof][40:42]
    x[rare] = x[rare] * 30.0
    return mlp(act=RareSquare()), (x, y)


def test_a_smooth_branch_taken_by_two_rare_inputs_sends_its_layer_to_autograd():
    model, data = rare_case()
    ce = nn.CrossEntropyLoss()
    b0, b1 = quant_blocks(model)
    with pytest.warns(RuntimeWarning, match="block '0'.*not linear or piecewise linear.*MulBackward0"):
        res = H.top_eigenvalues(model, ce, data, chunk_size=16, **TIGHT)
    assert res[0].method == "autograd" and close(res[0].eigenvalue, dense_top(model, ce, data, b0))
    # nothing follows the last layer: its identity holds everywhere and it stays on the Gauss-Newton route
    assert res[1].method == "gauss-newton" and close(res[1].eigenvalue, dense_top(model, ce, data, b1))
    assert all(r.converged for r in res)


def test_traces_are_covered_by_the_every_sample_check():
    model, data = rare_case()
    ce = nn.CrossEntropyLoss()
    blocks = quant_blocks(model)
    exact = [dense_trace(model, ce, data, b) for b in blocks]
    with pytest.warns(RuntimeWarning, match="block '0'.*not linear or piecewise linear"):
        tr = H.traces(model, ce, data, chunk_size=16, progress=False)
    assert tr[0].method == "autograd" and tr[1].method == "gauss-newton"
    assert all(t.exact and close(t.trace, e) for t, e in zip(tr, exact)), (tr, exact)


def test_the_rare_branch_fools_the_proof_alone(monkeypatch):
    """The case is real: with the every-sample check blind, the Gauss-Newton trace is silently wrong."""
    import hawqlib.hessian.identity as identity

    monkeypatch.setattr(identity, "_why_not_linear", lambda node, deps: None)
    model, data = rare_case()
    ce = nn.CrossEntropyLoss()
    t = H.traces(model, ce, data, chunk_size=16, progress=False)[0]
    assert t.method == "gauss-newton" and not close(t.trace, dense_trace(model, ce, data, quant_blocks(model)[0]),
                                                    1e-3)


def test_forced_gauss_newton_raises_one_line_where_the_identity_fails():
    model, data = rare_case()
    for call in (H.top_eigenvalues, H.traces):
        with pytest.raises(H.HessianError, match="block '0'.*not linear or piecewise linear") as e:
            call(model, nn.CrossEntropyLoss(), data, [quant_blocks(model)[0]], method="gauss-newton",
                 chunk_size=16, progress=False)
        assert "\n" not in str(e.value)


def test_piecewise_linear_networks_keep_the_gauss_newton_route_without_warnings():
    import warnings

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(0.1), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Dropout(0.5), nn.Linear(16, 4)).double()
    model.train()  # eval mode inside: BatchNorm on running statistics, dropout off
    data = images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = H.top_eigenvalues(model, nn.CrossEntropyLoss(), data, chunk_size=16, **TIGHT)
    assert [r.method for r in res] == ["gauss-newton"] * 3
    for r, b in zip(res, quant_blocks(model)):
        assert close(r.eigenvalue, dense_top(model, nn.CrossEntropyLoss(), data, b))


# --------------------------------------------------------------------------- 2: verification by the route's operator

def test_verification_options():
    model, data = small_cnn(), images()
    ce = nn.CrossEntropyLoss()
    default = H.top_eigenvalues(model, ce, data, tol=1e-8, progress=False)
    auto = H.top_eigenvalues(model, ce, data, tol=1e-8, progress=False, verify="autograd")
    unv = H.top_eigenvalues(model, ce, data, tol=1e-8, progress=False, verify=False)
    for d, a, u, b in zip(default, auto, unv, quant_blocks(model)):
        assert d.method == "gauss-newton" and "float64 product" in d.note and "autograd product" in a.note
        assert "unverified" in u.note and u.residual == u.history[-1]
        assert d.eigenvalue == a.eigenvalue == u.eigenvalue and d.converged and a.converged
        assert d.residual <= 1e-8 and a.residual <= 1e-8
        assert close(d.eigenvalue, dense_top(model, ce, data, b))
    # stopped early: the fresh product says so, with a warning naming the block
    with pytest.warns(RuntimeWarning, match="block '0'.*fails its exact verification.*not converged"):
        r = H.top_eigenvalues(model, ce, data, [quant_blocks(model)[0]], max_iter=2, progress=False)[0]
    assert not r.converged and r.residual > 1e-4
    with pytest.raises(ValueError, match="unknown verify 'yes'"):
        H.top_eigenvalues(model, ce, data, verify="yes", progress=False)


# --------------------------------------------------------------------------- 3: the two loss cases, the state

def test_traces_under_ignore_index_use_the_factor_of_all_the_data():
    model, (x, y) = mlp(), vectors()
    y = y.clone()
    y[70:] = -100  # the last 30 unlabelled: the first chunks of 32 hold no ignored target
    ce = nn.CrossEntropyLoss()
    for method in ("gauss-newton", "autograd"):
        tr = H.traces(model, ce, (x, y), method=method, chunk_size=32, progress=False)
        for t, b in zip(tr, quant_blocks(model)):
            assert t.method == method and close(t.trace, dense_trace(model, ce, (x, y), b)), (method, t)
    res = H.top_eigenvalues(model, ce, (x, y), chunk_size=32, **TIGHT)
    for r, b in zip(res, quant_blocks(model)):
        assert r.method == "gauss-newton" and close(r.eigenvalue, dense_top(model, ce, (x, y), b))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_class_weight_zero_with_label_smoothing(kind):
    model, (x, y) = (mlp(), vectors(n=48)) if kind == "mlp" else (small_cnn(), images(n=48))
    y = y.clone()
    y[:16] = 0  # the first chunk all of class 0, whose weight is 0: smoothing still gives it a loss
    y[16:][y[16:] == 0] = 1
    loss = nn.CrossEntropyLoss(weight=torch.tensor([0.0, 1.0, 2.0, 0.5], dtype=torch.float64), label_smoothing=0.2)
    blocks = quant_blocks(model)
    exact = [dense_top(model, loss, (x, y), b) for b in blocks]
    traces = [dense_trace(model, loss, (x, y), b) for b in blocks]
    for method in ("autograd", "gauss-newton"):
        res = H.top_eigenvalues(model, loss, (x, y), method=method, chunk_size=16, **TIGHT)
        for r, e in zip(res, exact):
            assert r.method == method and r.converged and close(r.eigenvalue, e), (method, r, e)
        tr = H.traces(model, loss, (x, y), method=method, chunk_size=16, exact_max=1000, progress=False)
        for t, e in zip(tr, traces):
            assert close(t.trace, e), (method, t, e)


class StubbornBN(nn.BatchNorm2d):
    """A BatchNorm whose train() ignores mode=False (so model.eval() leaves it on batch statistics)."""

    def train(self, mode=True):
        return super().train(True)


def test_every_buffer_and_mode_restored_on_errors():
    model = small_cnn(bn=StubbornBN(4).double())
    model.train()
    model[2].eval()  # a mixed state to restore
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (H.top_eigenvalues, H.traces):
        with pytest.raises(H.HessianError, match="depends on the other samples"):
            call(model, nn.CrossEntropyLoss(), images(), progress=False)
        assert [m.training for m in model.modules()] == modes
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- 4: where the model lives

@pytest.mark.parametrize("device", DEVICES)
def test_the_hessian_runs_where_the_model_lives(device):
    model, (x, y) = small_cnn(), images()
    ce = nn.CrossEntropyLoss()
    blocks = quant_blocks(model)
    exact = [dense_top(model, ce, (x, y), b) for b in blocks]
    traces = [dense_trace(model, ce, (x, y), b) for b in blocks]
    model.to(device)
    for method in ("auto", "autograd"):
        for solver in ("lanczos", "power"):
            res = H.top_eigenvalues(model, ce, (x, y), method=method, solver=solver, return_vectors=True,
                                    chunk_size=16, tol=1e-8, max_iter=400, progress=False)
            for r, e in zip(res, exact):
                assert r.converged and close(r.eigenvalue, e), (method, solver, r, e)
                assert all(v.device.type == device for v in r.vector)
        tr = H.traces(model, ce, (x, y), method=method, chunk_size=16, exact_max=10_000, progress=False)
        for t, e in zip(tr, traces):
            assert close(t.trace, e), (method, t, e)
    hv = H.hvp(model, ce, (x, y), "0", torch.ones_like(model[0].weight))
    assert hv[0].device.type == device
