r"""Bounded concurrent load on ``POST /v1/samples`` (p50/p99, requests/s, ``/healthz`` latency meanwhile),
and a fuzz of malformed and hostile requests.

Against a running server (``python -m jobs.serve ...``):
    python -m jobs.load_test --url http://127.0.0.1:8000 --clients 8 --requests 400
Heavy requests while /healthz is probed every 20 ms (its p50/p99/max are printed):
    python -m jobs.load_test --url http://127.0.0.1:8000 --clients 32 --requests 64 --n 4096 --format png
Fuzz: N hostile requests (bodies, types, magnitudes, sizes, content types, slow bodies), then the
status counts, the 5xx count and whether the replica restarted (its pid and start time):
    python -m jobs.load_test --url http://127.0.0.1:8000 --fuzz 1000
Start Serve in-process on a checkpoint, measure its cold start, then run with and without batching:
    python -m jobs.load_test --checkpoint runs/demo/checkpoint.pt
Every run is bounded by ``--requests`` and by ``--time-limit-s``; run it alone on the machine.
Add ``--token-file`` when the server needs a bearer token.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import subprocess
import time
from typing import Any

import httpx
import numpy as np

JSON = {"content-type": "application/json"}


async def _probe_healthz(c: httpx.AsyncClient, stop: asyncio.Event, every_s: float = 0.02) -> list[float]:
    """``GET /healthz`` latencies (s) until ``stop``; a failed probe counts as its time to fail."""
    out = []
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            await c.get("/healthz")
        except httpx.HTTPError:
            pass
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(every_s)
    return out


async def _load(url: str, clients: int, requests: int, n: int, fmt: str, time_limit_s: float,
                headers: dict[str, str]) -> dict[str, float]:
    """``clients`` concurrent loops share ``requests`` POSTs (after one warm-up round); stop at the time limit."""
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    left = requests
    async with httpx.AsyncClient(base_url=url, timeout=120.0, headers=headers,
                                 limits=httpx.Limits(max_connections=clients)) as c, \
            httpx.AsyncClient(base_url=url, timeout=120.0) as probe:
        await asyncio.gather(*(c.post("/v1/samples", json={"n": min(n, 64), "seed": i}) for i in range(clients)))
        deadline = time.perf_counter() + time_limit_s

        async def client(k: int) -> None:
            nonlocal left
            while left > 0 and time.perf_counter() < deadline:
                left -= 1
                t0 = time.perf_counter()
                r = await c.post("/v1/samples", json={"n": n, "seed": k * 1_000_003 + left, "format": fmt})
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] += 1

        stop = asyncio.Event()
        prober = asyncio.create_task(_probe_healthz(probe, stop))
        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - start
        stop.set()
        health = np.asarray(await prober) * 1e3
    ms = np.asarray(latencies) * 1e3
    return {"requests": len(ms), "errors": sum(v for k, v in statuses.items() if k != 200),
            "statuses": dict(statuses), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "req_per_s": len(ms) / wall, "samples_per_s": len(ms) * n / wall,
            "healthz_probes": len(health), "healthz_p50_ms": float(np.percentile(health, 50)),
            "healthz_p99_ms": float(np.percentile(health, 99)), "healthz_max_ms": float(health.max())}


def _report(label: str, r: dict[str, Any]) -> None:
    print(f"{label:<12} requests={r['requests']:.0f} errors={r['errors']:.0f} p50={r['p50_ms']:.1f} ms "
          f"p99={r['p99_ms']:.1f} ms  {r['req_per_s']:.1f} req/s  {r['samples_per_s']:.0f} samples/s  "
          f"statuses={r['statuses']}", flush=True)
    print(f"{'':<12} /healthz during the load: {r['healthz_probes']} probes, p50={r['healthz_p50_ms']:.1f} ms "
          f"p99={r['healthz_p99_ms']:.1f} ms max={r['healthz_max_ms']:.1f} ms", flush=True)


# --------------------------------------------------------------------------------------------
# Fuzz
# --------------------------------------------------------------------------------------------

ROUTES = ["/v1/samples", "/v1/interpolate", "/v1/encode", "/v1/reconstruct"]
FIELDS = ["n", "mode", "seed", "temperature", "format", "from_mode", "to_mode", "steps", "data", "stochastic"]


def _hostile_value(rng: random.Random, dim: int) -> Any:
    return rng.choice([
        -1, 0, 1, 7, 2**63, -2**63 - 1, 10**30, 1e39, -1e39, 1e308, 1.5, -0.0, True, False, None, "", "7", "png",
        "x" * 1000, [], [1, 2], [[1e39] * dim], [[0.0] * dim] * 3, [[0.0] * (dim + 1)], [[[0.0] * dim]],
        {"a": 1}, [None], [[True] * dim], [[1, "a"]], [[0.0] * dim, [0.0]], list(range(50)),
    ])


async def _chunked(data: bytes, size: int = 65536) -> Any:
    """``data`` as a chunked body (no Content-Length)."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _fuzz_cases(rng: random.Random, count: int, dim: int, max_body: int) -> list[tuple[str, str, dict]]:
    """(method, path, httpx kwargs) for ``count`` hostile requests, of every kind."""
    raw_bodies = [b'{"n": 3,', b"", b"{n: 3}", b"[1, 2]", b"null", b'"text"', b'{"n": NaN}', b'{"n": Infinity}',
                  b'{"temperature": -Infinity}', b'{"n": 1' + b"0" * 5000 + b"}", b'{"data": [[1e400, 0]]}',
                  b'{"n": "\xff\xfe"}', b"\x00\x01\x02", b"[" * 50_000 + b"]" * 50_000, b'{"n": 2}' * 1000,
                  b'{"data": [[' + b"1" * 400 + b", 0]]}", b'{"seed": 1e19}', b'{"n": 4, "n": 5}']
    cases: list[tuple[str, str, dict]] = []
    for i in range(count):
        kind = i % 10
        path = rng.choice(ROUTES)
        if kind < 4:  # mutated bodies: random fields with hostile values
            body = {rng.choice(FIELDS): _hostile_value(rng, dim) for _ in range(rng.randint(0, 4))}
            cases.append(("POST", path, {"content": json.dumps(body).encode(), "headers": JSON}))
        elif kind == 4:  # raw, malformed or unrepresentable JSON
            cases.append(("POST", path, {"content": rng.choice(raw_bodies), "headers": JSON}))
        elif kind == 5:  # content types
            ctype = rng.choice([None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                "application/json; charset=latin-1", "application/xml", "application/vnd.x+json"])
            headers = {"content-type": ctype} if ctype else {}
            cases.append(("POST", path, {"content": b'{"n": 2}', "headers": headers}))
        elif kind == 6:  # sizes: over the body limit, with and without Content-Length
            big = b'{"data": [' + b"[0.5, 0.5]," * (max_body // 11 + 10) + b"[0, 0]]}"
            cases.append(("POST", "/v1/encode", {"content": big if rng.random() < 0.5 else _chunked(big), "headers": JSON}))
        elif kind == 7:  # slow body: a few chunks with pauses
            async def slow(parts: int = rng.randint(2, 5)) -> Any:
                for p in range(parts):
                    await asyncio.sleep(0.2)
                    yield b'{"n": 2' if p == 0 else b" "
                yield b"}"
            cases.append(("POST", "/v1/samples", {"content": slow(), "headers": JSON}))
        elif kind == 8:  # wrong paths, methods and headers
            cases.append(rng.choice([("GET", "/v1/samples", {}), ("DELETE", "/v1/model", {}), ("GET", "/../etc/passwd", {}),
                                     ("GET", "/v1/modes?x=" + "%" * 100, {}), ("PUT", "/healthz", {}),
                                     ("POST", "/v1/samples", {"content": b'{"n": 2}',
                                                              "headers": {**JSON, "content-length": "abc"}})]))
        else:  # large but valid requests, and big magnitudes at the edge
            cases.append(rng.choice([("POST", "/v1/samples", {"json": {"n": 4096, "format": rng.choice(["json", "png", "npz"])}}),
                                     ("POST", "/v1/interpolate", {"json": {"from_mode": 0, "to_mode": 1, "steps": 1024}}),
                                     ("POST", "/v1/reconstruct", {"json": {"data": [[1e4, -1e4] + [0.0] * (dim - 2)] * 4,
                                                                            "stochastic": True}}),
                                     ("POST", "/v1/encode", {"json": {"data": [[-9999.0] * dim] * 512}})]))
    return cases


async def _fuzz(url: str, count: int, clients: int, headers: dict[str, str], seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, headers=headers) as c:
        before = (await c.get("/v1/model")).json()
        dim = int(np.prod(before["data_shape"]))
        max_body = before["serving"]["limits"]["max_body_bytes"]
        cases = _fuzz_cases(rng, count, dim, max_body)
        statuses: collections.Counter = collections.Counter()
        server_errors: list[str] = []
        queue = collections.deque(cases)

        async def worker() -> None:
            while queue:
                method, path, kw = queue.popleft()
                try:
                    r = await c.request(method, path, **kw)
                except httpx.HTTPError as e:
                    statuses[f"transport:{type(e).__name__}"] += 1
                    continue
                statuses[r.status_code] += 1
                if r.status_code >= 500 and r.status_code != 503:
                    server_errors.append(f"{r.status_code} {method} {path} {r.text[:200]}")
                elif r.status_code >= 400 and "detail" not in r.text:
                    server_errors.append(f"not the error format: {r.status_code} {method} {path} {r.text[:200]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        after = (await c.get("/v1/model")).json()
        healthy = (await c.get("/healthz")).status_code == 200
    same = (before["serving"]["pid"], before["serving"]["started_at"]) == (after["serving"]["pid"],
                                                                           after["serving"]["started_at"])
    return {"requests": count, "wall_s": round(wall, 1), "statuses": dict(sorted(statuses.items(), key=str)),
            "5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
            "5xx_not_503": len([e for e in server_errors if not e.startswith("not")]),
            "bad_format": len([e for e in server_errors if e.startswith("not")]),
            "replica_restarted": not same, "healthy_after": healthy, "examples": server_errors[:5]}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

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
    p.add_argument("--format", default="json", choices=["json", "png", "npy", "npz"])
    p.add_argument("--time-limit-s", type=float, default=60.0, help="upper bound of each measured run")
    p.add_argument("--fuzz", type=int, metavar="N", help="send N hostile requests instead of the load")
    p.add_argument("--token-file", help="bearer token for a server that needs one")
    args = p.parse_args(argv)
    headers = {}
    if args.token_file:
        with open(args.token_file) as f:
            headers["authorization"] = f"Bearer {f.read().strip()}"
    run = lambda url: asyncio.run(_load(url, args.clients, args.requests, args.n, args.format,  # noqa: E731
                                        args.time_limit_s, headers))
    if args.fuzz:
        print(json.dumps(asyncio.run(_fuzz(args.url, args.fuzz, args.clients, headers)), indent=1), flush=True)
        return 0
    if not args.checkpoint:
        _report("server", run(args.url))
        return 0

    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before `import ray`, which reads it once
    import ray
    from ray import serve

    from service.serving import ServeArgs, build_app

    url = f"http://127.0.0.1:{args.port}"
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
