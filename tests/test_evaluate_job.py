"""``jobs.evaluate`` in-process on a small untrained image checkpoint: outputs and bad input."""

from __future__ import annotations

import json
import re
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
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    # progress on stderr: each phase as it starts ([k/n]), the long steps inside, how long each took
    err = captured.err.splitlines()
    phases = [ln for ln in err if re.match(r"evaluate \[\d/5\] [a-zA-Z ]+(: [^(]*)?( \(.* took [\d.]+ s\))?$", ln)]
    assert [ln.split(":")[0].split(" (")[0] for ln in phases] == [
        "evaluate [1/5] FID", "evaluate [2/5] latents and probes", "evaluate [3/5] prior usage",
        "evaluate [4/5] mode purity", "evaluate [5/5] plots"]
    assert phases[0] == "evaluate [1/5] FID: 200 images per set, protocol 'cnn'"
    assert re.match(r"evaluate \[2/5\] latents and probes \(FID took [\d.]+ s\)$", phases[1])
    steps = [ln for ln in err if ln.startswith("evaluate [1/5] FID: ") and ln.endswith(" s)")]
    assert [re.sub(r" \(\+[\d.]+ s\)$", "", ln).split(": ", 1)[1] for ln in steps] == [
        "generating 200 samples", "reconstructing 200 images", "features of the 200 real images",
        "features of the 200 generated images", "features of the 200 reconstructed images", "precision / recall"]
    assert re.match(r"evaluate: plots took [\d.]+ s; done$", [ln for ln in err if "; done" in ln][0])
    assert printed == pytest.approx(json.loads((out / "metrics.json").read_text()))
    assert {"fid_fmnist_cnn", "fid_rec_fmnist_cnn", "knn_5_acc", "prior_entropy_norm", "mode_purity",
            "modes_covered"} <= set(printed)
    assert "fid" not in printed and all(np.isfinite(v) for v in printed.values())
    assert printed["fid_samples"] == 200
    assert 0.1 <= printed["mode_purity"] <= 1 and 1 <= printed["modes_covered"] <= 10
    info = json.loads((out / "evaluation.json").read_text())
    assert info["protocol"] == "cnn" and info["checkpoint"]["iteration"] == 7 and len(info["extractor"]["sha256"]) == 64
    # mode purity: the cnn protocol's classifier (the same file), 50 samples per component with --smoke
    purity = info["purity"]
    assert purity["classifier"]["sha256"] == info["extractor"]["sha256"] and purity["samples_per_component"] == 50
    assert len(purity["per_component"]) == len(purity["majority_class"]) == 10
    assert all(round(p * 50) == pytest.approx(p * 50) for p in purity["per_component"])
    assert pq.read_metadata(out / "latents.parquet").num_rows == 500 + 300
    assert {p.name for p in out.glob("*.png")} == {"samples.png", "reconstructions.png", "latent.png", "tsne.png"}


def test_evaluate_job_bad_input(image_checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--checkpoint", str(image_checkpoint), "--protocol", "kid"])
    assert info.value.code == 2 and "invalid choice: 'kid'" in capsys.readouterr().err
    # a tabular checkpoint whose Parquet file is gone: exit 2 naming the data, nothing written
    table = tmp_path / "points.parquet"
    from service.data import write_points_parquet
    write_points_parquet(table, np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32))
    cfg = apply_overrides(ExperimentConfig(name="parquet/test"), {"data.dataset": "parquet", "data.path": str(table)})
    points = _save(tmp_path / "points.pt", cfg, (2,))
    table.unlink()
    assert evaluate.main(["--checkpoint", str(points), "--output-dir", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "data:" in err and "points.parquet" in err and not (tmp_path / "p").exists()
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


def test_end_of_training_hook_runs_the_configured_protocol(tmp_path: Path, monkeypatch) -> None:
    """``eval.fid_protocol=cnn``: loop.train's final evaluation carries the image metrics (SPEC §7.4)."""
    import torch

    from service.data import make_source
    from service.loop import train
    from service.presets import get_preset, smoke

    rng = np.random.default_rng(1)
    labels = np.arange(128) % 4
    images = np.clip(rng.integers(0, 256, size=(4, 8, 8))[labels] + rng.integers(-20, 21, size=(128, 8, 8)), 0, 255)
    write_images_parquet(tmp_path / "tiny.parquet", images.astype(np.uint8), labels)
    monkeypatch.setenv("INTROPRIOR_CACHE_DIR", str(tmp_path / "cache"))
    cfg = apply_overrides(smoke(get_preset("fmnist/mog10-ip-lc")), {
        "data.path": str(tmp_path / "tiny.parquet"), "data.subset": None, "data.batch_size": 32,
        "network.channels": [4, 8], "network.latent_dim": 4, "eval.data_points": 64, "eval.plots": False,
        "eval.fid_protocol": "cnn", "eval.fid_samples": 100, "eval.purity_samples": 20})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small model on a shared machine
    try:
        result = train(cfg, make_source(cfg.data))
    finally:
        torch.set_num_threads(threads)
    names = {"fid_parquet_tiny_cnn", "fid_rec_parquet_tiny_cnn", "precision_parquet_tiny_cnn", "knn_5_acc",
             "rec_error_test", "prior_entropy_norm"}
    assert names <= set(result.metrics) and all(np.isfinite(result.metrics[k]) for k in names)
    assert result.metrics["fid_samples"] == 100
    assert len(list((tmp_path / "cache").glob("parquet_tiny-cnn-*.pt"))) == 1  # extractor and purity: one file
    # mode purity of the 4 labelled classes, per component into the checkpoint's extra
    assert 0.25 <= result.metrics["mode_purity"] <= 1 and 1 <= result.metrics["modes_covered"] <= 4
    m = cfg.prior.num_components
    assert len(result.state["extra"]["mode_purity"]) == len(result.state["extra"]["majority_mode"]) == m
    assert set(result.state["extra"]["majority_mode"]) <= {0, 1, 2, 3}
