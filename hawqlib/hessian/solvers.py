r"""Eigensolvers for the top (largest-magnitude) eigenpair of a symmetric operator given by its
products (paper section 3.1: "we compute the top eigenvalue ... by power iteration"): the paper's
power iteration and Lanczos with full reorthogonalization. Both stop on the Ritz residual
:math:`\lVert A y - \theta y \rVert / |\theta| \le` ``tol``, never on the change of the estimate; they know nothing of
networks (the operator is any ``matvec`` on flat vectors).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["lanczos", "power_iteration", "ritz_residual"]


def ritz_residual(norm_r: float, theta: float) -> float:
    r""":math:`\lVert A y - \theta y \rVert / |\theta|` from the residual norm ``norm_r`` (0 for an exact zero pair,
    inf for :math:`\theta = 0`)."""
    if theta == 0.0:
        return 0.0 if norm_r == 0.0 else math.inf
    return norm_r / abs(theta)


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, *, tol: float = 1e-4,
            max_iter: int = 100, generator: torch.Generator | None = None, dtype=torch.float64, device=None):
    r"""Top (largest-magnitude) eigenpair of a symmetric operator by Lanczos with full reorthogonalization.

    ``matvec`` maps a flat float64 vector of length ``n`` to a flat vector. Stops when the Ritz
    residual :math:`|\beta_k s_k| / |\theta|` (:math:`= \lVert A y - \theta y \rVert / |\theta|` in exact
    arithmetic) is at most ``tol``.
    Returns ``(theta, y, iterations, converged, history)``; ``y`` is the unit Ritz vector.
    The Lanczos basis is kept in float64 (8 * n * max_iter bytes; our choice, for reorthogonalization
    accurate to well below any tolerance we use). ``device``: where the vectors live (the operator's);
    the start vector is drawn on the CPU from ``generator`` (the same on every device), then moved.
    """
    q = torch.randn(n, generator=generator, dtype=dtype).to(device)
    q /= q.norm()
    m = min(max_iter, n)
    Q = torch.empty(m + 1, n, dtype=dtype, device=q.device)
    Q[0] = q
    alphas, betas, history = [], [], []
    theta, s, converged, k = 0.0, torch.ones(1, dtype=dtype), False, 0
    for k in range(1, m + 1):
        w = matvec(Q[k - 1]).to(dtype)
        a = float(torch.dot(Q[k - 1], w))
        alphas.append(a)
        # full reorthogonalization against the whole basis, twice ("twice is enough")
        for _ in range(2):
            w -= Q[:k].T @ (Q[:k] @ w)
        b = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if k > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        idx = int(torch.argmax(evals.abs()))
        theta, s = float(evals[idx]), evecs[:, idx]
        res = ritz_residual(abs(b * float(s[-1])), theta)
        history.append(res)
        scale = max(abs(x) for x in alphas) or 1.0
        if res <= tol or b <= 1e-13 * scale or k == n:
            converged = res <= tol or b <= 1e-13 * scale or k == n
            break
        betas.append(b)
        Q[k] = w / b
    y = Q[:k].T @ s.to(q.device, dtype)
    y /= y.norm()
    return theta, y, k, converged, history


def power_iteration(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, *, tol: float = 1e-4,
                    max_iter: int = 100, generator: torch.Generator | None = None, dtype=torch.float64,
                    device=None):
    r"""Top (largest-magnitude) eigenpair by the paper's power iteration, stopped on the Ritz residual.

    Each iteration: :math:`w = A v`, :math:`\lambda = v^T w`, residual
    :math:`\lVert w - \lambda v \rVert / |\lambda|` (explicit), then :math:`v = w / \lVert w \rVert`. Returns
    ``(lambda, v, iterations, converged, history)``. ``device``: as for :func:`lanczos`.
    """
    v = torch.randn(n, generator=generator, dtype=dtype).to(device)
    v /= v.norm()
    history, lam, converged, k = [], 0.0, False, 0
    for k in range(1, max_iter + 1):
        w = matvec(v).to(dtype)
        lam = float(torch.dot(v, w))
        res = ritz_residual(float((w - lam * v).norm()), lam)
        history.append(res)
        if res <= tol:
            converged = True
            break
        nw = w.norm()
        if nw == 0:
            break
        v = w / nw
    return lam, v, k, converged, history
