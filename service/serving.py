"""HTTP serving of a trained model: a Ray Serve deployment with a FastAPI ingress (STYLE §6.7).

Launch (see docs/serving.md):
    python -m jobs.serve --checkpoint runs/demo/checkpoint.pt              # local Ray, 127.0.0.1:8000
    serve run service.serving:build_app checkpoint=/abs/runs/demo/checkpoint.pt
    serve deploy deploy/serve.yaml                                         # after `ray start --head`

Five files, each readable alone (this module re-exports the public names of the first four):
    ``serving_schema``     ``ServeArgs``/``MultiplexArgs``/``BatchConfig``, request models and costs, the error format;
    ``serving_model``      ``Sampler``: the model, chunked and deadline-checked work, bytes out;
    ``serving_routes``     ``make_api``: routes, auth/content-type/size middleware, the work pool;
    ``serving``            checkpoint resolution, ``BatchedReplica`` (threads, batching, ``user_config``),
                           ``SamplerDeployment`` (one checkpoint) and ``build_app``;
    ``serving_multiplex``  one endpoint for many models by id (``@serve.multiplexed``).

BatchNorm policy: the model is served in eval mode, so BatchNorm layers (the image ResNets) use
their running statistics; a sample never depends on the other requests that batching puts
into the same decoder call.

Request batching: concurrent ``POST /v1/samples`` are gathered by ``@serve.batch``; its settings
are the deployment's ``user_config`` (``BatchConfig``), changed by ``serve deploy`` without a restart. Each request
draws its latents with its own seeded generator (so a seed fixes the latents and components
exactly); the latents of the whole batch go through the decoder together, in chunks. Decoded
values are bitwise reproducible with ``batching: false`` and equal up to float rounding otherwise.

CPU per request (docs/serving.md, "Where a request's CPU goes"): on a small model most of a request's
CPU is Ray Serve's own path (HTTP proxy -> replica actor call -> streamed response), not the model.
``SERVE_FAST_PATH_ENV`` holds the Serve switches that cut it; they are read when Ray's processes
start, so ``jobs.serve`` and ``jobs.load_test`` set them before starting a local Ray, and a cluster
sets them where ``ray start`` runs.

Checkpoints on a cluster: ``build_app`` checks the checkpoint where the app is built (so ``serve
run`` fails fast) and pins its SHA-256; every replica resolves the checkpoint itself (an MLflow
URI is downloaded on the replica's node into a temp folder that is removed once loaded) and
refuses a file with another SHA-256.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch
from fastapi import FastAPI
from ray import serve

from . import checkpoint
from .serving_model import (Deadline, ModelOutputError, Rendered, SampleResult, Sampler, WorkTimeout, component_spec,
                            file_sha256, load_checked, png_bytes, render_samples, sample_many)
from .serving_routes import BodyLimit, BearerToken, JsonOnly, Worker, WorkGate, make_api
from .serving_schema import (BODIES, MAX_SEED, MAX_TEMPERATURE, BatchConfig, EncodeRequest, Format,
                             InterpolateRequest, Limits, MultiplexArgs, ReconstructRequest, RequestError,
                             SamplesRequest, ServeArgs, ServingOptions, describe_validation_error, error_response,
                             parse_json)

__all__ = ["BODIES", "MAX_SEED", "MAX_TEMPERATURE", "BatchConfig", "BatchedReplica", "BearerToken", "BodyLimit",
           "Deadline", "EncodeRequest", "Format", "InterpolateRequest", "JsonOnly", "Limits", "ModelOutputError",
           "MultiplexArgs", "ReconstructRequest", "Rendered", "RequestError", "SampleResult", "Sampler",
           "SamplerDeployment", "SamplesRequest", "ServeArgs", "ServeConfigError", "ServingOptions", "WorkGate",
           "WorkTimeout", "Worker", "build_app", "component_spec", "deployment_options", "describe_validation_error",
           "error_response", "file_sha256", "load_checked", "make_api", "parse_json", "png_bytes", "read_token",
           "render_samples", "replica_threads", "resolve_checkpoint", "sample_many", "SERVE_FAST_PATH_ENV",
           "use_fast_path_env", "direct_ingress_env", "find_replica_port", "DIRECT_INGRESS_PORTS"]

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")

# Ray Serve's own switches (the values its RAY_SERVE_THROUGHPUT_OPTIMIZED mode picks, without its direct
# ingress and gRPC, which need an external load balancer); measured in docs/serving.md. Read when Ray's
# processes start: export them before `ray start` / `serve run`; jobs.serve and jobs.load_test set them
# (unless already set) for the local Ray they start.
SERVE_FAST_PATH_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",  # replica: the app on the replica's own event loop
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",  # proxy: route on the proxy's loop, no cross-thread handoff
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",  # buffer request-path log lines (errors flush at once)
    "RAY_SERVE_LOG_TO_STDERR": "0",  # Serve's logs go to their files only, not also to stderr
}
TOKEN_ENV = "INTROPRIOR_API_TOKEN"
MIN_TOKEN_CHARS = 16


class ServeConfigError(ValueError):
    """A serving option that cannot work (an unreadable or too short bearer token)."""


# --------------------------------------------------------------------------------------------
# Checkpoint resolution (on the builder's node, and again on every replica's node)
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def resolve_checkpoint(spec: str, tracking_uri: str | None = None, sha256: str | None = None) -> Iterator[Path]:
    """A local checkpoint file for ``spec`` while the ``with`` block runs.

    A local path is used as is; an MLflow URI is downloaded (lazy ``import mlflow``) into a temp
    folder that is removed when the block exits. A downloaded folder must hold exactly one
    ``*.pt`` file. With ``sha256``, a file with another SHA-256 is refused. Raises ``CheckpointError``.
    """
    if not spec.startswith(MLFLOW_SCHEMES):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise checkpoint.CheckpointError(f"checkpoint: {spec!r} does not exist (resolved to {str(path)!r})")
        _check_sha256(path, spec, sha256)
        yield path
        return
    import mlflow

    folder = tempfile.mkdtemp(prefix="introprior-ckpt-")
    try:
        try:
            from .mlflow_model import using_store

            with using_store(tracking_uri):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, tracking_uri=tracking_uri,
                                                                 dst_path=folder))
        except Exception as e:  # noqa: BLE001 - MlflowException, OSError: all mean "cannot fetch it"
            raise checkpoint.CheckpointError(f"checkpoint: cannot download {spec!r} from MLflow (tracking URI "
                                             f"{tracking_uri or 'from $MLFLOW_TRACKING_URI'}): {e}") from None
        if local.is_dir():
            found = sorted(local.rglob("*.pt"))
            if len(found) != 1:
                raise checkpoint.CheckpointError(f"checkpoint: {spec!r} holds {len(found)} *.pt files "
                                                 f"({[p.name for p in found]}); name one in the URI")
            local = found[0]
        _check_sha256(local, spec, sha256)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check_sha256(path: Path, spec: str, expected: str | None) -> None:
    if expected is not None and (got := file_sha256(path)) != expected.lower():
        raise checkpoint.CheckpointError(f"checkpoint: {spec!r} has SHA-256 {got}; expected {expected.lower()} "
                                         "(checkpoint_sha256); refusing to load it")


def use_fast_path_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set ``SERVE_FAST_PATH_ENV`` in ``environ`` (default ``os.environ``) where a key is unset; returns the values
    in force.

    Call it before ``ray.init`` starts a local Ray: its proxy and replicas inherit the environment.
    """
    environ = os.environ if environ is None else environ
    for key, value in SERVE_FAST_PATH_ENV.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in SERVE_FAST_PATH_ENV}


DIRECT_INGRESS_PORTS = 16  # ports a direct-ingress replica may take: [port, port + 16) (a restarted one takes the next)


def direct_ingress_env(port: int, span: int = DIRECT_INGRESS_PORTS) -> dict[str, str]:
    """Serve's direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS``, experimental in Ray 2.60): the ingress
    replica runs the HTTP server itself and the proxy hop goes away (docs/serving.md measures it). Each
    replica takes the first free port of ``[port, port + span)``; with one replica that is ``port``. No load
    balancer spreads requests over several replicas (Serve's HAProxy ingress would). Read where Ray's
    processes start, like ``SERVE_FAST_PATH_ENV``."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + span),
            # a stopping replica keeps answering this long so that a load balancer can notice (default 30 s,
            # which every shutdown then waits); none is in front here. In-flight requests still finish.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def find_replica_port(host: str, port: int, span: int = DIRECT_INGRESS_PORTS, timeout_s: float = 120.0) -> int:
    """The port of ``[port, port + span)`` on which the direct-ingress replica answers ``/healthz``."""
    import socket

    import httpx

    probe = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in range(port, port + span):
            with socket.socket(socket.AF_INET6 if ":" in probe else socket.AF_INET) as sock:
                sock.settimeout(0.05)
                if sock.connect_ex((probe, p)) != 0:
                    continue
            try:
                if httpx.get(f"http://{'[' + probe + ']' if ':' in probe else probe}:{p}/healthz",
                             timeout=2.0).status_code == 200:
                    return p
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"no replica answered /healthz on {probe}:{port} - {port + span - 1} within {timeout_s:g} s")


def read_token(args: ServeArgs) -> str | None:
    """SHA-256 (hex) of the bearer token from ``args.auth_token_file`` or ``$INTROPRIOR_API_TOKEN``; None = no token.

    Only the digest leaves this function: replicas never hold the token itself.
    """
    if args.auth_token_file:
        try:
            token = Path(args.auth_token_file).expanduser().read_text().strip()
        except OSError as e:
            raise ServeConfigError(f"auth_token_file: cannot read {args.auth_token_file!r} ({e.strerror})") from None
        source = f"auth_token_file {args.auth_token_file!r}"
    elif os.environ.get(TOKEN_ENV):
        token, source = os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ServeConfigError(f"{source}: the token must be at least {MIN_TOKEN_CHARS} characters without spaces "
                               "(e.g. `openssl rand -hex 32`)")
    return hashlib.sha256(token.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Ray Serve deployment and application builder
# --------------------------------------------------------------------------------------------

def replica_threads(default_cpus: float) -> int:
    """Torch threads = the CPUs Ray gave this replica (a config file's ``ray_actor_options`` included), min 1."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", default_cpus)
    except Exception:  # noqa: BLE001 - not in a Ray worker (tests): the argument
        cpus = default_cpus
    return max(1, int(cpus))


class BatchedReplica:
    """What both deployments share: torch threads, the work pool, and ``/v1/samples`` batching.

    Batching runs through one ``@serve.batch`` queue per replica; a batch is split by model, and each
    model's requests share one decoder pass. Its settings are the deployment's ``user_config``
    (``BatchConfig``), so ``serve deploy`` with a new ``user_config`` changes them without a restart.
    """

    def _setup(self, args: ServingOptions, token_sha256: str | None) -> None:
        self.token_sha256 = token_sha256
        torch.set_num_threads(replica_threads(args.num_cpus))  # Ray's OMP_NUM_THREADS is not enough
        self.worker = Worker(args.work_threads, args.max_inflight_bytes, args.request_timeout_s, args.queue_wait_s)
        self._defaults, self._samplers = args.batch_config(), weakref.WeakSet()
        self.batch_stats = {"batches": 0, "requests": 0}  # /v1/model: the mean batch size actually reached
        self.reconfigure({})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's ``user_config``: ``BatchConfig`` fields over the builder's args."""
        self.batch = BatchConfig.model_validate(self._defaults.model_dump() | dict(user_config or {}))
        self._sample_batched.set_max_batch_size(self.batch.max_batch_size)
        self._sample_batched.set_batch_wait_timeout_s(self.batch.batch_wait_timeout_s)
        for sampler in list(self._samplers):
            self._track(sampler)

    def _track(self, sampler: Sampler) -> Sampler:
        """``/v1/model`` of ``sampler`` shows the batch settings in force."""
        sampler.args = sampler.args.model_copy(update=self.batch.model_dump())
        sampler.batch_stats = self.batch_stats
        self._samplers.add(sampler)
        return sampler

    async def sample(self, sampler: Sampler, body: SamplesRequest, deadline: Deadline) -> SampleResult:
        if self.batch.batching:
            return await self._sample_batched((sampler, body, deadline))
        return (await self.worker.call(deadline, sampler.sample_batch, [body]))[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _sample_batched(self, jobs: list[tuple[Sampler, SamplesRequest, Deadline]]) -> list[SampleResult]:
        """Per model, one decoder pass (in chunks, in the work pool); stops once every job's deadline passed."""
        loop = asyncio.get_running_loop()
        self.batch_stats["batches"] += 1
        self.batch_stats["requests"] += len(jobs)
        out: list[SampleResult | None] = [None] * len(jobs)
        by_model: dict[int, list[int]] = {}
        for i, (sampler, _, _) in enumerate(jobs):
            by_model.setdefault(id(sampler), []).append(i)
        for idx in by_model.values():
            sampler, latest = jobs[idx[0]][0], max((jobs[i][2] for i in idx), key=lambda d: d.at)
            results = await loop.run_in_executor(self.worker.pool, sampler.sample_batch, [jobs[i][1] for i in idx],
                                                 latest)
            for i, r in zip(idx, results):
                out[i] = r
        return out


@serve.deployment(name="IntroPriorSampler")
@serve.ingress()  # late-bound: __serve_build_asgi_app__ builds the app once the model is loaded
class SamplerDeployment(BatchedReplica):
    """One replica: the model on CPU, torch threads = its CPU allotment, batched /v1/samples."""

    def __init__(self, args: dict[str, Any], sha256: str, token_sha256: str | None = None):
        self.args = ServeArgs.model_validate(args)
        self._setup(self.args, token_sha256)
        with resolve_checkpoint(self.args.checkpoint, self.args.tracking_uri, sha256) as path:
            self.sampler = self._track(Sampler.from_checkpoint(path, self.args, sha256=sha256))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.sampler, lambda body, deadline: self.sample(self.sampler, body, deadline),
                        token_sha256=self.token_sha256, worker=self.worker)


def deployment_options(args: ServingOptions) -> dict[str, Any]:
    """``.options()`` from the builder's args; a config file's ``deployments:`` block overrides each of them."""
    return {"num_replicas": args.num_replicas, "ray_actor_options": {"num_cpus": args.num_cpus},
            "max_ongoing_requests": args.max_ongoing_requests, "max_queued_requests": args.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": 1},
            "logging_config": {"enable_access_log": args.access_log},
            "user_config": args.batch_config().model_dump()}


def build_app(args: ServeArgs | dict[str, Any]) -> serve.Application:
    """Validate ``args``, fetch and check the checkpoint **here** (``serve run`` fails fast), bind the deployment.

    Raises ``pydantic.ValidationError`` for bad args, ``CheckpointError`` for a missing, unreadable,
    mismatched (``checkpoint_sha256``) or insane checkpoint, and ``ServeConfigError`` for a bad
    token; nothing has been deployed then.
    """
    args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    token_sha256 = read_token(args)
    with resolve_checkpoint(args.checkpoint, args.tracking_uri, args.checkpoint_sha256) as path:
        sha256 = file_sha256(path)
        Sampler.from_checkpoint(path, args, sha256=sha256)  # the replicas' own check, run once here
    return SamplerDeployment.options(**deployment_options(args)).bind(args.model_dump(), sha256, token_sha256)
