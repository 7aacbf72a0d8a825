"""Bring-your-own 2D points: a Parquet file is a dataset (``--set data.path=...``)."""

import json
import math

import torch

from service.config import apply_overrides
from service.data import make_source, sample_toy, write_points_parquet
from service.loop import train
from service.presets import get_preset, smoke


def test_parquet_points_train_end_to_end(tmp_path):
    x, labels = sample_toy("rings", 2_000, torch.Generator().manual_seed(0))
    path = tmp_path / "points.parquet"
    write_points_parquet(path, x, labels)
    cfg = apply_overrides(smoke(get_preset("rings/mog-ip-lc")), [f"data.path={path}"])
    assert cfg.data.dataset == "parquet"  # setting the path is enough
    source = make_source(cfg.data)
    assert math.isclose(source.eval_range, 1.1 * float(x.abs().max()), rel_tol=1e-5)
    result = train(cfg, source, plot_dir=tmp_path / "plots")
    assert all(math.isfinite(v) for v in result.metrics.values()), json.dumps(result.metrics)
    assert (tmp_path / "plots" / "latent.png").stat().st_size > 0
