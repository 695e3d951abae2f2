"""Per-block predictors of quantization damage, the damage itself, and how well the one ranks the other.

HAWQ (Dong et al., ICCV 2019, section 3.1) predicts which blocks suffer most from quantization by the top
Hessian eigenvalue per weight ``S_i = lambda_i / n_i``; its successors and the toolkits use other measures. For
block ``B_i`` with ``n_i`` weights ``W_i`` and Hessian block ``H_i``, at ``b`` bits (:data:`PREDICTORS`):

- ``"eigenvalue"``: ``lambda_i / n_i`` (HAWQ, section 3.1; does not depend on ``b``);
- ``"trace"``: ``tr(H_i) / n_i``, the average Hessian eigenvalue (HAWQ-V2, Dong et al., NeurIPS 2020);
- ``"omega"``: ``lambda_i ||Q_b(W_i) - W_i||^2`` (HAWQ section 3.2's Omega);
- ``"trace_error"``: ``tr(H_i) / n_i ||Q_b(W_i) - W_i||^2`` (the term of HAWQ-V3's integer program, Yao et al.,
  ICML 2021);
- ``"fisher"``: ``tr(F_i)``, the trace of the empirical Fisher information of the block, the mean over images
  of the squared norm of the per-image loss gradient (the Fisher-based scores of e.g. NVIDIA's AutoQuantize
  and FIT, Zandonati et al. 2023; does not depend on ``b``);
- ``"error"``: ``||Q_b(W_i) - W_i||^2`` alone (no curvature).

The ground truth (:func:`single_block_damage`): the increase of the loss, image by image, when block ``B_i``
alone is quantized to ``b`` bits and every other block keeps its FP32 weights; with ``act_bits`` the activations
are quantized too, in both the quantized and the reference model, so that the increase is the block's weights'.
:func:`rank_agreement` gives Spearman's and Kendall's rank correlation of a predictor with the mean damage over
blocks, and percentile bootstrap intervals over the images.

The quantizer behind ``Q_b`` is :func:`hawqlib.quant.quantize_model`'s (through
:func:`hawqlib.sensitivity.quant_errors`), so every predictor and the damage see the very same weights.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import quant_blocks
from .quant import BitConfig, calibrate_activations, quantize_model, set_quant_enabled
from .sensitivity import quant_errors

__all__ = ["PREDICTORS", "BIT_FREE", "predictor_values", "empirical_fisher_traces", "single_block_damage",
           "spearman", "kendall", "RankAgreement", "rank_agreement"]

#: The predictors :func:`predictor_values` computes, in the order the pages show them.
PREDICTORS = ("eigenvalue", "trace", "omega", "trace_error", "fisher", "error")
#: The predictors that do not depend on the bit width (one ranking for every ``b``).
BIT_FREE = ("eigenvalue", "trace", "fisher")


def predictor_values(blocks, bits: Sequence[int], lam: Sequence[float], trace: Sequence[float],
                     fisher: Sequence[float]) -> dict[str, list[list[float]]]:
    """Every predictor of :data:`PREDICTORS` as ``{name: values[i][k]}`` (block ``i`` in ``blocks``' order, bit width
    ``bits[k]``). ``lam``, ``trace`` and ``fisher`` are per block: the top Hessian eigenvalue, the Hessian trace and
    the empirical Fisher trace (:func:`empirical_fisher_traces`). A negative ``lam`` or ``trace`` counts as 0 in
    the products, as :mod:`hawqlib.allocate` counts a negative eigenvalue."""
    n = len(blocks)
    if not (len(lam) == len(trace) == len(fisher) == n):
        raise ValueError(f"lam, trace and fisher must give one value per block ({n}); got {len(lam)}, "
                         f"{len(trace)}, {len(fisher)}")
    err = [quant_errors(b, tuple(bits)) for b in blocks]
    out = {k: [] for k in PREDICTORS}
    for i, b in enumerate(blocks):
        per_l, per_t = float(lam[i]) / b.numel, float(trace[i]) / b.numel
        out["eigenvalue"].append([per_l] * len(bits))
        out["trace"].append([per_t] * len(bits))
        out["omega"].append([max(float(lam[i]), 0.0) * e for e in err[i]])
        out["trace_error"].append([max(per_t, 0.0) * e for e in err[i]])
        out["fisher"].append([float(fisher[i])] * len(bits))
        out["error"].append(list(err[i]))
    return out


def empirical_fisher_traces(model: nn.Module, blocks, batch, *, loss_fn=None, chunk: int = 64) -> list[float]:
    """``tr(F_i)`` of every block: the mean over the images of ``batch`` (an ``(inputs, targets)`` pair) of the
    squared norm of the per-image loss gradient with respect to ``W_i``, in eval mode (BatchNorm frozen). One
    forward and backward pass per image, vectorized over ``chunk`` images (``torch.func``)."""
    from torch.func import functional_call, grad, vmap

    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    x, y = batch
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"batch must be a non-empty (inputs, targets) pair of equal length; got {len(x)}, {len(y)}")
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [[names[id(p)] for p in b.params] for b in blocks]
    wanted = {k for ks in keys for k in ks}
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: t.detach() for n, t in model.named_buffers()}
    was = model.training
    model.eval()

    def loss_one(sub, xi, yi):
        out = functional_call(model, ({**params, **sub}, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_image = vmap(grad(loss_one), in_dims=(None, 0, 0))
    totals = [0.0] * len(blocks)
    try:
        for s in range(0, len(x), chunk):
            g = per_image({k: params[k] for k in wanted}, x[s:s + chunk], y[s:s + chunk])
            for i, ks in enumerate(keys):
                totals[i] += float(sum(g[k].double().pow(2).sum() for k in ks))
    finally:
        model.train(was)
    return [t / len(x) for t in totals]


@torch.no_grad()
def _losses(model: nn.Module, x, y, chunk: int) -> torch.Tensor:
    return torch.cat([nn.functional.cross_entropy(model(x[s:s + chunk]), y[s:s + chunk], reduction="none")
                      for s in range(0, len(x), chunk)]).double()


def single_block_damage(model: nn.Module, bits: Sequence[int], batch, *, granularity="layer",
                        act_bits: int | None = None, calibration=None, calibration_rule: str = "union",
                        chunk: int = 256) -> torch.Tensor:
    """The loss increase image by image when one block alone is quantized: a ``(blocks, len(bits), images)``
    tensor, blocks in module order at ``granularity``, on ``batch`` (an ``(inputs, targets)`` pair), eval mode.

    Without ``act_bits`` the reference is the FP32 model. With ``act_bits`` every activation is quantized
    (:func:`hawqlib.quant.quantize_model`), its ranges calibrated on ``calibration`` (inputs, or an
    ``(inputs, targets)`` pair; required) with FP32 weights, and the reference is that model with FP32 weights
    (our choice: the increase is then the block's weights' alone, at the activations of the quantized model).
    ``calibration_rule`` is :func:`hawqlib.quant.calibrate_activations`' ``calibration``.
    """
    if act_bits is not None and calibration is None:
        raise ValueError("single_block_damage(act_bits=...) needs calibration= images for the activation ranges")
    x, y = batch
    was = model.training
    model.eval()
    try:
        names = [b.name for b in quant_blocks(model, granularity)]
        out, ref = None, None
        for k, b in enumerate(bits):
            q = quantize_model(model, BitConfig(weights=dict.fromkeys(names, int(b)), act_bits=act_bits,
                                                granularity=granularity))
            q.eval()
            set_quant_enabled(q, None, False, activations=False)
            if act_bits is not None:
                calibrate_activations(q, [calibration], calibration=calibration_rule)
            if ref is None:
                ref = _losses(q if act_bits is not None else model, x, y, chunk)
                out = torch.empty(len(names), len(bits), len(x), dtype=torch.float64)
            for i, n in enumerate(names):
                set_quant_enabled(q, [n], True, activations=False)
                out[i, k] = _losses(q, x, y, chunk) - ref
                set_quant_enabled(q, [n], False, activations=False)
    finally:
        model.train(was)
    return out


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n along the last dimension of ``v`` (average ranks for ties)."""
    below = (v[..., :, None] > v[..., None, :]).sum(-1)
    equal = (v[..., :, None] == v[..., None, :]).sum(-1)
    return (below + (equal + 1) / 2).double()


def _spearman_rows(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    ra, rm = _ranks(a), _ranks(m)
    ra, rm = ra - ra.mean(-1, keepdim=True), rm - rm.mean(-1, keepdim=True)
    den = ra.norm(dim=-1) * rm.norm(dim=-1)
    return torch.where(den > 0, (ra * rm).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, math.nan))


def _kendall_rows(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = a.shape[-1]
    iu = torch.triu_indices(n, n, 1)
    da = torch.sign(a[..., :, None] - a[..., None, :])[..., iu[0], iu[1]]
    dm = torch.sign(m[..., :, None] - m[..., None, :])[..., iu[0], iu[1]]
    den = ((da != 0).sum(-1).double() * (dm != 0).sum(-1).double()).sqrt()
    return torch.where(den > 0, (da * dm).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, math.nan))


def spearman(a, b) -> float:
    """Spearman's rank correlation of two equal-length sequences (Pearson's on average ranks; NaN if one is
    constant)."""
    return float(_spearman_rows(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)))


def kendall(a, b) -> float:
    """Kendall's tau-b of two equal-length sequences (ties counted as in tau-b; NaN if one is constant)."""
    return float(_kendall_rows(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)))


@dataclass(frozen=True)
class RankAgreement:
    """Spearman's and Kendall's correlation of a predictor with the mean damage, with bootstrap intervals."""

    spearman: float
    spearman_low: float
    spearman_high: float
    kendall: float
    kendall_low: float
    kendall_high: float


def rank_agreement(predicted: Sequence[float], damage: torch.Tensor, *, n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> RankAgreement:
    """How well ``predicted`` (one value per block) ranks ``damage`` (``(blocks, images)``, per-image increases):
    the correlations with the mean over images, and ``level`` percentile intervals from ``n_boot`` resamples of
    the images with replacement (``torch.Generator`` seeded by ``seed``; the predictor is held fixed)."""
    damage = torch.as_tensor(damage, dtype=torch.float64)
    if damage.ndim != 2 or damage.shape[0] != len(predicted) or damage.shape[1] < 1:
        raise ValueError(f"damage must be (blocks, images) with {len(predicted)} blocks; got {tuple(damage.shape)}")
    if not (isinstance(n_boot, int) and n_boot >= 1 and 0 < level < 1):
        raise ValueError(f"n_boot must be a positive int and level in (0, 1); got {n_boot!r}, {level!r}")
    g = torch.Generator().manual_seed(seed)
    mean = damage.mean(1)
    pred = torch.as_tensor(predicted, dtype=torch.float64)
    idx = torch.randint(damage.shape[1], (n_boot, damage.shape[1]), generator=g)
    means = damage[:, idx].mean(2).T  # (n_boot, blocks): the mean damage of each resample
    sp, kd = _spearman_rows(pred, means), _kendall_rows(pred.expand_as(means), means)
    lo, hi = (1 - level) / 2, (1 + level) / 2

    def q(v, p):
        v = v[~torch.isnan(v)]
        return float(torch.quantile(v, p)) if len(v) else math.nan

    return RankAgreement(spearman(predicted, mean), q(sp, lo), q(sp, hi), kendall(predicted, mean), q(kd, lo),
                         q(kd, hi))
