"""Shared test set-up: Ray auth off and identical for every process; no hidden downloads."""

import os
import sys
from pathlib import Path

import pytest

# Idle OpenMP threads sleep instead of spinning (libgomp reads this when torch loads it, hence before the
# import; Ray's processes inherit it). Three pytest-xdist workers and their Ray processes share 2 cores: a
# spinning thread burns a core another process needs. Numerics are unchanged. ``pytest -m "not e2e" -n 2``
# beside a training run, 2026-12-03: 182 -> 163 s of user CPU, 136 -> 119 s wall.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers at most every 2 s by default, so each smoke run waits up to
# 2 s to notice that training ended (a worker died): the suite runs about 20 Ray Train runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Starting a Ray Train worker group (a process that imports torch per worker) has 60 s by default; with
# pytest-xdist's workers and other jobs on 2 cores it can take longer, and a timeout costs a retry.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
# Ray Train starts a preemption watcher actor (one more Python process) with every worker group; no test
# drains a node, and on 2 cores each process start is seconds.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# The slowest modules first (their --durations, idle 2-core machine): with ``make test``'s pytest-xdist
# (``--dist loadfile --no-loadscope-reorder``) a module that starts last cannot end the run on its own.
# Those that share ``ray_local`` come first, next to each other. The order changes nothing else; modules
# not listed keep their places after these.
SLOW_FIRST = ["test_e2e_faults.py", "test_e2e_sweep_staged.py", "test_e2e_sweep.py", "test_e2e_sweep_trial_fault.py",
              "test_e2e_train.py",
              "test_e2e_evaluate.py", "test_e2e_mlflow_outage.py", "test_e2e_serve.py", "test_e2e_multinode.py",
              "test_e2e_signals.py", "test_readme_cluster.py"]
_RAY_MODULES: set[Path] = set()  # modules with a test that uses ray_local
_SHARED = {"gcs": None}  # the GCS address of the instance ray_local started


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order
    _RAY_MODULES.update(item.path for item in items if "ray_local" in item.fixturenames)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """The shared instance ends before the first test of a module that does not use it: such tests check
    that a command fails before Ray starts (``not ray.is_initialized()``) or start a Ray of their own."""
    if item.path not in _RAY_MODULES:
        _stop_local_ray()


def _local_ray() -> None:
    """Start this process's local Ray instance (2 CPUs) unless one is up; it lives until a module that
    does not use it, or the session, ends it."""
    import ray

    from service.ray_env import init_ray

    if not ray.is_initialized():
        # address="local": a fresh instance even where /tmp/ray names another (live or stale) cluster.
        # As jobs.sweep starts one: init_ray's workers pin RAY_ADDRESS, and a dashboard of its own. Ray
        # Train's PlacementGroupCleaner asks the state API (the dashboard named in the cluster's KV store)
        # whether the run's controller is alive; without a dashboard that entry still reads 127.0.0.1:8265,
        # another instance's dashboard (a parallel test's job, a sweep on the machine), which does not know
        # the controller (its is_actor_alive counts an unknown actor as dead): the cleaner would remove a live
        # run's placement group, or die with a traceback
        init_ray(address="local", num_cpus=2)
        _SHARED["gcs"] = ray.get_runtime_context().gcs_address


def _stop_local_ray() -> None:
    ray = sys.modules.get("ray")
    if _SHARED["gcs"] and ray is not None and ray.is_initialized():
        if ray.get_runtime_context().gcs_address == _SHARED["gcs"]:  # not another module's own instance
            ray.shutdown()
    if ray is None or not ray.is_initialized():
        _SHARED["gcs"] = None


@pytest.fixture(scope="session")
def _ray_session():
    """Ends, with the session, the local Ray instance that the end-to-end modules shared."""
    yield
    _stop_local_ray()


@pytest.fixture(scope="module")
def ray_local(_ray_session):
    """A local Ray instance (2 CPUs) for one end-to-end module's tests.

    Started by the first module that asks and kept for the next ones that use it (a Ray start and
    stop is about 10 s of a loaded machine's time); the first test of a module that does not use it
    shuts it down (conftest.pytest_runtest_setup), as does a module that builds another cluster.
    """
    _local_ray()
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Small models: on a busy 2-core machine extra intra-op threads only spin (about 3x the CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

