"""Serving layer without an HTTP server: request validation, the sampling helpers behind the
routes (on a hand-built two-component prior), response encodings, the FastAPI app in-process
(httpx ASGI transport), ServeArgs against deploy/serve.yaml, and the builder's refusals."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydantic import ValidationError
from torch import Tensor, nn

from service import checkpoint, sampling
from service.model import Model
from service.priors import MixturePrior
from service.serving import (BatchConfig, EncodeRequest, InterpolateRequest, Limits, ReconstructRequest, RequestError, Sampler,
                             SamplesRequest, ServeArgs, build_app, component_spec, describe_validation_error,
                             make_api, MultiplexArgs, png_bytes, render_samples, sample_many)

ROOT = Path(__file__).resolve().parents[1]
MEANS = torch.tensor([[-5.0, 0.0], [5.0, 0.0]])


# --------------------------------------------------------------------------------------------
# A hand-built model: two well-separated components, identity decoder, identity-mean encoder
# --------------------------------------------------------------------------------------------

class IdentityEncoder(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.full_like(x, -6.0)


def two_component_model() -> Model:
    prior = MixturePrior(2, 2)
    with torch.no_grad():
        prior.means.copy_(MEANS)
        prior.logvars.fill_(-4.0)  # sigma = 0.135
        prior.logits.copy_(torch.tensor([0.0, 1.0]))
    return Model(IdentityEncoder(), nn.Identity(), prior)


@pytest.fixture(scope="module")
def sampler() -> Sampler:
    state = {"config": {"name": "toy/hand-built", "data": {"dataset": "toy"}}, "iteration": 3, "data_shape": [2],
             "schema_version": checkpoint.SCHEMA_VERSION,
             "extra": {"usage": torch.tensor([0.995, 0.005]), "metrics": {"hist_kl": 0.1}}}
    return Sampler(two_component_model(), state, ServeArgs(checkpoint="in-memory", max_samples=100),
                   path="in-memory", sha256="0" * 64)


LIMITS = Limits(max_samples=100, max_points=10, max_steps=16, num_components=8, data_shape=(2,))


# --------------------------------------------------------------------------------------------
# Request models
# --------------------------------------------------------------------------------------------

def test_samples_request_defaults() -> None:
    r = SamplesRequest()
    assert (r.n, r.mode, r.seed, r.temperature, r.format) == (16, None, None, 1.0, "json")
    assert SamplesRequest(temperature=2).temperature == 2.0  # a JSON integer is a number


@pytest.mark.parametrize("body, field", [
    ({"n": 1.5}, "n"), ({"n": "3"}, "n"), ({"n": True}, "n"), ({"n": 0}, "n"), ({"n": -4}, "n"),
    ({"mode": "a"}, "mode"), ({"mode": []}, "mode"), ({"mode": [1, 2.5]}, "mode"), ({"mode": True}, "mode"),
    ({"seed": -1}, "seed"), ({"seed": 1.0}, "seed"), ({"temperature": 0}, "temperature"),
    ({"temperature": 11}, "temperature"), ({"format": "gif"}, "format"), ({"colour": "red"}, "colour"),
])
def test_samples_request_rejects_with_field_named(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        SamplesRequest.model_validate(body)
    described = [describe_validation_error(e, LIMITS, SamplesRequest) for e in info.value.errors()]
    assert described[0]["field"] == field
    assert described[0]["message"].startswith(f"{field}: ") and "allowed" in described[0]["message"]


def test_messages_give_the_allowed_range() -> None:
    with pytest.raises(ValidationError) as info:
        SamplesRequest.model_validate({"n": -3})
    assert describe_validation_error(info.value.errors()[0], LIMITS)["message"] == (
        "n: -3 is invalid (Input should be greater than or equal to 1); allowed integers in [1, 100]")
    with pytest.raises(ValidationError) as info:
        SamplesRequest.model_validate({"colour": 1})
    assert "allowed fields ['n', 'mode', 'seed', 'temperature', 'format', 'data_mode', 'decoder_noise']" in (
        describe_validation_error(info.value.errors()[0], LIMITS, SamplesRequest)["message"])


@pytest.mark.parametrize("body, message", [
    ({"mode": 12}, r"^mode: 12 is out of range; allowed \[0, 7\]$"),
    ({"mode": [0, 3, 8]}, r"^mode: 8 is out of range; allowed \[0, 7\]$"),
    ({"n": 101}, r"^n: 101 is out of range; allowed \[1, 100\]$"),
])
def test_samples_request_checks_model_limits(body: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        SamplesRequest.model_validate(body).check(LIMITS)


def test_interpolate_request_limits() -> None:
    InterpolateRequest(from_mode=0, to_mode=7, steps=16).check(LIMITS)
    with pytest.raises(RequestError, match=r"^to_mode: 8 is out of range; allowed \[0, 7\]$"):
        InterpolateRequest(from_mode=0, to_mode=8).check(LIMITS)
    with pytest.raises(RequestError, match=r"^steps: 17 is out of range; allowed \[2, 16\]$"):
        InterpolateRequest(from_mode=0, to_mode=1, steps=17).check(LIMITS)
    with pytest.raises(ValidationError, match="steps"):
        InterpolateRequest(from_mode=0, to_mode=1, steps=1)


@pytest.mark.parametrize("data, reason", [
    ([[0.0, 1.0], [2.0]], "ragged"), ([[0.0, "a"]], "numbers only"), ([[True, False]], "numbers only"),
    ([[0.0, None]], "numbers only"), ([], "non-empty"), ("points", "non-empty"), ([[float("nan"), 0.0]], "finite"),
])
def test_encode_request_dtype(data: Any, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        EncodeRequest(data=data)


def test_encode_request_shape() -> None:
    r = EncodeRequest(data=[[0, 1], [2, 3]])
    r.check(LIMITS)
    assert r.data.dtype == np.float32 and r.data.shape == (2, 2)
    with pytest.raises(RequestError, match=r"^data: has shape \[1, 3\]; allowed \[B, 2\] with 1 <= B <= 10$"):
        EncodeRequest(data=[[0, 1, 2]]).check(LIMITS)
    with pytest.raises(RequestError, match=r"has shape \[11, 2\]"):
        EncodeRequest(data=[[0, 1]] * 11).check(LIMITS)


# --------------------------------------------------------------------------------------------
# Sampling helpers behind /v1/samples
# --------------------------------------------------------------------------------------------

def test_component_spec_round_robin() -> None:
    assert component_spec(None, 5) is None and component_spec(3, 5) == 3
    assert component_spec([0, 3, 5], 7).tolist() == [0, 3, 5, 0, 3, 5, 0]
    assert component_spec([1, 2], 1).tolist() == [1]


@pytest.mark.parametrize("mode", [0, 1])
def test_samples_of_one_mode_concentrate_at_its_mean(mode: int) -> None:
    (res,) = sample_many(two_component_model(), [SamplesRequest(n=500, mode=mode, seed=0)])
    assert (res.component == mode).all()
    assert torch.allclose(res.x.mean(0), MEANS[mode], atol=0.05)
    assert (res.x - MEANS[mode]).norm(dim=1).max() < 1.0


def test_full_prior_follows_the_weights() -> None:
    (res,) = sample_many(two_component_model(), [SamplesRequest(n=4000, seed=1)])
    share = (res.component == 1).float().mean()
    assert abs(share - torch.sigmoid(torch.tensor(1.0))) < 0.03  # weights softmax([0, 1])
    assert torch.allclose(res.x, MEANS[res.component], atol=1.0)


def test_mode_list_is_round_robin() -> None:
    (res,) = sample_many(two_component_model(), [SamplesRequest(n=7, mode=[1, 0], seed=2)])
    assert res.component.tolist() == [1, 0, 1, 0, 1, 0, 1]
    assert ((res.x - MEANS[res.component]).norm(dim=1) < 1.0).all()


def test_seeds_reproduce_and_differ() -> None:
    model = two_component_model()
    a, b, c = sample_many(model, [SamplesRequest(n=32, seed=7), SamplesRequest(n=32, seed=7), SamplesRequest(n=32, seed=8)])
    assert torch.equal(a.x, b.x) and torch.equal(a.component, b.component)
    assert not torch.equal(a.x, c.x)
    assert a.seed == 7
    fresh = sample_many(model, [SamplesRequest(n=4)])[0]
    assert torch.equal(sample_many(model, [SamplesRequest(n=4, seed=fresh.seed)])[0].x, fresh.x)  # echoed seed


def test_batched_draws_equal_single_draws() -> None:
    model = two_component_model()
    reqs = [SamplesRequest(n=5, seed=1), SamplesRequest(n=3, mode=1, seed=2), SamplesRequest(n=4, mode=[0, 1], seed=3)]
    batched = sample_many(model, reqs)
    for r, b in zip(reqs, batched):
        x, z, idx = sampling.sample(model, r.n, component=component_spec(r.mode, r.n), seed=r.seed)
        assert torch.equal(b.z, z) and torch.equal(b.component, idx)
        assert torch.allclose(b.x, x)


def test_temperature_scales_the_spread() -> None:
    model = two_component_model()
    cold, warm = sample_many(model, [SamplesRequest(n=2000, mode=0, seed=0, temperature=0.1),
                                     SamplesRequest(n=2000, mode=0, seed=0, temperature=1.0)])
    ratio = (cold.x - MEANS[0]).std() / (warm.x - MEANS[0]).std()
    assert abs(ratio - 0.1) < 1e-3


# --------------------------------------------------------------------------------------------
# Sampler: modes, interpolation, encode, reconstruct
# --------------------------------------------------------------------------------------------

def test_modes_table(sampler: Sampler) -> None:
    modes = sampler.modes()
    assert [m["index"] for m in modes] == [0, 1]
    assert sum(m["weight"] for m in modes) == pytest.approx(1.0)
    assert modes[1]["weight"] > modes[0]["weight"]
    assert modes[0]["mean"] == pytest.approx([-5.0, 0.0])
    assert modes[0]["variance"] == pytest.approx([np.exp(-4.0)] * 2, rel=1e-5)
    assert [m["active"] for m in modes] == [True, False]
    assert modes[0]["responsibility_share"] == pytest.approx(0.995)


def test_info(sampler: Sampler) -> None:
    info = sampler.info()
    assert (info["dataset"], info["prior"], info["num_components"], info["latent_dim"]) == ("toy", "mog", 2, 2)
    assert info["data_shape"] == [2] and info["checkpoint"]["iteration"] == 3


def _json(rendered) -> Any:
    assert rendered.media_type == "application/json"
    return json.loads(rendered.body)


def test_interpolate_runs_between_the_means(sampler: Sampler) -> None:
    out = _json(sampler.interpolate(InterpolateRequest(from_mode=0, to_mode=1, steps=5)))
    assert out["t"] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert np.allclose(out["samples"], [[-5, 0], [-2.5, 0], [0, 0], [2.5, 0], [5, 0]], atol=1e-6)


def _checked(r: EncodeRequest) -> EncodeRequest:
    r.check(Limits(100, 10, 16, 2, (2,)))
    return r


def test_encode_and_reconstruct(sampler: Sampler) -> None:
    data = [[-5.0, 0.1], [4.8, 0.0], [5.2, -0.3]]
    enc = _json(sampler.encode(_checked(EncodeRequest(data=data))))
    assert enc["component"] == [0, 1, 1]
    assert np.allclose(np.sum(enc["responsibilities"], axis=1), 1.0)
    assert np.allclose(enc["mean"], data) and np.allclose(enc["logvar"], -6.0)
    rec = _json(sampler.reconstruct(_checked(ReconstructRequest(data=data))))
    assert np.allclose(rec["reconstructions"], data) and rec["component"] == [0, 1, 1]
    noisy = [_json(sampler.reconstruct(_checked(ReconstructRequest(data=data, stochastic=True, seed=4))))["reconstructions"]
             for _ in range(2)]
    assert noisy[0] == noisy[1] and not np.allclose(noisy[0], data, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Response encodings
# --------------------------------------------------------------------------------------------

def test_png_of_points_and_of_images() -> None:
    (res,) = sample_many(two_component_model(), [SamplesRequest(n=50, seed=0)])
    with Image.open(io.BytesIO(png_bytes(res.x, res.component, 2))) as image:
        assert image.format == "PNG" and min(image.size) > 100
    images = torch.rand(10, 1, 28, 28)  # (n, C, H, W): the image-model path
    with Image.open(io.BytesIO(png_bytes(images, torch.zeros(10, dtype=torch.long), 1))) as image:
        assert image.format == "PNG" and image.size == (4 * 30 + 2, 3 * 30 + 2)  # 4 per row, 2 px padding


def test_npy_and_npz_encodings() -> None:
    (res,) = sample_many(two_component_model(), [SamplesRequest(n=6, mode=[0, 1], seed=0)])
    npy = render_samples(res, "npy", 2)
    assert npy.media_type == "application/octet-stream"
    assert np.array_equal(np.load(io.BytesIO(npy.body)), res.x.numpy())
    assert npy.headers["X-Components"] == "0,1,0,1,0,1" and npy.headers["X-Seed"] == "0"
    npz = np.load(io.BytesIO(render_samples(res, "npz", 2).body))
    assert np.array_equal(npz["component"], [0, 1, 0, 1, 0, 1]) and npz["samples"].shape == (6, 2)


# --------------------------------------------------------------------------------------------
# The FastAPI app in-process (no server): routes, 4xx format, body limit
# --------------------------------------------------------------------------------------------

async def _requests(sampler: Sampler, calls: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=make_api(sampler))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [await client.request(method, url, **kw) for method, url, kw in calls]


def test_api_routes_and_errors(sampler: Sampler) -> None:
    async def chunked():  # no Content-Length: the body limit counts while reading
        yield b'{"data": ['
        for _ in range(200_000):
            yield b"[1.0, 2.0],"
        yield b"[1, 2]]}"

    ok, bad_mode, bad_json, too_large, chunked_large, health = asyncio.run(_requests(sampler, [
        ("POST", "/v1/samples", {"json": {"n": 4, "mode": 1, "seed": 3}}),
        ("POST", "/v1/samples", {"json": {"n": 4, "mode": 2}}),
        ("POST", "/v1/samples", {"content": b"{n: 3", "headers": {"content-type": "application/json"}}),
        ("POST", "/v1/encode", {"content": b"[" + b"0," * 2_000_000 + b"0]",
                                "headers": {"content-type": "application/json"}}),
        ("POST", "/v1/encode", {"content": chunked(), "headers": {"content-type": "application/json"}}),
        ("GET", "/healthz", {}),
    ]))
    assert ok.status_code == 200 and ok.json()["component"] == [1, 1, 1, 1]
    assert bad_mode.status_code == 422
    assert bad_mode.json() == {"detail": [{"field": "mode", "message": "mode: 2 is out of range; allowed [0, 1]"}]}
    assert bad_json.status_code == 400 and bad_json.json()["detail"][0]["message"].startswith("body: malformed JSON")
    for r in (too_large, chunked_large):
        assert r.status_code == 413 and r.json()["detail"][0]["field"] == "body"
        assert "allowed at most 2097152 bytes" in r.json()["detail"][0]["message"]
    assert health.json() == {"status": "ok"}


# --------------------------------------------------------------------------------------------
# ServeArgs, deploy/serve.yaml and the builder (nothing is started)
# --------------------------------------------------------------------------------------------

def test_deploy_yaml_validates() -> None:
    """Serve's schema; args are ServeArgs fields; Ray options live in ``deployments:``, batching in user_config."""
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8000
    (app,) = config["applications"]
    assert app["import_path"] == "service.serving:build_app"
    args = ServeArgs.model_validate(app["args"])
    assert args.checkpoint.startswith("/ABSOLUTE/")
    deployment_keys = {"num_replicas", "num_cpus", "max_ongoing_requests", "max_queued_requests", *BatchConfig.model_fields}
    assert not deployment_keys & set(app["args"]), "Ray options and batching belong in deployments:, not args:"
    (dep,) = app["deployments"]
    assert dep["name"] == "IntroPriorSampler" and dep["ray_actor_options"]["num_cpus"] == 0.5
    assert dep["autoscaling_config"]["max_replicas"] >= dep["autoscaling_config"]["min_replicas"] >= 1
    assert dep["max_ongoing_requests"] >= BatchConfig.model_validate(dep["user_config"]).max_batch_size


def test_deploy_models_yaml_validates() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "deploy" / "serve_models.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "service.serving_multiplex:build_app"
    assert MultiplexArgs.model_validate(app["args"]).max_models_per_replica == 4
    (dep,) = app["deployments"]
    assert dep["name"] == "IntroPriorModels"
    BatchConfig.model_validate(dep["user_config"])


def test_user_config_is_checked_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="max_batch_size"):
        BatchConfig.model_validate({"max_batch_size": 0})
    with pytest.raises(ValidationError, match="max_batch_siz"):
        BatchConfig.model_validate({"max_batch_siz": 4})
    assert ServeArgs(checkpoint="x", max_batch_size=4).batch_config() == BatchConfig(max_batch_size=4)


def test_model_ids_map_to_mlflow_uris() -> None:
    from service.serving_multiplex import ModelIdError, model_uri

    assert model_uri("0123456789abcdef0123456789abcdef") == "runs:/0123456789abcdef0123456789abcdef/checkpoint/checkpoint.pt"
    assert model_uri("introprior-8gaussians-sintro/3") == "models:/introprior-8gaussians-sintro/3"
    assert model_uri("introprior-8gaussians-sintro@champion") == "models:/introprior-8gaussians-sintro@champion"
    for bad in ("", "x/y", "../etc/passwd", "a@", "runs:/abc"):
        with pytest.raises(ModelIdError, match="serve_multiplexed_model_id: .* allowed an MLflow run id"):
            model_uri(bad)


def test_serve_args_reject_unknown_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="max_sample"):
        ServeArgs(checkpoint="x", max_sample=3)
    with pytest.raises(ValidationError, match="num_cpus"):
        ServeArgs(checkpoint="x", num_cpus=0)
    assert ServeArgs.model_validate({"checkpoint": "x", "batching": "false", "max_samples": "8"}).batching is False


def test_builder_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    import ray

    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint: .*nope\.pt.* does not exist"):
        build_app({"checkpoint": str(tmp_path / "nope.pt")})
    assert not ray.is_initialized()


def test_builder_refuses_another_schema(tmp_path: Path, smoke_checkpoint: Path) -> None:
    import ray

    state = checkpoint.load(smoke_checkpoint)
    state["schema_version"] = checkpoint.SCHEMA_VERSION + 1
    torch.save(state, tmp_path / "future.pt")
    with pytest.raises(checkpoint.CheckpointError, match="has schema_version 2; this introprior reads schema_version 1"):
        build_app(ServeArgs(checkpoint=str(tmp_path / "future.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable introprior checkpoint"):
        build_app({"checkpoint": str(tmp_path / "junk.pt")})
    assert not ray.is_initialized()


def test_builder_binds_a_valid_checkpoint(smoke_checkpoint: Path) -> None:
    from ray.serve import Application

    assert isinstance(build_app({"checkpoint": str(smoke_checkpoint), "num_replicas": "2"}), Application)
    real = Sampler.from_checkpoint(smoke_checkpoint, ServeArgs(checkpoint=str(smoke_checkpoint)))
    assert real.info()["dataset"] == "8gaussians" and real.limits.num_components == 8
    assert not real.model.training
