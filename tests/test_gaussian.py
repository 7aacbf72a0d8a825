"""Diagonal-Gaussian helpers (SPEC §1, §3.6) against torch.distributions, in float64."""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal, kl_divergence

from service.gaussian import (diag_normal_log_prob, kl_diag_normals, kl_to_standard_normal, log_mean_exp,
                              mixture_component_log_prob, mixture_log_prob, randn, reparameterize)

from mixture_cases import draw_mixture

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _normal(mu: torch.Tensor, logvar: torch.Tensor) -> Independent:
    return Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)


def _gaussians(b: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=F64), torch.randn(b, d, generator=g, dtype=F64),
            torch.randn(b, d, generator=g, dtype=F64), torch.randn(b, d, generator=g, dtype=F64))


def _mixture(m: int, d: int, uniform: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(m, d, generator=g, dtype=F64)
    logvars = torch.randn(m, d, generator=g, dtype=F64)
    logits = torch.zeros(m, dtype=F64) if uniform else 2.0 * torch.randn(m, generator=g, dtype=F64)
    return means, logvars, torch.log_softmax(logits, 0)


def _reference_mixture(means, logvars, log_weights) -> MixtureSameFamily:
    return MixtureSameFamily(Categorical(logits=log_weights), _normal(means, logvars))


# --------------------------------------------------------------------------------------------
# Single Gaussians
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 2, 7])
def test_diag_normal_log_prob_matches_torch(d):
    mu, logvar, z, _ = _gaussians(5, d, seed=d)
    torch.testing.assert_close(diag_normal_log_prob(z, mu, logvar), _normal(mu, logvar).log_prob(z),
                               rtol=1e-12, atol=1e-12)


def test_diag_normal_log_prob_broadcasts_samples_over_a_batch():
    mu, logvar, _, _ = _gaussians(4, 3, seed=0)
    z = torch.randn(6, 4, 3, dtype=F64)  # (T, B, D)
    out = diag_normal_log_prob(z, mu, logvar)
    assert out.shape == (6, 4)
    torch.testing.assert_close(out, _normal(mu, logvar).log_prob(z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d", [1, 2, 32])
def test_kl_to_standard_normal_matches_torch(d):
    mu, logvar, _, _ = _gaussians(8, d, seed=10 + d)
    ref = kl_divergence(_normal(mu, logvar), _normal(torch.zeros_like(mu), torch.zeros_like(logvar)))
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), ref, rtol=1e-12, atol=1e-12)


def test_kl_to_standard_normal_is_zero_at_the_prior():
    assert torch.equal(kl_to_standard_normal(torch.zeros(3, 2), torch.zeros(3, 2)), torch.zeros(3))


@pytest.mark.parametrize("d", [1, 3, 16])
def test_kl_diag_normals_matches_torch(d):
    mu_q, lv_q, mu_p, lv_p = _gaussians(6, d, seed=20 + d)
    ref = kl_divergence(_normal(mu_q, lv_q), _normal(mu_p, lv_p))
    torch.testing.assert_close(kl_diag_normals(mu_q, lv_q, mu_p, lv_p), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl_diag_normals(mu_q, lv_q, torch.zeros_like(mu_p), torch.zeros_like(lv_p)),
                               kl_to_standard_normal(mu_q, lv_q), rtol=1e-12, atol=1e-12)


def test_reparameterize_is_mean_plus_scaled_noise():
    mu, logvar, eps, _ = _gaussians(5, 3, seed=1)
    torch.testing.assert_close(reparameterize(mu, logvar, eps), mu + torch.exp(0.5 * logvar) * eps)
    mu.requires_grad_()
    logvar.requires_grad_()
    reparameterize(mu, logvar, eps).sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))  # dz/dmu = 1
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def test_randn_is_reproducible_from_the_generator_and_takes_dtype():
    like = torch.zeros(1, dtype=F64)
    a = randn((3, 4), torch.Generator().manual_seed(5), like)
    b = randn((3, 4), torch.Generator().manual_seed(5), like)
    c = randn((3, 4), torch.Generator().manual_seed(6), like)
    assert a.dtype == F64 and a.shape == (3, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_log_mean_exp_is_stable():
    x = torch.tensor([[1000.0, 1000.0 + math.log(3.0)], [-1000.0, -1000.0]], dtype=F64)
    expected = torch.tensor([1000.0 + math.log(2.0), -1000.0], dtype=F64)  # log((1 + 3) / 2)
    torch.testing.assert_close(log_mean_exp(x, dim=1), expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Mixtures (SPEC §3.6): both code paths against MixtureSameFamily
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "weighted"])
@pytest.mark.parametrize("m,d", [(1, 1), (3, 2), (10, 5), (64, 2)])
def test_mixture_log_prob_matches_mixture_same_family(m, d, uniform):
    means, logvars, log_w = _mixture(m, d, uniform, seed=m * 100 + d)
    z = 1.5 * torch.randn(257, d, dtype=F64, generator=torch.Generator().manual_seed(m + d))
    ref = _reference_mixture(means, logvars, log_w)
    log_p, resp = mixture_log_prob(z, means, logvars, log_w)
    comp = mixture_component_log_prob(z, means, logvars, log_w)
    torch.testing.assert_close(log_p, ref.log_prob(z), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.logsumexp(comp, -1), ref.log_prob(z), rtol=1e-10, atol=1e-10)
    # responsibilities r_i = w_i N(z | i) / p(z), from the per-component densities of torch
    joint = log_w + _normal(means, logvars).log_prob(z.unsqueeze(1))  # (N, M)
    torch.testing.assert_close(comp, joint, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(resp, torch.exp(joint - ref.log_prob(z).unsqueeze(1)), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(resp.sum(-1), torch.ones(z.shape[0], dtype=F64), rtol=0, atol=1e-12)


def test_mixture_log_prob_far_from_every_component_stays_finite():
    means, logvars, log_w = _mixture(4, 2, uniform=False, seed=3)
    logvars = logvars - 6.0  # narrow components: exp(log N) underflows far away
    z = torch.tensor([[60.0, -60.0], [1e3, 1e3]], dtype=F64)
    log_p, resp = mixture_log_prob(z, means, logvars, log_w)
    assert torch.isfinite(log_p).all() and torch.isfinite(resp).all()
    torch.testing.assert_close(log_p, _reference_mixture(means, logvars, log_w).log_prob(z), rtol=1e-10, atol=1e-8)


def test_mixture_of_one_standard_component_is_the_standard_normal():
    z = torch.randn(50, 3, dtype=F64)
    zeros = torch.zeros(1, 3, dtype=F64)
    log_p, _ = mixture_log_prob(z, zeros, zeros, torch.zeros(1, dtype=F64))
    torch.testing.assert_close(log_p, Normal(0.0, 1.0).log_prob(z).sum(-1), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Precision of the float32 mixture (issue: sharp priors): both paths against float64
# --------------------------------------------------------------------------------------------

def _sharp_case(logvar: float, scale: float, n: int = 51_200, m: int = 64, d: int = 2, seed: int = 0):
    """Points drawn from a mixture whose components have log-variance ~``logvar`` and |mu| ~ ``scale``."""
    g = torch.Generator().manual_seed(seed)
    z, means, logvars, log_w = draw_mixture(g, n, m, d, logvar, scale)
    # the float32 inputs, and the same values in float64: the reference sees exactly what float32 sees
    inputs32 = [t.float() for t in (z, means, logvars, log_w)]
    return inputs32, [t.double() for t in inputs32], torch.randn(n, generator=g, dtype=F64)


def _value_and_grads(fn, inputs, weight):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    (out * weight.to(out.dtype)).sum().backward()
    return [out.detach().double()] + [x.grad.double() for x in xs]


def _fused(*a):
    return mixture_log_prob(*a)[0]


def _plain(*a):
    return torch.logsumexp(mixture_component_log_prob(*a), -1)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


SHARP_REGIMES = [(0.0, 1.0), (-1.1, 1.5), (-2.5, 2.0), (-4.0, 3.0), (-7.0, 5.0), (-9.0, 5.0)]


@pytest.mark.parametrize("path", [_fused, _plain], ids=["fused", "plain"])
@pytest.mark.parametrize("logvar,scale", SHARP_REGIMES)
def test_float32_mixture_matches_float64_from_broad_to_sharp_components(path, logvar, scale):
    inputs32, inputs64, weight = _sharp_case(logvar, scale)
    got = _value_and_grads(path, inputs32, weight)
    ref = _value_and_grads(_plain, inputs64, weight)  # float64 throughout
    for name, a, b in zip(("log p", "d/dz", "d/dmu", "d/dlogvar", "d/dlog_w"), got, ref):
        assert _rel(a, b) < 1e-4, f"{name}: relative error {_rel(a, b):.2e} at log-variance {logvar}"


def test_the_precision_guard_is_what_keeps_sharp_components_exact(monkeypatch):
    import service.gaussian as gaussian

    inputs32, inputs64, weight = _sharp_case(-9.0, 5.0)
    assert gaussian.accumulation_dtype(*inputs32[:3]) == F64  # the guard widens this case
    ref = _value_and_grads(_plain, inputs64, weight)
    monkeypatch.setattr(gaussian, "WIDE_TOLERANCE", float("inf"))  # force the float32 expansion
    narrow = _value_and_grads(_fused, inputs32, weight)
    assert _rel(narrow[3], ref[3]) > 1e-2  # the log-variance gradient is wrong without it


def test_broad_components_stay_on_the_fast_float32_path():
    import service.gaussian as gaussian

    for logvar, scale in ((0.0, 1.0), (-2.5, 2.0)):  # broad, and moderately sharp: float32 is exact enough
        inputs32, _, _ = _sharp_case(logvar, scale)
        assert gaussian.accumulation_dtype(*inputs32[:3]) == torch.float32
    assert gaussian.accumulation_dtype(*[t.double() for t in inputs32[:3]]) == F64

