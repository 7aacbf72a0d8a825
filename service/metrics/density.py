"""2D density metrics of SPEC §6.5, reproduced literally from the reference code.

- gnELBO: the data's mean energy divided by the total energy over a fixed grid plus the data
  (reported x 1e7 by the caller).
- Histogram KL and JSD between real and generated samples, on ``numpy.histogram2d`` densities.
  Both divide the sum over bins by ``bins`` (PyTorch ``kl_div(reduction='batchmean')`` over the
  histogram rows) and the JSD is the reference's ``0.5 [KL(M || p) + KL(M || q)]``, the reverse of
  the textbook ``0.5 [KL(p || M) + KL(q || M)]``. Keep both quirks: the paper's numbers use them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

EPS = 1e-14  # added to the second argument of every histogram KL (reference value)

EnergyFn = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# gnELBO (grid-normalised ELBO)
# --------------------------------------------------------------------------------------------

def grid_points(L: float, size: int) -> Tensor:
    """The evaluation grid over ``[-L, L]^2``, endpoints included: (size * size, 2) float32.

    Row-major: point ``k = i * size + j`` is ``(x_j, y_i)`` with ``x = y = linspace(-L, L, size)``,
    so ``values.reshape(size, size)[i, j]`` belongs to ``(x_j, y_i)`` and displays correctly with
    ``imshow(..., origin="lower", extent=(-L, L, -L, L))``.
    """
    axis = torch.linspace(-L, L, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")  # (size, size) each; rows vary in y
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=1)


def _energies(energy_fn: EnergyFn, points: Tensor, chunk: int, device: torch.device | str | None) -> Tensor:
    """``energy_fn`` over ``points`` (N, 2) in chunks, without autograd: (N,) float64 on CPU."""
    out = []
    with torch.no_grad():
        for start in range(0, points.shape[0], chunk):
            batch = points[start:start + chunk]
            if device is not None:
                batch = batch.to(device)
            out.append(energy_fn(batch).reshape(-1).to("cpu", torch.float64))
    return torch.cat(out)


def gnelbo_with_grid(energy_fn: EnergyFn, data: Tensor, L: float, grid_size: int = 1024,
                     chunk: int = 65536, device: torch.device | str | None = None) -> tuple[float, Tensor, float]:
    """gnELBO and the grid energies, from one pass over the grid (SPEC §6.5).

    energy_fn: (B, 2) -> (B,) energies W (SPEC §6.5: KL + squared error at the posterior mean);
    data: (N, 2) real points. Returns ``mean_data W / (sum_grid W + sum_data W)`` (raw; the
    tables show it x 1e7), the grid energies (grid_size, grid_size) float64, laid out as in
    ``grid_points`` (for the density image), and ``mean_data W``, the numerator (with the grid's
    mean, ``grid_w.mean()``, it says which of the two moved a gnELBO). Sums are accumulated in
    float64 because the grid has about 1e6 points. ``device``: where the chunks are moved before
    ``energy_fn``.
    """
    grid_w = _energies(energy_fn, grid_points(L, grid_size), chunk, device)  # (G*G,)
    data_w = _energies(energy_fn, data, chunk, device)  # (N,)
    value = data_w.mean() / (grid_w.sum() + data_w.sum())
    return float(value), grid_w.reshape(grid_size, grid_size), float(data_w.mean())


def gnelbo(energy_fn: EnergyFn, data: Tensor, L: float, grid_size: int = 1024, chunk: int = 65536,
           device: torch.device | str | None = None) -> float:
    """``mean_data W / (sum_grid W + sum_data W)`` (SPEC §6.5); see ``gnelbo_with_grid``."""
    return gnelbo_with_grid(energy_fn, data, L, grid_size, chunk, device)[0]


# --------------------------------------------------------------------------------------------
# Histogram KL / JSD
# --------------------------------------------------------------------------------------------

def histogram(samples: np.ndarray, L: float, bins: int = 100) -> np.ndarray:
    """Density histogram of samples (N, 2) on ``[-L, L]^2``: (bins, bins) (SPEC §6.5).

    ``numpy.histogram2d(..., density=True)``: a bin holding k of the N in-range points has value
    ``k / (N * bin_area)``, ``bin_area = (2L / bins)^2``; points outside the square are dropped.
    Entry ``[i, j]`` is x-bin i, y-bin j.
    """
    samples = np.asarray(samples, dtype=np.float64)
    h, _, _ = np.histogram2d(samples[:, 0], samples[:, 1], bins=bins, range=[[-L, L], [-L, L]], density=True)
    return h


def _kl_terms(p: np.ndarray, q: np.ndarray, bins: int) -> float:
    """Reference histogram KL of densities (bins, bins): ``sum_{p>0} p (log p - log(q + 1e-14)) / bins``.

    Equals ``torch.nn.functional.kl_div(log(q + eps), p, reduction='batchmean')`` over the
    ``bins`` rows; zero-``p`` bins contribute 0.
    """
    mask = p > 0
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask] + EPS))) / bins)


def histogram_kl(p_samples: np.ndarray, q_samples: np.ndarray, L: float, bins: int = 100) -> float:
    """Histogram KL(data || model) of SPEC §6.5, p = real (N, 2), q = generated (N', 2).

    ``sum_bins p (log p - log(q + 1e-14)) / bins`` on ``histogram`` densities: the reference
    code's definition and scaling (not a normalised discrete KL). Its floor for two independent
    real draws of 5,000 is far from 0 (SPEC §6.5: 0.68 for 8gaussians, 17.3 for checkerboard).
    """
    return _kl_terms(histogram(p_samples, L, bins), histogram(q_samples, L, bins), bins)


def histogram_jsd(p_samples: np.ndarray, q_samples: np.ndarray, L: float, bins: int = 100) -> float:
    """Histogram JSD of SPEC §6.5: ``M = (p + q) / 2``, ``0.5 [KL(M || p_eps) + KL(M || q_eps)]``.

    Each KL is the reference's ``sum_{M>0} M (log M - log(x + 1e-14)) / bins`` (see
    ``histogram_kl``). This is the reference code's definition, the reverse of the textbook
    ``0.5 [KL(p || M) + KL(q || M)]``; it is kept because the paper's numbers use it.
    p_samples: real (N, 2); q_samples: generated (N', 2).
    """
    p = histogram(p_samples, L, bins)
    q = histogram(q_samples, L, bins)
    m = 0.5 * (p + q)
    return 0.5 * (_kl_terms(m, p, bins) + _kl_terms(m, q, bins))
