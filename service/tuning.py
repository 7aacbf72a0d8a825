"""Ray Tune adapter: one Tune trial per space variant (SPEC §6.4, §7.3).

``run_sweep`` runs the variants of a validated space (``service.spaces``) as Tune trials. A trial of
several Train workers is a 0.01-CPU function trainable that calls ``ray_train.fit`` (the Train V2
pattern of STACK.md); a trial of one worker trains in its own process (``service.sweep_in_trial``:
the same outputs and reports without a Ray Train run's seven processes), unless the space says
``trial_runner: ray_train``. A stage keeps the runner it started with when it is resumed.

- **Intermediate reports.** Rank 0 evaluates every ``schedule.eval_every`` iterations and logs
  ``eval/*`` to the trial's MLflow run. A Ray Train callback (``TuneReportCallback``, which runs in
  the Train controller) reads those new values at every Train report and forwards them to Tune as
  ``{iteration, hist_kl, hist_jsd, gnelbo_x1e7, ...}``; so a scheduler (ASHA) can stop a trial on
  them with ``iteration`` as its time attribute. Checkpoints are taken at every evaluation (the
  trial's ``checkpoint_every`` becomes ``gcd(checkpoint_every, eval_every)``) so reports are prompt.
  The trial's last report is its final row (status, metrics, error).
- **Columns.** Tune's config holds the variant id plus every hyperparameter as its own key
  (``preset``, ``seed``, ``objective.beta_kl``, ...): Tune's dataframe, progress table and
  ``results.parquet`` show them as columns.
- **Failures.** A diverged run (``TrainingDiverged``) or any other deterministic error is final
  (``status="failed"``, ``failure`` diverged/error): it would fail again. A lost worker, node or
  controller (``failure="infrastructure"``) is retried by calling ``fit`` again, which resumes
  the Ray Train run from its last checkpoint (``INFRA_RETRIES`` times); a Tune trial whose own
  actor dies is restarted by Tune (``FailureConfig``) and resumes the same way.
- **Stages.** A staged space runs its stages in order; each later stage's variants are the
  ``top_k`` settings of the previous stage (``spaces.pick_candidates``), saved before it starts. A
  trial whose config equals a finished (or diverged) trial of an earlier stage is not run again:
  its row is reused (``reused_from``). Re-running the command continues where it stopped.
- **Lock.** ``out/sweep.lock`` (pid, host) keeps a second sweep out of a folder in use; a lock
  left by a dead process is taken over.

The trial itself is ``service.sweep_trial``, the lock ``service.sweep_lock``, the console table, results
rows, ``selection.md`` and the parent run's aggregate ``service.sweep_report``; concurrency and
per-worker CPUs/GPUs come from ``service.sweep_resources.plan_resources``. Each trial's MLflow run is
nested under one parent run per sweep, which receives ``results.parquet``, ``table.md``
(``service.tables``), the selection, and the table's cells as metrics.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import ConfigError, ExperimentConfig
from .ray_env import init_ray
from .selection import constrained_frame, pick_candidates
from .spaces import Shrink, SpaceError, Stage, SweepSpec, Variant, first_rung, stage_variants
from .sweep_lock import SweepLock
from .sweep_resources import DRIVER_CPU, ResourcePlan, plan_resources
from .sweep_report import (PROGRESS_FILE, close_stopped, finish_parent, progress_reporter, results_frame, scalar,
                           selection_markdown)
from .sweep_trial import _trial, _TrialContext, config_sha, trial_config
from .tables import aggregate, write_results

if TYPE_CHECKING:
    import pandas as pd

TUNE_MAX_FAILURES = 2  # Tune restarts of a trial whose own actor died
IN_TRIAL = "in_trial"  # a stage's trials train in their own process (service.sweep_in_trial)


def resolve_shrink(spec: SweepSpec, shrink: Shrink | None) -> str:
    """The command line's ``--smoke``/``--quick``, else the space's ``smoke:``, else the full schedule;
    ``"stages"`` for a staged space without a command-line shrink (each stage says its own)."""
    if spec.is_staged:
        return shrink or "stages"
    return shrink or spec.default_shrink()


# --------------------------------------------------------------------------------------------
# Sweep state (resume) and progress
# --------------------------------------------------------------------------------------------

def _resumed_state(out: Path, spec: SweepSpec, shrink: str, name: str | None,
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


def _new_state(out: Path, spec: SweepSpec, shrink: str, tracking_uri: str, experiment: str,
               name: str | None, storage: str | None = None) -> dict[str, Any]:
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
    params = {"space": spec.source, "metric": spec.metric, "mode": spec.mode, "shrink": shrink,
              "trials": len(spec.variants), "varying": ",".join(spec.varying)}
    if spec.select.where:
        params["where"] = spec.select.describe_where()
    if spec.is_staged:
        params["stages"] = ",".join(s.name for s in spec.stages)
    for key, value in params.items():
        client.log_param(run.info.run_id, f"sweep.{key}", value)
    state = {"name": base, "sweep_name": sweep_name, "parent_run_id": run.info.run_id, "source": spec.source,
             "space_sha256": hashlib.sha256(spec.text.encode()).hexdigest(), "shrink": shrink,
             "tracking_uri": tracking_uri, "metric": spec.metric, "mode": spec.mode, "select": spec.select.to_dict(),
             "searched": list(spec.searched), "storage": storage}
    (out / "space.yaml").write_text(spec.text)
    (out / "sweep.json").write_text(json.dumps(state, indent=2))
    return state


def _load_progress(out: Path) -> dict[str, Any]:
    path = out / PROGRESS_FILE
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def _save_progress(out: Path, progress: dict[str, Any]) -> None:
    tmp = out / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps(progress, indent=2, default=str))
    os.replace(tmp, out / PROGRESS_FILE)


def _trial_name(trial: Any) -> str:
    raw = trial.config["variant"]
    return f"v{raw if isinstance(raw, int) else raw['id']:04d}"


def _column(config: dict[str, Any], table: dict[int, dict[str, Any]], key: str) -> Any:
    """``tune.sample_from`` body: the variant's value of one hyperparameter column."""
    return table[config["variant"]].get(key)


# --------------------------------------------------------------------------------------------
# Running a sweep
# --------------------------------------------------------------------------------------------

def run_sweep(spec: SweepSpec, *, output_dir: str | Path, shrink: Shrink | None = None,
              max_concurrent: int | None = None, gpus_per_trial: float = 0.0, tracking_uri: str | None = None,
              name: str | None = None, storage_path: Any = None, storage_filesystem: Any = None) -> "pd.DataFrame":
    """Run every stage's variants as Tune trials; write ``results.parquet`` and ``table.md``; return the frame.

    Re-running with the same ``output_dir`` resumes an interrupted sweep: finished stages are kept,
    a stage's finished, stopped and failed trials are kept (``Tuner.restore``), unfinished ones run
    again and their Ray Train runs continue from their latest checkpoints. ``shrink`` (the command
    line's) overrides every stage's; ``None`` uses the stage's, else the space's ``smoke:``.
    ``gpus_per_trial`` goes to the trial's Train workers (fractions pack several trials on one
    GPU). Uses the running Ray (``RAY_ADDRESS``) or starts a local one. A second sweep on the same
    ``output_dir`` raises ``SweepLocked``. ``storage_path`` (a path or URI such as ``s3://bucket/sweep``;
    with ``storage_filesystem``, a path in that ``pyarrow.fs`` filesystem) holds Tune's and Ray Train's
    storage and the trials' outputs, for a cluster without a shared volume; default ``output_dir``.
    The sweep's own files (results.parquet, tables, lock, state) stay in ``output_dir`` on the driver.
    """
    import pandas as pd
    import ray

    from .ray_train import default_tracking_uri

    from . import storage

    spec.validate(shrink)  # every stage's variants and schedulers, before Ray starts
    try:
        store = storage.resolve(storage_path, storage_filesystem) if storage_path is not None else None
    except ValueError as e:
        raise ConfigError(f"--storage: {e}") from None
    stages = spec.plan(shrink)
    label = resolve_shrink(spec, shrink)
    out = Path(output_dir).resolve()
    state = _resumed_state(out, spec, label, name, tracking_uri)
    if state is not None and state.get("storage") != (store.uri if store else None):  # Tune restores from there
        raise SpaceError(f"--storage {store.uri if store else None!r}: {out} keeps its trials in "
                         f"{state.get('storage') or str(out)!r}; resume with that storage or use a new --output-dir")
    with SweepLock(out):
        if not ray.is_initialized():
            init_ray()
        resources = ray.cluster_resources()
        workers = max(c.scaling.workers for stage, sh in stages for c in spec.configs(sh, stage))

        def replan(n: int | None) -> ResourcePlan:
            return plan_resources(resources.get("CPU", 0), resources.get("GPU", 0), workers, n, gpus_per_trial)

        plan = replan(max_concurrent)
        if len(spec.variants) < plan.max_concurrent:  # fewer trials than slots: each gets a larger share
            plan = replan(len(spec.variants))
        if state is None:  # nothing is written before the checks above
            state = _new_state(out, spec, label, tracking_uri or default_tracking_uri(),
                               spec.configs(stages[0][1], stages[0][0])[0].tracking.experiment, name,
                               store.uri if store else None)
        n = len(spec.variants)
        gpus = f" and {plan.gpus_per_worker:g} GPU" if plan.gpus_per_worker else ""
        if trial_runner(spec, workers) == IN_TRIAL:  # every stage's trials have one worker
            cpus = round(plan.cpus_per_worker + DRIVER_CPU, 4)
            each = (f"each trains its one worker in its own process on {cpus:g} CPU{'s' if cpus != 1 else ''}"
                    f"{gpus} ({plan.threads_per_worker} torch thread{'s' if plan.threads_per_worker != 1 else ''})")
        else:
            each = f"each Train worker asks for {plan.cpus_per_worker:g} CPU{gpus} ({plan.threads_per_worker} torch threads)"
        print(f"sweep: {n} trial{'s' if n != 1 else ''}" + (f" in stage 1 of {len(stages)}" if spec.is_staged else "")
              + f", up to {plan.max_concurrent} at a time; {each}; the cluster has {resources.get('CPU', 0):g} CPUs, "
              f"{resources.get('GPU', 0):g} GPUs")
        progress = _load_progress(out)
        frames: list[pd.DataFrame] = []
        for stage, sh in stages:
            entry = progress["stages"].setdefault(stage.name, {"index": stage.index, "shrink": sh, "wall_s": 0.0})
            if stage.index == 1:
                variants = list(spec.variants)
            else:
                variants = _stage_inputs(out, spec, stage, frames[-1], entry)
                if not variants:
                    entry["note"] = f"not run: stage {stage.index - 1} has no completed trial to select from"
                    print(f"sweep: stage {stage.name}: {entry['note']}", file=sys.stderr)
                    break
            df = _run_stage(spec, stage, sh, variants, frames, out, state, plan, progress, store, replan)
            frames.append(df)
            if (df["status"] == "incomplete").any():
                break  # later stages need this one finished: run the same command again
        df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        last = frames[-1]
        tables = aggregate(constrained_frame(last, spec.select), metric=spec.metric, mode=spec.mode)
        write_results(df, tables, out)
        selection = selection_markdown(spec, frames, progress)
        (out / "selection.md").write_text(selection)
        _save_progress(out, progress)
        finish_parent(state["tracking_uri"], state["parent_run_id"], out, df, tables, len(frames) < len(stages))
    df.attrs["stages_run"] = len(frames)
    df.attrs["stages"] = len(stages)
    return df


def _stage_inputs(out: Path, spec: SweepSpec, stage: Stage, previous: "pd.DataFrame",
                  entry: dict[str, Any]) -> list[Variant]:
    """A later stage's variants: its saved candidates (a resume), else the previous stage's top_k
    settings (``pick_candidates``) with the stage's seeds, saved before anything runs."""
    folder = out / "stages" / f"{stage.index}-{stage.name}"
    saved = folder / "candidates.json"
    if saved.is_file():
        data = json.loads(saved.read_text())
        return [Variant(**v) for v in data["variants"]]
    picks, notes = pick_candidates(previous, spec.select, stage.top_k or 1)
    variants = stage_variants(picks, stage.seeds)
    folder.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"picks": picks, "notes": notes, "select": spec.select.to_dict(),
                                 "variants": [asdict(v) for v in variants]}, indent=2, default=str))
    entry.update(picks=picks, notes=notes)
    for note in notes:
        print(f"sweep: stage {stage.name}: {note}", file=sys.stderr)
    print(f"sweep: stage {stage.name}: {len(picks)} settings from stage {stage.index - 1} "
          f"(top {stage.top_k} by {spec.select.mode} {spec.metric}"
          + (f" where {spec.select.describe_where()}" if spec.select.where else "") + f") -> {len(variants)} trials")
    return variants


def _run_stage(spec: SweepSpec, stage: Stage, shrink: Shrink, variants: list[Variant], earlier: list["pd.DataFrame"],
               out: Path, state: dict[str, Any], plan: ResourcePlan, progress: dict[str, Any],
               store: Any, replan: Callable[[int], ResourcePlan]) -> "pd.DataFrame":
    """One stage: reuse rows of identical earlier trials, run the others as Tune trials, return its frame."""
    import pandas as pd

    entry = progress["stages"][stage.name]
    staged = spec.is_staged
    folder = out / "stages" / f"{stage.index}-{stage.name}"
    if staged and entry.get("complete") and (folder / "results.parquet").is_file():
        print(f"sweep: stage {stage.name} finished earlier; kept")
        return pd.read_parquet(folder / "results.parquet")
    configs = []
    for v in variants:
        try:
            configs.append(trial_config(v, shrink, stage.overrides))
        except ConfigError as e:
            raise SpaceError(f"{spec.source}: {stage.key} variant {v.id} {v.preset} {v.params} ({shrink}): "
                             f"{e}") from None
    done: dict[str, dict[str, Any]] = {}  # config_sha -> an earlier stage's row that needs no re-run
    for frame in earlier:
        for row in frame.to_dict("records"):
            if row["status"] == "ok" or (row["status"] == "failed" and row.get("failure") == "diverged"):
                done.setdefault(row["config_sha"], row)
    reused = {v.id: done[config_sha(c)] for v, c in zip(variants, configs) if config_sha(c) in done}
    to_run = [v.id for v in variants if v.id not in reused]
    if reused:
        print(f"sweep: stage {stage.name}: {len(reused)} of {len(variants)} trials equal earlier ones; reused")
    reported: dict[int, tuple[dict[str, Any], BaseException | None, str]] = {}
    started = time.perf_counter()
    try:
        if to_run:
            plan = _stage_plan(spec, stage, entry, plan, replan, out, store, configs, to_run=len(to_run))
            _save_progress(out, progress)  # the stage's concurrency is known before any trial starts
            reported = _tune_stage(spec, stage, shrink, variants, configs, to_run, out, state, plan, store,
                                   in_trial=entry["trial_runner"] == IN_TRIAL)
    finally:
        entry["wall_s"] = entry.get("wall_s", 0.0) + time.perf_counter() - started
        _save_progress(out, progress)
    df = results_frame(spec, configs, reported, variants=variants, stage=stage)
    if reused:
        rows = [_reused_row(row, reused[row["variant"]]) if row["variant"] in reused else row
                for row in df.to_dict("records")]
        df = pd.DataFrame(rows, columns=df.columns).astype({"reused_from": "object"})
    close_stopped(state["tracking_uri"], df)
    if staged:
        folder.mkdir(parents=True, exist_ok=True)
        df.to_parquet(folder / "results.parquet", engine="pyarrow", index=False)
        (folder / "table.md").write_text(aggregate(constrained_frame(df, spec.select), spec.metric, spec.mode).markdown)
    entry.update(trials=len(variants), reused=len(reused), complete=not (df["status"] == "incomplete").any(),
                 trained_iterations=int(df["trained_iterations"].fillna(0).sum()))
    _save_progress(out, progress)
    return df


def _reused_row(row: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """This stage's row for a trial equal to an earlier one: its results, no new cost."""
    keep = {"variant", "stage", "stage_name"}
    new = {k: (row[k] if k in keep else earlier.get(k, row[k])) for k in row}
    new.update(reused_from=f"{earlier['stage_name']}/v{int(earlier['variant']):04d}", trained_iterations=0, time_s=0.0)
    return new


def _tune_location(spec: SweepSpec, stage: Stage, out: Path, store: Any = None) -> tuple[Any, Any, Any, str]:
    """Where a stage's Tune experiment lives: ``(storage path, pyarrow filesystem, its location, restore path)``."""
    from . import storage

    tune_root = (store or storage.resolve(out)) / "tune"  # a URI/pyarrow location or the local folder
    tune_path, tune_fs = tune_root.ray_storage()
    path = tune_root / (f"stage{stage.index}-{stage.name}" if spec.is_staged else "sweep")
    return tune_path, tune_fs, path, path.ray_storage()[0]


def trial_runner(spec: SweepSpec, workers: int) -> str:
    """``IN_TRIAL`` where the trials have at most ``workers`` = 1 Train worker and the space allows it,
    else ``"ray_train"``."""
    return IN_TRIAL if spec.trial_runner == "auto" and workers == 1 else "ray_train"


def _stage_plan(spec: SweepSpec, stage: Stage, entry: dict[str, Any], plan: ResourcePlan,
                replan: Callable[[int], ResourcePlan], out: Path, store: Any = None,
                configs: list[ExperimentConfig] = (), to_run: int | None = None) -> ResourcePlan:
    """The stage's plan. A stage that Tune restores keeps the concurrency it started with (``Tuner.restore``
    cannot change ``max_concurrent_trials``), so its trials' threads follow that, not ``--max-concurrent``:
    a stage started one at a time (2 threads each on 2 CPUs) and resumed with 2 would otherwise run one
    trial at a time with 1 thread, half the machine idle. Where fewer trials than that are left to run
    (the last of a stage started 2 at a time), the threads are planned for those: one trial left on 2 CPUs
    gets both. A new stage with fewer trials to run (``to_run``) than the plan runs at once is planned
    for those (a stage 2 of one setting on 2 CPUs: 2 threads). A new stage records its concurrency and
    how its trials train (``entry["trial_runner"]``),
    which a restored stage keeps (Tune restores its trials' resources too); one started before that was
    recorded trained through Ray Train."""
    from ray import tune

    _, tune_fs, _, restore_path = _tune_location(spec, stage, out, store)
    started = entry.get("max_concurrent")
    if started is None or not tune.Tuner.can_restore(restore_path, storage_filesystem=tune_fs):
        if to_run and to_run < plan.max_concurrent:
            plan = replan(to_run)
            print(f"sweep: stage {stage.name}: {to_run} trial(s) to run, {plan.max_concurrent} at a time: "
                  f"{plan.threads_per_worker} torch threads per Train worker")
        entry["max_concurrent"] = plan.max_concurrent
        entry["trial_runner"] = trial_runner(spec, max((c.scaling.workers for c in configs), default=1))
        return plan
    entry.setdefault("trial_runner", "ray_train")
    left = _unfinished_trials(restore_path, tune_fs)
    at_once = min(int(started), left) if left else int(started)  # none left (Tune only reports back) or unknown
    if at_once != plan.max_concurrent:
        plan = replan(at_once)
        why = (f"{left} trial(s) left of a stage started {started} at a time" if at_once < int(started) else
               f"{started} trial(s) at a time as it started (Tune keeps a restored stage's concurrency)")
        print(f"sweep: stage {stage.name} resumes {why}: each Train worker {plan.threads_per_worker} torch threads; "
              f"--max-concurrent applies to stages not started yet")
    return plan


def _unfinished_trials(restore_path: str, tune_fs: Any = None) -> int | None:
    """How many trials of a stored Tune experiment a restore runs (not TERMINATED; errored ones are resumed);
    None when its trial states cannot be read (stopped before Tune wrote any: the restore decides)."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(restore_path, storage_filesystem=tune_fs).trials
    except (ValueError, OSError):
        return None
    return sum(t.status != "TERMINATED" for t in trials)


def _tune_stage(spec: SweepSpec, stage: Stage, shrink: Shrink, variants: list[Variant],
                configs: list[ExperimentConfig], to_run: list[int], out: Path, state: dict[str, Any],
                plan: ResourcePlan, store: Any = None, in_trial: bool = False
                ) -> dict[int, tuple[dict[str, Any], BaseException | None, str]]:
    """Run ``to_run`` (variant ids) as one Tune experiment; ``{id: (last result, error, trial status)}``.
    ``in_trial``: each trial trains its one worker itself and asks for that worker's CPUs and GPUs."""
    from ray import tune

    ctx = _TrialContext(output_dir=str(out), tracking_uri=state["tracking_uri"], parent_run_id=state["parent_run_id"],
                        sweep_name=state["sweep_name"], shrink=shrink, varying=spec.varying,
                        cpus_per_worker=plan.cpus_per_worker, threads_per_worker=plan.threads_per_worker,
                        gpus_per_worker=plan.gpus_per_worker, metric=spec.metric, select=spec.select,
                        stage=stage.index,
                        stage_name=stage.name, stage_overrides=dict(stage.overrides),
                        variants=tuple(asdict(v) for v in variants),
                        run_prefix=f"s{stage.index}-" if spec.is_staged else "", storage=store, in_trial=in_trial)
    resources = {"cpu": DRIVER_CPU}
    if in_trial:  # the driver's share and its one worker's: the same footprint as a 1-worker Ray Train trial
        resources = {"cpu": round(DRIVER_CPU + plan.cpus_per_worker, 4),
                     **({"gpu": plan.gpus_per_worker} if plan.gpus_per_worker else {})}
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), resources)
    tune_path, tune_fs, path, restore_path = _tune_location(spec, stage, out, store)
    if tune.Tuner.can_restore(restore_path, storage_filesystem=tune_fs):
        tuner = tune.Tuner.restore(restore_path, trainable, resume_errored=True, storage_filesystem=tune_fs)
    else:
        table = {v.id: {k: scalar(x) for k, x in v.columns(c.seed).items()} for v, c in zip(variants, configs)}
        keys = list(dict.fromkeys(k for cols in table.values() for k in cols))
        param_space = {"variant": tune.grid_search(to_run),
                       **{k: tune.sample_from(functools.partial(_column, table=table, key=k)) for k in keys}}
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name, reuse_actors=False,
                                        scheduler=_scheduler(stage, spec, configs)),
            run_config=tune.RunConfig(name=Path(path.path).name, storage_path=tune_path, storage_filesystem=tune_fs,
                                      verbose=1, checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                      failure_config=tune.FailureConfig(max_failures=TUNE_MAX_FAILURES),
                                      progress_reporter=progress_reporter(spec, keys)),
        )
    grid = tuner.fit()
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or [None] * len(grid)
    reported = {}
    for trial, r in zip(trials, grid):
        raw = r.config["variant"]
        reported[raw if isinstance(raw, int) else raw["id"]] = (r.metrics or {}, r.error,
                                                                getattr(trial, "status", "") or "")
    return reported


def _scheduler(stage: Stage, spec: SweepSpec, configs: list[ExperimentConfig]):
    """Tune's scheduler for the stage: ASHA on ``iteration`` and the selection's ranking (its metric,
    constrained by ``where`` through ``Selection.score``), or None (FIFO)."""
    sched = stage.scheduler
    if sched is None or sched.type == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    iterations = max(c.schedule.iterations for c in configs)
    grace = sched.grace_period or max(first_rung(c.schedule) for c in configs)  # after every trial's warm-up
    return ASHAScheduler(time_attr="iteration", metric=spec.select.scheduler_metric, mode=spec.mode, grace_period=grace,
                         reduction_factor=sched.reduction_factor, max_t=sched.max_t or iterations, brackets=1)
