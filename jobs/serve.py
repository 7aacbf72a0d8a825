"""Serve a checkpoint over HTTP (Ray Serve + FastAPI) until SIGTERM/SIGINT.

Local (starts Ray in-process; OpenAPI at http://127.0.0.1:8000/docs):
    python -m jobs.serve --checkpoint runs/demo/checkpoint.pt
    python -m jobs.serve --checkpoint runs:/<run_id>/checkpoint/checkpoint.pt --tracking-uri sqlite:////abs/mlflow.db
On a running cluster (``ray start --head``; RAY_AUTH_MODE as the cluster was started):
    RAY_ADDRESS=auto python -m jobs.serve --checkpoint /abs/runs/demo/checkpoint.pt --num-replicas 2
Or with the Serve CLI: ``serve run deploy/serve.yaml`` / ``serve deploy deploy/serve.yaml``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt path or MLflow runs:/<run_id>/<path> URI")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per replica (= its torch threads, min 1)")
    p.add_argument("--no-batching", action="store_true", help="answer each /v1/samples alone (benchmarks)")
    p.add_argument("--max-batch-size", type=int, default=16)
    args = p.parse_args(argv)

    from pydantic import ValidationError

    from service.checkpoint import CheckpointError
    from service.serving import ServeArgs, build_app

    try:  # refuse a bad checkpoint before Ray starts
        app = build_app(ServeArgs(checkpoint=args.checkpoint, tracking_uri=args.tracking_uri,
                                  num_replicas=args.num_replicas, num_cpus=args.num_cpus,
                                  batching=not args.no_batching, max_batch_size=args.max_batch_size))
    except (CheckpointError, ValidationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    if os.environ.get("RAY_ADDRESS"):  # an existing cluster: keep the auth mode it was started with
        ray.init()
    else:  # a fresh local instance; an explicit RAY_AUTH_MODE wins (STACK.md)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", include_dashboard=False)
    # Right after ray.init (whose driver handler turns SIGTERM into exit code 15) and before the app can
    # answer: a SIGTERM sent once /healthz is up always takes the clean path below.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="introprior", route_prefix="/")
    print(f"serving {args.checkpoint} at http://{args.host}:{args.port}  (docs: /docs; stop: SIGTERM or Ctrl-C)",
          flush=True)
    while not stop.wait(0.5):
        pass
    print("shutting down", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
