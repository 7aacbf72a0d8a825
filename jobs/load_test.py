"""Bounded concurrent load on ``POST /v1/samples``: p50/p99 latency and requests/s.

Against a running server (``python -m jobs.serve ...``):
    python -m jobs.load_test --url http://127.0.0.1:8000 --clients 8 --requests 400
Start Serve in-process on a checkpoint, measure its cold start, then run with and without batching:
    python -m jobs.load_test --checkpoint runs/demo/checkpoint.pt
Every run is bounded by ``--requests`` and by ``--time-limit-s``; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time

import httpx
import numpy as np


async def _load(url: str, clients: int, requests: int, n: int, time_limit_s: float) -> dict[str, float]:
    """``clients`` concurrent loops share ``requests`` POSTs (after one warm-up round); stop at the time limit."""
    latencies: list[float] = []
    errors = 0
    left = requests
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(c.post("/v1/samples", json={"n": n, "seed": i}) for i in range(clients)))  # warm-up
        deadline = time.perf_counter() + time_limit_s

        async def client(k: int) -> None:
            nonlocal left, errors
            while left > 0 and time.perf_counter() < deadline:
                left -= 1
                t0 = time.perf_counter()
                r = await c.post("/v1/samples", json={"n": n, "seed": k * 1_000_003 + left})
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3
    return {"requests": len(ms), "errors": errors, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "req_per_s": len(ms) / wall, "samples_per_s": len(ms) * n / wall}


def _report(label: str, r: dict[str, float]) -> None:
    print(f"{label:<12} requests={r['requests']:.0f} errors={r['errors']:.0f} p50={r['p50_ms']:.1f} ms "
          f"p99={r['p99_ms']:.1f} ms  {r['req_per_s']:.1f} req/s  {r['samples_per_s']:.0f} samples/s", flush=True)


def wait_healthy(url: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``GET /healthz`` until it answers 200; fail early if ``proc`` (the server) exits."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url}/healthz did not answer within {timeout_s} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server to load (ignored with --checkpoint)")
    p.add_argument("--checkpoint", help="start Serve in-process on this checkpoint (cold start, batching on/off)")
    p.add_argument("--port", type=int, default=8000, help="port of the in-process server")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=400, help="measured requests per run")
    p.add_argument("--n", type=int, default=64, help="samples per request")
    p.add_argument("--time-limit-s", type=float, default=60.0, help="upper bound of each measured run")
    args = p.parse_args(argv)
    run = lambda url: asyncio.run(_load(url, args.clients, args.requests, args.n, args.time_limit_s))  # noqa: E731
    if not args.checkpoint:
        _report("server", run(args.url))
        return 0

    import ray
    from ray import serve

    from service.serving import ServeArgs, build_app

    url = f"http://127.0.0.1:{args.port}"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    t1 = time.perf_counter()
    try:
        for batching in (True, False):
            t2 = time.perf_counter()
            serve.run(build_app(ServeArgs(checkpoint=args.checkpoint, batching=batching, access_log=False)), name="introprior")
            wait_healthy(url)
            what = "cold start" if batching else "redeploy"
            print(f"{what}: {time.perf_counter() - t2:.2f} s to a healthy replica"
                  + (f" (ray.init + serve.start {t1 - t0:.2f} s before)" if batching else ""), flush=True)
            _report("batching" if batching else "no batching", run(url))
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
