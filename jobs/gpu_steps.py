"""The measurements of ``jobs.gpu_checks``, one per subcommand; each writes one JSON file.

    python -m jobs.gpu_steps env --json env.json
    python -m jobs.gpu_steps step2d --device cuda --batches 512,8192 --json step2d.json
    python -m jobs.gpu_steps trial tune_spaces/gpu_fractional_2d.yaml --variant 0 --device cuda --json t0.json
    python -m jobs.gpu_steps share2d tune_spaces/gpu_fractional_2d.yaml --device cuda --json share2d.json
    python -m jobs.gpu_steps sweep tune_spaces/gpu_fractional_2d.yaml --gpus-per-trial 0.25 --work W --json s.json

- ``env``: the machine (device name, torch / CUDA versions, CPUs) and which optional packages are there.
- ``step2d``: it/s of the adversarial step (``service.step.introspective_step``, SPEC §2.2) for the
  8gaussians presets at several batch sizes, model, batches and noise generator on ``--device``.
- ``trial``: one variant of a space trained by ``service.loop.train`` in this process (no Ray, no MLflow).
- ``share2d``: the space's variants as ``trial`` processes, one after another and then all at once on
  the same device: what a fractional GPU (``--gpus-per-trial 0.25``) buys, without Ray.
- ``sweep``: ``jobs.sweep`` on the space with ``--gpus-per-trial`` (needs Ray and MLflow).

Each runs in its own process under ``jobs.gpu_checks``, which gives it a timeout. The JSON is
written as soon as there is something to write, and rewritten as rows arrive.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

OPTIONAL = ("ray", "mlflow", "pandas", "pyarrow", "torchvision", "sklearn")


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Atomically: a reader (or a timeout) never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# env
# --------------------------------------------------------------------------------------------

def env_info(device: str) -> dict:
    """The machine: what the figures were measured on."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "device": device, "device_name": "cpu", "packages": {n: importlib.util.find_spec(n) is not None
                                                                 for n in OPTIONAL}}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
    return info


# --------------------------------------------------------------------------------------------
# step2d
# --------------------------------------------------------------------------------------------

def step2d(device: str, presets: list[str], batches: list[int], iterations: int, rounds: int, warmup: int,
           out: str) -> dict:
    """it/s of the adversarial step per preset and batch; presets alternate within each round, and
    each figure is the median over rounds (a machine that drifts moves all presets alike)."""
    import torch

    from jobs.bench import bench_steps  # the same steppers and alternating rounds as the CPU benchmark

    dev = torch.device(device)
    result: dict = {"device": device, "iterations": iterations, "rounds": rounds, "rows": []}
    for batch in batches:
        by_preset = bench_steps([f"8gaussians/{p}" for p in presets], iterations, rounds, warmup,
                                batch=batch, device=dev)
        times = {p: by_preset[f"8gaussians/{p}"] for p in presets}
        base = statistics.median(times[presets[0]])
        for p in presets:
            med = statistics.median(times[p])
            result["rows"].append({"preset": p, "batch": batch, "it_per_s": 1 / med, "ms_per_it": 1e3 * med,
                                   "points_per_s": batch / med, f"time_vs_{presets[0]}": med / base,
                                   "ms_rounds": [1e3 * t for t in times[p]]})
        write_json(out, result)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------------------------
# trial / share2d: several 2D trials on one device, without Ray
# --------------------------------------------------------------------------------------------

def trial(space: str, variant: int, device: str, threads: int, shrink: str | None, overrides: list[str],
          out: str) -> dict:
    """Train one variant of ``space`` (``shrink``, else the space's ``smoke:``) with ``service.loop.train`` here."""
    import torch

    from service.config import apply_overrides
    from service.data import make_source
    from service.loop import train
    from service.spaces import load_space

    start = time.perf_counter()
    torch.set_num_threads(threads)
    spec = load_space(space)
    v = spec.variants[variant]
    cfg = apply_overrides(v.config(shrink or ("smoke" if spec.smoke else "full")), overrides)
    ready = time.perf_counter()
    res = train(cfg, make_source(cfg.data), device=device)
    _sync(torch.device(device))
    end = time.perf_counter()
    result = {"variant": variant, "preset": v.preset, "seed": cfg.seed, "iterations": res.iteration,
              "setup_s": ready - start, "train_eval_s": end - ready, "wall_s": end - start,
              "metrics": res.metrics}
    write_json(out, result)
    return result


def _run_trials(space: str, indices: list[int], device: str, threads: int, shrink: str | None, overrides: list[str],
                work: Path, concurrent: bool) -> tuple[float, list[dict]]:
    """Wall seconds of running the variants as ``trial`` processes, all at once or one by one."""
    procs, files = [], []
    start = time.perf_counter()
    for i in indices:
        path = work / f"trial{i}-{'conc' if concurrent else 'seq'}.json"
        files.append(path)
        cmd = [sys.executable, "-m", "jobs.gpu_steps", "trial", space, "--variant", str(i), "--device", device,
               "--threads", str(threads), "--json", str(path)] + [a for o in overrides for a in ("--set", o)]
        cmd += ["--shrink", shrink] if shrink else []
        proc = subprocess.Popen(cmd)
        if concurrent:
            procs.append(proc)
        elif proc.wait():
            raise RuntimeError(f"trial {i} exited with {proc.returncode}")
    for i, proc in zip(indices, procs):
        if proc.wait():
            raise RuntimeError(f"trial {i} exited with {proc.returncode}")
    wall = time.perf_counter() - start
    return wall, [json.loads(f.read_text()) for f in files]


def share2d(space: str, device: str, trials: int | None, shrink: str | None, overrides: list[str], out: str) -> dict:
    """The space's first ``trials`` variants one after another, then all at once; trials/hour of each."""
    from service.spaces import load_space

    n = len(load_space(space).variants) if trials is None else trials
    indices = list(range(n))
    threads = max(1, (os.cpu_count() or 1) // n)  # the same threads both ways: only the sharing differs
    work = Path(out).parent / f"{Path(out).stem}-work"
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"space": space, "device": device, "trials": n, "threads_per_trial": threads,
                    "shrink": shrink, "overrides": overrides, "modes": []}
    for concurrent in (False, True):
        wall, rows = _run_trials(space, indices, device, threads, shrink, overrides, work, concurrent)
        result["modes"].append({"mode": f"{n} at once" if concurrent else "one at a time",
                                "concurrent": n if concurrent else 1, "wall_s": wall,
                                "trials_per_hour": 3600 * n / wall,
                                "mean_trial_s": statistics.mean(r["wall_s"] for r in rows),
                                "hist_kl": [r["metrics"].get("hist_kl") for r in rows]})
        write_json(out, result)
    seq, conc = result["modes"]
    result["speedup"] = seq["wall_s"] / conc["wall_s"]
    write_json(out, result)
    return result


# --------------------------------------------------------------------------------------------
# sweep: the same through Ray Tune (jobs.sweep --gpus-per-trial)
# --------------------------------------------------------------------------------------------

def sweep(space: str, gpus_per_trial: float, work: str, shrink: str | None, out: str) -> dict:
    """``jobs.sweep`` in this process on a private Ray instance; wall time, trials/hour, trial rows."""
    import pandas as pd

    from jobs.sweep import main as sweep_main

    os.environ["RAY_ADDRESS"] = "local"  # a private instance: nothing else on it, ended with this process
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance (tests/conftest.py does the same)
    folder = Path(work).resolve()
    argv = [space, "--output-dir", str(folder), "--gpus-per-trial", str(gpus_per_trial), "--no-register",
            "--tracking-uri", f"sqlite:///{folder}/mlflow.db"] + ([f"--{shrink}"] if shrink else [])
    start = time.perf_counter()
    rc = sweep_main(argv)
    result = {"space": space, "gpus_per_trial": gpus_per_trial, "rc": rc,
              **sweep_summary(pd.read_parquet(folder / "results.parquet"), time.perf_counter() - start)}
    write_json(out, result)
    return result


def sweep_summary(df, wall_s: float) -> dict:
    """Trials, completed ones, completed trials/hour over ``wall_s`` and the mean trial time of a sweep's
    results frame (``results.parquet``)."""
    ok = int((df["status"] == "ok").sum())
    return {"trials": len(df), "ok": ok, "wall_s": wall_s, "trials_per_hour": 3600 * ok / wall_s,
            "mean_trial_s": float(df["time_s"].mean()) if "time_s" in df else None,
            "hist_kl": [float(x) for x in df["hist_kl"]] if "hist_kl" in df else []}


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("env")
    e.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    s = sub.add_parser("step2d")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    s.add_argument("--presets", default="sintro,mog-ip-lc", help="8gaussians configurations; ratios to the first")
    s.add_argument("--batches", default="512,8192")
    s.add_argument("--iterations", type=int, default=50, help="steps per round")
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--warmup", type=int, default=10)
    for name in ("trial", "share2d", "sweep"):
        t = sub.add_parser(name)
        t.add_argument("space", help="tune_spaces/*.yaml")
        if name != "sweep":
            t.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
            t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="config override on top of every variant (repeatable)")
        t.add_argument("--shrink", choices=["smoke", "quick", "full"], help="default: the space's smoke: flag")
    sub.choices["trial"].add_argument("--variant", type=int, required=True)
    sub.choices["trial"].add_argument("--threads", type=int, default=1)
    sub.choices["share2d"].add_argument("--trials", type=int, help="the first N variants (default: all)")
    sw = sub.choices["sweep"]
    sw.add_argument("--gpus-per-trial", type=float, default=0.0)
    sw.add_argument("--work", required=True, help="the sweep's --output-dir (must be new)")
    for sp in sub.choices.values():
        sp.add_argument("--json", required=True, metavar="PATH", help="where the result goes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `service` importable from any folder
    if args.what == "env":
        write_json(args.json, env_info(args.device))
    elif args.what == "step2d":
        step2d(args.device, args.presets.split(","), [int(b) for b in args.batches.split(",")], args.iterations,
               args.rounds, args.warmup, args.json)
    elif args.what == "trial":
        trial(args.space, args.variant, args.device, args.threads, args.shrink, args.overrides, args.json)
    elif args.what == "share2d":
        share2d(args.space, args.device, args.trials, args.shrink, args.overrides, args.json)
    else:
        sweep(args.space, args.gpus_per_trial, args.work, args.shrink, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
