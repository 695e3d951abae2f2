r"""The exact Gauss-Newton route to :math:`H_i v` for one Conv2d/Linear layer of a network whose nonlinearities
are piecewise linear (paper section 3.1 needs the top eigenvalue of :math:`H_i`; this route gets its products
without double backward).

For such a layer (ReLU, max/avg pooling, residual additions, BatchNorm with running statistics), the
logits are piecewise linear in that layer's weights, so the Hessian block equals the generalized
Gauss-Newton block exactly (the logits' second derivative in :math:`W_i` vanishes almost everywhere):

.. math::

   H_i = \frac{1}{N} \sum_n f_n \, J_n^T \left( \operatorname{diag}(p_n) - p_n p_n^T \right) J_n

with :math:`J_n = \partial z_n / \partial W_i` the Jacobian of the logits :math:`z_n`,
:math:`p_n = \operatorname{softmax}(z_n)` and :math:`f_n` the sample's factor in the user's
cross-entropy (1 for a plain mean; class weights, ``ignore_index``, label smoothing and
``reduction="sum"`` in :class:`~hawqlib.hessian.losses.LossSpec`). Our implementation (our choice):
since :math:`\Lambda_n = \operatorname{diag}(p_n) - p_n p_n^T` annihilates the all-ones vector, it equals
:math:`E^T \Lambda'_n E` with :math:`E = [I_{C-1} \mid -\mathbf{1}]` and :math:`\Lambda'_n` its leading
:math:`(C-1) \times (C-1)` block; writing :math:`\Lambda'_n = L_n L_n^T` (eigen-factor, exact for the positive
semi-definite :math:`\Lambda'_n`), :math:`H_i = \frac{1}{N} \sum_n \sum_k r_{nk} r_{nk}^T` with
:math:`r_{nk} = \sqrt{f_n} \, J_n^T E^T L_n[:, k]`. The :math:`C-1` "whitened" output gradients of *every* layer
come from :math:`C-1` ordinary backward passes per data chunk (no double backward). Per layer we then keep either

* ``"jacobian"`` storage: the rows :math:`r_{nk}` themselves (:math:`N \times (C-1) \times n_i` numbers), when that
  is no larger than 1.5x the alternative (computed for all :math:`C-1` directions of a chunk in one batched matrix
  product); a product :math:`R^T (R v)` is then one pass over the rows, a cache-sized slab at a time; or
* ``"activation"`` storage: the layer input (:math:`N \times d_{in}`) and the whitened output gradients
  (:math:`N \times (C-1) \times d_{out}`); a product is one layer forward with weight :math:`v` and one weight
  gradient.

Layers are processed in groups whose storage fits ``max_memory`` bytes: each group costs one pass over
the data, and the autograd graph lives for one chunk only. Groups are packed from the output side, so
a second group's backward passes stop early. A single layer whose storage alone exceeds the budget is
still processed, alone.

Whether the identity holds is decided structurally here (:func:`gauss_newton_exact`), checked on every
sample during the pass (:mod:`~hawqlib.hessian.identity`) and proved numerically on a spread sample
(:mod:`~hawqlib.hessian.proof`); every eigenpair found on this route is then verified with one fresh
float64 product of this route's operator (or, on request, an autograd product).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import Block
from .identity import IdentityRecord
from .inputs import Data, check_finite, model_float
from .losses import LossSpec
from .results import HessianError

__all__ = ["SMOOTH_MODULES", "gauss_newton_exact", "GNStore", "gn_pass", "gn_capture", "plan_groups",
           "patches", "jac_rows"]

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



_GN_TYPES = (nn.Conv2d, nn.Linear)


def _is_cross_entropy(loss_fn) -> str | None:
    if loss_fn is F.cross_entropy:
        return None
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.reduction not in ("mean", "sum"):
            return f"CrossEntropyLoss with reduction={loss_fn.reduction!r} (need 'mean' or 'sum')"
        return None
    return f"the loss is {getattr(loss_fn, '__name__', type(loss_fn).__name__)}, not cross-entropy"


def gauss_newton_exact(model: nn.Module, loss_fn, block: Block) -> tuple[bool, str]:
    """Whether :math:`H_i` equals its Gauss-Newton block exactly for this model, loss and block; and why not.

    Conditions (checked structurally; ``"auto"`` additionally proves it numerically): the block is
    one Conv2d or Linear weight, not re-parametrized; the loss is cross-entropy (``nn.CrossEntropyLoss``
    with any class weights, ``ignore_index``, label smoothing, reduction mean or sum, or
    ``F.cross_entropy``: its Hessian in the logits is f_n (diag(p) - p p^T) in every case);
    no module in the model is smooth (:data:`SMOOTH_MODULES`; BatchNorm is used in eval mode). Our
    choice: the whole model is scanned, not only what follows the block, which may refuse a case that
    is exact but never accepts one that is not. Functional calls (``F.gelu`` in a ``forward``) cannot
    be seen here, nor a layer that runs twice per forward (shared weights): the orchestrator probes the
    latter and its proof and verification catch the former.
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


def patches(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a per-sample weight gradient contracts the output gradient with.

    Linear: the input as (n, positions, in_features). Conv2d: the input patches as
    (n, groups, Cin/groups * kh * kw, Ho * Wo), built from strided views of the padded input (our
    choice: ``F.unfold`` is much slower on CPU for ResNet20's layers).
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


def jac_rows(mod: nn.Module, u: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients from :func:`patches` ``u`` and output gradients ``g`` of shape
    ``(n, *out)``: an ``(n, numel)`` tensor whose row n is ``d<out_n, g_n>/dW``, in the weight's memory order."""
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


_SLAB_BYTES = 1 << 20  # rows of stored Jacobians multiplied at a time (about half a core's L2 cache)


class GNStore:
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

    def matvec(self, v: torch.Tensor, rows: int | None = None, block_rows: int = 512,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """H v (flat) over the first ``rows`` samples (all by default), in the stored dtype, or with the stored
        values cast to ``dtype`` piece by piece (float64: the verification of a returned eigenpair)."""
        rows = self.n if rows is None else rows
        dt = dtype or (self.R.dtype if self.kind == "jacobian" else self.X.dtype)
        v = v.to(dt)
        if self.kind == "jacobian":
            R = self.R[:rows].reshape(rows * self.k, self.numel)
            # our choice: R^T (R v) a slab of rows at a time, each slab read while still in cache (one pass
            # over R from memory instead of two; the same order of sums)
            step = max(1, _SLAB_BYTES // (self.numel * R.element_size()))
            if step >= R.shape[0]:
                R = R.to(dt)
                return (R.T @ (R @ v)) / rows
            out = torch.zeros_like(v)
            for i in range(0, R.shape[0], step):
                slab = R[i:i + step].to(dt)
                out.addmv_(slab.T, slab @ v)
            return out / rows
        # the layer map is linear in W: its vector-Jacobian product is the weight gradient of one backward
        # (plain autograd: torch.func.vjp has a large one-time cost on its first call in a process)
        W = v.view(self.mod.weight.shape).detach().requires_grad_(True)
        out = torch.zeros_like(v)
        for i in range(0, rows, block_rows):
            j = min(rows, i + block_rows)
            x, G = self.X[i:j].to(dt), self.G[i:j].to(dt)
            with torch.enable_grad():
                a = _layer_map(self.mod, x, W)
            u = torch.bmm(G.reshape(j - i, self.k, -1), a.detach().reshape(j - i, -1, 1))  # (n, k, 1)
            g = torch.bmm(u.transpose(1, 2), G.reshape(j - i, self.k, -1)).view_as(a)       # sum_k u_k G_k
            out += torch.autograd.grad(a, W, g)[0].reshape(-1)
        return out / rows


def _whitening(logits: torch.Tensor, factors: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample, the C x (C-1) matrix F_n = sqrt(f_n) E^T L_n with f_n Lambda_n = F_n F_n^T (see the
    module docstring; ``factors`` None means every f_n = 1)."""
    p = torch.softmax(logits.double(), dim=1)
    C = p.shape[1]
    q = p[:, :C - 1]
    lam = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]
    ev, V = torch.linalg.eigh(lam)
    L = V * ev.clamp_min(0).sqrt()[:, None, :]           # (n, C-1, C-1), L L^T = Lambda'
    Fm = torch.cat([L, -L.sum(1, keepdim=True)], dim=1)  # (n, C, C-1): E^T L
    if factors is not None:
        Fm = Fm * factors.to(Fm.device, Fm.dtype).clamp_min(0).sqrt()[:, None, None]
    return Fm.to(logits.dtype)


def gn_pass(model, spec: LossSpec, data: Data, blocks: list[Block], on_forward, on_grad) -> IdentityRecord:
    """One pass over the data: per chunk, a forward with probes on each block's output, then one
    backward pass per whitened class direction k, handing d<logits, F[:, :, k]>/d(output) to ``on_grad``.
    Returns the :class:`~hawqlib.hessian.identity.IdentityRecord` of every chunk's forward: the blocks
    for which an operation between their output and the logits was not (piecewise) linear."""
    record = IdentityRecord()
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
        for x, y, w in data.chunks(skip_zero=False):
            probes.clear(), inputs.clear(), calls.clear()
            z = model(x)
            if not torch.is_tensor(z) or z.dim() != 2 or z.shape[1] < 2:
                raise HessianError(f"blocks {names}: the Gauss-Newton route needs (batch, classes>=2) logits, "
                                   f"got {tuple(z.shape) if torch.is_tensor(z) else type(z).__name__}")
            for i, b in enumerate(blocks):
                if calls.get(i, 0) != 1:
                    raise HessianError(f"block {b.name!r}: its layer ran {calls.get(i, 0)} times in one forward "
                                       "(the Gauss-Newton route needs exactly one call)")
            record.scan(z, probes, n0)
            spec.check_targets(z, y, f"blocks {names}")
            check_finite(z.detach(), names, "model output")
            if w != 0.0:  # a chunk of ignored targets only has no loss (0/0) and no Hessian
                loss = spec.loss(z.detach(), y)
                if not torch.is_tensor(loss) or loss.numel() != 1:
                    raise HessianError(f"blocks {names}: loss_fn must return a scalar (the batch mean, or sum)")
                check_finite(loss.detach(), names, "loss")
            Fm = _whitening(z.detach(), spec.sample_factors(y, z.shape[1], data.n, data.total, data.plain))
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
    return record


def plan_groups(blocks, rec, order, n, C, itemsize, max_memory):
    """Storage kind per block and groups of blocks (output side first) whose storage fits ``max_memory``."""
    k = C - 1
    kinds, sizes = {}, {}
    for i, b in enumerate(blocks):
        in_numel, out_numel = math.prod(rec[i][0]), math.prod(rec[i][1])
        numel = b.modules[0].weight.numel()
        jac = GNStore.nbytes("jacobian", n, k, numel, in_numel, out_numel, itemsize)
        act = GNStore.nbytes("activation", n, k, numel, in_numel, out_numel, itemsize)
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


def gn_capture(model, spec: LossSpec, data: Data, blocks: list[Block], kinds: dict, rec: dict, C: int):
    """Build the Gauss-Newton stores of a group of blocks (one pass over the data); ``(stores, record)``
    with the pass's :class:`~hawqlib.hessian.identity.IdentityRecord`."""
    device, dtype = model_float(model)
    stores = {i: GNStore(b, kinds[i], data.n, C - 1, rec[i][0], rec[i][1], dtype, device)
              for i, b in enumerate(blocks)}
    cur_in: dict[int, torch.Tensor] = {}
    cur_g: dict[int, torch.Tensor] = {}

    def on_forward(n0, n, inputs, Fm):
        for i, s in stores.items():
            if s.kind == "activation":
                s.X[n0:n0 + n] = inputs[i]
            else:
                cur_in[i] = patches(s.mod, inputs[i])

    def on_grad(n0, n, k, grads):
        for i, s in stores.items():
            if s.kind == "activation":
                s.G[n0:n0 + n, k] = grads[i]
            elif not _rows_batched(s.mod):
                s.R[n0:n0 + n, k] = jac_rows(s.mod, cur_in[i], grads[i])
            else:  # collect the k output gradients, then all rows in one matrix product
                if k == 0:
                    cur_g[i] = grads[i].new_empty(n, s.k, *grads[i].shape[1:])
                cur_g[i][:, k] = grads[i]
                if k == s.k - 1:
                    g = cur_g.pop(i).view(n, s.k * s.mod.out_channels, -1)
                    torch.bmm(g, cur_in[i].view(n, *cur_in[i].shape[2:]).transpose(1, 2),
                              out=s.R[n0:n0 + n].view(n, s.k * s.mod.out_channels, -1))

    record = gn_pass(model, spec, data, blocks, on_forward, on_grad)
    return stores, record


