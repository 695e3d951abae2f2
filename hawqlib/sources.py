"""Data sources: the data a pipeline step reads, behind one interface (CIFAR-10, or any ImageFolder tree).

The steps of :mod:`hawqlib.pipeline` (the FP32 baseline, the Hessian spectrum of section 3.1, the staged
fine-tuning of section 3.2) need three things of their data: a key that names it in their artifacts,
seeded train and test loaders, and a seeded un-augmented sample for the Hessian. A :class:`DataSource`
gives them:

- :class:`CIFAR10Source`: CIFAR-10 as :mod:`hawqlib.data` reads it (the ResNet20 experiments). Its key is
  the two splits' content digests, exactly what the baseline artifacts have always recorded.
- :class:`ImageFolderSource`: a tree ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (ImageNet's
  layout, or any data set written that way), with the model's ImageNet transforms (random resized crop and
  flip for training; resize and centre crop for evaluation). Its key is a digest of the tree's listing
  (every file's class, name and size): our choice, as reading the content of ImageNet's 1.3 million files
  for a key would take longer than a training epoch; an image edited in place to the same size is not seen.

:func:`for_model` picks the source a model expects: the CIFAR-10 models (10 classes in
:mod:`hawqlib.models`) read CIFAR-10, the ImageNet ones (1000 classes) an ImageFolder tree.

ImageFolder loaders are deterministic and rank-aware (:class:`ImageFolderLoader`): the permutation of epoch
``e`` is seeded by ``(seed, e)`` and every image's random crop and flip by ``(seed, e, index)``, so an epoch
replays exactly after a resume, and under ``torchrun`` each rank decodes only its own slice of every
global batch (:class:`hawqlib.distributed.Shard` asks for it), the same images and crops a single process
would use.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from . import data as hdata

__all__ = ["DataSource", "CIFAR10Source", "ImageFolderSource", "ImageFolderLoader", "for_model", "resolve"]


class DataSource:
    """What a pipeline step reads: a key, seeded loaders, a Hessian sample. Subclasses define all four."""

    #: A short name for messages and manifests.
    name = "data"

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def key(self) -> dict:
        """A JSON-able digest of the data, part of every artifact key built on it."""
        raise NotImplementedError

    def loaders(self, *, batch_size: int, seed: int, train_subset: int | None = None,
                test_subset: int | None = None):
        """``(train, test)``: the training loader (shuffled and augmented, seeded by ``seed`` and the epoch
        set with ``set_epoch``) and the evaluation loader; subsets take a seeded sample of each split."""
        raise NotImplementedError

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded sample of ``n`` un-augmented training inputs and their labels (the Hessian's data)."""
        raise NotImplementedError


class CIFAR10Source(DataSource):
    """CIFAR-10 at ``root`` (``None``: :func:`hawqlib.data.find_cifar10`'s search, ``HAWQ_DATA`` first)."""

    name = "cifar10"

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = root

    def __repr__(self) -> str:
        return f"CIFAR10Source({self.root!r})"

    @property
    def num_classes(self) -> int:
        return len(hdata.CIFAR10_CLASSES)

    def key(self) -> dict:
        return {"train": hdata.cifar10("train", self.root).digest, "test": hdata.cifar10("test", self.root).digest}

    def loaders(self, *, batch_size, seed, train_subset=None, test_subset=None):
        return hdata.cifar10_loaders(self.root, batch_size=batch_size, seed=seed, train_subset=train_subset,
                                     test_subset=test_subset)

    def sample(self, n, seed):
        return hdata.sample_batch(hdata.cifar10("train", self.root), n, seed)


def _split_dir(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise hdata.DataNotFoundError(
            f"no {split!r} split at {folder}: an ImageFolder source needs {root}/train/<class>/<image> and "
            f"{root}/val/<class>/<image> (ImageNet's layout); ImageNet cannot be downloaded automatically")
    return folder


class ImageFolderSource(DataSource):
    """An ImageFolder tree with ``train/`` and ``val/`` splits, read with ``model``'s ImageNet transforms.

    ``image_size``: the crop's side in pixels (default: the model's, 224 or 299 for Inception-V3; the
    evaluation resize keeps ImageNet's 256/224 ratio). ``workers``: decoding processes per loader (0 decodes
    in the training process). ``eval_batch_size``: the evaluation loader's batch.
    """

    name = "imagefolder"

    def __init__(self, root: str | os.PathLike, model: str = "resnet50", *, image_size: int | None = None,
                 workers: int = 0, eval_batch_size: int = 100):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise hdata.DataNotFoundError(f"no ImageFolder tree at {self.root}: expected {self.root}/train/<class>/"
                                          f"<image> and {self.root}/val/<class>/<image>")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
            raise ValueError(f"image_size must be a whole number of pixels >= 8, got {image_size!r}")
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be a whole number >= 0, got {workers!r}")
        self.model, self.image_size, self.workers = model, image_size, workers
        self.eval_batch_size = eval_batch_size
        self._splits: dict = {}
        self._key: dict | None = None

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.root)!r}, model={self.model!r}, image_size={self.image_size!r})"

    def split(self, name: str):
        """The torchvision ``ImageFolder`` of split ``name`` (``"train"`` or ``"val"``), without transforms."""
        if name not in self._splits:
            from torchvision.datasets import ImageFolder

            folder = _split_dir(self.root, name)
            try:
                ds = ImageFolder(str(folder))
            except FileNotFoundError as exc:  # torchvision's message for an empty tree or class folder
                raise hdata.DataNotFoundError(f"{folder}: {exc}") from None
            self._splits[name] = ds
        return self._splits[name]

    @property
    def num_classes(self) -> int:
        return len(self.split("train").classes)

    def _transforms(self, train: bool):
        return hdata.imagenet_transforms(self.model, train=train, image_size=self.image_size)

    def key(self) -> dict:
        """The listing digests, computed once per source (a stat of every file; ImageNet has 1.3 million)."""
        if self._key is None:
            self._key = self._listing_key()
        return self._key

    def _listing_key(self) -> dict:
        tr, va = self.split("train"), self.split("val")
        if tr.classes != va.classes:
            raise ValueError(f"{self.root}: train/ and val/ hold different classes ({len(tr.classes)} and "
                             f"{len(va.classes)}); both splits need the same class folders")
        return {"imagefolder": {"train": _listing_digest(tr), "val": _listing_digest(va),
                                "classes": len(tr.classes)},
                "transform": {"model": self.model, "image_size": self.image_size}}

    def loaders(self, *, batch_size, seed, train_subset=None, test_subset=None):
        tr = ImageFolderLoader(self.split("train"), self._transforms(True), batch_size, shuffle=True, seed=seed,
                               subset=train_subset, workers=self.workers)
        te = ImageFolderLoader(self.split("val"), self._transforms(False), self.eval_batch_size, seed=seed,
                               subset=test_subset, workers=self.workers)
        return tr, te

    def sample(self, n, seed):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        loader = ImageFolderLoader(self.split("train"), self._transforms(False), n, seed=seed, subset=n)
        return next(iter(loader))


def _listing_digest(ds) -> str:
    """SHA-256 of an ImageFolder's listing: each file's class, path under its split and size, in order."""
    h = hashlib.sha256()
    base = Path(ds.root)
    for path, label in ds.samples:
        p = Path(path)
        h.update(f"{label}\t{p.relative_to(base).as_posix()}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()


class _Items(torch.utils.data.Dataset):
    """Images by ``(index, epoch)``: each random transform drawn from a generator seeded by (seed, epoch, index)."""

    def __init__(self, ds, transform, seed: int):
        self.ds, self.transform, self.seed = ds, transform, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, item):
        index, epoch = item
        path, label = self.ds.samples[index]
        img = self.ds.loader(path)
        with torch.random.fork_rng(devices=[]):  # torchvision's random transforms draw from the global generator
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            x = self.transform(img)
        return x, label


class ImageFolderLoader:
    """Batches of an ImageFolder split: seeded per-epoch permutation and per-image augmentation, rank-aware.

    Like :class:`hawqlib.data.TensorLoader`, epoch ``e`` (:meth:`set_epoch`) is a pure function of
    ``(seed, e)``; :meth:`iter_shard` yields one rank's contiguous slice of every global batch, decoding
    only those images. ``subset``: a seeded sample of that many images (the profile's ``train_subset``).
    """

    def __init__(self, ds, transform, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 subset: int | None = None, workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.items = _Items(ds, transform, seed)
        self.batch_size, self.shuffle, self.seed, self.workers = batch_size, shuffle, seed, workers
        n = len(ds)
        if subset is not None and subset < 1:
            raise ValueError(f"subset size must be >= 1, got {subset}")
        self.indices = (torch.arange(n) if subset is None or subset >= n else
                        torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:subset].sort().values)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration replays."""
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def _batches(self) -> list[torch.Tensor]:
        idx = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = idx[torch.randperm(len(idx), generator=g)]
        return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    def iter_shard(self, rank: int, world: int):
        """``(x, y, global_n)`` for rank ``rank`` of ``world``: its slice ``[rank*n//world, (rank+1)*n//world)``
        of every global batch of ``n`` images, in the one-process order."""
        batches = self._batches()
        for b in batches:
            if len(b) < world:
                raise ValueError(f"a global batch of {len(b)} images cannot be split over {world} ranks; use a "
                                 "larger batch size or a subset that leaves no small last batch")
        slices = [[(int(i), self.epoch) for i in b[rank * len(b) // world:(rank + 1) * len(b) // world]]
                  for b in batches]
        loader = torch.utils.data.DataLoader(self.items, batch_sampler=slices, num_workers=self.workers)
        for (x, y), b in zip(loader, batches):
            yield x, y, len(b)

    def __iter__(self):
        for x, y, _ in self.iter_shard(0, 1):
            yield x, y


def for_model(model: str, data=None, **kwargs) -> DataSource:
    """The data source ``model`` (a name in :mod:`hawqlib.models`) trains on, rooted at ``data``.

    ``data`` may already be a :class:`DataSource` (returned as is). A model with 10 classes reads CIFAR-10
    (``data``: its root or ``None``); one with 1000 an ImageFolder tree (``data`` required; ``kwargs`` go to
    :class:`ImageFolderSource`); a name outside :func:`hawqlib.models.names` reads CIFAR-10 unless ``data`` is
    a source.
    """
    if isinstance(data, DataSource):
        return data
    from .models import registry

    if model not in registry.names():  # a model of the caller's own: the pipeline's default data, CIFAR-10
        return resolve(data)
    classes = registry.default_classes(model)
    if classes == 10:
        if kwargs:
            raise ValueError(f"options {sorted(kwargs)} apply to ImageFolder data, not to {model}'s CIFAR-10")
        return CIFAR10Source(data)
    if data is None:
        raise ValueError(f"{model} is an ImageNet model: pass the root of an ImageFolder tree (train/ and val/, "
                         "one folder per class) as its data")
    return ImageFolderSource(data, model, **kwargs)


def resolve(data) -> DataSource:
    """``data`` as a source: a :class:`DataSource` as is; a root or ``None`` as CIFAR-10 (the pipeline's default)."""
    return data if isinstance(data, DataSource) else CIFAR10Source(data)
