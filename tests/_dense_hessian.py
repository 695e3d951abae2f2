"""The dense Hessian of a small model's loss, the reference the Hessian tests compare against."""
from __future__ import annotations

import torch


def exact_hessian(model, loss_fn, data, block) -> torch.Tensor:
    """The dense Hessian of ``loss_fn`` on all of ``data`` w.r.t. the block's flattened weights, the model in
    eval mode (BatchNorm on its running statistics), by torch.func.hessian of a functional call."""
    x, y = data
    names = {id(p): n for n, p in model.named_parameters()}
    keys, shapes = [names[id(p)] for p in block.params], [p.shape for p in block.params]
    sizes = [p.numel() for p in block.params]
    w0 = torch.cat([p.detach().reshape(-1) for p in block.params])
    was = model.training
    model.eval()

    def f(w):
        parts = {k: t.view(s) for k, t, s in zip(keys, w.split(sizes), shapes)}
        return loss_fn(torch.func.functional_call(model, parts, (x,)), y)

    try:
        return torch.func.hessian(f)(w0).detach()
    finally:
        model.train(was)
