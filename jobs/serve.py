r"""Serve a checkpoint over HTTP (Ray Serve + FastAPI) until SIGTERM/SIGINT (docs/serving.md).

Local (starts Ray in-process, with Ray token auth; OpenAPI at http://127.0.0.1:8000/docs):
    python -m jobs.serve --checkpoint runs/demo/checkpoint.pt
    python -m jobs.serve --checkpoint runs:/<run_id>/checkpoint/checkpoint.pt --tracking-uri sqlite:////abs/mlflow.db
    python -m jobs.serve --checkpoint models:/introprior-8gaussians-mog-ip-lc@champion --tracking-uri sqlite:////abs/mlflow.db
Without Serve's proxy hop (the replica answers HTTP itself; one replica; docs/serving.md has the figures):
    python -m jobs.serve --checkpoint runs/demo/checkpoint.pt --direct-ingress
Reachable from other machines only with a bearer token for the API:
    openssl rand -hex 32 > ~/.introprior_token && chmod 600 ~/.introprior_token
    python -m jobs.serve --checkpoint runs/demo/checkpoint.pt --host 0.0.0.0 --auth-token-file ~/.introprior_token
On a running cluster (RAY_AUTH_MODE and the Ray token as the cluster was started):
    RAY_ADDRESS=auto python -m jobs.serve --checkpoint /abs/runs/demo/checkpoint.pt --num-replicas 2
Or with the Serve CLI: ``serve run deploy/serve.yaml`` / ``serve deploy deploy/serve.yaml``; many models behind
one endpoint (by run id or registered version): ``serve run deploy/serve_models.yaml``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading

LOOPBACK = ("localhost",)
DIRECT_INGRESS_BATCH_WAIT_S = 0.001  # without the proxy's ~10 ms per request, a 5 ms wait costs more than it saves


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in LOOPBACK


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt path, or an MLflow URI: runs:/<run_id>/checkpoint/checkpoint.pt, "
                                                         "models:/<name>/<version>, models:/<name>@<alias>")
    p.add_argument("--checkpoint-sha256", help="refuse a checkpoint file with another SHA-256")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for runs:/ (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host; other than loopback needs a bearer token")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--auth-token-file", help="bearer token for every endpoint but /healthz (or $INTROPRIOR_API_TOKEN)")
    p.add_argument("--insecure-no-token", action="store_true", help="allow a non-loopback --host without a token")
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per replica (= its torch threads, min 1)")
    p.add_argument("--no-batching", action="store_true", help="answer each /v1/samples alone (benchmarks)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-s", type=float, default=None,
                   help="how long a batch waits to fill (default 0.005; 0.001 with --direct-ingress, where "
                        "it measured 1.28x the unbatched requests/s and 0.005 0.66x: docs/serving.md)")
    p.add_argument("--request-timeout-s", type=float, default=30.0, help="model work longer than this gets 504")
    p.add_argument("--direct-ingress", action="store_true",
                   help="the replica answers HTTP at --port itself, without Serve's proxy hop (Ray Serve's "
                        "experimental direct ingress; one replica, a local Ray; docs/serving.md)")
    args = p.parse_args(argv)
    if args.direct_ingress and (args.num_replicas != 1 or os.environ.get("RAY_ADDRESS")):
        print("error: --direct-ingress: needs --num-replicas 1 and a local Ray (no RAY_ADDRESS): without a load "
              f"balancer each replica has its own port (got --num-replicas {args.num_replicas}"
              + (", RAY_ADDRESS set" if os.environ.get("RAY_ADDRESS") else "") + "); on a cluster set "
              "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 where `ray start` runs (docs/serving.md)", file=sys.stderr)
        return 2
    if not os.environ.get("RAY_ADDRESS"):
        # A fresh local instance: token auth unless RAY_AUTH_MODE says otherwise (STACK.md); set before
        # `import ray`, which reads it once (set later, Ray would neither create nor use a token).
        # Ray's gRPC servers listen on every interface even for a local instance: "disabled" is never
        # loopback-only.
        os.environ.setdefault("RAY_AUTH_MODE", "token")

    from pydantic import ValidationError

    from jobs.common import free_port
    from service.checkpoint import CheckpointError
    from service.ray_env import ClusterUnreachable, check_chosen_address
    from service.serving import (BatchConfig, ServeArgs, ServeConfigError, build_app, direct_ingress_env,
                                 find_replica_port, read_token, use_fast_path_env)

    batch_wait_s = args.batch_wait_s
    if batch_wait_s is None:
        batch_wait_s = DIRECT_INGRESS_BATCH_WAIT_S if args.direct_ingress else \
            BatchConfig.model_fields["batch_wait_timeout_s"].default

    try:  # refuse a bad checkpoint or token before Ray starts
        serve_args = ServeArgs(checkpoint=args.checkpoint, checkpoint_sha256=args.checkpoint_sha256,
                               tracking_uri=args.tracking_uri, num_replicas=args.num_replicas, num_cpus=args.num_cpus,
                               batching=not args.no_batching, max_batch_size=args.max_batch_size,
                               batch_wait_timeout_s=batch_wait_s,
                               request_timeout_s=args.request_timeout_s, auth_token_file=args.auth_token_file)
        if not is_loopback(args.host) and read_token(serve_args) is None and not args.insecure_no_token:
            raise ServeConfigError(f"--host {args.host}: the API would be reachable from other machines without a "
                                   "token; pass --auth-token-file (or set $INTROPRIOR_API_TOKEN), or "
                                   "--insecure-no-token")
        app = build_app(serve_args)
        check_chosen_address(None)  # a RAY_ADDRESS that does not answer: at once, not after Ray's minutes
    except (CheckpointError, ValidationError, ServeConfigError, ClusterUnreachable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    if os.environ.get("RAY_ADDRESS"):  # an existing cluster: keep the auth mode (and token) it was started with
        ray.init()  # and its Serve switches: SERVE_FAST_PATH_ENV belongs where `ray start` runs (docs/serving.md)
    else:  # a fresh local instance (RAY_AUTH_MODE set above); its proxy and replicas inherit this environment
        use_fast_path_env()
        if args.direct_ingress:
            os.environ.update(direct_ingress_env(args.port))
        ray.init(address="local", include_dashboard=False)
    # Right after ray.init (whose driver handler turns SIGTERM into exit code 15) and before the app can
    # answer: a SIGTERM sent once /healthz is up always takes the clean path below.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # the proxy's own timeout is a backstop (408) behind the replica's 504 at --request-timeout-s
    # with --direct-ingress the replica takes --port and the proxy (still Serve's route to it) a free port
    proxy_port = free_port(args.host) if args.direct_ingress else args.port
    serve.start(http_options={"host": args.host, "port": proxy_port, "request_timeout_s": args.request_timeout_s + 30})
    serve.run(app, name="introprior", route_prefix="/")
    url = f"http://{args.host}:{find_replica_port(args.host, args.port) if args.direct_ingress else args.port}"
    print(f"serving {args.checkpoint} at {url}  (docs: /docs; stop: SIGTERM or Ctrl-C)"
          + (f"; direct ingress, Serve's proxy at :{proxy_port}" if args.direct_ingress else ""), flush=True)
    while not stop.wait(0.5):
        pass
    print("shutting down", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
