"""What every Ray worker process of a job started here should know: which cluster it belongs to.

Ray's own helper actors (Ray Train's ``PlacementGroupCleaner`` among them) query the state API with no
address; it then looks for *a* local Ray instance and, when another one runs on the machine (a sweep
beside ``make run``, the test suite's parallel workers), fails with "Found multiple active Ray
instances" and a 30-line traceback on the driver's console, and stops watching the placement group it
should clean up. ``pin_ray_address`` runs in each worker process at start-up
(``runtime_env["worker_process_setup_hook"]``) and points ``RAY_ADDRESS`` at the worker's own cluster.

The same hook shortens one of Ray Train's warnings that only a busy machine triggers: the controller
asks Ray Data's autoscaling coordinator actor for resources with a 5 s timeout, and when that actor's
process is still starting (a 2-core laptop running a sweep) it logs "Failed to send resource request
... safe to ignore" with a 20-line ``GetTimeoutError`` traceback, twice, on the driver's console. It
stays a warning, on one line, without the traceback (``quiet_transient_warnings``).

``init_ray`` starts a local instance, with a warning, where ``ray.init()`` would wait many minutes on a
head that is gone: the address in Ray's record of the last ``ray start`` (``ray_current_cluster``) that
nothing answers at (``dead_recorded_head``); an address the caller chose (``RAY_ADDRESS``) that nothing
answers at is an error at once (``ClusterUnreachable``), not minutes of Ray's retries.

On the driver, ``init_ray`` drops the worker log lines in ``DRIVER_NOISE`` before they reach the console:
lines Ray prints on every run that name no action a user could take (``quiet_driver_console``).

Kept free of heavy imports: it runs in every worker process of the job, whatever that worker does.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from typing import Any, Callable

HOOK = "service.ray_env.worker_setup"
# loggers whose warnings with a traceback are transient by their own text; shown as one line
TRANSIENT_LOGGERS = ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",)
# worker log lines the driver does not print: Ray Train's controller creates its PreemptionWatcher actor
# with restarts and an argument in the object store, and Ray's core worker logs an error-level notice
# for that on every run (ray-project/ray#53727); nothing in it is this job's or its user's to act on
# The raylet warns once a node has started 4x its CPUs in Python workers: each Ray Train run starts about
# seven (trial, controller, workers, helper actors), so two 1-worker sweep trials on 2 CPUs pass it at
# start-up. It is about start-up speed, and its advice (fewer actors, no fractional CPUs) is Ray Train's
# and Tune's own design here.
DRIVER_NOISE = (re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .*"
                           r"has constructor arguments in the object store and max_restarts > 0"),
                re.compile(r"WARNING: \d+ PYTHON worker processes have been started on node: .*maximum expected "
                           r"startup concurrency"))
STARTUP_TIMEOUT = "timed out during startup"  # ray._private.node's message when the raylet did not register in time
START_ATTEMPTS = 2
HEAD_PROBE_S = 3.0  # how long a recorded head's GCS port may take to accept a connection


def pin_ray_address() -> None:
    """``worker_process_setup_hook``: ``RAY_ADDRESS`` = this worker's cluster (GCS address). Never raises:
    a failing hook would stop the worker."""
    try:
        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - keep the worker; it only loses the pin
        pass


class OneLine(logging.Filter):
    """Keeps a record, drops its traceback: the message's first sentence plus the exception's type."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            exc = record.exc_info[1]
            first = record.getMessage().split(". ", 1)[0].rstrip(".")
            record.msg, record.args = f"{first} ({type(exc).__name__}; transient on a busy machine, retried)", None
            record.exc_info, record.exc_text = None, None
        return True


def quiet_transient_warnings() -> None:
    """One-line, traceback-free records for ``TRANSIENT_LOGGERS`` in this process (idempotent)."""
    for name in TRANSIENT_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, OneLine) for f in log.filters):
            log.addFilter(OneLine())


def without_noise(lines: list[str]) -> list[str]:
    """``lines`` less those that match ``DRIVER_NOISE``."""
    return [ln for ln in lines if not any(p.search(ln) for p in DRIVER_NOISE)]


def _dropping_noise(print_fn: Callable[..., None]) -> Callable[..., None]:
    """``print_fn(data, ...)`` for Ray's log batches (``{"lines": [...], ...}``) less ``DRIVER_NOISE``."""
    if getattr(print_fn, "drops_noise", False):
        return print_fn

    def filtered(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        lines = without_noise(list(data.get("lines") or ()))
        if lines:
            print_fn({**data, "lines": lines}, *args, **kwargs)

    filtered.drops_noise = True  # type: ignore[attr-defined]
    return filtered


def quiet_driver_console() -> bool:
    """Drop ``DRIVER_NOISE`` from what this driver prints for its cluster (idempotent): the handler through
    which it prints its workers' log lines, and Ray's printer of the errors the cluster pushes to drivers
    (the raylet's warnings). Both are Ray internals, not public API: where they are missing or changed,
    the console stays as Ray prints it. Returns whether the workers' lines are filtered."""
    try:
        import ray._private.worker as ray_worker

        ray_worker.print_to_stdstream = _dropping_noise(ray_worker.print_to_stdstream)
    except Exception:  # noqa: BLE001 - Ray's internals moved: keep its console as it is
        pass
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        with dispatcher._lock:
            handlers = [(name, _dropping_noise(h) if name == "ray_print_logs" else h)
                        for name, h in dispatcher.handlers]
            dispatcher.handlers = handlers
            return any(getattr(h, "drops_noise", False) for n, h in handlers if n == "ray_print_logs")
    except Exception:  # noqa: BLE001 - Ray's internals moved: keep its console as it is
        return False


def worker_setup() -> None:
    """``worker_process_setup_hook`` of every job started by ``init_ray``. Never raises."""
    pin_ray_address()
    try:
        quiet_transient_warnings()
    except Exception:  # noqa: BLE001 - the worker keeps Ray's full warnings
        pass


def recorded_head() -> tuple[str, str] | None:
    """(file, address) of Ray's record of the last ``ray start`` on this machine, the cluster a bare
    ``ray.init()`` connects to; None where there is none."""
    try:
        from ray._common.utils import get_ray_address_file

        path = get_ray_address_file(None)
    except Exception:  # noqa: BLE001 - Ray moved it: fall back to where Ray 2.x keeps it
        path = os.path.join(os.environ.get("RAY_TMPDIR") or "/tmp", "ray", "ray_current_cluster")
    try:
        with open(path) as f:
            address = f.read().strip()
    except OSError:
        return None
    return (path, address) if address else None


class ClusterUnreachable(ConnectionError):
    """The Ray cluster address the caller chose (argument or ``RAY_ADDRESS``) does not accept a connection."""


def _answers(address: str, probe_s: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``probe_s``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=probe_s):
            return True
    except (OSError, ValueError):
        return False


def check_chosen_address(address: str | None, probe_s: float = HEAD_PROBE_S) -> None:
    """Raise ``ClusterUnreachable`` where the cluster the caller chose (``address``, else ``RAY_ADDRESS``, as
    ``ray.init`` reads them) is a ``host:port`` that accepts no connection: ``ray.init`` would retry it for
    minutes. ``local``, ``auto``, none, and ``ray://`` / ``http://`` addresses are Ray's to resolve."""
    source, target = ("address", address) if address not in (None, "auto") else ("RAY_ADDRESS",
                                                                                 os.environ.get("RAY_ADDRESS"))
    if not target or target in ("local", "auto") or "://" in target:
        return
    if not _answers(target, probe_s):
        raise ClusterUnreachable(
            f"{source}={target}: no Ray head answers there (no connection within {probe_s:g} s); start the "
            f"cluster (`ray start --head`) or fix the address; without RAY_ADDRESS a local Ray instance starts")


def dead_recorded_head(probe_s: float = HEAD_PROBE_S) -> tuple[str, str] | None:
    """(file, address) when a bare ``ray.init()`` would connect to a recorded head that nothing answers at
    (Ray would then retry for many minutes before failing); None when ``RAY_ADDRESS`` is set, there is no
    record, or its GCS port accepts a connection within ``probe_s``."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    found = recorded_head()
    return None if found is None or _answers(found[1], probe_s) else found


def init_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)`` with ``worker_setup`` in the job's runtime environment (merged with a
    submitted job's own runtime environment by Ray). An address chosen by the caller that does not answer
    raises ``ClusterUnreachable`` at once; with none, where Ray's record of the last ``ray start`` names a
    head that does not answer, a local instance is started (with a warning)."""
    import ray

    check_chosen_address(kwargs.get("address"))
    if kwargs.get("address") is None and (dead := dead_recorded_head()) is not None:
        print(f"warning: {dead[0]} names the Ray head {dead[1]}, which does not answer (it was stopped or "
              f"is unreachable); starting a local Ray instance instead. Set RAY_ADDRESS to use a cluster, or "
              f"run `ray stop` to remove the record", file=sys.stderr, flush=True)
        kwargs["address"] = "local"
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", HOOK)
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(runtime_env=runtime_env, **kwargs)
            quiet_driver_console()
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if STARTUP_TIMEOUT not in str(e) or attempt == START_ATTEMPTS:
                raise
            # Ray gives a new local node a fixed 30 s to register; on a saturated machine (a sweep beside
            # the tests, a 2-core laptop) it can miss that: clean up and start once more
            print(f"warning: the local Ray node did not register within Ray's 30 s (attempt {attempt} of "
                  f"{START_ATTEMPTS}; the machine is busy); starting it again", file=sys.stderr, flush=True)
            ray.shutdown()
