r"""The loss whose Hessian is taken (paper section 3.1), as the user defines it over *all* the data.

The data is processed in chunks, so the loss over all of it must be rebuilt from per-chunk values.
:class:`LossSpec` knows how for:

* ``nn.CrossEntropyLoss`` / ``F.cross_entropy`` and ``nn.NLLLoss`` / ``F.nll_loss``, every option:
  ``reduction="mean"`` is a mean weighted by ``weight[y_n]`` over the samples whose target is not
  ``ignore_index`` (PyTorch's definition, label smoothing included), so chunk :math:`c` counts with
  :math:`Z_c / \sum_{c'} Z_{c'}` where :math:`Z_c` is its sum of those weights; ``reduction="sum"`` counts every chunk
  once; class-probability targets are a plain mean over the batch;
* any other loss (an ``nn`` loss module or a callable): its value on a batch must be the mean over the
  batch (chunks count with their size) or, for ``reduction="sum"``, the sum; :meth:`LossSpec.check_split`
  tests this on a sample of the data and raises when neither holds (a weighted mean cannot be split).

``reduction="none"`` (not a scalar) is refused. For the Gauss-Newton route, cross-entropy's Hessian in
the logits of sample :math:`n` is :math:`c_n \left( \operatorname{diag}(p_n) - p_n p_n^T \right)` with
:math:`c_n = (1 - \varepsilon) \, w_{y_n} + (\varepsilon / C) \sum_k w_k` (:math:`w` the class weights,
:math:`\varepsilon` the label smoothing; 0 when ignored; :math:`\sum_k w_k q_{nk}` for probability targets
:math:`q`), over the normalizer above;
:meth:`LossSpec.sample_factors` gives the per-sample factors, None where all are 1 (plain mean).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .results import HessianError

__all__ = ["LossSpec"]

_CE_FUNCS = {F.cross_entropy: "ce", F.nll_loss: "nll"}


class LossSpec:
    """How per-chunk values of ``loss_fn`` add up to the loss over all samples, and target checks."""

    def __init__(self, loss_fn):
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        self.fn = loss_fn
        self.kind = "other"
        self.weight, self.ignore_index, self.smoothing = None, -100, 0.0
        self.reduction = getattr(loss_fn, "reduction", "mean")
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            self.kind, self.weight = "ce", loss_fn.weight
            self.ignore_index, self.smoothing = loss_fn.ignore_index, float(loss_fn.label_smoothing)
        elif isinstance(loss_fn, nn.NLLLoss):
            self.kind, self.weight, self.ignore_index = "nll", loss_fn.weight, loss_fn.ignore_index
        elif loss_fn in _CE_FUNCS:
            self.kind = _CE_FUNCS[loss_fn]
        if self.reduction not in ("mean", "sum"):
            raise HessianError(f"loss_fn has reduction={self.reduction!r}: the Hessian needs a scalar loss; use "
                               "reduction='mean' (or 'sum' for the Hessian of the sum over all samples)")

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)

    # ------------------------------------------------------------------ combining chunks
    def _class_terms(self, y: torch.Tensor, C: int | None = None):
        """Per-sample weight[y_n] (0 where ignored) for class-index targets."""
        valid = y != self.ignore_index
        if self.weight is None:
            return valid.double()
        w = self.weight.detach().to(y.device, torch.float64)
        return torch.where(valid, w[y.clamp(0, len(w) - 1)], torch.zeros((), dtype=torch.float64,
                                                                           device=y.device))

    def _weighted(self, y) -> bool:
        return self.kind in ("ce", "nll") and torch.is_tensor(y) and not y.is_floating_point()

    def summed(self, y) -> bool:
        """Whether a chunk's share of the loss is taken as its *sum* over the normalizer of all the data,
        not as ``loss_fn``'s value times Z_c / Z: a class-weighted mean over class indices, where a chunk
        whose counted targets all have weight 0 has Z_c = 0, yet (with label smoothing) a loss."""
        return self.reduction == "mean" and self.weight is not None and self._weighted(y)

    def loss(self, out, y):
        """The chunk's value to weight by :meth:`chunk_weight`: ``loss_fn(out, y)``, or for a :meth:`summed`
        chunk the same loss with ``reduction="sum"`` (PyTorch's numerator of the weighted mean)."""
        if not self.summed(y):
            return self.fn(out, y)
        if self.kind == "ce":
            return F.cross_entropy(out, y, weight=self.weight, ignore_index=self.ignore_index, reduction="sum",
                                   label_smoothing=self.smoothing)
        return F.nll_loss(out, y, weight=self.weight, ignore_index=self.ignore_index, reduction="sum")

    def counted(self, y) -> int:
        """Samples of the chunk whose target is not ignored (all of them for other targets)."""
        if self._weighted(y):
            return int((y != self.ignore_index).sum())
        return len(y)

    def chunk_norm(self, y) -> float:
        """Z_c: the normalizer of the chunk's mean (its sample count, or sum of class weights)."""
        n = len(y)
        if self.reduction == "sum":
            return float(n)
        if self._weighted(y):
            return float(self._class_terms(y).sum())
        return float(n)

    def total(self, norms) -> float:
        z = float(sum(norms))
        if z == 0.0 and self.reduction == "mean":
            raise HessianError(f"{self.name}: every target equals ignore_index={self.ignore_index} (or has class "
                               "weight 0), so the mean loss is 0/0; pass data with at least one counted target")
        return z

    def chunk_weight(self, z_c: float, total: float, y=None) -> float:
        """The factor of a chunk's :meth:`loss` value in the loss over all samples (``y``: the chunk's targets)."""
        if self.reduction == "sum":
            return 1.0
        if y is not None and self.summed(y):
            return 1.0 / total if total and self.counted(y) else 0.0
        return z_c / total if total else 0.0

    # ------------------------------------------------------------------ Gauss-Newton factors
    def sample_factors(self, y, C: int, n_total: int, total: float, plain_data: bool = False):
        """Per-sample factors f_n with H = (1/N) sum_n f_n J_n^T (diag p - p p^T) J_n, or None if all are 1.

        ``plain_data``: no target of *all* the data is ignored (Z = N). Whether a chunk is plain depends on
        all the data: a chunk without ignored targets still has factors N / Z when others have some."""
        if self.kind != "ce":
            return None
        plain = (plain_data and self.weight is None and self.reduction == "mean" and torch.is_tensor(y)
                 and not y.is_floating_point() and not bool((y == self.ignore_index).any()))
        if plain:  # c_n = (1 - eps) + eps = 1, Z = N
            return None
        eps = self.smoothing
        w = (torch.ones(C, dtype=torch.float64, device=y.device) if self.weight is None
             else self.weight.detach().to(y.device, torch.float64))
        if y.is_floating_point():
            q = (1 - eps) * y.double() + eps / C
            c = (q * w).sum(1)
        else:
            valid = (y != self.ignore_index).double()
            c = (1 - eps) * self._class_terms(y) + (eps / C) * float(w.sum()) * valid
        norm = 1.0 if self.reduction == "sum" else total
        return c * (n_total / norm)

    # ------------------------------------------------------------------ checks
    def check_targets(self, out, y, where: str) -> None:
        """Targets a cross-entropy/NLL loss can take, else one clear error naming the valid ones."""
        if self.kind not in ("ce", "nll") or not torch.is_tensor(out) or out.dim() < 2:
            return
        C = out.shape[1]
        if not torch.is_tensor(y):
            raise HessianError(f"{where}: targets must be a tensor of class indices, got {type(y).__name__}")
        if y.is_floating_point():
            if self.kind == "ce" and y.shape == out.shape:
                return  # class probabilities
            raise HessianError(f"{where}: targets are floating point ({y.dtype}, shape {tuple(y.shape)}); "
                               f"class indices must be an integer tensor (torch.long) in 0..{C - 1}, or (for "
                               f"cross-entropy) class probabilities shaped like the outputs {tuple(out.shape)}")
        if y.dtype == torch.bool or y.shape[0] != out.shape[0] or y.shape[1:] != out.shape[2:]:
            raise HessianError(f"{where}: targets of shape {tuple(y.shape)} and dtype {y.dtype} do not fit outputs "
                               f"{tuple(out.shape)}; expected class indices of shape "
                               f"{(out.shape[0],) + tuple(out.shape[2:])} (torch.long)")
        bad = (y != self.ignore_index) & ((y < 0) | (y >= C))
        if bool(bad.any()):
            v = int(y[bad][0])
            raise HessianError(f"{where}: target {v} is not a class of the model's {C} outputs; valid targets are "
                               f"0..{C - 1} (or ignore_index={self.ignore_index})")

    def check_split(self, out, y) -> None:
        """For a loss we cannot read: its value on a batch must equal the size-weighted mean (or, for
        reduction='sum', the sum) of its values on the batch's two halves, else chunks cannot be combined."""
        if self.kind != "other" or len(out) < 2:
            return
        h = len(out) // 2
        with torch.no_grad():
            whole = float(self.fn(out, y))
            a, b = float(self.fn(out[:h], y[:h])), float(self.fn(out[h:], y[h:]))
        n = len(out)
        combined = a + b if self.reduction == "sum" else (h * a + (n - h) * b) / n
        tol = 1e3 * torch.finfo(out.dtype).eps * max(1.0, abs(whole), abs(a), abs(b))
        if not math.isclose(whole, combined, rel_tol=0, abs_tol=tol):
            what = "sum" if self.reduction == "sum" else "size-weighted mean"
            raise HessianError(f"loss_fn {self.name}: its value on a batch ({whole:.6g}) is not the {what} of its "
                               f"values on the batch's halves ({combined:.6g}), so the loss over all samples cannot "
                               "be rebuilt from chunks (a mean weighted by the targets?); use a per-sample mean, "
                               "nn.CrossEntropyLoss/nn.NLLLoss (their weights are handled), or pass all the data as "
                               "one chunk (chunk_size >= the number of samples)")
