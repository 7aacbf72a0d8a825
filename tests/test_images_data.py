"""Image data (SPEC §7.1): IDX reader, Debian Fashion-MNIST, offline errors, epoch sharding, Parquet images."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from service.config import ConfigError, DataConfig
from service.data import make_source
from service.images import (DEBIAN_FASHION_MNIST, ImageSource, load_images_parquet, read_idx,
                            write_images_parquet)

DEBIAN_FILES = [Path(DEBIAN_FASHION_MNIST) / f"{s}.gz" for s in
                ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
needs_debian_fmnist = pytest.mark.skipif(
    not all(p.is_file() for p in DEBIAN_FILES),
    reason=f"Debian package dataset-fashion-mnist not installed ({DEBIAN_FASHION_MNIST} missing); `make setup` installs it")


def _idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def _write_idx_pair(folder: Path, stem: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in ((f"{stem}-images-idx3-ubyte", images), (f"{stem}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(a)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


# --------------------------------------------------------------------------------------------
# IDX and the datasets
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips(tmp_path, gz):
    a = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    path.write_bytes(gzip.compress(_idx_bytes(a)) if gz else _idx_bytes(a))
    np.testing.assert_array_equal(read_idx(path), a)


def test_read_idx_rejects_truncated_and_bad_magic(tmp_path):
    a = np.zeros((4, 2, 2), dtype=np.uint8)
    (tmp_path / "short").write_bytes(_idx_bytes(a)[:-3])
    with pytest.raises(ConfigError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"\x01\x02" + _idx_bytes(a)[2:])
    with pytest.raises(ConfigError, match="bad magic"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("layout", ["root", "torchvision"])
def test_mnist_from_idx_files_in_root(tmp_path, layout):
    rng = np.random.default_rng(1)
    train, test = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    folder = tmp_path if layout == "root" else tmp_path / "MNIST" / "raw"
    _write_idx_pair(folder, "train", train, np.arange(12) % 10, gz=layout == "root")
    _write_idx_pair(folder, "t10k", test, np.arange(4), gz=False)
    src = make_source(DataConfig(dataset="mnist", root=str(tmp_path), subset=10))
    assert isinstance(src, ImageSource) and src.shape == (1, 28, 28) and len(src) == 10  # subset = first 10
    np.testing.assert_array_equal(src.images[:, 0].numpy(), train[:10])
    x, labels = src.get(torch.arange(3))
    assert x.dtype == torch.float32 and torch.allclose(x[:, 0], torch.as_tensor(train[:3] / 255.0, dtype=torch.float32))
    assert labels.tolist() == [0, 1, 2]
    assert len(make_source(DataConfig(dataset="mnist", root=str(tmp_path), subset=10), "test")) == 4  # no subset


def test_offline_without_files_names_the_expected_files(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root: mnist train split not found: expected "
                                          r"\['train-images-idx3-ubyte', 'train-labels-idx1-ubyte'\]"):
        make_source(DataConfig(dataset="mnist", root=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"data.root: cifar10 not found: expected \['data_batch_1'.*"
                                          r"cifar-10-batches-py.*data.download=true"):
        make_source(DataConfig(dataset="cifar10", root=str(tmp_path)))


@needs_debian_fmnist
def test_debian_fashion_mnist_is_the_offline_default(tmp_path):
    train = make_source(DataConfig(dataset="fmnist", root=str(tmp_path)))  # empty root: falls back to Debian
    test = make_source(DataConfig(dataset="fmnist", root=str(tmp_path)), "test")
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published first labels
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert abs(float(train.images.float().mean()) / 255 - 0.2860) < 1e-3  # the known pixel mean


# --------------------------------------------------------------------------------------------
# Epoch-based, sharded, seeded batches
# --------------------------------------------------------------------------------------------

def _toy_source(n: int = 100) -> ImageSource:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageSource("toy", images, torch.arange(n))


def test_ranks_see_disjoint_shards_and_each_epoch_is_a_permutation():
    src, batch = _toy_source(100), 20
    assert src.steps_per_epoch(batch) == 5
    for epoch in range(2):
        seen = []
        for step in range(5):
            it = epoch * 5 + step
            shards = [src.batch_indices(it, batch, rank, 2, seed=3) for rank in range(2)]
            assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
            # the union of the ranks' shards is the single-worker batch: resuming N -> M workers keeps the order
            assert torch.equal(torch.cat(shards), src.batch_indices(it, batch, 0, 1, seed=3))
            seen += torch.cat(shards).tolist()
        assert sorted(seen) == list(range(100))  # every image exactly once per epoch
    e0, e1 = src.permutation(0, seed=3), src.permutation(1, seed=3)
    assert not torch.equal(e0, e1)  # reshuffled every epoch
    assert torch.equal(e0, _toy_source(100).permutation(0, seed=3))  # seeded
    assert not torch.equal(e0, src.permutation(0, seed=4))


def test_batch_values_match_indices_and_last_partial_batch_is_dropped():
    src = _toy_source(50)
    x, labels = src.batch_at(2, 16, rank=1, world_size=2, seed=0)
    assert x.shape == (8, 1, 2, 2)
    assert torch.allclose(x[:, 0, 0, 0] * 255, labels.float())
    assert src.steps_per_epoch(16) == 3  # 48 of 50 images used per epoch
    with pytest.raises(ConfigError, match="data.batch_size: 64 is larger than the 50 training images"):
        src.steps_per_epoch(64)


def test_sample_draws_distinct_images():
    x, labels = _toy_source(30).sample(30, torch.Generator().manual_seed(0))
    assert sorted(labels.tolist()) == list(range(30))


# --------------------------------------------------------------------------------------------
# Bring-your-own Parquet images
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("png", [False, True])
def test_parquet_images_round_trip(tmp_path, channels, png):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, channels, 8, 12), dtype=np.uint8)  # NCHW, non-square
    labels = np.arange(6) % 3
    path = tmp_path / "imgs.parquet"
    write_images_parquet(path, images, labels, png=png)
    x, lab = load_images_parquet(str(path))
    assert x.dtype == torch.uint8 and x.shape == (6, channels, 8, 12)
    np.testing.assert_array_equal(x.numpy(), images)
    assert lab.tolist() == labels.tolist()
    src = make_source(DataConfig(dataset="parquet_images", path=str(path)))
    assert src.shape == (channels, 8, 12) and len(make_source(DataConfig(dataset="parquet_images", path=str(path)),
                                                              "test")) == 6


def test_parquet_variable_lists_without_labels(tmp_path):
    rows = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]  # plain (variable-size) nested lists, (H, W)
    pq.write_table(pa.table({"image": pa.array(rows, type=pa.list_(pa.list_(pa.uint8())))}), tmp_path / "a.parquet")
    x, labels = load_images_parquet(str(tmp_path / "a.parquet"))
    assert x.shape == (2, 1, 2, 2) and x[1, 0].tolist() == [[5, 6], [7, 8]] and labels.tolist() == [0, 0]


@pytest.mark.parametrize("table, problem", [
    ({"pixels": pa.array([[1, 2]], type=pa.list_(pa.uint8()))}, r"column 'image' missing; columns found: \['pixels'\]"),
    ({"image": pa.array([[[0.5, 0.1]]], type=pa.list_(pa.list_(pa.float32())))},
     r"column 'image' has pixel type float; expected uint8"),
    ({"image": pa.array([[[1, 2], [3, 4]], [[1, 2, 3], [4, 5, 6]]], type=pa.list_(pa.list_(pa.uint8())))},
     r"column 'image' has ragged shapes: lists at nesting level 1 have lengths from 2 to 3"),
    ({"image": pa.array(["a", "b"])}, r"column 'image' has type string; expected nested lists of uint8"),
    ({"image": pa.array([b"not a png"])}, r"column 'image': row 0 is not a decodable image"),
    ({"image": pa.array([[[1]]], type=pa.list_(pa.list_(pa.uint8()))), "label": pa.array([0.5])},
     r"column 'label' has type double; expected an integer type"),
    ({"image": pa.array([[[[1, 2]]]], type=pa.list_(pa.list_(pa.list_(pa.uint8()))))},
     r"column 'image': images of shape \(1, 1, 2\); expected \(H, W\), \(H, W, 1\) or \(H, W, 3\)"),
])
def test_malformed_parquet_images_name_the_problem(tmp_path, table, problem):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(ConfigError, match=rf"data.path: {path}: {problem}"):
        load_images_parquet(str(path))


def test_ragged_png_sizes_are_rejected(tmp_path):
    a = np.zeros((1, 4, 4), dtype=np.uint8)
    write_images_parquet(tmp_path / "a.parquet", a, png=True)
    write_images_parquet(tmp_path / "b.parquet", np.zeros((1, 5, 4), dtype=np.uint8), png=True)
    blobs = pq.read_table(tmp_path / "a.parquet").column("image").to_pylist() + \
        pq.read_table(tmp_path / "b.parquet").column("image").to_pylist()
    pq.write_table(pa.table({"image": pa.array(blobs, type=pa.binary())}), tmp_path / "c.parquet")
    with pytest.raises(ConfigError, match=r"ragged shapes: row 0 is \(4, 4, 1\) \(H, W, C\), row 1 is \(5, 4, 1\)"):
        load_images_parquet(str(tmp_path / "c.parquet"))


def test_data_path_on_an_image_preset_selects_parquet_images(tmp_path):
    cfg = DataConfig(dataset="fmnist", path=str(tmp_path / "x.parquet"))
    assert cfg.dataset == "parquet_images" and DataConfig(path="p.parquet").dataset == "parquet"
    with pytest.raises(ConfigError, match="data.path: required when data.dataset is 'parquet_images'"):
        DataConfig(dataset="parquet_images")
    with pytest.raises(ConfigError, match=r"data.subset: 0 is out of range"):
        DataConfig(dataset="fmnist", subset=0)
