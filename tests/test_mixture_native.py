"""The fused C mixture kernel (service/mixture_kernel.c) against float64 and against the PyTorch path.

The kernel is built by the test session's first use (about a second with cc). Where no C compiler
exists the kernel tests skip and the fallback tests still run: training never depends on it.
"""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import service.gaussian as gaussian
from service import mixture_native
from service.gaussian import _MixtureLogProb, mixture_component_log_prob, mixture_log_prob_and_usage, native_applies
from service.model import build_model
from service.presets import get_preset, smoke
from service.step import introspective_step, make_optimizers

from mixture_cases import draw_mixture

F64 = torch.float64
needs_kernel = pytest.mark.skipif(mixture_native.library() is None, reason="no C compiler: the PyTorch path is used")


def _case(n, m, d, logvar, scale, seed=0):
    """float32 points drawn from a mixture with log-variances ~logvar and |mu| ~scale, plus weights."""
    g = torch.Generator().manual_seed(seed)
    z, means, logvars, log_w = draw_mixture(g, n, m, d, logvar, scale)
    z = torch.cat([z, 3.0 * scale * torch.randn(n // 20, d, generator=g, dtype=F64)])  # some points far out
    return [t.float() for t in (z, means, logvars, log_w)], torch.randn(z.shape[0], generator=g, dtype=F64)


def _value_usage_grads(fn, inputs, weight):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    log_p, usage = fn(*xs)
    (log_p * weight.to(log_p.dtype)).sum().backward()
    return [log_p.detach().double(), usage.detach().double()] + [x.grad.double() for x in xs]


def _reference(*xs):
    """float64 autograd through the component log-densities (no shortcut)."""
    comp = mixture_component_log_prob(*xs)
    return torch.logsumexp(comp, -1), torch.softmax(comp, -1).mean(0)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@needs_kernel
@pytest.mark.parametrize("weights", ["per-sample", "uniform"])  # uniform: the forward's g = 1 sums are used
@pytest.mark.parametrize("logvar,scale", [(0.0, 1.0), (-1.1, 1.5), (-3.5, 2.0), (-7.0, 5.0), (-9.0, 5.0)])
def test_kernel_matches_float64_from_broad_to_sharp_components(logvar, scale, weights):
    inputs, weight = _case(20_000, 64, 2, logvar, scale)
    if weights == "uniform":
        weight = torch.full_like(weight, -1.0 / weight.numel())
    assert native_applies(*inputs)
    got = _value_usage_grads(mixture_log_prob_and_usage, inputs, weight)
    ref = _value_usage_grads(_reference, [t.double() for t in inputs], weight)
    for name, a, b in zip(("log p", "usage", "d/dz", "d/dmu", "d/dlogvar", "d/dlog_w"), got, ref):
        assert _rel(a, b) < 2e-5, f"{name}: relative error {_rel(a, b):.2e} at log-variance {logvar}"


@needs_kernel
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (7, 3, 2), (8, 5, 2), (4_099, 100, 5), (5_003, 10, 32), (12_800, 64, 2)])
def test_kernel_handles_every_shape_ragged_rows_and_high_dimensions(n, m, d):
    inputs, weight = _case(n, m, d, -1.0, 1.5, seed=n + m + d)
    got = _value_usage_grads(mixture_log_prob_and_usage, inputs, weight)
    ref = _value_usage_grads(_reference, [t.double() for t in inputs], weight)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-7)


@needs_kernel
def test_kernel_gives_each_requested_gradient_and_no_other():
    inputs, weight = _case(9_000, 16, 2, 0.0, 1.0)
    z, means, logvars, log_w = [t.clone() for t in inputs]
    z.requires_grad_()  # only z: the parameters get nothing, and the answer equals the full one
    (mixture_log_prob_and_usage(z, means, logvars, log_w, usage=False)[0] * weight.float()).sum().backward()
    full = _value_usage_grads(mixture_log_prob_and_usage, inputs, weight)
    torch.testing.assert_close(z.grad.double(), full[2], rtol=1e-6, atol=1e-9)
    params = [t.clone().requires_grad_() for t in inputs[1:]]  # only the parameters (the prior's own KL)
    (mixture_log_prob_and_usage(inputs[0], *params, usage=False)[0] * weight.float()).sum().backward()
    for p, want in zip(params, full[3:]):
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=1e-9)


@needs_kernel
def test_kernel_agrees_with_the_pytorch_kernel_at_training_sizes():
    inputs, weight = _case(51_200, 64, 2, 0.0, 1.0)
    native = _value_usage_grads(mixture_log_prob_and_usage, inputs, weight)
    pytorch = _value_usage_grads(lambda *a: _MixtureLogProb.apply(*a, "usage"), inputs, weight)
    for a, b in zip(native, pytorch):  # two float32 summations of 51,200 rows (each against float64: above)
        assert _rel(a, b) < 5e-5


def test_other_dtypes_devices_and_non_finite_inputs_take_the_pytorch_path():
    inputs, _ = _case(100, 4, 2, 0.0, 1.0)
    assert not native_applies(*[t.double() for t in inputs])  # float64: exact PyTorch path
    bad = [t.clone() for t in inputs]
    bad[0][3, 1] = float("nan")
    assert not native_applies(*bad)
    log_p, _ = mixture_log_prob_and_usage(*bad)
    assert torch.isnan(log_p[3]) and torch.isfinite(torch.cat([log_p[:3], log_p[4:]])).all()
    bad[0][3, 1] = float("inf")
    assert not native_applies(*bad)


def test_switched_off_or_unbuildable_the_kernel_leaves_training_on_the_pytorch_path(tmp_path):
    """INTROPRIOR_NATIVE=0, and a compiler that fails: a warning, the PyTorch path, same numbers."""
    probe = ("import torch, service.gaussian as g, service.mixture_native as n\n"
             "torch.manual_seed(0); z = torch.randn(5000, 2); p = [torch.randn(8, 2), torch.zeros(8, 2), torch.log_softmax(torch.zeros(8), 0)]\n"
             "print(n.library() is None, g.native_applies(z, *p), float(g.mixture_log_prob_and_usage(z, *p)[0].sum()))\n")
    env = {**os.environ, "INTROPRIOR_KERNEL_CACHE": str(tmp_path / "cache")}
    off = subprocess.run([sys.executable, "-c", probe], env={**env, "INTROPRIOR_NATIVE": "0"},
                         capture_output=True, text=True, check=True)
    broken = subprocess.run([sys.executable, "-c", probe], env={**env, "CC": "/bin/false"},
                            capture_output=True, text=True, check=True)
    assert off.stdout.split()[:2] == ["True", "False"] and broken.stdout.split()[:2] == ["True", "False"]
    assert "using the PyTorch path" in broken.stderr and "/bin/false failed" in broken.stderr
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left behind
    assert off.stdout.split()[2] == broken.stdout.split()[2]


@needs_kernel
def test_built_kernel_is_cached_per_source_and_cpu(tmp_path):
    probe = "import service.mixture_native as n; print(n.library() is not None)"
    env = {**os.environ, "INTROPRIOR_KERNEL_CACHE": str(tmp_path)}
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "True"
    assert len(list(tmp_path.glob("mixture_kernel-*.so"))) == 1  # the second process loaded the first one's build


def _three_ip_steps(preset, monkeypatch, patch=None):
    """Three IP steps of a smoke preset at T = 100 from fixed seeds: (logged terms per step, final weights).

    ``patch``: ``(object, attribute, value)`` set for these steps only (the reference path)."""
    cfg = smoke(get_preset(preset))
    cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, mc_samples=100))
    torch.manual_seed(0)
    model = build_model(cfg, (2,), prior_type="mog")
    model.prior.init_clip_bounds()
    opt, gen = make_optimizers(model, cfg), torch.Generator().manual_seed(1)
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(2))
    if patch is not None:
        monkeypatch.setattr(*patch)
    logs = [introspective_step(model, opt, x, cfg, generator=gen) for _ in range(3)]
    monkeypatch.undo()
    return logs, [p.detach().clone() for p in model.parameters()]


@needs_kernel
@pytest.mark.parametrize("preset", ["8gaussians/mog-ip-lc", "8gaussians/mog-ip"])
def test_adversarial_steps_with_the_kernel_equal_the_pytorch_path(preset, monkeypatch):
    """Same RNG draws, same math: three IP steps with the C kernel and with the PyTorch kernel give the
    same losses and parameters (float32 rounding apart)."""
    logs_c, params_c = _three_ip_steps(preset, monkeypatch)
    logs_t, params_t = _three_ip_steps(preset, monkeypatch, (gaussian, "native_applies", lambda *a: False))
    for a, b in zip(logs_c, logs_t):
        for key in ("train/loss_encoder", "train/loss_decoder", "train/enc/kl_real", "train/dec/kl_prior"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(params_c, params_t):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def _plain_kl_term(prior, mu, logvar, cfg, generator, *, detach_prior=False, want_usage=False, usage_grad=False):
    """The Monte-Carlo KL as first written (SPEC §3.6): plain autograd through every component's
    log-density, log q summed per sample; the same draws as ``objectives.kl_term``."""
    from service.gaussian import LOG_2PI, randn, reparameterize
    from service.objectives import KlResult

    t, (b, d) = cfg.mc_samples, mu.shape
    eps = randn((t, b, d), generator, mu)
    z = reparameterize(mu, logvar, eps)
    log_q = -0.5 * (LOG_2PI + logvar + eps * eps).sum(-1)
    comp = prior.component_log_prob(z.reshape(t * b, d), detach=detach_prior)
    log_p, resp = torch.logsumexp(comp, -1), torch.softmax(comp, -1)
    return KlResult((log_q - log_p.reshape(t, b)).mean(0), resp.mean(0) if want_usage else None)


@pytest.mark.parametrize("preset", ["8gaussians/mog-ip-lc", "8gaussians/mog-fixed-lc", "8gaussians/mog-ip-lc-sharp"])
def test_adversarial_steps_equal_the_plain_autograd_reference(preset, monkeypatch):
    """Kernel, detached prior in the encoder step and the reshaped log q change no number: three IP
    steps against the same steps computed by plain autograd (same RNG draws), losses and weights."""
    import service.objectives as objectives

    logs, params = _three_ip_steps(preset, monkeypatch)
    ref_logs, ref_params = _three_ip_steps(preset, monkeypatch, (objectives, "kl_term", _plain_kl_term))
    for a, b in zip(logs, ref_logs):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def _mc_case(b, t, m, d, logvar, scale, seed=0):
    """Posteriors (mu, logvar) near the components of a mixture, noise (T, B, D), the mixture, a weight (B,)."""
    g = torch.Generator().manual_seed(seed)
    centres, means, logvars, log_w = draw_mixture(g, b, m, d, logvar, scale)
    post_lv = logvar + 0.5 + 0.3 * torch.randn(b, d, generator=g, dtype=F64)
    eps = torch.randn(t, b, d, generator=g, dtype=F64)
    weight = torch.randn(b, generator=g, dtype=F64)
    return [x.float() for x in (centres, post_lv, eps, means, logvars, log_w)], weight


def _mc_value_usage_grads(inputs, weight, fn=None):
    """mean_t log p, usage and the gradients of (log p * weight).sum() for mu, logvar, means, logvars, log w."""
    mu, lv, eps, means, logvars, log_w = [x.detach().clone().requires_grad_(i != 2) for i, x in enumerate(inputs)]
    fn = fn or gaussian.mixture_mc_log_prob_and_usage
    log_p, usage = fn(mu, torch.exp(0.5 * lv), eps, means, logvars, log_w)
    (log_p * weight.to(log_p.dtype)).sum().backward()
    return [log_p.detach().double(), usage.detach().double()] + [x.grad.double() for x in (mu, lv, means, logvars, log_w)]


def _mc_reference(mu, sigma, eps, means, logvars, log_w):
    """float64 autograd through the formed samples and every component's log-density."""
    t, b, d = eps.shape
    comp = mixture_component_log_prob(torch.addcmul(mu, sigma, eps).reshape(t * b, d), means, logvars, log_w)
    return torch.logsumexp(comp, -1).reshape(t, b).mean(0), torch.softmax(comp, -1).mean(0)


@needs_kernel
@pytest.mark.parametrize("weights", ["per-sample", "uniform"])  # per-sample: the parameters take the row-wise pass
@pytest.mark.parametrize("logvar,scale", [(0.0, 1.0), (-3.5, 2.0), (-7.0, 5.0), (-9.0, 5.0)])
def test_monte_carlo_form_matches_float64_from_broad_to_sharp_components(logvar, scale, weights):
    """The kernel's Monte-Carlo form (samples formed inside, reparameterisation's backward folded in)
    against float64 autograd, and against the sample path it replaces, at the step's shape."""
    inputs, weight = _mc_case(512, 100, 64, 2, logvar, scale)
    if weights == "uniform":
        weight = torch.full_like(weight, 1.0 / weight.numel())
    got = _mc_value_usage_grads(inputs, weight)
    ref = _mc_value_usage_grads([x.double() for x in inputs], weight, _mc_reference)
    old = _mc_value_usage_grads(inputs, weight, lambda mu, s, e, *p: (lambda lp, u: (lp.reshape(e.shape[:2]).mean(0), u))(
        *mixture_log_prob_and_usage(torch.addcmul(mu, s, e).reshape(-1, e.shape[-1]), *p)))
    names = ["log p", "usage", "d mu", "d logvar", "d means", "d logvars", "d log w"]
    for name, a, b, c in zip(names, got, ref, old):
        assert _rel(a, b) < 2e-5, (name, _rel(a, b))
        assert _rel(a, b) < 3 * _rel(c, b) + 1e-6, (name, _rel(a, b), _rel(c, b))  # no worse than the sample path


@needs_kernel
@pytest.mark.parametrize("b,t", [(37, 3), (45, 100), (1, 5)])  # partial vector blocks; one thread and several
def test_monte_carlo_form_partial_blocks(b, t):
    inputs, weight = _mc_case(b, t, 7, 3, -1.0, 1.5, seed=3)
    got = _mc_value_usage_grads(inputs, weight)
    ref = _mc_value_usage_grads([x.double() for x in inputs], weight, _mc_reference)
    for a, r in zip(got, ref):
        assert _rel(a, r) < 2e-5


def test_monte_carlo_form_falls_back_where_the_kernel_does_not_apply():
    """float64 takes the sample path exactly; a NaN posterior propagates as on the sample path."""
    inputs, weight = _mc_case(64, 10, 8, 2, -1.0, 1.5)
    wide = [x.double() for x in inputs]
    got = _mc_value_usage_grads(wide, weight)
    ref = _mc_value_usage_grads(wide, weight, _mc_reference)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)
    mu, lv, eps, *params = inputs
    mu = mu.clone()
    mu[3, 0] = float("nan")
    log_p, _ = gaussian.mixture_mc_log_prob_and_usage(mu, torch.exp(0.5 * lv), eps, *params)
    assert torch.isnan(log_p[3]) and bool(torch.isfinite(log_p[torch.arange(64) != 3]).all())
