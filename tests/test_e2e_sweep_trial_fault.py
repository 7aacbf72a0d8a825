"""End to end: a 1-worker sweep trial trains in the Tune trial's own process (``service.sweep_in_trial``),
and a trial process SIGKILLed mid-run is restarted by Tune from its last checkpoint, ending bit for bit
where an uninterrupted run ends (real Ray Tune, real MLflow store, a real process killed).

The uninterrupted run is the plain loop (``service.loop.train``) on the trial's recorded config: what
the trial runs. Figures (wall time, the restart) are printed: run with ``-s`` to see them.
"""

import collections
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from test_e2e_faults import _descendants
from test_e2e_sweep import _results, _run_sweep

pytestmark = pytest.mark.e2e

ITERATIONS, CHECKPOINT_EVERY, LOG_EVERY = 300, 100, 10
SPACE = f"""\
preset: 8gaussians/mog-ip-lc
seeds: [0]
smoke: true
param_space:
  schedule: {{iterations: {ITERATIONS}, checkpoint_every: {CHECKPOINT_EVERY}, log_every: {LOG_EVERY}}}
  eval: {{plots: false}}
"""


def _trial_processes() -> list[int]:
    return sorted(pid for pid, c in _descendants(os.getpid()).items() if c.startswith("ray::ImplicitFunc"))


class _TrialKiller(threading.Thread):
    """Once the trial's first Tune checkpoint is stored, SIGKILL the trial's process; then note its successor."""

    def __init__(self, tune_dir: Path) -> None:
        super().__init__(daemon=True)
        self.tune_dir, self.victim, self.successor, self.stop = tune_dir, None, None, threading.Event()
        self.killed_at = self.restarted_at = None

    def _checkpoint_registered(self) -> bool:
        """Tune's driver has processed the trial's first checkpoint: its row is in the trial's result.json
        (the folder alone appears when the trial has stored it, before the driver knows of it)."""
        return any("checkpoint_000000" in f.read_text() for f in self.tune_dir.glob("*/v0000/result.json"))

    def run(self) -> None:
        while not self.stop.is_set() and self.successor is None:
            if self.victim is None and not self._checkpoint_registered():
                time.sleep(0.05)
                continue
            pids = _trial_processes()
            if self.victim is None and pids:
                self.victim = pids[0]
                os.kill(self.victim, signal.SIGKILL)
                self.killed_at = time.monotonic()
            elif self.victim is not None and set(pids) - {self.victim}:
                self.successor, self.restarted_at = max(set(pids) - {self.victim}), time.monotonic()
            time.sleep(0.05)


def test_a_killed_in_process_trial_resumes_from_its_checkpoint_to_identical_results(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from service import checkpoint
    from service.config import load_yaml
    from service.data import make_source
    from service.loop import train

    (tmp_path / "space.yaml").write_text(SPACE)
    killer = _TrialKiller(tmp_path / "out" / "tune")
    killer.start()
    try:
        _, _, rc = _run_sweep(tmp_path, tmp_path / "space.yaml", "e2e-kill", "1-trial sweep, trial killed once")
    finally:
        killer.stop.set()
        killer.join()
    assert rc == 0
    assert killer.victim is not None and killer.successor is not None  # killed, and Tune started it again
    (row,) = _results(tmp_path).to_dict("records")
    assert row["status"] == "ok" and row["iteration"] == ITERATIONS
    trial_dir = Path(row["output_dir"].removeprefix("file://"))
    cfg = load_yaml(str(trial_dir / "config.yaml"))
    assert cfg.scaling.workers == 1 and not (tmp_path / "out" / "ray_train").exists()  # no Ray Train run

    before = torch.get_num_threads()
    torch.set_num_threads(cfg.scaling.threads_per_worker)  # as the trial (its whole CPUs)
    started = time.perf_counter()
    try:
        reference = train(cfg, make_source(cfg.data), plot_dir=str(tmp_path / "reference_plots"))
    finally:
        torch.set_num_threads(before)
    ref_s = time.perf_counter() - started
    killed_metrics = json.loads((trial_dir / "metrics.json").read_text())
    print(f"\ntrial kill: new trial process {killer.restarted_at - killer.killed_at:.1f} s after the kill; "
          f"uninterrupted run in process {ref_s:.1f} s\n  uninterrupted: {reference.metrics}\n"
          f"  killed:        {killed_metrics}")
    assert killed_metrics == reference.metrics  # bit for bit (floats compared exactly)
    state = checkpoint.load(trial_dir / "checkpoint.pt")
    assert state["iteration"] == ITERATIONS
    for k, v in reference.state["model"].items():
        assert torch.equal(state["model"][k], v), k
    assert json.loads((trial_dir / "workers.json").read_text())[0]["pid"] == killer.successor

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(row["mlflow_run_id"])
    assert run.info.status == "FINISHED"  # the same MLflow run, continued
    steps = collections.Counter(m.step for m in client.get_metric_history(run.info.run_id, "train/loss_encoder"))
    assert sorted(steps) == list(range(LOG_EVERY, ITERATIONS + 1, LOG_EVERY))  # nothing missing
    redone = sorted(s for s, n in steps.items() if n > 1)  # logged before the kill and again after it
    assert all(s > CHECKPOINT_EVERY for s in redone), redone
    # Tune's record of the trial: its rows before and after the restart; the checkpoint at 100 once (resumed
    # from it, not from the start), every checkpoint reported, the final row last
    (result_json,) = (tmp_path / "out" / "tune").glob("*/v0000/result.json")
    rows = [json.loads(line) for line in result_json.read_text().splitlines() if line.strip()]
    assert [r["at_iteration"] for r in rows] == [CHECKPOINT_EVERY, 2 * CHECKPOINT_EVERY, ITERATIONS], rows
    assert len({r["pid"] for r in rows}) == 2  # two trial processes: the killed one and its successor
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint", "metrics.json", "config.yaml"}
