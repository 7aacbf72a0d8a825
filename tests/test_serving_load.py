"""jobs.load_test's own parts, without Ray: the lean HTTP client against a real socket server, the
per-process CPU accounting from /proc, and the Ray Serve switches that jobs.serve sets."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.load_test import RawHttp, _app_only, cpu_by_role, cpu_ms_per_request
from service.serving import SERVE_FAST_PATH_ENV, use_fast_path_env


# --------------------------------------------------------------------------------------------
# RawHttp against a small HTTP/1.1 server on 127.0.0.1
# --------------------------------------------------------------------------------------------

async def _serve_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: list) -> None:
    """Answer requests on one connection: /len (Content-Length), /chunked, /close (then close)."""
    seen.append("connect")
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.IncompleteReadError:
            break
        method, path, _ = line.decode().split(" ")
        head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
        fields = dict(h.split(": ", 1) for h in head.split("\r\n") if ": " in h)
        body = await reader.readexactly(int(fields.get("content-length", "0")))
        seen.append((method, path, fields.get("content-type"), fields.get("authorization"), body))
        if path == "/chunked":
            writer.write(b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n")
        elif path == "/close":
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy")
            await writer.drain()
            break
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
    writer.close()


def test_raw_http_reads_both_framings_keeps_alive_and_reconnects() -> None:
    async def run() -> tuple[list, list]:
        seen: list = []
        server = await asyncio.start_server(lambda r, w: _serve_once(r, w, seen), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        c = RawHttp(f"http://127.0.0.1:{port}", {"authorization": "Bearer t0k"})
        try:
            answers = [await c.request("POST", "/len", b'{"n": 2}'), await c.request("GET", "/chunked"),
                       await c.request("GET", "/close"), await c.request("GET", "/len")]
        finally:
            await c.close()
            server.close()
            await server.wait_closed()
        return answers, seen

    answers, seen = asyncio.run(run())
    assert answers == [(200, b"hello"), (201, b"hello"), (503, b"busy"), (200, b"hello")]
    assert seen[1] == ("POST", "/len", "application/json", "bearer t0k", b'{"n": 2}')
    assert seen[2][:3] == ("GET", "/chunked", None)  # no body: no content type
    assert [s for s in seen if s == "connect"] == ["connect", "connect"]  # one keep-alive connection, one after close


def test_raw_http_refuses_what_it_cannot_speak() -> None:
    with pytest.raises(ValueError, match="allowed http://host:port"):
        RawHttp("https://127.0.0.1:8443")


# --------------------------------------------------------------------------------------------
# CPU per request from /proc
# --------------------------------------------------------------------------------------------

def test_cpu_by_role_counts_a_child_process() -> None:
    """A child that burnt CPU shows up under the root given; this process is 'client'."""
    child = subprocess.Popen([sys.executable, "-c", "sum(range(20_000_000)); print('done', flush=True); input()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        alone = cpu_by_role([child.pid])
        twice = cpu_by_role([child.pid, child.pid])
        both = cpu_by_role([os.getpid(), child.pid])  # the child is under this process too
    finally:
        child.communicate("\n", timeout=60)
    assert set(alone) == {"ray other"} and alone["ray other"] > 0  # not a Serve actor: "ray other"
    assert twice == alone  # a root given twice (or under another root) is counted once; idle since "done"
    assert both["client"] > 0 and both["ray other"] >= alone["ray other"]


def test_cpu_ms_per_request_is_the_difference_per_request() -> None:
    out = cpu_ms_per_request({"client": 1.0, "proxy": 2.0}, {"client": 1.4, "proxy": 2.8, "replica": 1.2}, 400)
    assert out == pytest.approx({"client": 1.0, "proxy": 2.0, "replica": 3.0, "total": 6.0})


def test_app_only_measures_the_app_and_its_parts(smoke_checkpoint: Path) -> None:
    """--app-only: the replica's app answers 200 in-process (it raises otherwise); every part is measured."""
    r = _app_only(str(smoke_checkpoint), clients=2, requests=8, n=16, fmt="json")
    assert set(r) == {"app", "model", "encode", "model_batch"} and all(v > 0 for v in r.values())


# --------------------------------------------------------------------------------------------
# Ray Serve switches
# --------------------------------------------------------------------------------------------

def test_fast_path_env_fills_only_what_is_unset() -> None:
    env = {"RAY_SERVE_LOG_TO_STDERR": "1", "OTHER": "x"}
    in_force = use_fast_path_env(env)
    assert in_force == SERVE_FAST_PATH_ENV | {"RAY_SERVE_LOG_TO_STDERR": "1"}  # the user's choice stays
    assert env["OTHER"] == "x" and env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"


def test_fast_path_env_names_switches_ray_serve_reads() -> None:
    """Each key is a constant of this Ray version's Serve (a renamed switch would silently do nothing)."""
    from ray.serve._private import constants

    assert all(hasattr(constants, key) for key in SERVE_FAST_PATH_ENV)
