"""Train on real Fashion-MNIST through Ray Train (2 workers), then ``jobs.evaluate`` with the offline
extractor into the training run's MLflow record (issue 5: smoke training, then evaluation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from service.images import DEBIAN_FASHION_MNIST

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz").is_file(),
                       reason=f"Debian package dataset-fashion-mnist not installed ({DEBIAN_FASHION_MNIST})"),
]


def test_train_with_two_workers_then_evaluate_offline(tmp_path: Path, capsys) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from jobs import evaluate
    from jobs import train as train_job

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        assert train_job.main(["--preset", "fmnist/mog10-ip-lc", "--smoke", "--workers", "2", "--run-name", "fm",
                               "--output-dir", str(tmp_path / "run"), "--storage-path", str(tmp_path / "ray"),
                               "--tracking-uri", uri]) == 0
    finally:
        ray.shutdown()
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    capsys.readouterr()

    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--protocol", "cnn", "--smoke",
                          "--device", "cpu", "--extractor-train-images", "1024", "--cache-dir", str(tmp_path / "fx"),
                          "--output-dir", str(out), "--tsne-points", "100", "--tracking-uri", uri,
                          "--run-id", run.info.run_id]) == 0
    metrics = json.loads(capsys.readouterr().out)
    expected = {"fid_fmnist_cnn", "fid_rec_fmnist_cnn", "precision_fmnist_cnn", "recall_fmnist_cnn", "svm_2k_acc",
                "svm_10k_acc", "knn_5_acc", "knn_100_acc", "prior_entropy_norm", "prior_active_components",
                "mode_purity", "modes_covered"}
    assert expected <= set(metrics) and all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["fid_fmnist_cnn"] > 0 and 0 <= metrics["prior_entropy_norm"] <= 1
    assert 0.1 <= metrics["mode_purity"] <= 1 and 1 <= metrics["modes_covered"] <= 10
    info = json.loads((out / "evaluation.json").read_text())
    assert len(info["purity"]["per_component"]) == 10 and info["purity"]["samples_per_component"] == 50
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
