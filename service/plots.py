"""Per-run 2D figures of SPEC §6.6, written as PNG files (matplotlib, Agg backend).

Each function takes numpy arrays, writes one PNG to ``path`` and closes its figure, so that a
long sweep does not accumulate open figures.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # headless workers: no display, and must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PathLike = str | os.PathLike
LogDensity = Callable[[np.ndarray], np.ndarray]

_DPI = 100
_CONTOUR_GRID = 200  # points per side of the prior-density grid


def _save(fig: plt.Figure, path: PathLike) -> None:
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)


def _square(ax: plt.Axes, L: float, title: str) -> None:
    ax.set_xlim(-L, L)
    ax.set_ylim(-L, L)
    ax.set_aspect("equal")
    ax.set_title(title)


def plot_samples(real: np.ndarray, fake: np.ndarray, L: float, path: PathLike,
                 displaced: list[tuple[int, list[float], list[float], float]] | None = None) -> None:
    """Real (N, 2) and generated (N', 2) points side by side on ``[-L, L]^2`` (SPEC §6.6).

    ``displaced``: ``(data mode, data centre, samples' mean, offset in spreads)`` of each data mode decoded
    off its place (``service.metrics.modes.Placement.displaced``): an arrow from the centre to the mean on
    the generated side, labelled with the mode and its offset.
    """
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, points, title, colour in ((axes[0], real, "real", "tab:blue"), (axes[1], fake, "generated", "tab:red")):
        points = np.asarray(points)
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.6, color=colour, linewidths=0)
        _square(ax, L, f"{title} ({len(points)})")
    for k, centre, mean, offset in displaced or []:
        axes[1].annotate("", xy=mean[:2], xytext=centre[:2], arrowprops={"arrowstyle": "->", "color": "black"})
        axes[1].plot(*centre[:2], marker="x", color="black", markersize=6)
        axes[1].annotate(f"mode {k}: {offset:.0f} spreads off", xy=mean[:2], fontsize=7, xytext=(4, 4),
                         textcoords="offset points")
    if displaced:
        axes[1].set_title(f"generated: {len(displaced)} mode{'s' if len(displaced) > 1 else ''} off place")
    _save(fig, path)


def plot_density(energy_grid: np.ndarray, L: float, path: PathLike) -> None:
    """Image of ``exp(-W)``, normalised to sum 1, over ``[-L, L]^2`` (SPEC §6.6).

    energy_grid: (G, G) energies laid out as ``metrics.density.grid_points`` (row i = y_i,
    column j = x_j), e.g. the second output of ``gnelbo_with_grid``.
    """
    w = np.asarray(energy_grid, dtype=np.float64)
    density = np.exp(-(w - np.nanmin(w)))  # shift by the minimum so the largest term is exp(0)
    density /= np.nansum(density)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(density, origin="lower", extent=(-L, L, -L, L), cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    _square(ax, L, "exp(-W), normalised")
    _save(fig, path)


def _latent_bounds(points: np.ndarray, margin: float = 0.15) -> tuple[float, float, float, float]:
    """(x_lo, x_hi, y_lo, y_hi) covering points (K, 2) plus ``margin`` of their span."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    pad = margin * np.maximum(hi - lo, 1e-3)
    return lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1]


def _prior_contours(ax: plt.Axes, log_density: LogDensity, bounds: tuple[float, float, float, float]) -> None:
    """Contours of ``exp(log_density)`` on a grid over ``bounds``."""
    xs = np.linspace(bounds[0], bounds[1], _CONTOUR_GRID)
    ys = np.linspace(bounds[2], bounds[3], _CONTOUR_GRID)
    gx, gy = np.meshgrid(xs, ys)  # (K, K) each, rows vary in y
    log_p = np.asarray(log_density(np.stack([gx.ravel(), gy.ravel()], axis=1)), dtype=np.float64)
    density = np.exp(log_p - log_p.max()).reshape(gx.shape)  # relative density, max 1
    ax.contour(gx, gy, density, levels=8, colors="k", linewidths=0.6, alpha=0.6)


def _components(ax: plt.Axes, means: np.ndarray, weights: np.ndarray | None, active: np.ndarray | None,
                majority: np.ndarray | None = None, norm: Any = None) -> None:
    """Component means as markers with area proportional to weight; inactive ones as grey x.

    With ``majority`` (the data mode each component's samples mostly decode to) the marker is
    filled with that mode's colour (the colour scale of the points), edged in red.
    """
    means = np.asarray(means)[:, :2]
    m = len(means)
    weights = np.full(m, 1.0 / m) if weights is None else np.asarray(weights, dtype=np.float64)
    active = np.ones(m, dtype=bool) if active is None else np.asarray(active, dtype=bool)
    sizes = 20.0 + 600.0 * weights / max(weights.max(), 1e-12)
    if majority is not None:
        face = plt.get_cmap("tab10")(norm(np.asarray(majority)[active]))
        ax.scatter(means[active, 0], means[active, 1], s=sizes[active], c=face, edgecolors="red",
                   linewidths=1.2, alpha=0.8, label="component (active; fill: its majority mode)")
    else:
        ax.scatter(means[active, 0], means[active, 1], s=sizes[active], facecolors="none",
                   edgecolors="red", linewidths=1.2, label="component (active)")
    if (~active).any():
        ax.scatter(means[~active, 0], means[~active, 1], s=40, marker="x", color="grey",
                   linewidths=1.2, label="component (inactive)")


def plot_latent(mu: np.ndarray, labels: np.ndarray, path: PathLike, *, means: np.ndarray | None = None,
                weights: np.ndarray | None = None, active: np.ndarray | None = None,
                log_density: LogDensity | None = None, title: str = "latent space",
                axis_labels: tuple[str, str] = ("z_1", "z_2"), majority: np.ndarray | None = None) -> None:
    """Latent space (SPEC §6.6): posterior means by label, prior components and density contours.

    mu: (N, D) posterior means of real points, labels: (N,) integer colours; only the first two
    latent dimensions are drawn when D > 2. means: (M, D) component means, weights: (M,) mixture
    weights (marker area), active: (M,) bool (inactive components drawn as grey x). log_density
    maps (K, 2) points to (K,) log prior densities; for D > 2 the caller passes the density of
    the first two dimensions (a marginal), since the contours live in that plane. ``title`` and
    ``axis_labels`` name the plane (e.g. a t-SNE embedding instead of latent dimensions).
    majority: (M,) data-mode label of each component's samples (mode purity), drawn as the fill.
    """
    mu = np.asarray(mu)[:, :2]
    labels = np.asarray(labels)
    covered = mu if means is None else np.concatenate([mu, np.asarray(means)[:, :2]])
    bounds = _latent_bounds(covered)
    fig, ax = plt.subplots(figsize=(5, 5))
    if log_density is not None:
        _prior_contours(ax, log_density, bounds)
    scatter = ax.scatter(mu[:, 0], mu[:, 1], c=labels, s=3, cmap="tab10", alpha=0.7, linewidths=0)
    if len(np.unique(labels)) > 1:
        fig.colorbar(scatter, ax=ax, fraction=0.046, pad=0.04, label="label")
    if means is not None:
        _components(ax, means, weights, active, majority, scatter.norm)
        legend = ax.legend(loc="upper right", fontsize=7)
        for handle in legend.legend_handles:  # one marker size in the legend, whatever the weights
            handle.set_sizes([40])
    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[2], bounds[3])
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    _save(fig, path)
