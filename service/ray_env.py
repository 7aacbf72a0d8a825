"""What every Ray worker process of a job started here should know: which cluster it belongs to.

Ray's own helper actors (Ray Train's ``PlacementGroupCleaner`` among them) query the state API with no
address; it then looks for *a* local Ray instance and, when another one runs on the machine (a sweep
beside ``make run``, the test suite's parallel workers), fails with "Found multiple active Ray
instances" and a 30-line traceback on the driver's console, and stops watching the placement group it
should clean up. ``pin_ray_address`` runs in each worker process at start-up
(``runtime_env["worker_process_setup_hook"]``) and points ``RAY_ADDRESS`` at the worker's own cluster.

Kept free of heavy imports: it runs in every worker process of the job, whatever that worker does.
"""

from __future__ import annotations

import os
from typing import Any

HOOK = "service.ray_env.pin_ray_address"


def pin_ray_address() -> None:
    """``worker_process_setup_hook``: ``RAY_ADDRESS`` = this worker's cluster (GCS address). Never raises:
    a failing hook would stop the worker."""
    try:
        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - keep the worker; it only loses the pin
        pass


def init_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)`` with ``pin_ray_address`` in the job's runtime environment (merged with a
    submitted job's own runtime environment by Ray)."""
    import ray

    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", HOOK)
    ray.init(runtime_env=runtime_env, **kwargs)
