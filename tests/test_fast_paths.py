"""The speed-ups keep the numbers: fused mixture kernel and batched negatives vs plain references."""

import dataclasses

import pytest
import torch

from service.config import ObjectiveConfig
from service.gaussian import (_MixtureLogProb, kl_to_standard_normal, mixture_component_log_prob,
                              mixture_log_prob, randn, reparameterize)
from service.model import build_model
from service.objectives import encoder_objective, reconstruction_error
from service.presets import get_preset, smoke


def _mixture(m, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(m, d, generator=g, dtype=dtype).requires_grad_()
    logvars = (0.5 * torch.randn(m, d, generator=g, dtype=dtype)).requires_grad_()
    log_w = torch.log_softmax(torch.randn(m, generator=g, dtype=dtype), 0).detach().requires_grad_()
    return means, logvars, log_w


def test_fused_kernel_passes_gradcheck_across_chunks(monkeypatch):
    monkeypatch.setattr(_MixtureLogProb, "CHUNK", 7)  # several blocks, one ragged
    z = torch.randn(23, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: mixture_log_prob(*a)[0], (z, *_mixture(5, 3)))


@pytest.mark.parametrize("m,d", [(64, 2), (10, 32)])
def test_fused_kernel_matches_autograd_at_training_sizes(m, d):
    z = torch.randn(20_000, d, requires_grad=True)
    params = [p.detach().float().requires_grad_() for p in _mixture(m, d)]
    weights = torch.rand(20_000)
    log_p, r = mixture_log_prob(z, *params)
    (log_p * weights).sum().backward()
    fused = [z.grad.clone()] + [p.grad.clone() for p in params]
    for t in [z, *params]:
        t.grad = None
    comp = mixture_component_log_prob(z, *params)
    ref = torch.logsumexp(comp, -1)
    (ref * weights).sum().backward()
    plain = [z.grad] + [p.grad for p in params]
    torch.testing.assert_close(log_p, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(r, torch.softmax(comp, -1), rtol=1e-4, atol=1e-6)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * float(b.abs().max()))


def _reference_encoder_loss(model, x, cfg: ObjectiveConfig, gen):
    """SPEC §2.2 encoder loss written term by term, negatives one at a time (no batching).

    Draws from ``gen`` in the same order and shapes as ``encoder_objective`` and slices them.
    """
    s, b = 1.0 / x[0].numel(), x.shape[0]
    with torch.no_grad():
        z_s, _ = model.prior.sample(b, gen)
        x_fake = model.decoder(z_s)
    mu, logvar = model.encoder(x)
    z = reparameterize(mu, logvar, randn(tuple(mu.shape), gen, mu))
    x_rec = model.decoder(z)
    kl_real = kl_to_standard_normal(mu, logvar)
    eps = randn((2 * b, mu.shape[1]), gen, mu)
    exp_terms = []
    for k, (inp, target) in enumerate([(x_fake, x_fake), (x_rec.detach(), x_rec)]):
        mu_n, logvar_n = model.encoder(inp)
        z_n = reparameterize(mu_n, logvar_n, eps[k * b:(k + 1) * b])
        re_n = reconstruction_error(target, model.decoder(z_n))
        kl_n = kl_to_standard_normal(mu_n, logvar_n)
        exp_terms.append(torch.exp(-cfg.alpha * s * (cfg.beta_rec * re_n + cfg.beta_neg * kl_n)).mean())
    real = s * (cfg.beta_rec * reconstruction_error(x, x_rec).mean() + cfg.beta_kl * kl_real.mean())
    return real + (1.0 / cfg.alpha) * 0.5 * (exp_terms[0] + exp_terms[1])


def test_batched_negatives_equal_one_at_a_time():
    cfg = smoke(get_preset("8gaussians/sintro"))
    model = build_model(cfg, (2,))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    loss, _, _, _ = encoder_objective(model, x, cfg.objective, torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(loss, list(model.encoder.parameters()))
    ref = _reference_encoder_loss(model, x, cfg.objective, torch.Generator().manual_seed(5))
    ref_grads = torch.autograd.grad(ref, list(model.encoder.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_mixture_kl_uses_fast_path_unless_entropy_needs_gradient():
    cfg = dataclasses.replace(smoke(get_preset("8gaussians/mog-ip-lc")).objective, r_entropy=1.0)
    model = build_model(smoke(get_preset("8gaussians/mog-ip-lc")), (2,), prior_type="mog")
    x = torch.randn(16, 2)
    loss, terms, _, _ = encoder_objective(model, x, cfg, torch.Generator().manual_seed(0))
    loss.backward()  # the entropy term back-propagates through the responsibilities
    assert "usage" in terms and all(p.grad is not None for p in model.encoder.parameters())
