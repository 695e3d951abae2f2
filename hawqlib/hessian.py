"""Per-block Hessian spectra: the top eigenvalue lambda_i and the trace of each block's Hessian H_i
(paper section 3.1: "we compute the top eigenvalue of the Hessian of each block ... by power iteration").

H_i is the diagonal block of the Hessian of the *mean* training loss over all samples given, with
respect to the block's weights W_i (biases and BatchNorm parameters excluded; see :mod:`hawqlib.blocks`).

Two exact routes compute products H_i v (``method``):

``"autograd"``
    Double backward (Pearlmutter's trick): differentiate <grad_W L, v> once more. Works for any model,
    block and loss. Cost per product: one forward, one backward and one double backward per data chunk.

``"gauss-newton"``
    For one Conv2d/Linear layer in a network whose nonlinearities are piecewise linear (ReLU, max/avg
    pooling, residual additions, BatchNorm in eval mode), the logits are piecewise linear in that
    layer's weights, so the Hessian block equals the generalized Gauss-Newton block exactly
    (paper.md, "Facts measured beside the paper")::

        H_i = (1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n

    with J_n = d logits_n / d W_i and p_n = softmax(logits_n). Our implementation (our choice):
    since Lambda_n = diag(p_n) - p_n p_n^T annihilates the all-ones vector, it equals
    E^T Lambda'_n E with E = [I_{C-1} | -1] and Lambda'_n its leading (C-1)x(C-1) block; writing
    Lambda'_n = L_n L_n^T (eigen-factor, exact for the positive semi-definite Lambda'_n),
    H_i = (1/N) sum_n sum_k r_nk r_nk^T with r_nk = J_n^T E^T L_n[:, k]. The C-1 "whitened"
    output gradients d<logits_n, E^T L_n[:, k]>/d(layer output) of *every* layer come from C-1
    ordinary backward passes per data chunk (no double backward). Per layer we then keep either

    * ``"jacobian"`` storage: the rows r_nk themselves (N x (C-1) x numel), when that is no larger
      than 1.5x the alternative (computed for all C-1 directions of a chunk in one batched matrix
      product); a product R^T (R v) is then one pass over the rows, a cache-sized slab at a time; or
    * ``"activation"`` storage: the layer input (N x |in|) and the whitened output gradients
      (N x (C-1) x |out|); a product is one layer forward with weight v and one weight gradient.

    Layers are processed in groups whose storage fits ``max_memory`` bytes (our choice, default
    2 GiB): each group costs one pass over the data (forward + C-1 backward passes per chunk), and the
    autograd graph lives for one chunk only. Groups are packed from the output side, so a second
    group's backward passes stop early. Memory is therefore bounded by ``max_memory`` plus one chunk,
    not by layers x classes x images; a single layer whose storage alone exceeds the budget is still
    processed, alone.

``"auto"`` (default) picks Gauss-Newton only where it is exact (:func:`gauss_newton_exact`) and
*proves* it on the run: on a float64 copy of the model and the first ``check_samples`` samples, one
random Gauss-Newton product per layer is compared with the autograd product; a relative difference
above 1e-4 falls back to autograd with a warning. (Our choices: a subset suffices because the
identity holds sample by sample; float64 because in float32 both products carry rounding errors
near the tolerance, see :func:`_prove`.) The autograd products of all layers of a group share one
graph: one forward and one gradient with ``create_graph``, then one double backward per layer.

Solvers (``solver``): Lanczos with full reorthogonalization (default) and the paper's power
iteration. Both stop on the Ritz residual ||H v - lambda v|| / |lambda| <= tol, never on the change
of the estimate; the residual of every iteration is kept in ``.history``. "Top" eigenvalue means the
one of largest magnitude, the one power iteration converges to (for Gauss-Newton blocks, which are
positive semi-definite, also the largest).

Project choices stated here once: eigenvalues and traces are computed with the model in eval mode,
i.e. BatchNorm uses its trained running statistics (the Hessian of the network as it is deployed, and
the only setting in which the loss of a sample does not depend on the other samples of its batch);
the model comes back exactly as it came (train/eval mode of every module, ``requires_grad`` flags,
``.grad``). ``loss_fn(outputs, targets)`` must return the mean over its batch; batches are weighted
by their size, so the result is the Hessian of the mean loss over all samples.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Block, quant_blocks
from .storage import atomic_write_json

__all__ = [
    "BlockSpectrum", "BlockTrace", "HessianError", "top_eigenvalues", "traces", "hvp",
    "gauss_newton_exact", "lanczos", "power_iteration", "save_spectra", "load_spectra",
    "METHODS", "SOLVERS", "SMOOTH_MODULES",
]

METHODS = ("auto", "autograd", "gauss-newton")
SOLVERS = ("lanczos", "power")
#: relative tolerance of the on-the-run proof that a Gauss-Newton product equals the autograd one
PROOF_RTOL = 1e-4
_SPECTRA_FORMAT = "hawqlib.spectra/1"

#: Module types whose output is not piecewise linear in their input (or that couple an input's
#: entries nonlinearly): any of them in the model rules out the exact Gauss-Newton route.
SMOOTH_MODULES: tuple[type, ...] = tuple(t for t in (
    nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Softmin,
    nn.Softplus, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Hardswish, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid, nn.GLU, nn.MultiheadAttention, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.CrossMapLRN2d, nn.Bilinear, nn.RNNBase, nn.RNNCellBase, nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer, getattr(nn, "RMSNorm", None),
    getattr(nn.modules.instancenorm, "_InstanceNorm", None),
) if t is not None)


class HessianError(ValueError):
    """A Hessian computation that cannot give a trustworthy result (bad input, non-finite values)."""


# =========================================================================== results

@dataclass
class BlockSpectrum:
    """The top Hessian eigenvalue of one block, with the evidence of its convergence.

    ``residual`` is ||H v - lambda v|| / |lambda| recomputed with one explicit product at the end
    (so it includes the rounding of the product itself); ``history`` holds the Ritz residual of
    every iteration (Lanczos: from its recurrence; power: explicit), ``converged`` says whether the
    stopping rule ``history[-1] <= tol`` was met within ``max_iter`` iterations (products).
    ``vector`` (on request) is the unit eigenvector, one tensor per block parameter.
    """

    name: str
    numel: int
    eigenvalue: float
    iterations: int
    converged: bool
    residual: float
    method: str
    solver: str
    tol: float
    history: list[float] = field(default_factory=list)
    vector: list[torch.Tensor] | None = field(default=None, repr=False)
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready dict of every field except ``vector`` (tensors are not stored in JSON)."""
        d = {k: v for k, v in asdict(self).items() if k != "vector"}
        d["kind"] = "spectrum"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BlockSpectrum":
        """Inverse of :meth:`to_dict` (``vector`` comes back as None)."""
        return cls(**{k: v for k, v in d.items() if k != "kind"})


@dataclass
class BlockTrace:
    """The trace of one block's Hessian: exact (``stderr == 0``) or Hutchinson with its standard error."""

    name: str
    numel: int
    trace: float
    stderr: float
    method: str
    samples: int  #: probe vectors used (Hutchinson), basis vectors (exact autograd), or 0 (Gauss-Newton)
    exact: bool
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready dict of every field."""
        d = asdict(self)
        d["kind"] = "trace"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BlockTrace":
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: v for k, v in d.items() if k != "kind"})


def save_spectra(path, results: Sequence[BlockSpectrum | BlockTrace], meta: dict | None = None):
    """Write results (spectra and/or traces) to ``path`` as JSON, atomically; ``meta`` is stored beside them."""
    items = []
    for r in results:
        if not isinstance(r, (BlockSpectrum, BlockTrace)):
            raise TypeError(f"save_spectra takes BlockSpectrum/BlockTrace results, got {type(r).__name__}")
        items.append(r.to_dict())
    return atomic_write_json(path, {"format": _SPECTRA_FORMAT, "meta": meta or {}, "results": items})


def load_spectra(path) -> list[BlockSpectrum | BlockTrace]:
    """Read results written by :func:`save_spectra` (vectors are not stored, so ``.vector`` is None)."""
    import json
    from pathlib import Path

    obj = json.loads(Path(path).read_text())
    if not isinstance(obj, dict) or obj.get("format") != _SPECTRA_FORMAT:
        raise ValueError(f"{path} is not a {_SPECTRA_FORMAT} file")
    kinds = {"spectrum": BlockSpectrum, "trace": BlockTrace}
    return [kinds[d["kind"]].from_dict(d) for d in obj["results"]]


# =========================================================================== solvers

def _ritz_residual(norm_r: float, theta: float) -> float:
    if theta == 0.0:
        return 0.0 if norm_r == 0.0 else math.inf
    return norm_r / abs(theta)


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, *, tol: float = 1e-4,
            max_iter: int = 100, generator: torch.Generator | None = None, dtype=torch.float64):
    """Top (largest-magnitude) eigenpair of a symmetric operator by Lanczos with full reorthogonalization.

    ``matvec`` maps a flat float64 vector of length ``n`` to a flat vector. Stops when the Ritz
    residual |beta_k s_k| / |theta| (= ||A y - theta y|| / |theta| in exact arithmetic) is <= tol.
    Returns ``(theta, y, iterations, converged, history)``; ``y`` is the unit Ritz vector.
    The Lanczos basis is kept in float64 (8 * n * max_iter bytes; our choice, for reorthogonalization
    accurate to well below any tolerance we use).
    """
    q = torch.randn(n, generator=generator, dtype=dtype)
    q /= q.norm()
    m = min(max_iter, n)
    Q = torch.empty(m + 1, n, dtype=dtype)
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
        res = _ritz_residual(abs(b * float(s[-1])), theta)
        history.append(res)
        scale = max(abs(x) for x in alphas) or 1.0
        if res <= tol or b <= 1e-13 * scale or k == n:
            converged = res <= tol or b <= 1e-13 * scale or k == n
            break
        betas.append(b)
        Q[k] = w / b
    y = Q[:k].T @ s.to(dtype)
    y /= y.norm()
    return theta, y, k, converged, history


def power_iteration(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, *, tol: float = 1e-4,
                    max_iter: int = 100, generator: torch.Generator | None = None, dtype=torch.float64):
    """Top (largest-magnitude) eigenpair by the paper's power iteration, stopped on the Ritz residual.

    Each iteration: w = A v, lambda = v.w, residual = ||w - lambda v|| / |lambda| (explicit), then
    v = w / ||w||. Returns ``(lambda, v, iterations, converged, history)``.
    """
    v = torch.randn(n, generator=generator, dtype=dtype)
    v /= v.norm()
    history, lam, converged, k = [], 0.0, False, 0
    for k in range(1, max_iter + 1):
        w = matvec(v).to(dtype)
        lam = float(torch.dot(v, w))
        res = _ritz_residual(float((w - lam * v).norm()), lam)
        history.append(res)
        if res <= tol:
            converged = True
            break
        nw = w.norm()
        if nw == 0:
            break
        v = w / nw
    return lam, v, k, converged, history


# =========================================================================== inputs

def _is_batch(data) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0])
            and not isinstance(data[1], (tuple, list)))


class _Data:
    """Re-iterable chunks of at most ``chunk_size`` samples, checked to be identical on every pass."""

    def __init__(self, data, chunk_size: int, device, dtype):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if data is None:
            raise HessianError("data is None: pass an (inputs, targets) pair or an iterable of such batches")
        if _is_batch(data):
            data = [tuple(data)]
        elif torch.is_tensor(data):
            raise TypeError("data must be an (inputs, targets) pair or an iterable of such batches, "
                            "got a single tensor")
        else:
            try:
                it = iter(data)
            except TypeError:
                raise TypeError(f"data must be an (inputs, targets) pair or an iterable of such batches, "
                                f"got {type(data).__name__}") from None
            if it is data:  # a one-shot iterator cannot be replayed: keep its batches
                data = list(it)
        self.data, self.chunk_size, self.device, self.dtype = data, chunk_size, device, dtype
        self.fingerprint: list | None = None
        sizes = [len(x) for x, _ in self]
        self.n, self.nchunks = sum(sizes), len(sizes)
        if self.n == 0:
            raise HessianError("data is empty: it yielded no samples; the Hessian of a mean loss "
                               "needs at least one (inputs, targets) sample")

    def __iter__(self):
        fp = []
        for batch in self.data:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[0])):
                raise TypeError(f"each batch must be an (inputs, targets) pair with a tensor of inputs, "
                                f"got {type(batch).__name__}")
            x, y = batch
            if len(x) == 0:
                continue
            if torch.is_tensor(y) and len(y) != len(x):
                raise HessianError(f"a batch holds {len(x)} inputs but {len(y)} targets")
            x = x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device)
            y = y.to(self.device) if torch.is_tensor(y) else y
            fp.append((len(x), float(x.double().sum())))
            for i in range(0, len(x), self.chunk_size):
                yield x[i:i + self.chunk_size], y[i:i + self.chunk_size]
        if self.fingerprint is None:
            self.fingerprint = fp
        elif fp != self.fingerprint:
            raise HessianError("data changed between passes (a shuffling or augmenting loader?): the Hessian "
                               "needs the same samples on every pass; use an unshuffled, un-augmented loader")

    def first(self, k: int):
        """The first ``k`` samples as one batch."""
        xs, ys, got = [], [], 0
        for x, y in self:
            xs.append(x[:k - got])
            ys.append(y[:k - got])
            got += len(xs[-1])
            if got >= k:
                break
        y = torch.cat(ys) if torch.is_tensor(ys[0]) else sum((list(t) for t in ys), [])
        return torch.cat(xs), y


def _model_float(model: nn.Module):
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise HessianError(f"{type(model).__name__} has no floating-point parameters")


def _resolve_blocks(model: nn.Module, blocks) -> list[Block]:
    if blocks is None:
        blocks = quant_blocks(model, "layer")
    elif isinstance(blocks, str):
        blocks = quant_blocks(model, blocks)
    elif isinstance(blocks, Block):
        blocks = [blocks]
    else:
        blocks = list(blocks)
        if blocks and all(isinstance(b, str) for b in blocks):
            blocks = quant_blocks(model, blocks)
    if not blocks:
        raise HessianError("no blocks to compute: the model has no Conv2d/Linear layer, or an empty block list "
                           "was given")
    owned = {id(p) for p in model.parameters()}
    for b in blocks:
        if not isinstance(b, Block):
            raise TypeError(f"blocks must be Block objects, a granularity string ('layer', 'residual') or module "
                            f"names, got {type(b).__name__}")
        params = b.params
        if not params or any(p is None for p in params):
            raise HessianError(f"block {b.name!r} has no parameters: a block needs at least one weight tensor")
        for p in params:
            if id(p) not in owned:
                raise HessianError(f"block {b.name!r} holds a parameter that is not in this model")
            if not p.is_floating_point():
                raise HessianError(f"block {b.name!r} holds a non-floating-point parameter ({p.dtype})")
    return blocks


@contextlib.contextmanager
def _model_state(model: nn.Module):
    """Eval mode inside; on exit every module's mode, every requires_grad flag and every .grad are restored."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        model.eval()
        yield
    finally:
        for m, t in modes:
            m.training = t
        for p, f, g in zip(params, flags, grads):
            p.requires_grad_(f)
            p.grad = g


def _set_requires_grad(model: nn.Module, params: Sequence[torch.Tensor]) -> None:
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _loss(model, loss_fn, x, y, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x)
    loss = loss_fn(out, y)
    if not torch.is_tensor(loss) or loss.dim() != 0:
        shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
        raise HessianError(f"block {name!r}: loss_fn must return a scalar (the batch mean), got {shape}; "
                           "use reduction='mean'")
    if not torch.isfinite(loss).all():
        raise HessianError(f"block {name!r}: the loss is not finite ({float(loss.detach())}) on a data chunk")
    return loss.reshape(()), out


def _check_finite(t: torch.Tensor, name: str, what: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise HessianError(f"block {name!r}: the {what} is not finite (NaN or inf); the Hessian is not defined "
                           "there (check the weights and data)")
    return t


# =========================================================================== autograd route

class _AutogradOperator:
    """H_i v by double backward, summed over chunks with weights n_chunk / N."""

    def __init__(self, model, loss_fn, data: _Data, block: Block):
        self.model, self.loss_fn, self.data, self.block = model, loss_fn, data, block
        self.params = block.params
        self.cache = None  # (grads) when the data is one chunk: the graph is reused

    def __call__(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        name, params = self.block.name, self.params
        _set_requires_grad(self.model, params)
        out = [torch.zeros_like(p) for p in params]
        single = self.data.nchunks == 1
        for x, y in self.data:
            if single and self.cache is not None:
                grads = self.cache
            else:
                loss, _ = _loss(self.model, self.loss_fn, x, y, name)
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                if single:
                    self.cache = grads
            terms = [(g * v).sum() for g, v in zip(grads, vs) if g is not None and g.requires_grad]
            if not terms:
                continue  # the gradient is constant in W: this chunk's Hessian block is zero
            hv = torch.autograd.grad(sum(terms), params, retain_graph=single, allow_unused=True)
            w = len(x) / self.data.n
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h.detach(), alpha=w)
        for o in out:
            _check_finite(o, name, "Hessian-vector product")
        return out


def hvp(model: nn.Module, loss_fn, data, block: Block | str, v, *, chunk_size: int = 128) -> list[torch.Tensor]:
    """The exact product H_i v (autograd double backward) for one block, with the model in eval mode.

    ``block`` is a :class:`Block` or a module name; ``v`` a tensor (one-parameter block) or a list of
    tensors shaped like ``block.params``. Returns a list of tensors shaped like the parameters.
    """
    blk = _resolve_blocks(model, [block] if isinstance(block, (Block, str)) else block)
    if len(blk) != 1:
        raise ValueError("hvp takes exactly one block")
    blk = blk[0]
    params = blk.params
    vs = [v] if torch.is_tensor(v) else list(v)
    if len(vs) != len(params) or any(tuple(a.shape) != tuple(p.shape) for a, p in zip(vs, params)):
        raise ValueError(f"block {blk.name!r}: v must match the shapes {[tuple(p.shape) for p in params]}, "
                         f"got {[tuple(a.shape) for a in vs]}")
    device, dtype = _model_float(model)
    with _model_state(model):
        d = _Data(data, chunk_size, device, dtype)
        vs = [a.to(p.device, p.dtype) for a, p in zip(vs, params)]
        return [t.clone() for t in _AutogradOperator(model, loss_fn, d, blk)(vs)]


def _flat_operator(op, params: list[torch.Tensor]):
    """Wrap a list-of-tensors operator as a flat-vector one (in the parameters' dtype)."""
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    dtype = params[0].dtype

    def unflat(v):
        return [t.view(s) for t, s in zip(v.to(dtype).split(sizes), shapes)]

    def matvec(v):
        return torch.cat([t.reshape(-1) for t in op(unflat(v))])
    return matvec, unflat


# =========================================================================== Gauss-Newton route

_GN_TYPES = (nn.Conv2d, nn.Linear)


def _is_cross_entropy(loss_fn) -> str | None:
    if loss_fn is F.cross_entropy:
        return None
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None:
            return "CrossEntropyLoss with class weights (its mean is a weighted mean)"
        if loss_fn.reduction != "mean":
            return f"CrossEntropyLoss with reduction={loss_fn.reduction!r} (need 'mean')"
        return None
    return f"the loss is {getattr(loss_fn, '__name__', type(loss_fn).__name__)}, not cross-entropy"


def gauss_newton_exact(model: nn.Module, loss_fn, block: Block) -> tuple[bool, str]:
    """Whether H_i equals its Gauss-Newton block exactly for this model, loss and block; and why not.

    Conditions (checked structurally; ``"auto"`` additionally proves it numerically): the block is
    one Conv2d or Linear weight, not re-parametrized; the loss is mean cross-entropy without class
    weights (label smoothing is fine: the loss Hessian in the logits is diag(p) - p p^T either way);
    no module in the model is smooth (:data:`SMOOTH_MODULES`; BatchNorm is used in eval mode). Our
    choice: the whole model is scanned, not only what follows the block, which may refuse a case that
    is exact but never accepts one that is not. Functional calls (``F.gelu`` in a ``forward``) cannot
    be seen here; the on-the-run proof of ``method="auto"`` catches them.
    """
    if len(block.modules) != 1:
        return False, f"block {block.name!r} has {len(block.modules)} layers (the identity holds for one layer)"
    m = block.modules[0]
    if not isinstance(m, _GN_TYPES):
        return False, f"block {block.name!r} is a {type(m).__name__}, not Conv2d/Linear"
    if hasattr(m, "parametrizations"):
        return False, f"block {block.name!r} is re-parametrized"
    why = _is_cross_entropy(loss_fn)
    if why:
        return False, why
    for name, mod in model.named_modules():
        if isinstance(mod, SMOOTH_MODULES):
            return False, f"the model holds a smooth module {name!r} ({type(mod).__name__})"
    return True, ""


def _layer_map(mod: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's output as a function of its weight, without bias (linear in ``w``)."""
    if isinstance(mod, nn.Linear):
        return F.linear(x, w)
    return mod._conv_forward(x, w, None)


def _patches(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a per-sample weight gradient contracts the output gradient with.

    Linear: the input as (n, positions, in_features). Conv2d: the input patches as
    (n, groups, Cin/groups * kh * kw, Ho * Wo), built from strided views of the padded input (our
    choice: ``F.unfold`` is about 15x slower on CPU for ResNet20's layers).
    """
    n = x.shape[0]
    if isinstance(mod, nn.Linear):
        return x.reshape(n, -1, mod.in_features)
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        xp = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
    else:
        ph, pw = mod.padding
        xp = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
    (kh, kw), (sh, sw), (dh, dw) = mod.kernel_size, mod.stride, mod.dilation
    p = xp.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # n, C, Ho, Wo, span_h, span_w
    p = p[..., ::dh, ::dw]
    c, ho, wo = p.shape[1], p.shape[2], p.shape[3]
    return p.permute(0, 1, 4, 5, 2, 3).reshape(n, mod.groups, (c // mod.groups) * kh * kw, ho * wo)


def _jac_rows(mod: nn.Module, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients from :func:`_patches` ``u`` and output gradients ``g`` (n, *out):
    (n, numel), row n = d<out_n, g_n>/dW in the weight's memory order."""
    n = g.shape[0]
    if isinstance(mod, nn.Linear):
        return torch.bmm(g.reshape(n, -1, mod.out_features).transpose(1, 2), u).reshape(n, -1)
    G = mod.groups
    g2 = g.reshape(n, G, mod.out_channels // G, u.shape[-1])
    return torch.matmul(g2, u.transpose(2, 3)).reshape(n, -1)


def _rows_batched(mod: nn.Module) -> bool:
    """Whether a layer's Jacobian rows for all k class directions come from one batched product
    (ungrouped convolutions: the rows of direction k are then a contiguous slice of the result)."""
    return isinstance(mod, nn.Conv2d) and mod.groups == 1


def _per_sample_jac(mod: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients: x (n, *in), g (n, *out) -> (n, numel) with row n = d<out_n, g_n>/dW."""
    return _jac_rows(mod, _patches(mod, x), g)


_SLAB_BYTES = 1 << 20  # rows of stored Jacobians multiplied at a time (about half a core's L2 cache)


class _GNStore:
    """What one layer keeps for Gauss-Newton products: whitened Jacobian rows, or input + output gradients."""

    def __init__(self, block: Block, kind: str, n: int, k: int, in_shape, out_shape, dtype, device):
        self.block, self.mod, self.kind, self.n, self.k = block, block.modules[0], kind, n, k
        w = self.mod.weight
        self.numel = w.numel()
        if kind == "jacobian":
            self.R = torch.empty(n, k, self.numel, dtype=dtype, device=device)
        else:
            self.X = torch.empty(n, *in_shape, dtype=dtype, device=device)
            self.G = torch.empty(n, k, *out_shape, dtype=dtype, device=device)
        self.calls = 0

    @staticmethod
    def nbytes(kind, n, k, numel, in_numel, out_numel, itemsize) -> int:
        """Bytes a store of this kind takes."""
        if kind == "jacobian":
            return n * k * numel * itemsize
        return n * (k * out_numel + in_numel) * itemsize

    def matvec(self, v: torch.Tensor, rows: int | None = None, block_rows: int = 512) -> torch.Tensor:
        """H v (flat, the weight's dtype) over the first ``rows`` samples (all by default)."""
        rows = self.n if rows is None else rows
        if self.kind == "jacobian":
            R = self.R[:rows].reshape(rows * self.k, self.numel)
            # our choice: R^T (R v) a slab of rows at a time, each slab read while still in cache (one pass
            # over R from memory instead of two; the same order of sums)
            step = max(1, _SLAB_BYTES // (self.numel * R.element_size()))
            if step >= R.shape[0]:
                return (R.T @ (R @ v)) / rows
            out = torch.zeros_like(v)
            for i in range(0, R.shape[0], step):
                slab = R[i:i + step]
                out.addmv_(slab.T, slab @ v)
            return out / rows
        # the layer map is linear in W: its vector-Jacobian product is the weight gradient of one backward
        # (plain autograd: torch.func.vjp costs about a second on its first call in a process)
        W = v.view(self.mod.weight.shape).detach().requires_grad_(True)
        out = torch.zeros_like(v)
        for i in range(0, rows, block_rows):
            j = min(rows, i + block_rows)
            x, G = self.X[i:j], self.G[i:j]
            with torch.enable_grad():
                a = _layer_map(self.mod, x, W)
            u = torch.bmm(G.reshape(j - i, self.k, -1), a.detach().reshape(j - i, -1, 1))  # (n, k, 1)
            g = torch.bmm(u.transpose(1, 2), G.reshape(j - i, self.k, -1)).view_as(a)       # sum_k u_k G_k
            out += torch.autograd.grad(a, W, g)[0].reshape(-1)
        return out / rows


def _whitening(logits: torch.Tensor) -> torch.Tensor:
    """Per sample, the C x (C-1) matrix F_n = E^T L_n with Lambda_n = F_n F_n^T (see module docstring)."""
    p = torch.softmax(logits.double(), dim=1)
    C = p.shape[1]
    q = p[:, :C - 1]
    lam = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]
    ev, V = torch.linalg.eigh(lam)
    L = V * ev.clamp_min(0).sqrt()[:, None, :]           # (n, C-1, C-1), L L^T = Lambda'
    Fm = torch.cat([L, -L.sum(1, keepdim=True)], dim=1)  # (n, C, C-1): E^T L
    return Fm.to(logits.dtype)


def _gn_pass(model, loss_fn, data: _Data, blocks: list[Block], on_forward, on_grad, what: str):
    """One pass over the data: per chunk, a forward with probes on each block's output, then one
    backward pass per whitened class direction k, handing d<logits, F[:, :, k]>/d(output) to ``on_grad``."""
    probes: dict[int, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    calls: dict[int, int] = {}
    handles = []

    def hook_for(i):
        def hook(mod, inp, out):
            calls[i] = calls.get(i, 0) + 1
            pr = torch.zeros_like(out, requires_grad=True)
            probes[i], inputs[i] = pr, inp[0].detach()
            return out + pr
        return hook

    for i, b in enumerate(blocks):
        handles.append(b.modules[0].register_forward_hook(hook_for(i)))
    for p in model.parameters():
        p.requires_grad_(False)
    names = ", ".join(b.name for b in blocks)
    try:
        n0 = 0
        for x, y in data:
            probes.clear(), inputs.clear(), calls.clear()
            z = model(x)
            if not torch.is_tensor(z) or z.dim() != 2 or z.shape[1] < 2:
                raise HessianError(f"blocks {names}: the Gauss-Newton route needs (batch, classes>=2) logits, "
                                   f"got {tuple(z.shape) if torch.is_tensor(z) else type(z).__name__}")
            for i, b in enumerate(blocks):
                if calls.get(i, 0) != 1:
                    raise HessianError(f"block {b.name!r}: its layer ran {calls.get(i, 0)} times in one forward "
                                       "(the Gauss-Newton route needs exactly one call)")
            loss = loss_fn(z.detach(), y)
            if not torch.is_tensor(loss) or loss.dim() != 0:
                raise HessianError(f"blocks {names}: loss_fn must return a scalar (the batch mean)")
            _check_finite(loss.detach(), names, "loss")
            _check_finite(z.detach(), names, "model output")
            Fm = _whitening(z.detach())
            n = len(x)
            on_forward(n0, n, {i: inputs[i] for i in range(len(blocks))}, Fm)
            plist = [probes[i] for i in range(len(blocks))]
            K = Fm.shape[2]
            for k in range(K):
                gs = torch.autograd.grad(z, plist, Fm[:, :, k], retain_graph=k < K - 1, allow_unused=True)
                on_grad(n0, n, k, {i: (g if g is not None else torch.zeros_like(plist[i]))
                                   for i, g in enumerate(gs)})
            n0 += n
    finally:
        for h in handles:
            h.remove()


def _shapes(model, data: _Data, blocks: list[Block]):
    """Per-sample input/output shapes of each block's layer and the execution order, from one sample."""
    rec, handles, order = {}, [], []

    def hook_for(i):
        def hook(mod, inp, out):
            if i not in rec:
                rec[i] = (tuple(inp[0].shape[1:]), tuple(out.shape[1:]))
                order.append(i)
        return hook

    for i, b in enumerate(blocks):
        handles.append(b.modules[0].register_forward_hook(hook_for(i)))
    try:
        x, _ = data.first(1)
        with torch.no_grad():
            z = model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [blocks[i].name for i in range(len(blocks)) if i not in rec]
    if missing:
        raise HessianError(f"block {missing[0]!r}: its layer never ran in the model's forward")
    return rec, order, int(z.shape[1]) if torch.is_tensor(z) and z.dim() == 2 else None


def _plan_groups(blocks, rec, order, n, C, itemsize, max_memory):
    """Storage kind per block and groups of blocks (output side first) whose storage fits ``max_memory``."""
    k = C - 1
    kinds, sizes = {}, {}
    for i, b in enumerate(blocks):
        in_numel, out_numel = math.prod(rec[i][0]), math.prod(rec[i][1])
        numel = b.modules[0].weight.numel()
        jac = _GNStore.nbytes("jacobian", n, k, numel, in_numel, out_numel, itemsize)
        act = _GNStore.nbytes("activation", n, k, numel, in_numel, out_numel, itemsize)
        # our choice: Jacobian rows make products ~|out|/(k) times cheaper; accept up to 1.5x the memory
        kinds[i] = "jacobian" if jac <= 1.5 * act else "activation"
        sizes[i] = jac if kinds[i] == "jacobian" else act
    groups, cur, used = [], [], 0
    for i in reversed(order):
        if cur and used + sizes[i] > max_memory:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += sizes[i]
    if cur:
        groups.append(cur)
    return kinds, groups


def _gn_capture(model, loss_fn, data: _Data, blocks: list[Block], kinds: dict, rec: dict, C: int):
    """Build the Gauss-Newton stores of a group of blocks (one pass over the data)."""
    device, dtype = _model_float(model)
    stores = {i: _GNStore(b, kinds[i], data.n, C - 1, rec[i][0], rec[i][1], dtype, device)
              for i, b in enumerate(blocks)}
    cur_in: dict[int, torch.Tensor] = {}
    cur_g: dict[int, torch.Tensor] = {}

    def on_forward(n0, n, inputs, Fm):
        for i, s in stores.items():
            if s.kind == "activation":
                s.X[n0:n0 + n] = inputs[i]
            else:
                cur_in[i] = _patches(s.mod, inputs[i])

    def on_grad(n0, n, k, grads):
        for i, s in stores.items():
            if s.kind == "activation":
                s.G[n0:n0 + n, k] = grads[i]
            elif not _rows_batched(s.mod):
                s.R[n0:n0 + n, k] = _jac_rows(s.mod, cur_in[i], grads[i])
            else:  # collect the k output gradients, then all rows in one matrix product
                if k == 0:
                    cur_g[i] = grads[i].new_empty(n, s.k, *grads[i].shape[1:])
                cur_g[i][:, k] = grads[i]
                if k == s.k - 1:
                    g = cur_g.pop(i).view(n, s.k * s.mod.out_channels, -1)
                    torch.bmm(g, cur_in[i].view(n, *cur_in[i].shape[2:]).transpose(1, 2),
                              out=s.R[n0:n0 + n].view(n, s.k * s.mod.out_channels, -1))

    _gn_pass(model, loss_fn, data, blocks, on_forward, on_grad, "eigenvalues")
    return stores


# =========================================================================== drivers

def _check_args(method, solver, tol, max_iter):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")


def _routes(model, loss_fn, blocks, method):
    routes, reasons = [], []
    for b in blocks:
        ok, why = gauss_newton_exact(model, loss_fn, b)
        if method == "gauss-newton" and not ok:
            raise HessianError(f"method='gauss-newton' is not exact for block {b.name!r}: {why}; "
                               "use method='autograd' or 'auto'")
        routes.append("gauss-newton" if (ok and method != "autograd") else "autograd")
        reasons.append(why)
    return routes, reasons


def _solve(matvec, n, name, method, solver, tol, max_iter, seed, return_vectors, unflat, note=""):
    gen = torch.Generator().manual_seed(seed)
    fn = lanczos if solver == "lanczos" else power_iteration
    checked = lambda v: _check_finite(matvec(v), name, "Hessian-vector product")  # noqa: E731
    theta, y, iters, conv, hist = fn(checked, n, tol=tol, max_iter=max_iter, generator=gen)
    if solver == "lanczos":
        r = checked(y).double()
        residual = _ritz_residual(float((r - theta * y).norm()), theta)
    else:
        residual = hist[-1]
    vec = [t.detach().clone() for t in unflat(y)] if return_vectors else None
    return BlockSpectrum(name=name, numel=n, eigenvalue=theta, iterations=iters, converged=bool(conv),
                         residual=residual, method=method, solver=solver, tol=tol, history=hist,
                         vector=vec, note=note)


def _progress(total, progress, desc):
    from .progress import bar

    return bar(total=total, disable=not progress, desc=desc, unit="block")


def top_eigenvalues(model: nn.Module, loss_fn, data, blocks=None, *, method: str = "auto",
                    solver: str = "lanczos", tol: float = 1e-4, max_iter: int = 100, seed: int = 0,
                    return_vectors: bool = False, progress: bool = True, chunk_size: int = 32,
                    max_memory: int = 2 << 30, check_samples: int = 8) -> list[BlockSpectrum]:
    """The top eigenvalue lambda_i of each block's Hessian H_i (paper section 3.1), one result per block.

    ``blocks``: None (every Conv2d/Linear weight), a granularity (``"layer"``, ``"residual"``), module
    names, or :class:`Block` objects. ``data``: an (inputs, targets) pair or an iterable of such batches
    (replayed identically on every pass); the Hessian is that of the mean loss over all samples.
    ``method``/``solver``/``tol``: see the module docstring. ``chunk_size`` bounds the samples in one
    autograd graph (our choice, 32: on a 2-core CPU chunks of 16 to 64 run equally fast on ResNet20,
    and memory grows with the chunk); ``max_memory`` (bytes) bounds the Gauss-Newton storage of one group of layers;
    ``check_samples`` is the size of the subset on which ``"auto"`` proves the Gauss-Newton identity, in
    float64 (our choice, 8: the identity holds sample by sample, and float64 convolutions are slow on CPU).
    The start vector of every block is drawn from ``torch.Generator().manual_seed(seed)``.
    """
    _check_args(method, solver, tol, max_iter)
    blocks = _resolve_blocks(model, blocks)
    device, dtype = _model_float(model)
    results: dict[int, BlockSpectrum] = {}
    with _model_state(model):
        data = _Data(data, chunk_size, device, dtype)
        routes, _ = _routes(model, loss_fn, blocks, method)
        bar = _progress(len(blocks), progress, "Hessian eigenvalues")
        try:
            gn = [i for i, r in enumerate(routes) if r == "gauss-newton"]
            fallback = []
            if gn:
                sub = [blocks[i] for i in gn]
                rec, order, C = _shapes(model, data, sub)
                if (C is None or C < 2) and method == "auto":  # not (batch, classes) logits: autograd
                    fallback = [(i, "gauss-newton refused: the output is not (batch, classes>=2) logits")
                                for i in gn]
                    gn, sub = [], []
                elif C is None or C < 2:
                    raise HessianError(f"blocks {', '.join(b.name for b in sub)}: the Gauss-Newton route needs "
                                       "(batch, classes>=2) logits")
            if gn:
                kinds, groups = _plan_groups(sub, rec, order, data.n, C, torch.finfo(dtype).bits // 8,
                                             max_memory)
                for grp in groups:
                    gblocks = [sub[j] for j in grp]
                    stores = _gn_capture(model, loss_fn, data, gblocks, {t: kinds[j] for t, j in enumerate(grp)},
                                         {t: rec[j] for t, j in enumerate(grp)}, C)
                    errs = (_prove(model, loss_fn, data, gblocks, [stores[t].kind for t in range(len(grp))],
                                   check_samples, seed) if method == "auto" else None)
                    for t, j in enumerate(grp):
                        i, store, b = gn[j], stores[t], gblocks[t]
                        note = f"storage={store.kind}"
                        if method == "auto":
                            err = errs[t]
                            if not err <= PROOF_RTOL:
                                warnings.warn(f"block {b.name!r}: the Gauss-Newton product differs from autograd "
                                              f"by {err:.2e} relative (> {PROOF_RTOL}); falling back to autograd",
                                              RuntimeWarning, stacklevel=2)
                                fallback.append((i, f"gauss-newton refused: proof error {err:.2e}"))
                                stores[t] = None
                                continue
                            note += f"; proof rel. diff {err:.1e} on {min(check_samples, data.n)} samples"
                        results[i] = _solve(lambda v, s=store: s.matvec(v.to(s.mod.weight.dtype)), store.numel,
                                            b.name, "gauss-newton", solver, tol, max_iter, seed, return_vectors,
                                            lambda v, s=store: [v.to(s.mod.weight.dtype).view_as(s.mod.weight)],
                                            note)
                        stores[t] = None
                        bar.update(1)
                    del stores
            todo = [(i, "") for i, r in enumerate(routes) if r == "autograd"] + fallback
            for i, note in sorted(todo):
                b = blocks[i]
                op = _AutogradOperator(model, loss_fn, data, b)
                matvec, unflat = _flat_operator(op, b.params)
                results[i] = _solve(matvec, b.numel, b.name, "autograd", solver, tol, max_iter, seed,
                                    return_vectors, unflat, note)
                bar.update(1)
        finally:
            bar.close()
    return [results[i] for i in range(len(blocks))]


def _prove(model, loss_fn, data: _Data, blocks: list[Block], kinds: list[str], check_samples: int,
           seed: int) -> list[float]:
    """Per block, the relative difference between the Gauss-Newton and the autograd product H_i v on the
    first ``check_samples`` samples (one random unit ``v`` per block, drawn from ``seed + 1``).

    The check runs in float64 on a copy of the model (our choice): it proves the *identity* H_i = G_i for
    this network, which holds sample by sample, so a few samples suffice. In float32 both products carry
    rounding errors as large as the tolerance for a random ``v`` (cancellation in J v, and in the double
    backward through softmax where the model is confident); in float64 an exact identity agrees to
    rounding level and a non-exact one (a smooth activation) differs by orders of magnitude more. The
    float32 stores the eigensolver uses (of storage ``kinds``) are tested against dense Hessians in the
    test suite. All blocks share one autograd graph: one forward and one gradient with
    ``create_graph``, then one double backward per block (d<g_i, v_i>/dW_i is H_i v_i alone)."""
    k = max(1, min(check_samples, data.n))
    ref = copy.deepcopy(model).double() if _model_float(model)[1] != torch.float64 else model
    device = _model_float(ref)[0]
    rblocks = _resolve_blocks(ref, [b.module_names[0] for b in blocks])
    x, y = data.first(k)
    sub = _Data((x.double() if x.is_floating_point() else x, y), 1 << 62, device, torch.float64)
    rec, _, C = _shapes(ref, sub, rblocks)
    rstores = _gn_capture(ref, loss_fn, sub, rblocks, dict(enumerate(kinds)), rec, C)
    weights = [b.modules[0].weight for b in rblocks]
    names = ", ".join(b.name for b in blocks)
    _set_requires_grad(ref, weights)
    try:
        xs, ys = sub.first(k)
        loss, _ = _loss(ref, loss_fn, xs, ys, names)
        grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        errs = []
        for j, (b, store, w, g) in enumerate(zip(blocks, rstores.values(), weights, grads)):
            v = torch.randn(w.numel(), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
            v = v / v.norm()
            gn = _check_finite(store.matvec(v), b.name, "Gauss-Newton product")
            if g is None or not g.requires_grad:  # the gradient is constant in W: H_i = 0
                ag = torch.zeros_like(v)
            else:
                (h,) = torch.autograd.grad((g * v.view_as(w)).sum(), w, retain_graph=j < len(blocks) - 1,
                                           allow_unused=True)
                ag = torch.zeros_like(v) if h is None else _check_finite(h.detach(), b.name,
                                                                        "Hessian-vector product").reshape(-1)
            den = float(ag.norm())
            num = float((gn - ag).norm())
            errs.append(0.0 if num == 0 else (num / den if den > 0 else math.inf))
    finally:
        for p in ref.parameters():
            p.requires_grad_(False)
    return errs


def traces(model: nn.Module, loss_fn, data, blocks=None, *, method: str = "auto", samples: int = 100,
           exact_max: int = 64, seed: int = 0, progress: bool = True, chunk_size: int = 32,
           check_samples: int = 8) -> list[BlockTrace]:
    """The trace of each block's Hessian (HAWQ-V2's sensitivity), exact where the method allows.

    Gauss-Newton blocks: exact, tr H_i = (1/N) sum_n sum_k ||r_nk||^2, one pass over the data with
    memory bounded by one chunk (nothing is kept across chunks). Autograd blocks: exact from the
    ``numel`` basis vectors when ``numel <= exact_max`` (our choice of threshold: cost grows with numel),
    else Hutchinson's estimator with ``samples`` Rademacher probes (seeded) and its standard error
    std / sqrt(samples). ``"auto"`` proves the Gauss-Newton identity as :func:`top_eigenvalues` does.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if samples < 2:
        raise ValueError(f"samples must be >= 2 (a standard error needs two probes), got {samples}")
    blocks = _resolve_blocks(model, blocks)
    device, dtype = _model_float(model)
    results: dict[int, BlockTrace] = {}
    with _model_state(model):
        data = _Data(data, chunk_size, device, dtype)
        routes, _ = _routes(model, loss_fn, blocks, method)
        bar = _progress(len(blocks), progress, "Hessian traces")
        try:
            gn = [i for i, r in enumerate(routes) if r == "gauss-newton"]
            notes = {i: "" for i in range(len(blocks))}
            if gn and method == "auto":
                sub = [blocks[i] for i in gn]
                keep = []
                errs = _prove(model, loss_fn, data, sub, ["jacobian"] * len(sub), check_samples, seed)
                for t, i in enumerate(gn):
                    err = errs[t]
                    if err <= PROOF_RTOL:
                        keep.append(i)
                    else:
                        warnings.warn(f"block {blocks[i].name!r}: the Gauss-Newton product differs from autograd "
                                      f"by {err:.2e} relative; falling back to autograd", RuntimeWarning,
                                      stacklevel=2)
                        routes[i] = "autograd"
                        notes[i] = f"gauss-newton refused: proof error {err:.2e}"
                gn = keep
            if gn:
                sub = [blocks[i] for i in gn]
                acc = [0.0] * len(sub)
                cur_in = {}

                def on_forward(n0, n, inputs, Fm):
                    cur_in.update({t: _patches(sub[t].modules[0], a) for t, a in inputs.items()})

                def on_grad(n0, n, k, grads):
                    for t, b in enumerate(sub):
                        r = _jac_rows(b.modules[0], cur_in[t], grads[t])
                        acc[t] += float(r.double().pow(2).sum())

                _gn_pass(model, loss_fn, data, sub, on_forward, on_grad, "traces")
                for t, i in enumerate(gn):
                    results[i] = BlockTrace(blocks[i].name, blocks[i].numel, acc[t] / data.n, 0.0,
                                            "gauss-newton", 0, True, notes[i])
                    bar.update(1)
            gen_seed = seed
            for i, r in enumerate(routes):
                if r != "autograd":
                    continue
                b = blocks[i]
                op = _AutogradOperator(model, loss_fn, data, b)
                matvec, _ = _flat_operator(op, b.params)
                n = b.numel
                if n <= exact_max:
                    tot = 0.0
                    for j in range(n):
                        e = torch.zeros(n, dtype=torch.float64)
                        e[j] = 1
                        tot += float(_check_finite(matvec(e), b.name, "Hessian-vector product")[j])
                    results[i] = BlockTrace(b.name, n, tot, 0.0, "autograd", n, True, notes[i])
                else:
                    g = torch.Generator().manual_seed(gen_seed)
                    vals = []
                    for _ in range(samples):
                        z = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
                        hz = _check_finite(matvec(z), b.name, "Hessian-vector product").double()
                        vals.append(float(torch.dot(z, hz)))
                    t = torch.tensor(vals, dtype=torch.float64)
                    results[i] = BlockTrace(b.name, n, float(t.mean()), float(t.std() / math.sqrt(samples)),
                                            "autograd", samples, False, notes[i])
                bar.update(1)
        finally:
            bar.close()
    return [results[i] for i in range(len(blocks))]
