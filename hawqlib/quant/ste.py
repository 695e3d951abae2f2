"""Fake quantization and its straight-through gradient (paper section 3.2).

HAWQ fine-tunes with the quantized blocks "held in their quantized form" by a straight-through
estimator (section 3.2): the forward pass computes on the quantized values, the backward pass lets the
gradient through as if the quantizer were the identity. This module holds that arithmetic for both grids
of :mod:`hawqlib.quant`; which grid, and with which scale, is decided by :mod:`~hawqlib.quant.grids`
(weights) and :mod:`~hawqlib.quant.observer` (activations).

Implementation (our choice, for speed): the affine grid ``clamp(round(x / s), lo, hi) * s`` is written as
four vectorized in-place PyTorch ops (:func:`affine_grid`) inside a small autograd Function
(:class:`FakeQuantSTE`). Its forward is bit-for-bit the arithmetic of
``torch.fake_quantize_per_tensor_affine`` (``x * (1/s)`` in float32, round half to even) and its gradient
equals theirs; the tests check both. Reason: torch's fused kernels are not vectorized on the CPU, the
composed ops are (``benchmarks/qat_speed.py`` compares a training step with torch.ao's QAT). The weights'
mid-rise grid, which torch's affine fake-quant ops cannot express, is likewise a few in-place ops
(:func:`odd_grid`: ``floor(x / 2h)``, clamp, ``2m + 1``, times ``h``). Callers that know that no element
saturates skip the clamp and the gradient mask, both then exact no-ops, and a convolution's fresh input
gradient is masked in place.
"""
from __future__ import annotations

import torch

__all__ = ["memory_format_of", "affine_grid", "FakeQuantSTE", "odd_grid", "OddGridSTE", "fake_quant"]


def memory_format_of(x: torch.Tensor):
    """``torch.channels_last`` for a 4-d tensor laid out so (and not also contiguous), else ``torch.contiguous_format``."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def affine_grid(x: torch.Tensor, scale, inv, lo, hi, clamp: bool = True) -> torch.Tensor:
    """``clamp(round(x * inv), lo, hi) * scale`` without autograd, in four vectorized passes.

    ``clamp = False`` skips the clamp, for callers that know no element rounds outside [lo, hi].
    """
    t = torch.mul(x.detach(), inv)
    t.round_()
    if clamp:
        t.clamp_(lo, hi)
    t.mul_(scale)
    return t if t.dtype == x.dtype else t.to(x.dtype)


class FakeQuantSTE(torch.autograd.Function):
    """Fake quantization on an affine grid (:func:`affine_grid`); backward = straight-through estimator.

    Forward: ``clamp(round(x * inv), lo, hi) * scale``, the exact arithmetic of
    ``torch.fake_quantize_per_*_affine`` (``inv = 1/scale`` in float32, round half to even; the
    tests check bit equality with those ops). Backward: the identity where ``x`` lies inside the
    grid's range widened by half a step (where rounding does not saturate), zero outside, when
    ``clip_grad``; the plain identity otherwise (a caller passes ``clip_grad = False`` when it
    knows that no element saturates, e.g. a range taken from the tensor itself).
    ``grad_inplace``: the incoming gradient may be overwritten (only for callers whose output
    feeds a single op with a freshly allocated input gradient, such as a convolution).
    """

    @staticmethod
    def forward(ctx, x, scale, inv, lo, hi, clip_grad, grad_inplace=False, clamp=True):
        """``x`` on the affine grid (:func:`affine_grid`); saves what the masked backward needs."""
        ctx.clip, ctx.inplace = clip_grad, grad_inplace
        if clip_grad:
            ctx.save_for_backward(x)
            ctx.bounds = ((lo - 0.5) * scale, (hi + 0.5) * scale)
        return affine_grid(x, scale, inv, lo, hi, clamp)

    @staticmethod
    def backward(ctx, g):
        """The straight-through gradient for ``x`` (masked where rounding saturates, with ``clip_grad``)."""
        if not ctx.clip:
            return g, None, None, None, None, None, None, None
        x, = ctx.saved_tensors
        a, b = ctx.bounds
        if isinstance(a, float):  # per-tensor: one fused, vectorized masking pass
            if ctx.inplace and g.is_contiguous(memory_format=memory_format_of(x)):
                gx = torch.ops.aten.hardtanh_backward.grad_input(g, x, a, b, grad_input=g)
            else:
                gx = torch.ops.aten.hardtanh_backward(g, x, a, b)
        else:
            gx = torch.where((x > a) & (x < b), g, 0.0)
        return gx, None, None, None, None, None, None, None


def odd_grid(x: torch.Tensor, h, top: int) -> torch.Tensor:
    r""":math:`h j` with :math:`j` the odd code nearest to :math:`x / h`, :math:`|j| \le` ``top``, without autograd.

    In place on one buffer: :math:`m = \min(\max(\lfloor x / 2h \rfloor, -(t+1)/2), (t-1)/2)` with :math:`t` =
    ``top``, and :math:`j = 2m + 1`.
    ``fl(j * h)`` is the last operation, so ``Q(w) == j * h`` holds exactly in float32.
    """
    t = torch.mul(x.detach(), 0.5 / h)
    t.floor_().clamp_(-(top + 1) // 2, (top - 1) // 2).mul_(2).add_(1).mul_(h)
    return t if t.dtype == x.dtype else t.to(x.dtype)


class OddGridSTE(torch.autograd.Function):
    """The symmetric weight grid (:func:`odd_grid`); backward = straight-through estimator.

    The gradient is the identity, or, with ``clip_grad``, zero where ``|x|`` lies beyond the grid's
    top level by more than half a step (``|x| >= (top + 1) h``, where the code saturates).
    """

    @staticmethod
    def forward(ctx, x, h, top, clip_grad):
        """``x`` on the symmetric odd grid (:func:`odd_grid`); saves what the masked backward needs."""
        ctx.clip = clip_grad
        if clip_grad:
            ctx.save_for_backward(x)
            ctx.bound = (top + 1) * h
        return odd_grid(x, h, top)

    @staticmethod
    def backward(ctx, g):
        """The straight-through gradient for ``x`` (zero where the code saturates, with ``clip_grad``)."""
        if not ctx.clip:
            return g, None, None, None
        x, = ctx.saved_tensors
        return torch.where(x.abs() < ctx.bound, g, 0.0), None, None, None


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               per_channel: bool, symmetric: bool, clip_grad: bool = False) -> torch.Tensor:
    """``w`` on the grid ``(scale, zero_point, qmin, qmax)`` of :func:`hawqlib.quant.grids.quant_params`.

    Symmetric: the odd codes in ``[qmin, qmax]`` times the half-step ``scale``; otherwise the affine grid.
    Differentiable by the straight-through estimator when ``w`` requires a gradient (``clip_grad``: zero
    gradient where the code saturates), plain arithmetic otherwise.
    """
    if symmetric:
        h = scale.view((-1,) + (1,) * (w.dim() - 1)) if per_channel and w.dim() > 1 else scale.reshape(())
        h = h.to(w.dtype)
        if not (w.requires_grad and torch.is_grad_enabled()):
            return odd_grid(w, h, qmax)
        return OddGridSTE.apply(w, h, qmax, clip_grad)
    if per_channel and w.dim() > 1:
        shape = (-1,) + (1,) * (w.dim() - 1)
        s = scale.view(shape)
        inv = (1.0 / scale).view(shape)
        z = zero_point.to(scale.dtype).view(shape)
        lo, hi = qmin - z, qmax - z
    else:
        s = scale.reshape(())
        inv = 1.0 / s
        z = zero_point.reshape(()).to(s.dtype)
        lo, hi = qmin - z, qmax - z
    if not (w.requires_grad and torch.is_grad_enabled()):
        return affine_grid(w, s, inv, lo, hi)
    return FakeQuantSTE.apply(w, s, inv, lo, hi, clip_grad)
