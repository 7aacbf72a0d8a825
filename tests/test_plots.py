"""Each SPEC §6.6 figure is written as a PNG that PIL can open."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.plots import plot_density, plot_latent, plot_samples


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 50 and image.size[1] > 50


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_plot_samples(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "samples.png"
    plot_samples(rng.normal(size=(1024, 2)), rng.normal(size=(1024, 2)), 4.0, path)
    assert_png(path)


def test_plot_samples_marks_a_displaced_mode(tmp_path: Path, rng: np.random.Generator) -> None:
    real, fake = rng.normal(size=(256, 2)), rng.normal(size=(256, 2))
    plain, marked = tmp_path / "plain.png", tmp_path / "marked.png"
    plot_samples(real, fake, 4.0, plain)
    plot_samples(real, fake, 4.0, marked, displaced=[(3, [0.0, -1.41], [0.1, -1.62], 16.2)])
    assert_png(marked)
    with Image.open(plain) as a, Image.open(marked) as b:
        a, b = np.asarray(a.convert("L"), dtype=int), np.asarray(b.convert("L"), dtype=int)
    assert a.shape == b.shape
    width = a.shape[1]
    assert np.abs(a - b)[:, width // 2:].sum() > 0  # the arrow, cross and label, on the generated side
    assert np.abs(a - b)[:, : int(0.45 * width)].sum() == 0  # the real side untouched


def test_plot_density(tmp_path: Path) -> None:
    axis = np.linspace(-2, 2, 64)
    gx, gy = np.meshgrid(axis, axis)
    path = tmp_path / "density.png"
    plot_density(1000.0 + gx**2 + gy**2, 2.0, path)  # large offset: normalisation must not underflow
    assert_png(path)


def test_plot_latent_with_prior(tmp_path: Path, rng: np.random.Generator) -> None:
    means = rng.normal(size=(6, 3)) * 2
    mu = means[rng.integers(0, 6, 500)] + 0.2 * rng.normal(size=(500, 3))  # D = 3: first two drawn
    labels = rng.integers(0, 8, 500)
    weights = rng.dirichlet(np.ones(6))
    active = np.array([True, True, True, True, False, False])
    seen = []

    def log_density(z: np.ndarray) -> np.ndarray:
        seen.append(z.shape)
        d2 = ((z[:, None, :] - means[None, :, :2]) ** 2).sum(-1)  # (K, M)
        return np.log((weights * np.exp(-0.5 * d2)).sum(-1) + 1e-300)

    path = tmp_path / "latent.png"
    plot_latent(mu, labels, path, means=means, weights=weights, active=active, log_density=log_density)
    assert_png(path)
    assert seen and seen[0][1] == 2


def test_plot_latent_points_only(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "latent_plain.png"
    plot_latent(rng.normal(size=(100, 2)), np.zeros(100, dtype=int), path)
    assert_png(path)
