"""Quantizers, fake-quantized modules and ``quantize_model`` (paper section 3.2, Q(W_i)).

HAWQ quantizes each block B_i to its own number of bits and fine-tunes with the quantized
blocks "held in their quantized form" by a straight-through estimator (section 3.2). The paper
does not restate its quantizer; everything below that is not in the paper is **our choice**, with
its reason:

Weights (our choice): uniform, **symmetric, per output channel** (dim 0 of a Conv2d/Linear weight),
**mid-rise**: for ``b`` bits the ``2**b`` levels are the odd multiples of a half-step ``h_c``,
``Q(W_c) = h_c * j``, ``j`` the odd integer nearest to ``W_c / h_c`` with ``|j| <= 2**b - 1``
(:func:`weight_code_limit`); one FP32 ``h_c`` per channel. At 2 bits the grid is
``{-3h, -h, h, 3h}``, at 4 bits 16 levels. Reason: a ``b``-bit code field holds ``2**b`` values, and
HAWQ's budget is counted in those bits; the symmetric grid with an exact zero (torch.ao's
"restricted range", ``[-(2**(b-1) - 1), 2**(b-1) - 1]``) uses only ``2**b - 1`` of them, which at 2 bits
is the ternary ``{-s, 0, s}``: about 1.58 bits of information stored in 2. The mid-rise grid keeps
the symmetry (no bias between positive and negative weights, which the full signed range
``[-2**(b-1), 2**(b-1) - 1]`` would add) and uses every code; it has no zero level, which weights do
not need. ``benchmarks/weight_grid.py`` measures the two on ResNet20 (squared error, top-1 before
and after a short fine-tuning); its figures are in ``benchmarks/README.md``.
The half-step (our choice, ``rule="mse"``, the default) is the one that minimizes ``||Q(W_c) - W_c||^2``:
starting from ``max|W_c| / (2**b - 1)``, we alternate the nearest codes for the current ``h`` and the
least-squares ``h`` for the current codes, ``h = <W_c, j> / <j, j>``, each step lowering the error,
until ``h`` stops changing or for at most :data:`MSE_ITERATIONS` rounds (in float64). Reasons:
``||Q(W_i) - W_i||^2`` is the very perturbation HAWQ's second-order estimate and its Omega order weigh
by lambda_i (paper section 3.2), so the grid that minimizes it is the one the method's own model
prefers; and at low bits the max |w| grid wastes its few levels on a handful of outliers.
``benchmarks/weight_scale_rule.py`` measures both rules side by side on ResNet20 (squared error,
a short quantization-aware fine-tuning at 2 bits); its figures are in ``benchmarks/README.md``.
The price: weights beyond ``(2**b - 1) h_c`` are clipped (their error exceeds half a step, ``h_c``);
the straight-through gradient stays the identity for every weight. ``rule="max"`` gives the grid
whose top level is ``max|W_c|`` (no clipping, error at most ``h_c``) for comparison. The codes fit in
``b`` bits for :mod:`hawqlib.export` as ``(j + 2**b - 1) / 2``.

One bit: the same grid, ``{-h_c, +h_c}`` (``sign(0) = +1``), with ``h_c = mean|W_c|`` under either rule,
the binary-weight rule of XNOR-Net: the mean |w| is the half-step minimizing ``||Q(W_c) - W_c||^2``
for a fixed sign pattern (it is where the alternation above stops after one round).

Activations (our choice): :class:`QuantAct`, per-tensor affine quantization on the input of every
quantized Conv2d/Linear except the network's first layer (its input is the image, 8-bit data to
begin with, which we leave in floating point). The range is a moving average in the manner of
torch.ao's ``MovingAverageMinMaxObserver``: during training, ``lo <- lo + c (batch_lo - lo)`` and likewise
for ``hi``, with ``c = 0.01`` and the first observed batch initializing both; the range always
includes zero; in eval mode the range is frozen. What each batch contributes depends on the range
rule. ``rule="mse"`` (our choice, the default): the batch's ``[min, max]`` shrunk by the factor
``f`` in ``{1/K, 2/K, ..., 1}`` (:data:`ACT_MSE_STEPS` = K) whose grid gives the least squared
quantization error on an evenly strided sample of at most :data:`ACT_MSE_SAMPLES` of the batch's
elements. Reason: the same as for the weights' least-squares scale; at 4 bits a grid
stretched to a batch's largest activation spends most of its 15 steps on a few outliers, and
clipping them costs less than coarsening every other value (``benchmarks/act_range_rule.py`` measures
both rules on ResNet20). ``rule="minmax"`` contributes the batch's ``[min, max]`` itself (torch.ao's rule).
With the range ``[lo, hi]`` and ``n = 2**b - 1``:
``scale = (hi - lo) / n`` and ``zero_point = round(-lo / scale)``. Inputs after a ReLU have
``lo = 0``, so the grid is unsigned ``{0, s, ..., n s}``; signed inputs get an asymmetric grid.
The gradient is the straight-through estimator: the identity where the input does not saturate,
zero where it rounds outside the grid (as torch.ao's fake-quant ops do).

Implementation (our choice, for speed): the activations' fake quantization is
``clamp(round(x / s), lo, hi) * s`` written as four vectorized in-place PyTorch ops inside a small
autograd Function. Its forward is bit-for-bit the arithmetic of ``torch.fake_quantize_per_tensor_affine``
(``x * (1/s)`` in float32, round half to even) and its gradient equals theirs; the tests check both.
On the project's CPU those fused kernels are not vectorized and took about 3.5x longer than the
composed ops (measured 7.6 ms vs 2.1 ms for a 128x16x32x32 tensor, one thread). The weights'
mid-rise grid, which torch's affine fake-quant ops cannot express, is likewise a few in-place ops
(``floor(x / 2h)``, clamp, ``2m + 1``, times ``h``). Further savings: the activation range is reduced over a
channels_last tensor in memory order; when the observed batch lies inside the grid (no element
saturates) the clamp and the gradient mask are skipped, since both are then exact no-ops; and the
mask is applied in place on the convolution's fresh input gradient.
``benchmarks/qat_speed.py`` compares a training step with FP32 and with torch.ao's QAT.

Staged fine-tuning (section 3.2) quantizes blocks progressively: every quantized module carries
``quant_enabled`` (its weight) and its input :class:`QuantAct` carries ``enabled``;
:func:`set_quant_enabled` switches whole blocks. A disabled module computes in FP32.
"""
from __future__ import annotations

import copy
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import QUANT_TYPES, quant_blocks
from .storage import atomic_write

__all__ = ["CODE_VERSION", "WEIGHT_SCALE_RULES", "MSE_ITERATIONS", "ACT_RANGE_RULES", "ACT_MSE_STEPS",
    "ACT_MSE_SAMPLES", "act_mse_range",
    "VALID_BITS", "check_bits", "weight_code_limit", "quant_scale", "quant_params", "quantize_tensor", "quantize_to_int",
    "BitConfig", "QuantAct", "QuantConv2d", "QuantLinear", "QUANT_MODULES", "quantize_model",
    "quant_modules", "set_quant_enabled", "calibrate_activations", "BITCONFIG_FORMAT",
]

#: The bit widths a weight or an activation may have.
VALID_BITS = tuple(range(1, 9))
BITCONFIG_FORMAT = "hawqlib.BitConfig/1"
#: Bumped whenever the numbers this module computes change (part of artifact cache keys).
CODE_VERSION = 4
#: How a symmetric weight grid's scale is chosen: least squared error (default) or max |w|.
WEIGHT_SCALE_RULES = ("mse", "max")
#: At most this many alternations of the least-squares scale rule (within ~1% of its fixed point
#: on ResNet20's layers at 2-8 bits; measured beside the project).
MSE_ITERATIONS = 20
#: How an activation quantizer's range follows the batches: least squared error (default) or min/max.
ACT_RANGE_RULES = ("mse", "minmax")
#: The least-squares activation range tries the shrink factors 1/K, 2/K, ..., 1 of each batch's range.
ACT_MSE_STEPS = 20
#: ... measured on an evenly strided sample of at most this many of the batch's elements.
ACT_MSE_SAMPLES = 8192
# Floor on max|w| so that an all-zero channel gets a finite, nonzero scale (its codes are all 0).
_MIN_RANGE = 1e-30


def check_bits(bits, what: str = "bits") -> int:
    """Return ``bits`` as an int if it is an integer in 1..8; otherwise raise a ValueError naming it.

    ``what`` names the offender in the message (e.g. ``"bits of block 'conv1'"``).
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= int(bits) <= 8:
        raise ValueError(f"{what} must be an integer in 1..8 (valid: {', '.join(map(str, VALID_BITS))}), "
                         f"got {bits!r}")
    return int(bits)


def _reduce_dims(w: torch.Tensor, per_channel: bool):
    return tuple(range(1, w.dim())) if per_channel and w.dim() > 1 else None


def _check_tensor(w) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got dtype {w.dtype}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")


def _amax(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    dims = _reduce_dims(w, per_channel)
    a = w.detach().abs()
    return (a.amax(dim=dims) if dims else a.amax()).float()


def _check_rule(rule) -> str:
    if rule not in WEIGHT_SCALE_RULES:
        raise ValueError(f"unknown scale rule {rule!r}; valid rules: {', '.join(map(repr, WEIGHT_SCALE_RULES))}")
    return rule


def _check_act_rule(rule) -> str:
    if rule not in ACT_RANGE_RULES:
        raise ValueError(f"unknown activation range rule {rule!r}; valid rules: "
                         f"{', '.join(map(repr, ACT_RANGE_RULES))}")
    return rule


def _strided_sample(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` elements of ``x`` (in its memory order) at an even stride that is coprime with
    the last dimension, so that a channels_last tensor's sample visits every channel."""
    flat = x.reshape(-1)
    if flat.numel() <= n:
        return flat
    stride, last = flat.numel() // n, max(1, x.shape[-1])
    while math.gcd(stride, last) != 1:
        stride += 1
    return flat[::stride][:n]


def act_mse_range(x: torch.Tensor, bits: int, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None,
                  *, steps: int | None = None, samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation range ``(f lo, f hi)`` whose ``bits``-bit affine grid quantizes ``x`` with the least
    squared error, over ``f`` in ``{1/steps, ..., 1}`` (rule ``"mse"`` of :class:`QuantAct`).

    ``lo``/``hi`` default to ``x``'s min and max (both are first widened to include 0); the error is
    measured on :func:`_strided_sample`'s at most ``samples`` elements. Ties go to the smaller ``f``.
    """
    steps = ACT_MSE_STEPS if steps is None else int(steps)
    samples = ACT_MSE_SAMPLES if samples is None else int(samples)
    if lo is None or hi is None:
        lo, hi = torch.aminmax(x.detach())
    qmax = 2 ** check_bits(bits, "activation bits") - 1
    v = _strided_sample(x.detach(), samples).float().contiguous()
    f = torch.arange(1, steps + 1, dtype=torch.float32, device=v.device) / steps
    lo_, hi_ = lo.clamp(max=0.0) * f, hi.clamp(min=0.0) * f
    scale = ((hi_ - lo_) / qmax).clamp_min(torch.finfo(torch.float32).eps)
    zp = (-torch.round(lo_ / scale)).clamp(0, qmax)
    # (K, n) errors of the K candidate grids, in one buffer: codes, dequantized values, squared errors.
    t = v[None, :] / scale[:, None]
    t.round_()
    if bool(zp.any()):
        t.add_(zp[:, None]).clamp_(0, qmax).sub_(zp[:, None])
    else:       # lo >= 0 (after a ReLU): zero point 0 for every candidate
        t.clamp_(0, qmax)
    err = t.mul_(scale[:, None]).sub_(v[None, :]).square_().sum(dim=1)
    k = int(torch.argmin(err))        # the first minimum: the smallest f among equals
    return lo * f[k], hi * f[k]


def _odd_codes(y: torch.Tensor, top: int) -> torch.Tensor:
    """The odd integer nearest to ``y`` with magnitude at most ``top`` (``top = 2**b - 1``)."""
    return torch.floor(y * 0.5).clamp_(-(top + 1) // 2, (top - 1) // 2).mul_(2).add_(1)


def _mse_scale(w: torch.Tensor, per_channel: bool, top: int) -> torch.Tensor:
    """The half-step ``h`` minimizing ||Q(w) - w||^2 (per channel or per tensor), by alternating the
    nearest odd codes and the least-squares ``h`` from the max |w| start (see the module docstring)."""
    x = w.detach().double().reshape(w.shape[0] if per_channel and w.dim() > 0 else 1, -1)
    s = x.abs().amax(dim=1, keepdim=True).clamp_min(_MIN_RANGE) / top
    for _ in range(MSE_ITERATIONS):
        k = _odd_codes(x / s, top)
        new = (x * k).sum(dim=1, keepdim=True) / (k * k).sum(dim=1, keepdim=True)
        new = torch.where(new > 0, new, s)
        if torch.equal(new, s):
            break
        s = new
    s = s.float().clamp_min(_MIN_RANGE)
    return s.reshape(-1) if per_channel and w.dim() > 0 else s.reshape(())


def weight_code_limit(bits: int) -> int:
    """The largest weight code, ``2**bits - 1``: weight codes are the odd integers in ``[-limit, limit]``."""
    return 2 ** check_bits(bits) - 1


@torch.no_grad()
def quant_params(w: torch.Tensor, bits: int, *, per_channel: bool = True, symmetric: bool = True,
                 rule: str = "mse"):
    """The quantization grid of ``w``: ``(scale, zero_point, qmin, qmax)``.

    ``scale`` is a float32 tensor of shape ``[w.shape[0]]`` (per channel) or ``[]`` (per tensor);
    ``zero_point`` an int32 tensor of the same shape. Symmetric: zero point 0, ``scale`` the half-step
    ``h`` of the grid and ``(qmin, qmax) = (-(2**b - 1), 2**b - 1)`` the range of its odd codes (the
    weight is ``code * h``), ``h`` by ``rule``: ``"mse"`` the one with the least squared error, ``"max"``
    ``max|w| / (2**b - 1)`` (see the module docstring); for 1 bit ``h = mean|w|`` under either rule.
    Asymmetric: the range ``[min(w, 0), max(w, 0)]`` on codes ``[0, 2**b - 1]`` (``rule`` does not apply).
    """
    _check_tensor(w)
    bits = check_bits(bits)
    _check_rule(rule)
    dims = _reduce_dims(w, per_channel)
    if symmetric:
        top = weight_code_limit(bits)
        if bits == 1:
            # mean in float64: exact for a tensor of +-h, which makes Q idempotent at 1 bit
            a = w.detach().abs().double()
            scale = (a.mean(dim=dims) if dims else a.mean()).float().clamp_min(_MIN_RANGE)
        elif rule == "max":
            scale = _amax(w, per_channel).clamp_min(_MIN_RANGE) / top
        else:
            scale = _mse_scale(w, per_channel, top)
        zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
        return scale, zero_point, -top, top
    wd = w.detach()
    lo = (wd.amin(dim=dims) if dims else wd.amin()).float().clamp_max(0.0)
    hi = (wd.amax(dim=dims) if dims else wd.amax()).float().clamp_min(0.0)
    qmin, qmax = 0, 2 ** bits - 1
    scale = ((hi - lo) / qmax).clamp_min(_MIN_RANGE)
    zero_point = torch.clamp(torch.round(-lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point, qmin, qmax


def quant_scale(w: torch.Tensor, bits: int, *, per_channel: bool = True, symmetric: bool = True,
                rule: str = "mse") -> torch.Tensor:
    """The scale(s) of ``w`` quantized at ``bits`` (one per output channel when ``per_channel``)."""
    return quant_params(w, bits, per_channel=per_channel, symmetric=symmetric, rule=rule)[0]


class _STE(torch.autograd.Function):
    """Returns ``q`` in the forward pass and passes the gradient to ``w`` unchanged (identity STE)."""

    @staticmethod
    def forward(ctx, w, q):
        return q

    @staticmethod
    def backward(ctx, g):
        return g, None


def _grid(x: torch.Tensor, scale, inv, lo, hi, clamp: bool = True) -> torch.Tensor:
    """``clamp(round(x * inv), lo, hi) * scale`` without autograd, in four vectorized passes.

    ``clamp = False`` skips the clamp, for callers that know no element rounds outside [lo, hi].
    """
    t = torch.mul(x.detach(), inv)
    t.round_()
    if clamp:
        t.clamp_(lo, hi)
    t.mul_(scale)
    return t if t.dtype == x.dtype else t.to(x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Fake quantization on a grid; backward = straight-through estimator.

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
        ctx.clip, ctx.inplace = clip_grad, grad_inplace
        if clip_grad:
            ctx.save_for_backward(x)
            ctx.bounds = ((lo - 0.5) * scale, (hi + 0.5) * scale)
        return _grid(x, scale, inv, lo, hi, clamp)

    @staticmethod
    def backward(ctx, g):
        if not ctx.clip:
            return g, None, None, None, None, None, None, None
        x, = ctx.saved_tensors
        a, b = ctx.bounds
        if isinstance(a, float):  # per-tensor: one fused, vectorized masking pass
            if ctx.inplace and g.is_contiguous(memory_format=_memory_format(x)):
                gx = torch.ops.aten.hardtanh_backward.grad_input(g, x, a, b, grad_input=g)
            else:
                gx = torch.ops.aten.hardtanh_backward(g, x, a, b)
        else:
            gx = torch.where((x > a) & (x < b), g, 0.0)
        return gx, None, None, None, None, None, None, None


def _memory_format(x: torch.Tensor):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _odd_grid(x: torch.Tensor, h, top: int) -> torch.Tensor:
    """``h * j`` with ``j`` the odd code nearest to ``x / h``, ``|j| <= top``, without autograd.

    In place on one buffer: ``m = clamp(floor(x / 2h), -(top+1)/2, (top-1)/2)``, ``j = 2m + 1``.
    ``fl(j * h)`` is the last operation, so ``Q(w) == j * h`` holds exactly in float32.
    """
    t = torch.mul(x.detach(), 0.5 / h)
    t.floor_().clamp_(-(top + 1) // 2, (top - 1) // 2).mul_(2).add_(1).mul_(h)
    return t if t.dtype == x.dtype else t.to(x.dtype)


class _OddGridSTE(torch.autograd.Function):
    """The symmetric weight grid (:func:`_odd_grid`); backward = straight-through estimator.

    The gradient is the identity, or, with ``clip_grad``, zero where ``|x|`` lies beyond the grid's
    top level by more than half a step (``|x| >= (top + 1) h``, where the code saturates).
    """

    @staticmethod
    def forward(ctx, x, h, top, clip_grad):
        ctx.clip = clip_grad
        if clip_grad:
            ctx.save_for_backward(x)
            ctx.bound = (top + 1) * h
        return _odd_grid(x, h, top)

    @staticmethod
    def backward(ctx, g):
        if not ctx.clip:
            return g, None, None, None
        x, = ctx.saved_tensors
        return torch.where(x.abs() < ctx.bound, g, 0.0), None, None, None


def _fake_quant(w: torch.Tensor, bits: int, scale: torch.Tensor, zero_point: torch.Tensor,
                qmin: int, qmax: int, per_channel: bool, symmetric: bool, clip_grad: bool = False) -> torch.Tensor:
    if symmetric:
        h = scale.view((-1,) + (1,) * (w.dim() - 1)) if per_channel and w.dim() > 1 else scale.reshape(())
        h = h.to(w.dtype)
        if not (w.requires_grad and torch.is_grad_enabled()):
            return _odd_grid(w, h, qmax)
        return _OddGridSTE.apply(w, h, qmax, clip_grad)
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
        return _grid(w, s, inv, lo, hi)
    return _FakeQuantSTE.apply(w, s, inv, lo, hi, clip_grad)


def quantize_tensor(w: torch.Tensor, bits: int, *, per_channel: bool = True, symmetric: bool = True,
                    rule: str = "mse") -> torch.Tensor:
    """Q(w): ``w`` fake-quantized to ``bits`` (a float tensor of the same shape and dtype).

    Differentiable with the straight-through estimator: the gradient with respect to ``w`` is the
    identity, clipped weights included. See the module docstring for the grid (our choice: symmetric,
    per output channel, the scale of least squared error; ``rule="max"`` for the max |w| scale).
    """
    scale, zp, qmin, qmax = quant_params(w, bits, per_channel=per_channel, symmetric=symmetric, rule=rule)
    return _fake_quant(w, bits, scale, zp, qmin, qmax, per_channel, symmetric)


@torch.no_grad()
def quantize_to_int(w: torch.Tensor, bits: int, *, per_channel: bool = True, symmetric: bool = True,
                    scale: torch.Tensor | None = None, rule: str = "mse"):
    """The integer codes of Q(w): ``(k, scale)`` with ``k`` an integer tensor and ``Q(w) == k * scale`` exactly.

    ``scale`` is broadcast along dim 0 when per channel. Symmetric codes are the odd integers in
    ``[-(2**b - 1), 2**b - 1]`` (``{-1, +1}`` at 1 bit; int16 at 8 bits); asymmetric codes are returned
    centred (``q - zero_point``), so the same identity holds. A given ``scale`` (symmetric only)
    replaces the one ``rule`` computes from ``w``.
    """
    bits = check_bits(bits)
    if scale is None:
        scale, zp, qmin, qmax = quant_params(w, bits, per_channel=per_channel, symmetric=symmetric, rule=rule)
    else:
        if not symmetric:
            raise ValueError("a given scale is only supported for symmetric quantization")
        _check_tensor(w)
        scale = scale.float()
        zp = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
        qmax = weight_code_limit(bits)
        qmin = -qmax
    q = _fake_quant(w.detach().float(), bits, scale, zp, qmin, qmax, per_channel, symmetric)
    s = scale.view(-1, *([1] * (w.dim() - 1))) if scale.dim() == 1 and w.dim() > 1 else scale
    k = torch.round(q / s)
    return k.to(torch.int8 if max(abs(qmin), abs(qmax)) <= 127 else torch.int16), scale


# --------------------------------------------------------------------------------------------
# BitConfig
# --------------------------------------------------------------------------------------------

@dataclass
class BitConfig:
    """A mixed-precision setting: weight bits per block, activation bits, and the block granularity.

    ``weights`` maps block names (as :func:`hawqlib.blocks.quant_blocks` names them at
    ``granularity``) to bits in 1..8; ``act_bits`` is the activation precision (None: activations
    stay FP32). Bit values are checked on construction; block names by :meth:`validate`.
    """

    weights: dict = field(default_factory=dict)
    act_bits: int | None = None
    granularity: str | list = "layer"

    def __post_init__(self):
        if not isinstance(self.weights, dict):
            raise TypeError(f"BitConfig.weights must be a dict block name -> bits, got {type(self.weights).__name__}")
        clean = {}
        for name, b in self.weights.items():
            if not isinstance(name, str):
                raise TypeError(f"block names must be strings, got {name!r}")
            clean[name] = check_bits(b, f"bits of block {name!r}")
        self.weights = clean
        if self.act_bits is not None:
            self.act_bits = check_bits(self.act_bits, "act_bits")
        if isinstance(self.granularity, (list, tuple)):
            self.granularity = [str(g) for g in self.granularity]
        elif not isinstance(self.granularity, str):
            raise TypeError(f"granularity must be 'layer', 'residual' or a list of module names, "
                            f"got {self.granularity!r}")

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def uniform(cls, model: nn.Module, bits: int, act_bits: int | None = None,
                granularity: str | Sequence[str] = "layer") -> "BitConfig":
        """Every block of ``model`` at ``bits`` (the paper's uniform baselines)."""
        bits = check_bits(bits)
        names = [b.name for b in quant_blocks(model, granularity)]
        gran = granularity if isinstance(granularity, str) else list(granularity)
        return cls({n: bits for n in names}, act_bits, gran)

    # -- checks ----------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> "BitConfig":
        """Check the block names against ``model``; raise ValueError naming unknown and missing blocks."""
        valid = [b.name for b in quant_blocks(model, self.granularity)]
        unknown = [n for n in self.weights if n not in valid]
        missing = [n for n in valid if n not in self.weights]
        problems = []
        if unknown:
            problems.append(f"unknown block(s) {unknown}")
        if missing:
            problems.append(f"missing block(s) {missing}")
        if problems:
            raise ValueError(f"BitConfig does not match {type(model).__name__} at granularity "
                             f"{self.granularity!r}: {'; '.join(problems)}; valid block names: {valid}")
        return self

    # -- figures ---------------------------------------------------------------------------
    def mean_bits(self, model: nn.Module) -> float:
        """Weight bits averaged over the weights (each block weighted by its n_i)."""
        self.validate(model)
        blocks = quant_blocks(model, self.granularity)
        n = sum(b.numel for b in blocks)
        return sum(self.weights[b.name] * b.numel for b in blocks) / n

    # -- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict (with a format tag)."""
        return {"format": BITCONFIG_FORMAT, "weights": dict(self.weights), "act_bits": self.act_bits,
                "granularity": self.granularity if isinstance(self.granularity, str) else list(self.granularity)}

    @classmethod
    def from_dict(cls, d: dict) -> "BitConfig":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, dict) or "weights" not in d:
            raise ValueError(f"not a BitConfig dict (needs a 'weights' key): {str(d)[:200]}")
        fmt = d.get("format", BITCONFIG_FORMAT)
        if fmt != BITCONFIG_FORMAT:
            raise ValueError(f"unsupported BitConfig format {fmt!r}; expected {BITCONFIG_FORMAT!r}")
        extra = set(d) - {"format", "weights", "act_bits", "granularity"}
        if extra:
            raise ValueError(f"unknown BitConfig field(s) {sorted(extra)}; valid: weights, act_bits, granularity")
        return cls(dict(d["weights"]), d.get("act_bits"), d.get("granularity", "layer"))

    def to_json(self) -> str:
        """JSON text (blocks in their stored order)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "BitConfig":
        """Inverse of :meth:`to_json`."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"BitConfig JSON does not parse: {e}") from None
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        text = self.to_json()
        atomic_write(path, lambda f: f.write(text), mode="w")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitConfig":
        """Read a BitConfig written by :meth:`save`."""
        with open(path) as f:
            return cls.from_json(f.read())


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

class QuantAct(nn.Module):
    """Activation fake-quantization with a moving-average range (``rule``: see the module docstring).

    Buffers: ``running_min``/``running_max`` (the tracked range; +-inf before the first batch),
    ``scale``/``zero_point`` (the grid, recomputed from the range after each observation and used
    as is in eval mode). The range is updated in training mode only, or whenever ``observe`` is
    forced to True (see :func:`calibrate_activations`). With ``enabled = False`` the module is the
    identity and observes nothing. Gradient: straight-through inside the range widened by half a
    step, zero outside (where the quantizer saturates).
    """

    def __init__(self, bits: int, averaging_constant: float = 0.01, rule: str = "mse"):
        super().__init__()
        self.bits = check_bits(bits, "activation bits")
        self.rule = _check_act_rule(rule)
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        self.averaging_constant = float(averaging_constant)
        self.quant_min, self.quant_max = 0, 2 ** self.bits - 1
        self.enabled = True
        #: None: observe in training mode only; True/False: force observing on/off.
        self.observe: bool | None = None
        #: Set by QuantConv2d/QuantLinear, whose convolution hands back a fresh input gradient.
        self.grad_inplace = False
        self.register_buffer("running_min", torch.tensor(float("inf")))
        self.register_buffer("running_max", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))

    def has_range(self) -> bool:
        """True once at least one batch has been observed."""
        return bool(torch.isfinite(self.running_min))

    @torch.no_grad()
    def observe_batch(self, x: torch.Tensor):
        """Update the range with ``x`` by the moving-average rule and recompute ``scale``/``zero_point``.

        Returns the batch's ``(min, max)`` as 0-dim tensors (its extremes, whatever the rule).
        """
        # A channels_last tensor is dense: reduce over its memory order (much faster than over NCHW strides).
        flat = x.detach()
        if _memory_format(flat) is torch.channels_last:
            flat = flat.permute(0, 2, 3, 1)
        lo, hi = torch.aminmax(flat)
        blo, bhi = act_mse_range(flat, self.bits, lo, hi) if self.rule == "mse" else (lo, hi)
        if self.has_range():
            c = self.averaging_constant
            self.running_min.add_(c * (blo - self.running_min))
            self.running_max.add_(c * (bhi - self.running_max))
        else:
            self.running_min.copy_(blo)
            self.running_max.copy_(bhi)
        # torch.ao's affine qparams: the range always contains 0; scale >= float32 eps.
        lo_, hi_ = self.running_min.clamp(max=0.0), self.running_max.clamp(min=0.0)
        scale = ((hi_ - lo_) / float(self.quant_max - self.quant_min)).clamp_min(torch.finfo(torch.float32).eps)
        zp = (self.quant_min - torch.round(lo_ / scale)).clamp(self.quant_min, self.quant_max)
        self.scale.copy_(scale.reshape(1))
        self.zero_point.copy_(zp.reshape(1).to(torch.int32))
        return lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` to ``bits`` (updating the range first when observing)."""
        if not self.enabled:
            return x
        observing = self.training if self.observe is None else self.observe
        batch = self.observe_batch(x) if observing else None
        if batch is None and not self.has_range():
            raise RuntimeError("QuantAct has no activation range yet: run the model in training mode "
                               "or call hawqlib.quant.calibrate_activations(...) before evaluating")
        s = self.scale.item()                        # a float32 value, held exactly by the Python float
        inv_t = 1.0 / self.scale                     # float32 division, as torch's fake-quant kernels do
        inv = inv_t.item()
        z = int(self.zero_point.item())
        lo, hi = float(self.quant_min - z), float(self.quant_max - z)
        if not (x.requires_grad and torch.is_grad_enabled()):
            return _grid(x, s, inv, lo, hi)
        saturates = True
        if batch is not None:
            # fl(x * inv) is monotone in x, so the batch extremes tell whether any element rounds
            # outside [lo, hi]; if none does, the clamp is a no-op and the STE mask is all ones.
            t = (torch.stack(batch) * inv_t).tolist()
            saturates = not (t[0] > lo - 0.5 and t[1] < hi + 0.5)
        return _FakeQuantSTE.apply(x, s, inv, lo, hi, saturates, self.grad_inplace, saturates)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, rule={self.rule!r}, averaging_constant={self.averaging_constant}, "
                f"enabled={self.enabled}")


class _QuantWeight:
    """Shared behaviour of :class:`QuantConv2d` and :class:`QuantLinear` (a mixin on nn.Conv2d / nn.Linear)."""

    weight_bits: int
    quant_enabled: bool

    def _init_quant(self, weight_bits: int, act_bits: int | None, weight_rule: str = "mse", act_rule: str = "mse"):
        self.weight_bits = check_bits(weight_bits, "weight_bits")
        self.weight_rule = _check_rule(weight_rule)
        self.quant_enabled = True
        self.act_quant = QuantAct(act_bits, rule=act_rule) if act_bits is not None else None
        if self.act_quant is not None:
            self.act_quant.grad_inplace = True
        # A fixed per-channel scale (set by hawqlib.export.load_packed) replaces the scale rule.
        self.register_buffer("fixed_scale", None)

    def weight_qparams(self):
        """``(scale, zero_point, qmin, qmax)`` of the weight: ``fixed_scale`` if set, else by ``weight_rule``."""
        if self.fixed_scale is not None:
            qmax = weight_code_limit(self.weight_bits)
            zp = torch.zeros(self.fixed_scale.shape, dtype=torch.int32, device=self.fixed_scale.device)
            return self.fixed_scale, zp, -qmax, qmax
        return quant_params(self.weight, self.weight_bits, rule=self.weight_rule)

    def quantized_weight(self) -> torch.Tensor:
        """Q(W) of this module (differentiable by the STE), regardless of ``quant_enabled``."""
        scale, zp, qmin, qmax = self.weight_qparams()
        return _fake_quant(self.weight, self.weight_bits, scale, zp, qmin, qmax, True, True,
                           clip_grad=self.fixed_scale is not None)

    def int_weight(self):
        """``(k, scale)``: integer codes (odd, see :func:`quantize_to_int`) and per-channel FP32 half-steps with ``Q(W) == k * scale``."""
        return quantize_to_int(self.weight, self.weight_bits, scale=self.fixed_scale, rule=self.weight_rule)

    def _effective(self, x: torch.Tensor):
        if self.act_quant is not None:
            x = self.act_quant(x)
        return x, (self.quantized_weight() if self.quant_enabled else self.weight)

    def _quant_repr(self) -> str:
        return f"weight_bits={self.weight_bits}, weight_rule={self.weight_rule!r}, quant_enabled={self.quant_enabled}"


class QuantConv2d(_QuantWeight, nn.Conv2d):
    """nn.Conv2d whose weight is fake-quantized to ``weight_bits`` in the forward pass (STE backward).

    ``act_quant`` (a :class:`QuantAct`, or None) quantizes the input. ``quant_enabled = False``
    runs the plain FP32 convolution on the FP32 weight.
    """

    def __init__(self, *args, weight_bits: int = 8, act_bits: int | None = None, weight_rule: str = "mse",
                 act_rule: str = "mse", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, act_bits, weight_rule, act_rule)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_bits: int, act_bits: int | None = None,
                   weight_rule: str = "mse", act_rule: str = "mse") -> "QuantConv2d":
        """A QuantConv2d sharing ``conv``'s weight and bias Parameters and hyper-parameters."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                device="meta", weight_bits=weight_bits, act_bits=act_bits, weight_rule=weight_rule,
                act_rule=act_rule)
        q.weight, q.bias = conv.weight, conv.bias
        if q.act_quant is not None:
            q.act_quant.to(conv.weight.device)
        q.train(conv.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv(Q_a(x), Q(W)) (or the FP32 pieces where quantization is disabled)."""
        x, w = self._effective(x)
        return self._conv_forward(x, w, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._quant_repr()


class QuantLinear(_QuantWeight, nn.Linear):
    """nn.Linear whose weight is fake-quantized to ``weight_bits`` in the forward pass (STE backward)."""

    def __init__(self, *args, weight_bits: int = 8, act_bits: int | None = None, weight_rule: str = "mse",
                 act_rule: str = "mse", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, act_bits, weight_rule, act_rule)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits: int, act_bits: int | None = None,
                   weight_rule: str = "mse", act_rule: str = "mse") -> "QuantLinear":
        """A QuantLinear sharing ``linear``'s weight and bias Parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                weight_bits=weight_bits, act_bits=act_bits, weight_rule=weight_rule, act_rule=act_rule)
        q.weight, q.bias = linear.weight, linear.bias
        if q.act_quant is not None:
            q.act_quant.to(linear.weight.device)
        q.train(linear.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """linear(Q_a(x), Q(W)) (or the FP32 pieces where quantization is disabled)."""
        x, w = self._effective(x)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._quant_repr()


QUANT_MODULES = (QuantConv2d, QuantLinear)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(model: nn.Module, bit_config: BitConfig, act_bits: int | None = None, *,
                   weight_rule: str = "mse", act_rule: str = "mse") -> nn.Module:
    """A quantized deep copy of ``model`` (``model`` itself is untouched).

    Each Conv2d/Linear of each block in ``bit_config`` becomes a :class:`QuantConv2d` /
    :class:`QuantLinear` at that block's bits. Activations: ``act_bits`` if given, else
    ``bit_config.act_bits``; when that is None no activation is quantized. Otherwise every
    quantized layer gets a :class:`QuantAct` on its input, except the first quantized layer in
    module order, whose input is the image (left FP32: our choice, see the module docstring).
    ``weight_rule`` picks the weight scale (``"mse"`` or ``"max"``), ``act_rule`` the activation range
    (``"mse"`` or ``"minmax"``); see the module docstring. The copy carries the effective config as ``qmodel.bit_config``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(bit_config, BitConfig):
        raise TypeError(f"bit_config must be a BitConfig, got {type(bit_config).__name__}")
    if any(isinstance(m, QUANT_MODULES) for m in model.modules()):
        raise ValueError("model is already quantized (it holds QuantConv2d/QuantLinear modules)")
    bit_config.validate(model)
    _check_rule(weight_rule)
    _check_act_rule(act_rule)
    a_bits = bit_config.act_bits if act_bits is None else check_bits(act_bits, "act_bits")
    qmodel = copy.deepcopy(model)
    first = next((n for n, m in qmodel.named_modules() if isinstance(m, QUANT_TYPES)), None)
    for block in quant_blocks(qmodel, bit_config.granularity):
        bits = bit_config.weights[block.name]
        for name, m in zip(block.module_names, block.modules):
            cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
            ab = None if (a_bits is None or name == first) else a_bits
            _set_submodule(qmodel, name, cls.from_float(m, bits, ab, weight_rule, act_rule))
    qmodel.bit_config = BitConfig(dict(bit_config.weights), a_bits,
                                  copy.copy(bit_config.granularity))
    return qmodel


def quant_modules(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every QuantConv2d/QuantLinear of ``qmodel``, in module order."""
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QUANT_MODULES)]


def set_quant_enabled(qmodel: nn.Module, block_names: Iterable[str] | None, enabled: bool, *,
                      activations: bool = True) -> None:
    """Switch weight quantization (and, with ``activations``, input quantization) of whole blocks.

    ``block_names`` are names of ``qmodel.bit_config``'s blocks (None: all blocks). Blocks
    switched off compute in FP32, as the not-yet-quantized blocks of staged fine-tuning do.
    """
    cfg = getattr(qmodel, "bit_config", None)
    if not isinstance(cfg, BitConfig):
        raise ValueError("qmodel has no bit_config: pass a model returned by quantize_model")
    blocks = {b.name: b for b in quant_blocks(qmodel, cfg.granularity)}
    names = list(blocks) if block_names is None else (
        [block_names] if isinstance(block_names, str) else list(block_names))
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise ValueError(f"unknown block(s) {unknown}; valid block names: {list(blocks)}")
    for n in names:
        for m in blocks[n].modules:
            if not isinstance(m, QUANT_MODULES):
                raise ValueError(f"module of block {n!r} is not quantized ({type(m).__name__})")
            m.quant_enabled = bool(enabled)
            if activations and m.act_quant is not None:
                m.act_quant.enabled = bool(enabled)


@torch.no_grad()
def calibrate_activations(qmodel: nn.Module, batches: Iterable, *, num_batches: int | None = None) -> int:
    """Observe activation ranges on ``batches`` (inputs, or (inputs, labels) pairs) in eval mode.

    BatchNorm statistics are not touched (the model runs in eval mode); every enabled
    :class:`QuantAct` updates its range by the moving-average rule. Returns the batches seen.
    """
    acts = [m for m in qmodel.modules() if isinstance(m, QuantAct)]
    was_training = qmodel.training
    qmodel.eval()
    seen = 0
    try:
        for a in acts:
            a.observe = True
        for batch in batches:
            if num_batches is not None and seen >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            qmodel(x)
            seen += 1
    finally:
        for a in acts:
            a.observe = None
        qmodel.train(was_training)
    return seen
