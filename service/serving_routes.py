"""Serving, part 3 of 4: the FastAPI app of one replica (routes, middleware, the error format).

- Model work and response encoding run in a small thread pool (``ServeArgs.work_threads``),
  never on the event loop, so ``/healthz`` and metadata answer while heavy requests run.
- ``WorkGate``: each request reserves its estimated output bytes (``Limits.cost``) before any work;
  when the replica's ``max_inflight_bytes`` are taken it waits in a FIFO queue for at most
  ``queue_wait_s``, then answers 503 with ``Retry-After``. Work past ``request_timeout_s`` is
  504 and stops at its next chunk.
- Middleware, outermost first: bearer token (every path but ``/healthz``), JSON content type
  (415), body size (413).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .serving_model import Deadline, ModelOutputError, Rendered, SampleResult, Sampler, WorkTimeout
from .serving_schema import (BODIES, EncodeRequest, InterpolateRequest, ReconstructRequest, RequestError,
                             SamplesRequest, describe_validation_error, error_response, is_malformed, parse_json)

RETRY_AFTER_S = 1
OPEN_PATHS = ("/healthz",)  # answered without a token (liveness probes)


# --------------------------------------------------------------------------------------------
# Work off the event loop, with a byte budget and a deadline
# --------------------------------------------------------------------------------------------

class WorkGate:
    """Reserved output bytes of the requests a replica works on: a FIFO queue, bounded in time.

    A request that does not fit waits (first come, first served) up to ``max_wait_s`` for
    earlier ones to finish, then is refused. Used on the event loop only.
    """

    def __init__(self, capacity: int, max_wait_s: float = 0.0):
        self.capacity, self.max_wait_s, self.used = capacity, max_wait_s, 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, cost: int) -> bool:
        if not self._waiters and self.used + cost <= self.capacity:
            self.used += cost
            return True
        if self.max_wait_s <= 0:
            return False
        entry = (cost, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(entry[1]), self.max_wait_s)
            return True
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if entry[1].done() and not entry[1].cancelled():  # granted just as the wait ended
                self.release(cost)
            else:
                entry[1].cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            if isinstance(e, asyncio.CancelledError):
                raise
            return False

    def release(self, cost: int) -> None:
        self.used -= cost
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            cost, fut = self._waiters.popleft()
            if not fut.done():
                self.used += cost
                fut.set_result(True)


class Worker:
    """Runs ``Sampler`` methods in threads, under the gate and the request timeout."""

    def __init__(self, threads: int, capacity_bytes: int, timeout_s: float, queue_wait_s: float = 0.0):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="introprior-work")
        self.gate, self.timeout_s = WorkGate(capacity_bytes, queue_wait_s), timeout_s

    @contextlib.asynccontextmanager
    async def admit(self, cost: int) -> AsyncIterator[Deadline]:
        """Reserve ``cost`` bytes (or 503) for the body of the ``async with``; its work gets one deadline."""
        if not await self.gate.acquire(cost):
            raise RequestError("request", f"the replica is busy (its {self.gate.capacity >> 20} MiB work budget stayed "
                                          f"full for {self.gate.max_wait_s:g} s; this request needs "
                                          f"{max(1, cost >> 20)} MiB); allowed: retry after {RETRY_AFTER_S} s",
                               status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        deadline = Deadline.after(self.timeout_s)
        try:
            yield deadline
        except BaseException:
            deadline.cancel()  # timed out, failed or the client went away: running work stops at its next chunk
            raise
        finally:
            self.gate.release(cost)

    async def wait(self, awaitable: Awaitable[Any], deadline: Deadline) -> Any:
        """Await work until its deadline; 504 after it."""
        try:
            return await asyncio.wait_for(awaitable, max(0.0, deadline.at - _now()) + 0.5)
        except (asyncio.TimeoutError, WorkTimeout):
            raise RequestError("request", f"did not finish within request_timeout_s={self.timeout_s:g} s; allowed "
                                          "smaller n, steps or data", status_code=504) from None

    async def call(self, deadline: Deadline, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await self.wait(loop.run_in_executor(self.pool, fn, *args, deadline), deadline)


def _now() -> float:
    import time

    return time.monotonic()


def _send(r: Rendered) -> Response:
    return Response(r.body, media_type=r.media_type, headers=r.headers)


# --------------------------------------------------------------------------------------------
# Middleware
# --------------------------------------------------------------------------------------------

async def _reply(status: int, field: str, message: str, scope: dict, receive: Callable, send: Callable,
                 headers: dict[str, str] | None = None) -> None:
    await error_response(status, [{"field": field, "message": f"{field}: {message}"}], headers)(scope, receive, send)


def route_path(scope: dict) -> str:
    """The request's path below the app's route prefix (ASGI ``root_path``)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (by Content-Length, or counted when chunked)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _reject(self, size: int, scope: dict, receive: Callable, send: Callable) -> None:
        await _reply(413, "body", f"{size} bytes is too large; allowed at most {self.max_bytes} bytes", scope, receive, send)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _reply(400, "body", f"Content-Length {length[:20].decode(errors='replace')!r} is not a "
                                                 "number; allowed a byte count", scope, receive, send)
            if int(length) > self.max_bytes:
                return await self._reject(int(length), scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True  # no Content-Length: buffer up to the limit, then replay
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None  # client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._reject(size, scope, receive, send)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)


class JsonOnly:
    """ASGI middleware: 415 for a POST whose Content-Type is not ``application/json`` (or ``+json``)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            raw = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            media = raw.split(";")[0].strip().lower()
            if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
                got = repr(raw[:60]) if raw else "missing"
                return await _reply(415, "content-type", f"{got} is not supported; allowed application/json "
                                                         "(curl: -H 'content-type: application/json')",
                                    scope, receive, send)
        return await self.app(scope, receive, send)


class BearerToken:
    """ASGI middleware: every path but ``OPEN_PATHS`` needs ``Authorization: Bearer <token>`` (else 401).

    Holds only the token's SHA-256 and compares digests in constant time.
    """

    def __init__(self, app: Any, token_sha256: str):
        self.app, self.digest = app, bytes.fromhex(token_sha256)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or route_path(scope) in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token.strip()).digest(), self.digest):
            return await self.app(scope, receive, send)
        reason = "missing" if not header else "not a valid bearer token"
        await _reply(401, "authorization", f"{reason}; allowed 'Authorization: Bearer <token>'", scope, receive, send,
                     headers={"WWW-Authenticate": 'Bearer realm="introprior"'})


# --------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------

class _JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JsonRoute(APIRoute):
    """Bodies parsed by ``serving_schema.parse_json``: huge numbers reach validation (422 naming the field)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_JsonRequest(request.scope, request.receive))

        return route


def make_api(sampler: Sampler, sample_fn: Callable[[SamplesRequest, Deadline], Awaitable[SampleResult]] | None = None,
             *, token_sha256: str | None = None, worker: Worker | None = None) -> FastAPI:
    """The routes of one replica. ``sample_fn``: the batched sampling path (None: sample per request);
    ``token_sha256``: SHA-256 (hex) of the bearer token, None = no token needed."""
    lim, args = sampler.limits, sampler.args
    worker = worker or Worker(args.work_threads, args.max_inflight_bytes, args.request_timeout_s, args.queue_wait_s)
    api = FastAPI(title="introprior", version=__version__,
                  description="Samples, modes, interpolations and encodings of a Soft-Intro VAE with a learned "
                              "mixture prior. Errors: {\"detail\": [{\"field\", \"message\"}]} (docs/serving.md).")
    api.router.route_class = JsonRoute

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = BODIES.get(request.url.path)
        errors = exc.errors()
        status = 400 if any(is_malformed(e) for e in errors) else 422
        return error_response(status, [describe_validation_error(e, lim, body) for e in errors])

    @api.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status_code, [exc.as_dict()], exc.headers)

    @api.exception_handler(ModelOutputError)
    async def _broken(request: Request, exc: ModelOutputError) -> JSONResponse:
        return error_response(500, [{"field": "model", "message": str(exc)}])

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code == 404:
            field, message = "path", f"{path[:80]!r} is not an endpoint; allowed {_paths(api)}"
        elif exc.status_code == 405:
            field, message = "method", f"{request.method} is not allowed on {path}; allowed {_allow(exc)}"
        elif exc.status_code == 400:
            field, message = "body", "cannot be read as JSON; allowed a JSON object"
        else:
            field, message = "request", str(exc.detail)
        return error_response(exc.status_code, [{"field": field, "message": f"{field}: {message}"}], exc.headers)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, [{"field": "server", "message": f"server: unexpected {type(exc).__name__}; the "
                                                                   "replica keeps serving (see its log)"}])

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model() -> dict[str, Any]:
        return sampler.info() | {"auth": token_sha256 is not None}

    @api.get("/v1/modes")
    async def modes() -> dict[str, Any]:
        return {"num_components": lim.num_components, "data_modes": sampler.data_modes_json(),
                "mode_shares": sampler.mode_shares_json(), "modes": sampler.modes()}

    @api.post("/v1/samples", responses={200: {"content": {"application/json": {}, "image/png": {},
                                                          "application/octet-stream": {}}}})
    async def samples(body: SamplesRequest) -> Response:
        async with worker.admit(body.check(lim)) as deadline:
            if sample_fn is None:
                return _send(await worker.call(deadline, sampler.samples, body))
            result = await worker.wait(sample_fn(body, deadline), deadline)
            return _send(await worker.call(deadline, sampler.render, result, body.format))

    @api.post("/v1/interpolate")
    async def interpolate(body: InterpolateRequest) -> Response:
        async with worker.admit(body.check(lim)) as deadline:
            return _send(await worker.call(deadline, sampler.interpolate, body))

    @api.post("/v1/encode")
    async def encode(body: EncodeRequest) -> Response:
        async with worker.admit(body.check(lim)) as deadline:
            return _send(await worker.call(deadline, sampler.encode, body))

    @api.post("/v1/reconstruct")
    async def reconstruct(body: ReconstructRequest) -> Response:
        async with worker.admit(body.check(lim)) as deadline:
            return _send(await worker.call(deadline, sampler.reconstruct, body))

    api.add_middleware(BodyLimit, max_bytes=args.max_body_bytes)
    api.add_middleware(JsonOnly)
    if token_sha256 is not None:
        api.add_middleware(BearerToken, token_sha256=token_sha256)  # added last: runs first
    return api


def _allow(exc: StarletteHTTPException) -> str:
    return {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "see /docs")


def _paths(api: FastAPI) -> list[str]:
    return sorted({r.path for r in api.routes if isinstance(r, APIRoute)})
