"""Diagonal-Gaussian helpers shared by priors and objectives (SPEC §1, §3.6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import mixture_native

LOG_2PI = math.log(2.0 * math.pi)
_WIDE = torch.float64  # the accumulation dtype of the mixture expansion (see _MixtureLogProb)


def randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Standard normal noise of ``shape`` with ``like``'s dtype/device, drawn from ``generator``."""
    device = generator.device if generator is not None else like.device
    eps = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return eps.to(like.device)


def reparameterize(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """``z = mu + exp(logvar / 2) * eps``; mu, logvar: (B, D), eps broadcastable, e.g. (T, B, D)."""
    return mu + torch.exp(0.5 * logvar) * eps


def diag_normal_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z | mu, diag(exp(logvar))) summed over the last dim; shapes broadcast."""
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """Closed-form KL[N(mu, exp(logvar)) || N(0, I)]: (B, D) -> (B,) (SPEC §1)."""
    return 0.5 * (torch.exp(logvar) + mu**2 - 1.0 - logvar).sum(-1)


def kl_diag_normals(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """Closed-form KL[N(mu_q, var_q) || N(mu_p, var_p)] for diagonal Gaussians, summed over last dim."""
    return 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1.0).sum(-1)


def mixture_component_log_prob(z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor) -> Tensor:
    """``log w_m + log N(z | mu_m, diag var_m)`` for every component: z (N, D) -> (N, M).

    Written as matrix products, ``sum_d (z_d - mu_md)^2 / var_md = z^2 @ (1/var)^T
    - 2 z @ (mu/var)^T + sum_d mu_md^2 / var_md``, so that the (N, M, D) tensor of
    differences is never materialised: this is the hot spot of the Monte-Carlo KL
    (N = T * B points, M components). The expansion cancels catastrophically for sharp
    components far from the origin (terms of size ``|mu|^2 / var`` whose difference is O(1)),
    so it is evaluated in ``accumulation_dtype`` (float64 where needed) and cast back to z's dtype.
    means, logvars: (M, D); log_weights: (M,) normalised log mixture weights.
    """
    dtype = z.dtype
    # autograd through the expansion loses about 4x more than the fused backward: a tighter guard
    acc = accumulation_dtype(z, means, logvars, WIDE_TOLERANCE / 10)
    z, means, logvars = z.to(acc), means.to(acc), logvars.to(acc)
    inv_var = torch.exp(-logvars)  # (M, D)
    quad = (z * z) @ inv_var.T - 2.0 * z @ (means * inv_var).T  # (N, M)
    const = (means * means * inv_var).sum(-1) + logvars.sum(-1) + z.shape[-1] * LOG_2PI  # (M,)
    return log_weights - 0.5 * (quad + const).to(dtype)


def log_mean_exp(x: Tensor, dim: int) -> Tensor:
    """``log(mean(exp(x)))`` along ``dim``, computed stably."""
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


# Precision guard of the mixture expansion. In ``z``'s dtype, ``z^2/var - 2 z mu/var + mu^2/var``
# carries a rounding error that grows with ``eps * kappa``, ``kappa = max_m sum_d (max|z_d| +
# |mu_md|)^2 / var_md``: terms of size |mu|^2 / var cancel to an O(1) result. For sharp components
# far from the origin (log-variance -7, |mu| = 5: eps * kappa = 0.2) the log-variance gradient is off
# by 1% and more (-9: 9%). Where ``eps * kappa`` exceeds ``WIDE_TOLERANCE`` the products run in
# float64 (the narrow (rows, 2D+1) features are widened; only the (rows, M) results are cast back),
# otherwise in ``z``'s dtype at full speed. Measured in float32 (N = 20,000, M = 64, D = 2): the
# relative error of every gradient is at most about 0.05 * eps * kappa, so 1e-3 keeps them within
# 5e-5 of float64 (the trained sharp 8gaussians priors, log-variance about -3.5, stay in float32).
# ``tests/test_gaussian.py`` checks both paths against float64 across log-variances 0 to -9.
WIDE_TOLERANCE = 1e-3


def accumulation_dtype(z: Tensor, means: Tensor, logvars: Tensor, tolerance: float | None = None) -> torch.dtype:
    """float64 where ``eps * kappa`` in ``z``'s dtype exceeds ``tolerance`` (``WIDE_TOLERANCE``), else z's dtype."""
    tolerance = WIDE_TOLERANCE if tolerance is None else tolerance
    if z.dtype == _WIDE or z.shape[0] == 0:
        return z.dtype
    with torch.no_grad():
        reach = z.abs().amax(0) + means.abs()  # (M, D): bound on |z_d| + |mu_md| over the batch
        kappa = (reach * reach * torch.exp(-logvars)).sum(-1).max()
        return _WIDE if float(kappa) * torch.finfo(z.dtype).eps > tolerance else z.dtype


class _MixtureLogProb(torch.autograd.Function):
    """``log p(z) = logsumexp_m comp_m(z)`` with a hand-written backward, in three passes over (N, M).

    Autograd through ``mixture_component_log_prob`` + ``logsumexp`` keeps several (N, M)
    intermediates and makes about a dozen passes over them; the Monte-Carlo KL evaluates
    N = T * B = 51,200 points against M = 64 components six times per step. Here:

    - the component log-densities come from one matrix product of the augmented features
      ``A = [z^2, z, 1]`` (N, 2D+1) with per-component coefficients, shifted by one constant,
      the largest peak ``c = max_m (log w_m - 0.5 sum_d log(2 pi var_md))``, so that every entry
      is <= 0 and ``e = exp(comp - c)`` cannot overflow: no per-row max pass. The forward is the
      product, one in-place exp and one row sum ``S``; ``log p = c + log S``. Rows far from every
      component (``S`` below ``sqrt(tiny)``, where exp would underflow) are recomputed with their
      own maximum, exactly as a per-row log-sum-exp.
    - the responsibilities ``r = e / S`` are never normalised in memory: the backward folds
      ``g / S`` (g the incoming gradient, (N,)) into the narrow operands of two matrix products:
        dlogp/dz     = (g/S) * (e @ (mu/var) - z * (e @ 1/var))
        sum_n g r_nm [z^2, z, 1]_n = ((g/S) * A)^T @ e   ->  d/dmu, d/dlogvar, d/dlog w:
        dlogp/dmu_m  = sum_n r_nm (z_n - mu_m) / var_m
        dlogp/dlv_md = 0.5 sum_n r_nm ((z_nd - mu_md)^2 / var_md - 1)
        dlogp/dlw_m  = sum_n r_nm
      and each product runs only when its inputs need a gradient.

    The products run in ``accumulation_dtype`` (the precision guard above); ``e`` stays in z's
    dtype. ``extra`` chooses the second output: ``"resp"`` the normalised responsibilities
    (N, M), ``"usage"`` their mean over the rows (M,) (one matrix-vector product), ``"none"``.
    """

    CHUNK = 8_192  # rows per block: keeps the (rows, M) temporaries in cache

    @staticmethod
    def forward(ctx, z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor, extra: str):  # type: ignore[override]
        n, d = z.shape
        dtype, m = z.dtype, means.shape[0]
        acc = accumulation_dtype(z, means, logvars)
        mu, lv, lw = means.to(acc), logvars.to(acc), log_weights.to(acc)
        inv_var = torch.exp(-lv)  # (M, D)
        log_norm = lv.sum(-1) + d * LOG_2PI  # (M,)
        shift = (lw - 0.5 * log_norm).max()  # the largest peak: comp - shift <= 0 everywhere
        const = (mu * mu * inv_var).sum(-1) + log_norm - 2.0 * (lw - shift)  # (M,)
        coef_t = (-0.5 * torch.cat([inv_var, -2.0 * mu * inv_var, const.unsqueeze(-1)], dim=1)).T  # (2D+1, M)
        za = z.to(acc)
        feats = torch.cat([za * za, za, torch.ones_like(za[:, :1])], dim=1)  # (N, 2D+1) = [z^2, z, 1]
        e = torch.empty(n, m, dtype=dtype, device=z.device)
        total = torch.empty(n, dtype=dtype, device=z.device)
        wide = None if acc == dtype else torch.empty(min(n, _MixtureLogProb.CHUNK), m, dtype=acc, device=z.device)
        for i in range(0, n, _MixtureLogProb.CHUNK):
            sl = slice(i, i + _MixtureLogProb.CHUNK)
            blk = e[sl]
            if wide is None:
                torch.mm(feats[sl], coef_t, out=blk)
            else:  # exact in float64, narrowed only after the cancellation
                blk.copy_(torch.mm(feats[sl], coef_t, out=wide[:blk.shape[0]]))
            torch.sum(blk.exp_(), dim=-1, out=total[sl])
        log_p = torch.log(total).to(acc) + shift
        far = (total < torch.finfo(dtype).tiny ** 0.5).nonzero().squeeze(-1)
        if far.numel():  # exp underflowed (nearly) everywhere on these rows: their own maximum instead
            comp = feats[far] @ coef_t
            top = comp.amax(dim=-1, keepdim=True)
            ex = torch.exp(comp - top)
            row_total = ex.sum(-1)
            e[far], total[far] = ex.to(dtype), row_total.to(dtype)
            log_p[far] = shift + top.squeeze(-1) + torch.log(row_total)
        ctx.save_for_backward(feats, mu, inv_var, e, total)
        if extra == "resp":
            second = e / total.unsqueeze(-1)
        elif extra == "usage":
            second = torch.mv(e.T, total.reciprocal()) / max(n, 1)
        else:
            second = e.new_empty(0)
        ctx.mark_non_differentiable(second)
        ctx.set_materialize_grads(False)  # the second output has no gradient: never allocate zeros for it
        return log_p.to(dtype), second

    @staticmethod
    def backward(ctx, grad_log_p: Tensor, _grad_second: Tensor):  # type: ignore[override]
        feats, means, inv_var, e, total = ctx.saved_tensors
        need_z, need_mu, need_lv, need_w = ctx.needs_input_grad[:4]
        if grad_log_p is None:
            return None, None, None, None, None
        dtype, acc, d = e.dtype, feats.dtype, means.shape[-1]
        scale = (grad_log_p / total).to(acc).unsqueeze(-1)  # (N, 1): g / S, the normalisation folded in
        grad_z = None
        if need_z:
            to_z_t = torch.cat([means * inv_var, inv_var], dim=1).T.contiguous()  # (2D, M)
            grad_z = torch.empty(e.shape[0], d, dtype=dtype, device=e.device)
        need_stats = need_mu or need_lv or need_w
        stats = feats.new_zeros(2 * d + 1, means.shape[0])  # sum_n g r [z^2; z; 1]
        for i in range(0, e.shape[0], _MixtureLogProb.CHUNK):
            sl = slice(i, i + _MixtureLogProb.CHUNK)
            blk = e[sl].to(acc)
            if need_z:
                both = (to_z_t @ blk.T).T  # (rows, 2D): sum_m e mu/var, sum_m e/var (this layout: 2.5x faster)
                grad_z[sl] = scale[sl] * (both[:, :d] - feats[sl, d:2 * d] * both[:, d:])
            if need_stats:
                stats.addmm_((feats[sl] * scale[sl]).T, blk)
        grad_mu = grad_lv = grad_w = None
        if need_stats:
            gzz, gz, s = stats[:d].T, stats[d:2 * d].T, stats[2 * d]
            grad_mu = (inv_var * (gz - s.unsqueeze(-1) * means)).to(dtype) if need_mu else None
            if need_lv:
                sq = gzz - 2.0 * means * gz + s.unsqueeze(-1) * means * means  # sum_n g r (z - mu)^2
                grad_lv = (0.5 * (inv_var * sq - s.unsqueeze(-1))).to(dtype)
            grad_w = s.to(dtype) if need_w else None
        return grad_z, grad_mu, grad_lv, grad_w, None


def mixture_log_prob(z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p(z) (N,), responsibilities (N, M))`` of a diagonal mixture, fast backward.

    The responsibilities carry no gradient; use ``mixture_component_log_prob`` + softmax where a
    gradient through them is needed (the responsibility-entropy term).
    """
    return _MixtureLogProb.apply(z, means, logvars, log_weights, "resp")


def _kernel_params(means: Tensor, logvars: Tensor, log_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The mixture as the C kernel takes it (detached, contiguous): means and inverse variances transposed
    to (D, M), the kernel runs along m; bias_m = log w_m - 0.5 sum_d log(2 pi var_md) (M,)."""
    lv = logvars.detach()
    mu_t = means.detach().T.contiguous()
    iv_t = torch.exp(-lv).T.contiguous()
    bias = (log_weights.detach() - 0.5 * (lv.sum(-1) + lv.shape[-1] * LOG_2PI)).contiguous()
    return mu_t, iv_t, bias


def _parameter_grads(stats: Tensor | None, iv_t: Tensor, needed: tuple[bool, bool, bool],
                     dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of (means, log-variances, log weights) from the kernel's sums S0 | S1 | S2 (float64,
    ``(1 + 2D) * M``): S1 / var, 0.5 (S2 / var - S0), S0; None where not ``needed`` or no sums."""
    if stats is None:
        return None, None, None
    d, m = iv_t.shape
    s0 = stats[:m]
    s1 = stats[m:m + d * m].view(d, m).T  # (M, D)
    s2 = stats[m + d * m:].view(d, m).T
    inv_var = iv_t.T.to(_WIDE)
    need_mu, need_lv, need_w = needed
    return ((inv_var * s1).to(dtype) if need_mu else None,
            (0.5 * (inv_var * s2 - s0.unsqueeze(-1))).to(dtype) if need_lv else None,
            s0.to(dtype) if need_w else None)


class _NativeMixtureLogProb(torch.autograd.Function):
    """``log p(z)`` (and the usage) through the fused C kernel (``mixture_native``), float32 CPU.

    The kernel evaluates each row against the largest peak (a row far from every component against its
    own maximum), in centred form (no cancellation, so no precision guard is needed), and returns the
    sums the gradients are made of:
      S0_m = sum_n g r_nm,  S1_md = sum_n g r_nm (z_nd - mu_md),  S2_md = sum_n g r_nm (z_nd - mu_md)^2
      dlogp/dmu = S1 / var,  dlogp/dlogvar = 0.5 (S2 / var - S0),  dlogp/dlog w = S0,
      dlogp/dz_n = -g_n sum_m r_nm (z_n - mu_m) / var_m.
    The last one is formed in the forward with g = 1 (where z needs a gradient) and multiplied by
    g in the backward. Where the parameters need gradients the forward also forms S0, S1, S2 with
    g = 1; a uniform incoming gradient (a mean over the samples: the prior's own KL, the warm-up)
    only scales them, and any other gradient takes a second pass of the kernel for the parameters.
    """

    @staticmethod
    def forward(ctx, z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor, want_usage: bool,  # type: ignore[override]
                grad_mode: bool):
        n, d = z.shape
        m = means.shape[0]
        zc = z.detach().contiguous()
        mu_t, iv_t, bias = _kernel_params(means, logvars, log_weights)
        need_params = grad_mode and any(ctx.needs_input_grad[1:4])  # (needs_input_grad ignores no_grad)
        # with parameter gradients to come, the forward also forms their sums for g = 1 (no exp more)
        sums = torch.zeros((1 + 2 * d) * m if need_params else m, dtype=_WIDE) if need_params or want_usage else None
        dlogp_dz = torch.empty(n, d, dtype=z.dtype) if grad_mode and ctx.needs_input_grad[0] else None
        log_p = mixture_native.forward(zc, mu_t, iv_t, bias, sums, dlogp_dz)
        ctx.save_for_backward(zc, mu_t, iv_t, bias, log_p, dlogp_dz, sums if need_params else None)
        second = (sums[:m] / max(n, 1)).to(z.dtype) if want_usage else z.new_empty(0)
        ctx.mark_non_differentiable(second)
        ctx.set_materialize_grads(False)
        return log_p, second

    @staticmethod
    def backward(ctx, grad_log_p: Tensor, _grad_second: Tensor):  # type: ignore[override]
        zc, mu_t, iv_t, bias, log_p, dlogp_dz, unit_sums = ctx.saved_tensors
        need_z, need_mu, need_lv, need_w = ctx.needs_input_grad[:4]
        if grad_log_p is None:
            return (None,) * 6
        (n, d), m = zc.shape, mu_t.shape[1]
        g = grad_log_p.to(zc.dtype)
        dz = g.unsqueeze(-1) * dlogp_dz if need_z else None  # from the forward
        stats = None
        if need_mu or need_lv or need_w:
            if n and bool((g == g[0]).all()):  # a mean over the samples: the forward's g = 1 sums, scaled
                stats = unit_sums * float(g[0])
            else:  # one more pass of exps, for the parameters only
                stats = torch.zeros((1 + 2 * d) * m, dtype=_WIDE)
                mixture_native.backward(zc, mu_t, iv_t, bias, log_p, g.contiguous(), None, stats)
        grad_mu, grad_lv, grad_w = _parameter_grads(stats, iv_t, (need_mu, need_lv, need_w), zc.dtype)
        return dz, grad_mu, grad_lv, grad_w, None, None


class _NativeMcLogProb(torch.autograd.Function):
    """``mean_t log p(mu + sigma * eps_t)`` (B,) through the kernel's Monte-Carlo form, float32 CPU.

    The same mixture as ``_NativeMixtureLogProb`` at the T * B points ``z_tb = mu_b + sigma_b eps_tb``,
    but the kernel forms each z where it evaluates it: the (T, B, D) samples, their (T * B,) log p
    and (T * B, D) gradient never reach memory, and the reparameterisation's backward is done:
      d/dmu_b    = g_b mean_t dlogp/dz_tb,   d/dsigma_b = g_b mean_t eps_tb dlogp/dz_tb.
    The parameters' gradient: the rows' gradient is g_b / T, so a uniform g scales the forward's
    g = 1 sums as before; any other g re-forms z and takes the row-wise backward pass.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, sigma: Tensor, eps: Tensor, means: Tensor, logvars: Tensor,  # type: ignore[override]
                log_weights: Tensor, want_usage: bool, grad_mode: bool):
        t, b, d = eps.shape
        m = means.shape[0]
        mu_t, iv_t, bias = _kernel_params(means, logvars, log_weights)
        need_params = grad_mode and any(ctx.needs_input_grad[3:6])
        need_post = grad_mode and any(ctx.needs_input_grad[0:2])
        sums = torch.zeros((1 + 2 * d) * m if need_params else m, dtype=_WIDE) if need_params or want_usage else None
        post = (mu.detach().contiguous(), sigma.detach().contiguous(), eps.detach().contiguous())
        out = mixture_native.mc_forward(*post, mu_t, iv_t, bias, sums, need_post)
        dmu, deps = out[1:] if need_post else (None, None)
        ctx.save_for_backward(*post, mu_t, iv_t, bias, dmu, deps, sums if need_params else None)
        second = (sums[:m] / max(t * b, 1)).to(mu.dtype) if want_usage else mu.new_empty(0)
        ctx.mark_non_differentiable(second)
        ctx.set_materialize_grads(False)
        return out[0], second

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_second: Tensor):  # type: ignore[override]
        mu, sigma, eps, mu_t, iv_t, bias, dmu, deps, unit_sums = ctx.saved_tensors
        need_mu, need_sigma, _, need_means, need_lv, need_w = ctx.needs_input_grad[:6]
        if grad is None:
            return (None,) * 8
        (t, b, d), m = eps.shape, mu_t.shape[1]
        g = grad.to(mu.dtype)
        g_col = g.unsqueeze(-1)
        grad_mu = g_col * dmu if need_mu else None
        grad_sigma = g_col * deps if need_sigma else None
        stats = None
        if need_means or need_lv or need_w:
            if b and bool((g == g[0]).all()):  # every row's gradient is g / T: the forward's sums, scaled
                stats = unit_sums * (float(g[0]) / t)
            else:  # re-form the samples for one row-wise pass of the parameters' sums
                z = torch.addcmul(mu, sigma, eps).reshape(t * b, d)
                rows = (g / t).expand(t, b).reshape(-1).contiguous()
                stats = torch.zeros((1 + 2 * d) * m, dtype=_WIDE)
                log_p = mixture_native.forward(z, mu_t, iv_t, bias, None)
                mixture_native.backward(z, mu_t, iv_t, bias, log_p, rows, None, stats)
        grad_means, grad_lv, grad_w = _parameter_grads(stats, iv_t, (need_means, need_lv, need_w), mu.dtype)
        return grad_mu, grad_sigma, None, grad_means, grad_lv, grad_w, None, None


def native_applies(z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor) -> bool:
    """The C kernel takes float32 CPU tensors with finite values (anything else: the PyTorch path)."""
    tensors = (z, means, logvars, log_weights)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors) or z.dim() != 2:
        return False
    if mixture_native.library() is None:
        return False
    with torch.no_grad():  # NaN / inf: the PyTorch path propagates them the way the rest of the step does
        return math.isfinite(float(z.sum())) and all(bool(torch.isfinite(t).all()) for t in tensors[1:])


def mixture_log_prob_and_usage(z: Tensor, means: Tensor, logvars: Tensor, log_weights: Tensor,
                               usage: bool = True) -> tuple[Tensor, Tensor | None]:
    """``(log p(z) (N,), mean responsibilities (M,) or None)``: the Monte-Carlo KL's fast path.

    float32 on CPU: the fused C kernel (``mixture_native``); otherwise the PyTorch kernel above.
    Never materialises the normalised (N, M) responsibilities; the usage carries no gradient.
    """
    if native_applies(z, means, logvars, log_weights):
        log_p, second = _NativeMixtureLogProb.apply(z, means, logvars, log_weights, usage, torch.is_grad_enabled())
    else:
        log_p, second = _MixtureLogProb.apply(z, means, logvars, log_weights, "usage" if usage else "none")
    return log_p, (second if usage else None)


MC_FORM = True  # False: the Monte-Carlo KL forms its samples in PyTorch (``jobs.bench`` times both side by side)


def mixture_mc_log_prob_and_usage(mu: Tensor, sigma: Tensor, eps: Tensor, means: Tensor, logvars: Tensor,
                                  log_weights: Tensor, usage: bool = True) -> tuple[Tensor, Tensor | None]:
    """``(mean_t log p(mu + sigma * eps_t) (B,), mean responsibilities (M,) or None)``: the Monte-Carlo
    KL's log p term for posteriors ``mu``, ``sigma`` (B, D) and noise ``eps`` (T, B, D).

    float32 on CPU: the C kernel forms the samples itself (``_NativeMcLogProb``); otherwise the
    samples are formed here and go through ``mixture_log_prob_and_usage``. Same values and gradients.
    """
    t, b, d = eps.shape
    if MC_FORM and mu.shape == sigma.shape == (b, d) and native_applies(mu, means, logvars, log_weights) \
            and sigma.dtype == eps.dtype == torch.float32 and sigma.device.type == eps.device.type == "cpu":
        with torch.no_grad():
            finite = math.isfinite(float(sigma.sum())) and math.isfinite(float(eps.sum()))
        if finite:
            mean_log_p, second = _NativeMcLogProb.apply(mu, sigma, eps, means, logvars, log_weights, usage,
                                                        torch.is_grad_enabled())
            return mean_log_p, (second if usage else None)
    z = torch.addcmul(mu, sigma, eps)  # (T, B, D), one pass
    log_p, second = mixture_log_prob_and_usage(z.reshape(t * b, d), means, logvars, log_weights, usage)
    return log_p.reshape(t, b).mean(0), second
