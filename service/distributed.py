"""Data-parallel plumbing without Ray: the gradient all-reduce used as the steps' ``grad_sync``.

Why not DDP: S-Intro VAE calls the encoder, decoder and prior several times per step outside a
single ``forward`` (DDP only synchronises gradients of computation that goes through its
wrapper's ``forward``), and the standard-Gaussian and fixed-MoG priors have no trainable
parameter (DDP refuses such modules). Every rank builds the same model from the same seed, and
after each ``backward`` the parameters that step owns are averaged with one flat all-reduce.
Without a process group this is a no-op, so single-process code needs no special case.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def allreduce_mean(params: list[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over all ranks with one flat all-reduce."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
