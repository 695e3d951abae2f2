"""The paper's networks (section 4): ResNet20 for CIFAR-10; ResNet50, Inception-V3, SqueezeNext for ImageNet;
and one that is ours, not the paper's: ``vit_cifar``, a small vision transformer for CIFAR-10
(:mod:`~hawqlib.models.vit`), the network of the book's "HAWQ on your own network" chapter.

``get(name, num_classes=..., weights=...)`` (:mod:`hawqlib.models.registry`) builds any of them by
name, with random, published or locally trained weights. ``resnet50`` and ``inception_v3`` are
torchvision's (:mod:`hawqlib.models.imagenet`, imported on first use: torchvision takes a second
to import); ``resnet20`` (:mod:`~hawqlib.models.resnet_cifar`), ``squeezenext``
(:mod:`~hawqlib.models.squeezenext`) and ``vit_cifar`` are written here.
"""
from .registry import (WeightsError, WeightsNotFoundError, default_classes, find_pretrained, get,
                       load_state_dict_checked, load_weights_file, names, pretrained_dirs)
from .resnet_cifar import BasicBlock, ResNetCifar, resnet20
from .squeezenext import (SQUEEZENEXT_DEPTHS, SQUEEZENEXT_VARIANTS, SqueezeNext, SqueezeNextBlock,
                          load_pytorchcv_state_dict, squeezenext)
from .vit import VisionTransformer, vit_cifar

__all__ = ["BasicBlock", "ResNetCifar", "resnet20", "SqueezeNext", "SqueezeNextBlock", "squeezenext",
           "SQUEEZENEXT_DEPTHS", "SQUEEZENEXT_VARIANTS", "load_pytorchcv_state_dict", "VisionTransformer",
           "vit_cifar", "resnet50", "inception_v3",
           "get", "names", "default_classes", "WeightsError", "WeightsNotFoundError", "find_pretrained",
           "pretrained_dirs",
           "load_weights_file", "load_state_dict_checked"]

_LAZY = ("resnet50", "inception_v3", "TORCHVISION_WEIGHTS")


def __getattr__(name: str):
    """Import the torchvision models on first use (``hawqlib.models.resnet50`` and friends)."""
    if name in _LAZY:
        from . import imagenet

        return getattr(imagenet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
