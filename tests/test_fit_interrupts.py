"""``ray_train.fit`` marks its MLflow run KILLED on SIGTERM / Ctrl-C and FAILED otherwise.

The trainer is a stand-in (no Ray cluster); ``test_e2e_signals.py`` sends the real signals to a
real ``jobs.train`` process.
"""

import os
import signal
import time

import pytest

from service import ray_train
from service.presets import get_preset, smoke


class _Trainer:
    """Replaces ``TorchTrainer``: ``fit`` does what the test asks."""

    action = None

    def __init__(self, *args, **kwargs) -> None:
        pass

    def fit(self):
        type(self).action()


@pytest.fixture
def fake_ray(monkeypatch):
    import ray
    import ray.train.torch

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", _Trainer)
    monkeypatch.setattr(ray_train, "_cpus_per_worker", lambda cfg: 1)


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the handler raises here
    raise AssertionError("SIGTERM did not stop fit")


def _ctrl_c():
    raise KeyboardInterrupt


def _crash():
    raise RuntimeError("something else broke")


@pytest.mark.parametrize("action, raised, status, tag", [
    (_sigterm, ray_train.TrainingInterrupted, "KILLED", "stopped by SIGTERM"),
    (_ctrl_c, KeyboardInterrupt, "KILLED", "stopped by SIGINT"),
    (_crash, RuntimeError, "FAILED", "RuntimeError: something else broke"),
])
def test_the_mlflow_run_records_how_the_run_stopped(fake_ray, tmp_path, action, raised, status, tag):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _Trainer.action = action
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(raised) as e:
        ray_train.fit(smoke(get_preset("8gaussians/sintro")), output_dir=tmp_path / "out", run_name="r",
                      storage_path=tmp_path / "ray", tracking_uri=uri, mlflow_wait_s=1.0)
    if raised is ray_train.TrainingInterrupted:
        assert e.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is restored
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("introprior").experiment_id])
    assert run.info.status == status and run.data.tags["error"] == tag
    assert not (tmp_path / "out").exists()
