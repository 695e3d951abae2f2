r"""What a (quantized) model weighs: the size accounting behind the paper's compression figures (section 4).

The paper reports a "weight size reduction" (13.1x for ResNet20 at 2 MP) and an "activation
compression" (8x at 4-bit activations) without restating what it counts. Our accounting
(**our choice**) counts every number an inference engine must store, at the precision it is
stored in, and :mod:`hawqlib.export` writes exactly these numbers to its packed file:

- each quantized weight tensor (a Conv2d/Linear weight of a block of the BitConfig):
  :math:`\lceil n \, b / 8 \rceil` bytes for :math:`n` weights at :math:`b` bits (its codes bit-packed, per tensor),
  plus **one FP32 scale per output channel** (4 bytes each);
- every other parameter (biases, unquantized weights): 4 bytes per element;
- BatchNorm: **2 FP32 numbers per channel**, its inference form :math:`y = a x + b` with
  :math:`a = \gamma / \sqrt{\sigma^2 + \epsilon}` and :math:`b = \beta - \mu a`: in eval mode the running mean
  :math:`\mu` and variance :math:`\sigma^2` fold into :math:`a` and :math:`b`, so they are not counted separately (nor
  is ``num_batches_tracked``, which inference never reads). For an affine BatchNorm this equals its
  parameter count, so the FP32 size of a model is exactly 4 bytes x its number of parameters
  (ResNet20: 4 x 269,722 = 1,078,888 bytes);
- each activation quantizer (:class:`hawqlib.quant.modules.QuantAct`): its scale (FP32) and zero point
  (int32), 8 bytes;
- other buffers are not counted: the quantized modules' on/off flags and stored config (state for
  fine-tuning, not part of the deployed model; the project's float models have none besides BatchNorm's).

``weight_compression`` is the ratio of weight bits alone (32 / mean weight bits, no scales,
BatchNorm or biases); ``compression_ratio`` is the whole-model ratio under the accounting above.
``activation_compression`` is 32 / activation bits, over the quantized activations (the inputs
of every quantized layer but the first, see :mod:`hawqlib.quant`).
"""
from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .bitconfig import BitConfig, check_bits
from .blocks import QUANT_TYPES, quant_blocks
from .quant import QUANT_MODULES, QuantAct

__all__ = ["model_size_bytes", "fp32_size_bytes", "compression_ratio", "weight_compression",
           "activation_compression", "size_table", "weight_bits_by_module"]

FP32_BYTES = 4
ACT_QPARAM_BYTES = 8   # FP32 scale + int32 zero point


def weight_bits_by_module(model: nn.Module, bit_config: BitConfig | None = None) -> dict[str, int]:
    """Module name -> weight bits for each quantized Conv2d/Linear.

    From ``bit_config`` if given (validated against ``model``), else from the model's own
    QuantConv2d/QuantLinear modules; empty for an FP32 model without a config.
    """
    if bit_config is not None:
        if not isinstance(bit_config, BitConfig):
            raise TypeError(f"bit_config must be a BitConfig or None, got {type(bit_config).__name__}")
        bit_config.validate(model)
        return {n: bit_config.weights[b.name]
                for b in quant_blocks(model, bit_config.granularity) for n in b.module_names}
    return {n: m.weight_bits for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)}


def _n_act_quantizers(model: nn.Module, bit_config: BitConfig | None, bits: dict) -> int:
    acts = sum(1 for m in model.modules() if isinstance(m, QuantAct))
    if acts or any(isinstance(m, QUANT_MODULES) for m in model.modules()):
        return acts
    if bit_config is not None and bit_config.act_bits is not None:
        # quantize_model's rule: every quantized layer's input except the first layer's (the image)
        first = next((n for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)), None)
        return sum(1 for n in bits if n != first)
    return 0


def _accounting(model: nn.Module, bit_config: BitConfig | None):
    """Rows (module/parameter name, kind, numel, bits, bytes) of everything counted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    bits = weight_bits_by_module(model, bit_config)
    rows, counted = [], set()
    for name, m in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(m, _BatchNorm):
            rows.append((name, "batchnorm", 2 * m.num_features, 32, FP32_BYTES * 2 * m.num_features))
            counted.update(id(p) for p in m.parameters(recurse=False))
            continue
        if name in bits:
            w = m.weight
            b = bits[name]
            rows.append((prefix + "weight", "weight", w.numel(), b, math.ceil(w.numel() * b / 8)))
            rows.append((prefix + "scale", "scale", w.shape[0], 32, FP32_BYTES * w.shape[0]))
            counted.add(id(w))
        for pname, p in m.named_parameters(recurse=False):
            if id(p) not in counted:
                counted.add(id(p))
                rows.append((prefix + pname, "fp32", p.numel(), 32, FP32_BYTES * p.numel()))
    n_act = _n_act_quantizers(model, bit_config, bits)
    if n_act:
        rows.append(("activation quantizers", "act_qparams", 2 * n_act, 32, ACT_QPARAM_BYTES * n_act))
    return rows


def model_size_bytes(model: nn.Module, bit_config: BitConfig | None = None) -> int:
    """Bytes of ``model`` under the accounting of the module docstring.

    With ``bit_config`` the weights are counted at its bits; without, at the bits of the model's
    own quantized modules (an FP32 model: everything at 32 bits).
    """
    return sum(r[4] for r in _accounting(model, bit_config))


def fp32_size_bytes(model: nn.Module) -> int:
    """Bytes of ``model`` with every weight in FP32 (no scales, no activation quantizers)."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            total += FP32_BYTES * 2 * m.num_features
            continue
        total += sum(FP32_BYTES * p.numel() for p in m.parameters(recurse=False))
    return total


def compression_ratio(model: nn.Module, bit_config: BitConfig | None = None) -> float:
    """FP32 size / quantized size of ``model`` (whole model, scales and BatchNorm included)."""
    return fp32_size_bytes(model) / model_size_bytes(model, bit_config)


def weight_compression(model: nn.Module, bit_config: BitConfig | None = None) -> float:
    r""":math:`32 / \bar b`, :math:`\bar b = \sum_i n_i b_i / \sum_i n_i` the mean bits of the quantized weights
    (:math:`n_i` weights at :math:`b_i` bits; weights alone, see the module docstring)."""
    bits = weight_bits_by_module(model, bit_config)
    if not bits:
        return 1.0
    mods = dict(model.named_modules())
    n = sum(mods[k].weight.numel() for k in bits)
    return 32.0 * n / sum(b * mods[k].weight.numel() for k, b in bits.items())


def activation_compression(bit_config: BitConfig | int | None) -> float:
    """32 / activation bits (1.0 when activations stay FP32).

    Every quantized activation has the same bits in a BitConfig, so this is also the mean over
    the quantized activations (the first layer's FP32 image input is not one of them).
    """
    bits = bit_config.act_bits if isinstance(bit_config, BitConfig) else bit_config
    if bits is None:
        return 1.0
    return 32.0 / check_bits(bits, "activation bits other than None")


def size_table(model: nn.Module, bit_config: BitConfig | None = None) -> list[dict]:
    """Per block: ``{"block", "numel", "bits", "weight_bytes", "scale_bytes", "bytes"}``, then one row
    ``"other (FP32)"`` for biases, BatchNorm and activation quantizers, then ``"total"``.

    Blocks follow ``bit_config`` (or the model's ``bit_config`` attribute, or layer granularity).
    """
    cfg = bit_config if bit_config is not None else getattr(model, "bit_config", None)
    gran = cfg.granularity if isinstance(cfg, BitConfig) else "layer"
    bits = weight_bits_by_module(model, bit_config)
    rows = {r[0]: r for r in _accounting(model, bit_config)}
    out, used = [], set()
    for b in quant_blocks(model, gran):
        wb = sum(rows[n + ".weight"][4] if n in bits else FP32_BYTES * rows[n + ".weight"][2]
                 for n in b.module_names)
        sb = sum(rows[n + ".scale"][4] for n in b.module_names if n in bits)
        used.update(n + ".weight" for n in b.module_names)
        used.update(n + ".scale" for n in b.module_names)
        blk_bits = {bits.get(n, 32) for n in b.module_names}
        out.append({"block": b.name, "numel": b.numel,
                    "bits": blk_bits.pop() if len(blk_bits) == 1 else sorted(blk_bits),
                    "weight_bytes": wb, "scale_bytes": sb, "bytes": wb + sb})
    other = [r for k, r in rows.items() if k not in used]
    ob = sum(r[4] for r in other)
    out.append({"block": "other (FP32)", "numel": sum(r[2] for r in other), "bits": 32,
                "weight_bytes": 0, "scale_bytes": 0, "bytes": ob})
    out.append({"block": "total", "numel": sum(r["numel"] for r in out), "bits": None,
                "weight_bytes": sum(r["weight_bytes"] for r in out), "scale_bytes": sum(r["scale_bytes"] for r in out),
                "bytes": sum(r["bytes"] for r in out)})
    return out
