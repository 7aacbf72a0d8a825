"""A 1-worker sweep trial that trains in the Tune trial's own process (``service.sweep_trial``).

A Ray Train run inside a Tune trial starts its own controller, worker group, placement-group cleaner,
synchronisation and dataset actors: seven Python processes per trial and tens of seconds of start-up
on a small machine, for a trial whose one worker has no peer to all-reduce with. Here the trial runs
the plain loop (``loop.train``, the step Ray Train wraps) itself, with the same outputs:

- every checkpoint is a Tune checkpoint (``tune.report(..., checkpoint=...)``), with the trial's
  progress row and the evaluations since the last one (what ``sweep_trial._eval_forwarder`` forwards
  from Ray Train), the checkpoint on the last row of that iteration;
- a trial process that dies (a killed process, a lost node) is restarted by Tune (the sweep's
  ``FailureConfig``) and resumes from its latest Tune checkpoint, bit for bit as an uninterrupted
  run (the random streams travel in the checkpoint); a trial of a sweep started before this existed
  resumes from its Ray Train run's latest checkpoint;
- the final checkpoint, metrics, plots, ``workers.json`` and ``config.yaml`` at the trial's output
  folder, the MLflow run's metrics, artifacts and pyfunc model (``ray_train.deliver_outputs``).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint, storage
from .config import ExperimentConfig
from .data import make_source
from .loop import train
from .ray_train import (CHECKPOINT_FILE, MLFLOW_FINAL_WAIT_S, deliver_outputs, latest_checkpoint, worker_placement,
                        write_final)
from .tracking import FanoutSink, MlflowSink, NullSink

# report(iteration, evaluations, checkpoint folder): the trial's rows to Tune at a checkpoint; an
# evaluation is {"iteration": i, "<metric>": value, ...} for the names Tune gets (``sweep_trial.REPORTED``)
Report = Callable[[int, list[dict[str, Any]], Path], None]
CHECKPOINT_LOGGER = "ray.train._internal.storage"  # where Tune's function trainables persist checkpoints


class EvaluationTap(NullSink):
    """Keeps the ``eval/<name>`` values of the listed names that the loop logs, by iteration, until taken."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names, self.found = set(names), {}

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        values = {k[5:]: v for k, v in metrics.items() if k.startswith("eval/") and k[5:] in self.names}
        if values:
            self.found.setdefault(int(step), {}).update(values)

    def take(self, upto: int) -> list[dict[str, Any]]:
        """The evaluations at iterations <= ``upto``, oldest first; they are not returned again."""
        steps = sorted(s for s in self.found if s <= upto)
        return [{"iteration": s, **self.found.pop(s)} for s in steps]


def _resume_state(run_dir: storage.Location) -> dict[str, Any] | None:
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:  # a sweep stopped before Tune recorded a checkpoint: its Ray Train run's, if any
        return latest_checkpoint(run_dir)
    with ckpt.as_directory() as d:
        return checkpoint.load(Path(d) / CHECKPOINT_FILE)


def fit_in_trial(cfg: ExperimentConfig, *, output_dir: str | Path | storage.Location, run_name: str,
                 storage_path: str | Path | storage.Location, tracking_uri: str, mlflow_run_id: str,
                 report: Report, reported: tuple[str, ...], mlflow_wait_s: float = MLFLOW_FINAL_WAIT_S
                 ) -> dict[str, Any]:
    """Train ``cfg`` (one worker) in this process, resuming from the trial's latest checkpoint; ``report``
    gets every checkpoint with the evaluations of ``reported`` names logged since the last one. Returns
    what ``ray_train.fit`` returns: ``{"metrics", "output_dir", "mlflow_run_id", "tracking_uri",
    "iteration", "workers"}``."""
    from mlflow.tracking import MlflowClient

    if cfg.scaling.workers != 1:
        raise ValueError(f"fit_in_trial trains one worker; scaling.workers is {cfg.scaling.workers}")
    # Tune's storage logs "Checkpoint successfully created at: ..." at INFO for every checkpoint of every
    # trial, forwarded to the sweep's console (a Ray Train run's reports are quiet): WARNING and above only
    logging.getLogger(CHECKPOINT_LOGGER).setLevel(logging.WARNING)
    resume = _resume_state(storage.resolve(storage_path) / run_name)
    torch.set_num_threads(max(1, cfg.scaling.threads_per_worker or 1))  # the trial's whole CPUs
    device = torch.device("cuda" if cfg.scaling.use_gpu else "cpu")  # Ray set CUDA_VISIBLE_DEVICES for the trial
    mlflow_sink, tap = MlflowSink(tracking_uri, mlflow_run_id), EvaluationTap(reported)
    workers = worker_placement(0)  # this process: no process group, so no collective

    def on_checkpoint(state: dict[str, Any] | None, iteration: int, metrics: dict[str, float], final: bool) -> None:
        if final or state is None:
            return  # the final state is written below, with the run's results
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save(Path(tmp) / CHECKPOINT_FILE, state)  # refuses non-finite weights
            report(iteration, tap.take(iteration), Path(tmp))

    with tempfile.TemporaryDirectory() as plot_dir:
        result = train(cfg, make_source(cfg.data), sink=FanoutSink(mlflow_sink, tap), on_checkpoint=on_checkpoint,
                       device=device, resume=resume, plot_dir=plot_dir)
        target, metrics, placed = deliver_outputs(
            output_dir, lambda out: write_final(out, result.state, result.metrics, workers, Path(plot_dir), mlflow_sink,
                                                min(60.0, mlflow_wait_s)),
            cfg, MlflowClient(tracking_uri), mlflow_run_id, mlflow_wait_s, tracking_uri)
    return {"metrics": metrics, "output_dir": target.uri, "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri,
            "iteration": result.iteration, "workers": placed}
