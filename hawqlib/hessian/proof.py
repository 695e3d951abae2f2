"""The numeric proof of the identity H_i = G_i on a seeded sample spread over the data (paper section
3.1's H_i, by the exact Gauss-Newton route of :mod:`~hawqlib.hessian.gauss_newton`): the second, independent
line beside the every-sample check of :mod:`~hawqlib.hessian.identity`. That check reads the operations
as they ran; this one compares numbers, so an operation the check classifies wrongly (or a loss whose
Hessian in the logits is not the one assumed) is still caught where it shows on the sample.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from .autograd import block_products
from .gauss_newton import gn_capture
from .inputs import Data, check_finite, model_float, probe_layers, resolve_blocks
from .losses import LossSpec
from .results import HessianError

__all__ = ["prove", "proof_failed", "identity_failed", "PROOF_RTOL", "PROOF_DIRECTIONS"]

#: relative tolerance of the on-the-run proof that a Gauss-Newton product equals the autograd one
PROOF_RTOL = 1e-4
#: random directions per layer in the proof (our choice: two, so one unlucky direction cannot pass it)
PROOF_DIRECTIONS = 2


def prove(model, spec: LossSpec, data: Data, blocks, kinds, idx, seed: int) -> list[float]:
    """Per block, the largest relative difference between the Gauss-Newton and the autograd product H_i v
    over ``PROOF_DIRECTIONS`` random unit ``v`` (drawn from ``seed + 1``), on the samples at ``idx``.

    In float64 on a copy of the model (our choice): the proof is of the *identity* H_i = G_i, which holds
    sample by sample, so a sample spread over the data suffices; in float32 both products carry rounding
    errors as large as the tolerance for a random ``v``, where in float64 an exact identity agrees to
    rounding level and a broken one (a smooth operation) differs by orders of magnitude more."""
    device, dtype = model_float(model)
    f64 = dtype == torch.float64
    ref = model if f64 else copy.deepcopy(model).double()
    fn = spec.fn if f64 or not isinstance(spec.fn, nn.Module) else copy.deepcopy(spec.fn).double()
    rspec = LossSpec(fn)
    rblocks = resolve_blocks(ref, [b.module_names[0] for b in blocks])
    sub = data.subset(idx, torch.float64)
    if sub.total == 0.0:  # every sampled target ignored: nothing to prove here; the verification still runs
        return [0.0] * len(blocks)
    x, _ = sub.take(range(sub.n))
    _, rec, _, z = probe_layers(ref, x, rblocks)
    stores, _ = gn_capture(ref, rspec, sub, rblocks, dict(enumerate(kinds)), rec, int(z.shape[1]))
    g = torch.Generator().manual_seed(seed + 1)  # drawn on the CPU (the same on every device), then moved
    vs = [[torch.randn(b.numel, generator=g, dtype=torch.float64).to(device) for _ in range(PROOF_DIRECTIONS)]
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


def proof_failed(b, err, k, method):
    """A failed proof: one line, raised under a forced ``"gauss-newton"``, else a warning (autograd then)."""
    msg = (f"block {b.name!r}: the Gauss-Newton product differs from the exact autograd product by {err:.2e} "
           f"relative (> {PROOF_RTOL}) on {k} samples spread over the data, so H_i is not its Gauss-Newton "
           "block here (a smooth operation inside forward?)")
    if method == "gauss-newton":
        raise HessianError(msg + "; use method='auto' or 'autograd' (prove=False skips this check)")
    warnings.warn(msg + "; falling back to autograd", RuntimeWarning, stacklevel=4)


def identity_failed(b, why, method):
    """The every-sample check saw an operation that is not (piecewise) linear after the block's layer: one
    line, raised under a forced ``"gauss-newton"``, else a warning (the autograd route then)."""
    msg = (f"block {b.name!r}: H_i is not its Gauss-Newton block on all the data: an operation between its "
           f"output and the logits is not linear or piecewise linear ({why})")
    if method == "gauss-newton":
        raise HessianError(msg + "; use method='auto' or 'autograd'")
    warnings.warn(msg + "; falling back to autograd", RuntimeWarning, stacklevel=4)
