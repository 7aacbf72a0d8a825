"""Toy generators (SPEC §6.1), point sources and Parquet validation."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from service.config import TOY_DATASETS, ConfigError, DataConfig
from service.data import DEFAULT_EVAL_RANGE, make_source, sample_toy, write_points_parquet

NUM_LABELS = {"8gaussians": 8, "2spirals": 2, "checkerboard": 8, "rings": 4}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", TOY_DATASETS)
@pytest.mark.parametrize("n", [1, 7, 512])
def test_shapes_dtypes_labels(name: str, n: int) -> None:
    x, labels = sample_toy(name, n, gen())
    assert x.shape == (n, 2) and x.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < NUM_LABELS[name]


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_all_labels_appear(name: str) -> None:
    _, labels = sample_toy(name, 4000, gen())
    assert set(labels.tolist()) == set(range(NUM_LABELS[name]))


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_deterministic_given_generator(name: str) -> None:
    a = sample_toy(name, 300, gen(3))
    b = sample_toy(name, 300, gen(3))
    c = sample_toy(name, 300, gen(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError, match="data.dataset"):
        sample_toy("moons", 10, gen())


def test_eight_gaussians_centres_and_spread() -> None:
    x, labels = sample_toy("8gaussians", 8000, gen())
    s = 1 / math.sqrt(2)
    dirs = torch.tensor([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (-s, s), (s, -s), (-s, -s)])
    centres = 2 * dirs / 1.414
    residual = x - centres[labels]
    assert residual.mean(0).abs().max() < 0.002
    assert residual.std(0).numpy() == pytest.approx([0.02 / 1.414] * 2, rel=0.05)


def test_two_spirals_arms_are_mirror_images() -> None:
    x, labels = sample_toy("2spirals", 6000, gen())
    assert (labels == 0).sum() == (labels == 1).sum() == 3000
    # arm 1 is the negation of arm 0 before the noise: equal spread, opposite means
    a, b = x[labels == 0], x[labels == 1]
    assert a.mean(0).numpy() == pytest.approx((-b.mean(0)).numpy(), abs=0.02)
    assert x.abs().max() < 4.0  # inside the evaluation square (L = 4)


def test_two_spirals_odd_n() -> None:
    x, labels = sample_toy("2spirals", 9, gen())
    assert x.shape == (9, 2) and (labels == 0).sum() == 5 and (labels == 1).sum() == 4


def test_rings_radii() -> None:
    x, labels = sample_toy("rings", 8000, gen())
    radius = x.norm(dim=1)
    for ring, expected in enumerate((3.0, 2.25, 1.5, 0.75)):
        r = radius[labels == ring]
        assert r.mean().item() == pytest.approx(expected, abs=0.02)
        assert r.std().item() < 0.12  # noise std 0.08 per coordinate


def test_checkerboard_black_cells() -> None:
    x, labels = sample_toy("checkerboard", 5000, gen())
    cell = torch.floor(x / 2) + 2  # (col, row) in {0..3}^2 of the 2x2 cells on [-4, 4)^2
    assert x.min() >= -4 and x.max() < 4
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()  # black cells only
    assert torch.equal(labels, (2 * cell[:, 0] + cell[:, 1] // 2).long())


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_source(name: str) -> None:
    source = make_source(DataConfig(dataset=name))
    assert source.dim == 2 and source.name == name
    assert source.eval_range == DEFAULT_EVAL_RANGE[name] == (2.0 if name == "8gaussians" else 4.0)
    x, labels = source.sample(64, gen(1))
    assert torch.equal(x, sample_toy(name, 64, gen(1))[0])
    assert make_source(DataConfig(dataset=name, eval_range=5.0)).eval_range == 5.0


def test_parquet_round_trip(tmp_path) -> None:
    x, labels = sample_toy("rings", 200, gen())
    path = tmp_path / "points.parquet"
    write_points_parquet(path, x, labels)
    source = make_source(DataConfig(dataset="parquet", path=str(path)))
    assert source.eval_range == pytest.approx(1.1 * x.abs().max().item(), rel=1e-6)
    xs, ls = source.sample(1000, gen())
    assert xs.shape == (1000, 2) and xs.dtype == torch.float32 and ls.dtype == torch.int64
    rows = {tuple(p) for p in torch.cat([x, labels[:, None].float()], 1).tolist()}
    assert {tuple(p) for p in torch.cat([xs, ls[:, None].float()], 1).tolist()} <= rows
    again = source.sample(1000, gen())
    assert torch.equal(xs, again[0])
    assert make_source(DataConfig(dataset="parquet", path=str(path), eval_range=3.0)).eval_range == 3.0


def test_parquet_without_labels(tmp_path) -> None:
    path = tmp_path / "points.parquet"
    write_points_parquet(path, np.array([[0.5, -1.0], [2.0, 0.0]]))
    source = make_source(DataConfig(dataset="parquet", path=str(path)))
    _, labels = source.sample(10, gen())
    assert (labels == 0).all() and source.eval_range == pytest.approx(2.2)


def _write(tmp_path, columns: dict) -> str:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.mark.parametrize("columns, match", [
    ({"x": [0.0, 1.0], "z": [0.0, 1.0]}, r"column 'y' missing; columns found: \['x', 'z'\]"),
    ({"x": ["a", "b"], "y": [0.0, 1.0]}, "column 'x' has non-numeric type"),
    ({"x": [0.0, 1.0], "y": [0.0, float("nan")]}, "column 'y' has 1 NaN/inf"),
    ({"x": [float("inf"), 1.0], "y": [0.0, 1.0]}, "column 'x' has 1 NaN/inf"),
    ({"x": [0.0, None], "y": [0.0, 1.0]}, "column 'x' has 1 null"),
    ({"x": pa.array([], pa.float32()), "y": pa.array([], pa.float32())}, "no rows"),
    ({"x": [0.0, 1.0], "y": [0.0, 1.0], "label": [0.5, 1.0]}, "column 'label' has type double"),
])
def test_parquet_malformed(tmp_path, columns: dict, match: str) -> None:
    path = _write(tmp_path, columns)
    with pytest.raises(ConfigError, match=match) as info:
        make_source(DataConfig(dataset="parquet", path=path))
    assert str(info.value).startswith(f"data.path: {path}:")


def test_parquet_missing_and_unreadable(tmp_path) -> None:
    missing = tmp_path / "nope.parquet"
    with pytest.raises(ConfigError, match=r"data.path: .*nope.parquet: file not found"):
        make_source(DataConfig(dataset="parquet", path=str(missing)))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(ConfigError, match=r"data.path: .*garbage.parquet: not a readable Parquet file"):
        make_source(DataConfig(dataset="parquet", path=str(garbage)))
