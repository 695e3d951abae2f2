"""Blocks: the units HAWQ measures and assigns bits to (paper section 3.1, "block" B_i).

The paper does not restate what a block is in each network. We offer two granularities:

- ``"layer"`` (our default): each ``Conv2d`` / ``Linear`` weight is one block. For ResNet20
  that is 20 blocks: the stem, 18 residual convolutions and the classifier.
- ``"residual"``: the convolutions of each residual block (any module with a ``shortcut``
  or ``downsample`` attribute, or torchvision's ``Bottleneck``/``BasicBlock``) form one block;
  layers outside residual blocks (stem, classifier) stay blocks of their own. SqueezeNext blocks
  have a ``shortcut``; Inception-V3, which has no residual blocks, gets one block per Inception
  ("Mixed") module (:data:`INCEPTION_MODULES`, our choice).

A user may instead pass a list of module names (each a dotted path to a module whose
Conv2d/Linear descendants form one block).

Only weights are blocks' parameters: biases and BatchNorm stay in full precision
(see :mod:`hawqlib.size` for how they are counted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

__all__ = ["Block", "quant_blocks", "GRANULARITIES", "QUANT_TYPES", "is_residual_block"]

GRANULARITIES = ("layer", "residual")
#: torchvision Inception-V3 modules that count as one block at "residual" granularity (our choice:
#: Inception-V3 has no residual blocks; its repeated multi-branch "Mixed" modules play their part).
INCEPTION_MODULES = ("InceptionA", "InceptionB", "InceptionC", "InceptionD", "InceptionE", "InceptionAux")
#: Module types whose ``weight`` is quantized.
QUANT_TYPES = (nn.Conv2d, nn.Linear)


@dataclass
class Block:
    """One block B_i: its name (dotted module path), its weight-bearing modules and their weights."""

    name: str
    modules: list[nn.Module] = field(repr=False)
    module_names: list[str]

    @property
    def params(self) -> list[torch.Tensor]:
        """The weight tensors W_i of this block (biases excluded)."""
        return [m.weight for m in self.modules]

    @property
    def numel(self) -> int:
        """n_i: the number of weights in the block."""
        return sum(p.numel() for p in self.params)


def is_residual_block(module: nn.Module) -> bool:
    """True for a residual block: a module with a ``shortcut``/``downsample``, a torchvision ResNet block,
    or an Inception-V3 module (:data:`INCEPTION_MODULES`)."""
    if hasattr(module, "shortcut") or hasattr(module, "downsample"):
        return True
    return type(module).__name__ in ("BasicBlock", "Bottleneck") + INCEPTION_MODULES


def _quant_modules(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, QUANT_TYPES):
            out.append((name, m))
    return out


def quant_blocks(model: nn.Module, granularity: str | Sequence[str] = "layer") -> list[Block]:
    """The model's blocks, in module order, at ``granularity`` (``"layer"``, ``"residual"`` or a name list)."""
    if isinstance(granularity, str):
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; valid: {', '.join(GRANULARITIES)} "
                             "or a list of module names")
        if granularity == "layer":
            return [Block(n, [m], [n]) for n, m in _quant_modules(model, "")]
        blocks, claimed = [], set()
        for name, m in model.named_modules():
            if any(name.startswith(c + ".") for c in claimed):
                continue
            if name and is_residual_block(m):
                members = _quant_modules(m, name)
                if members:
                    blocks.append(Block(name, [mm for _, mm in members], [n for n, _ in members]))
                    claimed.add(name)
            elif isinstance(m, QUANT_TYPES):
                blocks.append(Block(name, [m], [name]))
        return blocks
    names = list(granularity)
    if not names:
        raise ValueError("an explicit block list must name at least one module")
    modules = dict(model.named_modules())
    blocks, seen = [], set()
    for name in names:
        if name not in modules:
            near = [n for n in modules if n and (name in n or n in name)][:5]
            raise ValueError(f"no module named {name!r} in {type(model).__name__}"
                             + (f"; similar names: {near}" if near else ""))
        members = _quant_modules(modules[name], name)
        if not members:
            raise ValueError(f"block {name!r} holds no Conv2d or Linear weight")
        dup = [n for n, _ in members if n in seen]
        if dup:
            raise ValueError(f"block {name!r} overlaps an earlier block at {dup[0]!r}")
        seen.update(n for n, _ in members)
        blocks.append(Block(name, [m for _, m in members], [n for n, _ in members]))
    return blocks
