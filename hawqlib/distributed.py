"""Training, fine-tuning and the Hessian on many processes, with ``torch.distributed`` (one process per device).

Launch any script that calls :func:`setup` with ``torchrun``; torchrun sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``, :func:`setup` joins the process group (backend ``nccl`` when CUDA is available, each rank
on ``cuda:LOCAL_RANK``; ``gloo`` on the CPU otherwise: the same code either way). Once a group of more
than one process is initialised, :func:`hawqlib.train.train` (and so :func:`hawqlib.finetune.staged_finetune`)
and :func:`hawqlib.hessian.top_eigenvalues` distribute their work by themselves; with one process,
or without ``torchrun``, nothing changes and results are bit-identical to before.

Training (:func:`hawqlib.train.train`, data-parallel with ``DistributedDataParallel``):

- **Data.** Every rank replays the loader's *global* batches, in the one-process order (a seeded
  permutation and augmentation per epoch), and keeps its contiguous slice of each
  (:class:`Shard`): the loader's ``batch_size`` is the global batch, each rank's is
  ``batch_size / world_size``. Our choice: replaying the global batch costs each rank the indexing and
  augmentation of the whole batch (not its forward or backward), and buys the one-process order and
  augmentation draws exactly. Each rank's loss is scaled by its share of the global batch, so that DDP's
  average of the gradients is the gradient of the global batch's mean loss, uneven last batch included.
- **BatchNorm** (our choice): on CUDA, ``torch.nn.SyncBatchNorm`` for the run (:func:`sync_batchnorm`):
  batch statistics over the global batch, as one process computes them, so running statistics are the
  same on every rank; the model gets its own BatchNorm modules back afterwards. PyTorch's
  SyncBatchNorm runs on GPUs only, so on the CPU (gloo) each rank normalizes with the statistics of
  its own slice (as plain DDP does) and rank 0's running statistics are the ones kept: DDP's
  ``forward_sync_buffers=True`` (formerly ``broadcast_buffers``) sends rank 0's buffers to all ranks
  before every forward, and :func:`broadcast_buffers` again at the end of every epoch, before evaluation
  and checkpointing. A model with BatchNorm therefore follows the one-process run exactly only on CUDA.
- **Quantizers** (fine-tuning): activation ranges are buffers. Calibration (before the first stage) runs
  on the same global batches on every rank, and is followed by :func:`broadcast_buffers`. In training
  mode each :class:`~hawqlib.quant.modules.QuantAct` observes its own rank's slice (its range moves with
  that slice within the step); DDP's buffer broadcast before each forward and ours after each epoch
  bring every rank back to rank 0's ranges. So, like BatchNorm on the CPU, the ranges follow rank 0's
  slices, not the global batches of a one-process run (the ``"mse"`` range rule does not split over ranks).
  A learned activation step (:meth:`~hawqlib.quant.modules.QuantAct.set_learn_step`) is a buffer trained
  by gradient: :func:`hawqlib.train.train` averages its gradient over ranks, as DDP does a parameter's.
- **Random draws** in the forward (dropout) come from the same seeded generator on every rank, each
  applying them to its own slice: a model with dropout does not follow the one-process run's draws.
- **Metrics** (loss, accuracy, counts) are summed over ranks (``all_reduce``), so every rank logs the same
  numbers; the epoch record is rank 0's (its wall time). Only rank 0 writes checkpoints and logs; the
  others wait at a :func:`barrier`. On resume rank 0 reads the checkpoint and :func:`broadcast_object`
  sends it to the others, so the nodes need no shared file system.

Tested on the CPU with gloo and 2 ranks (``tests/test_distributed.py``); the CUDA path (NCCL,
SyncBatchNorm) is the same code but has not been run.

The Hessian (paper section 3.1; :mod:`hawqlib.hessian.orchestrate`, step 5): the chunks of the Hessian
sample are split between ranks and every Hessian-vector product is summed over them; autograd route only.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["is_distributed", "rank", "world_size", "local_rank", "is_main", "barrier", "device", "setup",
           "teardown", "all_reduce_sum", "all_reduce_max", "broadcast_object", "on_main", "RankError", "broadcast_buffers",
           "sync_batchnorm", "Shard", "shard", "launched", "on_device", "computing_on"]


def launched() -> bool:
    """True when torchrun (or another launcher) set ``WORLD_SIZE`` to more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True when a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """The rank on this node (``LOCAL_RANK``, 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and without a process group): the process that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    return torch.device(f"cuda:{local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def setup() -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): nccl on CUDA, gloo on the CPU.

    Returns True when this process is now one of several; without torchrun it does nothing and returns
    False. Call :func:`teardown` at the end.
    """
    if not launched():
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return is_distributed()


def teardown() -> None:
    """Leave the process group, if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks, in place (``t`` itself without a process group)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``t`` over ranks, in place."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (any picklable object; ``obj`` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=device() if dist.get_backend() == "nccl" else None)
    return box[0]


class RankError(RuntimeError):
    """Raised on the other ranks when rank 0 failed in :func:`on_main` (rank 0 raises its own error)."""


def on_main(fn, *args):
    """``fn(*args)`` run on rank 0 alone and its result sent to every rank (``fn(*args)`` without a group).

    Whatever rank 0 raises is re-raised there, and every other rank raises :class:`RankError` naming it,
    so no rank is left waiting in a collective for a result that will not come.
    """
    if not is_distributed():
        return fn(*args)
    got, err = None, None
    if is_main():
        try:
            got = fn(*args)
        except Exception as exc:  # every kind: the other ranks must hear of it
            err = exc
    failed = broadcast_object(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    if failed is not None:
        raise RankError(f"rank 0 failed: {failed}")
    return broadcast_object(got)


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics, quantizer ranges and switches) to every rank."""
    if not is_distributed():
        return
    with torch.no_grad():  # a learned quantizer step is a buffer that requires grad (hawqlib.quant.QuantAct)
        _broadcast_buffers(model, src)


def _broadcast_buffers(model: nn.Module, src: int) -> None:
    for b in model.buffers():
        if b.dtype == torch.bool:  # not every backend sends bool tensors
            t = b.to(torch.uint8)
            dist.broadcast(t, src)
            b.copy_(t.bool())
        else:
            dist.broadcast(b, src)


@contextlib.contextmanager
def sync_batchnorm(model: nn.Module):
    """Inside, the model's BatchNorm layers are ``torch.nn.SyncBatchNorm`` when several ranks run on CUDA
    (module docstring); the originals, which share their parameters and buffers, are put back on exit."""
    swapped = []
    if is_distributed() and next(model.parameters()).is_cuda:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                    new = nn.SyncBatchNorm.convert_sync_batchnorm(child)
                    setattr(parent, name, new)
                    swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


class Shard:
    """This rank's contiguous slice of every global batch of ``data``, moved to ``device``.

    ``data``: a re-iterable of ``(x, y)`` batches with ``len`` and, optionally, ``set_epoch``
    (:class:`hawqlib.repro.data.TensorLoader`), whose global batches are read and sliced; a loader with
    ``iter_shard(rank, world)`` (:class:`hawqlib.repro.imagenet.ImageFolderLoader`) reads this rank's slice alone.
    ``global_n`` is the size of the global batch last yielded.
    """

    def __init__(self, data, rank_: int | None = None, world: int | None = None, dev=None):
        self.data = data
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        self.device = device() if dev is None else torch.device(dev)
        self.global_n = 0

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)

    def __iter__(self):
        nb = self.device.type == "cuda"
        if hasattr(self.data, "iter_shard"):  # the loader reads this rank's slice alone (hawqlib.repro.sources)
            for x, y, n in self.data.iter_shard(self.rank, self.world):
                self.global_n = n
                yield x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)
            return
        for x, y in self.data:
            n = len(y)
            if n < self.world:
                raise ValueError(f"a global batch of {n} samples cannot be split over {self.world} ranks; use a "
                                 "larger batch size, or drop_last=True")
            lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
            self.global_n = n
            yield x[lo:hi].to(self.device, non_blocking=nb), y[lo:hi].to(self.device, non_blocking=nb)


def shard(data):
    """``data`` as a :class:`Shard` when a process group is initialised (unchanged otherwise, or if it is one)."""
    if data is None or not is_distributed() or isinstance(data, Shard):
        return data
    return Shard(data)


def on_device(data, dev: torch.device):
    """``data``'s batches on ``dev``: a one-rank :class:`Shard` on CUDA without a process group (under one,
    training and evaluation shard by themselves); ``data`` itself on the CPU."""
    if data is None or is_distributed() or dev.type == "cpu":
        return data
    return Shard(data, 0, 1, dev)


@contextlib.contextmanager
def computing_on(model: nn.Module):
    """``model`` on :func:`device` (the GPU when there is one) for a computation, then back where it was."""
    dev = device()
    first = next(iter(model.parameters()), None)
    home = first.device if first is not None else torch.device("cpu")
    if dev == home:
        yield model
        return
    model.to(dev)
    try:
        yield model
    finally:
        model.to(home)
