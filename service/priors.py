"""Priors p_lambda(z): standard Gaussian, mixture of Gaussians, VampPrior (SPEC §3, §4).

Every prior exposes the same small interface:

- ``components(detach=False) -> Components``: means (M, D), *effective* (soft-clipped)
  log-variances (M, D) and normalised log-weights (M,). ``detach=True`` gives the prior as a
  stop-gradient *target* (SPEC §2.2, decoder step, item 4).
- ``log_prob(z)``: (N, D) -> (N,), in log space with logsumexp.
- ``sample(n, generator, component=None, deterministic=False, temperature=1.0)``: reparameterised
  draws ``(z, component_index)``; gradients reach means and log-variances, never the index.
- ``num_components``; ``is_mixture``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gaussian import mixture_component_log_prob, mixture_log_prob_and_usage, mixture_mc_log_prob_and_usage, randn


@dataclass
class Components:
    """Mixture parameters as seen by every use of the prior (after soft-clipping)."""

    means: Tensor  # (M, D)
    logvars: Tensor  # (M, D)
    log_weights: Tensor  # (M,)

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()


def draw(comps: Components, n: int, generator: torch.Generator | None, component: int | Tensor | None = None,
         deterministic: bool = False, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Sample ``i ~ Categorical(w)`` (or the given component) and ``z = mu_i + sigma_i * eps`` (SPEC §3.5)."""
    m = comps.means.shape[0]
    if component is None:
        idx = torch.multinomial(comps.weights.detach().to(generator.device if generator else comps.means.device),
                                n, replacement=True, generator=generator)
    elif isinstance(component, int):
        if not 0 <= component < m:
            raise ValueError(f"component: {component} is out of range; allowed [0, {m - 1}]")
        idx = torch.full((n,), component, dtype=torch.long)
    else:
        idx = component
    idx = idx.to(comps.means.device)
    mu = comps.means[idx]  # (n, D)
    if deterministic:
        return mu, idx
    eps = randn(tuple(mu.shape), generator, mu)
    return mu + temperature * torch.exp(0.5 * comps.logvars[idx]) * eps, idx


class Prior(nn.Module):
    """Base class: subclasses implement ``components``."""

    is_mixture = True

    @property
    def num_components(self) -> int:
        raise NotImplementedError

    def components(self, detach: bool = False) -> Components:
        raise NotImplementedError

    def component_log_prob(self, z: Tensor, detach: bool = False) -> Tensor:
        """``log w_m + log N(z | mu_m, var_m)``: (N, D) -> (N, M)."""
        c = self.components(detach)
        return mixture_component_log_prob(z, c.means, c.logvars, c.log_weights)

    def log_prob(self, z: Tensor, detach: bool = False) -> Tensor:
        """``log p(z)`` for z (N, D) -> (N,)."""
        return self.log_prob_and_usage(z, detach, usage=False)[0]

    def log_prob_and_usage(self, z: Tensor, detach: bool = False, usage: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(log p(z) (N,), mean responsibilities C (M,) or None)``; C carries no gradient (fastest path)."""
        c = self.components(detach)
        return mixture_log_prob_and_usage(z, c.means, c.logvars, c.log_weights, usage)

    def mc_log_prob_and_usage(self, mu: Tensor, sigma: Tensor, eps: Tensor, detach: bool = False,
                              usage: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(mean_t log p(mu + sigma * eps_t) (B,), C (M,) or None)`` for posteriors (B, D) and noise
        (T, B, D): the Monte-Carlo KL's log p term, its samples never stored on the kernel's path."""
        c = self.components(detach)
        return mixture_mc_log_prob_and_usage(mu, sigma, eps, c.means, c.logvars, c.log_weights, usage)

    def sample(self, n: int, generator: torch.Generator | None = None, *, component: int | Tensor | None = None,
               deterministic: bool = False, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        return draw(self.components(), n, generator, component, deterministic, temperature)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class StandardNormalPrior(Prior):
    """N(0, I): no parameters; KL has a closed form (SPEC §1)."""

    is_mixture = False

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("_zeros", torch.zeros(1, latent_dim))

    @property
    def num_components(self) -> int:
        return 1

    def components(self, detach: bool = False) -> Components:
        return Components(self._zeros, self._zeros, self._zeros.new_zeros(1))


# --------------------------------------------------------------------------------------------
# Soft-clipping (SPEC §4)
# --------------------------------------------------------------------------------------------

def soft_clip(x: Tensor, lo: Tensor, hi: Tensor, k: float = 10.0, lower: bool = True) -> Tensor:
    """``fc(x) = x + softplus_b(lo - x) - softplus_b(x - hi)``, ``b = K / (hi - lo)`` per dim.

    x: (M, D); lo, hi: (D,). Where ``hi == lo`` the result is ``hi``. With K = 10 at least 85%
    of the range [lo, hi] is kept (paper eq. 52). ``lower=False`` drops the ``lo`` term (only the
    upper bound, same steepness; a degenerate range then clips at ``hi`` from above only).
    """
    width = hi - lo
    degenerate = width <= 0
    beta = k / torch.where(degenerate, torch.ones_like(width), width)
    # softplus_beta(y) = softplus(beta * y) / beta (torch's form is numerically stable)
    clipped = x - F.softplus(beta * (x - hi)) / beta
    if not lower:
        return torch.where(degenerate, torch.minimum(x, hi), clipped)
    clipped = clipped + F.softplus(beta * (lo - x)) / beta
    return torch.where(degenerate, hi.expand_as(x), clipped)


class MixturePrior(Prior):
    """Mixture of M diagonal Gaussians with uniform or learnable ("LC") weights (SPEC §3.2).

    Means and log-variances are always parameters (they train during the warm-up); whether
    they train in the adversarial phase ("IP") is decided by the step, through
    ``PriorConfig.trainable``. Soft-clip bounds live in buffers so checkpoints carry them.
    """

    def __init__(self, num_components: int, latent_dim: int, *, learnable_weights: bool = False,
                 softclip_k: float = 10.0, softclip_lower: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        # drawn where the generator lives, also under ``with torch.device("meta")`` (checkpoint validation):
        # a meta-device draw from a CPU generator goes through torch._refs, whose import costs seconds
        device = generator.device if generator is not None else None
        self.means = nn.Parameter(torch.randn(num_components, latent_dim, generator=generator, device=device))
        self.logvars = nn.Parameter(torch.zeros(num_components, latent_dim))
        self.logits = nn.Parameter(torch.zeros(num_components), requires_grad=learnable_weights)
        self.softclip_k = softclip_k
        self.softclip_lower = softclip_lower  # from the config (not a buffer): old checkpoints load as before
        self.register_buffer("clip_lo", torch.zeros(latent_dim))
        self.register_buffer("clip_hi", torch.zeros(latent_dim))
        self.register_buffer("clip_on", torch.tensor(False))

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def learnable_weights(self) -> bool:
        return self.logits.requires_grad

    def init_clip_bounds(self) -> None:
        """Freeze the soft-clip range at the current per-dimension min/max log-variance (SPEC §4)."""
        with torch.no_grad():
            self.clip_lo.copy_(self.logvars.min(dim=0).values)
            self.clip_hi.copy_(self.logvars.max(dim=0).values)
            self.clip_on.fill_(True)

    def effective_logvars(self) -> Tensor:
        if bool(self.clip_on):
            return soft_clip(self.logvars, self.clip_lo, self.clip_hi, self.softclip_k, self.softclip_lower)
        return self.logvars

    def components(self, detach: bool = False) -> Components:
        means, logvars, logits = self.means, self.effective_logvars(), self.logits
        if detach:  # sg: the prior as a *target* receives no gradient (SPEC §2.2)
            means, logvars, logits = means.detach(), logvars.detach(), logits.detach()
        return Components(means, logvars, torch.log_softmax(logits, dim=0))


class VampPrior(Prior):
    """VampPrior ``p(z) = sum_k w_k q_phi(z | u_k)`` with data-initialised pseudo-inputs (SPEC §3.3).

    The encoder is held by reference (not as a submodule), so its parameters are not duplicated
    in the prior's state; gradients reach it through ``components()`` during the warm-up.
    """

    def __init__(self, pseudo_inputs: Tensor, encoder: Callable[[Tensor], tuple[Tensor, Tensor]], *,
                 learnable_weights: bool = False, clamp_unit: bool = False):
        super().__init__()
        self.pseudo_inputs = nn.Parameter(pseudo_inputs.clone())
        self.logits = nn.Parameter(torch.zeros(pseudo_inputs.shape[0]), requires_grad=learnable_weights)
        self.clamp_unit = clamp_unit  # images: pseudo-inputs stay in [0, 1]
        self._encoder = [encoder]  # list: keep it out of nn.Module registration

    @property
    def num_components(self) -> int:
        return self.pseudo_inputs.shape[0]

    def components(self, detach: bool = False) -> Components:
        u = self.pseudo_inputs.clamp(0.0, 1.0) if self.clamp_unit else self.pseudo_inputs
        means, logvars = self._encoder[0](u)
        comps = Components(means, logvars, torch.log_softmax(self.logits, dim=0))
        if detach:
            comps = Components(means.detach(), logvars.detach(), comps.log_weights.detach())
        return comps


def vamp_to_mixture(vamp: VampPrior, *, softclip_k: float = 10.0, carry_logits: bool = False,
                    softclip_lower: bool = True) -> MixturePrior:
    """Turn a VampPrior into a MoG with means/log-variances ``encoder(u_k)`` (SPEC §3.4).

    The link to the encoder is cut (values are copied). With learnable weights the reference
    code writes the old *probabilities* into the new *logits* (which makes the weights nearly
    uniform again); ``carry_logits=True`` keeps the old logits instead.
    """
    with torch.no_grad():
        comps = vamp.components(detach=True)
        m, d = comps.means.shape
        mog = MixturePrior(m, d, learnable_weights=vamp.logits.requires_grad, softclip_k=softclip_k,
                           softclip_lower=softclip_lower)
        mog = mog.to(device=comps.means.device, dtype=comps.means.dtype)  # before copying: keep float64 exact
        mog.means.copy_(comps.means)
        mog.logvars.copy_(comps.logvars)
        mog.logits.copy_(vamp.logits if carry_logits else comps.weights)
    return mog


# --------------------------------------------------------------------------------------------
# Responsibilities and prior usage (SPEC §4)
# --------------------------------------------------------------------------------------------

def responsibilities(component_log_prob: Tensor) -> Tensor:
    """``r_i(z) = w_i N(z|i) / sum_l w_l N(z|l)``: (N, M) log joint -> (N, M), rows sum to 1."""
    return torch.softmax(component_log_prob, dim=-1)


def normalized_entropy(usage: Tensor, eps: float = 1e-8) -> Tensor:
    """``H_n(C) = -sum_i c_i log(c_i + 1e-8) / log M`` in [0, 1]; usage C: (M,)."""
    m = usage.shape[-1]
    if m == 1:
        return usage.new_ones(())
    return -(usage * torch.log(usage + eps)).sum(-1) / math.log(m)  # a Python float keeps usage's dtype


def active_mask(usage: Tensor, threshold: float = 1e-2) -> Tensor:
    """Which components are active, ``c_i >= 1e-2`` (SPEC §4): (M,) bool."""
    return usage >= threshold


def active_components(usage: Tensor, threshold: float = 1e-2) -> int:
    """Number of components with ``c_i >= 1e-2`` (SPEC §4)."""
    return int(active_mask(usage, threshold).sum())
