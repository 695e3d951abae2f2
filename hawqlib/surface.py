"""The loss as one block's weights move along given directions: the picture behind paper section 3.1.

Near a trained minimum, moving block B_i by ``dW`` changes the loss by about ``1/2 dW^T H_i dW``, at most
``1/2 lambda_i ||dW||^2``, reached along the top eigenvector of H_i (section 3.1; the bound is the
Omega_i of section 3.2). :func:`loss_surface` measures the loss itself at ``W_i + sum_k c_k d_k`` for
directions ``d_k`` (such as the eigenvectors of :func:`hawqlib.hessian.top_eigenvalues`), all other
weights fixed, so that the quadratic model can be compared with what the network does. The notebooks
store it as an artifact through :func:`hawqlib.repro.pipeline.landscape`.
"""
from __future__ import annotations

import torch

__all__ = ["loss_surface"]


@torch.no_grad()
def loss_surface(model: torch.nn.Module, block, directions, coords, data, *, loss_fn=None,
                 batch_size: int = 1024) -> torch.Tensor:
    """The mean loss at ``W + sum_k c_k d_k`` for each row ``c`` of ``coords`` (one block's weights moved).

    ``block`` is a :class:`hawqlib.blocks.Block` of ``model``; ``directions`` a list of K directions,
    each a flat tensor of length ``block.numel`` (the block's weights concatenated in ``block.params``
    order) or a list of tensors shaped like ``block.params`` (as the Hessian's eigenvectors come);
    ``coords`` an (M, K) tensor. BatchNorm runs in eval mode (the Hessian's setting).
    Returns M losses. The model's weights and mode are restored on return, also after an error.
    """
    coords = torch.as_tensor(coords, dtype=torch.float64)
    if coords.dim() == 1:
        coords = coords[:, None]
    dirs = [(torch.cat([t.reshape(-1) for t in d]) if isinstance(d, (list, tuple)) else torch.as_tensor(d))
            .reshape(-1).to(torch.float32) for d in directions]
    if coords.shape[1] != len(dirs):
        raise ValueError(f"coords has {coords.shape[1]} columns but {len(dirs)} directions were given")
    for d in dirs:
        if d.numel() != block.numel:
            raise ValueError(f"a direction has {d.numel()} entries; block {block.name!r} has {block.numel} weights")
    loss_fn = loss_fn or torch.nn.CrossEntropyLoss(reduction="sum")
    x, y = data
    params = block.params
    saved = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()
    out = torch.empty(len(coords), dtype=torch.float64)
    try:
        for m, c in enumerate(coords):
            delta = sum(float(ck) * d for ck, d in zip(c, dirs))
            off = 0
            for p, w0 in zip(params, saved):
                p.copy_(w0 + delta[off:off + p.numel()].view_as(p))
                off += p.numel()
            total = 0.0
            for i in range(0, len(y), batch_size):
                total += float(loss_fn(model(x[i:i + batch_size]), y[i:i + batch_size]))
            out[m] = total / len(y)
    finally:
        for p, w0 in zip(params, saved):
            p.copy_(w0)
        model.train(was_training)
    return out
