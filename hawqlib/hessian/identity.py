"""The identity H_i = G_i checked on *every* sample (paper section 3.1's H_i, by the exact Gauss-Newton
route of :mod:`~hawqlib.hessian.gauss_newton`).

H_i equals its Gauss-Newton block when every operation between layer i's output and the logits is
linear or piecewise linear in that output (the logits' second derivative in W_i then vanishes almost
everywhere). The Gauss-Newton pass runs one forward per data chunk with a probe added to each layer's
output, and with every model parameter frozen; so the autograd graph of that forward holds exactly the
operations that depend on some probe, i.e. those between a layer's output and the logits, *as they ran
on that chunk* (a branch taken by two rare inputs is in the graph of their chunk). :class:`IdentityRecord`
walks that graph once per chunk and records, per layer, the first operation downstream of its probe
that is not one of :data:`LINEAR_OPS` / :data:`PIECEWISE_LINEAR_OPS`, or that multiplies two tensors
which both depend on probes (:data:`BILINEAR_OPS`), or a BatchNorm on batch statistics. Unknown
operations (a custom ``autograd.Function``, an operator added to PyTorch later) count as not linear: our
choice, so that an operation we cannot classify sends its layers to the exact autograd route instead of
being trusted.

Our choice: a product of two tensors that depend on *different* layers' outputs is refused for both,
though it is linear in each alone when neither depends on the other; the check may thus refuse a case
that is exact, never accept one that is not. It is independent of the numeric proof on spread samples
(:mod:`~hawqlib.hessian.proof`), which stays as a second line.
"""
from __future__ import annotations

import re

import torch

__all__ = ["IdentityRecord", "LINEAR_OPS", "PIECEWISE_LINEAR_OPS", "BILINEAR_OPS"]

#: Autograd nodes (names without the trailing version digit) of operations linear in their inputs.
LINEAR_OPS = frozenset("""
AddBackward SubBackward NegBackward RsubBackward ViewBackward UnsafeViewBackward ReshapeAliasBackward
CloneBackward PermuteBackward TransposeBackward TBackward ExpandBackward SqueezeBackward UnsqueezeBackward
CatBackward StackBackward SliceBackward SelectBackward IndexBackward IndexSelectBackward SplitBackward
SplitWithSizesBackward UnbindBackward NarrowBackward ConstantPadNdBackward ReflectionPad1DBackward
ReflectionPad2DBackward ReflectionPad3DBackward ReplicationPad1DBackward ReplicationPad2DBackward
ReplicationPad3DBackward AvgPool2DBackward AvgPool3DBackward AdaptiveAvgPool2DBackward
AdaptiveAvgPool3DBackward MeanBackward SumBackward AsStridedBackward CopySlices CopyBackwards
ToCopyBackward FlipBackward RollBackward RepeatBackward UpsampleNearest1DBackward UpsampleNearest2DBackward
UpsampleNearest3DBackward UpsampleLinear1DBackward UpsampleBilinear2DBackward UpsampleTrilinear3DBackward
AliasBackward ViewAsRealBackward DiagonalBackward TrilBackward TriuBackward CumsumBackward
PixelShuffleBackward PixelUnshuffleBackward ChannelShuffleBackward Im2ColBackward Col2ImBackward
UnfoldBackward MulBackward1 DivBackward1 WhereBackward MaskedFillBackward MaskedScatterBackward
BackwardHookFunctionBackward
""".split())
#: Operations piecewise linear in their input (a kink, a selection, a max).
PIECEWISE_LINEAR_OPS = frozenset("""
ReluBackward ThresholdBackward HardtanhBackward LeakyReluBackward MaxPool1DWithIndicesBackward
MaxPool2DWithIndicesBackward MaxPool3DWithIndicesBackward MaxPool2DBackward AdaptiveMaxPool2DBackward
AdaptiveMaxPool3DBackward MaxBackward MinBackward AmaxBackward AminBackward ClampBackward ClampMinBackward
ClampMaxBackward AbsBackward MaximumBackward MinimumBackward FmaxBackward FminBackward HardshrinkBackward
SoftshrinkBackward SortBackward TopkBackward GatherBackward KthvalueBackward MedianBackward
""".split())
#: Operations linear in each operand alone: linear when at most one of the listed operand positions
#: depends on a probe (a weight that does not: a convolution, a Linear layer, BatchNorm's affine).
BILINEAR_OPS = {
    "MulBackward": (0, 1), "ConvolutionBackward": (0, 1), "AddmmBackward": (1, 2), "MmBackward": (0, 1),
    "BmmBackward": (0, 1), "MvBackward": (0, 1), "AddmvBackward": (1, 2), "BaddbmmBackward": (1, 2),
    "DotBackward": (0, 1), "NativeBatchNormBackward": (0, 1), "CudnnBatchNormBackward": (0, 1),
    "MiopenBatchNormBackward": (0, 1), "PreluKernelBackward": (0, 1), "EmbeddingBackward": (0,),
}
#: Division: linear in the numerator alone (the divisor must not depend on a probe).
_DIVIDE = {"DivBackward": (1,)}
_BATCH_NORM = ("NativeBatchNormBackward", "CudnnBatchNormBackward", "MiopenBatchNormBackward")


def _kind(node) -> str:
    name = type(node).__name__
    if name in LINEAR_OPS:  # names whose version digit matters (MulBackward1: by a number)
        return name
    return re.sub(r"\d+$", "", name)


def _why_not_linear(node, deps: list[int]) -> str | None:
    """Why this node is not (piecewise) linear in what flows from the probes; None if it is. ``deps`` are the
    positions of its inputs that depend on a probe."""
    full, kind = type(node).__name__, _kind(node)
    if full in LINEAR_OPS or kind in LINEAR_OPS or kind in PIECEWISE_LINEAR_OPS:
        return None
    if kind in BILINEAR_OPS:
        if kind in _BATCH_NORM and bool(getattr(node, "_saved_training", False)):
            return f"{kind} on batch statistics"
        both = [i for i in BILINEAR_OPS[kind] if i in deps]
        return None if len(both) <= 1 else f"{full} of two tensors that both depend on layer outputs"
    if kind in _DIVIDE:
        return None if not any(i in deps for i in _DIVIDE[kind]) else f"{full} by a tensor that depends on a layer output"
    return full


class IdentityRecord:
    """Per layer (by index), the first operation seen between its output and the logits that is not
    (piecewise) linear, over every chunk scanned. ``broken`` maps layer index -> a description."""

    def __init__(self):
        self.broken: dict[int, str] = {}
        self.chunks = 0

    def scan(self, logits: torch.Tensor, probes: dict[int, torch.Tensor], first: int = 0) -> None:
        """Walk the autograd graph of one chunk's forward from ``logits`` down to the ``probes`` (leaf tensors,
        the only ones requiring grad); samples ``first`` onwards are those of this chunk (for the message)."""
        self.chunks += 1
        leaf = {id(p): i for i, p in probes.items()}
        root = logits.grad_fn
        if root is None:
            return
        mask: dict = {}  # node -> bit mask of the probes it depends on
        stack = [(root, False)]
        while stack:
            node, done = stack.pop()
            if node in mask and not done:
                continue
            kids = [f for f, _ in node.next_functions]
            if not done:
                stack.append((node, True))
                stack += [(k, False) for k in kids if k is not None and k not in mask]
                continue
            if hasattr(node, "variable"):  # AccumulateGrad of a leaf: a probe
                i = leaf.get(id(node.variable))
                mask[node] = 0 if i is None else 1 << i
                continue
            dep = [j for j, k in enumerate(kids) if k is not None and mask.get(k, 0)]
            m = 0
            for j in dep:
                m |= mask[kids[j]]
            mask[node] = m
            if m:
                why = _why_not_linear(node, dep)
                if why:
                    for i in probes:
                        if m >> i & 1 and i not in self.broken:
                            self.broken[i] = f"{why} (in the chunk from sample {first})"
