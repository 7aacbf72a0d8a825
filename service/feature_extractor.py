"""Named feature extractors for FID and precision / recall on images (SPEC §7.4).

Every extractor takes **uint8** images ``(N, C, H, W)`` (samples and reconstructions are
quantised first, ``quantize``) and returns float64 features ``(N, D)``. Three protocols:

| protocol | network | metric names |
| -------- | ------- | ------------ |
| ``clean`` (default) | clean-fid's standard InceptionV3 (TorchScript, eval mode, PIL bicubic resize to 299) | ``fid``, ``fid_rec``, ``precision``, ``recall`` |
| ``paper`` | pytorch-fid's InceptionV3 in **train mode** (BatchNorm with per-batch statistics), bilinear resize to 299, batches of the training batch size; the VAE also in train mode (as the paper's code) | ``fid_paper``, ``fid_rec_paper``, ... |
| ``cnn`` | a small classifier trained by the project on the dataset's train split (offline), penultimate layer | ``fid_<dataset>_cnn``, ``fid_rec_<dataset>_cnn``, ... |

The Inception weights are not shipped by any package. clean-fid fetches them on first use
(``/tmp/inception-2015-12-05.pt``; pytorch-fid's into the torch hub cache). Without them, and
without a network, building ``clean`` or ``paper`` raises ``ExtractorUnavailable`` with the
file to place by hand; nothing ever falls back to another protocol silently. The ``cnn``
numbers are **not** FID: they are only comparable with each other (same dataset, same
extractor hash), which is why their names carry the dataset and ``cnn``.

The CNN is trained once per (dataset content, recipe) and cached under
``$INTROPRIOR_CACHE_DIR`` or ``~/.cache/introprior/extractors`` as a plain state dict
(``weights_only=True`` loading) whose file name holds the key; its sha256 is reported with the
metrics so two numbers can be checked to come from the same extractor.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import typing
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FidProtocol

PROTOCOLS = tuple(p for p in typing.get_args(FidProtocol) if p != "none")  # ("clean", "paper", "cnn")
CACHE_ENV = "INTROPRIOR_CACHE_DIR"

# clean-fid hard-codes this location on Linux; pytorch-fid's file lands in the torch hub cache.
CLEAN_WEIGHTS = Path("/tmp/inception-2015-12-05.pt")
CLEAN_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
PAPER_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
PAPER_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PAPER_WEIGHTS_NAME}"

INCEPTION_SIZE = 299
CNN_FORMAT = 1  # bump when the architecture or the file layout changes (part of the cache key)


class ExtractorUnavailable(RuntimeError):
    """A protocol's network cannot be built here (weights missing and not downloadable)."""


def quantize(x: Tensor) -> Tensor:
    """Float images in ``[0, 1]`` -> uint8 (clamped, rounded: a real image ``k / 255`` maps back to ``k``)."""
    return (x.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def three_channels(x: Tensor) -> Tensor:
    """Grayscale ``(N, 1, H, W)`` repeated to 3 channels for Inception (SPEC §7.4); RGB unchanged."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@dataclass
class FeatureExtractor:
    """A named feature map over uint8 image batches.

    ``fn`` maps one uint8 batch ``(B, C, H, W)`` to ``(B, D)``; ``batch_size`` is part of the
    protocol for ``paper`` (BatchNorm batch statistics). ``tag`` is the metric-name suffix (empty
    for the standard protocol); ``model_train_mode`` asks the caller to run the VAE in train mode.
    """

    protocol: str
    tag: str
    fn: Callable[[Tensor], Tensor]
    batch_size: int = 256
    model_train_mode: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def metric(self, base: str) -> str:
        """Metric name for this extractor: ``fid`` -> ``fid`` / ``fid_paper`` / ``fid_fmnist_cnn``."""
        return f"{base}_{self.tag}" if self.tag else base

    @torch.no_grad()
    def features(self, images: Tensor) -> np.ndarray:
        """Features ``(N, D)`` float64 of uint8 images ``(N, C, H, W)``, in order, batch by batch."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images: expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)} "
                             f"(quantize float images first)")
        out = [self.fn(images[i:i + self.batch_size]).detach().double().cpu().flatten(1)
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out).numpy()


def build_extractor(protocol: str, *, dataset: str | None = None, train_images: Tensor | None = None,
                    train_labels: Tensor | None = None, batch_size: int = 128, device: str | torch.device = "cpu",
                    cache_dir: str | os.PathLike | None = None, allow_download: bool = True,
                    log: Callable[[str], None] = print) -> FeatureExtractor:
    """The extractor of ``protocol`` (one of ``PROTOCOLS``).

    ``cnn`` needs the dataset name and its train split (uint8 images and labels) to load or train
    its classifier; ``paper`` uses ``batch_size`` (the training batch size) as its BN batch.
    """
    device = torch.device(device)
    if protocol == "clean":
        return _clean_extractor(device, allow_download)
    if protocol == "paper":
        return _paper_extractor(device, batch_size, allow_download)
    if protocol == "cnn":
        if dataset is None or train_images is None or train_labels is None:
            raise ValueError("protocol 'cnn': dataset, train_images and train_labels are required")
        model, info = load_or_train_cnn(dataset, train_images, train_labels, cache_dir=cache_dir, log=log)
        model = model.to(device)
        return FeatureExtractor("cnn", f"{_slug(dataset)}_cnn", lambda x: model.features(x.to(device)),
                                batch_size=512, info=info)
    raise ValueError(f"protocol: {protocol!r} is not one of {list(PROTOCOLS)}")


def _slug(dataset: str) -> str:
    """Metric-safe dataset name: ``parquet:my.parquet`` -> ``parquet_my``."""
    base = dataset.split(":", 1)[-1].rsplit(".", 1)[0] if ":" in dataset else dataset
    prefix = "parquet_" if dataset.startswith("parquet:") else ""
    return prefix + "".join(c if c.isalnum() else "_" for c in base.lower())


# --------------------------------------------------------------------------------------------
# Inception protocols (clean-fid)
# --------------------------------------------------------------------------------------------

def _unavailable(protocol: str, path: Path, url: str, reason: str) -> ExtractorUnavailable:
    return ExtractorUnavailable(
        f"protocol {protocol!r}: the InceptionV3 weights are not available ({reason}); they are expected at "
        f"{path} and fetched from {url} on a machine with internet access. Offline, copy that file there by "
        f"hand, or use --protocol cnn (a classifier trained on the dataset, reported as fid_<dataset>_cnn, "
        f"not comparable with FID)")


def _clean_extractor(device: torch.device, allow_download: bool) -> FeatureExtractor:
    if not CLEAN_WEIGHTS.is_file() and not allow_download:
        raise _unavailable("clean", CLEAN_WEIGHTS, CLEAN_URL, "file missing and downloads disabled")
    from cleanfid.features import build_feature_extractor
    from cleanfid.resize import build_resizer

    try:
        net = build_feature_extractor("clean", device=device, use_dataparallel=False)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise _unavailable("clean", CLEAN_WEIGHTS, CLEAN_URL, f"{type(e).__name__}: {e}") from None
    resize = build_resizer("clean")  # PIL bicubic on float pixels, as clean-fid does for files

    def fn(x: Tensor) -> Tensor:
        hwc = three_channels(x).permute(0, 2, 3, 1).cpu().numpy()  # uint8 (B, H, W, 3)
        resized = np.stack([resize(img) for img in hwc])  # float32 (B, 299, 299, 3) in [0, 255]
        return net(torch.from_numpy(resized).permute(0, 3, 1, 2).to(device))

    return FeatureExtractor("clean", "", fn, batch_size=128, info={"weights": str(CLEAN_WEIGHTS)})


def _paper_extractor(device: torch.device, batch_size: int, allow_download: bool) -> FeatureExtractor:
    path = Path(torch.hub.get_dir()) / "checkpoints" / PAPER_WEIGHTS_NAME
    if not path.is_file() and not allow_download:
        raise _unavailable("paper", path, PAPER_URL, "file missing and downloads disabled")
    from cleanfid.inception_pytorch import InceptionV3  # pytorch-fid's network, as vendored by clean-fid

    try:
        net = InceptionV3(output_blocks=[3], resize_input=False, normalize_input=True).to(device)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise _unavailable("paper", path, PAPER_URL, f"{type(e).__name__}: {e}") from None
    net.train()  # the paper's protocol: BatchNorm normalises with each batch's own statistics

    def fn(x: Tensor) -> Tensor:
        x = three_channels(x.to(device).float() / 255.0)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return net(x)[0].flatten(1)

    return FeatureExtractor("paper", "paper", fn, batch_size=batch_size, model_train_mode=True,
                            info={"weights": str(path), "batch_size": batch_size})


# --------------------------------------------------------------------------------------------
# The project's own classifier (offline protocol)
# --------------------------------------------------------------------------------------------

class CnnClassifier(nn.Module):
    """Two conv blocks and a 128-wide hidden layer; ``features`` is that hidden layer.

    ``(B, C, H, W)`` uint8 or float in ``[0, 255]`` -> logits ``(B, classes)``; H and W divisible by 4.
    """

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, width: int = 32,
                 feature_dim: int = 128):
        super().__init__()
        h, w = image_size
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), feature_dim),
                                    nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.hidden(self.conv(x.float() / 255.0 - 0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class CnnRecipe:
    """How the classifier is trained (part of the cache key)."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "introprior" / "extractors")


def cnn_cache_key(dataset: str, images: Tensor, labels: Tensor, recipe: CnnRecipe) -> str:
    """Hash of the training data and the recipe: the same data and recipe find the same file."""
    h = hashlib.sha256()
    h.update(f"cnn-v{CNN_FORMAT}|{dataset}|{recipe}|{tuple(images.shape)}".encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.enable_grad()  # callers may hold no_grad (the end-of-training evaluation does)
def train_cnn(images: Tensor, labels: Tensor, recipe: CnnRecipe = CnnRecipe(),
              log: Callable[[str], None] = print) -> CnnClassifier:
    """Train the classifier on uint8 images ``(N, C, H, W)`` and int labels ``(N,)``; seeded, CPU friendly."""
    num_classes = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = CnnClassifier(images.shape[1], tuple(images.shape[2:]), num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    labels = labels.to(torch.int64)
    model.train()
    for epoch in range(recipe.epochs):
        perm, total, correct, t0 = torch.randperm(len(images), generator=gen), 0.0, 0, time.perf_counter()
        for i in range(0, len(images), recipe.batch_size):
            idx = perm[i:i + recipe.batch_size]
            logits = model(images[idx])
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == labels[idx]).sum())
        log(f"feature extractor: epoch {epoch + 1}/{recipe.epochs}: loss {total / len(images):.4f}, "
            f"train accuracy {correct / len(images):.3f} ({time.perf_counter() - t0:.1f} s)")
    return model.eval()


@torch.no_grad()
def cnn_accuracy(model: CnnClassifier, images: Tensor, labels: Tensor, batch: int = 1024) -> float:
    """Classification accuracy on uint8 images (e.g. the test split)."""
    correct = sum(int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
                  for i in range(0, len(images), batch))
    return correct / len(images)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_or_train_cnn(dataset: str, images: Tensor, labels: Tensor, *, recipe: CnnRecipe = CnnRecipe(),
                      cache_dir: str | os.PathLike | None = None,
                      log: Callable[[str], None] = print) -> tuple[CnnClassifier, dict[str, Any]]:
    """The cached classifier for this data and recipe, training (and caching) it on a miss.

    Returns the model (eval mode) and ``info``: ``path``, ``sha256`` of the file, ``key``,
    ``cached`` (True when loaded), the recipe and the data size.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images: expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(torch.unique(labels)) < 2:
        raise ValueError(f"protocol 'cnn': the {dataset} training images hold a single label; the offline "
                         f"extractor is a classifier and needs labelled images (a 'label' column for Parquet)")
    key = cnn_cache_key(dataset, images, labels, recipe)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{_slug(dataset)}-cnn-{key}.pt"
    cached = path.is_file()
    if cached:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = CnnClassifier(state["in_channels"], tuple(state["image_size"]), state["num_classes"])
        model.load_state_dict(state["model"])
        model.eval()
    else:
        log(f"feature extractor: training the {dataset} classifier on {len(images)} images ({recipe}); "
            f"cached in {path}")
        model = train_cnn(images, labels, recipe, log)
        state = {"format": CNN_FORMAT, "dataset": dataset, "key": key, "recipe": vars(recipe).copy(),
                 "in_channels": images.shape[1], "image_size": list(images.shape[2:]),
                 "num_classes": model.head.out_features, "train_images": len(images),
                 "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    for p in model.parameters():
        p.requires_grad_(False)
    info = {"path": str(path), "sha256": file_sha256(path), "key": key, "cached": cached,
            "recipe": vars(recipe).copy(), "train_images": len(images)}
    return model, info
