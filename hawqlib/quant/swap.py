"""Quantizing a model: swap its layers for fake-quantized ones and switch blocks on and off (paper section 3.2).

:func:`quantize_model` turns a network into its quantized form at a :class:`~hawqlib.bitconfig.BitConfig`
(each block B_i at its own bits, section 3.2): every Conv2d/Linear of a block becomes a
:class:`~hawqlib.quant.modules.QuantConv2d` / :class:`~hawqlib.quant.modules.QuantLinear`, with a
:class:`~hawqlib.quant.modules.QuantAct` on its input when activations are quantized, except the network's
first layer (our choice: its input is the image, 8-bit data to begin with, which we leave in floating
point). :func:`set_quant_enabled` switches whole blocks for the staged fine-tuning of section 3.2, and
:func:`calibrate_activations` sets the activation ranges without touching BatchNorm.

The quantized model carries its effective config as ``qmodel.bit_config``; loading a state dict into it
(``qmodel.load_state_dict``) updates that config from the bits the modules then hold
(:mod:`hawqlib.quant.modules` says what a state dict restores).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable

import torch
from torch import nn

from ..bitconfig import BitConfig, check_act_rule, check_bits, check_weight_rule
from ..blocks import QUANT_TYPES, quant_blocks
from .modules import QUANT_MODULES, QuantAct, QuantConv2d, QuantLinear
from .observer import CALIBRATIONS, RangeCollector

__all__ = ["quantize_model", "quant_modules", "set_quant_enabled", "calibrate_activations"]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(model: nn.Module, bit_config: BitConfig, act_bits: int | None = None, *,
                   weight_rule: str = "mse", act_rule: str = "mse") -> nn.Module:
    """A quantized deep copy of ``model`` (``model`` itself is untouched).

    Each Conv2d/Linear of each block in ``bit_config`` becomes a :class:`~hawqlib.quant.modules.QuantConv2d` /
    :class:`~hawqlib.quant.modules.QuantLinear` at that block's bits. Activations: ``act_bits`` if given, else
    ``bit_config.act_bits``; when that is None no activation is quantized. Otherwise every quantized layer
    gets a :class:`~hawqlib.quant.modules.QuantAct` on its input, except the first quantized layer in module
    order, whose input is the image (left FP32: our choice, see the module docstring). ``weight_rule`` picks
    the weight scale (``"mse"`` or ``"max"``, :mod:`hawqlib.quant.grids`), ``act_rule`` the activation range
    (``"mse"`` or ``"minmax"``, :mod:`hawqlib.quant.observer`). The copy carries the effective config as
    ``qmodel.bit_config``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(bit_config, BitConfig):
        raise TypeError(f"bit_config must be a BitConfig, got {type(bit_config).__name__}")
    if any(isinstance(m, QUANT_MODULES) for m in model.modules()):
        raise ValueError("model is already quantized (it holds QuantConv2d/QuantLinear modules)")
    bit_config.validate(model)
    check_weight_rule(weight_rule)
    check_act_rule(act_rule)
    a_bits = bit_config.act_bits if act_bits is None else check_bits(act_bits, "act_bits")
    qmodel = copy.deepcopy(model)
    first = next((n for n, m in qmodel.named_modules() if isinstance(m, QUANT_TYPES)), None)
    for block in quant_blocks(qmodel, bit_config.granularity):
        bits = bit_config.weights[block.name]
        for name, m in zip(block.module_names, block.modules):
            cls = QuantConv2d if isinstance(m, nn.Conv2d) else QuantLinear
            ab = None if (a_bits is None or name == first) else a_bits
            _set_submodule(qmodel, name, cls.from_float(m, bits, ab, weight_rule, act_rule))
    qmodel.bit_config = BitConfig(dict(bit_config.weights), a_bits,
                                  copy.copy(bit_config.granularity))
    qmodel.register_load_state_dict_post_hook(_sync_bit_config)
    return qmodel


def _sync_bit_config(qmodel: nn.Module, incompatible_keys=None) -> None:
    """After ``qmodel.load_state_dict``: make ``qmodel.bit_config`` say the bits its modules now hold.

    A block takes its modules' weight bits when they agree; ``act_bits`` is the bits of the activation
    quantizers when they agree, None when a model of several quantized layers has none (with a single
    layer, which never gets one, the config keeps its value).
    """
    cfg = getattr(qmodel, "bit_config", None)
    if not isinstance(cfg, BitConfig):
        return
    weights = dict(cfg.weights)
    for block in quant_blocks(qmodel, cfg.granularity):
        bits = {m.weight_bits for m in block.modules if isinstance(m, QUANT_MODULES)}
        if len(bits) == 1 and block.name in weights:
            weights[block.name] = bits.pop()
    mods = quant_modules(qmodel)
    acts = {m.act_quant.bits for _, m in mods if m.act_quant is not None}
    act_bits = acts.pop() if len(acts) == 1 else None if not acts and len(mods) > 1 else cfg.act_bits
    if weights != cfg.weights or act_bits != cfg.act_bits:
        qmodel.bit_config = BitConfig(weights, act_bits, copy.copy(cfg.granularity))


def quant_modules(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every QuantConv2d/QuantLinear of ``qmodel``, in module order."""
    return [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QUANT_MODULES)]


def set_quant_enabled(qmodel: nn.Module, block_names: Iterable[str] | None, enabled: bool, *,
                      activations: bool = True) -> None:
    """Switch weight quantization (and, with ``activations``, input quantization) of whole blocks.

    ``block_names`` are names of ``qmodel.bit_config``'s blocks (None: all blocks). Blocks
    switched off compute in FP32, as the not-yet-quantized blocks of staged fine-tuning do.
    """
    cfg = getattr(qmodel, "bit_config", None)
    if not isinstance(cfg, BitConfig):
        raise ValueError("qmodel has no bit_config: pass a model returned by quantize_model")
    blocks = {b.name: b for b in quant_blocks(qmodel, cfg.granularity)}
    names = list(blocks) if block_names is None else (
        [block_names] if isinstance(block_names, str) else list(block_names))
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise ValueError(f"unknown block(s) {unknown}; valid block names: {list(blocks)}")
    for n in names:
        for m in blocks[n].modules:
            if not isinstance(m, QUANT_MODULES):
                raise ValueError(f"module of block {n!r} is not quantized ({type(m).__name__})")
            m.quant_enabled = bool(enabled)
            if activations and m.act_quant is not None:
                m.act_quant.enabled = bool(enabled)


@torch.no_grad()
def calibrate_activations(qmodel: nn.Module, batches: Iterable, *, num_batches: int | None = None,
                          calibration: str = "union") -> int:
    """Observe activation ranges on ``batches`` (inputs, or (inputs, labels) pairs) in eval mode.

    BatchNorm statistics are not touched (the model runs in eval mode). ``calibration``: ``"union"`` (the
    default, our choice) sets every enabled :class:`~hawqlib.quant.modules.QuantAct`'s range from all the
    batches at once (:class:`hawqlib.quant.observer.RangeCollector`), observed in one pass with the activation
    quantizers switched off (each sees the network's full-precision activations, weights as they are
    quantized: one pass cannot know a range before it has seen every batch); ``"moving_average"`` updates
    each range batch by batch by the training rule (a quantizer's first batch dominates its range; the rule
    of the book's stored runs). Returns the batches seen.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; valid: {', '.join(CALIBRATIONS)}")
    if calibration == "union":
        acts = [m for m in qmodel.modules() if isinstance(m, QuantAct) and m.enabled]
    else:
        acts = [m for m in qmodel.modules() if isinstance(m, QuantAct)]
    collectors = {a: RangeCollector(a.bits, a.rule) for a in acts} if calibration == "union" else {}
    hooks = [a.register_forward_pre_hook(lambda mod, args: collectors[mod].add(args[0])) for a in collectors]
    was_training = qmodel.training
    qmodel.eval()
    seen = 0
    try:
        for a in acts:
            if calibration == "union":
                a.enabled = False     # the identity; the hook still sees the input
            else:
                a.observe = True
        # the moving average ran with autograd on, as it always did (its numbers are those of the stored runs)
        with torch.no_grad() if calibration == "union" else contextlib.nullcontext():
            for batch in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                qmodel(x)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
        for a in acts:
            if calibration == "union":
                a.enabled = True
            else:
                a.observe = None
        qmodel.train(was_training)
    for a, c in collectors.items():
        if seen:
            a.set_range(*c.range())
    return seen
