"""Objectives (SPEC §1, §2): MC KL vs closed forms, the energy's scale, and which terms carry gradient where."""

import dataclasses
import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from service.config import ObjectiveConfig
from service.gaussian import kl_diag_normals, kl_to_standard_normal, randn, reparameterize
from service.model import build_model
from service.objectives import (decoder_prior_objective, encoder_objective, energy, kl_term, reconstruction_error,
                                vae_objective)
from service.presets import get_preset, smoke
from service.priors import MixturePrior, StandardNormalPrior, normalized_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _posterior(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=F64), 0.5 * torch.randn(b, d, generator=g, dtype=F64) - 0.5


def _mc_per_sample(mu, logvar, prior_mu, prior_logvar, t: int, seed: int) -> torch.Tensor:
    """``log q(z_t|x) - log p(z_t)`` (T, B) with torch.distributions, from the noise kl_term draws first."""
    eps = randn((t, *mu.shape), torch.Generator().manual_seed(seed), mu)
    z = reparameterize(mu, logvar, eps)
    q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    p = Independent(Normal(prior_mu, torch.exp(0.5 * prior_logvar)), 1)
    return q.log_prob(z) - p.log_prob(z)


def _model(preset: str, prior_type: str | None = None, seed: int = 0):
    """A float64 smoke model; mixtures get distinct log-variances, weights and soft-clip bounds."""
    cfg = smoke(get_preset(preset))
    model = build_model(cfg, (2,), prior_type=prior_type).double()
    if isinstance(model.prior, MixturePrior):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.prior.logvars.copy_(0.5 * torch.randn(model.prior.logvars.shape, generator=g, dtype=F64))
            model.prior.logits.copy_(torch.randn(model.prior.logits.shape, generator=g, dtype=F64))
        model.prior.init_clip_bounds()
    return cfg, model


def _batch(n: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --------------------------------------------------------------------------------------------
# KL estimators (SPEC §1)
# --------------------------------------------------------------------------------------------

def test_mc_kl_of_a_one_component_mixture_matches_the_closed_form():
    t, d = 4000, 3
    mu, logvar = _posterior(5, d, seed=0)
    prior = MixturePrior(1, d).double()
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[0.5, -1.0, 0.2]], dtype=F64))
        prior.logvars.copy_(torch.tensor([[0.3, -0.4, 0.0]], dtype=F64))
    kl = kl_term(prior, mu, logvar, ObjectiveConfig(mc_samples=t), torch.Generator().manual_seed(7)).kl
    per_sample = _mc_per_sample(mu, logvar, prior.means.detach(), prior.logvars.detach(), t, seed=7)
    torch.testing.assert_close(kl, per_sample.mean(0), rtol=1e-10, atol=1e-10)  # the same estimator
    exact = kl_diag_normals(mu, logvar, prior.means.detach(), prior.logvars.detach())
    standard_error = per_sample.std(0) / math.sqrt(t)
    assert ((kl - exact).abs() < 5 * standard_error).all(), (kl, exact, standard_error)


def test_closed_form_and_mc_kl_to_the_standard_normal():
    t = 4000
    mu, logvar = _posterior(6, 2, seed=1)
    prior = StandardNormalPrior(2).double()
    closed = kl_term(prior, mu, logvar, ObjectiveConfig(), None).kl
    ref = kl_divergence(Independent(Normal(mu, torch.exp(0.5 * logvar)), 1),
                        Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1))
    torch.testing.assert_close(closed, ref, rtol=1e-12, atol=1e-12)
    mc = kl_term(prior, mu, logvar, ObjectiveConfig(kl_estimator="mc", mc_samples=t),
                 torch.Generator().manual_seed(2)).kl
    per_sample = _mc_per_sample(mu, logvar, torch.zeros(2, dtype=F64), torch.zeros(2, dtype=F64), t, seed=2)
    torch.testing.assert_close(mc, per_sample.mean(0), rtol=1e-10, atol=1e-10)
    assert ((mc - closed).abs() < 5 * per_sample.std(0) / math.sqrt(t)).all()


def test_usage_comes_from_the_kl_samples_and_both_paths_agree():
    _, model = _model("8gaussians/mog-ip-lc", prior_type="mog")
    mu, logvar = _posterior(12, 2, seed=4)
    cfg = ObjectiveConfig(mc_samples=50)
    fast = kl_term(model.prior, mu, logvar, cfg, torch.Generator().manual_seed(0), want_usage=True)
    slow = kl_term(model.prior, mu, logvar, cfg, torch.Generator().manual_seed(0), want_usage=True, usage_grad=True)
    torch.testing.assert_close(fast.kl, slow.kl, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast.usage, slow.usage, rtol=1e-10, atol=1e-12)
    assert fast.usage.shape == (model.prior.num_components,)
    torch.testing.assert_close(fast.usage.sum(), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-12)
    z = reparameterize(mu, logvar, randn((50, 12, 2), torch.Generator().manual_seed(0), mu)).reshape(-1, 2)
    torch.testing.assert_close(fast.usage, torch.softmax(model.prior.component_log_prob(z), -1).mean(0).detach())


def test_detached_prior_receives_no_gradient_from_the_kl():
    _, model = _model("8gaussians/mog-ip-lc", prior_type="mog")
    mu, logvar = (t.requires_grad_() for t in _posterior(4, 2, seed=5))
    params = model.prior.trainable_parameters()
    for detach in (True, False):
        kl = kl_term(model.prior, mu, logvar, ObjectiveConfig(mc_samples=10), None, detach_prior=detach).kl
        grads = torch.autograd.grad(kl.sum(), params, allow_unused=True)
        if detach:
            assert all(g is None for g in grads)
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)


# --------------------------------------------------------------------------------------------
# Reconstruction and energy (SPEC §1)
# --------------------------------------------------------------------------------------------

def test_reconstruction_error_sums_over_every_data_dimension():
    x = torch.zeros(2, 1, 3, 4, dtype=F64)
    x_hat = torch.ones(2, 1, 3, 4, dtype=F64)
    x_hat[1] *= 2.0
    assert torch.equal(reconstruction_error(x, x_hat), torch.tensor([12.0, 48.0], dtype=F64))


@pytest.mark.parametrize("shape", [(2,), (1, 28, 28), (3, 32, 32)])
def test_energy_is_scaled_by_one_over_the_data_dimension(shape):
    x = torch.zeros(3, *shape, dtype=F64)
    x_hat = torch.full_like(x, 0.5)
    kl = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    d_x = math.prod(shape)
    expected = (0.2 * 0.25 * d_x + 0.3 * kl) / d_x
    torch.testing.assert_close(energy(x, x_hat, kl, beta_rec=0.2, beta_kl=0.3), expected, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------
# Warm-up objective (SPEC §2.1)
# --------------------------------------------------------------------------------------------

def test_vae_objective_is_the_unscaled_elbo():
    cfg, model = _model("8gaussians/sintro")
    x = _batch()
    loss, terms = vae_objective(model, x, cfg.objective, torch.Generator().manual_seed(1))
    mu, logvar = model.encoder(x)
    z = reparameterize(mu, logvar, randn(tuple(mu.shape), torch.Generator().manual_seed(1), mu))
    rec, kl = reconstruction_error(x, model.decoder(z)), kl_to_standard_normal(mu, logvar)
    ob = cfg.objective
    torch.testing.assert_close(loss, (ob.beta_rec * rec + ob.beta_kl * kl).mean(), rtol=1e-12, atol=0)  # no 1/d_x
    torch.testing.assert_close(terms["rec_real"], rec.detach())
    torch.testing.assert_close(terms["kl_real"], kl.detach())
    assert "usage" not in terms


# --------------------------------------------------------------------------------------------
# Encoder objective (SPEC §2.2)
# --------------------------------------------------------------------------------------------

def test_encoder_objective_returns_detached_posterior_and_terms():
    cfg, model = _model("8gaussians/mog-ip-lc", prior_type="mog")
    _, terms, z, (mu, logvar) = encoder_objective(model, _batch(), cfg.objective, torch.Generator().manual_seed(0))
    assert not (z.requires_grad or mu.requires_grad or logvar.requires_grad)
    assert all(not v.requires_grad for v in terms.values())
    assert {"rec_fake", "kl_fake", "rec_rec", "kl_rec", "exp_elbo_fake", "exp_elbo_rec", "usage"} <= set(terms)
    ob = cfg.objective  # expELBO_n = mean_b exp(-alpha s (beta_rec RE_n + beta_neg KL_n)), s = 1/2
    expected = torch.exp(-ob.alpha * 0.5 * (ob.beta_rec * terms["rec_fake"] + ob.beta_neg * terms["kl_fake"])).mean()
    torch.testing.assert_close(terms["exp_elbo_fake"], expected)


def test_responsibility_entropy_term_enters_the_encoder_loss():
    base, model = _model("8gaussians/mog-ip-lc", prior_type="mog")
    x, params = _batch(), list(model.encoder.parameters())
    results = {}
    for r in (0.0, 10.0):
        ob = dataclasses.replace(base.objective, r_entropy=r)
        loss, terms, _, _ = encoder_objective(model, x, ob, torch.Generator().manual_seed(4))
        results[r] = (loss, terms["usage"], torch.autograd.grad(loss, params))
    (loss0, usage0, grads0), (loss1, usage1, grads1) = results[0.0], results[10.0]
    torch.testing.assert_close(usage0, usage1, rtol=1e-10, atol=1e-12)  # the same MC samples
    # L_E + s * r_entropy * negH(C), negH = -H_n, s = 1 / d_x = 1/2
    torch.testing.assert_close(loss1 - loss0, -0.5 * 10.0 * normalized_entropy(usage1), rtol=1e-8, atol=1e-12)
    assert any(not torch.allclose(a, b) for a, b in zip(grads0, grads1))  # the entropy reaches the encoder


# --------------------------------------------------------------------------------------------
# Decoder + prior objective (SPEC §2.2): the prior is a source, never a target
# --------------------------------------------------------------------------------------------

def _decoder_loss(model, cfg, prior_trains: bool, monkeypatch):
    """``L_PD`` and its gradients to the prior, plus the fake latents z_s ~ prior (kept with gradient)."""
    x = _batch()
    mu, logvar = (t.detach() for t in model.encoder(x))
    z = reparameterize(mu, logvar, randn(tuple(mu.shape), torch.Generator().manual_seed(8), mu))
    drawn = {}
    original = type(model.prior).sample.__get__(model.prior)

    def spy(n, generator=None, **kw):
        z_s, idx = original(n, generator, **kw)
        if z_s.requires_grad:
            z_s.retain_grad()
        drawn.update(z_s=z_s, idx=idx)
        return z_s, idx

    monkeypatch.setattr(model.prior, "sample", spy)
    loss, terms = decoder_prior_objective(model, x, z, (mu, logvar), cfg, torch.Generator().manual_seed(9),
                                          prior_trains=prior_trains)
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.prior.named_parameters()}
    return loss, terms, grads, drawn


def test_fixed_prior_gets_no_gradient_from_the_decoder_loss(monkeypatch):
    cfg, model = _model("8gaussians/mog-fixed-lc", prior_type="mog")
    _, terms, grads, drawn = _decoder_loss(model, cfg.objective, False, monkeypatch)
    # KL_r, KL_f see the prior detached (target), and z_s is detached: nothing reaches the prior
    assert all(g is None for g in grads.values()) and drawn["z_s"].grad is None
    assert "kl_prior" not in terms


def test_trainable_prior_gets_gradient_as_source_and_from_the_real_posterior_only(monkeypatch):
    cfg, model = _model("8gaussians/mog-ip-lc", prior_type="mog")
    prior = model.prior
    _, _, fit_only, drawn0 = _decoder_loss(model, dataclasses.replace(cfg.objective, gamma=0.0), True, monkeypatch)
    _, _, full, drawn1 = _decoder_loss(model, dataclasses.replace(cfg.objective, gamma=1.0), True, monkeypatch)
    assert torch.equal(drawn0["idx"], drawn1["idx"]) and torch.equal(drawn0["z_s"], drawn1["z_s"])
    # gamma = 0 switches off KL_r, KL_f (and RE_rr, RE_ff): only KL[sg(q) || p] fits the prior
    assert torch.count_nonzero(drawn0["z_s"].grad) == 0
    assert all(fit_only[n].abs().sum() > 0 for n in ("means", "logvars", "logits"))
    # gamma = 1 adds exactly the gradient that enters through z_s ~ p (the source), none through the
    # detached target of KL_r / KL_f; the component index is not differentiable, so logits get none
    z_s = drawn1["z_s"]
    src_means, src_logvars = torch.autograd.grad(z_s, [prior.means, prior.logvars], grad_outputs=z_s.grad)
    assert src_means.abs().sum() > 0 and src_logvars.abs().sum() > 0
    torch.testing.assert_close(full["means"] - fit_only["means"], src_means, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(full["logvars"] - fit_only["logvars"], src_logvars, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(full["logits"], fit_only["logits"], rtol=1e-12, atol=1e-14)


def test_kl_real_is_the_only_extra_term_when_the_prior_trains(monkeypatch):
    cfg, model = _model("8gaussians/mog-ip-lc", prior_type="mog")
    loss_fixed, terms_fixed, _, _ = _decoder_loss(model, cfg.objective, False, monkeypatch)
    loss_ip, terms_ip, _, _ = _decoder_loss(model, cfg.objective, True, monkeypatch)
    for name, value in terms_fixed.items():
        torch.testing.assert_close(terms_ip[name], value, rtol=1e-12, atol=1e-12)
    # L_PD(IP) - L_PD(fixed) = s * beta_kl * KL[sg(q(z|x)) || p], s = 1/2
    torch.testing.assert_close(loss_ip - loss_fixed, 0.5 * cfg.objective.beta_kl * terms_ip["kl_prior"].mean(),
                               rtol=1e-10, atol=1e-12)
