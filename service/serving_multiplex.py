"""Serving, one endpoint for many models: ``@serve.multiplexed`` loads a model per id, per request.

    serve run service.serving_multiplex:build_app tracking_uri=sqlite:////abs/mlflow.db
    curl -H 'serve_multiplexed_model_id: <run id>' -H 'content-type: application/json' \\
        -d '{"n": 4, "seed": 0}' http://127.0.0.1:8000/v1/samples

The model id travels in Serve's own header ``serve_multiplexed_model_id`` (Serve routes a request
to a replica that already holds that model) and is one of

    <run id>            an MLflow run (32 hex digits): its ``checkpoint/checkpoint.pt`` artifact
    <name>/<version>    a registered model version (``jobs.train`` registers ``introprior-<preset>``)
    <name>@<alias>      a registered model alias, e.g. ``introprior-8gaussians-sintro@champion``

Each replica keeps up to ``max_models_per_replica`` loaded models (Serve's LRU) and answers every
route of the single-model app (``serving_routes.make_api``) for the model the header names, so a
sweep's trials can be compared over HTTP by changing one header. An alias is resolved when its
model is loaded: a replica keeps serving the version it loaded until the model is evicted; use
``<name>/<version>`` to pin one. Without the header every path but ``/healthz`` answers 400; an id
that cannot be fetched or loaded answers 404; both name the header and what is allowed.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Callable

from ray import serve

from .checkpoint import CheckpointError, run_checkpoint_uri
from .serving import BatchedReplica, deployment_options, read_token, resolve_checkpoint
from .serving_model import Sampler
from .serving_routes import OPEN_PATHS, BearerToken, make_api, route_path
from .serving_schema import MultiplexArgs, ServeArgs, error_response

MODEL_ID_HEADER = "serve_multiplexed_model_id"
ALLOWED_IDS = ("an MLflow run id (32 hex digits), <registered model>/<version> or <registered model>@<alias> "
               "(e.g. introprior-8gaussians-sintro@champion)")
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_REGISTERED = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,99})(?:/(?P<version>[1-9][0-9]{0,9})"
                         r"|@(?P<alias>[A-Za-z0-9_-]{1,100}))")


class ModelIdError(ValueError):
    """A model id that is none of the allowed forms."""


def model_uri(model_id: str) -> str:
    """The MLflow URI of a model id (see the module docstring); ``ModelIdError`` for any other string."""
    if _RUN_ID.fullmatch(model_id):
        return run_checkpoint_uri(model_id)
    if m := _REGISTERED.fullmatch(model_id):
        return f"models:/{m['name']}/{m['version']}" if m["version"] else f"models:/{m['name']}@{m['alias']}"
    shown = model_id if len(model_id) <= 60 else model_id[:57] + "..."
    raise ModelIdError(f"{MODEL_ID_HEADER}: {shown!r} is not a model id; allowed {ALLOWED_IDS}")


async def _reply(status: int, message: str, scope: dict, receive: Callable, send: Callable) -> None:
    await error_response(status, [{"field": MODEL_ID_HEADER, "message": message}])(scope, receive, send)


async def _lifespan(receive: Callable, send: Callable) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@serve.deployment(name="IntroPriorModels")
@serve.ingress()  # late-bound: the dispatcher below
class MultiplexDeployment(BatchedReplica):
    """A replica that serves whichever model each request's ``serve_multiplexed_model_id`` names."""

    def __init__(self, args: dict[str, Any], token_sha256: str | None = None):
        self.args = MultiplexArgs.model_validate(args)
        self._setup(self.args, token_sha256)
        self._model_args = self.args.model_dump(exclude={"max_models_per_replica"})

        async def load_introprior_model(model_id: str) -> Any:  # a plain function: Serve keeps its LRU on it
            return await self._load(model_id)

        self.get_model = serve.multiplexed(max_num_models_per_replica=self.args.max_models_per_replica)(
            load_introprior_model)

    async def _load(self, model_id: str) -> Any:
        """Fetch, check and load ``model_id`` in the work pool; its routes are ``make_api``'s."""
        uri = model_uri(model_id)

        def load() -> Sampler:
            with resolve_checkpoint(uri, self.args.tracking_uri) as path:
                return Sampler.from_checkpoint(path, ServeArgs(checkpoint=uri, **self._model_args))

        sampler = self._track(await asyncio.get_running_loop().run_in_executor(self.worker.pool, load))
        return make_api(sampler, lambda body, deadline: self.sample(sampler, body, deadline), worker=self.worker)

    def __serve_build_asgi_app__(self) -> Callable:
        async def dispatch(scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] == "lifespan":
                return await _lifespan(receive, send)
            if scope["type"] != "http":
                return None
            if route_path(scope) in OPEN_PATHS:
                return await _ok(scope, receive, send)
            model_id = dict(scope["headers"]).get(MODEL_ID_HEADER.encode(), b"").decode("latin-1").strip()
            if not model_id:
                return await _reply(400, f"{MODEL_ID_HEADER}: missing header; allowed {ALLOWED_IDS}",
                                    scope, receive, send)
            try:
                api = await self.get_model(model_id)
            except ModelIdError as e:
                return await _reply(400, str(e), scope, receive, send)
            except CheckpointError as e:
                return await _reply(404, f"{MODEL_ID_HEADER}: {model_id!r} cannot be loaded ({e}); allowed {ALLOWED_IDS}",
                                    scope, receive, send)
            return await api(scope, receive, send)

        return dispatch if self.token_sha256 is None else BearerToken(dispatch, self.token_sha256)


async def _ok(scope: dict, receive: Callable, send: Callable) -> None:
    from fastapi.responses import JSONResponse

    await JSONResponse({"status": "ok"})(scope, receive, send)


def build_app(args: MultiplexArgs | dict[str, Any]) -> serve.Application:
    """Validate ``args`` and bind the multiplexed deployment (models are fetched per id, on the replicas)."""
    args = args if isinstance(args, MultiplexArgs) else MultiplexArgs.model_validate(args)
    token_sha256 = read_token(args)
    return MultiplexDeployment.options(**deployment_options(args)).bind(args.model_dump(), token_sha256)
