r"""Train one model through Ray Train, tracked in MLflow.

Local (starts Ray on demand; MLflow in ./mlflow.db):
    python -m jobs.train --preset 8gaussians/mog-ip-lc --quick --workers 2 --output-dir runs/demo
On a cluster (after ``ray start --head``; use absolute paths):
    ray job submit --working-dir . -- python -m jobs.train --preset 8gaussians/sintro \
        --output-dir /abs/runs/sg --set tracking.tracking_uri=sqlite:////abs/mlflow.db
A cluster without a shared volume: give URIs (``s3://bucket/runs/sg``, ``gs://...``, ``file:///mnt/...``)
for ``--output-dir`` and ``--storage-path``; workers write checkpoints there through pyarrow.fs.
The same command again resumes from the latest checkpoint: the default run name is
``<preset>-<hash of the config and --output-dir>`` (another config or folder is another run).
Re-using a run name with another config is refused (the differing fields are listed) unless
``--allow-config-change``; so is an ``--output-dir`` holding another experiment's results.
The console shows one progress display (phase, iteration, it/s, ETA, headline losses; a bar on a
terminal, about 25 lines in a log or under ``ray job submit``); every metric is in MLflow.
A killed worker restarts from the last checkpoint (``--max-failures``, default 2); a diverged
run fails at once. Ctrl-C / SIGTERM stop the run and mark its MLflow run KILLED.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from jobs.common import add_config_args, config_or_exit, register_model


def serve_source(result: dict) -> str:
    """``jobs.serve``'s ``--checkpoint`` argument for a finished run: its checkpoint file where the outputs
    are on this machine, else the MLflow run's copy (``runs:/``, with the tracking URI)."""
    from service.checkpoint import run_checkpoint_uri

    out = str(result["output_dir"])
    if "://" not in out:
        return shlex.quote(f"{out}/checkpoint.pt")
    tracking = shlex.quote(str(result.get("tracking_uri")))
    return f"{run_checkpoint_uri(result['mlflow_run_id'])} --tracking-uri {tracking}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--output-dir", help="where checkpoint.pt, metrics.json, config.yaml and plots go "
                                        "(a path or a URI: file://, s3://, gs://)")
    p.add_argument("--run-name", help="Ray Train / MLflow run name; re-using one resumes that run "
                                      "(default: <preset>-<hash of the config and --output-dir>: the same command resumes)")
    p.add_argument("--storage-path", help="Ray Train storage, a path or a URI (default: <output-dir>/../ray_results)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--max-failures", type=int, default=None,
                   help="worker-group restarts from the last checkpoint after a worker dies (default 2; -1: "
                        "unlimited); a diverged run or a bad checkpoint is never retried")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume --run-name although its config changed (the change is logged to MLflow)")
    p.add_argument("--model-name", help="registered MLflow model name (= --set tracking.model_name=NAME; default "
                                        "introprior-<preset with '/' as '-'>)")
    p.add_argument("--no-register", dest="register", action="store_false",
                   help="log the run's pyfunc model but do not register a model version")
    args = p.parse_args(argv)
    if args.model_name:
        args.overrides.append(f"tracking.model_name={args.model_name}")
    if (cfg := config_or_exit(args)) is None:
        return 0
    from ray.train import TrainingFailedError  # Ray is imported only once the config is valid

    from service import storage as store
    from service.ray_env import ClusterUnreachable
    from service.ray_train import (DEFAULT_MAX_FAILURES, ConfigChanged, config_fingerprint, failure_text, fit,
                                   is_non_retryable)

    try:  # default: the same command (config and --output-dir) is the same run, so it resumes
        salt = store.resolve(args.output_dir).uri if args.output_dir else ""
        run_name = args.run_name or cfg.tracking.run_name or f"{cfg.name.replace('/', '-')}-{config_fingerprint(cfg, salt)}"
        out = store.resolve(args.output_dir or Path("runs") / run_name)
        storage = store.resolve(args.storage_path or store.join(store.parent(out.uri), "ray_results"))
    except ValueError as e:  # a URI scheme pyarrow cannot open
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    max_failures = DEFAULT_MAX_FAILURES if args.max_failures is None else args.max_failures
    if (storage / run_name).children("checkpoint_"):
        print(f"run {run_name!r}: resuming from its latest checkpoint in {storage / run_name}", file=sys.stderr)
    try:
        result = fit(cfg, output_dir=out, run_name=run_name, storage_path=storage, tracking_uri=args.tracking_uri,
                     max_failures=max_failures, allow_config_change=args.allow_config_change, progress=True)
    except (ConfigChanged, ClusterUnreachable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingFailedError as e:
        root = getattr(e, "controller_failure", None)
        again = ("not retried: it would fail the same way again" if root is not None and is_non_retryable(root)
                 else f"a re-run with --run-name {run_name} resumes from its last checkpoint")
        print(f"error: run {run_name!r} failed: {failure_text(e)}\n(the MLflow run is marked FAILED; {again})",
              file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C (Ray aborts the run) or SIGTERM
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"\nrun {run_name!r} stopped by {signal.Signals(signum).name}; the MLflow run is marked KILLED; "
              f"the same command resumes it from its last checkpoint", file=sys.stderr)
        return 128 + int(signum)
    print(f"results: {result['output_dir']}  (mlflow run {result['mlflow_run_id']})")
    print(f"serve it: python -m jobs.serve --checkpoint {serve_source(result)}")
    from service.metrics.modes import DISPLACED_OFFSET

    offset = result["metrics"].get("mode_offset_max")
    if offset is not None and offset >= DISPLACED_OFFSET:
        print(f"check before serving: a data mode's samples sit {offset:.1f} of its spreads off its centre "
              f"(mode_offset_max; samples.png marks it): \"data_mode\" requests for it get displaced points; "
              f"another --seed, or a seeds sweep with where: {{mode_offset_max: {{max: {DISPLACED_OFFSET:g}}}}}, "
              f"gives another draw")
    if args.register and result.get("tracking_uri"):  # the MLflow store fit() logged the run and its model to
        register_model(cfg, result)
    print(json.dumps(result["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
