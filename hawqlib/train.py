"""FP32 training and evaluation, with atomic per-epoch checkpoints and exact resume.

The loop is the plain one (SGD with momentum, a per-step learning-rate schedule, cross
entropy), kept lean for a 2-core CPU: channels_last tensors, no per-step Python work
beyond the model's, data batches built from in-memory tensors (:class:`hawqlib.repro.data.TensorLoader`).

A run writes into ``checkpoint_dir``:

- ``checkpoint.pt``: model, optimizer, epoch and history after every epoch (atomic);
- ``log.json``: the run's configuration and one record per epoch (atomic);
- ``model.pt``: the final weights alone, when the run completes.

Every checkpoint records a SHA-256 of its own content (:func:`content_digest`), verified when it is
read (one without it is refused: delete it to start over); on resume its fields are range-checked (epoch, history, finite weights). A non-finite loss stops
the run with :class:`NonFiniteLossError` before the step is taken; so do weights that a NaN or infinite
gradient made non-finite under a finite loss (checked at the end of every epoch) and a non-finite
validation loss: no NaN epoch is ever saved.

``resume=True`` continues from ``checkpoint.pt``; since each epoch's shuffle and augmentation
are a pure function of (seed, epoch), and the checkpoint also holds torch's global random state
(which dropout draws from), an interrupted and resumed run ends with exactly the weights of an
uninterrupted one on the CPU.

Under ``torchrun`` (a process group of several ranks, :mod:`hawqlib.distributed`) the same call trains
data-parallel with ``DistributedDataParallel``: each rank takes its slice of every global batch, metrics
are summed over ranks, rank 0 alone writes the files and the others resume from what it read; that
module's docstring states the choices (BatchNorm, quantizers, data order).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from . import distributed as hdist
from .files import atomic_torch_save, atomic_write_json, load_weights_only

__all__ = ["TrainConfig", "CheckpointError", "NonFiniteLossError", "train", "evaluate", "save_model_file", "lr_at", "load_checkpoint",
           "load_weights", "content_digest", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "hawqlib.train/1"
SCHEDULES = ("cosine", "step", "constant")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, of another model, or of another run configuration."""


class NonFiniteLossError(RuntimeError):
    """The training loss, the weights or the validation loss became NaN or infinite: the run stops rather than
    train on garbage."""


def content_digest(obj) -> str:
    """SHA-256 of a checkpoint's content (nested dicts, lists, tensors, numbers, strings), independent of
    how ``torch.save`` lays it out; stored in the checkpoint under ``"sha256"`` and checked on load."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(o.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            h.update(b"{")
            for k, v in sorted(o.items(), key=lambda kv: repr(kv[0])):
                h.update(repr(k).encode() + b":")
                walk(v)
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
                h.update(b",")
            h.update(b"]")
        else:
            h.update(f"{type(o).__name__}:{o!r};".encode())

    walk(obj)
    return h.hexdigest()


def _save_checkpoint(path: Path, ckpt: dict) -> None:
    atomic_torch_save(path, {**ckpt, "sha256": content_digest(ckpt)})


@dataclass
class TrainConfig:
    """Everything that determines a training run (besides the model's initial weights and the data)."""

    epochs: int
    lr: float = 0.1
    schedule: str = "cosine"            #: ``cosine`` (to 0), ``step`` (x ``gamma`` at ``milestones``), ``constant``
    milestones: tuple = ()              #: epochs at which ``step`` multiplies the rate by ``gamma``
    gamma: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    seed: int = 0
    eval_every: int = 1                 #: evaluate every k epochs (and always after the last)
    extra: dict = field(default_factory=dict)  #: free-form facts recorded in the log (data digest, ...)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every!r}")

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict (``milestones`` as a list), as logs and checkpoints record them."""
        d = asdict(self)
        d["milestones"] = list(d["milestones"])
        return d


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a global step: cosine decay to zero per step, or step decay per epoch."""
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * step / (cfg.epochs * steps_per_epoch)))
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return cfg.lr


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable, *, loss_fn=None) -> dict:
    """Top-1 and top-5 accuracy (percent) and mean loss of ``model`` over ``(inputs, targets)`` batches.

    ``data`` a :class:`hawqlib.distributed.Shard`: each rank evaluates its slices, the counts are summed
    over ranks, and every rank returns the same numbers."""
    loss_fn = loss_fn or nn.CrossEntropyLoss(reduction="sum")
    was_training = model.training
    model.eval()
    n, top1, top5, loss = 0, 0, 0, 0.0
    try:
        for x, y in data:
            out = model(x)
            loss += float(loss_fn(out, y))
            k = min(5, out.shape[1])
            pred = out.topk(k, dim=1).indices
            hit = pred.eq(y[:, None])
            top1 += int(hit[:, 0].sum())
            top5 += int(hit.any(dim=1).sum())
            n += len(y)
    finally:
        model.train(was_training)
    if isinstance(data, hdist.Shard):
        tot = hdist.all_reduce_sum(torch.tensor([n, top1, top5, loss], dtype=torch.float64, device=data.device))
        n, top1, top5, loss = int(tot[0]), int(tot[1]), int(tot[2]), float(tot[3])
    if n == 0:
        raise ValueError("evaluate() got no data: the iterable yielded no batches")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "n": n}


def _fingerprint(model: nn.Module) -> dict:
    """Name and shape of each state-dict entry: the architecture a checkpoint must match. Entries a module
    lists in ``optional_state_keys`` (the switches and configuration of :mod:`hawqlib.quant.modules`, which
    checkpoints written before they were saved lack) are left out, so that those checkpoints still match."""
    optional = {f"{name}.{key}" if name else key for name, m in model.named_modules()
                for key in getattr(m, "optional_state_keys", ())}
    return {k: list(v.shape) for k, v in model.state_dict().items() if k not in optional}


def load_checkpoint(path: str | Path, model: nn.Module | None = None, *, require_digest: bool = True) -> dict:
    """Read a training checkpoint; with ``model``, check it holds that architecture's weights.

    A checkpoint that records no digest is refused (``require_digest=False`` reads one whose file something
    else vouches for, such as an artifact's manifest)."""
    path = Path(path)
    try:
        ckpt = load_weights_only(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc}). Delete it to start the run over.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint "
                              f"(format: {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__}).")
    # Checkpoints written before digests were recorded have none: refused unless something else vouches for the
    # file (an artifact's model.pt is covered by its manifest, hawqlib.repro.artifacts).
    if "sha256" not in ckpt and require_digest:
        raise CheckpointError(f"{path} records no SHA-256 to verify it by (written before checkpoints recorded one, "
                              "or edited): it is not resumed from. Delete it (or the run's folder) to start over.")
    if "sha256" in ckpt and ckpt["sha256"] != content_digest({k: v for k, v in ckpt.items() if k != "sha256"}):
        raise CheckpointError(f"{path} does not match the SHA-256 it records: corrupted on disk (a flipped bit, "
                              "a partial copy). Delete it to start that run (or stage) over, or restore it.")
    if not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' state dict.")
    if model is not None:
        want, got = _fingerprint(model), ckpt.get("fingerprint", {})
        if want != got:
            missing = sorted(set(want) - set(got))[:3]
            diff = [k for k in want if k in got and want[k] != got[k]][:3]
            raise CheckpointError(
                f"{path} holds weights of another model (class {ckpt.get('model_class')}, "
                f"this model is {type(model).__name__}); missing keys {missing}, shape mismatches {diff}.")
    return ckpt


def load_weights(model: nn.Module, path: str | Path, *, require_digest: bool = True) -> nn.Module:
    """Load weights from a ``model.pt`` or ``checkpoint.pt`` written by :func:`train` into ``model``
    (``require_digest``: see :func:`load_checkpoint`)."""
    ckpt = load_checkpoint(path, model, require_digest=require_digest)
    model.load_state_dict(ckpt["model"])
    return model


def save_model_file(model: nn.Module, path: str | Path, config: dict, history: list) -> Path:
    """Write ``model``'s weights as a complete run's ``model.pt`` (what :func:`load_weights` reads), e.g. for
    weights that were supplied rather than trained (``config`` and ``history`` say where they came from)."""
    return _save_checkpoint(Path(path), {"format": CHECKPOINT_FORMAT, "model_class": type(model).__name__,
                                         "fingerprint": _fingerprint(model), "config": config, "epoch": 0,
                                         "model": {k: v.contiguous() for k, v in model.state_dict().items()},
                                         "history": history}) or Path(path)


def train(model: nn.Module, train_data, val_data=None, *, epochs: int | None = None,
          config: TrainConfig | None = None, checkpoint_dir: str | Path | None = None,
          resume: bool = True, progress: bool = True, channels_last: bool = True,
          loss_fn: nn.Module | None = None, callback: Callable[[dict], bool | None] | None = None,
          **kwargs) -> dict:
    """Train ``model`` in place with SGD; return the log (config and per-epoch records).

    ``train_data`` is a :class:`~hawqlib.repro.data.TensorLoader` (or any re-iterable of batches with an
    optional ``set_epoch``); ``val_data`` is evaluated every ``eval_every`` epochs. Pass either a
    :class:`TrainConfig` or its fields as keywords (``epochs=``, ``lr=``, ``schedule=``, ...).
    ``callback(record)`` is called after each epoch, once its checkpoint and log are on disk; if it
    returns True the run stops there (resumable later; ``model.pt`` is written only by a complete run).
    ``loss_fn`` (default cross entropy) is called as ``loss_fn(outputs, targets)``, or as
    ``loss_fn(outputs, targets, inputs)`` when it has ``needs_inputs = True``
    (:class:`hawqlib.distill.DistillationLoss`). Buffers that require grad are trained with the parameters
    (without weight decay: :meth:`hawqlib.quant.QuantAct.set_learn_step`).
    """
    if config is None:
        config = TrainConfig(epochs=epochs, **kwargs) if epochs is not None else None
    elif epochs is not None or kwargs:
        raise TypeError("pass either config= or its fields as keywords, not both")
    if config is None:
        raise TypeError("train() needs epochs= (or a TrainConfig via config=)")
    config.validate()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    steps_per_epoch = len(train_data)
    if steps_per_epoch == 0:
        raise ValueError("train_data yields no batches")

    if channels_last:
        model.to(memory_format=torch.channels_last)
    distributed = hdist.is_distributed()
    if distributed:
        model.to(hdist.device())
        train_data, val_data = hdist.shard(train_data), hdist.shard(val_data)
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    # Buffers that require grad (a learned quantizer step, hawqlib.quant.QuantAct.set_learn_step) are trained
    # too, without weight decay (a decayed step would shrink towards zero); DDP does not average them, so the
    # ranks' gradients are averaged below.
    learned = [b for b in model.buffers() if b.requires_grad]
    groups = [{"params": params}] + ([{"params": learned, "weight_decay": 0.0}] if learned else [])
    opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                          nesterov=config.nesterov, weight_decay=config.weight_decay)
    with_inputs = bool(getattr(loss_fn, "needs_inputs", False))

    ckpt_path = log_path = None
    log = {"config": config.to_dict(), "model_class": type(model).__name__,
           "steps_per_epoch": steps_per_epoch, "epochs": []}
    start_epoch = 0
    main = hdist.is_main()
    if checkpoint_dir is not None:
        ckpt_dir = Path(checkpoint_dir)
        ckpt_path, log_path = ckpt_dir / "checkpoint.pt", ckpt_dir / "log.json"
        ckpt = _read_resume(ckpt_path, model) if resume else None
        if ckpt is not None:
            if ckpt["config"] != log["config"]:
                diff = {k: (ckpt["config"].get(k), v) for k, v in log["config"].items()
                        if ckpt["config"].get(k) != v}
                raise CheckpointError(f"{ckpt_path} was written by a run with another configuration "
                                      f"(checkpoint vs now: {diff}); use another checkpoint_dir or resume=False.")
            _check_resume(ckpt_path, ckpt, config.epochs)
            model.load_state_dict(ckpt["model"])
            try:  # a digest vouches for the bytes, not for what they hold
                opt.load_state_dict(ckpt["optimizer"])
            except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
                raise CheckpointError(f"{ckpt_path}: field 'optimizer' is not this run's SGD state ({type(exc).__name__}: "
                                      f"{exc}). Delete the checkpoint to start the run over.") from None
            _check_optimizer(ckpt_path, opt)
            start_epoch, log["epochs"] = ckpt["epoch"], ckpt["history"]
            if "rng_state" in ckpt:  # absent in checkpoints written before it was saved
                torch.set_rng_state(ckpt["rng_state"])
            if progress and main:
                print(f"resuming from {ckpt_path} at epoch {start_epoch}/{config.epochs}")

    bar = None
    if progress and main:
        from .progress import bar as progress_bar
        bar = progress_bar(total=config.epochs, initial=start_epoch, desc="train", unit="epoch")
    with hdist.sync_batchnorm(model) if distributed else contextlib.nullcontext():
        net = model
        if distributed:
            dev = hdist.device()
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None, forward_sync_buffers=True)
        for epoch in range(start_epoch, config.epochs):
            if hasattr(train_data, "set_epoch"):
                train_data.set_epoch(epoch)
            net.train()
            t0 = time.perf_counter()
            acc_device = params[0].device if params else torch.device("cpu")
            loss_sum = torch.zeros((), device=acc_device)
            correct = torch.zeros((), dtype=torch.long, device=acc_device)
            seen = 0
            step = epoch * steps_per_epoch
            for x, y in train_data:
                for g in opt.param_groups:
                    g["lr"] = lr_at(config, step, steps_per_epoch)
                out = net(x)
                loss = loss_fn(out, y, x) if with_inputs else loss_fn(out, y)
                bad = not torch.isfinite(loss.detach())
                if distributed:  # every rank stops together, or none does
                    bad = bool(hdist.all_reduce_max(torch.tensor(float(bad), device=loss.device)))
                if bad:
                    raise NonFiniteLossError(
                        f"training loss is {float(loss.detach())} at epoch {epoch + 1}, step {step - epoch * steps_per_epoch + 1}"
                        f"/{steps_per_epoch}: stopped before the step; nothing of this epoch is saved"
                        + (f" ({ckpt_path} keeps epoch {epoch})" if ckpt_path is not None and epoch else "")
                        + ". Causes: NaN/inf in the starting weights or the data, or a learning rate too large.")
                opt.zero_grad(set_to_none=True)
                share = len(y) * train_data.world / train_data.global_n if distributed else 1.0
                # DDP averages the ranks' gradients: scaled by its share, each rank's mean loss makes that
                # average the gradient of the global batch's mean loss (hawqlib.distributed)
                (loss if share == 1.0 else loss * share).backward()
                if distributed and learned:  # the mean over ranks, as DDP gives the parameters
                    for b in learned:
                        if b.grad is not None:
                            hdist.all_reduce_sum(b.grad).div_(hdist.world_size())
                opt.step()
                with torch.no_grad():
                    loss_sum += loss.detach() * len(y)
                    correct += (out.argmax(1) == y).sum()
                seen += len(y)
                step += 1
            if distributed:
                tot = hdist.all_reduce_sum(torch.stack([loss_sum.double(), correct.double(),
                                                        torch.tensor(seen, dtype=torch.float64, device=acc_device)]))
                loss_sum, correct, seen = tot[0], int(tot[1]), int(tot[2])
                hdist.broadcast_buffers(model)  # rank 0's BatchNorm statistics and quantizer ranges everywhere
            # A NaN or infinite gradient can leave the loss finite for a step and the weights not: checked once an
            # epoch, before anything of the epoch is evaluated or saved (the ranks hold the same weights).
            bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
            if bad:
                raise NonFiniteLossError(
                    f"weights {', '.join(bad[:3])}{' and others' if len(bad) > 3 else ''} became NaN or infinite in "
                    f"epoch {epoch + 1} while the training loss stayed finite (a NaN or infinite gradient): stopped; "
                    "nothing of this epoch is saved" + (f" ({ckpt_path} keeps epoch {epoch})" if ckpt_path is not None and epoch
                                                          else "")
                    + ". Causes: a learning rate too large for the gradients, or NaN/inf in the data.")
            wall = time.perf_counter() - t0
            rec = {"epoch": epoch + 1, "lr": lr_at(config, step - 1, steps_per_epoch),
                   "train_loss": float(loss_sum) / seen, "train_top1": 100.0 * int(correct) / seen,
                   "images_per_s": seen / wall, "wall_s": wall}
            if val_data is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
                t1 = time.perf_counter()
                ev = evaluate(model, val_data)
                if not math.isfinite(ev["loss"]):
                    raise NonFiniteLossError(
                        f"the validation loss is {ev['loss']} after epoch {epoch + 1} with finite weights (NaN or "
                        "infinite outputs, or NaN in the validation data): stopped; nothing of this epoch is saved"
                        + (f" ({ckpt_path} keeps epoch {epoch})" if ckpt_path is not None and epoch else "") + ".")
                rec.update(val_top1=ev["top1"], val_top5=ev["top5"], val_loss=ev["loss"],
                           eval_s=time.perf_counter() - t1)
            rec = hdist.broadcast_object(rec)  # rank 0's record (its times) on every rank
            log["epochs"].append(rec)
            if ckpt_path is not None:
                if main:
                    _save_checkpoint(ckpt_path, {"format": CHECKPOINT_FORMAT, "model_class": type(model).__name__,
                                                  "fingerprint": _fingerprint(model), "config": log["config"],
                                                  "epoch": epoch + 1, "model": model.state_dict(),
                                                  "optimizer": opt.state_dict(), "history": log["epochs"],
                                                  "rng_state": torch.get_rng_state()})
                    atomic_write_json(log_path, log)
                hdist.barrier()
            if bar is not None:
                post = {"loss": f"{rec['train_loss']:.3f}", "acc": f"{rec['train_top1']:.1f}",
                        "img/s": f"{rec['images_per_s']:.0f}"}
                if "val_top1" in rec:
                    post["val"] = f"{rec['val_top1']:.2f}"
                bar.set_postfix(post)
                bar.update(1)
            if callback is not None and hdist.broadcast_object(bool(callback(rec))):
                if bar is not None:
                    bar.close()
                if progress and main and ckpt_path is not None:
                    print(f"stopped after epoch {epoch + 1}/{config.epochs}; resume from {ckpt_path}")
                return log
    if bar is not None:
        bar.close()
    if ckpt_path is not None:
        if main:
            _save_checkpoint(ckpt_path.parent / "model.pt",
                             {"format": CHECKPOINT_FORMAT, "model_class": type(model).__name__,
                              "fingerprint": _fingerprint(model), "config": log["config"],
                              "epoch": config.epochs,
                              "model": {k: v.contiguous() for k, v in model.state_dict().items()},
                              "history": log["epochs"]})
        hdist.barrier()
    return log


def _read_resume(path: Path, model: nn.Module) -> dict | None:
    """The checkpoint to resume from, or None when there is none. Under a process group rank 0 reads it and
    sends it (or news of the error it raised) to every rank, so that all resume from the same file."""
    return hdist.on_main(lambda: load_checkpoint(path, model) if path.exists() else None)


def _check_optimizer(path: Path, opt: torch.optim.Optimizer) -> None:
    """The loaded SGD state holds numbers for its settings and one momentum buffer per parameter, of its shape."""
    for group in opt.param_groups:
        bad = [k for k in ("lr", "momentum", "weight_decay", "dampening") if not isinstance(group.get(k), (int, float))]
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None and not (isinstance(buf, torch.Tensor) and buf.shape == p.shape):
                bad.append("momentum_buffer")
        if bad:
            raise CheckpointError(f"{path}: field 'optimizer' holds malformed {sorted(set(bad))}. Delete the "
                                  "checkpoint to start the run over.")


def _check_resume(path: Path, ckpt: dict, epochs: int) -> None:
    """Range-check what a resume takes from a checkpoint: epoch, history, optimizer state, finite weights."""
    epoch, hist = ckpt.get("epoch"), ckpt.get("history")
    if type(epoch) is not int or not 1 <= epoch <= epochs:
        raise CheckpointError(f"{path}: field 'epoch' is {epoch!r}; valid: a whole number in 1..{epochs}. "
                              "Delete the checkpoint to start the run over.")
    if (not isinstance(hist, list) or len(hist) != epoch
            or [r.get("epoch") if isinstance(r, dict) else None for r in hist] != list(range(1, epoch + 1))):
        raise CheckpointError(f"{path}: field 'history' does not hold one record per epoch 1..{epoch}. "
                              "Delete the checkpoint to start the run over.")
    if not isinstance(ckpt.get("optimizer"), dict):
        raise CheckpointError(f"{path}: field 'optimizer' is missing. Delete the checkpoint to start the run over.")
    rng, want = ckpt.get("rng_state"), torch.get_rng_state()
    if "rng_state" in ckpt and not (isinstance(rng, torch.Tensor) and rng.dtype == want.dtype
                                    and rng.shape == want.shape):
        raise CheckpointError(f"{path}: field 'rng_state' is not a CPU random state (a {want.dtype} tensor of shape "
                              f"{tuple(want.shape)}). Delete the checkpoint to start the run over.")
    bad = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: weights {bad[:3]} hold NaN or infinity. Delete the checkpoint to start "
                              "the run over.")
