"""Training throughput: ``hawqlib.train.train`` against a plain PyTorch loop written the obvious way.

What is measured: images per second of ResNet20 training (forward, cross-entropy, backward, SGD
with Nesterov momentum 0.9, weight decay 5e-4, lr 0.1) over a fixed epoch of ``--steps`` batches
of ``--batch`` CIFAR-10 training images (default 40 x 128 = 5,120 images), wall clock from the
start of the epoch to its end, data loading and augmentation (random crop with 4-pixel padding,
random horizontal flip, normalization) included. Every variant starts from the same initial
weights:

- ``hawqlib``: :func:`hawqlib.train.train` on a :class:`hawqlib.repro.data.TensorLoader` (batches cut
  from in-memory uint8 tensors, augmentation done per batch, channels_last), one epoch, no
  checkpoint, no progress bar;
- ``hawqlib NCHW``: the same with ``channels_last=False`` (and NCHW batches), to tell the
  memory-format gain from the data-pipeline gain;
- ``plain``: a torchvision-style ``Dataset`` (in-memory HWC uint8 array, one PIL image per item,
  like ``torchvision.datasets.CIFAR10``) with ``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize(mean, std)``, a ``DataLoader`` with
  ``shuffle=True`` and the default ``num_workers=0``, the default memory format, and the usual
  loop (``zero_grad``, ``backward``, ``step``, ``loss.item()`` and an accuracy count per step);
- ``plain 2 workers``: the same with ``num_workers=2`` (one per core of the 2-core machine).

A data-only pass (the loader alone, no model) is timed too, to show whether loading bounds the step.
Two clocks: wall time, and CPU time (user + system) of the process and of its finished children
(the DataLoader workers, reaped at the end of each epoch). On a shared CPU the CPU time is the
steadier measure of the work each variant does; the wall time is what a user waits.

The CPU may be shared with other work, so variants are interleaved: each repetition runs one
epoch of every variant in turn (order rotated per repetition); the figures are medians over
repetitions, and the ratios are medians of per-repetition ratios, so a slow-down from other load
hits all variants of a repetition alike. A short warm-up epoch of each variant is discarded.

Run: ``python benchmarks/train_speed.py [--reps 3 --steps 40 --batch 128 --threads N --out F.json]``.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import torch
from torch import nn

from hawqlib.repro.data import CIFAR10_MEAN, CIFAR10_STD, TensorLoader, cifar10
from hawqlib.models import resnet20
from hawqlib.train import train

OPT = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


class CifarLikeDataset(torch.utils.data.Dataset):
    """The obvious Dataset: HWC uint8 images in memory, a PIL image per item, torchvision transforms."""

    def __init__(self, images_nchw: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def plain_loader(images, labels, batch: int, workers: int):
    """DataLoader over :class:`CifarLikeDataset` with the standard CIFAR training transforms."""
    from torchvision import transforms as T

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    return torch.utils.data.DataLoader(CifarLikeDataset(images, labels, tf), batch_size=batch, shuffle=True,
                                       num_workers=workers)


def plain_epoch(model: nn.Module, loader) -> None:
    """One epoch of the obvious loop."""
    opt = torch.optim.SGD(model.parameters(), **OPT)
    crit = nn.CrossEntropyLoss()
    model.train()
    running, correct, seen = 0.0, 0, 0
    for x, y in loader:
        out = model(x)
        loss = crit(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        running += loss.item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)


def hawq_epoch(model: nn.Module, loader, channels_last: bool) -> None:
    """One epoch through :func:`hawqlib.train.train`."""
    train(model, loader, epochs=1, schedule="constant", progress=False, channels_last=channels_last, **OPT)


def data_only(loader) -> None:
    """One pass over ``loader`` alone."""
    for _ in loader:
        pass


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (DataLoader workers), user + system."""
    own = time.process_time()
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own + ch.ru_utime + ch.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``."""
    w0, c0 = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - w0, _cpu() - c0


def main(argv=None) -> dict:
    """Run the interleaved comparison and print images/s and ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--data", default=None, help="CIFAR-10 root (default: HAWQ_DATA, then data/)")
    p.add_argument("--out", default=None, help="also write the results as JSON here (atomically)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.steps * args.batch
    split = cifar10("train", args.data)
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:n]
    images, labels = split.images[idx], split.labels[idx]
    torch.manual_seed(0)
    init = resnet20().state_dict()

    def fresh():
        m = resnet20()
        m.load_state_dict(init)
        return m

    def tl(cl):
        return TensorLoader(images, labels, args.batch, shuffle=True, augment=True, seed=0, channels_last=cl)

    variants = {
        "hawqlib": lambda: hawq_epoch(fresh(), tl(True), True),
        "hawqlib NCHW": lambda: hawq_epoch(fresh(), tl(False), False),
        "plain": lambda: plain_epoch(fresh(), plain_loader(images, labels, args.batch, 0)),
        "plain 2 workers": lambda: plain_epoch(fresh(), plain_loader(images, labels, args.batch, 2)),
    }
    data_variants = {
        "TensorLoader": lambda: data_only(tl(True)),
        "DataLoader": lambda: data_only(plain_loader(images, labels, args.batch, 0)),
    }
    print(f"ResNet20, {args.steps} steps x batch {args.batch} = {n} images per epoch, torch threads "
          f"{torch.get_num_threads()}, {args.reps} interleaved repetitions (+ warm-up)")
    # warm-up: a few steps of each variant (allocator, kernels, worker start-up paths)
    small_images, small_labels = images[: 4 * args.batch], labels[: 4 * args.batch]
    hawq_epoch(fresh(), TensorLoader(small_images, small_labels, args.batch, augment=True), True)
    hawq_epoch(fresh(), TensorLoader(small_images, small_labels, args.batch, augment=True, channels_last=False), False)
    plain_epoch(fresh(), plain_loader(small_images, small_labels, args.batch, 0))

    names = list(variants) + list(data_variants)
    clocks = ("wall", "cpu")
    times: dict[str, dict[str, list[float]]] = {c: {k: [] for k in names} for c in clocks}
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            wall, cpu = timed(variants.get(k) or data_variants[k])
            times["wall"][k].append(wall)
            times["cpu"][k].append(cpu)
        print(f"  rep {r + 1}: " + ", ".join(f"{k} {n / times['wall'][k][-1]:.0f} img/s "
                                            f"({n / times['cpu'][k][-1]:.0f} per CPU s)" for k in names),
              flush=True)

    ips = {c: {k: statistics.median(n / t for t in times[c][k]) for k in names} for c in clocks}
    ratio = {}
    for c in clocks:
        t = times[c]
        ratio[c] = {f"hawqlib / {k}": statistics.median(t[k][i] / t["hawqlib"][i] for i in range(args.reps))
                    for k in ("plain", "plain 2 workers", "hawqlib NCHW")}
        ratio[c]["TensorLoader / DataLoader (data only)"] = statistics.median(
            t["DataLoader"][i] / t["TensorLoader"][i] for i in range(args.reps))
    print("\nmedian images per second of wall time | per CPU second (this process and its loader workers):")
    print("  training epoch, data included:")
    for k in variants:
        print(f"    {k:<16} {ips['wall'][k]:9.1f} | {ips['cpu'][k]:9.1f}")
    print("  data loading alone:")
    for k in data_variants:
        print(f"    {k:<16} {ips['wall'][k]:9.1f} | {ips['cpu'][k]:9.1f}")
    print("speed ratios, median of per-repetition ratios (> 1: the first is faster), wall | CPU:")
    for k in ratio["wall"]:
        print(f"  {k:<40} {ratio['wall'][k]:6.2f}x | {ratio['cpu'][k]:6.2f}x")
    result = {"model": "resnet20", "steps": args.steps, "batch": args.batch, "threads": torch.get_num_threads(),
              "reps": args.reps, "images_per_s": ips, "ratios": ratio, "times_s": times,
              "torch": torch.__version__, "numpy": np.__version__}
    if args.out:
        from hawqlib.files import atomic_write_json

        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
