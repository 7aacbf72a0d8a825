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

from .gaussian import mixture_component_log_prob, mixture_log_prob, mixture_log_prob_and_usage, randn


@dataclass
class Components:
    """Mixture parameters as seen by every use of the prior (after soft-clipping)."""

    means: Tensor  # (M, D)
    logvars: Tensor  # (M, D)
    log_weights: Tensor  # (M,)

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()


def _draw(comps: Components, n: int, generator: torch.Generator | None, component: int | Tensor | None,
          deterministic: bool, temperature: float) -> tuple[Tensor, Tensor]:
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

    def log_prob_and_responsibilities(self, z: Tensor, detach: bool = False) -> tuple[Tensor, Tensor]:
        """``(log p(z) (N,), r (N, M))``; the responsibilities carry no gradient (fast path)."""
        c = self.components(detach)
        return mixture_log_prob(z, c.means, c.logvars, c.log_weights)

    def log_prob_and_usage(self, z: Tensor, detach: bool = False, usage: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(log p(z) (N,), mean responsibilities C (M,) or None)``; C carries no gradient (fastest path)."""
        c = self.components(detach)
        return mixture_log_prob_and_usage(z, c.means, c.logvars, c.log_weights, usage)

    def sample(self, n: int, generator: torch.Generator | None = None, *, component: int | Tensor | None = None,
               deterministic: bool = False, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        return _draw(self.components(), n, generator, component, deterministic, temperature)

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
        self.means = nn.Parameter(torch.randn(num_components, latent_dim, generator=generator))
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


# --------------------------------------------------------------------------------------------
# Re-seeding unused components (an option beside the paper: prior.reseed_every)
# --------------------------------------------------------------------------------------------

# A posterior mean counts as unexplained when the prior's density there is this much (a factor of
# 100) below the batch's median density at its posterior means.
RESEED_GAP = math.log(100.0)


@torch.no_grad()
def reseed_unused_components(prior: MixturePrior, post_means: Tensor, post_logvars: Tensor, *,
                             unused_below: float = 1e-3, gap: float = RESEED_GAP) -> list[int]:
    """Move components that no posterior uses onto the posterior means the prior explains worst.

    ``post_means`` / ``post_logvars`` (N, D): the encoder's posteriors of a batch of real data.
    A component is unused when its share of the batch's responsibilities is below
    ``unused_below``. Greedily (farthest-point style): take the posterior mean of lowest prior
    density; if that density is more than ``gap`` (log units) below the batch median, put an
    unused component there (its mean, the posterior's log-variance kept inside the soft-clip
    range, and, with learnable weights, the weight 1 / M), recompute the density, repeat. Stops at
    the first point that is explained well enough or when no unused component is left, so a prior
    that covers its posteriors is left exactly as it was. Returns the moved components' indices.
    """
    comps = prior.components(detach=True)
    log_p, usage = mixture_log_prob_and_usage(post_means, comps.means, comps.logvars, comps.log_weights, True)
    unused = [int(k) for k in torch.nonzero(usage < unused_below).flatten()]
    if not unused:
        return []
    threshold = float(log_p.median()) - gap
    moved: list[int] = []
    m = prior.num_components
    for k in unused:
        i = int(torch.argmin(log_p))
        if float(log_p[i]) > threshold:
            break
        target = post_logvars[i]
        if bool(prior.clip_on):  # inside the frozen range, where the soft-clip is nearly the identity
            target = torch.minimum(torch.maximum(target, prior.clip_lo), prior.clip_hi)
        prior.means[k] = post_means[i]
        prior.logvars[k] = target
        if prior.learnable_weights:
            others = torch.cat([prior.logits[:k], prior.logits[k + 1:]])
            prior.logits[k] = torch.logsumexp(others, 0) - math.log(m - 1) if m > 1 else 0.0
        moved.append(k)
        comps = prior.components(detach=True)
        log_p, _ = mixture_log_prob_and_usage(post_means, comps.means, comps.logvars, comps.log_weights, False)
    return moved


def reset_optimizer_rows(optimizer: torch.optim.Optimizer, prior: MixturePrior, rows: list[int]) -> None:
    """Zero Adam's moment estimates for the given components' rows (means, log-variances, logits),
    so a moved component starts from its new place without the old place's momentum."""
    if not rows:
        return
    index = torch.tensor(rows, dtype=torch.long)
    for param in (prior.means, prior.logvars, prior.logits):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in state and state[key].shape == param.shape:
                state[key].index_fill_(0, index.to(state[key].device), 0.0)
