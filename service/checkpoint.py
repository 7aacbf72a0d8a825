"""Atomic checkpoints with embedded config and schema version; safe loading (weights_only=True)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

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


def save(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically: a temp file in the same folder, then ``os.replace``.

    A crash mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
