"""hawqlib.blocks: what a block is at each granularity (paper section 3.1)."""
from __future__ import annotations

import pytest
from torch import nn

from hawqlib.blocks import quant_blocks
from hawqlib.models import resnet20


def test_layer_granularity_resnet20():
    m = resnet20()
    blocks = quant_blocks(m, "layer")
    assert len(blocks) == 20
    assert blocks[0].name == "conv1" and blocks[-1].name == "fc"
    assert [b.name for b in blocks[1:3]] == ["layer1.0.conv1", "layer1.0.conv2"]
    weights = [mod.weight for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert sum(b.numel for b in blocks) == sum(w.numel() for w in weights)
    assert all(len(b.params) == 1 and b.params[0] is b.modules[0].weight for b in blocks)
    assert blocks[0].numel == 16 * 3 * 9 and blocks[-1].numel == 640
    # biases and BatchNorm parameters are not block parameters
    assert sum(p.numel() for p in m.parameters()) - sum(b.numel for b in blocks) == 2 * (16 * 7 + 32 * 6 + 64 * 6) + 10


def test_residual_granularity_resnet20():
    m = resnet20()
    blocks = quant_blocks(m, "residual")
    assert [b.name for b in blocks] == (["conv1"] + [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
                                        + ["fc"])
    assert blocks[1].module_names == ["layer1.0.conv1", "layer1.0.conv2"]
    assert sum(b.numel for b in blocks) == sum(b.numel for b in quant_blocks(m, "layer"))


def test_named_blocks_and_errors():
    m = resnet20()
    blocks = quant_blocks(m, ["layer1", "fc"])
    assert [b.name for b in blocks] == ["layer1", "fc"] and len(blocks[0].modules) == 6
    with pytest.raises(ValueError, match="unknown granularity 'channel'"):
        quant_blocks(m, "channel")
    with pytest.raises(ValueError, match="no module named 'layer9'"):
        quant_blocks(m, ["layer9"])
    with pytest.raises(ValueError, match="holds no Conv2d or Linear"):
        quant_blocks(m, ["layer1.0.bn1"])
    with pytest.raises(ValueError, match="overlaps"):
        quant_blocks(m, ["layer1", "layer1.0.conv1"])
    with pytest.raises(ValueError, match="at least one"):
        quant_blocks(m, [])
