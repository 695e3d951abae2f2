"""Distillation from the FP32 network: a training loss for the last stage of quantization-aware fine-tuning.

Not part of HAWQ: the paper fine-tunes with the task loss alone (section 3.2). The ResNet20 chapter tries
distillation as one of its attempts to close the accuracy gap to the baseline (the third, the costliest:
every step also runs the FP32 network forward). The loss is Hinton et al.'s ("Distilling the knowledge in a
neural network", 2015): with student logits ``z``, teacher logits ``t``, labels ``y``, weight ``alpha`` and
temperature ``T``,

    (1 - alpha) * CE(z, y) + alpha * T**2 * KL(softmax(t / T) || softmax(z / T)),

the KL divergence averaged over the batch. ``T**2`` keeps the soft term's gradient on the scale of the hard
term's as ``T`` changes (Hinton et al., section 2). The teacher runs in eval mode without gradients.

:func:`hawqlib.train.train` calls a loss with ``needs_inputs = True`` as ``loss(outputs, targets, inputs)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillationLoss", "check_distill"]


def check_distill(alpha, temperature) -> None:
    """Raise ``ValueError`` naming a bad ``alpha`` (a number in [0, 1]) or ``temperature`` (a positive number)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


class DistillationLoss(nn.Module):
    """Cross entropy mixed with the KL divergence to ``teacher``'s softened outputs (module docstring).

    ``alpha`` in [0, 1] weighs the soft term (0: plain cross entropy); ``temperature`` > 0 softens both
    distributions. The teacher is not trained, and is not part of this module's state (its weights are the
    caller's, e.g. the FP32 baseline); it runs in eval mode and is given back in the mode it had. It must be on
    the inputs' device.
    """

    needs_inputs = True

    def __init__(self, teacher: nn.Module, alpha: float = 0.5, temperature: float = 4.0):
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        check_distill(alpha, temperature)
        self.alpha, self.temperature = float(alpha), float(temperature)
        object.__setattr__(self, "teacher", teacher)   # kept out of this module's parameters and state

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(outputs, targets)
        if self.alpha == 0.0:
            return hard
        teacher = self.teacher
        device = next(teacher.parameters()).device
        if device != inputs.device:
            raise RuntimeError(f"the teacher is on {device} and the inputs on {inputs.device}: move the teacher "
                               "to the inputs' device first")
        mode = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                t = teacher(inputs).float()
        finally:
            teacher.train(mode)
        T = self.temperature
        soft = F.kl_div(F.log_softmax(outputs.float() / T, dim=1), F.log_softmax(t / T, dim=1),
                        reduction="batchmean", log_target=True) * (T * T)
        return (1.0 - self.alpha) * hard + self.alpha * soft

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, temperature={self.temperature}, teacher={type(self.teacher).__name__}"
