"""Ray Tune adapter: one Tune trial per space variant, each trial one Ray Train run (SPEC §6.4, §7.3).

``run_sweep`` runs the variants of a validated space (``service.spaces``) as Tune trials: a
0.01-CPU function trainable that calls ``ray_train.fit`` (the Train V2 pattern of STACK.md) and
reports once at the end. A diverged or failed training run is reported as ``status="failed"``
with its error, and the sweep goes on. Concurrency and per-worker CPUs/GPUs come from
``plan_resources`` so that drivers plus Train workers never exceed the cluster. Each trial's
MLflow run is nested under one parent run per sweep, which receives ``results.parquet``,
``table.md`` (``service.tables``) and the table's cells as metrics. Re-running into the same
output directory resumes (``Tuner.restore``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ConfigError, ExperimentConfig, apply_overrides, flatten, to_dict
from .ray_train import failure_text
from .spaces import Shrink, SpaceError, SweepSpec, Variant
from .tables import FINAL_METRICS, KNOWN_METRICS, Tables, aggregate, write_results

if TYPE_CHECKING:
    import pandas as pd


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


def _trial(config: dict[str, Any], ctx: _TrialContext) -> None:
    """Tune trial: build the variant's config, train it with Ray Train, report once (ok or failed)."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from .ray_train import fit, start_mlflow_run

    v = Variant(**config["variant"])
    cfg = v.config(ctx.shrink)
    scaling = {"scaling.threads_per_worker": cfg.scaling.threads_per_worker or ctx.threads_per_worker}
    if ctx.gpus_per_worker:
        scaling["scaling.use_gpu"] = True
    cfg = apply_overrides(cfg, scaling)
    run_name = f"{ctx.sweep_name}-v{v.id:04d}"
    values = {"preset": v.preset, "seed": cfg.seed, **v.params}
    tags = {"sweep": ctx.sweep_name, "sweep.variant": str(v.id), "sweep.hparams": json.dumps(v.hparams, sort_keys=True),
            **{k: str(values.get(k)) for k in ctx.varying}}
    run_id = start_mlflow_run(cfg, ctx.tracking_uri, run_name, tags=tags, parent_run_id=ctx.parent_run_id)
    row: dict[str, Any] = {"mlflow_run_id": run_id, "run_name": run_name}
    start = time.perf_counter()
    try:
        res = fit(cfg, output_dir=Path(ctx.output_dir) / "trials" / run_name, run_name=run_name,
                  storage_path=Path(ctx.output_dir) / "ray_train", tracking_uri=ctx.tracking_uri,
                  cpus_per_worker=ctx.cpus_per_worker, gpus_per_worker=ctx.gpus_per_worker or None,
                  mlflow_run_id=run_id)
        row.update(status="ok", error="", iteration=res["iteration"], output_dir=res["output_dir"], **res["metrics"])
    except Exception as e:  # noqa: BLE001 - a diverged (TrainingDiverged in a worker) or otherwise failed
        # run is recorded with its error, not retried, and the sweep goes on
        row.update(status="failed", error=failure_text(e))
        client = MlflowClient(ctx.tracking_uri)
        client.set_tag(run_id, "error", row["error"][:5000])
        client.set_terminated(run_id, status="FAILED")
    row["time_s"] = time.perf_counter() - start
    tune.report(row)


DRIVER_CPU = 0.01  # each Tune trial's own reservation (0 raises); STACK.md, Ray Tune


@dataclass(frozen=True)
class ResourcePlan:
    """How many trials run at once and what each trial's Train workers ask Ray for."""

    max_concurrent: int
    cpus_per_worker: float
    threads_per_worker: int
    gpus_per_worker: float


def plan_resources(cpus: float, gpus: float, workers: int, max_concurrent: int | None = None,
                   gpus_per_trial: float = 0.0) -> ResourcePlan:
    """Concurrency and per-worker requests such that the trials that fit never over-subscribe.

    ``fits``: trials whose ``workers`` get at least one whole CPU each (and ``gpus_per_trial``).
    Each of those trials gets ``cpus / min(max_concurrent, fits)`` CPUs, whole CPUs per worker,
    and its 0.01-CPU Tune driver comes out of that share (so 2 trials on 2 CPUs ask for
    0.01 + 0.99 each, not 1.01). Without ``max_concurrent`` exactly ``fits`` trials run at once.
    A larger ``max_concurrent`` is kept (an autoscaling cluster adds nodes for the waiting
    trials; on a fixed cluster they queue, each holding its 0.01 CPU). A GPU request the
    cluster cannot serve raises, unless ``max_concurrent`` is given (GPU nodes still to come).
    """
    if gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial: {gpus_per_trial} is invalid; allowed numbers >= 0")
    if gpus_per_trial and gpus + 1e-9 < gpus_per_trial and max_concurrent is None:
        raise ConfigError(f"--gpus-per-trial: {gpus_per_trial} is more than the Ray cluster's {gpus:g} GPUs; "
                          f"allowed [0, {gpus:g}] (on an autoscaling cluster, also give --max-concurrent)")
    fits = max(1, int(cpus // workers))
    if gpus_per_trial:
        fits = max(1, min(fits, int(gpus / gpus_per_trial + 1e-9)))
    n = max_concurrent or fits
    whole = max(1, int(cpus / min(n, fits) // workers))  # CPUs per Train worker, also its torch threads
    return ResourcePlan(max_concurrent=n,
                        cpus_per_worker=math.floor((whole - DRIVER_CPU / workers) * 1e4) / 1e4,
                        threads_per_worker=whole,
                        gpus_per_worker=gpus_per_trial / workers)


def resolve_shrink(spec: SweepSpec, shrink: Shrink | None) -> Shrink:
    """The command line's ``--smoke``/``--quick``, else the space's ``smoke:``, else the full schedule."""
    return shrink or ("smoke" if spec.smoke else "full")


def _resumed_state(out: Path, spec: SweepSpec, shrink: Shrink, name: str | None,
                   tracking_uri: str | None) -> dict[str, Any] | None:
    """``out/sweep.json`` of the same sweep (to resume), None for a new one; refuses a different sweep."""
    state_file = out / "sweep.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    if (state["space_sha256"], state["shrink"]) != (hashlib.sha256(spec.text.encode()).hexdigest(), shrink):
        raise SpaceError(f"{spec.source}: {out} holds a different sweep ({state['source']}, {state['shrink']}); "
                         "use a new --output-dir")
    if name and name != state["name"]:
        raise SpaceError(f"--name {name!r}: {out} holds the sweep {state['name']!r}; resume it with that name "
                         "or use a new --output-dir")
    if tracking_uri and tracking_uri != state["tracking_uri"]:
        raise SpaceError(f"--tracking-uri {tracking_uri!r}: {out} is tracked in {state['tracking_uri']!r}; "
                         "resume with that one (or without the flag) or use a new --output-dir")
    return state


def _new_state(out: Path, spec: SweepSpec, shrink: Shrink, tracking_uri: str, experiment: str,
               name: str | None) -> dict[str, Any]:
    """Create the sweep's parent MLflow run and ``out/sweep.json`` (what a resume needs)."""
    from mlflow.tracking import MlflowClient

    from .ray_train import ensure_experiment

    client = MlflowClient(tracking_uri)
    exp_id = ensure_experiment(tracking_uri, experiment)
    base = name or spec.name
    # the timestamp keeps trial run names (``<sweep>-v0001``) unique in a shared tracking store
    sweep_name = f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(exp_id, run_name=sweep_name, tags={"sweep": sweep_name, "sweep.space": spec.source,
                                                               "sweep.shrink": shrink})
    for key, value in {"space": spec.source, "metric": spec.metric, "mode": spec.mode, "shrink": shrink,
                       "trials": len(spec.variants), "varying": ",".join(spec.varying)}.items():
        client.log_param(run.info.run_id, f"sweep.{key}", value)
    state = {"name": base, "sweep_name": sweep_name, "parent_run_id": run.info.run_id, "source": spec.source,
             "space_sha256": hashlib.sha256(spec.text.encode()).hexdigest(), "shrink": shrink,
             "tracking_uri": tracking_uri, "metric": spec.metric, "mode": spec.mode}
    (out / "space.yaml").write_text(spec.text)
    (out / "sweep.json").write_text(json.dumps(state, indent=2))
    return state


def _trial_name(trial: Any) -> str:
    return f"v{trial.config['variant']['id']:04d}"


def run_sweep(spec: SweepSpec, *, output_dir: str | Path, shrink: Shrink | None = None,
              max_concurrent: int | None = None, gpus_per_trial: float = 0.0, tracking_uri: str | None = None,
              name: str | None = None) -> "pd.DataFrame":
    """Run every variant as a Tune trial; write ``results.parquet`` and ``table.md``; return the frame.

    Re-running with the same ``output_dir`` resumes an interrupted sweep (``Tuner.restore``):
    finished and failed trials are kept, unfinished ones run again and their Ray Train runs
    continue from their latest checkpoints. ``shrink=None`` uses the space's ``smoke:``.
    ``gpus_per_trial`` goes to the trial's Train workers (fractions pack several trials on one
    GPU). Uses the running Ray (``RAY_ADDRESS``) or starts a local one.
    """
    import ray
    from ray import tune

    from .ray_train import default_tracking_uri

    shrink = resolve_shrink(spec, shrink)
    configs = spec.configs(shrink)  # every variant validated before Ray starts
    out = Path(output_dir).resolve()
    state = _resumed_state(out, spec, shrink, name, tracking_uri)
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    workers = max(c.scaling.workers for c in configs)
    plan = plan_resources(resources.get("CPU", 0), resources.get("GPU", 0), workers, max_concurrent, gpus_per_trial)
    if state is None:  # nothing is written before the checks above
        out.mkdir(parents=True, exist_ok=True)
        state = _new_state(out, spec, shrink, tracking_uri or default_tracking_uri(),
                           configs[0].tracking.experiment, name)
    tracking_uri = state["tracking_uri"]
    print(f"sweep: {len(spec.variants)} trials, {plan.max_concurrent} at a time; each Train worker asks for "
          f"{plan.cpus_per_worker:g} CPU ({plan.threads_per_worker} torch threads)"
          + (f" and {plan.gpus_per_worker:g} GPU" if plan.gpus_per_worker else "")
          + f"; the cluster has {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
    ctx = _TrialContext(output_dir=str(out), tracking_uri=tracking_uri, parent_run_id=state["parent_run_id"],
                        sweep_name=state["sweep_name"], shrink=shrink, varying=spec.varying,
                        cpus_per_worker=plan.cpus_per_worker, threads_per_worker=plan.threads_per_worker,
                        gpus_per_worker=plan.gpus_per_worker)
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"cpu": DRIVER_CPU})
    path = out / "tune" / "sweep"
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"variant": tune.grid_search([dataclasses.asdict(v) for v in spec.variants])},
            tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name="sweep", storage_path=str(out / "tune"), verbose=1),
        )
    grid = tuner.fit()
    reported = {r.config["variant"]["id"]: (r.metrics or {}, r.error) for r in grid}
    df = results_frame(spec, configs, reported)
    tables = aggregate(df, metric=spec.metric, mode=spec.mode)
    write_results(df, tables, out)
    _finish_parent(tracking_uri, state["parent_run_id"], out, df, tables)
    return df


def _finish_parent(tracking_uri: str, run_id: str, out: Path, df: "pd.DataFrame", tables: "Tables") -> None:
    """The parent run holds the aggregate: results.parquet, table.md, the space, and the table's cells."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for name in ("results.parquet", "table.md", "space.yaml"):
        client.log_artifact(run_id, str(out / name))
    client.log_metric(run_id, "sweep/trials_ok", float((df["status"] == "ok").sum()))
    client.log_metric(run_id, "sweep/trials_failed", float((df["status"] == "failed").sum()))
    client.log_metric(run_id, "sweep/trials_incomplete", float((df["status"] == "incomplete").sum()))
    for r in tables.summary.itertuples():  # e.g. table/8gaussians/mog-ip-lc/hist_kl_mean
        for stat in ("mean", "se"):
            if not math.isnan(getattr(r, stat)):
                client.log_metric(run_id, f"table/{r.dataset}/{r.configuration}/{r.metric}_{stat}", getattr(r, stat))
    # an interrupted sweep's parent is KILLED until a resumed run completes it
    client.set_terminated(run_id, status="KILLED" if (df["status"] == "incomplete").any() else "FINISHED")


def results_frame(spec: SweepSpec, configs: list[ExperimentConfig],
                  reported: dict[int, tuple[dict[str, Any], BaseException | None]]) -> "pd.DataFrame":
    """One row per variant: identity, status/error, final metrics, and the flattened config."""
    import pandas as pd

    rows = []
    for v, cfg in zip(spec.variants, configs):
        metrics, error = reported.get(v.id, ({}, None))
        status = metrics.get("status") or ("failed" if error is not None else "incomplete")
        err = metrics.get("error") or (failure_text(error) if error is not None else "")
        if status == "incomplete":
            err = "not finished (the sweep was interrupted); run the same command again to resume"
        dataset, _, configuration = v.preset.partition("/")
        row = {"variant": v.id, "preset": v.preset, "dataset": dataset, "configuration": configuration,
               "seed": cfg.seed, "hparams": json.dumps(v.hparams, sort_keys=True), "status": status, "error": err}
        row.update({m: float(metrics.get(m, math.nan)) for m in FINAL_METRICS})  # 2D columns always
        row.update({m: float(metrics[m]) for m in KNOWN_METRICS if m in metrics and m not in row})
        row.update({k: metrics.get(k) for k in ("time_s", "iteration", "mlflow_run_id", "run_name", "output_dir")})
        row.update({f"config.{k}": json.dumps(x) if isinstance(x, list) else x
                    for k, x in flatten(to_dict(cfg)).items()})
        rows.append(row)
    return pd.DataFrame(rows)


