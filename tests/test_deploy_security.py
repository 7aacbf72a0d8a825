"""Secure defaults of every shipped config: Ray token authentication on clusters (token from a file or a
Kubernetes Secret, never in the YAML), MLflow and the dashboard not open without auth, Serve's HTTP
on loopback unless the API has a token, and the local defaults (Makefile, jobs.serve)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _commands(cfg: dict, *keys: str) -> list[str]:
    return [c for k in keys for c in cfg.get(k) or []]


def test_ray_up_cluster_uses_token_auth_from_a_file() -> None:
    text = (DEPLOY / "cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert "RAY_AUTH_MODE=disabled" not in text
    starts = _commands(cfg, "head_start_ray_commands", "worker_start_ray_commands")
    for command in starts:
        if "ray start" in command or "ray stop" in command:
            assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in command, command
    assert "RAY_AUTH_TOKEN=" not in text  # the token itself is never in the file
    assert "/home/ubuntu/.ray/auth_token" in cfg["file_mounts"]
    assert any("chmod 600 ~/.ray/auth_token" in c for c in cfg["setup_commands"])
    assert any("RAY_AUTH_MODE=token" in c for c in cfg["setup_commands"])  # interactive shells on the nodes too


def test_ray_up_mlflow_and_dashboard_are_not_open() -> None:
    cfg = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    mlflow = head[head.index("mlflow server"):]
    assert "--host 0.0.0.0" not in mlflow and "--host $(hostname -I" in mlflow  # the head's private IP
    assert "--dashboard-host=127.0.0.1" in head


def test_kuberay_job_uses_token_auth_from_a_secret() -> None:
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    major, minor, _ = (int(p) for p in cluster["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)  # Ray token authentication
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") != "disabled"
            for name, e in env.items():
                if "TOKEN" in name:
                    assert "valueFrom" in e and "value" not in e, name  # from a Secret, never literal
    # the dashboard listens on the pod's interfaces only because the token protects it
    if cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "0.0.0.0":
        assert cluster["authOptions"]["mode"] == "token"


def test_serve_config_binds_loopback_and_has_a_timeout() -> None:
    cfg = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    assert cfg["http_options"]["host"] == "127.0.0.1"
    (app,) = cfg["applications"]
    assert cfg["http_options"]["request_timeout_s"] > app["args"]["request_timeout_s"]
    assert app["args"]["auth_token_file"] is None and "RAY_AUTH_MODE=disabled" not in (DEPLOY / "serve.yaml").read_text()


def test_local_defaults_use_token_auth() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^export RAY_AUTH_MODE \?= token\b", makefile, flags=re.M)
    serve_job = (ROOT / "jobs" / "serve.py").read_text()
    assert 'os.environ.setdefault("RAY_AUTH_MODE", "token")' in serve_job
    assert 'setdefault("RAY_AUTH_MODE", "disabled")' not in serve_job
