"""2D density metrics (SPEC §6.5): grid, gnELBO, histogram KL / JSD and their reference scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.data import sample_toy
from service.metrics.density import (
    gnelbo,
    gnelbo_with_grid,
    grid_points,
    histogram,
    histogram_jsd,
    histogram_kl,
)


def real_draws(name: str, seed: int, n: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return sample_toy(name, n, g)[0].numpy(), sample_toy(name, n, g)[0].numpy()


# --------------------------------------------------------------------------------------------
# Grid and gnELBO
# --------------------------------------------------------------------------------------------

def test_grid_endpoints_and_layout() -> None:
    grid = grid_points(2.0, 5)
    assert grid.shape == (25, 2) and grid.dtype == torch.float32
    assert grid[0].tolist() == [-2.0, -2.0] and grid[-1].tolist() == [2.0, 2.0]
    image = grid.reshape(5, 5, 2)  # [i, j] = (x_j, y_i)
    assert torch.equal(image[0, :, 0], torch.linspace(-2, 2, 5))  # x varies along a row
    assert (image[:, 0, 1] == torch.linspace(-2, 2, 5)).all()  # y varies down a column
    assert (image[2, :, 1] == 0).all()


def test_gnelbo_flat_energy() -> None:
    data = torch.randn(37, 2)
    ones = lambda x: torch.ones(x.shape[0])  # noqa: E731
    assert gnelbo(ones, data, L=2.0, grid_size=64, chunk=100) == 1.0 / (64**2 + 37)
    threes = lambda x: torch.full((x.shape[0],), 3.0)  # noqa: E731
    assert gnelbo(threes, data, L=2.0, grid_size=64) == pytest.approx(1.0 / (64**2 + 37), rel=1e-12)


def test_gnelbo_chunking_invariant() -> None:
    data = torch.randn(100, 2)
    energy = lambda x: (x**2).sum(1) + 0.1  # noqa: E731
    a = gnelbo(energy, data, L=3.0, grid_size=50, chunk=7)
    b = gnelbo(energy, data, L=3.0, grid_size=50, chunk=65536)
    assert a == pytest.approx(b, rel=1e-12)


def test_gnelbo_gaussian_energy() -> None:
    energy = lambda x: (x**2).sum(1)  # noqa: E731  (negative log of an unnormalised Gaussian)
    at_mode = gnelbo(energy, 0.05 * torch.randn(200, 2), L=2.0, grid_size=128)
    far = gnelbo(energy, torch.full((200, 2), 1.5), L=2.0, grid_size=128)
    assert 0 < at_mode < far
    # Closed form for the data-at-origin case: mean W = 0, so gnELBO = 0.
    assert gnelbo(energy, torch.zeros(10, 2), L=2.0, grid_size=64) == 0.0
    # sum_grid W ~ G^2 * mean of x^2 + y^2 over the square = G^2 * 2 L^2 / 3 (up to the grid's
    # endpoint bias): data at (1, 1) has W = 2, so gnELBO ~ 2 / (G^2 * 8/3 + 2N).
    value = gnelbo(energy, torch.ones(10, 2), L=2.0, grid_size=256)
    assert value == pytest.approx(2.0 / (256**2 * 8 / 3 + 20), rel=0.02)


def test_gnelbo_with_grid_returns_image_layout() -> None:
    energy = lambda x: x[:, 0] + 10 * x[:, 1]  # noqa: E731
    value, grid_w, data_mean = gnelbo_with_grid(energy, torch.ones(4, 2) * 5, L=1.0, grid_size=3)
    assert grid_w.shape == (3, 3)
    expected = torch.tensor([[-11.0, -10.0, -9.0], [-1.0, 0.0, 1.0], [9.0, 10.0, 11.0]], dtype=torch.float64)
    assert torch.allclose(grid_w, expected)
    assert value == pytest.approx(55.0 / (0.0 + 4 * 55.0))
    assert data_mean == 55.0  # the numerator; with grid_w.mean() the two parts of the ratio


def test_gnelbo_no_autograd() -> None:
    w = torch.tensor(2.0, requires_grad=True)
    seen = []
    def energy(x):
        out = w * (x**2).sum(1)
        seen.append(out.requires_grad)
        return out
    gnelbo(energy, torch.randn(5, 2), L=1.0, grid_size=8)
    assert not any(seen)


# --------------------------------------------------------------------------------------------
# Histograms
# --------------------------------------------------------------------------------------------

def test_histogram_density_scaling() -> None:
    L, bins = 2.0, 100
    bin_area = (2 * L / bins) ** 2
    h = histogram(np.full((10, 2), 0.01), L, bins)  # all mass in one bin
    assert h.shape == (bins, bins)
    assert h.max() == pytest.approx(1.0 / bin_area) and np.count_nonzero(h) == 1
    assert h[50, 50] == pytest.approx(1.0 / bin_area)  # [i, j] = x-bin i, y-bin j
    centres = np.linspace(-L, L, bins + 1)[:-1] + L / bins  # one point at each bin centre
    gx, gy = np.meshgrid(centres, centres)
    h = histogram(np.stack([gx.ravel(), gy.ravel()], 1), L, bins)
    assert np.allclose(h, 1.0 / (bins**2 * bin_area))  # the 1 / (100^2 * bin_area) pattern


def test_histogram_x_is_first_axis() -> None:
    h = histogram(np.array([[1.9, -1.9]]), 2.0, 4)
    assert h[3, 0] > 0 and h.sum() == h[3, 0]


def test_kl_jsd_of_identical_samples_is_zero() -> None:
    # Not bitwise 0: the literal eps gives log p - log(p + 1e-14) ~ -1e-14 / p per occupied bin.
    x, _ = real_draws("rings", 0, 1000)
    assert abs(histogram_kl(x, x, 4.0)) < 1e-10
    assert abs(histogram_jsd(x, x, 4.0)) < 1e-10


def test_kl_scaling_two_bins() -> None:
    L, bins = 1.0, 2  # bin area 1; p: all in one bin -> density 1/area = 1; q: half there -> 0.5
    p = np.array([[-0.5, -0.5]] * 4)
    q = np.array([[-0.5, -0.5], [-0.5, -0.5], [0.5, 0.5], [0.5, 0.5]])
    assert histogram_kl(p, q, L, bins) == pytest.approx(1.0 * np.log(1.0 / 0.5) / bins)
    # M = [[0.75, 0], [0, 0.25]]: KL(M || p) uses log(0 + 1e-14) in the q-only bin
    m_hi, m_lo = 0.75, 0.25
    kl_mp = (m_hi * np.log(m_hi / 1.0) + m_lo * (np.log(m_lo) - np.log(1e-14))) / bins
    kl_mq = (m_hi * np.log(m_hi / 0.5) + m_lo * np.log(m_lo / 0.5)) / bins
    assert histogram_jsd(p, q, L, bins) == pytest.approx(0.5 * (kl_mp + kl_mq))


def test_kl_direction_is_data_to_model() -> None:
    p = np.array([[-0.5, -0.5]] * 4)  # real: one bin
    q = np.array([[-0.5, -0.5], [0.5, 0.5]])  # model covers more: finite KL(p || q)
    assert histogram_kl(p, q, 1.0, 2) < 1.0 < histogram_kl(q, p, 1.0, 2)


@pytest.mark.parametrize("name, L, kl_floor, jsd_floor", [
    ("8gaussians", 2.0, 0.68, 0.27),
    ("checkerboard", 4.0, 17.3, 8.1),
])
def test_sanity_floors(name: str, L: float, kl_floor: float, jsd_floor: float) -> None:
    kls, jsds = [], []
    for seed in range(5):
        a, b = real_draws(name, seed)
        kls.append(histogram_kl(a, b, L))
        jsds.append(histogram_jsd(*real_draws(name, 100 + seed), L))
    assert np.mean(kls) == pytest.approx(kl_floor, rel=0.25)
    assert np.mean(jsds) == pytest.approx(jsd_floor, rel=0.25)
