"""Train on real Fashion-MNIST through Ray Train (2 workers), then ``jobs.evaluate`` with the offline
extractor into the training run's MLflow record (issue 5: smoke training, then evaluation).

One training run (``jobs.train --preset fmnist/mog10-ip-lc --smoke --workers 2``) serves the module:
the first test checks what it wrote, the second evaluates it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from service import checkpoint
from service.images import DEBIAN_FASHION_MNIST

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz").is_file(),
                       reason=f"Debian package dataset-fashion-mnist not installed ({DEBIAN_FASHION_MNIST})"),
]


@pytest.fixture(scope="module")
def fmnist_run(ray_local, tmp_path_factory) -> dict:
    from jobs import train as train_job

    root = tmp_path_factory.mktemp("fmnist")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    assert train_job.main(["--preset", "fmnist/mog10-ip-lc", "--smoke", "--workers", "2", "--run-name", "fmnist-smoke",
                           "--output-dir", str(root / "out"), "--storage-path", str(root / "ray"),
                           "--tracking-uri", uri]) == 0
    return {"out": root / "out", "tracking_uri": uri}


def test_fmnist_smoke_through_ray_train_with_two_workers(fmnist_run: dict) -> None:
    from mlflow.tracking import MlflowClient

    out = fmnist_run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"rec_error_test", "prior_entropy_norm", "prior_active_components"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values()) and 0 <= metrics["prior_entropy_norm"] <= 1
    for name in ("samples.png", "reconstructions.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    state = checkpoint.load(out / "checkpoint.pt")
    assert state["iteration"] == 12 and state["prior_type"] == "mog" and bool(state["model"]["prior.clip_on"])
    cfg, model = checkpoint.restore_model(state)
    assert cfg.data.subset == 256 and model.encoder(torch.rand(2, 1, 28, 28))[0].shape == (2, 32)
    client = MlflowClient(fmnist_run["tracking_uri"])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "fmnist-smoke" and run.info.status == "FINISHED"
    assert {"train/loss_vae", "train/loss_encoder", "eval/rec_error_test", "prior/entropy_norm"} <= set(run.data.metrics)
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"samples.png", "reconstructions.png", "metrics.json", "checkpoint"} <= artifacts


def test_train_with_two_workers_then_evaluate_offline(fmnist_run: dict, tmp_path: Path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    from jobs import evaluate

    uri = fmnist_run["tracking_uri"]
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    capsys.readouterr()

    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(fmnist_run["out"] / "checkpoint.pt"), "--protocol", "cnn", "--smoke",
                          "--device", "cpu", "--extractor-train-images", "1024", "--cache-dir", str(tmp_path / "fx"),
                          "--output-dir", str(out), "--tsne-points", "100", "--tracking-uri", uri,
                          "--run-id", run.info.run_id]) == 0
    metrics = json.loads(capsys.readouterr().out)
    expected = {"fid_fmnist_cnn", "fid_rec_fmnist_cnn", "precision_fmnist_cnn", "recall_fmnist_cnn", "svm_2k_acc",
                "svm_10k_acc", "knn_5_acc", "knn_100_acc", "prior_entropy_norm", "prior_active_components",
                "mode_purity", "modes_covered", "mode_share_tv"}
    assert expected <= set(metrics) and all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["fid_fmnist_cnn"] > 0 and 0 <= metrics["prior_entropy_norm"] <= 1
    assert 0.1 <= metrics["mode_purity"] <= 1 and 1 <= metrics["modes_covered"] <= 10
    info = json.loads((out / "evaluation.json").read_text())
    assert len(info["purity"]["per_component"]) == 10 and info["purity"]["samples_per_component"] == 50
    shares = info["purity"]["class_shares"]  # the generated images' classes against the data's
    assert sum(shares["generated"].values()) == pytest.approx(1) and sum(shares["data"].values()) == pytest.approx(1)
    assert 0 <= metrics["mode_share_tv"] <= 1
    assert info["checkpoint"]["iteration"] == 12 and info["checkpoint"]["preset"] == "fmnist/mog10-ip-lc"
    latents = pq.read_table(out / "latents.parquet")
    assert latents.num_rows == 500 + 300 and len(latents.column("mu")[0]) == 32

    logged = client.get_run(run.info.run_id).data.metrics
    assert {f"eval/{k}" for k in expected} <= set(logged)
    assert logged["eval/fid_fmnist_cnn"] == pytest.approx(metrics["fid_fmnist_cnn"])
    assert logged["eval/mode_purity"] == pytest.approx(metrics["mode_purity"])
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {f"evaluation/{n}" for n in ("metrics.json", "evaluation.json", "latents.parquet", "samples.png",
                                         "reconstructions.png", "latent.png", "tsne.png")} <= artifacts
