"""Fake-quantized modules: :class:`QuantAct`, :class:`QuantConv2d` and :class:`QuantLinear` (paper section 3.2).

HAWQ fine-tunes with each quantized block "held in its quantized form" (section 3.2). A
:class:`QuantConv2d` / :class:`QuantLinear` computes with Q(W) (:mod:`hawqlib.quant.grids`) in place of its
weight and, when it has one, with its input fake-quantized by a :class:`QuantAct` (ranges:
:mod:`hawqlib.quant.observer`); the backward pass is the straight-through estimator
(:mod:`hawqlib.quant.ste`). Staged fine-tuning (section 3.2) quantizes blocks progressively: every
quantized module carries ``quant_enabled`` (its weight) and its input :class:`QuantAct` carries
``enabled``; :func:`hawqlib.quant.swap.set_quant_enabled` switches whole blocks. A disabled module
computes in FP32.

Quantized state (our choice, in the manner of torch.ao's fake-quant modules): the switches are buffers,
so a ``state_dict`` carries them: ``weight_quant_enabled`` (bool, read and set as ``quant_enabled``) of
the weight modules; ``fake_quant_enabled`` (bool, as ``enabled``) and ``observer_mode`` (uint8, as
``observe``: 0 off, 1 on, 2 in training mode only) of :class:`QuantAct`. The configuration (bits and
rules, and a QuantAct's averaging constant) is each module's extra state (``get_extra_state``): JSON
with a format tag, as UTF-8 bytes in a uint8 tensor, so that a state dict holds tensors only (it loads
with ``torch.load(weights_only=True)``, and code that clones or compares its values keeps working).
Loading a state dict restores all of it (bits, rules, flags, scales) whatever the module was built with;
one that holds the configuration also decides which layers have an activation quantizer and a fixed
weight scale. A state dict written before these entries existed loads as it always did: the module
keeps its own flags and configuration (:attr:`QuantAct.optional_state_keys`).
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..bitconfig import check_act_rule, check_bits, check_weight_rule
from .grids import quant_params, quantize_to_int, weight_code_limit
from .observer import affine_qparams, batch_range, moving_average_
from .ste import FakeQuantSTE, affine_grid, fake_quant

__all__ = ["QuantAct", "QuantConv2d", "QuantLinear", "QUANT_MODULES", "QUANT_ACT_FORMAT", "QUANT_WEIGHT_FORMAT"]

#: Format tags of the modules' extra state.
QUANT_ACT_FORMAT = "hawqlib.QuantAct/1"
QUANT_WEIGHT_FORMAT = "hawqlib.QuantWeight/1"
_EXTRA = "_extra_state"   # the state-dict key of get_extra_state (torch's name)
#: The smallest step a learned activation step may take (QuantAct.set_learn_step).
_MIN_STEP = 1e-6


def _encode(config: dict) -> torch.Tensor:
    """``config`` as UTF-8 JSON bytes in a uint8 tensor."""
    return torch.tensor(list(json.dumps(config, sort_keys=True).encode()), dtype=torch.uint8)


def _decode(state, fmt: str, fields: tuple) -> dict:
    """The config held by ``state`` (from :func:`_encode`, or a dict), with its format tag and fields checked."""
    if isinstance(state, torch.Tensor):
        try:
            state = json.loads(bytes(state.detach().cpu().to(torch.uint8).tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"the {fmt} state does not parse: {e}") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"not a {fmt} state: {str(state)[:200]}")
    missing, unknown = [f for f in fields if f not in state], sorted(set(state) - {"format", *fields})
    if missing or unknown:
        raise ValueError(f"{fmt} state: missing field(s) {missing}, unknown field(s) {unknown}; "
                         f"valid: {', '.join(fields)}")
    return state


def _forget_missing(module: nn.Module, state_dict, prefix: str, missing_keys: list) -> None:
    """Drop the missing-key reports of ``module.optional_state_keys`` that ``state_dict`` lacks (one written
    before they were saved): the module keeps its current values, as loading it always did."""
    for name in module.optional_state_keys:
        key = prefix + name
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)


class QuantAct(nn.Module):
    """Activation fake-quantization with a moving-average range (:mod:`hawqlib.quant.observer`).

    Buffers: ``running_min``/``running_max`` (the tracked range; +-inf before the first batch),
    ``scale``/``zero_point`` (the grid, recomputed from the range after each observation and used
    as is in eval mode), and the switches of the module docstring. The range is updated in training
    mode only, or whenever ``observe`` is forced to True (see
    :func:`hawqlib.quant.swap.calibrate_activations`). With ``enabled = False`` the module is the
    identity and observes nothing. Gradient: straight-through inside the range widened by half a
    step, zero outside (where the quantizer saturates).
    """

    #: State-dict entries that state dicts written before they existed lack (loading keeps the current values).
    optional_state_keys = ("fake_quant_enabled", "observer_mode", _EXTRA)

    def __init__(self, bits: int, averaging_constant: float = 0.01, rule: str = "mse"):
        super().__init__()
        self._configure(bits, rule, averaging_constant)
        #: Set by QuantConv2d/QuantLinear, whose convolution hands back a fresh input gradient.
        self.grad_inplace = False
        self.register_buffer("running_min", torch.tensor(float("inf")))
        self.register_buffer("running_max", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))
        self.register_buffer("fake_quant_enabled", torch.tensor(True))
        self.register_buffer("observer_mode", torch.tensor(2, dtype=torch.uint8))

    def _configure(self, bits, rule, averaging_constant) -> None:
        bits, rule = check_bits(bits, "activation bits"), check_act_rule(rule)
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant!r}")
        self.bits, self.rule, self.averaging_constant = bits, rule, float(averaging_constant)
        self.quant_min, self.quant_max = 0, 2 ** bits - 1

    @property
    def enabled(self) -> bool:
        """Whether the input is fake-quantized (the ``fake_quant_enabled`` buffer); False: the identity."""
        return bool(self.fake_quant_enabled)

    @enabled.setter
    def enabled(self, value) -> None:
        self.fake_quant_enabled.fill_(bool(value))

    @property
    def observe(self) -> bool | None:
        """None: observe in training mode only; True/False: force observing on/off (``observer_mode`` 2, 1, 0)."""
        return {0: False, 1: True}.get(int(self.observer_mode))

    @observe.setter
    def observe(self, value) -> None:
        self.observer_mode.fill_(2 if value is None else int(bool(value)))

    def has_range(self) -> bool:
        """True once at least one batch has been observed."""
        return bool(torch.isfinite(self.running_min))

    @torch.no_grad()
    def observe_batch(self, x: torch.Tensor):
        """Update the range with ``x`` by the moving-average rule and recompute ``scale``/``zero_point``.

        Returns the batch's ``(min, max)`` as 0-dim tensors (its extremes, whatever the rule).
        """
        (lo, hi), (blo, bhi) = batch_range(x, self.bits, self.rule)
        moving_average_(self.running_min, self.running_max, blo, bhi, self.averaging_constant)
        scale, zero_point = affine_qparams(self.running_min, self.running_max, self.quant_min, self.quant_max)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        return lo, hi

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set the range to ``[lo, hi]`` (0-dim tensors) as it is, and recompute ``scale``/``zero_point``
        (calibration over all its batches, :class:`hawqlib.quant.observer.RangeCollector`)."""
        self.running_min.copy_(lo)
        self.running_max.copy_(hi)
        scale, zero_point = affine_qparams(self.running_min, self.running_max, self.quant_min, self.quant_max)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    @property
    def learn_step(self) -> bool:
        """Whether the step (the ``scale`` buffer) is trained by gradient descent, LSQ-style (set by
        :meth:`set_learn_step`); False: the step follows the observed range (the default)."""
        return self.scale.requires_grad

    def set_learn_step(self, learn: bool = True) -> "QuantAct":
        """Train the step from here on (``learn=True``), or fix it again (``False``).

        A learned step is an extension of the paper's fine-tuning (section 3.2, whose activation quantizer is
        not restated):
        the learned-step-size rule of Esser et al. (LSQ, ICLR 2020), here for the fine-tuning attempts of the
        ResNet20 chapter. The step starts at the calibrated one, the zero point stays where calibration put it,
        observing is switched off (the range no longer follows the batches), and ``scale`` itself becomes the
        trained tensor: the state dict keeps its keys, eval and the packed export read the learned value.
        Gradient of an output with respect to the step: ``round(x/s) - x/s`` on the grid, the clamped code
        ``q_min - z`` or ``q_max - z`` outside, scaled by ``1/sqrt(N * q_max)`` (``N``: one sample's element
        count), as LSQ prescribes; the step is kept at or above a small positive floor. :func:`hawqlib.train.train`
        gives such a tensor to the optimizer without
        weight decay. Switch it off before exporting (the packed writer reads plain tensors).
        """
        if learn and not self.has_range():
            raise RuntimeError("QuantAct has no activation range yet: calibrate it "
                               "(hawqlib.quant.calibrate_activations) before learning its step")
        self.scale.requires_grad_(bool(learn))
        if learn:
            self.observe = False
        return self

    def _learned_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The LSQ fake quantization of :meth:`set_learn_step`, differentiable in ``x`` and in the step."""
        if float(self.scale.detach()) < _MIN_STEP:  # SGD drove it to zero or below: it would divide by zero
            with torch.no_grad():                    # or flip the grid
                self.scale.clamp_(min=_MIN_STEP)
        g = 1.0 / math.sqrt(x[0].numel() * self.quant_max)
        sg = self.scale * g
        s = self.scale.detach() + (sg - sg.detach())                  # value exactly s, gradient scaled by g
        z = self.zero_point.to(x.dtype)
        v = torch.clamp(x / s + z, self.quant_min, self.quant_max)
        v = v + (v.round() - v).detach()                              # round, straight through
        return (v - z) * s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` to ``bits`` (updating the range first when observing)."""
        if not self.enabled:
            return x
        if self.scale.requires_grad and torch.is_grad_enabled():
            return self._learned_forward(x)
        mode = int(self.observer_mode)
        observing = self.training if mode == 2 else mode == 1
        batch = self.observe_batch(x) if observing else None
        if batch is None and not self.has_range():
            raise RuntimeError("QuantAct has no activation range yet: run the model in training mode "
                               "or call hawqlib.quant.calibrate_activations(...) before evaluating")
        s = self.scale.item()                        # a float32 value, held exactly by the Python float
        inv_t = 1.0 / self.scale                     # float32 division, as torch's fake-quant kernels do
        inv = inv_t.item()
        z = int(self.zero_point.item())
        lo, hi = float(self.quant_min - z), float(self.quant_max - z)
        if not (x.requires_grad and torch.is_grad_enabled()):
            return affine_grid(x, s, inv, lo, hi)
        saturates = True
        if batch is not None:
            # fl(x * inv) is monotone in x, so the batch extremes tell whether any element rounds
            # outside [lo, hi]; if none does, the clamp is a no-op and the STE mask is all ones.
            t = (torch.stack(batch) * inv_t).tolist()
            saturates = not (t[0] > lo - 0.5 and t[1] < hi + 0.5)
        return FakeQuantSTE.apply(x, s, inv, lo, hi, saturates, self.grad_inplace, saturates)

    # -- state ------------------------------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        """The configuration (bits, rule, averaging constant), encoded as the module docstring says."""
        return _encode({"format": QUANT_ACT_FORMAT, "bits": self.bits, "rule": self.rule,
                        "averaging_constant": self.averaging_constant})

    def set_extra_state(self, state) -> None:
        """Adopt the configuration of :meth:`get_extra_state` (or of its decoded dict)."""
        d = _decode(state, QUANT_ACT_FORMAT, ("bits", "rule", "averaging_constant"))
        self._configure(d["bits"], d["rule"], d["averaging_constant"])

    @classmethod
    def from_extra_state(cls, state) -> "QuantAct":
        """A new QuantAct with the configuration of :meth:`get_extra_state`."""
        d = _decode(state, QUANT_ACT_FORMAT, ("bits", "rule", "averaging_constant"))
        return cls(d["bits"], d["averaging_constant"], d["rule"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        _forget_missing(self, state_dict, prefix, missing_keys)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, rule={self.rule!r}, averaging_constant={self.averaging_constant}, "
                f"enabled={self.enabled}")


class _QuantWeight:
    """Shared behaviour of :class:`QuantConv2d` and :class:`QuantLinear` (a mixin on nn.Conv2d / nn.Linear)."""

    #: State-dict entries that state dicts written before they existed lack (loading keeps the current values).
    optional_state_keys = ("weight_quant_enabled", _EXTRA)

    weight_bits: int

    def _init_quant(self, weight_bits: int, act_bits: int | None, weight_rule: str = "mse", act_rule: str = "mse"):
        self.weight_bits = check_bits(weight_bits, "weight_bits")
        self.weight_rule = check_weight_rule(weight_rule)
        # On the weight's device; a module built on the meta device (from_float) is placed by _place.
        device = torch.device("cpu") if self.weight.is_meta else self.weight.device
        self.act_quant = QuantAct(act_bits, rule=act_rule).to(device) if act_bits is not None else None
        if self.act_quant is not None:
            self.act_quant.grad_inplace = True
        # A fixed per-channel scale (set by hawqlib.export.load_packed) replaces the scale rule.
        self.register_buffer("fixed_scale", None)
        self.register_buffer("weight_quant_enabled", torch.ones((), dtype=torch.bool, device=device))

    def _place(self, device) -> None:
        """Move the quantization state (not the weight) to ``device``."""
        self.weight_quant_enabled = self.weight_quant_enabled.to(device)
        if self.act_quant is not None:
            self.act_quant.to(device)

    @property
    def quant_enabled(self) -> bool:
        """Whether the weight is fake-quantized (the ``weight_quant_enabled`` buffer); False: FP32."""
        return bool(self.weight_quant_enabled)

    @quant_enabled.setter
    def quant_enabled(self, value) -> None:
        self.weight_quant_enabled.fill_(bool(value))

    def weight_qparams(self):
        """``(scale, zero_point, qmin, qmax)`` of the weight: ``fixed_scale`` if set, else by ``weight_rule``."""
        if self.fixed_scale is not None:
            qmax = weight_code_limit(self.weight_bits)
            zp = torch.zeros(self.fixed_scale.shape, dtype=torch.int32, device=self.fixed_scale.device)
            return self.fixed_scale, zp, -qmax, qmax
        return quant_params(self.weight, self.weight_bits, rule=self.weight_rule)

    def quantized_weight(self) -> torch.Tensor:
        """Q(W) of this module (differentiable by the STE), regardless of ``quant_enabled``."""
        scale, zp, qmin, qmax = self.weight_qparams()
        return fake_quant(self.weight, scale, zp, qmin, qmax, True, True, clip_grad=self.fixed_scale is not None)

    def int_weight(self):
        """``(k, scale)``: integer codes (odd, see :func:`~hawqlib.quant.grids.quantize_to_int`) and per-channel
        FP32 half-steps with ``Q(W) == k * scale``."""
        return quantize_to_int(self.weight, self.weight_bits, scale=self.fixed_scale, rule=self.weight_rule)

    def _effective(self, x: torch.Tensor):
        if self.act_quant is not None:
            x = self.act_quant(x)
        return x, (self.quantized_weight() if self.quant_enabled else self.weight)

    # -- state ------------------------------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        """The configuration (weight bits and rule), encoded as the module docstring says."""
        return _encode({"format": QUANT_WEIGHT_FORMAT, "weight_bits": self.weight_bits,
                        "weight_rule": self.weight_rule})

    def set_extra_state(self, state) -> None:
        """Adopt the configuration of :meth:`get_extra_state` (or of its decoded dict)."""
        d = _decode(state, QUANT_WEIGHT_FORMAT, ("weight_bits", "weight_rule"))
        bits, rule = check_bits(d["weight_bits"], "weight_bits"), check_weight_rule(d["weight_rule"])
        self.weight_bits, self.weight_rule = bits, rule

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + _EXTRA in state_dict:       # saved with its configuration: take its structure too
            self._adopt_structure(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        _forget_missing(self, state_dict, prefix, missing_keys)

    def _adopt_structure(self, state_dict, prefix: str) -> None:
        """Add or drop ``act_quant`` and ``fixed_scale`` as ``state_dict`` has them (before the entries load:
        torch loads a module's children after the module itself)."""
        if not any(k.startswith(prefix + "act_quant.") for k in state_dict):
            self.act_quant = None
        elif self.act_quant is None and prefix + "act_quant." + _EXTRA in state_dict:
            act = QuantAct.from_extra_state(state_dict[prefix + "act_quant." + _EXTRA])
            act.grad_inplace = True
            self.act_quant = act.to(self.weight.device).train(self.training)
        scale = state_dict.get(prefix + "fixed_scale")
        if scale is None:
            self.fixed_scale = None
        elif self.fixed_scale is None:
            self.fixed_scale = torch.empty(scale.shape, dtype=scale.dtype, device=self.weight.device)

    def _quant_repr(self) -> str:
        return (f"weight_bits={self.weight_bits}, weight_rule={self.weight_rule!r}, "
                f"quant_enabled={self.quant_enabled}")


class QuantConv2d(_QuantWeight, nn.Conv2d):
    """nn.Conv2d whose weight is fake-quantized to ``weight_bits`` in the forward pass (STE backward).

    ``act_quant`` (a :class:`QuantAct`, or None) quantizes the input. ``quant_enabled = False``
    runs the plain FP32 convolution on the FP32 weight.
    """

    def __init__(self, *args, weight_bits: int = 8, act_bits: int | None = None, weight_rule: str = "mse",
                 act_rule: str = "mse", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, act_bits, weight_rule, act_rule)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_bits: int, act_bits: int | None = None,
                   weight_rule: str = "mse", act_rule: str = "mse") -> "QuantConv2d":
        """A QuantConv2d sharing ``conv``'s weight and bias Parameters and hyper-parameters."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                device="meta", weight_bits=weight_bits, act_bits=act_bits, weight_rule=weight_rule,
                act_rule=act_rule)
        q.weight, q.bias = conv.weight, conv.bias
        q._place(conv.weight.device)
        q.train(conv.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv(Q_a(x), Q(W)) (or the FP32 pieces where quantization is disabled)."""
        x, w = self._effective(x)
        return self._conv_forward(x, w, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._quant_repr()


class QuantLinear(_QuantWeight, nn.Linear):
    """nn.Linear whose weight is fake-quantized to ``weight_bits`` in the forward pass (STE backward)."""

    def __init__(self, *args, weight_bits: int = 8, act_bits: int | None = None, weight_rule: str = "mse",
                 act_rule: str = "mse", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, act_bits, weight_rule, act_rule)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits: int, act_bits: int | None = None,
                   weight_rule: str = "mse", act_rule: str = "mse") -> "QuantLinear":
        """A QuantLinear sharing ``linear``'s weight and bias Parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                weight_bits=weight_bits, act_bits=act_bits, weight_rule=weight_rule, act_rule=act_rule)
        q.weight, q.bias = linear.weight, linear.bias
        q._place(linear.weight.device)
        q.train(linear.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """linear(Q_a(x), Q(W)) (or the FP32 pieces where quantization is disabled)."""
        x, w = self._effective(x)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._quant_repr()


QUANT_MODULES = (QuantConv2d, QuantLinear)
