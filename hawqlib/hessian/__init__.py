r"""Per-block Hessian spectra: the top eigenvalue :math:`\lambda_i` and the trace of each block's Hessian :math:`H_i`
(paper section 3.1: "we compute the top eigenvalue of the Hessian of each block ... by power iteration").

:math:`H_i` is the diagonal block of the Hessian of the training loss over all samples given, as ``loss_fn``
defines it (a mean, weighted or not, or a sum; :mod:`~hawqlib.hessian.losses`), with respect to the
block's weights :math:`W_i` (biases and BatchNorm parameters excluded; see :mod:`hawqlib.blocks`).

Two exact routes compute products :math:`H_i v` (``method``):

``"autograd"`` (:mod:`~hawqlib.hessian.autograd`)
    Double backward (Pearlmutter's trick): differentiate :math:`\langle \nabla_W L, v \rangle` once more. Works
    for any model, block and loss.

``"gauss-newton"`` (:mod:`~hawqlib.hessian.gauss_newton`)
    For one Conv2d/Linear layer in a network whose nonlinearities are piecewise linear, :math:`H_i` equals its
    generalized Gauss-Newton block exactly; the products then need no double backward.

``"auto"`` (default) picks Gauss-Newton only where it is exact and establishes it on the run twice:
on every sample, by recording in every chunk's forward whether an operation between the layer's
output and the logits is not (piecewise) linear (:mod:`~hawqlib.hessian.identity`), and numerically
on a seeded sample spread over the data (:mod:`~hawqlib.hessian.proof`); a block failing either falls
back to autograd with a warning (a forced ``"gauss-newton"`` raises instead). For eigenvalues it also
weighs the cost: with many classes (ImageNet's 1000) building the Gauss-Newton storage, C - 1 backward
passes per group of layers, outweighs autograd's products, and autograd is used. Solvers (``solver``,
:mod:`~hawqlib.hessian.solvers`): Lanczos with full reorthogonalization (default) and the paper's
power iteration, both stopped on the Ritz residual. Every returned eigenpair is then *verified* by one
fresh float64 product of the route proved exact on all the data (``verify="autograd"``: an autograd
product, whatever the route): ``.residual`` is that :math:`\lVert H v - \lambda v \rVert / |\lambda|` and
``.converged`` means it is at most ``tol`` (:mod:`~hawqlib.hessian.orchestrate` gives the order of work). "Top"
eigenvalue means the one of largest magnitude. Everything runs where the model lives (CPU or CUDA).

Project choices stated here once: eigenvalues and traces are computed with the model in eval mode,
i.e. BatchNorm uses its trained running statistics (the Hessian of the network as it is deployed, and
the only setting in which the loss of a sample does not depend on the other samples of its batch);
a forward that is random, or couples the samples of a batch, or data that changes between passes, is
refused with a :class:`HessianError` saying what to change (:mod:`~hawqlib.hessian.inputs`). The
model comes back exactly as it came, errors included (train/eval mode of every module, every buffer,
``requires_grad`` flags, ``.grad``).
"""
from __future__ import annotations

from .autograd import hvp
from .gauss_newton import SMOOTH_MODULES, gauss_newton_exact
from .orchestrate import (AUTO_SOLVE_PRODUCTS, HVP_PASSES, METHODS, PROOF_DIRECTIONS, PROOF_RTOL, SOLVERS, VERIFY,
                          top_eigenvalues, traces)
from .results import BlockSpectrum, BlockTrace, HessianError, load_spectra, save_spectra
from .solvers import lanczos, power_iteration

__all__ = [
    "BlockSpectrum", "BlockTrace", "HessianError", "top_eigenvalues", "traces", "hvp",
    "gauss_newton_exact", "lanczos", "power_iteration", "save_spectra", "load_spectra",
    "METHODS", "SOLVERS", "VERIFY", "SMOOTH_MODULES", "PROOF_RTOL", "PROOF_DIRECTIONS", "AUTO_SOLVE_PRODUCTS",
    "HVP_PASSES",
]
