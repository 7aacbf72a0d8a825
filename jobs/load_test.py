r"""Bounded concurrent load on ``POST /v1/samples`` (p50/p99, requests/s, ``/healthz`` latency meanwhile,
CPU milliseconds per request of each process), and a fuzz of malformed and hostile requests.

Start Serve in-process on a checkpoint, measure its cold start, then run with and without batching
(the issue's comparison; the one command to re-measure, run it alone on the machine):
    python -m jobs.load_test --checkpoint runs/quick-8gaussians-mog-ip-lc-selected/checkpoint.pt
    ... --ray-serve-defaults    the same with Ray Serve's default switches (before SERVE_FAST_PATH_ENV)
Against a running server (``python -m jobs.serve ...``); ``--server-pid`` adds its processes' CPU:
    python -m jobs.load_test --url http://127.0.0.1:8000 --clients 8 --requests 400 [--server-pid PID]
Heavy requests while /healthz is probed every 20 ms (its p50/p99/max are printed):
    python -m jobs.load_test --url http://127.0.0.1:8000 --clients 32 --requests 64 --n 4096 --format png \
        --probe-every-s 0.02
Fuzz: N hostile requests (bodies, types, magnitudes, sizes, content types, slow bodies), then the
status counts, the 5xx count and whether the replica restarted (its pid and start time):
    python -m jobs.load_test --url http://127.0.0.1:8000 --fuzz 1000

The load's client is ``RawHttp`` (keep-alive HTTP/1.1 on asyncio streams, one connection per
client): httpx cost about 3.5 ms of CPU per request, as much as a third of the server's; its own
cost is printed as ``client``. CPU per request comes from ``/proc`` (utime + stime of every
process under this one, by role: client, proxy, replica, controller, ray other) over the measured
requests; it includes the ``/healthz`` probes (one per ``--probe-every-s``) and Ray's periodic work,
so it is a little higher when the run is slow. Every run is bounded by ``--requests`` and by
``--time-limit-s``. Add ``--token-file`` when the server needs a bearer token.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import subprocess
import time
import urllib.parse
from typing import Any, Callable

import httpx
import numpy as np

from jobs.common import free_port

JSON = {"content-type": "application/json"}


# --------------------------------------------------------------------------------------------
# CPU per request, per process (Linux /proc: utime + stime of every thread)
# --------------------------------------------------------------------------------------------

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _role(pid: int, me: int) -> str:
    """What a process is to this measurement: the client, a Serve actor by its Ray title, or Ray's other processes."""
    if pid == me:
        return "client"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "ray other"
    if cmd.startswith("ray::ProxyActor"):
        return "proxy"
    if cmd.startswith("ray::ServeReplica"):
        return "replica"
    if cmd.startswith("ray::ServeController"):
        return "controller"
    return "ray other"


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far) for every process we can read."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) * TICK_S)
    me = os.getpid()
    if me in out:  # this process from its own clock (ns), not /proc's ticks: a short load may use < 1 tick (10 ms)
        out[me] = (out[me][0], time.process_time())
    return out


def cpu_by_role(roots: list[int] | None = None) -> dict[str, float]:
    """CPU seconds used so far by ``roots`` (default: this process) and their descendants, summed by ``_role``.

    With ``--checkpoint`` the Ray instance is this process's child, so the proxy, the replica and
    Ray's own processes are all counted (with ``--url``, pass the server's pid as a second root);
    dead processes (a replaced replica) drop out, so take both snapshots while the same app runs.
    """
    me = os.getpid()
    table = _proc_table()
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    totals: dict[str, float] = collections.Counter()
    todo, seen = list(roots or [me]), set()
    while todo:
        pid = todo.pop()
        if pid in seen:  # a root under another root is counted once
            continue
        seen.add(pid)
        if pid in table:
            totals[_role(pid, me)] += table[pid][1]
        todo.extend(children.get(pid, ()))
    return dict(totals)


def cpu_ms_per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """CPU milliseconds per request of each role between two ``cpu_by_role`` snapshots (and their total)."""
    roles = [r for r in ("client", "proxy", "replica", "controller", "ray other") if r in before or r in after]
    out = {r: max(0.0, after.get(r, 0.0) - before.get(r, 0.0)) * 1e3 / max(1, requests) for r in roles}
    out["total"] = sum(out.values())
    return out


class RawHttp:
    """One keep-alive HTTP/1.1 connection on asyncio streams: the load's client, at a fraction of httpx's CPU.

    It sends exactly what it is given and reads the status and the whole body (``Content-Length`` or
    chunked); it reconnects when the server closes. Fuzzing, redirects, TLS and anything else use httpx.
    """

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout_s: float = 120.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--url: {url!r} is not supported by the load client; allowed http://host:port")
        self.host, self.port, self.timeout_s = parts.hostname, parts.port or 80, timeout_s
        self.base = parts.path.rstrip("/")
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in {"host": parts.netloc, **(headers or {})}.items())
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self._request(method, path, body), self.timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            await self.close()  # a half-read answer must not be read as the next request's
            raise

    async def _request(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        typed = "content-type: application/json\r\n" if body else ""
        writer.write(f"{method} {self.base}{path} HTTP/1.1\r\n{self.headers}{typed}content-length: {len(body)}\r\n\r\n"
                     .encode("latin-1") + body)
        try:
            status = int((await reader.readuntil(b"\r\n")).split(b" ", 2)[1])
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            fields = dict(line.split(b":", 1) for line in head.split(b"\r\n") if b":" in line)
            if fields.get(b"transfer-encoding", b"").strip() == b"chunked":
                chunks = []
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    chunks.append((await reader.readexactly(size + 2))[:-2])
                await reader.readuntil(b"\r\n")
                data = b"".join(chunks)
            else:
                data = await reader.readexactly(int(fields.get(b"content-length", b"0")))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            await self.close()
            raise
        if fields.get(b"connection", b"").strip() == b"close":
            await self.close()
        return status, data

    async def close(self) -> None:
        if self._streams is not None:
            writer, self._streams = self._streams[1], None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _probe_healthz(c: RawHttp, stop: asyncio.Event, every_s: float) -> list[float]:
    """``GET /healthz`` latencies (s) until ``stop``; a failed probe counts as its time to fail."""
    out = []
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            await c.request("GET", "/healthz")
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            pass
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(every_s)
    return out


async def _batch_stats(c: RawHttp) -> dict[str, int]:
    """``/v1/model``'s batch counters (batches, requests); empty when the server has none."""
    status, body = await c.request("GET", "/v1/model")
    return dict(json.loads(body).get("serving", {}).get("batches", {})) if status == 200 else {}


async def _load(url: str, clients: int, requests: int, n: int, fmt: str, time_limit_s: float,
                headers: dict[str, str], roots: list[int] | None = None, probe_every_s: float = 0.1) -> dict[str, Any]:
    """``clients`` concurrent loops (one connection each) share ``requests`` POSTs (after one warm-up round);
    stop at the time limit. ``roots``: count the CPU of these processes and their children (``cpu_by_role``)."""
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    left = requests
    conns = [RawHttp(url, headers) for _ in range(clients)]
    probe = RawHttp(url)
    try:
        warm = await asyncio.gather(*(c.request("POST", "/v1/samples", json.dumps({"n": min(n, 64), "seed": i})
                                                .encode()) for i, c in enumerate(conns)))
        if any(status != 200 for status, _ in warm):
            raise RuntimeError(f"warm-up: {[s for s, _ in warm]} from POST {url}/v1/samples: {warm[0][1][:300]!r}")
        deadline = time.perf_counter() + time_limit_s

        async def client(k: int) -> None:
            nonlocal left
            while left > 0 and time.perf_counter() < deadline:
                left -= 1
                body = json.dumps({"n": n, "seed": k * 1_000_003 + left, "format": fmt}).encode()
                t0 = time.perf_counter()
                status, _ = await conns[k].request("POST", "/v1/samples", body)
                latencies.append(time.perf_counter() - t0)
                statuses[status] += 1

        stop = asyncio.Event()
        prober = asyncio.create_task(_probe_healthz(probe, stop, probe_every_s))
        stats0 = await _batch_stats(conns[0])
        cpu0 = cpu_by_role(roots) if roots else {}
        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - start
        cpu1 = cpu_by_role(roots) if roots else {}
        stop.set()
        health = np.asarray(await prober) * 1e3
        stats1 = await _batch_stats(conns[0])
    finally:
        for c in [*conns, probe]:
            await c.close()
    ms = np.asarray(latencies) * 1e3
    return {"requests": len(ms), "errors": sum(v for k, v in statuses.items() if k != 200),
            "statuses": dict(statuses), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "req_per_s": len(ms) / wall, "samples_per_s": len(ms) * n / wall,
            "healthz_probes": len(health), "healthz_p50_ms": float(np.percentile(health, 50)),
            "healthz_p99_ms": float(np.percentile(health, 99)), "healthz_max_ms": float(health.max()),
            "cpu_ms": cpu_ms_per_request(cpu0, cpu1, len(ms)) if roots else {}, "wall_s": wall,
            "loadavg": os.getloadavg()[0], "batches": {k: stats1[k] - stats0[k] for k in stats1} if stats0 else {}}


def _report(label: str, r: dict[str, Any]) -> None:
    print(f"{label:<12} requests={r['requests']:.0f} errors={r['errors']:.0f} p50={r['p50_ms']:.1f} ms "
          f"p99={r['p99_ms']:.1f} ms  {r['req_per_s']:.1f} req/s  {r['samples_per_s']:.0f} samples/s  "
          f"statuses={r['statuses']}", flush=True)
    print(f"{'':<12} /healthz during the load: {r['healthz_probes']} probes, p50={r['healthz_p50_ms']:.1f} ms "
          f"p99={r['healthz_p99_ms']:.1f} ms max={r['healthz_max_ms']:.1f} ms", flush=True)
    if r["batches"].get("batches"):
        b = r["batches"]
        print(f"{'':<12} batches: {b['batches']}, mean size {b['requests'] / b['batches']:.2f} requests", flush=True)
    if r["cpu_ms"]:
        print(f"{'':<12} CPU ms per request: " + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_ms"].items())
              + f"  (load average {r['loadavg']:.2f})", flush=True)


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


def _app_only(checkpoint: str, clients: int, requests: int, n: int, fmt: str) -> dict[str, float]:
    """CPU ms per request of the replica's own work, without Ray or a socket: the FastAPI app called as ASGI
    by ``clients`` concurrent loops, and its parts timed alone (one request's model pass and encoding, and
    one decoder pass for ``clients`` requests together: what batching could save)."""
    import torch

    from service.serving import Sampler, SamplesRequest, ServeArgs, make_api

    torch.set_num_threads(1)  # as a replica with num_cpus < 2
    sampler = Sampler.from_checkpoint(checkpoint, ServeArgs(checkpoint=checkpoint, access_log=False))
    app = make_api(sampler)

    async def post(body: bytes) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/samples", "raw_path": b"/v1/samples", "root_path": "",
                 "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        status = []

        async def receive() -> dict:
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        if status != [200]:
            raise RuntimeError(f"app-only: POST /v1/samples answered {status}")

    async def load() -> float:
        per_client = max(1, requests // clients)
        body = lambda k, i: json.dumps({"n": n, "seed": k * 1_000_003 + i, "format": fmt}).encode()  # noqa: E731
        await asyncio.gather(*(post(body(k, per_client)) for k in range(clients)))  # warm-up
        c0 = time.process_time()

        async def client(k: int) -> None:
            for i in range(per_client):
                await post(body(k, i))

        await asyncio.gather(*(client(k) for k in range(clients)))
        return (time.process_time() - c0) * 1e3 / (per_client * clients)

    def cpu_ms(fn: Callable[[], Any], repeat: int = 200) -> float:
        fn()
        c0 = time.process_time()
        for _ in range(repeat):
            fn()
        return (time.process_time() - c0) * 1e3 / repeat

    one = SamplesRequest(n=n, seed=1, format=fmt)
    result = sampler.sample_batch([one])[0]
    return {"app": asyncio.run(load()), "model": cpu_ms(lambda: sampler.sample_batch([one])),
            "encode": cpu_ms(lambda: sampler.render(result, fmt)),
            "model_batch": cpu_ms(lambda: sampler.sample_batch([one] * clients), 50) / clients}


def _compare(on: dict[str, Any], off: dict[str, Any]) -> None:
    """The issue's comparison: batching on vs off, side by side."""
    print(f"{'compare':<12} batching/no batching: {on['req_per_s'] / off['req_per_s']:.2f}x req/s "
          f"({on['req_per_s']:.1f} vs {off['req_per_s']:.1f}), p50 {on['p50_ms']:.1f} vs {off['p50_ms']:.1f} ms, "
          f"p99 {on['p99_ms']:.1f} vs {off['p99_ms']:.1f} ms"
          + (f", CPU {on['cpu_ms']['total']:.2f} vs {off['cpu_ms']['total']:.2f} ms per request"
             if on["cpu_ms"] and off["cpu_ms"] else ""), flush=True)


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
    p.add_argument("--probe-every-s", type=float, default=0.1, help="pause between /healthz probes during the load")
    p.add_argument("--server-pid", type=int, help="with --url: also count the CPU of this process (e.g. jobs.serve) "
                                                  "and its children (proxy, replica, Ray) per request")
    p.add_argument("--modes", default="on,off", help="with --checkpoint: batching runs in this order (on, off, "
                                                     "or both either way: an order effect shows)")
    p.add_argument("--ray-serve-defaults", action="store_true",
                   help="with --checkpoint: keep Ray Serve's default switches (no SERVE_FAST_PATH_ENV), for comparison")
    p.add_argument("--max-batch-size", type=int, default=16, help="with --checkpoint: @serve.batch's batch size")
    p.add_argument("--batch-wait-s", type=float, default=0.005,
                   help="with --checkpoint: @serve.batch's wait for a batch to fill")
    p.add_argument("--direct-ingress", action="store_true",
                   help="with --checkpoint: Serve's experimental direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS): "
                        "the replica serves HTTP itself at --port, no proxy hop")
    p.add_argument("--app-only", action="store_true", help="with --checkpoint: the replica's app alone, in-process "
                                                           "(no Ray, no HTTP): CPU ms per request and its parts")
    p.add_argument("--fuzz", type=int, metavar="N", help="send N hostile requests instead of the load")
    p.add_argument("--token-file", help="bearer token for a server that needs one")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",")]
    if not modes or not set(modes) <= {"on", "off"} or len(set(modes)) != len(modes):
        p.error(f"--modes: {args.modes!r}; allowed on, off, on,off or off,on")
    headers = {}
    if args.token_file:
        with open(args.token_file) as f:
            headers["authorization"] = f"Bearer {f.read().strip()}"
    roots = [os.getpid()] + ([args.server_pid] if args.server_pid and not args.checkpoint else [])
    run = lambda url: asyncio.run(_load(url, args.clients, args.requests, args.n, args.format,  # noqa: E731
                                        args.time_limit_s, headers, roots, args.probe_every_s))
    if args.fuzz:
        print(json.dumps(asyncio.run(_fuzz(args.url, args.fuzz, args.clients, headers)), indent=1), flush=True)
        return 0
    if not args.checkpoint:
        _report("server", run(args.url))
        return 0

    if args.app_only:
        r = _app_only(args.checkpoint, args.clients, args.requests, args.n, args.format)
        print(f"{'app only':<12} CPU ms per request (no Ray, no HTTP, {args.clients} concurrent): {r['app']:.2f}; "
              f"alone: model {r['model']:.2f} (sampling + decoder, n={args.n}), {args.format} encoding "
              f"{r['encode']:.2f}; "
              f"one decoder pass for {args.clients} requests: {r['model_batch']:.2f} per request (batching saves "
              f"{r['model'] - r['model_batch']:.2f})", flush=True)
        return 0
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before `import ray`, which reads it once
    import ray
    from ray import serve

    from service.serving import (SERVE_FAST_PATH_ENV, ServeArgs, build_app, direct_ingress_env, find_replica_port,
                                 use_fast_path_env)

    switches = {k: os.environ.get(k, "Ray's default") for k in SERVE_FAST_PATH_ENV} if args.ray_serve_defaults \
        else use_fast_path_env()  # before ray.init: the proxy and the replica inherit them
    url = f"http://127.0.0.1:{args.port}"
    proxy_port = args.port
    if args.direct_ingress:  # Serve's direct ingress: the replica is the HTTP server at --port, the proxy elsewhere
        direct = direct_ingress_env(args.port)
        os.environ.update(direct)
        switches |= direct
        proxy_port = free_port()
    print("Serve switches: " + ", ".join(f"{k}={v}" for k, v in switches.items()), flush=True)
    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port}, logging_config={"enable_access_log": False})
    t1 = time.perf_counter()
    results = {}
    try:
        for i, batching in enumerate(m == "on" for m in modes):
            t2 = time.perf_counter()
            app = build_app(ServeArgs(checkpoint=args.checkpoint, batching=batching, access_log=False,
                                      max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_s))
            serve.run(app, name="introprior")
            if args.direct_ingress:  # a redeployed replica may take the next free port of the range
                url = f"http://127.0.0.1:{find_replica_port('127.0.0.1', args.port)}"
            wait_healthy(url)
            print(f"{'redeploy' if i else 'cold start'}: {time.perf_counter() - t2:.2f} s to a healthy replica"
                  + ("" if i else f" (ray.init + serve.start {t1 - t0:.2f} s before)"), flush=True)
            results[batching] = run(url)
            _report("batching" if batching else "no batching", results[batching])
    finally:
        serve.shutdown()
        ray.shutdown()
    if len(results) == 2:
        _compare(results[True], results[False])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
