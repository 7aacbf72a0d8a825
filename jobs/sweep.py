r"""Run a search space from ``tune_spaces/`` with Ray Tune; every trial is a Ray Train run.

Local (starts Ray on demand; MLflow in ./mlflow.db):
    python -m jobs.sweep tune_spaces/smoke_grid.yaml --output-dir runs/smoke_grid
    python -m jobs.sweep tune_spaces/smoke_staged.yaml --output-dir runs/smoke_staged   # a staged protocol
On a cluster (``ray start --head``, ``ray up deploy/cluster.yaml`` or KubeRay; absolute paths):
    ray job submit --working-dir . -- python -m jobs.sweep tune_spaces/grid_8gaussians.yaml \
        --output-dir /abs/runs/grid_8gaussians --tracking-uri sqlite:////abs/mlflow.db
    (no shared volume: add ``--storage s3://bucket/grid_8gaussians``; trials and checkpoints go there)

Leaves ``results.parquet`` (every trial's config, hyperparameter columns, metrics and status),
``table.md`` (paper Table 1 layout) and ``selection.md`` (the ranking of each stage and the pick)
in ``--output-dir``, and logs them to the sweep's parent MLflow run. Every trial reports its
evaluation to Tune every ``schedule.eval_every`` iterations (a ``scheduler:`` such as ASHA stops
poor trials early); a ``stages:`` space re-runs the best settings of each stage in the next.
The selected trial of each preset is registered as ``models:/introprior-<preset>@champion``
(``--no-register`` skips it). Running the same command again resumes an interrupted sweep; a second sweep on a folder in use is
refused (``sweep.lock``). The space is validated before Ray starts: a bad file exits with status 2
and a message naming the file, the key and the allowed values.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from service.config import ConfigError
from service.ray_env import ClusterUnreachable
from service.spaces import SpaceError, load_space
from service.tuning import run_sweep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", help="search space YAML (tune_spaces/*.yaml)")
    p.add_argument("--output-dir", required=True, help="results.parquet, table.md, trial outputs; re-use to resume")
    shrink = p.add_mutually_exclusive_group()
    shrink.add_argument("--smoke", action="store_const", const="smoke", dest="shrink",
                        help="seconds-long trials (presets.smoke); default: the space's smoke: flag")
    shrink.add_argument("--quick", action="store_const", const="quick", dest="shrink",
                        help="minutes-long trials (5,000 iterations)")
    shrink.add_argument("--full", action="store_const", const="full", dest="shrink",
                        help="the paper's schedule even if the space says smoke: true")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs/GPUs fit)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs per trial, fractions allowed (0.25: four 2D trials share a GPU)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--storage", help="Ray Tune/Train storage and trial outputs: a path or a URI (file://, s3://, gs://) "
                                     "for a cluster without a shared volume (default: --output-dir)")
    p.add_argument("--name", help="sweep name (parent MLflow run prefix; default: the space file's name)")
    p.add_argument("--no-register", dest="register", action="store_false",
                   help="do not register the selected trial's model as models:/introprior-<preset>@champion")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        p.error(f"--max-concurrent: {args.max_concurrent} is invalid; allowed integers >= 1")
    if args.gpus_per_trial < 0:
        p.error(f"--gpus-per-trial: {args.gpus_per_trial} is invalid; allowed numbers >= 0")
    try:  # validate every variant of every stage, and the schedulers, before anything is written or Ray starts
        spec = load_space(args.space)
        spec.validate(args.shrink)
    except (SpaceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's CLIReporter: one column per hyperparameter
    try:
        df = run_sweep(spec, output_dir=args.output_dir, shrink=args.shrink, max_concurrent=args.max_concurrent,
                       gpus_per_trial=args.gpus_per_trial, tracking_uri=args.tracking_uri, name=args.name,
                       storage_path=args.storage)
    # a different or a live sweep in --output-dir; more GPUs than the cluster has; a RAY_ADDRESS that does not answer
    except (ConfigError, ClusterUnreachable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output_dir).resolve()
    print((out / "table.md").read_text())
    print((out / "selection.md").read_text())
    if args.register:
        register_champions(spec, df, args.tracking_uri)
    counts = df["status"].value_counts()
    ok, incomplete = int(counts.get("ok", 0)), int(counts.get("incomplete", 0))
    stopped = f", {int(counts['stopped'])} stopped early" if counts.get("stopped", 0) else ""
    print(f"{ok}/{len(df)} trials completed{stopped}; results: {out / 'results.parquet'}, {out / 'table.md'}, "
          f"{out / 'selection.md'}")
    if incomplete:
        print(f"{incomplete} trials did not finish: run the same command again to resume", file=sys.stderr)
    missing = df.attrs.get("stages", 1) - df.attrs.get("stages_run", 1)
    if missing and not incomplete:
        print(f"{missing} stage(s) could not run (see selection.md)", file=sys.stderr)
    return 0 if ok and not incomplete and not missing else 1


def champion_trial(trials, select):
    """The seed to serve among one setting's completed trials: those whose own metrics meet the space's
    ``where`` bounds first (a seed that kept every mode, say), then the best by the selection metric."""
    ok = [select.holds(row) for row in trials.to_dict("records")]
    ranked = trials.assign(_meets_bounds=ok)
    return ranked.sort_values(["_meets_bounds", select.metric], ascending=[False, select.mode == "min"],
                              kind="stable").iloc[0].drop("_meets_bounds")


def register_champions(spec, df, tracking_uri: str | None) -> list[tuple[str, str]]:
    """Per preset, the selected setting's best completed trial (``selection.md``'s pick, then its best seed:
    ``champion_trial``) as a new version of ``introprior-<preset>`` with the alias ``champion``.

    Returns ``(model URI, run id)`` per registration; a store without a registry only warns.
    """
    from service.mlflow_model import CHAMPION, RegistrationError, default_model_name, register
    from service.ray_train import default_tracking_uri
    from service.selection import pick_candidates

    last = df[df["stage"] == df["stage"].max()]
    picks, _ = pick_candidates(last, spec.select, 1)
    done = []
    for pick in picks:
        trials = last[(last["preset"] == pick["preset"]) & (last["hparams"] == pick["hparams"])
                      & (last["status"] == "ok") & last["mlflow_run_id"].notna()]
        if not len(trials):
            continue
        best = champion_trial(trials, spec.select)
        name = default_model_name(pick["preset"])
        try:
            version = register(tracking_uri or default_tracking_uri(), best["mlflow_run_id"], name, alias=CHAMPION)
        except RegistrationError as e:
            print(f"warning: {e}; the sweep's results are complete (--no-register skips this step)", file=sys.stderr)
            continue
        uri = f"models:/{name}@{CHAMPION}"
        bounds = spec.select.describe_where()
        print(f"champion: {uri} = version {version.version} (run {best['mlflow_run_id']}, seed {int(best['seed'])}, "
              f"{spec.metric} {best[spec.metric]:.4g}"
              + (f"; {bounds}: {'holds' if spec.select.holds(best.to_dict()) else 'holds on no seed'}" if bounds
                 else "") + ")")
        done.append((uri, best["mlflow_run_id"]))
    return done


if __name__ == "__main__":
    raise SystemExit(main())
