"""ResNet50 and Inception-V3 for ImageNet (paper section 4, the ImageNet table), from torchvision.

Both are torchvision's own definitions, built here with random weights and an explicit
initialisation (no warnings); pretrained ImageNet weights are loaded by
:func:`hawqlib.models.get` from a local file or torch's hub cache, never downloaded here.

Inception-V3's auxiliary classifier (our choice): off by default (``aux_logits=False``). HAWQ
quantizes and evaluates the inference network, whose output is the main classifier's; the
auxiliary head (3.3 M parameters) only adds a training loss, would be counted in the model size
if kept, and makes the training-mode forward return a tuple that a plain cross-entropy loop
cannot use. Pass ``aux_logits=True`` to keep it (torchvision's training recipe); torchvision's
pretrained file holds the head's weights, which are dropped when the model has none.

Input transform (torchvision's convention, kept): the released Inception-V3 weights expect inputs
scaled to [-1, 1]; torchvision folds that rescaling into the model (``transform_input=True``)
so the usual ImageNet mean/std normalisation can be fed. :func:`hawqlib.models.get` sets it when it
loads those weights; a randomly initialised model defaults to ``transform_input=False``.

Baselines, for the record: torchvision's ResNet50 ``IMAGENET1K_V1`` weights report 76.13% top-1
and its Inception-V3 weights 77.29%, while the HAWQ paper's FP32 baselines are 77.39% and 77.45%:
the paper used other weights (not named), so the FP32 starting points differ by up to 1.3 points.
"""
from __future__ import annotations

from torchvision import models as tvm

__all__ = ["resnet50", "inception_v3", "TORCHVISION_WEIGHTS"]

#: Pretrained weights torchvision publishes for each model: name -> (weights enum, default member).
#: ``weights="pretrained"`` picks the default member (our choice: ResNet50's ``IMAGENET1K_V1``, the
#: classic recipe of the paper's time; ``IMAGENET1K_V2`` is a 2021 recipe at 80.9% top-1).
TORCHVISION_WEIGHTS = {
    "resnet50": (tvm.ResNet50_Weights, "IMAGENET1K_V1"),
    "inception_v3": (tvm.Inception_V3_Weights, "IMAGENET1K_V1"),
}


def resnet50(num_classes: int = 1000) -> tvm.ResNet:
    """torchvision's ResNet50 (He et al., 2016): 25,557,032 parameters at 1000 classes, random init.

    Residual blocks are torchvision ``Bottleneck`` modules (``layer1.0`` .. ``layer4.2``, 16 in
    all), whose projection shortcut is their ``downsample`` attribute.
    """
    _check_classes(num_classes)
    return tvm.resnet50(weights=None, num_classes=num_classes)


def inception_v3(num_classes: int = 1000, *, aux_logits: bool = False, transform_input: bool = False,
                 dropout: float = 0.5) -> tvm.Inception3:
    """torchvision's Inception-V3 (Szegedy et al., 2016), random init (truncated normal, explicit).

    23,834,568 parameters at 1000 classes without the auxiliary classifier (27,161,264 with it).
    Expects 299x299 inputs (at least 75x75). ``aux_logits`` and ``transform_input``: see the
    module docstring. The model contains dropout (p=``dropout``) before its classifier.
    """
    _check_classes(num_classes)
    return tvm.inception_v3(weights=None, num_classes=num_classes, aux_logits=bool(aux_logits),
                            transform_input=bool(transform_input), init_weights=True, dropout=dropout)


def _check_classes(num_classes) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
