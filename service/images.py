"""Image data (SPEC §7.1): (F)MNIST and CIFAR-10, the Debian Fashion-MNIST, bring-your-own Parquet.

Pixels come out as float ``[0, 1]`` (``ToTensor()`` semantics), shape ``(C, H, W)``; images are
held as uint8 and converted per batch (CIFAR-10's training set is 150 MB as uint8, 600 MB as
float).

Where the files come from:

- ``fmnist`` / ``mnist``: IDX files (``train-images-idx3-ubyte[.gz]`` and friends), looked up in
  ``data.root``, in torchvision's layout ``<root>/{FashionMNIST,MNIST}/raw/``, and for
  Fashion-MNIST in the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/
  fashion-mnist``, the offline default). With ``data.download=true`` torchvision downloads the
  missing files into ``<root>``; otherwise a missing file is a ``ConfigError`` that names the
  expected files and folders.
- ``cifar10``: torchvision's ``<root>/cifar-10-batches-py`` (downloaded only with
  ``data.download=true``).
- ``parquet_images``: a Parquet file (``data.path``, optional ``data.test_path``) with a column
  ``image`` holding uint8 pixels as nested lists / fixed-size lists, ``(H, W)`` or ``(H, W, C)``,
  or PNG/JPEG bytes, and an optional integer column ``label``. Every problem of the file is a
  ``ConfigError`` that names the column and the problem.

Batches (``ImageSource.batch_at``) are epoch-based: epoch ``e`` is a permutation of the training
images seeded by ``(seed, e)``; iteration ``i`` is step ``i % S`` of epoch ``i // S`` with
``S = N // global_batch`` (the last partial batch is dropped so every rank gets equal batches);
rank ``r`` of ``W`` takes the ``r``-th slice of that global batch. The data order is therefore a
function of ``(seed, iteration, global batch)`` only: ranks see disjoint images, and a run
checkpointed with N workers continues with M workers on exactly the batches it would have seen.
"""

from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError, DataConfig

IMAGE_DATASETS = ("mnist", "fmnist", "cifar10", "parquet_images")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DEFAULT_ROOT_ENV = "INTROPRIOR_DATA"

# torchvision's folder name and the IDX file stems of each split
_IDX_NAMES = {"mnist": "MNIST", "fmnist": "FashionMNIST"}
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def default_root() -> Path:
    """``$INTROPRIOR_DATA``, else ``~/.cache/introprior/data`` (absolute: Ray workers run elsewhere)."""
    return Path(os.environ.get(DEFAULT_ROOT_ENV) or Path.home() / ".cache" / "introprior" / "data").resolve()


# --------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------

@dataclass(eq=False)
class ImageSource:
    """A split of an image dataset: uint8 ``images (N, C, H, W)`` and int64 ``labels (N,)``.

    ``sample(n, generator)`` draws ``n`` distinct images at random (pseudo-input initialisation,
    evaluation); ``batch_at`` gives the epoch-based training batches (module docstring).
    """

    name: str
    images: Tensor
    labels: Tensor
    _perm: tuple[int, int, Tensor] | None = field(default=None, repr=False)  # (seed, epoch, permutation)

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, (self.images.dtype, self.images.shape)
        assert self.labels.shape == (self.images.shape[0],)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one image, ``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    @property
    def eval_range(self) -> None:
        """Images have no evaluation square (the 2D metrics of SPEC §6.5 do not apply)."""
        return None

    def __len__(self) -> int:
        return self.images.shape[0]

    def get(self, idx: Tensor, device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
        """Images ``idx`` as float ``[0, 1]`` and their labels, on ``device`` (uint8 is what travels)."""
        images, labels = self.images[idx], self.labels[idx]
        if device is not None:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return images.float().div_(255.0), labels

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` images drawn without replacement (with replacement only when ``n > N``)."""
        g = generator.device
        if n <= len(self):
            idx = torch.randperm(len(self), generator=generator, device=g)[:n].cpu()
        else:
            idx = torch.randint(len(self), (n,), generator=generator, device=g).cpu()
        x, labels = self.get(idx)
        return x.to(g), labels.to(g)

    def steps_per_epoch(self, global_batch: int) -> int:
        """Iterations per epoch: ``N // global_batch`` (the last partial batch is dropped)."""
        if global_batch > len(self):
            raise ConfigError(f"data.batch_size: {global_batch} is larger than the {len(self)} training images "
                              f"of {self.name}; allowed [1, {len(self)}] (or raise data.subset)")
        return len(self) // global_batch

    def permutation(self, epoch: int, seed: int) -> Tensor:
        """The seeded shuffle of epoch ``epoch`` (cached: one ``randperm`` per epoch)."""
        if self._perm is None or self._perm[:2] != (seed, epoch):
            g = torch.Generator().manual_seed((seed + 1) * 1_000_003 + epoch)
            self._perm = (seed, epoch, torch.randperm(len(self), generator=g))
        return self._perm[2]

    def batch_indices(self, iteration: int, global_batch: int, rank: int = 0, world_size: int = 1,
                      seed: int = 0) -> Tensor:
        """Indices of rank ``rank``'s share of the global batch of ``iteration`` (module docstring)."""
        epoch, step = divmod(iteration, self.steps_per_epoch(global_batch))
        local = global_batch // world_size
        start = step * global_batch + rank * local
        return self.permutation(epoch, seed)[start:start + local]

    def batch_at(self, iteration: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
        """``(x (B, C, H, W) float in [0, 1], labels (B,))`` with ``B = global_batch // world_size``."""
        return self.get(self.batch_indices(iteration, global_batch, rank, world_size, seed), device)


def is_image_dataset(cfg: DataConfig) -> bool:
    return cfg.dataset in IMAGE_DATASETS


def make_image_source(cfg: DataConfig, split: str = "train") -> ImageSource:
    """The ``split`` ("train" or "test") of ``cfg.dataset``; ``data.subset`` keeps the first N train images."""
    if split not in ("train", "test"):
        raise ValueError(f"split: {split!r} is not one of ['train', 'test']")
    if cfg.dataset in _IDX_NAMES:
        images, labels = load_idx_dataset(cfg.dataset, split, cfg.root, download=cfg.download)
    elif cfg.dataset == "cifar10":
        images, labels = load_cifar10(split, cfg.root, download=cfg.download)
    elif cfg.dataset == "parquet_images":
        path = cfg.path if split == "train" or not cfg.test_path else cfg.test_path
        assert path is not None  # DataConfig requires data.path
        images, labels = load_images_parquet(path, field="data.path" if path == cfg.path else "data.test_path")
    else:
        raise ConfigError(f"data.dataset: {cfg.dataset!r} is not an image dataset; image datasets are "
                          f"{list(IMAGE_DATASETS)}")
    if split == "train" and cfg.subset:
        images, labels = images[:cfg.subset], labels[:cfg.subset]
    name = cfg.dataset if cfg.dataset != "parquet_images" else f"parquet:{os.path.basename(str(cfg.path))}"
    return ImageSource(name if split == "train" else f"{name}:test", images.contiguous(), labels)


# --------------------------------------------------------------------------------------------
# IDX files ((F)MNIST)
# --------------------------------------------------------------------------------------------

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip or not) into a uint8 array of the shape in its header.

    Header: two zero bytes, the type code (0x08 = uint8), the number of dimensions, then one
    big-endian uint32 per dimension.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ConfigError(f"data.root: {path} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ConfigError(f"data.root: {path} has IDX type code {data[2]:#04x}; only uint8 (0x08) is supported")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ConfigError(f"data.root: {path} holds {len(data) - offset} bytes of data; its header {dims} "
                          f"says {expected} (truncated download?)")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def idx_search_dirs(dataset: str, root: str | None) -> list[Path]:
    """Folders searched for the IDX files of ``dataset``, in order."""
    base = Path(root) if root else default_root()
    dirs = [base, base / _IDX_NAMES[dataset] / "raw"]
    if dataset == "fmnist":
        dirs.append(Path(DEBIAN_FASHION_MNIST))
    return dirs


def _find_idx(stem: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def load_idx_dataset(dataset: str, split: str, root: str | None, *, download: bool = False) -> tuple[Tensor, Tensor]:
    """(F)MNIST ``split`` as uint8 images ``(N, 1, 28, 28)`` and int64 labels ``(N,)``."""
    dirs = idx_search_dirs(dataset, root)
    stems = _IDX_FILES[split]
    found = [_find_idx(s, dirs) for s in stems]
    if None in found and download:
        _torchvision_download(dataset, dirs[0])
        found = [_find_idx(s, dirs) for s in stems]
    if None in found:
        hint = ("install the Debian package (apt-get install dataset-fashion-mnist), " if dataset == "fmnist" else "")
        raise ConfigError(
            f"data.root: {dataset} {split} split not found: expected {list(stems)} (optionally .gz) in one of "
            f"{[str(d) for d in dirs]}; {hint}place the files there, or set data.download=true on a machine "
            f"with internet access")
    images, labels = (read_idx(p) for p in found)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ConfigError(f"data.root: {found[0]} / {found[1]}: shapes {images.shape} and {labels.shape} do not "
                          f"match (N, H, W) images with N labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _torchvision_download(dataset: str, root: Path) -> None:
    """Let torchvision fetch both splits into ``root/<Name>/raw`` (needs internet)."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fmnist": torchvision.datasets.FashionMNIST}[dataset]
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        try:
            cls(str(root), train=train, download=True)
        except Exception as e:  # URLError, HTTPError, checksum failures
            raise ConfigError(f"data.download: downloading {dataset} into {root} failed ({e})") from None


# --------------------------------------------------------------------------------------------
# CIFAR-10 (torchvision)
# --------------------------------------------------------------------------------------------

def load_cifar10(split: str, root: str | None, *, download: bool = False) -> tuple[Tensor, Tensor]:
    """CIFAR-10 ``split`` as uint8 images ``(N, 3, 32, 32)`` and int64 labels, through torchvision."""
    base = Path(root) if root else default_root()
    folder = base / "cifar-10-batches-py"
    if not download and not all((folder / f).is_file() for f in _CIFAR_FILES):
        raise ConfigError(f"data.root: cifar10 not found: expected {list(_CIFAR_FILES)} in {folder} (the "
                          f"extracted cifar-10-python.tar.gz); place them there, or set data.download=true on a "
                          f"machine with internet access")
    import torchvision  # after the offline check: the import alone takes seconds

    if download:
        base.mkdir(parents=True, exist_ok=True)
    try:
        ds = torchvision.datasets.CIFAR10(str(base), train=split == "train", download=download)
    except Exception as e:  # URLError offline, RuntimeError for corrupt files
        raise ConfigError(f"data.root: loading cifar10 from {base} failed ({e})") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)  # (N, 32, 32, 3) -> NCHW
    return images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Bring-your-own Parquet images
# --------------------------------------------------------------------------------------------

def write_images_parquet(path: str | os.PathLike, images: Tensor | np.ndarray, labels: Tensor | np.ndarray | None = None,
                         *, png: bool = False) -> None:
    """Write uint8 images ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` (C in 1, 3) as column ``image``.

    ``png=False`` stores nested fixed-size lists ``(H, W[, C])``; ``png=True`` PNG bytes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if x.dtype != np.uint8:
        raise ValueError(f"images: dtype {x.dtype}; expected uint8")
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if png:
        from PIL import Image

        def encode(a: np.ndarray) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            return buf.getvalue()

        column = pa.array([encode(a) for a in x], type=pa.binary())
    else:
        column = pa.array(x.reshape(-1))
        for size in reversed(x.shape[1:]):
            column = pa.FixedSizeListArray.from_arrays(column, size)
    table = {"image": column}
    if labels is not None:
        lab = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        table["label"] = pa.array(lab.astype(np.int64))
    pq.write_table(pa.table(table), str(path))


def load_images_parquet(path: str, field: str = "data.path") -> tuple[Tensor, Tensor]:
    """Read and validate an image file: uint8 ``(N, C, H, W)`` and int64 labels (0 when absent).

    Every problem raises ``ConfigError("<field>: <file>: column 'image': <problem>")``.
    """
    import pyarrow.types as pat

    from .data import _label_column, read_parquet

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{field}: {path}: {problem}")

    table = read_parquet(path, field)
    if "image" not in table.column_names:
        raise fail(f"column 'image' missing; columns found: {table.column_names} (need uint8 pixel arrays or "
                   f"PNG bytes in a column named 'image')")
    if table.num_rows == 0:
        raise fail("file has no rows")
    column = table.column("image").combine_chunks()
    if column.null_count:
        raise fail(f"column 'image' has {column.null_count} null values")
    if pat.is_binary(column.type) or pat.is_large_binary(column.type):
        hwc = _decode_encoded(column, fail)
    else:
        hwc = _nested_uint8(column, fail)
    if hwc.ndim == 3:
        hwc = hwc[..., None]
    if hwc.ndim != 4 or hwc.shape[-1] not in (1, 3):
        raise fail(f"column 'image': images of shape {hwc.shape[1:]}; expected (H, W), (H, W, 1) or (H, W, 3)")
    labels = _label_column(table, fail) if "label" in table.column_names else np.zeros(len(hwc), dtype=np.int64)
    images = torch.from_numpy(hwc.transpose(0, 3, 1, 2).copy())  # copy: writable and contiguous
    return images, torch.from_numpy(labels)


def _nested_uint8(column, fail: Callable[[str], ConfigError]) -> np.ndarray:
    """Nested (fixed-size) lists of uint8 -> ``(N, d1, d2, ...)``; every level must be rectangular."""
    import pyarrow.compute as pc
    import pyarrow.types as pat

    dims, arr, level = [len(column)], column, 0
    while pat.is_list(arr.type) or pat.is_large_list(arr.type) or pat.is_fixed_size_list(arr.type):
        lengths = pc.list_value_length(arr)
        if arr.null_count or lengths.null_count:
            raise fail(f"column 'image' has null values at nesting level {level}")
        lo, hi = pc.min_max(lengths).values()
        if lo.as_py() != hi.as_py():
            raise fail(f"column 'image' has ragged shapes: lists at nesting level {level} have lengths from "
                       f"{lo.as_py()} to {hi.as_py()}; every image must have the same shape")
        dims.append(lo.as_py())
        arr, level = arr.flatten(), level + 1
    if level == 0:
        raise fail(f"column 'image' has type {column.type}; expected nested lists of uint8 (H, W[, C]) or "
                   f"PNG bytes")
    if not pat.is_uint8(arr.type):
        raise fail(f"column 'image' has pixel type {arr.type}; expected uint8 (values 0..255)")
    if arr.null_count:
        raise fail(f"column 'image' has {arr.null_count} null pixels")
    return arr.to_numpy(zero_copy_only=False).reshape(dims)


def _decode_encoded(column, fail: Callable[[str], ConfigError]) -> np.ndarray:
    """PNG (or any PIL-readable) bytes -> ``(N, H, W, C)``; one size and one channel count for all."""
    from PIL import Image

    out, shape = [], None
    for i, blob in enumerate(column.to_pylist()):
        try:
            img = Image.open(io.BytesIO(blob))
            img.load()
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ...
            raise fail(f"column 'image': row {i} is not a decodable image ({e})") from None
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB" if img.mode in ("RGBA", "P", "CMYK", "YCbCr") else "L")
        a = np.asarray(img, dtype=np.uint8)
        a = a[..., None] if a.ndim == 2 else a
        if shape is None:
            shape = a.shape
        elif a.shape != shape:
            raise fail(f"column 'image' has ragged shapes: row 0 is {shape} (H, W, C), row {i} is {a.shape}")
        out.append(a)
    return np.stack(out)
