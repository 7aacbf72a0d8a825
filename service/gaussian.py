"""Diagonal-Gaussian helpers shared by priors and objectives (SPEC §1, §3.6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise of ``shape`` with ``like``'s dtype/device, drawn from ``generator``."""
    device = generator.device if generator is not None else like.device
    eps = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return eps.to(like.device)


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """``z = mu + exp(logvar / 2) * eps``; mu, logvar: (B, D), eps broadcastable, e.g. (T, B, D)."""
    return mu + torch.exp(0.5 * logvar) * eps


def diag_normal_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z | mu, diag(exp(logvar))) summed over the last dim; shapes broadcast."""
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """Closed-form KL[N(mu, exp(logvar)) || N(0, I)]: (B, D) -> (B,) (SPEC §1)."""
    return 0.5 * (torch.exp(logvar) + mu**2 - 1.0 - logvar).sum(-1)


def kl_diag_normals(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """Closed-form KL[N(mu_q, var_q) || N(mu_p, var_p)] for diagonal Gaussians, summed over last dim."""
    return 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1.0).sum(-1)


def mixture_component_log_prob(z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor) -> Tensor:
    """``log w_m + log N(z | mu_m, diag var_m)`` for every component: z (N, D) -> (N, M).

    Written as matrix products, ``sum_d (z_d - mu_md)^2 / var_md = z^2 @ (1/var)^T
    - 2 z @ (mu/var)^T + sum_d mu_md^2 / var_md``, so that the (N, M, D) tensor of
    differences is never materialised: this is the hot spot of the Monte-Carlo KL
    (N = T * B points, M components).
    means, logvars: (M, D); log_weights: (M,) normalised log mixture weights.
    """
    inv_var = torch.exp(-logvars)  # (M, D)
    quad = (z * z) @ inv_var.T - 2.0 * z @ (means * inv_var).T  # (N, M)
    const = (means * means * inv_var).sum(-1) + logvars.sum(-1) + z.shape[-1] * LOG_2PI  # (M,)
    return log_weights - 0.5 * (quad + const)


def log_mean_exp(x: Tensor, dim: int) -> Tensor:
    """``log(mean(exp(x)))`` along ``dim``, computed stably."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])
