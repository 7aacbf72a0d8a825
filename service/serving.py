"""HTTP serving of a trained model: a Ray Serve deployment with a FastAPI ingress (STYLE §6.7).

Launch (see README "Serve"):
    python -m jobs.serve --checkpoint runs/demo/checkpoint.pt              # local Ray, 127.0.0.1:8000
    serve run service.serving:build_app checkpoint=/abs/runs/demo/checkpoint.pt
    serve deploy deploy/serve.yaml                                         # after `ray start --head`

Four layers, each readable alone:
    ``ServeArgs``          validated builder arguments (CLI ``key=value``, the YAML ``args:`` block);
    ``Sampler``            plain Python: the model, the request limits, one method per route;
    ``make_api``           the FastAPI routes, request models and the 4xx error format;
    ``SamplerDeployment``  Ray Serve: replica resources, torch threads, request batching.

BatchNorm policy: the model is served in eval mode, so BatchNorm layers (the image ResNets) use
their running statistics; a sample never depends on the other requests that batching puts
into the same decoder call.

Request batching: concurrent ``POST /v1/samples`` are gathered by ``@serve.batch``. Each request
draws its latents with its own seeded generator (so a seed fixes the latents and components
exactly); the latents of the whole batch go through the decoder in one call. Decoded values
are bitwise reproducible with ``batching: false`` and equal up to float rounding otherwise.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, get_args

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator
from ray import serve
from torch import Tensor

from . import __version__, checkpoint, sampling
from .model import Model

Format = Literal["json", "png", "npy", "npz"]
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 10.0
COMPONENTS_HEADER_LIMIT = 8192  # characters; longer component lists only travel in format=npz
MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


# --------------------------------------------------------------------------------------------
# Arguments and checkpoint resolution
# --------------------------------------------------------------------------------------------

class ServeArgs(BaseModel):
    """Arguments of ``build_app``: ``serve run ... key=value``, deploy/serve.yaml ``args:``, jobs/serve.py."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field(min_length=1, description="checkpoint.pt path, or an MLflow URI "
                            "runs:/<run_id>/checkpoint/checkpoint.pt (downloaded when the app is built)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI for runs:/ (default $MLFLOW_TRACKING_URI)")
    max_samples: int = Field(4096, ge=1, le=1_000_000, description="largest n of one /v1/samples request")
    max_points: int = Field(4096, ge=1, le=1_000_000, description="most points of one /v1/encode or /v1/reconstruct")
    max_steps: int = Field(1024, ge=2, le=100_000, description="most steps of one /v1/interpolate")
    max_body_bytes: int = Field(2 * 2**20, ge=1024, description="larger request bodies get 413")
    batching: bool = Field(True, description="gather concurrent /v1/samples with @serve.batch")
    max_batch_size: int = Field(16, ge=1, le=1024, description="requests per batch")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0, description="wait for a batch to fill")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, gt=0.0, description="CPUs per replica; torch threads = max(1, floor(num_cpus))")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; keep >= max_batch_size")
    access_log: bool = Field(True, description="one replica log line per request (off for benchmarks)")


def resolve_checkpoint(spec: str, tracking_uri: str | None = None) -> Path:
    """A local path as is; an MLflow URI downloaded (lazy ``import mlflow``) to a temp folder.

    A downloaded folder must hold exactly one ``*.pt`` file. Raises ``CheckpointError``.
    """
    if not spec.startswith(MLFLOW_SCHEMES):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise checkpoint.CheckpointError(f"checkpoint: {spec!r} does not exist (resolved to {str(path)!r})")
        return path
    import tempfile

    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, tracking_uri=tracking_uri,
                                                         dst_path=tempfile.mkdtemp(prefix="introprior-ckpt-")))
    except Exception as e:  # noqa: BLE001 - MlflowException, OSError: all mean "cannot fetch it"
        raise checkpoint.CheckpointError(f"checkpoint: cannot download {spec!r} from MLflow "
                                         f"(tracking URI {tracking_uri or 'from $MLFLOW_TRACKING_URI'}): {e}") from None
    if local.is_dir():
        found = sorted(local.rglob("*.pt"))
        if len(found) != 1:
            raise checkpoint.CheckpointError(f"checkpoint: {spec!r} holds {len(found)} *.pt files "
                                             f"({[p.name for p in found]}); name one in the URI")
        local = found[0]
    return local


def load_checked(path: str | Path) -> tuple[dict[str, Any], Model]:
    """``checkpoint.load`` + ``restore_model``; every failure is a ``CheckpointError``."""
    state = checkpoint.load(path)
    try:
        _, model = checkpoint.restore_model(state)
    except Exception as e:  # noqa: BLE001 - missing keys, shape mismatch, bad config: one message
        raise checkpoint.CheckpointError(f"checkpoint: {str(path)!r} cannot be restored ({type(e).__name__}: {e})") from None
    return state, model


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Request models and the error format: {"detail": [{"field", "message"}]}, 4xx
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """What one replica accepts; fills the "allowed ..." part of every error message."""

    max_samples: int
    max_points: int
    max_steps: int
    num_components: int
    data_shape: tuple[int, ...]

    def allowed(self, field: str) -> str:
        last = self.num_components - 1
        return {
            "n": f"integers in [1, {self.max_samples}]",
            "mode": f"null, an integer in [0, {last}] or a non-empty list of them",
            "seed": f"null or an integer in [0, {MAX_SEED}]",
            "temperature": f"numbers in (0, {MAX_TEMPERATURE:g}]",
            "format": f"one of {list(get_args(Format))}",
            "from_mode": f"integers in [0, {last}]",
            "to_mode": f"integers in [0, {last}]",
            "steps": f"integers in [2, {self.max_steps}]",
            "data": f"a list of 1 to {self.max_points} items of shape {list(self.data_shape)}, numbers only",
            "stochastic": "true or false",
        }.get(field, "see /docs")


class RequestError(ValueError):
    """A request the model cannot answer; the handler turns it into ``{"detail": [...]}`` with 4xx."""

    def __init__(self, field: str, message: str, status_code: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.status_code = field, status_code

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": str(self)}


def _out_of_range(field: str, value: Any, lo: int, hi: int) -> RequestError:
    return RequestError(field, f"{value} is out of range; allowed [{lo}, {hi}]")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplesRequest(_Body):
    """``POST /v1/samples``. ``mode``: null = the full prior, i = component i, a list = round-robin."""

    n: StrictInt = Field(16, ge=1, description="number of samples")
    mode: int | list[int] | None = Field(None, description="component index, list of indices, or null")
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED, description="null: a fresh seed, echoed back")
    temperature: StrictFloat = Field(1.0, gt=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                                     description="scales the component standard deviations")
    format: Format = "json"

    @field_validator("mode", mode="before")
    @classmethod
    def _mode_type(cls, v: Any) -> Any:
        if v is None or _is_int(v) or (isinstance(v, list) and v and all(_is_int(i) for i in v)):
            return v
        raise ValueError("must be null, an integer or a non-empty list of integers")

    def check(self, lim: Limits) -> None:
        if self.n > lim.max_samples:
            raise _out_of_range("n", self.n, 1, lim.max_samples)
        for i in [self.mode] if _is_int(self.mode) else self.mode or []:
            if not 0 <= i < lim.num_components:
                raise _out_of_range("mode", i, 0, lim.num_components - 1)


class InterpolateRequest(_Body):
    """``POST /v1/interpolate``: decode ``steps`` points on the segment between two component means."""

    from_mode: StrictInt
    to_mode: StrictInt
    steps: StrictInt = Field(8, ge=2)

    def check(self, lim: Limits) -> None:
        for name in ("from_mode", "to_mode"):
            if not 0 <= getattr(self, name) < lim.num_components:
                raise _out_of_range(name, getattr(self, name), 0, lim.num_components - 1)
        if self.steps > lim.max_steps:
            raise _out_of_range("steps", self.steps, 2, lim.max_steps)


class EncodeRequest(_Body):
    """``POST /v1/encode``: ``data`` is (B, *data_shape) nested lists of numbers."""

    data: Any = Field(json_schema_extra={"type": "array", "example": [[0.5, 1.0], [-2.0, 0.0]]})

    @field_validator("data", mode="before")
    @classmethod
    def _numeric(cls, v: Any) -> np.ndarray:
        if not isinstance(v, list) or not v:
            raise ValueError("must be a non-empty list")
        try:
            arr = np.asarray(v)
        except ValueError:
            raise ValueError("is ragged (items of different lengths)") from None
        if arr.dtype.kind not in "iuf":
            got = {"b": "true/false", "U": "text", "S": "text"}.get(arr.dtype.kind, "null or nested")
            raise ValueError(f"must hold numbers only (got {got} values)")
        if not np.isfinite(arr).all():
            raise ValueError("must hold finite numbers only")
        return arr.astype(np.float32)

    def check(self, lim: Limits) -> None:
        shape = list(self.data.shape)
        if shape[1:] != list(lim.data_shape) or shape[0] > lim.max_points:
            raise RequestError("data", f"has shape {shape}; allowed [B, {', '.join(map(str, lim.data_shape))}] "
                                       f"with 1 <= B <= {lim.max_points}")


class ReconstructRequest(EncodeRequest):
    """``POST /v1/reconstruct``: ``D(mu(x))``, or ``D(z), z ~ q(z|x)`` with ``stochastic``."""

    stochastic: StrictBool = False
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)


BODIES: dict[str, type[_Body]] = {"/v1/samples": SamplesRequest, "/v1/interpolate": InterpolateRequest,
                                  "/v1/encode": EncodeRequest, "/v1/reconstruct": ReconstructRequest}


def describe_validation_error(err: dict[str, Any], lim: Limits, body: type[_Body] | None = None) -> dict[str, str]:
    """One pydantic/FastAPI error -> ``{"field", "message"}`` naming the field and what is allowed."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return {"field": "body", "message": f"body: malformed JSON ({err.get('ctx', {}).get('error', 'cannot parse')}); "
                                            "allowed a JSON object"}
    if not loc or kind in ("model_attributes_type", "dict_type"):
        return {"field": "body", "message": "body: must be a JSON object (Content-Type: application/json); "
                                            f"allowed fields {list(body.model_fields) if body else '[see /docs]'}"}
    field = loc[0]
    if kind == "extra_forbidden":
        known = list(body.model_fields) if body else "see /docs"
        return {"field": field, "message": f"{field}: unknown field; allowed fields {known}"}
    if kind == "missing":
        return {"field": field, "message": f"{field}: is required; allowed {lim.allowed(field)}"}
    reason = str(err["ctx"]["error"]) if kind == "value_error" and "ctx" in err else err.get("msg", kind)
    shown = json.dumps(err.get("input"), default=str)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return {"field": field, "message": f"{field}: {shown} is invalid ({reason}); allowed {lim.allowed(field)}"}


def error_response(status_code: int, errors: list[dict[str, str]]) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": errors})


# --------------------------------------------------------------------------------------------
# Model operations behind the routes (no HTTP, no Ray)
# --------------------------------------------------------------------------------------------

def component_spec(mode: int | list[int] | None, n: int) -> int | Tensor | None:
    """``mode`` of a request as ``Prior.sample``'s ``component``: a list becomes round-robin (n,)."""
    if mode is None or _is_int(mode):
        return mode
    return torch.tensor(mode, dtype=torch.long).repeat(math.ceil(n / len(mode)))[:n]


@dataclass
class SampleResult:
    x: Tensor  # (n, *data_shape)
    z: Tensor  # (n, D)
    component: Tensor  # (n,)
    seed: int


@torch.no_grad()
def sample_many(model: Model, requests: list[SamplesRequest]) -> list[SampleResult]:
    """Latents per request from its own seeded generator, then **one** decoder call for all of them.

    For a single request this is exactly ``sampling.sample(model, n, component=..., seed=...)``.
    """
    draws = []
    for r in requests:
        seed = r.seed if r.seed is not None else secrets.randbelow(MAX_SEED + 1)
        z, idx = model.prior.sample(r.n, torch.Generator().manual_seed(seed), component=component_spec(r.mode, r.n),
                                    temperature=r.temperature)
        draws.append((z, idx, seed))
    x = model.decoder(torch.cat([z for z, _, _ in draws]))  # (sum n, *data_shape)
    xs = x.split([r.n for r in requests])
    return [SampleResult(xi, z, idx, seed) for xi, (z, idx, seed) in zip(xs, draws)]


class Sampler:
    """One loaded checkpoint: model in eval mode, request limits, one method per route."""

    def __init__(self, model: Model, state: dict[str, Any], args: ServeArgs, *, path: str | Path,
                 sha256: str | None = None):
        self.model = model.eval()  # BatchNorm: running statistics (see the module docstring)
        self.state, self.args, self.path = state, args, str(path)
        self.sha256 = sha256 or file_sha256(path)
        self.data_shape = tuple(int(s) for s in state["data_shape"])
        self.limits = Limits(args.max_samples, args.max_points, args.max_steps,
                             model.prior.num_components, self.data_shape)

    @classmethod
    def from_checkpoint(cls, path: str | Path, args: ServeArgs) -> Sampler:
        state, model = load_checked(path)
        return cls(model, state, args, path=path)

    def info(self) -> dict[str, Any]:
        config = self.state["config"]
        return {"name": config.get("name"), "dataset": config["data"]["dataset"], "prior": self.model.prior_type,
                "num_components": self.limits.num_components,
                "latent_dim": int(self.model.prior.components().means.shape[-1]),
                "data_shape": list(self.data_shape), "metrics": self.state.get("extra", {}).get("metrics", {}),
                "checkpoint": {"source": self.args.checkpoint, "path": self.path, "sha256": self.sha256,
                               "iteration": int(self.state["iteration"]),
                               "schema_version": self.state["schema_version"]},
                "serving": {"batching": self.args.batching, "max_batch_size": self.args.max_batch_size,
                            "torch_threads": torch.get_num_threads(), "version": __version__,
                            "limits": {"max_samples": self.args.max_samples, "max_points": self.args.max_points,
                                       "max_steps": self.args.max_steps, "max_body_bytes": self.args.max_body_bytes}}}

    @torch.no_grad()
    def modes(self) -> list[dict[str, Any]]:
        c = self.model.prior.components(detach=True)
        usage = self.state.get("extra", {}).get("usage")
        rows = []
        for i in range(self.limits.num_components):
            row = {"index": i, "weight": float(c.weights[i]), "mean": c.means[i].tolist(),
                   "variance": c.logvars[i].exp().tolist()}
            if usage is not None and len(usage) == self.limits.num_components:
                row |= {"responsibility_share": float(usage[i]), "active": bool(usage[i] >= 1e-2)}
            rows.append(row)
        return rows

    def sample_batch(self, requests: list[SamplesRequest]) -> list[SampleResult]:
        return sample_many(self.model, requests)

    @torch.no_grad()
    def interpolate(self, r: InterpolateRequest) -> dict[str, Any]:
        means = self.model.prior.components(detach=True).means
        t = torch.linspace(0.0, 1.0, r.steps)
        z = torch.lerp(means[r.from_mode], means[r.to_mode], t[:, None])  # (steps, D)
        return {"t": t.tolist(), "latents": z.tolist(), "samples": self.model.decoder(z).tolist()}

    def encode(self, r: EncodeRequest) -> dict[str, Any]:
        mu, logvar, resp = sampling.encode(self.model, torch.from_numpy(r.data))
        return {"mean": mu.tolist(), "logvar": logvar.tolist(), "responsibilities": resp.tolist(),
                "component": resp.argmax(-1).tolist()}

    def reconstruct(self, r: ReconstructRequest) -> dict[str, Any]:
        x = torch.from_numpy(r.data)
        gen = torch.Generator().manual_seed(r.seed) if r.seed is not None else None
        rec = sampling.reconstruct(self.model, x, generator=gen, stochastic=r.stochastic)
        _, _, resp = sampling.encode(self.model, x)
        return {"reconstructions": rec.tolist(), "responsibilities": resp.tolist(),
                "component": resp.argmax(-1).tolist()}


# --------------------------------------------------------------------------------------------
# Response encodings
# --------------------------------------------------------------------------------------------

def png_bytes(x: Tensor, component: Tensor, num_components: int) -> bytes:
    """2D points (n, 2): a scatter coloured by component (matplotlib Agg); images (n, C, H, W): a grid."""
    if x.dim() > 2:
        from PIL import Image
        from torchvision.utils import make_grid

        grid = make_grid(x.clamp(0.0, 1.0), nrow=math.ceil(math.sqrt(x.shape[0])), padding=2)  # (3, H', W')
        buf = io.BytesIO()
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()
    if x.shape[-1] != 2:
        raise RequestError("format", f"png draws 2D points or images, not {x.shape[-1]}-D vectors; allowed json, npy, npz")
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global figure state shared between requests

    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.add_subplot()
    pts, idx = x.numpy(), component.numpy()
    if num_components <= 20:  # qualitative palette: integer index -> its own colour
        colours = colormaps["tab10" if num_components <= 10 else "tab20"](idx)
    else:
        colours = colormaps["hsv"](idx / num_components)
    ax.scatter(pts[:, 0], pts[:, 1], s=4, c=colours, linewidths=0)
    centre, half = (pts.max(0) + pts.min(0)) / 2, max(float((pts.max(0) - pts.min(0)).max()) * 0.55, 1e-3)
    ax.set_xlim(centre[0] - half, centre[0] + half)  # square window: equal scales, fixed image size
    ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_aspect("equal")
    ax.set_title(f"{len(pts)} samples, {num_components} components", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def render_samples(res: SampleResult, fmt: str, num_components: int) -> Response:
    """json: samples + component; npy: the samples array, components in ``X-Components``; npz: both."""
    headers = {"X-Seed": str(res.seed)}
    if fmt == "json":
        return JSONResponse({"n": len(res.component), "seed": res.seed, "samples": res.x.tolist(),
                             "component": res.component.tolist()})
    if fmt == "png":
        return Response(png_bytes(res.x, res.component, num_components), media_type="image/png", headers=headers)
    buf = io.BytesIO()
    if fmt == "npz":
        np.savez(buf, samples=res.x.numpy(), component=res.component.numpy(), latents=res.z.numpy())
    else:
        np.save(buf, res.x.numpy())
        components = ",".join(map(str, res.component.tolist()))
        headers["X-Components"] = components if len(components) <= COMPONENTS_HEADER_LIMIT else "omitted; use format=npz"
    return Response(buf.getvalue(), media_type="application/octet-stream", headers=headers)


# --------------------------------------------------------------------------------------------
# FastAPI app
# --------------------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (by Content-Length, or counted when chunked)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _reject(self, size: int, scope: dict, receive: Callable, send: Callable) -> None:
        msg = f"body: {size} bytes is too large; allowed at most {self.max_bytes} bytes"
        await error_response(413, [{"field": "body", "message": msg}])(scope, receive, send)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
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


def make_api(sampler: Sampler, sample_fn: Callable[[SamplesRequest], Awaitable[SampleResult]] | None = None) -> FastAPI:
    """The routes of one replica. ``sample_fn``: the batched sampling path (None: sample inline)."""
    lim = sampler.limits
    api = FastAPI(title="introprior", version=__version__,
                  description="Samples, modes, interpolations and encodings of a Soft-Intro VAE with a learned "
                              "mixture prior. Errors: 4xx with {\"detail\": [{\"field\", \"message\"}]}.")

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = BODIES.get(request.url.path)
        return error_response(422, [describe_validation_error(e, lim, body) for e in exc.errors()])

    @api.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status_code, [exc.as_dict()])

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model() -> dict[str, Any]:
        return sampler.info()

    @api.get("/v1/modes")
    async def modes() -> dict[str, Any]:
        return {"num_components": lim.num_components, "modes": sampler.modes()}

    @api.post("/v1/samples", responses={200: {"content": {"application/json": {}, "image/png": {},
                                                          "application/octet-stream": {}}}})
    async def samples(body: SamplesRequest) -> Response:
        body.check(lim)
        result = await sample_fn(body) if sample_fn is not None else sampler.sample_batch([body])[0]
        return render_samples(result, body.format, lim.num_components)

    @api.post("/v1/interpolate")
    async def interpolate(body: InterpolateRequest) -> dict[str, Any]:
        body.check(lim)
        return sampler.interpolate(body)

    @api.post("/v1/encode")
    async def encode(body: EncodeRequest) -> dict[str, Any]:
        body.check(lim)
        return sampler.encode(body)

    @api.post("/v1/reconstruct")
    async def reconstruct(body: ReconstructRequest) -> dict[str, Any]:
        body.check(lim)
        return sampler.reconstruct(body)

    api.add_middleware(BodyLimit, max_bytes=sampler.args.max_body_bytes)
    return api


# --------------------------------------------------------------------------------------------
# Ray Serve deployment and application builder
# --------------------------------------------------------------------------------------------

@serve.deployment(name="IntroPriorSampler")
@serve.ingress()  # late-bound: __serve_build_asgi_app__ builds the app once the model is loaded
class SamplerDeployment:
    """One replica: the model on CPU, torch threads = its CPU allotment, batched /v1/samples."""

    def __init__(self, args: dict[str, Any], path: str):
        self.args = ServeArgs.model_validate(args)
        torch.set_num_threads(max(1, int(self.args.num_cpus)))  # Ray's OMP_NUM_THREADS is not enough
        self.sampler = Sampler.from_checkpoint(path, self.args)
        self._sample_batched.set_max_batch_size(self.args.max_batch_size)
        self._sample_batched.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.sampler, self._sample_batched if self.args.batching else None)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _sample_batched(self, requests: list[SamplesRequest]) -> list[SampleResult]:
        return self.sampler.sample_batch(requests)


def build_app(args: ServeArgs | dict[str, Any]) -> serve.Application:
    """Validate ``args``, fetch and check the checkpoint **here** (``serve run`` fails fast), bind the deployment.

    Raises ``pydantic.ValidationError`` for bad args and ``CheckpointError`` for a missing,
    unreadable or other-schema checkpoint; nothing has been deployed then.
    """
    args = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    path = resolve_checkpoint(args.checkpoint, args.tracking_uri)
    load_checked(path)
    deployment = SamplerDeployment.options(num_replicas=args.num_replicas, ray_actor_options={"num_cpus": args.num_cpus},
                                           max_ongoing_requests=args.max_ongoing_requests,
                                           logging_config={"enable_access_log": args.access_log})
    return deployment.bind(args.model_dump(), str(path))
