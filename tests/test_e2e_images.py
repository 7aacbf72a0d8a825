"""Image training end to end: exact resume, resume with another worker count (Ray Train on real Fashion-MNIST,
2 workers, is in test_e2e_evaluate.py, whose evaluation uses that run)."""

from __future__ import annotations

import copy
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from service import checkpoint
from service.config import apply_overrides
from service.data import make_source
from service.images import write_images_parquet
from service.loop import train
from service.presets import get_preset, smoke


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two threads per process oversubscribe badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_cfg(path: Path):
    """fmnist/mog10-ip-lc shrunk to 8x8 images: 4 iterations per epoch, 3 epochs (conversion, clip bounds)."""
    return apply_overrides(smoke(get_preset("fmnist/mog10-ip-lc")), {
        "data.path": str(path), "data.subset": None, "data.batch_size": 32, "network.channels": [4, 8],
        "network.latent_dim": 4, "eval.data_points": 64, "eval.plots": False})


def _tiny_images(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(4, 1, 8, 8))  # 4 "classes" plus noise
    labels = np.arange(128) % 4
    images = np.clip(base[labels] + rng.integers(-20, 21, size=(128, 1, 8, 8)), 0, 255).astype(np.uint8)
    path = tmp_path / "tiny.parquet"
    write_images_parquet(path, images, labels)
    return path


def _checkpoints(folder: Path, store: dict):
    """Save every checkpoint to disk at once (the state's CPU tensors alias the live parameters)."""
    def hook(state, iteration, metrics, final):
        if state is not None:
            store[iteration] = checkpoint.save(folder / f"it{iteration}.pt", state)
    return hook


def test_evaluation_cadence_counts_epochs_for_images(tmp_path):
    """``schedule.eval_every = 1`` on an epoch schedule evaluates after every epoch (4 iterations):
    the test-set summary and prior usage as ``eval/*``, and the training itself is unchanged."""
    from service.tracking import MemorySink

    cfg = _tiny_cfg(_tiny_images(tmp_path))
    source = make_source(cfg.data)
    plain = train(cfg, source)
    sink = MemorySink()
    cadenced = train(apply_overrides(cfg, {"schedule.eval_every": 1}), source, sink=sink)
    evals = [(step, m) for step, m in sink.metrics if any(k.startswith("eval/") for k in m)]
    assert [step for step, _ in evals] == [4, 8, 12]
    for _, m in evals:
        assert {"eval/rec_error_test", "eval/prior_entropy_norm", "eval/prior_active_components"} <= set(m)
        assert all(math.isfinite(v) for v in m.values())
    expected = plain.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in cadenced.model.state_dict().items())


def test_resume_continues_exactly(tmp_path):
    """One worker: a run resumed from its epoch-1 checkpoint ends bit-identical to the uninterrupted run."""
    cfg = _tiny_cfg(_tiny_images(tmp_path))
    source = make_source(cfg.data)
    paths: dict[int, Path] = {}
    full = train(cfg, source, on_checkpoint=_checkpoints(tmp_path, paths))
    assert sorted(paths) == [4, 8, 12]  # one checkpoint per epoch of 4 iterations
    state = checkpoint.load(paths[4])
    assert state["prior_type"] == "vamp" and full.model.prior_type == "mog"  # converted at the start of epoch 1
    assert state["config"]["schedule"]["unit"] == "epochs"  # the config as given
    resumed = train(cfg, source, resume=state)
    assert resumed.iteration == 12
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.metrics == full.metrics and math.isfinite(full.metrics["rec_error_test"])


class ThreadAllReduce:
    """The gradient all-reduce of ``distributed.allreduce_mean`` between ranks that are threads.

    (2 gloo processes are tested in ``tests/test_distributed.py``; here the point is the loop's
    resume logic with another worker count, and threads cost no interpreter start-up.) Every
    rank averages the same stacked tensors in the same order, so the results are bit-identical.
    """

    def __init__(self, world: int):
        self.barrier, self.slots = threading.Barrier(world), [None] * world

    def for_rank(self, rank: int):
        def sync(params):
            grads = [p.grad for p in params if p.grad is not None]
            self.slots[rank] = torch.cat([g.reshape(-1) for g in grads])
            self.barrier.wait()
            mean = torch.stack(self.slots).mean(0)
            self.barrier.wait()
            offset = 0
            for g in grads:
                g.copy_(mean[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return sync


def _train_ranks(cfg, world: int, resume=None, on_checkpoint=None) -> list:
    """``loop.train`` on ``world`` ranks (threads); returns every rank's TrainResult."""
    sync, results, errors = ThreadAllReduce(world), [None] * world, []

    def run(rank: int) -> None:
        try:
            # each rank its own copy of the checkpoint, as each Ray worker loads its own (Adam's
            # load_state_dict keeps the tensors it is given)
            results[rank] = train(cfg, make_source(cfg.data), grad_sync=sync.for_rank(rank), rank=rank,
                                  world_size=world, resume=copy.deepcopy(resume), on_checkpoint=on_checkpoint)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            errors.append(e)
            sync.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _trainable_keys(state: dict) -> list[str]:
    return [k for k in state if "running_" not in k and "num_batches" not in k]


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)])
def test_checkpoint_resumes_with_another_worker_count(tmp_path, before, after):
    cfg = _tiny_cfg(_tiny_images(tmp_path))
    paths: dict[int, Path] = {}
    _train_ranks(cfg, before, on_checkpoint=_checkpoints(tmp_path, paths))
    start = checkpoint.load(paths[8])  # mid-run: after the conversion, at the first adversarial iteration
    assert start["prior_type"] == "mog" and bool(start["model"]["prior.clip_on"]) is False
    results = _train_ranks(cfg, after, resume=start)
    assert all(r.iteration == 12 for r in results)
    states = [r.model.state_dict() for r in results]
    keys = _trainable_keys(states[0])
    for s in states[1:]:  # gradients are all-reduced: parameters agree; BN running stats are per worker
        assert all(torch.equal(states[0][k], s[k]) for k in keys)
    assert bool(states[0]["prior.clip_on"])  # clip bounds set at iteration 8 of the resumed run
    assert any(not torch.equal(states[0][k], start["model"][k]) for k in keys)  # and it trained on
    assert math.isfinite(results[0].metrics["rec_error_test"])
