"""Priors (SPEC §3, §4): log-densities, soft-clipping, VampPrior -> MoG, sampling, usage."""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from service.gaussian import mixture_log_prob
from service.networks import MlpEncoder
from service.priors import (MixturePrior, StandardNormalPrior, VampPrior, active_components, normalized_entropy,
                            responsibilities, soft_clip, vamp_to_mixture)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _mog(m: int, d: int, *, seed: int = 0, learnable_weights: bool = True, uniform: bool = False) -> MixturePrior:
    g = torch.Generator().manual_seed(seed)
    prior = MixturePrior(m, d, learnable_weights=learnable_weights, generator=g).double()
    with torch.no_grad():
        prior.means.mul_(2.0)
        prior.logvars.copy_(torch.randn(m, d, generator=g, dtype=F64))
        if not uniform:
            prior.logits.copy_(2.0 * torch.randn(m, generator=g, dtype=F64))
    return prior


def _reference(means, logvars, logits) -> MixtureSameFamily:
    return MixtureSameFamily(Categorical(logits=logits), Independent(Normal(means, torch.exp(0.5 * logvars)), 1))


def _std_error_bound(samples: torch.Tensor, target: torch.Tensor) -> None:
    """Sample mean within 5 standard errors of ``target`` (per coordinate)."""
    se = samples.std(0) / math.sqrt(samples.shape[0])
    assert ((samples.mean(0) - target).abs() < 5 * se).all(), (samples.mean(0), target, se)


# --------------------------------------------------------------------------------------------
# Log-densities (SPEC §3.1, §3.2, §3.6)
# --------------------------------------------------------------------------------------------

def test_standard_normal_prior_log_prob_matches_torch():
    prior = StandardNormalPrior(3).double()
    z = 2.0 * torch.randn(40, 3, dtype=F64)
    torch.testing.assert_close(prior.log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1), rtol=1e-12, atol=1e-12)
    assert not prior.is_mixture and prior.num_components == 1 and list(prior.parameters()) == []


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "lc"])
@pytest.mark.parametrize("m,d", [(1, 2), (5, 3), (64, 2)])
def test_mixture_prior_log_prob_matches_mixture_same_family(m, d, uniform):
    prior = _mog(m, d, seed=m + d, uniform=uniform)
    z = 2.0 * torch.randn(300, d, dtype=F64)
    ref = _reference(prior.means.detach(), prior.logvars.detach(), prior.logits.detach())
    torch.testing.assert_close(prior.log_prob(z), ref.log_prob(z), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prior.components().weights, torch.softmax(prior.logits.detach(), 0))


def test_clipped_mixture_log_prob_uses_the_clipped_variances():
    prior = _mog(6, 2, seed=4)
    prior.init_clip_bounds()
    with torch.no_grad():
        prior.logvars[0] = torch.tensor([-9.0, 9.0], dtype=F64)  # far outside the frozen range
    clipped = soft_clip(prior.logvars.detach(), prior.clip_lo, prior.clip_hi)
    ref = _reference(prior.means.detach(), clipped, prior.logits.detach())
    z = torch.randn(100, 2, dtype=F64)
    torch.testing.assert_close(prior.log_prob(z), ref.log_prob(z), rtol=1e-10, atol=1e-10)
    assert torch.equal(prior.components().logvars, clipped)


# --------------------------------------------------------------------------------------------
# Soft-clipping (SPEC §4)
# --------------------------------------------------------------------------------------------

RANGES = [(-1.0, 1.0), (-6.0, -5.999), (0.3, 0.4), (-3.0, 2.0), (10.0, 110.0)]


@pytest.mark.parametrize("a,b", RANGES)
def test_soft_clip_keeps_85_percent_of_the_range(a, b):
    lo, hi = torch.tensor([a], dtype=F64), torch.tensor([b], dtype=F64)
    fa, fb = soft_clip(torch.tensor([[a], [b]], dtype=F64), lo, hi, k=10.0)[:, 0]
    # closed form: fc(b) - fc(a) = (b - a) * (1 + (2 / K) * (log(1 + e^-K) - log 2)) = 0.8614 (b - a)
    ratio = 1.0 + 0.2 * (math.log1p(math.exp(-10.0)) - math.log(2.0))
    torch.testing.assert_close(float(fb - fa), ratio * (b - a), rtol=1e-9, atol=0)
    assert fb - fa >= 0.85 * (b - a)  # paper eq. 52, rho = 0.85


@pytest.mark.parametrize("a,b", RANGES)
def test_soft_clip_is_monotone_bounded_and_leaves_the_middle_alone(a, b):
    w = b - a
    lo, hi = torch.tensor([a], dtype=F64), torch.tensor([b], dtype=F64)
    near = torch.linspace(a - w, b + w, 3001, dtype=F64).unsqueeze(1).requires_grad_()
    (slope,) = torch.autograd.grad(soft_clip(near, lo, hi).sum(), near)
    assert (slope > 0).all() and (slope < 1).all()  # fc'(x) = 1 - sig(beta(a - x)) - sig(beta(x - b))
    fx = soft_clip(torch.linspace(a - 10 * w, b + 10 * w, 4001, dtype=F64).unsqueeze(1), lo, hi)
    ulps = 4 * torch.finfo(F64).eps * (abs(a) + 10 * abs(w) + abs(b))  # far out, x + sp(a-x) cancels
    assert (fx.diff(dim=0) >= -ulps).all() and (fx >= a - ulps).all() and (fx <= b + ulps).all()
    torch.testing.assert_close(soft_clip(torch.tensor([[(a + b) / 2]], dtype=F64), lo, hi),
                               torch.tensor([[(a + b) / 2]], dtype=F64))  # symmetric: the centre is fixed
    # |fc(x) - x| <= 0.05 (b - a) wherever x is more than 0.0433 (b - a) inside the range (solve
    # (1/K) log(1 + e^{-K t}) = 0.05): about 91% of [a, b] is kept up to 5% of its width
    inside = torch.linspace(a, b, 10_001, dtype=F64).unsqueeze(1)
    close = (soft_clip(inside, lo, hi) - inside).abs() <= 0.05 * w
    assert close.double().mean() >= 0.85


def test_soft_clip_maps_everything_into_the_range_per_dimension():
    lo = torch.tensor([-2.0, 0.0, 5.0], dtype=F64)
    hi = torch.tensor([1.0, 0.5, 50.0], dtype=F64)
    x = torch.tensor([[-1e6, 1e6, 0.0], [1e6, -1e6, 30.0], [-0.5, 0.25, 27.5]], dtype=F64)
    out = soft_clip(x, lo, hi)
    assert torch.isfinite(out).all() and (out >= lo).all() and (out <= hi).all()
    torch.testing.assert_close(out[2], x[2])  # centres of every dimension's range are kept


def test_soft_clip_with_an_empty_range_returns_the_bound():
    lo = torch.tensor([0.7, -1.0], dtype=F64)
    hi = torch.tensor([0.7, 1.0], dtype=F64)  # dimension 0: a == b
    x = torch.tensor([[-5.0, 0.0], [0.7, 3.0], [9.0, -3.0]], dtype=F64, requires_grad=True)
    out = soft_clip(x, lo, hi)
    assert torch.equal(out[:, 0].detach(), torch.full((3,), 0.7, dtype=F64))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[:, 0], torch.zeros(3, dtype=F64))
    assert (x.grad[:, 1] > 0).all()


def test_clip_bounds_are_the_per_dimension_range_over_components_and_saved():
    prior = _mog(5, 3, seed=7)
    assert not bool(prior.clip_on)
    torch.testing.assert_close(prior.effective_logvars(), prior.logvars)  # no clipping before the bounds
    prior.init_clip_bounds()
    lv = prior.logvars.detach().clone()
    assert torch.equal(prior.clip_lo, lv.min(0).values) and torch.equal(prior.clip_hi, lv.max(0).values)
    assert {"clip_lo", "clip_hi", "clip_on"} <= set(prior.state_dict())
    with torch.no_grad():
        prior.logvars.add_(torch.randn(5, 3, dtype=F64))  # training moves the raw values; the bounds stay
    assert torch.equal(prior.clip_lo, lv.min(0).values)

    restored = MixturePrior(5, 3, learnable_weights=True).double()
    restored.load_state_dict(prior.state_dict())
    assert bool(restored.clip_on)
    assert torch.equal(restored.clip_lo, prior.clip_lo) and torch.equal(restored.clip_hi, prior.clip_hi)
    assert torch.equal(restored.effective_logvars(), prior.effective_logvars())


# --------------------------------------------------------------------------------------------
# VampPrior and its conversion to a MoG (SPEC §3.3, §3.4)
# --------------------------------------------------------------------------------------------

def _vamp(m: int = 6, *, learnable_weights: bool = True, clamp_unit: bool = False) -> VampPrior:
    torch.manual_seed(0)
    encoder = MlpEncoder(2, 3, hidden=16, depth=2).double()
    u = 1.5 * torch.randn(m, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    vamp = VampPrior(u, encoder, learnable_weights=learnable_weights, clamp_unit=clamp_unit).double()
    if learnable_weights:
        with torch.no_grad():
            vamp.logits.copy_(torch.randn(m, dtype=F64, generator=torch.Generator().manual_seed(2)))
    return vamp


def test_vamp_prior_is_the_mixture_of_encoded_pseudo_inputs_and_trains_the_encoder():
    vamp = _vamp()
    encoder = vamp._encoder[0]
    mu, logvar = encoder(vamp.pseudo_inputs)
    z = torch.randn(50, 3, dtype=F64)
    ref = _reference(mu.detach(), logvar.detach(), vamp.logits.detach())
    torch.testing.assert_close(vamp.log_prob(z), ref.log_prob(z), rtol=1e-10, atol=1e-10)
    assert not any(n.startswith("_encoder") for n, _ in vamp.named_parameters())  # no duplicated weights
    vamp.log_prob(z).sum().backward()  # warm-up: gradient reaches encoder, pseudo-inputs and logits
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    assert vamp.pseudo_inputs.grad.abs().sum() > 0 and vamp.logits.grad.abs().sum() > 0


def test_vamp_pseudo_inputs_of_images_are_kept_in_the_unit_interval():
    vamp = _vamp(clamp_unit=True)
    means = vamp.components().means
    assert torch.equal(means, vamp._encoder[0](vamp.pseudo_inputs.clamp(0.0, 1.0))[0])


@pytest.mark.parametrize("carry_logits", [False, True])
def test_vamp_to_mixture_copies_the_encoded_pseudo_inputs(carry_logits):
    vamp = _vamp()
    encoder = vamp._encoder[0]
    mu, logvar = encoder(vamp.pseudo_inputs)
    mog = vamp_to_mixture(vamp, softclip_k=7.0, carry_logits=carry_logits)
    assert isinstance(mog, MixturePrior) and mog.softclip_k == 7.0 and not bool(mog.clip_on)
    assert torch.equal(mog.means.detach(), mu.detach()) and torch.equal(mog.logvars.detach(), logvar.detach())
    if carry_logits:  # option: keep the old logits, i.e. the same weights
        assert torch.equal(mog.logits.detach(), vamp.logits.detach())
    else:  # reference: the old *probabilities* become the new logits (nearly uniform weights)
        torch.testing.assert_close(mog.logits.detach(), torch.softmax(vamp.logits.detach(), 0), rtol=1e-12, atol=0)
    assert mog.learnable_weights
    # the link to the encoder is cut
    assert mog.means.grad_fn is None and mog.means.is_leaf and mog.means.requires_grad
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)
    assert torch.equal(mog.means.detach(), mu.detach())


def test_vamp_to_mixture_keeps_uniform_weights_fixed():
    mog = vamp_to_mixture(_vamp(learnable_weights=False))
    assert not mog.learnable_weights and all(p is not mog.logits for p in mog.trainable_parameters())
    torch.testing.assert_close(mog.components().weights, torch.full((6,), 1 / 6, dtype=mog.means.dtype))


# --------------------------------------------------------------------------------------------
# Sampling (SPEC §3.5)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 3])
def test_sampling_one_component_concentrates_at_its_mean(k):
    prior = _mog(4, 2, seed=9)
    z, idx = prior.sample(4000, torch.Generator().manual_seed(k), component=k)
    assert torch.equal(idx, torch.full((4000,), k))
    _std_error_bound(z.detach(), prior.means.detach()[k])
    var = torch.exp(prior.logvars.detach()[k])
    torch.testing.assert_close(z.detach().var(0), var, rtol=0.1, atol=0)


def test_deterministic_sampling_returns_the_means_and_temperature_scales_the_noise():
    prior = _mog(4, 2, seed=1)
    z, idx = prior.sample(20, torch.Generator().manual_seed(0), deterministic=True)
    assert torch.equal(z, prior.means[idx])
    hot, idx1 = prior.sample(20, torch.Generator().manual_seed(3))
    cold, idx2 = prior.sample(20, torch.Generator().manual_seed(3), temperature=0.5)
    assert torch.equal(idx1, idx2)
    mu = prior.means.detach()[idx1]
    torch.testing.assert_close(cold.detach() - mu, 0.5 * (hot.detach() - mu))


def test_sampling_follows_the_weights_and_rejects_unknown_components():
    prior = _mog(5, 2, seed=2)
    _, idx = prior.sample(20_000, torch.Generator().manual_seed(0))
    one_hot = torch.nn.functional.one_hot(idx, 5).double()
    _std_error_bound(one_hot, torch.softmax(prior.logits.detach(), 0))
    chosen = torch.tensor([4, 0, 4])
    assert torch.equal(prior.sample(3, None, component=chosen)[1], chosen)
    with pytest.raises(ValueError, match=r"component: 5 is out of range; allowed \[0, 4\]"):
        prior.sample(3, None, component=5)


def test_samples_are_reparameterised_to_means_and_log_variances_not_weights():
    prior = _mog(3, 2, seed=5)
    z, idx = prior.sample(64, torch.Generator().manual_seed(0))
    z.sum().backward()
    counts = torch.bincount(idx, minlength=3).double()
    torch.testing.assert_close(prior.means.grad, counts.unsqueeze(1).expand(3, 2))  # dz/dmu_i = 1
    assert prior.logvars.grad.abs().sum() > 0 and prior.logits.grad is None  # the index is not differentiable


def test_standard_normal_sampling():
    prior = StandardNormalPrior(2).double()
    z, idx = prior.sample(5000, torch.Generator().manual_seed(0))
    assert torch.equal(idx, torch.zeros(5000, dtype=torch.long))
    _std_error_bound(z, torch.zeros(2, dtype=F64))
    torch.testing.assert_close(z.var(0), torch.ones(2, dtype=F64), rtol=0.1, atol=0)


# --------------------------------------------------------------------------------------------
# Responsibilities and usage (SPEC §4)
# --------------------------------------------------------------------------------------------

def test_responsibilities_sum_to_one_and_follow_bayes_rule():
    prior = _mog(7, 2, seed=3)
    z = 3.0 * torch.randn(200, 2, dtype=F64)
    r = responsibilities(prior.component_log_prob(z))
    torch.testing.assert_close(r.sum(-1), torch.ones(200, dtype=F64), rtol=0, atol=1e-12)
    ref = _reference(prior.means.detach(), prior.logvars.detach(), prior.logits.detach())
    comp = ref.component_distribution.log_prob(z.unsqueeze(1)) + torch.log_softmax(prior.logits.detach(), 0)
    torch.testing.assert_close(r.detach(), torch.exp(comp - ref.log_prob(z).unsqueeze(1)), rtol=1e-9, atol=1e-12)
    c = prior.components()
    _, fast = mixture_log_prob(z, c.means, c.logvars, c.log_weights)  # the fused kernel's responsibilities
    torch.testing.assert_close(fast, r.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m", [2, 8, 64])
def test_normalized_entropy_of_equal_use_is_one_and_of_one_component_is_zero(m):
    equal = torch.full((m,), 1.0 / m, dtype=F64)
    # -log(1/M + 1e-8) / log M: exactly 1 but for the 1e-8 inside the log
    torch.testing.assert_close(normalized_entropy(equal), torch.tensor(-math.log(1.0 / m + 1e-8) / math.log(m),
                                                                       dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(normalized_entropy(equal), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-6)
    single = torch.zeros(m, dtype=F64)
    single[m // 2] = 1.0
    torch.testing.assert_close(normalized_entropy(single), torch.tensor(0.0, dtype=F64), rtol=0, atol=1e-7)


def test_normalized_entropy_of_half_the_components():
    usage = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(normalized_entropy(usage), torch.tensor(math.log(2) / math.log(4), dtype=F64),
                               rtol=0, atol=1e-7)


def test_active_components_counts_usage_of_at_least_one_percent():
    assert active_components(torch.tensor([0.5, 0.48, 0.01, 0.0099, 0.0001])) == 3
    assert active_components(torch.full((64,), 1 / 64)) == 64
    assert active_components(torch.tensor([1.0, 0.0, 0.0])) == 1


def test_upper_only_soft_clip_lets_log_variances_sharpen_below_the_range():
    from service.priors import soft_clip

    lo, hi = torch.tensor([-1.0]), torch.tensor([0.5])
    x = torch.tensor([[-6.0], [-1.0], [0.0], [3.0]], dtype=torch.float64)
    both = soft_clip(x, lo.double(), hi.double())
    upper = soft_clip(x, lo.double(), hi.double(), lower=False)
    assert float(both[0]) > -1.2  # the paper's clip holds the sharp component near lo
    assert float(upper[0]) == pytest.approx(-6.0, abs=1e-9)  # upper-only: free to sharpen
    assert float(upper[3]) < 0.5 and float(upper[3]) == pytest.approx(float(both[3]), abs=1e-6)  # same upper bound
    # degenerate range: upper-only is min(x, hi)
    deg = soft_clip(x, hi.double(), hi.double(), lower=False)
    assert deg.flatten().tolist() == [-6.0, -1.0, 0.0, 0.5]


def test_softclip_lower_reaches_the_prior_through_the_config_and_conversion():
    import dataclasses

    from service.model import build_model, convert_prior
    from service.presets import get_preset, smoke

    cfg = smoke(get_preset("8gaussians/mog-ip-lc"))
    cfg = dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, softclip_lower=False))
    model = build_model(cfg, (2,), init_points=torch.randn(cfg.prior.num_components, 2))
    convert_prior(model, cfg)
    assert model.prior.softclip_lower is False
    assert build_model(cfg, (2,), prior_type="mog").prior.softclip_lower is False
