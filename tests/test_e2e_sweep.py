"""End to end: smoke sweeps through real Ray Tune on 2 CPUs with a real MLflow SQLite store; each 1-worker
trial trains in its Tune trial's own process (``service.sweep_in_trial``; a trial of several workers is a Ray
Train run: test_e2e_multinode.py; a killed trial: test_e2e_sweep_trial_fault.py).

A plain sweep, four trials, two at a time: S-Intro VAE (SG) with seeds 0 and 1, which complete,
and a VAE whose learning rates are 1e6, which diverges at its first iteration
(``TrainingDiverged``) for both seeds and must be recorded as failed while the others complete.

The staged protocol's sweep is in test_e2e_sweep_staged.py (a module of its own, so that pytest-xdist
can run the two sweeps at the same time). The Ray instance is conftest's ``ray_local``.
"""

import contextlib
import io
import math
import sys
import time
from pathlib import Path

import pytest

from jobs import report as report_job
from jobs import sweep as sweep_job

pytestmark = pytest.mark.e2e

SPACE = """\
# trials: 4
presets:
  8gaussians/sintro: {}
  8gaussians/vae: {optim: {lr_encoder: 1.0e6, lr_decoder: 1.0e6}}
seeds: [0, 1]
metric: hist_kl
mode: min
smoke: true
param_space:
  eval: {plots: false}  # no PNGs: the test does not look at them
"""


SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("sweep")
    (root / "space.yaml").write_text(SPACE)
    yield _run_sweep(root, root / "space.yaml", "e2e", "smoke sweep, 4 trials")


def _run_sweep(root, space, name, what):
    """``jobs.sweep`` on ``space`` into ``root/out`` (MLflow in ``root``): (root, its args, exit code)."""
    args = [str(space), "--output-dir", str(root / "out"), "--max-concurrent", "2",
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--name", name]
    start = time.perf_counter()
    console = io.StringIO()  # the driver's console: Tune's status table, forwarded trial output
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        rc = sweep_job.main(args)
    (root / f"console-{name}.txt").write_text(console.getvalue())
    sys.stdout.write(console.getvalue())
    print(f"{what}: {time.perf_counter() - start:.1f} s")
    return root, args, rc


def _results(root):
    import pandas as pd

    return pd.read_parquet(root / "out" / "results.parquet")


def test_console_is_tunes_table_of_the_hyperparameters_and_the_selection_metric(sweep):
    root, _, _ = sweep
    text = (root / "console-e2e.txt").read_text()
    headers = [ln for ln in text.splitlines() if "Trial name" in ln and "|" in ln]
    assert headers, text[-3000:]
    columns = [c.strip() for c in headers[-1].strip().strip("|").split("|")]
    assert {"preset", "seed", "hist_kl"} <= set(columns) and "variant" not in columns, columns
    assert "Reporting training result" not in text and "TrainingReport(" not in text  # Ray Train's echo is off
    assert "Checkpoint successfully created" not in text  # nor Tune's, of each in-process trial's checkpoints
    assert '{"iteration":' not in text and "[adversarial]" not in text  # no per-trial training console


def test_diverged_trials_fail_and_the_others_complete(sweep):
    root, _, rc = sweep
    assert rc == 0
    df = _results(root).sort_values("variant")
    assert list(df["preset"]) == ["8gaussians/sintro"] * 2 + ["8gaussians/vae"] * 2
    assert list(df["seed"]) == [0, 1, 0, 1]
    assert list(df["status"]) == ["ok", "ok", "failed", "failed"]
    for err in df[df["status"] == "failed"]["error"]:
        assert err.startswith("TrainingDiverged: loss_vae is nan") and "lower optim.lr_encoder" in err
    # a diverged run is final: one call of fit, never retried
    assert list(df["failure"]) == ["", "", "diverged", "diverged"] and list(df["attempts"]) == [1, 1, 1, 1]
    assert not (root / "out" / "sweep.lock").exists()  # released
    ok = df[df["status"] == "ok"]
    assert (ok["iteration"] == 12).all() and ok[["gnelbo_x1e7", "hist_kl", "hist_jsd"]].notna().all().all()
    assert df[df["status"] == "failed"]["hist_kl"].isna().all()
    # every trial's full config is in the Parquet file
    assert list(df["config.optim.lr_encoder"]) == [2e-4, 2e-4, 1e6, 1e6]
    assert list(df["config.schedule.iterations"]) == [12, 12, 12, 12]


def test_table_holds_mean_and_standard_error_computed_from_the_parquet(sweep):
    root, _, _ = sweep
    df = _results(root)
    sg = df[(df["configuration"] == "sintro") & (df["status"] == "ok")]
    table = (root / "out" / "table.md").read_text()
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in table.splitlines() if line.startswith("| 8gaussians |")}
    for metric, label, paper in (("gnelbo_x1e7", "gnELBO", "(0.51 ± 0.07)"), ("hist_kl", "KL", "(1.23 ± 0.05)"),
                                 ("hist_jsd", "JSD", "(1.01 ± 0.08)")):
        values = list(sg[metric])
        mean = sum(values) / 2
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / (2 - 1)) / math.sqrt(2)
        vae, sg_cell = rows[("8gaussians", label)][:2]
        assert sg_cell == f"{mean:.2f} ± {se:.2f} {paper}"
        assert vae.startswith("— (")  # both VAE trials diverged: no numbers of ours
    assert "2 | 0 |" in table  # selected SG: 2 seeds, 0 failed
    assert table.count("| 8gaussians/vae |") == 2  # the failed-trials section


def test_trials_are_mlflow_runs_nested_under_the_parent(sweep):
    from mlflow.tracking import MlflowClient

    root, _, _ = sweep
    df = _results(root)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("introprior")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "sweep.space" in r.data.tags]
    assert parent.info.run_name.startswith("e2e-") and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.parquet", "table.md"}
    sg_kl = df[(df["configuration"] == "sintro")]["hist_kl"]
    assert parent.data.metrics["table/8gaussians/sintro/hist_kl_mean"] == pytest.approx(sg_kl.mean())
    assert parent.data.metrics["sweep/trials_failed"] == 2
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    by_id = {r.info.run_id: r for r in children}
    for row in df.to_dict("records"):
        run = by_id[row["mlflow_run_id"]]
        assert run.data.tags["preset"] == row["preset"] and run.data.tags["seed"] == str(row["seed"])
        assert float(run.data.params["optim.lr_encoder"]) == row["config.optim.lr_encoder"]  # tagged with its config
        assert run.info.status == ("FINISHED" if row["status"] == "ok" else "FAILED")
        if row["status"] == "ok":
            assert run.data.metrics["eval/hist_kl"] == pytest.approx(row["hist_kl"])
        else:
            assert run.data.tags["error"].startswith("TrainingDiverged")


def test_selected_trial_is_the_champion_model(sweep):
    """The selected setting's best seed is registered as introprior-<preset>@champion; a failed preset has none."""
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    root, _, _ = sweep
    df = _results(root)
    ok = df[(df["preset"] == "8gaussians/sintro") & (df["status"] == "ok")]
    best = ok.sort_values("hist_kl").iloc[0]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert client.get_model_version_by_alias("introprior-8gaussians-sintro", "champion").run_id == best["mlflow_run_id"]
    assert not client.search_registered_models("name = 'introprior-8gaussians-vae'")
    for row in ok.itertuples():  # every completed trial is a logged model, comparable without registering
        (logged,) = client.search_logged_models([client.get_run(row.mlflow_run_id).info.experiment_id],
                                                filter_string=f"source_run_id = '{row.mlflow_run_id}'")
        assert logged.name == "model"
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/introprior-8gaussians-sintro@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert len(model.predict(pd.DataFrame({"n": [3], "seed": [0]}))) == 3


def test_rerun_resumes_the_finished_sweep_and_report_rerenders_the_table(sweep, capsys):
    root, args, _ = sweep
    before = _results(root)
    assert sweep_job.main(args) == 0  # Tune restore: every trial is already done, nothing runs again
    after = _results(root)
    assert list(after["mlflow_run_id"]) == list(before["mlflow_run_id"])
    assert list(after["hist_kl"].fillna(-1)) == list(before["hist_kl"].fillna(-1))
    table = (root / "out" / "table.md").read_text()
    (root / "out" / "table.md").unlink()
    capsys.readouterr()
    assert report_job.main([str(root / "out")]) == 0
    assert (root / "out" / "table.md").read_text() == table
    assert "| 8gaussians | SG (sintro) | KL |" in capsys.readouterr().out
