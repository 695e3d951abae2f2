"""The real packed file of a quantized model: bit-packed integer weights, scales and the rest (section 4).

The paper's compression figures are arithmetic on bit counts; this module writes the bytes, so
that :func:`hawqlib.size.model_size_bytes` can be checked against a file on disk, and reads them
back into a model that computes exactly what the fake-quantized model computes.

File format ``hawqlib.packed/2`` (:data:`PACKED_FORMAT`; our design), little-endian, written atomically:

====================  ======================================================================
bytes                 content
====================  ======================================================================
8                     magic ``b"HAWQPACK"``
4 (uint32)            preamble version (1, ``VERSION``)
4 (uint32)            ``H``: length of the header
H                     header: zlib-compressed UTF-8 JSON ``{"format", "bit_config", "arch",
                      "entries"}``; ``entries`` lists the payload records in order
rest                  payload: the records, back to back
====================  ======================================================================

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
- ``"f"`` a float32 parameter ``name`` (biases, weights outside the BitConfig).
- ``"act"`` the activation quantizer ``name``: scale (float32) and zero point (int32).

These are exactly the numbers :mod:`hawqlib.size` counts, so the file exceeds
``model_size_bytes`` only by the 16-byte preamble and the compressed header.

:func:`load_packed` trusts nothing in a file: the header is bounded (:data:`MAX_HEADER_BYTES` on disk,
:data:`MAX_HEADER_JSON` decompressed), every field is checked (a ValueError names the field), every
module of the target model must have its record exactly once, and every stored number must be finite.
``arch`` names the network (:func:`arch_of`); files written before it was recorded hold null there
and are read given the model.

A restored model is for inference (eval mode): its BatchNorms hold the folded form, and its
quantized modules carry their stored scales (``fixed_scale``), so the weight grid cannot drift.
"""
from __future__ import annotations

import io
import json
from collections import Counter
import math
import os
import struct
import zlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .bitconfig import BitConfig, check_bits
from .quant import QUANT_MODULES, QuantAct, quantize_model, weight_code_limit
from .files import atomic_write_bytes

__all__ = ["CODE_VERSION", "save_packed", "load_packed", "read_header", "pack_bits", "unpack_bits", "PACKED_FORMAT",
           "MAGIC", "arch_of", "MAX_HEADER_BYTES", "MAX_HEADER_JSON"]

MAGIC = b"HAWQPACK"
VERSION = 1
PACKED_FORMAT = "hawqlib.packed/2"
#: Bumped whenever the numbers this module computes change (part of artifact cache keys).
CODE_VERSION = 2


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers ``0 <= v < 2**bits`` into ``ceil(len * bits / 8)`` bytes (LSB first)."""
    bits = check_bits(bits)
    raw = np.asarray(values).reshape(-1)
    if raw.size and (int(raw.min()) < 0 or int(raw.max()) >= 2 ** bits):
        bad = int(raw.max()) if int(raw.max()) >= 2 ** bits else int(raw.min())
        raise ValueError(f"value {bad} does not fit in {bits} unsigned bits (0..{2 ** bits - 1})")
    v = raw.astype(np.uint8)
    if bits == 8:
        return v.tobytes()
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` unsigned integers of ``bits`` bits (uint8 array)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return buf[:count].copy()
    planes = np.unpackbits(buf, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


@torch.no_grad()
def _bn_affine(bn: _BatchNorm):
    """``(a, b)``: the per-channel affine PyTorch's eval-mode BatchNorm applies, read off its own kernel."""
    c = bn.num_features
    shape = (1, c) + (1,) * {nn.BatchNorm1d: 0, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(bn), 2)
    w = bn.weight if bn.affine else None
    zeros = torch.zeros(c, dtype=bn.running_mean.dtype)
    # y(1) with zero mean and zero bias is a; y(0) with the real mean and bias is b.
    a = F.batch_norm(torch.ones(shape), zeros, bn.running_var, w, zeros if bn.affine else None, False, 0.0, bn.eps)
    b = F.batch_norm(torch.zeros(shape), bn.running_mean, bn.running_var, w, bn.bias, False, 0.0, bn.eps)
    return a.reshape(c).float(), b.reshape(c).float()


def _walk(qmodel: nn.Module):
    """Yield ``(kind, name, object)`` for every record of the format, in module order."""
    counted = set()
    for name, m in qmodel.named_modules():
        prefix = name + "." if name else ""
        if isinstance(m, _BatchNorm):
            yield "bn", name, m
            counted.update(id(p) for p in m.parameters(recurse=False))
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


def _records(qmodel: nn.Module):
    """Yield (entry, payload bytes) in module order."""
    for kind, name, m in _walk(qmodel):
        if kind == "bn":
            if m.running_mean is None or m.running_var is None:
                raise ValueError(f"BatchNorm {name!r} tracks no running statistics: it has no inference form to export")
            a, b = _bn_affine(m)
            yield ["bn", name, [m.num_features], 32], a.numpy().tobytes() + b.numpy().tobytes()
        elif kind == "act":
            if not m.has_range():
                raise ValueError(f"activation quantizer {name!r} has no range yet: calibrate or fine-tune first")
            yield (["act", name, [], m.bits],
                   m.scale.detach().float().numpy().tobytes() + m.zero_point.to(torch.int32).numpy().tobytes())
        elif kind == "q":
            k, scale = m.int_weight()
            u = (k.to(torch.int16) + weight_code_limit(m.weight_bits)) // 2
            payload = pack_bits(u.to(torch.uint8).numpy(), m.weight_bits) + scale.float().numpy().tobytes()
            yield ["q", name, list(m.weight.shape), m.weight_bits], payload
        else:
            yield ["f", name, list(m.shape), 32], m.detach().float().contiguous().numpy().tobytes()


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

    ``arch`` (optional) names a constructor of :func:`hawqlib.models.get` so that
    :func:`load_packed` can rebuild the network without being given one. Returns the file size.
    """
    cfg = getattr(qmodel, "bit_config", None)
    if not isinstance(cfg, BitConfig) or not any(isinstance(m, QUANT_MODULES) for m in qmodel.modules()):
        raise ValueError("save_packed needs a quantized model returned by hawqlib.quant.quantize_model")
    if arch is not None:
        from .models import names
        if arch not in names():
            raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(names())}")
    entries, body = [], io.BytesIO()
    for entry, payload in _records(qmodel):
        entries.append(entry)
        body.write(payload)
    header = {"format": PACKED_FORMAT, "bit_config": cfg.to_dict(), "arch": arch, "entries": entries}
    hbytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    data = MAGIC + struct.pack("<II", VERSION, len(hbytes)) + hbytes + body.getvalue()
    atomic_write_bytes(path, data)
    return len(data)


#: Bounds on the header: compressed bytes on disk and decompressed JSON (a ResNet50 needs well under both).
MAX_HEADER_BYTES = 1 << 20
MAX_HEADER_JSON = 16 << 20
_BITS = {"q": range(1, 9), "act": range(1, 33), "bn": range(32, 33), "f": range(32, 33)}


def _read(path):
    where = repr(os.fspath(path))
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != MAGIC:
        raise ValueError(f"{where} is not a hawqlib packed model (bad magic {data[:8]!r})")
    if len(data) < 16:
        raise ValueError(f"{where} is truncated inside its 16-byte preamble ({len(data)} bytes)")
    version, hlen = struct.unpack("<II", data[8:16])
    if version != VERSION:
        raise ValueError(f"unsupported packed format version {version}; this hawqlib reads version {VERSION}")
    if hlen > min(MAX_HEADER_BYTES, len(data) - 16):
        raise ValueError(f"{where}: header length {hlen} is beyond the file ({len(data) - 16} bytes after the "
                         f"preamble) or the {MAX_HEADER_BYTES}-byte bound")
    try:
        z = zlib.decompressobj()
        text = z.decompress(data[16:16 + hlen], MAX_HEADER_JSON)
        if z.unconsumed_tail:
            raise ValueError(f"{where}: header expands beyond {MAX_HEADER_JSON} bytes (corrupt or a zlib bomb)")
        if not z.eof:
            raise ValueError(f"{where}: header is truncated (its zlib stream does not end)")
        header = json.loads(text)
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt header in {where}: {e}") from None
    _check_header(header, where)
    return header, memoryview(data)[16 + hlen:]


def _check_header(header, where: str) -> None:
    """ValueError naming the first malformed field of a decoded header."""
    if not isinstance(header, dict):
        raise ValueError(f"{where}: header is not a JSON object")
    if header.get("format") != PACKED_FORMAT:
        raise ValueError(f"{where}: header field 'format' is {header.get('format')!r}; expected {PACKED_FORMAT!r}")
    if not isinstance(header.get("bit_config"), dict):
        raise ValueError(f"{where}: header field 'bit_config' must be an object")
    arch = header.get("arch")
    if arch is not None and not isinstance(arch, str):
        raise ValueError(f"{where}: header field 'arch' must be a model name or null, got {arch!r}")
    entries = header.get("entries")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: header field 'entries' must be a non-empty list of records")
    for i, e in enumerate(entries):
        ok = isinstance(e, list) and len(e) == 4 and e[0] in _BITS and isinstance(e[1], str)
        ok = ok and isinstance(e[2], list) and all(type(d) is int and d >= 0 for d in e[2])
        ok = ok and type(e[3]) is int and e[3] in _BITS[e[0]]
        ok = ok and (len(e[2]) >= 1 and e[2][0] >= 1 if e[0] == "q" else len(e[2]) == 1 if e[0] == "bn" else True)
        if not ok:
            raise ValueError(f"{where}: header field 'entries[{i}]' is {e!r}; a record is [kind, name, shape, bits] "
                             f"with kind in {sorted(_BITS)}, shape a list of sizes and bits 1..8 for 'q'")


def read_header(path: str | os.PathLike) -> dict:
    """The decoded header of a packed file (format, bit_config, arch, entries)."""
    return _read(path)[0]


def _entry_size(kind: str, shape: list, bits: int) -> int:
    n = math.prod(shape)
    if kind == "q":
        return math.ceil(n * bits / 8) + 4 * shape[0]
    if kind == "bn":
        return 8 * shape[0]
    if kind == "act":
        return 8
    return 4 * n


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

    ``model``: an FP32 instance of the architecture (left untouched) or a callable returning
    one; None uses the ``arch`` recorded by :func:`save_packed`. In eval mode the result's
    outputs equal those of the fake-quantized model that was saved, bit for bit.
    """
    header, payload = _read(path)
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
    off = 0
    for kind, name, shape, bits in header["entries"]:
        size = _entry_size(kind, shape, bits)
        chunk = payload[off:off + size]
        if len(chunk) != size:
            raise ValueError(f"packed file {os.fspath(path)!r} is truncated at entry {name!r}")
        off += size
        if kind == "f":
            p = params.get(name)
            if p is None or list(p.shape) != shape:
                raise ValueError(f"parameter {name!r} of shape {shape} does not match the model")
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
            m.fixed_scale = scale.clone()
        elif kind == "bn":
            if not isinstance(m, _BatchNorm) or m.num_features != shape[0] or not m.affine:
                raise ValueError(f"BatchNorm {name!r} with {shape[0]} channels does not match the model")
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
