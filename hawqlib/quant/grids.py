r"""The uniform weight grid :math:`Q(W_i)` and the quantizer of a tensor (paper section 3.2).

HAWQ quantizes each block :math:`B_i` to its own number of bits (section 3.2); the paper does not restate its
quantizer. Everything below that is not in the paper is **our choice**, with its reason:

Weights (our choice): uniform, **symmetric, per output channel** (dim 0 of a Conv2d/Linear weight),
**mid-rise**: for :math:`b` bits the :math:`2^b` levels are the odd multiples of a half-step :math:`h_c`,
:math:`Q(W_c) = h_c \, j`, :math:`j` the odd integer nearest to :math:`W_c / h_c` with :math:`|j| \le 2^b - 1`
(:func:`weight_code_limit`); one FP32 :math:`h_c` per channel. At 2 bits the grid is
:math:`\{-3h, -h, h, 3h\}`, at 4 bits 16 levels. Reason: a :math:`b`-bit code field holds :math:`2^b` values, and
HAWQ's budget is counted in those bits; the symmetric grid with an exact zero (torch.ao's
"restricted range", :math:`[-(2^{b-1} - 1), 2^{b-1} - 1]`) uses only :math:`2^b - 1` of them, which at 2 bits
is the ternary :math:`\{-s, 0, s\}`: about 1.58 bits of information stored in 2. The mid-rise grid keeps
the symmetry (no bias between positive and negative weights, which the full signed range
:math:`[-2^{b-1}, 2^{b-1} - 1]` would add) and uses every code; it has no zero level, which weights do
not need. ``benchmarks/weight_grid.py`` measures the two on ResNet20 (squared error, top-1 before
and after a short fine-tuning); its figures are in ``benchmarks/README.md``.

The half-step (our choice, ``rule="mse"``, the default) is the one that minimizes
:math:`\lVert Q(W_c) - W_c \rVert_2^2`: starting from :math:`\max |W_c| / (2^b - 1)`, we alternate the nearest
codes for the current :math:`h` and the least-squares :math:`h` for the current codes,
:math:`h = \langle W_c, j \rangle / \langle j, j \rangle`, each step lowering the error,
until :math:`h` stops changing or for at most :data:`MSE_ITERATIONS` rounds (in float64). Reasons:
:math:`\lVert Q(W_i) - W_i \rVert_2^2` is the very perturbation HAWQ's second-order estimate and its
:math:`\Omega` order weigh by :math:`\lambda_i` (paper section 3.2), so the grid that minimizes it is the one the
method's own model prefers; and at low bits the max |w| grid wastes its few levels on a handful of outliers.
``benchmarks/weight_scale_rule.py`` measures both rules side by side on ResNet20 (squared error,
a short quantization-aware fine-tuning at 2 bits); its figures are in ``benchmarks/README.md``.
The price: weights beyond :math:`(2^b - 1) h_c` are clipped (their error exceeds half a step, :math:`h_c`);
the straight-through gradient (:mod:`hawqlib.quant.ste`) stays the identity for every weight.
``rule="max"`` gives the grid whose top level is :math:`\max |W_c|` (no clipping, error at most :math:`h_c`)
for comparison. The codes fit in :math:`b` bits for :mod:`hawqlib.export` as :math:`(j + 2^b - 1) / 2`.

One bit: the same grid, :math:`\{-h_c, +h_c\}` (``sign(0) = +1``), with :math:`h_c = \operatorname{mean} |W_c|`
under either rule, the binary-weight rule of XNOR-Net: the mean :math:`|w|` is the half-step minimizing
:math:`\lVert Q(W_c) - W_c \rVert_2^2` for a fixed sign pattern (it is where the alternation above stops after
one round).
"""
from __future__ import annotations

import torch

from ..bitconfig import check_bits, check_weight_rule
from .ste import fake_quant

__all__ = ["MSE_ITERATIONS", "weight_code_limit", "quant_params", "quant_scale", "quantize_tensor",
           "quantize_to_int"]

#: At most this many alternations of the least-squares scale rule (it stops earlier at its fixed point).
MSE_ITERATIONS = 20
# Floor on max|w| so that an all-zero channel gets a finite, nonzero scale (its codes are all 0).
_MIN_RANGE = 1e-30


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


def _odd_codes(y: torch.Tensor, top: int) -> torch.Tensor:
    """The odd integer nearest to ``y`` with magnitude at most ``top`` (``top = 2**b - 1``)."""
    return torch.floor(y * 0.5).clamp_(-(top + 1) // 2, (top - 1) // 2).mul_(2).add_(1)


def _mse_scale(w: torch.Tensor, per_channel: bool, top: int) -> torch.Tensor:
    """The half-step ``h`` minimizing ||Q(w) - w||^2 (per channel or per tensor), by alternating the
    nearest odd codes and the least-squares ``h`` from the max |w| start (see the module docstring)."""
    s = _mse_search(w.detach().reshape(w.shape[0] if per_channel and w.dim() > 0 else 1, -1), top)
    s = s.float().clamp_min(_MIN_RANGE)
    return s.reshape(-1) if per_channel and w.dim() > 0 else s.reshape(())


def _mse_search(w: torch.Tensor, top: int) -> torch.Tensor:
    """The float64 half-steps (``[rows, 1]``) of the rows of ``w`` (``[rows, n]``) by the alternation.

    Each row's ``h`` depends on that row alone, so the rows are searched a slab at a time
    (:data:`_SLAB_ELEMENTS` float64 values, at least two rows, never a lone last row): a slab and its two
    buffers stay in the processor's cache through all the rounds instead of streaming the whole tensor from
    memory once per operation. Every row goes through the same operations in the same order as when the
    whole tensor is searched at once (a row's sum is a reduction over that row alone), so ``h`` is the same
    to the bit; ``tests/test_quant.py`` compares it with the plain loop of the module docstring."""
    rows = w.shape[0]
    x = w.double()
    s = w.abs().amax(dim=1, keepdim=True).double().clamp_min(_MIN_RANGE) / top
    step = max(2, _SLAB_ELEMENTS // x.shape[1])
    start = 0
    while start < rows:
        stop = min(rows, start + step)
        if rows - stop == 1:  # a lone last row joins this slab
            stop = rows
        s[start:stop] = _mse_rows(x[start:stop], s[start:stop], top)
        start = stop
    return s


#: Float64 values of ``w`` searched together by :func:`_mse_search` (our choice: 2 MiB per buffer, where
#: the search on ResNet50's weights on one CPU thread was fastest; any size gives the same ``h``).
_SLAB_ELEMENTS = 1 << 18


def _mse_rows(x: torch.Tensor, s: torch.Tensor, top: int) -> torch.Tensor:
    """The least-squares alternation for the rows of ``x`` (float64, ``[rows, n]``) from the half-steps ``s``
    (``[rows, 1]``), at most :data:`MSE_ITERATIONS` rounds, in two preallocated buffers. A row whose ``h``
    stopped changing is at its fixed point (its next round computes the same codes and the same ``h``), so
    the rows still moving are carried on alone once they are at most 3/4 of those in the buffers (at least
    two rows stay together, as a single row's sum may be split across threads where a row among several
    is not)."""
    lo, hi = -(top + 1) // 2, (top - 1) // 2
    rows, xa, sa = None, x, s          # rows: the indices of the rows in xa (None: all of them)
    kbuf, pbuf = torch.empty_like(x), torch.empty_like(x)
    k, prod = kbuf, pbuf
    for _ in range(MSE_ITERATIONS):
        torch.div(xa, sa, out=k)
        k.mul_(0.5).floor_().clamp_(lo, hi).mul_(2).add_(1)          # _odd_codes(x / s, top), in place
        num = torch.mul(xa, k, out=prod).sum(dim=1, keepdim=True)
        new = num / torch.mul(k, k, out=prod).sum(dim=1, keepdim=True)
        new = torch.where(new > 0, new, sa)
        moving = (new != sa).reshape(-1)
        n_moving = int(moving.sum())
        if n_moving == 0:
            break
        if rows is None:
            s = new
        else:
            s = s.index_copy(0, rows, new)
        sa = new
        if n_moving <= 0.75 * xa.shape[0] and xa.shape[0] > 2:
            if n_moving < 2:                 # keep a second row beside a lone moving one
                moving[int(torch.argmin(moving.to(torch.uint8)))] = True
            keep = moving.nonzero().reshape(-1)
            rows = keep if rows is None else rows[keep]
            xa, sa = xa[keep], sa[keep]
            k, prod = kbuf[:len(keep)], pbuf[:len(keep)]
    return s


def weight_code_limit(bits: int) -> int:
    """The largest weight code, :math:`2^b - 1` at :math:`b` = ``bits``: weight codes are the odd integers in
    ``[-limit, limit]``."""
    return 2 ** check_bits(bits) - 1


@torch.no_grad()
def quant_params(w: torch.Tensor, bits: int, *, per_channel: bool = True, symmetric: bool = True,
                 rule: str = "mse"):
    r"""The quantization grid of ``w``: ``(scale, zero_point, qmin, qmax)``.

    ``scale`` is a float32 tensor of shape ``[w.shape[0]]`` (per channel) or ``[]`` (per tensor);
    ``zero_point`` an int32 tensor of the same shape. Symmetric: zero point 0, ``scale`` the half-step
    :math:`h` of the grid and ``(qmin, qmax)`` :math:`= (-(2^b - 1), 2^b - 1)` the range of its odd codes (the
    weight is ``code * h``), :math:`h` by ``rule``: ``"mse"`` the one with the least squared error, ``"max"``
    :math:`\max |w| / (2^b - 1)` (see the module docstring); for 1 bit :math:`h = \operatorname{mean} |w|` under
    either rule. Asymmetric: the range :math:`[\min(w, 0), \max(w, 0)]` on codes :math:`[0, 2^b - 1]` (``rule``
    does not apply).
    """
    _check_tensor(w)
    bits = check_bits(bits)
    check_weight_rule(rule)
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


def quantize_tensor(w: torch.Tensor, bits: int, *, per_channel: bool = True, symmetric: bool = True,
                    rule: str = "mse") -> torch.Tensor:
    """:math:`Q(w)`: ``w`` fake-quantized to ``bits`` (a float tensor of the same shape and dtype).

    Differentiable with the straight-through estimator: the gradient with respect to ``w`` is the
    identity, clipped weights included. See the module docstring for the grid (our choice: symmetric,
    per output channel, the scale of least squared error; ``rule="max"`` for the max |w| scale).
    """
    scale, zp, qmin, qmax = quant_params(w, bits, per_channel=per_channel, symmetric=symmetric, rule=rule)
    return fake_quant(w, scale, zp, qmin, qmax, per_channel, symmetric)


@torch.no_grad()
def quantize_to_int(w: torch.Tensor, bits: int, *, per_channel: bool = True, symmetric: bool = True,
                    scale: torch.Tensor | None = None, rule: str = "mse"):
    r"""The integer codes of :math:`Q(w)`: ``(k, scale)`` with ``k`` an integer tensor and ``Q(w) == k * scale``
    exactly.

    ``scale`` is broadcast along dim 0 when per channel. Symmetric codes are the odd integers in
    :math:`[-(2^b - 1), 2^b - 1]` (:math:`\{-1, +1\}` at 1 bit; int16 at 8 bits); asymmetric codes are returned
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
    q = fake_quant(w.detach().float(), scale, zp, qmin, qmax, per_channel, symmetric)
    s = scale.view(-1, *([1] * (w.dim() - 1))) if scale.dim() == 1 and w.dim() > 1 else scale
    k = torch.round(q / s)
    return k.to(torch.int8 if max(abs(qmin), abs(qmax)) <= 127 else torch.int16), scale
