"""What the Hessian of paper section 3.1 is taken over, checked before any product: the data (replayed
identically on every pass), the blocks, the model's state, and that the operator is a fixed function
of the weights (a deterministic forward in which a sample's output does not depend on its batch).

Every failure here is a :class:`HessianError` (or ``TypeError``/``ValueError`` for arguments of the
wrong kind) that says what is wrong and what would be valid.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from ..blocks import Block, quant_blocks
from .losses import LossSpec
from .results import HessianError

__all__ = ["Data", "resolve_blocks", "model_state", "model_float", "set_requires_grad", "check_finite",
           "probe_layers", "check_operator", "spread_indices"]


def _is_batch(data) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0])
            and not isinstance(data[1], (tuple, list)))


_PROBES: dict = {}


def _content(t, device) -> str | None:
    """A fingerprint of a tensor's *content*: its dot product with a fixed pseudo-random vector (so a
    flip, crop or permutation of the same values changes it, where a plain sum would not)."""
    if not torch.is_tensor(t):
        return None
    flat = t.detach().reshape(-1).double()
    key = (flat.numel(), str(flat.device))
    if key not in _PROBES:
        g = torch.Generator().manual_seed(12345)
        if len(_PROBES) > 16:
            _PROBES.clear()
        _PROBES[key] = torch.rand(flat.numel(), generator=g, dtype=torch.float64).to(flat.device) + 0.5
    return repr(float(flat @ _PROBES[key]))  # a string: NaN content compares equal to itself


class Data:
    """Re-iterable chunks of at most ``chunk_size`` samples, checked to hold the same content on every
    pass. Iterating yields ``(x, y, weight)``: ``weight`` is the chunk's share of the user's loss over
    all the data (see :class:`~hawqlib.hessian.losses.LossSpec`); chunks of weight 0 are skipped.

    ``shard = (rank, world)`` (set by :func:`~hawqlib.hessian.orchestrate.top_eigenvalues` under a process
    group) makes :meth:`chunks` yield only this rank's chunks, every ``world``-th from the ``rank``-th; the
    weights stay those of all the data, so the ranks' sums of chunk products add up to the one-process sum."""

    def __init__(self, data, chunk_size: int, device, dtype, spec: LossSpec, need_loss: bool = True):
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
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
        self.data, self.chunk_size, self.device, self.dtype, self.spec = data, chunk_size, device, dtype, spec
        self.fingerprint: list | None = None
        self.shard: tuple[int, int] | None = None
        self.norms: list[float] = []
        ys, counted = [], 0
        for _, y in self._chunks():
            self.norms.append(spec.chunk_norm(y))
            ys.append(y if spec.summed(y) else None)  # kept only where the weight needs the targets
            counted += spec.counted(y)
        self.n, self.nchunks = self._n, len(self.norms)
        if self.n == 0:
            raise HessianError("data is empty: it yielded no samples; the Hessian of a loss needs at least one "
                               "(inputs, targets) sample")
        #: no target of all the data is ignored: the chunks' Gauss-Newton factors are then all 1 (plain mean)
        self.plain = counted == self.n
        self.total = spec.total(self.norms) if need_loss or sum(self.norms) else 0.0
        self.weights = [spec.chunk_weight(z, self.total, y) for z, y in zip(self.norms, ys)]

    def _chunks(self):
        fp, n = [], 0
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
            fp.append((len(x), _content(x, self.device), _content(y, self.device)))
            n += len(x)
            for i in range(0, len(x), self.chunk_size):
                yield x[i:i + self.chunk_size], y[i:i + self.chunk_size]
        self._n = n
        if self.fingerprint is None:
            self.fingerprint = fp
        elif fp != self.fingerprint:
            raise HessianError("data changed between passes (a shuffling loader, or random augmentation such as "
                               "flips or crops): the Hessian needs the same samples on every pass; use a loader "
                               "with shuffle=False and no random transforms, or pass one fixed (inputs, targets) "
                               "pair")

    def chunks(self, skip_zero: bool = True):
        """``(x, y, weight)`` per chunk, in order; ``skip_zero=False`` keeps chunks of weight 0."""
        for i, ((x, y), w) in enumerate(zip(self._chunks(), self.weights)):
            if self.shard is not None and i % self.shard[1] != self.shard[0]:
                continue
            if w != 0.0 or not skip_zero:
                yield x, y, w

    def __iter__(self):
        return self.chunks()

    def take(self, indices: Sequence[int]):
        """The samples at the given positions (sorted, over all batches) as one ``(inputs, targets)`` batch."""
        want = sorted(int(i) for i in indices)
        xs, ys, start, j = [], [], 0, 0
        for x, y in self._chunks():
            stop = start + len(x)
            local = []
            while j < len(want) and want[j] < stop:
                local.append(want[j] - start)
                j += 1
            if local:
                ix = torch.tensor(local, device=x.device)
                xs.append(x[ix])
                ys.append(y[ix] if torch.is_tensor(y) else [y[i] for i in local])
            start = stop
        y = torch.cat(ys) if torch.is_tensor(ys[0]) else sum((list(t) for t in ys), [])
        return torch.cat(xs), y

    def subset(self, indices: Sequence[int], dtype=None) -> "Data":
        """A one-chunk :class:`Data` of the given samples (optionally cast to ``dtype``)."""
        x, y = self.take(indices)
        dtype = dtype or self.dtype
        if torch.is_tensor(y) and y.is_floating_point():
            y = y.to(dtype)
        return Data((x.to(dtype) if x.is_floating_point() else x, y), 1 << 62, self.device, dtype, self.spec,
                    need_loss=False)


def spread_indices(n: int, k: int, seed: int) -> list[int]:
    """``k`` sample positions drawn without replacement from all ``n`` (seeded), sorted: a check on them
    sees the data as a whole, not a start that may be unrepresentative (blank frames, one class)."""
    g = torch.Generator().manual_seed(10_007 + int(seed))
    return sorted(torch.randperm(n, generator=g)[:max(1, min(k, n))].tolist())


def model_float(model: nn.Module):
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise HessianError(f"{type(model).__name__} has no floating-point parameters")


def resolve_blocks(model: nn.Module, blocks) -> list[Block]:
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
def model_state(model: nn.Module):
    """Eval mode inside; on exit, errors included, every module's mode, every buffer's values (BatchNorm's
    running statistics, even where a model's ``train()`` keeps a layer training and a check's forward
    updated them), every requires_grad flag and every .grad are restored."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        model.eval()
        yield
    finally:
        for m, t in modes:
            m.training = t
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
        for p, f, g in zip(params, flags, grads):
            p.requires_grad_(f)
            p.grad = g


def set_requires_grad(model: nn.Module, params: Sequence[torch.Tensor]) -> None:
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def check_finite(t: torch.Tensor, name: str, what: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        raise HessianError(f"block {name!r}: the {what} is not finite (NaN or inf); the Hessian is not defined "
                           "there (check the weights and data)")
    return t


def probe_layers(model, x, blocks: list[Block]):
    """One forward of ``x`` with hooks on every block's layers: per block, how often each of its layers
    ran and the per-sample input/output shapes of its first layer; the order the blocks first ran in;
    and the output. A block whose layer never runs has no Hessian: :class:`HessianError`."""
    calls, shapes, order, handles, seen = {}, {}, [], [], {}

    def hook_for(i, first):
        def hook(mod, inp, out):
            calls[i] = calls.get(i, 0) + (1 if first else 0)
            if first and i not in shapes and torch.is_tensor(out) and inp and torch.is_tensor(inp[0]):
                shapes[i] = (tuple(inp[0].shape[1:]), tuple(out.shape[1:]))
                order.append(i)
            seen.setdefault(i, set()).add(id(mod))
        return hook

    for i, b in enumerate(blocks):
        for j, m in enumerate(b.modules):
            handles.append(m.register_forward_hook(hook_for(i, j == 0)))
    try:
        with torch.no_grad():
            z = model(x)
    finally:
        for h in handles:
            h.remove()
    for i, b in enumerate(blocks):
        ran = seen.get(i, set())
        idle = [n for n, m in zip(b.module_names, b.modules) if id(m) not in ran]
        if idle:
            raise HessianError(f"block {b.name!r}: layer {idle[0]!r} never runs in the model's forward, so the loss "
                               "does not depend on its weights and its Hessian block is not defined; leave it out "
                               "of `blocks`")
    return calls, shapes, order, z


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(a.double().norm())
    num = float((a.double() - b.double()).norm())
    return 0.0 if num == 0 else (num / den if den > 0 else float("inf"))


def check_operator(model, x) -> None:
    """The loss must be a fixed function of the weights: the same forward twice gives the same output
    (no active dropout or other sampling), and a sample's output does not depend on the other samples
    of its batch (no batch statistics), else the Hessian would depend on chance or on ``chunk_size``.
    Rounding differences (another summation order for another batch size) are allowed: our tolerance
    is 1000 units of rounding of the model's dtype, relative to the output."""
    tol = 1000 * torch.finfo(x.dtype if x.is_floating_point() else torch.float32).eps
    with torch.no_grad():
        a, b = model(x), model(x)
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            return
        if not torch.isfinite(a).all():
            raise HessianError("the model's output is not finite (NaN or inf) on the data: the Hessian is not "
                               "defined there (check the weights and data)")
        d = _rel_diff(a, b)
        if not d <= tol:
            raise HessianError(
                f"the model's output changes between two identical forward passes in eval mode (relative "
                f"difference {d:.1e}): a stochastic layer is active (e.g. F.dropout(..., training=True) or noise "
                "in forward), so the loss and its Hessian are random; make the forward deterministic in eval mode")
        if len(x) >= 2:
            h = len(x) // 2
            parts = torch.cat([model(x[:h]), model(x[h:])])
            d = _rel_diff(a, parts)
            if not d <= tol:
                raise HessianError(
                    f"a sample's output depends on the other samples of its batch (relative difference {d:.1e} "
                    "between one batch and its two halves): batch-statistics normalization (BatchNorm with "
                    "track_running_stats=False, or batch statistics in forward) makes the Hessian depend on "
                    "chunk_size; use running statistics (BatchNorm with track_running_stats=True, in eval mode) "
                    "or a per-sample normalization (LayerNorm, GroupNorm)")
