"""Re-seeding unused mixture components (``prior.reseed_every``, an option beside the paper)."""

import copy
import dataclasses
import functools
import math

import pytest
import torch

import service.loop as loop_module
from service.config import ConfigError
from service.data import make_source
from service.loop import train
from service.presets import get_preset, smoke
from service.priors import MixturePrior, reset_optimizer_rows, reseed_unused_components
from service.tracking import MemorySink

pytestmark = pytest.mark.usefixtures("one_thread")

CLUSTERS = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0], [0.0, -4.0]])


def _posteriors(centres: torch.Tensor, per: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``per`` posterior means around each centre (std 0.1), posterior log-variance -4."""
    g = torch.Generator().manual_seed(seed)
    means = torch.cat([c + 0.1 * torch.randn(per, 2, generator=g) for c in centres])
    return means, torch.full_like(means, -4.0)


def _prior(means: list[list[float]], learnable: bool = True, logvar: float = -2.0) -> MixturePrior:
    prior = MixturePrior(len(means), 2, learnable_weights=learnable)
    with torch.no_grad():
        prior.means.copy_(torch.tensor(means))
        prior.logvars.fill_(logvar)
    return prior


def _state(prior: MixturePrior) -> list[torch.Tensor]:
    return [prior.means.detach().clone(), prior.logvars.detach().clone(), prior.logits.detach().clone()]


def test_an_unused_component_moves_to_the_cluster_no_component_explains():
    prior = _prior([[-3, 0], [3, 0], [0, 4], [20, 20]])  # the last one: far from every posterior
    mu, logvar = _posteriors(CLUSTERS)  # the cluster at (0, -4) has no component
    moved = reseed_unused_components(prior, mu, logvar)
    assert moved == [3]
    assert torch.linalg.vector_norm(prior.means[3].detach() - CLUSTERS[3]) < 0.5
    assert torch.equal(prior.logvars[3].detach(), torch.full((2,), -4.0))  # no clip range yet: the posterior's
    assert prior.components().weights[3].item() == pytest.approx(1 / 4, rel=1e-6)  # the mean of the others' weights
    # the other components did not move
    assert torch.equal(prior.means[:3].detach(), torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]]))


def test_a_prior_that_explains_its_posteriors_is_left_bit_for_bit():
    prior = _prior([[-3, 0], [3, 0], [0, 4], [0, -4], [20, 20]])  # one unused, nothing unexplained
    before = _state(prior)
    assert reseed_unused_components(prior, *_posteriors(CLUSTERS)) == []
    assert all(torch.equal(a, b) for a, b in zip(before, _state(prior)))


def test_no_unused_component_means_no_move_even_with_an_unexplained_cluster():
    prior = _prior([[-3, 0], [3, 0], [0, 4]])
    before = _state(prior)
    assert reseed_unused_components(prior, *_posteriors(CLUSTERS)) == []
    assert all(torch.equal(a, b) for a, b in zip(before, _state(prior)))


def test_two_unexplained_clusters_get_one_component_each():
    prior = _prior([[-3, 0], [3, 0], [20, 20], [-20, 20], [20, -20]], learnable=False)
    moved = reseed_unused_components(prior, *_posteriors(CLUSTERS))
    assert len(moved) == 2  # the third unused component stays: every posterior is explained by then
    placed = prior.means[moved].detach()
    nearest = torch.cdist(placed, CLUSTERS).argmin(1)
    assert sorted(nearest.tolist()) == [2, 3]
    assert torch.equal(prior.logits.detach(), torch.zeros(5))  # uniform weights stay uniform
    unused_left = [k for k in range(5) if k not in moved and k >= 2]
    assert len(unused_left) == 1 and prior.means[unused_left[0]].abs().max() == 20


def test_the_new_log_variance_stays_inside_the_frozen_clip_range():
    prior = _prior([[-3, 0], [3, 0], [0, 4], [20, 20]])
    with torch.no_grad():
        prior.logvars.copy_(torch.tensor([[-1.0, -1.5], [-2.0, -1.0], [-1.5, -2.5], [-1.0, -1.0]]))
    prior.init_clip_bounds()  # range [-2, -1] x [-2.5, -1]
    mu, _ = _posteriors(CLUSTERS)
    logvar = torch.tensor([-9.0, 0.5]).expand_as(mu)  # below the range in dim 0, above it in dim 1
    assert reseed_unused_components(prior, mu, logvar) == [3]
    assert prior.logvars[3].tolist() == [-2.0, -1.0]


def test_moved_rows_of_adams_moments_are_zeroed_and_the_others_kept():
    prior = _prior([[-3, 0], [3, 0], [0, 4], [20, 20]])
    opt = torch.optim.Adam(prior.trainable_parameters(), lr=1e-3)
    z = torch.randn(64, 2)
    for _ in range(3):
        opt.zero_grad()
        (-prior.log_prob(z).mean()).backward()
        opt.step()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (prior.means, prior.logvars, prior.logits)}
    reset_optimizer_rows(opt, prior, [1, 3])
    for p in (prior.means, prior.logvars, prior.logits):
        for key in ("exp_avg", "exp_avg_sq"):
            now, old = opt.state[p][key], before[id(p)][key]
            assert torch.all(now[[1, 3]] == 0)
            assert torch.equal(now[[0, 2]], old[[0, 2]]) and old[[1, 3]].abs().sum() > 0


@pytest.mark.parametrize("overrides, field", [
    ({"reseed_every": -1}, "prior.reseed_every"),
    ({"reseed_unused_below": 0.0}, "prior.reseed_unused_below"),
    ({"reseed_unused_below": 1.5}, "prior.reseed_unused_below"),
])
def test_bad_reseed_settings_name_the_field(overrides, field):
    cfg = get_preset("8gaussians/mog-ip-lc")
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(cfg.prior, **overrides)


@pytest.mark.parametrize("preset", ["8gaussians/mog-fixed-lc", "8gaussians/sintro"])
def test_reseeding_is_refused_for_a_prior_that_does_not_train(preset):
    cfg = get_preset(preset)
    with pytest.raises(ConfigError, match="prior.reseed_every: only allowed with a trained mixture"):
        dataclasses.replace(cfg.prior, reseed_every=100)


# --------------------------------------------------------------------------------------------
# In the loop: cadence, determinism, resume
# --------------------------------------------------------------------------------------------

def _reseed_cfg(every: int = 1):
    cfg = smoke(get_preset("8gaussians/mog-ip-lc"))  # 12 iterations, warm-up 6, milestone 9
    return dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, reseed_every=every, reseed_unused_below=0.3))


@pytest.fixture()
def always_move(monkeypatch):
    """Every unused component counts as movable (no density gap), so the smoke run really moves some."""
    monkeypatch.setattr(loop_module, "reseed_unused_components",
                        functools.partial(reseed_unused_components, gap=-math.inf))


def test_the_loop_reseeds_between_warm_up_and_the_first_milestone_deterministically(always_move):
    cfg = _reseed_cfg()
    sink, checkpoints = MemorySink(), []
    first = train(cfg, make_source(cfg.data), sink=sink,
                  on_checkpoint=lambda state, it, m, final: checkpoints.append(copy.deepcopy(state)))
    logged = [(step, m["prior/reseeded"]) for step, m in sink.metrics if "prior/reseeded" in m]
    assert [step for step, _ in logged] == [7, 8]  # after warm-up (6), before the milestone (9)
    assert sum(n for _, n in logged) > 0
    again = train(cfg, make_source(cfg.data))
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    # resumed from the checkpoint at iteration 6 (before both events): the same parameters
    mid = next(s for s in checkpoints if s["iteration"] == 6)
    resumed = train(cfg, make_source(cfg.data), resume=mid)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), resumed.model.state_dict().values()))
    # and the moves changed the run: without them the prior ends elsewhere
    plain = train(dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, reseed_every=0)), make_source(cfg.data))
    assert not torch.equal(plain.model.prior.means, first.model.prior.means)
