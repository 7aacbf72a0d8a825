"""Data parallelism without Ray: 2 gloo processes must end with identical parameters."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from service.data import make_source
from service.distributed import allreduce_mean
from service.loop import train
from service.presets import get_preset, smoke


def rendezvous(directory) -> str:
    """A gloo rendezvous through a file in ``directory``, not a TCP port: a free port found first and listened on
    later can be bound by another process (a Ray worker, another test) in between, and rank 1 then talks to that
    process ("Connection reset by peer")."""
    return f"file://{os.path.join(str(directory), 'gloo-rendezvous')}"


def _worker(rank: int, world: int, init_method: str, preset: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        cfg = smoke(get_preset(preset))
        result = train(cfg, make_source(cfg.data), grad_sync=allreduce_mean, rank=rank, world_size=world)
        torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("preset", ["8gaussians/sintro", "8gaussians/mog-ip-lc"])
def test_two_ranks_end_with_identical_parameters(tmp_path, preset):
    mp.start_processes(_worker, args=(2, rendezvous(tmp_path), preset, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training did move them away from the (shared) initialisation
    cfg = smoke(get_preset(preset))
    from service.model import build_model

    init = build_model(cfg, (2,)).encoder.state_dict()
    assert any(not torch.equal(init[k], a[f"encoder.{k}"]) for k in init)


def test_allreduce_mean_without_process_group_is_identity():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    allreduce_mean([p])
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))
