"""Exact Hessian-vector products H_i v by autograd double backward (Pearlmutter's trick), for any model,
block and loss (paper section 3.1 computes the top eigenvalue of each block's Hessian from such
products): differentiate <grad_W L, v> once more. Per chunk: one forward, one gradient with
``create_graph`` and one double backward; chunks count with their share of the user's loss
(:class:`~hawqlib.hessian.losses.LossSpec`). Under a process group each rank takes its share of the chunks
(:class:`~hawqlib.hessian.inputs.Data`'s ``shard``) and the products are summed over ranks (``all_reduce``). :func:`block_products` shares one graph between many
blocks (one double backward each): the verification of every returned eigenpair and the proof of the
Gauss-Newton identity use it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..blocks import Block
from .. import distributed as hdist
from .inputs import Data, check_finite, model_float, model_state, probe_layers, resolve_blocks, set_requires_grad
from .losses import LossSpec
from .results import HessianError

__all__ = ["hvp", "AutogradOperator", "block_products", "flat_operator", "chunk_loss"]


def chunk_loss(model, spec: LossSpec, x, y, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The user's loss on one chunk (a finite scalar, targets checked) and the model's outputs."""
    out = model(x)
    spec.check_targets(out, y, f"block {name!r}")
    loss = spec.loss(out, y)
    if not torch.is_tensor(loss) or loss.numel() != 1:
        shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
        raise HessianError(f"block {name!r}: loss_fn must return a scalar (the batch mean, or sum), got {shape}; "
                           "use reduction='mean'")
    if not torch.isfinite(loss).all():
        raise HessianError(f"block {name!r}: the loss is not finite ({float(loss.detach())}) on a data chunk")
    return loss.reshape(()), out


class AutogradOperator:
    """H_i v by double backward, summed over chunks with their weights in the loss."""

    def __init__(self, model, spec: LossSpec, data: Data, block: Block):
        self.model, self.spec, self.data, self.block = model, spec, data, block
        self.params = block.params
        self.cache = None  # the gradient graph, when the data is one chunk (reused by every product)

    def __call__(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        name, params = self.block.name, self.params
        set_requires_grad(self.model, params)
        out = [torch.zeros_like(p) for p in params]
        single = self.data.nchunks == 1
        for x, y, w in self.data:
            if single and self.cache is not None:
                grads = self.cache
            else:
                loss, _ = chunk_loss(self.model, self.spec, x, y, name)
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                if single:
                    self.cache = grads
            terms = [(g * v).sum() for g, v in zip(grads, vs) if g is not None and g.requires_grad]
            if not terms:
                continue  # the gradient is constant in W: this chunk's Hessian block is zero
            hv = torch.autograd.grad(sum(terms), params, retain_graph=single, allow_unused=True)
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h.detach(), alpha=w)
        if self.data.shard is not None:  # this rank's chunks only: sum the ranks' partial products
            for o in out:
                hdist.all_reduce_sum(o)
        for o in out:
            check_finite(o, name, "Hessian-vector product")
        return out


def block_products(model, spec: LossSpec, data: Data, blocks: Sequence[Block],
                   vectors: Sequence[Sequence[list[torch.Tensor]]]) -> list[list[list[torch.Tensor]]]:
    """Exact products H_i v for every block i and every vector v of ``vectors[i]`` (lists of tensors shaped
    like the block's parameters), over all of ``data``. Per chunk, the blocks share one forward and one
    gradient with ``create_graph``; then one double backward per (block, vector): d<g_i, v>/dW_i is H_i v
    alone, the other blocks' parameters being outside the differentiated set."""
    params = [p for b in blocks for p in b.params]
    set_requires_grad(model, params)
    out = [[[torch.zeros_like(p) for p in b.params] for _ in vs] for b, vs in zip(blocks, vectors)]
    names = ", ".join(b.name for b in blocks)
    for x, y, w in data:
        loss, _ = chunk_loss(model, spec, x, y, names)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        k, jobs = 0, []
        for i, b in enumerate(blocks):
            g = grads[k:k + len(b.params)]
            k += len(b.params)
            jobs += [(i, j, g, v) for j, v in enumerate(vectors[i])]
        for t, (i, j, g, v) in enumerate(jobs):
            terms = [(gi * vi).sum() for gi, vi in zip(g, v) if gi is not None and gi.requires_grad]
            if not terms:
                continue
            hv = torch.autograd.grad(sum(terms), blocks[i].params, retain_graph=t < len(jobs) - 1,
                                     allow_unused=True)
            for o, h in zip(out[i][j], hv):
                if h is not None:
                    o.add_(h.detach(), alpha=w)
        del grads, loss
    if data.shard is not None:  # this rank's chunks only: sum the ranks' partial products
        for per in out:
            for hv in per:
                for o in hv:
                    hdist.all_reduce_sum(o)
    for b, per in zip(blocks, out):
        for hv in per:
            for o in hv:
                check_finite(o, b.name, "Hessian-vector product")
    return out


def hvp(model: nn.Module, loss_fn, data, block: Block | str, v, *, chunk_size: int = 128) -> list[torch.Tensor]:
    """The exact product H_i v (autograd double backward) for one block, with the model in eval mode.

    ``block`` is a :class:`Block` or a module name; ``v`` a tensor (one-parameter block) or a list of
    tensors shaped like ``block.params``. Returns a list of tensors shaped like the parameters.
    """
    blk = resolve_blocks(model, [block] if isinstance(block, (Block, str)) else block)
    if len(blk) != 1:
        raise ValueError("hvp takes exactly one block")
    blk = blk[0]
    params = blk.params
    vs = [v] if torch.is_tensor(v) else list(v)
    if len(vs) != len(params) or any(tuple(a.shape) != tuple(p.shape) for a, p in zip(vs, params)):
        raise ValueError(f"block {blk.name!r}: v must match the shapes {[tuple(p.shape) for p in params]}, "
                         f"got {[tuple(a.shape) for a in vs]}")
    device, dtype = model_float(model)
    spec = LossSpec(loss_fn)
    with model_state(model):
        d = Data(data, chunk_size, device, dtype, spec)
        x, _ = d.take([0])
        probe_layers(model, x, [blk])
        vs = [a.to(p.device, p.dtype) for a, p in zip(vs, params)]
        return [t.clone() for t in AutogradOperator(model, spec, d, blk)(vs)]


def flat_operator(op, params: list[torch.Tensor]):
    """Wrap a list-of-tensors operator as a flat-vector one (in the parameters' dtype)."""
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    dtype = params[0].dtype

    def unflat(v):
        return [t.view(s) for t, s in zip(v.to(dtype).split(sizes), shapes)]

    def matvec(v):
        return torch.cat([t.reshape(-1) for t in op(unflat(v))])
    return matvec, unflat
