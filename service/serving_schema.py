"""Serving, part 1 of 4: builder arguments, request models, request costs and the error format.

Every error the API answers has one shape, ``{"detail": [{"field": ..., "message": ...}]}``, and
one status per case (docs/serving.md, "Errors"):

    400  the body is not JSON (malformed, empty, not UTF-8, NaN/Infinity literals)
    401  missing or wrong bearer token (only when the app has a token)
    404  no such path;  405  method not allowed on that path
    413  body larger than ``max_body_bytes``
    415  a POST without ``Content-Type: application/json``
    422  well-formed JSON with a bad value: the field is named, with what is allowed
    500  the model produced non-finite numbers where no request input is to blame
    503  the replica's work budget is full (``Retry-After`` header); 504 the work overran
         ``request_timeout_s``

No pydantic model here builds a tensor: requests are validated before any model work.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

Format = Literal["json", "png", "npy", "npz"]
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 10.0
MAX_INT_DIGITS = 40  # longer JSON integers are not parsed (Python refuses 4,300+ digits anyway)
COMPONENTS_HEADER_LIMIT = 8192  # characters; longer component lists only travel in format=npz
MiB = 2**20

# Bytes one output value costs while a response is built: the float32 tensor, plus what the
# encoding holds at its peak (JSON: a Python float and list slot per value, then the text;
# PNG of images: the float grid and the uint8 canvas). Measured order of magnitude, rounded up.
BYTES_PER_VALUE: dict[str, int] = {"json": 64, "npy": 12, "npz": 16, "png": 24}


# --------------------------------------------------------------------------------------------
# Builder arguments
# --------------------------------------------------------------------------------------------

class BatchConfig(BaseModel):
    """Request batching of ``/v1/samples``: the deployment's ``user_config`` (changed without a restart)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batching: bool = Field(True, description="gather concurrent /v1/samples with @serve.batch")
    max_batch_size: int = Field(16, ge=1, le=1024, description="requests per batch")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0, description="wait for a batch to fill")


class ServingOptions(BaseModel):
    """What every replica of either app needs: limits, budgets, threads, batching, Ray resources, the token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking_uri: str | None = Field(None, description="MLflow tracking URI for runs:/ and models:/ "
                                     "(default $MLFLOW_TRACKING_URI)")
    max_samples: int = Field(4096, ge=1, le=1_000_000, description="largest n of one /v1/samples request")
    max_points: int = Field(4096, ge=1, le=1_000_000, description="most points of one /v1/encode or /v1/reconstruct")
    max_steps: int = Field(1024, ge=2, le=100_000, description="most steps of one /v1/interpolate")
    max_body_bytes: int = Field(2 * MiB, ge=1024, le=256 * MiB, description="larger request bodies get 413")
    max_abs_value: float = Field(1e4, gt=0, le=1e30, description="largest |value| accepted in data (422 beyond)")
    max_request_bytes: int = Field(64 * MiB, ge=MiB, description="largest estimated output of one request (422)")
    max_inflight_bytes: int = Field(256 * MiB, ge=MiB, description="estimated output bytes a replica works on at "
                                    "once; a request that does not fit gets 503 + Retry-After")
    decode_chunk_bytes: int = Field(64 * MiB, ge=MiB, description="decoder activations per chunk (estimated)")
    queue_wait_s: float = Field(10.0, ge=0, le=3600, description="longest wait for the work budget before 503")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="model work longer than this gets 504")
    work_threads: int = Field(2, ge=1, le=32, description="threads for model work and encoding (off the event loop)")
    batching: bool = BatchConfig.model_fields["batching"]
    max_batch_size: int = BatchConfig.model_fields["max_batch_size"]
    batch_wait_timeout_s: float = BatchConfig.model_fields["batch_wait_timeout_s"]
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, gt=0.0, description="CPUs per replica; torch threads = max(1, floor(num_cpus))")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; keep >= max_batch_size")
    max_queued_requests: int = Field(256, ge=1, description="per proxy; beyond it Serve answers 503 + Retry-After")
    auth_token_file: str | None = Field(None, description="file with the bearer token for every endpoint but "
                                        "/healthz (read when the app is built; or set $INTROPRIOR_API_TOKEN)")
    access_log: bool = Field(True, description="one replica log line per request (off for benchmarks)")

    @model_validator(mode="after")
    def _budgets(self) -> ServingOptions:
        if self.max_request_bytes > self.max_inflight_bytes:
            raise ValueError(f"max_request_bytes ({self.max_request_bytes}) must be <= max_inflight_bytes "
                             f"({self.max_inflight_bytes}): a maximal request must fit the replica's budget")
        return self

    def batch_config(self) -> BatchConfig:
        return BatchConfig(**{k: getattr(self, k) for k in BatchConfig.model_fields})


class ServeArgs(ServingOptions):
    """Arguments of ``build_app``: ``serve run ... key=value``, deploy/serve.yaml ``args:``, jobs/serve.py.

    Ray resources and batching here are defaults: a config file's ``deployments:`` block (replicas,
    CPUs, autoscaling, ``user_config``) overrides them.
    """

    checkpoint: str = Field(min_length=1, description="checkpoint.pt path (absolute on a cluster), or an MLflow URI: "
                            "runs:/<run_id>/checkpoint/checkpoint.pt, models:/<name>/<version>, models:/<name>@<alias> "
                            "(each replica downloads it)")
    checkpoint_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$",
                                          description="refuse a checkpoint file with another SHA-256")


class MultiplexArgs(ServingOptions):
    """Arguments of ``serving_multiplex.build_app``: models come per request, by id (``serve_multiplexed_model_id``)."""

    max_models_per_replica: int = Field(4, ge=1, le=256, description="loaded models a replica keeps (LRU)")


# --------------------------------------------------------------------------------------------
# Limits and request costs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """What one replica accepts; fills the "allowed ..." part of every error message."""

    max_samples: int
    max_points: int
    max_steps: int
    num_components: int
    data_shape: tuple[int, ...]
    max_abs_value: float = 1e4
    max_request_bytes: int = 64 * MiB
    data_modes: tuple[int, ...] | None = None  # data modes some active component stands for; None: no labels
    decoder_sigma: float | None = None  # the calibrated Gaussian decoder's sigma; None: not measured (images, old runs)

    @property
    def values_per_item(self) -> int:
        return math.prod(self.data_shape)

    def _fixed(self, fmt: str) -> int:
        return 4 * MiB if fmt == "png" and len(self.data_shape) == 1 else 0  # a scatter: a fixed-size figure

    def cost(self, items: int, fmt: str = "json") -> int:
        """Estimated peak bytes of the response to a request for ``items`` outputs in ``fmt``."""
        return items * self.values_per_item * BYTES_PER_VALUE[fmt] + self._fixed(fmt)

    def max_items(self, fmt: str = "json") -> int:
        """Most outputs of one request in ``fmt`` under ``max_request_bytes``."""
        per_item = self.values_per_item * BYTES_PER_VALUE[fmt]
        return max(1, (self.max_request_bytes - self._fixed(fmt)) // per_item)

    def check_cost(self, field: str, items: int, fmt: str = "json") -> int:
        """The cost of ``items`` outputs, or a 422 naming ``field`` when it is over the request budget."""
        cost = self.cost(items, fmt)
        if cost > self.max_request_bytes:
            raise RequestError(field, f"{items} outputs of shape {list(self.data_shape)} as {fmt} need about "
                                      f"{cost / MiB:.0f} MiB; allowed at most {self.max_items(fmt)} for this model "
                                      f"and format (max_request_bytes={self.max_request_bytes // MiB} MiB)")
        return cost

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
            "data": f"a list of 1 to {self.max_points} items of shape {list(self.data_shape)}, numbers with "
                    f"|x| <= {self.max_abs_value:g}",
            "stochastic": "true or false",
            "decoder_noise": ("false (this model has no calibrated decoder sigma)" if self.decoder_sigma is None
                              else "true or false"),
            "data_mode": ("null (this model has no data-mode labels)" if self.data_modes is None else
                          f"null or one of {list(self.data_modes)}"),
        }.get(field, "see /docs")


class RequestError(ValueError):
    """A request the model cannot answer; the handler turns it into ``{"detail": [...]}``."""

    def __init__(self, field: str, message: str, status_code: int = 422, headers: dict[str, str] | None = None):
        super().__init__(f"{field}: {message}")
        self.field, self.status_code, self.headers = field, status_code, headers

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": str(self)}


def _out_of_range(field: str, value: Any, lo: int, hi: int) -> RequestError:
    return RequestError(field, f"{value} is out of range; allowed [{lo}, {hi}]")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------
# JSON parsing that never fails on a number: unrepresentable ones reach validation, named
# --------------------------------------------------------------------------------------------

class Unrepresentable:
    """A JSON number that fits no machine type (a 5,000-digit integer, ``1e400``): the field's validator names it."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        digits = len(self.text.lstrip("-"))
        return f"<a number of {digits} characters>" if digits > 24 else f"<{self.text}>"


def _parse_int(text: str) -> int | Unrepresentable:
    return Unrepresentable(text) if len(text) > MAX_INT_DIGITS else int(text)


def _parse_float(text: str) -> float | Unrepresentable:
    value = float(text)
    return value if math.isfinite(value) else Unrepresentable(text)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    """``json.loads`` with the request conventions above; ``json.JSONDecodeError`` for anything not JSON."""
    try:
        return json.loads(body, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_reject_constant)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as e:  # bad UTF-8, NaN/Infinity, nesting deeper than Python's stack
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
        raise json.JSONDecodeError(reason, "", 0) from None


# --------------------------------------------------------------------------------------------
# Request models
# --------------------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplesRequest(_Body):
    """``POST /v1/samples``. ``mode``: null = the full prior, i = component i, a list = round-robin.

    ``data_mode``: k = a data mode (a toy mode, a label, an image class) of a labelled training set; the
    samples come from the active components whose majority data mode is k, each drawn with its prior weight
    (``GET /v1/modes`` lists them). Exclusive with ``mode``. ``decoder_noise``: add the calibrated decoder's
    Gaussian noise to each decoded point (2D models whose evaluation measured ``decoder_sigma``).
    """

    n: StrictInt = Field(16, ge=1, description="number of samples")
    mode: int | list[int] | None = Field(None, description="component index, list of indices, or null")
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED, description="null: a fresh seed, echoed back")
    temperature: StrictFloat = Field(1.0, gt=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                                     description="scales the component standard deviations")
    format: Format = "json"
    data_mode: StrictInt | None = Field(None, description="a data mode of the labelled training set: samples "
                                                          "from the active components that stand for it")
    decoder_noise: StrictBool = Field(False, description="true: samples of the calibrated Gaussian decoder "
                                                         "N(D(z), sigma^2 I) (sigma: GET /v1/model's decoder_sigma) "
                                                         "instead of its mean D(z), the paper's samples")

    @field_validator("mode", mode="before")
    @classmethod
    def _mode_type(cls, v: Any) -> Any:
        if v is None or _is_int(v) or (isinstance(v, list) and v and all(_is_int(i) for i in v)):
            return v
        raise ValueError("must be null, an integer or a non-empty list of integers")

    def check(self, lim: Limits) -> int:
        """Model limits; returns the request's estimated cost in bytes."""
        if self.n > lim.max_samples:
            raise _out_of_range("n", self.n, 1, lim.max_samples)
        for i in [self.mode] if _is_int(self.mode) else self.mode or []:
            if not 0 <= i < lim.num_components:
                raise _out_of_range("mode", i, 0, lim.num_components - 1)
        if self.data_mode is not None:
            if self.mode is not None:
                raise RequestError("data_mode", "give mode (a component) or data_mode (a data mode), not both")
            if lim.data_modes is None:
                raise RequestError("data_mode", "this model has no data-mode labels (its training data was "
                                                "unlabelled); allowed null, and mode for a component")
            if self.data_mode not in lim.data_modes:
                raise RequestError("data_mode", f"{self.data_mode} is the majority mode of no active component "
                                                f"of this model; allowed one of {list(lim.data_modes)}")
        if self.decoder_noise and lim.decoder_sigma is None:
            raise RequestError("decoder_noise", "this model has no calibrated decoder sigma (measured by the 2D "
                                                "evaluation; image models and checkpoints from before it have none); "
                                                "allowed false")
        return lim.check_cost("n", self.n, self.format)


class InterpolateRequest(_Body):
    """``POST /v1/interpolate``: decode ``steps`` points on the segment between two component means."""

    from_mode: StrictInt
    to_mode: StrictInt
    steps: StrictInt = Field(8, ge=2)

    def check(self, lim: Limits) -> int:
        for name in ("from_mode", "to_mode"):
            if not 0 <= getattr(self, name) < lim.num_components:
                raise _out_of_range(name, getattr(self, name), 0, lim.num_components - 1)
        if self.steps > lim.max_steps:
            raise _out_of_range("steps", self.steps, 2, lim.max_steps)
        return lim.check_cost("steps", self.steps)


def _as_float_array(v: list) -> np.ndarray:
    """Nested lists of JSON numbers -> float64 array; ValueError with the reason otherwise."""
    try:
        arr = np.asarray(v)
    except (ValueError, OverflowError):
        raise ValueError("is ragged (items of different lengths)") from None
    if arr.dtype == object:  # integers beyond int64, unrepresentable numbers, null, nested junk
        leaves = arr.ravel()
        if any(isinstance(x, Unrepresentable) for x in leaves):
            raise ValueError("holds a number too large for float32")
        if not all(_is_int(x) or isinstance(x, float) for x in leaves):
            raise ValueError("must hold numbers only (got null or nested values)")
        try:
            arr = np.asarray(v, dtype=np.float64)
        except OverflowError:
            raise ValueError("holds a number too large for float32") from None
    if arr.dtype.kind not in "iuf":
        got = {"b": "true/false", "U": "text", "S": "text"}.get(arr.dtype.kind, "null or nested")
        raise ValueError(f"must hold numbers only (got {got} values)")
    return arr


class EncodeRequest(_Body):
    """``POST /v1/encode``: ``data`` is (B, *data_shape) nested lists of numbers."""

    data: Any = Field(json_schema_extra={"type": "array", "example": [[0.5, 1.0], [-2.0, 0.0]]})

    @field_validator("data", mode="before")
    @classmethod
    def _numeric(cls, v: Any) -> np.ndarray:
        if not isinstance(v, list) or not v:
            raise ValueError("must be a non-empty list")
        arr = _as_float_array(v)
        if not np.isfinite(arr).all():
            raise ValueError("must hold finite numbers only")
        return arr  # float64 until check(): the magnitude bound is the replica's

    def check(self, lim: Limits) -> int:
        shape = list(self.data.shape)
        if shape[1:] != list(lim.data_shape) or shape[0] > lim.max_points:
            raise RequestError("data", f"has shape {shape}; allowed [B, {', '.join(map(str, lim.data_shape))}] "
                                       f"with 1 <= B <= {lim.max_points}")
        peak = float(np.abs(self.data).max())
        if peak > lim.max_abs_value:  # also keeps every value representable in float32 (max 3.4e38)
            raise RequestError("data", f"holds |x| = {peak:.3g}; allowed |x| <= {lim.max_abs_value:g}")
        self.data = self.data.astype(np.float32)
        return lim.check_cost("data", shape[0])


class ReconstructRequest(EncodeRequest):
    """``POST /v1/reconstruct``: ``D(mu(x))``, or ``D(z), z ~ q(z|x)`` with ``stochastic``."""

    stochastic: StrictBool = False
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)


BODIES: dict[str, type[_Body]] = {"/v1/samples": SamplesRequest, "/v1/interpolate": InterpolateRequest,
                                  "/v1/encode": EncodeRequest, "/v1/reconstruct": ReconstructRequest}


# --------------------------------------------------------------------------------------------
# The error format
# --------------------------------------------------------------------------------------------

def is_malformed(err: dict[str, Any]) -> bool:
    """A body that is not JSON at all (400), as opposed to JSON with a bad value (422)."""
    loc = [p for p in err.get("loc", ()) if p != "body"]
    return err.get("type") == "json_invalid" or (err.get("type") == "missing" and not loc)


def describe_validation_error(err: dict[str, Any], lim: Limits, body: type[_Body] | None = None) -> dict[str, str]:
    """One pydantic/FastAPI error -> ``{"field", "message"}`` naming the field and what is allowed."""
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return {"field": "body", "message": f"body: malformed JSON ({err.get('ctx', {}).get('error', 'cannot parse')}); "
                                            "allowed a JSON object"}
    if is_malformed(err):
        return {"field": "body", "message": "body: is empty; allowed a JSON object"}
    if not loc or kind in ("model_attributes_type", "dict_type", "model_type"):
        return {"field": "body", "message": "body: must be a JSON object; "
                                            f"allowed fields {list(body.model_fields) if body else '[see /docs]'}"}
    field = loc[0]
    if kind == "extra_forbidden":
        known = list(body.model_fields) if body else "see /docs"
        return {"field": field, "message": f"{field}: unknown field; allowed fields {known}"}
    if kind == "missing":
        return {"field": field, "message": f"{field}: is required; allowed {lim.allowed(field)}"}
    value = err.get("input")
    if isinstance(value, Unrepresentable) or (isinstance(value, list) and any(isinstance(v, Unrepresentable)
                                                                              for v in value)):
        return {"field": field, "message": f"{field}: {value!r} does not fit a 64-bit number; "
                                           f"allowed {lim.allowed(field)}"}
    reason = str(err["ctx"]["error"]) if kind == "value_error" and "ctx" in err else err.get("msg", kind)
    shown = json.dumps(value, default=repr)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return {"field": field, "message": f"{field}: {shown} is invalid ({reason}); allowed {lim.allowed(field)}"}


def error_response(status_code: int, errors: list[dict[str, str]], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": errors}, headers=headers)


def json_safe(value: Any) -> Any:
    """Checkpoint metadata for JSON: tensors/arrays to lists, non-finite floats to null."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
