r"""The per-block quantities of HAWQ sections 3.1 and 3.2: sensitivity :math:`S_i` and perturbation :math:`\Omega_i`.

Notation (paper section 3.1): block :math:`B_i` holds the weights :math:`W_i` (:math:`n_i` of them, see
:mod:`hawqlib.blocks`); :math:`\lambda_i` is the top eigenvalue of its Hessian block :math:`H_i` (from
:mod:`hawqlib.hessian`). Then

- **sensitivity** :math:`S_i = \lambda_i / n_i` (section 3.1, :func:`sensitivities`); the paper sorts
  blocks by :math:`S_i` and gives more sensitive blocks more bits (:mod:`hawqlib.allocate`);
- **second-order perturbation** of quantizing :math:`B_i` to :math:`b` bits:
  :math:`\Omega_i(b) = \lambda_i \lVert Q_b(W_i) - W_i \rVert_2^2` (the quantity of section 3.2, i.e. the
  quadratic model :math:`\frac{1}{2} \Delta W_i^T H_i \Delta W_i` bounded by its top eigenvalue, without the
  constant :math:`\frac{1}{2}`); it orders the blocks for fine-tuning (:mod:`hawqlib.order`).

The quantizer behind :math:`Q_b` is :func:`hawqlib.quant.grids.quantize_tensor` with the same settings that
:func:`hawqlib.quant.swap.quantize_model` uses, so the predicted perturbation is of the weights the
fine-tuned model starts from. A spectrum is any object with ``.name``, ``.numel`` and ``.eigenvalue``
(:class:`hawqlib.hessian.BlockSpectrum`, or a record of your own).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .blocks import quant_blocks
from .quant import quantize_tensor
from .size import size_table

__all__ = ["sensitivities", "quant_errors", "error_table", "block_errors", "allocation_table", "lambda_of", "match_blocks", "check_config_blocks"]


def lambda_of(spec: Any) -> float:
    """The top eigenvalue of a spectrum object: ``.eigenvalue`` (a number, or a sequence whose max is taken)."""
    if not hasattr(spec, "eigenvalue"):
        raise TypeError(f"a spectrum needs .name, .numel and .eigenvalue attributes; got {type(spec).__name__}")
    lam = spec.eigenvalue
    if isinstance(lam, torch.Tensor):
        lam = lam.max().item() if lam.numel() > 1 else lam.item()
    elif isinstance(lam, Sequence):
        if not lam:
            raise ValueError(f"spectrum of block {getattr(spec, 'name', '?')!r} has no eigenvalue")
        lam = max(float(v) for v in lam)
    lam = float(lam)
    if not math.isfinite(lam):
        raise ValueError(f"block {getattr(spec, 'name', '?')!r} has a non-finite eigenvalue {lam}")
    return lam


def _spectra_list(spectra) -> list:
    if isinstance(spectra, Mapping):
        spectra = list(spectra.values())
    if isinstance(spectra, (str, bytes)) or not isinstance(spectra, Sequence):
        spectra = list(spectra)
    for s in spectra:
        for attr in ("name", "numel", "eigenvalue"):
            if not hasattr(s, attr):
                raise TypeError(f"a spectrum needs .name, .numel and .eigenvalue attributes; "
                                f"{type(s).__name__} has no .{attr}")
    names = [s.name for s in spectra]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"spectra name blocks more than once: {dup}")
    if not spectra:
        raise ValueError("spectra is empty: need one spectrum per block")
    return list(spectra)


def sensitivities(spectra) -> dict[str, float]:
    r""":math:`S_i = \lambda_i / n_i` for each block (paper section 3.1), as ``{name: S_i}`` in the spectra's order.

    ``spectra`` is a sequence (or a name-keyed mapping) of objects with ``.name``, ``.numel`` and
    ``.eigenvalue`` (the top Hessian eigenvalue of the block; a sequence of eigenvalues counts by its max).
    """
    out = {}
    for s in _spectra_list(spectra):
        n = int(s.numel)
        if n < 1:
            raise ValueError(f"block {s.name!r} has numel {s.numel!r}; must be >= 1")
        out[s.name] = lambda_of(s) / n
    return out


def match_blocks(model: nn.Module, spectra, granularity) -> tuple[list, list]:
    """``(blocks, spectra)``: the model's blocks at ``granularity`` and their spectra, both in module order.

    A ValueError names the blocks a spectrum is missing for, the spectra that name no block, and a
    spectrum whose ``numel`` differs from its block's (it belongs to another model or granularity).
    """
    blocks = quant_blocks(model, granularity)
    specs = _spectra_list(spectra)
    by_name = {s.name: s for s in specs}
    names = [b.name for b in blocks]
    missing = [n for n in names if n not in by_name]
    extra = [n for n in by_name if n not in set(names)]
    if missing or extra:
        raise ValueError(f"spectra do not match the model's blocks at granularity {granularity!r}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unknown {extra[:5]}{'...' if len(extra) > 5 else ''}; valid block names: {names[:8]}"
                         f"{'...' if len(names) > 8 else ''}")
    ordered = [by_name[n] for n in names]
    for b, s in zip(blocks, ordered):
        if int(s.numel) != b.numel:
            raise ValueError(f"spectrum of block {b.name!r} says numel={s.numel} but the model's block "
                             f"has {b.numel} weights: the spectrum belongs to another model or granularity")
    return blocks, ordered


def quant_errors(block, choices) -> list[float]:
    r""":math:`\lVert Q_b(W_i) - W_i \rVert_2^2` of one block for each ``b`` in ``choices`` (summed over its weight
    tensors)."""
    out = []
    with torch.no_grad():
        for b in choices:
            tot = 0.0
            for w in block.params:
                w = w.detach().float()
                tot += float((quantize_tensor(w, b) - w).double().pow(2).sum())
            out.append(tot)
    return out


def error_table(blocks, choices) -> dict[str, dict[int, float]]:
    r"""``{block name: {b: error}}``, the error :math:`\lVert Q_b(W_i) - W_i \rVert_2^2` for every block and every
    ``b`` in ``choices``: computed once
    and handed to :func:`hawqlib.allocate.allocate_bits`, :func:`hawqlib.order.finetune_order` and
    :func:`allocation_table` (``errors=``), so that one call quantizes each block at each width once."""
    return {b.name: dict(zip(choices, quant_errors(b, choices))) for b in blocks}


def block_errors(blocks, choices, errors=None) -> list[list[float]]:
    r"""``out[i][j]`` :math:`= \lVert Q_{b_j}(W_i) - W_i \rVert_2^2` with :math:`b_j` = ``choices[j]``, read from
    ``errors`` (:func:`error_table`) where it has the
    entry, computed (:func:`quant_errors`) where it does not."""
    out = []
    for b in blocks:
        have = (errors or {}).get(b.name, {})
        missing = [c for c in choices if c not in have]
        got = dict(zip(missing, quant_errors(b, missing))) if missing else {}
        out.append([have[c] if c in have else got[c] for c in choices])
    return out


def allocation_table(model: nn.Module, spectra, bit_config, *, errors=None) -> list[dict]:
    r"""One row per block, in module order, for a given ``bit_config``.

    Row keys: ``name``, ``numel`` (:math:`n_i`), ``lambda`` (:math:`\lambda_i`), ``S`` (:math:`\lambda_i / n_i`),
    ``bits``, ``quant_error`` (:math:`\lVert Q(W_i) - W_i \rVert_2^2`), ``omega``
    (:math:`\lambda_i \lVert Q(W_i) - W_i \rVert_2^2`, the predicted perturbation; a negative lambda counts as 0, as
    in :func:`hawqlib.allocate.allocate_bits`), ``size_bytes`` (the block's packed weights and scales, by
    :func:`hawqlib.size.size_table`). ``errors``: the errors of
    :func:`error_table`, where the caller has them already.
    """
    blocks, specs = match_blocks(model, spectra, bit_config.granularity)
    check_config_blocks(blocks, bit_config)
    sizes = {r["block"]: r["bytes"] for r in size_table(model, bit_config)}
    rows = []
    for b, s in zip(blocks, specs):
        bits = bit_config.weights[b.name]
        lam = lambda_of(s)
        err = block_errors([b], (bits,), errors)[0][0]
        rows.append({"name": b.name, "numel": b.numel, "lambda": lam, "S": lam / b.numel, "bits": bits,
                     "quant_error": err, "omega": max(lam, 0.0) * err, "size_bytes": sizes[b.name]})
    return rows


def check_config_blocks(blocks, bit_config) -> None:
    """Raise a ValueError unless ``bit_config`` gives bits to exactly the blocks ``blocks``."""
    names = [b.name for b in blocks]
    missing = [n for n in names if n not in bit_config.weights]
    extra = [n for n in bit_config.weights if n not in set(names)]
    if missing or extra:
        raise ValueError(f"bit config does not match the model's blocks at granularity "
                         f"{bit_config.granularity!r}: missing {missing[:5]}, unknown {extra[:5]}")
