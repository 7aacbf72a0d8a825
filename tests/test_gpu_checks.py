"""jobs.gpu_checks without a GPU: steps are real processes; timeouts, the budget and the report files.

The measurements themselves need a GPU (docs/gpu.md); here the steps are small Python programs, plus
one real ``env`` step of the dry run.
"""

from __future__ import annotations

import json
import time

import pytest

from jobs import gpu_checks
from jobs.gpu_checks import IMAGE_SWITCHES, RESERVE_S, Step, main, plan, render_markdown, run_all, run_step


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _py(code: str) -> list[str]:
    return ["-c", code]


def test_a_step_past_its_timeout_is_killed_with_every_process_it_started(tmp_path):
    pidfile = tmp_path / "child.pid"
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
            "print('started', flush=True)\n"
            "time.sleep(120)\n")
    step = Step("hang", _py(code), timeout_s=3, min_s=0)
    out = run_step(step, time.monotonic() + 600, tmp_path)
    assert (out.status, out.rc, out.timeout_s) == ("timeout", None, 3)
    assert "killed after 3 s" in out.note and "started" in out.tail
    child = int(pidfile.read_text())
    for _ in range(100):  # the group got SIGTERM; the orphaned child is reaped by init
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)


def test_the_budget_cuts_a_step_short_and_skips_what_no_longer_fits(tmp_path):
    steps = [Step("first", _py("import time; time.sleep(120)"), timeout_s=600, min_s=0),
             Step("second", _py("print('never')"), timeout_s=600, min_s=30)]
    report = run_all(steps, tmp_path / "out", RESERVE_S + 2, {"date": "d", "command": "c", "dry_run": True},
                     tmp_path)
    first, second = report["steps"]
    assert first["status"] == "timeout" and first["timeout_s"] <= 2
    assert second["status"] == "skipped" and second["note"].startswith("budget:") and "needs 30 s" in second["note"]
    saved = json.loads((tmp_path / "out" / "gpu_checks.json").read_text())
    assert [s["status"] for s in saved["steps"]] == ["timeout", "skipped"]
    md = (tmp_path / "out" / "gpu_checks.md").read_text()
    assert "| first | timeout |" in md and "| second | skipped |" in md
    assert "===== second: skipped" in (tmp_path / "out" / "gpu_checks.log").read_text()


def test_results_failures_and_missing_packages_are_recorded(tmp_path):
    result = tmp_path / "r.json"
    ok = Step("ok", _py(f"import json; json.dump({{'x': 1}}, open({str(result)!r}, 'w'))"), 60, 0, result=str(result))
    bad = Step("bad", _py("import sys; print('boom'); sys.exit(3)"), 60, 0)
    missing = Step("needs", _py("pass"), 60, 0, requires=("no_such_package_xyz",))
    deadline = time.monotonic() + 600
    outs = [run_step(s, deadline, tmp_path) for s in (ok, bad, missing)]
    assert (outs[0].status, outs[0].rc, outs[0].result) == ("ok", 0, {"x": 1})
    assert (outs[1].status, outs[1].rc, outs[1].note) == ("failed", 3, "exit status 3") and "boom" in outs[1].tail
    assert outs[2].status == "skipped" and outs[2].note == "not installed here: no_such_package_xyz"


def test_the_plan_measures_each_image_switch_and_the_2d_steps_on_cuda(tmp_path):
    steps = {s.name: s for s in plan(tmp_path)}
    assert list(steps)[:2] == ["env", "step2d"]
    for name, switches in IMAGE_SWITCHES.items():
        argv = steps[f"images-{name}"].argv
        assert argv[:2] == ["-m", "jobs.bench_images"] and "--json" in argv
        assert [a for a in argv if a in ("--channels-last", "--amp-bf16", "--compile")] == switches
        assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--datasets") + 1] == "fmnist,cifar10"
    assert "--batches" in steps["step2d"].argv and "512,8192" in steps["step2d"].argv
    assert gpu_checks.SPACE in steps["share2d"].argv and steps["sweep-fractional"].requires == ("ray", "mlflow")
    assert "0.25" in steps["sweep-fractional"].argv and "1.0" in steps["sweep-whole"].argv
    dry = {s.name: s for s in plan(tmp_path, dry_run=True)}
    assert all("cuda" not in s.argv for s in dry.values())
    assert dry["images-compile"].env == {"TORCH_COMPILE_DISABLE": "1"} and "--compile" in dry["images-compile"].argv


def test_markdown_tables_show_speedups_against_the_baseline():
    def images(rate):
        return {"config": "mog10-ip-lc", "iterations": 30, "warmup": 3,
                "rows": [{"dataset": "fmnist", "phase": "adversarial step", "images_per_s_per_worker": rate}]}

    steps = [{"name": "env", "status": "ok", "wall_s": 1.0, "timeout_s": 60, "note": "", "result": None},
             {"name": "images-baseline", "status": "ok", "wall_s": 1.0, "timeout_s": 60, "note": "",
              "result": images(1000.0)},
             {"name": "images-amp_bf16", "status": "ok", "wall_s": 1.0, "timeout_s": 60, "note": "",
              "result": images(2500.0)},
             {"name": "step2d", "status": "ok", "wall_s": 1.0, "timeout_s": 60, "note": "",
              "result": {"device": "cuda", "rounds": 3, "iterations": 50, "rows": [
                  {"preset": "sintro", "batch": 512, "it_per_s": 200.0, "ms_per_it": 5.0, "points_per_s": 102400.0,
                   "time_vs_sintro": 1.0},
                  {"preset": "mog-ip-lc", "batch": 512, "it_per_s": 100.0, "ms_per_it": 10.0, "points_per_s": 51200.0,
                   "time_vs_sintro": 2.0}]}},
             {"name": "share2d", "status": "ok", "wall_s": 1.0, "timeout_s": 60, "note": "",
              "result": {"trials": 4, "threads_per_trial": 4, "speedup": 2.5, "modes": [
                  {"concurrent": 1, "wall_s": 100.0, "trials_per_hour": 144.0, "mean_trial_s": 25.0},
                  {"concurrent": 4, "wall_s": 40.0, "trials_per_hour": 360.0, "mean_trial_s": 38.0}]}},
             *({"name": f"sweep-{n}", "status": "ok", "wall_s": 1.0, "timeout_s": 60, "note": "",
                "result": {"gpus_per_trial": g, "trials": 4, "wall_s": w, "trials_per_hour": 14400 / w,
                           "mean_trial_s": 20.0}} for n, g, w in (("fractional", 0.25, 60.0), ("whole", 1.0, 120.0)))]
    report = {"date": "2027-01-01 00:00 UTC", "command": "python -m jobs.gpu_checks --out x", "budget_s": 540,
              "wall_s": 300, "steps": steps,
              "machine": {"device_name": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "cpus": 16,
                          "python": "3.12"}}
    md = render_markdown(report)
    assert "# GPU checks, 2027-01-01 00:00 UTC" in md and "device: NVIDIA H200" in md and "CUDA 13.0" in md
    assert "| fmnist | adversarial step | 1,000 | — | 2,500 (2.50x) | — | — |" in md
    assert "| mog-ip-lc | 512 | 100.0 | 10.00 | 51,200 | 2.00 |" in md
    assert "| processes, no Ray | 4 | 4 | 40.0 | 360 | 38.0 |" in md and "2.50x sooner" in md
    assert "| jobs.sweep --gpus-per-trial 0.25 (Ray start included) | 4 | 4 | 60.0 | 240 | 20.0 |" in md
    assert "| jobs.sweep --gpus-per-trial 1 (Ray start included) | 4 | 1 | 120.0 | 120 | 20.0 |" in md
    assert "2.00x the trials/hour with --gpus-per-trial 0.25 against 1" in md


def test_sweep_summary_counts_completed_trials_per_hour():
    pd = pytest.importorskip("pandas")
    from jobs.gpu_steps import sweep_summary

    df = pd.DataFrame({"status": ["ok", "ok", "ok", "failed"], "time_s": [10.0, 20.0, 30.0, 40.0],
                       "hist_kl": [1.0, 2.0, 3.0, float("nan")]})
    summary = sweep_summary(df, 120.0)
    assert (summary["trials"], summary["ok"], summary["trials_per_hour"], summary["mean_trial_s"]) == (4, 3, 90.0, 25.0)


def test_dry_run_cli_runs_a_real_step_and_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    assert main(["--out", str(out), "--dry-run", "--only", "env", "--budget-s", "300"]) == 0
    report = json.loads((out / "gpu_checks.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["ok"] and report["dry_run"] is True
    assert report["machine"]["device_name"] == "cpu" and report["machine"]["torch"]
    md = (out / "gpu_checks.md").read_text()
    assert "dry run on the CPU" in md and "| env | ok |" in md


def test_bad_arguments_fail_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--only", "env,nope"])
    assert "--only: ['nope'] unknown" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--budget-s", "1"])
    assert "--budget-s: 1 is too small" in capsys.readouterr().err
