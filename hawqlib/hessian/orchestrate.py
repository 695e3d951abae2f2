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
   layer runs once per forward, autograd elsewhere (``method="auto"``); for eigenvalues ``"auto"`` then
   weighs the cost (:func:`_gauss_newton_costlier`): building the Gauss-Newton storage takes one forward
   and C - 1 backward passes over the data per group of layers (C classes), which for many classes
   (ImageNet's 1000) outweighs the autograd route's few products per block, and then every block goes
   to autograd with a note saying why;
3. the identity H_i = G_i, on two independent lines: (a) on *every* sample, during every chunk's
   forward of the Gauss-Newton pass (:mod:`~hawqlib.hessian.identity`: no operation between the
   layer's output and the logits other than linear or piecewise linear); (b) numerically, on a float64
   copy of the model and the spread sample (:func:`~hawqlib.hessian.proof.prove`): the Gauss-Newton and
   autograd products in ``PROOF_DIRECTIONS`` random directions per layer must agree to ``PROOF_RTOL``.
   Under ``"auto"`` a block failing either goes to the autograd route with a warning; under a forced
   ``"gauss-newton"`` either raises (``prove=False`` skips (b) only). Traces on the Gauss-Newton route
   are covered by the same two lines;
4. eigenvalues: the solver on the chosen route, then the verification of the returned pair
   (``verify``): by default one fresh product in float64 of the route's own operator (proved exact in
   3) on all the data gives the reported residual; ``verify="autograd"`` uses one autograd product
   instead whatever the route (a Gauss-Newton result failing it is then recomputed on the autograd
   route under ``"auto"``, unless the residual is at the rounding level of the dtype,
   ``VERIFY_FLOOR``). ``converged`` means that residual <= ``tol``; a pair failing it is reported as
   not converged with a warning naming the block;
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

import math
import warnings

import torch
from torch import nn

from .. import distributed as hdist
from .autograd import AutogradOperator, block_products, flat_operator
from .gauss_newton import gauss_newton_exact, gn_capture, gn_pass, jac_rows, patches, plan_groups
from .inputs import Data, check_finite, check_operator, model_float, model_state, probe_layers, resolve_blocks, spread_indices
from .losses import LossSpec
from .proof import PROOF_DIRECTIONS, PROOF_RTOL, identity_failed, proof_failed
from .proof import prove as prove_identity
from .results import BlockSpectrum, BlockTrace, HessianError
from .solvers import lanczos, power_iteration, ritz_residual

__all__ = ["top_eigenvalues", "traces", "METHODS", "SOLVERS", "VERIFY", "PROOF_RTOL", "PROOF_DIRECTIONS",
           "VERIFY_FLOOR", "AUTO_SOLVE_PRODUCTS", "HVP_PASSES"]

METHODS = ("auto", "autograd", "gauss-newton")
SOLVERS = ("lanczos", "power")
#: how returned eigenpairs are verified: ``"operator"`` (default, also ``True``), one fresh float64 product of
#: the route proved exact; ``"autograd"``, one autograd product on all the data whatever the route
VERIFY = ("operator", "autograd")
#: a verified residual below VERIFY_FLOOR units of rounding of the model's dtype is rounding, not a wrong
#: route (our choice): a Gauss-Newton result failing tol only by that much is not recomputed on autograd
VERIFY_FLOOR = 1000
#: our choice: the Hessian-vector products one autograd Lanczos solve is assumed to take, its verification
#: included, when ``"auto"`` weighs the two routes (the order of the iteration counts the stored spectra
#: of the book record at the default ``tol``)
AUTO_SOLVE_PRODUCTS = 12
#: one Hessian-vector product by double backward in passes over the data: the forward, the backward that
#: keeps its graph, and the backward of that backward
HVP_PASSES = 3


def _gauss_newton_costlier(blocks: int, groups: int, C: int) -> str:
    """Why the autograd route is cheaper for ``blocks`` Gauss-Newton-eligible blocks stored in ``groups``
    passes with ``C`` classes ("" when it is not), both counted in passes over the data: Gauss-Newton's
    storage costs ``groups * C`` (a forward and C - 1 backward passes each; its products then read the
    storage only), autograd ``blocks * AUTO_SOLVE_PRODUCTS * HVP_PASSES``."""
    gn, ag = groups * C, blocks * AUTO_SOLVE_PRODUCTS * HVP_PASSES
    if gn <= ag:
        return ""
    return (f"autograd: the cheaper exact route here (Gauss-Newton's storage needs {groups} pass(es) of a "
            f"forward and {C - 1} backward passes for {C} classes, about {gn} passes over the data against "
            f"about {ag} for autograd's solves)")


def _check_verify(verify):
    if verify is True:
        return "operator"
    if verify is False or verify in VERIFY:
        return verify
    raise ValueError(f"unknown verify {verify!r}; valid: True (= 'operator'), 'autograd', False")


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


def _solve(matvec, n, name, solver, tol, max_iter, seed, device):
    gen = torch.Generator().manual_seed(seed)
    fn = lanczos if solver == "lanczos" else power_iteration
    checked = lambda v: check_finite(matvec(v), name, "Hessian-vector product")  # noqa: E731
    return fn(checked, n, tol=tol, max_iter=max_iter, generator=gen, device=device)  # theta, y, iters, conv, hist


def _unconverged(b, r, tol, dtype, how):
    """The warning for an eigenpair whose verified residual exceeds tol (reported as not converged)."""
    msg = f"block {b.name!r}: the eigenpair fails its exact verification (residual {r:.2e} > tol {tol:g} {how})"
    floor = VERIFY_FLOOR * torch.finfo(dtype).eps
    if r <= floor:
        msg += (f", at the rounding level of {dtype} products ({floor:.1e}); a smaller tol cannot be verified "
                "in this dtype")
    warnings.warn(msg + "; reported as not converged", RuntimeWarning, stacklevel=3)


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
    the result still runs). ``verify``: how each returned eigenpair is verified. ``True`` (default, the
    same as ``"operator"``): one fresh float64 product of the route that was proved exact, on all the
    data (for a Gauss-Newton block a small fraction of its solve: one product against the solver's
    many, from the layer's stored rows); ``"autograd"``: the independent check, one autograd product
    (a double backward through the network) per block on all the data whatever the route, which for a
    Gauss-Newton block costs about as much as all the rest of its computation; ``False``: Gauss-Newton
    eigenpairs keep the solver's own residual and their ``note`` says "unverified". Autograd eigenpairs
    are always verified by one more autograd product. The start vector of every block is drawn from
    ``torch.Generator().manual_seed(seed)``. See :mod:`hawqlib.hessian.orchestrate` for the order of work.
    """
    _check_args(method, solver, tol, max_iter, check_samples)
    verify = _check_verify(verify)
    blocks = resolve_blocks(model, blocks)
    device, dtype = model_float(model)
    found: dict[int, tuple] = {}  # i -> (theta, y (flat), iterations, history, route, note[, residual])
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
                why = _gauss_newton_costlier(len(gn), len(groups), C) if method == "auto" else ""
                if why:  # step 2 of the module docstring: the cost, weighed
                    for i in gn:
                        routes[i], notes[i] = "autograd", why
                    groups = []
                for grp in groups:
                    gblocks = [sub[j] for j in grp]
                    stores, record = gn_capture(model, spec, data, gblocks, {t: kinds[j] for t, j in enumerate(grp)},
                                                {t: srec[j] for t, j in enumerate(grp)}, C)
                    for t in sorted(record.broken):  # step 3a: the identity on every sample
                        i = gn[grp[t]]
                        identity_failed(gblocks[t], record.broken[t], method)
                        routes[i], notes[i] = "autograd", f"gauss-newton refused: {record.broken[t]}"
                        stores[t] = None
                    live = [t for t in range(len(grp)) if stores[t] is not None]
                    errs = {}
                    if live and (method == "auto" or prove):  # step 3b: the proof on spread samples
                        errs = dict(zip(live, prove_identity(model, spec, data, [gblocks[t] for t in live],
                                                             [stores[t].kind for t in live], idx, seed)))
                    for t in live:
                        i, store, b = gn[grp[t]], stores[t], gblocks[t]
                        note = f"storage={store.kind}; identity checked on all {data.n} samples"
                        if t in errs:
                            if not errs[t] <= PROOF_RTOL:
                                proof_failed(b, errs[t], len(idx), method)
                                routes[i], notes[i] = "autograd", f"gauss-newton refused: proof error {errs[t]:.2e}"
                                stores[t] = None
                                continue
                            note += f"; proof rel. diff {errs[t]:.1e} on {len(idx)} spread samples"
                        theta, y, it, _, hist = _solve(lambda v, s=store: s.matvec(v), store.numel, b.name, solver,
                                                       tol, max_iter, seed, device)
                        found[i] = (theta, y, it, hist, "gauss-newton", note)
                        if verify == "operator":  # step 4: one fresh float64 product of the exact operator
                            hv = check_finite(store.matvec(y, dtype=torch.float64), b.name, "Hessian-vector product")
                            r = ritz_residual(float((hv - theta * y).norm()), theta)
                            if not r <= tol:
                                _unconverged(b, r, tol, dtype, "with a float64 Gauss-Newton product on all the data")
                                note += "; failed verification"
                            else:
                                note += "; verified (float64 product)"
                            found[i] = (theta, y, it, hist, "gauss-newton", note, r)
                            bar.update(1)
                        stores[t] = None
                    del stores
                todo = [i for i in gn if i in found and len(found[i]) == 6]
                if todo and not verify:
                    for i in todo:
                        found[i] = found[i][:5] + (found[i][5] + "; unverified (verify=False)", found[i][3][-1])
                        bar.update(1)
                elif todo:  # verify="autograd": the independent check, one double backward per block
                    vecs = [[[found[i][1].to(dtype).view_as(blocks[i].params[0])]] for i in todo]
                    hvs = block_products(model, spec, data, [blocks[i] for i in todo], vecs)
                    for i, hv in zip(todo, hvs):
                        theta, y = found[i][0], found[i][1]
                        r = ritz_residual(float((hv[0][0].reshape(-1).double() - theta * y).norm()), theta)
                        if r <= tol:
                            found[i] = found[i][:5] + (found[i][5] + "; verified (autograd product)", r)
                            bar.update(1)
                            continue
                        floor = VERIFY_FLOOR * torch.finfo(dtype).eps
                        if method == "auto" and r > floor:
                            warnings.warn(f"block {blocks[i].name!r}: the Gauss-Newton eigenpair fails its exact "
                                          f"verification (residual {r:.2e} > tol {tol:g} with an autograd product on "
                                          "all the data); recomputing on the autograd route", RuntimeWarning,
                                          stacklevel=2)
                            routes[i], notes[i] = "autograd", f"gauss-newton failed verification (residual {r:.1e})"
                            del found[i]
                        else:
                            _unconverged(blocks[i], r, tol, dtype, "with an autograd product on all the data")
                            found[i] = found[i][:5] + (found[i][5] + "; failed verification",) + (r,)
                            bar.update(1)
            for i, r in enumerate(routes):
                if r != "autograd" or i in found:
                    continue
                b = blocks[i]
                matvec, unflat = flat_operator(AutogradOperator(model, spec, data, b), b.params)
                theta, y, it, _, hist = _solve(matvec, b.numel, b.name, solver, tol, max_iter, seed, device)
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
    device = model_float(model)[0]
    results: dict[int, BlockTrace] = {}
    with model_state(model):
        spec, data, idx, routes, notes, _, _, _ = _prepare(model, loss_fn, data, blocks, method, chunk_size,
                                                           check_samples, seed)
        bar = _progress(len(blocks), progress, "Hessian traces")
        try:
            gn = [i for i, r in enumerate(routes) if r == "gauss-newton"]
            if gn and (method == "auto" or prove):
                errs = prove_identity(model, spec, data, [blocks[i] for i in gn], ["jacobian"] * len(gn), idx, seed)
                keep = []
                for t, i in enumerate(gn):
                    if errs[t] <= PROOF_RTOL:
                        keep.append(i)
                        continue
                    proof_failed(blocks[i], errs[t], len(idx), method)
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

                record = gn_pass(model, spec, data, sub, on_forward, on_grad)
                for t, i in enumerate(gn):
                    if t in record.broken:  # the identity on every sample: this trace is not H_i's
                        identity_failed(blocks[i], record.broken[t], method)
                        routes[i], notes[i] = "autograd", f"gauss-newton refused: {record.broken[t]}"
                        continue
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
                        e = torch.zeros(n, dtype=torch.float64, device=device)
                        e[j] = 1
                        tot += float(check_finite(matvec(e), b.name, "Hessian-vector product")[j])
                    results[i] = BlockTrace(b.name, n, tot, 0.0, "autograd", n, True, notes[i])
                else:
                    g = torch.Generator().manual_seed(seed)
                    vals = []
                    for _ in range(samples):
                        z = (torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1).to(device)
                        hz = check_finite(matvec(z), b.name, "Hessian-vector product").double()
                        vals.append(float(torch.dot(z, hz)))
                    t = torch.tensor(vals, dtype=torch.float64)
                    results[i] = BlockTrace(b.name, n, float(t.mean()), float(t.std() / math.sqrt(samples)),
                                            "autograd", samples, False, notes[i])
                bar.update(1)
        finally:
            bar.close()
    return [results[i] for i in range(len(blocks))]
