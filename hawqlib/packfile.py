"""The container of a packed model file: preamble, digested header, records; bit packing (section 4's bytes).

:mod:`hawqlib.export` decides what the records hold; this module writes and reads the container around them
and verifies it before anything is built from it.

File format ``hawqlib.packed/3`` (:data:`PACKED_FORMAT`; our design), little-endian, written atomically:

====================  ======================================================================
bytes                 content
====================  ======================================================================
8                     magic ``b"HAWQPACK"``
4 (uint32)            preamble version (2, ``VERSION``)
4 (uint32)            ``H``: length of the header
32                    SHA-256 of the H header bytes
H                     header: zlib-compressed UTF-8 JSON ``{"format", "bit_config", "arch",
                      "entries", "sha256"}``; ``entries`` lists the payload records in order,
                      ``sha256`` the SHA-256 (hex) of each record's bytes, in the same order
rest                  payload: the records, back to back
====================  ======================================================================

The file verifies itself (our choice: a file a user ships travels without the artifact manifest that
vouches for it): the preamble's digest covers the header, the header's digests cover every record, and
trailing bytes are refused, so a flipped bit anywhere is a ValueError naming the file and the header or
the record, raised before any model is built. Files of the previous format ``hawqlib.packed/2``
(preamble version 1, 16-byte preamble, no digests; every committed artifact up to this version) still
load, with an :class:`UnverifiedPackedWarning`: their numbers are range-checked but cannot be verified.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import warnings
import zlib

import numpy as np

from .bitconfig import check_bits
from .files import atomic_write_bytes

__all__ = ["MAGIC", "VERSION", "PACKED_FORMAT", "LEGACY_VERSION", "LEGACY_FORMAT", "MAX_HEADER_BYTES",
           "MAX_HEADER_JSON", "UnverifiedPackedWarning", "pack_bits", "unpack_bits", "write_packed", "read_packed",
           "entry_size"]

MAGIC = b"HAWQPACK"
VERSION = 2
PACKED_FORMAT = "hawqlib.packed/3"
#: The previous format (preamble version 1): no digests; read with :class:`UnverifiedPackedWarning`.
LEGACY_VERSION, LEGACY_FORMAT = 1, "hawqlib.packed/2"


class UnverifiedPackedWarning(UserWarning):
    """A packed file of the previous format (``hawqlib.packed/2``), which records no digests: it was read, but
    a corrupted number in it could not be detected. Re-save it with :func:`save_packed` to get a verifiable file."""



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



def write_packed(path: str | os.PathLike, header: dict, records: list) -> int:
    """Write ``header`` (given ``format`` and ``sha256`` here) and the ``records`` (bytes, in the order of the
    header's ``entries``) to ``path`` atomically; returns the file size."""
    header = {"format": PACKED_FORMAT, **header, "sha256": [hashlib.sha256(r).hexdigest() for r in records]}
    hbytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    data = (MAGIC + struct.pack("<II", VERSION, len(hbytes)) + hashlib.sha256(hbytes).digest() + hbytes
            + b"".join(records))
    atomic_write_bytes(path, data)
    return len(data)


#: Bounds on the header: compressed bytes on disk and decompressed JSON (a ResNet50 needs well under both).
MAX_HEADER_BYTES = 1 << 20
MAX_HEADER_JSON = 16 << 20
_BITS = {"q": range(1, 9), "act": range(1, 33), "bn": range(32, 33), "bn0": range(32, 33), "f": range(32, 33),
         "b": range(32, 33)}


def read_packed(path, *, warn: bool = True):
    """``(header, payload)`` of a packed file, its digests verified (a legacy file: with a warning)."""
    where = repr(os.fspath(path))
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != MAGIC:
        raise ValueError(f"{where} is not a hawqlib packed model (bad magic {data[:8]!r})")
    if len(data) < 16:
        raise ValueError(f"{where} is truncated inside its preamble ({len(data)} bytes)")
    version, hlen = struct.unpack("<II", data[8:16])
    if version not in (VERSION, LEGACY_VERSION):
        raise ValueError(f"{where}: unsupported packed format version {version}; this hawqlib reads versions "
                         f"{VERSION} ({PACKED_FORMAT}) and {LEGACY_VERSION} ({LEGACY_FORMAT})")
    start = 16 if version == LEGACY_VERSION else 48
    if len(data) < start:
        raise ValueError(f"{where} is truncated inside its {start}-byte preamble ({len(data)} bytes)")
    if hlen > min(MAX_HEADER_BYTES, len(data) - start):
        raise ValueError(f"{where}: header length {hlen} is beyond the file ({len(data) - start} bytes after the "
                         f"preamble) or the {MAX_HEADER_BYTES}-byte bound")
    hbytes = data[start:start + hlen]
    if version == VERSION and hashlib.sha256(hbytes).digest() != data[16:48]:
        raise ValueError(f"{where}: the header does not match the SHA-256 the preamble records: the file was "
                         "corrupted or edited after it was written; use the original file")
    try:
        z = zlib.decompressobj()
        text = z.decompress(hbytes, MAX_HEADER_JSON)
        if z.unconsumed_tail:
            raise ValueError(f"{where}: header expands beyond {MAX_HEADER_JSON} bytes (corrupt or a zlib bomb)")
        if not z.eof:
            raise ValueError(f"{where}: header is truncated (its zlib stream does not end)")
        header = json.loads(text)
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt header in {where}: {e}") from None
    fmt = PACKED_FORMAT if version == VERSION else LEGACY_FORMAT
    _check_header(header, where, fmt)
    payload = memoryview(data)[start + hlen:]
    if version == VERSION:
        _check_digests(header, payload, where)
    elif warn:
        warnings.warn(f"{where} is a {LEGACY_FORMAT} file, written before packed files recorded digests: its "
                      "numbers are range-checked but cannot be verified; re-save it with save_packed to get a "
                      f"{PACKED_FORMAT} file that verifies itself", UnverifiedPackedWarning, stacklevel=4)
    return header, payload


def _check_digests(header: dict, payload: memoryview, where: str) -> None:
    """ValueError naming the first record whose bytes do not match the SHA-256 the header records."""
    off = 0
    for i, ((kind, name, shape, bits), want) in enumerate(zip(header["entries"], header["sha256"])):
        size = entry_size(kind, shape, bits)
        chunk = payload[off:off + size]
        if len(chunk) != size:
            raise ValueError(f"packed file {where} is truncated at record {i} ({kind} {name!r})")
        if hashlib.sha256(chunk).hexdigest() != want:
            raise ValueError(f"packed file {where}: record {i} ({kind} {name!r}) does not match the SHA-256 its "
                             "header records: the file was corrupted or edited after it was written; use the "
                             "original file")
        off += size
    if off != len(payload):
        raise ValueError(f"packed file {where} has {len(payload) - off} unexpected trailing bytes")


def _check_header(header, where: str, fmt: str = PACKED_FORMAT) -> None:
    """ValueError naming the first malformed field of a decoded header."""
    if not isinstance(header, dict):
        raise ValueError(f"{where}: header is not a JSON object")
    if header.get("format") != fmt:
        raise ValueError(f"{where}: header field 'format' is {header.get('format')!r}; expected {fmt!r}")
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
    if fmt == PACKED_FORMAT:
        digests = header.get("sha256")
        if (not isinstance(digests, list) or len(digests) != len(entries)
                or not all(isinstance(d, str) and len(d) == 64 for d in digests)):
            raise ValueError(f"{where}: header field 'sha256' must list one SHA-256 (64 hex digits) per record")



def entry_size(kind: str, shape: list, bits: int) -> int:
    n = math.prod(shape)
    if kind == "q":
        return math.ceil(n * bits / 8) + 4 * shape[0]
    if kind == "bn":
        return 8 * shape[0]
    if kind == "bn0":
        return 8 * shape[0] + 8
    if kind == "act":
        return 8
    return 4 * n

