"""A mixed-precision setting and the values it may hold (paper section 3.2).

HAWQ gives each block B_i (:mod:`hawqlib.blocks`) its own number of bits; :class:`BitConfig` is that
assignment, with the activation precision and the block granularity it refers to. It is checked where
it enters the library: bit widths on construction (:func:`check_bits`), block names against a model
by :meth:`BitConfig.validate`, which :func:`hawqlib.quant.swap.quantize_model` calls once.

The quantizers' rules are named here too, so that every layer checks them against the same lists:
:data:`WEIGHT_SCALE_RULES` (how a weight grid's half-step is chosen, see :mod:`hawqlib.quant.grids`)
and :data:`ACT_RANGE_RULES` (how an activation range follows the batches, see
:mod:`hawqlib.quant.observer`). This module sits just above :mod:`hawqlib.blocks`: it imports nothing
of :mod:`hawqlib.quant`, so every layer above may import it.
"""
from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from .blocks import quant_blocks
from .files import atomic_write

__all__ = ["VALID_BITS", "check_bits", "WEIGHT_SCALE_RULES", "ACT_RANGE_RULES", "check_weight_rule",
           "check_act_rule", "BITCONFIG_FORMAT", "BitConfig"]

#: The bit widths a weight or an activation may have.
VALID_BITS = tuple(range(1, 9))
#: How a symmetric weight grid's half-step is chosen: least squared error (default) or max |w|.
WEIGHT_SCALE_RULES = ("mse", "max")
#: How an activation quantizer's range follows the batches: least squared error (default) or min/max.
ACT_RANGE_RULES = ("mse", "minmax")
#: The format tag of :meth:`BitConfig.to_dict`.
BITCONFIG_FORMAT = "hawqlib.BitConfig/1"


def check_bits(bits, what: str = "bits") -> int:
    """Return ``bits`` as an int if it is an integer in 1..8; otherwise raise a ValueError naming it.

    ``what`` names the offender in the message (e.g. ``"bits of block 'conv1'"``).
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= int(bits) <= 8:
        raise ValueError(f"{what} must be an integer in 1..8 (valid: {', '.join(map(str, VALID_BITS))}), "
                         f"got {bits!r}")
    return int(bits)


def check_weight_rule(rule) -> str:
    """Return ``rule`` if it is one of :data:`WEIGHT_SCALE_RULES`; otherwise raise a ValueError."""
    if rule not in WEIGHT_SCALE_RULES:
        raise ValueError(f"unknown scale rule {rule!r}; valid rules: {', '.join(map(repr, WEIGHT_SCALE_RULES))}")
    return rule


def check_act_rule(rule) -> str:
    """Return ``rule`` if it is one of :data:`ACT_RANGE_RULES`; otherwise raise a ValueError."""
    if rule not in ACT_RANGE_RULES:
        raise ValueError(f"unknown activation range rule {rule!r}; valid rules: "
                         f"{', '.join(map(repr, ACT_RANGE_RULES))}")
    return rule


@dataclass
class BitConfig:
    """A mixed-precision setting: weight bits per block, activation bits, and the block granularity.

    Bit values are checked on construction; block names by :meth:`validate`.

    Parameters
    ----------
    weights : dict
        Block name (as :func:`hawqlib.blocks.quant_blocks` names them at ``granularity``) -> bits in 1..8.
    act_bits : int or None
        The activation precision (None: activations stay FP32).
    granularity : str or list
        What a block is: ``"layer"``, ``"residual"`` or a list of module names.
    """

    weights: dict = field(default_factory=dict)
    act_bits: int | None = None
    granularity: str | list = "layer"

    def __post_init__(self):
        if not isinstance(self.weights, dict):
            raise TypeError(f"BitConfig.weights must be a dict block name -> bits, got {type(self.weights).__name__}")
        clean = {}
        for name, b in self.weights.items():
            if not isinstance(name, str):
                raise TypeError(f"block names must be strings, got {name!r}")
            clean[name] = check_bits(b, f"bits of block {name!r}")
        self.weights = clean
        if self.act_bits is not None:
            self.act_bits = check_bits(self.act_bits, "act_bits")
        if isinstance(self.granularity, (list, tuple)):
            self.granularity = [str(g) for g in self.granularity]
        elif not isinstance(self.granularity, str):
            raise TypeError(f"granularity must be 'layer', 'residual' or a list of module names, "
                            f"got {self.granularity!r}")

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def uniform(cls, model: nn.Module, bits: int, act_bits: int | None = None,
                granularity: str | Sequence[str] = "layer") -> "BitConfig":
        """Every block of ``model`` at ``bits`` (the paper's uniform baselines)."""
        bits = check_bits(bits)
        names = [b.name for b in quant_blocks(model, granularity)]
        gran = granularity if isinstance(granularity, str) else list(granularity)
        return cls({n: bits for n in names}, act_bits, gran)

    # -- checks ----------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> "BitConfig":
        """Check the block names against ``model``; raise ValueError naming unknown and missing blocks."""
        valid = [b.name for b in quant_blocks(model, self.granularity)]
        unknown = [n for n in self.weights if n not in valid]
        missing = [n for n in valid if n not in self.weights]
        problems = []
        if unknown:
            problems.append(f"unknown block(s) {unknown}")
        if missing:
            problems.append(f"missing block(s) {missing}")
        if problems:
            raise ValueError(f"BitConfig does not match {type(model).__name__} at granularity "
                             f"{self.granularity!r}: {'; '.join(problems)}; valid block names: {valid}")
        return self

    # -- figures ---------------------------------------------------------------------------
    def mean_bits(self, model: nn.Module) -> float:
        """Weight bits averaged over the weights (each block weighted by its n_i)."""
        self.validate(model)
        blocks = quant_blocks(model, self.granularity)
        n = sum(b.numel for b in blocks)
        return sum(self.weights[b.name] * b.numel for b in blocks) / n

    # -- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict (with a format tag)."""
        return {"format": BITCONFIG_FORMAT, "weights": dict(self.weights), "act_bits": self.act_bits,
                "granularity": self.granularity if isinstance(self.granularity, str) else list(self.granularity)}

    @classmethod
    def from_dict(cls, d: dict) -> "BitConfig":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, dict) or "weights" not in d:
            raise ValueError(f"not a BitConfig dict (needs a 'weights' key): {str(d)[:200]}")
        fmt = d.get("format", BITCONFIG_FORMAT)
        if fmt != BITCONFIG_FORMAT:
            raise ValueError(f"unsupported BitConfig format {fmt!r}; expected {BITCONFIG_FORMAT!r}")
        extra = set(d) - {"format", "weights", "act_bits", "granularity"}
        if extra:
            raise ValueError(f"unknown BitConfig field(s) {sorted(extra)}; valid: weights, act_bits, granularity")
        return cls(dict(d["weights"]), d.get("act_bits"), d.get("granularity", "layer"))

    def to_json(self) -> str:
        """JSON text (blocks in their stored order)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "BitConfig":
        """Inverse of :meth:`to_json`."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"BitConfig JSON does not parse: {e}") from None
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        text = self.to_json()
        atomic_write(path, lambda f: f.write(text), mode="w")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitConfig":
        """Read a BitConfig written by :meth:`save`."""
        with open(path) as f:
            return cls.from_json(f.read())
