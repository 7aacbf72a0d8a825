"""The three objectives of prior-learning S-Intro VAE (SPEC §2), plus the energy W (SPEC §1).

Each objective returns ``(loss, terms)``: ``loss`` a scalar to back-propagate and ``terms`` a
dict of detached tensors (per-sample or scalar) for logging. Performance notes:

- The two negatives of a step (generated and reconstructed points) share one encoder pass and
  one decoder pass: they are concatenated along the batch (``_negatives``). Per-sample math is
  unchanged; ``tests/test_objectives.py`` checks it against a term-by-term reference.
- For mixtures the Monte-Carlo KL, the responsibilities and the entropy share one evaluation
  of the component log-densities (``kl_term``).

``model`` is anything with ``encoder``, ``decoder`` and ``prior`` attributes (``step.Model``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ObjectiveConfig
from .gaussian import LOG_2PI, kl_to_standard_normal, randn, reparameterize
from .priors import Prior, normalized_entropy


@dataclass
class KlResult:
    kl: Tensor  # (B,) per-sample KL[q(z|x) || p]
    usage: Tensor | None = None  # (M,) mean responsibilities C, when asked for


def reconstruction_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """``||x - x_hat||^2`` summed over data dims: (B, ...) -> (B,) (SPEC §1)."""
    return (x - x_hat).pow(2).flatten(1).sum(1)


def kl_term(prior: Prior, mu: Tensor, logvar: Tensor, cfg: ObjectiveConfig, generator: torch.Generator | None,
            *, detach_prior: bool = False, want_usage: bool = False, usage_grad: bool = False) -> KlResult:
    """KL[q(z|x) || p]: closed form for the standard Gaussian, else Monte-Carlo with T samples.

    mu, logvar: (B, D). MC: ``(1/T) sum_t [log q(z_t|x) - log p(z_t)]`` with reparameterised
    ``z_t`` (T, B, D). ``log q`` uses ``(z_t - mu)^2 / var = eps^2`` exactly. With
    ``want_usage`` the same samples give the mean responsibilities C (SPEC §4); with
    ``usage_grad`` C keeps its gradient (the responsibility-entropy term), which takes the
    slower plain-autograd path.
    """
    if not prior.is_mixture and cfg.kl_estimator == "closed" and not want_usage:
        return KlResult(kl_to_standard_normal(mu, logvar))
    t, (b, d) = cfg.mc_samples, mu.shape
    eps = randn((t, b, d), generator, mu)
    sigma = torch.exp(0.5 * logvar)
    # mean_t log q(z_t|x) = -0.5 (D log 2 pi + sum_d logvar_d) - 0.5 mean_t sum_d eps_td^2: the (T, B, D)
    # samples enter only through eps^2 (no gradient), averaged over T first (a fast outer-dim reduction)
    mean_log_q = -0.5 * (d * LOG_2PI + logvar.sum(-1) + (eps * eps).mean(0).sum(-1))  # (B,)
    if usage_grad:
        z = torch.addcmul(mu, sigma, eps)  # reparameterised, (T, B, D), one pass
        comp = prior.component_log_prob(z.reshape(t * b, d), detach=detach_prior)  # (T*B, M)
        mean_log_p, usage = torch.logsumexp(comp, dim=-1).reshape(t, b).mean(0), torch.softmax(comp, dim=-1).mean(0)
    else:  # z = mu + sigma eps formed inside the mixture kernel where it applies
        mean_log_p, usage = prior.mc_log_prob_and_usage(mu, sigma, eps, detach=detach_prior, usage=want_usage)
    return KlResult(mean_log_q - mean_log_p, usage if want_usage else None)


def energy(x: Tensor, x_hat: Tensor, kl: Tensor, beta_rec: float, beta_kl: float) -> Tensor:
    """``s * (beta_rec * L_rec + beta_kl * L_KL)`` with ``s = 1 / d_x`` (SPEC §1): (B,)."""
    scale = 1.0 / x[0].numel()
    return scale * (beta_rec * reconstruction_error(x, x_hat) + beta_kl * kl)


def _encode_sample(model, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    mu, logvar = model.encoder(x)
    return mu, logvar, reparameterize(mu, logvar, randn(tuple(mu.shape), generator, mu))


# --------------------------------------------------------------------------------------------
# Warm-up (VAE) objective, SPEC §2.1
# --------------------------------------------------------------------------------------------

def vae_objective(model, x: Tensor, cfg: ObjectiveConfig, generator: torch.Generator | None):
    """``mean_b [beta_rec * L_rec + beta_kl * L_KL]``, *not* scaled by s (SPEC §2.1)."""
    mu, logvar, z = _encode_sample(model, x, generator)
    rec = reconstruction_error(x, model.decoder(z))
    kl = kl_term(model.prior, mu, logvar, cfg, generator, want_usage=model.prior.is_mixture)
    loss = (cfg.beta_rec * rec + cfg.beta_kl * kl.kl).mean()
    terms = {"rec_real": rec.detach(), "kl_real": kl.kl.detach()}
    if kl.usage is not None:
        terms["usage"] = kl.usage.detach()
    return loss, terms


# --------------------------------------------------------------------------------------------
# Adversarial phase, SPEC §2.2
# --------------------------------------------------------------------------------------------

def _negatives(model, inputs: Tensor, targets: Tensor, cfg: ObjectiveConfig, generator, *,
               detach_latent: bool, detach_prior: bool) -> tuple[Tensor, KlResult, Tensor, Tensor]:
    """Re-encode and decode a batch of negatives: one encoder and one decoder pass.

    inputs: what the encoder sees; targets: what its reconstruction is compared with (the
    encoder step keeps the non-detached reconstructions as targets, as the reference does).
    Returns per-sample RE, KL, and the posterior (mu, logvar).
    """
    mu, logvar, z = _encode_sample(model, inputs, generator)
    x_hat = model.decoder(z.detach() if detach_latent else z)
    kl = kl_term(model.prior, mu, logvar, cfg, generator, detach_prior=detach_prior)
    return reconstruction_error(targets, x_hat), kl, mu, logvar


def encoder_objective(model, x: Tensor, cfg: ObjectiveConfig, generator: torch.Generator | None):
    """Encoder loss ``L_E`` (SPEC §2.2, encoder step). Returns ``(loss, terms, z)``.

    Only encoder parameters should be stepped with this loss; gradients flow *through* the
    frozen decoder. ``z`` (detached) is the real posterior sample reused by the decoder step.
    """
    scale, b = 1.0 / x[0].numel(), x.shape[0]
    with torch.no_grad():
        z_s, _ = model.prior.sample(b, generator)
        x_fake = model.decoder(z_s)
    mu, logvar, z = _encode_sample(model, x, generator)
    x_rec = model.decoder(z)
    rec_real = reconstruction_error(x, x_rec)
    # The encoder step steps the encoder only, so the prior enters L_E as a constant: the same values
    # and the same encoder gradients, without the prior-parameter sums the kernel would otherwise form.
    kl_real = kl_term(model.prior, mu, logvar, cfg, generator, detach_prior=True, want_usage=model.prior.is_mixture,
                      usage_grad=model.prior.is_mixture and cfg.r_entropy > 0)

    # negatives: [fake; rec] in one pass. Target of rec is x_rec itself, not detached (reference)
    re_n, kl_n, _, _ = _negatives(model, torch.cat([x_fake, x_rec.detach()]), torch.cat([x_fake, x_rec]),
                                  cfg, generator, detach_latent=False, detach_prior=True)
    exp_elbo = torch.exp(-cfg.alpha * scale * (cfg.beta_rec * re_n + cfg.beta_neg * kl_n.kl))  # (2B,)
    exp_fake, exp_rec = exp_elbo[:b].mean(), exp_elbo[b:].mean()

    loss = scale * (cfg.beta_rec * rec_real.mean() + cfg.beta_kl * kl_real.kl.mean())
    loss = loss + (1.0 / cfg.alpha) * 0.5 * (exp_fake + exp_rec)
    terms = {"rec_real": rec_real.detach(), "kl_real": kl_real.kl.detach(),
             "rec_fake": re_n[:b].detach(), "kl_fake": kl_n.kl[:b].detach(),
             "rec_rec": re_n[b:].detach(), "kl_rec": kl_n.kl[b:].detach(),
             "exp_elbo_fake": exp_fake.detach(), "exp_elbo_rec": exp_rec.detach()}
    if kl_real.usage is not None:
        entropy = normalized_entropy(kl_real.usage)
        loss = loss - scale * cfg.r_entropy * entropy  # negH(C) = -H_n(C)
        terms["usage"] = kl_real.usage.detach()
    return loss, terms, z.detach(), (mu.detach(), logvar.detach())


def decoder_prior_objective(model, x: Tensor, z: Tensor, posterior: tuple[Tensor, Tensor], cfg: ObjectiveConfig,
                            generator: torch.Generator | None, *, prior_trains: bool):
    """Decoder (+ prior) loss ``L_PD`` (SPEC §2.2, decoder + prior step).

    z: (B, D) detached real posterior sample from the encoder step; posterior: its detached
    (mu, logvar). With ``prior_trains`` the fresh prior sample keeps its gradient (the prior as
    *source*) and the detached real posterior fits the prior (``KL_real``); the negatives' KL
    always sees the prior detached (the prior as *target*).
    """
    scale, b = 1.0 / x[0].numel(), x.shape[0]
    z_s, _ = model.prior.sample(b, generator)
    if not prior_trains:
        z_s = z_s.detach()
    decoded = model.decoder(torch.cat([z_s, z]))  # one pass: [fake; rec]
    x_fake, x_rec = decoded[:b], decoded[b:]
    rec_real = reconstruction_error(x, x_rec)

    negatives = torch.cat([x_rec, x_fake])
    re_nn, kl_n, _, _ = _negatives(model, negatives, negatives.detach(), cfg, generator,
                                   detach_latent=True, detach_prior=True)
    kl_r, kl_f = kl_n.kl[:b], kl_n.kl[b:]
    loss = cfg.beta_rec * rec_real.mean()
    loss = loss + cfg.gamma * cfg.beta_kl * 0.5 * (kl_r.mean() + kl_f.mean())
    loss = loss + cfg.gamma * cfg.gamma_r * cfg.beta_rec * 0.5 * (re_nn[:b].mean() + re_nn[b:].mean())
    terms = {"rec_real": rec_real.detach(), "kl_rec": kl_r.detach(), "kl_fake": kl_f.detach(),
             "rec_rec_rec": re_nn[:b].detach(), "rec_fake_rec": re_nn[b:].detach()}
    if prior_trains:
        mu, logvar = posterior
        kl_prior = kl_term(model.prior, mu, logvar, cfg, generator)  # sg(posterior) vs trainable prior
        loss = loss + cfg.beta_kl * kl_prior.kl.mean()
        terms["kl_prior"] = kl_prior.kl.detach()
    return scale * loss, terms
