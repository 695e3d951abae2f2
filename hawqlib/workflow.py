"""The front door: :func:`quantize` runs HAWQ end to end on any network and data.

One call chains the paper's steps, each done by the module that owns it:

1. the top Hessian eigenvalue lambda_i of every block (section 3.1, :func:`hawqlib.hessian.top_eigenvalues`;
   the exact Gauss-Newton route where the network is piecewise linear and few classes make it the cheaper
   one, autograd elsewhere, e.g. GELU or LayerNorm, or ImageNet's 1000 classes);
2. the mixed-precision bits, more bits to blocks of larger S_i = lambda_i / n_i, under a size budget
   (section 3.1, :func:`hawqlib.allocate.allocate_bits`);
3. the Omega_i = lambda_i ||Q(W_i) - W_i||^2 order (section 3.2, :func:`hawqlib.order.finetune_order`)
   and multi-stage quantization-aware fine-tuning in that order (sections 3.2-3.3,
   :func:`hawqlib.finetune.staged_finetune`);
4. the sizes (:mod:`hawqlib.size`) and, on request, the bit-packed file (:mod:`hawqlib.export`).

Our choices, stated once: the default budget counts the weights' bits alone (``measure="weights"``, the
paper's "weight size reduction"); the default Hessian data is the first :data:`HESSIAN_BATCHES` batches of
``train_data``, read once and replayed unchanged (the Hessian needs the same samples on every pass); the
default fine-tuning schedule is the optimizer recipe of the project's ``cpu`` profile
(:mod:`hawqlib.repro.profiles`) at :data:`DEFAULT_STAGES` stages. The user's model is never modified.

Devices: every step runs on ``device`` (default: where the model lives) and each batch is moved there: the
Hessian, the quantization errors of the allocation and the order, calibration, fine-tuning and the packed
file (:func:`hawqlib.export.save_packed` writes a model of any device); no copy is made elsewhere.

Scale: each block's quantization error at each width is computed once per call
(:func:`hawqlib.sensitivity.error_table`) and shared by the allocation, the order and the table; the budget is
checked before the Hessian from the sizes alone (:func:`hawqlib.allocate.check_budget`).

Randomness: the call seeds its own copy of torch's random state (``torch.random.fork_rng``, CUDA included
when the work runs there), so the caller's global generators are as they were before the call.
"""
from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import size as hsize
from .allocate import DEFAULT_CHOICES, MEASURES, _check_choices, allocate_bits, check_budget
from .bitconfig import BitConfig
from .blocks import quant_blocks
from .export import save_packed
from .finetune import stage_groups, staged_finetune
from .hessian import top_eigenvalues
from .order import finetune_order
from .quant import CALIBRATIONS, QUANT_MODULES, calibrate_activations, quantize_model
from .sensitivity import allocation_table, error_table
from .train import evaluate

__all__ = ["quantize", "FinetuneSchedule", "QuantizeReport", "HESSIAN_BATCHES", "DEFAULT_STAGES"]

#: Batches of ``train_data`` whose Hessian is measured when ``hessian_data`` is not given (our choice).
HESSIAN_BATCHES = 4
#: Fine-tuning stages when the schedule does not say (our choice, the cpu profile's; at most one per block).
DEFAULT_STAGES = 4
#: Batches that calibrate the activation ranges when fine-tuning is skipped (the cpu profile's number).
CALIBRATION_BATCHES = 4
_HESSIAN_OPTIONS = ("method", "solver", "tol", "max_iter", "chunk_size", "max_memory", "check_samples", "verify")


@dataclass(frozen=True)
class FinetuneSchedule:
    r"""Multi-stage fine-tuning (section 3.2): ``stages`` groups of blocks in :math:`\Omega` order, each followed by
    ``epochs_per_stage`` epochs of SGD (cosine within the stage; see :func:`hawqlib.finetune.staged_finetune`).

    Parameters
    ----------
    stages : int or None
        How many groups the blocks are quantized in, one group per stage. None: :data:`DEFAULT_STAGES`, or one
        per block if there are fewer blocks.
    epochs_per_stage : int
        SGD epochs after each group is quantized (at least 1).
    lr : float
        The learning rate each stage starts from, decayed to 0 within the stage (cosine).
    final_epochs : int
        Epochs of one more stage with every block quantized (0: none).
    momentum : float
        SGD momentum.
    nesterov : bool
        Nesterov momentum.
    weight_decay : float
        SGD weight decay.
    calibration_batches : int
        Batches the activation ranges are calibrated on before the first stage.
    checkpoint_dir : str or None
        Where each epoch is checkpointed, so an interrupted call resumes there (None: nothing kept on disk).
    """

    stages: int | None = None
    epochs_per_stage: int = 8
    lr: float = 0.01
    final_epochs: int = 0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    calibration_batches: int = 4
    checkpoint_dir: str | None = None

    def __post_init__(self):
        """Checked here, so that a bad schedule fails before the Hessian rather than after it."""
        for name, lo in (("stages", 1), ("epochs_per_stage", 1), ("final_epochs", 0), ("calibration_batches", 0)):
            v = getattr(self, name)
            if not (v is None and name == "stages") and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
                raise ValueError(f"fine-tuning {name} must be an int >= {lo}, got {v!r}")
        for name in ("lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 if name == "lr" else v >= 0):
                raise ValueError(f"fine-tuning {name} must be a number {'> 0' if name == 'lr' else '>= 0'}, got {v!r}")


class _Spectrum(NamedTuple):
    name: str
    numel: int
    eigenvalue: float


@dataclass
class QuantizeReport:
    r"""What :func:`quantize` decided and measured; :func:`quantize` fills every field (its constructor's
    parameters, below).

    Parameters
    ----------
    bit_config : BitConfig
        The bits allocated to each block, the activation bits and the granularity.
    spectra : list
        One :class:`hawqlib.hessian.BlockSpectrum` per block: :math:`\lambda_i`, its residual, the route.
    table : list of dict
        The allocation per block (:func:`hawqlib.sensitivity.allocation_table`: :math:`n_i`, :math:`\lambda_i`,
        :math:`S_i`, bits, :math:`\Omega_i`, bytes).
    order : list
        The :math:`\Omega` order (:class:`hawqlib.order.OmegaEntry`, first quantized first).
    measure : str
        What the budget counted: ``"weights"`` or ``"model"``.
    target : dict
        The budget as given: ``{"target_compression": ...}`` or ``{"target_size_mb": ...}``.
    weight_compression : float
        :math:`32 / \bar b`, the mean weight bits :math:`\bar b` (:func:`hawqlib.size.weight_compression`).
    compression : float
        FP32 size / ``size_bytes``, the whole model as :mod:`hawqlib.size` counts it.
    activation_compression : float
        32 / activation bits (1 when the activations stay FP32).
    size_bytes : int
        The quantized model's size (:func:`hawqlib.size.model_size_bytes`).
    fp32_bytes : int
        The FP32 model's size (:func:`hawqlib.size.fp32_size_bytes`).
    hessian_samples : int
        Samples in the batches the Hessian was taken on.
    device : str
        Where the work ran.
    history : dict or None
        The fine-tuning record (:func:`hawqlib.finetune.staged_finetune`); None when fine-tuning was skipped.
    val_top1 : float or None
        Top-1 (%) of the quantized model on ``val_data`` (None without it).
    fp32_val_top1 : float or None
        Top-1 (%) of the original model on ``val_data`` (None without it).
    packed_path : str or None
        The bit-packed file written (None: none).
    packed_bytes : int or None
        That file's size.
    timings : dict or None
        Seconds per step of the call.
    """

    bit_config: BitConfig
    spectra: list
    table: list[dict]
    order: list
    measure: str
    target: dict
    weight_compression: float
    compression: float
    activation_compression: float
    size_bytes: int
    fp32_bytes: int
    hessian_samples: int
    device: str
    history: dict | None = None
    val_top1: float | None = None
    fp32_val_top1: float | None = None
    packed_path: str | None = None
    packed_bytes: int | None = None
    #: Seconds per step of the call (hessian, errors, allocation, order, finetune or calibration, evaluation, ...).
    timings: dict | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict (spectra without eigenvectors)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["bit_config"] = self.bit_config.to_dict()
        out["spectra"] = [{k: getattr(s, k) for k in ("name", "numel", "eigenvalue", "method", "converged",
                                                       "iterations", "residual", "note")} for s in self.spectra]
        out["order"] = [asdict(e) for e in self.order]
        out.pop("timings")  # wall-clock figures: not a result (stored reports stay as they were)
        return out

    def summary(self) -> str:
        """The allocation per block, then the sizes and accuracies, as text."""
        rank = {e.name: i + 1 for i, e in enumerate(self.order)}
        w = max(len("block"), *(len(r["name"]) for r in self.table))
        lines = [f"{'block':<{w}}  {'weights':>9}  {'lambda':>10}  {'S':>10}  bits  Omega order"]
        for r in self.table:
            lines.append(f"{r['name']:<{w}}  {r['numel']:>9,}  {r['lambda']:>10.4g}  {r['S']:>10.3g}  "
                         f"{r['bits']:>4}  {rank[r['name']]:>11}")
        act = self.bit_config.act_bits
        lines.append(f"weights {self.weight_compression:.2f}x smaller (32 / mean bits), whole model "
                     f"{self.compression:.2f}x ({self.size_bytes:,} of {self.fp32_bytes:,} bytes), activations "
                     + (f"{act} bits" if act is not None else "FP32"))
        if self.val_top1 is not None:
            lines.append(f"validation top-1 {self.val_top1:.2f}% (FP32 model {self.fp32_val_top1:.2f}%)")
        if self.packed_path is not None:
            lines.append(f"packed file {self.packed_path} ({self.packed_bytes:,} bytes)")
        return "\n".join(lines)


class _OnDevice:
    """A view of ``data`` whose batches are (inputs, targets) moved to ``device``; keeps ``len``/``set_epoch``."""

    def __init__(self, data, device: torch.device):
        self.data, self.device = data, device

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(epoch)

    def __iter__(self):
        for batch in self.data:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[0])):
                raise TypeError(f"each batch must be an (inputs, targets) pair with a tensor of inputs, "
                                f"got {type(batch).__name__}")
            x, y = batch
            yield x.to(self.device), (y.to(self.device) if torch.is_tensor(y) else y)


# --------------------------------------------------------------------------- checks at the boundary

def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, QUANT_MODULES) for m in model.modules()):
        raise ValueError("model is already quantized (it holds QuantConv2d/QuantLinear modules); pass the FP32 model")


def _check_blocks(model: nn.Module, granularity) -> None:
    blocks = quant_blocks(model, granularity)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer: HAWQ quantizes their weights "
                         "(paper section 3.1)")
    attn = {n + ".out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    hit = sorted(attn & {n for b in blocks for n in b.module_names})
    if hit:
        raise ValueError(f"{hit[0]!r} is the output projection of an nn.MultiheadAttention, which reads its weight "
                         "directly, so quantizing it would not take effect; write the attention with nn.Linear "
                         "layers, or name the blocks to quantize in granularity= without it")


def _check_data(data, what: str, need_len: bool) -> None:
    if data is None or torch.is_tensor(data) or not isinstance(data, Iterable):
        raise TypeError(f"{what} must be a re-iterable of (inputs, targets) batches (a DataLoader, a list of "
                        f"batches), got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError(f"{what} is a one-shot iterator; pass a re-iterable (a DataLoader, a list of batches)")
    if need_len and not hasattr(data, "__len__"):
        raise TypeError(f"{what} must have len() (the number of batches per epoch), as a DataLoader or a list has")


def _device(device, model: nn.Module) -> torch.device:
    if device is None:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use device='cpu'")
    return dev


def _check_schedule(finetune) -> FinetuneSchedule | None:
    if finetune is False:
        return None
    if finetune is True or finetune is None:
        return FinetuneSchedule()
    if isinstance(finetune, FinetuneSchedule):
        return finetune
    if isinstance(finetune, Mapping):
        valid = [f.name for f in fields(FinetuneSchedule)]
        unknown = [k for k in finetune if k not in valid]
        if unknown:
            raise ValueError(f"unknown fine-tuning setting(s) {unknown}; valid: {', '.join(valid)}")
        return FinetuneSchedule(**finetune)
    raise TypeError(f"finetune must be True, False, a dict or a hawqlib.FinetuneSchedule, got {finetune!r}")


def _check_loss(loss_fn, schedule) -> nn.Module:
    if loss_fn is None:
        return nn.CrossEntropyLoss()
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
    plain = loss_fn is F.cross_entropy or (type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None
                                            and loss_fn.reduction == "mean" and loss_fn.label_smoothing == 0.0)
    if schedule is not None and not plain:
        raise ValueError("fine-tuning trains with plain cross entropy (hawqlib.finetune.staged_finetune takes no "
                         "loss); a custom loss_fn is used for the Hessian only, so pass finetune=False with it")
    return loss_fn


def _check_budget(model, choices, act_bits, granularity, measure, target_compression, target_size_mb) -> None:
    """Raise before the Hessian if the budget cannot be met (from the sizes alone: no weight is quantized)."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; valid: {', '.join(MEASURES)} (the weights' bits alone, "
                         "the paper's 'weight size reduction', or the whole model as hawqlib.size counts it)")
    if (target_compression is None) == (target_size_mb is None):
        raise ValueError("give exactly one budget: target_compression (e.g. 8, FP32 size / quantized size) or "
                         "target_size_mb")
    check_budget(model, target_compression=target_compression, target_size_mb=target_size_mb, choices=choices,
                 act_bits=act_bits, granularity=granularity, measure=measure)


def _hessian_batches(hessian_data, train_data, device: torch.device) -> list:
    """The Hessian's batches, on ``device``, read once."""
    train = _OnDevice(train_data, device)
    if hessian_data is None or (isinstance(hessian_data, int) and not isinstance(hessian_data, bool)):
        k = HESSIAN_BATCHES if hessian_data is None else hessian_data
        if k < 1:
            raise ValueError(f"hessian_data as a number of batches must be >= 1, got {k}")
        train.set_epoch(0)
        return list(itertools.islice(iter(train), k))
    if (isinstance(hessian_data, (tuple, list)) and len(hessian_data) == 2 and torch.is_tensor(hessian_data[0])
            and torch.is_tensor(hessian_data[1])):
        return [(hessian_data[0].to(device), hessian_data[1].to(device))]
    if torch.is_tensor(hessian_data) or not isinstance(hessian_data, Iterable):
        raise TypeError("hessian_data must be None, a number of batches of train_data, an (inputs, targets) "
                        f"batch or an iterable of batches, got {type(hessian_data).__name__}")
    return list(_OnDevice(hessian_data, train.device))  # one pass; replayed unchanged


# --------------------------------------------------------------------------- the front door

def quantize(model: nn.Module, train_data, *, target_compression: float | None = None,
             target_size_mb: float | None = None, measure: str = "weights", act_bits: int | None = 4,
             choices=DEFAULT_CHOICES, finetune=True, hessian_data=None, loss_fn=None, val_data=None,
             granularity="layer", hessian: Mapping | None = None, packed_path=None, device=None, seed: int = 0,
             progress: bool = True, calibration: str = "union") -> tuple[nn.Module, QuantizeReport]:
    r"""HAWQ on ``model`` (sections 3.1-3.3): Hessian spectra, bits under a budget, :math:`\Omega`-ordered
    fine-tuning.

    Give exactly one budget, ``target_compression`` or ``target_size_mb``. Our choice: ``calibration="union"``
    by default, the range over every calibration batch at once rather than the training rule's moving average
    (:class:`hawqlib.quant.observer.RangeCollector` gives the reason).

    Parameters
    ----------
    model : nn.Module
        The FP32 network (its Conv2d/Linear layers are quantized); left unchanged, the work is done on a copy.
    train_data
        A re-iterable of ``(inputs, targets)`` batches with ``len`` (e.g. a DataLoader): the fine-tuning data,
        the activations' calibration batches and, by default, the Hessian's batches.
    target_compression : float, optional
        The budget as FP32 size / quantized size, at least, counted in ``measure``.
    target_size_mb : float, optional
        The budget as a size in MB (:data:`hawqlib.allocate.MB` bytes), at most, counted in ``measure``.
    measure : str
        What the budget counts: ``"weights"`` (the weight bits alone, the paper's "weight size reduction") or
        ``"model"`` (the whole model as :mod:`hawqlib.size` counts it).
    act_bits : int or None
        Activation bits (None: the activations stay FP32).
    choices : sequence of int
        The bit widths a block may get.
    finetune : bool, FinetuneSchedule or dict
        True (:class:`FinetuneSchedule` defaults), a schedule or a dict of its fields, or False (quantize and
        calibrate the activations only).
    hessian_data : optional
        None (the first :data:`HESSIAN_BATCHES` batches of ``train_data``), a number of batches of it, a batch,
        or an iterable of batches.
    loss_fn : optional
        The loss whose Hessian is measured and that fine-tuning minimizes (default: cross entropy).
    val_data : optional
        Batches to evaluate on: after each fine-tuning stage, and the quantized and the original model at the
        end (``report.val_top1``, ``report.fp32_val_top1``). None: no evaluation.
    granularity : str or list of str
        What a block is (:func:`hawqlib.blocks.quant_blocks`): ``"layer"``, ``"residual"`` or a list of module
        names.
    hessian : mapping, optional
        Options of :func:`hawqlib.hessian.top_eigenvalues` (``method``, ``solver``, ``tol``, ``max_iter``, ...).
    packed_path : str or path, optional
        Also write the bit-packed file there (:func:`hawqlib.export.save_packed`).
    device : optional
        Where the work runs (default: the model's); batches are moved there.
    seed : int
        Seeds the call's own torch random state (the caller's is left as it was), the eigensolver and the
        fine-tuning.
    progress : bool
        Show progress bars for the Hessian and the fine-tuning.
    calibration : str
        How the activation ranges are calibrated (:func:`hawqlib.quant.swap.calibrate_activations`):
        ``"union"`` over all the calibration batches (the default) or ``"moving_average"``, the training rule
        (the book's stored runs).

    Returns
    -------
    tuple
        ``(qmodel, report)``: the quantized model on ``device`` in eval mode, every block at its allocated
        bits, and a :class:`QuantizeReport`.
    """
    _check_model(model)
    schedule = _check_schedule(finetune)
    loss = _check_loss(loss_fn, schedule)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    dev = _device(device, model)
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; valid: {', '.join(CALIBRATIONS)}")
    _check_data(train_data, "train_data", need_len=schedule is not None)
    if val_data is not None:
        _check_data(val_data, "val_data", need_len=False)
    opts = dict(hessian or {})
    unknown = [k for k in opts if k not in _HESSIAN_OPTIONS]
    if unknown:
        raise ValueError(f"unknown hessian option(s) {unknown}; valid: {', '.join(_HESSIAN_OPTIONS)}")
    _check_blocks(model, granularity)
    if schedule is not None and schedule.stages is not None:
        stage_groups([b.name for b in quant_blocks(model, granularity)], schedule.stages)  # at most one per block
    _check_budget(model, choices, act_bits, granularity, measure, target_compression, target_size_mb)

    # The call's own random state: the caller's global generators (CPU, and the device's) are restored after.
    rng_devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        return _quantize(model, train_data, dev, schedule, loss, opts, seed=seed, target_compression=target_compression,
                         target_size_mb=target_size_mb, measure=measure, act_bits=act_bits, choices=choices,
                         hessian_data=hessian_data, val_data=val_data, granularity=granularity,
                         packed_path=packed_path, progress=progress, calibration=calibration)


def _quantize(model, train_data, dev, schedule, loss, opts, *, seed, target_compression, target_size_mb, measure,
              act_bits, choices, hessian_data, val_data, granularity, packed_path, progress, calibration):
    """The steps of :func:`quantize`, its arguments checked; each step timed into ``report.timings``."""
    timings = {}
    clock = [time.perf_counter()]

    def lap(name):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        now = time.perf_counter()
        timings[name] = now - clock[0]
        clock[0] = now

    work = copy.deepcopy(model).to(dev)
    train = _OnDevice(train_data, dev)
    val = _OnDevice(val_data, dev) if val_data is not None else None
    hbatches = _hessian_batches(hessian_data, train_data, dev)
    lap("setup")

    spectra = top_eigenvalues(work, loss, hbatches, granularity, seed=seed, progress=progress, **opts)
    lap("hessian")
    errors = error_table(quant_blocks(work, granularity), _check_choices(choices))
    lap("errors")
    cfg = allocate_bits(work, spectra, target_compression=target_compression, target_size_mb=target_size_mb,
                        choices=choices, act_bits=act_bits, granularity=granularity, measure=measure, errors=errors)
    lap("allocation")
    order = finetune_order(work, spectra, cfg, errors=errors)
    table = allocation_table(work, spectra, cfg, errors=errors)
    lap("order")

    history = None
    if schedule is None:
        qmodel = quantize_model(work, cfg)
        if act_bits is not None:
            train.set_epoch(0)
            calibrate_activations(qmodel, train, num_batches=CALIBRATION_BATCHES, calibration=calibration)
        lap("calibration")
    else:
        s = asdict(schedule)
        stages = s.pop("stages") or min(DEFAULT_STAGES, len(order))
        qmodel, history = staged_finetune(work, cfg, order, train, val, stages=stages, seed=seed,
                                          progress=progress, calibration=calibration, **s)
        lap("finetune")
    qmodel.eval()

    packed_bytes = None
    if packed_path is not None:
        packed_path = str(Path(packed_path))
        packed_bytes = save_packed(qmodel, packed_path)  # writes a model of any device
        lap("export")
    report = QuantizeReport(
        bit_config=cfg, spectra=spectra, table=table, order=order, measure=measure,
        target={"target_compression": target_compression} if target_size_mb is None
        else {"target_size_mb": target_size_mb},
        weight_compression=hsize.weight_compression(qmodel), compression=hsize.compression_ratio(qmodel),
        activation_compression=hsize.activation_compression(cfg), size_bytes=hsize.model_size_bytes(qmodel),
        fp32_bytes=hsize.fp32_size_bytes(model), hessian_samples=sum(len(x) for x, _ in hbatches),
        device=str(dev), history=history, packed_path=packed_path, packed_bytes=packed_bytes, timings=timings)
    lap("sizes")
    if val is not None:
        report.val_top1 = evaluate(qmodel, val)["top1"]
        report.fp32_val_top1 = evaluate(work, val)["top1"]
        lap("evaluation")
    return qmodel, report
