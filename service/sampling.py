"""Sampling, reconstruction and encoding of a trained model (shared by evaluation and Serve)."""

from __future__ import annotations

import torch
from torch import Tensor

from .gaussian import randn, reparameterize
from .model import Model
from .priors import responsibilities


@torch.no_grad()
def sample(model: Model, n: int, *, component: int | Tensor | None = None, seed: int | None = None,
           generator: torch.Generator | None = None, temperature: float = 1.0,
           deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``n`` points ``D(z)``, ``z ~ p`` (or from one component, SPEC §3.5).

    Returns ``(x (n, ...), z (n, D), component index (n,))``. ``seed`` makes the draw
    reproducible independently of any other state.
    """
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    z, idx = model.prior.sample(n, generator, component=component, deterministic=deterministic,
                                temperature=temperature)
    return model.decoder(z), z, idx


@torch.no_grad()
def encode(model: Model, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Posterior ``(mu, logvar)`` and the responsibilities of ``mu`` under the prior: (B, D), (B, D), (B, M)."""
    mu, logvar = model.encoder(x)
    return mu, logvar, responsibilities(model.prior.component_log_prob(mu))


@torch.no_grad()
def reconstruct(model: Model, x: Tensor, *, generator: torch.Generator | None = None,
                stochastic: bool = True) -> Tensor:
    """``D(z)`` with ``z ~ q(z|x)`` (stochastic) or ``z = mu(x)``."""
    mu, logvar = model.encoder(x)
    z = reparameterize(mu, logvar, randn(tuple(mu.shape), generator, mu)) if stochastic else mu
    return model.decoder(z)


@torch.no_grad()
def prior_usage(model: Model, x: Tensor, mc_samples: int, generator: torch.Generator | None = None,
                chunk: int = 1024) -> Tensor:
    """Mean responsibilities C over ``mc_samples`` posterior samples of every point (SPEC §4): (M,)."""
    total = None
    for i in range(0, x.shape[0], chunk):
        mu, logvar = model.encoder(x[i:i + chunk])
        eps = randn((mc_samples, *mu.shape), generator, mu)
        z = reparameterize(mu, logvar, eps).reshape(-1, mu.shape[-1])
        r = responsibilities(model.prior.component_log_prob(z)).sum(0)
        total = r if total is None else total + r
    return total / (x.shape[0] * mc_samples)
