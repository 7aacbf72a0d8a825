r"""Train one model through Ray Train, tracked in MLflow.

Local (starts Ray on demand; MLflow in ./mlflow.db):
    python -m jobs.train --preset 8gaussians/mog-ip-lc --quick --workers 2 --output-dir runs/demo
On a cluster (after ``ray start --head``; use absolute paths):
    ray job submit --working-dir . -- python -m jobs.train --preset 8gaussians/sintro \
        --output-dir /abs/runs/sg --set tracking.tracking_uri=sqlite:////abs/mlflow.db
A re-run with the same ``--run-name`` resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from jobs.common import add_config_args, config_or_exit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--output-dir", help="where checkpoint.pt, metrics.json, config.yaml and plots go")
    p.add_argument("--run-name", help="Ray Train / MLflow run name; re-using one resumes that run")
    p.add_argument("--storage-path", help="Ray Train storage (default: <output-dir>/../ray_results)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--max-failures", type=int, default=0, help="worker-group restarts from the last checkpoint")
    args = p.parse_args(argv)
    if (cfg := config_or_exit(args)) is None:
        return 0
    from ray.train import TrainingFailedError  # Ray is imported only once the config is valid

    from service.ray_train import failure_text, fit

    run_name = args.run_name or cfg.tracking.run_name or f"{cfg.name.replace('/', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.output_dir or Path("runs") / run_name).resolve()
    storage = Path(args.storage_path or out.parent / "ray_results").resolve()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    try:
        result = fit(cfg, output_dir=out, run_name=run_name, storage_path=storage, tracking_uri=args.tracking_uri,
                     max_failures=args.max_failures)
    except TrainingFailedError as e:
        print(f"error: run {run_name!r} failed: {failure_text(e)}\n(the MLflow run is marked FAILED; "
              f"a re-run with --run-name {run_name} resumes from its last checkpoint)", file=sys.stderr)
        return 1
    print(f"results: {result['output_dir']}  (mlflow run {result['mlflow_run_id']})")
    print(json.dumps(result["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
