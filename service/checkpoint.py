"""Atomic, fsynced checkpoints (finite weights only) with embedded config and schema version; safe loading (weights_only=True)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from .config import ExperimentConfig, from_dict, to_dict
from .model import Model, build_model

SCHEMA_VERSION = 1


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


def restore_model(state: dict[str, Any], device: str | torch.device = "cpu") -> tuple[ExperimentConfig, Model]:
    """Rebuild the config and the model (with the prior type it had when saved)."""
    cfg = from_dict(state["config"])
    model = build_model(cfg, tuple(state["data_shape"]), prior_type=state["prior_type"])
    model.load_state_dict(state["model"])
    return cfg, model.to(device)
