"""What a sweep shows and writes besides its trials (``service.tuning`` runs them): Tune's console table
while it runs, one results row per variant, ``selection.md``, and the sweep's MLflow parent run.

- ``progress_reporter``: Tune's ``CLIReporter`` with a column per varying hyperparameter and the reported
  metrics, printed when a trial moved (at most every minute, at least every 15 minutes).
- ``results_frame``: identity, hyperparameter columns, status, final metrics, cost and config of each variant.
- ``selection_markdown``: per stage its trials, cost and picks, with the command that trains each pick.
- ``close_stopped`` / ``finish_parent``: the MLflow side (scheduler-stopped runs KILLED; the parent's
  artifacts, counts and table cells).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ExperimentConfig, flatten, to_dict
from .ray_train import failure_text
from .selection import pick_candidates, rank_settings
from .spaces import OPTIONAL_METRICS, Stage, SweepSpec, Variant, train_command
from .sweep_trial import PROGRESS_KEY, config_sha
from .tables import FINAL_METRICS, KNOWN_METRICS, Tables

if TYPE_CHECKING:
    import pandas as pd

PROGRESS_FILE = "progress.json"  # the sweep's stages, their completion and cost (written by service.tuning)


def scalar(x: Any) -> Any:
    """A hyperparameter value as one table cell: lists and dicts as JSON."""
    return json.dumps(x) if isinstance(x, (list, tuple, dict)) else x


REPORT_EVERY_S = 60  # the least time between two of Tune's status tables
REPORT_QUIET_S = 900  # a table at least this often while nothing changes (the sweep is alive)


def progress_reporter(spec: SweepSpec, keys: list[str]):
    """Tune's progress table with one column per varying hyperparameter and the reported metrics,
    printed when a trial's status, iteration or metric changed (at most every ``REPORT_EVERY_S``, at
    least every ``REPORT_QUIET_S``): a stage of hour-long trials does not repeat one table every minute.

    Ray's default (``RAY_AIR_NEW_OUTPUT=1``) output ignores a reporter and infers the same parameter
    columns from the config; ``jobs.sweep`` sets ``RAY_AIR_NEW_OUTPUT=0`` unless the user chose.
    """
    if os.environ.get("RAY_AIR_NEW_OUTPUT", "1") != "0":
        return None
    from ray.tune import CLIReporter

    class ChangedReporter(CLIReporter):
        """Tune's ``CLIReporter`` that skips a table identical (in status, iteration, metric) to the last."""

        last_state: tuple = ()
        last_time: float = -math.inf

        def should_report(self, trials, done: bool = False) -> bool:
            now = time.monotonic()
            state = tuple((t.trial_id, t.status, (t.last_result or {}).get(PROGRESS_KEY),
                           (t.last_result or {}).get(spec.metric)) for t in trials)
            due = now - self.last_time >= (REPORT_EVERY_S if state != self.last_state else REPORT_QUIET_S)
            if done or due:
                self.last_state, self.last_time = state, now
                return True
            return False

        def _progress_str(self, trials, *args, **kwargs) -> str:
            # A progress row (a checkpoint, no evaluation of its own) carries NaN for the metrics Tune requires
            # in every result until a first evaluation gives them: "nan" would read as a diverged run, so its
            # NaN cells are blank while the table is printed (an evaluation row prints its values as they are)
            blanked = []
            for t in trials:
                row = t.last_result or {}
                if PROGRESS_KEY in row and "iteration" not in row:
                    for key in self._metric_columns:
                        if isinstance(row.get(key), float) and math.isnan(row[key]):
                            blanked.append((row, key, row[key]))
                            row[key] = None
            try:
                return super()._progress_str(trials, *args, **kwargs)
            finally:
                for row, key, value in blanked:
                    row[key] = value

    shown = [k for k in keys if k in spec.varying or k in spec.searched] or keys[:4]
    metrics = {PROGRESS_KEY: "iter", spec.metric: spec.metric}  # iter: where training is, every checkpoint
    metrics.update({m: m for m in ("hist_kl", "hist_jsd", "gnelbo_x1e7", "mode_purity") if m not in metrics})
    metrics.update({name: name for name, _, _ in spec.select.where if name not in metrics})  # what the bounds read
    # print_intermediate_tables explicitly: its default reads Tune's process-wide verbosity when the
    # reporter is built, which the first Tuner.fit lowers to verbose=1, so a second stage (or sweep)
    # in the same process would show the status without the trial table
    return ChangedReporter(parameter_columns={k: k.rsplit(".", 1)[-1] for k in shown}, metric_columns=metrics,
                           max_report_frequency=REPORT_EVERY_S, max_column_length=24, print_intermediate_tables=True)


def close_stopped(tracking_uri: str, df: "pd.DataFrame") -> None:
    """MLflow runs of trials the scheduler stopped (their process was killed): KILLED, with the reason."""
    stopped = df[(df["status"] == "stopped") & df["mlflow_run_id"].notna() & df["reused_from"].isna()]
    if not len(stopped):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for r in stopped.itertuples():
        tags = client.get_run(r.mlflow_run_id).data.tags
        if "sweep.stopped_early" not in tags:  # running, or FAILED by fit when its workers were torn down
            client.set_tag(r.mlflow_run_id, "sweep.stopped_early", str(r.iteration))
            client.set_tag(r.mlflow_run_id, "error", r.error)
            client.set_terminated(r.mlflow_run_id, status="KILLED")


def finish_parent(tracking_uri: str, run_id: str, out: Path, df: "pd.DataFrame", tables: "Tables",
                   unfinished: bool = False) -> None:
    """The parent run holds the aggregate: results.parquet, table.md, the space, the selection, the table's cells."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for name in ("results.parquet", "table.md", "space.yaml", "selection.md", PROGRESS_FILE):
        if (out / name).is_file():
            client.log_artifact(run_id, str(out / name))
    for status in ("ok", "failed", "incomplete", "stopped"):
        client.log_metric(run_id, f"sweep/trials_{status}", float((df["status"] == status).sum()))
    client.log_metric(run_id, "sweep/trained_iterations", float(df["trained_iterations"].fillna(0).sum()))
    for r in tables.summary.itertuples():  # e.g. table/8gaussians/mog-ip-lc/hist_kl_mean
        for stat in ("mean", "se", "se_paper"):
            if not math.isnan(getattr(r, stat)):
                client.log_metric(run_id, f"table/{r.dataset}/{r.configuration}/{r.metric}_{stat}", getattr(r, stat))
    # an interrupted sweep's parent is KILLED until a resumed run completes it
    client.set_terminated(run_id, status="KILLED" if unfinished or (df["status"] == "incomplete").any() else "FINISHED")


def selection_markdown(spec: SweepSpec, frames: list["pd.DataFrame"], progress: dict[str, Any]) -> str:
    """``selection.md``: per stage its trials, cost, and (for the next stage, and finally) its picks."""
    lines = ["# Selection", "",
             f"Ranking: per preset, the setting with the {'lowest' if spec.mode == 'min' else 'highest'} mean "
             f"`{spec.metric}` over its completed seeds"
             + (f", among settings with {spec.select.describe_where()} (else unconstrained, noted below)"
                if spec.select.where else "") + ".", ""]
    for df in frames:
        name = df["stage_name"].iloc[0]
        entry = progress["stages"].get(name, {})
        counts = df["status"].value_counts()
        lines += [f"## Stage {int(df['stage'].iloc[0])}: {name}", "",
                  f"{len(df)} trial{'s' if len(df) != 1 else ''} ({', '.join(f'{n} {s}' for s, n in counts.items())}; "
                  f"{int(df['reused_from'].notna().sum())} reused), {int(df['trained_iterations'].fillna(0).sum()):,} "
                  f"iterations trained, {entry.get('wall_s', 0.0) / 60:.1f} min wall.", ""]
        lines += [f"- {note}" for note in entry.get("notes", [])]
        ranked = rank_settings(df, spec.select)
        if len(ranked):
            where = [name for name, _, _ in spec.select.where]
            lines += ["", f"| preset | rank | {spec.metric} | seeds | " + "".join(f"{w} | " for w in where)
                      + ("satisfies | " if where else "") + "hyperparameters |",
                      "| --- " * (5 + len(where) + bool(where)) + "|"]
            for r in ranked.groupby("preset").head(5).to_dict("records"):
                lines.append(f"| {r['preset']} | {r['rank']} | {r['score']:.4g} | {len(r['seeds'])} | "
                             + "".join(f"{r[w]:.4g} | " for w in where)
                             + (f"{'yes' if r['satisfies'] else 'no'} | " if where else "")
                             + f"`{searched_params(r['params'], spec.searched)}` |")
        lines.append("")
    picks, notes = pick_candidates(frames[-1], spec.select, 1)
    unfinished = int((frames[-1]["status"] == "incomplete").sum())
    not_run = [s.name for s in spec.stages[len(frames):]]
    why = ([f"{unfinished} trial(s) of stage {frames[-1]['stage_name'].iloc[0]} did not finish"] if unfinished else []) \
        + ([f"stage(s) {', '.join(not_run)} have not run"] if not_run else [])
    lines += ["## Selected" + (" so far (provisional)" if why else ""), ""]
    lines += [f"- provisional: {'; '.join(why)}; run the same command again to complete the selection"] if why else []
    lines += [f"- {n}" for n in notes]
    lines += [f"- {p['preset']}: `{searched_params(p['params'], spec.searched)}` (mean {spec.metric} "
              f"{p['score']:.4g} over seeds {p['seeds']}); train it: "
              f"`{train_command(p['preset'], p['hparams'], spec.searched)}`" for p in picks]
    return "\n".join(lines) + "\n"


def searched_params(params: str | dict[str, Any], searched: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The searched keys of a setting's ``params`` (JSON or dict): what a selection picked."""
    params = json.loads(params) if isinstance(params, str) else params
    return {k: v for k, v in params.items() if k in searched} or params


def results_frame(spec: SweepSpec, configs: list[ExperimentConfig],
                  reported: dict[int, tuple], variants: list[Variant] | None = None,
                  stage: Stage | None = None) -> "pd.DataFrame":
    """One row per variant: identity, hyperparameter columns, status/error, final metrics, cost, and
    the flattened config. ``reported[id]`` is ``(last Tune result, error[, Tune trial status])``.

    Status: the trial's own (``ok``/``failed``); ``failed`` when Tune recorded an error;
    ``stopped`` when the scheduler ended it early (its metrics are those of its last evaluation);
    ``incomplete`` when the sweep was interrupted before it finished.
    """
    import pandas as pd

    variants = list(spec.variants) if variants is None else variants
    stage = stage or Stage(1, "sweep")
    rows = []
    for v, cfg in zip(variants, configs):
        metrics, error, trial_status = (*reported.get(v.id, ({}, None)), "")[:3]
        # Tune marks the result it stops a trial on with ``done`` (its scheduler decided STOP). A trial cut
        # off by an interrupted sweep can read TERMINATED in memory without it (Tune stores it PENDING and
        # resumes it), and without a scheduler nothing stops a trial early: both are unfinished.
        stopped = trial_status == "TERMINATED" and bool(metrics.get("done")) and stage.scheduler is not None
        status = metrics.get("status") or ("failed" if error is not None else "stopped" if stopped else "incomplete")
        err = metrics.get("error") or (failure_text(error) if error is not None else "")
        failure = metrics.get("failure") or ("infrastructure" if error is not None else "")
        if status == "incomplete":
            err = "not finished (the sweep was interrupted); run the same command again to resume"
        elif status == "stopped":
            err = (f"stopped early by the {stage.scheduler.type} scheduler at iteration "
                   f"{metrics.get('iteration')} ({spec.metric} {metrics.get(spec.metric, math.nan):.4g})")
        dataset, _, configuration = v.preset.partition("/")
        row = {"variant": v.id, "stage": stage.index, "stage_name": stage.name, "preset": v.preset,
               "dataset": dataset, "configuration": configuration, "seed": cfg.seed,
               "hparams": json.dumps(v.hparams, sort_keys=True), "params": json.dumps(v.params, sort_keys=True),
               **{k: scalar(x) for k, x in v.columns(cfg.seed).items() if k not in ("preset", "seed")},
               "status": status, "error": err, "failure": failure}
        row.update({m: float(metrics.get(m, math.nan)) for m in FINAL_METRICS})  # 2D columns always
        row.update({m: float(metrics[m]) for m in (*KNOWN_METRICS, *OPTIONAL_METRICS) if m in metrics and m not in row})
        row.update({k: metrics.get(k) for k in ("iteration", "mlflow_run_id", "run_name", "output_dir", "attempts")})
        row["time_s"] = metrics.get("time_s", metrics.get("time_total_s"))
        # up to the last report: the evaluation a scheduler stopped it on, an interrupted trial's last checkpoint
        row["trained_iterations"] = metrics.get("iteration") or metrics.get(PROGRESS_KEY) or 0
        row["reused_from"] = None
        row["config_sha"] = config_sha(cfg)
        row.update({f"config.{k}": json.dumps(x) if isinstance(x, list) else x
                    for k, x in flatten(to_dict(cfg)).items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.astype({"reused_from": "object"}) if len(df) else df
