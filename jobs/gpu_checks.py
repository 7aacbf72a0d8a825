"""GPU checks in one command: the image step's speed switches, the 2D step, and 2D trials sharing a GPU.

    python -m jobs.gpu_checks --out runs/gpu_checks                  # on a machine with a GPU
    python3 -m jobs.gpu_checks --out $OUT --budget-s 540             # the single command on a lent device
    python -m jobs.gpu_checks --out /tmp/gc --dry-run                # the orchestration on CPU, tiny sizes

Every step is a process of its own (``jobs.bench_images`` or ``jobs.gpu_steps``) with its own timeout,
cut to what is left of ``--budget-s``: a step that hangs is killed with its whole process group and
the next one runs; a step that no longer fits is skipped. After every step ``--out`` gets

- ``gpu_checks.json``: the machine, and per step its status (ok / failed / timeout / skipped), wall
  time, the end of its output and its result;
- ``gpu_checks.md``: the same as tables, dated, with the device name and the torch / CUDA versions;
- ``gpu_checks.log``: every step's full output.

Steps, cheapest and most wanted first: ``env``; ``step2d`` (the adversarial step of 8gaussians SG and
IP + LC at batch 512 and 8,192); ``images-*`` (``jobs.bench_images`` on fmnist and cifar10,
``mog10-ip-lc``, 1 worker: baseline, then ``--channels-last``, ``--amp-bf16``, ``--compile``, and all
three); ``share2d`` (the 4 trials of ``tune_spaces/gpu_fractional_2d.yaml`` one at a time, then all at
once on the one GPU, no Ray); ``sweep-*`` (the same space through ``jobs.sweep`` with
``--gpus-per-trial 0.25`` and ``1``; skipped where Ray or MLflow is not installed). ``--dry-run`` runs
the same plan on the CPU with tiny sizes (``--compile`` there under ``TORCH_COMPILE_DISABLE=1``, so
the switch is passed but nothing is compiled) to test the orchestration without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACE = "tune_spaces/gpu_fractional_2d.yaml"
RESERVE_S = 5.0  # of the budget, kept for writing the report after the last step
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
TAIL_CHARS = 2_000
IMAGE_SWITCHES = {"baseline": [], "channels_last": ["--channels-last"], "amp_bf16": ["--amp-bf16"],
                  "compile": ["--compile"], "all": ["--channels-last", "--amp-bf16", "--compile"]}
# --dry-run: the share2d trials at the smoke sizes (the space's own sizes are for a GPU)
DRY_TRIAL = ["--shrink", "smoke"] + [a for o in ("schedule.iterations=12", "schedule.warmup=6", "prior.mog_warmup=2",
                                                  "schedule.checkpoint_every=6", "schedule.log_every=2",
                                                  "eval.grid_size=32", "eval.data_points=256",
                                                  "eval.hist_samples=512", "eval.mc_samples=8")
                                     for a in ("--set", o)]


@dataclass
class Step:
    """One measurement: ``python <argv>`` in the repository root, within ``timeout_s``."""

    name: str
    argv: list[str]
    timeout_s: float
    min_s: float = 10.0  # skipped when less than this is left of the budget
    requires: tuple[str, ...] = ()  # importable packages; skipped without them
    result: str | None = None  # the JSON file the step writes
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    status: str  # ok, failed, timeout, skipped
    wall_s: float = 0.0
    timeout_s: float = 0.0
    rc: int | None = None
    note: str = ""
    result: dict | None = None
    tail: str = ""


# --------------------------------------------------------------------------------------------
# Running steps within a budget
# --------------------------------------------------------------------------------------------

def _kill_group(proc: subprocess.Popen) -> None:
    """End the step's process group (the step and everything it started: spawned workers, Ray)."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if wait is not None:
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass


def _read_result(path: str | None) -> dict | None:
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def run_step(step: Step, deadline: float, log_dir: Path) -> Outcome:
    """Run ``step`` until it ends, its timeout or ``deadline`` (``time.monotonic``), whichever is first."""
    missing = [m for m in step.requires if importlib.util.find_spec(m) is None]
    if missing:
        return Outcome(step.name, "skipped", note=f"not installed here: {', '.join(missing)}")
    timeout = min(step.timeout_s, deadline - time.monotonic())
    if timeout < step.min_s:
        return Outcome(step.name, "skipped", note=f"budget: {max(timeout, 0):.0f} s left, needs {step.min_s:.0f} s")
    log = log_dir / f"{step.name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", **step.env}
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *step.argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout)
            status, note = ("ok" if rc == 0 else "failed"), ("" if rc == 0 else f"exit status {rc}")
        except subprocess.TimeoutExpired:
            rc, status, note = None, "timeout", f"killed after {timeout:.0f} s"
        _kill_group(proc)  # also whatever a finished step left behind
    text = log.read_text(errors="replace")
    return Outcome(step.name, status, time.monotonic() - start, timeout, rc, note, _read_result(step.result),
                   text[-TAIL_CHARS:])


def run_all(steps: list[Step], out: Path, budget_s: float, header: dict, work: Path) -> dict:
    """Run the steps in order within ``budget_s``; rewrite the report after every step; return it."""
    deadline = time.monotonic() + budget_s - RESERVE_S
    start = time.monotonic()
    report = {**header, "budget_s": budget_s, "steps": []}
    for step in steps:
        print(f"gpu_checks: {step.name} ...", file=sys.stderr, flush=True)
        outcome = run_step(step, deadline, work)
        print(f"gpu_checks: {step.name} {outcome.status} in {outcome.wall_s:.1f} s {outcome.note}".rstrip(),
              file=sys.stderr, flush=True)
        if step.name == "env" and outcome.result:
            report["machine"] = outcome.result
        report["steps"].append(asdict(outcome))
        report["wall_s"] = time.monotonic() - start
        write_report(report, out, work)
    return report


def write_report(report: dict, out: Path, work: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "gpu_checks.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out / "gpu_checks.json")
    (out / "gpu_checks.md").write_text(render_markdown(report))
    with open(out / "gpu_checks.log", "w") as log:
        for s in report["steps"]:
            path = work / f"{s['name']}.log"
            log.write(f"===== {s['name']}: {s['status']} {s['note']}\n")
            log.write(path.read_text(errors="replace") if path.exists() else "(not run)\n")


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

def plan(work: Path, *, dry_run: bool = False) -> list[Step]:
    """The steps, cheapest and most wanted first (a tight budget drops the last ones).

    ``dry_run``: the CPU, tiny sizes, and 3x the timeouts (CPUs are slow at even tiny sizes)."""
    device, slow = ("cpu", 3.0) if dry_run else ("cuda", 1.0)
    j = lambda name: str(work / f"{name}.json")  # noqa: E731

    def step(name: str, argv: list[str], timeout_s: float, min_s: float, requires: tuple[str, ...] = (),
             env: dict[str, str] | None = None) -> Step:
        return Step(name, [*argv, "--json", j(name)], slow * timeout_s, min_s, requires, j(name), env or {})

    sizes = (["--batches", "64,256", "--iterations", "2", "--rounds", "1", "--warmup", "1"] if dry_run else
             ["--batches", "512,8192", "--iterations", "50", "--rounds", "3", "--warmup", "10"])
    images = (["--datasets", "fmnist", "--iterations", "1", "--warmup", "1", "--threads", "1", "--batch", "8"]
              if dry_run else ["--datasets", "fmnist,cifar10", "--iterations", "30", "--warmup", "3", "--threads", "4"])

    def image_step(name: str) -> Step:
        switches = IMAGE_SWITCHES[name]
        compiles = "--compile" in switches
        return step(f"images-{name}", ["-m", "jobs.bench_images", "--device", device, "--workers", "1",
                                       "--config", "mog10-ip-lc", *images, *switches],
                    240 if compiles else 120, 45 if compiles else 30,
                    env={"TORCH_COMPILE_DISABLE": "1"} if dry_run and compiles else None)

    share = ["--trials", "2", *DRY_TRIAL] if dry_run else []
    space = "tune_spaces/smoke_seeds.yaml" if dry_run else SPACE  # the GPU space's trials are too long for CPUs
    return [
        step("env", ["-m", "jobs.gpu_steps", "env", "--device", device], 60, 5),
        step("step2d", ["-m", "jobs.gpu_steps", "step2d", "--device", device, *sizes], 150, 20),
        image_step("baseline"), image_step("channels_last"), image_step("amp_bf16"),
        step("share2d", ["-m", "jobs.gpu_steps", "share2d", SPACE, "--device", device, *share], 240, 40),
        image_step("compile"), image_step("all"),
        *(step(f"sweep-{name}", ["-m", "jobs.gpu_steps", "sweep", space, "--work", str(work / f"sweep-{name}"),
                                 "--gpus-per-trial", str(0.0 if dry_run else gpus)], 300, 60, ("ray", "mlflow"))
          for name, gpus in (("fractional", 0.25), ("whole", 1.0))),
    ]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def _results(report: dict) -> dict[str, dict]:
    return {s["name"]: s["result"] for s in report["steps"] if s.get("result")}


def _images_table(results: dict[str, dict]) -> list[str]:
    runs = {n: results.get(f"images-{n}") for n in IMAGE_SWITCHES}
    base = runs["baseline"]
    if not any(runs.values()):
        return ["not measured"]
    keys = []
    for r in runs.values():
        for row in (r or {}).get("rows", []):
            if (row["dataset"], row["phase"]) not in keys:
                keys.append((row["dataset"], row["phase"]))
    lookup = {n: {(row["dataset"], row["phase"]): row["images_per_s_per_worker"] for row in (r or {}).get("rows", [])}
              for n, r in runs.items()}
    lines = ["| dataset | phase | " + " | ".join(IMAGE_SWITCHES) + " |", "| --- | --- |" + " ---: |" * len(runs)]
    for key in keys:
        cells = []
        for n in IMAGE_SWITCHES:
            v, b = lookup[n].get(key), lookup["baseline"].get(key)
            cells.append("—" if v is None else f"{v:,.0f}" + (f" ({v / b:.2f}x)" if b and n != "baseline" else ""))
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    if base:
        lines.append(f"\nimages/s per GPU (1 worker), preset `*/{base['config']}`, {base['iterations']} timed steps "
                     f"per phase after {base['warmup']}; in brackets: against the baseline.")
    return lines


def _step2d_table(result: dict | None) -> list[str]:
    if not result or not result.get("rows"):
        return ["not measured"]
    lines = ["| preset | batch | it/s | ms/it | points/s | time vs sintro |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        ratio = next((v for k, v in r.items() if k.startswith("time_vs_")), None)
        lines.append(f"| {r['preset']} | {r['batch']:,} | {r['it_per_s']:,.1f} | {r['ms_per_it']:.2f} | "
                     f"{r['points_per_s']:,.0f} | {ratio:.2f} |")
    lines.append(f"\nmedian of {result['rounds']} alternating rounds of {result['iterations']} steps "
                 f"(8gaussians, adversarial step, model and noise on {result['device']}).")
    return lines


def _sharing_table(results: dict[str, dict]) -> list[str]:
    lines = ["| how | trials | at once | wall s | trials/hour | mean trial s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    share = results.get("share2d")
    for m in (share or {}).get("modes", []):
        lines.append(f"| processes, no Ray | {share['trials']} | {m['concurrent']} | {m['wall_s']:.1f} | "
                     f"{m['trials_per_hour']:,.0f} | {m['mean_trial_s']:.1f} |")
    sweeps = [results[n] for n in ("sweep-fractional", "sweep-whole") if results.get(n)]
    for r in sweeps:
        gpus = r["gpus_per_trial"]
        at_once = min(r["trials"], int(1 / gpus + 1e-9)) if 0 < gpus <= 1 else "CPUs"
        lines.append(f"| jobs.sweep --gpus-per-trial {gpus:g} (Ray start included) | {r['trials']} | {at_once} | "
                     f"{r['wall_s']:.1f} | {r['trials_per_hour']:,.0f} | {r['mean_trial_s'] or float('nan'):.1f} |")
    if len(lines) == 2:
        return ["not measured"]
    if share and "speedup" in share:
        lines.append(f"\n{share['trials']} trials at once finished {share['speedup']:.2f}x sooner than one at a time "
                     f"({share['threads_per_trial']} torch threads per trial both ways).")
    if len(sweeps) == 2:
        lines.append(f"\nThrough Ray Tune: {sweeps[0]['trials_per_hour'] / sweeps[1]['trials_per_hour']:.2f}x the "
                     f"trials/hour with --gpus-per-trial {sweeps[0]['gpus_per_trial']:g} against "
                     f"{sweeps[1]['gpus_per_trial']:g}.")
    return lines


def render_markdown(report: dict) -> str:
    m = report.get("machine") or {}
    results = _results(report)
    lines = [f"# GPU checks, {report['date']}", "",
             f"device: {m.get('device_name', 'unknown')}"
             + (f" ({m['memory_gib']} GiB, compute capability {m['capability']})" if "memory_gib" in m else "")
             + f"; torch {m.get('torch', '?')}, CUDA {m.get('cuda') or 'none'}, {m.get('cpus', '?')} CPUs, "
               f"Python {m.get('python', '?')}" + ("; **dry run on the CPU, tiny sizes: not figures**"
                                                  if report.get("dry_run") else ""),
             f"command: `{report['command']}` (budget {report['budget_s']:.0f} s, "
             f"took {report.get('wall_s', 0):.0f} s)",
             "", "## Image step (images/s per GPU)", "", *_images_table(results),
             "", "## 2D step", "", *_step2d_table(results.get("step2d")),
             "", f"## 2D trials sharing one GPU (`{SPACE}`)", "", *_sharing_table(results),
             "", "## Steps", "", "| step | status | wall s | timeout s | note |", "| --- | --- | ---: | ---: | --- |"]
    for s in report["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['wall_s']:.1f} | {s['timeout_s']:.0f} | {s['note']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_checks.json, gpu_checks.md, gpu_checks.log")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole run ends within this many seconds")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: test the orchestration without a GPU")
    p.add_argument("--only", help="comma-separated step names (default: all; see the module docstring)")
    args = p.parse_args(argv)
    if args.budget_s <= RESERVE_S:
        p.error(f"--budget-s: {args.budget_s:g} is too small; allowed > {RESERVE_S:g}")
    with tempfile.TemporaryDirectory(prefix="gpu_checks-") as tmp:
        work = Path(tmp)
        steps = plan(work, dry_run=args.dry_run)
        if args.only:
            names = args.only.split(",")
            unknown = sorted(set(names) - {s.name for s in steps})
            if unknown:
                p.error(f"--only: {unknown} unknown; allowed {[s.name for s in steps]}")
            steps = [s for s in steps if s.name in names]
        header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "command": "python -m jobs.gpu_checks " + " ".join(sys.argv[1:] if argv is None else argv),
                  "dry_run": args.dry_run}
        report = run_all(steps, Path(args.out), args.budget_s, header, work)
    print(f"gpu_checks: {Path(args.out) / 'gpu_checks.md'}", file=sys.stderr)
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["steps"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
