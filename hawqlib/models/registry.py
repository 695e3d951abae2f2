"""The paper's networks by name, with their weights: :func:`get` (paper section 4).

``get(name, num_classes=..., weights=...)`` builds ``resnet20`` (CIFAR-10), ``resnet50``,
``inception_v3`` or ``squeezenext`` (2.0-SqNxt-23, see :mod:`hawqlib.models.squeezenext`; every
released variant also has its own name, e.g. ``sqnxt23v5_w1`` or ``1.0-SqNxt-23v5``), and
``vit_cifar``, a small vision transformer for CIFAR-10 that the paper does not use (ours, for the book's
"HAWQ on your own network" chapter, :mod:`hawqlib.models.vit`).

``weights``:

- ``None``: random initialisation;
- ``"pretrained"`` (or a torchvision weights name such as ``"IMAGENET1K_V2"``): the published
  ImageNet weights, read from a local file, never downloaded. They are looked for, in order, in
  the folder named by ``HAWQ_WEIGHTS``, in torch's hub cache (``$TORCH_HOME/hub/checkpoints``,
  by default ``~/.cache/torch/hub/checkpoints``, where torchvision stores its downloads) and, for
  SqueezeNext, in ``~/.torch/models`` (where the ``pytorchcv`` package stores its downloads).
  Absent weights raise :class:`WeightsNotFoundError` naming the places searched and how to get
  them: a model asked for pretrained is never silently random. A file whose name carries a
  hash prefix (torchvision: SHA-256; pytorchcv: SHA-1) is checked against it;
- a path: a ``state_dict`` file, a ``{"state_dict": ...}`` dict, or a checkpoint / ``model.pt``
  written by :func:`hawqlib.train.train`;
- a state dict (mapping of tensors).

Whatever the source, its entries must match the model's names and shapes (Inception's auxiliary
head is dropped when the model has none; missing ``num_batches_tracked`` counters are allowed; a
``module.`` prefix from ``DataParallel`` is removed); anything else raises :class:`WeightsError`
listing the missing, unexpected and mis-shaped entries, so that the weights of another
architecture are refused, not half-loaded.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from .resnet_cifar import resnet20
from .squeezenext import SQUEEZENEXT_VARIANTS, SqueezeNext, load_pytorchcv_state_dict, squeezenext
from .vit import vit_cifar
from ..files import load_weights_only

__all__ = ["get", "names", "default_classes", "WeightsError", "WeightsNotFoundError", "find_pretrained", "pretrained_dirs",
           "load_weights_file", "load_state_dict_checked"]

PRETRAINED = "pretrained"


class WeightsNotFoundError(FileNotFoundError):
    """Weights were asked for but no file holds them where we looked."""


class WeightsError(ValueError):
    """A weights file or state dict that cannot be used: unreadable, corrupt, or of another architecture."""


@dataclass(frozen=True)
class _Spec:
    build: Callable[..., nn.Module]
    num_classes: int
    options: tuple = ()                      #: keyword arguments the constructor accepts
    source: str = ""                         #: "torchvision", "pytorchcv" or "" (none published)
    fixed: dict = field(default_factory=dict)


def _resnet50(num_classes, **kw):
    from .imagenet import resnet50

    return resnet50(num_classes, **kw)


def _inception_v3(num_classes, **kw):
    from .imagenet import inception_v3

    return inception_v3(num_classes, **kw)


def _sqnxt(width, depth):
    def build(num_classes, **kw):
        return squeezenext(width, depth, num_classes, **kw)
    return build


_MODELS: dict[str, _Spec] = {
    "resnet20": _Spec(lambda num_classes: resnet20(num_classes), 10),
    "vit_cifar": _Spec(lambda num_classes, **kw: vit_cifar(num_classes, **kw), 10,
                       ("image_size", "patch", "dim", "depth", "heads", "mlp_ratio")),
    "resnet50": _Spec(_resnet50, 1000, (), "torchvision"),
    "inception_v3": _Spec(_inception_v3, 1000, ("aux_logits", "transform_input", "dropout"), "torchvision"),
    "squeezenext": _Spec(lambda num_classes, **kw: squeezenext(num_classes=num_classes, **kw), 1000,
                         ("width", "depth", "blocks"), "pytorchcv"),
}
for _name, (_w, _d) in SQUEEZENEXT_VARIANTS.items():
    _MODELS[_name] = _Spec(_sqnxt(_w, _d), 1000, (), "pytorchcv", {"width": _w, "depth": _d})

#: Other spellings: the SqueezeNext paper's names (``2.0-SqNxt-23``), lower case.
_ALIASES = {f"{w:.1f}-sqnxt-{d}": n for n, (w, d) in SQUEEZENEXT_VARIANTS.items()}


def names() -> list[str]:
    """The model names :func:`get` accepts (besides the ``<w>-SqNxt-<depth>`` spellings)."""
    return list(_MODELS)


def default_classes(name: str) -> int:
    """The number of classes model ``name`` has by default: 10 for the CIFAR-10 models, 1000 for ImageNet's."""
    return _MODELS[_resolve(name)].num_classes


def _resolve(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("-v3", "_v3")
    key = _ALIASES.get(key, key)
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(_MODELS)} "
                         f"(or {', '.join(sorted({f'{w:.1f}-SqNxt-{d}' for w, d in SQUEEZENEXT_VARIANTS.values()}))})")
    return key


def pretrained_dirs(source: str) -> list[Path]:
    """Folders searched for pretrained files of ``source`` ("torchvision" or "pytorchcv"), in order."""
    dirs = []
    if os.environ.get("HAWQ_WEIGHTS"):
        dirs.append(Path(os.environ["HAWQ_WEIGHTS"]).expanduser())
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    if source == "pytorchcv":
        dirs.append(Path("~/.torch/models").expanduser())
    return dirs


def _sqnxt_variant(key: str, kwargs: dict) -> str | None:
    spec = _MODELS[key]
    if spec.fixed:
        return key
    if "blocks" in kwargs:
        return None
    want = (float(kwargs.get("width", 2.0)), kwargs.get("depth", "23"))
    return next((n for n, v in SQUEEZENEXT_VARIANTS.items() if v == want), None)


def find_pretrained(name: str, tag: str = PRETRAINED, **kwargs) -> Path:
    """Path of the local file holding the published weights of model ``name``; WeightsNotFoundError if none.

    ``tag`` is ``"pretrained"`` (the default release) or a torchvision weights name
    (``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``); ``kwargs`` pick a SqueezeNext variant (width, depth).
    """
    key = _resolve(name)
    spec = _MODELS[key]
    if not spec.source:
        raise WeightsNotFoundError(
            f"no published pretrained weights exist for {key}. Train them with `python -m hawqlib train` "
            f"(its checkpoints and model.pt go to data/artifacts/baseline_{key}-<key>/), then pass "
            f"weights='<that folder>/model.pt'.")
    dirs = pretrained_dirs(spec.source)
    if spec.source == "torchvision":
        from .imagenet import TORCHVISION_WEIGHTS

        enum, default = TORCHVISION_WEIGHTS[key]
        member = default if tag == PRETRAINED else tag
        if member not in enum.__members__:
            raise ValueError(f"{key} has no torchvision weights {tag!r}; valid: 'pretrained', "
                             + ", ".join(m for m in enum.__members__ if m != "DEFAULT"))
        url = enum[member].url
        fname = url.rsplit("/", 1)[-1]
        for d in dirs:
            if (d / fname).is_file():
                return d / fname
        raise WeightsNotFoundError(
            f"pretrained weights for {key} (torchvision {enum.__name__}.{member}, file {fname}) were not "
            f"found; looked in: {', '.join(str(d) for d in dirs)}. Nothing is downloaded here. To get them, "
            f"on a machine with internet run `python -c \"import torchvision; torchvision.models.{key}"
            f"(weights='{member}')\"` (it saves {fname} into torch's hub cache, "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}), or download {url} into one of those folders "
            f"(or the folder named by HAWQ_WEIGHTS), or pass weights=<path to the file>.")
    if tag != PRETRAINED:
        raise ValueError(f"{key} has only weights='pretrained' (its published weights), got {tag!r}")
    variant = _sqnxt_variant(key, kwargs)
    if variant is None:
        raise WeightsNotFoundError(
            f"no published weights exist for this SqueezeNext variant ({kwargs}); released variants: "
            f"{', '.join(SQUEEZENEXT_VARIANTS)}")
    for d in dirs:
        hits = sorted(d.glob(f"{variant}-*.pth")) if d.is_dir() else []
        if hits:
            return hits[-1]
    raise WeightsNotFoundError(
        f"pretrained weights for {variant} (the public PyTorch port's ImageNet weights, file "
        f"{variant}-<error>-<sha1>.pth) were not found; looked in: {', '.join(str(d) for d in dirs)}. "
        f"Nothing is downloaded here. To get them, on a machine with internet run `pip install pytorchcv` "
        f"then `python -c \"from pytorchcv.model_provider import get_model; get_model('{variant}', "
        f"pretrained=True)\"` (it saves the file into ~/.torch/models), or copy the file into one of those "
        f"folders (or the folder named by HAWQ_WEIGHTS), or pass weights=<path to the file>.")


_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,})\.pth?$")


def _verify_hash(path: Path, algorithm: str) -> None:
    m = _HASH_IN_NAME.search(path.name)
    if not m:
        return
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(m.group(1)):
        raise WeightsError(f"{path} is corrupt or not the published file: its {algorithm} digest starts "
                           f"{h.hexdigest()[:len(m.group(1))]}, its name promises {m.group(1)}. Delete it and "
                           "fetch it again.")


def _describe(model: nn.Module) -> str:
    if isinstance(model, SqueezeNext):
        return f"SqueezeNext (width {model.width:g}, blocks per stage {model.blocks_per_stage})"
    fc = getattr(model, "fc", None)
    classes = f", {fc.out_features} classes" if isinstance(fc, nn.Linear) else ""
    return f"{type(model).__name__}{classes}"


def _extract_state_dict(obj, source: str) -> dict:
    if isinstance(obj, Mapping) and isinstance(obj.get("format"), str) and obj["format"].startswith("hawqlib.train"):
        obj = obj.get("model")
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = (f"a dict with entries {list(obj)[:5]}" if isinstance(obj, Mapping) else type(obj).__name__)
        raise WeightsError(f"{source} holds {what}, not a state dict (a mapping of parameter names to tensors, "
                           "a {'state_dict': ...} dict, or a hawqlib.train checkpoint)")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_state_dict_checked(model: nn.Module, state_dict: Mapping, *, source: str = "the state dict",
                            assign: bool = False) -> nn.Module:
    """Load ``state_dict`` into ``model`` after checking every name and shape; WeightsError otherwise.

    ``assign=True`` makes the model hold the given tensors (``load_state_dict(assign=True)``), as
    needed for a model built on the meta device.
    """
    sd = _extract_state_dict(state_dict, source)
    if type(model).__name__ == "Inception3" and getattr(model, "AuxLogits", None) is None:
        sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}  # the model has no aux head
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    port_error = None
    if (missing or unexpected) and isinstance(model, SqueezeNext):
        try:
            return load_pytorchcv_state_dict(model, sd, assign=assign)
        except ValueError as exc:
            port_error = exc
    shapes = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's entries are missing from it (first: {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} of its entries are not in the model (first: {unexpected[:3]})")
        if shapes:
            k, a, b = shapes[0]
            parts.append(f"{len(shapes)} shapes differ (first: {k!r} is {a} there, {b} in the model)")
        extra = f" As weights of the public SqueezeNext port: {port_error}." if port_error else ""
        raise WeightsError(f"{source} does not fit {_describe(model)}: it holds the weights of another "
                           f"architecture, variant or number of classes; " + "; ".join(parts) + "." + extra)
    for k in own:
        if k not in sd:  # only num_batches_tracked counters can be absent
            sd[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(sd, assign=assign)
    return model


def load_weights_file(model: nn.Module, path: str | os.PathLike, *, hash_algorithm: str | None = None,
                      assign: bool = False) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (see the module docstring for the formats read).

    ``hash_algorithm`` (``"sha256"``, ``"sha1"``): check the file against the digest prefix its
    name carries (``name-<hex>.pth``). ``assign``: see :func:`load_state_dict_checked`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"no weights file at {path}")
    if hash_algorithm:
        _verify_hash(path, hash_algorithm)
    try:
        obj = load_weights_only(path)
    except ValueError as exc:  # names what was refused, never torch's advice to load the file unsafely
        raise WeightsError(f"{exc}: not a readable weights file; only state dicts and hawqlib checkpoints are "
                           "read") from None
    return load_state_dict_checked(model, obj, source=str(path), assign=assign)


def get(name: str, num_classes: int | None = None, weights=None, **kwargs) -> nn.Module:
    """Build model ``name`` (see :func:`names`) with ``num_classes`` outputs and the given ``weights``.

    ``num_classes`` defaults to 10 for ``resnet20`` and 1000 for the ImageNet models. ``weights``:
    ``None``, ``"pretrained"`` (or a torchvision weights name), a file path, or a state dict (see
    the module docstring). ``kwargs`` go to the constructor: ``aux_logits``, ``transform_input``,
    ``dropout`` for ``inception_v3``; ``width``, ``depth``, ``blocks`` for ``squeezenext``.
    """
    key = _resolve(name)
    spec = _MODELS[key]
    bad = sorted(set(kwargs) - set(spec.options))
    if bad:
        raise TypeError(f"get({key!r}) got unexpected options {bad}; it accepts "
                        f"{', '.join(spec.options) if spec.options else 'no options besides num_classes and weights'}")
    if weights is not None and not isinstance(weights, (str, os.PathLike, Mapping)):
        raise TypeError(f"weights must be None, 'pretrained', a file path or a state dict, "
                        f"got {type(weights).__name__}")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    pretrained_path = None
    published = isinstance(weights, str) and (weights == PRETRAINED or (
        bool(re.fullmatch(r"[A-Z0-9_]+", weights)) and not Path(weights).exists()))
    if published:
        if num_classes not in (None, 1000):
            raise ValueError(f"the published {key} weights have 1000 classes, got num_classes={num_classes}; "
                             "load them with 1000 classes and replace the classifier")
        pretrained_path = find_pretrained(key, weights, **kwargs)
        if key == "inception_v3":
            kwargs.setdefault("transform_input", True)
    n = spec.num_classes if num_classes is None else num_classes
    if weights is None:
        return spec.build(n, **kwargs)
    if pretrained_path is None and not isinstance(weights, Mapping):
        pretrained_path = Path(weights).expanduser()
        if not pretrained_path.is_file():
            raise WeightsNotFoundError(f"no weights file at {pretrained_path} (weights= takes None, 'pretrained', "
                                       "a torchvision weights name such as 'IMAGENET1K_V1', a file path or a "
                                       "state dict)")
    # Built on the meta device, then the loaded tensors are assigned: no time spent on an
    # initialisation that the weights replace (Inception-V3's takes seconds).
    with torch.device("meta"):
        model = spec.build(n, **kwargs)
    if isinstance(weights, Mapping):  # copies: the model must not share storage with the caller's tensors
        copied = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
        model = load_state_dict_checked(model, copied, assign=True)
    else:
        algorithm = None
        if published:  # a published file carries its digest prefix in its name
            algorithm = "sha256" if spec.source == "torchvision" else "sha1"
        model = load_weights_file(model, pretrained_path, hash_algorithm=algorithm, assign=True)
    left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    if left:  # pragma: no cover - every model here keeps all its tensors in the state dict
        raise RuntimeError(f"{key}: tensors not set by the weights: {left[:5]}")
    return model
