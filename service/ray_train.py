"""Ray Train adapter: data-parallel training of ``loop.train`` with an explicit gradient all-reduce.

Why not DDP: see ``service/distributed.py``. Every rank builds the same model from the same
seed; after every ``backward`` the step's own parameters are averaged with one flat
``all_reduce`` (``distributed.allreduce_mean``). Ranks draw different data and noise.

Every rank calls ``ray.train.report`` at the same iterations (it is a barrier); rank 0 attaches
the checkpoint directory and logs metrics to MLflow. The driver (``fit``) creates the MLflow run,
runs the ``TorchTrainer``, then copies the final checkpoint directory to the output folder and
logs it as MLflow artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import ExperimentConfig, dump_yaml, flatten, from_dict, to_dict
from .data import make_source
from .distributed import allreduce_mean
from .loop import train
from .tracking import ConsoleSink, FanoutSink, MlflowSink, NullSink

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------

def _report_hook(rank: int, plot_dir: Path):
    import ray.train

    def on_checkpoint(state: dict[str, Any] | None, iteration: int, metrics: dict[str, float], final: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and state is not None:
                checkpoint.save(Path(tmp) / CHECKPOINT_FILE, state)
                if final:
                    (Path(tmp) / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
                    for png in plot_dir.glob("*.png"):
                        shutil.copy(png, tmp)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"iteration": iteration, "final": final, **metrics}, checkpoint=ckpt)

    return on_checkpoint


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker: build, resume, train, report."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_dict(config["cfg"])
    torch.set_num_threads(max(1, cfg.scaling.threads_per_worker or int(config["cpus_per_worker"])))
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")

    resume = None
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            resume = checkpoint.load(Path(d) / CHECKPOINT_FILE)
    sink = NullSink()
    if rank == 0:
        sinks = [ConsoleSink()]
        if config.get("mlflow_run_id"):
            sinks.append(MlflowSink(config["tracking_uri"], config["mlflow_run_id"]))
        sink = FanoutSink(*sinks)
    with tempfile.TemporaryDirectory() as plot_dir:
        train(cfg, make_source(cfg.data), sink=sink, on_checkpoint=_report_hook(rank, Path(plot_dir)),
              grad_sync=allreduce_mean, rank=rank, world_size=world, device=device, resume=resume,
              plot_dir=plot_dir)


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------

def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite store in the current folder (absolute URI)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The experiment's id, created by the driver if needed (SQLite: artifacts next to the store, absolute)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if tracking_uri.startswith("sqlite:///"):  # keep artifacts next to the store, absolute
        artifacts = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def start_mlflow_run(cfg: ExperimentConfig, tracking_uri: str, run_name: str,
                     tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str:
    """Create (or find, for a resumed run name) the MLflow run; the driver owns the experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = ensure_experiment(tracking_uri, cfg.tracking.experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'", max_results=1)
    if found:
        return found[0].info.run_id
    all_tags = {"preset": cfg.name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    MlflowSink(tracking_uri, run.info.run_id).log_params(flatten(to_dict(cfg)))
    return run.info.run_id


def failure_text(e: BaseException) -> str:
    """``Type: message`` of the root cause of a failed run (a worker's ``TrainingDiverged``, not Ray's wrapper)."""
    failures = list(getattr(e, "worker_failures", {}).values()) or [getattr(e, "controller_failure", None)]
    root = failures[0] if failures[0] is not None else e
    while getattr(root, "cause", None) is not None and root.cause is not root:
        root = root.cause
    name = root.cause_cls.__name__ if hasattr(root, "cause_cls") else type(root).__name__
    lines = [ln for ln in str(root).splitlines() if ln.strip()]
    message = next((ln for ln in reversed(lines) if name in ln), lines[-1] if lines else "")
    return f"{name}: {message.split(f'{name}: ', 1)[-1]}"[:2000]


def _cpus_per_worker(cfg: ExperimentConfig) -> int:
    import ray

    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(total // cfg.scaling.workers, cfg.scaling.threads_per_worker or total))


def fit(cfg: ExperimentConfig, *, output_dir: str | Path, run_name: str, storage_path: str | Path,
        tracking_uri: str | None = None, max_failures: int = 0, cpus_per_worker: int | None = None,
        callbacks: list | None = None, mlflow_run_id: str | None = None,
        gpus_per_worker: float | None = None) -> dict[str, Any]:
    """Train ``cfg`` with a ``TorchTrainer``; leave checkpoint, metrics, plots and config in ``output_dir``.

    A second call with the same ``run_name`` and ``storage_path`` resumes from the latest checkpoint.
    ``gpus_per_worker`` (with ``scaling.use_gpu``) may be a fraction: several sweep trials share a GPU.
    Returns ``{"metrics", "output_dir", "mlflow_run_id", "iteration"}``.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    tracking_uri = tracking_uri or cfg.tracking.tracking_uri or default_tracking_uri()
    run_id = mlflow_run_id or start_mlflow_run(cfg, tracking_uri, run_name)
    cpus = cpus_per_worker or _cpus_per_worker(cfg)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "tracking_uri": tracking_uri, "mlflow_run_id": run_id,
                           "cpus_per_worker": cpus},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": gpus_per_worker}
                                                                          if gpus_per_worker else {})}),
        run_config=RunConfig(name=run_name, storage_path=str(Path(storage_path).resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=callbacks or None),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # the MLflow run says why it stopped; the caller gets Ray's error
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        client.set_tag(run_id, "error", failure_text(e)[:5000])
        client.set_terminated(run_id, status="FAILED")
        raise
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        for f in Path(d).iterdir():
            shutil.copy(f, out / f.name)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    metrics = json.loads((out / METRICS_FILE).read_text())
    sink = MlflowSink(tracking_uri, run_id)
    for f in sorted(out.iterdir()):
        sink.log_artifact(f, "checkpoint" if f.suffix == ".pt" else None)
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id)
    return {"metrics": metrics, "output_dir": str(out), "mlflow_run_id": run_id,
            "iteration": int(result.metrics.get("iteration", cfg.schedule.iterations))}
