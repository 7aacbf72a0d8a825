"""Shared test set-up: Ray auth off and identical for every process; no hidden downloads."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def one_thread():
    """Small models: on a busy 2-core machine extra intra-op threads only spin (about 3x the CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance (2 CPUs) shared by one end-to-end module's tests."""
    import ray

    # address="local": a fresh instance even where /tmp/ray names another (live or stale) cluster
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a smoke-trained 8-component IP + LC model on 8gaussians (in process, seconds)."""
    from service import checkpoint
    from service.data import make_source
    from service.loop import train
    from service.presets import get_preset, smoke

    cfg = smoke(get_preset("8gaussians/mog-ip-lc"))
    path = tmp_path_factory.mktemp("smoke_checkpoint") / "checkpoint.pt"
    checkpoint.save(path, train(cfg, make_source(cfg.data)).state)
    return path
