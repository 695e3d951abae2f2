"""Data: CIFAR-10 and ImageNet loading, the decode cache, and batch transforms.

CIFAR-10 is found, in this order, at

1. a ``root`` passed by argument, else the ``HAWQ_DATA`` environment variable (when either is
   given it must hold CIFAR-10: no silent fallback to another copy);
2. ``data/`` inside the project checkout (:func:`hawqlib.repro.paths.project_root`);
3. otherwise torchvision downloads it into that ``data/`` (needs the network).

Both on-disk layouts are read: torchvision's ``cifar-10-batches-py`` and an ImageFolder
tree ``cifar10/{train,test}/<class>/*.png``. Batch files are pickles: each is checked against
torchvision's published MD5 before it is read, and read by an unpickler that admits only the
types the format holds (no code runs from a data folder). In class folders, hidden files
(``.DS_Store``) and subfolders are skipped; any other file that is not a 32x32 image is an error
naming it.

The images are decoded once into a cache file (:func:`hawqlib.repro.paths.cache_dir`: ``data/cache/`` in a
checkout, ignored by git). The cache is keyed by the source's content: a SHA-256 over every source file's
name and the SHA-256 of its bytes (:func:`_content_key`), computed once per process for each listing of names,
sizes and modification times, so editing an image (even one that keeps its size and time stamp, as ``cp -p``
and ``rsync -a`` from another copy do), adding or removing one rebuilds the cache, as does ``FORCE=1``;
an edit made while a process runs is seen by the next process. All of the cache's fields are inside the
SHA-256 it records, verified on every load; a corrupt or partial cache is rebuilt, never used. One process
builds a given cache at a time (the others wait for it). In the ImageFolder layout a split folder may hold
only the ten class folders (and hidden files), and every image must be an 8-bit RGB PNG as CIFAR-10's are:
anything else (an eleventh class folder, a grayscale or RGBA image) is an error naming it, never ignored
or converted.

Image order is fixed and documented: by class label, then by original CIFAR file name.
This order is the same for both layouts, so the same seed gives the same batches whichever
layout the data came in. Shuffles are seeded ``torch.Generator`` draws (see
:class:`TensorLoader`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .batches import CIFAR10_CLASSES, DataIntegrityError
from .batches import batch_files as _batch_files, decode_batches as _decode_batches
from .paths import cache_dir, project_root  # noqa: F401  (hawqlib.repro.paths: where files go, never site-packages)
from ..files import atomic_write, atomic_write_json, file_sha256
from .artifacts import folder_lock, remove_orphan_tmp

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "DataSource", "CIFAR10Split", "DataNotFoundError", "DataIntegrityError", "cifar10", "cifar10_digest", "find_cifar10",
    "TensorLoader", "augment_cifar", "normalize",
    "project_root", "cache_dir",
]

#: Training-set channel mean and std of CIFAR-10 (standard figures, recomputed in tests).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CACHE_VERSION = 3  # the cache's own format and keying (3: keyed by content); the data digest does not depend on it


class DataNotFoundError(FileNotFoundError):
    """No data set where we looked, and no way to download it."""


class DataSource:
    """What a pipeline step reads: a key, seeded loaders, a Hessian sample. Subclasses define all four."""

    #: A short name for messages and manifests.
    name = "data"

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def key(self) -> dict:
        """A JSON-able digest of the data, part of every artifact key built on it."""
        raise NotImplementedError

    def loaders(self, *, batch_size: int, seed: int, train_subset: int | None = None,
                test_subset: int | None = None):
        """``(train, test)``: the training loader (shuffled and augmented, seeded by ``seed`` and the epoch
        set with ``set_epoch``) and the evaluation loader; subsets take a seeded sample of each split."""
        raise NotImplementedError

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded sample of ``n`` un-augmented training inputs and their labels (the Hessian's data)."""
        raise NotImplementedError


@dataclass(frozen=True)
class CIFAR10Split:
    """One split of CIFAR-10, decoded: ``images`` uint8 (N, 3, 32, 32), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    digest: str  #: SHA-256 of the split, computed as described in :func:`cifar10_digest`
    names: tuple = ()  #: original file name of each image, in the same order

    def __len__(self) -> int:
        return len(self.labels)


# --------------------------------------------------------------------------- finding

def _layout(root: Path) -> tuple[str, Path] | None:
    """Return (layout, folder) if ``root`` holds CIFAR-10 in a layout we read."""
    for cand in (root / "cifar-10-batches-py", root):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return "batches", cand
    for cand in (root / "cifar10", root):
        if (cand / "train" / CIFAR10_CLASSES[0]).is_dir() and (cand / "test" / CIFAR10_CLASSES[0]).is_dir():
            return "imagefolder", cand
    return None


def find_cifar10(root: str | os.PathLike | None = None, *, download: bool = True) -> tuple[str, Path]:
    """Locate CIFAR-10 (argument, ``HAWQ_DATA``, project ``data/``, download); return (layout, folder)."""
    tried: list[Path] = []
    env = os.environ.get("HAWQ_DATA")
    if root is None and env is not None and not env.strip():
        raise DataNotFoundError("HAWQ_DATA is set but empty: unset it, or set it to a folder holding "
                                "cifar-10-batches-py/ or cifar10/{train,test}/<class>/*.png")
    given, what = (root, "the data root given") if root is not None else (env, "HAWQ_DATA")
    if given is not None:
        p = Path(given).expanduser()
        found = _layout(p) if p.is_dir() else None
        if found:
            return found
        # a location that was asked for and is wrong is an error, never a fallback to another copy
        state = "does not exist" if not p.exists() else "is a file, not a folder" if not p.is_dir() else \
            "holds no CIFAR-10"
        raise DataNotFoundError(
            f"No CIFAR-10 at {p} ({what}; it {state}): expected {p}/cifar-10-batches-py/ (torchvision layout) "
            f"or {p}/cifar10/{{train,test}}/<class>/*.png (ImageFolder layout).")
    local = project_root() / "data"
    found = _layout(local)
    if found:
        return found
    tried.append(local)
    if download:
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(local), train=True, download=True)
            CIFAR10(str(local), train=False, download=True)
        except Exception as exc:  # network errors come in many types
            raise DataNotFoundError(_not_found_message(tried, exc)) from exc
        found = _layout(local)
        if found:
            return found
    raise DataNotFoundError(_not_found_message(tried, None))


def _not_found_message(tried: list[Path], exc: Exception | None) -> str:
    where = ", ".join(str(t) for t in tried)
    why = f" The download failed: {exc}." if exc else ""
    return ("CIFAR-10 was not found (looked in: " + where + ")." + why + " Provide it in one of three ways: "
            "pass root=<folder> (or --data on the command line); set HAWQ_DATA=<folder>; or let torchvision "
            "download it into data/ (needs the network). A folder may hold cifar-10-batches-py/ or "
            "cifar10/{train,test}/<class>/*.png.")


# --------------------------------------------------------------------------- decoding

def _class_files(d: Path) -> list[str]:
    """The image files of a class folder, sorted by name: hidden files and subfolders are skipped."""
    return sorted(e.name for e in os.scandir(d) if not e.name.startswith(".") and e.is_file())


def _decode_imagefolder(folder: Path, split: str):
    from PIL import Image

    h = hashlib.sha256()
    images, labels, names = [], [], []
    for label, cls in enumerate(CIFAR10_CLASSES):
        d = folder / split / cls
        if not d.is_dir():
            raise DataNotFoundError(f"{d} is missing: the ImageFolder layout needs one folder per class "
                                    f"({', '.join(CIFAR10_CLASSES)}).")
        files = _class_files(d)
        if not files:
            raise DataNotFoundError(f"{d} holds no images: every class folder needs its <name>.png files.")
        for name in files:
            try:
                with Image.open(d / name) as im:
                    mode = im.mode
                    arr = np.asarray(im, dtype=np.uint8) if mode == "RGB" else None
            except Exception as exc:  # PIL raises many types for a bad file
                raise DataIntegrityError(f"{d / name} is not a readable image ({type(exc).__name__}: {exc}); "
                                         "replace it with the original CIFAR-10 file or remove it") from None
            if mode != "RGB":
                raise DataIntegrityError(f"{d / name} is a {mode!r} image; CIFAR-10's images are 8-bit RGB: replace it "
                                         "with the original file (nothing is converted silently)")
            if arr.shape != (32, 32, 3):
                raise DataIntegrityError(f"{d / name}: expected a 32x32 RGB image, got shape {arr.shape}")
            h.update(f"{split}/{cls}/{name}".encode())
            h.update(arr.tobytes())
            images.append(arr)
            labels.append(label)
            names.append(name)
    return np.stack(images), np.asarray(labels, dtype=np.int64), h.hexdigest(), names


# --------------------------------------------------------------------------- cache

def _sources(layout: str, folder: Path, split: str) -> list[tuple[str, Path]]:
    """``(name, path)`` of every file the decode reads, in its order; an extra folder in an ImageFolder split
    is an error naming it (a class CIFAR-10 lacks would be left out silently otherwise)."""
    if layout == "batches":
        return [(fn, folder / fn) for fn in _batch_files(split)]
    out = []
    root = folder / split
    extra = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
                   and e.name not in CIFAR10_CLASSES) if root.is_dir() else []
    if extra:
        raise DataIntegrityError(f"{root} holds folders that are not CIFAR-10 classes: {extra}; a split holds "
                                 f"exactly {', '.join(CIFAR10_CLASSES)}: move the others out")
    for cls in CIFAR10_CLASSES:
        d = root / cls
        if d.is_dir():
            out += [(f"{cls}/{n}", d / n) for n in _class_files(d)]
    return out


def _listing(layout: str, folder: Path, split: str) -> str:
    """SHA-256 of the source's listing: every file the decode reads, with its size and mtime (cheap: no reads)."""
    h = hashlib.sha256(f"{layout}|{folder.resolve()}|{split}".encode())
    rows = []
    for name, path in _sources(layout, folder, split):
        try:
            st = path.stat()
            rows.append(f"{name}|{st.st_size}|{st.st_mtime_ns}")
        except OSError:
            rows.append(f"{name}|missing")
    h.update("\n".join(rows).encode())
    return h.hexdigest()


_CONTENT: dict = {}  # listing -> content key, computed once per process for each listing


def _content_key(layout: str, folder: Path, split: str) -> str:
    """SHA-256 over every source file's name and the SHA-256 of its bytes: the decode cache's key, so an edit
    that keeps a file's size and modification time is still seen. Computed once per process and listing
    (:func:`_listing`); its cost on the 60,000 PNGs is in ``benchmarks/cache_digest.py``."""
    listing = _listing(layout, folder, split)
    if listing not in _CONTENT:
        h = hashlib.sha256(f"{layout}|{split}".encode())
        for name, path in _sources(layout, folder, split):
            try:
                digest = file_sha256(path)
            except OSError:
                digest = "missing"
            h.update(f"{name}|{digest}\n".encode())
        _CONTENT[listing] = h.hexdigest()
    return _CONTENT[listing]


def _cache_paths(listing: str, split: str) -> tuple[Path, Path]:
    key = hashlib.sha256(f"{listing}|{split}|v{_CACHE_VERSION}".encode()).hexdigest()[:16]
    base = cache_dir() / f"cifar10-{split}-{key}"
    return base.with_suffix(".u8"), base.with_suffix(".json")


def _cache_sha256(meta: dict, raw: bytes) -> str:
    """SHA-256 over every meta field but itself, then the data bytes: no field is outside it."""
    fields = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode() + b"\0" + raw).hexdigest()


def _load_cache(data_path: Path, meta_path: Path, listing: str) -> CIFAR10Split | None:
    try:
        meta = json.loads(meta_path.read_text())
        raw = data_path.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    n = meta.get("n", -1)
    if meta.get("version") != _CACHE_VERSION or meta.get("listing") != listing or not isinstance(n, int) \
            or len(raw) != n * (3072 + 8) or not isinstance(meta.get("names"), list) or len(meta["names"]) != n:
        return None
    if _cache_sha256(meta, raw) != meta.get("sha256"):
        return None
    images = np.frombuffer(raw, dtype=np.uint8, count=n * 3072).reshape(n, 32, 32, 3)
    labels = np.frombuffer(raw, dtype=np.int64, offset=n * 3072, count=n)
    return CIFAR10Split(torch.from_numpy(images.copy()).permute(0, 3, 1, 2).contiguous(),
                        torch.from_numpy(labels.copy()), meta["digest"], tuple(meta["names"]))


_REBUILT: set = set()  # caches rebuilt by this process under FORCE=1 (once each, not at every call)


def cifar10(split: str = "train", root: str | os.PathLike | None = None, *, download: bool = True,
            rebuild: bool = False) -> CIFAR10Split:
    """Load one CIFAR-10 split (``"train"`` or ``"test"``) as uint8 tensors, through the verified cache.

    ``rebuild=True`` (or ``FORCE=1``, once per process) decodes the source again.
    """
    from .artifacts import force_recompute

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    layout, folder = find_cifar10(root, download=download)
    listing = _content_key(layout, folder, split)
    data_path, meta_path = _cache_paths(listing, split)
    rebuild = rebuild or (force_recompute() and data_path not in _REBUILT)
    if not rebuild:
        cached = _load_cache(data_path, meta_path, listing)
        if cached is not None:
            return cached
    with folder_lock(cache_dir(), wait=True):  # one decoder at a time; the others then read its cache
        if not rebuild:
            cached = _load_cache(data_path, meta_path, listing)
            if cached is not None:
                return cached
        remove_orphan_tmp(cache_dir(), prefix="." + data_path.stem + ".")
        decode = _decode_imagefolder if layout == "imagefolder" else _decode_batches
        images, labels, digest, names = decode(folder, split)
        raw = images.tobytes() + labels.tobytes()
        meta = {"version": _CACHE_VERSION, "n": len(labels), "source": str(folder), "layout": layout,
                "split": split, "listing": listing, "digest": digest, "names": names}
        meta["sha256"] = _cache_sha256(meta, raw)
        # data first, then the meta that vouches for it: a crash between the two leaves a cache that
        # fails verification and is rebuilt.
        atomic_write(data_path, lambda f: f.write(raw))
        atomic_write_json(meta_path, meta)
        _REBUILT.add(data_path)
    return CIFAR10Split(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                        torch.from_numpy(labels), digest, tuple(names))


def cifar10_digest(root: str | os.PathLike | None = None, *, download: bool = True) -> str:
    """Content digest of CIFAR-10: SHA-256 over, for train then test, each image in the fixed order,
    the bytes of ``"<split>/<class>/<file name>"`` then its RGB pixels as uint8 in H, W, C order.

    With file names ending in ``.png`` this is the digest the shared data set's README publishes,
    whichever layout the data came in.
    """
    h = hashlib.sha256()
    for split in ("train", "test"):
        s = cifar10(split, root, download=download)
        pixels = s.images.permute(0, 2, 3, 1).contiguous().numpy()
        for img, lab, name in zip(pixels, s.labels.tolist(), s.names):
            h.update(f"{split}/{CIFAR10_CLASSES[lab]}/{name}".encode())
            h.update(img.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- transforms

def normalize(images: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32, scaled to [0, 1] and normalized per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - m) / s


def augment_cifar(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a uint8 batch: random crop after zero padding, random h-flip."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = oy[:, None] + torch.arange(h)[None, :]                       # (n, h)
    cols = ox[:, None] + torch.arange(w)[None, :]                       # (n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2)


class TensorLoader:
    """Batches from in-memory uint8 images: seeded shuffle and augmentation, normalized float output.

    The permutation and the augmentation of epoch ``e`` are drawn from a generator seeded with
    ``(seed, e)``, so any epoch can be replayed exactly without saving generator state: this is
    what makes training resume bit-exact. Call :meth:`set_epoch` before iterating.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 128, *,
                 shuffle: bool = False, augment: bool = False, seed: int = 0, drop_last: bool = False,
                 mean=CIFAR10_MEAN, std=CIFAR10_STD, channels_last: bool = True):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, shuffle, augment, seed
        self.drop_last, self.mean, self.std, self.channels_last = drop_last, mean, std, channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration replays."""
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = augment_cifar(x, g)
            x = normalize(x, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]

    @property
    def num_samples(self) -> int:
        """Number of samples one pass yields."""
        return len(self) * self.batch_size if self.drop_last else len(self.labels)


def cifar10_loaders(root=None, *, batch_size: int = 128, eval_batch_size: int = 1000, seed: int = 0,
                    train_subset: int | None = None, test_subset: int | None = None
                    ) -> tuple[TensorLoader, TensorLoader]:
    """Train (shuffled, augmented) and test loaders for CIFAR-10; subsets take a seeded sample."""
    train, test = cifar10("train", root), cifar10("test", root)
    tr_x, tr_y = _subset(train, train_subset, seed)
    te_x, te_y = _subset(test, test_subset, seed)
    return (TensorLoader(tr_x, tr_y, batch_size, shuffle=True, augment=True, seed=seed),
            TensorLoader(te_x, te_y, eval_batch_size))


def _subset(split: CIFAR10Split, n: int | None, seed: int):
    if n is None or n >= len(split):
        return split.images, split.labels
    if n < 1:
        raise ValueError(f"subset size must be >= 1, got {n}")
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return split.images[idx], split.labels[idx]


def sample_batch(split: CIFAR10Split, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded sample of ``n`` normalized, un-augmented images and their labels (e.g. for the Hessian)."""
    x, y = _subset(split, n, seed)
    return normalize(x), y


__all__ += ["cifar10_loaders", "sample_batch"]
