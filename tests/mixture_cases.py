"""Test data shared by the mixture-density tests (``test_gaussian``, ``test_mixture_native``)."""

import torch

F64 = torch.float64


def draw_mixture(g: torch.Generator, n: int, m: int, d: int, logvar: float, scale: float):
    """float64 ``(z, means, logvars, log_w)``: ``n`` points drawn from an ``m``-component mixture in
    ``d`` dimensions whose log-variances are ~``logvar`` and |means| ~``scale``. Draws from ``g`` in
    a fixed order, so a caller may go on drawing from ``g`` afterwards."""
    means = scale * torch.randn(m, d, generator=g, dtype=F64)
    logvars = logvar + 0.3 * torch.randn(m, d, generator=g, dtype=F64)
    log_w = torch.log_softmax(torch.randn(m, generator=g, dtype=F64), 0)
    idx = torch.randint(0, m, (n,), generator=g)
    z = means[idx] + torch.exp(0.5 * logvars[idx]) * torch.randn(n, d, generator=g, dtype=F64)
    return z, means, logvars, log_w
