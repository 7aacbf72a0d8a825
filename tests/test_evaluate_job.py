"""``jobs.evaluate`` in-process on a small untrained image checkpoint: outputs and bad input."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import evaluate, train_extractor
from service import checkpoint, feature_extractor
from service.config import ExperimentConfig, apply_overrides
from service.images import write_images_parquet
from service.model import build_model


def _save(path: Path, cfg: ExperimentConfig, shape: tuple[int, ...]) -> Path:
    model = build_model(cfg, shape)
    return checkpoint.save(path, checkpoint.make_state(model, cfg, iteration=7, data_shape=shape))


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory) -> Path:
    cfg = apply_overrides(ExperimentConfig(name="fmnist/test"), {
        "data.dataset": "fmnist", "data.batch_size": 64, "network.kind": "resnet", "network.latent_dim": 8,
        "network.channels": [8, 16], "prior.kind": "mog", "prior.num_components": 10, "prior.init": "random",
        "eval.mc_samples": 10})
    return _save(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", cfg, (1, 28, 28))


def test_evaluate_job_smoke(image_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    rc = evaluate.main(["--checkpoint", str(image_checkpoint), "--protocol", "cnn", "--smoke", "--device", "cpu",
                        "--extractor-train-images", "512", "--cache-dir", str(tmp_path / "cache"),
                        "--output-dir", str(out), "--tsne-points", "100"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == pytest.approx(json.loads((out / "metrics.json").read_text()))
    assert {"fid_fmnist_cnn", "fid_rec_fmnist_cnn", "knn_5_acc", "prior_entropy_norm"} <= set(printed)
    assert "fid" not in printed and all(np.isfinite(v) for v in printed.values())
    assert printed["fid_samples"] == 200
    info = json.loads((out / "evaluation.json").read_text())
    assert info["protocol"] == "cnn" and info["checkpoint"]["iteration"] == 7 and len(info["extractor"]["sha256"]) == 64
    assert pq.read_metadata(out / "latents.parquet").num_rows == 500 + 300
    assert {p.name for p in out.glob("*.png")} == {"samples.png", "reconstructions.png", "latent.png", "tsne.png"}


def test_evaluate_job_bad_input(image_checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--checkpoint", str(image_checkpoint), "--protocol", "kid"])
    assert info.value.code == 2 and "invalid choice: 'kid'" in capsys.readouterr().err
    points = _save(tmp_path / "points.pt", ExperimentConfig(), (2,))
    assert evaluate.main(["--checkpoint", str(points)]) == 2
    assert "'8gaussians' model" in capsys.readouterr().err
    # the default protocol needs Inception weights: offline, a clear error and exit 1, no fallback
    monkeypatch.setattr(feature_extractor, "CLEAN_WEIGHTS", tmp_path / "missing.pt")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    if not Path("/tmp/inception-2015-12-05.pt").is_file():
        assert evaluate.main(["--checkpoint", str(image_checkpoint), "--output-dir", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert "protocol 'clean'" in err and "--protocol cnn" in err and not (tmp_path / "o").exists()


def test_train_extractor_job_on_parquet_images(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(256) % 4
    base = rng.integers(0, 256, size=(4, 8, 8))
    images = np.clip(base[labels] + rng.integers(-30, 31, size=(256, 8, 8)), 0, 255).astype(np.uint8)
    write_images_parquet(tmp_path / "im.parquet", images, labels)
    args = ["--dataset", "parquet_images", "--path", str(tmp_path / "im.parquet"), "--cache-dir", str(tmp_path / "c")]
    assert train_extractor.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["cached"] is False and Path(first["path"]).name.startswith("parquet_im-cnn-")
    assert first["test_accuracy"] > 0.5  # 4 well-separated classes; chance 0.25
    assert train_extractor.main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["cached"] is True and second["sha256"] == first["sha256"]
    write_images_parquet(tmp_path / "unlabelled.parquet", images)
    assert train_extractor.main(["--dataset", "parquet_images", "--path", str(tmp_path / "unlabelled.parquet"),
                                 "--cache-dir", str(tmp_path / "c")]) == 2
    assert "needs labelled images" in capsys.readouterr().err
    assert train_extractor.main(["--dataset", "parquet_images", "--path", str(tmp_path / "missing.parquet")]) == 2
    assert "file not found" in capsys.readouterr().err
