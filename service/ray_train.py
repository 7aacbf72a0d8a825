"""Ray Train adapter: data-parallel training of ``loop.train`` with an explicit gradient all-reduce.

Why not DDP: see ``service/distributed.py``. Every rank builds the same model from the same
seed; after every ``backward`` the step's own parameters are averaged with one flat
``all_reduce`` (``distributed.allreduce_mean``). Ranks draw different data and noise.

Every rank calls ``ray.train.report`` at the same iterations (it is a barrier); rank 0 attaches
the checkpoint directory and logs metrics to MLflow. The driver (``fit``) creates the MLflow run,
runs the ``TorchTrainer``, then copies the final checkpoint directory to the output folder and
logs it as MLflow artifacts.

Faults: a worker that dies (a killed process, a lost node) restarts the worker group from the
last checkpoint, up to ``max_failures`` times; every rank's random streams travel in the
checkpoint, so the resumed run is bit-identical to an uninterrupted one. Deterministic failures
(a diverged run, a non-finite or unreadable checkpoint, a bad config) end the run at once:
retrying them only fails again. A re-used run name must mean the same experiment (the config is
recorded next to Ray's checkpoints). MLflow outages are buffered (``MlflowSink``); a run stopped
by SIGINT/SIGTERM is marked KILLED.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from . import checkpoint, storage
from .config import ConfigError, ExperimentConfig, dump_yaml, flatten, from_dict, to_dict
from .data import make_source
from .distributed import allreduce_mean
from .loop import in_iteration_units, train
from .ray_env import init_ray
from .ray_progress import ProgressSink, Watcher, create_board
from .tracking import FanoutSink, MlflowSink, NullSink, _fail_fast_requests

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"  # the run's config beside its results; check_output_folder reads it
WORKERS_FILE = "workers.json"  # where each rank ran: [{"rank", "node_id", "host", "pid"}], rank order
UNLOGGED_FILE = "unlogged_metrics.jsonl"  # metric values MLflow never received (an outage at the end)
RUN_RECORD = "introprior-config.yaml"  # the experiment a Ray Train run name stands for, next to its checkpoints
DEFAULT_MAX_FAILURES = 2  # worker-group restarts from the last checkpoint after an infrastructure failure
# Failures that recur on every retry (the same checkpoint, config and seeds): never retried.
NON_RETRYABLE = ("TrainingDiverged", "CheckpointError", "ConfigError")
# Fields that may differ when a run name is re-used: where and how fast it runs, how often it logs,
# where it is tracked. Everything else defines the experiment.
RESUME_EXEMPT = ("scaling.workers", "scaling.threads_per_worker", "scaling.use_gpu", "schedule.log_every",
                 "schedule.eval_every", "schedule.checkpoint_every", "tracking.*")
MLFLOW_FINAL_WAIT_S = 120.0  # how long the end of a run waits for an unreachable MLflow before warning
# Ray Train's own console logs (a "Reporting training result ..." line per report and rank, state
# transitions) at WARNING and above only; the session's log files keep everything.
RAY_TRAIN_LOG_LEVEL = "WARNING"


class ConfigChanged(ConfigError):
    """A re-used run name with a different config (resuming would mix two experiments)."""


class OutputTaken(ConfigChanged):
    """The output folder holds another experiment's results, which this run would replace."""


class TrainingInterrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM; its MLflow run is marked KILLED."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------

def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``all_gather_object``); ``[obj]`` without a process group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def write_final(folder: Path, state: dict[str, Any], metrics: dict[str, float], workers: list[dict[str, Any]] | None,
                plot_dir: Path, mlflow_sink: MlflowSink | None, mlflow_wait_s: float) -> None:
    """A finished run's files in ``folder``: checkpoint (non-finite weights refused), metrics, where the
    ranks ran, plots, and the metric values MLflow did not take within ``mlflow_wait_s`` (the driver
    retries them)."""
    checkpoint.save(folder / CHECKPOINT_FILE, state)
    checkpoint.atomic_write_text(folder / METRICS_FILE, json.dumps(metrics, indent=2))
    if workers:
        checkpoint.atomic_write_text(folder / WORKERS_FILE, json.dumps(workers, indent=2))
    for png in plot_dir.glob("*.png"):
        shutil.copy(png, folder)
    if mlflow_sink is not None and mlflow_sink.flush(mlflow_wait_s):
        lines = [json.dumps(dict(zip(("key", "value", "timestamp", "step"), m))) for m in mlflow_sink.pending()]
        checkpoint.atomic_write_text(folder / UNLOGGED_FILE, "\n".join(lines) + "\n")


def _report_hook(rank: int, plot_dir: Path, mlflow_sink: MlflowSink | None = None, mlflow_wait_s: float = 60.0,
                 workers: list[dict[str, Any]] | None = None):
    import ray.train

    def on_checkpoint(state: dict[str, Any] | None, iteration: int, metrics: dict[str, float], final: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and state is not None:
                if final:
                    write_final(Path(tmp), state, metrics, workers, plot_dir, mlflow_sink, mlflow_wait_s)
                else:
                    checkpoint.save(Path(tmp) / CHECKPOINT_FILE, state)  # refuses non-finite weights
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"iteration": iteration, "final": final, **metrics}, checkpoint=ckpt)

    return on_checkpoint


def worker_placement(rank: int) -> list[dict[str, Any]]:
    """Where every rank runs (``{"rank", "node_id", "host", "pid"}`` in rank order); a collective call."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return gather_objects({"rank": rank, "node_id": node, "host": socket.gethostname(), "pid": os.getpid()})


def _quiet_report_echo() -> None:
    """Ray Train 2.60 logs "Reporting training result N: TrainingReport(<every metric>) from rank R"
    at INFO for every report of every rank, under a logger named after its file (outside
    ``ray.train``, so ``LoggingConfig(log_level=...)`` does not reach it): WARNING and above only."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: nothing to quiet here
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker: build, resume, train, report."""
    import ray.train
    import ray.train.torch

    _quiet_report_echo()

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = from_dict(config["cfg"])
    torch.set_num_threads(max(1, cfg.scaling.threads_per_worker or int(config["cpus_per_worker"])))
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")

    resume = None
    if (ckpt := ray.train.get_checkpoint()) is not None:
        with ckpt.as_directory() as d:
            resume = checkpoint.load(Path(d) / CHECKPOINT_FILE)
    source = make_source(cfg.data)
    sink, mlflow_sink = NullSink(), None
    if rank == 0:
        sinks = []
        if config.get("progress") is not None:  # the driver's console (ray_progress)
            schedule = in_iteration_units(cfg, source).schedule
            sinks.append(ProgressSink(config["progress"], schedule.iterations, schedule.warmup))
        if config.get("mlflow_run_id"):
            mlflow_sink = MlflowSink(config["tracking_uri"], config["mlflow_run_id"])
            sinks.append(mlflow_sink)
        sink = FanoutSink(*sinks)
    hook_wait = float(config.get("mlflow_wait_s", 60.0))
    workers = worker_placement(rank)  # recorded with the final checkpoint (workers.json)
    with tempfile.TemporaryDirectory() as plot_dir:
        train(cfg, source, sink=sink,
              on_checkpoint=_report_hook(rank, Path(plot_dir), mlflow_sink, hook_wait, workers),
              grad_sync=allreduce_mean, rank=rank, world_size=world, device=device, resume=resume,
              plot_dir=plot_dir, gather=gather_objects)


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


# --------------------------------------------------------------------------------------------
# Same experiment on resume
# --------------------------------------------------------------------------------------------

def experiment_fields(cfg: ExperimentConfig | dict[str, Any]) -> dict[str, Any]:
    """The flattened config without ``RESUME_EXEMPT`` fields: what a run name stands for."""
    flat = flatten(cfg if isinstance(cfg, dict) else to_dict(cfg))
    return {k: v for k, v in flat.items() if not any(fnmatch.fnmatchcase(k, pat) for pat in RESUME_EXEMPT)}


def config_fingerprint(cfg: ExperimentConfig, salt: str = "") -> str:
    """10 hex digits of a SHA-256 over ``experiment_fields`` (and ``salt``): equal for equal experiments."""
    text = json.dumps(experiment_fields(cfg), sort_keys=True, separators=(",", ":"), default=str) + salt
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def config_diff(old: dict[str, Any], new: ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """``(field, recorded, now)`` for every experiment field that differs (missing = None)."""
    a, b = experiment_fields(old), experiment_fields(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def recorded_config(run_dir: Path | str | storage.Location) -> dict[str, Any] | None:
    """The config a run name was started with: its record, else (runs older than the record) the
    config in its latest Ray checkpoint; None for a new run name. ``run_dir``: a path or a URI."""
    run_dir = storage.resolve(run_dir)
    record = run_dir / RUN_RECORD
    if record.is_file():
        return yaml.safe_load(record.read_text())
    state = latest_checkpoint(run_dir)
    return None if state is None else state["config"]


def latest_checkpoint(run_dir: Path | str | storage.Location) -> dict[str, Any] | None:
    """The state of the latest complete checkpoint a Ray Train run left in ``run_dir`` (its
    ``checkpoint_*`` folders sort by time), else None. ``run_dir``: a path, a URI or a Location."""
    run_dir = storage.resolve(run_dir)
    found = [run_dir / d / CHECKPOINT_FILE for d in run_dir.children("checkpoint_")]
    found = [f for f in found if f.is_file()]
    if not found:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return checkpoint.load(found[-1].download(Path(tmp) / CHECKPOINT_FILE))


def check_same_experiment(cfg: ExperimentConfig, run_dir: Path | str | storage.Location, run_name: str,
                          allow_change: bool = False) -> list[tuple[str, Any, Any]]:
    """Raise ``ConfigChanged`` listing the differing fields when ``run_name`` was started with another
    config, unless ``allow_change``; returns the differences (empty for a new or the same experiment)."""
    old = recorded_config(run_dir)
    diff = config_diff(old, cfg) if old is not None else []
    if diff and not allow_change:
        shown = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in diff)
        raise ConfigChanged(f"run {run_name!r} exists with another config; resuming it would mix two experiments. "
                            f"Differing fields (recorded -> now):\n{shown}\nUse another run name, or "
                            "--allow-config-change if the change is intended (it is logged to MLflow).")
    return diff


def check_output_folder(cfg: ExperimentConfig, output_dir: str | Path | storage.Location,
                        own: dict[str, Any] | None = None) -> None:
    """Raise ``OutputTaken`` when ``output_dir`` holds results this run would replace without being
    them: a ``config.yaml`` of another experiment (the differing fields are listed), or one that is not
    a run config, or a ``checkpoint.pt`` / ``metrics.json`` beside no ``config.yaml``. Results of the same
    experiment (a re-run, a resume) and of ``own`` (the config this run name was started with: a resume
    with an intended config change) are this run's to replace."""
    target = storage.resolve(output_dir)
    record = target / CONFIG_FILE
    where = f"output folder {target.uri}"
    if not record.is_file():
        found = [n for n in (CHECKPOINT_FILE, METRICS_FILE) if (target / n).is_file()]
        if found:
            raise OutputTaken(f"{where} holds {' and '.join(found)} of an unknown run (no config.yaml beside "
                              "them); this run would replace them. Use another --output-dir, or move those files.")
        return
    try:
        theirs = to_dict(from_dict(yaml.safe_load(record.read_text()) or {}))
    except (ConfigError, yaml.YAMLError, TypeError, AttributeError) as e:
        raise OutputTaken(f"{where} holds a config.yaml that is not a run config ({str(e)[:200]}); this run "
                          "would replace it. Use another --output-dir.") from None
    held = experiment_fields(theirs)
    if held == experiment_fields(cfg) or (own is not None and held == experiment_fields(own)):
        return
    shown = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in config_diff(theirs, cfg))
    raise OutputTaken(f"{where} holds the results of another experiment; this run would replace its checkpoint "
                      f"and metrics. Differing fields (in the folder -> this run):\n{shown}\nUse another "
                      "--output-dir, or remove that run's files first.")


# --------------------------------------------------------------------------------------------
# Fault handling
# --------------------------------------------------------------------------------------------

def is_non_retryable(error: BaseException) -> bool:
    """A failure that recurs on every retry (``NON_RETRYABLE`` or a subclass), by class name: the
    controller may see the worker's exception without the project importable."""
    return any(c.__name__ in NON_RETRYABLE for c in type(error).__mro__)


def _fail_fast_callback():
    """A Ray Train ``UserCallback`` that ends the run at once on a deterministic worker failure.

    Ray 2.60's failure policy retries every worker-group error (up to ``max_failures``) and has no
    per-exception setting. A callback that raises in ``after_exception`` becomes a
    ``ControllerError``, which the default policy never retries (only worker-group start-up
    failures are retryable controller errors); ``fit`` then raises it with the worker's exception
    as its ``controller_failure``.
    """
    from ray.train import UserCallback

    class FailFast(UserCallback):
        def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
            for _, error in sorted(worker_exceptions.items()):
                if is_non_retryable(error):
                    raise error

    return FailFast()


def mlflow_retry(fn: Callable[[], Any], what: str, wait_s: float = MLFLOW_FINAL_WAIT_S, every_s: float = 5.0,
                 stream=None) -> bool:
    """Call ``fn`` until it succeeds or ``wait_s`` has passed (then warn and return False)."""
    deadline, warned = time.monotonic() + wait_s, False
    while True:
        try:
            with _fail_fast_requests(10):
                fn()
            return True
        except Exception as e:  # noqa: BLE001 - tracking must not lose the run's results
            if time.monotonic() >= deadline:
                print(f"warning: MLflow: could not {what} ({type(e).__name__}: {str(e)[:300]}); the results on disk "
                      "are complete", file=stream or sys.stderr, flush=True)
                return False
            if not warned:
                print(f"warning: MLflow unreachable while trying to {what}; retrying for up to {wait_s:.0f} s",
                      file=stream or sys.stderr, flush=True)
                warned = True
            time.sleep(min(every_s, max(0.0, deadline - time.monotonic())))


class _Interrupts:
    """While training: SIGTERM is handled like Ctrl-C (Ray's SIGINT handler aborts the run
    gracefully), and the signal is remembered so that the MLflow run can be marked KILLED."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = None

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum: int, frame) -> None:
        self.signum = signum
        handler = signal.getsignal(signal.SIGINT)  # Ray's, during TorchTrainer.fit
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)
        raise TrainingInterrupted(signum)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def fit(cfg: ExperimentConfig, *, output_dir: str | Path | storage.Location, run_name: str,
        storage_path: str | Path | storage.Location,
        tracking_uri: str | None = None, max_failures: int = DEFAULT_MAX_FAILURES, cpus_per_worker: int | None = None,
        callbacks: list | None = None, mlflow_run_id: str | None = None,
        gpus_per_worker: float | None = None, allow_config_change: bool = False,
        mlflow_wait_s: float = MLFLOW_FINAL_WAIT_S, progress: bool = False) -> dict[str, Any]:
    """Train ``cfg`` with a ``TorchTrainer``; leave checkpoint, metrics, plots and config in ``output_dir``.

    A second call with the same ``run_name`` and ``storage_path`` resumes from the latest checkpoint;
    with another config it raises ``ConfigChanged`` (before anything starts) unless
    ``allow_config_change`` (the change is then logged to the MLflow run). A worker that dies
    restarts the worker group from the last checkpoint up to ``max_failures`` times; a diverged run
    or a bad checkpoint is never retried. SIGINT/SIGTERM stop the run, mark the MLflow run KILLED
    and raise ``TrainingInterrupted`` (SIGTERM) or what Ray raised (SIGINT). An MLflow outage is
    waited out for up to ``mlflow_wait_s`` at the end, then the run finishes with a warning.
    ``gpus_per_worker`` (with ``scaling.use_gpu``) may be a fraction: several sweep trials share a GPU.
    ``output_dir`` and ``storage_path`` are local paths, URIs (``file://``, ``s3://``, ``gs://``: a
    cluster without a shared volume) or ``storage.Location`` (a path in a ``pyarrow.fs`` filesystem).
    ``progress`` shows the run on this process's stdout (``ray_progress``; a bar on a terminal).
    Returns ``{"metrics", "output_dir", "mlflow_run_id", "iteration", "workers"}`` (``workers``: each
    rank's node, from ``workers.json``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    store = storage.resolve(storage_path)
    run_dir = store / run_name
    changes = check_same_experiment(cfg, run_dir, run_name, allow_config_change)
    check_output_folder(cfg, output_dir, own=recorded_config(run_dir) if changes else None)
    if not ray.is_initialized():
        init_ray(log_to_driver=True)
    tracking_uri = tracking_uri or cfg.tracking.tracking_uri or default_tracking_uri()
    run_id = mlflow_run_id or start_mlflow_run(cfg, tracking_uri, run_name)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if changes:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        record = [{"field": k, "recorded": a, "now": b} for k, a, b in changes]
        mlflow_retry(lambda: client.log_dict(run_id, {"resumed_at": stamp, "changes": record},
                                             f"config_changes/{stamp}.json"), "log the config change", mlflow_wait_s)
        mlflow_retry(lambda: client.set_tag(run_id, "config_changed", ", ".join(k for k, _, _ in changes)[:5000]),
                     "tag the config change", mlflow_wait_s)
        print(f"warning: run {run_name!r} resumes with a changed config: "
              + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes), file=sys.stderr, flush=True)
    (run_dir / RUN_RECORD).write_text(dump_yaml(cfg))
    cpus = cpus_per_worker or _cpus_per_worker(cfg)
    ray_path, ray_fs = store.ray_storage()
    board = create_board() if progress else None
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "tracking_uri": tracking_uri, "mlflow_run_id": run_id,
                           "cpus_per_worker": cpus, "mlflow_wait_s": min(60.0, mlflow_wait_s), "progress": board},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": gpus_per_worker}
                                                                          if gpus_per_worker else {})}),
        run_config=RunConfig(name=run_name, storage_path=ray_path, storage_filesystem=ray_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures),
                             logging_config=LoggingConfig(log_level=RAY_TRAIN_LOG_LEVEL),
                             callbacks=[*(callbacks or []), _fail_fast_callback()]),
    )
    interrupts = _Interrupts()
    try:
        with interrupts, (Watcher(board) if board is not None else contextlib.nullcontext()):
            result = trainer.fit()
    except BaseException as e:  # the MLflow run says why it stopped; the caller gets the error
        killed = interrupts.signum is not None or isinstance(e, (KeyboardInterrupt, SystemExit))
        why = (f"stopped by {signal.Signals(interrupts.signum or signal.SIGINT).name}" if killed
               else failure_text(e)[:5000])
        mlflow_retry(lambda: client.set_tag(run_id, "error", why), "record why the run stopped",
                     10.0 if killed else mlflow_wait_s)
        mlflow_retry(lambda: client.set_terminated(run_id, status="KILLED" if killed else "FAILED"),
                     "mark the run KILLED" if killed else "mark the run FAILED", 10.0 if killed else mlflow_wait_s)
        if interrupts.signum is not None and not isinstance(e, TrainingInterrupted):
            raise TrainingInterrupted(interrupts.signum) from e
        raise
    def fill(out: Path) -> None:
        with result.checkpoint.as_directory() as d:
            for f in Path(d).iterdir():
                checkpoint.atomic_copy(f, out / f.name)  # a reader never sees half a file

    target, metrics, workers = deliver_outputs(output_dir, fill, cfg, client, run_id, mlflow_wait_s, tracking_uri)
    return {"metrics": metrics, "output_dir": target.uri, "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
            "iteration": int(result.metrics.get("iteration", cfg.schedule.iterations)), "workers": workers}


def deliver_outputs(output_dir: str | Path | storage.Location, fill: Callable[[Path], None], cfg: ExperimentConfig,
                    client, run_id: str, wait_s: float, tracking_uri: str
                    ) -> tuple[storage.Location, dict[str, Any], list[dict[str, Any]]]:
    """A finished run's results at ``output_dir``: ``fill(folder)`` writes checkpoint, metrics, plots (and
    the unlogged metric values, if any) there, ``config.yaml`` is added, the folder reaches the output
    location, then MLflow gets the artifacts, the model and FINISHED (``_finish_tracking``).
    Returns ``(output location, metrics, workers)``."""
    target = storage.resolve(output_dir)
    staging = storage.Staging(target)  # the output folder itself when local, else a temp folder uploaded below
    try:
        out = staging.dir
        before = storage.file_stamps(out)
        fill(out)
        checkpoint.atomic_write_text(out / CONFIG_FILE, dump_yaml(cfg))
        written = storage.written_since(out, before)
        metrics = json.loads((out / METRICS_FILE).read_text())
        workers = json.loads((out / WORKERS_FILE).read_text()) if (out / WORKERS_FILE).is_file() else []
        staging.finish()  # the results reach the output location before tracking may wait on MLflow
        _finish_tracking(client, run_id, out, wait_s, tracking_uri, written)
        if not (out / UNLOGGED_FILE).exists():  # logged late after all: not left behind at the output location
            (target / UNLOGGED_FILE).delete_file()
    finally:
        staging.close()
    return target, metrics, workers


def _finish_tracking(client, run_id: str, out: Path, wait_s: float, tracking_uri: str, files: list[Path]) -> None:
    """Metric values the worker could not log, ``files`` (what the run wrote in ``out``) as artifacts, the
    checkpoint as a pyfunc model (``service.mlflow_model``), then FINISHED; each waits up to ``wait_s`` for
    an unreachable MLflow, then warns (the files are complete)."""
    from .mlflow_model import log_model

    from mlflow.entities import Metric

    unlogged = out / UNLOGGED_FILE
    if unlogged.is_file():
        rows = [json.loads(line) for line in unlogged.read_text().splitlines() if line.strip()]
        metrics = [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in rows]

        def send() -> None:
            for i in range(0, len(metrics), 500):
                client.log_batch(run_id, metrics=metrics[i:i + 500])

        if mlflow_retry(send, f"log {len(metrics)} buffered metric values", wait_s):
            unlogged.unlink()
    for f in files:
        if f.name.startswith(".") or not f.is_file():  # the buffered metrics' file is gone once they are logged
            continue
        if not mlflow_retry(lambda f=f: client.log_artifact(run_id, str(f), "checkpoint" if f.suffix == ".pt" else None),
                            f"log the artifact {f.name}", wait_s):
            wait_s = 0.0  # do not wait once per file
    if (out / "checkpoint.pt").is_file():
        mlflow_retry(lambda: log_model(tracking_uri, run_id, out / "checkpoint.pt"), "log the pyfunc model", wait_s)
    mlflow_retry(lambda: client.set_terminated(run_id), "mark the run FINISHED", max(wait_s, 10.0))
