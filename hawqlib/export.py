"""The real packed file of a quantized model: bit-packed integer weights, scales and the rest (section 4).

The paper's compression figures are arithmetic on bit counts; this module writes the bytes, so
that :func:`hawqlib.size.model_size_bytes` can be checked against a file on disk, and reads them
back into a model that computes exactly what the fake-quantized model computes.

The container (preamble, digested header, records; ``hawqlib.packed/3``, our design) is
:mod:`hawqlib.packfile`'s: every file verifies itself, and a flipped bit anywhere is a ValueError naming
the file and the header or the record, raised before any model is built; files of the previous format
``hawqlib.packed/2`` load with an :class:`UnverifiedPackedWarning`.

Payload records (one per entry ``[kind, name, shape, bits]``):

- ``"q"`` a quantized weight of module ``name``: its odd integer codes ``k`` (in ``[-L, L]``,
  ``L = 2**bits - 1``; ``{-1, +1}`` at 1 bit) mapped to ``u = (k + L) / 2`` in ``[0, 2**bits - 1]``, each written
  in ``bits`` bits, least significant bit first, packed across byte boundaries
  (``ceil(numel * bits / 8)`` bytes; any bit width 1..8), then the per-output-channel scales
  (float32, the grid's half-steps). The weight is ``k * scale``.
- ``"bn"`` a BatchNorm ``name``: its inference form ``a``, ``b`` (float32 per channel) with
  ``y = a x + b``; ``a`` and ``b`` are taken from PyTorch's own eval-mode BatchNorm kernel (by
  evaluating it on ones and zeros), so the restored BatchNorm (``weight = a``, ``bias = b``,
  running mean 0, running variance 1, ``eps = 0``) reproduces its output bit for bit.
- ``"bn0"`` a BatchNorm ``name`` without affine parameters: its running mean and variance (float32 per
  channel) and its ``eps`` (float64), restored as they are (the same kernel then computes the same output).
- ``"f"`` a float32 parameter ``name`` (biases, weights outside the BitConfig).
- ``"b"`` a float32 buffer ``name`` of any other module (saved in a state dict, so part of the model).
- ``"act"`` the activation quantizer ``name``: scale (float32) and zero point (int32).

Every parameter and persistent buffer of the model is in a record (those of the quantized modules, the
BatchNorms and the activation quantizers through their records); a parameter or buffer the format cannot
hold (not float32, such as an integer buffer of another module) makes :func:`save_packed` refuse, naming
the module. The records are exactly the numbers :mod:`hawqlib.size` counts (plus any such buffers), so the
file exceeds ``model_size_bytes`` only by the 48-byte preamble and the compressed header. Any device: the
numbers are read off the model where it lives, and copied to the CPU only to be written.

:func:`load_packed` trusts nothing in a file: the header is bounded (:data:`MAX_HEADER_BYTES` on disk,
:data:`MAX_HEADER_JSON` decompressed), every field is checked (a ValueError names the field), every
module of the target model must have its record exactly once, and every stored number must be finite.
``arch`` names the network (:func:`arch_of`); files written before it was recorded hold null there
and are read given the model.

A restored model is for inference (eval mode): its BatchNorms hold the folded form, and its
quantized modules carry their stored scales (``fixed_scale``), so the weight grid cannot drift.
"""
from __future__ import annotations

import math
import os
import struct
from collections import Counter
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .bitconfig import BitConfig
from .packfile import (MAGIC, MAX_HEADER_BYTES, MAX_HEADER_JSON, PACKED_FORMAT, UnverifiedPackedWarning, entry_size,
                       pack_bits, read_packed, unpack_bits, write_packed)
from .quant import QUANT_MODULES, QuantAct, quantize_model, weight_code_limit

__all__ = ["CODE_VERSION", "save_packed", "load_packed", "read_header", "pack_bits", "unpack_bits", "PACKED_FORMAT",
           "MAGIC", "arch_of", "MAX_HEADER_BYTES", "MAX_HEADER_JSON", "UnverifiedPackedWarning"]

#: Bumped whenever the numbers this module computes change (part of artifact cache keys). The digests of
#: ``hawqlib.packed/3`` change the bytes of the file, not the numbers a model restored from it computes.
CODE_VERSION = 2


def _cpu_bytes(t: torch.Tensor, dtype=torch.float32) -> bytes:
    """The bytes of ``t`` as ``dtype``, wherever it lives (copied to the CPU only to be written)."""
    return t.detach().to(device="cpu", dtype=dtype).contiguous().numpy().tobytes()



@torch.no_grad()
def _bn_affine(bn: _BatchNorm):
    """``(a, b)``: the per-channel affine PyTorch's eval-mode BatchNorm applies, read off its own kernel."""
    c = bn.num_features
    shape = (1, c) + (1,) * {nn.BatchNorm1d: 0, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(bn), 2)
    w = bn.weight if bn.affine else None
    like = {"dtype": bn.running_mean.dtype, "device": bn.running_mean.device}  # where the model lives
    zeros = torch.zeros(c, **like)
    # y(1) with zero mean and zero bias is a; y(0) with the real mean and bias is b.
    a = F.batch_norm(torch.ones(shape, **like), zeros, bn.running_var, w, zeros if bn.affine else None, False, 0.0,
                     bn.eps)
    b = F.batch_norm(torch.zeros(shape, **like), bn.running_mean, bn.running_var, w, bn.bias, False, 0.0, bn.eps)
    return a.reshape(c).float(), b.reshape(c).float()


def _walk(qmodel: nn.Module):
    """Yield ``(kind, name, object)`` for every record of the format, in module order: every parameter and
    persistent buffer is in one (a quantized module's, a BatchNorm's and an activation quantizer's own
    tensors through its record)."""
    counted = set()
    for name, m in qmodel.named_modules():
        prefix = name + "." if name else ""
        if isinstance(m, _BatchNorm):
            yield ("bn" if m.affine else "bn0"), name, m
            continue
        if isinstance(m, QuantAct):
            yield "act", name, m
            continue
        if isinstance(m, QUANT_MODULES):
            yield "q", name, m
            counted.add(id(m.weight))
        for pname, p in m.named_parameters(recurse=False):
            if id(p) not in counted:
                counted.add(id(p))
                yield "f", prefix + pname, p
        if isinstance(m, QUANT_MODULES):
            continue  # its buffers (switch, fixed scale) are its "q" record's
        for bname, b in m.named_buffers(recurse=False):
            if b is not None and bname not in m._non_persistent_buffers_set and id(b) not in counted:
                counted.add(id(b))
                yield "b", prefix + bname, b


def _check_float32(kind: str, name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32:
        module = name.rpartition(".")[0] or "(the model itself)"
        what = "parameter" if kind == "f" else "buffer"
        raise ValueError(f"save_packed cannot hold the {t.dtype} {what} {name!r} of module {module!r}: the packed "
                         "format stores float32 parameters and buffers besides the quantized weights, BatchNorms and "
                         "activation quantizers; make it float32, or a non-persistent buffer its constructor rebuilds")


def _records(qmodel: nn.Module):
    """Yield (entry, payload bytes) in module order."""
    for kind, name, m in _walk(qmodel):
        if kind in ("bn", "bn0"):
            if m.running_mean is None or m.running_var is None:
                raise ValueError(f"BatchNorm {name!r} tracks no running statistics: it has no inference form to export")
            if kind == "bn0":
                yield (["bn0", name, [m.num_features], 32], _cpu_bytes(m.running_mean) + _cpu_bytes(m.running_var)
                       + struct.pack("<d", float(m.eps)))
                continue
            a, b = _bn_affine(m)
            yield ["bn", name, [m.num_features], 32], _cpu_bytes(a) + _cpu_bytes(b)
        elif kind == "act":
            if not m.has_range():
                raise ValueError(f"activation quantizer {name!r} has no range yet: calibrate or fine-tune first")
            yield ["act", name, [], m.bits], _cpu_bytes(m.scale) + _cpu_bytes(m.zero_point, torch.int32)
        elif kind == "q":
            k, scale = m.int_weight()
            u = (k.to(torch.int16) + weight_code_limit(m.weight_bits)) // 2
            payload = pack_bits(u.to(device="cpu", dtype=torch.uint8).numpy(), m.weight_bits) + _cpu_bytes(scale)
            yield ["q", name, list(m.weight.shape), m.weight_bits], payload
        else:
            _check_float32(kind, name, m)
            yield [kind, name, list(m.shape), 32], _cpu_bytes(m)


def arch_of(model: nn.Module) -> str | None:
    """The :func:`hawqlib.models.get` name whose network has ``model``'s class and tensor names and shapes
    (built on the meta device: no memory, no initialisation); None when no registered network matches."""
    from .models import get, names

    want = (type(model), {k: tuple(v.shape) for k, v in model.state_dict().items()})
    for name in names():
        with torch.device("meta"):
            cand = get(name)
        if (type(cand), {k: tuple(v.shape) for k, v in cand.state_dict().items()}) == want:
            return name
    return None


def save_packed(qmodel: nn.Module, path: str | os.PathLike, *, arch: str | None = None) -> int:
    """Write ``qmodel`` (from :func:`hawqlib.quant.swap.quantize_model`) to ``path`` in the packed format.

    Parameters
    ----------
    qmodel : nn.Module
        The quantized model, its quantized modules as :func:`hawqlib.quant.swap.quantize_model` makes them.
    path : str or path
        The file to write.
    arch : str, optional
        A constructor name of :func:`hawqlib.models.get`, recorded so that :func:`load_packed` can rebuild the
        network without being given one.

    Returns
    -------
    int
        The file size in bytes.
    """
    cfg = getattr(qmodel, "bit_config", None)
    if not isinstance(cfg, BitConfig) or not any(isinstance(m, QUANT_MODULES) for m in qmodel.modules()):
        raise ValueError("save_packed needs a quantized model returned by hawqlib.quant.quantize_model")
    if arch is not None:
        from .models import names
        if arch not in names():
            raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(names())}")
    entries, records = [], []
    for entry, payload in _records(qmodel):
        entries.append(entry)
        records.append(payload)
    return write_packed(path, {"bit_config": cfg.to_dict(), "arch": arch, "entries": entries}, records)


def read_header(path: str | os.PathLike) -> dict:
    """The decoded header of a packed file (format, bit_config, arch, entries), its digests verified."""
    return read_packed(path, warn=False)[0]



def _finite(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: record {name!r} holds non-finite numbers (NaN or infinity)")
    return t


def _check_accounted(entries: list, qmodel: nn.Module, where: str) -> None:
    """Every record of the target model present exactly once, and no record it lacks (section 4's file
    holds the whole model: a missing record would leave random weights)."""
    want = [(k, n) for k, n, _ in _walk(qmodel)]
    got = Counter((e[0], e[1]) for e in entries)
    missing = [f"{k} {n}" for k, n in want if (k, n) not in got]
    extra = [f"{k} {n}" for k, n in got if (k, n) not in set(want)]
    dup = sorted(f"{k} {n}" for (k, n), c in got.items() if c > 1)
    if missing or extra or dup:
        raise ValueError(f"{where} does not hold this model whole: missing records {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, records the model lacks {extra[:5]}, "
                         f"duplicated {dup[:5]} (header field 'entries')")


@torch.no_grad()
def load_packed(path: str | os.PathLike, model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Rebuild the quantized model stored at ``path``, in eval mode.

    In eval mode the result's outputs equal those of the fake-quantized model that was saved, bit for bit.

    Parameters
    ----------
    path : str or path
        The packed file (written by :func:`save_packed`).
    model : nn.Module, callable or None
        An FP32 instance of the architecture (left untouched) or a callable returning one; None uses the
        ``arch`` recorded by :func:`save_packed`.
    """
    header, payload = read_packed(path)
    where = repr(os.fspath(path))
    if model is None:
        if not header.get("arch"):
            raise ValueError(f"{where} records no architecture (written before hawqlib recorded it, as the "
                             "committed artifacts were): pass model= (an instance or a constructor)")
        from .models import get, names
        if header["arch"] not in names():
            raise ValueError(f"{where}: header field 'arch' is {header['arch']!r}; valid: {', '.join(names())}")
        model = get(header["arch"])
    elif not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"model must be an nn.Module, a callable returning one, or None; got {type(model).__name__}")
        model = model()
    try:
        cfg = BitConfig.from_dict(header["bit_config"])
        qmodel = quantize_model(model, cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: header field 'bit_config' does not fit the model: {e}") from None
    _check_accounted(header["entries"], qmodel, where)
    mods = dict(qmodel.named_modules())
    params = dict(qmodel.named_parameters())
    buffers = dict(qmodel.named_buffers())
    off = 0
    for kind, name, shape, bits in header["entries"]:
        size = entry_size(kind, shape, bits)
        chunk = payload[off:off + size]
        if len(chunk) != size:
            raise ValueError(f"packed file {os.fspath(path)!r} is truncated at entry {name!r}")
        off += size
        if kind in ("f", "b"):
            p = (params if kind == "f" else buffers).get(name)
            if p is None or list(p.shape) != shape:
                raise ValueError(f"{where}: {'parameter' if kind == 'f' else 'buffer'} {name!r} of shape {shape} "
                                 "does not match the model")
            p.copy_(_finite(torch.frombuffer(bytearray(chunk), dtype=torch.float32).view(shape), name, where))
            continue
        m = mods.get(name)
        if kind == "q":
            if not isinstance(m, QUANT_MODULES) or list(m.weight.shape) != shape or m.weight_bits != bits:
                raise ValueError(f"quantized weight {name!r} ({shape}, {bits} bits) does not match the model")
            n = math.prod(shape)
            nb = math.ceil(n * bits / 8)
            u = torch.from_numpy(unpack_bits(bytes(chunk[:nb]), bits, n).astype(np.int16))
            k = 2 * u - weight_code_limit(bits)
            scale = _finite(torch.frombuffer(bytearray(chunk[nb:]), dtype=torch.float32), name, where)
            if bool((scale < 0).any()):
                raise ValueError(f"{where}: record {name!r} holds a negative scale")
            m.weight.copy_(k.float().view(shape) * scale.view(-1, *([1] * (len(shape) - 1))))
            m.fixed_scale = scale.to(m.weight.device)
        elif kind == "bn0":
            if not isinstance(m, _BatchNorm) or m.num_features != shape[0] or m.affine:
                raise ValueError(f"{where}: BatchNorm {name!r} without affine parameters, {shape[0]} channels, does "
                                 "not match the model's")
            c = shape[0]
            mv = _finite(torch.frombuffer(bytearray(chunk[:8 * c]), dtype=torch.float32).view(2, c), name, where)
            eps = struct.unpack("<d", bytes(chunk[8 * c:]))[0]
            if bool((mv[1] < 0).any()) or not (math.isfinite(eps) and eps >= 0):
                raise ValueError(f"{where}: record {name!r} holds a negative variance or eps")
            m.running_mean.copy_(mv[0])
            m.running_var.copy_(mv[1])
            m.eps = eps
        elif kind == "bn":
            if not isinstance(m, _BatchNorm) or m.num_features != shape[0] or not m.affine:
                why = "" if not isinstance(m, _BatchNorm) or m.affine else " (the model's has no affine parameters)"
                raise ValueError(f"{where}: BatchNorm {name!r} with {shape[0]} channels does not match the "
                                 f"model{why}")
            ab = _finite(torch.frombuffer(bytearray(chunk), dtype=torch.float32).view(2, shape[0]), name, where)
            m.weight.copy_(ab[0])
            m.bias.copy_(ab[1])
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            m.eps = 0.0
        elif kind == "act":
            if not isinstance(m, QuantAct) or m.bits != bits:
                raise ValueError(f"activation quantizer {name!r} ({bits} bits) does not match the model")
            sc = _finite(torch.frombuffer(bytearray(chunk[:4]), dtype=torch.float32), name, where)
            if not float(sc) > 0:
                raise ValueError(f"{where}: record {name!r} holds the activation scale {float(sc)}; it must be > 0")
            m.scale.copy_(sc)
            m.zero_point.copy_(torch.frombuffer(bytearray(chunk[4:]), dtype=torch.int32))
            s, z = float(m.scale), int(m.zero_point)
            m.running_min.fill_((m.quant_min - z) * s)
            m.running_max.fill_((m.quant_max - z) * s)
        else:
            raise ValueError(f"unknown record kind {kind!r} in {os.fspath(path)!r}")
    if off != len(payload):
        raise ValueError(f"packed file {os.fspath(path)!r} has {len(payload) - off} unexpected trailing bytes")
    return qmodel.eval()
