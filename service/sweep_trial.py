"""One Tune trial of a sweep: a variant's config trained by one Ray Train run, or with one worker in the
trial's own process (``service.sweep_in_trial``, when ``_TrialContext.in_trial``) (``service.tuning``).

- ``_trial`` is the function trainable: it builds the variant's config (``trial_config``), starts the
  trial's MLflow run under the sweep's parent, calls ``ray_train.fit`` and reports the final row
  (status, metrics, error) to Tune.
- Intermediate reports: rank 0 logs ``eval/*`` to MLflow every ``schedule.eval_every`` iterations;
  ``_eval_forwarder`` (a Ray Train callback in the Train controller) forwards them to Tune at the
  next Train report, so a scheduler can stop the trial on them. Every Train report (checkpoint) also
  reaches Tune as a progress row (``PROGRESS_KEY``, no ``iteration``: schedulers skip it), so the
  sweep's console shows each trial's iterations while a long stage runs without evaluations.
- Failures: ``failure_kind`` tells a diverged run and other deterministic errors (final) from a lost
  worker, node or controller (``"infrastructure"``: ``fit`` again, resuming from the last
  checkpoint, ``INFRA_RETRIES`` times).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import ExperimentConfig, apply_overrides, flatten, to_dict
from .ray_train import failure_text
from .selection import SCORE_KEY, Selection
from .spaces import OPTIONAL_METRICS, Shrink, Variant
from .tables import FINAL_METRICS

REPORTED = tuple(dict.fromkeys(FINAL_METRICS + OPTIONAL_METRICS))  # eval/* names forwarded to Tune
INFRA_RETRIES = 2  # fit() again (resuming from the last checkpoint) after a lost worker/node/controller
RETRY_WAIT_S = 10.0  # before fit() again after an infrastructure failure
# the iteration a trial's training has reached, in every row it reports to Tune; progress rows carry it
# without ``iteration`` (ASHA's time attribute), so no scheduler ranks them
PROGRESS_KEY = "at_iteration"


@dataclass(frozen=True)
class _TrialContext:
    output_dir: str
    tracking_uri: str
    parent_run_id: str
    sweep_name: str
    shrink: Shrink
    varying: tuple[str, ...]
    cpus_per_worker: float  # Ray resource per Train worker (the trial's share minus its driver's 0.01)
    threads_per_worker: int  # torch threads per Train worker (its whole CPUs)
    gpus_per_worker: float
    metric: str = "hist_kl"
    select: Selection = field(default_factory=Selection)  # adds SCORE_KEY to every report when constrained
    stage: int = 1
    stage_name: str = "sweep"
    stage_overrides: dict[str, Any] = field(default_factory=dict)
    variants: tuple[dict[str, Any], ...] = ()  # the stage's variants (``dataclasses.asdict``), by id
    run_prefix: str = ""  # "" for a plain space, "s2-" for stage 2 (MLflow / Ray Train run names)
    retries: int = INFRA_RETRIES
    storage: Any = None  # ``storage.Location`` of the Tune/Train storage and trial outputs; None: ``output_dir``
    in_trial: bool = False  # train the one worker in this process (``sweep_in_trial``), not through Ray Train


def trial_config(v: Variant, shrink: Shrink, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """The variant's config in a stage, with a checkpoint (a Train report) at every evaluation."""
    cfg = v.config(shrink, overrides)
    s = cfg.schedule
    if s.eval_every and (not s.checkpoint_every or s.eval_every % s.checkpoint_every):
        cfg = apply_overrides(cfg, {"schedule.checkpoint_every": math.gcd(s.eval_every, s.checkpoint_every)})
    return cfg


def config_sha(cfg: ExperimentConfig) -> str:
    """16 hex digits over the whole flattened config: equal configs train identically (reuse key)."""
    text = json.dumps(flatten(to_dict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _walk_errors(e: BaseException) -> list[BaseException]:
    """The exceptions behind a failed ``fit``: worker failures, the controller's, causes, unwrapped."""
    out, todo, seen = [], [e], set()
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        out.append(err)
        todo += list(getattr(err, "worker_failures", {}).values())
        todo += [getattr(err, name, None) for name in ("controller_failure", "health_check_failure", "cause",
                                                       "__cause__", "_base_exc")]
    return out


def failure_kind(e: BaseException) -> str:
    """``diverged`` (a ``TrainingDiverged`` anywhere: final), ``infrastructure`` (a lost worker, node,
    controller or object, a worker that could not be started or scheduled: retried from the last
    checkpoint) or ``error`` (any other exception of the training code: final, it would recur)."""
    import ray.exceptions as rex

    names = ("RayActorError", "NodeDiedError", "WorkerCrashedError", "ObjectLostError", "OutOfMemoryError",
             "RaySystemError", "ActorUnschedulableError", "TaskUnschedulableError", "LocalRayletDiedError",
             "ObjectStoreFullError", "OutOfDiskError", "ObjectFetchTimedOutError", "RpcError")
    infra: tuple[type, ...] = tuple(getattr(rex, n) for n in names if hasattr(rex, n))
    try:
        from ray.train.v2._internal.exceptions import (WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError,
                                                       WorkerHealthCheckFailedError)
        from ray.train.v2.api.exceptions import PreemptionError

        infra += (WorkerHealthCheckFailedError, WorkerGroupStartupTimeoutError, WorkerGroupStartupFailedError,
                  PreemptionError)
    except ImportError:  # another Ray version: the ray.exceptions above still classify
        pass
    errors = _walk_errors(e)
    names = {c.__name__ for err in errors for c in type(err).__mro__}
    names |= {getattr(err, "cause_cls", type(None)).__name__ for err in errors}
    if "TrainingDiverged" in names:
        return "diverged"
    if any(isinstance(err, infra) for err in errors):
        return "infrastructure"
    return "error"


def new_evaluations(client: Any, run_id: str, after: int, before: int) -> list[dict[str, Any]]:
    """The intermediate evaluations rank 0 logged to MLflow (``eval/<name>`` at step ``iteration``)
    with ``after < iteration < before``, oldest first: ``[{"iteration": 1000, "hist_kl": ...}, ...]``.

    One history per metric name, so an evaluation logged while they are read would come out partly
    (``hist_kl`` missing, later names present) and never be forwarded whole. Each evaluation is logged in
    one batch (one transaction), so the steps seen in a first read are complete in a second one; steps
    that appear only in the second read wait for the next call.
    """
    def read() -> dict[str, dict[int, float]]:
        return {name: {int(m.step): float(m.value) for m in client.get_metric_history(run_id, f"eval/{name}")
                       if after < m.step < before} for name in REPORTED}

    steps = sorted(set().union(*read().values()))
    history = read()
    return [{"iteration": s, **{n: h[s] for n, h in history.items() if s in h}} for s in steps]


def _scored(row: dict[str, Any], select: Selection) -> dict[str, Any]:
    """``row`` with the scheduler's ranking value (``Selection.score``) where the selection is constrained."""
    return {**row, SCORE_KEY: select.score(row)} if select.where else row


def _eval_forwarder(tracking_uri: str, run_id: str, metric: str, iterations: int, constants: dict[str, Any],
                    select: Selection | None = None, evaluations: bool = True):
    """A Ray Train callback (it runs in the Train controller) that reports each Train report (checkpoint)
    to the Tune trial as a progress row and, with ``evaluations``, forwards each new intermediate
    evaluation that came before it.

    A progress row has ``PROGRESS_KEY`` and the last evaluation's values but no ``iteration``, so a
    scheduler skips it (ASHA ignores a result without its time attribute), and it goes first: the
    trial's last row at a checkpoint is its newest evaluation, the one a scheduler stops it on."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalForwarder(TuneReportCallback):
        def __init__(self) -> None:
            TuneReportCallback.__init__(self)  # grabs the Tune session's queue (in the trial)
            self.after, self.client, self.last = -1, None, {}

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if not metrics or metrics[0].get("final"):
                return  # the final values reach Tune in the trial's own last report
            at = metrics[0].get("iteration")
            if at is not None:
                progress = {metric: math.nan, **self.last, **constants, PROGRESS_KEY: int(at)}
                TuneReportCallback.after_report(self, run_context, [_scored(progress, select or Selection(metric))],
                                                None)
            if not evaluations:
                return
            try:
                if self.client is None:
                    from mlflow.tracking import MlflowClient

                    self.client = MlflowClient(tracking_uri)
                found = new_evaluations(self.client, run_id, self.after, iterations)
            except Exception as e:  # noqa: BLE001 - tracking hiccup: forwarded at the next report
                print(f"warning: could not read the evaluations of {run_id} from MLflow ({e!r:.300})", file=sys.stderr)
                return
            for report in found:
                self.last = {k: x for k, x in report.items() if k != "iteration"}
                report = _scored({metric: math.nan, **report, **constants, PROGRESS_KEY: report["iteration"]},
                                 select or Selection(metric))
                TuneReportCallback.after_report(self, run_context, [report], None)
                self.after = report["iteration"]

    return EvalForwarder()


def _tune_reporter(metric: str, constants: dict[str, Any], select: Selection):
    """``report(iteration, evaluations, folder)`` for ``sweep_in_trial``: at a checkpoint, Tune gets the
    trial's progress row, then each new evaluation, as ``_eval_forwarder`` sends them from Ray Train; the
    checkpoint (``folder``) goes with the last of those rows."""
    from ray import tune

    last: dict[str, Any] = {}

    def report(at: int, evaluations: list[dict[str, Any]], folder: Path) -> None:
        rows = [{metric: math.nan, **last, **constants, PROGRESS_KEY: int(at)}]
        for found in evaluations:
            last.clear()
            last.update((k, x) for k, x in found.items() if k != "iteration")
            rows.append({metric: math.nan, **found, **constants, PROGRESS_KEY: found["iteration"]})
        rows = [_scored(r, select) for r in rows]
        for r in rows[:-1]:
            tune.report(r)
        tune.report(rows[-1], checkpoint=tune.Checkpoint.from_directory(str(folder)))

    return report


def _tune_is_stopping() -> bool:
    """Whether Tune is stopping this trial (a scheduler decision): its session's stop event is set.

    Tune tears the trial's Ray Train run down while it stops the trial, which ``fit`` sees as a dead
    actor; that must not be retried."""
    try:
        from ray.train._internal.session import get_session

        session = get_session()
        return bool(session is not None and session.stop_event.is_set())
    except (ImportError, AttributeError):
        return False


def _fit_here(cfg: ExperimentConfig, *, output_dir: Any, run_name: str, storage_path: Any, tracking_uri: str,
              mlflow_run_id: str, callbacks: list, **_: Any) -> dict[str, Any]:
    """``ray_train.fit``'s call, answered by ``sweep_in_trial.fit_in_trial`` (``callbacks``: its report function)."""
    from .sweep_in_trial import fit_in_trial

    return fit_in_trial(cfg, output_dir=output_dir, run_name=run_name, storage_path=storage_path,
                        tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id, report=callbacks[0], reported=REPORTED)


def _trial(config: dict[str, Any], ctx: _TrialContext, fit: Callable[..., dict[str, Any]] | None = None) -> None:
    """Tune trial: build the variant's config, train it with Ray Train or, with ``ctx.in_trial``, in this
    process (intermediate evaluations reach Tune either way), retry infrastructure failures, report the
    final row (ok or failed)."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from .ray_train import start_mlflow_run

    if fit is None and ctx.in_trial:
        fit = _fit_here
    elif fit is None:
        from .ray_train import fit
    raw = config["variant"]
    v = Variant(**(ctx.variants[raw] if isinstance(raw, int) else raw))  # a dict: sweeps started before stages
    cfg = trial_config(v, ctx.shrink, ctx.stage_overrides)
    scaling = {"scaling.threads_per_worker": cfg.scaling.threads_per_worker or ctx.threads_per_worker}
    if ctx.gpus_per_worker:
        scaling["scaling.use_gpu"] = True
    cfg = apply_overrides(cfg, scaling)
    run_name = f"{ctx.sweep_name}-{ctx.run_prefix}v{v.id:04d}"
    values = {"preset": v.preset, "seed": cfg.seed, **v.params}
    tags = {"sweep": ctx.sweep_name, "sweep.variant": str(v.id), "sweep.hparams": json.dumps(v.hparams, sort_keys=True),
            "sweep.stage": ctx.stage_name, **{k: str(values.get(k)) for k in ctx.varying}}
    run_id = start_mlflow_run(cfg, ctx.tracking_uri, run_name, tags=tags, parent_run_id=ctx.parent_run_id)
    row: dict[str, Any] = {"mlflow_run_id": run_id, "run_name": run_name}
    start, attempts = time.perf_counter(), 0
    while True:
        attempts += 1
        evaluations = bool(cfg.schedule.eval_every) and cfg.schedule.unit == "iterations"
        if ctx.in_trial:
            callbacks = [_tune_reporter(ctx.metric, dict(row), ctx.select)]  # the runner's report function
        else:
            callbacks = [_eval_forwarder(ctx.tracking_uri, run_id, ctx.metric, cfg.schedule.iterations, dict(row),
                                         ctx.select, evaluations=evaluations)]
        base = ctx.storage or Path(ctx.output_dir)  # a Location on a cluster without a shared volume
        try:
            res = fit(cfg, output_dir=base / "trials" / run_name, run_name=run_name,
                      storage_path=base / "ray_train", tracking_uri=ctx.tracking_uri,
                      cpus_per_worker=ctx.cpus_per_worker, gpus_per_worker=ctx.gpus_per_worker or None,
                      mlflow_run_id=run_id, callbacks=callbacks)
            row.update(status="ok", error="", failure="", iteration=res["iteration"], output_dir=res["output_dir"],
                       **res["metrics"])
            row[PROGRESS_KEY] = res["iteration"]
            break
        except Exception as e:  # noqa: BLE001 - recorded with its error; the sweep goes on
            kind = failure_kind(e)
            if kind == "infrastructure" and _tune_is_stopping():
                return  # the scheduler stopped this trial (its Train run went with it): the last report stands
            if kind == "infrastructure" and attempts <= ctx.retries:
                time.sleep(RETRY_WAIT_S)  # a trial being stopped by Tune is killed meanwhile; a lost node is replaced
                if _tune_is_stopping():
                    return
                print(f"{run_name}: {failure_text(e)[:300]}; infrastructure failure {attempts}/{ctx.retries}: "
                      "resuming from the last checkpoint", file=sys.stderr, flush=True)
                continue
            row.update(status="failed", error=failure_text(e), failure=kind)  # diverged/error: it would recur
            client = MlflowClient(ctx.tracking_uri)
            client.set_tag(run_id, "error", row["error"][:5000])
            client.set_terminated(run_id, status="FAILED")
            break
    row["attempts"] = attempts
    row["time_s"] = time.perf_counter() - start
    row.setdefault(ctx.metric, math.nan)  # every Tune result carries the scheduler's metric
    tune.report(_scored(row, ctx.select))
