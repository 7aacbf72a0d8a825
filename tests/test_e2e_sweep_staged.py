"""End to end: the staged protocol's smoke sweep (``tune_spaces/smoke_staged.yaml``) through real Ray
Tune on 2 CPUs with a real MLflow SQLite store, its 1-worker trials trained in process.

Four training runs: two coarse trials that report their evaluation at iteration 8 (after the warm-up) to Tune (ASHA),
the best re-run longer, then that setting with two seeds, one of which is the previous stage's run
and is reused. (The plain sweep is test_e2e_sweep.py; ``jobs.sweep`` is driven the same way.)
"""

import json

import pytest

from jobs import sweep as sweep_job
from test_e2e_sweep import SPACES, _results, _run_sweep

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def staged(tmp_path_factory, ray_local):
    return _run_sweep(tmp_path_factory.mktemp("staged"), SPACES / "smoke_staged.yaml", "e2e-staged",
                      "staged smoke sweep, 4 training runs")


def test_staged_sweep_runs_each_stage_on_the_previous_stages_best_setting(staged):
    import pandas as pd

    from service.selection import Selection, rank_settings

    root, _, rc = staged
    assert rc == 0
    df = _results(root)
    assert list(df["stage_name"]) == ["coarse"] * 2 + ["longer"] + ["seeds"] * 2
    coarse, longer, seeds = (df[df["stage"] == k] for k in (1, 2, 3))
    assert sorted(coarse["objective.beta_kl"]) == [0.05, 0.5]  # a column per hyperparameter
    assert set(coarse["status"]) <= {"ok", "stopped"} and (coarse["status"] == "ok").any()
    best = rank_settings(coarse, Selection()).iloc[0]
    assert list(longer["hparams"]) == [best["hparams"]] and list(longer["status"]) == ["ok"]
    assert list(longer["config.schedule.iterations"]) == [16] and list(longer["iteration"]) == [16]
    assert list(seeds["seed"]) == [0, 1] and set(seeds["hparams"]) == {best["hparams"]}
    reused = seeds["reused_from"].tolist()
    assert reused[0] == "longer/v0000" and pd.isna(reused[1])  # seed 0 is stage 2's run
    assert seeds["mlflow_run_id"].iloc[0] == longer["mlflow_run_id"].iloc[0]
    assert list(seeds["trained_iterations"]) == [0, 16]
    candidates = json.loads((root / "out" / "stages" / "3-seeds" / "candidates.json").read_text())
    assert [v["overrides"]["seed"] for v in candidates["variants"]] == [0, 1]
    progress = json.loads((root / "out" / "progress.json").read_text())
    assert [progress["stages"][n]["complete"] for n in ("coarse", "longer", "seeds")] == [True] * 3
    selection = (root / "out" / "selection.md").read_text()
    assert "## Selected" in selection
    beta_kl = json.loads(best["hparams"])["objective.beta_kl"]  # the command that trains the pick
    command = f"python -m jobs.train --preset 8gaussians/mog-ip-lc --set objective.beta_kl={beta_kl:g}"
    assert f"train it: `{command}`" in selection
    assert not (root / "out" / "sweep.lock").exists()


def test_staged_trials_report_every_evaluation_to_tune_with_hyperparameter_columns(staged):
    root, _, _ = staged
    for trial in sorted((root / "out" / "tune" / "stage1-coarse").glob("v*/result.json")):
        rows = [json.loads(line) for line in trial.read_text().splitlines()]
        # every checkpoint: a progress row (no iteration, so ASHA skips it) before the evaluations since
        progress = [r for r in rows if "iteration" not in r]
        assert progress and all(r["run_name"] == rows[0]["run_name"] and "hist_kl" in r for r in progress)
        steps = [r["at_iteration"] for r in progress]
        assert steps == sorted(set(steps)) and steps[0] >= 1
        results = [r for r in rows if "iteration" in r]
        assert all(r["at_iteration"] == r["iteration"] for r in results)
        assert results[0]["iteration"] == 8 and results[0]["hist_kl"] > 0 and "status" not in results[0]
        assert {"hist_jsd", "run_name", "mlflow_run_id"} <= set(results[0])
        assert "gnelbo_x1e7" not in results[0]  # eval.intermediate_gnelbo: false; the final row has it
        assert all(r["gnelbo_x1e7"] > 0 for r in results if r.get("status"))
        assert {"variant", "preset", "seed", "objective.beta_kl"} <= set(results[0]["config"])
        if results[-1].get("status") == "ok":  # ASHA may stop one of the two at iteration 8
            assert results[-1]["iteration"] == 12 and len(results) == 2


def test_staged_sweep_rerun_keeps_every_finished_stage(staged):
    from mlflow.tracking import MlflowClient

    root, args, _ = staged
    before = _results(root)
    assert sweep_job.main(args) == 0  # every stage finished earlier: kept, nothing trains again
    after = _results(root)
    assert list(after["mlflow_run_id"]) == list(before["mlflow_run_id"])
    assert list(after["hist_kl"]) == list(before["hist_kl"])
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("introprior").experiment_id])
    (parent,) = [r for r in runs if "sweep.space" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and parent.info.status == "FINISHED"  # 4 Ray Train runs, no duplicates
    assert {r.data.tags["sweep.stage"] for r in children} == {"coarse", "longer", "seeds"}


def test_finished_stages_have_no_trial_left_for_a_restore(staged):
    """What a resumed stage plans its threads on (``_unfinished_trials``) read from Tune's real stored state:
    every trial of a finished stage is TERMINATED (ASHA's stopped ones too); a missing experiment is unknown."""
    from service.tuning import _unfinished_trials

    root, _, _ = staged
    tune_root = root / "out" / "tune"
    assert sorted(p.name for p in tune_root.iterdir()) == ["stage1-coarse", "stage2-longer", "stage3-seeds"]
    for stage in tune_root.iterdir():
        assert _unfinished_trials(str(stage)) == 0, stage.name
    assert _unfinished_trials(str(tune_root / "stage4-none")) is None
