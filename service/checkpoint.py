"""Atomic, fsynced checkpoints (finite weights only) with embedded config and schema version; safe loading (weights_only=True)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from .config import ConfigError, ExperimentConfig, from_dict, to_dict
from .model import Model, build_model

SCHEMA_VERSION = 1


def run_checkpoint_uri(run_id: str) -> str:
    """The MLflow URI of a training run's checkpoint (``ray_train`` logs it as ``checkpoint/checkpoint.pt``)."""
    return f"runs:/{run_id}/checkpoint/checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or of another schema version."""


def make_state(model: Model, cfg: ExperimentConfig, *, iteration: int, data_shape: tuple[int, ...],
               optimizers: dict[str, Any] | None = None, generators: dict[str, torch.Tensor] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to resume training or to serve: plain containers and tensors only."""
    return {
        "schema_version": SCHEMA_VERSION,
        "config": to_dict(cfg),
        "iteration": iteration,
        "data_shape": list(data_shape),
        "prior_type": model.prior_type,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizers": optimizers or {},
        "generators": generators or {},
        "extra": extra or {},
    }


class NonFiniteCheckpointError(CheckpointError):
    """A state to be saved holds NaN or Inf weights: saving it would replace a good checkpoint."""


def _non_finite(state: dict[str, Any]) -> list[str]:
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict):
        return []
    return [k for k, v in model.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temp file in ``path``'s folder, fsync it, then ``os.replace`` it onto ``path``.

    Readers see the old file or the whole new one, never a part; after a crash (power loss
    included) the old file is intact. The temp file is removed if anything fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` of UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` through ``atomic_write`` (``dst`` is never half-written)."""
    with open(src, "rb") as s:
        return atomic_write(dst, lambda f: shutil.copyfileobj(s, f, 1 << 20))


def save(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (``atomic_write``: temp file, fsync, ``os.replace``).

    A crash mid-write leaves the previous checkpoint intact. A state whose weights hold NaN or
    Inf is refused with ``NonFiniteCheckpointError`` (nothing is written): it could only replace
    the last good checkpoint with one that cannot be trained or served.
    """
    if bad := _non_finite(state):
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise NonFiniteCheckpointError(
            f"checkpoint: refusing to write {str(path)!r}: non-finite (NaN/Inf) values in {shown} at iteration "
            f"{state.get('iteration')!r}; the previous checkpoint is kept")
    return atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; clear errors for a missing file or another schema."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise CheckpointError(f"checkpoint: {str(path)!r} is not a readable introprior checkpoint ({e})") from None
    version = state.get("schema_version") if isinstance(state, dict) else None
    if version != SCHEMA_VERSION:
        raise CheckpointError(f"checkpoint: {str(path)!r} has schema_version {version!r}; this introprior reads "
                              f"schema_version {SCHEMA_VERSION}")
    return state


# --------------------------------------------------------------------------------------------
# Load-time validation: nothing a checkpoint says is allocated before it is checked
# --------------------------------------------------------------------------------------------

# Sane upper bounds of a checkpoint's config, far above every preset (2D MLPs 256 x 4, image
# ResNets of (64, ..., 512) channels, M <= 1,024) and far below what exhausts a machine.
BOUNDS: dict[str, int] = {"network.latent_dim": 4096, "network.hidden": 16384, "network.depth": 64,
                          "network.channels": 4096, "prior.num_components": 65536, "data_shape": 4096}
MAX_DATA_VALUES = 3 * 1024 * 1024  # values of one item (C * H * W)
MAX_PARAMETERS = 2**30  # elements of the model's state dict (4 GiB of float32)
PRIOR_TYPES = ("standard", "mog", "vamp")


def _bound(field: str, value: Any, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
        raise CheckpointError(f"{field}: {value!r} is out of range; allowed integers in [1, {hi}]")


def validate_state(state: dict[str, Any]) -> ExperimentConfig:
    """Check a loaded state before any model is built; returns its config.

    Raises ``CheckpointError`` naming the field: config values past ``BOUNDS``, a ``data_shape``
    that is not (D,) or (C, H, W), tensors whose shapes differ from those the config implies
    (compared on a ``meta``-device model, which allocates nothing), and NaN/Inf weights.
    """
    for key in ("config", "data_shape", "prior_type", "model"):
        if key not in state:
            raise CheckpointError(f"{key}: missing from the checkpoint")
    shape = state["data_shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) not in (1, 3):
        raise CheckpointError(f"data_shape: {shape!r} is not (D,) or (C, H, W)")
    for i, d in enumerate(shape):
        _bound(f"data_shape[{i}]", d, BOUNDS["data_shape"])
    if math.prod(shape) > MAX_DATA_VALUES:
        raise CheckpointError(f"data_shape: {list(shape)} has {math.prod(shape)} values per item; allowed at most "
                              f"{MAX_DATA_VALUES}")
    if state["prior_type"] not in PRIOR_TYPES:
        raise CheckpointError(f"prior_type: {state['prior_type']!r} is not one of {list(PRIOR_TYPES)}")
    try:
        cfg = from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"config.{e}") from None
    for field in ("latent_dim", "hidden", "depth"):
        _bound(f"config.network.{field}", getattr(cfg.network, field), BOUNDS[f"network.{field}"])
    if len(cfg.network.channels) > 5:
        raise CheckpointError(f"config.network.channels: {list(cfg.network.channels)} has more than 5 scales")
    for i, c in enumerate(cfg.network.channels):
        _bound(f"config.network.channels[{i}]", c, BOUNDS["network.channels"])
    _bound("config.prior.num_components", cfg.prior.num_components, BOUNDS["prior.num_components"])
    _check_tensors(state, cfg)
    return cfg


def _check_tensors(state: dict[str, Any], cfg: ExperimentConfig) -> None:
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError("model: is not a dict of tensors")
    try:
        with torch.device("meta"):
            expected = build_model(cfg, tuple(state["data_shape"]), prior_type=state["prior_type"]).state_dict()
    except Exception as e:  # noqa: BLE001 - ConfigError for a data shape the networks cannot take, and the like
        raise CheckpointError(f"config: does not build a model for data_shape {list(state['data_shape'])} ({e})") from None
    total = sum(t.numel() for t in expected.values())
    if total > MAX_PARAMETERS:
        raise CheckpointError(f"config: the model would hold {total} values; allowed at most {MAX_PARAMETERS}")
    if missing := [k for k in expected if k not in weights]:
        raise CheckpointError(f"model.{missing[0]}: missing ({len(missing)} tensors missing in all)")
    if unexpected := [k for k in weights if k not in expected]:
        raise CheckpointError(f"model.{unexpected[0]}: not a tensor of this config's model ({len(unexpected)} in all)")
    for k, t in expected.items():
        if tuple(weights[k].shape) != tuple(t.shape):
            raise CheckpointError(f"model.{k}: has shape {list(weights[k].shape)}; the config implies {list(t.shape)}")
    if bad := _non_finite(state):
        raise CheckpointError(f"model.{bad[0]}: holds NaN/Inf values ({len(bad)} tensors in all); refusing to load")


def restore_model(state: dict[str, Any], device: str | torch.device = "cpu") -> tuple[ExperimentConfig, Model]:
    """Rebuild the config and the model (with the prior type it had when saved), after ``validate_state``."""
    cfg = validate_state(state)
    model = build_model(cfg, tuple(state["data_shape"]), prior_type=state["prior_type"])
    model.load_state_dict(state["model"])
    return cfg, model.to(device)
