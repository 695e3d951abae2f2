"""The one orchestrator behind :func:`top_eigenvalues` and :func:`traces` (paper section 3.1: the top
eigenvalue of each block's Hessian; HAWQ-V2's trace): check the inputs, pick a route per block, prove
the Gauss-Newton identity where it is used, solve, and verify every returned eigenpair.

Order of work, shared by both entry points (:func:`_prepare`):

1. the data is read once (content fingerprinted, chunk weights from the loss), a seeded sample of
   ``check_samples`` positions spread over all of it is drawn, and on it: every block's layers must
   run (and how often), the targets must suit the loss, the forward must be deterministic and
   per-sample (:func:`~hawqlib.hessian.inputs.check_operator`), and a loss we cannot read must split
   over chunks;
2. routes: Gauss-Newton where :func:`~hawqlib.hessian.gauss_newton.gauss_newton_exact` allows it and the
   layer runs once per forward, autograd elsewhere (``method="auto"``);
3. the proof (:func:`_prove`): on a float64 copy of the model and the spread sample, the Gauss-Newton
   and autograd products in ``PROOF_DIRECTIONS`` random directions per layer must agree to
   ``PROOF_RTOL``; under ``"auto"`` a failure falls back to autograd with a warning, under a forced
   ``"gauss-newton"`` it raises unless ``prove=False``;
4. eigenvalues: the solver on the chosen route, then one exact autograd product with the returned
   vector on all the data gives the reported residual; ``converged`` means that residual <= ``tol``.
   A Gauss-Newton result that fails it is recomputed on the autograd route (``"auto"``, unless the
   residual is at the rounding level of the dtype, ``VERIFY_FLOOR``) or reported as not converged
   (forced); either way with a warning naming the block;
5. under a process group of several ranks (``torchrun``, :mod:`hawqlib.distributed`): the autograd route
   alone (``"auto"`` picks it, a forced ``"gauss-newton"`` is refused: its per-layer storage is built from
   all the data and is not sharded). Every rank reads all the data (for the checks and the chunk
   weights) but computes the products of its share of the chunks, every ``world_size``-th; each
   Hessian-vector product is the ``all_reduce`` sum of the ranks' weighted chunk products, the sum one
   process forms in another order. Every rank runs the same solver from the same seeded start vector on
   the same products, so all return the same eigenpairs, those of one process up to the rounding of that
   order of summation. Without a process group nothing of this runs.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from .. import distributed as hdist
from .autograd import AutogradOperator, block_products, flat_operator
from .gauss_newton import gauss_newton_exact, gn_capture, gn_pass, jac_rows, patches, plan_groups
from .inputs import (Data, check_finite, check_operator, model_float, model_state, probe_layers,
                     resolve_blocks, spread_indices)
from .losses import LossSpec
from .results import BlockSpectrum, BlockTrace, HessianError
from .solvers import lanczos, power_iteration, ritz_residual

__all__ = ["top_eigenvalues", "traces", "METHODS", "SOLVERS", "PROOF_RTOL", "PROOF_DIRECTIONS", "VERIFY_FLOOR"]

METHODS = ("auto", "autograd", "gauss-newton")
SOLVERS = ("lanczos", "power")
#: relative tolerance of the on-the-run proof that a Gauss-Newton product equals the autograd one
PROOF_RTOL = 1e-4
#: random directions per layer in the proof (our choice: two, so one unlucky direction cannot pass it)
PROOF_DIRECTIONS = 2
#: a verified residual below VERIFY_FLOOR units of rounding of the model's dtype is rounding, not a wrong
#: route (our choice): a Gauss-Newton result failing tol only by that much is not recomputed on autograd
VERIFY_FLOOR = 1000


def _check_args(method, solver, tol, max_iter, check_samples):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not isinstance(check_samples, int) or check_samples < 1:
        raise ValueError(f"check_samples must be an integer >= 1, got {check_samples!r}")


def _prepare(model, loss_fn, data, blocks, method, chunk_size, check_samples, seed):
    """Steps 1-2 of the module docstring: (spec, data, check positions, routes, notes, shapes, order, C)."""
    device, dtype = model_float(model)
    spec = LossSpec(loss_fn)
    data = Data(data, chunk_size, device, dtype, spec)
    if hdist.is_distributed():  # step 5 of the module docstring
        if method == "gauss-newton":
            raise HessianError("method='gauss-newton' is not distributed: under a process group of several ranks "
                               "use method='autograd' or 'auto' (which then picks autograd)")
        method = "autograd"
        data.shard = (hdist.rank(), hdist.world_size())
    idx = spread_indices(data.n, check_samples, seed)
    xs, ys = data.take(idx)
    calls, shapes, order, out = probe_layers(model, xs, blocks)
    spec.check_targets(out, ys, "data")
    check_operator(model, xs)
    if data.nchunks > 1:
        spec.check_split(out, ys)
    logits = torch.is_tensor(out) and out.dim() == 2 and out.shape[1] >= 2
    routes, notes = [], []
    for i, b in enumerate(blocks):
        ok, why = gauss_newton_exact(model, loss_fn, b)
        if ok and calls.get(i, 0) != 1:
            ok, why = False, f"block {b.name!r}: its layer runs {calls.get(i, 0)} times per forward (shared weights)"
        if ok and not logits:
            ok, why = False, "the model's output is not (batch, classes>=2) logits"
        if method == "gauss-newton" and not ok:
            raise HessianError(f"method='gauss-newton' is not exact for block {b.name!r}: {why}; "
                               "use method='autograd' or 'auto'")
        routes.append("gauss-newton" if (ok and method != "autograd") else "autograd")
        notes.append("" if ok or method == "autograd" else f"autograd: {why}")
    C = int(out.shape[1]) if logits else None
    return spec, data, idx, routes, notes, shapes, order, C


def _prove(model, spec: LossSpec, data: Data, blocks, kinds, idx, seed: int) -> list[float]:
    """Per block, the largest relative difference between the Gauss-Newton and the autograd product H_i v
    over ``PROOF_DIRECTIONS`` random unit ``v`` (drawn from ``seed + 1``), on the samples at ``idx``.

    In float64 on a copy of the model (our choice): the proof is of the *identity* H_i = G_i, which holds
    sample by sample, so a sample spread over the data suffices; in float32 both products carry rounding
    errors as large as the tolerance for a random ``v``, where in float64 an exact identity agrees to
    rounding level and a broken one (a smooth operation) differs by orders of magnitude more."""
    f64 = model_float(model)[1] == torch.float64
    ref = model if f64 else copy.deepcopy(model).double()
    fn = spec.fn if f64 or not isinstance(spec.fn, nn.Module) else copy.deepcopy(spec.fn).double()
    rspec = LossSpec(fn)
    rblocks = resolve_blocks(ref, [b.module_names[0] for b in blocks])
    sub = data.subset(idx, torch.float64)
    if sub.total == 0.0:  # every sampled target ignored: nothing to prove here; the verification still runs
        return [0.0] * len(blocks)
    x, _ = sub.take(range(sub.n))
    _, rec, _, z = probe_layers(ref, x, rblocks)
    stores = gn_capture(ref, rspec, sub, rblocks, dict(enumerate(kinds)), rec, int(z.shape[1]))
    g = torch.Generator().manual_seed(seed + 1)
    vs = [[torch.randn(b.numel, generator=g, dtype=torch.float64) for _ in range(PROOF_DIRECTIONS)]
          for b in rblocks]
    vs = [[v / v.norm() for v in per] for per in vs]
    try:
        ags = block_products(ref, rspec, sub, rblocks, [[[v.view_as(b.params[0])] for v in per]
                                                        for b, per in zip(rblocks, vs)])
    finally:
        for p in ref.parameters():
            p.requires_grad_(False)
    errs = []
    for t, b in enumerate(rblocks):
        worst = 0.0
        for v, ag in zip(vs[t], ags[t]):
            gn = check_finite(stores[t].matvec(v), b.name, "Gauss-Newton product")
            ag = ag[0].reshape(-1)
            num, den = float((gn - ag).norm()), float(ag.norm())
            worst = max(worst, 0.0 if num == 0 else (num / den if den > 0 else math.inf))
        errs.append(worst)
    return errs


def _proof_failed(b, err, k, method, prove):
    msg = (f"block {b.name!r}: the Gauss-Newton product differs from the exact autograd product by {err:.2e} "
           f"relative (> {PROOF_RTOL}) on {k} samples spread over the data, so H_i is not its Gauss-Newton "
           "block here (a smooth operation inside forward?)")
    if method == "gauss-newton":
        raise HessianError(msg + "; use method='auto' or 'autograd' (prove=False skips this check)")
    warnings.warn(msg + "; falling back to autograd", RuntimeWarning, stacklevel=4)


def _solve(matvec, n, name, solver, tol, max_iter, seed):
    gen = torch.Generator().manual_seed(seed)
    fn = lanczos if solver == "lanczos" else power_iteration
    checked = lambda v: check_finite(matvec(v), name, "Hessian-vector product")  # noqa: E731
    return fn(checked, n, tol=tol, max_iter=max_iter, generator=gen)  # theta, y, iters, conv, hist


def _progress(total, progress, desc):
    from ..progress import bar

    return bar(total=total, disable=not (progress and hdist.is_main()), desc=desc, unit="block")


def top_eigenvalues(model: nn.Module, loss_fn, data, blocks=None, *, method: str = "auto",
                    solver: str = "lanczos", tol: float = 1e-4, max_iter: int = 100, seed: int = 0,
                    return_vectors: bool = False, progress: bool = True, chunk_size: int = 32,
                    max_memory: int = 2 << 30, check_samples: int = 8, prove: bool = True,
                    verify: bool = True) -> list[BlockSpectrum]:
    """The top eigenvalue lambda_i of each block's Hessian H_i (paper section 3.1), one result per block.

    ``blocks``: None (every Conv2d/Linear weight), a granularity (``"layer"``, ``"residual"``), module
    names, or :class:`Block` objects. ``data``: an (inputs, targets) pair or an iterable of such batches
    (replayed identically on every pass); the Hessian is that of ``loss_fn`` over all samples as the loss
    defines it (:mod:`hawqlib.hessian.losses`). ``method``/``solver``/``tol``: see :mod:`hawqlib.hessian`.
    ``chunk_size`` bounds the samples in one autograd graph (our choice, 32: a size where the speed on CPU
    for ResNet20 no longer depends on it, and memory grows with the chunk); ``max_memory`` (bytes) bounds
    the Gauss-Newton storage of one group of layers; ``check_samples`` is the size of the seeded sample,
    spread over the data, on which the operator is checked and the Gauss-Newton identity proved in
    float64 (our choice, 8: the identity holds sample by sample, and float64 convolutions are slow on
    CPU); ``prove=False`` skips that proof for a forced ``method="gauss-newton"`` (the verification of
    the result still runs). ``verify=False`` skips the exact verification of Gauss-Newton eigenpairs
    (about as costly as their whole route: one double backward per block over all the data); their
    ``residual`` is then the solver's own and their ``note`` says "unverified". Autograd eigenpairs are
    always verified (one more product). The start vector of every block is drawn from
    ``torch.Generator().manual_seed(seed)``. See :mod:`hawqlib.hessian.orchestrate` for the order of work.
    """
    _check_args(method, solver, tol, max_iter, check_samples)
    blocks = resolve_blocks(model, blocks)
    dtype = model_float(model)[1]
    found: dict[int, tuple] = {}  # i -> (theta, y (flat), iterations, history, route, note)
    with model_state(model):
        spec, data, idx, routes, notes, rec, order, C = _prepare(model, loss_fn, data, blocks, method,
                                                                chunk_size, check_samples, seed)
        bar = _progress(len(blocks), progress, "Hessian eigenvalues")
        try:
            gn = [i for i, r in enumerate(routes) if r == "gauss-newton"]
            if gn:
                sub = [blocks[i] for i in gn]
                srec = {j: rec[i] for j, i in enumerate(gn)}
                sorder = [gn.index(i) for i in order if i in gn]
                kinds, groups = plan_groups(sub, srec, sorder, data.n, C, torch.finfo(dtype).bits // 8, max_memory)
                for grp in groups:
                    gblocks = [sub[j] for j in grp]
                    stores = gn_capture(model, spec, data, gblocks, {t: kinds[j] for t, j in enumerate(grp)},
                                        {t: srec[j] for t, j in enumerate(grp)}, C)
                    check = method == "auto" or prove
                    errs = (_prove(model, spec, data, gblocks, [stores[t].kind for t in range(len(grp))], idx, seed)
                            if check else [None] * len(grp))
                    for t, j in enumerate(grp):
                        i, store, b = gn[j], stores[t], gblocks[t]
                        note = f"storage={store.kind}"
                        if check:
                            if not errs[t] <= PROOF_RTOL:
                                _proof_failed(b, errs[t], len(idx), method, prove)
                                routes[i], notes[i] = "autograd", f"gauss-newton refused: proof error {errs[t]:.2e}"
                                stores[t] = None
                                continue
                            note += f"; proof rel. diff {errs[t]:.1e} on {len(idx)} spread samples"
                        theta, y, it, _, hist = _solve(lambda v, s=store: s.matvec(v.to(s.mod.weight.dtype)),
                                                       store.numel, b.name, solver, tol, max_iter, seed)
                        found[i] = (theta, y, it, hist, "gauss-newton", note)
                        stores[t] = None
                    del stores
                todo = [i for i in gn if i in found]
                if todo and not verify:
                    for i in todo:
                        found[i] = found[i][:5] + (found[i][5] + "; unverified (verify=False)", found[i][3][-1])
                        bar.update(1)
                elif todo:
                    vecs = [[[found[i][1].to(dtype).view_as(blocks[i].params[0])]] for i in todo]
                    hvs = block_products(model, spec, data, [blocks[i] for i in todo], vecs)
                    for i, hv in zip(todo, hvs):
                        theta, y = found[i][0], found[i][1]
                        r = ritz_residual(float((hv[0][0].reshape(-1).double() - theta * y).norm()), theta)
                        if r <= tol:
                            found[i] += (r,)
                            bar.update(1)
                            continue
                        msg = (f"block {blocks[i].name!r}: the Gauss-Newton eigenpair fails its exact verification "
                               f"(residual {r:.2e} > tol {tol:g} with an autograd product on all the data)")
                        floor = VERIFY_FLOOR * torch.finfo(dtype).eps
                        if r <= floor:  # at the rounding level of the products: autograd cannot do better
                            msg += (f", at the rounding level of {dtype} products ({floor:.1e}); a smaller tol "
                                    "cannot be verified in this dtype")
                        if method == "auto" and r > floor:
                            warnings.warn(msg + "; recomputing on the autograd route", RuntimeWarning, stacklevel=2)
                            routes[i], notes[i] = "autograd", f"gauss-newton failed verification (residual {r:.1e})"
                            del found[i]
                        else:
                            warnings.warn(msg + "; reported as not converged", RuntimeWarning, stacklevel=2)
                            found[i] = found[i][:5] + (found[i][5] + f"; failed verification",) + (r,)
                            bar.update(1)
            for i, r in enumerate(routes):
                if r != "autograd" or i in found:
                    continue
                b = blocks[i]
                matvec, unflat = flat_operator(AutogradOperator(model, spec, data, b), b.params)
                theta, y, it, _, hist = _solve(matvec, b.numel, b.name, solver, tol, max_iter, seed)
                res = ritz_residual(float((check_finite(matvec(y), b.name, "Hessian-vector product").double()
                                           - theta * y).norm()), theta)
                if not res <= tol:
                    warnings.warn(f"block {b.name!r}: residual {res:.2e} of the exact product exceeds tol {tol:g} "
                                  "after the solver stopped; reported as not converged", RuntimeWarning, stacklevel=2)
                found[i] = (theta, y, it, hist, "autograd", notes[i], res)
                bar.update(1)
        finally:
            bar.close()
    out = []
    for i, b in enumerate(blocks):
        theta, y, it, hist, route, note, res = found[i]
        vec = None
        if return_vectors:
            vec = [t.detach().clone().view(p.shape) for t, p in
                   zip(y.to(b.params[0].dtype).split([p.numel() for p in b.params]), b.params)]
        out.append(BlockSpectrum(name=b.name, numel=b.numel, eigenvalue=theta, iterations=it,
                                 converged=bool(res <= tol), residual=res, method=route, solver=solver, tol=tol,
                                 history=hist, vector=vec, note=note))
    return out


def traces(model: nn.Module, loss_fn, data, blocks=None, *, method: str = "auto", samples: int = 100,
           exact_max: int = 64, seed: int = 0, progress: bool = True, chunk_size: int = 32,
           check_samples: int = 8, prove: bool = True) -> list[BlockTrace]:
    """The trace of each block's Hessian (HAWQ-V2's sensitivity; paper section 3.1's H_i), exact where the
    method allows.

    Gauss-Newton blocks: exact, tr H_i = (1/N) sum_n sum_k ||r_nk||^2, one pass over the data with
    memory bounded by one chunk (nothing is kept across chunks). Autograd blocks: exact from the
    ``numel`` basis vectors when ``numel <= exact_max`` (our choice of threshold: cost grows with numel),
    else Hutchinson's estimator with ``samples`` Rademacher probes (seeded) and its standard error
    std / sqrt(samples). The checks, routes and proof are those of :func:`top_eigenvalues`.
    """
    _check_args(method, "lanczos", 1.0, 1, check_samples)
    if samples < 2:
        raise ValueError(f"samples must be >= 2 (a standard error needs two probes), got {samples}")
    blocks = resolve_blocks(model, blocks)
    results: dict[int, BlockTrace] = {}
    with model_state(model):
        spec, data, idx, routes, notes, _, _, _ = _prepare(model, loss_fn, data, blocks, method, chunk_size,
                                                           check_samples, seed)
        bar = _progress(len(blocks), progress, "Hessian traces")
        try:
            gn = [i for i, r in enumerate(routes) if r == "gauss-newton"]
            if gn and (method == "auto" or prove):
                errs = _prove(model, spec, data, [blocks[i] for i in gn], ["jacobian"] * len(gn), idx, seed)
                keep = []
                for t, i in enumerate(gn):
                    if errs[t] <= PROOF_RTOL:
                        keep.append(i)
                        continue
                    _proof_failed(blocks[i], errs[t], len(idx), method, prove)
                    routes[i], notes[i] = "autograd", f"gauss-newton refused: proof error {errs[t]:.2e}"
                gn = keep
            if gn:
                sub = [blocks[i] for i in gn]
                acc = [0.0] * len(sub)
                cur_in = {}

                def on_forward(n0, n, inputs, Fm):
                    cur_in.update({t: patches(sub[t].modules[0], a) for t, a in inputs.items()})

                def on_grad(n0, n, k, grads):
                    for t, b in enumerate(sub):
                        r = jac_rows(b.modules[0], cur_in[t], grads[t])
                        acc[t] += float(r.double().pow(2).sum())

                gn_pass(model, spec, data, sub, on_forward, on_grad)
                for t, i in enumerate(gn):
                    results[i] = BlockTrace(blocks[i].name, blocks[i].numel, acc[t] / data.n, 0.0,
                                            "gauss-newton", 0, True, notes[i])
                    bar.update(1)
            for i, r in enumerate(routes):
                if r != "autograd":
                    continue
                b = blocks[i]
                matvec, _ = flat_operator(AutogradOperator(model, spec, data, b), b.params)
                n = b.numel
                if n <= exact_max:
                    tot = 0.0
                    for j in range(n):
                        e = torch.zeros(n, dtype=torch.float64)
                        e[j] = 1
                        tot += float(check_finite(matvec(e), b.name, "Hessian-vector product")[j])
                    results[i] = BlockTrace(b.name, n, tot, 0.0, "autograd", n, True, notes[i])
                else:
                    g = torch.Generator().manual_seed(seed)
                    vals = []
                    for _ in range(samples):
                        z = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
                        hz = check_finite(matvec(z), b.name, "Hessian-vector product").double()
                        vals.append(float(torch.dot(z, hz)))
                    t = torch.tensor(vals, dtype=torch.float64)
                    results[i] = BlockTrace(b.name, n, float(t.mean()), float(t.std() / math.sqrt(samples)),
                                            "autograd", samples, False, notes[i])
                bar.update(1)
        finally:
            bar.close()
    return [results[i] for i in range(len(blocks))]
