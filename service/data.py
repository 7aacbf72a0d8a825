"""2D point data: the four toy generators of SPEC §6.1 and bring-your-own Parquet points.

Every random draw comes from the ``torch.Generator`` passed in (never numpy's global RNG), so a
seeded generator reproduces a batch bit for bit. Tensors live on ``generator.device``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .config import TOY_DATASETS, ConfigError, DataConfig

# Half-width L of the evaluation square [-L, L]^2 (SPEC §6.1).
DEFAULT_EVAL_RANGE: dict[str, float] = {"8gaussians": 2.0, "2spirals": 4.0, "checkerboard": 4.0, "rings": 4.0}

# Parquet sources without data.eval_range get L = PARQUET_MARGIN * max |coordinate|.
PARQUET_MARGIN = 1.1

_S = 1.0 / math.sqrt(2.0)
# Order of the official code; the label of a point is its row here.
_GAUSSIAN_CENTERS = ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0), (_S, _S), (-_S, _S), (_S, -_S), (-_S, -_S))
_RING_RADII = (3.0, 2.25, 1.5, 0.75)  # label = index in this tuple

Sampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------------------------
# Toy generators (SPEC §6.1)
# --------------------------------------------------------------------------------------------

def _rand(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=g, device=g.device)


def _randn(shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g, device=g.device)


def _eight_gaussians(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Uniform mode among 8 unit directions, x2, + N(0, 0.02^2), /1.414. Labels: mode 0..7."""
    centers = 2.0 * torch.tensor(_GAUSSIAN_CENTERS, device=g.device)  # (8, 2)
    labels = torch.randint(len(_GAUSSIAN_CENTERS), (n,), generator=g, device=g.device)
    x = (centers[labels] + 0.02 * _randn((n, 2), g)) / 1.414  # 1.414, not sqrt(2): reference
    return x, labels


def _two_spirals(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two interleaved spiral arms, arm 2 = -arm 1; /3 then + 0.1 N(0, I). Labels: arm 0/1.

    The reference draws N/2 radii; for odd ``n`` one extra radius is drawn and the last point
    of arm 2 dropped, so exactly ``n`` points come back.
    """
    half = (n + 1) // 2
    r = torch.sqrt(_rand((half,), g)) * 3.0 * math.pi  # 540 degrees in radians
    arm = torch.stack([-torch.cos(r) * r + 0.5 * _rand((half,), g),
                       torch.sin(r) * r + 0.5 * _rand((half,), g)], dim=1)  # (half, 2)
    x = torch.cat([arm, -arm])[:n] / 3.0
    x = x + 0.1 * _randn((n, 2), g)
    labels = torch.cat([torch.zeros(half, dtype=torch.long, device=g.device),
                        torch.ones(half, dtype=torch.long, device=g.device)])[:n]
    return x, labels


def _checkerboard(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """8 black cells of a 4x4 board on [-4, 4)^2. Labels: black-cell index 0..7.

    ``x2 = U - 2 Bernoulli + (floor(x1) mod 2)`` makes floor(x2) have the parity of floor(x1),
    so the cell (col, row) = floor(x) + 2 in {0..3}^2 has an even sum; index = 2 col + row // 2.
    """
    x1 = 4.0 * _rand((n,), g) - 2.0
    bernoulli = torch.randint(0, 2, (n,), generator=g, device=g.device).float()
    x2 = _rand((n,), g) - 2.0 * bernoulli + torch.remainder(torch.floor(x1), 2.0)
    col = (torch.floor(x1) + 2).long().clamp(0, 3)
    row = (torch.floor(x2) + 2).long().clamp(0, 3)
    return 2.0 * torch.stack([x1, x2], dim=1), 2 * col + row // 2


def _rings(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Four concentric rings (radii 3, 2.25, 1.5, 0.75) + N(0, 0.08^2). Labels: ring 0..3.

    As in the reference: n // 4 evenly spaced angles on each of the three outer rings, the rest
    on the inner one, then n points resampled uniformly with replacement.
    """
    counts = [n // 4] * 3 + [n - 3 * (n // 4)]
    points, labels = [], []
    for ring, (radius, count) in enumerate(zip(_RING_RADII, counts)):
        angle = torch.arange(count, device=g.device) * (2.0 * math.pi / max(count, 1))
        points.append(radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1))
        labels.append(torch.full((count,), ring, dtype=torch.long, device=g.device))
    idx = torch.randint(max(n, 1), (n,), generator=g, device=g.device)
    x = torch.cat(points)[idx] + 0.08 * _randn((n, 2), g)
    return x, torch.cat(labels)[idx]


_TOY: dict[str, Sampler] = {
    "8gaussians": _eight_gaussians,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "rings": _rings,
}


def sample_toy(name: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw ``n`` fresh points of toy dataset ``name`` (SPEC §6.1).

    Returns x: (n, 2) float32 and labels: (n,) int64 (mode / arm / black cell / ring index).
    """
    if name not in _TOY:
        raise ConfigError(f"data.dataset: {name!r} is not one of {list(TOY_DATASETS)}")
    x, labels = _TOY[name](n, generator)
    return x.float(), labels


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PointSource:
    """A 2D point distribution: ``sample(n, generator) -> (x (n, 2), labels (n,))``.

    ``eval_range`` is L, the half-width of the evaluation square ``[-L, L]^2`` (SPEC §6.5).
    ``labelled``: whether the labels name data modes (toy generators, a Parquet ``label`` column);
    unlabelled sources give zeros, and mode purity is not reported for them.
    """

    name: str
    eval_range: float
    sampler: Sampler
    dim: int = 2
    labelled: bool = True

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.sampler(n, generator)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one data point (without the batch dimension)."""
        return (self.dim,)


def make_source(cfg: DataConfig, split: str = "train") -> PointSource:
    """The data source of ``cfg``: a toy generator, resampled Parquet points, or an image split.

    Parquet sources sample the file's rows uniformly with replacement; their L is
    ``cfg.eval_range`` or, when unset, ``1.1 * max |coordinate|`` of the file (a 10% margin so
    that the outermost points are not on the border of the gnELBO grid and histograms).
    Image datasets (SPEC §7.1) give an epoch-based ``images.ImageSource`` of ``split``
    ("train" or "test"); 2D sources have no splits (every draw is fresh).
    """
    if cfg.is_image:
        from .images import make_image_source

        return make_image_source(cfg, split)  # type: ignore[return-value]
    if cfg.dataset != "parquet":
        eval_range = cfg.eval_range or DEFAULT_EVAL_RANGE[cfg.dataset]
        return PointSource(cfg.dataset, eval_range, partial(sample_toy, cfg.dataset))
    assert cfg.path is not None  # DataConfig guarantees it for "parquet"
    points, labels, labelled = load_points_parquet(cfg.path)
    eval_range = cfg.eval_range or PARQUET_MARGIN * float(points.abs().max())
    # partial of a module-level function (not a closure) keeps the source picklable
    return PointSource(f"parquet:{os.path.basename(cfg.path)}", eval_range, partial(_resample, points, labels),
                       labelled=labelled)


def _resample(points: Tensor, labels: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` rows of ``points`` (N, 2) / ``labels`` (N,), uniformly with replacement."""
    idx = torch.randint(points.shape[0], (n,), generator=g, device=g.device).cpu()
    return points[idx].to(g.device), labels[idx].to(g.device)


# --------------------------------------------------------------------------------------------
# Parquet I/O
# --------------------------------------------------------------------------------------------

def write_points_parquet(path: str | os.PathLike, x: Tensor | np.ndarray,
                         labels: Tensor | np.ndarray | None = None) -> None:
    """Write points x: (N, 2) (and optional integer labels: (N,)) as columns x, y[, label]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float32)
    columns = {"x": x[:, 0], "y": x[:, 1]}
    if labels is not None:
        labels = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        columns["label"] = labels.astype(np.int64)
    pq.write_table(pa.table(columns), str(path))


def read_parquet(path: str, field: str) -> Any:
    """The ``pyarrow.Table`` of ``path``; a missing or unreadable file raises ``ConfigError("<field>: <file>: ...")``."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise ConfigError(f"{field}: {path}: file not found")
    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt or non-Parquet files
        raise ConfigError(f"{field}: {path}: not a readable Parquet file ({e})") from None


def load_points_parquet(path: str) -> tuple[Tensor, Tensor, bool]:
    """Read and validate a points file: x (N, 2) float32, labels (N,) int64 (0 when absent), and
    whether the file has a ``label`` column.

    Every problem raises ``ConfigError("data.path: <file>: <problem>")``.
    """
    def fail(problem: str) -> ConfigError:
        return ConfigError(f"data.path: {path}: {problem}")

    table = read_parquet(path, "data.path")
    found = table.column_names
    for name in ("x", "y"):
        if name not in found:
            raise fail(f"column {name!r} missing; columns found: {found} (need float columns x, y)")
    if table.num_rows == 0:
        raise fail("file has no rows")
    x = np.stack([_float_column(table, name, fail) for name in ("x", "y")], axis=1)
    labelled = "label" in found
    labels = _label_column(table, fail) if labelled else np.zeros(len(x), dtype=np.int64)
    return torch.from_numpy(x), torch.from_numpy(labels), labelled


def _float_column(table, name: str, fail: Callable[[str], ConfigError]) -> np.ndarray:
    """Column ``name`` as float32, rejecting non-numeric types, nulls, NaN and inf."""
    import pyarrow.types as pat

    column = table.column(name)
    if not (pat.is_floating(column.type) or pat.is_integer(column.type)):
        raise fail(f"column {name!r} has non-numeric type {column.type}; expected float")
    if column.null_count:
        raise fail(f"column {name!r} has {column.null_count} null values")
    values = column.to_numpy().astype(np.float32)
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise fail(f"column {name!r} has {bad} NaN/inf values")
    return values


def _label_column(table, fail: Callable[[str], ConfigError]) -> np.ndarray:
    """The optional ``label`` column as int64; it must have an integer type and no nulls."""
    import pyarrow.types as pat

    column = table.column("label")
    if not pat.is_integer(column.type):
        raise fail(f"column 'label' has type {column.type}; expected an integer type")
    if column.null_count:
        raise fail(f"column 'label' has {column.null_count} null values")
    return column.to_numpy().astype(np.int64)
