"""End to end: training survives faults (real Ray Train, real MLflow).

A Ray Train worker process SIGKILLed mid-run restarts from the last checkpoint (the default
``--max-failures``) and ends with the same final metrics and weights, bit for bit, as an
uninterrupted run, with 1 and with 2 workers (every rank's RNG state is in the checkpoint). The
uninterrupted run is the plain loop (``service.loop.train`` on the run's recorded config, the
workers' thread count) that Ray Train wraps: in this process for 1 worker, as 2 gloo processes with
the gradient all-reduce for 2: one Ray Train run cheaper each.
(An MLflow server outage during a run is test_e2e_mlflow_outage.py.) Figures (wall time lost, final
metrics) are printed: run with ``-s`` to see them.
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

from jobs import train as train_job
from service import checkpoint

pytestmark = pytest.mark.e2e

ITERATIONS, CHECKPOINT_EVERY, LOG_EVERY = 300, 100, 10


def _args(root: Path, name: str, workers: int, tracking_uri: str | None = None, iterations: int = ITERATIONS):
    return ["--preset", "8gaussians/mog-ip-lc", "--smoke", "--workers", str(workers), "--run-name", name,
            "--set", f"schedule.iterations={iterations}", "--set", f"schedule.checkpoint_every={CHECKPOINT_EVERY}",
            "--set", f"schedule.log_every={LOG_EVERY}",
            "--output-dir", str(root / name), "--storage-path", str(root / "ray"),
            "--tracking-uri", tracking_uri or f"sqlite:///{root / 'mlflow.db'}"]


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of ``root`` (Linux /proc): this test's own Ray only."""
    parent, cmd = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd[int(d)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, IndexError, ValueError):
                continue
    out, todo = {}, [root]
    while todo:
        p = todo.pop()
        for child, pp in parent.items():
            if pp == p and child not in out:
                out[child] = cmd.get(child, "")
                todo.append(child)
    return out


def _train_workers() -> list[int]:
    return sorted(pid for pid, c in _descendants(os.getpid()).items() if c.startswith("ray::RayTrainWorker"))


class _Killer(threading.Thread):
    """Once the run's first checkpoint is registered, SIGKILL one of its Ray Train worker processes."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.victim, self.seen, self.stop = run_dir, None, set(), threading.Event()
        self.killed_at = self.restarted_at = None  # time.monotonic() of the kill / of the new workers' start

    def run(self) -> None:
        snapshot = self.run_dir / "checkpoint_manager_snapshot.json"
        while not self.stop.is_set():
            if self.victim is None and not snapshot.is_file():  # a stat; the /proc walk is ~2-5 ms of CPU
                time.sleep(0.05)
                continue
            if self.killed_at is not None and self.restarted_at is not None:
                return
            workers = _train_workers()
            if self.killed_at is not None and self.restarted_at is None and set(workers) - self.seen:
                self.restarted_at = time.monotonic()
            self.seen.update(workers)
            if self.victim is None and workers:
                self.victim = workers[-1]
                os.kill(self.victim, signal.SIGKILL)
                self.killed_at = time.monotonic()
            time.sleep(0.05)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _run(client, name: str):
    exp = client.get_experiment_by_name("introprior")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'")
    return run


def _timed_main(args: list[str]) -> float:
    start = time.perf_counter()
    assert train_job.main(args) == 0
    return time.perf_counter() - start


def _in_process_reference(run_dir: Path, plot_dir: Path, threads: int) -> tuple[dict, dict]:
    """The plain loop on ``run_dir``'s recorded config with ``threads`` torch threads (as a 1-worker Ray
    Train run's worker): its final metrics and state."""
    from service.config import load_yaml
    from service.data import make_source
    from service.loop import train

    cfg = load_yaml(str(run_dir / "config.yaml"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = train(cfg, make_source(cfg.data), plot_dir=str(plot_dir))
    finally:
        torch.set_num_threads(before)
    return result.metrics, result.state


def _rank(rank: int, world: int, init_method: str, run_dir: str, threads: int, out: str) -> None:
    """One rank of the plain loop on ``run_dir``'s recorded config, as a Ray Train worker runs it (gloo,
    the gradient all-reduce, every rank's streams gathered at each checkpoint); rank 0 saves its results."""
    import torch.distributed as dist

    from service.config import load_yaml
    from service.data import make_source
    from service.distributed import allreduce_mean
    from service.loop import train
    from service.ray_train import gather_objects

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        cfg = load_yaml(os.path.join(run_dir, "config.yaml"))
        result = train(cfg, make_source(cfg.data), grad_sync=allreduce_mean, rank=rank, world_size=world,
                       on_checkpoint=lambda *a: None, gather=gather_objects, plot_dir=out)
        if rank == 0:
            torch.save({"metrics": result.metrics, "state": result.state}, os.path.join(out, "reference.pt"))
    finally:
        dist.destroy_process_group()


def _two_rank_reference(run_dir: Path, out: Path, threads: int) -> tuple[dict, dict]:
    """The plain loop with 2 gloo ranks (processes) on ``run_dir``'s recorded config: final metrics and state."""
    import torch.multiprocessing as mp

    from test_distributed import rendezvous

    mp.start_processes(_rank, args=(2, rendezvous(out), str(run_dir), threads, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    saved = torch.load(out / "reference.pt", weights_only=False)
    return saved["metrics"], saved["state"]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_worker_resumes_from_its_last_checkpoint_to_identical_results(ray_local, tmp_path, workers):
    import ray

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killer = _Killer(tmp_path / "ray" / "killed")
    killer.start()
    try:
        killed_s = _timed_main(_args(tmp_path, "killed", workers))  # default --max-failures: 2
    finally:
        killer.stop.set()
        killer.join()
    assert killer.victim is not None
    assert len(killer.seen) > workers  # the worker group was restarted
    # the uninterrupted run: the plain loop on the run's recorded config, with each worker's torch threads
    # (the cluster's CPUs shared by the workers: ray_train._cpus_per_worker), in this process for 1 worker,
    # in 2 gloo processes for 2 (bit-identical to an uninterrupted 2-worker Ray Train run: checked 2026-12-03)
    threads = int(ray.cluster_resources()["CPU"]) // workers
    started = time.perf_counter()
    if workers == 1:
        ref_metrics, ref_state = _in_process_reference(tmp_path / "killed", tmp_path, threads)
    else:
        (tmp_path / "reference").mkdir()
        ref_metrics, ref_state = _two_rank_reference(tmp_path / "killed", tmp_path / "reference", threads)
    ref_s = time.perf_counter() - started
    killed_metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    print(f"\nworker kill, {workers} worker(s): uninterrupted {ref_s:.1f} s (plain loop, no Ray), killed "
          f"{killed_s:.1f} s (Ray Train); new worker group {killer.restarted_at - killer.killed_at:.1f} s "
          f"after the kill\n  uninterrupted: {ref_metrics}\n  killed:        {killed_metrics}")
    assert killed_metrics == ref_metrics  # bit for bit (floats compared exactly)
    killed_state = checkpoint.load(tmp_path / "killed" / "checkpoint.pt")
    assert killed_state["iteration"] == ref_state["iteration"] == ITERATIONS
    for k, v in ref_state["model"].items():
        assert torch.equal(killed_state["model"][k], v), k
    assert len(killed_state["extra"]["rank_generators"]) == workers

    run = _run(_client(uri), "killed")
    assert run.info.status == "FINISHED"
    steps = collections.Counter(m.step for m in _client(uri).get_metric_history(run.info.run_id, "train/loss_encoder"))
    assert sorted(steps) == list(range(LOG_EVERY, ITERATIONS + 1, LOG_EVERY))  # nothing missing
    redone = sorted(s for s, n in steps.items() if n > 1)
    assert all(s > CHECKPOINT_EVERY for s in redone)  # resumed from a checkpoint, not from the start
    assert len(redone) * LOG_EVERY < ITERATIONS - CHECKPOINT_EVERY
    print(f"  iterations re-done after the restart: {max(redone, default=CHECKPOINT_EVERY) - CHECKPOINT_EVERY}"
          f"+ (steps logged twice: {redone})")
