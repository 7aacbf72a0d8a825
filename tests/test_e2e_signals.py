"""End to end: ``python -m jobs.train`` stopped by SIGTERM or Ctrl-C marks its MLflow run KILLED.

Each case is a real process with its own Ray instance (a signal handler is per process). SIGTERM
goes to the job process alone (what ``kill`` or a scheduler sends); Ctrl-C is SIGINT to the whole
process group (what a terminal sends).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stopped_run_is_marked_killed_and_exits_128_plus_the_signal(tmp_path, sig):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "jobs.train", "--preset", "8gaussians/mog-ip-lc", "--smoke", "--workers", "1",
           "--run-name", "stopped", "--set", "schedule.iterations=100000", "--set", "schedule.log_every=10",
           "--output-dir", str(tmp_path / "out"), "--storage-path", str(tmp_path / "ray"), "--tracking-uri", uri]
    # RAY_ADDRESS=local: the job's own Ray instance, never a cluster that /tmp/ray/ray_current_cluster names
    # (another test's `ray start` head running beside this one under pytest-xdist)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ADDRESS": "local"}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            client, deadline, run = MlflowClient(uri), time.monotonic() + 400, None
            while time.monotonic() < deadline and proc.poll() is None:  # wait until it trains
                if (tmp_path / "mlflow.db").exists():
                    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
                    if runs and client.get_metric_history(runs[0].info.run_id, "train/loss_encoder"):
                        run = runs[0]
                        break
                time.sleep(0.5)
            assert run is not None and proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            if sig == signal.SIGINT:
                os.killpg(proc.pid, signal.SIGINT)
            else:
                os.kill(proc.pid, signal.SIGTERM)
            rc = proc.wait(180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert rc == 128 + sig, stderr[-3000:]
    assert f"run 'stopped' stopped by {sig.name}; the MLflow run is marked KILLED" in stderr
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["error"] == f"stopped by {sig.name}"
    assert not (tmp_path / "out").exists()  # no results of an unfinished run
