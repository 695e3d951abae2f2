"""The paper's networks (section 4): ResNet20 for CIFAR-10; ResNet50, Inception-V3, SqueezeNext for ImageNet."""
from .resnet_cifar import BasicBlock, ResNetCifar, resnet20

__all__ = ["BasicBlock", "ResNetCifar", "resnet20"]
