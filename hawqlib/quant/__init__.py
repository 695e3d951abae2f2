"""Quantizers, fake-quantized modules and ``quantize_model`` (paper section 3.2, Q(W_i)).

HAWQ quantizes each block B_i to its own number of bits and fine-tunes with the quantized blocks
"held in their quantized form" by a straight-through estimator (section 3.2). The paper does not
restate its quantizer; our choices, each with its reason, are stated in the module that makes them:

- :mod:`hawqlib.bitconfig`: the mixed-precision setting (:class:`~hawqlib.bitconfig.BitConfig`), the valid
  bits and the names of the quantizers' rules (it sits below this package);
- :mod:`~hawqlib.quant.ste`: the fake-quantization arithmetic and its straight-through gradient;
- :mod:`~hawqlib.quant.grids`: the weight grid Q(W) (symmetric, per output channel, mid-rise, least-squares
  half-step) and the quantizer of a tensor;
- :mod:`~hawqlib.quant.observer`: how an activation quantizer's range follows the batches;
- :mod:`~hawqlib.quant.modules`: :class:`~hawqlib.quant.modules.QuantAct`,
  :class:`~hawqlib.quant.modules.QuantConv2d`, :class:`~hawqlib.quant.modules.QuantLinear`, and what
  their state dict holds;
- :mod:`~hawqlib.quant.swap`: :func:`~hawqlib.quant.swap.quantize_model` and the switches of staged
  fine-tuning.

Each imports only those above it in this list. The names of ``__all__`` below are importable from
``hawqlib.quant`` itself.
"""
from __future__ import annotations

from ..bitconfig import (ACT_RANGE_RULES, BITCONFIG_FORMAT, VALID_BITS, WEIGHT_SCALE_RULES, BitConfig,
                         check_bits)
from .grids import MSE_ITERATIONS, quant_params, quant_scale, quantize_tensor, quantize_to_int, weight_code_limit
from .modules import QUANT_MODULES, QuantAct, QuantConv2d, QuantLinear
from .observer import ACT_MSE_SAMPLES, ACT_MSE_STEPS, CALIBRATIONS, act_mse_range
from .swap import calibrate_activations, quant_modules, quantize_model, set_quant_enabled

__all__ = ["CODE_VERSION", "WEIGHT_SCALE_RULES", "MSE_ITERATIONS", "ACT_RANGE_RULES", "ACT_MSE_STEPS",
    "ACT_MSE_SAMPLES", "act_mse_range", "CALIBRATIONS",
    "VALID_BITS", "check_bits", "weight_code_limit", "quant_params", "quant_scale", "quantize_tensor", "quantize_to_int",
    "BitConfig", "QuantAct", "QuantConv2d", "QuantLinear", "QUANT_MODULES", "quantize_model",
    "quant_modules", "set_quant_enabled", "calibrate_activations", "BITCONFIG_FORMAT",
]

#: Bumped whenever the numbers this package computes change (part of artifact cache keys).
CODE_VERSION = 4
