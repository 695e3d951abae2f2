"""ImageNet inputs, in one place: ImageFolder data, its transforms and loaders, a seeded sample, a model's key.

The paper's ImageNet rows (section 4) read ImageNet, which cannot be downloaded: the user passes an
ImageFolder tree ``<root>/train/<class>/*`` and ``<root>/val/<class>/*`` (ImageNet's layout, or any data set
written that way). This module holds everything about such inputs:

- :func:`imagenet_transforms`: torchvision's ImageNet transforms (random resized crop and flip for training;
  resize and centre crop for evaluation; 299 pixels for Inception-V3);
- :class:`ImageFolderSource`: the tree as a :class:`hawqlib.repro.data.DataSource` (a key, seeded and
  rank-aware loaders, a Hessian sample). Its key is a digest of the tree's listing (every file's class, name
  and size): our choice, as reading the content of ImageNet's 1.3 million files for a key would take longer
  than a training epoch; an image edited in place to the same size is not seen. Its loaders
  (:class:`ImageFolderLoader`) are deterministic: the permutation of epoch ``e`` is seeded by ``(seed, e)``
  and every image's random crop and flip by ``(seed, e, index)``, so an epoch replays exactly after a resume,
  and under ``torchrun`` each rank decodes only its own slice of every global batch
  (:class:`hawqlib.distributed.Shard` asks for it);
- :func:`imagenet_batch` and :func:`imagenet_model`: the ImageNet notebook's small seeded sample (of the
  validation split, or synthetic images on machines without ImageNet: our choice, they exercise the pipeline
  but say nothing about accuracy) and a model with the key of its weights.

The model definitions themselves are the method's (:mod:`hawqlib.models`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .. import models as hmodels
from . import data as hdata
from .data import IMAGENET_MEAN, IMAGENET_STD, DataSource

__all__ = ["imagenet_transforms", "ImageFolderSource", "ImageFolderLoader", "imagenet_model", "imagenet_batch"]


_IMAGENET_SIZES = {"inception_v3": (342, 299)}


def imagenet_transforms(model_name: str = "resnet50", train: bool = False, image_size: int | None = None):
    """torchvision transforms for ImageNet: 256/224 crops, or 342/299 for Inception-V3.

    ``image_size`` replaces the crop's side (the evaluation resize keeps the 256/224 ratio); the training
    transform is a random resized crop and a horizontal flip.
    """
    from torchvision import transforms as T

    resize, crop = _IMAGENET_SIZES.get(model_name, (256, 224))
    if image_size is not None:
        resize, crop = round(image_size * 256 / 224), image_size
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), *norm])


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
        return imagenet_transforms(self.model, train=train, image_size=self.image_size)

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

    Like :class:`hawqlib.repro.data.TensorLoader`, epoch ``e`` (:meth:`set_epoch`) is a pure function of
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


def imagenet_model(name: str, weights=None, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """An ImageNet model of the paper (:func:`hawqlib.models.get`) in eval mode, and the key of its weights.

    ``weights=None`` gives a seeded random initialisation (``torch.manual_seed(seed)`` first), keyed
    ``"<name>-random-<seed>"``; ``"pretrained"`` or a path loads those weights (an error when absent,
    never a silent random model), keyed by the weights file's name and size.
    """
    if weights is None:
        torch.manual_seed(seed)
        net = hmodels.get(name)
        key = f"{name}-random-{seed}"
    else:
        net = hmodels.get(name, weights=weights)
        path = Path(hmodels.find_pretrained(name) if weights == "pretrained" else weights)
        key = f"{name}-{path.name}-{path.stat().st_size}" if path.exists() else f"{name}-{weights}"
    return net.eval(), key


def imagenet_batch(model_name: str, n_samples: int, seed: int = 0, *, root=None,
                   image_size: int | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """``((inputs, targets), data_key)``: ``n_samples`` ImageNet validation images, or synthetic ones.

    With ``root`` (an ImageFolder tree with ``val/``): a seeded sample of the validation split with the
    model's eval transforms (:func:`imagenet_transforms`). Without: seeded standard-normal
    images of ``image_size`` x ``image_size`` pixels and uniform random labels in 0..999, which exercise
    the pipeline but say nothing about accuracy (our choice for machines without ImageNet).
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    g = torch.Generator().manual_seed(seed)
    if root is None:
        if not image_size:
            raise ValueError("synthetic ImageNet inputs need image_size= (pixels per side)")
        x = torch.randn(n_samples, 3, image_size, image_size, generator=g)
        y = torch.randint(0, 1000, (n_samples,), generator=g)
        return (x, y), {"synthetic": n_samples, "size": image_size, "seed": seed}
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(Path(root).expanduser() / "val"), transform=imagenet_transforms(model_name))
    if len(ds) == 0:
        raise ValueError(f"no images under {root}/val")
    idx = torch.randperm(len(ds), generator=g)[:n_samples].sort().values.tolist()
    xs, ys = zip(*(ds[i] for i in idx))
    return (torch.stack(xs), torch.tensor(ys)), {"imagenet_val": n_samples, "seed": seed, "root": str(root),
                                                 "files": len(ds), "model_transform": model_name}
