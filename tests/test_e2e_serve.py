"""End to end: a smoke checkpoint served by real Ray Serve on 127.0.0.1, called over HTTP with httpx.

Also: jobs/serve.py as a subprocess (SIGTERM shuts it down cleanly), jobs/load_test.py against
the served app, and MLflow ``runs:/`` checkpoint resolution on a SQLite store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from jobs.load_test import wait_healthy
from service import checkpoint

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# jobs/serve.py (runs first: its own Ray instance, before the in-process one below)
# --------------------------------------------------------------------------------------------

def test_jobs_serve_refuses_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jobs.serve import main

    assert main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


TOKEN = "e2e-token-0123456789abcdef"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def jobs_serve(checkpoint_path: Path, args: list[str], env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen]:
    """``python -m jobs.serve --checkpoint CKPT ARGS`` with ``TOKEN`` as the API's bearer token, as a
    subprocess; killed on the way out if it still runs."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.serve", "--checkpoint", str(checkpoint_path), *args,
                             "--auth-token-file", str(tmp_path / "token")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def stop_with_sigterm(proc: subprocess.Popen) -> str:
    """SIGTERM, then the console output of a clean exit (status 0)."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_jobs_serve_subprocess_serves_until_sigterm(smoke_checkpoint: Path, tmp_path: Path) -> None:
    """Default Ray auth (token, RAY_AUTH_MODE unset) and a bearer token on the API: 401 without it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "INTROPRIOR_API_TOKEN")}
    url = f"http://127.0.0.1:{port}"
    with jobs_serve(smoke_checkpoint, ["--port", str(port), "--no-batching"], env, tmp_path) as proc:
        wait_healthy(url, timeout_s=300, proc=proc)
        denied = httpx.get(f"{url}/v1/model", timeout=10)
        assert denied.status_code == 401 and denied.json()["detail"][0]["field"] == "authorization"
        assert httpx.post(f"{url}/v1/samples", json={"n": 2}, timeout=10).status_code == 401
        info = httpx.get(f"{url}/v1/model", headers=AUTH, timeout=10).json()
        assert info["serving"]["batching"] is False and info["checkpoint"]["path"] == str(smoke_checkpoint)
        assert info["auth"] is True
        out = stop_with_sigterm(proc)
    assert f"at http://127.0.0.1:{port}" in out and "shutting down" in out and TOKEN not in out


def _listening_inode(port: int) -> str:
    """The inode of the TCP socket listening on 127.0.0.1:``port`` (Linux ``/proc/net/tcp``; state 0A = LISTEN)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            return fields[9]
    raise AssertionError(f"nothing listens on port {port}")


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                out.add(target[8:-1])
    return out


def test_jobs_serve_direct_ingress_answers_from_the_replica_itself(smoke_checkpoint: Path, tmp_path: Path) -> None:
    """--direct-ingress: the replica process listens on --port (no proxy hop), with the API's bearer token;
    SIGTERM still shuts everything down and frees the port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "INTROPRIOR_API_TOKEN")}
    url = f"http://127.0.0.1:{port}"
    with jobs_serve(smoke_checkpoint, ["--port", str(port), "--direct-ingress"], env, tmp_path) as proc:
        wait_healthy(url, timeout_s=300, proc=proc)
        assert httpx.post(f"{url}/v1/samples", json={"n": 2}, timeout=10).status_code == 401
        body = httpx.post(f"{url}/v1/samples", json={"n": 3, "mode": 1, "seed": 2}, headers=AUTH, timeout=10).json()
        assert body["component"] == [1, 1, 1] and np.asarray(body["samples"]).shape == (3, 2)
        serving = httpx.get(f"{url}/v1/model", headers=AUTH, timeout=10).json()["serving"]
        assert serving["batch_wait_timeout_s"] == 0.001  # --direct-ingress's default (docs/serving.md)
        assert _listening_inode(port) in _socket_inodes(serving["pid"])  # the replica itself, not Serve's proxy
        out = stop_with_sigterm(proc)
    assert f"at http://127.0.0.1:{port}" in out and "direct ingress" in out and "shutting down" in out
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again


def test_jobs_serve_direct_ingress_needs_one_local_replica(smoke_checkpoint: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from jobs.serve import main

    assert main(["--checkpoint", str(smoke_checkpoint), "--direct-ingress", "--num-replicas", "2"]) == 2
    assert "--direct-ingress: needs --num-replicas 1" in capsys.readouterr().err


def test_jobs_serve_refuses_an_open_host_without_a_token(smoke_checkpoint: Path, capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.serve import main

    monkeypatch.delenv("INTROPRIOR_API_TOKEN", raising=False)
    assert main(["--checkpoint", str(smoke_checkpoint), "--host", "0.0.0.0"]) == 2
    assert "without a token; pass --auth-token-file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The app on Ray Serve
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(smoke_checkpoint: Path) -> Iterator[str]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # STACK.md: explicit, the same for server and clients
    import ray
    from ray import serve

    from service.serving import SERVE_FAST_PATH_ENV, build_app, use_fast_path_env

    if ray.is_initialized():  # conftest's shared instance forwards worker output: every request would print a line
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in SERVE_FAST_PATH_ENV}
    use_fast_path_env()  # the Serve switches jobs.serve starts with: every route and error below runs under them
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": str(smoke_checkpoint), "max_samples": 512, "max_body_bytes": 65536}),
              name="introprior", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout_s=300)
    yield url
    serve.shutdown()
    ray.shutdown()
    for key, value in saved.items():  # later modules' Ray instances start with the environment they had
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def client(served: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served, timeout=30.0) as c:
        yield c


def test_model_info(client: httpx.Client, smoke_checkpoint: Path) -> None:
    info = client.get("/v1/model").json()
    state = checkpoint.load(smoke_checkpoint)
    assert (info["dataset"], info["prior"], info["num_components"], info["latent_dim"]) == ("8gaussians", "mog", 8, 2)
    assert info["data_shape"] == [2]
    assert info["checkpoint"]["sha256"] == hashlib.sha256(smoke_checkpoint.read_bytes()).hexdigest()
    assert info["checkpoint"]["iteration"] == state["iteration"]
    assert info["serving"]["torch_threads"] == 1 and info["serving"]["batching"] is True


def test_modes(client: httpx.Client) -> None:
    body = client.get("/v1/modes").json()
    modes = body["modes"]
    assert body["num_components"] == len(modes) == 8
    assert sum(m["weight"] for m in modes) == pytest.approx(1.0, abs=1e-5)
    for i, m in enumerate(modes):
        assert m["index"] == i and len(m["mean"]) == 2 and min(m["variance"]) > 0
        assert isinstance(m["active"], bool) and 0 <= m["responsibility_share"] <= 1


def test_samples_json(client: httpx.Client) -> None:
    r = client.post("/v1/samples", json={"n": 16, "mode": 3, "seed": 7})
    assert r.status_code == 200
    body = r.json()
    assert np.asarray(body["samples"]).shape == (16, 2) and body["component"] == [3] * 16 and body["seed"] == 7
    assert client.post("/v1/samples", json={"n": 16, "mode": 3, "seed": 7}).json() == body  # seeded: reproducible
    assert client.post("/v1/samples", json={"n": 5, "mode": [0, 3, 5], "seed": 1}).json()["component"] == [0, 3, 5, 0, 3]
    full = client.post("/v1/samples", json={"n": 200, "seed": 2}).json()
    assert len(set(full["component"])) > 1
    fresh = client.post("/v1/samples", json={"n": 4}).json()
    assert client.post("/v1/samples", json={"n": 4, "seed": fresh["seed"]}).json()["samples"] == fresh["samples"]


def test_samples_of_a_data_mode(client: httpx.Client) -> None:
    """The smoke run evaluated on labelled 8gaussians: data_modes maps each covered data mode (its
    components carry >= 0.01 of the responsibilities together) to its active components (all of them
    when none is active), and a data_mode request samples from those only (through Serve's batching)."""
    body = client.get("/v1/modes").json()
    rows, table = body["modes"], body["data_modes"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["majority_mode"] is not None:
            groups.setdefault(str(r["majority_mode"]), []).append(r)
    expected = {k: [r["index"] for r in g if r["active"]] or [r["index"] for r in g]
                for k, g in groups.items() if sum(r["responsibility_share"] for r in g) >= 1e-2}
    assert table == expected and table
    shares = body["mode_shares"]  # measured at evaluation: the prior's samples over the 8 data modes
    assert set(shares) <= {str(i) for i in range(8)} and sum(v["prior"] or 0 for v in shares.values()) == pytest.approx(1)
    assert sum(v["data"] or 0 for v in shares.values()) == pytest.approx(1)
    # each drawn mode placed against the data's points of it (offset and width in the mode's spread)
    placed = [v for v in shares.values() if v["offset"] is not None]
    assert placed and all(v["offset"] >= 0 and v["width"] >= 0 for v in placed)
    k, members = next(iter(table.items()))
    got = client.post("/v1/samples", json={"n": 64, "data_mode": int(k), "seed": 4}).json()
    assert set(got["component"]) <= set(members) and np.asarray(got["samples"]).shape == (64, 2)
    missing = next(i for i in range(100) if str(i) not in table)
    r = client.post("/v1/samples", json={"n": 4, "data_mode": missing})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "data_mode"


def test_samples_npy_npz_png(client: httpx.Client) -> None:
    npy = client.post("/v1/samples", json={"n": 32, "mode": [1, 2], "seed": 3, "format": "npy"})
    assert npy.status_code == 200 and npy.headers["content-type"] == "application/octet-stream"
    x = np.load(io.BytesIO(npy.content))
    assert x.shape == (32, 2) and x.dtype == np.float32
    assert npy.headers["x-components"].split(",") == ["1", "2"] * 16 and npy.headers["x-seed"] == "3"
    json_body = client.post("/v1/samples", json={"n": 32, "mode": [1, 2], "seed": 3}).json()
    assert np.allclose(x, json_body["samples"])
    npz = np.load(io.BytesIO(client.post("/v1/samples", json={"n": 8, "seed": 3, "format": "npz"}).content))
    assert npz["samples"].shape == (8, 2) and npz["component"].shape == (8,) and npz["latents"].shape == (8, 2)
    png = client.post("/v1/samples", json={"n": 256, "format": "png", "seed": 0})
    assert png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as image:
        image.load()
        assert image.format == "PNG" and min(image.size) > 100


def test_interpolate(client: httpx.Client) -> None:
    modes = client.get("/v1/modes").json()["modes"]
    body = client.post("/v1/interpolate", json={"from_mode": 0, "to_mode": 5, "steps": 8}).json()
    assert len(body["t"]) == len(body["latents"]) == len(body["samples"]) == 8
    assert np.allclose(body["latents"][0], modes[0]["mean"]) and np.allclose(body["latents"][-1], modes[5]["mean"])
    assert np.asarray(body["samples"]).shape == (8, 2)


def test_encode_and_reconstruct(client: httpx.Client) -> None:
    data = client.post("/v1/samples", json={"n": 10, "seed": 5}).json()["samples"]
    enc = client.post("/v1/encode", json={"data": data}).json()
    assert np.asarray(enc["mean"]).shape == np.asarray(enc["logvar"]).shape == (10, 2)
    resp = np.asarray(enc["responsibilities"])
    assert resp.shape == (10, 8) and np.allclose(resp.sum(1), 1.0, atol=1e-5)
    assert enc["component"] == resp.argmax(1).tolist()
    rec = client.post("/v1/reconstruct", json={"data": data}).json()
    assert np.asarray(rec["reconstructions"]).shape == (10, 2) and len(rec["component"]) == 10


def test_concurrent_requests_are_batched_and_reproducible(served: str) -> None:
    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=served, timeout=30.0) as c:
            rs = await asyncio.gather(*(c.post("/v1/samples", json={"n": 64, "seed": s}) for s in range(12)))
            return [r.json() for r in rs]

    stats = lambda: httpx.get(f"{served}/v1/model", timeout=30).json()["serving"]["batches"]  # noqa: E731
    before = stats()
    first, second = asyncio.run(burst()), asyncio.run(burst())
    after = stats()
    assert after["requests"] - before["requests"] == 24 and 1 <= after["batches"] - before["batches"] <= 24
    for a, b in zip(first, second):
        assert a["component"] == b["component"]  # latents are drawn per request: exact
        assert np.allclose(a["samples"], b["samples"], atol=1e-5)  # decoded in varying batches: float rounding


def test_openapi(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/healthz", "/v1/model", "/v1/modes", "/v1/samples", "/v1/interpolate", "/v1/encode",
            "/v1/reconstruct"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


JSON = {"content-type": "application/json"}
BAD_INPUTS = [
    ("/v1/samples", {"json": {"n": 4, "mode": 12}}, 422, "mode", "allowed [0, 7]"),
    ("/v1/samples", {"json": {"n": -1}}, 422, "n", "allowed integers in [1, 512]"),
    ("/v1/samples", {"json": {"n": 513}}, 422, "n", "allowed [1, 512]"),
    ("/v1/samples", {"json": {"n": 2.5}}, 422, "n", "valid integer"),
    ("/v1/samples", {"json": {"seed": "7"}}, 422, "seed", "valid integer"),
    ("/v1/samples", {"json": {"format": "gif"}}, 422, "format", "['json', 'png', 'npy', 'npz']"),
    ("/v1/samples", {"json": {"mode": [0, "x"]}}, 422, "mode", "list of integers"),
    ("/v1/samples", {"json": {"nn": 3}}, 422, "nn", "unknown field"),
    ("/v1/samples", {"content": b'{"n": 3,', "headers": JSON}, 400, "body", "malformed JSON"),
    ("/v1/samples", {"content": b'{"n": 3}'}, 415, "content-type", "allowed application/json"),
    ("/v1/samples", {"content": b'{"n": 1' + b"0" * 5000 + b"}", "headers": JSON}, 422, "n", "integers in [1, 512]"),
    ("/v1/encode", {"json": {"data": [[1e39, 0.0]]}}, 422, "data", "allowed |x| <= 10000"),
    ("/v1/samples", {"json": {"n": 512, "format": "gif"}}, 422, "format", "one of"),
    ("/v1/interpolate", {"json": {"from_mode": 0, "to_mode": 8}}, 422, "to_mode", "allowed [0, 7]"),
    ("/v1/interpolate", {"json": {"from_mode": 0}}, 422, "to_mode", "is required"),
    ("/v1/encode", {"json": {"data": [[1.0, 2.0, 3.0]]}}, 422, "data", "has shape [1, 3]"),
    ("/v1/encode", {"json": {"data": [[1.0, "2"]]}}, 422, "data", "numbers only"),
    ("/v1/encode", {"json": {"data": [[1.0, 2.0], [3.0]]}}, 422, "data", "ragged"),
    ("/v1/reconstruct", {"json": {"data": [[1.0, 2.0]], "stochastic": "yes"}}, 422, "stochastic", "true or false"),
    ("/v1/encode", {"json": {"data": [[1.0, 2.0]] * 10_000}}, 413, "body", "allowed at most 65536 bytes"),
]


@pytest.mark.parametrize("url, kwargs, status, field, allowed", BAD_INPUTS, ids=[f"{b[0]}-{b[3]}-{b[1]}"[:60]
                                                                               for b in BAD_INPUTS])
def test_bad_input_is_a_4xx_naming_the_field(client: httpx.Client, url: str, kwargs: dict, status: int, field: str,
                                             allowed: str) -> None:
    r = client.post(url, **kwargs)
    assert r.status_code == status, r.text
    (error,) = r.json()["detail"]
    assert error["field"] == field and error["message"].startswith(f"{field}: ") and allowed in error["message"]


# --------------------------------------------------------------------------------------------
# The curl examples of README "Serve" and docs/serving.md, run as written
# --------------------------------------------------------------------------------------------

def curl_examples(path: Path, section: str | None = None) -> list[tuple[str, int]]:
    """``(command, expected status)`` for every ``curl ... $U...`` in the bash blocks of ``path``
    (of one ``## section`` only, if given). Backslash continuations are joined; the expected status
    is the leading number of the comment after the command (``# 422 ...``), else 200."""
    text = path.read_text()
    if section is not None:
        text = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    examples: list[tuple[str, int]] = []
    for block in blocks:
        lines = block.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            command, _, comment = line.partition("#")
            if not command.strip().startswith("curl") or "$U" not in command or "Authorization" in command:
                continue
            if not comment.strip() and i + 1 < len(lines) and lines[i + 1].strip().startswith("#"):
                comment = lines[i + 1].strip().lstrip("#")
            status = re.match(r"\s*(\d{3})\b", comment)
            examples.append((command.strip(), int(status.group(1)) if status else 200))
    return examples


@pytest.mark.parametrize("doc, section", [("docs/serving.md", None), ("README.md", "Serve")])
def test_curl_examples_run_as_written(served: str, tmp_path: Path, doc: str, section: str | None) -> None:
    examples = curl_examples(ROOT / doc, section)
    assert len(examples) >= 8 and {s for _, s in examples} >= {200}
    for command, status in examples:
        out = subprocess.run(["bash", "-c", command + " -s -w '\\n%{http_code}'"], cwd=tmp_path, env={**os.environ,
                             "U": served}, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (command, out.stderr)
        body, _, code = out.stdout.rpartition("\n")
        assert int(code) == status, f"{doc}: {command}\n-> {code} {body[:300]}"
        if status != 200:
            assert json.loads(body)["detail"][0]["message"], body
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"


def test_still_healthy_after_bad_inputs(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.post("/v1/samples", json={"n": 2, "seed": 0}).status_code == 200


def test_load_test_against_the_app(served: str, capsys: pytest.CaptureFixture) -> None:
    from jobs.load_test import main

    assert main(["--url", served, "--clients", "4", "--requests", "24", "--n", "16", "--time-limit-s", "30",
                 "--server-pid", str(os.getpid())]) == 0  # Ray runs under this process: its proxy and replica
    out = capsys.readouterr().out
    assert "requests=24 errors=0" in out and "p99=" in out and "req/s" in out
    cpu = re.search(r"CPU ms per request: (.*)  \(load average", out).group(1)
    per_role = {k: float(v) for k, v in (part.rsplit(" ", 1) for part in cpu.split(", "))}
    assert per_role["proxy"] > 0 and per_role["replica"] > 0 and per_role["client"] > 0
    assert per_role["total"] == pytest.approx(sum(v for k, v in per_role.items() if k != "total"), abs=0.05)
    batches = re.search(r"batches: (\d+), mean size ([\d.]+) requests", out)  # the fixture's app batches
    assert 1 <= int(batches.group(1)) <= 24 and 1.0 <= float(batches.group(2)) <= 4.0


# --------------------------------------------------------------------------------------------
# MLflow runs:/ checkpoints (no Ray)
# --------------------------------------------------------------------------------------------

def test_runs_uri_is_downloaded_from_mlflow(tmp_path: Path, smoke_checkpoint: Path) -> None:
    from mlflow.tracking import MlflowClient

    from service.serving import resolve_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serve-test", artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.log_artifact(run_id, str(smoke_checkpoint), "checkpoint")
    for spec in (f"runs:/{run_id}/checkpoint/checkpoint.pt", f"runs:/{run_id}/checkpoint"):
        with resolve_checkpoint(spec, uri) as local:
            assert local.read_bytes() == smoke_checkpoint.read_bytes()
        assert not local.exists()  # the download is removed once loaded
    with pytest.raises(checkpoint.CheckpointError, match="cannot download 'runs:/0123456789abcdef/x.pt'"):
        with resolve_checkpoint("runs:/0123456789abcdef/x.pt", uri):
            pass


# --------------------------------------------------------------------------------------------
# MLflow models: a registry with two versions, served by alias (mlflow models serve, the Serve
# app) and side by side behind one multiplexed endpoint
# --------------------------------------------------------------------------------------------

SHIFT = 10.0  # version 2 = version 1's decoder with its output bias moved by SHIFT: a different, known model
MODEL = "introprior-e2e"


@pytest.fixture(scope="module")
def registry(smoke_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two runs in a SQLite store, each with its checkpoint artifact and pyfunc model; versions 1, 2; v2 = champion."""
    from service.config import from_dict
    from service.mlflow_model import CHAMPION, log_model, register
    from service.ray_train import start_mlflow_run

    root = tmp_path_factory.mktemp("registry")
    state = checkpoint.load(smoke_checkpoint)
    bias = [k for k in state["model"] if k.startswith("decoder.") and k.endswith(".bias")][-1]
    state["model"][bias] = state["model"][bias] + SHIFT
    shifted = root / "shifted" / "checkpoint.pt"
    checkpoint.save(shifted, state)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = from_dict(state["config"])
    ids = {}
    for name, path in (("a", smoke_checkpoint), ("b", shifted)):
        run_id = ids[name] = start_mlflow_run(cfg, uri, name)
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).log_artifact(run_id, str(path), "checkpoint")  # what jobs.train logs: runs:/ ids work
        log_model(uri, run_id, path)
        register(uri, run_id, MODEL, alias=CHAMPION if name == "b" else None)
    return {"uri": uri, "a": ids["a"], "b": ids["b"], "sha_b": hashlib.sha256(shifted.read_bytes()).hexdigest()}


def expected_samples(smoke_checkpoint: Path, n: int, mode: int, seed: int, shift: float = 0.0) -> list:
    from service import sampling

    _, model = checkpoint.restore_model(checkpoint.load(smoke_checkpoint))
    x, _, _ = sampling.sample(model.eval(), n, component=mode, seed=seed)
    return (x + shift).tolist()


def test_registering_a_logged_model_again_returns_its_version_instead_of_a_copy(registry: dict[str, str]) -> None:
    """A resumed sweep registers its champion again: the registry keeps one version per logged model."""
    from mlflow.tracking import MlflowClient

    from service.mlflow_model import CHAMPION, register

    client = MlflowClient(registry["uri"], registry_uri=registry["uri"])
    before = sorted((int(v.version), v.run_id) for v in client.search_model_versions(f"name = '{MODEL}'"))
    again_b = register(registry["uri"], registry["b"], MODEL, alias=CHAMPION)
    again_a = register(registry["uri"], registry["a"], MODEL)
    after = sorted((int(v.version), v.run_id) for v in client.search_model_versions(f"name = '{MODEL}'"))
    assert after == before and len(before) == 2
    assert (again_a.run_id, again_b.run_id) == (registry["a"], registry["b"]) and again_a.version != again_b.version
    assert client.get_model_version_by_alias(MODEL, CHAMPION).version == again_b.version


def test_mlflow_models_serve_by_alias(registry: dict[str, str], smoke_checkpoint: Path) -> None:
    """``mlflow models serve -m models:/<name>@champion --env-manager local`` (offline) answers /invocations."""
    port = free_port()
    bin_dir = Path(sys.executable).parent  # the scoring server runs `uvicorn` from PATH: the venv's
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "PYTHONPATH": str(ROOT),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_cli = bin_dir / "mlflow"
    proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager",
                             "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not start in 300 s"
            time.sleep(0.2)
        r = httpx.post(f"{url}/invocations", json={"dataframe_records": [{"n": 3, "mode": 1, "seed": 5}]}, timeout=60)
        assert r.status_code == 200, r.text
        rows = r.json()["predictions"]
        assert [row["component"] for row in rows] == [1, 1, 1] and {row["seed"] for row in rows} == {5}
        got = [row["sample"] for row in rows]
        np.testing.assert_allclose(got, expected_samples(smoke_checkpoint, 3, 1, 5, SHIFT), atol=1e-5)  # champion: v2
        bad = httpx.post(f"{url}/invocations", json={"dataframe_records": [{"n": 3, "mode": 99}]}, timeout=60)
        assert bad.status_code == 400 and "mode: 99 is out of range; allowed [0, 7]" in bad.text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_serve_app_accepts_a_registered_model_alias(served: str, registry: dict[str, str]) -> None:
    from ray import serve

    from service.serving import build_app

    serve.run(build_app({"checkpoint": f"models:/{MODEL}@champion", "tracking_uri": registry["uri"]}),
              name="alias", route_prefix="/alias")
    try:
        info = httpx.get(f"{served}/alias/v1/model", timeout=60).json()
        assert info["checkpoint"]["source"] == f"models:/{MODEL}@champion"
        assert info["checkpoint"]["sha256"] == registry["sha_b"]
    finally:
        serve.delete("alias")


def test_multiplexed_endpoint_serves_runs_and_versions_by_header(served: str, registry: dict[str, str],
                                                                 smoke_checkpoint: Path) -> None:
    """One endpoint, models by Serve's header: a run id, a version, an alias; an LRU of 2 per replica."""
    from ray import serve

    from service.serving_multiplex import MODEL_ID_HEADER, build_app

    start = time.perf_counter()
    serve.run(build_app({"tracking_uri": registry["uri"], "max_models_per_replica": 2}), name="models",
              route_prefix="/models")
    url = f"{served}/models"
    wait_healthy(url, timeout_s=300)
    healthy_s = time.perf_counter() - start
    body = {"n": 4, "mode": 0, "seed": 3}

    def post(model_id: str | None, path: str = "/v1/samples") -> httpx.Response:
        headers = {MODEL_ID_HEADER: model_id} if model_id is not None else {}
        return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120)

    def model(model_id: str) -> dict:
        return httpx.get(f"{url}/v1/model", headers={MODEL_ID_HEADER: model_id}, timeout=120).json()

    try:
        t0 = time.perf_counter()
        a = post(registry["a"])
        first_s = time.perf_counter() - t0
        assert a.status_code == 200, a.text
        t0 = time.perf_counter()
        assert post(registry["a"]).status_code == 200
        cached_s = time.perf_counter() - t0
        print(f"multiplexed: app healthy {healthy_s:.1f} s after serve.run; first request for a model (download + "
              f"load + sample) {first_s:.2f} s; again (loaded) {cached_s * 1000:.0f} ms")
        want = expected_samples(smoke_checkpoint, 4, 0, 3)
        np.testing.assert_allclose(a.json()["samples"], want, atol=1e-5)
        v2 = post(f"{MODEL}/2").json()["samples"]
        np.testing.assert_allclose(v2, expected_samples(smoke_checkpoint, 4, 0, 3, SHIFT), atol=1e-5)  # another model
        first_load = model(registry["a"])
        assert first_load["checkpoint"]["source"] == f"runs:/{registry['a']}/checkpoint/checkpoint.pt"
        assert model(f"{MODEL}@champion")["checkpoint"]["sha256"] == registry["sha_b"]  # evicts version 2
        assert model(f"{MODEL}/1")["checkpoint"]["sha256"] == first_load["checkpoint"]["sha256"]  # evicts run a
        # a replica keeps two models: run a was the least recently used of three, so it is loaded again
        assert model(registry["a"])["serving"]["started_at"] > first_load["serving"]["started_at"]
        missing = post(None)
        assert missing.status_code == 400 and missing.json()["detail"][0]["field"] == MODEL_ID_HEADER
        assert "allowed an MLflow run id" in missing.json()["detail"][0]["message"]
        assert post("not a model").status_code == 400
        unknown = post("0" * 32)
        assert unknown.status_code == 404 and "cannot be loaded" in unknown.json()["detail"][0]["message"]
        bad = httpx.post(f"{url}/v1/samples", json={"n": 0}, headers={MODEL_ID_HEADER: registry["a"]}, timeout=60)
        assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "n"  # the routes' own checks
    finally:
        serve.delete("models")


# --------------------------------------------------------------------------------------------
# deploy/serve.yaml as `serve deploy` applies it (runs last: a config deploy replaces the apps above)
# --------------------------------------------------------------------------------------------

def test_deploy_config_user_config_changes_batching_without_a_restart(served: str, smoke_checkpoint: Path) -> None:
    import yaml
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": int(served.rsplit(":", 1)[1])}
    (app,) = config["applications"]
    app["args"]["checkpoint"] = str(smoke_checkpoint)
    (dep,) = app["deployments"]

    def deploy_and_wait(check) -> dict:
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                info = httpx.get(f"{served}/v1/model", timeout=10).json()
                if check(info["serving"]):
                    return info
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"the deployment did not reach the expected state; status: {serve.status()}")

    dep["user_config"]["max_batch_size"] = 8  # not the served fixture's 16: the answer comes from this deployment
    before = deploy_and_wait(lambda s: s["max_batch_size"] == 8 and s["batching"] is True)
    assert before["checkpoint"]["path"] == str(smoke_checkpoint) and before["serving"]["torch_threads"] == 1
    dep["user_config"] = {"batching": False, "max_batch_size": 4}
    after = deploy_and_wait(lambda s: s["max_batch_size"] == 4 and s["batching"] is False)
    assert (after["serving"]["pid"], after["serving"]["started_at"]) == (before["serving"]["pid"],
                                                                        before["serving"]["started_at"])  # no restart
    r = httpx.post(f"{served}/v1/samples", json={"n": 2, "seed": 1}, timeout=60)
    assert r.status_code == 200 and len(r.json()["samples"]) == 2
