"""CIFAR-10's torchvision batch files (``cifar-10-batches-py``), read without trusting them.

The files are Python pickles, and unpickling runs whatever code a pickle names. So each file's
MD5 is checked against torchvision's published checksum before it is read, and it is read by an
unpickler that admits only what the format holds: dicts, lists, bytes, str, numbers and uint8
numpy arrays. The decoded split follows :mod:`hawqlib.repro.data`'s fixed order and digest.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np

__all__ = ["DataIntegrityError", "batch_files", "published_md5", "load_batch", "decode_batches",
           "CIFAR10_CLASSES"]

#: The class names, label 0 to 9.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


class DataIntegrityError(ValueError):
    """A data file that is not what the format promises: wrong checksum, unreadable image, stray content."""


def batch_files(split: str) -> list[str]:
    """The batch file names of a split, in reading order."""
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def published_md5() -> dict[str, str]:
    """torchvision's published MD5 of each CIFAR-10 batch file."""
    from torchvision.datasets import CIFAR10

    return dict(CIFAR10.train_list + CIFAR10.test_list)


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1, np.uint8))[0]  # numpy's own array reconstructor


def _reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not admitted")
    return _RECONSTRUCT(subtype, shape, dtype_code)


def _dtype(obj, align=False, copy=False):
    if obj != "u1":
        raise pickle.UnpicklingError(f"dtype {obj!r} is not admitted (the batch format holds uint8 pixels)")
    return np.dtype(obj, align, copy)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch: dicts, lists, bytes, str, numbers and uint8 numpy arrays, nothing else.

    Any other global (the way a pickle runs code) is refused before it is looked up.
    """

    _ADMITTED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
                 ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
                 ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _dtype}

    def find_class(self, module, name):
        try:
            return self._ADMITTED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not admitted in a CIFAR-10 batch") from None


def load_batch(path: Path, md5: str) -> dict:
    """Read one batch file: its MD5 checked against ``md5`` first, then the restricted unpickler."""
    raw = path.read_bytes()
    got = hashlib.md5(raw).hexdigest()
    if got != md5:
        raise DataIntegrityError(f"{path}: MD5 {got} differs from torchvision's published {md5}; it is not the "
                                 "original CIFAR-10 batch file (or it is corrupt) and was not unpickled. Replace "
                                 "it with the original, or delete the folder and let torchvision download it.")
    try:
        d = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        raise DataIntegrityError(f"{path} is not a CIFAR-10 batch ({type(exc).__name__}: {exc})") from None
    ok = isinstance(d, dict) and isinstance(d.get(b"data"), np.ndarray) and d[b"data"].dtype == np.uint8
    ok = ok and d[b"data"].ndim == 2 and d[b"data"].shape[1] == 3072
    n = d[b"data"].shape[0] if ok else 0
    ok = ok and isinstance(d.get(b"labels"), list) and len(d[b"labels"]) == n
    ok = ok and all(type(v) is int and 0 <= v < 10 for v in d[b"labels"])
    ok = ok and isinstance(d.get(b"filenames"), list) and len(d[b"filenames"]) == n
    ok = ok and all(isinstance(v, bytes) for v in d[b"filenames"])
    if not ok:
        raise DataIntegrityError(f"{path} is not a CIFAR-10 batch: expected a dict of b'data' (N x 3072 uint8), "
                                 "b'labels' (N ints in 0..9) and b'filenames' (N bytes)")
    return d


def decode_batches(folder: Path, split: str):
    md5 = published_md5()
    rows = []
    for fn in batch_files(split):
        d = load_batch(folder / fn, md5[fn])
        data = d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for img, lab, name in zip(data, d[b"labels"], d[b"filenames"]):
            rows.append((int(lab), name.decode(), img))
    rows.sort(key=lambda r: (r[0], r[1]))
    h = hashlib.sha256()
    for lab, name, img in rows:
        h.update(f"{split}/{CIFAR10_CLASSES[lab]}/{name}".encode())
        h.update(np.ascontiguousarray(img).tobytes())
    images = np.stack([r[2] for r in rows])
    labels = np.asarray([r[0] for r in rows], dtype=np.int64)
    return images, labels, h.hexdigest(), [r[1] for r in rows]
