"""End to end: jobs.train through real Ray Train (2 CPU workers) and a real MLflow SQLite store."""

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jobs import train as train_job
from service import checkpoint
from service.config import load_yaml

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    args = ["--preset", "8gaussians/mog-ip-lc", "--smoke", "--workers", "2", "--run-name", "e2e",
            "--output-dir", str(root / "out"), "--storage-path", str(root / "ray"),
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]
    # the output folder already holds what this run did not write: a user's file and a local MLflow store
    # (`--output-dir .` where ./mlruns is; logging that as artifacts copied the store into itself)
    (root / "out" / "mlruns" / "0").mkdir(parents=True)
    (root / "out" / "mlruns" / "0" / "meta.yaml").write_text("kept: true\n")
    (root / "out" / "notes.txt").write_text("mine\n")
    console = io.StringIO()  # the driver's stdout and stderr, Ray's forwarded worker output included
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        assert train_job.main(args) == 0
    (root / "console.txt").write_text(console.getvalue())
    sys.stdout.write(console.getvalue())
    return root, args


def test_console_shows_one_progress_display_and_no_ray_report_echo(smoke_run):
    """What ``make run`` prints, at smoke size: one line per logged step (12 iterations, each logged;
    in a log about 20 lines whatever the length), the final evaluation, where the results went."""
    root, _ = smoke_run
    text = (root / "console.txt").read_text()
    assert "Reporting training result" not in text and "TrainingReport(" not in text  # Ray Train's echo is off
    assert '{"iteration":' not in text  # no per-step JSON (MLflow has every metric)
    progress = [ln for ln in text.splitlines() if ln.startswith(("[warm-up]", "[adversarial]"))]
    assert [ln.split()[1] for ln in progress] == [f"{i}/12" for i in range(1, 13)]
    assert "[evaluating] 12 iterations done; final evaluation" in text
    assert re.search(r"^\[eval\] iteration 12: gnelbo_x1e7 \S+  hist_kl ", text, re.M)
    assert re.search(r"^results: .*out  \(mlflow run \w+\)$", text, re.M)
    assert re.search(r"^serve it: python -m jobs.serve --checkpoint \S*/out/checkpoint.pt$", text, re.M)
    # a data mode decoded off its place is pointed out before serving (12 iterations: no trained modes yet)
    offset = json.loads((root / "out" / "metrics.json").read_text())["mode_offset_max"]
    check = re.search(r"^check before serving: a data mode's samples sit ([\d.]+) of its spreads off", text, re.M)
    assert (check is not None) == (offset >= 3.0), (offset, text[-2000:])
    assert check is None or float(check.group(1)) == pytest.approx(offset, abs=0.05)


def _client(root):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def test_outputs_and_checkpoint(smoke_run):
    root, _ = smoke_run
    out = root / "out"
    for name in ("checkpoint.pt", "metrics.json", "config.yaml", "samples.png", "density.png", "latent.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("gnelbo_x1e7", "hist_kl", "hist_jsd", "prior_entropy_norm", "prior_active_components",
                "mode_purity", "modes_covered", "mode_share_tv", "mode_offset_max"):
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN
    assert 0.0 <= metrics["prior_entropy_norm"] <= 1.0
    state = checkpoint.load(out / "checkpoint.pt")  # weights_only=True inside
    offsets = state["extra"]["mode_offsets"]  # each data mode's placement, for GET /v1/modes
    assert set(offsets) == set(range(8)) and max(v for v in offsets.values() if v is not None) == pytest.approx(
        metrics["mode_offset_max"])
    assert state["iteration"] == 12 and state["prior_type"] == "mog"
    assert bool(state["model"]["prior.clip_on"])  # clip bounds set at the first adversarial iteration
    cfg, model = checkpoint.restore_model(state)
    assert cfg == load_yaml(str(out / "config.yaml"))  # config.yaml is the full, re-runnable config
    assert model.prior.num_components == cfg.prior.num_components


def test_evaluate_job_repeats_the_final_evaluation_of_a_2d_checkpoint(smoke_run, tmp_path, capsys):
    """``jobs.evaluate`` on a 2D checkpoint: the run's own draws, so the same metrics as its metrics.json
    (a checkpoint from before a metric existed gets it from here); logged into the training run."""
    from jobs import evaluate

    root, _ = smoke_run
    trained = json.loads((root / "out" / "metrics.json").read_text())
    run = _client(root).search_runs([_client(root).get_experiment_by_name("introprior").experiment_id],
                                    filter_string="tags.`mlflow.runName` = 'e2e'")[0]
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(root / "out" / "checkpoint.pt"), "--output-dir", str(tmp_path / "ev"),
                          "--device", "cpu", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
                          "--run-id", run.info.run_id]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == set(trained)
    for key, value in trained.items():
        assert printed[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == printed
    info = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert info["checkpoint"]["iteration"] == 12 and len(info["checkpoint"]["sha256"]) == 64 and info["seed"] == 0
    assert set(info["modes"]["mode_offsets"]) == {str(k) for k in range(8)}
    assert {p.name for p in (tmp_path / "ev").glob("*.png")} >= {"samples.png", "latent.png", "density.png"}
    # --seed draws afresh: the histogram metrics move, the checkpoint is the same
    assert evaluate.main(["--checkpoint", str(root / "out" / "checkpoint.pt"), "--output-dir", str(tmp_path / "ev2"),
                          "--device", "cpu", "--seed", "5"]) == 0
    fresh = json.loads(capsys.readouterr().out)
    assert fresh["hist_kl"] != trained["hist_kl"]
    logged = _client(root).get_run(run.info.run_id).data.metrics
    assert logged["eval/mode_offset_max"] == pytest.approx(printed["mode_offset_max"])


def test_mlflow_run_has_params_metrics_and_artifacts(smoke_run):
    root, _ = smoke_run
    client = _client(root)
    exp = client.get_experiment_by_name("introprior")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`mlflow.runName` = 'e2e'")
    assert run.data.params["prior.kind"] == "mog" and run.data.params["objective.beta_neg"] == "0.9"
    for key in ("train/loss_vae", "train/loss_encoder", "train/loss_decoder", "prior/entropy_norm",
                "prior/active_components", "eval/gnelbo_x1e7", "eval/hist_kl", "eval/hist_jsd", "eval/mode_offset_max"):
        assert key in run.data.metrics, key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_encoder")]
    assert steps == list(range(7, 13))  # adversarial phase after the 6-iteration warm-up
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "config.yaml", "metrics.json", "samples.png"} <= names
    # only what the run wrote: not the files the output folder held before, which stay as they were
    assert not names & {"mlruns", "notes.txt"}, names
    assert (root / "out" / "notes.txt").read_text() == "mine\n"
    assert (root / "out" / "mlruns" / "0" / "meta.yaml").read_text() == "kept: true\n"
    assert run.info.status == "FINISHED"


def test_finished_run_is_a_registered_pyfunc_model_that_samples_like_the_checkpoint(smoke_run):
    """Logged (signature, input example), registered by default as introprior-<preset>, loaded back, predicting."""
    import mlflow
    import pandas as pd

    from service import sampling
    from service.mlflow_model import INPUT_SCHEMA

    root, _ = smoke_run
    client = _client(root)
    (run,) = client.search_runs([client.get_experiment_by_name("introprior").experiment_id],
                                filter_string="tags.`mlflow.runName` = 'e2e'")
    (version,) = client.search_model_versions("name = 'introprior-8gaussians-mog-ip-lc'")
    assert version.run_id == run.info.run_id and str(version.version) == "1"
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model("models:/introprior-8gaussians-mog-ip-lc/1")
    finally:
        mlflow.set_tracking_uri(None)
    assert model.metadata.signature.inputs == INPUT_SCHEMA and model.metadata.saved_input_example_info
    assert model.metadata.metadata["data_shape"] == [2]
    out = model.predict(pd.DataFrame({"n": [5, 3], "mode": [2, -1], "seed": [7, 8]}))
    assert list(out.columns) == ["request", "seed", "component", "sample"] and out["request"].tolist() == [0] * 5 + [1] * 3
    _, net = checkpoint.restore_model(checkpoint.load(root / "out" / "checkpoint.pt"))
    x, _, idx = sampling.sample(net.eval(), 5, component=2, seed=7)
    assert out["component"].tolist()[:5] == idx.tolist() == [2] * 5
    np.testing.assert_allclose(out["sample"].tolist()[:5], x.double().numpy(), atol=1e-6)


def test_registration_failure_warns_and_no_register_skips(capsys, tmp_path):
    from service.presets import get_preset

    train_job.register_model(get_preset("8gaussians/sintro"), {"tracking_uri": f"file://{tmp_path}/mlruns",
                                                                "mlflow_run_id": "0" * 32})
    err = capsys.readouterr().err
    assert "warning: cannot register model 'introprior-8gaussians-sintro'" in err and "--no-register" in err


def test_rerun_with_same_name_and_another_config_is_refused_listing_the_fields(smoke_run, capsys):
    root, args = smoke_run
    before = (root / "out" / "checkpoint.pt").read_bytes()
    assert train_job.main(args + ["--set", "schedule.iterations=18", "--set", "objective.beta_kl=0.5"]) == 2
    err = capsys.readouterr().err
    assert "error: run 'e2e' exists with another config" in err
    assert "  objective.beta_kl: 0.3 -> 0.5\n" in err and "  schedule.iterations: 12 -> 18\n" in err
    assert "--allow-config-change" in err
    assert (root / "out" / "checkpoint.pt").read_bytes() == before  # nothing ran


def test_rerun_with_same_name_resumes_and_continues(smoke_run):
    root, args = smoke_run
    assert train_job.main(args + ["--set", "schedule.iterations=18", "--allow-config-change", "--no-register"]) == 0
    state = checkpoint.load(root / "out" / "checkpoint.pt")
    assert state["iteration"] == 18
    client = _client(root)
    assert len(client.search_model_versions("name = 'introprior-8gaussians-mog-ip-lc'")) == 1  # --no-register
    exp = client.get_experiment_by_name("introprior")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`mlflow.runName` = 'e2e'")
    assert len(runs) == 1  # the same MLflow run continues
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss_encoder"))
    assert steps == list(range(7, 19))  # 13..18 appended, nothing re-run
    assert runs[0].data.tags["config_changed"] == "schedule.iterations"  # the intended change is on record
    (change,) = client.list_artifacts(runs[0].info.run_id, "config_changes")
    logged = json.loads(Path(client.download_artifacts(runs[0].info.run_id, change.path, str(root))).read_text())
    assert logged["changes"] == [{"field": "schedule.iterations", "recorded": 12, "now": 18}]


def test_cli_as_module_lists_presets_and_rejects_bad_values():
    env_cmd = [sys.executable, "-m", "jobs.train"]
    listed = subprocess.run(env_cmd + ["--list-presets"], cwd=REPO, capture_output=True, text=True, check=True)
    names = listed.stdout.split()
    from service.presets import PRESETS

    assert names == sorted(PRESETS) and "8gaussians/mog-ip-lc" in names
    bad = subprocess.run(env_cmd + ["--set", "prior.trainable=maybe"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "prior.trainable: expected true or false" in bad.stderr


def test_shipped_config_yaml_is_loadable(smoke_run):
    root, _ = smoke_run
    data = yaml.safe_load((root / "out" / "config.yaml").read_text())
    assert data["name"] == "8gaussians/mog-ip-lc" and data["scaling"]["workers"] == 2


def test_diverged_run_exits_1_at_once_with_the_cause_and_marks_mlflow_failed(ray_local, tmp_path, capsys):
    args = ["--preset", "8gaussians/sintro", "--smoke", "--workers", "1", "--run-name", "diverge",
            "--set", "optim.lr_encoder=1e6", "--set", "optim.lr_decoder=1e6",
            "--output-dir", str(tmp_path / "out"), "--storage-path", str(tmp_path / "ray"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert train_job.main(args) == 1
    err = capsys.readouterr().err
    assert "error: run 'diverge' failed: TrainingDiverged: loss_vae is nan at iteration 1" in err
    assert "not retried" in err  # --max-failures defaults to 2, but a diverged run fails at once
    assert not (tmp_path / "out").exists()  # no results of a failed run
    (run,) = _client(tmp_path).search_runs(
        [e.experiment_id for e in _client(tmp_path).search_experiments()],
        filter_string="tags.`mlflow.runName` = 'diverge'")
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("TrainingDiverged: ")
