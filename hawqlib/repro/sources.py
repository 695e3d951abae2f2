"""Data sources: the data a pipeline step reads, behind one interface (CIFAR-10, or any ImageFolder tree).

The steps of :mod:`hawqlib.repro.pipeline` (the FP32 baseline, the Hessian spectrum of section 3.1, the staged
fine-tuning of section 3.2) need three things of their data: a key that names it in their artifacts,
seeded train and test loaders, and a seeded un-augmented sample for the Hessian. A data source
(:class:`hawqlib.repro.data.DataSource`) gives them:

- :class:`CIFAR10Source`: CIFAR-10 as :mod:`hawqlib.repro.data` reads it (the ResNet20 experiments). Its key is
  the two splits' content digests, exactly what the baseline artifacts have always recorded.
- :class:`hawqlib.repro.imagenet.ImageFolderSource`: a tree ``<root>/train/<class>/*`` and
  ``<root>/val/<class>/*`` (ImageNet's layout, or any data set written that way), with the model's ImageNet
  transforms; it lives with the other ImageNet inputs (:mod:`hawqlib.repro.imagenet`).

:func:`for_model` picks the source a model expects: the CIFAR-10 models (10 classes in
:mod:`hawqlib.models`) read CIFAR-10, the ImageNet ones (1000 classes) an ImageFolder tree.
"""
from __future__ import annotations

import os

from . import data as hdata
from .data import DataSource
from .imagenet import ImageFolderSource

__all__ = ["CIFAR10Source", "for_model", "resolve"]


class CIFAR10Source(DataSource):
    """CIFAR-10 at ``root`` (``None``: :func:`hawqlib.repro.data.find_cifar10`'s search, ``HAWQ_DATA`` first)."""

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


def for_model(model: str, data=None, **kwargs) -> DataSource:
    """The data source ``model`` (a name in :mod:`hawqlib.models`) trains on, rooted at ``data``.

    ``data`` may already be a :class:`DataSource` (returned as is). A model with 10 classes reads CIFAR-10
    (``data``: its root or ``None``); one with 1000 an ImageFolder tree (``data`` required; ``kwargs`` go to
    :class:`hawqlib.repro.imagenet.ImageFolderSource`); a name outside :func:`hawqlib.models.names` reads
    CIFAR-10 unless ``data`` is
    a source.
    """
    if isinstance(data, DataSource):
        return data
    from ..models import registry

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
