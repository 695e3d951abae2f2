r"""The fine-tuning order of HAWQ section 3.2: blocks by :math:`\Omega_i` at their assigned bits, largest first.

After the bits are chosen (:mod:`hawqlib.allocate`), the paper quantizes and fine-tunes the network in
stages, starting with the block whose quantization perturbs the loss most by the second-order model
(:mod:`hawqlib.sensitivity`)

.. math::

   \Omega_i = \lambda_i \, \lVert Q(W_i) - W_i \rVert_2^2 ,

which gets the most fine-tuning to recover, while the rest of the network is still in full precision and
free to adapt to it. :func:`finetune_order` computes that order; for the paper's ablation it also gives the
exact reverse (smallest :math:`\Omega_i` first) and a seeded random permutation.
:func:`hawqlib.finetune.staged_finetune` takes its entries (or their names) as they come.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from torch import nn

from .sensitivity import block_errors, check_config_blocks, lambda_of, match_blocks

__all__ = ["ORDERS", "OmegaEntry", "finetune_order"]

#: Orders of staged fine-tuning: the paper's (largest Omega first) and the ablation's.
ORDERS = ("omega", "reverse", "random")


@dataclass(frozen=True)
class OmegaEntry:
    r"""A block in the fine-tuning order: ``omega`` :math:`= \lambda \lVert Q(W) - W \rVert_2^2` at ``bits``
    (section 3.2)."""

    name: str
    omega: float
    bits: int
    lam: float

    @property
    def lambda_(self) -> float:
        """The block's top Hessian eigenvalue (alias of ``lam``)."""
        return self.lam


def finetune_order(model: nn.Module, spectra, bit_config, *, policy: str = "omega",
                   seed: int = 0, errors=None) -> list[OmegaEntry]:
    r"""Blocks by :math:`\Omega_i = \lambda_i \lVert Q(W_i) - W_i \rVert_2^2` at their bits, largest first (paper
    section 3.2).

    Ties (e.g. several blocks left at 8 bits with tiny errors that coincide) keep module order.
    Negative eigenvalues are used as they are here (the order is the paper's rule, unclamped).
    For the ablation, ``policy="reverse"`` returns the exact reverse (smallest :math:`\Omega_i` first) and
    ``policy="random"`` a ``random.Random(seed)`` shuffle of the :math:`\Omega` order; each record still carries
    its :math:`\Omega_i`. ``errors``: the blocks' quantization errors (:func:`hawqlib.sensitivity.error_table`) where
    the caller has them already.
    """
    if policy not in ORDERS:
        raise ValueError(f"unknown fine-tuning order {policy!r}; valid: {', '.join(ORDERS)}")
    blocks, specs = match_blocks(model, spectra, bit_config.granularity)
    check_config_blocks(blocks, bit_config)
    entries = []
    for b, s in zip(blocks, specs):
        bits = bit_config.weights[b.name]
        lam = lambda_of(s)
        entries.append(OmegaEntry(b.name, lam * block_errors([b], (bits,), errors)[0][0], bits, lam))
    order = sorted(range(len(entries)), key=lambda i: (-entries[i].omega, i))
    if policy == "reverse":
        order.reverse()
    elif policy == "random":  # a seeded shuffle of the Omega order (the book's order-random row)
        random.Random(seed).shuffle(order)
    return [entries[i] for i in order]

