"""Staged quantization-aware fine-tuning in the Omega order (HAWQ section 3.2, "multi-stage fine-tuning").

The paper quantizes blocks progressively: the block with the largest ``Omega_i = lambda_i
||Q(W_i) - W_i||_2^2`` (:func:`hawqlib.order.finetune_order`) first; between stages the network is
fine-tuned with the already-quantized blocks held in their quantized form by the straight-through
estimator, and at the end every block is quantized (section 3.2-3.3). The per-stage schedule is not
restated by the paper. Our choices, with their reasons:

- **Stages.** The ordered block list is split into ``stages`` contiguous groups of sizes that differ by at
  most one, larger groups first (``numpy.array_split``'s rule): with 20 blocks and 4 stages, groups of
  5. Stage k switches on the weight quantization of group k (groups 1..k are then quantized) and
  fine-tunes the whole network for ``epochs_per_stage`` epochs. ``stages = 1`` is direct quantization
  (every block at once), the baseline of :func:`direct_finetune`. An optional last stage of
  ``final_epochs`` fine-tunes the fully quantized network further.
- **Activations** are quantized (at ``act_bits``) from the first stage on, in every layer that
  :func:`hawqlib.quant.swap.quantize_model` gives a :class:`~hawqlib.quant.modules.QuantAct`: the activation grid is
  shared by all blocks, and turning it on last would leave one stage to absorb it alone. Before stage 1
  the activation ranges are calibrated on ``calibration_batches`` training batches (of epoch 0, in eval
  mode, :func:`hawqlib.quant.swap.calibrate_activations`; by default over all of them at once, our choice), so that the accuracy right after each quantization
  step can be measured before any fine-tuning.
- **Optimizer and schedule.** Each stage is one run of :func:`hawqlib.train.train` (SGD with momentum,
  cosine decay of the learning rate from ``lr`` to 0 within the stage, a fresh optimizer per stage): each
  stage ends at a settled point before the next group is quantized. The data loader's epochs are
  numbered globally across stages (stage k, epoch e reads loader epoch ``(k-1)*epochs_per_stage + e``),
  so every stage sees fresh shuffles and augmentations.
- **Checkpoints and resume.** Stage k writes into ``checkpoint_dir/stage_k/`` (``checkpoint.pt`` after
  every epoch, atomically, and ``model.pt`` at its end, by :func:`hawqlib.train.train`); ``history.json``
  in ``checkpoint_dir`` holds the per-stage records. With ``resume=True`` finished stages are loaded, the
  interrupted one continues from its last epoch, and the run ends with exactly the weights of an
  uninterrupted run (CPU, same seed). Each checkpoint records the stage plan, the bit config and a digest
  of the starting weights, so a checkpoint of another plan is refused rather than silently continued.
  ``history.json`` records the SHA-256 of its content as checkpoints do (:func:`_verified_history`); an
  edited or corrupted one, or a checkpoint without its digest, is refused, naming the folder to delete.
- **Beyond the paper** (off by default, for the ResNet20 chapter's attempts at closing its accuracy gap):
  ``final_epochs`` adds a stage with every block quantized; ``act_step="learned"`` trains each activation
  step from its calibrated value (LSQ, :meth:`hawqlib.quant.QuantAct.set_learn_step`) from stage 1 on;
  ``distill`` trains that final stage against the FP32 network (:class:`hawqlib.distill.DistillationLoss`).
  The plan records the last two only when they are on, so plans without them are unchanged.
- **Shared stages** (ours, to spend no compute twice). ``final_epochs`` and ``distill`` act on the extra
  final stage alone: two runs whose plans differ only in them train the stages that quantize a group
  identically, given the same training data in the same order on the same kind of device, number of
  processes and torch threads (which the caller vouches for: :func:`hawqlib.repro.pipeline.finetuned` offers only runs of the same
  artifact key but for those settings, so of the same data). With ``share_from``, such a stage that this run
  has not finished is taken from the first run listed there that has finished it under the same training
  config but for those settings: its ``model.pt`` (with a digest, verified) and the ``before`` record of its
  ``history.json`` are written into this run's folder under this run's config, the history first, marked
  ``shared_from``. The run goes on as if it had trained the stage itself (finished stages are restored as
  training leaves them) and ends with the same weights; the shared stage's epoch records, times included,
  are the other run's.
- **Many processes** (``torchrun``, :mod:`hawqlib.distributed`): every stage is a data-parallel
  :func:`hawqlib.train.train`; calibration runs on the same global batches on every rank and is followed
  by a broadcast of rank 0's quantizer buffers; rank 0 alone reads and writes ``history.json`` and the
  stage files, and sends what it read to the other ranks. Every rank must pass the same ``model``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from . import distributed as hdist
from .bitconfig import BitConfig
from .blocks import quant_blocks
from .progress import bar as progress_bar, write as progress_write
from .distill import DistillationLoss, check_distill
from .quant import CALIBRATIONS, QuantAct, calibrate_activations, quantize_model, set_quant_enabled
from .files import atomic_write_json
from .train import CheckpointError, TrainConfig, _save_checkpoint, content_digest, evaluate, load_checkpoint, train

__all__ = ["stage_groups", "staged_finetune", "direct_finetune", "FINETUNE_FORMAT", "ACT_STEPS"]

FINETUNE_FORMAT = "hawqlib.finetune/1"
#: How the activation step is set during fine-tuning: from the observed range, or trained (LSQ-style).
ACT_STEPS = ("fitted", "learned")
#: Plan settings that act on the final stage alone: runs differing only in them share stages 1..n.
FINAL_STAGE_SETTINGS = ("final_epochs", "distill")


def stage_groups(order: Sequence[str], stages: int) -> list[list[str]]:
    """Split ``order`` into ``stages`` contiguous groups whose sizes differ by at most one, larger first."""
    n = len(order)
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= n:
        raise ValueError(f"stages must be an int in 1..{n} (the number of blocks), got {stages!r}")
    q, r = divmod(n, stages)
    out, i = [], 0
    for k in range(stages):
        size = q + (1 if k < r else 0)
        out.append(list(order[i:i + size]))
        i += size
    return out


def _order_names(order, bit_config: BitConfig) -> list[str]:
    if isinstance(order, (str, bytes)) or not isinstance(order, Sequence):
        raise TypeError("order must be a sequence of block names or of records with a .name "
                        "(e.g. hawqlib.order.finetune_order(...))")
    names = []
    for o in order:
        name = o if isinstance(o, str) else getattr(o, "name", None)
        if not isinstance(name, str):
            raise TypeError(f"order entries must be block names or records with a .name, got {o!r}")
        names.append(name)
    dup = sorted({n for n in names if names.count(n) > 1})
    valid = list(bit_config.weights)
    missing = [n for n in valid if n not in names]
    unknown = [n for n in names if n not in bit_config.weights]
    if dup or missing or unknown:
        raise ValueError(f"order must name every block of the bit config exactly once: duplicated {dup}, "
                         f"missing {missing}, unknown {unknown}; valid block names: {valid}")
    return names


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class _GlobalEpochs:
    """A view of a loader whose epoch ``e`` is the underlying loader's epoch ``offset + e``."""

    def __init__(self, data, offset: int):
        self.data, self.offset = data, offset

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        return iter(self.data)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(self.offset + epoch)


def _eval_record(model, val_data) -> dict | None:
    if val_data is None:
        return None
    ev = evaluate(model, val_data)
    return {"val_top1": ev["top1"], "val_top5": ev["top5"], "val_loss": ev["loss"]}


def staged_finetune(model: nn.Module, bit_config: BitConfig, order, train_data, val_data=None, *,
                    stages: int, epochs_per_stage: int, lr: float, checkpoint_dir=None, resume: bool = True,
                    progress: bool = True, seed: int = 0, weight_decay: float = 1e-4, momentum: float = 0.9,
                    nesterov: bool = True, act_bits: int | None = None, final_epochs: int = 0,
                    calibration_batches: int = 4, callback=None, weight_rule: str = "mse",
                    act_rule: str = "mse", act_step: str = "fitted",
                    distill: dict | None = None, share_from: dict | None = None,
                    calibration: str = "union") -> tuple[nn.Module, dict]:
    """Quantize ``model`` to ``bit_config`` block group by block group in ``order``, fine-tuning after each.

    ``order``: the block names (or :class:`hawqlib.order.OmegaEntry` records), first to be quantized
    first; it must name each block of ``bit_config`` once. ``train_data``: a re-iterable of ``(x, y)`` batches
    with ``len`` and, optionally, ``set_epoch`` (:class:`hawqlib.repro.data.TensorLoader`). ``act_bits`` overrides
    ``bit_config.act_bits``; ``weight_rule``/``act_rule`` the weight scale and activation range rules
    (:func:`hawqlib.quant.swap.quantize_model`).
    ``act_step``: ``"fitted"`` (the activation step follows the observed range, the default) or ``"learned"``
    (from stage 1 on, each activation quantizer's step is trained from its calibrated value, LSQ-style:
    :meth:`hawqlib.quant.QuantAct.set_learn_step`). ``distill``: ``{"alpha": a, "temperature": T}`` trains the
    final stage (``final_epochs`` > 0) with :class:`hawqlib.distill.DistillationLoss` from ``model`` (the FP32
    network) as teacher. Both are extensions to the paper's recipe, off by default; when on, the plan records
    them. ``calibration``: how the activation ranges are calibrated before stage 1
    (:func:`hawqlib.quant.swap.calibrate_activations`: ``"union"``, over all ``calibration_batches`` at once, the
    default; ``"moving_average"``, the rule of the book's stored runs, which their plans do not record).
    ``checkpoint_dir=None`` keeps nothing on disk (no resume).
    ``share_from``: ``{label: checkpoint_dir of another run}``; a stage that quantizes a group and that this run
    has not finished is taken from the first of them that finished it under a training config differing from
    this one only in :data:`FINAL_STAGE_SETTINGS` (module docstring, "Shared stages"); needs ``checkpoint_dir``
    and ``resume``.
    ``callback(record)`` is called after every epoch (its checkpoint already on disk) with the epoch's
    record, ``stage`` and ``global_epoch`` included; returning True stops the run there (resumable; the
    history then has ``complete = False``: a time-boxed run, or a test's interruption).
    ``model`` is not modified. Returns ``(qmodel, history)``: the fine-tuned quantized model
    (:func:`hawqlib.quant.swap.quantize_model`'s modules, every block quantized once the run is complete) and

    - ``history["plan"]``: the groups, epochs and settings;
    - ``history["stages"]``: per stage, ``quantized`` (the group switched on), ``before`` (validation right
      after switching it on, before fine-tuning) and ``epochs`` (per epoch: ``train_loss``, ``train_top1``,
      ``val_top1``, ``val_loss``, ``lr``, ``global_epoch``, as :func:`hawqlib.train.train` logs them);
    - ``history["epochs"]``: all epoch records in one list, each with its ``stage``, for curves;
    - ``history["complete"]``: False when ``callback`` stopped the run early.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(bit_config, BitConfig):
        raise TypeError(f"bit_config must be a hawqlib.quant.BitConfig, got {type(bit_config).__name__}")
    bit_config.validate(model)
    names = _order_names(order, bit_config)
    groups = stage_groups(names, stages)
    for what, v, lo in (("epochs_per_stage", epochs_per_stage, 1), ("final_epochs", final_epochs, 0),
                        ("calibration_batches", calibration_batches, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{what} must be an int >= {lo}, got {v!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if act_step not in ACT_STEPS:
        raise ValueError(f"act_step must be one of {', '.join(ACT_STEPS)}, got {act_step!r}")
    if distill is not None:
        if not isinstance(distill, dict) or set(distill) != {"alpha", "temperature"}:
            raise ValueError(f"distill must be None or a dict with keys 'alpha' and 'temperature', got {distill!r}")
        check_distill(distill["alpha"], distill["temperature"])
        if not final_epochs:
            raise ValueError("distill trains the final stage: it needs final_epochs > 0")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; valid: {', '.join(CALIBRATIONS)}")
    if act_step == "learned" and not calibration_batches:
        raise ValueError("act_step='learned' starts from the calibrated step: it needs calibration_batches > 0")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if len(train_data) == 0:
        raise ValueError("train_data yields no batches")
    if share_from is not None and not isinstance(share_from, dict):
        raise TypeError(f"share_from must be a dict {{label: checkpoint_dir of another run}}, got {share_from!r}")
    share_from = dict(share_from or {})
    if share_from and (checkpoint_dir is None or not resume):
        raise ValueError("share_from writes the shared stages into this run's folder: it needs a checkpoint_dir "
                         "and resume=True")
    progress = progress and hdist.is_main()

    start_digest = _weights_digest(model)
    qmodel = quantize_model(model, bit_config, act_bits, weight_rule=weight_rule, act_rule=act_rule)
    eff_cfg: BitConfig = qmodel.bit_config
    # Weights start in FP32 everywhere; activation quantizers stay on from the first stage (module docstring).
    set_quant_enabled(qmodel, None, False, activations=False)

    plan = {"format": FINETUNE_FORMAT, "groups": groups, "epochs_per_stage": epochs_per_stage,
            "final_epochs": final_epochs, "lr": lr, "weight_decay": weight_decay, "momentum": momentum,
            "nesterov": nesterov, "seed": seed, "bit_config": eff_cfg.to_dict(),
            "calibration_batches": calibration_batches, "start_digest": start_digest, "weight_rule": weight_rule,
            "act_rule": act_rule}
    # Recorded only when on, so that the plans (and checkpoints) of runs without them are as before.
    if act_step != "fitted":
        plan["act_step"] = act_step
    if calibration != "moving_average":  # the stored runs' rule, which their plans do not name
        plan["calibration"] = calibration
    if distill is not None:
        plan["distill"] = {"alpha": float(distill["alpha"]), "temperature": float(distill["temperature"])}
    runs = [(k + 1, g, epochs_per_stage) for k, g in enumerate(groups)]
    if final_epochs:
        runs.append((len(groups) + 1, [], final_epochs))

    root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    hist_path = root / "history.json" if root is not None else None
    history = {"plan": plan, "stages": [], "epochs": [], "complete": True}
    cached = _on_main(_read_cached, hist_path, plan) if root is not None and resume else {}
    distributed = hdist.is_distributed()
    if distributed:
        qmodel.to(hdist.device())
        val_data = hdist.shard(val_data)

    done_epochs = 0
    bar = None
    if progress:
        bar = progress_bar(total=len(runs), desc="stages", unit="stage")
    for stage, group, epochs in runs:
        if group:
            set_quant_enabled(qmodel, group, True, activations=False)
        cfg = TrainConfig(epochs=epochs, lr=lr, schedule="cosine", momentum=momentum, nesterov=nesterov,
                          weight_decay=weight_decay, seed=seed,
                          extra={"hawqlib.finetune": {"stage": stage, "plan": plan}})
        sdir = root / f"stage_{stage}" if root is not None else None
        ckpt = (_on_main(lambda: load_checkpoint(sdir / "model.pt", qmodel) if (sdir / "model.pt").exists()
                         else None) if sdir is not None and resume else None)
        shared = None
        if ckpt is None and group and share_from:
            got = _on_main(_share_stage, share_from, stage, cfg.to_dict(), qmodel)
            if got is not None:  # recorded in the history first, so that a crash cannot lose where it came from
                shared, ckpt, before_shared = got
                cached[stage] = {"stage": stage, "quantized": group, "before": before_shared, "epochs": [],
                                 "shared_from": shared}
                _write_history(hist_path, plan, [cached[s] for s in sorted(cached)])
                _on_main(_write_shared, sdir, ckpt)
        finished = ckpt is not None
        if finished:
            want = json.loads(json.dumps(cfg.to_dict()))
            if ckpt["config"] != want:
                raise CheckpointError(f"{sdir / 'model.pt'} was written by another fine-tuning plan; "
                                      "use another checkpoint_dir or resume=False")
            qmodel.load_state_dict(ckpt["model"])
            # as training left it (train's memory layout; a learned step still a trained tensor), so that the
            # next stage's "before" evaluation computes what an uninterrupted run computes, to the bit
            qmodel.to(memory_format=torch.channels_last)
            if act_step == "learned":
                _learn_steps(qmodel, True)
            log_epochs = ckpt["history"]
            before = cached.get(stage, {}).get("before")
            shared = cached.get(stage, {}).get("shared_from")
        else:
            if stage == 1 and calibration_batches:
                if hasattr(train_data, "set_epoch"):
                    train_data.set_epoch(0)
                batches = train_data
                if distributed:  # the global batches on every rank, on its device
                    dev = hdist.device()
                    batches = ((x.to(dev), y) for x, y in train_data)
                calibrate_activations(qmodel, batches, num_batches=calibration_batches, calibration=calibration)
                hdist.broadcast_buffers(qmodel)
            if stage in cached:
                before = cached[stage]["before"]
            else:
                before = _eval_record(qmodel, val_data) if group else None
            if sdir is not None and stage not in cached:  # record the pre-fine-tuning point before training
                cached[stage] = {"stage": stage, "quantized": group, "before": before, "epochs": []}
                _write_history(hist_path, plan, [cached[s] for s in sorted(cached)])
            if progress:
                progress_write(f"stage {stage}/{len(runs)}: quantizing {len(group)} block(s) {group}"
                           if group else f"stage {stage}/{len(runs)}: final fine-tuning, all blocks quantized")
            if act_step == "learned":
                _learn_steps(qmodel, True)
            loss_fn = None
            if distill is not None and not group:  # the teacher: the FP32 network, on the quantized copy's device
                dev = next(qmodel.parameters()).device
                teacher = model if next(model.parameters()).device == dev else copy.deepcopy(model).to(dev)
                loss_fn = DistillationLoss(teacher, **distill)
            stopped = []

            def stop_hook(rec, _stage=stage, _offset=done_epochs):
                # rank 0's answer on every rank, so that all stop (or go on to the next stage) together
                if hdist.broadcast_object(bool(callback(dict(rec, stage=_stage,
                                                              global_epoch=_offset + rec["epoch"])))):
                    stopped.append(True)
                    return True
                return False
            hook = stop_hook if callback is not None else None
            log = train(qmodel, _GlobalEpochs(train_data, done_epochs), val_data, config=cfg,
                        checkpoint_dir=sdir, resume=resume, progress=progress, callback=hook, loss_fn=loss_fn)
            log_epochs = log["epochs"]
            if stopped:
                history["complete"] = False
        recs = []
        for r in log_epochs:
            r = dict(r, stage=stage, global_epoch=done_epochs + r["epoch"])
            recs.append(r)
        entry = {"stage": stage, "quantized": group,
                 "quantized_total": sum(len(g) for g in groups[:stage]) if group else len(names),
                 "before": before, "epochs": recs, **({"shared_from": shared} if shared else {})}
        history["stages"].append(entry)
        history["epochs"].extend(recs)
        cached[stage] = entry
        if hist_path is not None:
            _write_history(hist_path, plan, history["stages"])
        done_epochs += epochs
        if not history["complete"]:
            break
        if bar is not None:
            post = {"blocks": entry["quantized_total"]}
            if recs and "val_top1" in recs[-1]:
                post["val"] = f"{recs[-1]['val_top1']:.2f}"
            bar.set_postfix(post)
            bar.update(1)
    if bar is not None:
        bar.close()
    _learn_steps(qmodel, False)  # a learned step is a plain buffer again (exports read plain tensors)
    return qmodel, history


def _learn_steps(qmodel: nn.Module, learn: bool) -> None:
    """Train the step of every switched-on activation quantizer (``learn=True``), or fix every step again."""
    for m in qmodel.modules():
        if isinstance(m, QuantAct) and (m.enabled or not learn):
            m.set_learn_step(learn)


def _shared_config(config) -> dict | None:
    """A stage's training config (``TrainConfig.to_dict()``, as JSON reads it back) with its plan's final-stage
    settings left out (None when it is not a fine-tuning stage's config)."""
    try:
        c = json.loads(json.dumps(config))
        plan = c["extra"]["hawqlib.finetune"]["plan"]
        c["extra"]["hawqlib.finetune"]["plan"] = {k: v for k, v in plan.items() if k not in FINAL_STAGE_SETTINGS}
    except (TypeError, KeyError, AttributeError):
        return None
    return c


def _share_stage(share_from: dict, stage: int, config: dict, qmodel: nn.Module):
    """``(label, checkpoint, before)`` of the first run of ``share_from`` that finished ``stage`` under this run's
    training ``config`` but for :data:`FINAL_STAGE_SETTINGS` (:func:`_shared_config`), the checkpoint carrying
    ``config``; None if none did.

    A run whose files do not verify (an unreadable or malformed history, a checkpoint without a digest, failing
    it or of another model) is passed over with a warning: this run then trains the stage itself."""
    want = _shared_config(config)
    for label, other in share_from.items():
        src = Path(other) / f"stage_{stage}" / "model.pt"
        if not src.exists():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a history without a digest is still verified against checkpoints
                old = _verified_history(Path(other) / "history.json")
            rec = {s["stage"]: s for s in old["stages"]}.get(stage)
            ckpt = load_checkpoint(src, qmodel)  # refused without a digest
        except (OSError, ValueError, CheckpointError) as exc:
            warnings.warn(f"not sharing stage {stage} of {label} ({other}): {exc}", stacklevel=3)
            continue
        if rec is None or _shared_config(ckpt.get("config")) != want:
            continue  # another plan, or a stage trained under other settings
        ckpt = {k: v for k, v in ckpt.items() if k != "sha256"}
        ckpt["config"] = json.loads(json.dumps(config))
        return label, ckpt, rec.get("before")
    return None


def _write_shared(sdir: Path, ckpt: dict) -> None:
    """Write a shared stage's checkpoint as this run's ``sdir/model.pt``; this run's own partial files of
    that stage, superseded, go."""
    sdir.mkdir(parents=True, exist_ok=True)
    _save_checkpoint(sdir / "model.pt", ckpt)
    for partial in ("checkpoint.pt", "log.json"):
        (sdir / partial).unlink(missing_ok=True)


def _read_cached(hist_path: Path, plan: dict) -> dict:
    """The stage records of ``history.json`` when it belongs to ``plan`` ({} when there is none)."""
    if not hist_path.exists():
        return {}
    old = _verified_history(hist_path)
    if old.get("plan") != json.loads(json.dumps(plan)):
        raise CheckpointError(f"{hist_path} belongs to another fine-tuning plan (groups, epochs, bit config, "
                              "settings or starting weights differ); use another checkpoint_dir or resume=False")
    return {s["stage"]: s for s in old["stages"]}


def _verified_history(hist_path: Path) -> dict:
    """``history.json`` (its ``sha256`` removed) once its digest verifies (:func:`hawqlib.train.content_digest`, as
    checkpoints'); one written before histories recorded a digest only when every finished stage it records is
    that stage's digest-verified ``model.pt`` to the epoch (our choice: the runs resumed from then keep their
    place; the "before" points such a file records cannot be checked), with a warning. Else CheckpointError."""
    over = f"delete {hist_path.parent} to start the run over (or use resume=False)"
    try:
        old = json.loads(hist_path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{hist_path} is unreadable ({exc}); {over}") from None
    if not isinstance(old, dict):
        raise CheckpointError(f"{hist_path} is not a fine-tuning history (a JSON object); {over}")
    digest = old.pop("sha256", None)
    if digest is not None and digest != content_digest(old):
        raise CheckpointError(f"{hist_path} does not match the SHA-256 it records: edited or corrupted; {over}")
    stages = old.get("stages")
    if not isinstance(stages, list) or not all(isinstance(r, dict) and type(r.get("stage")) is int
                                               and isinstance(r.get("epochs"), list) for r in stages):
        raise CheckpointError(f"{hist_path}: field 'stages' is not a list of stage records; {over}")
    if digest is None:
        for r in stages:
            if not r["epochs"]:
                continue  # recorded before the stage trained: its "before" point alone
            ckpt = load_checkpoint(hist_path.parent / f"stage_{r['stage']}" / "model.pt")
            mine = [{k: v for k, v in e.items() if k not in ("stage", "global_epoch")} if isinstance(e, dict) else e
                    for e in r["epochs"]]
            if json.loads(json.dumps(ckpt["history"])) != mine:
                raise CheckpointError(f"{hist_path} records no SHA-256, and its stage {r['stage']} does not match "
                                      f"that stage's checkpoint; {over}")
        warnings.warn(f"{hist_path} was written before fine-tuning histories recorded a SHA-256; accepted because "
                      "every stage it records matches its digest-verified checkpoint (it is rewritten with a digest "
                      "at the next stage)", stacklevel=3)
    return old


def _on_main(fn, *args):
    """``fn(*args)``, run on rank 0 alone under a process group and sent to every rank (its errors too:
    :func:`hawqlib.distributed.on_main`)."""
    return hdist.on_main(fn, *args)


def _write_history(path: Path, plan: dict, stages: list) -> None:
    """Write the resume state, with the SHA-256 of its content (:func:`hawqlib.train.content_digest`, as
    checkpoints record theirs) under ``sha256``."""
    if not hdist.is_main():
        return
    hist = json.loads(json.dumps({"plan": plan, "stages": stages,
                                  "epochs": [r for s in stages for r in s.get("epochs", [])]}))
    atomic_write_json(path, {**hist, "sha256": content_digest(hist)})


def direct_finetune(model: nn.Module, bit_config: BitConfig, train_data, val_data=None, *, epochs: int,
                    lr: float, **kwargs) -> tuple[nn.Module, dict]:
    """The direct baseline: every block quantized at once, then ``epochs`` epochs of fine-tuning.

    Same as :func:`staged_finetune` with one stage (the order is irrelevant there); other keywords pass on.
    """
    bit_config.validate(model)
    names = [b.name for b in quant_blocks(model, bit_config.granularity)]
    return staged_finetune(model, bit_config, names, train_data, val_data, stages=1, epochs_per_stage=epochs,
                           lr=lr, **kwargs)
