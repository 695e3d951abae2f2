r"""How an activation quantizer chooses its range (paper section 4: the activation bits of its results).

HAWQ quantizes activations as well as weights (the "a-bits" of its tables, section 4) without restating how; our
choice, in the manner of torch.ao's ``MovingAverageMinMaxObserver``: per-tensor affine quantization
(:class:`hawqlib.quant.modules.QuantAct`) whose range :math:`[lo, hi]` is a moving average over the batches seen
in training (:func:`moving_average_`): :math:`lo \leftarrow lo + c \, (lo_{batch} - lo)` and likewise for
:math:`hi`, with :math:`c = 0.01` and the first observed batch initializing both; the range always includes zero;
in eval mode the range is frozen. What each batch contributes depends on the range rule (:func:`batch_range`).
``rule="mse"`` (our choice, the default): the batch's :math:`[\min, \max]` shrunk by the factor
:math:`f \in \{1/K, 2/K, \ldots, 1\}` (:data:`ACT_MSE_STEPS` = :math:`K`) whose grid gives the least squared
quantization error on an evenly strided sample of at most :data:`ACT_MSE_SAMPLES` of the batch's elements
(:func:`act_mse_range`). Reason: the same as for the weights' least-squares scale (:mod:`hawqlib.quant.grids`); at
4 bits a grid stretched to a batch's largest activation spends most of its 15 steps on a few outliers, and
clipping them costs less than coarsening every other value (``benchmarks/act_range_rule.py`` measures both rules
on ResNet20). ``rule="minmax"`` contributes the batch's ``[min, max]`` itself (torch.ao's rule).

With the range :math:`[lo, hi]` and :math:`n = 2^b - 1` (:func:`affine_qparams`): :math:`s = (hi - lo) / n` (the
``scale``) and ``zero_point`` :math:`= \operatorname{round}(-lo / s)`. Inputs after a ReLU have :math:`lo = 0`, so
the grid is unsigned :math:`\{0, s, \ldots, n s\}`; signed inputs get an asymmetric grid. A channels_last batch is
reduced in its memory order (our choice, for speed: the same values, read contiguously).
"""
from __future__ import annotations

import math

import torch

from ..bitconfig import check_bits
from .ste import memory_format_of

__all__ = ["ACT_MSE_STEPS", "ACT_MSE_SAMPLES", "CALIBRATIONS", "act_mse_range", "batch_range", "moving_average_",
           "affine_qparams", "RangeCollector"]

#: How :func:`hawqlib.quant.swap.calibrate_activations` sets the ranges from its batches: from all of them at
#: once (``"union"``, the default) or by the training rule's moving average (``"moving_average"``, the rule the
#: book's stored runs were computed with).
CALIBRATIONS = ("union", "moving_average")

#: The least-squares activation range tries the shrink factors 1/K, 2/K, ..., 1 of each batch's range.
ACT_MSE_STEPS = 20
#: ... measured on an evenly strided sample of at most this many of the batch's elements.
ACT_MSE_SAMPLES = 8192


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
    squared error, over ``f`` in ``{1/steps, ..., 1}`` (rule ``"mse"``).

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


@torch.no_grad()
def batch_range(x: torch.Tensor, bits: int, rule: str):
    """``((lo, hi), (blo, bhi))``: the extremes of the batch ``x`` and the range it contributes under ``rule``
    (``"mse"``: :func:`act_mse_range`; ``"minmax"``: the extremes), all 0-dim tensors."""
    flat = x.detach()
    if memory_format_of(flat) is torch.channels_last:   # dense: reduce in memory order, much faster
        flat = flat.permute(0, 2, 3, 1)
    lo, hi = torch.aminmax(flat)
    return (lo, hi), (act_mse_range(flat, bits, lo, hi) if rule == "mse" else (lo, hi))


class RangeCollector:
    """The range over ALL the batches one activation quantizer sees in calibration (``calibration="union"``).

    Our choice, in place of the moving average for calibration (the moving average's first batch weighs
    :math:`(1 - c)^{k-1}` after :math:`k` batches, so with :math:`c = 0.01` the first batch decides the range and a
    later batch of larger activations is clipped): the range is that of the union of the batches. Rule ``"minmax"``:
    the union's ``[min, max]``; rule ``"mse"``: :func:`act_mse_range` on the union, i.e. the union's
    ``[min, max]`` shrunk by the factor whose grid has the least squared error on the batches' strided samples
    (at most :data:`ACT_MSE_SAMPLES` per batch) taken together. Tensors stay on the activations' device.
    """

    def __init__(self, bits: int, rule: str):
        self.bits, self.rule = bits, rule
        self.lo = self.hi = None
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Take in one batch of the quantizer's inputs."""
        flat = x.detach()
        if memory_format_of(flat) is torch.channels_last:
            flat = flat.permute(0, 2, 3, 1)
        lo, hi = torch.aminmax(flat)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.rule == "mse":
            self.samples.append(_strided_sample(flat, ACT_MSE_SAMPLES).float().clone())

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``, 0-dim tensors: the range of the batches taken in (see the class docstring)."""
        if self.lo is None:
            raise RuntimeError("no calibration batch reached this activation quantizer")
        if self.rule != "mse":
            return self.lo, self.hi
        v = torch.cat(self.samples)
        return act_mse_range(v, self.bits, self.lo, self.hi, samples=v.numel())


@torch.no_grad()
def moving_average_(running_min: torch.Tensor, running_max: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    averaging_constant: float) -> None:
    """Move the range ``[running_min, running_max]`` (in place) towards ``[lo, hi]`` by ``averaging_constant``;
    a range not yet set (``running_min = +inf``) becomes ``[lo, hi]``."""
    if bool(torch.isfinite(running_min)):
        c = averaging_constant
        running_min.add_(c * (lo - running_min))
        running_max.add_(c * (hi - running_max))
    else:
        running_min.copy_(lo)
        running_max.copy_(hi)


@torch.no_grad()
def affine_qparams(running_min: torch.Tensor, running_max: torch.Tensor, quant_min: int, quant_max: int):
    """``(scale, zero_point)`` (shape ``[1]``, float32 and int32) of the affine grid on codes
    ``[quant_min, quant_max]`` over the range widened to include 0 (torch.ao's rule; scale >= float32 eps)."""
    lo, hi = running_min.clamp(max=0.0), running_max.clamp(min=0.0)
    scale = ((hi - lo) / float(quant_max - quant_min)).clamp_min(torch.finfo(torch.float32).eps)
    zp = (quant_min - torch.round(lo / scale)).clamp(quant_min, quant_max)
    return scale.reshape(1), zp.reshape(1).to(torch.int32)
