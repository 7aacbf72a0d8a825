"""Serving under hostile input and load, without Ray: float32 overflow, one error format and one
status per case, non-finite outputs, byte budgets and chunked decoding, the work gate (503) and
deadline (504), the event loop kept free, bearer tokens (401), checkpoint pinning (SHA-256),
load-time checkpoint validation, mode purity in /v1/modes, and the replica's memory under 16
concurrent maximal requests on an image checkpoint (a subprocess)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from service import checkpoint
from service.model import Model
from service.priors import MixturePrior
from service.serving import (Deadline, Limits, SamplesRequest, Sampler, ServeArgs, ServeConfigError, WorkTimeout,
                             build_app, make_api, read_token, resolve_checkpoint, sample_many)

ROOT = Path(__file__).resolve().parents[1]
JSON = {"content-type": "application/json"}
TOKEN = "s3cret-token-0123456789abcdef"


class IdentityEncoder(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.full_like(x, -6.0)


class NanDecoder(nn.Module):
    def forward(self, z: Tensor) -> Tensor:
        return z * float("nan")


def toy_state(**extra: Any) -> dict[str, Any]:
    return {"config": {"name": "toy/hand-built", "data": {"dataset": "toy"}}, "iteration": 3, "data_shape": [2],
            "schema_version": checkpoint.SCHEMA_VERSION, "extra": extra}


def toy_sampler(decoder: nn.Module | None = None, state: dict | None = None, **args: Any) -> Sampler:
    prior = MixturePrior(2, 2)
    with torch.no_grad():
        prior.means.copy_(torch.tensor([[-5.0, 0.0], [5.0, 0.0]]))
        prior.logvars.fill_(-4.0)
    sampler = Sampler(Model(IdentityEncoder(), nn.Identity(), prior), state or toy_state(),
                      ServeArgs(checkpoint="in-memory", **args), path="in-memory", sha256="0" * 64)
    if decoder is not None:
        sampler.model.decoder = decoder  # after the start-up self-test: a checkpoint that breaks later
    return sampler


def call(app_or_sampler: Any, calls: list[tuple[str, str, dict]]) -> list[httpx.Response]:
    app = app_or_sampler if not isinstance(app_or_sampler, Sampler) else make_api(app_or_sampler)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return [await client.request(method, url, **kw) for method, url, kw in calls]

    return asyncio.run(run())


def one_error(r: httpx.Response, status: int, field: str) -> str:
    assert r.status_code == status, r.text
    (error,) = r.json()["detail"]
    assert error["field"] == field and error["message"].startswith(f"{field}: "), error
    return error["message"]


@pytest.fixture(scope="module")
def toy() -> Sampler:
    return toy_sampler()


# --------------------------------------------------------------------------------------------
# Item 1: magnitudes, non-finite numbers
# --------------------------------------------------------------------------------------------

HOSTILE = [
    ("/v1/encode", b'{"data": [[1e39, 0]]}', 422, "data", "allowed |x| <= 10000"),
    ("/v1/reconstruct", b'{"data": [[1e39, 0]]}', 422, "data", "allowed |x| <= 10000"),
    ("/v1/encode", b'{"data": [[1e400, 0]]}', 422, "data", "too large for float32"),
    ("/v1/encode", b'{"data": [[1' + b"0" * 5000 + b', 0]]}', 422, "data", "too large for float32"),
    ("/v1/encode", b'{"data": [[1' + b"0" * 30 + b', 0]]}', 422, "data", "allowed |x| <= 10000"),
    ("/v1/encode", b'{"data": [[-1e20, 0]]}', 422, "data", "holds |x| = 1e+20"),
    ("/v1/samples", b'{"n": 1' + b"0" * 5000 + b"}", 422, "n", "does not fit a 64-bit number"),
    ("/v1/samples", b'{"n": 1' + b"0" * 30 + b"}", 422, "n", "out of range"),
    ("/v1/samples", b'{"seed": 1' + b"0" * 5000 + b"}", 422, "seed", "does not fit a 64-bit number"),
    ("/v1/samples", b'{"temperature": 1e400}', 422, "temperature", "does not fit a 64-bit number"),
    ("/v1/samples", b'{"mode": [0, 1' + b"0" * 5000 + b"]}", 422, "mode", "does not fit a 64-bit number"),
    ("/v1/interpolate", b'{"from_mode": 0, "to_mode": 1, "steps": 9' + b"9" * 4000 + b"}", 422, "steps",
     "does not fit a 64-bit number"),
    ("/v1/samples", b'{"temperature": NaN}', 400, "body", "malformed JSON"),
    ("/v1/encode", b'{"data": [[Infinity, 0]]}', 400, "body", "malformed JSON"),
]


@pytest.mark.parametrize("url, body, status, field, text", HOSTILE, ids=[f"{h[0]}-{h[1][:24]!r}" for h in HOSTILE])
def test_unrepresentable_numbers_are_rejected_naming_the_field(toy: Sampler, url: str, body: bytes, status: int,
                                                                field: str, text: str) -> None:
    (r,) = call(toy, [("POST", url, {"content": body, "headers": JSON})])
    assert text in one_error(r, status, field)


def test_largest_allowed_magnitude_is_answered_finite(toy: Sampler) -> None:
    (r,) = call(toy, [("POST", "/v1/reconstruct", {"json": {"data": [[1e4, -1e4]]}})])
    assert r.status_code == 200 and np.isfinite(r.json()["reconstructions"]).all()


def test_nonfinite_decoder_output_is_a_json_500(toy: Sampler) -> None:
    broken = toy_sampler(NanDecoder())
    samples, interp, health = call(broken, [("POST", "/v1/samples", {"json": {"n": 4}}),
                                            ("POST", "/v1/interpolate", {"json": {"from_mode": 0, "to_mode": 1}}),
                                            ("GET", "/healthz", {})])
    assert "non-finite" in one_error(samples, 500, "model") and "non-finite" in one_error(interp, 500, "model")
    assert health.status_code == 200


def test_nonfinite_output_for_an_input_names_the_data() -> None:
    class Explodes(nn.Module):  # a posterior log-variance that overflows exp() for this input
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x, torch.full_like(x, 500.0)

    sampler = toy_sampler()
    sampler.model.encoder = Explodes()
    (r,) = call(sampler, [("POST", "/v1/reconstruct", {"json": {"data": [[1.0, 2.0]], "stochastic": True}})])
    assert "not finite" in one_error(r, 422, "data")


def test_a_checkpoint_whose_decoder_is_not_finite_is_refused_at_start() -> None:
    prior = MixturePrior(2, 2)
    with pytest.raises(checkpoint.CheckpointError, match="decoder is not finite at the prior's component means"):
        Sampler(Model(IdentityEncoder(), NanDecoder(), prior), toy_state(), ServeArgs(checkpoint="x"), path="x",
                sha256="0" * 64)


# --------------------------------------------------------------------------------------------
# Item 2: one error format, one status per case
# --------------------------------------------------------------------------------------------

def test_status_per_case(toy: Sampler) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    (no_type, form_type, text, malformed, empty, not_utf8, deep, not_object, unknown_path, wrong_method,
     bad_length) = call(toy, [
        ("POST", "/v1/samples", {"content": b'{"n": 2}'}),
        ("POST", "/v1/samples", {"content": b'{"n": 2}', "headers": form}),
        ("POST", "/v1/samples", {"content": b'{"n": 2}', "headers": {"content-type": "text/plain"}}),
        ("POST", "/v1/samples", {"content": b'{"n": 2,', "headers": JSON}),
        ("POST", "/v1/samples", {"content": b"", "headers": JSON}),
        ("POST", "/v1/samples", {"content": b'{"n": "\xff"}', "headers": JSON}),
        ("POST", "/v1/encode", {"content": b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "headers": JSON}),
        ("POST", "/v1/samples", {"content": b"[1, 2]", "headers": JSON}),
        ("GET", "/v2/samples", {}),
        ("GET", "/v1/samples", {}),
        ("POST", "/v1/samples", {"content": b'{"n": 2}', "headers": {**JSON, "content-length": "x"}}),
    ])
    assert "missing is not supported; allowed application/json" in one_error(no_type, 415, "content-type")
    assert "'application/x-www-form-urlencoded' is not supported" in one_error(form_type, 415, "content-type")
    one_error(text, 415, "content-type")
    assert "malformed JSON" in one_error(malformed, 400, "body")
    assert "is empty" in one_error(empty, 400, "body")
    assert "malformed JSON" in one_error(not_utf8, 400, "body")
    assert "nested too deeply" in one_error(deep, 400, "body")
    assert "must be a JSON object" in one_error(not_object, 422, "body")
    assert "'/v1/samples'" in one_error(unknown_path, 404, "path")
    assert "allowed POST" in one_error(wrong_method, 405, "method")
    one_error(bad_length, 400, "body")


def test_unexpected_errors_are_a_json_500() -> None:
    class Boom(nn.Module):
        def forward(self, z: Tensor) -> Tensor:
            raise KeyError("boom")

    (r,) = call(toy_sampler(Boom()), [("POST", "/v1/samples", {"json": {"n": 2}})])
    assert "unexpected KeyError" in one_error(r, 500, "server")


# --------------------------------------------------------------------------------------------
# Items 3 and 4: off the event loop, gate, timeout, byte budgets, chunks
# --------------------------------------------------------------------------------------------

def test_costs_follow_the_data_shape() -> None:
    points = Limits(4096, 4096, 1024, 8, (2,), max_request_bytes=64 * 2**20)
    images = Limits(4096, 4096, 1024, 8, (3, 32, 32), max_request_bytes=64 * 2**20)
    assert points.max_items("json") > 4096 and points.max_items("png") > 4096
    assert images.max_items("json") == 64 * 2**20 // (3072 * 64) == 341
    assert images.max_items("npy") == 1820 and images.max_items("png") == 910
    with pytest.raises(Exception, match=r"^n: 4096 outputs of shape \[3, 32, 32\] as json need about 768 MiB; "
                                        r"allowed at most 341"):
        SamplesRequest(n=4096).check(images)
    assert SamplesRequest(n=4096, format="png").check(points) < 5 * 2**20


def test_chunked_decoding_equals_one_call() -> None:
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    model = Model(IdentityEncoder(), decoder, MixturePrior(3, 2))
    reqs = [SamplesRequest(n=37, seed=1), SamplesRequest(n=5, mode=2, seed=2)]
    whole = sample_many(model, reqs)
    chunked = sample_many(model, reqs, chunk=4)
    for a, b in zip(whole, chunked):
        assert torch.equal(a.z, b.z) and torch.allclose(a.x, b.x, atol=1e-6)


def test_a_passed_deadline_stops_the_work_between_chunks() -> None:
    model = Model(IdentityEncoder(), nn.Identity(), MixturePrior(2, 2))
    past = Deadline(time.monotonic() - 1)
    with pytest.raises(WorkTimeout):
        sample_many(model, [SamplesRequest(n=10)], chunk=2, deadline=past)


class Slow(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, z: Tensor) -> Tensor:
        time.sleep(self.seconds)  # like torch: releases the GIL
        return z


def test_timeout_is_a_504_and_the_replica_keeps_serving() -> None:
    sampler = toy_sampler(Slow(0.5), request_timeout_s=0.2)
    slow, health = call(sampler, [("POST", "/v1/samples", {"json": {"n": 4}}), ("GET", "/healthz", {})])
    assert "request_timeout_s=0.2" in one_error(slow, 504, "request")
    assert health.status_code == 200


def test_full_work_budget_is_a_503_with_retry_after_and_healthz_stays_fast() -> None:
    mib = 2**20
    # decoding (2 s) far outlasts the queue wait (0.3 s), so the outcome does not depend on how fast a
    # loaded machine delivers the six requests: two fit in the budget, the others time out waiting
    sampler = toy_sampler(Slow(2.0), max_request_bytes=mib, max_inflight_bytes=2 * mib, work_threads=2,
                          queue_wait_s=0.3)
    cost = sampler.limits.cost(1, "json")
    n = (mib // 2) // cost  # two fit in the budget at once
    app = make_api(sampler)

    async def run() -> tuple[list[httpx.Response], list[float]]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            heavy = [asyncio.create_task(c.post("/v1/samples", json={"n": n})) for _ in range(6)]
            await asyncio.sleep(0.05)
            health = []
            for _ in range(5):
                assert (await c.get("/healthz")).status_code == 200
                health.append(sum(t.done() and t.result().status_code == 200 for t in heavy))  # decoded by then
            return await asyncio.gather(*heavy), health

    responses, health = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "busy" in one_error(busy, 503, "request")
    assert health == [0] * 5, health  # answered while the decoder calls run in threads, not on the event loop


# --------------------------------------------------------------------------------------------
# Item 7: bearer token
# --------------------------------------------------------------------------------------------

def test_bearer_token_protects_everything_but_healthz(toy: Sampler) -> None:
    app = make_api(toy, token_sha256=hashlib.sha256(TOKEN.encode()).hexdigest())
    good = {"authorization": f"Bearer {TOKEN}"}
    calls = [("GET", path, {}) for path in ("/v1/model", "/v1/modes", "/docs", "/openapi.json")]
    calls += [("POST", "/v1/samples", {"json": {"n": 2}}),
              ("POST", "/v1/samples", {"json": {"n": 2}, "headers": {"authorization": "Bearer wrong-token"}}),
              ("POST", "/v1/samples", {"json": {"n": 2}, "headers": {"authorization": TOKEN}}),
              ("GET", "/healthz", {}),
              ("POST", "/v1/samples", {"json": {"n": 2}, "headers": good}),
              ("GET", "/v1/model", {"headers": good})]
    *denied, health, ok, info = call(app, calls)
    for r in denied:
        one_error(r, 401, "authorization")
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert "missing" in denied[0].json()["detail"][0]["message"]
    assert "not a valid bearer token" in denied[5].json()["detail"][0]["message"]
    assert health.status_code == 200 and ok.status_code == 200 and info.json()["auth"] is True


def test_read_token_from_file_or_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTROPRIOR_API_TOKEN", raising=False)
    assert read_token(ServeArgs(checkpoint="x")) is None
    (tmp_path / "token").write_text(TOKEN + "\n")
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    assert read_token(ServeArgs(checkpoint="x", auth_token_file=str(tmp_path / "token"))) == digest
    monkeypatch.setenv("INTROPRIOR_API_TOKEN", TOKEN)
    assert read_token(ServeArgs(checkpoint="x")) == digest
    monkeypatch.setenv("INTROPRIOR_API_TOKEN", "short")
    with pytest.raises(ServeConfigError, match=r"INTROPRIOR_API_TOKEN: the token must be at least 16 characters"):
        read_token(ServeArgs(checkpoint="x"))
    with pytest.raises(ServeConfigError, match="auth_token_file: cannot read"):
        read_token(ServeArgs(checkpoint="x", auth_token_file=str(tmp_path / "nope")))


# --------------------------------------------------------------------------------------------
# Item 5: SHA-256 pinning and temp-folder clean-up
# --------------------------------------------------------------------------------------------

def test_sha256_mismatch_is_refused(smoke_checkpoint: Path) -> None:
    good = hashlib.sha256(smoke_checkpoint.read_bytes()).hexdigest()
    with resolve_checkpoint(str(smoke_checkpoint), sha256=good.upper()) as path:
        assert path == smoke_checkpoint
    with pytest.raises(checkpoint.CheckpointError, match=f"has SHA-256 {good}; expected {'0' * 64}"):
        build_app({"checkpoint": str(smoke_checkpoint), "checkpoint_sha256": "0" * 64})
    with pytest.raises(Exception, match="checkpoint_sha256"):
        ServeArgs(checkpoint="x", checkpoint_sha256="abc")


def test_mlflow_download_is_removed_after_loading(tmp_path: Path, smoke_checkpoint: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serve-test", artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.log_artifact(run_id, str(smoke_checkpoint), "checkpoint")
    with resolve_checkpoint(f"runs:/{run_id}/checkpoint", uri) as local:
        assert local.read_bytes() == smoke_checkpoint.read_bytes() and str(local).startswith(str(tmp_path / "tmp"))
    assert not local.exists() and list((tmp_path / "tmp").iterdir()) == []
    with pytest.raises(checkpoint.CheckpointError, match="expected 1111"):
        with resolve_checkpoint(f"runs:/{run_id}/checkpoint", uri, sha256="1" * 64):
            pass
    assert list((tmp_path / "tmp").iterdir()) == []


# --------------------------------------------------------------------------------------------
# Item 6: checkpoint sanity before allocation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, message", [
    (lambda s: s["config"]["network"].update(hidden=10**9), r"^config\.network\.hidden: 1000000000 is out of range"),
    (lambda s: s["config"]["network"].update(depth=100_000), r"^config\.network\.depth: 100000 is out of range"),
    (lambda s: s["config"]["prior"].update(num_components=10**8), r"^config\.prior\.num_components: 100000000"),
    (lambda s: s["config"]["network"].update(latent_dim=64), r"^model\.encoder\.net\.\d+\.weight: has shape"),
    (lambda s: s.update(data_shape=[3, 100_000, 100_000]), r"^data_shape\[1\]: 100000 is out of range"),
    (lambda s: s.update(data_shape=[2, 2]), r"^data_shape: \[2, 2\] is not \(D,\) or \(C, H, W\)"),
    (lambda s: s.update(data_shape=[5]), r"^model\.encoder\.net\.0\.weight: has shape \[\d+, 2\]; the config implies"),
    (lambda s: s.update(prior_type="pickle"), r"^prior_type: 'pickle' is not one of"),
    (lambda s: s["model"].pop("prior.means"), r"^model\.prior\.means: missing"),
    (lambda s: s["model"].update(extra=torch.zeros(10**6)), r"^model\.extra: not a tensor of this config"),
    (lambda s: s["model"]["decoder.net.0.weight"].fill_(float("nan")), r"^model\.decoder\.net\.0\.weight: holds NaN"),
    (lambda s: s["config"]["prior"].update(kind="mogg"), r"^config\.prior\.kind: 'mogg' is not one of"),
])
def test_crafted_checkpoints_are_refused_naming_the_field(smoke_checkpoint: Path, edit, message: str) -> None:
    state = checkpoint.load(smoke_checkpoint)
    edit(state)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.restore_model(state)


def test_crafted_checkpoint_is_refused_by_the_builder(tmp_path: Path, smoke_checkpoint: Path) -> None:
    state = checkpoint.load(smoke_checkpoint)
    state["config"]["network"]["hidden"] = 10**9
    torch.save(state, tmp_path / "huge.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"huge\.pt': config\.network\.hidden: 1000000000"):
        build_app({"checkpoint": str(tmp_path / "huge.pt")})


# --------------------------------------------------------------------------------------------
# /v1/modes with mode purity, /v1/model metrics
# --------------------------------------------------------------------------------------------

def test_modes_show_purity_and_majority_mode_when_the_checkpoint_has_them() -> None:
    state = toy_state(usage=torch.tensor([0.7, 0.3]), mode_purity=[0.93, float("nan")], majority_mode=[4, 1],
                      metrics={"hist_kl": 0.2, "mode_purity": 0.65, "modes_covered": 2.0, "gnelbo_x1e7": float("inf")})
    modes, model = call(toy_sampler(state=state), [("GET", "/v1/modes", {}), ("GET", "/v1/model", {})])
    rows = modes.json()["modes"]
    assert [r["purity"] for r in rows] == [0.93, None] and [r["majority_mode"] for r in rows] == [4, 1]
    assert [r["responsibility_share"] for r in rows] == pytest.approx([0.7, 0.3])
    metrics = model.json()["metrics"]
    assert metrics == {"hist_kl": 0.2, "mode_purity": 0.65, "modes_covered": 2.0, "gnelbo_x1e7": None}


def test_modes_show_the_prior_and_data_shares_of_each_data_mode() -> None:
    state = toy_state(usage=torch.tensor([0.7, 0.3]), majority_mode=[4, 1], mode_shares={4: 0.6, 1: 0.4},
                      data_shares={1: 0.5, 4: 0.25, 6: 0.25})
    modes, model = call(toy_sampler(state=state), [("GET", "/v1/modes", {}), ("GET", "/v1/model", {})])
    want = {"1": {"prior": 0.4, "data": 0.5}, "4": {"prior": 0.6, "data": 0.25}, "6": {"prior": 0.0, "data": 0.25}}
    assert modes.json()["mode_shares"] == want and model.json()["mode_shares"] == want
    # with the placement measured: each mode's offset and width in the mode's spread (null: too rarely drawn)
    placed = toy_state(usage=torch.tensor([0.7, 0.3]), majority_mode=[4, 1], mode_shares={4: 0.6, 1: 0.4},
                       data_shares={1: 0.5, 4: 0.25, 6: 0.25}, mode_offsets={1: 16.5, 4: 0.4, 6: None},
                       mode_widths={1: 0.3, 4: 0.9, 6: None})
    (modes,) = call(toy_sampler(state=placed), [("GET", "/v1/modes", {})])
    assert modes.json()["mode_shares"] == {"1": {"prior": 0.4, "data": 0.5, "offset": 16.5, "width": 0.3},
                                           "4": {"prior": 0.6, "data": 0.25, "offset": 0.4, "width": 0.9},
                                           "6": {"prior": 0.0, "data": 0.25, "offset": None, "width": None}}


def test_modes_omit_purity_when_absent(toy: Sampler) -> None:
    (modes,) = call(toy, [("GET", "/v1/modes", {})])
    assert all("purity" not in r and "majority_mode" not in r and "active" not in r for r in modes.json()["modes"])
    assert modes.json()["mode_shares"] is None


# --------------------------------------------------------------------------------------------
# data_mode: "give me data mode k" = the active components whose majority mode is k, by weight
# --------------------------------------------------------------------------------------------

FOUR_MEANS = torch.tensor([[-5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])


def four_component_sampler(**extra: Any) -> Sampler:
    """Four well-separated components, identity decoder; weights 0.1 / 0.2 / 0.3 / 0.4."""
    prior = MixturePrior(4, 2)
    with torch.no_grad():
        prior.means.copy_(FOUR_MEANS)
        prior.logvars.fill_(-4.0)
        prior.logits.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]).log())
    return Sampler(Model(IdentityEncoder(), nn.Identity(), prior), toy_state(**extra),
                   ServeArgs(checkpoint="in-memory", max_samples=4096), path="in-memory", sha256="0" * 64)


def test_data_mode_table_keeps_active_components_of_each_majority_mode_by_weight() -> None:
    # components 0 and 2 stand for data mode 7, component 1 for mode 3; component 3 (mode 3) is inactive
    s = four_component_sampler(usage=torch.tensor([0.5, 0.3, 0.195, 0.005]), majority_mode=[7, 3, 7, 3])
    assert sorted(s.data_modes) == [3, 7] and s.limits.data_modes == (3, 7)
    idx7, p7 = s.data_modes[7]
    assert idx7.tolist() == [0, 2] and p7.tolist() == pytest.approx([0.25, 0.75])  # 0.1 : 0.3
    idx3, p3 = s.data_modes[3]
    assert idx3.tolist() == [1] and p3.tolist() == pytest.approx([1.0])
    # no usage stored: the weights decide (all >= 1e-2 here)
    assert four_component_sampler(majority_mode=[7, 3, 7, 3]).data_modes[3][0].tolist() == [1, 3]
    # a mode split over components each below 1e-2 of usage, 0.018 together: offered, from all of them
    split = four_component_sampler(usage=torch.tensor([0.9, 0.082, 0.009, 0.009]), majority_mode=[0, 1, 2, 2])
    assert sorted(split.data_modes) == [0, 1, 2]
    idx2, p2 = split.data_modes[2]
    assert idx2.tolist() == [2, 3] and p2.tolist() == pytest.approx([3 / 7, 4 / 7])  # weights 0.3 : 0.4
    got = call(split, [("POST", "/v1/samples", {"json": {"n": 400, "data_mode": 2, "seed": 5}})])[0]
    assert got.status_code == 200 and set(got.json()["component"]) == {2, 3}
    # unlabelled data: no table at all
    assert four_component_sampler(usage=torch.full((4,), 0.25)).data_modes is None


def test_samples_of_a_data_mode_come_from_its_components_in_weight_proportion() -> None:
    s = four_component_sampler(usage=torch.full((4,), 0.25), majority_mode=[0, 1, 0, 1])
    first, again, modes = call(s, [("POST", "/v1/samples", {"json": {"n": 2000, "data_mode": 1, "seed": 11}}),
                                   ("POST", "/v1/samples", {"json": {"n": 2000, "data_mode": 1, "seed": 11}}),
                                   ("GET", "/v1/modes", {})])
    assert first.status_code == 200, first.text
    assert first.content == again.content  # seeded: reproducible
    body = first.json()
    comps, points = np.array(body["component"]), np.array(body["samples"])
    assert set(comps.tolist()) == {1, 3}
    share = (comps == 3).mean()  # weights 0.2 : 0.4 -> 2/3; binomial s.e. at n = 2000 is 0.0105
    assert abs(share - 2 / 3) < 0.05
    np.testing.assert_allclose(points, FOUR_MEANS[comps].numpy(), atol=0.8)  # sigma 0.135: within 6 sigma
    assert modes.json()["data_modes"] == {"0": [0, 2], "1": [1, 3]}


def test_data_mode_errors_name_the_field_and_the_allowed_values() -> None:
    labelled = four_component_sampler(usage=torch.tensor([0.5, 0.3, 0.195, 0.005]), majority_mode=[0, 1, 0, 2])
    both, uncovered, inactive_only, wrong_type = call(labelled, [
        ("POST", "/v1/samples", {"json": {"n": 4, "mode": 0, "data_mode": 0}}),
        ("POST", "/v1/samples", {"json": {"n": 4, "data_mode": 5}}),
        ("POST", "/v1/samples", {"json": {"n": 4, "data_mode": 2}}),  # its only component is inactive
        ("POST", "/v1/samples", {"json": {"n": 4, "data_mode": "one"}})])
    assert "not both" in one_error(both, 422, "data_mode")
    assert one_error(uncovered, 422, "data_mode").endswith("allowed one of [0, 1]")
    assert one_error(inactive_only, 422, "data_mode").endswith("allowed one of [0, 1]")
    assert "allowed null or one of [0, 1]" in one_error(wrong_type, 422, "data_mode")
    unlabelled = four_component_sampler(usage=torch.full((4,), 0.25))
    refused, modes = call(unlabelled, [("POST", "/v1/samples", {"json": {"n": 4, "data_mode": 0}}),
                                       ("GET", "/v1/modes", {})])
    assert "no data-mode labels" in one_error(refused, 422, "data_mode")
    assert modes.json()["data_modes"] is None


def test_mlflow_pyfunc_takes_data_mode_with_minus_one_for_unset() -> None:
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from service.mlflow_model import IntroPriorModel

    model = IntroPriorModel()
    model.sampler = four_component_sampler(usage=torch.full((4,), 0.25), majority_mode=[0, 1, 0, 1])
    out = model.predict(None, pd.DataFrame({"n": [50, 3], "mode": [-1, 2], "data_mode": [0, -1], "seed": [1, 2]}))
    assert set(out[out.request == 0].component) <= {0, 2} and set(out[out.request == 1].component) == {2}
    with pytest.raises(MlflowException, match=r"row 0: data_mode: 4 is the majority mode of no active component"):
        model.predict(None, pd.DataFrame({"n": [1], "data_mode": [4]}))


# --------------------------------------------------------------------------------------------
# Item 4: memory of a replica under 16 concurrent maximal requests (image checkpoint)
# --------------------------------------------------------------------------------------------

MEMORY_PROBE = textwrap.dedent("""
    import asyncio, json, sys
    import httpx, torch
    from service import checkpoint
    from service.model import build_model
    from service.presets import get_preset, smoke
    from service.serving import Sampler, ServeArgs, make_api
    from service.serving_model import memory_mib

    torch.set_num_threads(1)
    cfg = smoke(get_preset("cifar10/mog100-ip-lc"))  # data (3, 32, 32), ResNet channels (16, 32, 64)
    path = sys.argv[1]
    checkpoint.save(path, checkpoint.make_state(build_model(cfg, (3, 32, 32), prior_type="mog"), cfg,
                                                iteration=0, data_shape=(3, 32, 32)))
    args = ServeArgs(checkpoint=path, max_request_bytes=16 << 20, max_inflight_bytes=48 << 20,
                     decode_chunk_bytes=8 << 20, work_threads=2, queue_wait_s=120)
    sampler = Sampler.from_checkpoint(path, args)
    app = make_api(sampler)
    lim = sampler.limits

    async def main():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=300) as c:
            for fmt in ("json", "npy", "png"):  # warm-up: one small request of each kind
                assert (await c.post("/v1/samples", json={"n": 2, "format": fmt})).status_code == 200
            with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
                f.write("5")
            base = memory_mib()["rss_mib"]
            bodies = [{"n": min(lim.max_samples, lim.max_items(fmt)), "format": fmt, "seed": i}
                      for i, fmt in enumerate(["json", "npy", "png", "npz"] * 4)]
            rs = await asyncio.gather(*(c.post("/v1/samples", json=b) for b in bodies))
            rs += await asyncio.gather(*(c.post("/v1/encode", json={"data": [[[[0.5] * 32] * 32] * 3] * 40})
                                         for _ in range(4)))
            peak = 0.0
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
            print(json.dumps({"base_mib": base, "peak_mib": peak, "codes": [r.status_code for r in rs],
                              "n": [b["n"] for b in bodies], "chunk": sampler.chunk}))

    asyncio.run(main())
""")


def test_memory_of_16_concurrent_maximal_image_requests_stays_bounded(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "cifar.pt")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(report)
    codes = report["codes"]
    assert set(codes) == {200}  # what does not fit the budget waits its turn (queue_wait_s)
    # Stated limit: 160 MiB over the idle replica = the work budget (48 MiB) + one decoder chunk (8 MiB) +
    # allocator slack + the 20 response bodies this in-process client keeps (about 60 MiB). Before the byte
    # budget (n <= 4096 for any data shape) the four JSON requests alone needed about 2.8 GiB.
    assert report["peak_mib"] - report["base_mib"] < 160, report
