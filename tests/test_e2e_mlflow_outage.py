"""End to end: an MLflow tracking server stopped and restarted during a training run (real Ray Train,
real ``mlflow server``) loses no metric and does not stop the run. The figures (how long the
server was down, the worker's warnings) are printed: run with ``-s`` to see them.
"""

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs import train as train_job
from test_e2e_faults import LOG_EVERY, _args, _client, _run

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _MlflowServer:
    """``mlflow server`` on SQLite in its own process group (STACK.md); ``stop`` ends the group."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        import httpx

        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, "mlflow server exited"
            time.sleep(0.5)
        raise TimeoutError("mlflow server did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def test_mlflow_server_stopped_and_restarted_mid_run_loses_no_metric(ray_local, tmp_path, capfd):
    """The server goes away after the first logged metrics and comes back only once the run has
    written its iteration-300 checkpoint, i.e. training went on without tracking."""
    iterations = 1_200
    server = _MlflowServer(tmp_path)
    server.start()
    db = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")  # read the store directly, also while the server is down
    events: dict[str, float] = {}

    def outage() -> None:
        while "stop" not in events:
            runs = db.search_runs([e.experiment_id for e in db.search_experiments()])
            if runs and db.get_metric_history(runs[0].info.run_id, "train/loss_encoder"):
                server.stop()
                events["stop"] = time.monotonic()
            time.sleep(0.1)
        while len(list((tmp_path / "ray" / "outage").glob("checkpoint_*"))) < 3:  # iterations 100..300 trained
            time.sleep(0.1)
        events["checkpoints_during_outage"] = len(list((tmp_path / "ray" / "outage").glob("checkpoint_*")))
        server.start()
        events["up"] = time.monotonic()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        assert train_job.main(_args(tmp_path, "outage", 1, tracking_uri=server.uri, iterations=iterations)) == 0
        end = time.monotonic()
        thread.join(60)
        run = _run(_client(server.uri), "outage")
        steps = collections.Counter(m.step for m in db.get_metric_history(run.info.run_id, "train/loss_encoder"))
    finally:
        server.stop()
    err = capfd.readouterr().err
    # Ray forwards a worker's output to the driver asynchronously (its log monitor tails the worker's file):
    # on a loaded machine the worker's last lines can arrive after the run has returned (seen 2026-12-03)
    deadline = time.monotonic() + 60
    while "MLflow reachable again" not in err and time.monotonic() < deadline:
        time.sleep(0.5)
        err += capfd.readouterr().err
    assert {"stop", "up"} <= events.keys() and events["up"] < end
    with capfd.disabled():
        print(f"\nMLflow outage: server down {events['up'] - events['stop']:.1f} s of a {end - start:.1f} s run; "
              + "; ".join(line.split(") ", 1)[-1] for line in err.splitlines() if "warning: MLflow" in line))
    assert sorted(steps) == list(range(LOG_EVERY, iterations + 1, LOG_EVERY))  # every logged step arrived
    assert run.info.status == "FINISHED" and "eval/hist_kl" in run.data.metrics
    assert not (tmp_path / "outage" / "unlogged_metrics.jsonl").exists()
    assert "MLflow logging failed" in err and "MLflow reachable again" in err  # the worker warned, trained on
