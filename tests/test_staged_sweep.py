"""The staged protocol without Ray: selection between stages, failure classes, the trial's retries,
intermediate evaluations forwarded to Tune, results rows, the output-folder lock and the
selection comparison. The sweep itself runs end to end in test_e2e_sweep_staged.py.
"""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from jobs import compare_selection
from jobs import sweep as sweep_job
from service.selection import INFEASIBLE, SCORE_KEY, Selection, constrained_frame, pick_candidates, rank_settings
from service.config import apply_overrides
from service.spaces import Scheduler, Stage, Variant, spec_from_dict, stage_variants
from service.step import TrainingDiverged
from service.sweep_lock import SweepLock, SweepLocked
from service.sweep_trial import _trial, _TrialContext, failure_kind, new_evaluations, trial_config
from service.sweep_resources import plan_resources
from service.sweep_report import results_frame
from service.tuning import _scheduler, _stage_plan

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


# ---- selection between stages ---------------------------------------------------------------

def _rows(*rows):
    """rows: (preset, beta_kl, seed, status, hist_kl, mode_purity)."""
    out = []
    for i, (preset, kl, seed, status, hist_kl, purity) in enumerate(rows):
        hp = json.dumps({"objective.beta_kl": kl}, sort_keys=True)
        out.append({"variant": i, "stage": 1, "stage_name": "coarse", "preset": preset, "seed": seed,
                    "hparams": hp, "params": hp, "status": status, "hist_kl": hist_kl, "mode_purity": purity})
    return pd.DataFrame(out)


A, B = "8gaussians/mog-ip-lc", "8gaussians/mog-fixed-lc"


def test_rank_settings_ranks_by_mean_over_completed_seeds_per_preset():
    df = _rows((A, 0.1, 0, "ok", 3.0, 0.9), (A, 0.1, 1, "ok", 5.0, 0.9),  # mean 4.0
               (A, 0.3, 0, "ok", 3.5, 0.5), (A, 0.3, 1, "failed", math.nan, math.nan),  # mean 3.5 (one seed)
               (A, 0.5, 0, "stopped", 1.0, 1.0),  # stopped early: not a candidate
               (B, 0.1, 0, "ok", 7.0, 1.0))
    ranked = rank_settings(df, Selection())
    mine = ranked[ranked["preset"] == A]
    assert [json.loads(h)["objective.beta_kl"] for h in mine["hparams"]] == [0.3, 0.1]
    assert list(mine["score"]) == [3.5, 4.0] and list(mine["rank"]) == [1, 2]
    assert list(mine["seeds"]) == [[0], [0, 1]]
    assert ranked[ranked["preset"] == B]["rank"].tolist() == [1]
    assert rank_settings(df, Selection(mode="max"))["hparams"].iloc[0] == mine["hparams"].iloc[1]


def test_champion_seed_meets_the_bounds_before_the_metric():
    # three seeds of one setting: seed 1 has the lowest KL but lost a mode; seed 2 kept all 8
    df = _rows((A, 0.05, 0, "ok", 30.0, 0.99), (A, 0.05, 1, "ok", 12.0, 1.0), (A, 0.05, 2, "ok", 20.0, 0.98))
    df["modes_covered"] = [7.0, 6.0, 8.0]
    bounded = Selection(where=(("modes_covered", 8.0, None), ("mode_purity", 0.9, None)))
    assert sweep_job.champion_trial(df, bounded)["seed"] == 2
    assert "_meets_bounds" not in sweep_job.champion_trial(df, bounded).index
    assert sweep_job.champion_trial(df, Selection())["seed"] == 1  # no bounds: the metric alone
    nobody = Selection(where=(("modes_covered", 9.0, None),))  # no seed meets it: still the best by the metric
    assert sweep_job.champion_trial(df, nobody)["seed"] == 1
    assert sweep_job.champion_trial(df, Selection(mode="max"))["seed"] == 0


def test_pick_candidates_takes_top_k_per_preset_and_honours_the_constraint():
    df = _rows((A, 0.1, 0, "ok", 3.0, 0.95), (A, 0.3, 0, "ok", 2.0, 0.5), (A, 0.5, 0, "ok", 4.0, 0.92),
               (B, 0.1, 0, "ok", 7.0, 0.4), (B, 0.3, 0, "ok", 6.0, 0.3))
    picks, notes = pick_candidates(df, Selection(), 2)
    assert [(p["preset"], json.loads(p["params"])["objective.beta_kl"]) for p in picks] == [
        (A, 0.3), (A, 0.1), (B, 0.3), (B, 0.1)]
    assert notes == []
    where = Selection(where=(("mode_purity", 0.9, None),))
    picks, notes = pick_candidates(df, where, 1)
    # A: lowest KL among purity >= 0.9 is beta_kl 0.1 (KL 3.0), not the unconstrained 0.3 (KL 2.0)
    assert [(p["preset"], json.loads(p["params"])["objective.beta_kl"], p["constrained"]) for p in picks] == [
        (A, 0.1, True), (B, 0.3, False)]
    # B: nobody reaches 0.9: said so, and the unconstrained pick is used
    assert len(notes) == 1
    assert notes[0].startswith(f"{B}: no setting satisfies mode_purity >= 0.9 (best mode_purity 0.4)")
    assert "falling back to the unconstrained pick by hist_kl" in notes[0]


def test_constraint_without_the_metric_falls_back_and_constrained_frame_drops_violators():
    df = _rows((A, 0.1, 0, "ok", 3.0, math.nan), (A, 0.3, 0, "ok", 2.0, math.nan))
    picks, notes = pick_candidates(df, Selection(where=(("mode_purity", 0.9, None),)), 1)
    assert json.loads(picks[0]["params"])["objective.beta_kl"] == 0.3 and "not reported" in notes[0]
    df = _rows((A, 0.1, 0, "ok", 3.0, 0.95), (A, 0.3, 0, "ok", 2.0, 0.5), (A, 0.3, 1, "failed", math.nan, math.nan),
               (B, 0.1, 0, "ok", 7.0, 0.4))
    kept = constrained_frame(df, Selection(where=(("mode_purity", 0.9, None),)))
    assert list(kept["variant"]) == [0, 2, 3]  # A's violating completed trial goes; failures and B stay


def test_stage_variants_carry_the_setting_and_take_the_stage_seeds():
    picks = [{"preset": A, "hparams": json.dumps({"objective.beta_kl": 0.1, "objective.beta_neg": 0.3}),
              "params": json.dumps({"objective.beta_kl": 0.1, "objective.beta_neg_factor": 3}), "seeds": [0],
              "score": 1.0, "rank": 1}]
    vs = stage_variants(picks, (0, 1, 2))
    assert [v.id for v in vs] == [0, 1, 2] and [v.overrides["seed"] for v in vs] == [0, 1, 2]
    assert vs[1].overrides["objective.beta_neg"] == 0.3 and vs[1].params["objective.beta_neg_factor"] == 3
    assert [v.overrides["seed"] for v in stage_variants(picks, None)] == [0]


def test_trial_config_takes_a_checkpoint_at_every_evaluation():
    v = Variant(0, A, {}, {"schedule.eval_every": 4})
    assert trial_config(v, "smoke").schedule.checkpoint_every == 2  # gcd(6, 4)
    assert trial_config(v, "quick", {"schedule.eval_every": 1000}).schedule.checkpoint_every == 1000
    assert trial_config(Variant(0, A, {}, {}), "smoke").schedule.checkpoint_every == 6  # no evaluation: unchanged


def test_constrained_selection_ranks_reports_for_the_scheduler_feasible_first():
    sel = Selection("hist_kl", "min", (("mode_purity", 0.9, None),))
    assert sel.scheduler_metric == SCORE_KEY and Selection().scheduler_metric == "hist_kl"
    pure_sharp, blurry = {"hist_kl": 160.0, "mode_purity": 0.97}, {"hist_kl": 50.0, "mode_purity": 0.65}
    assert sel.score(pure_sharp) == 160.0
    assert sel.score(blurry) == 50.0 + INFEASIBLE > sel.score(pure_sharp)  # ASHA stops the blurry one first
    assert sel.score({"hist_kl": 40.0}) == 40.0 + INFEASIBLE  # purity not reported: not known to satisfy
    assert math.isnan(sel.score({"mode_purity": 1.0}))  # no metric, nothing to rank
    # among infeasible reports the metric still orders them (the selection's unconstrained fallback)
    assert sel.score({"hist_kl": 60.0, "mode_purity": 0.5}) > sel.score(blurry)
    best = Selection("gnelbo_x1e7", "max", (("hist_kl", None, 20.0),))
    assert best.score({"gnelbo_x1e7": 3.0, "hist_kl": 30.0}) == 3.0 - INFEASIBLE < best.score({"gnelbo_x1e7": 1.0,
                                                                                                "hist_kl": 10.0})


def test_asha_ranks_by_the_constrained_score_and_every_report_carries_it(trial_env):
    spec = spec_from_dict({"preset": A, "select": {"metric": "hist_kl", "where": {"mode_purity": {"min": 0.9}}},
                           "param_space": {"schedule": {"iterations": 3000, "warmup": 1000, "eval_every": 1000}},
                           "scheduler": {"type": "asha", "grace_period": 2000}}, "t.yaml")
    stage = spec.plan("full")[0][0]
    assert _scheduler(stage, spec, spec.configs("full"))._metric == SCORE_KEY
    plain = spec_from_dict({"preset": A, "param_space": {"schedule": {"iterations": 3000, "warmup": 1000, "eval_every": 1000}},
                            "scheduler": {"type": "asha"}}, "t.yaml")
    assert _scheduler(plain.plan("full")[0][0], plain, plain.configs("full"))._metric == "hist_kl"
    # no grace_period: the first evaluation after the 1,000-iteration warm-up is ASHA's first rung
    rungs = _scheduler(plain.plan("full")[0][0], plain, plain.configs("full"))._brackets[0]._rungs
    assert min(milestone for milestone, _ in rungs) == 2000

    ctx, reports = trial_env
    ctx = dataclasses.replace(ctx, select=spec.select)
    _trial({"variant": 0}, ctx, fit=lambda cfg, **kw: {"iteration": 40, "output_dir": "x",
                                                       "metrics": {"hist_kl": 7.0, "mode_purity": 0.5}})
    assert reports[-1][SCORE_KEY] == 7.0 + INFEASIBLE


# ---- failures: diverged is final, infrastructure is retried ---------------------------------------

def _worker_group_error(err):
    from ray.train import WorkerGroupError

    return WorkerGroupError("worker failed", {0: err})


def test_failure_kind_tells_diverged_from_lost_workers_and_other_errors():
    from ray.exceptions import ActorDiedError, ActorUnschedulableError, NodeDiedError
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    diverged = TrainingDiverged("loss_vae is nan at iteration 3")
    assert failure_kind(_worker_group_error(diverged)) == "diverged"
    assert failure_kind(ControllerError(diverged)) == "diverged"  # a fail-fast callback re-raises it
    lost = WorkerHealthCheckFailedError("worker died", ActorDiedError())
    assert failure_kind(_worker_group_error(lost)) == "infrastructure"
    assert failure_kind(ActorDiedError()) == "infrastructure"  # the Train controller itself
    assert failure_kind(NodeDiedError("node 1 died")) == "infrastructure"
    # seen on an overloaded machine: Ray could not start the Train workers
    assert failure_kind(ControllerError(ActorUnschedulableError("worker startup repeatedly failed"))) == \
        "infrastructure"
    assert failure_kind(_worker_group_error(ValueError("a bug"))) == "error"
    from ray.train import WorkerGroupError

    both = WorkerGroupError("two ranks failed", {0: diverged, 1: lost})
    assert failure_kind(both) == "diverged"  # one rank diverged; the other's death is collateral


@pytest.fixture
def trial_env(tmp_path, monkeypatch):
    """``_trial`` without Ray: a real MLflow SQLite store, ``tune.report`` captured."""
    import ray.tune

    from service import sweep_trial

    from ray.tune.integration.ray_train import TuneReportCallback

    reports = []
    monkeypatch.setattr(ray.tune, "report", lambda row: reports.append(row))
    # outside Tune the Train callback has no Tune session's queue to put its rows in: a sink
    monkeypatch.setattr(TuneReportCallback, "__init__",
                        lambda self: setattr(self, "_training_actor_item_queue", SimpleNamespace(put=lambda row: None)))
    monkeypatch.setattr(sweep_trial, "RETRY_WAIT_S", 0.0)
    ctx = _TrialContext(output_dir=str(tmp_path), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                        parent_run_id="", sweep_name="t", shrink="smoke", varying=(), cpus_per_worker=1,
                        threads_per_worker=1, gpus_per_worker=0, variants=({"id": 0, "preset": A, "params": {},
                                                                            "overrides": {}},))
    return ctx, reports


def test_trial_retries_infrastructure_failures_and_never_a_diverged_run(trial_env):
    from ray.exceptions import ActorDiedError

    ctx, reports = trial_env
    calls = []

    def flaky(cfg, **kw):
        calls.append(kw["run_name"])
        if len(calls) == 1:
            raise ActorDiedError()  # a lost worker: fit again resumes from the last checkpoint
        return {"iteration": 12, "output_dir": "x", "metrics": {"hist_kl": 1.5}}

    _trial({"variant": 0}, ctx, fit=flaky)
    assert calls == ["t-v0000", "t-v0000"]  # same Ray Train run name: it resumes
    assert reports[-1]["status"] == "ok" and reports[-1]["attempts"] == 2 and reports[-1]["hist_kl"] == 1.5

    calls.clear()

    def diverges(cfg, **kw):
        calls.append(1)
        raise _worker_group_error(TrainingDiverged("loss_vae is nan at iteration 3"))

    _trial({"variant": 0}, ctx, fit=diverges)
    assert calls == [1]
    row = reports[-1]
    assert (row["status"], row["failure"], row["attempts"]) == ("failed", "diverged", 1)
    assert math.isnan(row["hist_kl"])  # the scheduler's metric is in every Tune result

    calls.clear()

    def always_lost(cfg, **kw):
        calls.append(1)
        raise ActorDiedError()

    _trial({"variant": 0}, ctx, fit=always_lost)
    assert len(calls) == 1 + ctx.retries and reports[-1]["failure"] == "infrastructure"


def test_a_trial_that_tune_is_stopping_does_not_retry_its_torn_down_run(trial_env, monkeypatch):
    from ray.exceptions import ActorDiedError

    from service import sweep_trial

    ctx, reports = trial_env
    monkeypatch.setattr(sweep_trial, "_tune_is_stopping", lambda: True)  # ASHA said stop; Tune tears the run down
    calls = []

    def torn_down(cfg, **kw):
        calls.append(1)
        raise ActorDiedError()

    _trial({"variant": 0}, ctx, fit=torn_down)
    assert calls == [1] and reports == []  # no retry, no final row: the last evaluation is its result


def test_every_checkpoint_reaches_tune_as_a_progress_row_that_schedulers_skip(trial_env, monkeypatch):
    """The Train callback: at each Train report a progress row (``at_iteration``, the last evaluation's values,
    no ``iteration``: ASHA skips a row without its time attribute), then the evaluations logged since, each
    with ``iteration``; the trial's last row at a checkpoint is its newest evaluation. Without intermediate
    evaluations (a full-schedule stage) the progress rows alone: the console's ``iter`` column moves."""
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler

    from service import sweep_trial

    ctx, _ = trial_env
    forwarded = []  # what reaches the Tune session's queue
    monkeypatch.setattr(TuneReportCallback, "__init__",
                        lambda self: setattr(self, "_training_actor_item_queue", SimpleNamespace(put=forwarded.append)))
    sel = Selection("hist_kl", "min", (("mode_purity", 0.9, None),))
    logged = {1000: [{"iteration": 1000, "hist_kl": 5.0, "mode_purity": 0.5}], 2000: [], 3000: [
        {"iteration": 3000, "hist_kl": 4.0, "mode_purity": 1.0}]}
    monkeypatch.setattr(sweep_trial, "new_evaluations", lambda client, run, after, before: logged[seen[-1]])
    seen = []

    def fit(cfg, callbacks, **kw):  # what the Train controller does at each report
        (forwarder,) = callbacks
        for at in (1000, 2000, 3000):
            seen.append(at)
            forwarder.after_report(None, [{"iteration": at, "final": False, "train/loss_encoder": 0.5}], None)
        forwarder.after_report(None, [{"iteration": 3000, "final": True}], None)  # the trial reports the last
        return {"iteration": 3000, "output_dir": "x", "metrics": {"hist_kl": 4.0, "mode_purity": 1.0}}

    ctx = dataclasses.replace(ctx, select=sel, stage_overrides={"schedule.eval_every": 1000})
    sweep_trial._trial({"variant": 0}, ctx, fit=fit)
    assert [(r.get("at_iteration"), r.get("iteration")) for r in forwarded] == [
        (1000, None), (1000, 1000), (2000, None), (3000, None), (3000, 3000)]
    assert all(r["run_name"] == "t-v0000" and SCORE_KEY in r and "hist_kl" in r for r in forwarded)
    assert math.isnan(forwarded[0]["hist_kl"])  # nothing evaluated yet
    assert forwarded[2]["hist_kl"] == 5.0 and forwarded[2][SCORE_KEY] == 5.0 + INFEASIBLE  # the last evaluation's
    assert forwarded[-1][SCORE_KEY] == 4.0 and "train/loss_encoder" not in forwarded[2]

    asha = ASHAScheduler(time_attr="iteration", metric=SCORE_KEY, mode="min", grace_period=1000, max_t=3000)
    trial = SimpleNamespace(trial_id="t0")
    asha.on_trial_add(None, trial)
    for r in forwarded:
        asha.on_trial_result(None, trial, r)
    rungs = dict(asha._brackets[0]._rungs)
    # ASHA keeps -score for mode "min"; the rung holds the evaluation at 1,000, never a progress row
    assert {m: list(r.values()) for m, r in rungs.items() if r} == {1000: [-(5.0 + INFEASIBLE)]}

    forwarded.clear()
    plain = dataclasses.replace(ctx, stage_overrides={"schedule.eval_every": 0})
    sweep_trial._trial({"variant": 0}, plain, fit=fit)
    assert [(r.get("at_iteration"), r.get("iteration")) for r in forwarded] == [(1000, None), (2000, None), (3000, None)]


def test_new_evaluations_come_from_the_mlflow_history_between_reports():
    history = {"eval/hist_kl": [(1000, 5.0), (2000, 4.0), (5000, 3.0)], "eval/hist_jsd": [(1000, 2.0), (2000, 1.5)],
               "eval/mode_purity": [(2000, 0.9)]}
    client = SimpleNamespace(get_metric_history=lambda run, key: [SimpleNamespace(step=s, value=v)
                                                                  for s, v in history.get(key, [])])
    assert new_evaluations(client, "r", -1, 5000) == [{"iteration": 1000, "hist_kl": 5.0, "hist_jsd": 2.0},
                                                      {"iteration": 2000, "hist_kl": 4.0, "hist_jsd": 1.5,
                                                       "mode_purity": 0.9}]
    assert new_evaluations(client, "r", 1000, 5000) == [{"iteration": 2000, "hist_kl": 4.0, "hist_jsd": 1.5,
                                                         "mode_purity": 0.9}]  # the final evaluation is not one


def test_an_evaluation_logged_while_the_histories_are_read_is_forwarded_whole_or_not_yet():
    """MLflow commits an evaluation's metrics in one batch, but they are read one name at a time: the batch of
    step 2000 lands after hist_kl was read and before decoder_sigma was (seen in a real staged sweep)."""
    from service.sweep_trial import REPORTED

    def client_committing_at(call):
        """Step 2000's batch commits just before history read number ``call`` (counted from 1)."""
        logged = {"eval/hist_kl": [(1000, 5.0)], "eval/decoder_sigma": [(1000, 0.5)]}
        calls = []

        def history(run, key):
            calls.append(key)
            if len(calls) == call:
                logged["eval/hist_kl"].append((2000, 4.0))
                logged["eval/decoder_sigma"].append((2000, 0.4))
            return [SimpleNamespace(step=s, value=v) for s, v in logged.get(key, [])]

        return SimpleNamespace(get_metric_history=history)

    both = [{"iteration": 1000, "hist_kl": 5.0, "decoder_sigma": 0.5},
            {"iteration": 2000, "hist_kl": 4.0, "decoder_sigma": 0.4}]
    sigma_read = 1 + REPORTED.index("decoder_sigma")  # after hist_kl's read
    assert REPORTED.index("hist_kl") < REPORTED.index("decoder_sigma")
    # during the first pass: the step is seen there and read whole in the second
    assert new_evaluations(client_committing_at(sigma_read), "r", -1, 5000) == both
    # during the second pass: not forwarded yet (no partial row), and whole at the next call
    client = client_committing_at(len(REPORTED) + sigma_read)
    assert new_evaluations(client, "r", -1, 5000) == both[:1]
    assert new_evaluations(client, "r", 1000, 5000) == both[1:]


def test_results_frame_has_a_column_per_hyperparameter_and_marks_early_stopped_trials():
    spec = spec_from_dict({"preset": A, "param_space": {"objective": {"beta_kl": {"grid_search": [0.1, 0.3]},
                                                                      "beta_neg_factor": 3}}}, "t.yaml")
    configs = spec.configs("smoke")
    reported = {0: ({"status": "ok", "iteration": 12, "hist_kl": 2.0, "time_s": 5.0}, None, "TERMINATED"),
                1: ({"iteration": 6, "hist_kl": 9.0, "time_total_s": 3.0, "done": True}, None, "TERMINATED")}
    df = results_frame(spec, configs, reported, stage=Stage(1, "sweep", scheduler=Scheduler("asha")))
    assert list(df["objective.beta_kl"]) == [0.1, 0.3] and list(df["objective.beta_neg"]) == [0.3, 0.9]
    assert list(df["objective.beta_neg_factor"]) == [3, 3]
    assert list(df["status"]) == ["ok", "stopped"] and df["error"][1].startswith("stopped early")
    assert list(df["trained_iterations"]) == [12, 6] and list(df["time_s"]) == [5.0, 3.0]
    paused = results_frame(spec, configs, {1: ({"iteration": 6, "hist_kl": 9.0}, None, "PAUSED")})
    assert list(paused["status"]) == ["incomplete", "incomplete"]
    # no scheduler: a TERMINATED trial without a final status was cut off by an interrupted sweep
    cut = results_frame(spec, configs, reported, stage=Stage(1, "sweep", scheduler=None))
    assert list(cut["status"]) == ["ok", "incomplete"] and "resume" in cut["error"][1]
    # with a scheduler, a trial the interrupt cut off (TERMINATED in memory, its last result not ``done``:
    # Tune stores it PENDING) is unfinished, not an early stop that a selection could rank
    interrupted = {**reported, 1: ({"iteration": 6, "hist_kl": 1.0, "done": False}, None, "TERMINATED")}
    cut = results_frame(spec, configs, interrupted, stage=Stage(1, "sweep", scheduler=Scheduler("asha")))
    assert list(cut["status"]) == ["ok", "incomplete"] and "resume" in cut["error"][1]


# ---- one sweep per output folder ---------------------------------------------------------------

def _write_lock(out: Path, pid: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then",
                                                "argv": ["jobs/sweep.py", "x.yaml"]}))


def test_a_second_sweep_on_a_folder_in_use_is_refused_before_ray_starts(tmp_path, capsys):
    import ray

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "out"
        _write_lock(out, live.pid)
        assert sweep_job.main([str(SPACES / "smoke_seeds.yaml"), "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another sweep: pid {live.pid} on {socket.gethostname()}" in err
        assert "use another --output-dir" in err and not ray.is_initialized()
        assert json.loads((out / "sweep.lock").read_text())["pid"] == live.pid  # left alone
    finally:
        live.kill()
        live.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, dead.pid)
    with SweepLock(tmp_path):
        held = json.loads((tmp_path / "sweep.lock").read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(SweepLocked, match=rf"pid {os.getpid()} on"):  # ours is live
            SweepLock(tmp_path).acquire()
    assert "taking over the stale lock" in capsys.readouterr().err
    assert not (tmp_path / "sweep.lock").exists()


def test_a_lock_whose_pid_was_reused_by_another_process_is_stale(tmp_path):
    (tmp_path / "sweep.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                     "process_start": "1"}))  # not our start time
    with SweepLock(tmp_path):
        assert json.loads((tmp_path / "sweep.lock").read_text())["process_start"] != "1"


# ---- agreement of the staged pick with the exhaustive grid ------------------------------------------

def _sweep_dir(path: Path, rows, searched, wall_s, stages=1):
    path.mkdir()
    df = pd.DataFrame(rows)
    df.to_parquet(path / "results.parquet", index=False)
    (path / "sweep.json").write_text(json.dumps({"select": {"metric": "hist_kl", "mode": "min"},
                                                 "searched": searched}))
    (path / "progress.json").write_text(json.dumps({"stages": {f"s{i}": {"wall_s": wall_s / stages}
                                                               for i in range(stages)}}))


def test_compare_selection_reports_agreement_rank_and_cost(tmp_path, capsys):
    def row(i, kl, hist_kl, status="ok", it=100, stage=1):
        p = json.dumps({"eval.plots": False, "objective.beta_kl": kl})
        return {"variant": i, "stage": stage, "preset": A, "seed": 0, "hparams": p, "params": p, "status": status,
                "hist_kl": hist_kl, "trained_iterations": it, "time_s": it / 10}

    _sweep_dir(tmp_path / "grid", [row(0, 0.1, 3.0), row(1, 0.3, 2.0), row(2, 0.5, 4.0)], ["objective.beta_kl"], 600)
    _sweep_dir(tmp_path / "staged", [row(0, 0.1, 3.0), row(1, 0.3, 2.5, "stopped", 20), row(2, 0.5, 4.0, it=100),
                                     row(0, 0.1, 3.1, stage=2)], ["objective.beta_kl"], 300, stages=2)
    result = compare_selection.compare(tmp_path / "grid", tmp_path / "staged")
    (p,) = result["presets"]
    assert p["exhaustive"] == {"objective.beta_kl": 0.3} and p["staged"] == {"objective.beta_kl": 0.1}
    assert (p["same"], p["rank"], p["settings"]) == (False, 2, 3)
    assert result["iterations_ratio"] == pytest.approx(320 / 300) and result["wall_ratio"] == pytest.approx(0.5)
    assert compare_selection.main([str(tmp_path / "grid"), str(tmp_path / "staged")]) == 0
    out = capsys.readouterr().out
    assert "Agreement: 0 of 1 presets." in out and "2 of 3" in out
    assert compare_selection.main([str(tmp_path / "grid"), str(tmp_path / "nowhere")]) == 2


def test_selection_md_calls_a_pick_provisional_while_trials_or_stages_are_unfinished():
    """An interrupted staged sweep still writes selection.md: its pick is marked provisional, saying why."""
    from service.sweep_report import selection_markdown

    spec = spec_from_dict({"preset": A, "param_space": {"objective": {"beta_kl": {"grid_search": [0.1, 0.3]}}},
                           "stages": [{"name": "coarse", "shrink": "smoke"},
                                      {"name": "seeds", "shrink": "smoke", "seeds": [0, 1]}]}, "p.yaml")
    progress = {"stages": {"coarse": {"wall_s": 60.0}}}
    df = _rows((A, 0.1, 0, "ok", 3.0, 0.9), (A, 0.3, 0, "incomplete", math.nan, math.nan))
    df = df.assign(reused_from=None, trained_iterations=[12, 5])
    md = selection_markdown(spec, [df], progress)
    assert "## Selected so far (provisional)" in md
    assert ("- provisional: 1 trial(s) of stage coarse did not finish; stage(s) seeds have not run; run the same "
            "command again to complete the selection") in md
    assert "train it: `python -m jobs.train --preset 8gaussians/mog-ip-lc --set objective.beta_kl=0.1`" in md
    done = df.assign(status="ok", hist_kl=[3.0, 4.0])
    second = done[done["hparams"] == done["hparams"].iloc[0]].assign(stage=2, stage_name="seeds")
    md = selection_markdown(spec, [done, second], {"stages": {"coarse": {}, "seeds": {}}})
    assert "## Selected\n" in md and "provisional" not in md


def test_a_restored_stage_keeps_the_concurrency_it_started_with(tmp_path, capsys):
    """Tune restores a stage with the concurrency it started with, whatever --max-concurrent says now; the
    trials' threads must follow it (2 CPUs: one trial at a time gets 2 threads), not the new value."""
    from service.spaces import load_space

    spec = load_space(SPACES / "smoke_staged.yaml")
    stage = spec.plan(None)[1][0]

    def replan(n):
        return plan_resources(2, 0, 1, n)

    two, one = replan(2), replan(1)
    assert (two.threads_per_worker, one.threads_per_worker) == (1, 2)
    entry = {}
    assert _stage_plan(spec, stage, entry, two, replan, tmp_path) == two  # a new stage records its own
    assert entry["max_concurrent"] == 2
    tuner_state = tmp_path / "tune" / f"stage{stage.index}-{stage.name}" / "tuner.pkl"
    tuner_state.parent.mkdir(parents=True)
    tuner_state.write_bytes(b"")  # what Tuner.can_restore looks for
    entry = {"max_concurrent": 1}  # started one at a time, resumed with --max-concurrent 2
    assert _stage_plan(spec, stage, entry, two, replan, tmp_path) == one
    assert "resumes 1 trial(s) at a time as it started" in capsys.readouterr().out
    assert _stage_plan(spec, stage, {"max_concurrent": 2}, two, replan, tmp_path) == two  # unchanged: silent
    assert capsys.readouterr().out == ""
    tuner_state.unlink()  # nothing to restore: the stage starts anew with the concurrency asked for now
    assert _stage_plan(spec, stage, entry, two, replan, tmp_path) == two and entry["max_concurrent"] == 2


def test_the_last_trial_of_a_restored_stage_gets_the_whole_machine(tmp_path, capsys, monkeypatch):
    """A stage started 2 at a time and resumed with one trial left: that trial's worker gets 2 threads on 2
    CPUs, not the 1 it had beside another trial (seen: the last seed of a 2-seed stage ran at 1 thread for an
    hour). Several left: the started concurrency; none left (Tune only reports back) or unreadable: unchanged."""
    import service.tuning as tuning
    from service.spaces import load_space

    spec = load_space(SPACES / "smoke_staged.yaml")
    stage = spec.plan(None)[1][0]

    def replan(n):
        return plan_resources(2, 0, 1, n)

    two, one = replan(2), replan(1)
    tuner_state = tmp_path / "tune" / f"stage{stage.index}-{stage.name}" / "tuner.pkl"
    tuner_state.parent.mkdir(parents=True)
    tuner_state.write_bytes(b"")
    seen = []
    for left, expected in ((1, one), (3, two), (0, two), (None, two)):
        monkeypatch.setattr(tuning, "_unfinished_trials", lambda path, fs, n=left: seen.append(path) or n)
        assert _stage_plan(spec, stage, {"max_concurrent": 2}, two, replan, tmp_path) == expected, left
    assert seen == [str(tuner_state.parent)] * 4
    assert "1 trial(s) left of a stage started 2 at a time: each Train worker 2 torch threads" in capsys.readouterr().out


def test_tunes_table_is_printed_when_a_trial_moves_and_otherwise_every_quarter_hour(monkeypatch):
    """The sweep's status table: at most every minute while trials change (status, iteration, metric), at
    least every 15 minutes while nothing does (a full-schedule stage of 2.5 h printed 150 identical tables),
    and always at the end."""
    from service import sweep_report

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")
    spec = spec_from_dict({"preset": A, "param_space": {"objective": {"beta_kl": {"grid_search": [0.1, 0.2]}}}},
                          "t.yaml")
    reporter = sweep_report.progress_reporter(spec, ["preset", "seed", "objective.beta_kl"])
    assert reporter._metric_columns == {"at_iteration": "iter", "hist_kl": "hist_kl", "hist_jsd": "hist_jsd",
                                        "gnelbo_x1e7": "gnelbo_x1e7", "mode_purity": "mode_purity"}
    # a selection with bounds shows the metrics they read
    bounded = spec_from_dict({"preset": A, "seeds": [0, 1], "select": {
        "where": {"modes_covered": {"min": 8}, "mode_offset_max": {"max": 3}}}}, "t.yaml")
    columns = sweep_report.progress_reporter(bounded, ["preset", "seed"])._metric_columns
    assert list(columns)[-2:] == ["modes_covered", "mode_offset_max"]
    clock = [1000.0]
    monkeypatch.setattr(sweep_report.time, "monotonic", lambda: clock[0])
    trials = [SimpleNamespace(trial_id="a", status="RUNNING", last_result={"at_iteration": 1000}),
              SimpleNamespace(trial_id="b", status="PENDING", last_result={})]

    def printed_at(*minutes, done_at=None):
        out = []
        for m in minutes:
            clock[0] = 1000.0 + 60 * m
            if m == 3:
                trials[0].last_result = {"at_iteration": 2000}  # a checkpoint: the table changes
            if reporter.should_report(trials, done=m == done_at):
                out.append(m)
        return out

    assert printed_at(0, 0.5, 1, 2, 3, 3.5, 4, 10, 18, 19, 33.5, 34, done_at=34) == [0, 3, 18, 33.5, 34]
    assert sweep_report.progress_reporter(spec, []) is not None
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    assert sweep_report.progress_reporter(spec, []) is None  # Ray's newer output takes no reporter


def test_tunes_table_leaves_a_trials_metrics_blank_until_its_first_evaluation(monkeypatch, tmp_path):
    """A progress row before any evaluation carries NaN placeholders (Tune wants the metric in every result);
    the table shows them blank, not as "nan" (a diverged run), and leaves the trial's result unchanged.
    An evaluation's NaN (a row with ``iteration``) is still printed as nan."""
    from ray.tune.experiment import Trial

    from service import sweep_report

    class StoredTrial(Trial):  # Tune's trial, its experiment folder without a Ray session
        local_experiment_path, local_path = str(tmp_path), None

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")
    spec = spec_from_dict({"preset": A, "param_space": {"objective": {"beta_kl": {"grid_search": [0.1, 0.2]}}}},
                          "t.yaml")
    reporter = sweep_report.progress_reporter(spec, ["objective.beta_kl"])
    waiting, evaluated = (StoredTrial("_trial", config={"objective": {"beta_kl": b}}, stub=True) for b in (0.1, 0.2))
    waiting.run_metadata.last_result = {"hist_kl": math.nan, "at_iteration": 2000}
    evaluated.run_metadata.last_result = {"hist_kl": math.nan, "hist_jsd": 1.5, "at_iteration": 1000,
                                          "iteration": 1000}
    table = reporter._progress_str([waiting, evaluated], False)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and "Trial name" not in line}
    (w, e) = (rows[str(waiting)], rows[str(evaluated)])
    assert "2000" in w and "nan" not in w
    assert "nan" in e and "1.5" in e
    assert math.isnan(waiting.last_result["hist_kl"])  # only the printed table changed


def test_a_stage_of_one_worker_trials_trains_them_in_process_unless_the_space_says_ray_train(tmp_path):
    """``trial_runner``: auto runs 1-worker trials in the Tune trial itself, a stage with a multi-worker trial
    through Ray Train; a new stage records its runner, a restored one keeps it (one started before the runner
    was recorded trained through Ray Train)."""
    from service.spaces import load_space, spec_from_dict
    from service.tuning import IN_TRIAL, trial_runner

    spec = load_space(SPACES / "smoke_staged.yaml")
    assert spec.trial_runner == "auto"
    stage, shrink = spec.plan(None)[0]
    configs = spec.configs(shrink, stage)
    assert trial_runner(spec, 1) == IN_TRIAL
    two = [apply_overrides(c, {"scaling.workers": 2}) for c in configs]
    assert trial_runner(spec, 2) == "ray_train"
    forced = spec_from_dict({"preset": A, "trial_runner": "ray_train", "smoke": True}, "forced.yaml")
    assert trial_runner(forced, 1) == "ray_train"

    def replan(n):
        return plan_resources(2, 0, 1, n)

    entry = {}
    _stage_plan(spec, stage, entry, replan(2), replan, tmp_path, configs=configs)
    assert entry["trial_runner"] == IN_TRIAL
    tuner_state = tmp_path / "tune" / f"stage{stage.index}-{stage.name}" / "tuner.pkl"
    tuner_state.parent.mkdir(parents=True)
    tuner_state.write_bytes(b"")  # a stage Tune can restore
    old = {"max_concurrent": 2}  # recorded before trials could train in process
    _stage_plan(spec, stage, old, replan(2), replan, tmp_path, configs=configs)
    assert old["trial_runner"] == "ray_train"
    mixed = {}
    _stage_plan(spec, stage, mixed, replan(2), replan, tmp_path / "new", configs=configs[:1] + two[1:])
    assert mixed["trial_runner"] == "ray_train"
    kept = {"max_concurrent": 2, "trial_runner": IN_TRIAL}
    _stage_plan(spec, stage, kept, replan(2), replan, tmp_path, configs=two)
    assert kept["trial_runner"] == IN_TRIAL


def test_a_new_stage_with_fewer_trials_than_slots_gives_each_the_larger_share(tmp_path, capsys):
    """2 CPUs plan two trials of 1 thread; a stage with one trial to run (a stage 2 of top_k 1, a 1-trial
    sweep) runs it on both CPUs, and records that concurrency."""
    from service.spaces import load_space

    spec = load_space(SPACES / "smoke_staged.yaml")
    stage = spec.plan(None)[1][0]

    def replan(n):
        return plan_resources(2, 0, 1, n)

    entry = {}
    plan = _stage_plan(spec, stage, entry, replan(None), replan, tmp_path, to_run=1)
    assert (plan.max_concurrent, plan.threads_per_worker, entry["max_concurrent"]) == (1, 2, 1)
    assert "1 trial(s) to run, 1 at a time: 2 torch threads" in capsys.readouterr().out
    assert _stage_plan(spec, stage, {}, replan(None), replan, tmp_path, to_run=3) == replan(None)  # 2 at a time


def test_an_in_process_trial_reports_each_checkpoint_as_the_ray_train_forwarder_does(trial_env, monkeypatch):
    """``sweep_in_trial``'s report function: at each checkpoint a progress row (no ``iteration``), then the
    evaluations since the last one; the checkpoint goes with the last row of the iteration."""
    import ray.tune

    from service import sweep_trial
    from service.sweep_in_trial import EvaluationTap

    ctx, _ = trial_env
    rows = []
    monkeypatch.setattr(ray.tune, "report", lambda row, checkpoint=None: rows.append((row, checkpoint)))
    tap = EvaluationTap(("hist_kl", "mode_purity"))

    def fit(cfg, callbacks, **kw):  # what fit_in_trial does: the loop logs, each checkpoint reports
        (report,) = callbacks
        for at, evaluated in ((1000, {"eval/hist_kl": 5.0, "eval/mode_purity": 0.5, "eval/other": 1.0}), (2000, None)):
            tap.log_metrics(at - 10, {"train/loss_encoder": 0.5})
            if evaluated:
                tap.log_metrics(at, evaluated)
            report(at, tap.take(at), tmp)
        return {"iteration": 2000, "output_dir": "x", "metrics": {"hist_kl": 4.0, "mode_purity": 1.0}}

    tmp = Path(ctx.output_dir)
    sel = Selection("hist_kl", "min", (("mode_purity", 0.9, None),))
    ctx = dataclasses.replace(ctx, select=sel, in_trial=True, stage_overrides={"schedule.eval_every": 1000})
    sweep_trial._trial({"variant": 0}, ctx, fit=fit)
    got = [(r.get("at_iteration"), r.get("iteration"), c is not None) for r, c in rows]
    assert got == [(1000, None, False), (1000, 1000, True), (2000, None, True), (2000, 2000, False)]
    assert math.isnan(rows[0][0]["hist_kl"]) and rows[1][0]["hist_kl"] == 5.0 and "other" not in rows[1][0]
    assert rows[2][0]["hist_kl"] == 5.0 and rows[2][0][SCORE_KEY] == 5.0 + INFEASIBLE  # the last evaluation's
    assert rows[-1][0]["status"] == "ok" and rows[-1][0][SCORE_KEY] == 4.0  # the trial's final row
    assert all(r["run_name"] == "t-v0000" for r, _ in rows)
    assert tap.take(10**9) == []  # every evaluation was taken once


def test_an_in_process_trial_without_a_tune_checkpoint_resumes_from_its_ray_train_runs_latest(tmp_path,
                                                                                               smoke_checkpoint):
    """A sweep stopped before Tune recorded anything, resumed with trials in process: the trial's Ray Train run
    (same run name, same config) left checkpoints; the latest is the one resumed from. None without any."""
    import shutil

    from service import checkpoint, storage
    from service.ray_train import latest_checkpoint

    run = tmp_path / "ray_train" / "sweep-v0000"
    assert latest_checkpoint(storage.resolve(run)) is None
    state = checkpoint.load(smoke_checkpoint)
    for name, iteration in (("checkpoint_2026-12-03_10-00-00.000001", 100), ("checkpoint_2026-12-03_10-00-09.000001", 200)):
        (run / name).mkdir(parents=True)
        checkpoint.save(run / name / "checkpoint.pt", {**state, "iteration": iteration})
    (run / "checkpoint_2026-12-03_10-00-20.000001").mkdir()  # one being written: no checkpoint.pt yet
    assert latest_checkpoint(storage.resolve(run))["iteration"] == 200
    shutil.rmtree(run / "checkpoint_2026-12-03_10-00-09.000001")
    assert latest_checkpoint(storage.resolve(run))["iteration"] == 100
