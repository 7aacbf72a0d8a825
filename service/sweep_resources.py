"""How many sweep trials run at once and what each trial's Train workers ask Ray for (``service.tuning``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ConfigError

DRIVER_CPU = 0.01  # each Tune trial's own reservation (0 raises); STACK.md, Ray Tune


@dataclass(frozen=True)
class ResourcePlan:
    """How many trials run at once and what each trial's Train workers ask Ray for."""

    max_concurrent: int
    cpus_per_worker: float
    threads_per_worker: int
    gpus_per_worker: float


def plan_resources(cpus: float, gpus: float, workers: int, max_concurrent: int | None = None,
                   gpus_per_trial: float = 0.0) -> ResourcePlan:
    """Concurrency and per-worker requests such that the trials that fit never over-subscribe.

    ``fits``: trials whose ``workers`` get at least one whole CPU each (and ``gpus_per_trial``).
    Each of those trials gets ``cpus / min(max_concurrent, fits)`` CPUs, whole CPUs per worker,
    and its 0.01-CPU Tune driver comes out of that share (so 2 trials on 2 CPUs ask for
    0.01 + 0.99 each, not 1.01). Every worker asks for 0.01 less than its whole CPUs, so any node
    that runs a worker has room for a driver: on a cluster of 1-CPU nodes a 2-worker trial asks
    0.01 + 2 x 0.99 (with 0.995 per worker neither node could also hold the driver). Without
    ``max_concurrent`` exactly ``fits`` trials run at once. A larger ``max_concurrent`` is kept
    (an autoscaling cluster adds nodes for the waiting trials; on a fixed cluster they queue,
    each holding its 0.01 CPU). A GPU request the cluster cannot serve raises, unless
    ``max_concurrent`` is given (GPU nodes still to come).
    """
    if gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial: {gpus_per_trial} is invalid; allowed numbers >= 0")
    if gpus_per_trial and gpus + 1e-9 < gpus_per_trial and max_concurrent is None:
        raise ConfigError(f"--gpus-per-trial: {gpus_per_trial} is more than the Ray cluster's {gpus:g} GPUs; "
                          f"allowed [0, {gpus:g}] (on an autoscaling cluster, also give --max-concurrent)")
    check_gpus_per_worker(gpus_per_trial, workers)
    fits = max(1, int(cpus // workers))
    if gpus_per_trial:
        fits = max(1, min(fits, int(gpus / gpus_per_trial + 1e-9)))
    n = max_concurrent or fits
    whole = max(1, int(cpus / min(n, fits) // workers))  # CPUs per Train worker, also its torch threads
    return ResourcePlan(max_concurrent=n,
                        cpus_per_worker=math.floor((whole - DRIVER_CPU) * 1e4) / 1e4,
                        threads_per_worker=whole,
                        gpus_per_worker=gpus_per_trial / workers)


GPU_PRECISION = 1e-4  # Ray's smallest resource fraction


def check_gpus_per_worker(gpus_per_trial: float, workers: int) -> float:
    """Each Train worker's GPU request, ``gpus_per_trial / workers``: a fraction in (0, 1] (several
    workers or trials share a GPU) or a whole number. Ray cannot place 1.5 GPUs (above 1 it takes
    whole GPUs only) nor fractions below 0.0001; both are refused here, before Ray starts."""
    per_worker = gpus_per_trial / workers
    whole = abs(per_worker - round(per_worker)) < 1e-9
    if per_worker and (per_worker < GPU_PRECISION or (per_worker > 1 and not whole)):
        raise ConfigError(f"--gpus-per-trial: {gpus_per_trial:g} gives each of a trial's {workers} Train worker(s) "
                          f"{per_worker:g} GPU; allowed per worker a fraction in [{GPU_PRECISION:g}, 1] or a whole "
                          f"number (--gpus-per-trial = workers x that)")
    return per_worker
