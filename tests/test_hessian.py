"""hawqlib.hessian against the exact Hessian (torch.autograd.functional.hessian) of tiny float64 models."""
from __future__ import annotations

import math

import pytest
import torch
from _dense_hessian import exact_hessian
import torch.nn.functional as F
from torch import nn

from hawqlib import hessian as H
from hawqlib.blocks import Block, quant_blocks

RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 models gain nothing from threads, and on an oversubscribed CPU a second thread makes
    every small op wait for the scheduler (measured here: 10x slower); restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- tiny models

def _bn_eval_stats(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) - 0.5)
    return model


def mlp(act=nn.ReLU):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 7), act(), nn.Linear(7, 4)).double()


def cnn():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(24, 5)).double()
    return _bn_eval_stats(m)


class Res(nn.Module):
    """A basic residual block: the ``shortcut`` attribute makes it one block at "residual" granularity."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.ReLU(), Res(2),
                      nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8, 4)).double()
    return _bn_eval_stats(m)


class HiddenGelu(nn.Module):
    """A smooth activation the module scan cannot see (a functional call in forward)."""

    def forward(self, x):
        return F.gelu(x)


def data_img(n=12, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


def data_vec(n=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, generator=g, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=g))


_EXACT: dict = {}


def exact_cached(case, i, model, loss_fn, data, block):
    """(top eigenvalue by magnitude, trace) of the dense Hessian of block ``i`` of a CASES entry, computed once."""
    if (case, i) not in _EXACT:
        Hm = exact_hessian(model, loss_fn, data, block)
        _EXACT[case, i] = (top_abs(Hm), float(Hm.trace()))
    return _EXACT[case, i]


def top_abs(Hm):
    ev = torch.linalg.eigvalsh(Hm)
    return float(ev[ev.abs().argmax()])


CASES = {
    "mlp": (mlp, data_vec, nn.CrossEntropyLoss(), "layer"),
    "cnn": (cnn, data_img, nn.CrossEntropyLoss(), "layer"),
    "resnet-residual": (resnet, lambda: data_img(classes=4), nn.CrossEntropyLoss(), "residual"),
    "mlp-tanh": (lambda: mlp(nn.Tanh), data_vec, nn.CrossEntropyLoss(), "layer"),
}


# --------------------------------------------------------------------------- eigenvalues

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("solver", ["lanczos", "power"])
def test_eigenvalues_match_dense_hessian(case, solver):
    make, mk_data, loss_fn, gran = CASES[case]
    model, data = make(), mk_data()
    blocks = quant_blocks(model, gran)
    exact = [exact_cached(case, i, model, loss_fn, data, b)[0] for i, b in enumerate(blocks)]
    methods = ["autograd", "auto"]
    if all(H.gauss_newton_exact(model, loss_fn, b)[0] for b in blocks):
        methods.append("gauss-newton")
    tol = 1e-6 if solver == "power" else 1e-9  # power: eigenvalue error ~ tol^2, far below RTOL
    kw = dict(tol=tol, max_iter=3000 if solver == "power" else 300)
    for method in methods:
        res = H.top_eigenvalues(model, loss_fn, data, blocks, method=method, solver=solver,
                                progress=False, **kw)
        assert [r.name for r in res] == [b.name for b in blocks]
        for r, e, b in zip(res, exact, blocks):
            assert r.converged, (case, method, r)
            assert abs(r.eigenvalue - e) <= RTOL * abs(e), (case, method, solver, r.name, r.eigenvalue, e)
            assert r.numel == b.numel and r.solver == solver and r.iterations == len(r.history)
            assert r.history[-1] <= tol and r.residual < 1e-5


def test_auto_picks_gauss_newton_where_exact_and_autograd_elsewhere():
    x, y = data_img()
    res = H.top_eigenvalues(cnn(), nn.CrossEntropyLoss(), (x, y), progress=False)
    assert [r.method for r in res] == ["gauss-newton"] * 3
    assert {r.note.split(";")[0] for r in res} == {"storage=jacobian", "storage=activation"}
    assert all("proof rel. diff" in r.note for r in res)
    # multi-layer residual block: autograd; single layers around it: Gauss-Newton
    xr, yr = data_img(classes=4)
    res = H.top_eigenvalues(resnet(), nn.CrossEntropyLoss(), (xr, yr), "residual", progress=False)
    assert [(r.name, r.method) for r in res] == [("0", "gauss-newton"), ("2", "autograd"), ("5", "gauss-newton")]
    # smooth activation module: autograd everywhere
    xv, yv = data_vec()
    res = H.top_eigenvalues(mlp(nn.Tanh), nn.CrossEntropyLoss(), (xv, yv), progress=False)
    assert {r.method for r in res} == {"autograd"}
    # MSE loss: not cross-entropy, autograd
    m = mlp()
    target = torch.randn(len(xv), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    res = H.top_eigenvalues(m, nn.MSELoss(), (xv, target), progress=False, tol=1e-8)
    assert {r.method for r in res} == {"autograd"}
    e = top_abs(exact_hessian(m, nn.MSELoss(), (xv, target), quant_blocks(m)[0]))
    assert abs(res[0].eigenvalue - e) <= RTOL * abs(e)


def test_auto_weighs_the_cost_of_gauss_newton_against_autograd():
    """Many classes make Gauss-Newton's storage (C - 1 backward passes per group of layers) costlier than
    autograd's solves: ``auto`` then takes autograd and says why; the eigenvalues are the same Hessian's."""
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 80)).double()  # 80 classes, 2 blocks
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 80, (16,), generator=g)
    loss = nn.CrossEntropyLoss()
    assert 80 > 2 * H.AUTO_SOLVE_PRODUCTS * H.HVP_PASSES  # one group: 80 passes against 2 blocks' solves
    auto = H.top_eigenvalues(wide, loss, (x, y), progress=False, tol=1e-8)
    assert [r.method for r in auto] == ["autograd"] * 2
    assert all("the cheaper exact route here" in r.note and "80 classes" in r.note for r in auto)
    forced = H.top_eigenvalues(wide, loss, (x, y), method="gauss-newton", progress=False, tol=1e-8)
    assert [r.method for r in forced] == ["gauss-newton"] * 2
    for a, f in zip(auto, forced):
        assert abs(a.eigenvalue - f.eigenvalue) <= 1e-6 * abs(f.eigenvalue)
    # the same two blocks with few classes: Gauss-Newton is the cheaper route and is kept
    few = H.top_eigenvalues(mlp(), loss, data_vec(), progress=False)
    assert {r.method for r in few} == {"gauss-newton"}


def test_gauss_newton_refused_where_not_exact():
    xv, yv = data_vec()
    with pytest.raises(H.HessianError, match="smooth module"):
        H.top_eigenvalues(mlp(nn.GELU), nn.CrossEntropyLoss(), (xv, yv), method="gauss-newton", progress=False)
    with pytest.raises(H.HessianError, match="2 layers"):
        H.top_eigenvalues(resnet(), nn.CrossEntropyLoss(), data_img(classes=4), "residual",
                          method="gauss-newton", progress=False)
    with pytest.raises(H.HessianError, match="not cross-entropy"):
        H.top_eigenvalues(mlp(), nn.MSELoss(), (xv, torch.zeros(len(xv), 4, dtype=torch.float64)),
                          method="gauss-newton", progress=False)
    ok, why = H.gauss_newton_exact(mlp(), nn.CrossEntropyLoss(reduction="none"), quant_blocks(mlp())[0])
    assert not ok and "reduction='none'" in why
    # class weights are exact on this route now (tests/test_hessian_trust.py checks the values)
    assert H.gauss_newton_exact(mlp(), nn.CrossEntropyLoss(weight=torch.ones(4)), quant_blocks(mlp())[0])[0]


def test_auto_proof_falls_back_when_a_hidden_smooth_op_breaks_the_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), HiddenGelu(), nn.Linear(8, 4)).double()
    data = data_vec()
    with pytest.warns(RuntimeWarning, match="falling back to autograd"):
        res = H.top_eigenvalues(model, nn.CrossEntropyLoss(), data, progress=False, tol=1e-9, max_iter=300)
    # the every-sample check sees the functional GELU as it runs (the proof would see it too)
    assert res[0].method == "autograd" and "GeluBackward" in res[0].note
    e = top_abs(exact_hessian(model, nn.CrossEntropyLoss(), data, quant_blocks(model)[0]))
    assert abs(res[0].eigenvalue - e) <= RTOL * abs(e)
    # the last layer is followed by no nonlinearity at all: its identity holds and it stays Gauss-Newton
    assert res[1].method == "gauss-newton"


def test_many_batches_chunks_and_memory_groups_give_the_mean_hessian():
    model, (x, y) = cnn(), data_img(n=13)
    blocks = quant_blocks(model)
    exact = [top_abs(exact_hessian(model, nn.CrossEntropyLoss(), (x, y), b)) for b in blocks]
    batches = [(x[:4], y[:4]), (x[4:11], y[4:11]), (x[11:], y[11:])]
    for kw, method in ((dict(chunk_size=3), "gauss-newton"), (dict(chunk_size=5, max_memory=1), "gauss-newton"),
                       (dict(chunk_size=100), "gauss-newton"), (dict(chunk_size=3), "autograd")):
        res = H.top_eigenvalues(model, nn.CrossEntropyLoss(), batches, method=method, tol=1e-9,
                                progress=False, **kw)
        for r, e in zip(res, exact):
            assert abs(r.eigenvalue - e) <= RTOL * abs(e), (kw, method, r)
    # a one-shot generator is accepted too
    res = H.top_eigenvalues(model, nn.CrossEntropyLoss(), iter(batches), tol=1e-9, progress=False)
    assert abs(res[0].eigenvalue - exact[0]) <= RTOL * abs(exact[0])


def test_vectors_are_eigenvectors_and_hvp_is_exact():
    model, data = cnn(), data_img()
    blocks = quant_blocks(model)
    res = H.top_eigenvalues(model, nn.CrossEntropyLoss(), data, return_vectors=True, tol=1e-9, progress=False)
    for r, b in zip(res, blocks):
        Hm = exact_hessian(model, nn.CrossEntropyLoss(), data, b)
        assert [tuple(t.shape) for t in r.vector] == [tuple(p.shape) for p in b.params]
        v = torch.cat([t.reshape(-1) for t in r.vector])
        assert abs(float(v.norm()) - 1) < 1e-12
        assert float((Hm @ v - r.eigenvalue * v).norm()) <= 1e-7 * abs(r.eigenvalue)
        w = torch.randn(b.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        hv = H.hvp(model, nn.CrossEntropyLoss(), data, b, w.view_as(b.params[0]))
        assert torch.allclose(hv[0].reshape(-1), Hm @ w, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="must match the shapes"):
        H.hvp(model, nn.CrossEntropyLoss(), data, blocks[0], torch.zeros(3))


def test_lanczos_beats_power_and_both_stop_on_the_ritz_residual():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    ev = torch.linspace(0.1, 1.0, 60, dtype=torch.float64)
    ev[-1] = 1.05  # a small gap: power iteration is slow
    A = Q @ torch.diag(ev) @ Q.T
    lz = H.lanczos(lambda v: A @ v, 60, tol=1e-8, max_iter=100, generator=torch.Generator().manual_seed(1))
    pw = H.power_iteration(lambda v: A @ v, 60, tol=1e-8, max_iter=5000,
                           generator=torch.Generator().manual_seed(1))
    for theta, y, it, conv, hist in (lz, pw):
        assert conv and hist[-1] <= 1e-8 and len(hist) == it
        assert abs(theta - 1.05) < 1e-12
        assert float((A @ y - theta * y).norm()) < 1e-7
    assert lz[2] * 4 < pw[2]
    theta, y, it, conv, hist = H.power_iteration(lambda v: A @ v, 60, tol=1e-8, max_iter=5,
                                                 generator=torch.Generator().manual_seed(1))
    assert not conv and it == 5 and hist[-1] > 1e-8


# --------------------------------------------------------------------------- traces

@pytest.mark.parametrize("case", list(CASES))
def test_traces_exact(case):
    make, mk_data, loss_fn, gran = CASES[case]
    model, data = make(), mk_data()
    blocks = quant_blocks(model, gran)
    exact = [exact_cached(case, i, model, loss_fn, data, b)[1] for i, b in enumerate(blocks)]
    for method in ("auto", "autograd"):
        res = H.traces(model, loss_fn, data, gran, method=method, exact_max=10_000, progress=False)
        for r, e in zip(res, exact):
            assert r.exact and r.stderr == 0.0
            assert abs(r.trace - e) <= 1e-10 * max(1.0, abs(e)), (case, method, r, e)
    res = H.traces(model, loss_fn, data, gran, progress=False, chunk_size=5)
    if case in ("mlp", "cnn"):
        assert {r.method for r in res} == {"gauss-newton"}


def test_hutchinson_trace_has_an_honest_standard_error():
    model, data = mlp(nn.Tanh), data_vec()
    b = quant_blocks(model)[0]
    e = float(exact_hessian(model, nn.CrossEntropyLoss(), data, b).trace())
    r = H.traces(model, nn.CrossEntropyLoss(), data, [b], exact_max=0, samples=200, seed=3, progress=False)[0]
    assert not r.exact and r.samples == 200 and r.stderr > 0
    assert abs(r.trace - e) <= 4 * r.stderr
    r2 = H.traces(model, nn.CrossEntropyLoss(), data, [b], exact_max=0, samples=200, seed=3, progress=False)[0]
    assert r2.trace == r.trace and r2.stderr == r.stderr


# --------------------------------------------------------------------------- contract

def test_deterministic_bit_for_bit():
    model, data = cnn(), data_img()
    runs = [H.top_eigenvalues(model, nn.CrossEntropyLoss(), data, seed=7, return_vectors=True, progress=False)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert a.eigenvalue == b.eigenvalue and a.history == b.history and a.residual == b.residual
        assert all(torch.equal(u, v) for u, v in zip(a.vector, b.vector))
    other = H.top_eigenvalues(model, nn.CrossEntropyLoss(), data, seed=8, progress=False)
    assert other[0].history != runs[0][0].history


def test_model_state_restored():
    model, data = cnn(), data_img()
    model.train()
    model[1].eval()
    model[0].weight.requires_grad_(False)
    model[3].weight.grad = torch.ones_like(model[3].weight)
    before_grad = model[3].weight.grad
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("auto", "autograd"):
        H.top_eigenvalues(model, nn.CrossEntropyLoss(), data, method=method, progress=False)
        H.traces(model, nn.CrossEntropyLoss(), data, method=method, progress=False)
        H.hvp(model, nn.CrossEntropyLoss(), data, "3", torch.ones_like(model[3].weight))
        assert [m.training for m in model.modules()] == modes
        assert [p.requires_grad for p in model.parameters()] == flags
        assert model[3].weight.grad is before_grad and torch.equal(before_grad, torch.ones_like(before_grad))
        assert all(p.grad is None for n, p in model.named_parameters() if n != "3.weight")
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_errors_name_the_block():
    model, (x, y) = cnn(), data_img()
    ce = nn.CrossEntropyLoss()
    with pytest.raises(H.HessianError, match="empty"):
        H.top_eigenvalues(model, ce, [], progress=False)
    with pytest.raises(H.HessianError, match="empty"):
        H.top_eigenvalues(model, ce, (x[:0], y[:0]), progress=False)
    with pytest.raises(H.HessianError, match="'nothing' has no parameters"):
        H.top_eigenvalues(model, ce, (x, y), [Block("nothing", [], [])], progress=False)
    for method in ("autograd", "auto", "gauss-newton"):
        with pytest.raises(H.HessianError, match="reduction='none'.*scalar"):
            H.top_eigenvalues(model, nn.CrossEntropyLoss(reduction="none"), (x, y), method=method,
                              progress=False)
    with pytest.raises(H.HessianError, match="block '0'.*scalar"):  # a callable: seen on its first value
        H.top_eigenvalues(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), (x, y), method="autograd",
                          progress=False)
    xn = x.clone()
    xn[0, 0, 0, 0] = float("nan")
    for method in ("autograd", "gauss-newton"):
        with pytest.raises(H.HessianError, match="not finite"):
            H.top_eigenvalues(model, ce, (xn, y), method=method, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        H.top_eigenvalues(model, ce, (x, y), method="fisher", progress=False)
    with pytest.raises(ValueError, match="unknown solver"):
        H.top_eigenvalues(model, ce, (x, y), solver="arnoldi", progress=False)
    with pytest.raises(TypeError, match="pair"):
        H.top_eigenvalues(model, ce, x, progress=False)

    class Shuffled:
        def __iter__(self):
            perm = torch.randperm(len(x))
            yield x[perm[:6]], y[perm[:6]]
            yield x[perm[6:]], y[perm[6:]]

    with pytest.raises(H.HessianError, match="changed between passes"):
        H.top_eigenvalues(model, ce, Shuffled(), method="autograd", progress=False)


def test_non_finite_products_are_refused():
    model, (x, y) = mlp(), data_vec()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(H.HessianError, match="not finite"):
        H.top_eigenvalues(model, nn.CrossEntropyLoss(), (x, y), [quant_blocks(model)[0]], method="autograd",
                          progress=False)


def test_save_and_load_round_trip(tmp_path):
    model, data = cnn(), data_img()
    spec = H.top_eigenvalues(model, nn.CrossEntropyLoss(), data, progress=False)
    tr = H.traces(model, nn.CrossEntropyLoss(), data, progress=False)
    path = H.save_spectra(tmp_path / "s.json", spec + tr, meta={"n": 12})
    back = H.load_spectra(path)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in spec + tr]
    assert isinstance(back[0], H.BlockSpectrum) and isinstance(back[-1], H.BlockTrace)
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a"):
        H.load_spectra(tmp_path / "bad.json")


def test_progress_silent_when_off(capsys):
    H.top_eigenvalues(cnn(), nn.CrossEntropyLoss(), data_img(), progress=False)
    H.traces(cnn(), nn.CrossEntropyLoss(), data_img(), progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    H.top_eigenvalues(cnn(), nn.CrossEntropyLoss(), data_img(), progress=True)
    assert "Hessian eigenvalues" in capsys.readouterr().err


def test_float32_resnet20_gauss_newton_matches_autograd():
    """The real network, in float32, on a few random images: both routes agree to 1e-4."""
    from hawqlib.models import resnet20

    torch.manual_seed(0)
    model = resnet20()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    names = ["layer2.0.conv1", "fc"]
    gn = H.top_eigenvalues(model, nn.CrossEntropyLoss(), (x, y), names, progress=False)
    ag = H.top_eigenvalues(model, nn.CrossEntropyLoss(), (x, y), names, method="autograd", progress=False)
    for a, b in zip(gn, ag):
        assert a.method == "gauss-newton" and b.method == "autograd"
        assert a.converged and b.converged
        assert math.isclose(a.eigenvalue, b.eigenvalue, rel_tol=1e-4)
