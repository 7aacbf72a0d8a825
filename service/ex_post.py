"""Ex-post refit of a trained mixture prior to the encoder's aggregate posterior (an option, not the paper).

After training, ``prior.ex_post = "em"`` replaces the mixture's means, log-variances (and, for
learnable weights, its weights) by a maximum-likelihood fit, by EM, to encoded training points

    z_i = mu(x_i) + t * sigma(x_i) * eps_i,     t = prior.ex_post_noise in [0, 1]

(t = 0: the posterior means; t = 1: posterior samples, the aggregate posterior itself). This is
ex-post density estimation (Ghosh et al., 2020, "From variational to deterministic
autoencoders"), applied to the S-Intro VAE's latent space: where the trained prior's components
straddle several data modes (docs/modes.md), components fitted to the points the decoder
was trained to reconstruct fall inside one mode's latent region. ``t`` trades mode purity (small
t) against coverage of each mode's spread (large t).

The fit is deterministic given the seed: k-means++ seeding, then ``prior.ex_post_iterations`` EM
steps in float64 (the squared distances are expanded into matrix products; float64 keeps that
expansion exact enough for the sharp components this produces). Variances are floored at
``VAR_FLOOR``; an emptied component keeps its previous parameters and a weight of ``MIN_WEIGHT``.
Plain PyTorch: no Ray, MLflow or serving import.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .config import ExperimentConfig
from .priors import MixturePrior

VAR_FLOOR = math.exp(-9.0)  # log-variance >= -9: the sharpest regime the mixture kernel is tested in
MIN_WEIGHT = 1e-12
CHUNK = 8192  # points per encoder call and per E-step block
SEED_OFFSET = 7_919  # the refit's generator: cfg.seed + this (its own stream, never a training one)


@torch.no_grad()
def latent_points(encoder: torch.nn.Module, x: Tensor, noise: float, generator: torch.Generator) -> Tensor:
    """``mu(x) + noise * sigma(x) * eps`` for every row of ``x``, encoded in chunks; float64 (N, D)."""
    device = next(encoder.parameters()).device
    out = []
    for xb in x.split(CHUNK):
        mu, logvar = encoder(xb.to(device))
        mu, logvar = mu.double().cpu(), logvar.double().cpu()
        if noise > 0:
            eps = torch.randn(mu.shape, generator=generator, dtype=torch.float64)
            mu = mu + noise * torch.exp(0.5 * logvar) * eps
        out.append(mu)
    return torch.cat(out)


def kmeans_pp(z: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: k rows of ``z``, each drawn with probability proportional to its squared
    distance from the nearest row already chosen (the first uniformly)."""
    n = z.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    d2 = ((z - z[first]) ** 2).sum(1)
    for _ in range(k - 1):
        total = float(d2.sum())
        i = int(torch.randint(n, (1,), generator=generator)) if total <= 0 else \
            int(torch.multinomial(d2 / total, 1, generator=generator))
        chosen.append(i)
        d2 = torch.minimum(d2, ((z - z[i]) ** 2).sum(1))
    return z[chosen].clone()


def _log_joint(z: Tensor, means: Tensor, logvars: Tensor, log_w: Tensor) -> Tensor:
    """(N, M): ``log w_k + log N(z_i; mu_k, diag exp(logvar_k))`` in float64, block by block."""
    inv = torch.exp(-logvars)  # (M, D)
    const = log_w - 0.5 * (logvars.sum(1) + (means * means * inv).sum(1) + z.shape[1] * math.log(2 * math.pi))
    blocks = []
    for zb in z.split(CHUNK):
        quad = (zb * zb) @ inv.T - 2.0 * zb @ (means * inv).T  # (n, M)
        blocks.append(const - 0.5 * quad)
    return torch.cat(blocks)


def fit_mixture(z: Tensor, k: int, *, iterations: int, generator: torch.Generator, fit_weights: bool = True
                ) -> tuple[Tensor, Tensor, Tensor, float]:
    """EM for a k-component diagonal Gaussian mixture on ``z`` (N, D) float64.

    Returns means (k, D), log-variances (k, D), log-weights (k,) and the mean log-likelihood of
    ``z`` under the fit. ``fit_weights=False`` keeps the weights uniform (a prior without "LC").
    """
    n, d = z.shape
    if n < k:
        raise ValueError(f"prior.ex_post_points: {n} points cannot fit {k} components; allowed >= {k}")
    means = kmeans_pp(z, k, generator)
    logvars = torch.log(z.var(0, unbiased=False).clamp_min(VAR_FLOOR) / k).expand(k, d).clone()
    log_w = torch.full((k,), -math.log(k), dtype=torch.float64)
    loglik = -math.inf
    for _ in range(iterations):
        lj = _log_joint(z, means, logvars, log_w)
        norm = torch.logsumexp(lj, dim=1, keepdim=True)
        loglik = float(norm.mean())
        r = torch.exp(lj - norm)  # (N, k) responsibilities
        nk = r.sum(0)
        alive = nk > MIN_WEIGHT * n
        safe = nk.clamp_min(MIN_WEIGHT * n)[:, None]
        new_means = (r.T @ z) / safe
        new_var = (r.T @ (z * z)) / safe - new_means * new_means
        means = torch.where(alive[:, None], new_means, means)
        logvars = torch.where(alive[:, None], torch.log(new_var.clamp_min(VAR_FLOOR)), logvars)
        if fit_weights:
            log_w = torch.log((nk / n).clamp_min(MIN_WEIGHT))
            log_w = log_w - torch.logsumexp(log_w, 0)
    return means, logvars, log_w, loglik


@torch.no_grad()
def refit_prior(model: Any, source: Any, cfg: ExperimentConfig) -> dict[str, float]:
    """Refit ``model.prior`` (a ``MixturePrior``) in place as configured by ``cfg.prior.ex_post*``.

    Draws ``prior.ex_post_points`` training points from ``source`` with its own generator, encodes
    them (encoder in eval mode), fits by EM and writes the result into the prior's parameters; the
    soft-clip is switched off (its range belonged to training). Returns figures for the log:
    ``ex_post/loglik`` (mean log-likelihood of the fitted points, nats), ``ex_post/points``, ``ex_post/noise``.
    """
    p = cfg.prior
    prior = model.prior
    if not isinstance(prior, MixturePrior):
        raise ValueError(f"prior.ex_post: needs a mixture prior, the model has {type(prior).__name__}")
    gen = torch.Generator().manual_seed(cfg.seed + SEED_OFFSET)
    x = source.sample(p.ex_post_points, gen)[0]
    was_training = model.encoder.training
    model.encoder.eval()
    try:
        z = latent_points(model.encoder, x, p.ex_post_noise, gen)
    finally:
        model.encoder.train(was_training)
    means, logvars, log_w, loglik = fit_mixture(z, prior.num_components, iterations=p.ex_post_iterations,
                                                generator=gen, fit_weights=prior.learnable_weights)
    dtype = prior.means.dtype
    prior.means.copy_(means.to(dtype))
    prior.logvars.copy_(logvars.to(dtype))
    prior.logits.copy_(log_w.to(dtype))
    prior.clip_on.fill_(False)
    return {"ex_post/loglik": loglik, "ex_post/points": float(z.shape[0]), "ex_post/noise": float(p.ex_post_noise)}
