"""A trained run as an MLflow model: a pyfunc around ``checkpoint.pt``, logged, registered, aliased.

The pyfunc keeps the project's own safe loader: ``load_context`` goes through
``serving_model.load_checked`` (``torch.load(weights_only=True)``, schema and tensor checks, the
decoder self-test), never through pickle of the weights, and the pyfunc itself is logged as code
(``service/mlflow_pyfunc.py``, MLflow's "models from code"), not pickled: loading runs that file, so
it needs the ``service`` package importable (the project installed, or on ``PYTHONPATH``).

``predict`` takes a DataFrame, one row per request (``INPUT_SCHEMA``):

    n (long, required)  mode (long, optional: a component; -1 or no column = the full prior)
    temperature (double, optional, default 1)  seed (long, optional: -1 or no column = a fresh seed)
    data_mode (long, optional: a data mode of labelled training data, instead of mode; -1 or no column = none)
    decoder_noise (boolean, optional, default false: samples of the calibrated Gaussian decoder, not its mean)

(-1 rather than null: MLflow's schema check refuses a long column that mixes numbers and nulls.)

and returns one row per sample: ``request`` (the input row), ``seed``, ``component`` and
``sample`` (the decoded values, flattened from ``data_shape``, which the model's metadata holds).
The same limits and messages as ``POST /v1/samples`` apply (``serving_schema.SamplesRequest``).

    mlflow models serve -m models:/introprior-8gaussians-mog-ip-lc@champion --env-manager local
    curl -d '{"dataframe_records": [{"n": 4, "mode": 0, "seed": 1}]}' -H 'content-type: application/json' \\
        http://127.0.0.1:5000/invocations
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Iterator

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import Array, ColSpec, Schema
from pydantic import ValidationError

from .tracking import env_defaults

MODEL_NAME = "model"  # the logged model's name in its run
PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")  # the model as code: logged and run, never pickled
CHAMPION = "champion"  # the alias a sweep gives its selected trial
INPUT_SCHEMA = Schema([ColSpec("long", "n"), ColSpec("long", "mode", required=False),
                       ColSpec("double", "temperature", required=False), ColSpec("long", "seed", required=False),
                       ColSpec("long", "data_mode", required=False), ColSpec("boolean", "decoder_noise", required=False)])
OUTPUT_SCHEMA = Schema([ColSpec("long", "request"), ColSpec("long", "seed"), ColSpec("long", "component"),
                        ColSpec(Array("double"), "sample")])
SIGNATURE = ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA)
INPUT_EXAMPLE = pd.DataFrame({"n": [4, 2], "mode": [0, -1], "temperature": [1.0, 0.5], "seed": [0, 1]})
# What the pyfunc needs at load time; stated so that MLflow does not infer it (slow: it loads the model).
PIP_REQUIREMENTS = ["torch", "numpy", "pandas", "pydantic", "fastapi", "matplotlib", "pillow", "pyyaml",
                    f"mlflow=={mlflow.__version__}"]
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class RegistrationError(RuntimeError):
    """The tracking store has no model registry (e.g. a file store), or refused the registration."""


def default_model_name(preset: str) -> str:
    """``8gaussians/mog-ip-lc`` -> ``introprior-8gaussians-mog-ip-lc`` (no ``/``: it would split a models:/ URI)."""
    return "introprior-" + _NAME.sub("-", preset).strip("-")


# --------------------------------------------------------------------------------------------
# The pyfunc
# --------------------------------------------------------------------------------------------

class IntroPriorModel(PythonModel):
    """Samples from a checkpoint's prior through its decoder (``predict``: see the module docstring)."""

    def load_context(self, context: Any) -> None:
        from .serving_model import Sampler
        from .serving_schema import ServeArgs

        path = context.artifacts["checkpoint"]
        self.sampler = Sampler.from_checkpoint(path, ServeArgs(checkpoint=str(path)))  # weights_only load + checks

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        requests = [_request(i, row, self.sampler.limits) for i, row in enumerate(model_input.to_dict("records"))]
        results = self.sampler.sample_batch(requests)
        rows = {"request": [], "seed": [], "component": [], "sample": []}
        for i, res in enumerate(results):
            n = len(res.component)
            rows["request"] += [i] * n
            rows["seed"] += [res.seed] * n
            rows["component"] += res.component.tolist()
            rows["sample"] += res.x.reshape(n, -1).double().tolist()
        return pd.DataFrame(rows)


def _optional(row: dict[str, Any], key: str) -> Any:
    v = row.get(key)
    absent = v is None or (isinstance(v, float) and v != v)  # no column, None or NaN
    return None if absent or (key in UNSET_IS_MINUS_ONE and v == -1) else v


UNSET_IS_MINUS_ONE = ("mode", "seed", "data_mode")  # a long column cannot hold null next to numbers: -1 stands for it


def _request(i: int, row: dict[str, Any], limits: Any) -> Any:
    """One input row as a ``SamplesRequest`` checked against the model's limits; errors name row and field."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from .serving_schema import RequestError, SamplesRequest

    body = {"n": _optional(row, "n"), "mode": _optional(row, "mode"), "seed": _optional(row, "seed"),
            "temperature": _optional(row, "temperature"), "data_mode": _optional(row, "data_mode"),
            "decoder_noise": _optional(row, "decoder_noise")}
    cast = {"temperature": float, "decoder_noise": bool}
    body = {k: cast.get(k, int)(v) for k, v in body.items() if v is not None}
    try:
        req = SamplesRequest.model_validate(body)
        req.check(limits)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else "input"
        raise MlflowException(f"row {i}: {field}: {err['msg']}; allowed {limits.allowed(field)}",
                              INVALID_PARAMETER_VALUE) from None
    except RequestError as e:
        raise MlflowException(f"row {i}: {e.as_dict()['message']}", INVALID_PARAMETER_VALUE) from None
    return req


# --------------------------------------------------------------------------------------------
# Logging, registration, aliases
# --------------------------------------------------------------------------------------------

def log_model(tracking_uri: str, run_id: str, checkpoint_path: str | Path) -> str:
    """Log ``checkpoint_path`` as the run's pyfunc model (signature, input example); returns its ``models:/`` URI.

    The checkpoint is copied into the model's artifacts: the model stands alone once logged.
    """
    from .checkpoint import load

    state = load(checkpoint_path)  # refuse to log a file that the pyfunc could not load
    metadata = {"data_shape": [int(s) for s in state["data_shape"]], "preset": state["config"].get("name"),
                "prior_type": state.get("prior_type"), "iteration": int(state["iteration"])}
    with using_store(tracking_uri), mlflow.start_run(run_id=run_id, log_system_metrics=False), \
            env_defaults({"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}), \
            logger_level("mlflow.pyfunc", logging.WARNING):  # no bar nor INFO line when MLflow checks the example
        info = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=str(PYFUNC_CODE),
                                       artifacts={"checkpoint": str(Path(checkpoint_path).resolve())},
                                       signature=SIGNATURE, input_example=INPUT_EXAMPLE,
                                       pip_requirements=PIP_REQUIREMENTS, metadata=metadata)
    return info.model_uri


@contextlib.contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """Logger ``name`` at ``level`` at least for the block (its own level afterwards)."""
    log = logging.getLogger(name)
    before = log.level
    log.setLevel(max(level, log.getEffectiveLevel()))
    try:
        yield
    finally:
        log.setLevel(before)


@contextlib.contextmanager
def using_store(uri: str | None) -> Iterator[None]:
    """MLflow's fluent API (log_model, models:/ resolution) on ``uri``; the process's own URI afterwards.

    (``download_artifacts(registry_uri=...)`` does not reach the resolution of a ``models:/`` URI.)
    """
    if uri is None:
        yield
        return
    previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)


def register(tracking_uri: str, run_id: str, name: str, alias: str | None = None) -> Any:
    """A new version of registered model ``name`` from the run's logged model (``alias`` moved onto it).

    Idempotent: where a version of ``name`` already holds that logged model (a resumed sweep or run
    registering its pick again), that version is returned (and the alias moved onto it), not a copy.
    Raises ``RegistrationError`` when the store has no registry or refuses (the message says which store).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        experiment = client.get_run(run_id).info.experiment_id
        models = [m for m in client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
                  if m.name == MODEL_NAME]
        if not models:
            raise RegistrationError(f"run {run_id} has no logged model {MODEL_NAME!r} to register")
        model = max(models, key=lambda m: m.creation_timestamp)
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="introprior: a Soft-Intro VAE with a learned prior "
                                                              "(pyfunc: n, mode, temperature, seed -> samples)")
        same = [v for v in client.search_model_versions(f"name = '{name}'")
                if v.run_id == run_id and v.source == model.model_uri]  # (search leaves model_id empty)
        if same:
            version = max(same, key=lambda v: int(v.version))
        else:
            with using_store(tracking_uri):  # the registry resolves the models:/ source through the fluent URI
                version = client.create_model_version(name, source=model.model_uri, run_id=run_id,
                                                      model_id=model.model_id)
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as e:
        raise RegistrationError(f"cannot register model {name!r} in {tracking_uri!r}: "
                                f"{str(e).splitlines()[0][:300]}") from None
    return version
