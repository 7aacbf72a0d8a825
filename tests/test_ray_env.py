"""Ray worker processes know their own cluster (``service.ray_env``), so Ray's helper actors that query
the state API keep working when another local Ray instance runs on the machine (a sweep beside
``make run``; the test suite's parallel workers). Real Ray, two local instances."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]

HOLDER = ("import ray, sys; ray.init(address='local', include_dashboard=False, num_cpus=1); "
          "print('up', flush=True); sys.stdin.read(); ray.shutdown()")  # runs until its stdin closes

# what Ray Train's PlacementGroupCleaner does in its actor: query the state API with no address
PROBE = """
import json, os, sys, ray
from service.ray_env import init_ray

(init_ray if sys.argv[1] == "pinned" else ray.init)(address="local", num_cpus=1)

@ray.remote
def state_query():
    import logging
    from ray.util.state import list_nodes
    from service.ray_env import TRANSIENT_LOGGERS, OneLine
    quiet = all(any(isinstance(f, OneLine) for f in logging.getLogger(n).filters)
                for n in TRANSIENT_LOGGERS)  # set by the setup hook, if any
    try:
        return os.environ.get("RAY_ADDRESS"), len(list_nodes()), None, quiet
    except Exception as e:
        return os.environ.get("RAY_ADDRESS"), None, f"{type(e).__name__}: {e}", quiet

address, nodes, error, quiet = ray.get(state_query.remote())
print(json.dumps({"driver": ray.get_runtime_context().gcs_address, "worker": address, "nodes": nodes,
                  "error": error, "quiet": quiet}))
"""


def _probe(mode: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_workers_query_their_own_cluster_beside_another_local_instance() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        plain = _probe("plain", env)  # Ray's default: the worker finds two instances and gives up
        # or, when a busy machine (the suite's other workers' Ray instances starting and stopping) leaves it a
        # stale address, waits for a GCS that is not its own until Ray's timeout: either way no answer
        assert plain["nodes"] is None and plain["worker"] is None
        assert ("multiple active Ray instances" in plain["error"]
                or "Timed out while waiting for GCS" in plain["error"]), plain["error"]
        pinned = _probe("pinned", env)
        assert pinned["worker"] == pinned["driver"] and pinned["error"] is None and pinned["nodes"] == 1
        assert pinned["quiet"] and not plain["quiet"]  # the hook also set up the one-line warnings
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)


def test_init_ray_starts_once_more_when_the_local_node_missed_rays_registration_deadline(monkeypatch, capsys):
    """Ray's node start-up raises a bare Exception when the raylet does not register within its fixed 30 s
    (a saturated machine); init_ray cleans up and starts again, once, and re-raises anything else."""
    import ray

    from service import ray_env

    calls, shutdowns = [], []

    def flaky_init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen because some of the "
                            "raylet failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "init", flaky_init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    ray_env.init_ray(address="local", num_cpus=1)
    assert len(calls) == 2 and shutdowns == [1]
    assert calls[1] == {"address": "local", "num_cpus": 1, "runtime_env": {"worker_process_setup_hook": ray_env.HOOK}}
    assert "did not register within Ray's 30 s (attempt 1 of 2" in capsys.readouterr().err

    def always_late(**kwargs):
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", always_late)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_env.init_ray()

    def other(**kwargs):
        raise ValueError("bad address")

    calls.clear()
    monkeypatch.setattr(ray, "init", lambda **kw: (calls.append(kw), other())[1])
    with pytest.raises(ValueError, match="bad address"):
        ray_env.init_ray()
    assert len(calls) == 1  # anything else is not retried


def test_a_transient_ray_train_warning_is_one_line_without_its_traceback():
    """What a busy machine made Ray Train's controller print (twice per run): "Failed to send resource
    request ... safe to ignore" with a 20-line GetTimeoutError traceback; after the hook, one line."""
    import io
    import logging

    from ray.exceptions import GetTimeoutError

    from service import ray_env

    log = logging.getLogger(ray_env.TRANSIENT_LOGGERS[0])
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log.addHandler(handler)
    try:
        ray_env.quiet_transient_warnings()
        ray_env.quiet_transient_warnings()  # idempotent: one filter
        assert sum(isinstance(f, ray_env.OneLine) for f in log.filters) == 1
        try:
            raise GetTimeoutError("Get timed out: some object(s) not ready.")
        except GetTimeoutError:
            log.warning("Failed to send resource request for %s. If this only happens transiently during network "
                        "partition or CPU being overloaded, it's safe to ignore this error. If this error persists, "
                        "file a GitHub issue.", "train-1", exc_info=True)
        log.warning("an ordinary warning stays as it is: %d", 7)
    finally:
        log.removeHandler(handler)
        log.filters = [f for f in log.filters if not isinstance(f, ray_env.OneLine)]
    assert out.getvalue().splitlines() == [
        "Failed to send resource request for train-1 (GetTimeoutError; transient on a busy machine, retried)",
        "an ordinary warning stays as it is: 7"]


def test_the_driver_drops_rays_routine_notices_and_prints_every_other_line():
    """Ray Train's controller made Ray's core worker log an error-level notice about its PreemptionWatcher
    actor on every run (the line below, from a run of 2026-12-03), and the raylet warns about its worker
    start-up concurrency when a sweep starts; the driver's console filter drops both and passes every other
    line of the batch, in order, to Ray's own printer."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from service import ray_env

    notice = ("[2026-12-03 09:20:17,520 E 17647 17706] core_worker.cc:2465: Actor with class name: "
              "'PreemptionWatcher' and ID: '1a85c6146fded8167966763e01000000' has constructor arguments in the "
              "object store and max_restarts > 0. If the arguments in the object store go out of scope or are "
              "lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more "
              "details.")
    other = ("[2026-12-03 09:20:17,600 E 17647 17706] core_worker.cc:2465: Actor with class name: 'MyActor' "
             "and ID: 'ab' has constructor arguments in the object store and max_restarts > 0.")
    startup = ("WARNING: 8 PYTHON worker processes have been started on node: a8ce294cb8a2 with address: "
               "192.0.2.2, which is 4x the maximum expected startup concurrency (2). This could be a result of "
               "using a large number of actors, tasks blocked in ray.get() calls, or tasks with fractional CPU "
               "requests (e.g., num_cpus=0.1) allowing high concurrency.")  # a 2-trial sweep's start, 2026-12-03
    printed: list[dict] = []
    saved = list(dispatcher.handlers)
    dispatcher.handlers = [("ray_print_logs", printed.append)]
    try:
        assert ray_env.quiet_driver_console() and ray_env.quiet_driver_console()  # idempotent
        assert len(dispatcher.handlers) == 1
        dispatcher.emit({"pid": 17647, "is_err": True, "lines": ["first", notice, other]})
        dispatcher.emit({"pid": 17647, "is_err": True, "lines": [notice]})  # nothing left: nothing printed
        dispatcher.emit({"pid": "raylet", "is_err": True, "lines": [startup, "WARNING: something else"]})
    finally:
        dispatcher.handlers = saved
    assert printed == [{"pid": 17647, "is_err": True, "lines": ["first", other]},
                       {"pid": "raylet", "is_err": True, "lines": ["WARNING: something else"]}]

    # the raylet's warning reaches the driver as a pushed error, printed by Ray's print_to_stdstream
    import ray._private.worker as ray_worker

    original, pushed = ray_worker.print_to_stdstream, []
    ray_worker.print_to_stdstream = lambda data, ignore_prefix: pushed.append((data["lines"], ignore_prefix))
    try:
        ray_env.quiet_driver_console()
        for message in (startup, "the actor died"):
            ray_worker.print_to_stdstream({"lines": [message], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    finally:
        ray_worker.print_to_stdstream = original
    assert pushed == [(["the actor died"], False)]


def test_a_bare_init_ray_starts_locally_where_rays_record_names_a_head_that_is_gone(monkeypatch, tmp_path, capsys):
    """A test cluster or a crashed ``ray start`` head can leave ``ray_current_cluster`` behind; a bare
    ``ray.init()`` would then retry that address for many minutes (13 min seen) before failing. init_ray
    probes the recorded GCS port and starts a local instance, saying why; a live head is still used."""
    import socket

    import ray

    from service import ray_env

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    record = tmp_path / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))

    ray_env.init_ray()  # no record: Ray's own choice
    assert "address" not in calls[-1] and ray_env.recorded_head() is None

    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        record.write_text(f"127.0.0.1:{listening.getsockname()[1]}\n")
        ray_env.init_ray()  # a head that answers: Ray connects to it as before
        assert "address" not in calls[-1] and ray_env.dead_recorded_head() is None
        assert "warning" not in capsys.readouterr().err

        gone = f"127.0.0.1:{closed.getsockname()[1]}"
        record.write_text(gone + "\n")
        assert ray_env.dead_recorded_head() == (str(record), gone)
        ray_env.init_ray(num_cpus=1)
        assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] == 1
        err = capsys.readouterr().err
        assert f"names the Ray head {gone}, which does not answer" in err and str(record) in err

        ray_env.init_ray(address="10.0.0.1:6379")  # an address the caller chose is never replaced
        assert calls[-1]["address"] == "10.0.0.1:6379"
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # nor one in the environment
        assert ray_env.dead_recorded_head() is None
        record.write_text("not an address")
        monkeypatch.delenv("RAY_ADDRESS")
        assert ray_env.dead_recorded_head() == (str(record), "not an address")


def test_a_chosen_address_that_does_not_answer_is_an_error_at_once_and_the_job_exits_2(monkeypatch, tmp_path,
                                                                                       capsys, smoke_checkpoint):
    """``RAY_ADDRESS`` (or an address argument) naming a head that is not there: ``ray.init`` would retry it
    for minutes (over 2 min measured); init_ray raises ``ClusterUnreachable`` naming the variable, and
    ``jobs.train`` / ``jobs.sweep`` / ``jobs.serve`` exit 2 with it before anything is written. Addresses Ray resolves
    itself (local, auto, ray://, http://) are not probed."""
    import socket

    import ray

    from jobs import sweep as sweep_job
    from jobs import train as train_job
    from service import ray_env

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        gone = f"127.0.0.1:{closed.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", gone)
        with pytest.raises(ray_env.ClusterUnreachable, match=f"RAY_ADDRESS={gone}: no Ray head answers there"):
            ray_env.init_ray()
        with pytest.raises(ray_env.ClusterUnreachable, match=f"address={gone}: no Ray head answers"):
            ray_env.init_ray(address=gone)
        for chosen in ("local", "auto", "ray://10.0.0.1:10001", "http://10.0.0.1:8265"):
            monkeypatch.setenv("RAY_ADDRESS", chosen)
            ray_env.init_ray()  # Ray's to resolve: passed on untouched
        assert len(calls) == 4 and all("address" not in kw for kw in calls)
        ray_env.init_ray(address="local")  # an explicit local start ignores RAY_ADDRESS, as Ray does
        assert calls[-1]["address"] == "local"

        monkeypatch.setenv("RAY_ADDRESS", gone)
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        assert train_job.main(["--preset", "8gaussians/sintro", "--smoke", "--output-dir", str(tmp_path / "run"),
                               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
        assert f"error: RAY_ADDRESS={gone}: no Ray head answers there" in capsys.readouterr().err
        space = Path(__file__).resolve().parents[1] / "tune_spaces" / "smoke_staged.yaml"
        assert sweep_job.main([str(space), "--output-dir", str(tmp_path / "sweep"),
                               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
        assert f"error: RAY_ADDRESS={gone}: no Ray head answers there" in capsys.readouterr().err
        from jobs import serve as serve_job

        assert serve_job.main(["--checkpoint", str(smoke_checkpoint)]) == 2
        assert f"error: RAY_ADDRESS={gone}: no Ray head answers there" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not list((tmp_path / "sweep").glob("*.json"))
    assert len(calls) == 5  # no job got as far as ray.init
