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
           deterministic: bool = False, decoder_sigma: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``n`` points ``D(z)``, ``z ~ p`` (or from one component, SPEC §3.5).

    Returns ``(x (n, ...), z (n, D), component index (n,))``. ``seed`` makes the draw
    reproducible independently of any other state. ``decoder_sigma`` > 0 draws from the Gaussian
    decoder ``N(D(z), sigma^2 I)`` instead of returning its mean (the paper's samples are means;
    ``decoder_sigma`` estimates sigma); the noise comes from the same generator, after ``z``.
    """
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    z, idx = model.prior.sample(n, generator, component=component, deterministic=deterministic,
                                temperature=temperature)
    x = model.decoder(z)
    return add_decoder_noise(x, decoder_sigma, generator), z, idx


def add_decoder_noise(x: Tensor, sigma: float, generator: torch.Generator | None) -> Tensor:
    """``x + sigma * eps``, ``eps ~ N(0, I)`` from ``generator``; ``x`` itself when ``sigma`` is 0."""
    return x + sigma * randn(tuple(x.shape), generator, x) if sigma > 0 else x


@torch.no_grad()
def decoder_sigma(model: Model, x: Tensor, generator: torch.Generator | None = None, chunk: int = 4096) -> float:
    """Maximum-likelihood sigma of a Gaussian decoder ``N(D(z), sigma^2 I)`` shared by all dimensions:
    ``sqrt(mean((D(z) - x)^2))`` over points, dimensions and one ``z ~ q(z|x)`` each (the optimum of the
    ELBO in sigma for a fixed encoder and decoder; "calibrated decoder", Rybkin et al., 2021)."""
    total, count = 0.0, 0
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        err = reconstruct(model, xb, generator=generator) - xb
        total += float(err.double().pow(2).sum())
        count += err.numel()
    return (total / count) ** 0.5


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
