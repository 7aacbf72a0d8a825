"""Metric sinks: the training loop calls ``sink.log_metrics(step, {...})`` and nothing else.

``MlflowSink`` imports mlflow lazily, so the core never depends on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Protocol

# Every metric name the service logs (MLflow-valid: letters, digits, '_', '/', no '@').
METRIC_NAMES = (
    "train/loss_vae", "train/rec_real", "train/kl_real",
    "train/loss_encoder", "train/loss_decoder",
    "train/enc/rec_real", "train/enc/kl_real", "train/enc/rec_fake", "train/enc/kl_fake",
    "train/enc/rec_rec", "train/enc/kl_rec", "train/enc/exp_elbo_fake", "train/enc/exp_elbo_rec",
    "train/dec/rec_real", "train/dec/kl_rec", "train/dec/kl_fake", "train/dec/rec_rec_rec",
    "train/dec/rec_fake_rec", "train/dec/kl_prior", "train/lr", "train/iterations_per_s",
    "prior/entropy_norm", "prior/active_components",
    "eval/gnelbo_x1e7", "eval/hist_kl", "eval/hist_jsd", "eval/prior_entropy_norm",
    "eval/prior_active_components",
)


class MetricSink(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...


class NullSink:
    """For non-main ranks: drops everything."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass


class MemorySink(NullSink):
    """Keeps everything in lists (tests assert on it)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[tuple[str, str | None]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def last(self, name: str) -> float | None:
        for _, m in reversed(self.metrics):
            if name in m:
                return m[name]
        return None


class ConsoleSink(NullSink):
    """One JSON line per logging step on stdout (grep-able, machine-readable)."""

    def __init__(self, stream=None, keys: tuple[str, ...] = ("train/loss_vae", "train/loss_encoder",
                                                             "train/loss_decoder", "prior/entropy_norm",
                                                             "train/iterations_per_s")) -> None:
        self.stream, self.keys = stream or sys.stdout, keys

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        shown = {k: round(v, 5) for k, v in metrics.items() if k in self.keys or k.startswith("eval/")}
        if shown:
            print(json.dumps({"iteration": step, **shown}), file=self.stream, flush=True)


class FanoutSink(NullSink):
    """Forwards every call to several sinks."""

    def __init__(self, *sinks: MetricSink) -> None:
        self.sinks = sinks

    def log_params(self, params: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log_params(params)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for s in self.sinks:
            s.log_metrics(step, metrics)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        for s in self.sinks:
            s.log_artifact(path, artifact_path)


class MlflowSink(NullSink):
    """Logs to an active MLflow run (``run_id``) through the client API; mlflow imported lazily."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)
