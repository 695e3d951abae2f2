"""ImageNet inputs for the paper's ImageNet models (section 4): a model with the key of its weights, and a batch.

The ImageNet notebook computes each model's spectrum and allocation on a small sample: a seeded sample of the
validation split when an ImageNet folder is given, else seeded synthetic images (our choice for machines
without ImageNet: they exercise the pipeline but say nothing about accuracy). Each comes with a JSON-able
key naming it, for the artifacts of :mod:`hawqlib.pipeline`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import data as hdata
from . import models as hmodels

__all__ = ["imagenet_model", "imagenet_batch"]


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
    model's eval transforms (:func:`hawqlib.data.imagenet_transforms`). Without: seeded standard-normal
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

    ds = ImageFolder(str(Path(root).expanduser() / "val"), transform=hdata.imagenet_transforms(model_name))
    if len(ds) == 0:
        raise ValueError(f"no images under {root}/val")
    idx = torch.randperm(len(ds), generator=g)[:n_samples].sort().values.tolist()
    xs, ys = zip(*(ds[i] for i in idx))
    return (torch.stack(xs), torch.tensor(ys)), {"imagenet_val": n_samples, "seed": seed, "root": str(root),
                                                 "files": len(ds), "model_transform": model_name}
